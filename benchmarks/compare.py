"""tcpecho's engines beside minimal peers and a C epoll server, measured in one run.

Each server runs pinned to CPU 0 and the load generator (``tcpecho bench``) to CPU 1, over
the same scenarios; runs are interleaved (A B C … A B C …) and repeated, and the table gives
medians with min–max of round trips/s, of the server's CPU time per round trip, and each
server's ratio to the C server. ``--before PATH`` adds every tcpecho variant as served by
another checkout (its own ``tcp_server.py``), run beside this one's, and a table of the
after ÷ before ratios. ``--metrics`` adds every tcpecho variant with ``--metrics
127.0.0.1:0`` too, run beside the same variant without, and a table of the on ÷ off ratios
(what the Prometheus counters cost the echo path). Run it with ``scripts/compare`` (which
installs what it needs) or, in an environment with tcpecho[bench]:

    python benchmarks/compare.py [--duration 3] [--warmup 1] [--repeats 2]
                                 [--only NAME,...] [--scenarios 1x64,50x64x8,...]
                                 [--before PATH] [--metrics] [--json results.json]
                                 [--markdown table.md] [--chart ratios.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
SERVER_CPU, CLIENT_CPU = "0", "1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of the CPU times in /proc/PID/stat
# Between the warm-up run and the measured one, so that the server has finished closing the
# warm-up's connections before its CPU time is read.
SETTLE_S = 0.2

# (connections, message size in bytes, messages in flight per connection). With one message in
# flight, 50 × 64 B is bound by the load generator's core (see docs/benchmarks.md); the
# pipelined run shows what each server itself can do.
Scenario = tuple[int, int, int]
SCENARIOS: list[Scenario] = [
    (1, 64, 1),
    (50, 64, 1),
    (50, 4096, 1),
    (10, 65536, 1),
    (50, 64, 8),
]

BEFORE = "before: "  # the prefix of the servers run from the --before checkout
METRICS = " +metrics"  # the suffix of the servers run with --metrics
# Each tcpecho engine and the minimal peer of its family, for the CPU-per-round-trip ratios.
REFERENCES = [
    ("tcpecho threads", "socketserver"),
    ("tcpecho asyncio", "asyncio Protocol"),
    ("tcpecho uvloop", "uvloop Protocol"),
]


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    pinned: bool = True  # False: may use every CPU (reported apart)


def servers(c_binary: Path | None, before: Path | None, metrics: bool = False) -> list[Server]:
    py = sys.executable
    where = ["--host", "127.0.0.1", "--port", "0"]
    common = [*where, "-q", "--max-connections", "10000"]

    def tcpecho(name: str, flags: list[str], pinned: bool = True) -> list[Server]:
        # The before variant comes right after its after, so the two run side by side.
        found = [Server(name, [py, str(ROOT / "tcp_server.py"), *common, *flags], pinned)]
        if metrics:
            command = [py, str(ROOT / "tcp_server.py"), *common, *flags]
            command += ["--metrics", "127.0.0.1:0"]
            found.append(Server(name + METRICS, command, pinned))
        if before is not None:
            command = [py, str(before / "tcp_server.py"), *common, *flags]
            found.append(Server(BEFORE + name, command, pinned))
        return found

    found = [
        *tcpecho("tcpecho threads", ["--engine", "threads"]),
        *tcpecho("tcpecho asyncio", ["--engine", "asyncio", "--loop", "asyncio"]),
        *tcpecho("tcpecho uvloop", ["--engine", "asyncio", "--loop", "uvloop"]),
        Server("seed-style threads", [py, str(PEERS / "seed_threads.py"), *where]),
        Server("socketserver", [py, str(PEERS / "socketserver_threads.py"), *where]),
        Server("asyncio streams", [py, str(PEERS / "asyncio_streams.py"), *where]),
        Server("asyncio Protocol", [py, str(PEERS / "asyncio_protocol.py"), *where]),
        Server("uvloop Protocol", [py, str(PEERS / "asyncio_protocol.py"), "--uvloop", *where]),
    ]
    if c_binary is not None:
        found.append(Server("C epoll", [str(c_binary), *where]))
    found += tcpecho(
        "tcpecho uvloop --workers 2",
        ["--engine", "asyncio", "--loop", "uvloop", "--workers", "2"],
        pinned=False,
    )
    return found


def build_c_server(workdir: Path) -> Path | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc not found: the C epoll server is left out", file=sys.stderr)
        return None
    binary = workdir / "epoll_echo"
    subprocess.run([gcc, "-O2", "-o", str(binary), str(PEERS / "epoll_echo.c")], check=True)
    return binary


@contextmanager
def running(server: Server) -> Iterator[tuple[int, int]]:
    """Start ``server`` (pinned to SERVER_CPU), yield its port and pid, stop it with SIGINT."""
    command = server.command
    if server.pinned:
        # taskset execs the server, so the pid is the server's own.
        command = ["taskset", "-c", SERVER_CPU, *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    drain: subprocess.Popen[bytes] | None = None
    try:
        first = proc.stdout.readline()
        if not first:  # it said why on stderr, e.g. a --before checkout without some option
            raise RuntimeError(f"{server.name} did not start: {' '.join(server.command)}")
        port = int(first.split()[-1].rsplit(":", 1)[-1])
        # Keep reading its output, so that a chatty server never blocks on a full pipe.
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.wait()


class CpuTime(NamedTuple):
    """CPU time in seconds, read two ways (see `cpu_time`)."""

    clock: float  # from each process's CPU clock, to the nanosecond
    ticks: float  # /proc/PID/stat utime + stime, in clock ticks (10 ms here)


def _process_clock(pid: int) -> int:
    # The clock id of another process's CPU-time clock, as glibc's clock_getcpuclockid makes
    # it: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) in the kernel's posix-timers.h.
    return ((~pid) << 3) | 2


def cpu_time(root: int) -> CpuTime:
    """User + system CPU time used so far by process ``root`` and all its descendants.

    /proc/PID/stat's utime and stime (fields 14 and 15) count every thread of a process, those
    that have exited too (the threads engine's per-connection threads), but only in clock
    ticks: a window's difference can be 20 ms off, 4 % of a 2 s run where the server is busy a
    quarter of the time (1 × 64 B). So each process's CPU clock (clock_gettime on its
    CPUCLOCK_SCHED clock, the nanosecond runtime the kernel splits into utime and stime) is
    read too, and is what the tables use; the ticks stay in the JSON as a check.

    Descendants (the workers of ``--workers 2``) are found by the parent pid of every
    process, since /proc/PID/task/*/children needs a kernel option not every kernel has. One
    that exits within the window still counts, through its parent's cutime and cstime (fields
    16 and 17) once it is reaped; those only grow, so what they held before cancels out.
    """
    parents: dict[int, int] = {}
    own: dict[int, int] = {}
    reaped: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it exited since the listing
            continue
        # Field 2, the command name, is in parentheses and may itself hold spaces and ")".
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # field 4, ppid
        own[pid] = int(fields[11]) + int(fields[12])  # utime, stime
        reaped[pid] = int(fields[13]) + int(fields[14])  # cutime, cstime
    if root not in own:
        raise RuntimeError(f"server process {root} is gone")
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    clock, ticks, todo = 0.0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += children[pid]
        ticks += own[pid] + reaped[pid]
        try:
            clock += time.clock_gettime(_process_clock(pid))
        except OSError:  # gone since the scan, or a kernel that will not tell: its ticks
            clock += own[pid] / CLOCK_TICKS
        clock += reaped[pid] / CLOCK_TICKS
    return CpuTime(clock, ticks / CLOCK_TICKS)


def bench(
    port: int, scenario: Scenario, duration: float, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """One run of ``tcpecho bench`` with no warm-up of its own: every round trip counts.
    ``extra``: more of its options (``--tls``, ``--reconnect``)."""
    return bench_report(start_bench(port, scenario, duration, extra))


def start_bench(
    port: int, scenario: Scenario, duration: float, extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """`bench`, started: its report comes from `bench_report`."""
    connections, size, pipeline = scenario
    command = ["taskset", "-c", CLIENT_CPU, sys.executable, "-m", "tcpecho", "bench"]
    command += [f"127.0.0.1:{port}", "-c", str(connections), "-s", str(size)]
    command += ["-p", str(pipeline)]
    command += ["-d", str(duration), "--warmup", "0", "--json", "--timeout", "30", *extra]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def bench_report(run: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON report of a run `start_bench` started, once it ends."""
    stdout, stderr = run.communicate()
    if not stdout:
        raise RuntimeError(f"bench failed: {stderr.strip()}")
    report: dict[str, Any] = json.loads(stdout)
    return report


def measure(
    port: int, pid: int, scenario: Scenario, duration: float, warmup: float
) -> dict[str, Any]:
    """A warm-up run, then the measured run with the server's CPU time read around it.

    bench's own warm-up starts at an instant this process cannot see (after the generator has
    started and connected), so the warm-up is a run of its own on the same server, and the
    measured run counts from its first round trip (``--warmup 0``). The CPU time is read just
    before the measured run starts and just after it exits: besides the counted round trips
    it holds accepting and closing that run's connections and the few replies still in flight
    when its window closes, small beside a window of seconds (docs/benchmarks.md).
    """
    warm = bench(port, scenario, warmup) if warmup > 0 else None
    time.sleep(SETTLE_S)
    start = cpu_time(pid)
    report = bench(port, scenario, duration)
    end = cpu_time(pid)
    cpu = end.clock - start.clock
    round_trips = report["round_trips"]
    report["warmup_ok"] = warm is None or bool(warm["ok"])
    report["server_cpu_s"] = cpu
    report["server_cpu_s_in_ticks"] = end.ticks - start.ticks
    report["cpu_us_per_round_trip"] = cpu / round_trips * 1e6 if round_trips else None
    return report


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of ``values`` (all None when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [s["round_trips_per_s"] for s in samples]
    p99s = [s["latency_us"]["p99"] or 0 for s in samples]
    cpu = spread([s["cpu_us_per_round_trip"] for s in samples if s["cpu_us_per_round_trip"]])
    return {
        "round_trips_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "megabytes_per_s": statistics.median(s["megabytes_per_s"] for s in samples),
        "p99_us": statistics.median(p99s),
        "cpu_us_per_round_trip": cpu["median"],
        "cpu_min": cpu["min"],
        "cpu_max": cpu["max"],
        "ok": all(s["ok"] and s["warmup_ok"] for s in samples),
    }


def ratio_pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """(label, numerator, denominator) of every ratio the servers run make possible."""
    pairs = [
        (f"{name}: after ÷ before", name, BEFORE + name) for name in names if BEFORE + name in names
    ]
    pairs += [
        (f"{name}: metrics on ÷ off", name + METRICS, name)
        for name in names
        if name + METRICS in names
    ]
    for engine, peer in REFERENCES:
        for side in (engine, BEFORE + engine):
            if side in names and peer in names:
                pairs.append((f"{side} ÷ {peer}", side, peer))
    return pairs


def ratios(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """CPU µs/rt and round trips/s of each pair, as ratios taken per repeat (the two runs of a
    repeat ran side by side, so the machine's drift between repeats cancels), then median and
    min–max over the repeats."""
    names = list(dict.fromkeys(n for by_server in samples.values() for n in by_server))
    rows = []
    for title, top, bottom in ratio_pairs(names):
        for scenario, by_server in samples.items():
            if top not in by_server or bottom not in by_server:
                continue
            below = {s["repeat"]: s for s in by_server[bottom]}
            pairs = [(a, below[a["repeat"]]) for a in by_server[top] if a["repeat"] in below]
            cpu = [
                a["cpu_us_per_round_trip"] / b["cpu_us_per_round_trip"]
                for a, b in pairs
                if a["cpu_us_per_round_trip"] and b["cpu_us_per_round_trip"]
            ]
            rate = [
                a["round_trips_per_s"] / b["round_trips_per_s"]
                for a, b in pairs
                if b["round_trips_per_s"]
            ]
            rows.append(
                {
                    "ratio": title,
                    "scenario": scenario,
                    "cpu_us_per_round_trip": spread(cpu),
                    "round_trips_per_s": spread(rate),
                }
            )
    return rows


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| server | scenario | round trips/s (min–max) | CPU µs/rt (min–max) | MB/s | p99 | × C |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for scenario, rows in results.items():
        base = rows.get("C epoll", {}).get("round_trips_per_s")
        for name, row in rows.items():
            ratio = f"{row['round_trips_per_s'] / base:.2f}" if base else "–"
            flag = "" if row["ok"] else " ⚠ errors"
            cpu = row["cpu_us_per_round_trip"]
            cpu_text = (
                "–" if cpu is None else f"{cpu:.2f} ({row['cpu_min']:.2f}–{row['cpu_max']:.2f})"
            )
            lines.append(
                f"| {name}{flag} | {scenario} | {row['round_trips_per_s']:,.0f} "
                f"({row['min']:,.0f}–{row['max']:,.0f}) | {cpu_text} | "
                f"{row['megabytes_per_s']:.2f} | {row['p99_us'] / 1000:.2f} ms | {ratio} |"
            )
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    def cell(values: dict[str, Any]) -> str:
        if values["median"] is None:
            return "–"
        return f"{values['median']:.2f} ({values['min']:.2f}–{values['max']:.2f})"

    lines = [
        "| ratio | scenario | CPU µs/rt (min–max) | round trips/s (min–max) |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ratio']} | {row['scenario']} | {cell(row['cpu_us_per_round_trip'])} | "
            f"{cell(row['round_trips_per_s'])} |"
        )
    return "\n".join(lines)


def chart(results: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return
    scenarios = list(results)
    names = [n for n in next(iter(results.values())) if n != "C epoll"]
    figure, axes = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        heights = []
        for scenario in scenarios:
            base = results[scenario].get("C epoll", {}).get("round_trips_per_s")
            row = results[scenario].get(name)
            heights.append(row["round_trips_per_s"] / base if base and row else 0)
        positions = [i + index * width for i in range(len(scenarios))]
        axes.bar(positions, heights, width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(scenarios))], scenarios)
    axes.set_ylabel("round trips/s, ratio to the C epoll server")
    axes.set_title("tcpecho and peers, one server core, closed loop")
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def revision(checkout: Path) -> str:
    """The checkout's commit (with ``-dirty`` when it has changes), or its path alone."""
    result = subprocess.run(
        ["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=10"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = result.stdout.strip()
    return f"{checkout} ({commit})" if result.returncode == 0 and commit else str(checkout)


def label(scenario: Scenario) -> str:
    connections, size, pipeline = scenario
    text = f"{connections} × {size} B"
    return f"{text}, pipeline {pipeline}" if pipeline > 1 else text


def parse_scenarios(text: str) -> list[Scenario]:
    """``1x64,50x64x8``: connections × size in bytes [× messages in flight]."""
    found = []
    for item in text.split(","):
        parts = item.strip().lower().replace("×", "x").split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want CONNECTIONSxSIZE or CONNECTIONSxSIZExPIPELINE, e.g. 50x64x8"
            )
        found.append((numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 1))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds a run (default 3)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of a warm-up run before each measured run (default 1)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs a server and scenario")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME...]",
        help="only the servers whose name contains one of these (repeatable)",
    )
    parser.add_argument(
        "--scenarios",
        type=parse_scenarios,
        metavar="CxS[xP],...",
        help="connections x size [x pipeline], e.g. 1x64,50x64x8 (default: all five)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="PATH",
        help="another checkout (its own tcp_server.py): run every tcpecho variant from it too",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="run every tcpecho variant with --metrics too, beside the same one without",
    )
    parser.add_argument("--json", help="write the summary, the ratios and every sample here")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--chart", help="write a PNG chart of the ratios to C here")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if shutil.which("taskset") is None:
        print("taskset (util-linux) is needed to pin the server and the load", file=sys.stderr)
        return 2
    before: Path | None = args.before.resolve() if args.before else None
    if before is not None and not (before / "tcp_server.py").is_file():
        print(f"--before {before}: no tcp_server.py there", file=sys.stderr)
        return 2
    only = [o.strip() for group in args.only or [] for o in group.split(",") if o.strip()]
    scenarios: list[Scenario] = args.scenarios or SCENARIOS
    with tempfile.TemporaryDirectory() as workdir:
        wants_c = not only or any(o in "C epoll" for o in only)
        c_server = build_c_server(Path(workdir)) if wants_c else None
        chosen = servers(c_server, before, args.metrics)
        if only:
            chosen = [s for s in chosen if any(o in s.name for o in only)]
        if not chosen:
            print(f"--only {','.join(only)}: no server has such a name", file=sys.stderr)
            return 2
        runs = args.repeats * len(scenarios) * len(chosen)
        # Besides the run and its warm-up: starting the server and two generators, about 1 s.
        minutes = runs * (args.duration + args.warmup + SETTLE_S + 1.0) / 60
        print(f"{runs} runs, about {minutes:.0f} min", file=sys.stderr)
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for repeat in range(args.repeats):
            for scenario in scenarios:
                # Every other round runs in reverse (A B C, C B A, ...), so that a drift of
                # the machine during a round favours neither the first nor the last server.
                for server in chosen if repeat % 2 == 0 else chosen[::-1]:
                    with running(server) as (port, pid):
                        report = measure(port, pid, scenario, args.duration, args.warmup)
                    report["repeat"] = repeat
                    samples.setdefault(label(scenario), {}).setdefault(server.name, []).append(
                        report
                    )
                    cpu = report["cpu_us_per_round_trip"]
                    print(
                        f"[{repeat + 1}/{args.repeats}] {label(scenario):>12}  {server.name:<36} "
                        f"{report['round_trips_per_s']:>10,.0f}/s  "
                        f"{'–' if cpu is None else f'{cpu:.2f}':>6} CPU µs/rt  "
                        f"ok={report['ok'] and report['warmup_ok']}",
                        file=sys.stderr,
                    )
    results = {
        scenario: {name: summarize(runs) for name, runs in by_server.items()}
        for scenario, by_server in samples.items()
    }
    compared = ratios(samples)
    text = table(results)
    if compared:
        text += "\n\nRatios of runs side by side, per repeat, then median (min–max):\n\n"
        text += ratio_table(compared)
    header = (
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; "
        f"{args.repeats} interleaved runs of {args.duration:g} s each, "
        f"each after a {args.warmup:g} s warm-up run on the same server, median (min–max); "
        f"server on CPU {SERVER_CPU}, load on CPU {CLIENT_CPU}. CPU µs/rt: the server's user + "
        "system CPU time (all its threads and processes) over the measured run, ÷ its round "
        f"trips. tcpecho: {revision(ROOT)}."
    )
    if before is not None:
        header += f" before: {revision(before)}."
    print(header + "\n\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + text + "\n")
    if args.json:
        document = {
            "header": header,
            "summary": results,
            "ratios": compared,
            "samples": samples,
        }
        Path(args.json).write_text(json.dumps(document, indent=1))
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
