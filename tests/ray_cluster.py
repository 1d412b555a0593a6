"""A real two-node Ray cluster on this machine for the Ray tests (head + one worker node).

The two nodes are separate `ray start` processes, as on two machines, sharing this disk (the
shared storage the README asks for). Started once per test session, stopped at its end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, timeout: float = 120) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, *args], check=True, capture_output=True, timeout=timeout, env=env)


_ADDRESS: list[str] = []


def rejoin_worker() -> None:
    """Start the second node again (after a test killed it)."""
    _ray("start", f"--address={_ADDRESS[0]}", "--num-cpus=2")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address of a head node plus one worker node, 2 logical CPUs each.

    Model actors take 1.5 CPUs in the engine's tests, so each node holds exactly one of them
    (and decoding tasks the rest): both nodes must embed.
    """
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[cluster]'")
    if not Path(RAY).exists():
        pytest.skip(f"the ray command is not installed beside {sys.executable}")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="/tmp/rayt")  # short: Ray's socket paths must fit in 107 bytes
    address = f"127.0.0.1:{port}"
    _ADDRESS[:] = [address]
    try:
        _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}")
        _ray("start", f"--address={address}", "--num-cpus=2")
        yield address
    finally:
        _ray("stop", "--force", timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
