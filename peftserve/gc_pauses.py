"""How long Python's garbage collector stopped this process, collection by collection.

A collection holds the GIL from start to end, so every thread of the stub waits on it: the decoding loop
between two steps, the response thread between two sends. A full (generation 2) collection walks every object
the collector tracks, and was the largest stall running streams saw (docs/architecture.md, "Threads"). The
collector announces each collection's start and end to ``gc.callbacks``; this records the pair's duration
and leaves reporting to whoever drains it (the Triton stub's response thread, as a histogram), because a
callback runs inside whichever thread allocated at that moment, possibly one holding a lock that reporting
would take: it only appends to a deque, which takes no lock of ours.
"""

from __future__ import annotations

import gc
import time
from collections import deque

# Pauses not drained yet beyond this many are forgotten, oldest first (the drain runs every few ms).
_KEPT = 4096


class GcPauses:
    """Records ``(generation, seconds)`` for each collection while started."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, float]] = deque(maxlen=_KEPT)
        self._started_at = 0.0  # collections never overlap: the GIL is held from start to stop

    def start(self) -> None:
        if self._observe not in gc.callbacks:
            gc.callbacks.append(self._observe)

    def stop(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def drain(self) -> list[tuple[int, float]]:
        """The pauses recorded since the last drain, oldest first."""
        drained = []
        while self._pending:
            drained.append(self._pending.popleft())
        return drained

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        else:
            self._pending.append((info["generation"], time.perf_counter() - self._started_at))
