"""Loads the C++ paged decode-attention kernel (compiled once per machine, then cached).

Torch's CPU attention needs each decode's context gathered into a contiguous copy first;
this kernel reads K and V where they lie in the paged cache. It is built with the
machine's C++ compiler through torch.utils.cpp_extension on first use (about a minute,
cached under ~/.cache/torch_extensions); if that fails, ``load()`` returns None and the
attention module keeps its pure-torch path.
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

        source = os.path.join(os.path.dirname(__file__), "paged_decode.cpp")
        return load_extension(name="llm_cluster_paged_decode", sources=[source],
                              extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], verbose=False)
    except Exception as err:  # no compiler, no headers: the torch path still works
        logger.warning("paged decode kernel unavailable, using plain torch attention: %s", err)
        return None
