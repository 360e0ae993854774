"""Which model class builds a checkpoint: by the ``architectures`` name in its config.json.

Every supported checkpoint (Llama, Mistral, Qwen2, SwiftKV Llamas) is built by
``LlamaForCausalLM``. ``register_model`` adds a class for another name, given as the class itself
(this process only) or as ``"module:Class"`` (imported where the model is built, so Ray workers
find it too). Tests register fault-injecting models this way.
"""

from __future__ import annotations

import importlib

_REGISTERED: dict[str, object] = {}  # architecture name -> class or "module:Class"


def register_model(architecture: str, model_class) -> None:
    """Build checkpoints whose config.json names ``architecture`` with ``model_class``."""
    if not isinstance(architecture, str) or not architecture:
        raise ValueError("architecture must be a non-empty string")
    _REGISTERED[architecture] = model_class


def model_class(architecture: str | None):
    """The class for ``architecture``; LlamaForCausalLM for every name not registered."""
    entry = _REGISTERED.get(architecture) if architecture else None
    if entry is None:
        from cluster.model.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        return getattr(importlib.import_module(module), name)
    return entry
