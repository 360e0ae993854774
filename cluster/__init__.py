"""llm-cluster: LLM serving on Ray with a paged-KV, continuous-batching engine.

``import cluster`` stays torch-free (the ingress and router processes import it): the offline
``LLM`` and its outputs load on first use.
"""

from __future__ import annotations

import importlib

from cluster.errors import EngineDeadError, InvalidConfigError, InvalidRequestError, ModelLoadError, QueueFullError
from cluster.sampling_params import SamplingParams

_LAZY = {"LLM": "cluster.llm", "RequestOutput": "cluster.outputs", "CompletionOutput": "cluster.outputs"}

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput",
    "InvalidRequestError", "InvalidConfigError", "ModelLoadError", "EngineDeadError", "QueueFullError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
