"""What ``--metrics`` costs the echo path: CPU per round trip, metrics on ÷ off, side by side.

For each engine, two servers run at once, the same but for ``--metrics 127.0.0.1:0``, both
pinned to CPU 0, and ``tcpecho bench`` (on CPU 1) drives them in turn, in short runs:
on, off, off, on, on, off, ... (ABBA, so that a drift of the machine favours neither). Each
pair of neighbouring runs gives one ratio of the servers' CPU time per round trip; the table
gives the median ratio with its quartiles, over many pairs. Short alternating runs on servers
that stay up make the ratio robust to a machine whose speed wanders (other work on it), which
a few long runs are not.

    python benchmarks/metrics_overhead.py [--pairs 12] [--duration 1.5]
                                          [--scenarios 1x64,50x64x8] [--engines threads,...]

Needs tcpecho[bench,metrics] and taskset; it prints one line per run to stderr and the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from compare import ROOT, Server, label, parse_scenarios  # benchmarks/ is first on sys.path
from pairs import compare_pair, print_table, quartiles

ENGINES = {
    "threads": ["--engine", "threads"],
    "asyncio": ["--engine", "asyncio", "--loop", "asyncio"],
    "uvloop": ["--engine", "asyncio", "--loop", "uvloop"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12, help="on/off pairs per case")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds a run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up, each")
    parser.add_argument("--scenarios", type=parse_scenarios, default=[(1, 64, 1), (50, 64, 8)])
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    py = sys.executable
    common = ["--host", "127.0.0.1", "--port", "0", "-q", "--max-connections", "10000"]
    rows = []
    for engine in args.engines.split(","):
        flags = [*common, *ENGINES[engine]]
        off = Server(f"{engine}", [py, str(ROOT / "tcp_server.py"), *flags])
        on = Server(f"{engine} +metrics", [*off.command, "--metrics", "127.0.0.1:0"])
        for scenario in args.scenarios:
            on_cpu, off_cpu, ratios = compare_pair(
                on, off, scenario, args.pairs, args.duration, args.warmup
            )
            low, median, high = quartiles(ratios)
            rows.append(
                f"| {engine} | {label(scenario)} | {statistics.median(off_cpu):.2f} | "
                f"{statistics.median(on_cpu):.2f} | **{median:.3f}** "
                f"({low:.3f}–{high:.3f}) |"
            )
    header = "| engine | scenario | off: CPU µs/rt | on: CPU µs/rt | on ÷ off, median (quartiles) |"
    print_table(header, rows, args.pairs, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
