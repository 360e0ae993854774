"""`make gpu-check` runs here too (`DEVICE=cpu`: tiny shapes, Triton's interpreter), so the script a GPU
session runs unattended is known to work before a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess

from cluster import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_make_gpu_check_on_cpu_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"GPU_CHECK_OUT={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert list(results["stages"]) == [name for name, _ in gpu_check.STAGES]
    assert all(stage["status"] == "ok" for stage in results["stages"].values())
    correctness = results["stages"]["correctness"]
    assert {k for k in correctness if "/" in k} == {f"{name}/triton" for name in gpu_check.MODELS}
    assert all(v["equal"] + len(v["ties"]) == v["prompts"] for k, v in correctness.items() if "/" in k)
    bench = results["stages"]["bench"]
    assert bench["engine"]["decode_tok_s"] > 0 and bench["transformers"]["workload_tok_s"] > 0
    assert "| correctness | ok |" in (out / "gpu_check.md").read_text()


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the kernels exploded")

    monkeypatch.setattr(gpu_check, "STAGES", [("kernels", broken), ("environment", gpu_check.stage_environment)])
    results = gpu_check.run("cpu", str(tmp_path))
    assert results["stages"]["kernels"]["status"] == "failed"
    assert "the kernels exploded" in results["stages"]["kernels"]["error"]
    assert results["stages"]["environment"]["status"] == "ok"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["kernels"]["status"] == "failed"
    assert "| kernels | failed |" in (tmp_path / "gpu_check.md").read_text()
