"""Continuous batching over a paged KV cache: admission by memory, chunked prefill, one decoding loop.

One loop thread owns the model. Each iteration it

1. drops cancelled requests (their KV blocks and adapter leases go back at once);
2. admits waiting requests, first come first served, while rows and KV blocks are free: a request
   reserves blocks for its whole life (prompt, virtual tokens, prefix, ``max_tokens``) and otherwise waits,
   so the batch never runs out of memory; one that could never fit is refused;
3. prefills one chunk of prompt tokens, spread over the admitted requests in order, sized so that it takes
   about as long as a decoding step while streams run (:mod:`peftserve.prefill_budget`), so a long prompt
   enters over several iterations instead of stalling every running stream;
4. runs one decoding step for every running row, whatever its adapter, streams new text and retires rows
   that finished, hit a stop string or were cancelled.

Steps 3 and 4 are one packed forward pass (every row's new tokens in one sequence) where the model allows
it (``ModelRunner.check_packing``), two passes otherwise.

Nothing slow runs here: adapter files are read, converted and smoke-checked on loader threads (their own
probe prompts come through :meth:`ContinuousBatcher.run_rows` and share steps with traffic). A forward pass
that fails is retried row by row, so only the culprit request fails.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from peftserve.adapter_repository import AdapterVersion
from peftserve.adapter_weights import AdapterWeights
from peftserve.admission import Admission
from peftserve.batched_layers import BatchDeltas
from peftserve.config import SMOKE_CHECKS_WAITING
from peftserve.errors import (
    AdapterNotReady,
    CacheFullError,
    CancelledError,
    InvalidRequestError,
    OverLimitError,
    PeftServeError,
)
from peftserve.generation import GeneratedSequence, GenerationRow, SequenceState
from peftserve.kv_cache import PagedKVCache
from peftserve.metrics import BASE_LABEL, UNKNOWN_LABEL
from peftserve.prefill_budget import PrefillBudget
from peftserve.requests import Completion, CompletionRequest
from peftserve.response_cache import CachedAnswer, ResponseCache, adapter_key, request_digest, serves
from peftserve.text_stream import TextStream

if TYPE_CHECKING:
    from peftserve.engine import Engine

logger = logging.getLogger("peftserve.continuous")
DEFAULT_TORCH_THREADS = torch.get_num_threads()  # torch's own choice, before any thread sets its own

# The smallest prompt chunk: where prefill runs in passes of its own, a chunk costs a pass, so it is large
# enough for short prompts to join whole; inside a packed pass a chunk costs only its tokens, so it can be
# small and running streams wait less for it (measured in process, SmolLM2: worst gap 2.5x -> 2.2x).
SEPARATE_MIN_CHUNK = 64
PACKED_MIN_CHUNK = 16

TextCallback = Callable[[str], None]
DoneCallback = Callable[[Completion | PeftServeError], None]


@dataclass(eq=False)
class Work:
    """One request in the batcher: the callbacks that answer it and what it has produced so far.

    A request from a client carries ``request`` (checked into ``row`` when submitted); the engine's own model
    calls (smoke checks) and tests bring a ready ``row`` and get the raw :class:`GeneratedSequence` through
    ``on_result``.
    """

    request: CompletionRequest | None
    on_done: DoneCallback
    on_text: TextCallback | None = None  # streaming: called with each new piece of text
    is_cancelled: Callable[[], bool] = lambda: False
    row: GenerationRow | None = None
    on_result: Callable[[GeneratedSequence | PeftServeError], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    label: str = BASE_LABEL
    version: AdapterVersion | None = None
    text: TextStream | None = None
    first_token_at: float | None = None
    admitted: bool = False
    # The weights to lease when it joins: read by a loader while the cache was full, or found in the host tier.
    loaded: tuple[AdapterVersion, AdapterWeights] | None = None
    response_key: bytes | None = None  # request_digest, for requests the response cache may serve


class ContinuousBatcher:
    """The batching loop of one engine; its sizes and join policy are the engine's ServeConfig settings."""

    def __init__(self, engine: Engine, cache: PagedKVCache) -> None:
        config = engine.config
        self.engine = engine
        self.runner = engine.runner
        self.cache = cache
        self.max_rows = config.max_running_rows
        self.prefill_budget = PrefillBudget(
            max_tokens=config.prefill_chunk_tokens,
            share=config.prefill_step_share,
            min_tokens=PACKED_MIN_CHUNK if engine.runner.packs else SEPARATE_MIN_CHUNK,
        )
        # Where prefill runs in passes of its own (no packed passes), starting one costs about as much on a CPU
        # as a decoding step of the whole batch: waiting requests are admitted when join_group of them wait (or
        # fill the free rows), when the oldest has waited join_every steps, or at once when nothing runs.
        self.join_group = config.join_group
        self.join_every = config.join_every
        self.admission = Admission(config.adapter_limits, config.adapter_limit_overrides)
        cache_bytes = config.response_cache_bytes
        self.response_cache = ResponseCache(max_bytes=cache_bytes) if cache_bytes else None
        self._waiting: deque[Work] = deque()
        self._prefilling: list[SequenceState] = []
        self._running: list[SequenceState] = []
        self._ids = itertools.count(1)
        self._steps_since_admission = 0
        self._wakeup = threading.Condition()
        self._closed = False
        self._loaders = ThreadPoolExecutor(
            max_workers=config.loader_threads + SMOKE_CHECKS_WAITING,
            thread_name_prefix="adapter-loader",
            initializer=run_torch_single_threaded,
        )
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        """Requests inside the model (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    def submit(self, *works: Work) -> None:
        """Queue client requests (thread-safe), together: requests submitted in one call are admitted in one
        group. Over-limit requests are refused at once, and repeats the response cache holds are answered at
        once; requests whose adapter must be loaded first are queued after the load, which runs beside the
        decoding loop."""
        ready = [work for work in works if self._check(work)]
        with self._wakeup:
            self._waiting.extend(ready)
            self._wakeup.notify()

    def _check(self, work: Work) -> bool:
        """The request's arguments (tokenized here, on the caller's thread), admission limits and the adapter's
        state; True if the request can queue now."""
        adapter_id = work.request.adapter_id
        loaded = self.engine.adapter_loaded(adapter_id) if adapter_id else True
        work.label = UNKNOWN_LABEL if loaded is None else adapter_id or BASE_LABEL
        try:
            work.row = self.engine.check_request(work.request)
        except PeftServeError as exc:
            self._finish(work, exc)
            return False
        if loaded is not None:
            try:
                self.admission.admit(work.label)
            except OverLimitError as exc:
                self.engine.metrics.over_limit(work.label)
                self._finish(work, exc)
                return False
            work.admitted = True
            self.engine.metrics.inflight({work.label: self.admission.inflight(work.label)})
            if self._answer_from_cache(work):
                return False
            if adapter_id:
                self.engine.metrics.cache_event("hit" if loaded else "miss", adapter_id)
        if loaded is False:
            # A host-tier hit on CPU is leased as it is when the request joins; anything else needs a loader.
            work.loaded = self.engine.resident_on_host(adapter_id)
            if work.loaded is None:
                self._loaders.submit(self._load_then_queue, work, time.perf_counter())
                return False
        return True

    def _answer_from_cache(self, work: Work) -> bool:
        """Answer a request from the response cache, on the caller's thread; False if it must run the model.

        Called after admission: a cached answer counts against its adapter's rate and in-flight limits like a
        computed one, since the limits meter clients, and a repeat is no cheaper to send than to parse.
        """
        if self.response_cache is None or not serves(work.row, streaming=work.on_text is not None):
            return False
        work.response_key = request_digest(work.row, work.request.stop)
        adapter_id = work.request.adapter_id
        version = self.engine.current_version(adapter_id) if adapter_id else None
        content = adapter_key(adapter_id, version)
        found = self.response_cache.get(content, work.response_key) if content else None
        self.engine.metrics.response_cache_event("miss" if found is None else "hit", work.label)
        if found is None:
            return False
        label = version.label if version else ""
        self._finish(work, Completion(found.text, label, found.output_tokens, found.finish_reason))
        return True

    def _store_answer(self, work: Work, answer: Completion) -> None:
        """Keep a computed answer under the content of the version that computed it (batching loop)."""
        if self.response_cache is None or work.response_key is None:
            return
        content = adapter_key(work.request.adapter_id, work.version)
        stored = CachedAnswer(answer.text, answer.output_tokens, answer.finish_reason)
        if content and self.response_cache.put(content, work.response_key, stored):
            self.engine.metrics.response_cache_bytes(self.response_cache.nbytes)

    def run_rows(self, rows: Sequence[GenerationRow], timeout: float = 600.0) -> list[GeneratedSequence]:
        """Generate for ready rows through the running batch and wait (never call from the loop thread).
        A row that fails raises its error here."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_rows would wait for the loop that called it")
        futures = [Future() for _ in rows]
        works = [
            Work(None, on_done=_ignore, row=row, on_result=f.set_result) for row, f in zip(rows, futures, strict=True)
        ]
        with self._wakeup:
            self._waiting.extend(works)
            self._wakeup.notify()
        results = [future.result(timeout=timeout) for future in futures]
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=60)
        self._loaders.shutdown(wait=True)

    def _load_then_queue(self, work: Work, requested_at: float) -> None:
        """On a loader thread: load the request's adapter, then queue the request. Requests whose adapters are
        ready never wait behind it: a miss waits here, not in the queue the batch admits from."""
        try:
            work.loaded = self.engine.ensure_loaded(work.request.adapter_id)
        except PeftServeError as exc:
            self._finish(work, exc)
            return
        except Exception as exc:
            logger.exception("background load of adapter %r failed", work.request.adapter_id)
            self._finish(work, PeftServeError(f"loading adapter failed: {type(exc).__name__}"))
            return
        self.engine.metrics.load_wait(work.label, seconds=time.perf_counter() - requested_at)
        self._queue(work)

    def _queue(self, work: Work) -> None:
        with self._wakeup:
            self._waiting.append(work)
            self._wakeup.notify()

    def _loop(self) -> None:
        torch.set_num_threads(self.engine.config.torch_threads or DEFAULT_TORCH_THREADS)
        while True:
            with self._wakeup:
                while not self._waiting and not self.rows and not self._closed:
                    self._wakeup.wait()
                if self._closed and not self._waiting and not self.rows:
                    return
                joining = self._take_joining()
            try:
                self._drop_cancelled()
                self._admit(joining)
                if self._prefilling and self.runner.packs:
                    self._packed_step()
                else:
                    if self._prefilling:
                        self._prefill_step()
                    if self._running:
                        self._decode_step()
                self.engine.report_cache()
            except Exception:  # a bug here must not leave requests unanswered
                logger.exception("batching loop failed; failing the %d requests inside the model", self.rows)
                states, self._prefilling, self._running = [*self._prefilling, *self._running], [], []
                for state in states:
                    self._retire(state, PeftServeError("internal error in the batching loop"))

    def _take_joining(self) -> list[Work]:
        """Waiting requests to admit now (called with the condition held)."""
        room = self.max_rows - self.rows
        # A packed pass takes a joining prompt at the cost of its tokens: join at once. Otherwise a prefill
        # costs a pass of its own, and waiting requests join in groups.
        due = not self.rows or self.runner.packs or len(self._waiting) >= min(room, self.join_group)
        due = due or self._steps_since_admission >= self.join_every
        if not due or room <= 0:
            self._steps_since_admission += 1
            return []
        self._steps_since_admission = 0
        return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _admit(self, joining: list[Work]) -> None:
        """Turn requests into sequences with KV blocks; those that must wait go back to the queue's head."""
        back: list[Work] = []
        for index, work in enumerate(joining):
            if work.is_cancelled():
                self._finish(work, CancelledError("request cancelled by the client"))
                continue
            try:
                row = self._lease_row(work)
            except AdapterNotReady:  # evicted or replaced since it was queued: load it again, off the loop
                self._loaders.submit(self._load_then_queue, work, time.perf_counter())
                continue
            except CacheFullError as exc:
                if self.rows or back:  # a running request will release its adapter: wait for it
                    back.append(work)
                else:
                    self._finish(work, exc)
                continue
            except PeftServeError as exc:
                self._finish(work, exc)
                continue
            needed = self.cache.blocks_for(row.kv_tokens)
            if needed > self.cache.usable_blocks:
                self._finish(work, _too_long(row, needed, self.cache))
                continue
            if needed > self.cache.free_blocks:  # first come, first served: the ones behind wait too
                back += joining[index:]  # this one keeps its prepared row and adapter lease
                break
            state = SequenceState(row, next(self._ids), handle=work)
            self.runner.start(state)
            self._prefilling.append(state)
        if back:
            with self._wakeup:
                self._waiting.extendleft(reversed(back))

    def _lease_row(self, work: Work) -> GenerationRow:
        """The request's row with its adapter attached (leased once; a request that waits keeps its lease)."""
        if work.on_result is not None or work.text is not None:
            return work.row
        version = self.engine.lease(work.row, work.request.adapter_id, load=False, loaded=work.loaded)
        work.loaded = None
        if version is not None:
            work.label, work.version = version.adapter_id, version
        work.text = TextStream(self.engine.tokenizer, work.request.stop, self.engine.blocked)
        if work.text.stops:
            work.row.should_stop = work.text.reached_stop
        return work.row

    def _prefill_chunks(self) -> list[tuple[SequenceState, int]]:
        """The next prompt chunks, over the prefilling requests in order, within the prefill budget."""
        budget = self.prefill_budget.tokens(streams_running=bool(self._running))
        budget = budget or sum(state.prefill_left for state in self._prefilling)
        chunks = []
        for state in self._prefilling:
            take = min(state.prefill_left, budget)
            if take <= 0:
                break
            chunks.append((state, take))
            budget -= take
        chunks.sort(key=lambda chunk: id(chunk[0].row.adapter))  # one adapter's rows stay one slice
        return chunks

    def _prefill_step(self) -> None:
        """A prefill pass of its own (models that take no packed pass)."""
        chunks = self._prefill_chunks()
        started = time.perf_counter()
        completed = self._isolating_failures(
            chunks, lambda part: self.runner.prefill(part, self._deltas([s for s, _ in part]))
        )
        self.prefill_budget.prefilled(sum(n for _, n in chunks), time.perf_counter() - started)
        self._after_prefill(completed)

    def _packed_step(self) -> None:
        """One packed pass: every running row's next token and the next prompt chunks, each row at its own
        size, so a joining prompt costs its own tokens, not a forward pass of its own."""
        decoding = list(self._running)
        chunks = self._prefill_chunks()
        items = [(state, 1) for state in decoding] + chunks
        items.sort(key=lambda item: id(item[0].row.adapter))  # one adapter's tokens stay one slice
        started = time.perf_counter()
        done = self._isolating_failures(
            items, lambda part: self.runner.packed(part, self._deltas([s for s, n in part for _ in range(n)]))
        )  # a packed pass's rows are its tokens
        self.prefill_budget.packed(
            sum(n for _, n in chunks), time.perf_counter() - started, streams_running=bool(decoding)
        )
        self._after_prefill([state for state in done if state in self._prefilling])
        self._after_decode(decoding)

    def _after_prefill(self, completed: list[SequenceState]) -> None:
        for state in completed:
            self._prefilling.remove(state)
            if self.runner.advance(state):
                self._running.append(state)
                self._running.sort(key=lambda s: id(s.row.adapter))  # one adapter's rows stay one slice
                self._stream(state)
            else:
                self._retire(state)

    def _decode_step(self) -> None:
        states = list(self._running)
        started = time.perf_counter()
        self._isolating_failures([(s, 1) for s in states], lambda part: self._decode([s for s, _ in part]))
        self.prefill_budget.decoded(time.perf_counter() - started)
        self._after_decode(states)

    def _after_decode(self, states: list[SequenceState]) -> None:
        for state in states:
            if state not in self._running:
                continue  # failed alone
            if self.runner.advance(state):
                self._stream(state)
            else:
                self._running.remove(state)
                self._retire(state)

    def _decode(self, states: list[SequenceState]) -> list[SequenceState]:
        self.runner.decode(states, self._deltas(states))
        return states

    def _deltas(self, states: list[SequenceState]) -> BatchDeltas:
        with self.engine.lock:
            return self.engine.layers.deltas([state.row.adapter for state in states])

    def _isolating_failures(self, chunks: list[tuple[SequenceState, int]], run) -> list[SequenceState]:
        """Run ``chunks`` together; if that fails, one by one, so that only the culprit fails."""
        try:
            with self.engine.lock:
                return run(chunks)
        except Exception as exc:
            if len(chunks) == 1:
                logger.exception("forward pass failed")
                state = chunks[0][0]
                for pool in (self._prefilling, self._running):
                    if state in pool:
                        pool.remove(state)
                self._retire(state, PeftServeError(f"generation failed: {type(exc).__name__}: {exc}"))
                return []
            logger.warning("forward pass of %d rows failed (%s); retrying row by row", len(chunks), exc)
            return [done for chunk in chunks for done in self._isolating_failures([chunk], run)]

    def _drop_cancelled(self) -> None:
        for pool in (self._prefilling, self._running):
            for state in [s for s in pool if s.handle.is_cancelled()]:
                pool.remove(state)
                self._retire(state, CancelledError("request cancelled by the client"))

    def _stream(self, state: SequenceState) -> None:
        """Send the new text of a running row, if its client streams."""
        work: Work = state.handle
        self._first_token(work, state)
        if work.on_text is None or work.text is None:
            return
        try:
            piece = work.text.update(state.result.token_ids)
        except PeftServeError as exc:  # a blocked pattern in the answer so far
            self._running.remove(state)
            self._retire(state, exc)
            return
        if piece:
            work.on_text(piece)

    def _first_token(self, work: Work, state: SequenceState) -> None:
        if work.on_result is None and state.result.token_ids and work.first_token_at is None:
            work.first_token_at = time.perf_counter()
            self.engine.metrics.first_token(work.label, seconds=work.first_token_at - work.submitted)

    def _retire(self, state: SequenceState, error: PeftServeError | None = None) -> None:
        """A sequence leaves the model: its blocks go back, its request gets its answer."""
        self.runner.finish(state)
        work: Work = state.handle
        if work.on_result is not None:
            self._finish(work, error or state.result)
            return
        if error is not None:
            self._finish(work, error)
            return
        self._first_token(work, state)
        try:
            piece, text = work.text.finish(state.result.token_ids)
        except PeftServeError as exc:
            self._finish(work, exc)
            return
        if piece and work.on_text is not None:
            work.on_text(piece)
        reason = "stop" if work.text.stopped else state.result.finish_reason
        label = work.version.label if work.version else ""
        answer = Completion(text, label, len(state.result.token_ids), reason)
        self._store_answer(work, answer)
        self._finish(work, answer)

    def _release_lease(self, work: Work) -> None:
        if work.version is not None:
            self.engine.cache.release(work.version)
            work.version = None

    def _finish(self, work: Work, answer: Completion | GeneratedSequence | PeftServeError) -> None:
        if work.on_result is not None:
            work.on_result(answer)
            return
        self._release_lease(work)
        if work.admitted:
            self.admission.release(work.label)
            work.admitted = False
            self.engine.metrics.inflight({work.label: self.admission.inflight(work.label)})
        failed = isinstance(answer, PeftServeError)
        seconds = time.perf_counter() - work.submitted
        tokens = 0 if failed else answer.output_tokens
        self.engine.metrics.request_done(
            work.label, error_code=answer.triton_code if failed else None, seconds=seconds, tokens=tokens
        )
        if not failed and tokens > 1 and work.first_token_at is not None:
            per_token = (time.perf_counter() - work.first_token_at) / (tokens - 1)
            self.engine.metrics.time_per_output_token(work.label, seconds=per_token)
        try:
            work.on_done(answer)
        except Exception:
            logger.exception("sending a response failed")


def run_torch_single_threaded() -> None:
    """Run torch single-threaded on the calling thread, so that the decoding loop's OpenMP team is the only
    multi-threaded one (see ``torch_threads``): a team started from a second thread slows the loop's own
    small operations down (up to tenfold, measured on 2 cores). The engine's background threads (adapter
    loaders, the watcher) call it; a server's or a benchmark's main thread calls it before any torch work,
    since a team it has started already keeps slowing the loop down. Engines leave their caller's threads
    alone otherwise.

    Background threads keep the loop's CPU priority. Ten nice levels lower, a loader that held the GIL while the kernel
    ran the loop's busier threads instead kept the loop waiting for it: with 20 cold adapters arriving, the
    running streams' worst gap doubled and the loads took twice as long (docs/benchmarks.md)."""
    torch.set_num_threads(1)


def _ignore(_: object) -> None:
    pass


def _too_long(row: GenerationRow, needed: int, cache: PagedKVCache) -> PeftServeError:
    return InvalidRequestError(
        f"the request needs {row.kv_tokens} KV cache tokens ({needed} blocks: prompt, adapter prefix and "
        f"max_tokens), more than the whole KV cache holds ({cache.usable_blocks} blocks of {cache.block_size}); "
        "lower max_tokens or the prompt, or raise kv_cache_memory_mb"
    )
