"""Reload a model of this server whose Python stub process died.

Triton 24.10 does not restart a Python model's stub process that crashed, and keeps reporting the model, and
the server, ready (measured: after a ``kill -9`` of ``peft_llm``'s stub, ``/v2/health/ready`` and the model's
ready endpoint said true while every request failed with "Stub process 'peft_llm_0_0' is not healthy", until
the model was loaded again, which took 1.9 s). Health checks that read readiness never notice, so each of
our two models watches the other: every few seconds it looks for the other's stub among this server's
processes (``/proc``, no call into Triton), and when there is none while Triton still calls that model
ready, twice in a row, it loads the model again through Triton (explicit model control, which every
peftserve launcher uses). A model unloaded on purpose is not ready, and is left alone.

One stub per model is what peftserve ships (``instance_group`` count 1); with more, a single dead instance
among live ones is not noticed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("peftserve.triton")

STUB_PROGRAM = b"triton_python_backend_stub"
_SERVER_PID_ARGUMENT = 5  # the stub's command line: program, model.py, shm region, sizes (2), server pid, ...


def stub_pids(model: str, *, proc: Path = Path("/proc"), server_pid: bytes | None = None) -> set[int]:
    """Process ids of the Python stubs serving ``model`` (any version) for this process's server.

    A stub's command line names its ``<repository>/<model>/<version>/model.py`` and its server's process id;
    ``server_pid`` defaults to the one in this process's own command line (this process is a stub too).
    """
    if server_pid is None:
        server_pid = _command_line(proc / "self")[_SERVER_PID_ARGUMENT]
    pids = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = _command_line(entry)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if (
            len(arguments) > _SERVER_PID_ARGUMENT
            and arguments[0].endswith(STUB_PROGRAM)
            and arguments[_SERVER_PID_ARGUMENT] == server_pid
            and Path(os.fsdecode(arguments[1])).parent.parent.name == model
        ):
            pids.add(int(entry.name))
    return pids


def is_stub_process(proc: Path = Path("/proc")) -> bool:
    """Whether this process's command line has the shape :func:`stub_pids` looks for (a Python model's stub)."""
    try:
        arguments = _command_line(proc / "self")
    except OSError:
        return False
    return len(arguments) > _SERVER_PID_ARGUMENT and arguments[0].endswith(STUB_PROGRAM)


def _command_line(process: Path) -> list[bytes]:
    return (process / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")


def reload_through_triton(repository: Path, load: Callable[[str], None]) -> Callable[[str], None]:
    """A ``reload`` for :class:`StubWatch`: mark the model's versions changed, then load it (``pb_utils.load_model``).

    Triton 24.10 loads an already loaded model again only if its files changed since, and keeps the running
    instances when only ``config.pbtxt`` changed: either way a dead stub stays dead (seen: a second death of
    the same model was "loaded again" in 0.2 ms, and stayed dead). Touching each version directory (its
    time, not its content) makes Triton load the version anew, with a new stub.
    """

    def reload(model: str) -> None:
        try:
            for version in (repository / model).iterdir():
                if version.name.isdigit() and version.is_dir():
                    os.utime(version)
        except OSError as exc:
            logger.warning("cannot mark %s changed (%s): Triton may keep its dead stub", model, exc)
        load(model)

    return reload


class StubWatch:
    """Checks every ``interval`` seconds, on a thread of its own, that ``model`` still has a stub process.

    ``find_stubs``, ``is_ready`` and ``reload`` take the model's name; in a Triton model they are
    :func:`stub_pids`, ``pb_utils.is_model_ready`` and ``pb_utils.load_model`` (called only once no stub is
    found, so a healthy server makes no call into Triton from here). ``on_death`` runs before the reload.
    """

    def __init__(
        self,
        model: str,
        *,
        is_ready: Callable[[str], bool],
        reload: Callable[[str], None],
        on_death: Callable[[str], None] | None = None,
        find_stubs: Callable[[str], set[int]] = stub_pids,
        sees_stubs: bool | None = None,
        interval: float = 5.0,
        misses_before_reload: int = 2,
    ) -> None:
        self.model = model
        self.is_ready = is_ready
        self.reload = reload
        self.on_death = on_death
        self.find_stubs = find_stubs
        # Where this process is no stub by that shape (another launcher), no stub would be found either:
        # the watch must then never reload anything.
        self.sees_stubs = is_stub_process() if sees_stubs is None else sees_stubs
        self.interval = interval
        self.misses_before_reload = misses_before_reload
        self._misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stub-watch-{model}", daemon=True)

    def start(self) -> StubWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> bool:
        """One look; True when it reloaded the model. Two looks in a row must find it dead (a load or an
        unload in progress has moments without a stub)."""
        if not self.sees_stubs or self.find_stubs(self.model) or not self.is_ready(self.model):
            self._misses = 0
            return False
        self._misses += 1
        if self._misses < self.misses_before_reload:
            return False
        self._misses = 0
        logger.error("%s has no stub process but Triton calls it ready (its stub died): loading it again", self.model)
        if self.on_death is not None:
            self.on_death(self.model)
        self.reload(self.model)
        logger.info("%s loaded again", self.model)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watch outlives a failed look or a failed load, and tries again
                logger.exception("watching the stub of %s failed", self.model)


def watch_through_triton(model: str, model_directory: str, on_death: Callable[[str], None] | None = None) -> StubWatch:
    """A started :class:`StubWatch` of ``model`` for a Triton model whose own directory is ``model_directory``
    (``args["model_repository"]``: ``model`` lives beside it)."""
    import triton_python_backend_utils as pb_utils  # here: exists only inside Triton's stub

    reload = reload_through_triton(Path(model_directory).parent, pb_utils.load_model)
    return StubWatch(model, is_ready=pb_utils.is_model_ready, reload=reload, on_death=on_death).start()
