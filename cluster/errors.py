"""Typed errors shared by every layer of the stack.

The serving layer maps these to gRPC / HTTP status codes in one place, so every
user-facing failure must be one of these types.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range or malformed. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable, so the error keeps its type across Ray actor calls
        return InvalidRequestError, (self.field, self.message)


class InvalidConfigError(ValueError):
    """An engine / model configuration value is invalid. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        return type(self), (self.field, self.message)


class ModelLoadError(InvalidConfigError):
    """The model path does not exist or holds an unsupported checkpoint."""

    def __init__(self, message: str, field: str = "model"):
        super().__init__(field, message)

    def __reduce__(self):
        return ModelLoadError, (self.message, self.field)


class EngineDeadError(RuntimeError):
    """The engine (or one of its workers) died; in-flight requests cannot finish."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured bound: retry later (HTTP 429)."""
