"""Fixtures: real `mooncake-kvd` processes on loopback, and an embedded store.

The node binary is ``$MOONCAKE_KVD``, else ``mooncake-kvd`` in the cargo target directory
(``$CARGO_TARGET_DIR``, else the repository's ``target``), debug build first.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
from typing import Iterator, List

import pytest

import mooncake_kv

REPO = pathlib.Path(__file__).resolve().parents[2]


def kvd_binary() -> str:
    explicit = os.environ.get("MOONCAKE_KVD")
    if explicit:
        return explicit
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    for profile in ("debug", "release"):
        candidate = target / profile / "mooncake-kvd"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("mooncake-kvd")
    if found:
        return found
    pytest.fail("no mooncake-kvd binary: build it (cargo build) or set MOONCAKE_KVD")


class Kvd:
    """A `mooncake-kvd` child process, memory only, on free loopback ports."""

    def __init__(self, *extra: str, dram_mib: int = 256) -> None:
        args = [
            kvd_binary(),
            "--memory-only",
            "--dram-mib",
            str(dram_mib),
            "--listen",
            "127.0.0.1:0",
            "--data-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            *extra,
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "serving" not in line:
            self.process.kill()
            raise RuntimeError(f"mooncake-kvd did not start: {line!r}")
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.address: str = fields["control"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def kvd() -> Iterator[Kvd]:
    node = Kvd()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def token_kvd() -> Iterator[Kvd]:
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write("s3cret\n")
    node = Kvd("--token-file", f.name)
    yield node
    node.stop()
    os.unlink(f.name)


def open_store(kind: str, kvd: Kvd) -> mooncake_kv.Store:
    if kind == "embedded":
        return mooncake_kv.EmbeddedStore(256 << 20)
    return mooncake_kv.Client(kvd.address, transport=kind)


BACKENDS: List[str] = ["embedded", "shm", "tcp"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, kvd: Kvd) -> Iterator[mooncake_kv.Store]:
    s = open_store(request.param, kvd)
    assert s.transport == {"embedded": "local"}.get(request.param, request.param)
    yield s
    s.close()


def pattern(key: str, size: int, salt: int = 0) -> bytes:
    """Bytes that depend on the key, the size and every position."""
    seed = (hash(key) ^ salt) & 0xFF
    block = bytes((seed + i * 31) & 0xFF for i in range(251))
    return (block * (size // 251 + 1))[:size]


_unique = [0]


def unique(name: str) -> str:
    _unique[0] += 1
    return f"{name}-{os.getpid()}-{_unique[0]}"
