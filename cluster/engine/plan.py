"""What the frontend and the engine core agree on before either starts: the checkpoint, its
architecture, the context length, the KV cache's size and the end-of-sequence ids.

The frontend builds it once (it needs the tokenizer for the EOS ids and the limits to validate
prompts); the core builds its executor from it. Rebuilding the core reuses the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cluster.config import EngineConfig
from cluster.errors import InvalidConfigError
from cluster.model.arch import ModelArch
from cluster.model.source import resolve_model
from cluster.runner.worker_spec import WorkerSpec
from cluster.swiftkv import checkpoint as swiftkv_checkpoint


@dataclass(frozen=True)
class EnginePlan:
    model_path: str  # local checkpoint directory
    model_name: str  # how the source names it
    arch: ModelArch
    max_model_len: int  # prompt + output tokens at most
    num_blocks: int  # KV blocks on each rank
    block_size: int
    eos_token_ids: frozenset[int]  # the model's and the tokenizer's end-of-sequence ids

    @property
    def max_num_cached_tokens(self) -> int:
        """How many tokens the KV cache holds in all."""
        return self.num_blocks * self.block_size

    def worker_spec(self, config: EngineConfig) -> WorkerSpec:
        """What each worker needs to build its rank."""
        backend = config.model.resolved_attention_backend()
        graphs = (config.model.cuda_graphs and config.model.resolved_device() == "cuda" and backend == "triton"
                  and config.parallel.tensor_parallel_size == 1 and not self.arch.skips_prefill)
        return WorkerSpec(
            model_path=self.model_path, arch=self.arch, dtype=config.model.resolved_dtype(),
            kv_cache_dtype=config.cache.resolved_kv_cache_dtype(config.model.resolved_dtype()),
            max_model_len=self.max_model_len, num_blocks=self.num_blocks, block_size=self.block_size,
            tp_size=config.parallel.tensor_parallel_size, eos_token_ids=self.eos_token_ids,
            device=config.model.resolved_device(), num_threads=config.parallel.num_threads,
            use_native_kernels=config.model.use_native_kernels, gguf_blocks=config.model.gguf_blocks,
            onednn_cache_capacity=config.model.onednn_cache_capacity,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_logits_rows=config.scheduler.max_num_seqs * (1 + (config.speculative.num_tokens
                                                                   if config.speculative is not None else 0)),
            attention_backend=backend,
            decode_graph_batch=config.scheduler.max_num_seqs if graphs else 0,
        )


def resolve_source(config: EngineConfig):
    """The checkpoint directory (a SwiftKV variant when configured) and its architecture."""
    source = resolve_model(config.model.model, config.model.resolved_cache_dir())
    path = swiftkv_checkpoint.resolve(source.path, config.model.model, config.model.swiftkv,
                                      config.model.swiftkv_params, config.model.resolved_cache_dir())
    source = replace(source, path=path)
    arch = ModelArch.from_dir(source.path)
    if config.model.swiftkv is not None:
        arch = arch.with_swiftkv(config.model.swiftkv)
    return source, arch


def make_plan(config: EngineConfig, source, arch: ModelArch, tokenizer_eos: frozenset[int]) -> EnginePlan:
    from cluster.model.loader import torch_dtype
    from cluster.runner.kv_cache import num_blocks_for

    max_model_len = _max_model_len(config, arch)
    kv_dtype = config.cache.resolved_kv_cache_dtype(config.model.resolved_dtype())
    num_blocks = num_blocks_for(config.cache, arch, torch_dtype(kv_dtype),
                                config.parallel.tensor_parallel_size)
    arch.check_tensor_parallel(config.parallel.tensor_parallel_size)
    return EnginePlan(source.path, source.name, arch, max_model_len, num_blocks, config.cache.block_size,
                      frozenset(arch.eos_token_ids) | tokenizer_eos)


def _max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    limit = arch.max_position_embeddings
    asked = config.model.max_model_len
    if asked is not None and asked > limit:
        why = " (its sliding_window; full attention is exact only within it)" if arch.sliding_window else ""
        raise InvalidConfigError("max_model_len", f"must be <= the model's {limit} positions{why}, got {asked}")
    return asked or limit
