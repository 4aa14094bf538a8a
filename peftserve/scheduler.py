"""Answer requests without letting an adapter load delay anyone else.

Requests whose adapters are all in memory (or that need none, or whose adapter id does not resolve) are
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

from peftserve.engine import Completion, CompletionRequest, Engine
from peftserve.errors import PeftServeError

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
        self._loaders = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-loader")

    def submit(self, submissions: Sequence[Submission]) -> None:
        """Answer the ready submissions now; queue the others behind their adapter loads."""
        ready: list[Submission] = []
        waiting: dict[frozenset[str], list[Submission]] = defaultdict(list)
        for submission in submissions:
            missing = set()
            for adapter_id in {r.adapter_id for r in submission.requests if r.adapter_id}:
                loaded = self.engine.adapter_loaded(adapter_id)
                if loaded is not None:
                    self.engine.metrics.cache_event("hit" if loaded else "miss", adapter_id)
                if loaded is False:
                    missing.add(adapter_id)
            (waiting[frozenset(missing)] if missing else ready).append(submission)
        for adapter_ids, group in waiting.items():
            self._loaders.submit(self._load_then_run, adapter_ids, group)
        if ready:
            self._run(ready)

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
