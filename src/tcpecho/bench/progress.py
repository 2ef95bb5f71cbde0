"""The live progress line of ``tcpecho bench`` on a terminal.

With rich installed (extra ``bench``), a progress bar towards the end of the run; without it,
the same figures as one plain line redrawn in place. Either way it is redrawn once a second
from a thread of its own, and erased when the run ends.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from tcpecho.bench.loadgen import BenchOptions

# How often the line is redrawn.
INTERVAL = 1.0

# (round trips measured so far, seconds since the start) → the line's figures.
Status = Callable[[int, float], str]


def show(
    counters: Sequence[Any], options: BenchOptions, stop: threading.Event, out: TextIO
) -> None:
    """Redraw the line every `INTERVAL` until ``stop`` is set; ``counters`` hold each process's
    round trips measured (``multiprocessing.Value``)."""
    started = time.monotonic()
    last = (0, started)

    def status(done: int, now: float) -> str:
        nonlocal last
        rate = (done - last[0]) / (now - last[1]) if now > last[1] else 0.0
        last = (done, now)
        return f"{done:,} round trips measured, {rate:,.0f}/s"

    def sample() -> tuple[int, float]:
        return sum(counter.value for counter in counters), time.monotonic()

    if importlib.util.find_spec("rich") is not None:
        _show_rich(options, stop, out, sample, status, started)
    else:
        _show_plain(stop, out, sample, status, started)


def _show_plain(
    stop: threading.Event,
    out: TextIO,
    sample: Callable[[], tuple[int, float]],
    status: Status,
    started: float,
) -> None:
    while not stop.wait(INTERVAL):
        done, now = sample()
        out.write(f"\r{now - started:6.1f} s  {status(done, now)} \033[K")
        out.flush()
    out.write("\r\033[K")
    out.flush()


def _show_rich(
    options: BenchOptions,
    stop: threading.Event,
    out: TextIO,
    sample: Callable[[], tuple[int, float]],
    status: Status,
    started: float,
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # The bar counts seconds towards warm-up + duration, or requests towards --requests.
    by_requests = options.requests is not None
    total = (
        options.requests
        if options.requests is not None
        else options.warmup + (options.duration or 0.0)
    )
    bar = Progress(
        TextColumn("tcpecho bench"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(file=out),
        auto_refresh=False,  # redrawn here, once a second: no refresh thread beside the load
        transient=True,
    )
    task = bar.add_task("", total=total, status="connecting")
    with bar:
        while not stop.wait(INTERVAL):
            done, now = sample()
            bar.update(
                task, completed=done if by_requests else now - started, status=status(done, now)
            )
            bar.refresh()
