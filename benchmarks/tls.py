"""TLS echo beside plain TCP, and beside HAProxy terminating TLS in front of the plain server.

Three servers, measured side by side in one run, in alternating order:

- ``plain``: ``tcpecho serve`` (the engine under test), plain TCP;
- ``tls``: the same with ``--tls-cert/--tls-key``;
- ``haproxy``: HAProxy (from the system's packages) terminating TLS, forwarding to the plain
  server. Its listening socket is bound here, on a port the OS picks, and handed to HAProxy as
  ``bind fd@N``: no port is guessed.

Each is measured two ways with ``tcpecho bench``: round trips/s over long-lived connections
(``-c 50 -s 64``) and connects/s with ``--reconnect`` (one round trip per connection: for the
TLS servers, a full handshake each). CPU per operation counts every process of the server
(tcpecho, and HAProxy too for the third). Certificates come from trustme (the test extra).

    .venv/bin/python benchmarks/tls.py --engine asyncio --repeats 3
    .venv/bin/python benchmarks/tls.py --engine threads --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare
from compare import cpu_time, machine
from server_process import ServerProcess

MODES = {"round trips": [], "connects": ["--reconnect"]}
SERVERS = ("plain", "tls", "haproxy")
CONNECTIONS = 50
SIZE = 64


def make_certificates(directory: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key", "combined")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["combined"])
    return paths


@contextmanager
def haproxy(backend_port: int, combined_pem: str, workdir: Path) -> Iterator[tuple[int, int]]:
    """HAProxy terminating TLS on a socket bound here; yields (port, pid)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    config = workdir / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend tls
    bind fd@{listener.fileno()} ssl crt {combined_pem}
    default_backend echo
backend echo
    server plain 127.0.0.1:{backend_port}
"""
    )
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        pass_fds=(listener.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = listener.getsockname()[1]
    listener.close()  # HAProxy holds its own copy
    try:
        _wait_serving(port, proc)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_serving(port: int, proc: subprocess.Popen[str]) -> None:
    """Until HAProxy answers a TLS handshake (its socket listens from the start, so a connect
    alone proves nothing)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                context.wrap_socket(sock).close()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("haproxy did not answer a TLS handshake in 10 s")


def bench(port: int, tls: bool, ca: str, extra: list[str], duration: float) -> dict[str, Any]:
    if tls:
        extra = [*extra, "--tls", "--ca", ca, "--server-name", "localhost"]
    return compare.bench(port, (CONNECTIONS, SIZE, 1), duration, extra)


def measure(
    name: str, port: int, pids: list[int], ca: str, mode: str, duration: float
) -> dict[str, float]:
    tls = name != "plain"
    bench(port, tls, ca, MODES[mode], 1.0)  # warm-up
    start = sum(cpu_time(pid).clock for pid in pids)
    report = bench(port, tls, ca, MODES[mode], duration)
    cpu = sum(cpu_time(pid).clock for pid in pids) - start
    if not report["ok"]:
        raise RuntimeError(f"{name} {mode}: bench failed: {report.get('errors')}")
    operations = report["connects"] if mode == "connects" else report["round_trips"]
    return {"per_second": operations / report["duration_s"], "cpu_us": cpu / operations * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="asyncio", choices=("threads", "asyncio"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    if shutil.which("haproxy") is None:
        print("benchmarks/tls.py: haproxy is not installed (apt-get install haproxy)")
        return 2
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        paths = make_certificates(Path(tmp))
        server_args = ["-q", "--engine", args.engine, "--max-per-address", "0"]
        server_args += ["--max-connections", "10000"]
        plain = stack.enter_context(ServerProcess(server_args, name="plain"))
        tls_args = [*server_args, "--tls-cert", paths["cert"], "--tls-key", paths["key"]]
        tls = stack.enter_context(ServerProcess(tls_args, name="tls"))
        plain.wait_listening()
        tls.wait_listening()
        proxy_port, proxy_pid = stack.enter_context(
            haproxy(plain.port, paths["combined"], Path(tmp))
        )
        targets = {
            "plain": (plain.port, [plain.pid]),
            "tls": (tls.port, [tls.pid]),
            "haproxy": (proxy_port, [proxy_pid, plain.pid]),
        }
        for repeat in range(args.repeats):
            order = SERVERS if repeat % 2 == 0 else tuple(reversed(SERVERS))
            for mode in MODES:
                for name in order:
                    port, pids = targets[name]
                    sample = measure(name, port, pids, paths["ca"], mode, args.duration)
                    samples.setdefault((name, mode), []).append(sample)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {name:8} {mode:12} "
                        f"{sample['per_second']:10,.0f}/s {sample['cpu_us']:8.1f} CPU µs",
                        file=sys.stderr,
                    )
    print(report(samples, args))
    return 0


def report(samples: dict[tuple[str, str], list[dict[str, float]]], args: Any) -> str:
    def median(name: str, mode: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[(name, mode)])

    def ratios(a: str, b: str, mode: str, key: str) -> str:
        values = [
            x[key] / y[key] for x, y in zip(samples[(a, mode)], samples[(b, mode)], strict=True)
        ]
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [
        f"TLS beside plain TCP and HAProxy, engine {args.engine}, {args.repeats} alternating "
        f"runs of {args.duration:g} s, {CONNECTIONS} connections × {SIZE} B; {machine()}",
        "",
        "| server | round trips/s | CPU µs/rt | connects/s | CPU µs/connect |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in SERVERS:
        lines.append(
            f"| {name} | {median(name, 'round trips', 'per_second'):,.0f} "
            f"| {median(name, 'round trips', 'cpu_us'):.1f} "
            f"| {median(name, 'connects', 'per_second'):,.0f} "
            f"| {median(name, 'connects', 'cpu_us'):.1f} |"
        )
    lines += [
        "",
        "| ratio | round trips/s | CPU/rt | connects/s | CPU/connect |",
        "|---|---|---|---|---|",
    ]
    for a, b in (("tls", "plain"), ("tls", "haproxy")):
        lines.append(
            f"| {a} ÷ {b} | {ratios(a, b, 'round trips', 'per_second')} "
            f"| {ratios(a, b, 'round trips', 'cpu_us')} "
            f"| {ratios(a, b, 'connects', 'per_second')} "
            f"| {ratios(a, b, 'connects', 'cpu_us')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
