"""GPU start-up check: build the image, start Triton with compose, one request per demo adapter, report.

``make gpu-startup-check`` (or ``.venv/bin/python -m tools.gpu_startup_check``) on a GPU host with Docker,
the NVIDIA container toolkit and the demo assets (``make demo``):

1. builds the image (``docker compose build triton``) and reports how long it took;
2. starts the ``triton`` service and waits until ``/v2/health/ready`` answers (reports the seconds);
3. sends one request per demo adapter and one to the base model, each checked to be served by that adapter;
4. prints the device and dtype the engine runs on (the device from the model's "loading ... on cuda:N" log
   line, the dtype from the log when the engine reports it, else the configured dtype and what ``auto``
   means on a GPU), and what torch inside the container sees;
5. restarts the service and reports how long until it is ready again (``--no-restart`` skips it);
6. stops the stack (``--keep-running`` leaves it up).

A management key is needed to start compose: ``PEFTSERVE_ADMIN_KEY`` from the environment, or one generated
for this run (printed once, not stored). Exit status: 0 all checked, 1 a step failed, 2 cannot run here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "model_repository" / "peft_llm"
PROMPT = "the cat looks at"
SERVICE = "triton"
TORCH_PROBE = (
    "import torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
    "'cuda_available': torch.cuda.is_available(), "
    "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
)


class CheckFailed(RuntimeError):
    """A step failed; the message says which and carries the evidence (log tail, answer)."""


class CannotRun(RuntimeError):
    """This host cannot run the check (no Docker, no demo assets)."""


@dataclass(frozen=True)
class Placement:
    """Where the engine runs, as the server's log says."""

    device: str
    dtype: str | None  # None while the engine does not log it


def engine_placement(log_text: str) -> Placement:
    """The device (and dtype, if logged) from peft_llm_stream's "loading <model> on <device>" line, or the
    "loaded <model> on <device> as <dtype>" line it logs once the model is in memory."""
    pattern = r"(?:loading|loaded) \S+ on (\S+?)(?:\s+as\s+(?:torch\.)?(\w+))?\s*$"
    match = next(reversed(list(re.finditer(pattern, log_text, re.M))), None)
    if match is None:
        raise CheckFailed("the server log has no 'loading <model> on <device>' line from peft_llm_stream")
    return Placement(device=match[1], dtype=match[2])


def configured_dtype(model_dir: Path = MODEL_DIR) -> str:
    """``dtype`` from config.pbtxt, explained for ``auto`` (the engine: checkpoint dtype on a GPU)."""
    match = re.search(r'key: "dtype", value: \{ string_value: "(\w+)" \}', (model_dir / "config.pbtxt").read_text())
    dtype = match[1] if match else "auto"
    if dtype != "auto":
        return dtype
    checkpoint = json.loads((model_dir / "base_model" / "config.json").read_text())
    return f"auto (on a GPU: the checkpoint's dtype, {checkpoint.get('dtype') or checkpoint.get('torch_dtype')})"


def probe_adapters(http_url: str, adapter_ids: list[str], headers: dict[str, str]) -> list[tuple[str, str, str]]:
    """One request per adapter (and the base model, ""); each must be served by the adapter it named."""
    import tritonclient.http as httpclient

    from tools.client import build_inputs

    client = httpclient.InferenceServerClient(http_url, network_timeout=300)
    answers = []
    for adapter_id in ["", *adapter_ids]:
        result = client.infer("peft_llm", build_inputs(httpclient, PROMPT, adapter_id, 24), headers=headers)
        version = result.as_numpy("adapter_version")[0, 0].decode()
        text = result.as_numpy("text_output")[0, 0].decode()
        if version.partition("@")[0] != adapter_id:
            raise CheckFailed(f"a request for {adapter_id or 'the base model'!r} was served by {version!r}")
        answers.append((adapter_id, version, text))
    return answers


def wait_ready(http_url: str, *, timeout: float, alive: Callable[[], bool]) -> float:
    """Seconds until ``/v2/health/ready`` answers 200; CheckFailed when the server dies or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if not alive():
            raise CheckFailed("the triton container stopped before it was ready")
        time.sleep(1)
    raise CheckFailed(f"not ready within {timeout:.0f} s")


class Compose:
    """``docker compose`` on this checkout's compose file, with the keys in the environment."""

    def __init__(self, compose_file: Path, environment: dict[str, str]) -> None:
        self.base = ["docker", "compose", "-f", str(compose_file), "--project-directory", str(compose_file.parent)]
        self.environment = environment

    def run(self, *args: str, capture: bool = False) -> str:
        done = subprocess.run([*self.base, *args], env=self.environment, text=True, capture_output=capture, check=False)
        if done.returncode != 0:
            raise CheckFailed(f"docker compose {' '.join(args)} failed (status {done.returncode}) {done.stderr or ''}")
        return done.stdout or ""

    def running(self) -> bool:
        return bool(self.run("ps", "--status", "running", "-q", SERVICE, capture=True).strip())

    def logs(self, tail: int | None = None) -> str:
        return self.run("logs", "--no-color", *(["--tail", str(tail)] if tail else []), SERVICE, capture=True)


def preflight(compose_file: Path) -> None:
    if shutil.which("docker") is None:
        raise CannotRun("docker not found: this check runs on a GPU host with Docker and the NVIDIA container toolkit")
    for probe, problem in [
        (["docker", "compose", "version"], "the docker compose plugin is missing"),
        (["docker", "info"], "the Docker daemon is not reachable"),
    ]:
        if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            raise CannotRun(f"{problem} (`{' '.join(probe)}` failed)")
    if not compose_file.is_file():
        raise CannotRun(f"no compose file at {compose_file}")
    if not (MODEL_DIR / "base_model" / "config.json").is_file():
        raise CannotRun("the demo model is missing: run `make demo` first (the compose stack serves model_repository/)")


def management_key() -> tuple[str, bool]:
    """PEFTSERVE_ADMIN_KEY, or a new one for this run (True: generated)."""
    key = os.environ.get("PEFTSERVE_ADMIN_KEY")
    return (key, False) if key else (secrets.token_hex(32), True)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.gpu_startup_check`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose-file", type=Path, default=REPO_ROOT / "docker-compose.yml")
    parser.add_argument("--url", default="127.0.0.1:8000", help="the triton service's HTTP port on this host")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for readiness")
    parser.add_argument("--no-build", action="store_true", help="use the image already built")
    parser.add_argument("--no-restart", action="store_true", help="skip the restart measurement")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards")
    return parser


def run(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    preflight(args.compose_file)
    key, generated = management_key()
    if generated:
        print(f"PEFTSERVE_ADMIN_KEY was not set: using {key} for this run (not stored anywhere)")
    compose = Compose(args.compose_file, {**os.environ, "PEFTSERVE_ADMIN_KEY": key})
    headers = {"x-api-key": os.environ["PEFTSERVE_INFERENCE_KEY"]} if os.environ.get("PEFTSERVE_INFERENCE_KEY") else {}
    if not args.no_build:
        started = time.monotonic()
        compose.run("build", SERVICE)
        print(f"image built in {time.monotonic() - started:.0f} s")
    try:
        compose.run("up", "-d", SERVICE)
        try:
            seconds = wait_ready(args.url, timeout=args.timeout, alive=compose.running)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}\n{compose.logs(tail=80)}") from exc
        print(f"ready {seconds:.0f} s after start")
        from peftserve.adapter_repository import AdapterRepository

        for _, version, text in probe_adapters(
            args.url, AdapterRepository(MODEL_DIR / "adapters").adapter_ids(), headers
        ):
            print(f"  {version or 'base model':<14} -> {text!r}")
        placement = engine_placement(compose.logs())
        probe = json.loads(
            compose.run("exec", "-T", SERVICE, "python", "-c", f"import json; {TORCH_PROBE}", capture=True)
        )
        print(f"engine device: {placement.device}")
        print(f"engine dtype:  {placement.dtype or 'not logged by the engine; configured ' + configured_dtype()}")
        print(f"torch in the image: {probe['torch']} (CUDA {probe['cuda']}), GPU seen: {probe['gpu']}")
        if not placement.device.startswith("cuda"):
            raise CheckFailed(f"the engine runs on {placement.device}, not on the GPU")
        if not args.no_restart:
            started = time.monotonic()
            compose.run("restart", SERVICE)
            seconds = wait_ready(args.url, timeout=args.timeout, alive=compose.running)
            print(f"restart: ready again {time.monotonic() - started:.0f} s after `docker compose restart`")
    finally:
        if not args.keep_running:
            compose.run("down")


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except CannotRun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("GPU start-up check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
