"""SwiftKV in the engine against the dense reference forward (every layer, every token, the SwiftKV
K/V rule), with prefill skipping, chunked prefill, the prefix cache and mixed batches; AcrossKV's
cache sizing; checkpoint save -> load; the distillation tool."""

from __future__ import annotations

import json
import os
from argparse import Namespace

import pytest
import torch

from cluster.llm import LLM
from cluster.model.arch import ModelArch
from cluster.runner.kv_cache import block_bytes, num_blocks_for
from cluster.sampling_params import SamplingParams
from cluster.swiftkv.checkpoint import SwiftKVParams, load_params, save_params, write_checkpoint
from cluster.swiftkv.dense_model import from_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def perturbed_params(model_dir: str, split: int, group: int, seed: int = 0) -> SwiftKVParams:
    """SwiftKV parameters initialised from the model, then nudged so they differ from any base layer."""
    dense = from_checkpoint(model_dir, split, group)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dense.trainable_parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return SwiftKVParams(split, group, dense.published_tensors(), {"test": "perturbed init"})


def prompts_with_shared_prefixes() -> list[list[int]]:
    shared = [200 + 7 * i for i in range(37)]
    return [[100 + i for i in range(5)], shared, [300 + i for i in range(61)], shared + [11, 12, 13],
            shared[:20] + [5, 6]]


def dense_reference(model_dir: str, params: SwiftKVParams, prompts, max_tokens: int) -> list[list[int]]:
    dense = from_checkpoint(model_dir, params.num_key_value_layers, params.key_value_group_size, params)
    return [dense.greedy(p, max_tokens) for p in prompts]


@pytest.mark.parametrize("split, group", [(2, 1), (2, 2), (1, 3), (5, 1)])
def test_engine_matches_the_dense_swiftkv_reference(tiny_llama_dir, tmp_path, split, group):
    """Tiny 6-layer model; 4-token blocks, 16-token steps (chunked prefill, prefill + decode mixed),
    prefix caching with shared prefixes, all requests batched together."""
    model_dir = tiny_llama_dir("llama_deep")
    params = perturbed_params(model_dir, split, group)
    path = str(tmp_path / "p.safetensors")
    save_params(path, params, dtype=torch.float32)
    llm = LLM(model=model_dir, swiftkv_params=path, dtype="float32", block_size=4, max_num_batched_tokens=16,
              cache_dir=str(tmp_path / "cache"))
    assert llm.engine.arch.swiftkv and llm.engine.arch.num_cache_layers == split + -(-(6 - split) // group)
    prompts = prompts_with_shared_prefixes()
    first = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    again = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    assert llm.engine.stats()["prefix_cache_hits"] > 0  # the second pass reused cached blocks
    reference = dense_reference(model_dir, params, prompts, GREEDY.max_tokens)
    assert first == reference
    assert again == reference
    base = LLM(model=model_dir, dtype="float32", block_size=4)
    plain = [o.outputs[0].token_ids for o in base.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    assert plain != reference  # the SwiftKV path is really taken


def test_the_dense_model_runs_qwen2_with_its_qkv_biases(tiny_llama_dir, hf_tiny_model):
    """The dense model runs the engine's own layers, so Qwen2's q/k/v biases come with them: without
    SwiftKV it is transformers' Qwen2; with SwiftKV on its last layer only, initialised from the
    base (biases too), that layer's K/V and queries are the base ones, so the logits are too."""
    model_dir = tiny_llama_dir("qwen2")  # 3 layers
    dense = from_checkpoint(model_dir, 2, 1)
    assert "model.layers.2.self_attn.k_proj_swiftkv.bias" in dense.published_tensors()
    ids = torch.tensor([[100 + 3 * i for i in range(19)]])
    expected = hf_tiny_model("qwen2")(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(dense(ids, swiftkv=False), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dense(ids, swiftkv=True), expected, atol=1e-4, rtol=1e-4)


def test_distillation_trains_only_the_swiftkv_parameters_of_the_engines_own_layers(tiny_llama_dir):
    from cluster.model.llama import LlamaDecoderLayer
    from cluster.swiftkv.distill import distillation_loss

    dense = from_checkpoint(tiny_llama_dir("llama_deep"), 2, 2)
    assert isinstance(dense.student.model.layers[3], LlamaDecoderLayer)
    # One copy of the base weights: the student's are the teacher's own tensors.
    assert dense.student.model.layers[3].mlp.down_proj.weight is dense.teacher.model.layers[3].mlp.down_proj.weight
    assert dense.student.model.embed_tokens.weight is dense.teacher.model.embed_tokens.weight
    trainable = {id(p) for p in dense.trainable_parameters()}
    loss, _ = distillation_loss(dense, torch.tensor([[100 + 3 * i for i in range(12)]] * 2), 2.0, 1.0)
    loss.backward()
    for name, p in dense.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), name
    assert len(trainable) == 1 + 1 + 4  # norm_swiftkv, the fused K/V of both groups, 4 layers' q_proj_swiftkv


def test_dense_reference_without_swiftkv_is_the_base_model(tiny_llama_dir, hf_tiny_model):
    model_dir = tiny_llama_dir("llama_deep")
    dense = from_checkpoint(model_dir, 2, 1)
    ids = torch.tensor([[100 + 3 * i for i in range(19)]])
    expected = hf_tiny_model("llama_deep")(ids).logits
    torch.testing.assert_close(dense(ids, swiftkv=False), expected, atol=1e-4, rtol=1e-4)


def test_smollm2_with_initialised_swiftkv_matches_the_reference(smollm2_path, smollm2_tokenizer, tmp_path):
    """SmolLM2-135M, split at layer 15, SwiftKV weights from init_from_base; float32; chunked prefill."""
    dense = from_checkpoint(smollm2_path, 15, 1)
    params = SwiftKVParams(15, 1, dense.published_tensors(), {"test": "init"})
    path = str(tmp_path / "p.safetensors")
    save_params(path, params, dtype=torch.float32)
    llm = LLM(model=smollm2_path, swiftkv_params=path, dtype="float32", max_num_batched_tokens=48,
              cache_dir=str(tmp_path / "cache"))
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Here is a long story about a cat who lived in a lighthouse by the sea. Every morning the cat"]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    params8 = SamplingParams(max_tokens=8, temperature=0.0)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params8)]
    assert got == [dense.greedy(p, 8) for p in prompts]


def test_swiftkv_off_serves_a_swiftkv_checkpoint_as_the_base_model(tiny_llama_dir, tmp_path):
    model_dir = tiny_llama_dir("llama_deep")
    ckpt = write_checkpoint(model_dir, perturbed_params(model_dir, 2, 2), str(tmp_path / "ckpt"))
    prompts = [{"prompt_token_ids": p} for p in prompts_with_shared_prefixes()]
    off = LLM(model=ckpt, swiftkv=False, dtype="float32", block_size=4)
    base = LLM(model=model_dir, dtype="float32", block_size=4)
    assert not off.engine.arch.swiftkv and off.engine.arch.num_cache_layers == 6
    assert [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)] == \
        [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY)]


def test_save_then_load_a_llama_swiftkv_checkpoint_reproduces_the_outputs(tiny_llama_dir, tmp_path):
    model_dir = tiny_llama_dir("llama_deep")
    params = perturbed_params(model_dir, 2, 2, seed=3)
    path = str(tmp_path / "p.safetensors")
    save_params(path, params, dtype=torch.float32)
    ckpt = write_checkpoint(model_dir, load_params(path), str(tmp_path / "ckpt"))
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["num_key_value_layers"], config["key_value_group_size"],
            config["swiftkv"]) == ("llama_swiftkv", 2, 2, True)
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        names = set(json.load(f)["weight_map"])
    assert {"model.norm_swiftkv.weight", "model.layers.2.self_attn.k_proj_swiftkv.weight",
            "model.layers.4.self_attn.v_proj_swiftkv.weight", "model.layers.5.self_attn.q_proj_swiftkv.weight"} <= names
    assert "model.layers.3.self_attn.k_proj_swiftkv.weight" not in names  # AcrossKV: the group's first layer only
    prompts = [{"prompt_token_ids": p} for p in prompts_with_shared_prefixes()]
    loaded = LLM(model=ckpt, dtype="float32", block_size=4)  # the config's swiftkv: true turns it on
    applied = LLM(model=model_dir, swiftkv_params=path, dtype="float32", block_size=4,
                  cache_dir=str(tmp_path / "cache"))
    assert loaded.engine.arch.swiftkv
    got = [o.outputs[0].token_ids for o in loaded.generate(prompts, GREEDY)]
    assert got == [o.outputs[0].token_ids for o in applied.generate(prompts, GREEDY)]
    assert got == dense_reference(model_dir, params, prompts_with_shared_prefixes(), GREEDY.max_tokens)


def test_across_kv_cuts_kv_bytes_per_token_and_fits_more_tokens(smollm2_path, tmp_path):
    from dataclasses import replace

    from cluster.config import CacheConfig

    arch = ModelArch.from_dir(smollm2_path)
    single = replace(arch, num_key_value_layers=15, key_value_group_size=1, swiftkv=True)
    across = replace(arch, num_key_value_layers=15, key_value_group_size=2, swiftkv=True)
    assert (arch.num_cache_layers, single.num_cache_layers, across.num_cache_layers) == (30, 30, 23)
    assert across.kv_bytes_per_token(2) / arch.kv_bytes_per_token(2) == pytest.approx(23 / 30)
    budget = CacheConfig(kv_cache_memory_bytes=64 << 20, block_size=32)  # blocks fine enough for the ratio
    plain_blocks = num_blocks_for(budget, arch, torch.bfloat16, 1)
    across_blocks = num_blocks_for(budget, across, torch.bfloat16, 1)
    size = budget.block_size
    assert block_bytes(across, size, torch.bfloat16, 1) * 30 == block_bytes(arch, size, torch.bfloat16, 1) * 23
    assert across_blocks == (64 << 20) // block_bytes(across, size, torch.bfloat16, 1) > plain_blocks * 1.29
    # The engine sizes its cache the same way, and AcrossKV outputs still match the reference.
    model_dir = smollm2_path
    dense = from_checkpoint(model_dir, 15, 2)
    path = str(tmp_path / "p.safetensors")
    save_params(path, SwiftKVParams(15, 2, dense.published_tensors(), {}), dtype=torch.float32)
    llm = LLM(model=model_dir, swiftkv_params=path, dtype="float32", kv_cache_memory_bytes=64 << 20,
              block_size=32, cache_dir=str(tmp_path / "cache"))
    assert llm.engine.num_blocks == num_blocks_for(budget, across, torch.float32, 1)
    assert llm.engine.num_blocks > num_blocks_for(budget, arch, torch.float32, 1) * 1.29
    prompt = [1, 504, 3575, 282, 4649, 314]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=6, temperature=0.0))
    assert out[0].outputs[0].token_ids == dense.greedy(prompt, 6)


def test_distillation_runs_checkpoints_resumes_and_the_loss_falls(tiny_llama_dir, tmp_path):
    from cluster.swiftkv.distill import run_distill

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 37} and thing{i % 11}." for i in range(2000)))
    out = str(tmp_path / "distilled.safetensors")
    args = Namespace(model=tiny_llama_dir("llama_deep"), num_key_value_layers=2, key_value_group_size=2, out=out,
                     work_dir=str(tmp_path / "work"), steps=30, batch_size=4, seq_len=32, lr=3e-3, temperature=2.0,
                     hidden_loss_weight=1.0, checkpoint_every=10, prompts=None, max_prompts=4, samples_per_prompt=1,
                     heldout_prompts=os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "swiftkv", "data",
                                                  "heldout_prompts.txt"),
                     teacher_max_tokens=16, corpus=str(corpus), eval_corpus=str(corpus), eval_rows=8, threads=None,
                     teacher_cache_gb=1.0, dtype="auto",
                     cache_dir=str(tmp_path / "cache"), seed=0, argv=[])
    # The first invocation evaluates on the held-out teacher text only; the resumed one adds the corpus.
    first = Namespace(**{**vars(args), "steps": 20, "eval_corpus": None, "argv": ["--steps", "20"]})
    assert run_distill(first) == 0  # checkpointed
    assert run_distill(Namespace(**{**vars(args), "argv": ["--steps", "30"]})) == 0  # resumes at 20, runs to 30
    with open(tmp_path / "work" / "report.json") as f:
        report = json.load(f)
    losses = [h["loss"] for h in report["history"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    params = load_params(out)
    assert (params.num_key_value_layers, params.key_value_group_size) == (2, 2)
    assert params.info["eval_after"].keys() == params.info["eval_before"].keys()
    assert len(params.info["eval_before"]) == 2
    # The set added on resume was evaluated "before" on the undistilled weights.
    from cluster.swiftkv.distill import evaluate, from_checkpoint, pack, text_corpus

    fresh = from_checkpoint(args.model, 2, 2)
    fresh.init_from_base()
    rows = pack(text_corpus(args.model, str(corpus)), args.seq_len, (fresh.arch.eos_token_ids or (0,))[0])
    assert params.info["eval_before"][f"local text {corpus}"] == evaluate(fresh, rows[: args.eval_rows])
    # The recipe names both invocations, since the second restarted the schedule on a longer horizon.
    assert [(seg["from_step"], seg["to_step"], seg["command"].split()[-1]) for seg in params.info["segments"]] == [
        (0, 20, "20"), (20, 30, "30")]
    assert "model.layers.2.self_attn.k_proj_swiftkv.weight" in params.tensors


def test_the_teacher_cache_gives_the_teachers_own_outputs_within_its_budget(tiny_llama_dir):
    from cluster.swiftkv.distill import TeacherCache, distillation_loss, from_checkpoint, teacher_side

    model = from_checkpoint(tiny_llama_dir("llama_deep"), 2, 2)
    ids = torch.randint(0, model.arch.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    cos_sin = model.rotary(16, torch.float32)
    split_state, teacher_hidden = teacher_side(model, ids, cos_sin)
    row_bytes = (split_state[0].numel() + teacher_hidden[0].numel()) * split_state.element_size()
    cache = TeacherCache(max_bytes=3 * row_bytes)
    got = cache.get(model, torch.tensor([4, 0, 1, 2]), ids[[4, 0, 1, 2]], cos_sin)  # computes; keeps 3 rows
    assert sorted(cache.rows) == [0, 1, 4] and cache.bytes == 3 * row_bytes
    torch.testing.assert_close(got[1], teacher_hidden[[4, 0, 1, 2]])
    for batch in ([1, 4, 0], [2, 1, 3]):  # served from the cache, then with rows it had no room for
        got = cache.get(model, torch.tensor(batch), ids[batch], cos_sin)
        torch.testing.assert_close(got[0], split_state[batch])
        torch.testing.assert_close(got[1], teacher_hidden[batch])
    assert sorted(cache.rows) == [0, 1, 4]
    # The loss on cached teacher outputs is the loss computed from scratch.
    cached, _ = distillation_loss(model, ids[[1, 4]], 2.0, 1.0, cache.get(model, torch.tensor([1, 4]), ids[[1, 4]],
                                                                         cos_sin))
    fresh, _ = distillation_loss(model, ids[[1, 4]], 2.0, 1.0)
    torch.testing.assert_close(cached, fresh)


def test_the_shipped_smollm2_swiftkv_parameters_work_out_of_the_box(smollm2_path, smollm2_tokenizer):
    """`LLM(model="smollm2-135m", swiftkv=True)`: the distilled parameter file shipped in the package.

    The engine gives the dense SwiftKV reference's greedy tokens with exactly those parameters, and
    the distilled model still answers like the base one (" Paris" to "The capital of France is").
    """
    from cluster.swiftkv.checkpoint import bundled_params

    path = bundled_params("smollm2-135m")
    assert path is not None and os.path.getsize(path) < 20 << 20
    params = load_params(path)
    assert (params.num_key_value_layers, params.key_value_group_size) == (15, 1)
    assert params.info["command"].startswith("llm-cluster swiftkv distill")
    for name, after in params.info["eval_after"].items():  # distillation beat the undistilled cut
        assert after["agreement"] > params.info["eval_before"][name]["agreement"], name
    llm = LLM(model="smollm2-135m", swiftkv=True)
    assert llm.engine.arch.swiftkv and llm.engine.arch.num_key_value_layers == 15
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    outs = llm.generate(texts, SamplingParams(max_tokens=8, temperature=0.0))
    got = [o.outputs[0].token_ids for o in outs]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    assert [o.prompt_token_ids for o in outs] == prompts
    dense = from_checkpoint(smollm2_path, params.num_key_value_layers, params.key_value_group_size, params)
    with torch.no_grad():  # one teacher-forced dense pass each: every token is the reference's argmax
        for prompt, tokens in zip(prompts, got):
            logits = dense(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == tokens, smollm2_tokenizer.decode(tokens)
        base_first = int(dense(torch.tensor([prompts[0]]), swiftkv=False)[0, -1].argmax())  # the base SmolLM2
    assert smollm2_tokenizer.decode([base_first]) == " Paris"
    assert got[0][0] == base_first, smollm2_tokenizer.decode(got[0])
