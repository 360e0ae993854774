"""Which malloc the model-server replicas run with.

glibc's malloc fragments under a CPU engine's allocations (activations of a different size every
step): a soaking replica's RSS rose ~7 MB a minute with nothing leaking, where jemalloc stayed flat
(docs/reliability.md). Replicas get jemalloc through ``LD_PRELOAD`` in their Ray runtime
environment, the way vLLM's CPU build preloads tcmalloc. ``malloc_library``:

- ``"auto"`` (default): jemalloc where installed (the venv's ``lib/``, where ``make install``
  puts it, or the system's), else glibc, with a warning;
- ``"glibc"``: no preload;
- a path: that library, which must exist.

jemalloc runs with purging off (``MALLOC_CONF``, ``JEMALLOC_CONF`` below): by default it hands freed
pages back to the kernel within seconds, and a CPU engine frees and reallocates megabytes of
activations every step, so each step faulted its pages in again (5.3 million minor faults in one run
of ``llm-cluster bench``'s workload: 124 tokens/s against glibc's 134; with purging off 22 faults and
134.5 tokens/s; docs/benchmarks.md, twelfth pass). The process then keeps its peak heap, which the step
budget (``max_num_batched_tokens``) bounds. An operator's own ``MALLOC_CONF`` (where the app is built)
is appended, so it wins where both set an option.
"""

from __future__ import annotations

import logging
import os
import sys

from cluster.errors import InvalidConfigError

logger = logging.getLogger(__name__)

_NAME = "libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # never purge: no page faults on reused memory
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
    """A Ray ``runtime_env`` that preloads the library with ``JEMALLOC_CONF`` (empty for glibc)."""
    library = resolve(setting)
    if not library:
        return {}
    own = os.environ.get("MALLOC_CONF", "").strip(",")
    return {"env_vars": {"LD_PRELOAD": library, "MALLOC_CONF": f"{JEMALLOC_CONF},{own}" if own else JEMALLOC_CONF}}
