"""pytest plugin: real local PostgreSQL clusters as fixtures.

The backend is chosen with ``SHARDKIT_TEST_BACKEND``: ``local`` (the default)
starts servers from the local PostgreSQL binaries; ``docker`` would use
testcontainers and is skipped, with the reason, when no Docker engine answers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..devcluster import DevCluster

_started: list[DevCluster] = []


def _stop_all() -> None:
    while _started:
        c = _started.pop()
        try:
            c.down(remove=True)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_all)


def _docker_unavailable_reason() -> str | None:
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        return "testcontainers is not installed (pip install 'shardkit[docker]')"
    if not shutil.which("docker"):
        return "the docker client is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return "no Docker engine is reachable (`docker info` failed)"
    return None


@pytest.fixture(scope="session")
def shardkit_cluster_factory() -> Iterator[Callable[..., DevCluster]]:
    backend = os.environ.get("SHARDKIT_TEST_BACKEND", "local")
    if backend == "docker":
        reason = _docker_unavailable_reason()
        pytest.skip(f"SHARDKIT_TEST_BACKEND=docker: {reason or 'docker backend needs the compose stack; see README'}")
    elif backend != "local":
        raise pytest.UsageError(f"SHARDKIT_TEST_BACKEND must be 'local' or 'docker', not {backend!r}")
    # Under /tmp, so the unprivileged server user can reach the data directories.
    root = Path(tempfile.mkdtemp(prefix="shardkit-test-"))
    os.chmod(root, 0o755)
    mine: list[DevCluster] = []

    def factory(shards: int = 2, replicas: int = 1, **kw: Any) -> DevCluster:
        c = DevCluster.up(root / f"c{len(mine)}", shards=shards, replicas=replicas, **kw)
        mine.append(c)
        _started.append(c)
        return c

    try:
        yield factory
    finally:
        for c in mine:
            try:
                c.down(remove=True)
            finally:
                if c in _started:
                    _started.remove(c)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shardkit_dev_cluster(shardkit_cluster_factory: Callable[..., DevCluster]) -> DevCluster:
    return shardkit_cluster_factory(shards=2, replicas=1)
