"""The stdlib loop's connection timers (`TimerThread`): each callback runs on the loop's own
thread, in deadline order, never before its deadline; a cancelled one never runs; cancelled
ones do not pile up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic

from tcpecho.engines.aio import TimerThread


@contextmanager
def timers_on_a_loop() -> Iterator[tuple[asyncio.AbstractEventLoop, TimerThread]]:
    loop = asyncio.new_event_loop()
    timers = TimerThread(loop)
    try:
        yield loop, timers
    finally:
        timers.close()
        loop.close()


def run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], limit: float) -> None:
    """Run ``loop`` until ``done()``, checking every 10 ms, for at most ``limit`` seconds."""

    async def wait() -> None:
        deadline = monotonic() + limit
        while not done():
            if monotonic() > deadline:
                raise TimeoutError("the timers did not run in time")
            await asyncio.sleep(0.01)

    loop.run_until_complete(wait())


def test_timers_run_on_the_loop_thread_in_deadline_order_and_never_early() -> None:
    ran: list[tuple[str, float, threading.Thread]] = []
    with timers_on_a_loop() as (loop, timers):
        start = monotonic()
        deadlines = {"third": start + 0.3, "first": start + 0.1, "second": start + 0.2}

        def record(name: str) -> Callable[[], None]:
            return lambda: ran.append((name, monotonic(), threading.current_thread()))

        for name, deadline in deadlines.items():
            timers.call_at(deadline, record(name))
        run_until(loop, lambda: len(ran) == 3, limit=5)
    assert [name for name, _, _ in ran] == ["first", "second", "third"]
    for name, when, thread in ran:
        assert when >= deadlines[name]
        assert thread is threading.current_thread()  # the loop ran here


def test_a_cancelled_timer_never_runs_and_the_others_still_do() -> None:
    ran: list[str] = []
    with timers_on_a_loop() as (loop, timers):
        now = monotonic()
        timers.call_at(now + 0.05, lambda: ran.append("kept"))
        timers.call_at(now + 0.02, lambda: ran.append("cancelled")).cancel()
        timers.call_at(now + 0.1, lambda: ran.append("last"))
        run_until(loop, lambda: "last" in ran, limit=5)
    assert ran == ["kept", "last"]


def test_a_callback_that_fails_stops_none_of_the_others() -> None:
    ran: list[str] = []
    errors: list[BaseException | None] = []

    def fails() -> None:
        raise RuntimeError("boom")

    with timers_on_a_loop() as (loop, timers):
        loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
        now = monotonic()
        timers.call_at(now + 0.05, fails)
        timers.call_at(now + 0.05, lambda: ran.append("same deadline"))
        run_until(loop, lambda: bool(ran), limit=5)
    assert ran == ["same deadline"]
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)


def test_a_sooner_timer_wakes_the_thread_that_sleeps_for_a_later_one() -> None:
    ran: list[str] = []
    with timers_on_a_loop() as (loop, timers):
        timers.call_at(monotonic() + 3600, lambda: ran.append("an hour later"))
        timers.call_at(monotonic() + 0.01, lambda: ran.append("first"))
        # Once that one ran, the thread has gone back to sleep for the hour: it hands a timer
        # over with the lock held, and lets go of the lock only in its wait.
        run_until(loop, lambda: ran == ["first"], limit=5)
        soon = monotonic() + 0.05
        timers.call_at(soon, lambda: ran.append("soon"))
        run_until(loop, lambda: "soon" in ran, limit=5)
    assert ran == ["first", "soon"]


def test_cancelled_timers_do_not_pile_up() -> None:
    # Connections that open and close each cancel a timer an idle timeout away: without the
    # clear-out, the heap would hold every one of them for that long.
    with timers_on_a_loop() as (_, timers):
        for _ in range(1000):
            timers.call_at(monotonic() + 3600, lambda: None).cancel()
        assert len(timers._heap) <= 64 + 1


def test_a_timer_at_infinity_leaves_the_others_running() -> None:
    # --idle-timeout inf is a valid setting: its deadline is infinite, and a wait that long
    # is more than the platform allows. The thread must go on serving the timers after it.
    ran: list[str] = []
    with timers_on_a_loop() as (loop, timers):
        timers.call_at(float("inf"), lambda: ran.append("never"))
        timers.call_at(monotonic() + 1e10, lambda: ran.append("in three centuries"))
        timers.call_at(monotonic() + 0.02, lambda: ran.append("soon"))
        run_until(loop, lambda: ran == ["soon"], limit=5)
        assert timers._thread is not None
        assert timers._thread.is_alive()


def test_a_cancelled_timer_lets_go_of_its_callback() -> None:
    # The heap keeps a cancelled timer until its deadline or a clear-out: what its callback
    # holds (a closed connection) must not stay with it.
    with timers_on_a_loop() as (_, timers):
        owner = [bytearray(1 << 20)]
        timer = timers.call_at(monotonic() + 3600, owner.clear)
        timer.cancel()
        assert timer.callback is None
