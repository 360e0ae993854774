"""A Llama with SwiftKV over whole sequences, in plain torch: the reference and the distillation model.

Every layer runs for every token (no cache, no skipping), so it states the SwiftKV rule
directly: layers ``>= split`` take K/V from the residual stream entering ``split`` through
``norm_swiftkv`` and the group's ``k/v_proj_swiftkv``, and queries from ``q_proj_swiftkv``. The
engine's paged, prefill-skipping forward must produce the same tokens. The base weights are
frozen float32 tensors; only the SwiftKV parameters are ``nn.Parameter``s (what distillation trains).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from cluster.model.arch import ModelArch
from cluster.model.loader import weight_files
from cluster.model.layers.rotary import RotaryEmbedding
from cluster.swiftkv.checkpoint import SwiftKVParams


def load_base_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k).float() for k in f.keys()})
    return tensors


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class DenseSwiftKVModel(nn.Module):
    def __init__(self, arch: ModelArch, base: dict[str, torch.Tensor], split: int, group_size: int,
                 params: SwiftKVParams | None = None):
        super().__init__()
        if arch.qkv_bias:
            raise ValueError("the dense SwiftKV model covers bias-free Llama attention")
        if not 1 <= split <= arch.num_layers or group_size < 1:
            raise ValueError(f"split {split} / group size {group_size} do not fit {arch.num_layers} layers")
        self.arch, self.split, self.group_size = arch, split, group_size
        self.base = {k: v.requires_grad_(False) for k, v in base.items()}
        self.rope = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        groups = -(-(arch.num_layers - split) // group_size)  # the last AcrossKV group may be shorter
        h = arch.hidden_size
        self.norm_swiftkv = nn.Parameter(torch.ones(h))
        self.q_proj = nn.ParameterList(nn.Parameter(torch.empty(arch.num_heads * arch.head_dim, h))
                                       for _ in range(split, arch.num_layers))
        self.k_proj = nn.ParameterList(nn.Parameter(torch.empty(arch.num_kv_heads * arch.head_dim, h))
                                       for _ in range(groups))
        self.v_proj = nn.ParameterList(nn.Parameter(torch.empty(arch.num_kv_heads * arch.head_dim, h))
                                       for _ in range(groups))
        if params is None:
            self.init_from_base()
        else:
            self.load_published(params.tensors)

    # ---- parameters --------------------------------------------------------------------------

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.base[f"model.layers.{layer}.{name}.weight"]

    @torch.no_grad()
    def init_from_base(self) -> None:
        """Start from the model's own projections: each later layer's q_proj copied, each AcrossKV
        group's k/v_proj averaged over the group. The layers' own input-norm gains are folded into
        those K/V weights, so ``norm_swiftkv`` starts at ones and layer ``split`` is reproduced exactly."""
        self.norm_swiftkv.fill_(1.0)
        for i, layer in enumerate(range(self.split, self.arch.num_layers)):
            self.q_proj[i].copy_(self._w(layer, "self_attn.q_proj"))
        for g in range(len(self.k_proj)):
            layers = range(self.split + g * self.group_size,
                           min(self.arch.num_layers, self.split + (g + 1) * self.group_size))
            for which, target in (("k_proj", self.k_proj[g]), ("v_proj", self.v_proj[g])):
                folded = [self._w(j, f"self_attn.{which}") * self._w(j, "input_layernorm")[None, :] for j in layers]
                target.copy_(torch.stack(folded).mean(0))

    def published_tensors(self) -> dict[str, torch.Tensor]:
        """The SwiftKV parameters under the names the published ``llama_swiftkv`` checkpoints use."""
        out = {"model.norm_swiftkv.weight": self.norm_swiftkv.detach()}
        for i, layer in enumerate(range(self.split, self.arch.num_layers)):
            out[f"model.layers.{layer}.self_attn.q_proj_swiftkv.weight"] = self.q_proj[i].detach()
        for g in range(len(self.k_proj)):
            layer = self.split + g * self.group_size
            out[f"model.layers.{layer}.self_attn.k_proj_swiftkv.weight"] = self.k_proj[g].detach()
            out[f"model.layers.{layer}.self_attn.v_proj_swiftkv.weight"] = self.v_proj[g].detach()
        return out

    @torch.no_grad()
    def load_published(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.published_tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"SwiftKV parameters lack {len(missing)} tensors, e.g. {missing[:2]}")
        for name, target in own.items():
            target.copy_(tensors[name].float())

    # ---- forward -----------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.base["model.embed_tokens.weight"])

    def rotary(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.lookup(torch.arange(length), dtype)  # [T, 1, D] each

    def _attend(self, q, k, v) -> torch.Tensor:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq * D], causal."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).flatten(2)

    def _mlp_and_residual(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        eps = self.arch.rms_norm_eps
        h = h + F.linear(attn, self._w(layer, "self_attn.o_proj"))
        x = _rms(h, self._w(layer, "post_attention_layernorm"), eps)
        gate, up = F.linear(x, self._w(layer, "mlp.gate_proj")), F.linear(x, self._w(layer, "mlp.up_proj"))
        return h + F.linear(F.silu(gate) * up, self._w(layer, "mlp.down_proj"))

    def base_layers(self, h: torch.Tensor, start: int, end: int, cos_sin) -> torch.Tensor:
        """Layers [start, end) as the base model runs them (its own q/k/v)."""
        a, (B, T) = self.arch, h.shape[:2]
        for layer in range(start, end):
            x = _rms(h, self._w(layer, "input_layernorm"), a.rms_norm_eps)
            q = F.linear(x, self._w(layer, "self_attn.q_proj")).view(B, T, a.num_heads, a.head_dim)
            k = F.linear(x, self._w(layer, "self_attn.k_proj")).view(B, T, a.num_kv_heads, a.head_dim)
            v = F.linear(x, self._w(layer, "self_attn.v_proj")).view(B, T, a.num_kv_heads, a.head_dim)
            attn = self._attend(RotaryEmbedding.apply(cos_sin, q), RotaryEmbedding.apply(cos_sin, k), v)
            h = self._mlp_and_residual(layer, h, attn)
        return h

    def swiftkv_layers(self, h: torch.Tensor, cos_sin) -> torch.Tensor:
        """Layers [split, L) with SwiftKV: K/V of every group from ``h`` (the stream entering split)."""
        a, (B, T) = self.arch, h.shape[:2]
        kv_in = _rms(h, self.norm_swiftkv, a.rms_norm_eps)
        keys = [RotaryEmbedding.apply(cos_sin, F.linear(kv_in, w).view(B, T, a.num_kv_heads, a.head_dim))
                for w in self.k_proj]
        values = [F.linear(kv_in, w).view(B, T, a.num_kv_heads, a.head_dim) for w in self.v_proj]
        for i, layer in enumerate(range(self.split, a.num_layers)):
            g = i // self.group_size
            x = _rms(h, self._w(layer, "input_layernorm"), a.rms_norm_eps)
            q = RotaryEmbedding.apply(cos_sin, F.linear(x, self.q_proj[i]).view(B, T, a.num_heads, a.head_dim))
            h = self._mlp_and_residual(layer, h, self._attend(q, keys[g], values[g]))
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return _rms(h, self.base["model.norm.weight"], self.arch.rms_norm_eps)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        head = self.base.get("lm_head.weight", self.base["model.embed_tokens.weight"])
        return F.linear(normed, head)

    def forward(self, ids: torch.Tensor, swiftkv: bool = True) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab], every layer for every token."""
        cos_sin = self.rotary(ids.shape[1], torch.float32)
        h = self.base_layers(self.embed(ids), 0, self.split, cos_sin)
        h = self.swiftkv_layers(h, cos_sin) if swiftkv else self.base_layers(h, self.split, self.arch.num_layers,
                                                                             cos_sin)
        return self.logits(self.final_norm(h))

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int, swiftkv: bool = True) -> list[int]:
        """Greedy continuation, recomputing the whole sequence each token (the reference)."""
        ids = list(prompt)
        for _ in range(max_new_tokens):
            ids.append(int(self(torch.tensor([ids]), swiftkv)[0, -1].argmax()))
        return ids[len(prompt):]


def from_checkpoint(model_dir: str, split: int, group_size: int, params: SwiftKVParams | None = None
                    ) -> DenseSwiftKVModel:
    """A dense SwiftKV model over a plain (or llama_swiftkv) checkpoint directory."""
    from dataclasses import replace

    arch = ModelArch.from_dir(model_dir)
    base = load_base_tensors(model_dir)
    published = {k: v for k, v in base.items() if "_swiftkv" in k}
    base = {k: v for k, v in base.items() if "_swiftkv" not in k}
    if params is None and published:
        params = SwiftKVParams(split, group_size, published, {})
    arch = replace(arch, num_key_value_layers=split, key_value_group_size=group_size, swiftkv=False)
    return DenseSwiftKVModel(arch, base, split, group_size, params)
