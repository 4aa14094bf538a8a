"""Continuous batching: requests join the running batch between decoding steps and leave when done.

One loop thread owns the decoding. Each iteration it admits waiting requests (prefilled together, then
merged into the running batch), runs one decoding step for every running row whatever its adapter,
streams each row's new text, and retires rows that finished, were cancelled or hit a stop string — so a
short request never waits for the longest one it arrived with, and a freed slot is reused at the next
step. Requests whose adapter is not in memory wait on a loader thread, never in the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from peftserve.adapter_repository import AdapterVersion
from peftserve.admission import Admission
from peftserve.engine import Engine
from peftserve.errors import CacheFullError, CancelledError, OverLimitError, PeftServeError
from peftserve.generation import ActiveRow, GeneratedSequence, RunningBatch
from peftserve.metrics import BASE_LABEL, UNKNOWN_LABEL
from peftserve.requests import Completion, CompletionRequest
from peftserve.text_stream import TextStream

logger = logging.getLogger("peftserve.continuous")

TextCallback = Callable[[str], None]
DoneCallback = Callable[[Completion | PeftServeError], None]


@dataclass(eq=False)
class Work:
    """One request in the batcher: the callbacks that answer it and what it has produced so far."""

    request: CompletionRequest
    on_done: DoneCallback
    on_text: TextCallback | None = None  # streaming: called with each new piece of text
    is_cancelled: Callable[[], bool] = lambda: False
    submitted: float = field(default_factory=time.perf_counter)
    label: str = BASE_LABEL
    version: AdapterVersion | None = None
    text: TextStream | None = None
    first_token_at: float | None = None
    admitted: bool = False


class ContinuousBatcher:
    def __init__(
        self, engine: Engine, *, max_rows: int = 32, join_group: int = 4, join_every: int = 8, loader_threads: int = 2
    ) -> None:
        self.engine = engine
        self.max_rows = max_rows
        # A join is a prefill forward pass of its own, about as costly on a CPU as a decoding step of the
        # whole batch: waiting requests join when join_group of them wait (or fill the free rows), when the
        # oldest has waited join_every steps, or at once when nothing runs.
        self.join_group = join_group
        self.join_every = join_every
        self.admission = Admission(engine.config.adapter_limits, engine.config.adapter_limit_overrides)
        self._waiting: deque[Work] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._loaders = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-loader")
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> None:
        """Queue a request (thread-safe). Over-limit requests are refused at once; requests whose adapter
        must be loaded first join after the load, which runs beside the decoding loop."""
        adapter_id = work.request.adapter_id
        loaded = self.engine.adapter_loaded(adapter_id) if adapter_id else True
        work.label = UNKNOWN_LABEL if loaded is None else adapter_id or BASE_LABEL
        if loaded is not None:
            try:
                self.admission.admit(work.label)
            except OverLimitError as exc:
                self.engine.metrics.over_limit(work.label)
                self._finish(work, exc)
                return
            work.admitted = True
            self.engine.metrics.inflight({work.label: self.admission.inflight(work.label)})
            if adapter_id:
                self.engine.metrics.cache_event("hit" if loaded else "miss", adapter_id)
        if loaded is False:
            self._loaders.submit(self._load_then_queue, work)
        else:
            self._queue(work)

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=60)
        self._loaders.shutdown(wait=True)

    def _load_then_queue(self, work: Work) -> None:
        try:
            self.engine.ensure_loaded(work.request.adapter_id)
        except Exception:  # the request gets the error when it is prepared
            logger.exception("background load of adapter %r failed", work.request.adapter_id)
        self._queue(work)

    def _queue(self, work: Work) -> None:
        with self._wakeup:
            self._waiting.append(work)
            self._wakeup.notify()

    def _loop(self) -> None:
        batch = RunningBatch(self.engine.generator)
        steps_since_join = 0
        while True:
            with self._wakeup:
                while not self._waiting and not len(batch) and not self._closed:
                    self._wakeup.wait()
                if self._closed and not self._waiting and not len(batch):
                    return
                room = self.max_rows - len(batch)
                due = (
                    not len(batch)
                    or len(self._waiting) >= min(room, self.join_group)
                    or steps_since_join >= self.join_every
                )
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))] if due else []
                steps_since_join = 0 if joining else steps_since_join + 1
            try:
                with self.engine.lock:
                    self._drop_cancelled(batch)
                    self._emit(self._join(batch, self._prepare(joining, running=len(batch))), finished=True)
                    self._emit(batch.rows, finished=False)
                    if len(batch):
                        self._emit(batch.step(), finished=True)
                        self._emit(batch.rows, finished=False)
                self.engine.report_cache()
            except Exception as exc:  # every request in the batch must still be answered
                logger.exception("decoding step failed; failing the %d running requests", len(batch))
                error = PeftServeError(f"generation failed: {type(exc).__name__}: {exc}")
                for entry in batch.rows:
                    self._finish(entry.handle, error)
                batch.close()
                batch = RunningBatch(self.engine.generator)

    def _prepare(self, joining: list[Work], *, running: int) -> list[ActiveRow]:
        rows, deferred = [], []
        for work in joining:
            if work.is_cancelled():
                self._finish(work, CancelledError("request cancelled by the client"))
                continue
            try:
                row, version = self.engine.lease(work.request)
                if version is not None:
                    work.label, work.version = version.adapter_id, version
            except CacheFullError as exc:
                if running or rows:  # a running request will leave and release its adapter: wait for it
                    deferred.append(work)
                else:
                    self._finish(work, exc)
                continue
            except PeftServeError as exc:
                self._finish(work, exc)
                continue
            work.text = TextStream(self.engine.tokenizer, work.request.stop, self.engine.refuse_blocked)
            rows.append(ActiveRow(row, handle=work))
        if deferred:
            with self._wakeup:
                self._waiting.extendleft(reversed(deferred))
        return rows

    def _join(self, batch: RunningBatch, rows: list[ActiveRow]) -> list[ActiveRow]:
        """Join ``rows``; if their prefill fails, retry them one by one so that only the culprit fails (a
        failed join leaves the running batch as it was)."""
        try:
            return batch.join(rows)
        except Exception as exc:
            if batch.deltas is not None:
                batch.deltas.install()
            if len(rows) == 1:
                logger.exception("prefill failed")
                self._finish(rows[0].handle, PeftServeError(f"generation failed: {type(exc).__name__}: {exc}"))
                return []
            logger.warning("prefill of %d joining rows failed (%s); retrying one by one", len(rows), exc)
            done = []
            for entry in rows:
                entry.result = GeneratedSequence(token_ids=[], finish_reason="length")
                done += self._join(batch, [entry])
            return done

    def _drop_cancelled(self, batch: RunningBatch) -> None:
        cancelled = [entry for entry in batch.rows if entry.handle.is_cancelled()]
        if cancelled:
            batch.remove(cancelled)
            for entry in cancelled:
                self._finish(entry.handle, CancelledError("request cancelled by the client"))

    def _emit(self, entries: list[ActiveRow], *, finished: bool) -> None:
        """Stream new text of running rows; answer finished ones."""
        now = time.perf_counter()
        for entry in entries:
            work: Work = entry.handle
            tokens = entry.result.token_ids
            if tokens and work.first_token_at is None:
                work.first_token_at = now
                self.engine.metrics.first_token(work.label, seconds=now - work.submitted)
            if not finished and work.on_text is None:
                continue  # nothing to stream: the text is decoded (and checked) once, at the end
            try:
                if finished:
                    piece, text = work.text.finish(tokens)
                else:
                    piece, text = work.text.update(tokens), None
            except PeftServeError as exc:  # a blocked pattern in the answer so far
                self._finish(work, exc)
                continue
            if piece and work.on_text is not None:
                work.on_text(piece)
            if finished:
                reason = "stop" if work.text.stopped else entry.result.finish_reason
                label = work.version.label if work.version else ""
                self._finish(work, Completion(text, label, len(tokens), reason))

    def _finish(self, work: Work, answer: Completion | PeftServeError) -> None:
        if work.version is not None:
            self.engine.cache.release(work.version)
            work.version = None
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
