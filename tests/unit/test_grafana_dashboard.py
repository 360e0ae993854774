"""deploy/grafana-dashboard.json queries only metrics the replicas export, under their exported names."""

from __future__ import annotations

import json
import os
import re

from cluster.serving import metrics as metrics_module

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana-dashboard.json")


def exported_names() -> set[str]:
    """Every series name ServerMetrics creates, as Ray exports it (prefix ray_, histogram suffixes)."""
    source = open(metrics_module.__file__).read()
    names = set()
    for kind, name in re.findall(r'(Histogram|Counter|Gauge)\("([a-z0-9_]+)"', source):
        base = f"ray_{name}"
        names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"} if kind == "Histogram" else {base}
    return names


def test_every_panel_queries_an_exported_metric():
    dashboard = json.load(open(DASHBOARD))
    exported = exported_names()
    assert len(exported) >= 10
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"ray_vllm_[a-z0-9_]+", target["expr"]))
            assert names, f"{panel['title']}: no metric in {target['expr']}"
            assert names <= exported, f"{panel['title']}: {names - exported} are not exported"
            used |= names
    # The dashboard covers the latency histograms, queue gauges, KV usage and prefix-cache counters.
    for needed in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "num_requests_waiting",
                   "kv_cache_usage", "prefix_cache_hits"):
        assert any(needed in name for name in used), needed
