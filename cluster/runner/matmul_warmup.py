"""Build the CPU matmuls of every padded row count at start-up, not in the first steps that need them.

oneDNN JIT-compiles a matmul for each (row count, weight shape) it meets and keeps it in a
shape-keyed cache. Batches are padded to row buckets (``model_input.padded_rows``), so a model has a
bounded set of them: SmolLM2 with a 2,048-token step budget has 32 bucket row counts above the AMX
kernels' 64 rows, times its four layer weight shapes. Building one costs 3-10 ms against 0.1-3 ms to
run it (docs/benchmarks.md, sixteenth pass): a step that meets a new bucket pays 10-30 ms more, its
first time, or every time once the cache is too small for the buckets in use. This builds them all
before the first request (vLLM warms its compiled sizes the same way), within the cache's capacity.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from cluster.model.layers.packed_weight import GEMV_MAX_ROWS, PackedWeight
from cluster.runner.model_input import padded_rows

logger = logging.getLogger(__name__)

ONEDNN_DEFAULT_CAPACITY = 1024  # entries in oneDNN's primitive cache when nothing caps it
# Past this many rows a step's matmuls run long enough that building them on first use costs it a few
# percent (SmolLM2: ~20 ms of builds in a ~0.6 s step at 4,096 rows); start-up stops here, so a
# large token budget neither slows it down nor allocates budget-sized inputs.
WARM_MAX_ROWS = 4096


def cache_capacity(configured: int | None) -> int | None:
    """The entries oneDNN's cache holds in this process: what the process environment says (an
    operator's setting, kept over the configured one by ``bound_onednn_caches``), else ``configured``."""
    value = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")
    return int(value) if value.isdigit() else configured


def row_buckets(limit: int, floor: int = GEMV_MAX_ROWS) -> list[int]:
    """Every row count a padded batch of ``floor`` + 1 .. ``limit`` rows runs its matmuls at, ascending."""
    return sorted({padded_rows(n) for n in range(floor + 1, limit + 1)})


def weight_rows(model: torch.nn.Module, max_tokens: int, max_logits_rows: int) -> dict[tuple, tuple[PackedWeight, int]]:
    """One oneDNN weight per distinct (shape, dtype), with the most rows a step passes it: the step's
    token budget for the layers' linears, its logits rows for the LM head."""
    head = getattr(model, "lm_head", None)
    found: dict[tuple, tuple[PackedWeight, int]] = {}
    for module in model.modules():
        matmul = getattr(module, "_matmul", None)
        if not isinstance(matmul, PackedWeight) or matmul.dense.dim() != 2 or matmul.onednn_floor() is None:
            continue
        limit = max_logits_rows if module is head else max_tokens
        key = (tuple(matmul.dense.shape), matmul.dense.dtype)
        if key not in found or found[key][1] < limit:
            found[key] = (matmul, limit)
    return found


@torch.inference_mode()
def warm_matmuls(model: torch.nn.Module, max_tokens: int, max_logits_rows: int, capacity: int | None) -> int:
    """Run each distinct oneDNN weight once, on zeros, at every bucket row count past its native
    kernels' rows that a step can pass it (up to ``WARM_MAX_ROWS``); return how many (rows, weight)
    pairs ran. With more pairs than the cache holds (``capacity``; None: oneDNN's default) only the
    largest buckets are built: full-budget steps are the common ones under load, and building past
    the capacity would evict what was just built."""
    capacity = capacity or ONEDNN_DEFAULT_CAPACITY
    weights = weight_rows(model, min(max_tokens, WARM_MAX_ROWS), min(max_logits_rows, WARM_MAX_ROWS))
    pairs = sorted(((rows, key) for key, (matmul, limit) in weights.items()
                    for rows in row_buckets(limit, matmul.onednn_floor())), key=lambda p: p[0])
    if len(pairs) > capacity:
        logger.warning("oneDNN's cache holds %d matmuls, the padded row counts need %d: building the largest %d "
                       "(raise onednn_cache_capacity to build them all)", capacity, len(pairs), capacity)
        pairs = pairs[len(pairs) - capacity:]
    start = time.perf_counter()
    inputs: dict[tuple, torch.Tensor] = {}
    for rows, key in pairs:
        matmul = weights[key][0]
        cols, dtype = matmul.dense.shape[1], matmul.dense.dtype
        x = inputs.get((cols, dtype))
        if x is None or x.shape[0] < rows:
            x = inputs[(cols, dtype)] = torch.zeros(rows, cols, dtype=dtype)
        matmul.linear(x[:rows])
    if pairs:
        logger.info("built the matmuls of %d padded row counts x %d weight shapes in %.2f s",
                    len({rows for rows, _ in pairs}), len({key for _, key in pairs}), time.perf_counter() - start)
    return len(pairs)
