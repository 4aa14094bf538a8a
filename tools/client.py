"""Send one completion request to peft_llm over HTTP or gRPC with ``tritonclient``.

``python -m tools.client [--url HOST:PORT] [--protocol http|grpc] [--adapter ID] [--max-tokens N]
[--stop S] [--header NAME=VALUE] PROMPT``
prints the generated text and which adapter version served it; ``--json`` prints all outputs as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def build_inputs(
    module,
    prompt: str | bytes,
    adapter_id: str = "",
    max_tokens: int | None = None,
    *,
    always_send_adapter: bool = False,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
) -> list:
    """InferInput list (``module``: tritonclient.http or .grpc) for one prompt; optional inputs are sent when set.

    ``always_send_adapter`` sends ``adapter_id`` even when empty (the base model): Triton's dynamic batcher
    only batches requests that carry the same set of inputs.
    """
    raw = prompt if isinstance(prompt, bytes) else prompt.encode()
    values = [("text_input", np.array([[raw]], dtype=np.object_), "BYTES")]
    if adapter_id or always_send_adapter:
        values.append(("adapter_id", np.array([[adapter_id.encode()]], dtype=np.object_), "BYTES"))
    if max_tokens is not None:
        values.append(("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"))
    if ignore_eos:
        values.append(("ignore_eos", np.array([[True]], dtype=bool), "BOOL"))
    if stop:
        values.append(("stop", np.array([[s.encode() for s in stop]], dtype=np.object_), "BYTES"))
    inputs = []
    for name, array, datatype in values:
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="localhost:8000")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--adapter", default="", help="adapter id; empty for the base model")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--model", default="peft_llm")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", help="e.g. an API key")
    parser.add_argument("--json", action="store_true", help="print all outputs as JSON")
    args = parser.parse_args(argv)
    headers = dict(header.split("=", 1) for header in args.header)
    module = grpcclient if args.protocol == "grpc" else httpclient
    client = module.InferenceServerClient(args.url)
    inputs = build_inputs(module, args.prompt, args.adapter, args.max_tokens, stop=args.stop)
    result = client.infer(args.model, inputs, headers=headers)
    answer = {
        "text_output": result.as_numpy("text_output")[0, 0].decode(),
        "adapter_version": result.as_numpy("adapter_version")[0, 0].decode(),
        "output_tokens": int(result.as_numpy("output_tokens")[0, 0]),
    }
    print(json.dumps(answer) if args.json else f"[{answer['adapter_version'] or 'base model'}] {answer['text_output']}")
    return answer


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except InferenceServerException as exc:
        print(f"error: {exc.message()} (status {exc.status()})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
