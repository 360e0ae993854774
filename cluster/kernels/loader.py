"""Builds and loads the optional C++ CPU kernels (compiled once per machine, then cached).

- ``paged_decode``: decode attention reading K/V where they lie in the paged cache (torch's
  CPU attention needs each context gathered into a contiguous copy first).
- ``rms_norm``: fused residual add + RMSNorm for bfloat16/float16 activations.

They are built with the machine's C++ compiler through torch.utils.cpp_extension on first
use (about 30 s, cached under ~/.cache/torch_extensions); if that fails, ``load()`` returns
None and the layers keep their pure-torch paths.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def load():
    """The compiled module, or None when it cannot be built here."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    try:
        from torch.utils.cpp_extension import load as load_extension

        here = os.path.dirname(__file__)
        sources = [os.path.join(here, name) for name in ("bindings.cpp", "paged_decode.cpp", "rms_norm.cpp")]
        return load_extension(name="llm_cluster_cpu_kernels", sources=sources,
                              extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], verbose=False)
    except Exception as err:  # no compiler, no headers: the torch path still works
        logger.warning("CPU kernels unavailable, using plain torch paths: %s", err)
        return None
