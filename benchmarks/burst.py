"""A burst of connects: how fast does each engine take thousands of clients at once, and does
the kernel's listen queue overflow meanwhile?

For each engine, and ``--runs`` times, it starts a server (``server_process.py``: ``python -m
tcpecho serve -q``, ``--max-connections`` and ``--max-per-address`` raised to the clients,
``--backlog 4096``), starts ``--clients`` non-blocking connects at once (every one before the
first completes), sends a line of its own on each as it connects, and waits until every one
has its exact echo back. It reports how long that took and, from the kernel's counters
(/proc/net/netstat, /proc/net/snmp, over the run, for the whole machine), how often a listen
queue overflowed and how many SYNs were sent again: a connect the listen queue has no room
for waits for a SYN retry (1 s, then 3 s, 7 s, …), and an acknowledged connection left too
long in the kernel's queue is dropped, which its client sees as a reset.

``--busy N`` runs N processes that only spin, beside it, for a machine under load: on 2
cores, the threads engine's accept thread once fell behind the burst there (docs/benchmarks.md,
"The threads engine in a burst of connects"). It exits 1 when a client failed or got a wrong
echo. Linux only (/proc). From the repository, no install needed:

    .venv/bin/python benchmarks/burst.py --engines threads --busy 3 --runs 3
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from server_process import ServerProcess

ENGINES = {"threads": ["--engine", "threads"], "asyncio": ["--engine", "asyncio"]}
COUNTERS = ("ListenOverflows", "TCPSynRetrans")
# Descriptors beyond one per client, for this process and the server.
FD_MARGIN = 256


def kernel_counters() -> dict[str, int]:
    """The TCP counters of /proc/net/netstat and /proc/net/snmp, by name."""
    counters: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            pairs = zip(names.split()[1:], values.split()[1:], strict=True)
            counters.update((name, int(value)) for name, value in pairs)
    return counters


def connect_and_echo(port: int, clients: int, timeout: float) -> None:
    """``clients`` connects at once, each sending a line of its own once connected; returns
    once every one has its exact echo. Raises AssertionError on a failure or after
    ``timeout``."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    received: dict[int, bytes] = {}
    try:
        for index in range(clients):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE, index)
        deadline = time.monotonic() + timeout
        waiting = clients
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, f"{waiting} of {clients} clients without their echo after {timeout} s"
            for key, _ in selector.select(min(left, 1.0)):
                index, sock = key.data, socks[key.data]
                line = b"client %d\n" % index
                if index not in received:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert not error, f"client {index}: connect failed (errno {error})"
                    sock.send(line)
                    received[index] = b""
                    selector.modify(sock, selectors.EVENT_READ, index)
                    continue
                data = sock.recv(4096)  # a reset raises ConnectionResetError
                assert data, f"client {index}: closed after {received[index]!r}"
                received[index] += data
                if len(received[index]) >= len(line):
                    assert received[index] == line, f"client {index}: {received[index]!r}"
                    selector.unregister(sock)
                    waiting -= 1
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def one_run(engine: str, clients: int, timeout: float) -> dict[str, object]:
    limits = [f"--max-connections={clients}", f"--max-per-address={clients}"]
    args = [*ENGINES[engine], "-q", "--backlog", "4096", *limits]
    with ServerProcess(args, name=engine) as server:
        server.wait_listening()
        before = kernel_counters()
        started = time.monotonic()
        try:
            connect_and_echo(server.port, clients, timeout)
            outcome: str = "all echoed"
        except (AssertionError, OSError) as exc:
            outcome = f"FAILED: {exc!r}"
        took = time.monotonic() - started
        after = kernel_counters()
    changes = {name: after.get(name, 0) - before.get(name, 0) for name in COUNTERS}
    return {"engine": engine, "seconds": round(took, 2), "outcome": outcome, **changes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="processes that spin meanwhile")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    needed = 2 * args.clients + FD_MARGIN
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < needed:
        print(f"the hard RLIMIT_NOFILE is {hard}; this run needs {needed}", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it

    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
    ]
    failed = False
    print(f"{args.clients} connects at once, {args.busy} busy processes beside")
    print("| engine | all echoed after | listen queue overflows | SYN retries | outcome |")
    print("|---|---:|---:|---:|---|")
    try:
        for _ in range(args.runs):
            for engine in args.engines:
                run = one_run(engine, args.clients, args.timeout)
                failed = failed or run["outcome"] != "all echoed"
                print(
                    f"| {engine} | {run['seconds']} s | {run['ListenOverflows']} "
                    f"| {run['TCPSynRetrans']} | {run['outcome']} |",
                    flush=True,
                )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
