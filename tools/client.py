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

from peftserve.contract import ENGINE_MODEL, INPUT_SPECS


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
    stream: bool | None = None,
) -> list:
    """InferInput list (``module``: tritonclient.http or .grpc) for one prompt; optional inputs are sent when set.

    ``always_send_adapter`` sends ``adapter_id`` even when empty (the base model): Triton's dynamic batcher
    only batches requests that carry the same set of inputs. ``messages`` (chat, rendered with the model's
    chat template) goes as JSON; ``prompt`` must then be empty. ``stream`` is peft_llm_stream's own input.
    """
    values: dict[str, object] = {"text_input": prompt}
    if messages is not None:
        values["messages"] = json.dumps(list(messages))
    if adapter_id or always_send_adapter:
        values["adapter_id"] = adapter_id
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    if ignore_eos:
        values["ignore_eos"] = True
    if stop:
        values["stop"] = list(stop)
    if stream is not None:
        values["stream"] = stream
    return [infer_input(module, name, value) for name, value in values.items()]


def infer_input(module, name: str, value) -> object:
    """One row of the input ``name``, typed as the contract declares it (a list of values for a list input)."""
    spec = INPUT_SPECS[name]
    row = list(value) if spec.is_list else [value]
    if spec.type.python is str:
        row = [item if isinstance(item, bytes) else item.encode() for item in row]
    array = np.array([row], dtype=spec.type.numpy)
    tensor = module.InferInput(name, list(array.shape), spec.type.datatype)
    tensor.set_data_from_numpy(array)
    return tensor


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
    inputs = build_inputs(grpcclient, prompt, adapter_id, max_tokens, stop=stop, messages=messages, stream=True)
    client.async_stream_infer(ENGINE_MODEL, inputs)
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
