"""A tcpecho server in a child process, for the benchmarks: started, watched, stopped.

``ServerProcess(args)`` runs ``python -m tcpecho serve --host 127.0.0.1 --port 0 ARGS`` under
this interpreter, with this checkout's ``src`` first on ``PYTHONPATH`` (no install needed; run
the benchmark with the interpreter that has uvloop to serve on uvloop). Two threads read its
stdout and stderr as they come, so that a busy server never blocks on a full pipe.
`wait_listening` reads the port from the banner ``[SERVER STARTING] Listening on HOST:PORT``
(ready means listening: no sleep). `status` reads the server's VmRSS, threads and open
descriptors from /proc (Linux only). `stop` sends SIGTERM (or the signal given) and waits.

Who closes what: the object owns the child. Use it as a context manager, or call `kill` in a
``finally``: both leave no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BANNER = re.compile(r"^\[SERVER STARTING\] Listening on (?P<address>\S+)")
TAG = re.compile(r"^\[(?P<tag>[^\]]+)\]")
# How long a server may take to print its banner (imports on a loaded 2-core machine), and to
# exit after the stop signal before it is killed.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Lines of stderr kept for a report (a traceback fits).
STDERR_KEPT = 40


class ServerStartError(Exception):
    """The server did not start listening; the message says why (its exit code and stderr)."""


@dataclass(frozen=True)
class ProcessStatus:
    """What /proc says about a running server."""

    rss_kib: int  # VmRSS
    threads: int
    fds: int  # entries of /proc/PID/fd

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def serve_command(args: Sequence[str], host: str = HOST) -> list[str]:
    """The command line of a server on ``host``, a port the OS picks, and ``args``."""
    return [sys.executable, "-m", "tcpecho", "serve", "--host", host, "--port", "0", *args]


class ServerProcess:
    """``python -m tcpecho serve`` in a child process (see the module's docstring).

    ``on_line`` is called, in the stdout reader's thread, with every log line after the banner
    (without its newline). ``keep_lines``: how many of them `lines` keeps (None: all of them,
    for short runs; a soak passes a bound).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str = "server",
        host: str = HOST,
        on_line: Callable[[str], None] | None = None,
        keep_lines: int | None = None,
    ) -> None:
        self.name = name
        self.command = serve_command(args, host)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"  # each log line reaches the pipe when it is written
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            cwd=ROOT,
            start_new_session=True,  # a Ctrl-C at the terminal reaches only the benchmark
        )
        self.pid = self.proc.pid
        self.port = 0  # from the banner, by wait_listening
        self.banner: str | None = None
        self.engine_line = ""
        self.stopped_line = ""
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_KEPT)
        self._on_line = on_line
        self._banner_seen = threading.Event()
        self._engine_seen = threading.Event()
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{name}-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # --- its output -----------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if self.banner is None:
                self.banner = line
                self._banner_seen.set()
                continue
            self.lines.append(line)
            match = TAG.match(line)
            tag = match["tag"] if match else ""
            if tag == "ENGINE":
                self.engine_line = line
                self._engine_seen.set()
            elif tag == "SERVER STOPPED":
                self.stopped_line = line
            if self._on_line is not None:
                self._on_line(line)
        # The end of output: whoever waits for a line that will never come stops waiting.
        self._banner_seen.set()
        self._engine_seen.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_tail.append(raw.rstrip("\n"))

    def wait_listening(self, timeout: float = START_TIMEOUT) -> int:
        """The port from the banner, once the server has printed it (and its engine line,
        which follows at once). Raises `ServerStartError` if it printed something else, or
        nothing in ``timeout`` seconds."""
        if not self._banner_seen.wait(timeout):
            raise ServerStartError(f"the {self.name} server printed nothing in {timeout:g} s")
        match = BANNER.match(self.banner or "")
        if match is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            for reader in self._readers:
                reader.join(5)
            raise ServerStartError(
                f"the {self.name} server did not start (exit {self.proc.returncode}): "
                + " | ".join([self.banner or "", *self.stderr_tail]).strip(" |")
            )
        self.port = int(match["address"].rsplit(":", 1)[1])
        self._engine_seen.wait(timeout)
        return self.port

    @property
    def engine(self) -> str:
        """What the engine line says it serves with ("threads", "asyncio (uvloop)"), or "?"."""
        match = re.search(r"engine (?P<engine>.+?), ", self.engine_line)
        return match["engine"] if match else "?"

    def log(self) -> list[str]:
        """The log lines kept so far (after the banner)."""
        return list(self.lines)

    # --- its state ------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> ProcessStatus | None:
        """VmRSS, threads and open descriptors from /proc; None once the server is gone."""
        rss = threads = None
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name == "VmRSS":
                        rss = int(value.split()[0])
                    elif name == "Threads":
                        threads = int(value)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, ValueError):
            return None
        if rss is None or threads is None or not self.running():  # a zombie has no VmRSS
            return None
        return ProcessStatus(rss_kib=rss, threads=threads, fds=fds)

    # --- stopping it ----------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send ``sig`` and wait for the exit code; None (and SIGKILL) if the server did not
        exit in ``timeout`` seconds. Its output is read to the end before this returns."""
        self.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The exit code once the server has exited; None (and SIGKILL) after ``timeout``."""
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
