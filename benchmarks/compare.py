"""tcpecho's engines beside minimal peers and a C epoll server, measured in one run.

Each server runs pinned to CPU 0 and the load generator (``tcpecho bench``) to CPU 1, over
the same scenarios; runs are interleaved (A B C … A B C …) and repeated, and the table gives
medians with min–max and each server's ratio to the C server. Run it with ``scripts/compare``
(which installs what it needs) or, in an environment with tcpecho[bench]:

    python benchmarks/compare.py [--duration 3] [--repeats 2] [--json results.json]
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
SERVER_CPU, CLIENT_CPU = "0", "1"

# (connections, message size in bytes, messages in flight per connection). With one message in
# flight, 50 × 64 B is bound by the load generator's core (see docs/benchmarks.md); the
# pipelined run shows what each server itself can do.
SCENARIOS: list[tuple[int, int, int]] = [
    (1, 64, 1),
    (50, 64, 1),
    (50, 4096, 1),
    (10, 65536, 1),
    (50, 64, 8),
]


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    pinned: bool = True  # False: may use every CPU (reported apart)


def servers(c_binary: Path | None) -> list[Server]:
    py = sys.executable
    where = ["--host", "127.0.0.1", "--port", "0"]
    tcpecho = [py, str(ROOT / "tcp_server.py"), *where, "-q"]
    tcpecho += ["--max-connections", "10000"]
    found = [
        Server("tcpecho threads", [*tcpecho, "--engine", "threads"]),
        Server("tcpecho asyncio", [*tcpecho, "--engine", "asyncio", "--loop", "asyncio"]),
        Server("tcpecho uvloop", [*tcpecho, "--engine", "asyncio", "--loop", "uvloop"]),
        Server("seed-style threads", [py, str(PEERS / "seed_threads.py"), *where]),
        Server("socketserver", [py, str(PEERS / "socketserver_threads.py"), *where]),
        Server("asyncio streams", [py, str(PEERS / "asyncio_streams.py"), *where]),
        Server("asyncio Protocol", [py, str(PEERS / "asyncio_protocol.py"), *where]),
        Server("uvloop Protocol", [py, str(PEERS / "asyncio_protocol.py"), "--uvloop", *where]),
    ]
    if c_binary is not None:
        found.append(Server("C epoll", [str(c_binary), *where]))
    found.append(
        Server(
            "tcpecho uvloop --workers 2",
            [*tcpecho, "--engine", "asyncio", "--loop", "uvloop", "--workers", "2"],
            pinned=False,
        )
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
def running(server: Server) -> Iterator[int]:
    """Start ``server`` (pinned to SERVER_CPU), yield its port, stop it with SIGINT."""
    command = server.command
    if server.pinned:
        command = ["taskset", "-c", SERVER_CPU, *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        port = int(first.split()[-1].rsplit(":", 1)[-1])
        # Keep reading its output, so that a chatty server never blocks on a full pipe.
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
        yield port
    finally:
        drain = locals().get("drain")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.wait()


def measure(
    port: int, connections: int, size: int, pipeline: int, duration: float
) -> dict[str, Any]:
    command = ["taskset", "-c", CLIENT_CPU, sys.executable, "-m", "tcpecho", "bench"]
    command += [f"127.0.0.1:{port}", "-c", str(connections), "-s", str(size)]
    command += ["-p", str(pipeline)]
    command += ["-d", str(duration), "--warmup", "1", "--json", "--timeout", "30"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    if not result.stdout:
        raise RuntimeError(f"bench failed: {result.stderr.strip()}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [s["round_trips_per_s"] for s in samples]
    p99s = [s["latency_us"]["p99"] or 0 for s in samples]
    return {
        "round_trips_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "megabytes_per_s": statistics.median(s["megabytes_per_s"] for s in samples),
        "p99_us": statistics.median(p99s),
        "ok": all(s["ok"] for s in samples),
    }


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| server | scenario | round trips/s (min–max) | MB/s | p99 | × C |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for scenario, rows in results.items():
        base = rows.get("C epoll", {}).get("round_trips_per_s")
        for name, row in rows.items():
            ratio = f"{row['round_trips_per_s'] / base:.2f}" if base else "–"
            flag = "" if row["ok"] else " ⚠ errors"
            lines.append(
                f"| {name}{flag} | {scenario} | {row['round_trips_per_s']:,.0f} "
                f"({row['min']:,.0f}–{row['max']:,.0f}) | {row['megabytes_per_s']:.2f} | "
                f"{row['p99_us'] / 1000:.2f} ms | {ratio} |"
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
        ratios = []
        for scenario in scenarios:
            base = results[scenario].get("C epoll", {}).get("round_trips_per_s")
            row = results[scenario].get(name)
            ratios.append(row["round_trips_per_s"] / base if base and row else 0)
        positions = [i + index * width for i in range(len(scenarios))]
        axes.bar(positions, ratios, width, label=name)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds a run (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs a server and scenario")
    parser.add_argument("--only", action="append", help="servers whose name contains this")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--chart", help="write a PNG chart of the ratios here")
    args = parser.parse_args()
    if shutil.which("taskset") is None:
        print("taskset (util-linux) is needed to pin the server and the load", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        chosen = servers(build_c_server(Path(workdir)))
        if args.only:
            chosen = [s for s in chosen if any(o in s.name for o in args.only)]
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for repeat in range(args.repeats):
            for connections, size, pipeline in SCENARIOS:
                scenario = f"{connections} × {size} B"
                if pipeline > 1:
                    scenario += f", pipeline {pipeline}"
                for server in chosen:
                    with running(server) as port:
                        report = measure(port, connections, size, pipeline, args.duration)
                    samples.setdefault(scenario, {}).setdefault(server.name, []).append(report)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {scenario:>12}  {server.name:<28} "
                        f"{report['round_trips_per_s']:>10,.0f}/s  ok={report['ok']}",
                        file=sys.stderr,
                    )
    results = {
        scenario: {name: summarize(runs) for name, runs in by_server.items()}
        for scenario, by_server in samples.items()
    }
    text = table(results)
    header = (
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; "
        f"{args.repeats} interleaved runs of {args.duration:g} s (after 1 s warm-up) each, "
        f"median (min–max); server on CPU {SERVER_CPU}, load on CPU {CLIENT_CPU}."
    )
    print(header + "\n\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=1))
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
