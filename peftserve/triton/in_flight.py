"""The forwards ``peft_llm`` has waiting on the engine's model, each answered exactly once.

Normally a forward's own thread answers when the engine does. If the engine's stub process dies under it,
Triton 24.10 never ends the BLS call and cannot cancel it (a response iterator's ``cancel`` came later): the
thread stays blocked (measured: eight requests in flight when the stub was killed waited until their 90 s
client deadline, while the engine, loaded again, served new ones). :meth:`InFlight.fail_all`, called when
the engine's death is found, answers those requests with an error and gives their slots back; their
blocked threads, should they ever return, find their request answered and send nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("peftserve.triton")


class InFlight:
    """Up to ``slots`` forwards at once; :meth:`enter` blocks while all are taken (requests then wait in
    Triton's queue, where its metrics see them)."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open: dict[int, Callable[[str], None]] = {}
        self._keys = itertools.count()

    def enter(self, fail: Callable[[str], None]) -> int:
        """Take a slot for a forward; ``fail(message)`` answers its client with an error if it is failed."""
        self._slots.acquire()
        with self._lock:
            key = next(self._keys)
            self._open[key] = fail
            return key

    def leave(self, key: int) -> bool:
        """The forward ``key`` is done: True when its thread is still the one to answer it."""
        with self._lock:
            owned = self._open.pop(key, None) is not None
            if owned:
                self._slots.release()
                self._idle.notify_all()
            return owned

    def while_open(self, key: int, step: Callable[[], object]) -> bool:
        """Run ``step`` unless the forward ``key`` was failed (False then); :meth:`fail_all` waits for it.
        For calls that need the request alive: once failed, its response is sent and Triton frees it."""
        with self._lock:
            if key not in self._open:
                return False
            step()
            return True

    def fail_all(self, message: str) -> int:
        """Answer every open forward with ``message`` and give its slot back; returns how many."""
        with self._lock:
            failing = list(self._open.values())
            self._open.clear()
            for _ in failing:
                self._slots.release()
            self._idle.notify_all()
        for fail in failing:
            try:
                fail(message)
            except Exception:  # one client gone must not keep the others waiting
                logger.exception("answering a forward failed")
        return len(failing)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no forward is open (True), or ``timeout`` seconds (False)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._open, timeout=timeout)
