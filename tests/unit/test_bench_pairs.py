"""`llm-cluster bench` against transformers interleaves the two sides' runs and reports each pair."""

from __future__ import annotations

import types

import cluster.bench as bench


def test_runs_alternate_sides_and_each_pair_gets_its_ratio(monkeypatch, capsys):
    calls = []
    ours_speeds = iter([100.0, 110.0, 105.0])
    hf_speeds = iter([20.0, 25.0, 22.0, 21.0])  # the sweep (batch 8, batch 16), then pairs 1 and 2

    def ours_tput(llm, work):
        calls.append("ours")
        return next(ours_speeds)

    def hf_tput(model, work, batch, pad):
        calls.append(f"hf{batch}")
        return next(hf_speeds)

    monkeypatch.setattr(bench, "_start_engine", lambda args, work, ids: types.SimpleNamespace(
        engine=types.SimpleNamespace(shutdown=lambda: calls.append("shutdown"))))
    monkeypatch.setattr(bench, "engine_throughput", ours_tput)
    monkeypatch.setattr(bench, "hf_throughput", hf_tput)
    monkeypatch.setattr(bench, "engine_single_stream", lambda llm, ids: (calls.append("ours-1"), (0.05, 60.0))[1])
    monkeypatch.setattr(bench, "hf_single_stream", lambda model, ids, pad: (calls.append("hf-1"), (0.10, 20.0))[1])
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda path, dtype=None: types.SimpleNamespace(eval=lambda: "model"))
    args = types.SimpleNamespace(hf_batch_sizes="8,16", repeats=3, dtype="float32")
    ours, hf = bench._bench_against_hf(args, "path", None, [1, 2], 0)

    assert calls == ["hf-1",  # transformers' warm-up
                     "ours", "hf8", "hf16",  # pair 0: ours, then the sweep (batch 16 is best: 25 tok/s)
                     "hf16", "ours", "ours", "hf16",  # pairs 1 and 2, the first side alternating
                     "ours-1", "hf-1", "hf-1", "ours-1", "ours-1", "hf-1", "shutdown"]
    assert ours["throughput"] == [100.0, 110.0, 105.0] and hf["throughput"] == [25.0, 22.0, 21.0]
    assert hf["batch_size"] == 16 and ours["ttft"] == [0.05] * 3 and hf["decode"] == [20.0] * 3
    bench._report(ours, hf, "transformers", 2, paired=True)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("generated tokens/s"))
    assert "4.00, 5.00, 5.00 (median 5.00x)" in line, line  # 100/25, 110/22, 105/21
    assert " 4.77x" in line  # the ratio of the medians: 105 / 22
