"""What a worker needs to build its rank of the model (sent once, at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.model.arch import ModelArch


@dataclass(frozen=True)
class WorkerSpec:
    model_path: str  # local checkpoint directory (config.json + safetensors)
    arch: ModelArch  # the parsed architecture
    dtype: str  # float32 | bfloat16 | float16
    max_model_len: int  # context length (rotary tables are sized to it)
    num_blocks: int  # KV blocks on each rank
    block_size: int  # tokens per block
    tp_size: int  # ranks in the tensor-parallel group
    eos_token_ids: frozenset[int]  # masked while min_tokens is not reached
    device: str = "cpu"  # cpu | cuda
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default
    use_native_kernels: bool = True  # compile and use cluster/kernels on CPU (falls back to torch)
    gguf_blocks: bool = True  # decode-sized float32 matmuls read exact GGUF blocks (layers/gguf_blocks.py)
    onednn_cache_capacity: int | None = 256  # oneDNN's primitive caches, in entries (CPU); None = its default
    max_num_batched_tokens: int = 2048  # a step's token rows at most (the matmuls built at start-up)
    max_logits_rows: int = 64  # a step's logits rows at most: sequences x (1 + speculative tokens)
    attention_backend: str = "torch"  # torch | triton (resolved: see ModelConfig.attention_backend)
    kv_cache_dtype: str | None = None  # what K/V are stored as; None = the model's dtype
    decode_graph_batch: int = 0  # capture CUDA graphs of decode steps up to this batch (0: eager; see plan)
