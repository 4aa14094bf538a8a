"""A readable digest of one server's peftserve metrics: per adapter traffic, latency, cache and swaps."""

from __future__ import annotations

from collections import defaultdict

from tools.server_probe import Metrics

# summary column -> metric sample summed per adapter
_PER_ADAPTER = {
    "requests": "peftserve_requests_total",
    "tokens": "peftserve_generated_tokens_total",
    "cache_hits": "peftserve_adapter_cache_hits_total",
    "cache_misses": "peftserve_adapter_cache_misses_total",
    "evictions": "peftserve_adapter_cache_evictions_total",
    "serving_version": "peftserve_adapter_serving_version",
    "loaded_bytes": "peftserve_adapter_loaded_bytes",
}


def summarize_metrics(metrics: Metrics, model: str) -> dict[str, object]:
    adapters: dict[str, dict[str, float]] = defaultdict(dict)
    for column, name in _PER_ADAPTER.items():
        for adapter, value in metrics.by_label(name, "adapter", model=model).items():
            adapters[adapter][column] = value
    for labels, value in metrics.samples.get("peftserve_request_errors_total", []):
        if labels.get("model") == model:
            entry = adapters[labels["adapter"]]
            entry["errors"] = entry.get("errors", 0) + value
    for labels, value in metrics.samples.get("peftserve_adapter_version_events_total", []):
        if labels.get("model") == model:
            adapters[labels["adapter"]][labels["event"]] = value
    durations = metrics.by_label("peftserve_request_duration_seconds_sum", "adapter", model=model)
    for adapter, seconds in durations.items():
        count = adapters[adapter].get("requests", 0)
        if count:
            adapters[adapter]["mean_latency_ms"] = round(1000 * seconds / count, 1)
    return {
        "adapters_loaded": metrics.total("peftserve_adapters_loaded", model=model),
        "adapter_memory_mib": round(metrics.total("peftserve_adapter_memory_bytes", model=model) / 2**20, 2),
        "adapters": {name: {k: _number(v) for k, v in sorted(row.items())} for name, row in sorted(adapters.items())},
    }


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
