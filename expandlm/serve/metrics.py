"""`GET /metrics`: the server's load and latency in Prometheus' text format, by vLLM's metric names with
`expandlm:` for `vllm:` (so a vLLM dashboard reads it with the prefix changed). One registry per
scheduler, not prometheus_client's global one: two servers in one process (the tests) never mix.

- `expandlm:num_requests_running`, `expandlm:num_requests_waiting` (gauges): sequences decoding now, and
  queued (a request of n choices is n sequences, as vLLM counts them);
- `expandlm:prompt_tokens_total`, `expandlm:generation_tokens_total` (counters): tokens prefilled, and
  sampled;
- `expandlm:request_success_total{finished_reason}` (counter, per sequence): stop, length, abort (the
  client went away) or error (the step failed);
- `expandlm:time_to_first_token_seconds`, `expandlm:e2e_request_latency_seconds` (histograms): from a
  sequence's arrival to its first token, and to its end.

    metrics = ServingMetrics(scheduler.load)   # load() → {"running": ..., "waiting": ...}
    body = metrics.render()   # served with CONTENT_TYPE
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "expandlm:"
# vLLM's buckets for both (seconds); a CPU server answers in the lower half
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class ServingMetrics:
    """The scheduler's counters; `load()` gives its running and waiting sequences when scraped."""

    def __init__(self, load: Callable[[], dict]):
        self.registry = CollectorRegistry()
        running = Gauge(PREFIX + "num_requests_running", "Sequences decoding now", registry=self.registry)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences queued for a slot", registry=self.registry)
        running.set_function(lambda: load()["running"])
        waiting.set_function(lambda: load()["waiting"])
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens sampled", registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Sequences ended, by finish reason",
                               ["finished_reason"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram(PREFIX + "e2e_request_latency_seconds", "From arrival to the end",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def prefilled(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def sampled(self, arrived: float, first: bool) -> None:
        self.generation_tokens.inc()
        if first:
            self.ttft.observe(time.monotonic() - arrived)

    def ended(self, arrived: float, reason: str) -> None:
        self.success.labels(finished_reason=reason).inc()
        self.latency.observe(time.monotonic() - arrived)

    def render(self) -> bytes:
        return generate_latest(self.registry)
