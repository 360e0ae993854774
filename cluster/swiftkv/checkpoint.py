"""SwiftKV checkpoints in the published ``llama_swiftkv`` format, and SwiftKV parameter files.

A *parameter file* holds only the SwiftKV tensors (``model.norm_swiftkv.weight`` and per layer
``q_proj_swiftkv`` / ``k_proj_swiftkv`` / ``v_proj_swiftkv``, named as in the published
checkpoints) plus, in its safetensors metadata, ``num_key_value_layers``,
``key_value_group_size`` and how it was made. Applied to its base checkpoint it gives a full
``llama_swiftkv`` checkpoint: the base config with ``model_type: llama_swiftkv``, the base weights
unchanged, and the SwiftKV tensors in their own file, all named by a safetensors index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cluster.errors import InvalidConfigError, ModelLoadError

PARAMS_DIR = os.path.join(os.path.dirname(__file__), "params")
BUNDLED_PARAMS = {"smollm2-135m": "smollm2-135m-swiftkv.safetensors"}  # model alias -> file in PARAMS_DIR
SWIFTKV_FILE = "model-swiftkv.safetensors"
_DONE = ".swiftkv-complete"


@dataclass
class SwiftKVParams:
    num_key_value_layers: int
    key_value_group_size: int
    tensors: dict[str, torch.Tensor]  # published names -> tensors
    info: dict  # how they were made (recipe, base model, ...)


def save_params(path: str, params: SwiftKVParams, dtype: torch.dtype = torch.bfloat16) -> None:
    metadata = {"num_key_value_layers": str(params.num_key_value_layers),
                "key_value_group_size": str(params.key_value_group_size), "info": json.dumps(params.info)}
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in params.tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def load_params(path: str) -> SwiftKVParams:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return SwiftKVParams(int(meta["num_key_value_layers"]), int(meta["key_value_group_size"]), tensors,
                             json.loads(meta.get("info", "{}")))
    except (OSError, KeyError, ValueError) as err:
        raise ModelLoadError(f"{path!r} is not a SwiftKV parameter file: {err}") from err


def bundled_params(model: str) -> str | None:
    name = BUNDLED_PARAMS.get(model)
    path = os.path.join(PARAMS_DIR, name) if name else None
    return path if path and os.path.isfile(path) else None


def swiftkv_config(base_config: dict, num_key_value_layers: int, key_value_group_size: int,
                   enabled: bool = True) -> dict:
    """The base model's config.json turned into a ``llama_swiftkv`` one."""
    if base_config.get("model_type") not in ("llama", "llama_swiftkv"):
        raise InvalidConfigError("swiftkv", f"SwiftKV supports Llama checkpoints, not model_type "
                                 f"{base_config.get('model_type')!r}")
    layers = base_config["num_hidden_layers"]
    if not 1 <= num_key_value_layers <= layers:
        raise InvalidConfigError("num_key_value_layers", f"must be in [1, {layers}], got {num_key_value_layers}")
    if key_value_group_size < 1:
        raise InvalidConfigError("key_value_group_size", f"must be >= 1, got {key_value_group_size}")
    return {**base_config, "model_type": "llama_swiftkv", "architectures": ["LlamaSwiftKVForCausalLM"],
            "swiftkv": enabled, "num_key_value_layers": num_key_value_layers,
            "key_value_group_size": key_value_group_size}


def write_checkpoint(base_dir: str, params: SwiftKVParams, out_dir: str, link: bool = False) -> str:
    """Base checkpoint + SwiftKV parameters -> a ``llama_swiftkv`` checkpoint directory.

    ``link`` symlinks the base files instead of copying them (the engine's cache does this).
    """
    with open(os.path.join(base_dir, "config.json")) as f:
        config = swiftkv_config(json.load(f), params.num_key_value_layers, params.key_value_group_size)
    os.makedirs(out_dir, exist_ok=True)
    weight_map: dict[str, str] = {}
    for name in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, name)
        if name in ("config.json", "model.safetensors.index.json", SWIFTKV_FILE) or name.startswith(".") \
                or not os.path.isfile(src):
            continue
        dst = os.path.join(out_dir, name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.abspath(src), dst) if link else shutil.copyfile(src, dst)
        if name.endswith(".safetensors"):
            with safe_open(src, framework="pt") as f:
                weight_map.update({k: name for k in f.keys() if "_swiftkv" not in k})
    save_file({k: v.contiguous() for k, v in params.tensors.items()}, os.path.join(out_dir, SWIFTKV_FILE),
              metadata={"format": "pt"})
    weight_map.update({k: SWIFTKV_FILE for k in params.tensors})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"swiftkv": params.info}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def with_params(base_dir: str, params_path: str, cache_dir: str) -> str:
    """The cached ``llama_swiftkv`` directory for base + parameter file (built once, atomically)."""
    stat = os.stat(params_path)
    key = hashlib.sha256(f"{os.path.abspath(base_dir)}:{os.path.abspath(params_path)}:{stat.st_size}:"
                         f"{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, "models", f"swiftkv-{key}")
    if os.path.isfile(os.path.join(target, _DONE)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"swiftkv-{key}.", dir=os.path.dirname(target))
    try:
        write_checkpoint(base_dir, load_params(params_path), staging, link=True)
        open(os.path.join(staging, _DONE), "w").close()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(model_dir: str, model_name: str, swiftkv: bool | None, params_path: str | None,
            cache_dir: str) -> str:
    """The directory the engine loads: ``model_dir`` itself, or it with SwiftKV parameters applied
    (an explicit ``swiftkv_params`` file, or with ``swiftkv=True`` on a plain checkpoint the
    parameters shipped for that model)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {model_dir!r}/config.json: {err}") from err
    is_swiftkv = isinstance(config, dict) and config.get("model_type") == "llama_swiftkv"
    if params_path is None and (swiftkv is not True or is_swiftkv):
        return model_dir
    if params_path is None:
        params_path = bundled_params(model_name)
        if params_path is None:
            raise InvalidConfigError("swiftkv", f"{model_name!r} has no SwiftKV weights: pass swiftkv_params= "
                                     "(from `llm-cluster swiftkv distill`) or a llama_swiftkv checkpoint")
    if not os.path.isfile(params_path):
        raise InvalidConfigError("swiftkv_params", f"no such file: {params_path!r}")
    return with_params(model_dir, params_path, cache_dir)
