"""Two real tritonserver replicas behind the nginx router on loopback (python -m tools.scale_out).

Affinity, publishing to every replica, the Grafana dashboard against a replica's real metrics page, and
a replica killed mid-traffic. The last test kills a replica, so it runs last.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import DEMO_PHRASES, REPO_ROOT
from tests.integration.conftest import private_repository
from tools.adapter_release import publish
from tools.client import build_inputs
from tools.deployment import Deployment, load_deployment
from tools.scale_out import LocalCluster
from tools.server_probe import scrape_metrics

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "peftserve.json"
ADAPTERS = ["pirate", "robot", "chef", "knight", "wizard", "gardener"]


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Deployment]]:
    workdir = tmp_path_factory.mktemp("scale_out")
    private_repository(model_dir, workdir / "model_repository", ADAPTERS, adapter_poll_seconds="0.2")
    (workdir / "serving_config.yaml").write_text("model_repository: model_repository\n")
    local = LocalCluster(load_deployment(workdir / "serving_config.yaml"), replicas=2, workdir=workdir)
    try:
        local.start()
    except Exception as exc:  # noqa: BLE001 - the replica logs say why
        local.stop()
        pytest.fail(f"the local cluster did not start: {exc}")
    try:
        yield local, load_deployment(local.deployment_config(workdir / "cluster.yaml"))
    finally:
        local.stop()


def generate(cluster: LocalCluster, adapter_id: str, *, affinity: bool = True) -> tuple[str, str]:
    """(replica that answered, text) through the router's HTTP port."""
    body = json.dumps({"text_input": "the cat looks at", "adapter_id": adapter_id, "max_tokens": 24}).encode()
    headers = {"x-adapter-id": adapter_id} if affinity and adapter_id else {}
    request = urllib.request.Request(
        f"http://{cluster.http_url}/v2/models/peft_llm/generate", body, headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers["X-Peftserve-Replica"], json.loads(response.read())["text_output"]


def test_same_adapter_lands_on_the_same_replica_and_base_traffic_is_spread(cluster) -> None:
    local, _ = cluster
    for adapter_id in ADAPTERS:
        replicas = set()
        for _ in range(4):
            replica, text = generate(local, adapter_id)
            replicas.add(replica)
            assert DEMO_PHRASES[adapter_id] in text
        assert len(replicas) == 1, f"{adapter_id} went to {replicas}"
    base = Counter(generate(local, "")[0] for _ in range(8))
    assert sorted(base.values()) == [4, 4]  # round-robin
    grpc = grpcclient.InferenceServerClient(local.grpc_url)
    result = grpc.infer("peft_llm", build_inputs(grpcclient, "a dog", "robot", 24), headers={"x-adapter-id": "robot"})
    assert DEMO_PHRASES["robot"] in result.as_numpy("text_output")[0, 0].decode()


def test_publish_goes_live_on_every_replica(cluster, model_dir: Path) -> None:
    local, deployment = cluster
    result = publish(deployment, "pirate", model_dir / "adapters" / "robot" / "1")
    assert result.outcome == "switched" and result.servers == {"replica-0": "serving", "replica-1": "serving"}
    for affinity in (True, False):  # the affinity replica, and any replica
        for _ in range(3):
            assert DEMO_PHRASES["robot"] in generate(local, "pirate", affinity=affinity)[1]


def test_dashboard_queries_only_metrics_the_server_exports(cluster) -> None:
    local, deployment = cluster
    with pytest.raises(urllib.error.HTTPError):
        generate(local, "no-such-adapter")  # an error series for the errors panel
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:peftserve|nv)_[a-z_]+)\b", target["expr"])
    }
    assert len(queried) >= 15
    exported: set[str] = set()
    for server in deployment.servers:
        exported |= set(scrape_metrics(server).samples)
    assert queried - exported == set()


def test_killing_a_replica_loses_no_request_the_client_retries(cluster) -> None:
    local, _ = cluster
    answers: list[tuple[float, str, str]] = []
    retries: list[str] = []
    stop = threading.Event()

    def client(adapter_id: str) -> None:
        while not stop.is_set():
            for attempt in range(5):
                try:
                    replica, text = generate(local, adapter_id)
                    answers.append(
                        (time.monotonic(), adapter_id, replica if DEMO_PHRASES[adapter_id] in text else text)
                    )
                    break
                except (urllib.error.URLError, OSError) as exc:
                    retries.append(str(exc))
                    time.sleep(0.2 * (attempt + 1))
            else:
                answers.append((time.monotonic(), adapter_id, "LOST"))

    steady = [a for a in ADAPTERS if a != "pirate"]  # pirate's content changed in the publish test
    threads = [threading.Thread(target=client, args=(a,), daemon=True) for a in steady]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    # Kill a replica that is serving some adapter: with random ports, consistent hashing may put every
    # adapter on one replica, and killing an idle one would test nothing.
    victim_address = answers[0][2]
    victim = next(replica for replica in local.replicas if replica.http_url == victim_address)
    survivor = next(replica for replica in local.replicas if replica is not victim)
    victim.stop(timeout=0)  # SIGTERM then SIGKILL of the whole process group
    killed_at = time.monotonic()
    time.sleep(4.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    replicas = {replica.http_url for replica in local.replicas}
    assert all(a[2] in replicas for a in answers), [a for a in answers if a[2] not in replicas][:3]  # none lost
    before = {replica for at, _, replica in answers if at < killed_at}
    after = {replica for at, _, replica in answers if at > killed_at + 1.0}
    assert victim_address in before and after == {survivor.http_url}
    assert {adapter for at, adapter, _ in answers if at > killed_at + 1.0} == set(steady)
