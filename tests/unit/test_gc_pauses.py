"""The garbage collector's pauses, recorded by the collector's own callbacks and drained by the reporter."""

from __future__ import annotations

import gc
import threading
import time

from peftserve.gc_pauses import GcPauses
from peftserve.triton.response_loop import ResponseLoop


def test_each_collection_is_recorded_with_its_generation_and_duration_while_started() -> None:
    pauses = GcPauses()
    gc.collect(2)
    assert pauses.drain() == []  # not started yet
    pauses.start()
    pauses.start()  # once only
    try:
        objects = [[index] for index in range(200_000)]  # a full collection has these to walk
        started = time.perf_counter()
        gc.collect(2)
        full_collection = time.perf_counter() - started
        gc.collect(0)
        recorded = pauses.drain()
    finally:
        pauses.stop()
    del objects
    # Other threads may collect meanwhile (the session's engines): look for ours among theirs.
    full = [at for at, (generation, seconds) in enumerate(recorded) if generation == 2 and seconds <= full_collection]
    assert full and recorded[full[-1]][1] > 0, recorded
    assert any(generation == 0 for generation, _ in recorded[full[-1] + 1 :]), recorded
    assert pauses.drain() == []  # drained
    gc.collect(0)
    assert pauses.drain() == [] and pauses._observe not in gc.callbacks  # stopped


def test_the_response_thread_runs_its_periodic_call_and_survives_its_failures() -> None:
    calls = []
    ran_twice = threading.Event()

    def periodic() -> None:
        calls.append(time.perf_counter())
        if len(calls) == 2:
            ran_twice.set()
        raise RuntimeError("a failing report must not stop the thread")

    loop = ResponseLoop(final_flag=1, poll_seconds=0.01, every_poll=periodic)
    try:
        assert ran_twice.wait(5)
        done = threading.Event()
        loop.call(done.set)
        assert done.wait(5)  # still serving calls
    finally:
        loop.close()
