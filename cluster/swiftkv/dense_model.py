"""SwiftKV over whole sequences, on the engine's own layers: the distillation model and the reference.

Two copies of the model's layer stack (``cluster/model/llama.py``) on the dense attention backend
(``DenseAttention``: every row's tokens at once, no paged cache), in float32 at world size 1:

* the *teacher*: the base model, every layer with its own q/k/v (SwiftKV off);
* the *student*: the same checkpoint with SwiftKV on from layer ``split``: layers ``>= split``
  take K/V from the residual stream entering ``split`` through ``norm_swiftkv`` and each AcrossKV
  group's K/V projection, and queries from ``q_proj_swiftkv``.

The student's base weights *are* the teacher's (shared tensors, frozen); only the SwiftKV
parameters are trainable. Because both run the engine's layer code, what distillation trains is
what the engine serves; what differs from serving is only the attention backend (and, serving,
prefill skipping), which the engine's tests check against this model.

Shapes here are ``[batch, seq_len, ...]``; the layers see the rows flattened, as the engine's batch is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from cluster.distributed.tp_group import TPGroup
from cluster.model.arch import ModelArch
from cluster.model.layers.attention import TailBatch
from cluster.model.layers.dense_attention import DenseAttention, DenseKV, DenseMetadata
from cluster.model.loader import load_model, weight_files
from cluster.swiftkv.checkpoint import SwiftKVParams


class DenseSwiftKVModel(nn.Module):
    def __init__(self, model_dir: str, arch: ModelArch, split: int, group_size: int,
                 params: SwiftKVParams | None = None, max_positions: int | None = None):
        super().__init__()
        if not 1 <= split <= arch.num_layers or group_size < 1:
            raise ValueError(f"split {split} / group size {group_size} do not fit {arch.num_layers} layers")
        base = replace(arch, num_key_value_layers=split, key_value_group_size=group_size, swiftkv=False)
        self.arch, self.split, self.group_size = base, split, group_size
        positions = max_positions or arch.max_position_embeddings
        tp = TPGroup()
        self.teacher = load_model(model_dir, base, positions, tp, "float32", attention=DenseAttention)
        self.student = type(self.teacher)(replace(base, swiftkv=True), positions, tp, torch.float32,
                                          attention=DenseAttention)
        _share_base_weights(self.student, self.teacher)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        self.q_rows = base.num_heads * base.head_dim
        self.kv_rows = base.num_kv_heads * base.head_dim
        if params is None:
            self.init_from_base()
        else:
            self.load_published(params.tensors)

    # ---- parameters --------------------------------------------------------------------------

    def _swiftkv_modules(self) -> dict[str, nn.Module]:
        """The student's SwiftKV modules by role: ``norm``, ``kv`` and ``q{layer}``."""
        model = self.student.model
        out = {"norm": model.norm_swiftkv, "kv": model.kv_proj_swiftkv}
        for layer in range(self.split, self.arch.num_layers):
            out[f"q{layer}"] = model.layers[layer].self_attn.q_proj_swiftkv
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What distillation trains: ``norm_swiftkv`` and the SwiftKV projections, nothing else."""
        return [p for module in self._swiftkv_modules().values() for p in module.parameters(recurse=False)]

    def _teacher_attn(self, layer: int) -> nn.Module:
        return self.teacher.model.layers[layer].self_attn.qkv_proj

    def _group_layers(self, group: int) -> range:
        first = self.split + group * self.group_size
        return range(first, min(self.arch.num_layers, first + self.group_size))

    def _kv_slice(self, group: int, which: str) -> slice:
        start = (2 * group + (0 if which == "k" else 1)) * self.kv_rows
        return slice(start, start + self.kv_rows)

    def _base_slice(self, which: str) -> slice:
        start = {"q": 0, "k": self.q_rows, "v": self.q_rows + self.kv_rows}[which]
        return slice(start, start + (self.q_rows if which == "q" else self.kv_rows))

    @property
    def num_groups(self) -> int:
        return self.student.model.kv_proj_swiftkv.num_groups

    @torch.no_grad()
    def init_from_base(self) -> None:
        """Start from the model's own projections: each later layer's q_proj copied, each AcrossKV
        group's k/v_proj averaged over the group. The layers' own input-norm gains are folded into
        those K/V weights, so ``norm_swiftkv`` starts at ones and layer ``split`` is reproduced exactly."""
        modules = self._swiftkv_modules()
        modules["norm"].weight.fill_(1.0)
        for layer in range(self.split, self.arch.num_layers):
            q, base = modules[f"q{layer}"], self._teacher_attn(layer)
            q.weight.copy_(base.weight[self._base_slice("q")])
            if q.bias is not None:
                q.bias.copy_(base.bias[self._base_slice("q")])
        kv = modules["kv"]
        for g in range(self.num_groups):
            layers = self._group_layers(g)
            for which in ("k", "v"):
                rows = self._base_slice(which)
                gains = [self.teacher.model.layers[j].input_layernorm.weight for j in layers]
                folded = [self._teacher_attn(j).weight[rows] * gain[None, :] for j, gain in zip(layers, gains)]
                kv.weight[self._kv_slice(g, which)] = torch.stack(folded).mean(0)
                if kv.bias is not None:
                    kv.bias[self._kv_slice(g, which)] = torch.stack([self._teacher_attn(j).bias[rows]
                                                                     for j in layers]).mean(0)

    def _published_views(self) -> dict[str, torch.Tensor]:
        """The published ``llama_swiftkv`` tensor names, each a view of the student's own parameter."""
        modules = self._swiftkv_modules()
        out = {"model.norm_swiftkv.weight": modules["norm"].weight}
        for layer in range(self.split, self.arch.num_layers):
            for suffix, tensor in modules[f"q{layer}"].named_parameters(recurse=False):
                out[f"model.layers.{layer}.self_attn.q_proj_swiftkv.{suffix}"] = tensor
        for g in range(self.num_groups):
            layer = self.split + g * self.group_size
            for suffix, tensor in modules["kv"].named_parameters(recurse=False):
                for which in ("k", "v"):
                    out[f"model.layers.{layer}.self_attn.{which}_proj_swiftkv.{suffix}"] = \
                        tensor[self._kv_slice(g, which)]
        return out

    def published_tensors(self) -> dict[str, torch.Tensor]:
        """The SwiftKV parameters under the names the published ``llama_swiftkv`` checkpoints use."""
        return {name: tensor.detach().clone() for name, tensor in self._published_views().items()}

    @torch.no_grad()
    def load_published(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self._published_views()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"SwiftKV parameters lack {len(missing)} tensors, e.g. {missing[:2]}")
        for name, target in own.items():
            target.copy_(tensors[name].float())

    # ---- forward -----------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher.model.embed_tokens(ids)

    def rotary(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.teacher.model.rope.lookup(torch.arange(length), dtype)  # [T, 1, D] each

    @staticmethod
    def _rows(h: torch.Tensor, cos_sin) -> tuple[torch.Tensor, tuple, DenseMetadata]:
        """[B, T, H] -> the flattened rows (a copy: the layers update the stream in place when not
        training), the rotary tables for every row, and the backend's metadata."""
        batch, length = h.shape[:2]
        flat_cos_sin = tuple(t.repeat(batch, 1, 1) for t in cos_sin)
        return h.reshape(batch * length, -1).clone(), flat_cos_sin, DenseMetadata(batch, length)

    def base_layers(self, h: torch.Tensor, start: int, end: int, cos_sin) -> torch.Tensor:
        """Layers [start, end) as the base model runs them (its own q/k/v)."""
        flat, flat_cos_sin, meta = self._rows(h, cos_sin)
        out = self.teacher.model.run_layers(start, end, flat_cos_sin, flat, [None] * self.arch.num_layers, meta)
        return out.view(h.shape)

    def swiftkv_layers(self, h: torch.Tensor, cos_sin) -> torch.Tensor:
        """Layers [split, L) with SwiftKV: K/V of every group from ``h`` (the stream entering split)."""
        flat, flat_cos_sin, meta = self._rows(h, cos_sin)
        model = self.student.model
        caches = [DenseKV() for _ in range(model.arch.num_cache_layers)]
        tail = TailBatch(torch.arange(flat.shape[0]), meta)  # every token goes on: no prefill skipping here
        return model.swiftkv_layers(flat_cos_sin, flat, caches, meta, tail).view(h.shape)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.teacher.model.norm(h)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.teacher.compute_logits(normed)

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


def _share_base_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Point every student parameter the teacher also has at the teacher's tensor (one copy, frozen)."""
    shared = dict(teacher.named_parameters(remove_duplicate=False))
    for module_name, module in student.named_modules():
        for name, _ in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if full in shared:
                setattr(module, name, shared[full])


def load_published_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """The SwiftKV tensors a ``llama_swiftkv`` checkpoint carries (empty for a plain one)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k).float() for k in f.keys() if "_swiftkv" in k})
    return tensors


def from_checkpoint(model_dir: str, split: int, group_size: int, params: SwiftKVParams | None = None
                    ) -> DenseSwiftKVModel:
    """A dense SwiftKV model over a plain (or llama_swiftkv) checkpoint directory."""
    arch = ModelArch.from_dir(model_dir)
    if params is None:
        published = load_published_tensors(model_dir)
        if published:
            params = SwiftKVParams(split, group_size, published, {})
    return DenseSwiftKVModel(model_dir, arch, split, group_size, params)
