"""The thread that alone calls into Triton: calls run in order, cancellation is polled within a budget."""

from __future__ import annotations

import itertools
import threading
import time

from peftserve.triton.response_loop import CANCELLATION_CHECKS_PER_POLL, ResponseLoop


class FakeSender:
    """Counts ``is_cancelled`` calls (each a call into the server under Triton) and polls."""

    def __init__(self, polls: list[int]) -> None:
        self.cancelled = False
        self.asked_at: list[int] = []  # the poll numbers it was asked in
        self.polls = polls

    def is_cancelled(self) -> bool:
        self.asked_at.append(self.polls[0])
        return self.cancelled

    def send(self, response, flags: int = 0) -> None:
        pass


def run_on_loop(loop: ResponseLoop, function) -> None:
    done = threading.Event()
    loop.call(lambda: (function(), done.set()))
    assert done.wait(5)


def test_each_poll_asks_about_a_bounded_share_of_open_requests_and_every_one_in_turn() -> None:
    polls = [0]
    loop = ResponseLoop(final_flag=1, poll_seconds=3600)  # polled by hand below
    try:
        senders = [FakeSender(polls) for _ in range(2 * CANCELLATION_CHECKS_PER_POLL + 5)]
        events = [loop.watch(sender) for sender in senders]
        senders[40].cancelled = True
        rounds = -(-len(senders) // CANCELLATION_CHECKS_PER_POLL)  # 3
        for poll in range(2 * rounds):
            polls[0] = poll
            run_on_loop(loop, loop._poll_cancellation)
        asked = [poll for sender in senders for poll in sender.asked_at]
        for poll in range(2 * rounds):  # a full budget each time (one sender fewer once 40 cancelled)
            assert asked.count(poll) == CANCELLATION_CHECKS_PER_POLL
        for index, sender in enumerate(senders):  # in turn: never `rounds` polls without being asked
            if index != 40:
                gaps = [later - earlier for earlier, later in itertools.pairwise(sender.asked_at)]
                assert sender.asked_at[0] < rounds and max(gaps) <= rounds, (index, sender.asked_at)
                assert sender.asked_at[-1] >= rounds, (index, sender.asked_at)
        assert senders[40].asked_at == [1]  # the second poll reaches it; then it is no longer asked about
        assert events[40].is_set() and not any(event.is_set() for i, event in enumerate(events) if i != 40)
    finally:
        loop.close()


def test_a_final_response_ends_the_watch_and_a_failing_check_ends_only_its_own() -> None:
    polls = [0]
    loop = ResponseLoop(final_flag=1, poll_seconds=3600)
    try:
        finished, failing, open_ = FakeSender(polls), FakeSender(polls), FakeSender(polls)
        failing.is_cancelled = lambda: 1 / 0
        for sender in (finished, failing, open_):
            loop.watch(sender)
        loop.send(finished, "last", flags=1)
        run_on_loop(loop, loop._poll_cancellation)
        run_on_loop(loop, loop._poll_cancellation)
        assert finished.asked_at == [] and len(open_.asked_at) == 2
        assert list(loop._watched) == [id(open_)]
    finally:
        loop.close()


def test_cancellation_is_noticed_by_the_thread_on_its_own() -> None:
    loop = ResponseLoop(final_flag=1, poll_seconds=0.01)
    try:
        sender = FakeSender([0])
        event = loop.watch(sender)
        time.sleep(0.05)
        assert not event.is_set()
        sender.cancelled = True
        assert event.wait(5)
    finally:
        loop.close()
