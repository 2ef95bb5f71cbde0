"""One frozen configuration, validated once, and the one declaration of the ``serve`` options.

`ServerConfig` holds everything a server needs. `OPTIONS` declares, once, each of its fields a
user may set: the flag, help, metavar and range; the type and default are the field's own. The
command line (cli.py), the environment (``TCPECHO_*``), the configuration file (TOML) and the
table in docs/configuration.md are all made from it, and `resolve` merges those sources:
command line over environment over file over defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from tcpecho.errors import ConfigError, ConfigFileError, UnknownOption
from tcpecho.protocol import (
    DEFAULT_CONFIRM_PREFIX,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_IPV6_PREFIX,
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

# TCPECHO_<OPTION> sets an option from the environment; TCPECHO_CONFIG names a file to read
# when --config is not given.
ENV_PREFIX = "TCPECHO_"
CONFIG_FILE_ENV = "TCPECHO_CONFIG"
# Where a value came from, in the words of --print-config. The others are "file PATH" and
# "env TCPECHO_X".
FROM_DEFAULT = "default"
FROM_COMMAND_LINE = "command line"
ENVIRONMENT = "the environment"

# What systemd (or anything speaking its protocols) passes a service in the environment:
# listening sockets (sd_listen_fds(3): LISTEN_FDS descriptors from 3 on, meant for the process
# LISTEN_PID, named by LISTEN_FDNAMES) and where to report readiness (sd_notify(3)).
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: descriptors 0 to 2 are stdin, stdout and stderr
SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a server needs to run. Raises `ConfigError` when a value is out of range.

    Each field but ``worker``, ``listen_fds`` and ``notify_socket`` is an option of ``tcpecho
    serve``, declared in `OPTIONS`. Built directly (a library, a test) it reads no file and no
    environment.
    """

    host: tuple[str, ...] = (DEFAULT_HOST,)
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
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
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
    # Listen on these already-listening sockets instead of binding host and port: those
    # systemd passed (socket activation, `read_systemd`), or the supervisor's, inherited by its
    # workers across fork, so that the accept queue outlives any worker.
    listen_fds: tuple[int, ...] = ()
    # Where to send sd_notify's READY=1 and STOPPING=1 (NOTIFY_SOCKET: a path, or @ and an
    # abstract name); "" sends nothing.
    notify_socket: str = ""
    log_level: LogLevel = "info"
    log_format: LogFormat = "console"
    quiet: bool = False
    metrics: str | None = None  # HOST:PORT of /metrics, /healthz and /readyz (None: off)

    def __post_init__(self) -> None:
        if isinstance(self.host, str):  # one address, as code (not a source) may give it
            object.__setattr__(self, "host", (self.host,))
        for option in OPTIONS:
            option.check(getattr(self, option.name))
        # What one option's value requires of others.
        _require(
            self.proxy_protocol == "off" or bool(self.proxy_trusted),
            "--proxy-protocol",
            self.proxy_protocol,
            "give the proxies allowed to send a header with --proxy-trusted CIDR",
        )
        # Each error names the option that was given, so that it names where it was given.
        _require(
            self.tls_key is None or self.tls_cert is not None,
            "--tls-key",
            self.tls_key,
            "needs --tls-cert",
        )
        _require(
            self.tls_cert is None or self.tls_key is not None,
            "--tls-cert",
            self.tls_cert,
            "needs --tls-key",
        )
        _require(
            self.tls_client_ca is None or self.tls_cert is not None,
            "--tls-client-ca",
            self.tls_client_ca,
            "needs --tls-cert and --tls-key",
        )
        # The metrics port is never the echo port: a scraper or a health check must not land
        # on the echo server, nor a client on the metrics. (Port 0 for both: two OS picks.)
        _require(
            self.metrics is None or self.port == 0 or self.metrics_address[1] != self.port,
            "--metrics",
            self.metrics,
            f"the metrics port must not be the echo port (--port {self.port})",
        )

    def access_list(self) -> AccessList:
        """``allow`` and ``deny`` parsed. Raises `ConfigError` for an entry that is no network."""
        return AccessList(
            allow=tuple(_network("--allow", text) for text in self.allow),
            deny=tuple(_network("--deny", text) for text in self.deny),
        )

    def trusted_proxies(self) -> tuple[Network, ...]:
        return tuple(_network("--proxy-trusted", text) for text in self.proxy_trusted)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def metrics_address(self) -> tuple[str, int]:
        """``metrics`` as (host, port). Only when ``metrics`` is set."""
        assert self.metrics is not None
        return parse_host_port(self.metrics)

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


@dataclass(frozen=True, slots=True)
class ValueType:
    """What an option holds, read from its ServerConfig field's annotation."""

    base: type  # int, float, str or bool: the value's type, or each item's in a list
    choices: tuple[str, ...] = ()  # from a Literal
    repeatable: bool = False  # tuple[base, ...]: a list, the option given once per item
    optional: bool = False  # base | None: None means unset


@dataclass(frozen=True, slots=True)
class Option:
    """One option of ``tcpecho serve``, declared once.

    ``name`` is the `ServerConfig` field it sets, whose annotation and default are the
    option's type and default. From the name come the long flag (``--max-connections``), the
    key in a configuration file (``max-connections``) and the environment variable
    (``TCPECHO_MAX_CONNECTIONS``). A ``Literal`` type gives the choices, ``tuple[str, ...]`` a
    repeatable option, ``bool`` a ``--x``/``--no-x`` flag, ``X | None`` an option that may be
    left unset.
    """

    name: str
    group: str  # the heading it is listed under in --help
    help: str  # plain text, one line of --help; the default is added to it
    metavar: str | None = None
    short: str | None = None  # such as "-q"
    # Bounds of a number: at_least and at_most are inclusive, more_than is not.
    at_least: float | None = None
    at_most: float | None = None
    more_than: float | None = None
    # Called with each value (each item of a list); a ValueError refuses it, with its message
    # as the reason.
    check_item: Callable[[str], object] | None = None
    # How --help and the docs show the default, when the value itself would not say what it
    # means (an empty list of allowed networks means every address).
    default_text: str | None = None
    # Added after the help in the docs table, where there is room (Markdown, in parentheses).
    details: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.key

    @property
    def key(self) -> str:
        return self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.short, self.flag) if self.short else (self.flag,)

    @property
    def type(self) -> ValueType:
        return _value_types()[self.name]

    @property
    def default(self) -> Any:
        return _defaults()[self.name]

    def check(self, value: object) -> None:
        """Raise `ConfigError` naming the flag if ``value`` (or an item of it) is not allowed.
        The type is not checked here: `from_text` and `from_toml` make values of the type."""
        items = value if self.type.repeatable and isinstance(value, tuple | list) else (value,)
        for item in items:
            reason = None if item is None else self._refusal(item)
            if reason:
                raise ConfigError(self.flag, item, reason)

    def _refusal(self, value: object) -> str | None:
        choices = self.type.choices
        if choices and value not in choices:
            return f"choose from {', '.join(choices)}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self._out_of_range(value)
        if self.check_item is not None and isinstance(value, str):
            try:
                self.check_item(value)
            except ValueError as exc:
                return str(exc)
        return None

    def _out_of_range(self, value: float) -> str | None:
        low, high, above = self.at_least, self.at_most, self.more_than
        if low is not None and high is not None and not low <= value <= high:
            return f"must be {_number(low)} to {_number(high)}"
        if low is not None and high is None and not value >= low:
            return f"must be at least {_number(low)}"
        if high is not None and low is None and not value <= high:
            return f"must be at most {_number(high)}"
        if above is not None and not value > above:
            return f"must be more than {_number(above)}"
        return None

    def from_text(self, text: str) -> Any:
        """The value that ``text`` (an environment variable) stands for: a list is split at
        commas and white space; an empty text unsets an optional value. Raises `ConfigError`."""
        value_type = self.type
        if value_type.repeatable:
            items = text.replace(",", " ").split()
            value: Any = tuple(self._item_from_text(item) for item in items)
        elif value_type.optional and not text:
            value = None
        else:
            value = self._item_from_text(text)
        self.check(value)
        return value

    def _item_from_text(self, text: str) -> object:
        base = self.type.base
        try:
            if base is bool:
                return _BOOLEANS[text.strip().lower()]
            if base is int or base is float:
                return base(text)
        except (KeyError, ValueError):
            words = ": use 1, 0, true, false, yes or no" if base is bool else ""
            raise ConfigError(self.flag, text, f"not {_NOUNS[base]}{words}") from None
        return text

    def from_toml(self, value: object) -> Any:
        """``value`` as read by tomllib, checked. Raises `ConfigError`."""
        if self.type.repeatable:
            if isinstance(value, str):  # one item: host = "::" as well as host = ["::"]
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(self.flag, value, f"must be an array, not {_toml_type(value)}")
            result: Any = tuple(self._item_from_toml(item) for item in value)
        else:
            result = self._item_from_toml(value)
        self.check(result)
        return result

    def _item_from_toml(self, value: object) -> object:
        base = self.type.base
        if base is float and type(value) is int:
            return float(value)
        if type(value) is not base:
            reason = f"must be {_NOUNS[base]}, not {_toml_type(value)}"
            raise ConfigError(self.flag, value, reason)
        return value

    def describe_default(self) -> str:
        """The default as --help and the docs show it."""
        if self.default_text is not None:
            return self.default_text
        return describe(self.default)


@cache
def _value_types() -> dict[str, ValueType]:
    hints = get_type_hints(ServerConfig)
    return {option.name: _value_type(hints[option.name]) for option in OPTIONS}


@cache
def _defaults() -> dict[str, Any]:
    return {field.name: field.default for field in dataclasses.fields(ServerConfig)}


def _value_type(annotation: Any) -> ValueType:
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(
        annotation
    )
    if optional:
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    repeatable = get_origin(annotation) is tuple
    if repeatable:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return ValueType(str, get_args(annotation), repeatable, optional)
    if annotation in (int, float, str, bool):
        return ValueType(annotation, (), repeatable, optional)
    raise TypeError(f"an option cannot be of type {annotation!r}")


def _encodable(text: str) -> None:
    text.encode()  # a UnicodeEncodeError is a ValueError


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:9100``) as (host, port). Raises
    ValueError saying what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError("give it as HOST:PORT, such as 127.0.0.1:9100 or [::1]:9100")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("put an IPv6 address in brackets: [::1]:9100")
    if not 0 <= int(port) <= 65535:
        raise ValueError("the port must be 0 to 65535")
    return host, int(port)


def _cidr(text: str) -> None:
    try:
        parse_network(text)
    except ValueError:
        raise ValueError("not an IP address or CIDR network") from None


# Every option of `tcpecho serve`, in the order of --help and of the docs table. To add one:
# a field in ServerConfig (its type and default) and an entry here.
OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        "where to listen",
        "address or name to listen on (repeatable: every one is listened on)",
        details="(a name that resolves to several addresses, IPv4 and IPv6, listens on all; "
        "`::` takes IPv4 clients too, logged as plain IPv4, unless an IPv4 address is "
        "listened on as well; `::1` is IPv6 only)",
    ),
    Option(
        "port",
        "where to listen",
        "0 lets the OS pick; the banner shows the real port",
        metavar="PORT",
        at_least=0,
        at_most=65535,
    ),
    Option(
        "backlog",
        "where to listen",
        "listen queue, for bursts of connects",
        metavar="N",
        at_least=1,
        details="(the kernel caps it at `net.core.somaxconn`)",
    ),
    Option(
        "engine",
        "how to serve",
        "threads: a thread per client (the seed's); asyncio: one event loop",
        details="(see [Engines](#engines))",
    ),
    Option(
        "loop",
        "how to serve",
        "event loop of the asyncio engine; auto takes uvloop when installed",
        details="(`asyncio`: the stdlib loop; `uvloop` fails with one line when it is not "
        "installed)",
    ),
    Option(
        "workers",
        "how to serve",
        "processes sharing the port",
        metavar="N",
        at_least=1,
        details="(on one listening socket, which the supervisor opens and they inherit; a "
        "worker that dies is restarted; see [Workers](#workers))",
    ),
    Option(
        "framing",
        "what to reply",
        "raw: bytes as they arrive; line: messages end with \\n",
        details="(or `\\r\\n`)",
    ),
    Option(
        "reply",
        "what to reply",
        "echo: the exact bytes back; confirm: the prefix and the message",
    ),
    Option(
        "confirm_prefix",
        "what to reply",
        "what a confirmation starts with",
        metavar="TEXT",
        check_item=_encodable,
    ),
    Option(
        "max_line_length",
        "what to reply",
        "longest line in line framing, in bytes",
        metavar="BYTES",
        at_least=1,
        details="(the terminator not counted)",
    ),
    Option(
        "max_connections",
        "limits",
        "clients served at once; more get 'ERROR server busy'",
        metavar="N",
        at_least=1,
    ),
    Option(
        "max_per_address",
        "limits",
        "clients served at once from one address; more are refused; 0: no limit",
        metavar="N",
        at_least=0,
        details="(with `ERROR too many connections from your address`); raise it for a load "
        "test from one host, or behind a proxy that does not send the PROXY protocol",
    ),
    Option(
        "ipv6_prefix",
        "limits",
        "--max-per-address counts IPv6 clients per network of this prefix length; 128: per address",
        metavar="BITS",
        at_least=1,
        at_most=128,
        details="(a host usually has a whole /64: counted per address, one host could take "
        "256 places from each of its addresses)",
    ),
    Option(
        "allow",
        "limits",
        "serve only these addresses or networks",
        metavar="CIDR",
        check_item=_cidr,
        default_text="every address",
        details="(`10.0.0.0/8`, `2001:db8::/32`, or one address)",
    ),
    Option(
        "deny",
        "limits",
        "close connections from these at once, with no reply; wins over --allow",
        metavar="CIDR",
        check_item=_cidr,
        default_text="none",
    ),
    Option(
        "idle_timeout",
        "limits",
        "close a connection with nothing received and nothing to send for this long; 0: never",
        metavar="SECONDS",
        at_least=0,
        details="(five minutes leaves a person typing into `nc` time to think)",
    ),
    Option(
        "line_timeout",
        "limits",
        "line framing: a line must end this long after its first byte, or the client gets an "
        "error and is closed; 0: never",
        metavar="SECONDS",
        at_least=0,
        details="(however slowly its bytes come: this is what stops slowloris; the client "
        "gets `ERROR line timeout: no newline within 30s`, then the end; a terminal sends a "
        "whole line at once, so a person never meets it)",
    ),
    Option(
        "write_timeout",
        "limits",
        "seconds a client may leave replies unread before it is cut off",
        metavar="SECONDS",
        more_than=0,
        details="(while the server's writes to it are blocked)",
    ),
    Option(
        "drain_timeout",
        "limits",
        "seconds a stopping server lets connections finish",
        metavar="SECONDS",
        at_least=0,
        details="(see [Stopping](#stopping))",
    ),
    Option("tls_cert", "TLS", "serve TLS with this certificate (PEM)", metavar="FILE"),
    Option("tls_key", "TLS", "the certificate's private key (PEM)", metavar="FILE"),
    Option(
        "tls_client_ca",
        "TLS",
        "require a client certificate signed by a CA in this file (mutual TLS)",
        metavar="FILE",
    ),
    Option(
        "tls_handshake_timeout",
        "TLS",
        "close a client whose handshake is not done this long after it connected",
        metavar="SECONDS",
        more_than=0,
    ),
    Option(
        "proxy_protocol",
        "behind a proxy",
        "on: every connection starts with a PROXY header (v1 or v2) naming the real client; "
        "optional: with or without one",
    ),
    Option(
        "proxy_trusted",
        "behind a proxy",
        "the proxies allowed to send a PROXY header",
        metavar="CIDR",
        check_item=_cidr,
    ),
    Option(
        "greeting",
        "behind a proxy",
        "info: send one JSON line describing the connection first",
    ),
    Option("log_level", "logging", "how much to log"),
    Option(
        "log_format",
        "logging",
        "console: the seed's [TAG] lines; json: one object per line",
        details="(with `time`, `level`, `event`, `tag`, `message` and fields such as `peer`; "
        "every event and its fields: [docs/metrics.md](metrics.md#the-logs-events))",
    ),
    Option("quiet", "logging", "do not log each message received", short="-q"),
    Option(
        "metrics",
        "monitoring",
        "serve Prometheus metrics on /metrics, and /healthz and /readyz, at this address",
        metavar="HOST:PORT",
        check_item=parse_host_port,
        default_text="off",
        details="(never the echo port; port 0 lets the OS pick, and the `[METRICS]` line shows "
        "it; needs the `metrics` extra; see [docs/metrics.md](metrics.md))",
    ),
)

BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}
BY_KEY: Mapping[str, Option] = {option.key: option for option in OPTIONS}
BY_ENV: Mapping[str, Option] = {option.env: option for option in OPTIONS}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_NOUNS: Mapping[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
}


# Reading the sources


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """The configuration, and where each option's value came from: ``sources`` maps each
    option's name to "default", "file PATH", "env TCPECHO_X" or "command line"."""

    config: ServerConfig
    sources: Mapping[str, str]


def resolve(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
    *,
    pid: int | None = None,
) -> ResolvedConfig:
    """Merge every source: the command line over the environment over the file over defaults.

    ``command_line`` holds the options given on the command line, by field name, already of
    their types; ``config_file`` is --config (None: the file ``TCPECHO_CONFIG`` names, if
    any). Every value given is checked, even one that a higher source overrides. The sockets
    and notification socket systemd passes in ``environ`` are read too (`read_systemd`, for
    the process ``pid``, default this one). Raises `ConfigError` naming the option and its
    source, `ConfigFileError`.
    """
    path = config_file if config_file is not None else environ.get(CONFIG_FILE_ENV) or None
    values: dict[str, Any] = read_systemd(environ, os.getpid() if pid is None else pid)
    sources = {option.name: FROM_DEFAULT for option in OPTIONS}
    if path is not None:
        for name, value in read_file(path).items():
            values[name] = value
            sources[name] = f"file {path}"
    for var, (name, value) in read_environ(environ).items():
        values[name] = value
        sources[name] = f"env {var}"
    for name, value in command_line.items():
        values[name] = value
        sources[name] = FROM_COMMAND_LINE
    try:
        return ResolvedConfig(ServerConfig(**values), sources)
    except ConfigError as exc:
        raise _located(exc, sources) from None


def _located(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """An error of one option's value against another's (each alone was checked as it was
    read), renamed for where the option it names came from."""
    option = next((option for option in OPTIONS if option.flag == exc.option), None)
    source = sources[option.name] if option else FROM_DEFAULT
    if option is None or source in (FROM_DEFAULT, FROM_COMMAND_LINE):
        return exc
    if source.startswith("env "):
        return ConfigError(option.env, exc.value, exc.reason, ENVIRONMENT)
    return ConfigError(option.key, exc.value, exc.reason, source.removeprefix("file "))


def read_file(path: str) -> dict[str, Any]:
    """The options a TOML file sets, by field name. Its keys are the long options without
    ``--``, at the top level. Raises `ConfigFileError`, or `ConfigError` naming the file."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError(path, exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigFileError(path, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, f"invalid TOML: {exc}") from None
    values = {}
    for key, value in document.items():
        option = BY_KEY.get(key)
        if option is None:
            hint = "options go at the top level, not in a table" if isinstance(value, dict) else ""
            raise UnknownOption(key, value, _no_such_option(key, BY_KEY, hint), path)
        try:
            values[option.name] = option.from_toml(value)
        except ConfigError as exc:
            raise ConfigError(key, exc.value, exc.reason, path) from None
    return values


def read_environ(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """The options ``TCPECHO_*`` variables set: variable → (field name, value). Raises
    `ConfigError` naming the variable. ``TCPECHO_CONFIG`` names a file and is not read here."""
    values = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_FILE_ENV:
            continue
        option = BY_ENV.get(var)
        if option is None:
            raise UnknownOption(var, text, _no_such_option(var, BY_ENV), ENVIRONMENT)
        try:
            values[var] = (option.name, option.from_text(text))
        except ConfigError as exc:
            raise ConfigError(var, exc.value, exc.reason, ENVIRONMENT) from None
    return values


def read_systemd(environ: Mapping[str, str], pid: int) -> dict[str, Any]:
    """The `ServerConfig` fields that systemd's variables set: ``listen_fds`` from LISTEN_FDS
    (as sd_listen_fds(3) reads it: only when LISTEN_PID is ``pid``, for sockets passed to a
    parent are not this process's) and ``notify_socket`` from NOTIFY_SOCKET.

    The descriptors are not looked at here (`net.listening_sockets` checks each is a listening
    TCP socket); LISTEN_FDNAMES is not needed, since every socket passed is served. Raises
    `ConfigError` naming the variable, for a value that is no number or no unix socket.
    """
    values: dict[str, Any] = {}
    if (listen_pid := environ.get("LISTEN_PID", "")) and _systemd_number(
        "LISTEN_PID", listen_pid
    ) == pid:
        count = _systemd_number("LISTEN_FDS", environ.get("LISTEN_FDS", ""))
        # More than the process may have open is no count systemd would pass.
        if count > os.sysconf("SC_OPEN_MAX"):
            reason = "more descriptors than a process may have open"
            raise ConfigError("LISTEN_FDS", str(count), reason, ENVIRONMENT)
        if count:
            values["listen_fds"] = tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    if notify_socket := environ.get("NOTIFY_SOCKET", ""):
        if not notify_socket.startswith(("/", "@")):
            reason = "tcpecho notifies a unix socket only: a path, or @ and an abstract name"
            raise ConfigError("NOTIFY_SOCKET", notify_socket, reason, ENVIRONMENT)
        values["notify_socket"] = notify_socket
    return values


def forget_systemd(environ: MutableMapping[str, str]) -> None:
    """Unset systemd's variables once read, as sd_listen_fds(3) and sd_notify(3) do when asked:
    they are for this process, not for any program it might run."""
    for var in SYSTEMD_VARIABLES:
        environ.pop(var, None)


def _systemd_number(var: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(var, text, "must be a non-negative integer", ENVIRONMENT)
    return int(text)


def _no_such_option(name: str, known: Mapping[str, Option], hint: str = "") -> str:
    reason = "tcpecho serve has no such option"
    close = difflib.get_close_matches(name, list(known), n=1)
    if hint:
        return f"{reason}; {hint}"
    return f"{reason}; the closest is {close[0]}" if close else reason


def _require(ok: bool, option: str, value: object, reason: str) -> None:
    if not ok:
        raise ConfigError(option, value, reason)


def _network(option: str, text: str) -> Network:
    try:
        return parse_network(text)
    except ValueError as exc:
        raise ConfigError(option, text, "not an IP address or CIDR network") from exc


# Writing the configuration out


def to_toml(resolved: ResolvedConfig) -> str:
    """The configuration as TOML that `read_file` reads back into the same values, each line
    ending with where its value came from (``# from: env TCPECHO_PORT``)."""
    lines = [
        "# The effective configuration of tcpecho serve, usable as a --config file.",
        "# Precedence: command line > environment (TCPECHO_*) > file (--config) > defaults.",
    ]
    for option in OPTIONS:
        value = getattr(resolved.config, option.name)
        source = _comment_text(resolved.sources[option.name])
        if value is None:
            lines.append(f"# {option.key} is not set  # from: {source}")
        else:
            lines.append(f"{option.key} = {toml_value(value)}  # from: {source}")
    if resolved.config.listen_fds:
        fds = ", ".join(str(fd) for fd in resolved.config.listen_fds)
        lines.append(
            f"# Socket activation: serving on descriptors {fds} from systemd (LISTEN_FDS); "
            "host, port and backlog are not used."
        )
    if resolved.config.notify_socket:
        where = _comment_text(resolved.config.notify_socket)
        lines.append(f"# Readiness is reported to systemd at {where} (NOTIFY_SOCKET).")
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """``value`` (a bool, number, string or tuple of them) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # 5, 5.0, inf, nan and 1e+100 are all TOML
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _comment_text(text: str) -> str:
    """``text`` (a path, say) safe on one TOML comment line: no control characters."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def describe(value: object) -> str:
    """A value as a person reads it: 300.0 as 300, () as none, a string quoted only when its
    spaces would not show."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number(value)
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ", ".join(describe(item) for item in value)
    text = str(value)
    return repr(text) if not text or text != text.strip() else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# The docs table

TABLE_START = "<!-- options table: made by scripts/gen-config-docs from tcpecho.config.OPTIONS -->"
TABLE_END = "<!-- end of options table -->"


def options_table() -> str:
    """The Markdown table of every option for docs/configuration.md, with its markers."""
    rows = [
        TABLE_START,
        "| option | environment | default | values | meaning |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        cells = (
            _flags_cell(option),
            f"`{option.env}`",
            _default_cell(option),
            _values_cell(option),
            f"{option.help} {option.details}" if option.details else option.help,
        )
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    rows.append(TABLE_END)
    return "\n".join(rows) + "\n"


def _flags_cell(option: Option) -> str:
    if option.type.base is bool:
        flags = [*([option.short] if option.short else []), option.flag, f"--no-{option.key}"]
        return ", ".join(f"`{flag}`" for flag in flags)
    metavar = f" {option.metavar}" if option.metavar else ""
    flags = [*([option.short] if option.short else []), option.flag + metavar]
    return ", ".join(f"`{flag}`" for flag in flags)


def _default_cell(option: Option) -> str:
    if option.default_text is not None or option.default in ((), None):
        return option.describe_default()
    return f"`{option.describe_default()}`"


def _values_cell(option: Option) -> str:
    value_type = option.type
    if value_type.choices:
        text = ", ".join(f"`{choice}`" for choice in value_type.choices)
    elif value_type.base is bool:
        text = "boolean"
    elif value_type.base is str:
        text = "text"
    else:
        text = "integer" if value_type.base is int else "number"
        bounds = _bounds(option)
        text = f"{text} {bounds}" if bounds else text
    if value_type.repeatable:
        text = f"list of {text}"
    return f"{text}, or unset" if value_type.optional else text


def _bounds(option: Option) -> str:
    if option.at_least is not None and option.at_most is not None:
        return f"{_number(option.at_least)} to {_number(option.at_most)}"
    if option.at_least is not None:
        return f"≥ {_number(option.at_least)}"
    if option.at_most is not None:
        return f"≤ {_number(option.at_most)}"
    if option.more_than is not None:
        return f"> {_number(option.more_than)}"
    return ""


def _toml_type(value: object) -> str:
    """What TOML calls the type of ``value`` (as tomllib returns it), with its article."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), "a date or time")
