"""``tcpecho bench``: a load generator that checks every echoed byte.

`run` opens the connections (spread over ``processes`` processes), runs them, and returns the
report (see `report.build`). It needs the ``bench`` extra for HdrHistogram.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import sys
import threading
import time
from typing import Any, TextIO

from tcpecho.bench import progress as live
from tcpecho.bench import report
from tcpecho.bench.loadgen import BenchOptions, ShareResult, new_loop, run_share
from tcpecho.errors import MissingExtra

__all__ = ["BenchOptions", "run"]


def run(
    options: BenchOptions, *, hist_file: str | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark; return the report. ``progress``: a terminal for the live line.

    Raises `MissingExtra` when hdrhistogram is not installed, `TLSConfigError` when a TLS
    file cannot be used.
    """
    check_extra()
    if options.tls is not None:
        options.tls.context()  # a bad file is one error here, not one per process
    started = time.time()
    counters = [multiprocessing.get_context("fork").Value("q", 0) for _ in range(options.processes)]
    stop_progress = threading.Event()
    shower = threading.Thread(
        target=live.show, args=(counters, options, stop_progress, progress), daemon=True
    )
    if progress is not None:
        shower.start()
    try:
        results = _run_processes(options, counters)
    finally:
        stop_progress.set()
        if shower.is_alive():
            shower.join()
    merged = report.merge(results)
    hist = report.histogram(merged.latencies_us)
    if hist_file:
        report.write_hist_log(hist_file, hist, started, time.time())
    return report.build(options, merged, hist)


def check_extra() -> None:
    """Raise `MissingExtra` unless hdrhistogram, which the report needs, is installed."""
    if importlib.util.find_spec("hdrh") is None:
        raise MissingExtra("tcpecho bench", "hdrhistogram", "bench")


def _shares(options: BenchOptions) -> list[tuple[int, int]]:
    base, extra = divmod(options.connections, options.processes)
    shares, first = [], 0
    for index in range(options.processes):
        count = base + (1 if index < extra else 0)
        shares.append((first, count))
        first += count
    return shares


def _run_one(options: BenchOptions, first: int, count: int, counter: Any) -> ShareResult:
    loop = new_loop()
    try:
        return loop.run_until_complete(run_share(options, first, count, counter))
    finally:
        loop.close()


def _child(options: BenchOptions, first: int, count: int, counter: Any, pipe: Any) -> None:
    pipe.send(_run_one(options, first, count, counter))
    pipe.close()


def _run_processes(options: BenchOptions, counters: list[Any]) -> list[ShareResult]:
    shares = _shares(options)
    if options.processes == 1:
        return [_run_one(options, *shares[0], counters[0])]
    context = multiprocessing.get_context("fork")
    children = []
    for (first, count), counter in zip(shares, counters, strict=True):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(options, first, count, counter, sender))
        child.start()
        sender.close()
        children.append((child, receiver))
    results = []
    for child, receiver in children:
        results.append(receiver.recv())
        child.join()
    return results


def progress_stream() -> TextIO | None:
    """stderr when it is a terminal (the live line), else None: nothing on a pipe."""
    return sys.stderr if sys.stderr.isatty() else None
