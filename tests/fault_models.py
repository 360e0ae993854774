"""Fault-injecting models and kernels for the fault-isolation tests, reached through the real code
paths: a checkpoint whose config.json names one of these architectures is built with it
(``cluster.model.registry``), and the decode kernel wrapper replaces the runner's native kernels."""

from __future__ import annotations

import json
import os
import shutil
import threading

from cluster.model.llama import LlamaForCausalLM
from cluster.model.registry import register_model

POISON_TOKEN = 31337  # a request whose prompt holds this token is a request of death


class PoisonedLlama(LlamaForCausalLM):
    """Raises in its forward pass whenever the batch holds POISON_TOKEN."""

    def forward(self, input_ids, positions, kv_caches, meta, tail=None):
        if bool((input_ids == POISON_TOKEN).any()):
            raise RuntimeError(f"poisoned token {POISON_TOKEN} in the batch")
        return super().forward(input_ids, positions, kv_caches, meta, tail)


class SwitchableLlama(LlamaForCausalLM):
    """Fails every forward pass while ``broken`` is set (a device gone bad: nobody's fault), and
    blocks in it while ``hang`` is set (a hung kernel or collective) until ``hang`` is cleared."""

    broken = False
    hang = threading.Event()
    release = threading.Event()

    def forward(self, input_ids, positions, kv_caches, meta, tail=None):
        if SwitchableLlama.broken:
            raise RuntimeError("the device is gone")
        if SwitchableLlama.hang.is_set():
            SwitchableLlama.release.wait(120)
        return super().forward(input_ids, positions, kv_caches, meta, tail)


register_model("PoisonedLlamaForCausalLM", "tests.fault_models:PoisonedLlama")
register_model("SwitchableLlamaForCausalLM", "tests.fault_models:SwitchableLlama")


def checkpoint_with_architecture(src_dir: str, dst_dir: str, architecture: str) -> str:
    """A copy of a checkpoint whose config.json names ``architecture`` (same weights)."""
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    path = os.path.join(dst_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = [architecture]
    with open(path, "w") as f:
        json.dump(config, f)
    return dst_dir


class FailingDecodeKernel:
    """The native kernels, except that paged decode raises when one of its contexts is ``fail_at``
    tokens long: a kernel fault that only one request's shape triggers."""

    def __init__(self, real, fail_at: int):
        self._real = real
        self.fail_at = fail_at
        self.num_failures = 0

    def paged_decode(self, q, kv_cache, block_table, context_lens, *args, **kwargs):
        if bool((context_lens == self.fail_at).any()):
            self.num_failures += 1
            raise RuntimeError(f"decode kernel fault at a context of {self.fail_at} tokens")
        return self._real.paged_decode(q, kv_cache, block_table, context_lens, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)
