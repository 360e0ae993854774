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
import time

import torch

from cluster.model.layers.packed_weight import GEMV_MAX_ROWS, PackedWeight
from cluster.runner.model_input import padded_rows

logger = logging.getLogger(__name__)

ONEDNN_DEFAULT_CAPACITY = 1024  # entries in oneDNN's primitive cache when nothing caps it


def row_buckets(limit: int) -> list[int]:
    """Every row count a padded batch of 1..``limit`` rows runs its matmuls at, past the GEMV's rows
    (which build nothing), ascending."""
    return sorted({padded_rows(n) for n in range(GEMV_MAX_ROWS + 1, limit + 1)})


def weight_rows(model: torch.nn.Module, max_tokens: int, max_logits_rows: int) -> dict[tuple, tuple[PackedWeight, int]]:
    """One packed weight per distinct (shape, dtype), with the most rows a step passes it: the step's
    token budget for the layers' linears, its logits rows for the LM head."""
    head = getattr(model, "lm_head", None)
    found: dict[tuple, tuple[PackedWeight, int]] = {}
    for module in model.modules():
        matmul = getattr(module, "_matmul", None)
        if not isinstance(matmul, PackedWeight) or matmul.dense.dim() != 2:
            continue
        limit = max_logits_rows if module is head else max_tokens
        key = (tuple(matmul.dense.shape), matmul.dense.dtype)
        if key not in found or found[key][1] < limit:
            found[key] = (matmul, limit)
    return found


@torch.inference_mode()
def warm_matmuls(model: torch.nn.Module, max_tokens: int, max_logits_rows: int, capacity: int | None) -> int:
    """Run each distinct weight once at every bucket row count it can see, on zeros; return how many
    (rows, weight) pairs ran. With more pairs than the cache holds (``capacity``; None: oneDNN's
    default) only the largest buckets are built: full-budget steps are the common ones under load,
    and building past the capacity would evict what was just built."""
    capacity = ONEDNN_DEFAULT_CAPACITY if capacity is None else capacity
    weights = weight_rows(model, max_tokens, max_logits_rows)
    pairs = sorted(((rows, key) for key, (_, limit) in weights.items() for rows in row_buckets(limit)),
                   key=lambda p: p[0])
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
                    len({rows for rows, _ in pairs}), len(weights), time.perf_counter() - start)
    return len(pairs)
