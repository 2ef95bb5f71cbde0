"""One frozen configuration, validated once, shared by every part of the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tcpecho.errors import ConfigError
from tcpecho.protocol import (
    DEFAULT_CONFIRM_PREFIX,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LINE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    MAX_LINE_LENGTH,
    AccessList,
    Framing,
    Greeting,
    Network,
    ProxyMode,
    ReplyMode,
    SessionSettings,
    parse_network,
)

EngineName = Literal["threads", "asyncio"]
LoopName = Literal["auto", "asyncio", "uvloop"]
LogFormat = Literal["console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

ENGINES: tuple[EngineName, ...] = get_args(EngineName)
LOOPS: tuple[LoopName, ...] = get_args(LoopName)
FRAMINGS: tuple[Framing, ...] = get_args(Framing)
REPLY_MODES: tuple[ReplyMode, ...] = get_args(ReplyMode)
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
PROXY_MODES: tuple[ProxyMode, ...] = get_args(ProxyMode)
GREETINGS: tuple[Greeting, ...] = get_args(Greeting)

# The seed's address: every interface, port 65432.
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 65432
# How long a stopping server lets connections finish echoing what they were sent.
DEFAULT_DRAIN_TIMEOUT = 5.0
# Large enough for a burst of thousands of simultaneous connects (gunicorn uses 2048); the
# kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 2048
# The connection limits and timeouts are defined, with their reasons, beside the code that
# enforces them: protocol/admission.py and protocol/session.py.


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a server needs to run. Raises `ConfigError` when a value is out of range."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    engine: EngineName = "threads"
    loop: LoopName = "auto"
    framing: Framing = "raw"
    reply: ReplyMode = "echo"
    confirm_prefix: str = DEFAULT_CONFIRM_PREFIX
    max_line_length: int = MAX_LINE_LENGTH
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    backlog: int = DEFAULT_BACKLOG
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    line_timeout: float = DEFAULT_LINE_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    proxy_protocol: ProxyMode = "off"
    proxy_trusted: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    greeting: Greeting = "off"
    workers: int = 1
    # Set by the supervisor for its worker processes: the worker's number (0: no workers).
    worker: int = 0
    # Listen on these already-listening sockets instead of binding host and port: the
    # supervisor's, inherited by its workers across fork, so that the accept queue outlives
    # any worker (systemd's socket activation can pass its descriptors the same way).
    listen_fds: tuple[int, ...] = ()
    log_level: LogLevel = "info"
    log_format: LogFormat = "console"
    log_messages: bool = True

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "--port", self.port, "must be 0 to 65535")
        _choice("--engine", self.engine, ENGINES)
        _choice("--loop", self.loop, LOOPS)
        _choice("--framing", self.framing, FRAMINGS)
        _choice("--reply", self.reply, REPLY_MODES)
        _choice("--log-format", self.log_format, LOG_FORMATS)
        _choice("--log-level", self.log_level, LOG_LEVELS)
        _require(
            self.max_line_length >= 1,
            "--max-line-length",
            self.max_line_length,
            "must be at least 1",
        )
        _require(
            self.drain_timeout >= 0, "--drain-timeout", self.drain_timeout, "must be at least 0"
        )
        _require(self.backlog >= 1, "--backlog", self.backlog, "must be at least 1")
        _require(
            self.max_connections >= 1,
            "--max-connections",
            self.max_connections,
            "must be at least 1",
        )
        _require(
            self.write_timeout > 0, "--write-timeout", self.write_timeout, "must be more than 0"
        )
        _require(
            self.max_per_address >= 0,
            "--max-per-address",
            self.max_per_address,
            "must be at least 0 (0: no limit)",
        )
        _require(self.idle_timeout >= 0, "--idle-timeout", self.idle_timeout, "must be 0 or more")
        _require(self.line_timeout >= 0, "--line-timeout", self.line_timeout, "must be 0 or more")
        _require(self.workers >= 1, "--workers", self.workers, "must be at least 1")
        _choice("--proxy-protocol", self.proxy_protocol, PROXY_MODES)
        _choice("--greeting", self.greeting, GREETINGS)
        _require(
            self.proxy_protocol == "off" or bool(self.proxy_trusted),
            "--proxy-protocol",
            self.proxy_protocol,
            "give the proxies allowed to send a header with --proxy-trusted CIDR",
        )
        _require(
            (self.tls_cert is None) == (self.tls_key is None),
            "--tls-cert" if self.tls_key else "--tls-key",
            self.tls_cert or self.tls_key,
            "--tls-cert and --tls-key go together",
        )
        _require(
            self.tls_client_ca is None or self.tls_cert is not None,
            "--tls-client-ca",
            self.tls_client_ca,
            "needs --tls-cert and --tls-key",
        )
        _require(
            self.tls_handshake_timeout > 0,
            "--tls-handshake-timeout",
            self.tls_handshake_timeout,
            "must be more than 0",
        )
        self.access_list()  # raises ConfigError for a bad CIDR
        self.trusted_proxies()
        try:
            self.confirm_prefix.encode()
        except UnicodeEncodeError as exc:
            raise ConfigError("--confirm-prefix", self.confirm_prefix, str(exc)) from exc

    def access_list(self) -> AccessList:
        """``allow`` and ``deny`` parsed. Raises `ConfigError` for an entry that is no network."""
        return AccessList(
            allow=tuple(_network("--allow", text) for text in self.allow),
            deny=tuple(_network("--deny", text) for text in self.deny),
        )

    def trusted_proxies(self) -> tuple[Network, ...]:
        return tuple(_network("--proxy-trusted", text) for text in self.proxy_trusted)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address to listen on."""
        return (self.host,)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def session_settings(self) -> SessionSettings:
        return SessionSettings(
            framing=self.framing,
            reply=self.reply,
            confirm_prefix=self.confirm_prefix.encode(),
            max_line_length=self.max_line_length,
            idle_timeout=self.idle_timeout,
            line_timeout=self.line_timeout,
            write_timeout=self.write_timeout,
            proxy=self.proxy_protocol,
            tls=self.tls,
            handshake_timeout=self.tls_handshake_timeout,
            greeting=self.greeting,
        )


def _network(option: str, text: str) -> Network:
    try:
        return parse_network(text)
    except ValueError as exc:
        raise ConfigError(option, text, "not an IP address or CIDR network") from exc


def _require(ok: bool, option: str, value: object, reason: str) -> None:
    if not ok:
        raise ConfigError(option, value, reason)


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, option, value, f"choose from {', '.join(choices)}")
