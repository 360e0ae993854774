"""SwiftKV's architecture facts from a published-style llama_swiftkv config.json, and the FLOPs model."""

from __future__ import annotations

import json

import pytest

from cluster.errors import InvalidConfigError, ModelLoadError
from cluster.model.arch import ModelArch
from cluster.swiftkv.bench import prefill_flops

# The shape of a Llama-3.1-8B SwiftKV config (as published), without its weights.
CONFIG = {"model_type": "llama_swiftkv", "architectures": ["LlamaSwiftKVForCausalLM"], "vocab_size": 128256,
          "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "num_key_value_layers": 16, "key_value_group_size": 1, "eos_token_id": [128001, 128008, 128009],
          "bos_token_id": 128000}


def arch_of(tmp_path, **changes) -> ModelArch:
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    return ModelArch.from_dir(str(tmp_path))


def test_a_published_config_turns_swiftkv_on_unless_it_says_otherwise(tmp_path):
    arch = arch_of(tmp_path)
    assert arch.swiftkv and arch.swiftkv_layer == 16 and arch.num_cache_layers == 32
    assert [arch.cache_index(i) for i in (0, 15, 16, 31)] == [0, 15, 16, 31]
    assert not arch_of(tmp_path, swiftkv=False).swiftkv
    assert not arch_of(tmp_path).with_swiftkv(False).swiftkv


def test_across_kv_groups_share_caches_and_a_last_group_may_be_short(tmp_path):
    arch = arch_of(tmp_path, key_value_group_size=4)
    assert arch.num_cache_layers == 16 + 4
    assert [arch.cache_index(i) for i in (15, 16, 19, 20, 31)] == [15, 16, 16, 17, 19]
    assert arch.kv_bytes_per_token(2) == 2 * 20 * 8 * 128 * 2
    odd = arch_of(tmp_path, num_hidden_layers=30, num_key_value_layers=15, key_value_group_size=2)
    assert odd.num_cache_layers == 15 + 8 and odd.cache_index(29) == 22


@pytest.mark.parametrize("changes", [{"num_key_value_layers": 0}, {"num_key_value_layers": 33},
                                     {"key_value_group_size": 0}])
def test_bad_swiftkv_config_values_are_model_load_errors(tmp_path, changes):
    with pytest.raises(ModelLoadError, match=next(iter(changes))):
        arch_of(tmp_path, **changes)


def test_swiftkv_on_a_plain_checkpoint_is_refused_naming_the_option(tmp_path):
    plain = arch_of(tmp_path, model_type="llama")
    assert plain.num_cache_layers == 32 and not plain.has_swiftkv_weights
    with pytest.raises(InvalidConfigError) as err:
        plain.with_swiftkv(True)
    assert err.value.field == "swiftkv"


def test_prefill_flops_halve_with_the_split_at_half_depth(tmp_path):
    arch = arch_of(tmp_path, swiftkv=False)
    full, half = prefill_flops(arch, 2000, None), prefill_flops(arch, 2000, 16)
    assert 0.5 < half / full < 0.56  # the later layers' K/V projections and last token cost a little
    assert prefill_flops(arch, 2000, 16, 2) < half  # AcrossKV: fewer K/V projections
    assert prefill_flops(arch, 2000, 32) == pytest.approx(full)  # no SwiftKV layers: nothing skipped
