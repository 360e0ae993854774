"""``llm-cluster bench-openmp``'s children run under the OpenMP wait policy each is named for."""

from __future__ import annotations

from cluster.bench_openmp import measure


def test_bench_openmp_children_run_under_the_policy_they_are_named_for(tiny_llama_dir):
    job = {"model": tiny_llama_dir(), "dtype": "float32", "threads": 1, "batch": 2, "context": 20, "steps": 3}
    spin, sleep = measure("spin", job, timeout_s=600), measure("sleep", job, timeout_s=600)
    assert (spin["spin_count"], sleep["spin_count"]) == (300000, 0)  # as libgomp reported them
    assert all(r["threads"] == 1 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in (spin, sleep))
