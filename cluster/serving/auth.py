"""Optional API-key authentication for both APIs.

The key is read once, where the ingress starts, from a file (a mounted Kubernetes secret) or an
environment variable; it never enters the config, which Serve logs, and is never logged itself.
Clients send it as ``authorization: Bearer <key>`` (gRPC metadata or HTTP header; HTTP also takes
OpenAI's ``api-key`` header). Health checks stay open, so probes need no secret.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from cluster.errors import InvalidConfigError, UnauthenticatedError


class ApiKeyAuth:
    """Checks request credentials against one key; with no key configured every request passes."""

    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @classmethod
    def from_sources(cls, key_file: str | None, key_env: str | None) -> "ApiKeyAuth":
        """Read the key from ``key_file`` or the variable ``key_env`` (an unset one fails start-up)."""
        if key_file:
            try:
                with open(key_file) as f:
                    key = f.read().strip()
            except OSError as err:
                raise InvalidConfigError("api_key_file", f"cannot read {key_file!r}: {err.strerror}") from None
            return cls(_non_empty(key, "api_key_file"))
        if key_env:
            return cls(_non_empty(os.environ.get(key_env, ""), "api_key_env"))
        return cls(None)

    def check(self, headers: Iterable[tuple[str, str]]) -> None:
        """Raise UnauthenticatedError unless ``headers`` (gRPC metadata or HTTP headers) carry the key."""
        if self._key is None:
            return
        for name, value in headers:
            name = name.lower()
            if name == "authorization" and value[:7].lower() == "bearer ":
                offered = value[7:].strip()
            elif name == "api-key":
                offered = value.strip()
            else:
                continue
            if hmac.compare_digest(offered.encode("utf-8", "replace"), self._key):
                return
            raise UnauthenticatedError("the API key is not valid")
        raise UnauthenticatedError("an API key is required: send 'authorization: Bearer <key>'")


def _non_empty(key: str, field: str) -> str:
    if not key:
        raise InvalidConfigError(field, "names an empty or unset API key")
    return key
