"""``make bench-stall``: how long running streams wait while a prompt of the maximum allowed length joins.

Through a real tritonserver, on any model repository (the demo, or the SmolLM2 one): four gRPC streams
decode; once each has streamed a few pieces, a request with a prompt of exactly ``max_prompt_tokens``
tokens arrives. A piece of text can hold several tokens (an end-of-sequence token under ``ignore_eos``
sends no text of its own), so a gap is judged against the same piece's gap in a run of the same streams
with nothing arriving: what the arrival added to a piece, in decoding steps (the undisturbed run's time per
token), is the stall. The server runs twice, side by side in one command: prompts prefilled whole
(``prefill_chunk_tokens`` and ``prefill_step_share`` 0) and in chunks (the repository's own settings).

``--cold``: instead of a long prompt, the first requests for every adapter of the repository arrive at once
(none preloaded, so each is read, converted and smoke-checked while the streams decode), on the repository's
own settings; the stall is measured until the last of them is answered."""

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
class PieceGap:
    """The time a stream waited for one piece of text, and what the same piece took with nothing arriving.

    A piece can hold several tokens: one whose text is empty (an end-of-sequence token under ``ignore_eos``)
    sends nothing, so its time joins the next piece's. The undisturbed run shows how long each piece takes by
    itself, so that a gap is judged against its own piece, not against a one-token piece.
    """

    seconds: float
    undisturbed: float


@dataclass(frozen=True)
class StreamGaps:
    """Gaps between consecutive pieces of the decoding streams, split by when ``arrive`` ran (seconds)."""

    before: list[PieceGap]  # gaps that ended before the arrival: the undisturbed pace
    during: list[PieceGap]  # gaps that overlap the arrival, until ``arrive`` returned
    outlasted: bool  # every stream was still decoding when ``arrive`` returned (else ``during`` is cut short)
    step: float  # a decoding step with nothing arriving: the undisturbed run's time per token
    streams: int = 1
    diverged: int = 0  # streams whose text left the undisturbed run's (their later pieces count one token each)

    @property
    def worst_during(self) -> float:
        """The longest gap during the arrival, whatever its piece held."""
        return max(gap.seconds for gap in self.during)

    @property
    def worst_added(self) -> float:
        """The most the arrival added to one piece's wait: the stall it caused."""
        return max(gap.seconds - gap.undisturbed for gap in self.during)

    @property
    def extra_steps(self) -> float:
        """The worst added wait in decoding steps (the target is at most one)."""
        return max(self.worst_added, 0.0) / self.step

    @property
    def stall_ratio(self) -> float:
        """A one-token piece's worst wait during the arrival, as a multiple of its undisturbed time."""
        return 1 + self.extra_steps

    @property
    def total_added_steps(self) -> float:
        """What the arrival added to a stream's wait over all its pieces, in decoding steps (mean of the
        streams): divided by the requests that arrived, the delay one arriving request costs the streams."""
        return sum(gap.seconds - gap.undisturbed for gap in self.during) / self.streams / self.step

    @property
    def per_token_before(self) -> float:
        """Time per output token of the running streams before the arrival."""
        return self._per_token(self.before)

    @property
    def per_token_during(self) -> float:
        """Time per output token of the running streams while the arrival was served."""
        return self._per_token(self.during)

    def _per_token(self, gaps: list[PieceGap]) -> float:
        tokens = sum(max(1, round(gap.undisturbed / self.step)) for gap in gaps)
        return sum(gap.seconds for gap in gaps) / tokens


@dataclass(frozen=True)
class StreamRun:
    """What the streams of one run received, and when ``arrive`` started and returned."""

    times: list[list[float]]  # per stream, when each response came
    pieces: list[list[str]]  # per stream, each response's text
    tokens: list[int]  # per stream, the output tokens its final response counted
    arrived: float
    answered: float


def measure_streams(
    server: TritonServer, arrive: Callable[[], None], *, max_tokens: int, adapter: str = "", streams: int = STREAMS
) -> StreamGaps:
    """``streams`` gRPC streams of ``max_tokens`` pieces decode; once each has streamed 20, ``arrive`` runs.

    The same streams run once before with nothing arriving (greedy, so they stream the same pieces): that
    run gives each piece's undisturbed time.
    """
    reference = _run_streams(server, None, max_tokens=max_tokens, adapter=adapter, streams=streams)
    measured = _run_streams(server, arrive, max_tokens=max_tokens, adapter=adapter, streams=streams)
    return compare_runs(reference, measured)


def compare_runs(reference: StreamRun, measured: StreamRun) -> StreamGaps:
    """Each gap of ``measured`` beside the same piece's gap in ``reference`` (median over its streams)."""
    expected_pieces = reference.pieces[0]
    expected = [
        statistics.median(gaps)
        for gaps in zip(*(_gaps(t) for t in reference.times), strict=False)  # the shortest stream's length
    ]
    # A decoding step: the time per token of the undisturbed streams, from their first piece to their last.
    step = statistics.median(
        (t[-1] - t[0]) / (tokens - 1) for t, tokens in zip(reference.times, reference.tokens, strict=True)
    )
    before: list[PieceGap] = []
    during: list[PieceGap] = []
    diverged = 0
    for times, pieces in zip(measured.times, measured.pieces, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(pieces, expected_pieces, strict=False)) if a != b), len(pieces))
        diverged += same < len(pieces)
        for index, (start, end) in enumerate(itertools.pairwise(times)):
            # Gap ``index`` ends with piece ``index + 1``; after a divergence, pieces count as one token each.
            undisturbed = expected[index] if index + 1 < same and index < len(expected) else step
            if end < measured.arrived:
                before.append(PieceGap(end - start, undisturbed))
            elif start < measured.answered:
                during.append(PieceGap(end - start, undisturbed))
    return StreamGaps(
        before=before,
        during=during,
        outlasted=all(t[-1] > measured.answered for t in measured.times),
        step=step,
        streams=len(measured.times),
        diverged=diverged,
    )


def _gaps(times: list[float]) -> list[float]:
    return [end - start for start, end in itertools.pairwise(times)]


def _run_streams(
    server: TritonServer, arrive: Callable[[], None] | None, *, max_tokens: int, adapter: str, streams: int
) -> StreamRun:
    times: list[list[float]] = [[] for _ in range(streams)]
    pieces: list[list[str]] = [[] for _ in range(streams)]
    tokens = [0] * streams
    finished: queue.Queue = queue.Queue()
    clients = []
    for index in range(streams):
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def on_piece(result, error, index=index) -> None:
            if error is not None:
                finished.put(error)
                return
            times[index].append(time.perf_counter())
            pieces[index].append(result.as_numpy("text_output").reshape(-1)[0].decode())
            counted = result.as_numpy("output_tokens")
            if counted is not None:
                tokens[index] = int(counted.reshape(-1)[0])
                finished.put(None)

        client.start_stream(callback=on_piece)
        client.async_stream_infer("peft_llm_stream", stream_inputs("a dog", adapter, max_tokens))
        clients.append(client)
    while min(len(t) for t in times) < 20:
        time.sleep(0.01)
    arrived = time.perf_counter()
    if arrive is not None:
        arrive()
    answered = time.perf_counter()
    for _ in range(streams):
        error = finished.get(timeout=600)
        if error is not None:
            raise error
    for client in clients:
        client.stop_stream()
    return StreamRun(times, pieces, tokens, arrived, answered)


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
        rows.append((name, gaps))
        print(f"{name}: done", flush=True)
    print(f"\n{config.max_prompt_tokens}-token prompt joining {STREAMS} streams ({args.repository}, adapter "
          f"{args.adapter or '(base)'})")  # fmt: skip
    print_table(rows, arrivals=1)
    return 0


def print_table(rows: list[tuple[str, StreamGaps]], arrivals: int) -> None:
    """Per run: the undisturbed step, the worst gap as measured, the most the arrival added to one piece (in
    steps, and the worst wait of a one-token piece as a multiple of the step), and the delay each of the
    ``arrivals`` requests cost the streams over the whole arrival, in steps."""
    print(
        f"{'run':<24}{'step (ms)':>11}{'worst gap (ms)':>16}{'most added (ms)':>17}{'(steps)':>9}{'ratio':>8}"
        f"{'steps per arrival':>19}"
    )
    for name, gaps in rows:
        print(
            f"{name:<24}{1000 * gaps.step:>11.1f}{1000 * gaps.worst_during:>16.1f}{1000 * gaps.worst_added:>17.1f}"
            f"{gaps.extra_steps:>9.1f}{gaps.stall_ratio:>7.1f}x{gaps.total_added_steps / arrivals:>19.1f}"
        )
        if gaps.diverged:
            print(f"  ({gaps.diverged} streams' text left the undisturbed run's: their later pieces count one token)")


def measure_cold(source: Path, config: ServeConfig) -> int:
    adapters = sorted(p.name for p in Path(config.adapter_repository).iterdir() if p.is_dir())
    with tempfile.TemporaryDirectory() as tmp:
        repository = repository_with(source, Path(tmp), preload="")
        server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with server:
            gaps = measure_streams(server, cold_adapters_arrive(server, adapters), max_tokens=config.max_tokens_limit)
    print(f"\n{len(adapters)} cold adapters' first requests arriving while {STREAMS} streams decode ({source})")
    print_table([("cold adapters", gaps)], arrivals=len(adapters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
