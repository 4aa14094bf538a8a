"""The integration suite reruns a test only when its server died of Triton's own lock abort."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import UPSTREAM_ABORT, died_of_upstream_abort
from tools.triton_server import TritonServer


def _server_that_printed(tmp_path: Path, text: str, *, exits: bool) -> TritonServer:
    server = TritonServer(tmp_path, http_port=1, grpc_port=2, metrics_port=3, log_path=tmp_path / "server.log")
    server.log_path.write_text(f"I1202 model loaded\n{text}\n")
    server.process = subprocess.Popen(["true"] if exits else ["sleep", "30"])
    if exits:
        server.process.wait()
    return server


def test_only_a_dead_server_whose_log_shows_the_lock_abort_counts(tmp_path: Path) -> None:
    aborted = _server_that_printed(
        tmp_path, f"terminate called after throwing an instance of '{UPSTREAM_ABORT}'", exits=True
    )
    assert died_of_upstream_abort(aborted)
    crashed_otherwise = _server_that_printed(tmp_path, "Segmentation fault", exits=True)
    assert not died_of_upstream_abort(crashed_otherwise)
    alive = _server_that_printed(tmp_path, UPSTREAM_ABORT, exits=False)
    try:
        assert not died_of_upstream_abort(alive)
    finally:
        alive.process.kill()
        alive.process.wait()
