"""Start and stop a real ``tritonserver`` from the ``nvidia-pytriton`` wheel, without Docker.

Used by ``make serve`` and by the integration tests. Facts this relies on (measured on this project's machines):
the Python backend's stub must sit next to ``libtriton_python.so``; the stub is an embedded interpreter
that ignores ``PYTHONPATH`` and takes its ``sys.prefix`` from the first ``python3`` on ``PATH``, so the
virtual environment's ``bin`` goes first on ``PATH`` and the project is installed into that environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytriton


class TritonStartError(RuntimeError):
    """The server exited or did not become ready in time; the message carries its log tail."""


@dataclass(frozen=True)
class TritonInstall:
    server: Path
    backends: Path
    libraries: Path

    @classmethod
    def find(cls) -> TritonInstall:
        package = Path(pytriton.__file__).parent
        install = cls(
            server=package / "tritonserver" / "bin" / "tritonserver",
            backends=package / "tritonserver" / "backends",
            libraries=package.parent / "nvidia_pytriton.libs",
        )
        if not install.server.is_file():
            raise TritonStartError(f"tritonserver not found at {install.server}; is nvidia-pytriton installed?")
        install.prepare_python_backend()
        return install

    def prepare_python_backend(self) -> None:
        """Put the stub for this interpreter's Python version next to the backend library (idempotent)."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.backends.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
        target = self.backends / "python" / "triton_python_backend_stub"
        if not target.exists() or target.stat().st_size != stub.stat().st_size:
            shutil.copy2(stub, target)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """One ``tritonserver`` process; a context manager that always stops it.

    It listens on ``address`` (HTTP, gRPC and metrics): loopback unless the caller opens it deliberately.
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        log_path: Path | None = None,
        address: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_path = log_path
        self.address = address
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def host(self) -> str:
        """Where clients on this host connect: loopback when the server listens on every interface."""
        if self.address in ("0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{self.address}]" if ":" in self.address else self.address

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, install: TritonInstall) -> list[str]:
        return [
            str(install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backends}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def start(self, *, timeout: float = 180.0) -> None:
        install = TritonInstall.find()
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.libraries), env.get("LD_LIBRARY_PATH")]))
        output = subprocess.DEVNULL
        if self.log_path is not None:
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            output = self._log_file
        self.process = subprocess.Popen(
            self.command(install), env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with status {self.process.returncode}\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TritonStartError(f"tritonserver not ready within {timeout:.0f} s\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log kept)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, *, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL for the whole process group (the model stubs too) if it lingers."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:  # model stubs outlive a server that crashed: they are in its group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def perf_analyzer_env() -> dict[str, str]:
    """Environment for the tritonclient wheel's ``perf_analyzer``: it links ``libcudart.so.12`` even on CPU."""
    import nvidia.cuda_runtime

    runtime_lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(runtime_lib), env.get("LD_LIBRARY_PATH")]))
    return env


def perf_analyzer_path() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, for commands that serve until asked to stop."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop
