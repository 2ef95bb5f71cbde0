"""The command line: ``tcpecho serve`` and ``tcpecho client``. It parses and calls, nothing more."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tcpecho import __version__, bench, client, config, log, supervisor
from tcpecho.bench import report as bench_report
from tcpecho.bench.loadgen import BenchOptions, loop_name
from tcpecho.bench.payload import MIN_SIZE
from tcpecho.config import CONFIG_FILE_ENV, OPTIONS, Option
from tcpecho.errors import (
    AddressInUse,
    AddressNotAvailable,
    BindPermissionDenied,
    ConfigError,
    ConnectionRefused,
    HostNotFound,
    InheritedSocketError,
    TcpEchoError,
)

# Exit codes (the table is in README.md); errors.py sets each error's code.
EXIT_OK = 0
EXIT_BENCH_FAILED = 1  # tcpecho bench: a mismatch or a failed connection
EXIT_INTERRUPTED = 130

_HINTS: dict[type[TcpEchoError], str] = {
    AddressInUse: "Is another instance running? Choose another port with --port.",
    BindPermissionDenied: "Ports below 1024 need root or CAP_NET_BIND_SERVICE; "
    "choose a port of 1024 or more with --port.",
    AddressNotAvailable: "Is that an address of this machine? "
    "--host 0.0.0.0 listens on every interface.",
    HostNotFound: "Check the name given to --host.",
    InheritedSocketError: "tcpecho serves TCP only: in the socket unit, use ListenStream= "
    "with an IP address and port.",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tcpecho`` with ``argv`` (default: the process's arguments); return the exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except TcpEchoError as exc:
        hint = next((h for kind, h in _HINTS.items() if isinstance(exc, kind)), "")
        print(f"Error: {exc}. {hint}".rstrip(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the signal handlers are in place, or in the client
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcpecho",
        description="A TCP echo server and client: every byte a client sends comes back.",
        allow_abbrev=False,
    )
    add_version(parser)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_serve_arguments(
        commands.add_parser(
            "serve",
            help="run the echo server",
            description="Run the echo server in the foreground. Ctrl-C or SIGTERM stops it "
            "gracefully; a second Ctrl-C stops it at once.",
            allow_abbrev=False,
        )
    )
    add_client_arguments(
        commands.add_parser(
            "client",
            help="talk to an echo server",
            description="Send lines to an echo server and print the replies: interactive on "
            "a terminal (type 'exit' to quit), one reply per input line on a pipe.",
            allow_abbrev=False,
        )
    )
    add_bench_arguments(
        commands.add_parser(
            "bench",
            help="measure an echo server, checking every byte",
            description="Open connections to an echo server, keep messages in flight, and "
            "check every echoed byte. Reports round trips/s, MB/s and latency percentiles; "
            "exits 1 if any byte did not match or any connection failed.",
            allow_abbrev=False,
        )
    )
    return parser


def add_version(parser: argparse.ArgumentParser) -> None:
    # On every subcommand too, so that `python3 tcp_server.py --version` works.
    parser.add_argument("-V", "--version", action="version", version=f"tcpecho {__version__}")


def check_port(port: int) -> int:
    """``port`` when it is a TCP port a client can reach; else `ConfigError`. (The OS would
    quietly take 70000 as 70000 - 65536.)"""
    if not 1 <= port <= 65535:
        raise ConfigError("--port", port, "must be 1 to 65535")
    return port


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_version(parser)
    parser.set_defaults(run=run_bench)
    parser.add_argument(
        "target", metavar="HOST:PORT", help="the echo server to measure; [::1]:PORT for IPv6"
    )
    parser.add_argument(
        "-c", "--connections", type=int, default=50, metavar="N", help="(default: %(default)s)"
    )
    parser.add_argument(
        "-s",
        "--size",
        type=int,
        default=64,
        metavar="BYTES",
        help=f"message size, at least {MIN_SIZE} (default: %(default)s)",
    )
    ending = parser.add_mutually_exclusive_group()
    ending.add_argument(
        "-d",
        "--duration",
        type=float,
        metavar="SECONDS",
        help="measure for this long, after the warm-up (default: 10)",
    )
    ending.add_argument(
        "-n", "--requests", type=int, metavar="N", help="measure this many round trips in all"
    )
    parser.add_argument(
        "-p",
        "--pipeline",
        type=int,
        default=1,
        metavar="D",
        help="messages each connection keeps in flight (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="run, check, but do not count, for this long first (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        metavar="PER_SECOND",
        help="open loop: send this many messages per second in all, evenly spaced, and "
        "measure latency from when each was due (no coordinated omission)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a connect, or on a server that sends nothing back (default: %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="spread the connections over P processes (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the payload pattern (default: %(default)s)"
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="each connection sends one message, reads its echo, closes and connects again: "
        "measures connects (and TLS handshakes) per second",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (schema: docs)")
    parser.add_argument("--hist-file", metavar="PATH", help="write the HdrHistogram log here")
    add_tls_arguments(parser)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve options, made from their declaration (`tcpecho.config.OPTIONS`).

    None has a default here: an option is in the namespace only when given, so that the
    environment and the file can fill the rest (`run_serve`).
    """
    add_version(parser)
    parser.set_defaults(run=run_serve)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        groups[option.group].add_argument(
            *option.flags,
            dest=option.name,
            default=argparse.SUPPRESS,
            help=_help(option).replace("%", "%%"),
            **_argument_kind(option),
        )
    sources = parser.add_argument_group("configuration")
    sources.add_argument(
        "--config",
        metavar="FILE",
        help=f"read options from this TOML file (default: ${CONFIG_FILE_ENV}, if set); "
        "the command line wins over the environment (TCPECHO_<OPTION>), which wins over the file",
    )
    sources.add_argument(
        "--print-config",
        action="store_true",
        help="print the configuration as TOML, with where each value came from, and exit",
    )


def _help(option: Option) -> str:
    repeatable = "repeatable; " if option.type.repeatable else ""
    return f"{option.help} ({repeatable}default: {option.describe_default()})"


def _argument_kind(option: Option) -> dict[str, Any]:
    """add_argument's keywords for the type of ``option``."""
    value_type = option.type
    if value_type.base is bool:
        return {"action": argparse.BooleanOptionalAction}
    kind: dict[str, Any] = {"metavar": option.metavar}
    if value_type.choices:
        kind.update(choices=value_type.choices, metavar=None)
    elif value_type.base is not str:
        kind.update(type=value_type.base)
    if value_type.repeatable:
        kind.update(action="append")
    return kind


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    add_version(parser)
    parser.set_defaults(run=run_client)
    parser.add_argument(
        "--host", default=client.DEFAULT_HOST, help="server address (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        metavar="PORT",
        type=int,
        default=client.DEFAULT_PORT,
        help="server port (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=client.DEFAULT_TIMEOUT,
        help="seconds to wait to connect (TLS handshake included) and for each reply "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--greeting",
        action="store_true",
        help="the server greets first (tcpecho serve --greeting info): print its line, then send",
    )
    add_tls_arguments(parser)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's and the bench's options for TLS and for sending a PROXY header."""
    group = parser.add_argument_group("TLS and the PROXY protocol")
    group.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS (1.2 or later); the server's certificate and name are checked",
    )
    group.add_argument(
        "--ca", metavar="FILE", help="trust the CAs in this PEM file (default: the system's)"
    )
    group.add_argument("--cert", metavar="FILE", help="present this client certificate (PEM)")
    group.add_argument(
        "--key", metavar="FILE", help="the client certificate's key (default: in --cert's file)"
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name to ask for (SNI) and to check the certificate against (default: the host)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="do not check the server's certificate or name (a warning says so)",
    )
    group.add_argument(
        "--send-proxy",
        choices=client.PROXY_VERSIONS,
        help="send a PROXY protocol header with this connection's addresses first, before "
        "TLS, as a load balancer would",
    )


def client_tls(args: argparse.Namespace, command: str) -> client.ClientTLS | None:
    """The TLS options given, or None without --tls; `ConfigError` for one given without it.
    With --insecure, warns on stderr."""
    if not args.tls:
        for option in ("ca", "cert", "key", "server_name", "insecure"):
            value = getattr(args, option)
            if value not in (None, False):
                name = "--" + option.replace("_", "-")
                raise ConfigError(name, value, "it applies only with --tls")
        return None
    if args.insecure:
        print(
            f"tcpecho {command}: warning: --insecure: the server's certificate and name are "
            "not checked",
            file=sys.stderr,
        )
    return client.ClientTLS(args.ca, args.cert, args.key, args.server_name, args.insecure)


def run_serve(args: argparse.Namespace) -> int:
    given = {
        option.name: tuple(value) if isinstance(value, list) else value
        for option in OPTIONS
        if (value := getattr(args, option.name, None)) is not None
    }
    resolved = config.resolve(given, os.environ, args.config)
    config.forget_systemd(os.environ)
    if args.print_config:
        sys.stdout.write(config.to_toml(resolved))
        return EXIT_OK
    log.configure(resolved.config.log_level, resolved.config.log_format)
    supervisor.serve(resolved.config)
    return EXIT_OK


def run_bench(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("target", args.target, "give it as HOST:PORT ([HOST]:PORT for IPv6)")
    options = BenchOptions(
        host=host.strip("[]"),
        port=check_port(int(port)),
        connections=args.connections,
        size=args.size,
        duration=None if args.requests else (10.0 if args.duration is None else args.duration),
        requests=args.requests,
        pipeline=args.pipeline,
        warmup=args.warmup,
        rate=args.rate,
        timeout=args.timeout,
        processes=args.processes,
        seed=args.seed,
        tls=client_tls(args, "bench"),
        send_proxy=args.send_proxy,
        reconnect=args.reconnect,
    )
    bench.check_extra()
    if loop_name() == "asyncio":
        print(
            "tcpecho bench: uvloop is not installed, so the load generator runs on asyncio's "
            "loop and drives fewer round trips (pip install 'tcpecho[bench]')",
            file=sys.stderr,
        )
    report = bench.run(
        options,
        hist_file=args.hist_file,
        progress=None if args.json else bench.progress_stream(),
    )
    if args.json:
        bench_report.write_json(report, sys.stdout)
    else:
        bench_report.write_text(report, sys.stdout)
    return EXIT_OK if report["ok"] else EXIT_BENCH_FAILED


def run_client(args: argparse.Namespace) -> int:
    check_port(args.port)
    host = args.host.strip("[]")  # [::1] as well as ::1
    tls = client_tls(args, "client")
    echo_client = client.EchoClient(
        host,
        args.port,
        args.timeout,
        ssl_context=None if tls is None else tls.context(),
        server_hostname=None if tls is None else tls.server_name,
        send_proxy=args.send_proxy,
    )
    try:
        echo_client.connect()
    except ConnectionRefused:
        # The seed's words, exactly.
        print(f"Error: Connection refused. Is the server running on {args.host}:{args.port}?")
        return ConnectionRefused.exit_code
    if args.greeting:
        try:
            sys.stdout.buffer.write(echo_client.read_reply())
            sys.stdout.flush()
        except (OSError, client.ReplyIncomplete):
            print("Error: the server sent no greeting line", file=sys.stderr)
            return 1
    if sys.stdin.isatty():
        return client.run_interactive(echo_client, sys.stdin, sys.stdout)
    return client.run_script(echo_client, sys.stdin.buffer, sys.stdout.buffer)
