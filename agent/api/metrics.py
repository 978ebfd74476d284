"""/metrics in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from agent.runtime.host import ModelHost

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(host: ModelHost, *, http_counts: dict[tuple[str, int], int], cancelled: int, running: int) -> str:
    s = host.stats
    t = dict(s.totals)
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    model = host.current
    metric("edgeship_model_loaded", "gauge", "1 when a model is loaded and serving.",
           [(f'{{name="{_escape(model.name)}",version="{_escape(model.manifest.version)}",'
             f'task="{model.task.value}",execution_provider="{_escape(model.execution_provider)}"}}', 1)]
           if model is not None else [("", 0)])
    metric("edgeship_inference_requests_total", "counter", "Inference requests that reached a model.",
           [("", t["requests"])])
    metric("edgeship_inference_errors_total", "counter", "Inference requests that failed on the server side.",
           [("", t["errors"])])
    metric("edgeship_requests_rejected_total", "counter", "Requests refused with 503 because the queue was full.",
           [("", t["rejected"])])
    metric("edgeship_requests_cancelled_total", "counter", "Generations stopped because the client went away.",
           [("", cancelled)])
    metric("edgeship_prompt_tokens_total", "counter", "Prompt tokens received.", [("", t["prompt_tokens"])])
    metric("edgeship_prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache.",
           [("", t["cached_prompt_tokens"])])
    metric("edgeship_completion_tokens_total", "counter", "Tokens generated.", [("", t["completion_tokens"])])
    metric("edgeship_prefill_seconds_total", "counter", "Time spent in prefill.", [("", float(t["prefill_seconds"]))])
    metric("edgeship_decode_seconds_total", "counter", "Time spent in decode.", [("", float(t["decode_seconds"]))])
    metric("edgeship_queue_depth", "gauge", "Requests waiting for a slot.", [("", s.queue_depth)])
    metric("edgeship_requests_running", "gauge", "Requests holding a slot.", [("", running)])
    buckets, cumulative = [], 0
    for bound, count in zip([*s.latency_buckets, None], s.latency_counts):
        cumulative += count
        buckets.append((f'_bucket{{le="{"+Inf" if bound is None else bound}"}}', cumulative))
    lines.append("# HELP edgeship_request_duration_ms Inference request latency in milliseconds.")
    lines.append("# TYPE edgeship_request_duration_ms histogram")
    lines += [f"edgeship_request_duration_ms{suffix} {v}" for suffix, v in buckets]
    lines.append(f"edgeship_request_duration_ms_sum {s.latency_sum_ms:g}")
    lines.append(f"edgeship_request_duration_ms_count {cumulative}")
    metric("edgeship_http_responses_total", "counter", "HTTP responses by route and status.",
           [(f'{{path="{_escape(p)}",code="{c}"}}', n) for (p, c), n in sorted(http_counts.items())])
    return "\n".join(lines) + "\n"
