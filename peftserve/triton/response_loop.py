"""One thread that makes every call into Triton's Python backend on behalf of the engine's threads.

The batching loop, the adapter loaders and the watcher produce responses and metric updates; none of them
calls ``pb_utils`` itself. They queue the call here, and this thread alone sends responses, records
metrics and asks Triton whether clients cancelled (Triton's own vLLM backend runs its responses the same
way). Cancellation is polled for the requests still open and handed to the engine as an event, so the
decoding loop reads a flag instead of calling into Triton between steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("peftserve.triton")


class ResponseLoop:
    """Runs queued calls in order on one thread; polls cancellation of watched response senders."""

    def __init__(
        self, *, final_flag: int, poll_seconds: float = 0.02, every_poll: Callable[[], None] | None = None
    ) -> None:
        self.final_flag = final_flag
        self.poll_seconds = poll_seconds
        self.every_poll = every_poll  # also run on this thread every ``poll_seconds`` (gathered metrics)
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._watched: dict[int, tuple[object, threading.Event]] = {}  # touched by this thread only
        self._thread = threading.Thread(target=self._run, name="triton-responses", daemon=True)
        self._thread.start()

    def call(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the response thread (thread-safe, returns at once)."""
        self._calls.put(function)

    def send(self, sender, response, flags: int = 0) -> None:
        """Send a response; a final one also stops the cancellation watch of its sender."""

        def run() -> None:
            sender.send(response, flags=flags)
            if flags & self.final_flag:
                self._watched.pop(id(sender), None)

        self.call(run)

    def watch(self, sender) -> threading.Event:
        """An event set once the client of ``sender`` cancels (checked every ``poll_seconds``)."""
        event = threading.Event()
        self.call(lambda: self._watched.__setitem__(id(sender), (sender, event)))
        return event

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        polled = time.monotonic()
        while True:
            try:
                function = self._calls.get(timeout=self.poll_seconds)
            except queue.Empty:
                function = _nothing
            if function is None:
                return
            try:
                function()
            except Exception:
                logger.exception("a call into Triton failed")
            if time.monotonic() - polled >= self.poll_seconds:  # also under a steady stream of sends
                self._poll_cancellation()
                self._run_every_poll()
                polled = time.monotonic()

    def _poll_cancellation(self) -> None:
        for key, (sender, event) in list(self._watched.items()):
            try:
                if sender.is_cancelled():
                    event.set()
                    del self._watched[key]
            except Exception:
                logger.exception("cancellation check failed")
                del self._watched[key]

    def _run_every_poll(self) -> None:
        if self.every_poll is None:
            return
        try:
            self.every_poll()
        except Exception:
            logger.exception("a periodic call on the response thread failed")


def _nothing() -> None:
    pass
