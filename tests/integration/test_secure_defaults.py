"""``make serve`` as a user runs it, on a real tritonserver: loopback only by default, keyed when opened.

Linux routes all of 127.0.0.0/8 to the loopback interface, so 127.0.0.2 stands for "another interface": a
server listening on 127.0.0.1 only refuses connections there, one listening on every interface accepts them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tools.triton_server import free_port

ADMIN_KEY = "admin-secret-for-serve-tests"
OTHER_INTERFACE = "127.0.0.2"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def post_status(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://{host}:{port}{path}", b"{}", headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@contextmanager
def make_serve(tmp_path: Path, *extra: str, config: str = "credentials: {}\n") -> Iterator[dict[str, int]]:
    """``make serve`` on free ports with a deployment config of our own; stopped with Ctrl-C (SIGINT)."""
    (tmp_path / "serving_config.yaml").write_text(config)
    ports = {name: free_port() for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
    environment = {**os.environ, **{k: str(v) for k, v in ports.items()}, "TEST_SERVE_ADMIN_KEY": ADMIN_KEY}
    command = ["make", "-s", "serve", f"SERVE_ARGS=--config {tmp_path / 'serving_config.yaml'} {' '.join(extra)}"]
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not reachable("127.0.0.1", ports["HTTP_PORT"]) or not _ready(ports["HTTP_PORT"]):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"make serve did not become ready:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {name.removesuffix("_PORT").lower(): port for name, port in ports.items()}
        started = psutil.Process(process.pid).children(recursive=True)  # serve, tritonserver, model stubs
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal (tritonserver has its own session)
        process.wait(timeout=60)
        assert not [child for child in started if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
        assert "stopping tritonserver" in (tmp_path / "serve.log").read_text()
    finally:
        _stop_everything_started_by(process)
        log.close()


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop_everything_started_by(process: subprocess.Popen) -> None:
    """tritonserver runs in a session of its own: find it among the descendants, not by name."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=30)


def test_make_serve_listens_on_loopback_only(tmp_path: Path) -> None:
    with make_serve(tmp_path) as ports:
        for port in ports.values():
            assert reachable("127.0.0.1", port) and not reachable(OTHER_INTERFACE, port)
        # On loopback the management API is open to local processes (docs/security.md: local users are out of scope).
        assert post_status("127.0.0.1", ports["http"], "/v2/repository/index") == 200
    assert "listening on loopback only (127.0.0.1)" in (tmp_path / "serve.log").read_text()


def test_make_serve_opened_to_other_hosts_needs_a_management_key(tmp_path: Path) -> None:
    refused = subprocess.run(
        ["make", "-s", "serve", f"SERVE_ARGS=--config {tmp_path / 'absent.yaml'} --bind 0.0.0.0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a management key" in refused.stderr


def test_make_serve_opened_with_a_key_refuses_model_control_without_it(tmp_path: Path) -> None:
    config = "credentials:\n  management: {header: x-peftserve-admin-key, value_env: TEST_SERVE_ADMIN_KEY}\n"
    with make_serve(tmp_path, "--bind", "0.0.0.0", config=config) as ports:
        http = ports["http"]
        assert reachable(OTHER_INTERFACE, http)  # opened deliberately: other interfaces connect
        for path in ("/v2/repository/index", "/v2/repository/models/peft_llm/unload"):
            assert post_status(OTHER_INTERFACE, http, path) == 403
            assert post_status(OTHER_INTERFACE, http, path, {"x-peftserve-admin-key": "wrong"}) == 403
        index = urllib.request.Request(
            f"http://{OTHER_INTERFACE}:{http}/v2/repository/index",
            b"{}",
            {"x-peftserve-admin-key": ADMIN_KEY},
            method="POST",
        )
        with urllib.request.urlopen(index, timeout=30) as response:
            models = {entry["name"]: entry.get("state") for entry in json.load(response)}
        assert models == {"peft_llm": "READY", "peft_llm_stream": "READY"}  # the refused unload did nothing
        generate = urllib.request.Request(
            f"http://{OTHER_INTERFACE}:{http}/v2/models/peft_llm/generate",
            json.dumps({"text_input": "a dog", "adapter_id": "robot", "max_tokens": 8}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(generate, timeout=60) as response:  # inference keys stay optional
            assert json.load(response)["adapter_version"] == "robot@1"
