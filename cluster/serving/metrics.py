"""Prometheus metrics of a model-server replica, exported through Ray's metrics agent.

Names mirror vLLM's (``vllm:time_to_first_token_seconds`` ...) with ``_`` for ``:``, which
OpenTelemetry names do not allow; Ray then prefixes ``ray_``. So a vLLM dashboard ports by
replacing ``vllm:`` with ``ray_vllm_``. Every series carries ``model_name``.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from cluster.outputs import RequestOutput

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
_TOKEN_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5]


class ServerMetrics:
    def __init__(self, model_name: str):
        self.tags = {"model_name": model_name}
        keys = ("model_name",)
        self.ttft = Histogram("vllm_time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS, keys)
        self.tpot = Histogram("vllm_time_per_output_token_seconds", "Time per output token after the first",
                              _TOKEN_BUCKETS, keys)
        self.e2e = Histogram("vllm_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             _LATENCY_BUCKETS, keys)
        self.running = Gauge("vllm_num_requests_running", "Requests in the running batch", keys)
        self.waiting = Gauge("vllm_num_requests_waiting", "Requests waiting to be scheduled", keys)
        self.kv_usage = Gauge("vllm_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", keys)
        self.prompt_tokens = Counter("vllm_prompt_tokens_total", "Prompt tokens of finished requests", keys)
        self.generation_tokens = Counter("vllm_generation_tokens_total", "Generated tokens", keys)
        self.prefix_queries = Counter("vllm_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache",
                                      keys)
        self.prefix_hits = Counter("vllm_prefix_cache_hits_total", "Prompt tokens found in the prefix cache", keys)
        self.success = Counter("vllm_request_success_total", "Finished requests by finish reason",
                               ("model_name", "finished_reason"))
        # vLLM's spec-decode counters: draft tokens verified and accepted (rate = accepted / drafts).
        self.spec_drafts = Counter("vllm_spec_decode_num_draft_tokens_total", "Speculative draft tokens verified",
                                   keys)
        self.spec_accepted = Counter("vllm_spec_decode_num_accepted_tokens_total",
                                     "Speculative draft tokens accepted", keys)
        self._seen_queries = self._seen_hits = 0
        self._seen_drafts = self._seen_accepted = 0

    def on_finished(self, out: RequestOutput) -> None:
        """Latencies and token counts of one finished request (engine timestamps, monotonic)."""
        times, completion = out.metrics, out.outputs[0]
        arrival, first, finish = (times.get(k) for k in ("arrival_time_s", "first_token_time_s", "finish_time_s"))
        if arrival is not None and first is not None:
            self.ttft.observe(first - arrival, tags=self.tags)
        num_tokens = completion.num_generated_tokens  # the outputs may be deltas
        if first is not None and finish is not None and num_tokens > 1:
            self.tpot.observe((finish - first) / (num_tokens - 1), tags=self.tags)
        if arrival is not None and finish is not None:
            self.e2e.observe(finish - arrival, tags=self.tags)
        self.prompt_tokens.inc(len(out.prompt_token_ids), tags=self.tags)
        if num_tokens:
            self.generation_tokens.inc(num_tokens, tags=self.tags)
        self.success.inc(1, tags={**self.tags, "finished_reason": completion.finish_reason or "unknown"})

    def on_stats(self, stats: dict) -> None:
        """Queue and cache gauges, and the prefix-cache counters' growth since the last call."""
        self.running.set(stats["num_running"], tags=self.tags)
        self.waiting.set(stats["num_waiting"], tags=self.tags)
        self.kv_usage.set(stats["kv_cache_usage"], tags=self.tags)
        queries, hits = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        if queries > self._seen_queries:
            self.prefix_queries.inc(queries - self._seen_queries, tags=self.tags)
        if hits > self._seen_hits:
            self.prefix_hits.inc(hits - self._seen_hits, tags=self.tags)
        self._seen_queries, self._seen_hits = max(queries, self._seen_queries), max(hits, self._seen_hits)
        drafts, accepted = stats.get("spec_drafted_tokens", 0), stats.get("spec_accepted_tokens", 0)
        if drafts > self._seen_drafts:
            self.spec_drafts.inc(drafts - self._seen_drafts, tags=self.tags)
        if accepted > self._seen_accepted:
            self.spec_accepted.inc(accepted - self._seen_accepted, tags=self.tags)
        self._seen_drafts, self._seen_accepted = drafts, accepted  # a restarted engine counts from zero again
