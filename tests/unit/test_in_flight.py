"""peft_llm's open forwards: each answered once, by its thread or by fail_all, and slots given back."""

from __future__ import annotations

import threading

from peftserve.triton.in_flight import InFlight


def test_each_forward_is_answered_once_by_its_thread_or_by_fail_all() -> None:
    in_flight = InFlight(slots=3)
    failed: list[tuple[str, str]] = []
    done = in_flight.enter(fail=lambda message: failed.append(("done", message)))
    stuck = [in_flight.enter(fail=lambda message, n=n: failed.append((f"stuck{n}", message))) for n in range(2)]
    assert in_flight.leave(done)  # its own thread answers
    assert in_flight.fail_all("engine died") == 2
    assert sorted(failed) == [("stuck0", "engine died"), ("stuck1", "engine died")]
    assert not any(in_flight.leave(key) for key in stuck)  # the blocked threads, if they return, send nothing
    assert in_flight.fail_all("again") == 0
    assert in_flight.wait_idle(timeout=0)


def test_slots_of_failed_forwards_are_given_back_and_enter_waits_for_a_free_one() -> None:
    in_flight = InFlight(slots=2)
    for _ in range(2):
        in_flight.enter(fail=lambda message: None)
    entered = threading.Event()
    waiting = threading.Thread(target=lambda: (in_flight.enter(fail=lambda m: None), entered.set()))
    waiting.start()
    assert not entered.wait(0.2)  # both slots taken
    in_flight.fail_all("engine died")
    assert entered.wait(5)
    waiting.join()
    assert not in_flight.wait_idle(timeout=0.05)  # the new forward is open


def test_a_failing_answer_does_not_keep_the_others_unanswered() -> None:
    in_flight = InFlight(slots=2)
    answered = []

    def broken(message: str) -> None:
        raise RuntimeError("client gone")

    in_flight.enter(fail=broken)
    in_flight.enter(fail=answered.append)
    assert in_flight.fail_all("engine died") == 2
    assert answered == ["engine died"]


def test_steps_that_need_the_request_run_only_while_the_forward_is_open() -> None:
    in_flight = InFlight(slots=2)
    key = in_flight.enter(fail=lambda message: None)
    ran = []
    assert in_flight.while_open(key, lambda: ran.append("barrier"))
    in_flight.fail_all("engine died")
    assert not in_flight.while_open(key, lambda: ran.append("too late"))
    assert ran == ["barrier"]
