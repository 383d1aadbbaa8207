"""The server's Prometheus metrics (`GET /metrics`, prometheus_client's text format), named as vLLM's are
where they mean the same. Each engine has its own registry, so that several servers in one process (the
tests) count apart. Label values are fixed sets (endpoints, status codes), never what a client sent."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """What the engine and the HTTP front count; `text()` is the /metrics page."""

    def __init__(self, engine: Any):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtj_requests", "Completion requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mtj_prompt_tokens", "Prompt tokens of the sequences taken for decoding",
                                     registry=r)
        self.generation_tokens = Counter("mtj_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("mtj_time_to_first_token_seconds", "From a sequence's arrival in the "
                                             "queue to its first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("mtj_inter_token_latency_seconds", "Between a sequence's consecutive "
                                             "tokens", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("mtj_queue_depth", "Sequences waiting for the engine", registry=r).set_function(lambda: len(engine.queue))
        Gauge("mtj_busy_slots", "Sequences being decoded", registry=r).set_function(lambda: len(engine.in_flight()))
        r.register(_PrefixCacheCollector(engine))
        r.register(_DraftCollector(engine))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _DraftCollector:
    """Speculative decoding's draft tokens, verified and kept (absent without speculation)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        if not getattr(self.engine, "speculate", 0):
            return
        drafted, kept = self.engine.drafts
        yield CounterMetricFamily("mtj_spec_decode_draft_tokens", "Draft tokens verified", int(drafted))
        yield CounterMetricFamily("mtj_spec_decode_accepted_tokens", "Draft tokens kept", int(kept))


class _PrefixCacheCollector:
    """The engine's prefix cache counts, read when scraped (absent without a cache)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        pool = getattr(self.engine, "prefix_cache", None)
        if pool is None:
            return
        cache = pool.tree
        yield CounterMetricFamily("mtj_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  cache.looked_up)
        yield CounterMetricFamily("mtj_prefix_cache_hits", "Prompt tokens found in the prefix cache", cache.hits)
        yield CounterMetricFamily("mtj_prefix_cache_evicted", "Tokens evicted from the prefix cache", cache.evicted)
        yield GaugeMetricFamily("mtj_prefix_cache_tokens", "Tokens held in the prefix cache", cache.cached)
        yield GaugeMetricFamily("mtj_prefix_cache_capacity_tokens", "Tokens the prefix cache holds when full",
                                cache.size)
