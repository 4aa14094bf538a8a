"""``make serve``: start tritonserver on the model repository, show per-request adapters, serve until Ctrl-C.

Ports come from ``HTTP_PORT``, ``GRPC_PORT`` and ``METRICS_PORT`` (defaults 8000, 8001, 8002). The server
listens on loopback only (``--bind`` / ``BIND_ADDRESS``, default 127.0.0.1): it runs with explicit model
control, and Triton's model-load API accepts model files, so whoever reaches it can run code. Any other
address needs a management key in the deployment config (``credentials.management``); otherwise serve
refuses to start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
import time
from pathlib import Path

import tritonclient.http as httpclient

from peftserve.adapter_repository import AdapterRepository
from tools.client import build_inputs
from tools.deployment import DEFAULT_PATH, Deployment, DeploymentError, load_deployment
from tools.triton_server import TritonServer, TritonStartError, stop_on_signals

DEMO_PROMPT = "the cat looks at"


def first_request_help(http_port: int, grpc_port: int, metrics_port: int) -> str:
    return f"""
Send a first request (adapter chosen per request; omit adapter_id for the base model):

  curl -s -X POST localhost:{http_port}/v2/models/peft_llm/generate \\
       -d '{{"text_input": "{DEMO_PROMPT}", "adapter_id": "pirate", "max_tokens": 24}}'

  .venv/bin/python -m tools.client --url localhost:{http_port} --adapter robot "{DEMO_PROMPT}"
  .venv/bin/python -m tools.client --url localhost:{grpc_port} --protocol grpc --adapter chef "{DEMO_PROMPT}"

Stream tokens as they are generated (server-sent events; gRPC streaming works too, see docs/streaming.md):

  curl -sN -X POST localhost:{http_port}/v2/models/peft_llm_stream/generate_stream \\
       -d '{{"text_input": "{DEMO_PROMPT}", "adapter_id": "knight", "max_tokens": 24, "stream": true}}'

Metrics: curl -s localhost:{metrics_port}/metrics    Stop: Ctrl-C
"""


def show_adapters(
    server: TritonServer, adapter_ids: list[str], headers: dict[str, str], prompt: str = DEMO_PROMPT, chat: bool = False
) -> None:
    """Send the same prompt (as a chat message with ``chat``) once per adapter and print what each answered."""
    client = httpclient.InferenceServerClient(server.http_url)
    print(f"\n{'chat message' if chat else 'prompt'}: {prompt!r}")
    messages = [{"role": "user", "content": prompt}] if chat else None
    for adapter_id in ["", *adapter_ids]:
        inputs = build_inputs(
            httpclient, "" if chat else prompt, adapter_id, always_send_adapter=True, messages=messages
        )
        result = client.infer("peft_llm", inputs, headers=headers)
        answer = result.as_numpy("text_output")[0, 0].decode()
        served_by = result.as_numpy("adapter_version")[0, 0].decode() or "base model"
        print(f"  {served_by:<12} -> {answer!r}")


def check_bind_address(address: str, deployment: Deployment) -> str:
    """What the server will be reachable from; raises DeploymentError for an address beyond loopback without a
    management key (model control there would let any host that reaches the port load code)."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        raise DeploymentError(f"--bind {address!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0)") from None
    if loopback:
        return f"loopback only ({address}): other hosts cannot connect"
    management = deployment.credentials.management
    if management is None or not management.headers():  # an optional key left unset guards nothing
        raise DeploymentError(
            f"refusing to listen on {address} without a management key: set credentials.management in "
            f"{deployment.path} (header and environment variable, e.g. PEFTSERVE_ADMIN_KEY; see docs/security.md), "
            "or keep the default loopback address"
        )
    return f"{address}: {', '.join(management.apis)} need the {management.header} header"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="what each adapter is asked at start-up")
    parser.add_argument("--chat", action="store_true", help="ask it as a chat message (the model's chat template)")
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="deployment config: API keys to require")
    parser.add_argument(
        "--bind",
        default=os.environ.get("BIND_ADDRESS", "127.0.0.1"),
        help="address to listen on (env BIND_ADDRESS; default 127.0.0.1); beyond loopback a management key is required",
    )
    args = parser.parse_args(argv)
    try:
        deployment = load_deployment(args.config) if args.config.exists() else Deployment()
        reachable = check_bind_address(args.bind, deployment)
        restricted = deployment.credentials.triton_args()
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ports = {
        name: int(os.environ.get(name.upper(), default))
        for name, default in [("http_port", 8000), ("grpc_port", 8001), ("metrics_port", 8002)]
    }
    log_path = Path(tempfile.gettempdir()) / f"peftserve-triton-{ports['http_port']}.log"
    # Explicit model control: `python -m tools model-swap` loads new model versions while the old one serves.
    explicit = ("--model-control-mode=explicit", "--load-model=*")
    server = TritonServer(
        args.repository, log_path=log_path, address=args.bind, extra_args=(*explicit, *restricted), **ports
    )
    print(
        f"starting tritonserver on {args.repository} (HTTP {ports['http_port']}, gRPC {ports['grpc_port']}, "
        f"metrics {ports['metrics_port']}); listening on {reachable}; log: {log_path}"
    )
    stop = stop_on_signals()
    try:
        server.start()
        adapter_ids = AdapterRepository(args.repository / "peft_llm" / "adapters").adapter_ids()
        show_adapters(server, adapter_ids, deployment.inference_headers(), args.prompt, args.chat)
        print(first_request_help(**ports))
        while not stop.is_set() and server.process.poll() is None:
            time.sleep(0.5)
        if not stop.is_set():
            print(
                f"error: tritonserver exited with status {server.process.returncode}\n{server.log_tail()}",
                file=sys.stderr,
            )
    except TritonStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping tritonserver ...")
        server.stop()
    return 0 if stop.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main())
