"""Answer requests without letting an adapter load delay anyone else.

Requests over their adapter's limits (:mod:`peftserve.admission`) are refused first, at once. Requests
whose adapters are all in memory (or that need none, or whose adapter id does not resolve) are
answered at once on the caller's thread, as one batch. Requests that need an adapter loaded wait on a
background thread while it is read and converted, then run as their own batch; meanwhile the caller goes
on serving the next batches. Cache hits and misses are counted here, per request, when it arrives.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from peftserve.admission import Admission
from peftserve.engine import Completion, CompletionRequest, Engine
from peftserve.errors import OverLimitError, PeftServeError
from peftserve.metrics import BASE_LABEL

logger = logging.getLogger("peftserve.scheduler")

Responder = Callable[[list[Completion | PeftServeError]], None]


@dataclass
class Submission:
    """The rows of one client request and how to answer them (exactly once)."""

    requests: list[CompletionRequest]
    respond: Responder


class Scheduler:
    def __init__(self, engine: Engine, *, loader_threads: int = 2) -> None:
        self.engine = engine
        self.admission = Admission(engine.config.adapter_limits, engine.config.adapter_limit_overrides)
        self._loaders = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-loader")

    def submit(self, submissions: Sequence[Submission]) -> None:
        """Refuse submissions over their adapters' limits, answer the ready ones now, and queue the others
        behind their adapter loads."""
        ready: list[Submission] = []
        waiting: dict[frozenset[str], list[Submission]] = defaultdict(list)
        for submission in submissions:
            loaded = {
                i: self.engine.adapter_loaded(i) for i in {r.adapter_id for r in submission.requests if r.adapter_id}
            }
            try:
                submission = self._admitted(submission, loaded)
            except OverLimitError as exc:
                self._refuse(submission, exc)
                continue
            for adapter_id, state in loaded.items():
                if state is not None:
                    self.engine.metrics.cache_event("hit" if state else "miss", adapter_id)
            missing = frozenset(adapter_id for adapter_id, state in loaded.items() if state is False)
            (waiting[missing] if missing else ready).append(submission)
        for adapter_ids, group in waiting.items():
            self._loaders.submit(self._load_then_run, adapter_ids, group)
        if ready:
            self._run(ready)

    def _admitted(self, submission: Submission, loaded: dict[str, bool | None]) -> Submission:
        """Count the submission's rows in (ids that do not resolve get their error later, uncounted) and
        return it with a responder that counts them out once answered."""
        labels = [
            r.adapter_id or BASE_LABEL
            for r in submission.requests
            if loaded.get(r.adapter_id) is not None or not r.adapter_id
        ]
        admitted: list[str] = []
        try:
            for label in labels:
                self.admission.admit(label)
                admitted.append(label)
        except OverLimitError as exc:
            for label in admitted:
                self.admission.release(label)
            self.engine.metrics.over_limit(labels[len(admitted)])
            raise exc
        self.engine.metrics.inflight(self._inflight_by_label(admitted))

        def respond(answers: list[Completion | PeftServeError]) -> None:
            try:
                submission.respond(answers)
            finally:
                for label in admitted:
                    self.admission.release(label)
                self.engine.metrics.inflight(self._inflight_by_label(admitted))

        return Submission(submission.requests, respond)

    def _inflight_by_label(self, labels: list[str]) -> dict[str, int]:
        return {label: self.admission.inflight(label) for label in set(labels)}

    def _refuse(self, submission: Submission, error: OverLimitError) -> None:
        for request in submission.requests:
            self.engine.metrics.request_done(
                request.adapter_id or BASE_LABEL, error_code=error.triton_code, seconds=0.0, tokens=0
            )
        try:
            submission.respond([error] * len(submission.requests))
        except Exception:
            logger.exception("sending a response failed")

    def close(self) -> None:
        """Finish queued loads and their answers."""
        self._loaders.shutdown(wait=True)

    def _load_then_run(self, adapter_ids: frozenset[str], group: list[Submission]) -> None:
        for adapter_id in adapter_ids:
            try:
                self.engine.ensure_loaded(adapter_id)
            except Exception:  # the batch below reports the failure to each request
                logger.exception("background load of adapter %r failed", adapter_id)
        self._run(group)

    def _run(self, group: list[Submission]) -> None:
        try:
            results = iter(self.engine.complete([request for s in group for request in s.requests]))
        except Exception as exc:  # every submission must still get its one answer
            logger.exception("batch failed outside the engine's per-request handling")
            error = PeftServeError(f"internal error: {type(exc).__name__}")
            results = iter([error] * sum(len(s.requests) for s in group))
        for submission in group:
            answers = [next(results) for _ in submission.requests]
            try:
                submission.respond(answers)
            except Exception:
                logger.exception("sending a response failed")
