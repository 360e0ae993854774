"""The architecture facts the model code needs, read from a checkpoint's config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from cluster.errors import InvalidConfigError, ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "llama_swiftkv")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class ModelArch:
    """A Llama-family decoder's shape (Llama, Mistral without sliding window, Qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", ...} or None
    max_position_embeddings: int  # context served: capped to sliding_window when there is one
    sliding_window: int | None  # the checkpoint's attention window, if it uses one
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 and attention_bias=True Llamas
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    architecture: str | None = None  # config.json's architectures[0]: picks the model class (model/registry.py)
    # SwiftKV (model_type llama_swiftkv): layers >= num_key_value_layers take K/V from the residual
    # stream entering that layer; groups of key_value_group_size such layers share one K/V (AcrossKV).
    num_key_value_layers: int | None = None  # None: every layer has its own K/V (a plain checkpoint)
    key_value_group_size: int = 1
    swiftkv: bool = False  # serve with SwiftKV (prefill skipping + shared caches); a llama_swiftkv config
    # turns it on unless it says `swiftkv: false`; the engine option `swiftkv` overrides either way

    @property
    def swiftkv_layer(self) -> int:
        """First layer whose K/V come from the SwiftKV projections (num_layers when off)."""
        return self.num_key_value_layers if self.swiftkv else self.num_layers

    @property
    def skips_prefill(self) -> bool:
        """SwiftKV is on and some layers lie past the split (their K/V come from it)."""
        return self.swiftkv_layer < self.num_layers

    @property
    def num_cache_layers(self) -> int:
        """KV caches the model writes: one per full layer, one per AcrossKV group after."""
        l = self.swiftkv_layer
        return l + -(-(self.num_layers - l) // self.key_value_group_size)

    def cache_index(self, layer: int) -> int:
        """Which KV cache ``layer`` reads (and, below the SwiftKV layer, writes)."""
        l = self.swiftkv_layer
        return layer if layer < l else l + (layer - l) // self.key_value_group_size

    @property
    def has_swiftkv_weights(self) -> bool:
        return self.num_key_value_layers is not None

    def with_swiftkv(self, enabled: bool) -> "ModelArch":
        if enabled and not self.has_swiftkv_weights:
            raise InvalidConfigError("swiftkv", "this checkpoint has no SwiftKV weights (model_type "
                                     f"{self.model_type!r}); distill them with `llm-cluster swiftkv distill`")
        return replace(self, swiftkv=enabled)

    @classmethod
    def from_dir(cls, path: str) -> "ModelArch":
        """Parse ``path/config.json``; unsupported architectures raise ModelLoadError."""
        try:
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read {path!r}/config.json: {err}") from err
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture model_type={model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        try:
            arch = cls._from_config(cfg, model_type)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"config.json in {path!r} is missing or has a bad value for {err}") from err
        arch._check_rope()
        return arch

    def _check_rope(self) -> None:
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                                 f"{SUPPORTED_ROPE_TYPES}")

    @classmethod
    def _from_config(cls, cfg: dict, model_type: str) -> "ModelArch":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else None,
            max_position_embeddings=_context_limit(cfg),
            sliding_window=_sliding_window(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            architecture=_first_architecture(cfg),
            **_swiftkv_fields(cfg, model_type),
        )

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Refuse, at start-up and naming both numbers, a tensor_parallel_size the shapes cannot split."""
        def fail(what: str, count: int, rule: str) -> None:
            raise InvalidConfigError("tensor_parallel_size",
                                     f"{tp_size} cannot serve this model's {count} {what}: {rule}")

        if self.num_heads % tp_size:
            fail("attention heads", self.num_heads, "tensor_parallel_size must divide it")
        if self.num_kv_heads % tp_size and tp_size % self.num_kv_heads:
            fail("key/value heads", self.num_kv_heads,
                 "tensor_parallel_size must divide it or be a multiple of it (heads are then replicated)")
        if self.intermediate_size % tp_size:
            fail("MLP features (intermediate_size)", self.intermediate_size, "tensor_parallel_size must divide it")

    def kv_bytes_per_token(self, dtype_bytes: int, tp_size: int = 1) -> int:
        """K and V bytes one token occupies on one rank, all layers."""
        kv_heads = max(1, self.num_kv_heads // tp_size)
        return 2 * self.num_cache_layers * kv_heads * self.head_dim * dtype_bytes


def _swiftkv_fields(cfg: dict, model_type: str) -> dict:
    """``llama_swiftkv`` configs: the split layer, the AcrossKV group size and the default on/off."""
    if model_type != "llama_swiftkv":
        return {}
    layers = cfg["num_hidden_layers"]
    split = cfg.get("num_key_value_layers")
    split = layers if split is None else split
    group = cfg.get("key_value_group_size")
    group = 1 if group is None else group
    if not (isinstance(split, int) and 1 <= split <= layers):
        raise ValueError(f"num_key_value_layers={split!r} (must be in [1, {layers}])")
    if not (isinstance(group, int) and group >= 1):
        raise ValueError(f"key_value_group_size={group!r} (must be an integer >= 1)")
    return {"num_key_value_layers": split, "key_value_group_size": group, "swiftkv": bool(cfg.get("swiftkv", True))}


def _context_limit(cfg: dict) -> int:
    """Positions the model can attend over with full attention.

    Sliding-window attention equals full attention while the context fits the window,
    so such checkpoints are served with their context capped to the window.
    """
    limit = int(cfg.get("max_position_embeddings", 2048))
    window = _sliding_window(cfg)
    return min(limit, window) if window else limit


def _sliding_window(cfg: dict) -> int | None:
    window = cfg.get("sliding_window")
    return int(window) if window and cfg.get("use_sliding_window", True) else None


def _first_architecture(cfg: dict) -> str | None:
    names = cfg.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
