"""Scale-out without Docker: Triton replicas on loopback behind the nginx adapter-affinity router.

The same topology as the ``scale-out`` profile of ``docker-compose.yml``, from the same router template
(``deploy/nginx/router.conf.template``), with Debian's ``nginx``. ``python -m tools.scale_out`` starts it
and writes a deployment config listing every replica, so ``python -m tools --config ... publish``
publishes to all of them::

    python -m tools.scale_out --replicas 2 --http-port 9000 --grpc-port 9001
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from tools.deployment import DEFAULT_PATH, Deployment, load_deployment
from tools.triton_server import TritonServer, free_port, stop_on_signals

ROOT = Path(__file__).resolve().parents[1]
ROUTER_TEMPLATE = ROOT / "deploy" / "nginx" / "router.conf.template"
COMPOSE_ROUTER_CONFIG = ROOT / "deploy" / "nginx" / "router.compose.conf"
COMPOSE_REPLICAS = ("triton", "triton-b")  # the scale-out profile's Triton services
# A replica that refuses a connection is left alone this long before nginx tries it again.
FAIL_TIMEOUT_SECONDS = 10


def render_router_config(
    http_servers: list[str], grpc_servers: list[str], *, http_listen: str, grpc_listen: str, runtime_dir: str
) -> str:
    def servers(addresses: list[str]) -> str:
        return "\n".join(
            f"        server {address} max_fails=1 fail_timeout={FAIL_TIMEOUT_SECONDS}s;" for address in addresses
        )

    text = ROUTER_TEMPLATE.read_text()
    for key, value in {
        "HTTP_SERVERS": servers(http_servers),
        "GRPC_SERVERS": servers(grpc_servers),
        "HTTP_LISTEN": http_listen,
        "GRPC_LISTEN": grpc_listen,
        "RUNTIME_DIR": runtime_dir,
    }.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def compose_router_config() -> str:
    """The router config the compose file mounts (committed; a test checks it matches this rendering)."""
    return render_router_config(
        [f"{name}:8000" for name in COMPOSE_REPLICAS],
        [f"{name}:8001" for name in COMPOSE_REPLICAS],
        http_listen="8000",
        grpc_listen="8001",
        runtime_dir="/tmp",
    )


class LocalCluster:
    """Replicas of the real tritonserver plus nginx; a context manager that always stops them all."""

    def __init__(
        self,
        deployment: Deployment,
        *,
        replicas: int = 2,
        http_port: int | None = None,
        grpc_port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.deployment = deployment
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="peftserve-cluster-"))
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        restricted = tuple(deployment.credentials.triton_args())
        self.replicas = [
            TritonServer(
                deployment.model_repository,
                http_port=free_port(),
                grpc_port=free_port(),
                metrics_port=free_port(),
                log_path=self.workdir / f"replica-{index}.log",
                address="127.0.0.1",
                extra_args=("--model-control-mode=explicit", "--load-model=*", *restricted),
            )
            for index in range(replicas)
        ]
        self.router: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, *, timeout: float = 240.0) -> None:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda replica: replica.start(timeout=timeout), self.replicas))
        runtime = self.workdir / "nginx"
        runtime.mkdir(exist_ok=True)
        config = runtime / "router.conf"
        config.write_text(
            render_router_config(
                [replica.http_url for replica in self.replicas],
                [replica.grpc_url for replica in self.replicas],
                http_listen=self.http_url,
                grpc_listen=self.grpc_url,
                runtime_dir=str(runtime),
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.router = subprocess.Popen(
            [nginx, "-p", str(runtime), "-c", str(config), "-g", "daemon off;"], start_new_session=True
        )
        self._wait_for_router(time.monotonic() + 30)

    def _wait_for_router(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                log = (self.workdir / "nginx" / "error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nginx exited with status {self.router.returncode}: {log}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the router on {self.http_url} did not answer within 30 s")

    def deployment_config(self, path: Path) -> Path:
        """Write a deployment config listing every replica (the CLI then publishes to all of them)."""
        servers = [
            {"name": f"replica-{i}", "http": r.http_url, "grpc": r.grpc_url, "metrics": f"127.0.0.1:{r.metrics_port}"}
            for i, r in enumerate(self.replicas)
        ]
        config = {
            "model_repository": str(self.deployment.model_repository),
            "model": self.deployment.model,
            "servers": servers,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def stop(self) -> None:
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
            try:
                self.router.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.router.kill()
        for replica in self.replicas:
            replica.stop()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.scale_out`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description="Triton replicas behind the adapter-affinity router, locally.")
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="deployment config (repository, keys)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=9000)
    parser.add_argument("--grpc-port", type=int, default=9001)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    deployment = load_deployment(args.config)
    stop = stop_on_signals()
    print(f"starting {args.replicas} replicas and the router ...")
    cluster = LocalCluster(deployment, replicas=args.replicas, http_port=args.http_port, grpc_port=args.grpc_port)
    with cluster:
        config = cluster.deployment_config(cluster.workdir / "serving_config.yaml")
        for index, replica in enumerate(cluster.replicas):
            print(f"  replica-{index}: HTTP {replica.http_url}  gRPC {replica.grpc_url}  log {replica.log_path}")
        print(f"router: HTTP {cluster.http_url}  gRPC {cluster.grpc_url}  (send x-adapter-id for affinity)")
        print(f"publish to every replica: python -m tools --config {config} publish <adapter_id> <dir>")
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
