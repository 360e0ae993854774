"""Which malloc the model-server replicas run with.

glibc's malloc fragments under a CPU engine's allocations (activations of a different size every
step): a soaking replica's RSS rose ~7 MB a minute with nothing leaking, where jemalloc stayed flat
(docs/reliability.md). Replicas get jemalloc through ``LD_PRELOAD`` in their Ray runtime
environment, the way vLLM's CPU build preloads tcmalloc. ``malloc_library``:

- ``"auto"`` (default): jemalloc where installed (the venv's ``lib/``, where ``make install``
  puts it, or the system's), else glibc, with a warning;
- ``"glibc"``: no preload;
- a path: that library, which must exist.
"""

from __future__ import annotations

import logging
import os
import sys

from cluster.errors import InvalidConfigError

logger = logging.getLogger(__name__)

_NAME = "libjemalloc.so.2"
_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def candidates() -> list[str]:
    return [os.path.join(sys.prefix, "lib", _NAME)] + [os.path.join(d, _NAME) for d in _SYSTEM_DIRS]


def resolve(setting: str) -> str | None:
    """The library to preload for ``setting`` (see the module doc), or None for glibc."""
    if not isinstance(setting, str) or not setting:
        raise InvalidConfigError("malloc_library", f"must be 'auto', 'glibc' or a path, got {setting!r}")
    if setting == "glibc":
        return None
    if setting == "auto":
        found = next((path for path in candidates() if os.path.isfile(path)), None)
        if found is None:
            logger.warning("jemalloc not found (%s): replicas use glibc malloc, whose RSS creeps up "
                           "under load; `make install` or `apt-get install libjemalloc2` adds it", _NAME)
        return found
    if not os.path.isfile(setting):
        raise InvalidConfigError("malloc_library", f"no such file: {setting!r}")
    return setting


def runtime_env(setting: str) -> dict:
    """A Ray ``runtime_env`` that preloads the library (empty for glibc)."""
    library = resolve(setting)
    return {"env_vars": {"LD_PRELOAD": library}} if library else {}
