"""What the BLS hop costs: the same requests to ``peft_llm`` (forwards) and straight to ``peft_llm_stream``.

Starts tritonserver on the demo repository, sends sequential requests (one at a time, so only the
per-request overhead differs) and prints mean latencies side by side: peft_llm over gRPC infer, and
peft_llm_stream over a gRPC stream with streaming off (one response), for 1 and 32 new tokens.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from tools.client import build_inputs
from tools.triton_server import TritonServer, free_port


def through_peft_llm(client: grpcclient.InferenceServerClient, max_tokens: int) -> float:
    started = time.perf_counter()
    client.infer("peft_llm", build_inputs(grpcclient, "the cat looks at", "pirate", max_tokens))
    return time.perf_counter() - started


def straight_to_engine(client: grpcclient.InferenceServerClient, answers: queue.Queue, max_tokens: int) -> float:
    inputs = build_inputs(grpcclient, "the cat looks at", "pirate", max_tokens, stream=False)
    started = time.perf_counter()
    client.async_stream_infer("peft_llm_stream", inputs)
    _, error = answers.get(timeout=60)
    if error is not None:
        raise error
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args(argv)
    server = TritonServer(args.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with server:
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        streaming = grpcclient.InferenceServerClient(server.grpc_url)
        answers: queue.Queue = queue.Queue()
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        print(f"\n{'new tokens':<12}{'peft_llm (BLS) ms':>20}{'peft_llm_stream ms':>20}{'BLS cost ms':>14}")
        for max_tokens in (1, 32):
            for _ in range(5):  # warm-up
                through_peft_llm(plain, max_tokens)
                straight_to_engine(streaming, answers, max_tokens)
            forwarded, direct = [], []
            for _ in range(args.requests):  # interleaved, so machine noise hits both alike
                forwarded.append(through_peft_llm(plain, max_tokens))
                direct.append(straight_to_engine(streaming, answers, max_tokens))
            a, b = 1000 * statistics.mean(forwarded), 1000 * statistics.mean(direct)
            print(f"{max_tokens:<12}{a:>20.2f}{b:>20.2f}{a - b:>14.2f}")
        streaming.stop_stream()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
