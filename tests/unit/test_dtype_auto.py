"""dtype "auto": bfloat16 where the device computes it natively, float32 on CPUs that only emulate it
(AVX2-only: oneDNN refuses to pack bfloat16 weights there and its bfloat16 matmuls are several times
slower than float32's). Explicit dtypes are kept as asked."""

from __future__ import annotations

import pytest
import torch

import cluster.config as config_module
from cluster.cli import main
from cluster.config import ModelConfig, resolve_dtype
from cluster.errors import InvalidConfigError
from cluster.model.layers.packed_weight import PackedWeight, can_pack
from cluster.serving.config import ServingConfig


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cpu_follows_native_bfloat16_support(monkeypatch, native, expected):
    monkeypatch.setattr(config_module, "cpu_has_native_bfloat16", lambda: native)
    assert resolve_dtype("auto", "cpu") == expected
    assert ModelConfig(dtype="auto", device="cpu").resolved_dtype() == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_a_gpu_is_bfloat16_where_it_has_it(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", "cuda") == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(monkeypatch, dtype):
    monkeypatch.setattr(config_module, "cpu_has_native_bfloat16", lambda: False)
    assert ModelConfig(dtype=dtype, device="cpu").resolved_dtype() == dtype


def test_a_bad_dtype_names_the_field():
    with pytest.raises(InvalidConfigError) as err:
        ModelConfig(dtype="int8")
    assert err.value.field == "dtype"


def test_serving_defaults_to_auto_and_keeps_an_explicit_choice():
    assert ServingConfig(engine={"model": "smollm2-135m"}).engine_config().model.dtype == "auto"
    assert ServingConfig(engine={"model": "smollm2-135m", "dtype": "float32"}).engine_config().model.dtype == "float32"


def test_this_machine_resolves_auto_to_what_its_onednn_runs():
    expected = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    assert resolve_dtype("auto", "cpu") == expected


def test_bfloat16_weights_work_where_onednn_cannot_pack_them(monkeypatch):
    """Packing is skipped (not attempted, which raised at load on AVX2-only CPUs) where oneDNN has
    no bfloat16 kernels; the layer then computes through ``F.linear``, same result."""
    weight = torch.randn(48, 32).bfloat16()
    x = torch.randn(5, 32).bfloat16()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not can_pack(weight)
    packed = PackedWeight(weight)
    assert packed.packed is None
    torch.testing.assert_close(packed.linear(x), torch.nn.functional.linear(x, weight))


def test_benchmarks_resolve_auto_before_they_run(monkeypatch):
    """A benchmark prints and hands its peer (vLLM, transformers) the dtype it ran, never "auto"."""
    seen = {}
    monkeypatch.setattr(config_module, "cpu_has_native_bfloat16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("cluster.bench.run_bench", lambda args: seen.setdefault("dtype", args.dtype) and 0)
    assert main(["bench", "--skip-hf"]) == 0
    assert seen["dtype"] == "float32"
