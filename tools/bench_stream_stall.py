"""``make bench-stall``: how long running streams wait while a prompt of the maximum allowed length joins.

Through a real tritonserver, on any model repository (the demo, or the SmolLM2 one): four gRPC streams
decode; once each has streamed a few pieces, a request with a prompt of exactly ``max_prompt_tokens``
tokens arrives. For each stream, the gaps between its pieces before the arrival give the undisturbed
median; the gaps that overlap the long prompt's prefill (until its answer) give the worst. The server runs
twice, side by side in one command: prompts prefilled whole (``prefill_chunk_tokens`` and
``prefill_step_share`` 0) and in chunks (the repository's own settings).

``--cold``: instead of a long prompt, the first requests for every adapter of the repository arrive at once
(none preloaded, so each is read, converted and smoke-checked while the streams decode), on the repository's
own settings; the worst gap lasts until the last of them is answered.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from transformers import AutoTokenizer

from peftserve.config import ServeConfig, read_model_config
from tools.client import build_inputs
from tools.triton_server import TritonServer, free_port

STREAMS = 4


def repository_with(source: Path, target: Path, **parameters: str) -> Path:
    """A copy of the two models' directories whose engine settings differ by ``parameters``; the base model
    and adapters are referred to where they are, not copied."""
    engine = read_model_config(source / "peft_llm")
    shutil.copytree(source / "peft_llm_stream", target / "peft_llm_stream")
    shutil.copytree(source / "peft_llm" / "1", target / "peft_llm" / "1")
    text = (source / "peft_llm" / "config.pbtxt").read_text()
    settings = {"base_model": engine.base_model, "adapter_repository": engine.adapter_repository, **parameters}
    for key, value in settings.items():
        line = f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}'
        pattern = re.compile(rf'^parameters: \{{ key: "{key}".*$', re.M)
        text = pattern.sub(line, text) if pattern.search(text) else f"{text.rstrip()}\n{line}\n"
    (target / "peft_llm" / "config.pbtxt").write_text(text)
    return target


def longest_prompt(config: ServeConfig) -> str:
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    words = " ".join(["the river runs past the quiet town and"] * config.max_prompt_tokens)
    ids = tokenizer(words).input_ids[: config.max_prompt_tokens]
    while len(tokenizer(tokenizer.decode(ids)).input_ids) > config.max_prompt_tokens:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream_inputs(text: str, adapter: str, max_tokens: int) -> list:
    return build_inputs(grpcclient, text, adapter, max_tokens, ignore_eos=True, stream=True)


def long_prompt_arrives(server: TritonServer, long_prompt: str, adapter: str) -> Callable[[], None]:
    def arrive() -> None:
        answer = grpcclient.InferenceServerClient(server.grpc_url).infer(
            "peft_llm", build_inputs(grpcclient, long_prompt, adapter, 1)
        )
        assert answer.as_numpy("output_tokens")[0, 0] == 1

    return arrive


def first_request(server: TritonServer, adapter: str) -> None:
    """One one-token request for ``adapter``; its answer must name the adapter's version."""
    answer = grpcclient.InferenceServerClient(server.grpc_url).infer(
        "peft_llm", build_inputs(grpcclient, "the cat looks at", adapter, 1)
    )
    assert answer.as_numpy("adapter_version")[0, 0].decode().startswith(f"{adapter}@")


def cold_adapters_arrive(server: TritonServer, adapters: list[str]) -> Callable[[], None]:
    def arrive() -> None:
        with ThreadPoolExecutor(max_workers=len(adapters)) as pool:
            list(pool.map(lambda adapter: first_request(server, adapter), adapters))

    return arrive


@dataclass(frozen=True)
class StreamGaps:
    """Gaps between consecutive pieces of the decoding streams, split by when ``arrive`` ran (seconds)."""

    before: list[float]  # gaps that ended before the arrival: the undisturbed pace
    during: list[float]  # gaps that overlap the arrival, until ``arrive`` returned
    outlasted: bool  # every stream was still decoding when ``arrive`` returned (else ``during`` is cut short)

    @property
    def median_before(self) -> float:
        return statistics.median(self.before)

    @property
    def worst_during(self) -> float:
        return max(self.during)

    @property
    def per_token_before(self) -> float:
        """Time per output token of the running streams before the arrival (their mean gap)."""
        return statistics.fmean(self.before)

    @property
    def per_token_during(self) -> float:
        """Time per output token of the running streams while the arrival was served."""
        return statistics.fmean(self.during)


def measure_streams(
    server: TritonServer, arrive: Callable[[], None], *, max_tokens: int, adapter: str = "", streams: int = STREAMS
) -> StreamGaps:
    """``streams`` gRPC streams of ``max_tokens`` pieces decode; once each has streamed 20, ``arrive`` runs."""
    times: list[list[float]] = [[] for _ in range(streams)]
    finished: queue.Queue = queue.Queue()
    clients = []
    for index in range(streams):
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def on_piece(result, error, index=index) -> None:
            if error is not None:
                finished.put(error)
                return
            times[index].append(time.perf_counter())
            if result.as_numpy("output_tokens") is not None:
                finished.put(None)

        client.start_stream(callback=on_piece)
        client.async_stream_infer("peft_llm_stream", stream_inputs("a dog", adapter, max_tokens))
        clients.append(client)
    while min(len(t) for t in times) < 20:
        time.sleep(0.01)
    arrived = time.perf_counter()
    arrive()
    answered = time.perf_counter()
    for _ in range(streams):
        error = finished.get(timeout=600)
        if error is not None:
            raise error
    for client in clients:
        client.stop_stream()
    return StreamGaps(
        before=[b - a for t in times for a, b in itertools.pairwise(t) if b < arrived],
        during=[b - a for t in times for a, b in itertools.pairwise(t) if b > arrived and a < answered],
        outlasted=all(t[-1] > answered for t in times),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--adapter", default="", help="adapter of every request (default: the base model)")
    parser.add_argument("--cold", action="store_true", help="every adapter's first request arrives instead")
    args = parser.parse_args(argv)
    config = read_model_config(args.repository / "peft_llm")
    if args.cold:
        return measure_cold(args.repository, config)
    long_prompt = longest_prompt(config)
    runs = {"whole prompt": {"prefill_chunk_tokens": "0", "prefill_step_share": "0"}, "chunked (configured)": {}}
    rows = []
    for name, settings in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            repository = repository_with(args.repository, Path(tmp), **settings)
            server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
            with server:
                gaps = measure_streams(
                    server,
                    long_prompt_arrives(server, long_prompt, args.adapter),
                    max_tokens=config.max_tokens_limit,
                    adapter=args.adapter,
                )
        median, worst = gaps.median_before, gaps.worst_during
        rows.append((name, median, worst))
        print(f"{name}: median gap {1000 * median:.1f} ms, worst {1000 * worst:.1f} ms", flush=True)
    print(f"\n{config.max_prompt_tokens}-token prompt joining {STREAMS} streams ({args.repository}, adapter "
          f"{args.adapter or '(base)'})")  # fmt: skip
    print(f"{'prefill':<24}{'median gap (ms)':>16}{'worst gap (ms)':>16}{'worst/median':>14}")
    for name, median, worst in rows:
        print(f"{name:<24}{1000 * median:>16.1f}{1000 * worst:>16.1f}{worst / median:>13.1f}x")
    return 0


def measure_cold(source: Path, config: ServeConfig) -> int:
    adapters = sorted(p.name for p in Path(config.adapter_repository).iterdir() if p.is_dir())
    with tempfile.TemporaryDirectory() as tmp:
        repository = repository_with(source, Path(tmp), preload="")
        server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with server:
            gaps = measure_streams(server, cold_adapters_arrive(server, adapters), max_tokens=config.max_tokens_limit)
    median, worst = gaps.median_before, gaps.worst_during
    print(f"\n{len(adapters)} cold adapters' first requests arriving while {STREAMS} streams decode ({source})")
    print(f"{'median gap (ms)':>16}{'worst gap (ms)':>16}{'worst/median':>14}")
    print(f"{1000 * median:>16.1f}{1000 * worst:>16.1f}{worst / median:>13.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
