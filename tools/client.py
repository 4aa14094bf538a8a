"""Send one completion request to peft_llm over HTTP or gRPC with ``tritonclient``.

``python -m tools.client [--url HOST:PORT] [--protocol http|grpc] [--adapter ID] [--max-tokens N]
[--stop S] [--header NAME=VALUE] [--stream] [--chat] PROMPT`` prints the generated text and which adapter version
served it; ``--json`` prints all outputs as JSON; ``--stream`` prints tokens as they arrive (gRPC, from
peft_llm_stream); ``--chat`` sends PROMPT as a user message in the model's chat template.
"""

from __future__ import annotations

import argparse
import json
import queue
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
    messages: Sequence[dict[str, str]] | None = None,
) -> list:
    """InferInput list (``module``: tritonclient.http or .grpc) for one prompt; optional inputs are sent when set.

    ``always_send_adapter`` sends ``adapter_id`` even when empty (the base model): Triton's dynamic batcher
    only batches requests that carry the same set of inputs. ``messages`` (chat, rendered with the model's
    chat template) goes as JSON; ``prompt`` must then be empty.
    """
    raw = prompt if isinstance(prompt, bytes) else prompt.encode()
    values = [("text_input", np.array([[raw]], dtype=np.object_), "BYTES")]
    if messages is not None:
        values.append(("messages", np.array([[json.dumps(list(messages)).encode()]], dtype=np.object_), "BYTES"))
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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.client`` (also read by tests/unit/test_docs.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="localhost:8000")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--adapter", default="", help="adapter id; empty for the base model")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--model", default="peft_llm")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", help="e.g. an API key")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (gRPC, peft_llm_stream)")
    parser.add_argument("--chat", action="store_true", help="send PROMPT as a user message (the chat template)")
    parser.add_argument("--json", action="store_true", help="print all outputs as JSON")
    return parser


def run(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    headers = dict(header.split("=", 1) for header in args.header)
    prompt, messages = ("", [{"role": "user", "content": args.prompt}]) if args.chat else (args.prompt, None)
    if args.stream:
        return stream(args.url, prompt, args.adapter, args.max_tokens, args.stop, headers, messages)
    module = grpcclient if args.protocol == "grpc" else httpclient
    client = module.InferenceServerClient(args.url)
    inputs = build_inputs(module, prompt, args.adapter, args.max_tokens, stop=args.stop, messages=messages)
    result = client.infer(args.model, inputs, headers=headers)
    answer = {
        "text_output": result.as_numpy("text_output")[0, 0].decode(),
        "adapter_version": result.as_numpy("adapter_version")[0, 0].decode(),
        "output_tokens": int(result.as_numpy("output_tokens")[0, 0]),
    }
    print(json.dumps(answer) if args.json else f"[{answer['adapter_version'] or 'base model'}] {answer['text_output']}")
    return answer


def stream(
    url: str,
    prompt: str,
    adapter_id: str,
    max_tokens: int | None,
    stop: list[str],
    headers: dict,
    messages: list[dict[str, str]] | None = None,
) -> dict:
    """Stream one answer from peft_llm_stream over gRPC, printing each piece as it arrives."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=headers)
    flag = grpcclient.InferInput("stream", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[True]]))
    client.async_stream_infer(
        "peft_llm_stream",
        [*build_inputs(grpcclient, prompt, adapter_id, max_tokens, stop=stop, messages=messages), flag],
    )
    pieces = []
    try:
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise error
            pieces.append(result.as_numpy("text_output")[0, 0].decode())
            print(pieces[-1], end="", flush=True)
            if result.as_numpy("output_tokens") is not None:  # the final response carries the count
                version = result.as_numpy("adapter_version")[0, 0].decode() or "base model"
                print(f"\n[{version}, {int(result.as_numpy('output_tokens')[0, 0])} tokens]")
                return {"text_output": "".join(pieces), "adapter_version": version}
    finally:
        client.stop_stream()


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except InferenceServerException as exc:
        print(f"error: {exc.message()} (status {exc.status()})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
