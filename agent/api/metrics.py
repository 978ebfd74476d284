"""/metrics through prometheus_client: one collector over the ModelHost's statistics and the
server's own counters, in a CollectorRegistry of the server's own (never the global one).

The statistics stay where the heartbeat also reads them (ModelHost.stats); the collector turns
them into metric families when Prometheus scrapes, in the text format 0.0.4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agent.runtime.host import ModelHost

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiCollector(Collector):
    """Reads `host.stats` and the server's counters at each scrape."""

    def __init__(self, host: ModelHost, *, http_counts: Callable[[], dict[tuple[str, int], int]],
                 cancelled: Callable[[], int], running: Callable[[], int], refused: Callable[[], int]) -> None:
        self.host = host
        self.http_counts, self.cancelled, self.running, self.refused = http_counts, cancelled, running, refused

    def collect(self) -> Iterator[Metric]:
        s = self.host.stats
        t = dict(s.totals)
        model = self.host.current
        loaded = GaugeMetricFamily("edgeship_model_loaded", "1 when a model is loaded and serving.",
                                   labels=["name", "version", "task", "execution_provider"] if model else None,
                                   value=None if model else 0)
        if model is not None:
            loaded.add_metric([model.name, model.manifest.version, model.task.value, model.execution_provider], 1)
        yield loaded
        for name, help_, value in (
            ("edgeship_inference_requests", "Inference requests that reached a model.", t["requests"]),
            ("edgeship_inference_errors", "Inference requests that failed on the server side.", t["errors"]),
            ("edgeship_requests_rejected", "Requests refused with 503 because the queue was full.", t["rejected"]),
            ("edgeship_requests_cancelled", "Generations stopped because the client went away.", self.cancelled()),
            ("edgeship_connections_refused", "Connections refused with 503 over api.max_connections.",
             self.refused()),
            ("edgeship_prompt_tokens", "Prompt tokens received.", t["prompt_tokens"]),
            ("edgeship_prompt_tokens_cached", "Prompt tokens served from the prefix cache.", t["cached_prompt_tokens"]),
            ("edgeship_completion_tokens", "Tokens generated.", t["completion_tokens"]),
            ("edgeship_prefill_seconds", "Time spent in prefill.", float(t["prefill_seconds"])),
            ("edgeship_decode_seconds", "Time spent in decode.", float(t["decode_seconds"])),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        batcher = getattr(model, "batcher", None)
        if batcher is not None:  # a text-generation model batching its decode steps (agent/runtime/batching.py)
            yield GaugeMetricFamily("edgeship_batch_sequences", "Generations in the running batch.",
                                    value=batcher.running)
            yield GaugeMetricFamily("edgeship_batch_waiting", "Generations admitted but waiting for KV room.",
                                    value=batcher.waiting)
            yield CounterMetricFamily("edgeship_batch_steps", "Batched decode steps run.", value=batcher.steps)
            yield CounterMetricFamily("edgeship_batch_tokens", "Tokens those steps decoded.",
                                      value=batcher.batched_tokens)
            yield CounterMetricFamily("edgeship_batch_preemptions",
                                      "Generations set aside (KV into the prefix cache) because the KV pool was full.",
                                      value=batcher.preempted)
        yield GaugeMetricFamily("edgeship_queue_depth", "Requests waiting for a slot.", value=s.queue_depth)
        yield GaugeMetricFamily("edgeship_requests_running", "Requests holding a slot.", value=self.running())
        buckets, cumulative = [], 0
        for bound, count in zip([*s.latency_buckets, None], s.latency_counts):
            cumulative += count
            buckets.append(("+Inf" if bound is None else str(bound), cumulative))
        yield HistogramMetricFamily("edgeship_request_duration_ms", "Inference request latency in milliseconds.",
                                    buckets=buckets, sum_value=s.latency_sum_ms)
        responses = CounterMetricFamily("edgeship_http_responses", "HTTP responses by route and status.",
                                        labels=["path", "code"])
        for (path, code), n in sorted(self.http_counts().items()):
            responses.add_metric([path, str(code)], n)
        yield responses


def registry(collector: ApiCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
