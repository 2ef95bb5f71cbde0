"""Peer: the tutorial's model exactly, one ``threading.Thread`` per client.

A blocking ``socket.socket`` accept loop hands each connection to a new thread that does
``data = conn.recv(1024)`` / ``conn.sendall(data)`` until ``recv`` returns ``b""``.
Threads are daemons so SIGTERM/SIGINT exit at once even with clients connected.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from types import FrameType


def handle_client(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                data = conn.recv(1024)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass


def stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.host, args.port))
    server.listen(1024)
    print(f"LISTENING {server.getsockname()[1]}", flush=True)
    try:
        while True:
            conn, _addr = server.accept()
            threading.Thread(target=handle_client, args=(conn,), daemon=True).start()
    except SystemExit:
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
