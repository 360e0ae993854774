"""Typed engine configuration: the one source of defaults, validated where it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from cluster.errors import InvalidConfigError

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MODEL = "smollm2-135m"
_MiB = 1 << 20


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidConfigError(name, message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN's bfloat16 kernels: AVX-512 BW/VL/DQ,
    AVX512-BF16, AMX or AVX-NE-CONVERT). On AVX2-only CPUs it emulates them: a SmolLM2-sized
    bfloat16 linear ran 5x slower than float32 there, and the engine's workload 4x (docs/benchmarks.md)."""
    import torch

    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype to run ("auto" resolved for ``device``): bfloat16 on a GPU that has it (else float16)
    and on a CPU that computes it natively, float32 on other CPUs."""
    if dtype != "auto":
        return dtype
    import torch

    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class ModelConfig:
    """Which checkpoint to run and how."""

    model: str = DEFAULT_MODEL  # a built-in name, a Hugging Face directory or a .gguf file
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16 (GPU only); auto: see resolve_dtype
    max_model_len: int | None = None  # context length; None = the model's max_position_embeddings
    cache_dir: str | None = None  # where converted checkpoints live; None = ~/.cache/llm-cluster
    seed: int = 0  # engine seed for requests that give none
    device: str = "auto"  # auto | cpu | cuda; auto picks cuda when present
    use_native_kernels: bool = True  # C++ paged decode attention on CPU, built on first use (torch fallback)
    gguf_blocks: bool = True  # CPU float32: weights that are exact GGUF Q4_1/Q8_0 values read as those blocks
    swiftkv: bool | None = None  # SwiftKV prefill skipping; None = the checkpoint's own `swiftkv` setting
    swiftkv_params: str | None = None  # SwiftKV parameter file to apply (default for built-ins: the shipped one)
    onednn_cache_capacity: int | None = 256  # CPU: entries in oneDNN's shape-keyed caches (bounds memory); None = 1024
    attention_backend: str = "auto"  # auto | torch | triton; auto: triton on CUDA (when installed), torch on CPU
    cuda_graphs: bool = True  # CUDA: replay captured decode steps (triton backend, tp 1, no SwiftKV); False: eager

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and bool(self.model), "model", "must be a non-empty string")
        _require(self.dtype in SUPPORTED_DTYPES, "dtype", f"must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None:
            _require(_is_int(self.max_model_len) and self.max_model_len >= 1, "max_model_len",
                     f"must be an integer >= 1, got {self.max_model_len!r}")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        _require(isinstance(self.use_native_kernels, bool), "use_native_kernels", "must be a bool")
        _require(isinstance(self.gguf_blocks, bool), "gguf_blocks", f"must be a bool, got {self.gguf_blocks!r}")
        _require(self.swiftkv is None or isinstance(self.swiftkv, bool), "swiftkv", "must be a bool or None")
        _require(self.swiftkv_params is None or (isinstance(self.swiftkv_params, str) and bool(self.swiftkv_params)),
                 "swiftkv_params", "must be a path to a SwiftKV parameter file")
        _require(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.onednn_cache_capacity is not None:
            _require(_is_int(self.onednn_cache_capacity) and self.onednn_cache_capacity >= 1, "onednn_cache_capacity",
                     f"must be an integer >= 1 or null, got {self.onednn_cache_capacity!r}")
        if self.dtype == "float16":
            _require(self.resolved_device() == "cuda", "dtype",
                     "float16 needs a GPU; on CPU use bfloat16 or float32")
        _require(isinstance(self.cuda_graphs, bool), "cuda_graphs", f"must be a bool, got {self.cuda_graphs!r}")
        _require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                 f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.attention_backend == "triton":
            _require(_triton_installed(), "attention_backend", "triton is not installed")
            _require(self.resolved_device() == "cuda" or _triton_interpreted(), "attention_backend",
                     "the Triton backend runs on CUDA (on CPU only under TRITON_INTERPRET=1, for tests); "
                     "use torch or auto")

    def resolved_attention_backend(self) -> str:
        """The attention backend the model runs ("auto": triton on CUDA when installed, else torch)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.resolved_device() == "cuda" and _triton_installed() else "torch"

    def resolved_dtype(self) -> str:
        """The dtype this process runs ("auto" resolved on this machine; see ``resolve_dtype``)."""
        return resolve_dtype(self.dtype, self.resolved_device())

    def resolved_device(self) -> str:
        """The device this process will run on ("auto" resolved)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        return os.path.join(os.path.expanduser("~"), ".cache", "llm-cluster")


@dataclass
class CacheConfig:
    """The paged KV cache."""

    # tokens per KV block: vLLM's CPU default; on the AMX Xeon the workload ran 1.026-1.083x faster
    # (4 pairs) than with 32 (docs/benchmarks.md); prefix caching reuses whole blocks of it
    block_size: int = 128
    kv_cache_memory_bytes: int = 1024 * _MiB  # budget for K/V storage on each rank
    num_blocks: int | None = None  # overrides the budget (tests use it to force preemption)
    enable_prefix_caching: bool = True  # reuse full blocks across requests by token-hash chain
    # what K/V are stored as: auto = the model's dtype (exact); a 16-bit type under a float32 model
    # halves the cache's bytes (twice the tokens in the same budget, half the bytes decode attention
    # reads) at one rounding of each stored K/V value; attention still computes in float32
    kv_cache_dtype: str = "auto"

    def resolved_kv_cache_dtype(self, model_dtype: str) -> str:
        """The dtype K/V are stored in, for a model running ``model_dtype`` (resolved)."""
        return model_dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def __post_init__(self) -> None:
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(_is_int(self.block_size) and 1 <= self.block_size <= 1024, "block_size",
                 f"must be an integer in [1, 1024], got {self.block_size!r}")
        _require(_is_int(self.kv_cache_memory_bytes) and self.kv_cache_memory_bytes > 0,
                 "kv_cache_memory_bytes", f"must be an integer > 0, got {self.kv_cache_memory_bytes!r}")
        if self.num_blocks is not None:
            _require(_is_int(self.num_blocks) and self.num_blocks >= 1, "num_blocks",
                     f"must be an integer >= 1, got {self.num_blocks!r}")
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "must be a bool")


@dataclass
class SchedulerConfig:
    """Iteration-level batching limits."""

    # token budget per step (decodes + prefill chunks): vLLM's CPU default for a server. The bench
    # workload on a 2-core AMX Xeon: 428 tok/s at 1,024, 446 at 2,048 and at 4,096 (bigger GEMMs)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64  # running sequences at most
    max_waiting_requests: int | None = None  # requests queued beyond a full batch (max_num_seqs); None = unbounded

    def __post_init__(self) -> None:
        _require(_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens", f"must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        _require(_is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs",
                 f"must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.max_waiting_requests is not None:
            _require(_is_int(self.max_waiting_requests) and self.max_waiting_requests >= 0,
                     "max_waiting_requests", f"must be an integer >= 0, got {self.max_waiting_requests!r}")


SPECULATIVE_METHODS = ("ngram", "suffix")


@dataclass
class SpeculativeConfig:
    """Lossless speculative decoding with drafts that need no second model.

    ``ngram`` (prompt lookup) proposes what followed the latest earlier occurrence of the request's
    last n tokens in its own prompt and output. ``suffix`` (suffix decoding) matches the request's
    recent tokens in a suffix tree over its prompt and output and in one over the outputs of recent
    requests, and proposes the most frequent continuation, as many tokens as the match is long
    (times ``max_spec_factor``) while each token's estimated probability stays >= ``min_token_prob``.
    Either way the model verifies the drafts in one forward pass; a request whose drafts keep being
    rejected stops drafting for a while (``backoff_*``), so text that does not repeat costs little.
    """

    method: str = "ngram"  # ngram | suffix
    num_tokens: int = 4  # drafted tokens per step at most (k)
    prompt_lookup_min: int = 2  # ngram: the shortest suffix that may match
    prompt_lookup_max: int = 5  # ngram: the longest suffix tried first
    max_tree_depth: int = 24  # suffix: the longest pattern matched
    max_cached_requests: int = 1000  # suffix: finished outputs kept in the global tree (0 = none)
    max_spec_factor: float = 1.0  # suffix: draft at most this many tokens per matched token
    min_token_prob: float = 0.1  # suffix: stop drafting when a token's estimated probability falls below
    backoff_acceptance: float = 0.2  # a request whose recent acceptance rate falls below this pauses drafting
    backoff_steps: int = 8  # for this many steps (doubled on each further pause, up to 64x)

    def __post_init__(self) -> None:
        _require(self.method in SPECULATIVE_METHODS, "speculative.method",
                 f"must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        _require(_is_int(self.num_tokens) and 1 <= self.num_tokens <= 32, "speculative.num_tokens",
                 f"must be an integer in [1, 32], got {self.num_tokens!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max", "max_tree_depth"):
            value = getattr(self, name)
            _require(_is_int(value) and 1 <= value <= 64, f"speculative.{name}",
                     f"must be an integer in [1, 64], got {value!r}")
        _require(self.prompt_lookup_min <= self.prompt_lookup_max, "speculative.prompt_lookup_min",
                 f"must be <= prompt_lookup_max ({self.prompt_lookup_max}), got {self.prompt_lookup_min}")
        _require(_is_int(self.max_cached_requests) and self.max_cached_requests >= 0,
                 "speculative.max_cached_requests", f"must be an integer >= 0, got {self.max_cached_requests!r}")
        _require(_is_number(self.max_spec_factor) and self.max_spec_factor > 0, "speculative.max_spec_factor",
                 f"must be a number > 0, got {self.max_spec_factor!r}")
        for name in ("min_token_prob", "backoff_acceptance"):
            value = getattr(self, name)
            _require(_is_number(value) and 0.0 <= value <= 1.0, f"speculative.{name}",
                     f"must be a number in [0, 1], got {value!r}")
        _require(_is_int(self.backoff_steps) and self.backoff_steps >= 0, "speculative.backoff_steps",
                 f"must be an integer >= 0, got {self.backoff_steps!r}")

    @classmethod
    def build(cls, value) -> "SpeculativeConfig | None":
        """From what a caller gives: None, a SpeculativeConfig or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        _require(isinstance(value, dict), "speculative",
                 f"must be a mapping like {{'method': 'ngram', 'num_tokens': 4}}, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        for key in value:
            _require(key in known, f"speculative.{key}", f"unknown option; known: {sorted(known)}")
        return cls(**value)


PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
EXECUTORS = ("auto", "in_process", "ray")


@dataclass
class ParallelConfig:
    """Tensor parallelism and where its workers run."""

    tensor_parallel_size: int = 1  # ranks the weights and KV heads are split over
    num_threads: int | None = None  # torch intra-op threads per rank; None = torch's default (Ray: worker_num_cpus)
    executor: str = "auto"  # auto (in_process at tp=1, ray above) | in_process | ray
    placement_strategy: str = "STRICT_PACK"  # how the tp bundles are placed over nodes
    worker_num_cpus: float = 1.0  # CPUs each worker's bundle reserves (CPU workers; GPU workers take 1 GPU)
    startup_timeout_s: float = 300.0  # placement, rendezvous and weight loading, each
    collective_timeout_s: float = 120.0  # one collective inside a step (gloo / nccl), then the engine is dead
    step_timeout_s: float = 600.0  # one whole step, then the engine is dead

    def __post_init__(self) -> None:
        _require(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
                 "tensor_parallel_size", f"must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.num_threads is not None:
            _require(_is_int(self.num_threads) and self.num_threads >= 1, "num_threads",
                     f"must be an integer >= 1, got {self.num_threads!r}")
        _require(self.executor in EXECUTORS, "executor", f"must be one of {EXECUTORS}, got {self.executor!r}")
        _require(self.executor != "in_process" or self.tensor_parallel_size == 1, "executor",
                 f"in_process runs tensor_parallel_size 1 only, got {self.tensor_parallel_size!r}; use ray")
        _require(self.placement_strategy in PLACEMENT_STRATEGIES, "placement_strategy",
                 f"must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        for name in ("worker_num_cpus", "startup_timeout_s", "collective_timeout_s", "step_timeout_s"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
                     f"must be a number > 0, got {value!r}")

    def worker_bundle(self, device: str) -> dict[str, float]:
        """Resources one worker reserves (the serving layer builds a deployment's bundles from it)."""
        return {"GPU": 1.0} if device == "cuda" else {"CPU": float(self.worker_num_cpus)}


@dataclass
class EngineConfig:
    """Everything an engine needs, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None  # speculative decoding; None = off

    def __post_init__(self) -> None:
        self.speculative = SpeculativeConfig.build(self.speculative)
        if self.cache.kv_cache_dtype != "auto":
            model_dtype = self.model.resolved_dtype()
            kv_dtype = self.cache.resolved_kv_cache_dtype(model_dtype)
            _require(kv_dtype == model_dtype or model_dtype == "float32", "kv_cache_dtype",
                     f"a {model_dtype} model stores K/V as {model_dtype} (auto); only a float32 model takes "
                     f"a 16-bit cache, got {kv_dtype!r}")
            _require(kv_dtype == model_dtype or self.model.resolved_attention_backend() == "torch", "kv_cache_dtype",
                     f"the triton attention backend reads K/V in the model's dtype ({model_dtype}); use "
                     f"kv_cache_dtype=auto or attention_backend=torch, got {kv_dtype!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (``LLM(model=..., dtype=..., block_size=...)``)."""
        groups = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                  "parallel": ParallelConfig}
        split: dict[str, dict] = {name: {} for name in groups}
        owner = {f.name: name for name, klass in groups.items() for f in fields(klass)}
        speculative = kwargs.pop("speculative", None)
        for key, value in kwargs.items():
            if key not in owner:
                raise InvalidConfigError(key, f"unknown engine option; known: {sorted(owner) + ['speculative']}")
            split[owner[key]][key] = value
        return cls(**{name: groups[name](**split[name]) for name in groups}, speculative=speculative)
