"""tcpecho's errors. Each carries its data; the CLI turns it into one line and an exit code."""

from __future__ import annotations


class TcpEchoError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with (the table is in README.md)."""

    exit_code = 1


class ConfigError(TcpEchoError):
    """An option has a value it cannot take.

    ``option`` is the option as the user wrote it (``--port``, ``port``, ``TCPECHO_PORT``);
    ``source`` where: "" for the command line, a file's path, or "the environment".
    """

    exit_code = 2

    def __init__(self, option: str, value: object, reason: str, source: str = "") -> None:
        super().__init__(option, value, reason, source)
        self.option = option
        self.value = value
        self.reason = reason
        self.source = source

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        return f"invalid {self.option} {self.value!r}{where}: {self.reason}"


class UnknownOption(ConfigError):
    """``option``, in the file or environment ``source``, is no option of ``tcpecho serve``."""

    def __str__(self) -> str:
        return f"unknown option {self.option!r} in {self.source}: {self.reason}"


class ConfigFileError(TcpEchoError):
    """The configuration file at ``path`` cannot be read, or is not TOML; ``reason`` says why
    (for TOML, with the line and column)."""

    exit_code = 2

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read the configuration file {self.path}: {self.reason}"


class HostNotFound(TcpEchoError):
    """A host name did not resolve to any address."""

    exit_code = 6

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(host, reason)
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot resolve host {self.host!r}: {self.reason}"


class BindError(TcpEchoError):
    """The server could not listen on ``address``; ``errno`` and ``strerror`` from the OS."""

    def __init__(self, address: str, errno: int | None, strerror: str) -> None:
        super().__init__(address, errno, strerror)
        self.address = address
        self.errno = errno
        self.strerror = strerror

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


class AddressInUse(BindError):
    exit_code = 3


class BindPermissionDenied(BindError):
    exit_code = 4


class AddressNotAvailable(BindError):
    exit_code = 5


class InheritedSocketError(TcpEchoError):
    """A descriptor passed to serve on (systemd's socket activation: LISTEN_FDS) is not a
    listening TCP socket; ``reason`` says what it is instead."""

    exit_code = 2

    def __init__(self, fd: int, reason: str) -> None:
        super().__init__(fd, reason)
        self.fd = fd
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot serve on descriptor {self.fd} (LISTEN_FDS): {self.reason}"


class ConnectFailed(TcpEchoError):
    """The client could not reach the server at ``address``."""

    exit_code = 7

    def __init__(self, address: str, strerror: str) -> None:
        super().__init__(address, strerror)
        self.address = address
        self.strerror = strerror

    def __str__(self) -> str:
        return f"cannot connect to {self.address}: {self.strerror}"


class ConnectionRefused(ConnectFailed):
    pass


class MissingExtra(TcpEchoError):
    """``feature`` needs the package ``package``, from the extra ``extra``."""

    exit_code = 8

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(feature, package, extra)
        self.feature = feature
        self.package = package
        self.extra = extra

    def __str__(self) -> str:
        return (
            f"{self.feature} needs {self.package}, which is not installed: "
            f"pip install 'tcpecho[{self.extra}]'"
        )


class WorkersFailing(TcpEchoError):
    """Worker processes kept dying as soon as they started; the supervisor gave up."""

    exit_code = 9

    def __init__(self, deaths: int, within: float) -> None:
        super().__init__(deaths, within)
        self.deaths = deaths
        self.within = within

    def __str__(self) -> str:
        return (
            f"{self.deaths} workers in a row died within {self.within:g}s of starting; "
            "their log lines above say why"
        )


class TLSConfigError(TcpEchoError):
    """A TLS file cannot be used. ``files`` are the (option, path) pairs it concerns, such as
    ``(("--tls-cert", "cert.pem"), ("--tls-key", "key.pem"))``; ``reason`` is the OS's or
    OpenSSL's."""

    exit_code = 10

    def __init__(self, files: tuple[tuple[str, str], ...], reason: str) -> None:
        super().__init__(files, reason)
        self.files = files
        self.reason = reason

    def __str__(self) -> str:
        named = " / ".join(f"{option} {path}" for option, path in self.files)
        return f"cannot load {named}: {self.reason}"
