"""Prometheus metrics for `/metrics` (names prefixed `qwen3_jax_`), in a registry of the server's own.

Engine state (requests running / waiting, KV blocks, prefix-cache hit rate, preemptions) is read from the engine
thread's last stats snapshot at scrape time; latencies and token counts are recorded as outputs arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0)


class _EngineCollector:
    """Gauges read from `EngineLoop.snapshot` when scraped."""

    def __init__(self, engine_loop):
        self.engine_loop = engine_loop

    def collect(self):
        s = self.engine_loop.snapshot
        loop = self.engine_loop

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"qwen3_jax_{name}", doc)
            g.add_metric([], float(value))
            return g

        yield gauge("num_requests_running", "Requests in the running batch.", s.get("running", 0))
        yield gauge("num_requests_waiting", "Requests waiting for the engine (queued or not yet admitted).",
                    loop.num_waiting)
        yield gauge("kv_blocks_total", "KV cache blocks in the pool.", s.get("blocks_total", 0))
        yield gauge("kv_blocks_used", "KV cache blocks owned by requests.",
                    s.get("blocks_total", 0) - s.get("blocks_free", 0))
        yield gauge("kv_blocks_cached", "Blocks holding a cached prefix (free ones may be reused).",
                    s.get("blocks_cached", 0))
        yield gauge("prefix_cache_hit_rate", "Fraction of looked-up prompt blocks found in the prefix cache.",
                    s.get("prefix_cache_hit_rate", 0.0))
        c = CounterMetricFamily("qwen3_jax_preemptions", "Sequences preempted for lack of KV blocks.")
        c.add_metric([], float(s.get("preemptions", 0)))
        yield c
        c = CounterMetricFamily("qwen3_jax_engine_step_errors", "Engine steps that raised.")
        c.add_metric([], float(loop.step_errors))
        yield c


class ServerMetrics:
    """The server's registry: engine gauges, per-request latencies and token counters, HTTP outcomes."""

    def __init__(self, engine_loop):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_loop))
        r = self.registry
        self.ttft = Histogram("qwen3_jax_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwen3_jax_inter_token_latency_seconds",
                             "Time between generated tokens (a step's gap shared by the tokens it delivered).",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qwen3_jax_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwen3_jax_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("qwen3_jax_generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.finished = Counter("qwen3_jax_requests_finished", "Engine requests finished, by reason.",
                                ["finish_reason"], registry=r)
        self.http = Counter("qwen3_jax_http_requests", "HTTP requests answered, by route and status.",
                            ["route", "status"], registry=r)
        self._last: dict[str, tuple[float, int]] = {}  # request id -> (time of its last output, tokens then)

    def on_output(self, out, now: float) -> None:
        """Record one RequestOutput (called on the engine thread, after every step that changed the request)."""
        n = len(out.outputs[0].token_ids)
        last = self._last.get(out.request_id)
        if last is None:
            m = out.metrics
            if n and m is not None and m.first_token_time is not None:
                self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        elif n > last[1]:
            gap = (now - last[0]) / (n - last[1])
            for _ in range(n - last[1]):
                self.itl.observe(gap)
        self._last[out.request_id] = (now, n)
        if out.finished:
            self._last.pop(out.request_id, None)
            self.finished.labels(out.outputs[0].finish_reason or "unknown").inc()
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.generation_tokens.inc(n)
            if out.metrics is not None:
                self.e2e.observe(max(0.0, now - out.metrics.arrival_time))

    def on_abort(self, request_id: str) -> None:
        """Forget a request that ended without a finished output (aborted or failed; engine thread)."""
        self._last.pop(request_id, None)
        self.finished.labels("abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
