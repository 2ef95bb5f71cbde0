"""The load generator's messages, and what a wrong echo was. Pure: no I/O.

Each message is a 12-byte header (connection number, sequence number) and a body cut from a
seeded random block at an offset that depends on both, so every message of a run differs from
every other and any mix-up is visible in its bytes.
"""

from __future__ import annotations

import random
import struct
from typing import Literal

HEADER = struct.Struct("!IQ")  # connection number, sequence number
MIN_SIZE = HEADER.size
# Body offsets wrap within this many bytes of the random block.
_BLOCK_SPAN = 64 * 1024

Mismatch = Literal["corruption", "reordering", "duplication", "cross-connection"]


class Payloads:
    """Messages of ``size`` bytes for a run seeded with ``seed``."""

    def __init__(self, size: int, seed: int) -> None:
        if size < MIN_SIZE:
            raise ValueError(f"messages must be at least {MIN_SIZE} bytes")
        self.size = size
        self._block = random.Random(seed).randbytes(_BLOCK_SPAN + size)

    def message(self, connection: int, sequence: int) -> bytes:
        offset = (connection * 7919 + sequence * 131) % _BLOCK_SPAN
        body = self._block[offset : offset + self.size - HEADER.size]
        return HEADER.pack(connection, sequence) + body


def classify(
    received: bytes, connection: int, sequence: int, *, connections: int, sent: int
) -> Mismatch:
    """What went wrong, given the ``received`` message where message ``sequence`` of
    ``connection`` was due, out of ``connections`` in the run, ``sent`` messages sent on this
    one. A header that names no message of the run is corruption (so is a cut-short one)."""
    if len(received) >= HEADER.size:
        got_connection, got_sequence = HEADER.unpack_from(received)
        if got_connection != connection:
            return "cross-connection" if got_connection < connections else "corruption"
        if got_sequence < sequence:
            return "duplication"
        if sequence < got_sequence < sent:
            return "reordering"
    return "corruption"
