"""``python -m tools``: the operator CLI for a peftserve deployment.

Every subcommand reads the deployment config (``--config``, default ``serving_config.yaml``); ``--json``
prints machine-readable output. Exit status: 0 done, 1 the operation failed or was refused (rolled back,
not ready), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from peftserve.adapter_repository import AdapterRepository
from peftserve.adapter_status import AdapterStatus, ServerStatus
from peftserve.errors import PeftServeError
from peftserve.swap_history import SwapHistory
from tools.deployment import DEFAULT_PATH, Deployment, DeploymentError, ReleaseError, load_deployment
from tools.metrics_summary import summarize_metrics
from tools.server_probe import StatusUnavailable, adapter_status, scrape_metrics, server_health


class CommandFailed(Exception):
    """The command ran but its outcome is a failure; carries what to print."""

    def __init__(self, output: object) -> None:
        super().__init__(str(output))
        self.output = output


def cmd_serve(deployment: Deployment, args: argparse.Namespace) -> object:
    from tools import serve

    first = deployment.servers[0]  # ports from the config unless the environment sets them (make serve)
    for variable, address in [("HTTP_PORT", first.http), ("GRPC_PORT", first.grpc), ("METRICS_PORT", first.metrics)]:
        os.environ.setdefault(variable, address.rpartition(":")[2])
    status = serve.main(["--repository", str(deployment.model_repository), "--config", str(args.config)])
    if status:
        raise CommandFailed({"serve": "exited", "status": status})
    return {"serve": "stopped"}


def cmd_health(deployment: Deployment, args: argparse.Namespace) -> object:
    headers = deployment.inference_headers()
    report = [server_health(server, deployment.model, headers) for server in deployment.servers]
    if not all(entry.get("ready") and entry.get("model_ready") for entry in report):
        raise CommandFailed(report)
    return report


def cmd_adapters(deployment: Deployment, args: argparse.Namespace) -> object:
    """Versions on disk per adapter, and what every server's status request says of it."""
    repository = AdapterRepository(deployment.adapter_repository)
    statuses = _statuses(deployment)
    adapter_ids = set(repository.adapter_ids())
    adapter_ids.update(entry.adapter for status in statuses.values() for entry in status.adapters)
    rows = []
    for adapter_id in sorted(adapter_ids):
        row: dict[str, object] = {
            "adapter": adapter_id,
            "versions": [v.version for v in repository.versions(adapter_id)],
        }
        for name, status in statuses.items():
            entry = status.adapter(adapter_id)
            row[name] = {"state": "not loaded", "serving": None, "loaded_bytes": 0} if entry is None else _cell(entry)
        rows.append(row)
    return rows


def _cell(entry: AdapterStatus) -> dict[str, object]:
    cell: dict[str, object] = {
        "state": entry.state,
        "serving": entry.serving_version,
        "loaded_bytes": entry.loaded_bytes,
    }
    if entry.loading_version is not None:
        cell["loading"] = entry.loading_version
    if entry.rejected_version is not None:
        cell["rejected"] = {"version": entry.rejected_version, "reason": entry.rejection_reason}
    return cell


def cmd_status(deployment: Deployment, args: argparse.Namespace) -> object:
    """Each server's status document as it answered the status request; fails if a server did not answer."""
    args.json = True  # the documents are JSON: shown as JSON, not as the key=value lines of other commands
    statuses = _statuses(deployment)
    output = {name: asdict(status) for name, status in statuses.items()}
    if len(statuses) < len(deployment.servers):
        raise CommandFailed(output)
    return output


def _statuses(deployment: Deployment) -> dict[str, ServerStatus]:
    """The status document of every server that answers; a warning line for each one that does not."""
    headers = deployment.inference_headers()
    statuses = {}
    for server in deployment.servers:
        try:
            statuses[server.name] = adapter_status(server, deployment.model, headers)
        except StatusUnavailable as exc:
            print(f"warning: no adapter status from {exc}", file=sys.stderr)
    return statuses


def cmd_validate(deployment: Deployment, args: argparse.Namespace) -> object:
    from validation.__main__ import main as validation_main

    argv = [str(args.adapter_dir), "--base-model", deployment.serve_config.base_model]
    argv += ["--serving-config", str(deployment.model_dir / "config.pbtxt")]
    argv += ["--json"] if args.json else []
    argv += ["--load"] if args.load else []
    status = validation_main(argv)
    if status:
        raise CommandFailed(None)
    return None


def cmd_publish(deployment: Deployment, args: argparse.Namespace) -> object:
    from tools import adapter_release  # imported when needed: validation pulls in torch (seconds)

    result = adapter_release.publish(
        deployment, args.adapter_id, args.source, force=args.force, wait=not args.no_wait, timeout=args.timeout
    )
    if result.outcome == "rolled_back":
        raise CommandFailed(result.to_dict())
    return result.to_dict()


def cmd_rollback(deployment: Deployment, args: argparse.Namespace) -> object:
    from tools import adapter_release

    return adapter_release.rollback(deployment, args.adapter_id, to=args.to, timeout=args.timeout).to_dict()


def cmd_history(deployment: Deployment, args: argparse.Namespace) -> object:
    events = SwapHistory(deployment.adapter_repository).read(adapter=args.adapter, limit=args.limit)
    return [
        {**vars(event), "time": datetime.fromtimestamp(event.time, UTC).isoformat(timespec="seconds")}
        for event in events
    ]


def cmd_metrics(deployment: Deployment, args: argparse.Namespace) -> object:
    return {server.name: summarize_metrics(scrape_metrics(server), deployment.model) for server in deployment.servers}


def cmd_model_swap(deployment: Deployment, args: argparse.Namespace) -> object:
    from tools import model_release

    result = model_release.swap_model(deployment, source=args.source, timeout=args.timeout)
    if result.outcome != "loaded":
        raise CommandFailed(result.to_dict())
    return result.to_dict()


def cmd_model_rollback(deployment: Deployment, args: argparse.Namespace) -> object:
    from tools import model_release

    return model_release.rollback_model(deployment, timeout=args.timeout).to_dict()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools", description="The operator CLI for a peftserve deployment.")
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="deployment config (YAML)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable, text: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, aliases=list(aliases))
        sub.set_defaults(handler=handler)
        return sub

    add("serve", cmd_serve, "start tritonserver on the deployment's repository (make serve)")
    add("health", cmd_health, "readiness of every server and of the model")
    add("adapters", cmd_adapters, "adapter versions on disk, and each server's state of every adapter")
    add("status", cmd_status, "each server's adapter status document (the status request)")
    validate = add("validate", cmd_validate, "validate an adapter directory against the deployment's base model")
    validate.add_argument("adapter_dir", type=Path)
    validate.add_argument("--load", action="store_true", help="really load it and run the smoke check")
    publish = add("publish", cmd_publish, "publish a new adapter version and watch it go live", ("hot-swap",))
    publish.add_argument("adapter_id")
    publish.add_argument("source", type=Path, help="directory with adapter_config.json and the weights")
    publish.add_argument("--force", action="store_true", help="publish a version that validation rates partial")
    publish.add_argument("--no-wait", action="store_true", help="return once the version is in the repository")
    publish.add_argument("--timeout", type=float, help="seconds to wait for every server (default: config)")
    rollback = add("rollback", cmd_rollback, "serve an adapter's previous version again")
    rollback.add_argument("adapter_id")
    rollback.add_argument("--to", type=int, help="version to go back to (default: the one before the newest)")
    rollback.add_argument("--timeout", type=float)
    history = add("history", cmd_history, "publishes, switches, rejections and rollbacks, oldest first")
    history.add_argument("--adapter")
    history.add_argument("--limit", type=int, default=50)
    add("metrics", cmd_metrics, "a readable summary of each server's peftserve metrics")
    model_swap = add("model-swap", cmd_model_swap, "load a new model version (base model or code) while the old serves")
    model_swap.add_argument("--source", type=Path, help="new version directory (default: copy of the newest)")
    model_swap.add_argument("--timeout", type=float)
    model_rollback = add("model-rollback", cmd_model_rollback, "retire the newest model version, load the previous")
    model_rollback.add_argument("--timeout", type=float)
    return parser


def render(output: object) -> str:
    """Human-readable text: tables as aligned key=value lines, nested parts as compact JSON."""
    if output is None:
        return ""
    if isinstance(output, dict):
        return "\n".join(f"{key:<14} {_compact(value)}" for key, value in output.items())
    if isinstance(output, list):
        return "\n".join("  ".join(f"{k}={_compact(v)}" for k, v in row.items()) for row in output) or "(none)"
    return str(output)


def _compact(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")  # library notices (PEFT renames, deprecations) would bury the output
    try:
        deployment = load_deployment(args.config)
        output, status = args.handler(deployment, args), 0
    except (DeploymentError, PeftServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CommandFailed as failed:
        output, status = failed.output, 1
    if output is not None:
        print(json.dumps(output, indent=2, default=str) if args.json else render(output))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
