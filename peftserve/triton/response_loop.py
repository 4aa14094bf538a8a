"""One thread that makes every call into Triton's Python backend on behalf of the engine's threads.

The batching loop, the adapter loaders and the watcher produce responses and metric updates; none of them
calls ``pb_utils`` itself. They queue the call here, and this thread alone sends responses, records
metrics and asks Triton whether clients cancelled (Triton's own vLLM backend runs its responses the same
way). Cancellation is polled for the requests still open and handed to the engine as an event, so the
decoding loop reads a flag instead of calling into Triton between steps.

Each ``is_cancelled`` is a call into the server: measured in a stub, 43 us of CPU, and it gives up the GIL
while it waits, so with another thread running Python it took up to 5 ms (the interpreter's switch interval)
to get it back. Asking about every open request at every poll grows with the requests in flight (256 streams
every 20 ms: 12,800 calls a second, more than this thread can make, while responses queue behind them), so
a poll asks about at most :data:`CANCELLATION_CHECKS_PER_POLL` requests, taking them in turn: with ``n``
open, each is asked about at least every ``ceil(n / 32)`` polls (160 ms for 256 at the default 20 ms).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

logger = logging.getLogger("peftserve.triton")

CANCELLATION_CHECKS_PER_POLL = 32


class ResponseLoop:
    """Runs queued calls in order on one thread; polls cancellation of watched response senders."""

    def __init__(
        self, *, final_flag: int, poll_seconds: float = 0.02, every_poll: Callable[[], None] | None = None
    ) -> None:
        self.final_flag = final_flag
        self.poll_seconds = poll_seconds
        self.every_poll = every_poll  # also run on this thread every ``poll_seconds`` (gathered metrics)
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # Touched by this thread only; in the order they will next be asked about (round robin).
        self._watched: OrderedDict[int, tuple[object, threading.Event]] = OrderedDict()
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
        """An event set once the client of ``sender`` cancels (polled in turn with the other open senders)."""
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
        """Ask about the next :data:`CANCELLATION_CHECKS_PER_POLL` watched senders; those still open go to the
        back of the line."""
        for key in list(islice(self._watched, CANCELLATION_CHECKS_PER_POLL)):
            sender, event = self._watched[key]
            try:
                cancelled = sender.is_cancelled()
            except Exception:
                logger.exception("cancellation check failed")
                del self._watched[key]
                continue
            if cancelled:
                event.set()
                del self._watched[key]
            else:
                self._watched.move_to_end(key)

    def _run_every_poll(self) -> None:
        if self.every_poll is None:
            return
        try:
            self.every_poll()
        except Exception:
            logger.exception("a periodic call on the response thread failed")


def _nothing() -> None:
    pass
