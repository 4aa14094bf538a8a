"""The stub watch: finding a model's stub processes in /proc, and when a missing stub means a reload."""

from __future__ import annotations

import os
from pathlib import Path

from peftserve.triton.stub_watch import StubWatch, is_stub_process, reload_through_triton, stub_pids

STUB = "/opt/tritonserver/backends/python/triton_python_backend_stub"


def _process(proc: Path, pid: int | str, *arguments: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in arguments) + b"\0")


def _stub(proc: Path, pid: int, model_py: str, server_pid: str) -> None:
    _process(proc, pid, STUB, model_py, "triton_python_backend_shm_region_1", "1048576", "1048576", server_pid, "x")


def test_stub_pids_finds_each_models_stubs_of_this_server_only(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _stub(proc, 11, "/models/peft_llm/1/model.py", "500")
    _stub(proc, 12, "/models/peft_llm_stream/1/model.py", "500")
    _stub(proc, 13, "/models/peft_llm_stream/2/model.py", "500")  # a version swap: both versions run
    _stub(proc, 14, "/other/peft_llm/1/model.py", "900")  # another server's
    _process(proc, 15, "/usr/bin/python3", "/models/peft_llm/1/model.py", "a", "b", "c", "500")  # not a stub
    _process(proc, "self", STUB, "/models/peft_llm_stream/1/model.py", "r", "1", "1", "500")
    (proc / "meminfo").write_text("")
    assert stub_pids("peft_llm", proc=proc) == {11}
    assert stub_pids("peft_llm_stream", proc=proc) == {12, 13}
    assert stub_pids("peft_llm", proc=proc, server_pid=b"900") == {14}
    assert stub_pids("ghost", proc=proc) == set()
    assert is_stub_process(proc)
    assert not is_stub_process(tmp_path / "nothing")


class FakeServer:
    def __init__(self) -> None:
        self.stubs: set[int] = {1}
        self.ready = True
        self.loads: list[str] = []

    def load(self, model: str) -> None:
        self.loads.append(model)
        self.stubs = {2}


def _watch(server: FakeServer, *, sees_stubs: bool = True) -> StubWatch:
    return StubWatch(
        "peft_llm",
        is_ready=lambda m: server.ready,
        reload=server.load,
        find_stubs=lambda m: server.stubs,
        sees_stubs=sees_stubs,
    )


def test_a_stub_gone_from_a_model_still_ready_is_reloaded_after_two_looks() -> None:
    server = FakeServer()
    watch = _watch(server)
    assert not watch.check()
    server.stubs = set()  # died; Triton still calls the model ready
    assert not watch.check() and server.loads == []  # one look could be a load in progress
    assert watch.check() and server.loads == ["peft_llm"]
    assert not watch.check() and server.loads == ["peft_llm"]  # the new stub is there


def test_a_stub_back_between_looks_or_a_model_unloaded_on_purpose_is_left_alone() -> None:
    server = FakeServer()
    watch = _watch(server)
    watch.check()
    server.stubs = set()
    watch.check()
    server.stubs = {3}  # a reload by someone else finished
    watch.check()
    server.stubs = set()
    assert not watch.check()  # the count of looks started again
    server.ready = False  # unloaded: not ready, no stub
    assert not watch.check() and not watch.check() and not watch.check()
    assert server.loads == []


def test_nothing_is_reloaded_where_this_process_is_no_stub() -> None:
    """Another launcher's command lines: stubs cannot be found, so healthy models must not be reloaded."""
    server = FakeServer()
    server.stubs = set()
    watch = _watch(server, sees_stubs=False)
    assert not any(watch.check() for _ in range(5))
    assert server.loads == []


def test_the_thread_keeps_watching_after_a_failed_reload() -> None:
    server = FakeServer()
    failures = []

    def failing_then_working(model: str) -> None:
        if not failures:
            failures.append(model)
            raise RuntimeError("load failed")
        server.load(model)

    watch = StubWatch(
        "peft_llm",
        is_ready=lambda m: server.ready,
        reload=failing_then_working,
        find_stubs=lambda m: server.stubs,
        sees_stubs=True,
        interval=0.01,
    ).start()
    try:
        server.stubs = set()
        for _ in range(500):
            if server.loads:
                break
            watch._stop.wait(0.01)
    finally:
        watch.stop()
    assert failures == ["peft_llm"] and server.loads == ["peft_llm"]


def test_a_reload_marks_every_version_of_the_model_changed_first(tmp_path: Path) -> None:
    """Triton 24.10 keeps a model's running (dead) instances unless a version's files changed."""
    model = tmp_path / "peft_llm"
    for name in ("1", "2", "adapters"):
        (model / name).mkdir(parents=True)
        os.utime(model / name, (1_000_000, 1_000_000))
    loads: list[tuple[str, list[bool]]] = []

    def load(name: str) -> None:
        loads.append((name, [(model / n).stat().st_mtime > 1_000_000 for n in ("1", "2", "adapters")]))

    reload = reload_through_triton(tmp_path, load)
    reload("peft_llm")
    assert loads == [("peft_llm", [True, True, False])]
    reload("ghost")  # nothing to touch: still asks Triton
    assert [name for name, _ in loads] == ["peft_llm", "ghost"]
