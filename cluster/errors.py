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
    """The engine (or one of its workers) died or is restarting; in-flight requests cannot finish
    (gRPC UNAVAILABLE, HTTP 503). The replica restarts its engine; retrying later succeeds."""


class RequestFailedError(RuntimeError):
    """One request hit an internal fault and was ended; the engine goes on serving every other
    request (gRPC INTERNAL, HTTP 500). ``request_id`` names it in the reply and the log."""

    def __init__(self, request_id: str, message: str):
        self.request_id = request_id
        self.message = message
        super().__init__(f"request {request_id!r} failed: {message}")

    def __reduce__(self):
        return RequestFailedError, (self.request_id, self.message)


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured bound: retry later (HTTP 429).
    ``retry_after_s`` is the server's guess of when a retry may be admitted."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def __reduce__(self):
        return QueueFullError, (str(self), self.retry_after_s)


class UnauthenticatedError(RuntimeError):
    """The request carries no valid API key (gRPC UNAUTHENTICATED, HTTP 401)."""
