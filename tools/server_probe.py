"""What the operator tools ask a running server: readiness, its adapters' status, which version answers,
its metrics.

Probes are ordinary client calls (``tritonclient`` over HTTP, the metrics page over plain HTTP), so a
tool sees exactly what clients see, restricted-API keys included. Adapter state comes from the status
request (docs/shipping.md), never from the metrics page: metrics are for dashboards.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from peftserve.adapter_status import STATUS_PARAMETER, ServerStatus
from tools.client import build_inputs
from tools.deployment import Server


@dataclass
class ProbeAnswer:
    adapter_version: str = ""  # "<id>@<version>" that served the probe, empty for the base model
    error: str = ""


@dataclass
class Metrics:
    """One scrape of a server's metrics page: ``samples[name]`` lists ``(labels, value)``."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=lambda: defaultdict(list))

    def by_label(self, name: str, label: str, **match: str) -> dict[str, float]:
        """``{labels[label]: value}`` for the samples of ``name`` whose labels include ``match``."""
        return {
            labels[label]: value
            for labels, value in self.samples.get(name, [])
            if label in labels and all(labels.get(k) == v for k, v in match.items())
        }

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.samples.get(name, []) if all(labels.get(k) == m for k, m in match.items()))


def scrape_metrics(server: Server, *, timeout: float = 5.0) -> Metrics:
    with urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    # The parser appends "_total" to counters that lack it (Triton's nv_* counters); keep the names served.
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name if sample.name in served else family.name
            metrics.samples[name].append((dict(sample.labels), sample.value))
    return metrics


class StatusUnavailable(Exception):
    """A server did not answer the status request (unreachable, refused, or an unreadable answer)."""


def adapter_status(server: Server, model: str, headers: dict[str, str], *, timeout: float = 10.0) -> ServerStatus:
    """Ask ``server`` for its adapter status document: one request with the ``peftserve_status`` parameter
    and an empty prompt (``text_input`` is required); the model does not run for it."""
    client = httpclient.InferenceServerClient(server.http, connection_timeout=timeout, network_timeout=timeout)
    try:
        result = client.infer(model, build_inputs(httpclient, ""), headers=headers, parameters={STATUS_PARAMETER: True})
        return ServerStatus.from_json(result.as_numpy("text_output")[0, 0])
    except InferenceServerException as exc:
        raise StatusUnavailable(f"{server.name}: {exc.message() or exc}") from exc
    except OSError as exc:
        raise StatusUnavailable(f"{server.name}: cannot reach {server.http}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StatusUnavailable(f"{server.name}: unreadable status document: {exc}") from exc
    finally:
        client.close()


def probe_adapter(server: Server, model: str, adapter_id: str, headers: dict[str, str]) -> ProbeAnswer:
    """Send a one-token request for ``adapter_id``; the answer says which version served it."""
    client = httpclient.InferenceServerClient(server.http, connection_timeout=10, network_timeout=30)
    try:
        result = client.infer(model, build_inputs(httpclient, "probe", adapter_id, 1), headers=headers)
    except InferenceServerException as exc:
        return ProbeAnswer(error=exc.message() or str(exc))
    except OSError as exc:
        return ProbeAnswer(error=f"cannot reach {server.http}: {exc}")
    finally:
        client.close()
    return ProbeAnswer(adapter_version=result.as_numpy("adapter_version")[0, 0].decode())


def server_health(server: Server, model: str, headers: dict[str, str]) -> dict[str, object]:
    """Live/ready flags of the server and the model; errors become text, never exceptions."""
    client = httpclient.InferenceServerClient(server.http, connection_timeout=5, network_timeout=10)
    health: dict[str, object] = {"server": server.name, "http": server.http}
    try:
        health["live"] = client.is_server_live(headers=headers)
        health["ready"] = client.is_server_ready(headers=headers)
        health["model_ready"] = client.is_model_ready(model, headers=headers)
    except (InferenceServerException, OSError) as exc:
        health.setdefault("live", False)
        health["error"] = str(exc)
    finally:
        client.close()
    try:
        scrape_metrics(server)
        health["metrics"] = True
    except (urllib.error.URLError, OSError) as exc:
        health["metrics"] = False
        health.setdefault("error", f"metrics page: {exc}")
    return health
