"""The sans-I/O core imports no I/O, concurrency or logging module (house style, rule 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
FORBIDDEN = ["socket", "ssl", "asyncio", "threading", "logging", "selectors"]

# Runs in a fresh interpreter: this one has long since imported all of them.
CHILD = f"""
import json, sys
import tcpecho.protocol
print(json.dumps(sorted(name for name in {FORBIDDEN!r} if name in sys.modules)))
"""


def test_importing_tcpecho_protocol_loads_no_io_threading_or_logging_module() -> None:
    """``import tcpecho.protocol`` in a fresh interpreter leaves all of FORBIDDEN unloaded.

    ``-S`` keeps site (and any .pth file in the venv) from importing things first; the package
    comes from src through PYTHONPATH.
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-S", "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded == [], f"importing tcpecho.protocol (and the tcpecho package) loaded {loaded}"
