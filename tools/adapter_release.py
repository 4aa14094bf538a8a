"""Publish, watch and roll back adapter versions in the repository the servers watch.

Publishing never exposes a half-written version: files are copied into a ``.staging-*`` directory beside
the versions (servers ignore names that are not integers), validated there, and renamed into place, an
atomic step on one file system. Version numbers are never reused, so ``pirate@3`` names one content for
good. Retired versions (rolled back or rejected) move into ``<id>/.retired/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from peftserve.adapter_repository import AdapterRepository, content_digest, recorded_digest, validate_adapter_id
from peftserve.errors import PeftServeError
from peftserve.swap_history import HistoryEvent, SwapHistory
from tools.deployment import Deployment, ReleaseError, Server
from tools.server_probe import StatusUnavailable, adapter_status, probe_adapter
from validation import Level, ValidationOptions, validate_adapter

RETIRED_DIR = ".retired"


@dataclass
class ReleaseResult:
    adapter_id: str
    version: int
    outcome: str  # switched, rolled_back
    sha256: str = ""
    seconds: float = 0.0
    servers: dict[str, str] = field(default_factory=dict)  # server name -> what it reported
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def publish(
    deployment: Deployment,
    adapter_id: str,
    source: Path,
    *,
    force: bool = False,
    wait: bool = True,
    timeout: float | None = None,
) -> ReleaseResult:
    """Stage, validate and publish ``source`` as the next version of ``adapter_id``; with ``wait``, watch
    every server switch to it, and roll it back if any server rejects it."""
    started = time.monotonic()
    try:
        validate_adapter_id(adapter_id)
    except PeftServeError as exc:
        raise ReleaseError(str(exc)) from exc
    history = SwapHistory(deployment.adapter_repository)
    adapter_dir = deployment.adapter_repository / adapter_id
    adapter_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=adapter_dir))
    try:
        _copy_regular_files(Path(source), staging)
        digest = content_digest(staging)
        _validation_gate(deployment, adapter_id, staging, digest, history, force=force)
        version = _rename_into_place(staging, adapter_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    history.record(HistoryEvent("published", adapter_id, version, "ok", digest, f"from {source}", "tools"))
    result = ReleaseResult(adapter_id, version, "published", digest)
    if wait:
        _wait_for_servers(deployment, result, timeout, history)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def rollback(
    deployment: Deployment, adapter_id: str, *, to: int | None = None, wait: bool = True, timeout: float | None = None
) -> ReleaseResult:
    """Retire every version above ``to`` (default: the one before the newest) so that ``to`` serves."""
    started = time.monotonic()
    versions = AdapterRepository(deployment.adapter_repository).versions(adapter_id)
    numbers = [v.version for v in versions]
    if len(numbers) < 2 and to is None:
        raise ReleaseError(f"adapter {adapter_id!r} has {len(numbers)} version(s) on disk: nothing to roll back to")
    target = numbers[-2] if to is None else to
    if target not in numbers:
        raise ReleaseError(f"adapter {adapter_id!r} has no version {target}; versions on disk: {numbers}")
    history = SwapHistory(deployment.adapter_repository)
    for version in [v for v in versions if v.version > target]:
        digest = recorded_digest(version.path)
        retire_directory(version.path, f"{version.version}-rolled-back")
        history.record(HistoryEvent("retired", adapter_id, version.version, "ok", digest, "rollback", "tools"))
    kept = next(v for v in versions if v.version == target)
    result = ReleaseResult(adapter_id, target, "rolled_back", recorded_digest(kept.path))
    history.record(HistoryEvent("rolled_back", adapter_id, target, "ok", result.sha256, "on demand", "tools"))
    if wait:
        _wait_for_servers(deployment, result, timeout, history)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _copy_regular_files(source: Path, target: Path) -> None:
    """Copy the adapter's files; links and special files are refused (they could point anywhere)."""
    if not source.is_dir():
        raise ReleaseError(f"{source} is not a directory holding an adapter")
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ReleaseError(f"{path} is a link or special file; an adapter version holds regular files only")
        if path.is_dir():
            (target / relative).mkdir(exist_ok=True)
        else:
            shutil.copy2(path, target / relative)


def _validation_gate(
    deployment: Deployment, adapter_id: str, staging: Path, digest: str, history: SwapHistory, *, force: bool
) -> None:
    config = deployment.serve_config
    report = validate_adapter(
        staging, config.base_model, ValidationOptions(max_adapter_memory_mb=config.max_adapter_memory_mb)
    )
    level = report.compatibility_level
    if level is Level.FULL or (level is Level.PARTIAL and force):
        return
    reason = "incompatible" if level is Level.INCOMPATIBLE else "only partially compatible (use --force to publish)"
    findings = "; ".join(f"{issue.severity}: {issue.message}" for issue in report.issues)
    history.record(HistoryEvent("published", adapter_id, None, "refused", digest, f"{reason}: {findings}", "tools"))
    raise ReleaseError(f"validation refused the new version of {adapter_id!r}: {reason}\n{report.render()}")


def _rename_into_place(staging: Path, adapter_dir: Path) -> int:
    while True:
        version = _next_version(adapter_dir)
        try:
            os.rename(staging, adapter_dir / str(version))  # fails if another publisher took the number
            return version
        except OSError:
            if not (adapter_dir / str(version)).exists():
                raise


def _next_version(adapter_dir: Path) -> int:
    """One more than any version ever used, retired ones included."""
    names = [p.name for p in adapter_dir.iterdir()]
    retired = adapter_dir / RETIRED_DIR
    if retired.is_dir():
        names += [p.name.split("-")[0] for p in retired.iterdir()]
    return 1 + max((int(name) for name in names if name.isdigit()), default=0)


def retire_directory(path: Path, name: str) -> Path:
    """Move a version directory out of serving into ``.retired/<name>-<time>`` beside it (kept for audit)."""
    retired = path.parent / RETIRED_DIR
    retired.mkdir(exist_ok=True)
    target = retired / f"{name}-{int(time.time())}"
    os.rename(path, target)
    return target


def _wait_for_servers(
    deployment: Deployment, result: ReleaseResult, timeout: float | None, history: SwapHistory
) -> None:
    """Ask every server for its adapter status until it serves ``result``'s version or reports it rejected;
    a rejection rolls the version back."""
    label = f"{result.adapter_id}@{result.version}"
    deadline = time.monotonic() + (timeout or deployment.limits.swap_timeout_seconds)
    headers = deployment.inference_headers()
    pending = {server.name: server for server in deployment.servers}
    with tqdm(total=len(pending), desc=f"waiting for {label}", unit="server", leave=False) as progress:
        while pending:
            for name, server in list(pending.items()):
                result.servers[name] = _server_outcome(server, deployment.model, result, headers)
                if not result.servers[name].startswith("waiting"):
                    del pending[name]
                    progress.update()
            if pending and time.monotonic() > deadline:
                for name in pending:
                    result.servers[name] = f"timed out, {result.servers[name]}"
                break
            time.sleep(0.2)
    if all(state == "serving" for state in result.servers.values()):
        if result.outcome == "published":
            result.outcome = "switched"
        return
    if result.outcome != "published":
        problems = ", ".join(f"{name}: {state}" for name, state in result.servers.items())
        raise ReleaseError(f"not every server serves {label} ({problems})")
    _roll_back_rejected(deployment, result, history)


def _server_outcome(server: Server, model: str, result: ReleaseResult, headers: dict[str, str]) -> str:
    """``serving``, ``rejected: <the server's reason>``, or ``waiting...`` saying what the server does now."""
    try:
        entry = adapter_status(server, model, headers).adapter(result.adapter_id)
    except StatusUnavailable as exc:
        return f"waiting for an answer ({exc})"
    if entry is not None and entry.serving_version == result.version:
        return "serving"
    if entry is not None and entry.rejected_version == result.version:
        return f"rejected: {entry.rejection_reason}"
    if entry is None or entry.serving_version is None:
        # Nothing of this adapter serves there (never requested, its first load failed, or every version was
        # removed), so the server watches no versions of it: its next request loads the newest version, with
        # the same checks, and the status then tells how that went.
        probe_adapter(server, model, result.adapter_id, headers)
        return "waiting: loading on its first request"
    return f"waiting: {entry.state}, serving version {entry.serving_version}, loading {entry.loading_version}"


def _roll_back_rejected(deployment: Deployment, result: ReleaseResult, history: SwapHistory) -> None:
    path = deployment.adapter_repository / result.adapter_id / str(result.version)
    if path.exists():
        retire_directory(path, f"{result.version}-rejected")
    problems = "; ".join(f"{name}: {state}" for name, state in result.servers.items() if state != "serving")
    history.record(
        HistoryEvent("rolled_back", result.adapter_id, result.version, "failed", result.sha256, problems, "tools")
    )
    result.outcome = "rolled_back"
    result.detail = f"{result.adapter_id}@{result.version} was not accepted ({problems}); it was retired"
