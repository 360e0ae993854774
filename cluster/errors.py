"""Typed errors shared by every layer of the stack.

The serving layer maps these to gRPC / HTTP status codes in one place, so every
user-facing failure must be one of these types.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range or malformed. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class InvalidConfigError(ValueError):
    """An engine / model configuration value is invalid. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(InvalidConfigError):
    """The model path does not exist or holds an unsupported checkpoint."""

    def __init__(self, message: str, field: str = "model"):
        super().__init__(field, message)


class EngineDeadError(RuntimeError):
    """The engine (or one of its workers) died; in-flight requests cannot finish."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured bound: retry later (HTTP 429)."""
