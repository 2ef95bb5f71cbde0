"""Peer: the standard library's thread-per-client server, ``socketserver.ThreadingTCPServer``.

Each connection gets a thread running a ``BaseRequestHandler`` that does
``recv(65536)`` / ``sendall`` until the client closes.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socketserver
import sys
from types import FrameType


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    with EchoServer((args.host, args.port), EchoHandler) as server:
        print(f"LISTENING {server.server_address[1]}", flush=True)
        with contextlib.suppress(SystemExit):
            server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
