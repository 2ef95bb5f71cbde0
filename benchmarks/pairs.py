"""CPU per round trip of one server ÷ another, side by side, in many short alternating pairs.

Both servers run at once, pinned to CPU 0, and ``tcpecho bench`` (on CPU 1) drives them in
turn in short runs: A B, B A, A B, ... (ABBA, so that a drift of the machine favours neither).
Each neighbouring pair gives one ratio of the servers' CPU time per round trip; the table gives
the median ratio and its quartiles. On a machine whose speed wanders (a shared VM), many short
pairs settle a ratio to a few percent where a few long runs of `compare.py` scatter by ±15 %.

With ``--together``, each pair is one run in which A and B are driven at once, each by a load
generator of its own (both on CPU 1), so the two are measured over the same window: a change
of the machine's speed then falls on both. Each of this VM's pairs then scatters by about ±1 %
rather than ±7 %. The servers share CPU 0 (and the generators CPU 1) in that run, so the
absolute µs/rt are not those of a server alone; the ratio is what it is for.

Servers are named as in `compare.py` (``tcpecho uvloop``, ``uvloop Protocol``, ``tcpecho
threads``, ``socketserver``, ...; ``NAME +metrics`` for a tcpecho variant with ``--metrics``;
``before: NAME`` with ``--before PATH``):

    python benchmarks/pairs.py "tcpecho uvloop" "uvloop Protocol" [--pairs 20] [--duration 1]
        [--scenarios 1x64,50x64,50x4096,10x65536,50x64x8] [--before PATH] [--together]
    python benchmarks/pairs.py "tcpecho threads" socketserver "tcpecho uvloop" "uvloop Protocol"

A name may be followed by more options for that server, which then runs with them:
``"tcpecho uvloop --idle-timeout 0"``. Several A B pairs may be given in one command: each is
measured in turn. Needs tcpecho[bench]
(and the extras the servers need) and taskset; it prints one line per pair to stderr, then
the table.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from compare import (  # benchmarks/, the script's own directory, is first on sys.path
    ROOT,
    SCENARIOS,
    SETTLE_S,
    Scenario,
    Server,
    bench,
    bench_report,
    cpu_time,
    label,
    machine,
    parse_scenarios,
    revision,
    running,
    servers,
    start_bench,
)


def measured(
    port: int, pid: int, scenario: Scenario, duration: float, extra: Sequence[str] = ()
) -> float:
    """One run: the server's CPU µs per round trip (``extra``: more options of bench's)."""
    time.sleep(SETTLE_S)
    start = cpu_time(pid)
    report = bench(port, scenario, duration, extra)
    cpu = cpu_time(pid).clock - start.clock
    if not report["ok"] or not report["round_trips"]:
        raise RuntimeError(f"bench failed: {report}")
    return float(cpu / report["round_trips"] * 1e6)


def measured_together(
    ports: dict[str, tuple[int, int]],
    order: Sequence[str],
    scenario: Scenario,
    duration: float,
    extra: Sequence[str] = (),
) -> dict[str, float]:
    """One run of every server at once, each driven by a load generator of its own (all on
    CLIENT_CPU): each server's CPU µs per round trip, over the same window."""
    time.sleep(SETTLE_S)
    start = {side: cpu_time(pid) for side, (_, pid) in ports.items()}
    runs = {side: start_bench(ports[side][0], scenario, duration, extra) for side in order}
    reports = {side: bench_report(run) for side, run in runs.items()}
    cpu = {side: cpu_time(pid).clock - start[side].clock for side, (_, pid) in ports.items()}
    for report in reports.values():
        if not report["ok"] or not report["round_trips"]:
            raise RuntimeError(f"bench failed: {report}")
    return {side: float(cpu[side] / reports[side]["round_trips"] * 1e6) for side in ports}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def compare_pair(
    a: Server,
    b: Server,
    scenario: Scenario,
    pairs: int,
    duration: float,
    warmup: float,
    extra: Sequence[str] = (),
    together: bool = False,
) -> tuple[list[float], list[float], list[float]]:
    """CPU µs/rt of ``a`` and of ``b`` in every run, and a ÷ b of every pair (``together``:
    both measured at once, see `measured_together`)."""
    with ExitStack() as stack:
        ports = {"a": stack.enter_context(running(a)), "b": stack.enter_context(running(b))}
        for port, _ in ports.values():
            bench(port, scenario, warmup, extra)
        cpu: dict[str, list[float]] = {"a": [], "b": []}
        ratios = []
        for pair in range(pairs):
            order = ("a", "b") if pair % 2 == 0 else ("b", "a")
            if together:
                run = measured_together(ports, order, scenario, duration, extra)
            else:
                run = {side: measured(*ports[side], scenario, duration, extra) for side in order}
            for side in order:
                cpu[side].append(run[side])
            ratios.append(run["a"] / run["b"])
            print(
                f"{a.name} ÷ {b.name}, {label(scenario)}, pair {pair + 1}: "
                f"{run['a']:.2f} ÷ {run['b']:.2f} CPU µs/rt = {ratios[-1]:.3f}",
                file=sys.stderr,
            )
    return cpu["a"], cpu["b"], ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="A B [A B ...]: servers named as in compare.py")
    parser.add_argument("--pairs", type=int, default=20, help="A/B pairs per scenario")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds a run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up, each")
    parser.add_argument("--scenarios", type=parse_scenarios, default=SCENARIOS)
    parser.add_argument("--before", type=Path, help="another checkout, for 'before: NAME'")
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="a new connection for every round trip (bench --reconnect): CPU per connection",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="drive A and B at once, each with its own load generator (see the docstring)",
    )
    args = parser.parse_args()
    if len(args.names) % 2:
        parser.error("give servers in pairs: A B [A B ...]")
    known = {server.name: server for server in servers(None, args.before, metrics=True)}
    for name in args.names:
        if name not in known:
            base = max((k for k in known if name.startswith(k + " -")), key=len, default=None)
            if base is None:
                parser.error(f"unknown server {name!r}; known: {', '.join(known)}")
            server = known[base]
            extra = shlex.split(name[len(base) :])
            known[name] = Server(name, [*server.command, *extra], server.pinned)
    rows = []
    for a_name, b_name in zip(args.names[::2], args.names[1::2], strict=True):
        for scenario in args.scenarios:
            a_cpu, b_cpu, ratios = compare_pair(
                known[a_name],
                known[b_name],
                scenario,
                args.pairs,
                args.duration,
                args.warmup,
                ["--reconnect"] if args.reconnect else [],
                args.together,
            )
            low, median, high = quartiles(ratios)
            rows.append(
                f"| {a_name} ÷ {b_name} | {label(scenario)} | {statistics.median(a_cpu):.2f} | "
                f"{statistics.median(b_cpu):.2f} | **{median:.3f}** ({low:.3f}–{high:.3f}) |"
            )
    header = "| A ÷ B | scenario | A: CPU µs/rt | B: CPU µs/rt | A ÷ B, median (quartiles) |"
    print_table(header, rows, args.pairs, args.duration, args.together)
    return 0


def print_table(
    header: str, rows: list[str], pairs: int, duration: float, together: bool = False
) -> None:
    """The Markdown table, after a line saying when, where and how it was measured."""
    how = "A and B at once" if together else "alternating ABBA"
    print(
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; tcpecho "
        f"{revision(ROOT)}; {pairs} pairs of {duration:g} s runs per case, "
        f"{how}; servers on CPU 0, load on CPU 1.\n"
    )
    print(header)
    print("|---|---|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
