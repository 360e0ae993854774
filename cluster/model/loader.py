"""Build a model and fill it from safetensors, each rank reading only its own slices.

Weights are never unpickled: only ``*.safetensors`` files (single or sharded with an
index) are read, lazily, through ``safe_open(...).get_slice``.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from safetensors import safe_open

from cluster.errors import ModelLoadError
from cluster.model.arch import ModelArch
from cluster.model.llama import LlamaForCausalLM
from cluster.model.registry import model_class
from cluster.distributed.tp_group import TPGroup

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def load_model(path: str, arch: ModelArch, max_positions: int, tp: TPGroup, dtype: str,
               attention: type[torch.nn.Module] | None = None) -> LlamaForCausalLM:
    """Instantiate the model for this rank and load its shard of the weights. ``attention`` is the
    layers' attention backend (the paged one when None)."""
    extra = {} if attention is None else {"attention": attention}
    try:
        model = model_class(arch.architecture)(arch, max_positions, tp, torch_dtype(dtype), **extra)
    except ValueError as err:  # head counts the tensor-parallel size cannot split
        raise ModelLoadError(str(err), field="tensor_parallel_size") from err
    try:
        loaded = _load_weights(model, path)
    except ModelLoadError:
        raise
    except Exception as err:  # truncated files, shape mismatches: the checkpoint is unusable
        raise ModelLoadError(f"cannot load the weights in {path!r}: {err}") from err
    _check_complete(model, loaded)
    return model.eval()


def finalize_weights(model: torch.nn.Module, kernels=None, gguf_blocks: bool = False) -> None:
    """Let layers prepare their loaded weights for the device (pack for oneDNN, pick native kernels;
    ``gguf_blocks``: linears whose float32 weights are exact GGUF blocks keep those, see PackedWeight).
    Parts before the modules that hold them: a decoder layer plans its decode steps on what its
    linears and norms prepared."""
    for module in reversed(list(model.modules())):
        if hasattr(module, "_matmul"):  # the linears and the LM head: they hold a PackedWeight
            module.finalize_weights(kernels, gguf_blocks=gguf_blocks)
        elif hasattr(module, "finalize_weights"):
            module.finalize_weights(kernels)


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {path!r}")
    return files


def _load_weights(model: LlamaForCausalLM, path: str) -> set[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with torch.no_grad():
        for file in weight_files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    target = _target(model, name, params)
                    if target is None:
                        continue
                    param_name, shard_id = target
                    param = params[param_name]
                    source = f.get_slice(name)
                    _check_shape(name, source.get_shape(), model.full_shape(param_name, shard_id))
                    getattr(param, "weight_loader", _load_replicated)(param, source, shard_id)
                    loaded.add(param_name)
    return loaded


def _check_shape(name: str, found: list[int], expected: tuple[int, ...]) -> None:
    if tuple(found) != tuple(expected):
        raise ModelLoadError(f"checkpoint tensor {name!r} has shape {tuple(found)}; the config implies {expected}")


def _load_replicated(param: torch.nn.Parameter, source, shard_id=None) -> None:
    """Norm weights and other tensors every rank holds whole."""
    param.data.copy_(source[:])


def _target(model: LlamaForCausalLM, name: str, params: dict) -> tuple[str, object] | None:
    """Checkpoint tensor name -> (our parameter name, shard id), or None to skip it."""
    if "rotary_emb.inv_freq" in name:
        return None
    swiftkv = _swiftkv_target(model.arch, name)
    if swiftkv is not None:
        return swiftkv or None
    for ckpt_part, (our_part, shard_id) in model.packed_modules.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
    if name == "lm_head.weight" and model.arch.tie_word_embeddings:
        return None  # tied: the embedding table serves both
    if name not in params:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the {model.arch.model_type} model")
    return name, None


_SWIFTKV_PROJ = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj(_swiftkv)?\.(weight|bias)$")


def _swiftkv_target(arch: ModelArch, name: str) -> tuple[str, object] | tuple[()] | None:
    """SwiftKV's tensors and the ones it replaces: a target, ``()`` to skip, None if neither.

    With SwiftKV on, layers past the split keep only their own q projection's SwiftKV twin (the
    model's q/k/v there are unused) and each AcrossKV group's first layer supplies the group's K/V;
    with it off, the SwiftKV tensors are skipped.
    """
    split, on = arch.swiftkv_layer, arch.skips_prefill
    if name == "model.norm_swiftkv.weight":
        return (name, None) if on else ()
    match = _SWIFTKV_PROJ.match(name)
    if match is None:
        return None
    layer, which, twin, suffix = int(match[1]), match[2], bool(match[3]), match[4]
    if not twin:
        return () if on and layer >= split else None
    if not on or layer < split:
        return ()
    if which == "q":
        return name, None
    group, offset = divmod(layer - split, arch.key_value_group_size)
    if offset:
        raise ModelLoadError(f"checkpoint tensor {name!r}: only the first layer of each AcrossKV group "
                             f"(key_value_group_size={arch.key_value_group_size}) has K/V projections")
    return f"model.kv_proj_swiftkv.{suffix}", (group, which)


def _check_complete(model: LlamaForCausalLM, loaded: set[str]) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
