"""pytest plugin: real local PostgreSQL clusters as fixtures.

Loaded through the ``pytest11`` entry point once shardkit is installed.

``shardkit_cluster_factory`` (session)
    ``factory(shards=2, replicas=1, **kw)`` starts a fresh cluster on the
    chosen backend (keywords go to its ``up``: ``bucket_count``,
    ``port_start``).  Every cluster it started is stopped and removed when the
    session ends, also after failures and Ctrl-C; an :mod:`atexit` hook catches
    what teardown missed, and a SIGTERM handler (installed from the main thread,
    chaining the one it replaces) stops them when the session is terminated.
``shardkit_module_cluster_factory`` (module)
    the same factory, whose clusters are stopped and removed when the test
    module that used it ends: for clusters a module's tests share, so that a
    long session does not keep every module's servers (and their memory).
``shardkit_dev_cluster`` (session)
    one 2-shard x 1-replica cluster shared by the whole session.  Tests that
    stop or kill nodes, or set apply delays, should start their own cluster
    with the factory.

Clusters live in ``$SHARDKIT_TEST_DIR`` if set, else in ``/dev/shm`` when it
has room, else in the system temporary directory.

The backend is chosen with ``SHARDKIT_TEST_BACKEND``:

``local`` (the default)
    a :class:`~shardkit.devcluster.DevCluster`: servers from the local
    PostgreSQL installation, as :mod:`shardkit.devcluster` finds it.
``docker``
    a :class:`~shardkit.testing.docker.DockerCluster`: every server in a
    ``postgres:16`` container, replicas cloned with ``pg_basebackup`` over a
    Docker network of the cluster's own, ports published on 127.0.0.1.  It
    has the API tests use of a DevCluster and its nodes (``shards``,
    ``.primary``, ``.replicas``, ``config_dict()``, ``write_config()``, node
    ``url``, ``connect()``, ``stop()``, ``start()``, ``kill()``,
    ``set_apply_delay()``, ``wait_caught_up()``, ``down()`` ...), not what is
    about local files and processes (``DevCluster.load()``, reusing a
    ``base_dir``, a node's ``postmaster.pid``); see that module.  When no
    Docker engine is reachable, the engine is on another machine (a remote
    ``DOCKER_HOST``), or testcontainers (>= 4.8) is not installed, the tests
    that need a cluster are skipped, with the reason.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pytest

from ..devcluster import DevCluster
from ..errors import DevClusterError
from .docker import DockerCluster, docker_host_problem, testcontainers_problem

__all__ = ["shardkit_cluster_factory", "shardkit_dev_cluster", "shardkit_module_cluster_factory"]

log = logging.getLogger("shardkit.testing")

_BACKENDS = ("local", "docker")
_SHM_MIN_FREE = 2 << 30  # bytes; a small cluster needs ~0.1 GB a node, more as tests write

AnyCluster: TypeAlias = DevCluster | DockerCluster

# Clusters started and not yet stopped, for the atexit hook and the SIGTERM handler.
_live: list[AnyCluster] = []
# Reentrant: the SIGTERM handler runs in the main thread, possibly while it holds the lock.
_live_lock = threading.RLock()
_sigterm_installed = False
# Session directories, removed by the SIGTERM handler once empty.
_roots: list[Path] = []


def _down(cluster: AnyCluster) -> None:
    cluster.down(remove=True)
    with _live_lock:
        if cluster in _live:
            _live.remove(cluster)


def _down_leftovers() -> None:
    """At interpreter exit: stop any cluster that session teardown did not."""
    with _live_lock:
        leftovers = list(_live)
    for cluster in leftovers:
        try:
            _down(cluster)
        except DevClusterError as e:
            log.error("could not stop the test cluster in %s: %s", cluster.base_dir, e)


atexit.register(_down_leftovers)


def _install_sigterm_handler() -> None:
    """Stop this session's clusters on SIGTERM (a CI time limit, `timeout`, a
    cancelled job), which runs neither fixture teardown nor atexit hooks.

    Installed once, from the main thread only; it chains the handler it replaces
    (or, if that was the default, dies of SIGTERM as the default would).
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return  # SIGTERM does not end this process: nothing to clean up after

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        _down_leftovers()
        for root in _roots:
            try:
                root.rmdir()  # only if empty: a cluster still starting keeps its files
            except OSError:
                pass
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True


def _docker_unavailable() -> str | None:
    """Why the docker backend cannot run here, or None if it can."""
    problem = testcontainers_problem() or docker_host_problem()
    if problem:
        return problem
    docker = shutil.which("docker")
    if docker is None:
        return "the docker command is not installed"
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine is reachable (`docker info` failed: {detail})"
    return None


def _check_backend() -> str:
    """The backend ``SHARDKIT_TEST_BACKEND`` names; skip if docker cannot run, fail if unknown."""
    backend = os.environ.get("SHARDKIT_TEST_BACKEND", "local") or "local"
    if backend not in _BACKENDS:
        pytest.fail(
            f"SHARDKIT_TEST_BACKEND={backend!r} is not a backend; use one of "
            f"{', '.join(_BACKENDS)} (or leave it unset for local)",
            pytrace=False,
        )
    if backend == "docker":
        reason = _docker_unavailable()
        if reason:
            pytest.skip(f"SHARDKIT_TEST_BACKEND=docker, but {reason}; "
                        "unset it to run against the local PostgreSQL installation")
    return backend


def _cluster_root() -> Path:
    """A fresh directory for this session's clusters.

    ``$SHARDKIT_TEST_DIR`` if set, else ``/dev/shm`` when it has room (being
    in memory, it makes initdb and pg_basebackup about twice as fast), else
    the system temporary directory.  Not pytest's ``tmp_path_factory``: as
    root the servers run as an unprivileged user, and pytest keeps its
    temporary directories private to the user running it (mode 0700).
    """
    parent = os.environ.get("SHARDKIT_TEST_DIR") or None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    if parent is None and os.access("/dev/shm", os.W_OK | os.X_OK):
        if shutil.disk_usage("/dev/shm").free >= _SHM_MIN_FREE:
            parent = "/dev/shm"
    root = Path(tempfile.mkdtemp(prefix="shardkit-test-", dir=parent))
    if os.geteuid() == 0:
        root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def shardkit_cluster_factory() -> Iterator[Callable[..., AnyCluster]]:
    """``factory(shards=2, replicas=1, **kw)``: start a fresh cluster, stopped at session end."""
    yield from _factory()


@pytest.fixture(scope="module")
def shardkit_module_cluster_factory() -> Iterator[Callable[..., AnyCluster]]:
    """``factory(shards=2, replicas=1, **kw)``: start a fresh cluster, stopped when the
    test module that asked for it ends (its servers' memory back for the next modules)."""
    yield from _factory()


def _factory() -> Iterator[Callable[..., AnyCluster]]:
    backend = _check_backend()
    up: Callable[..., AnyCluster] = DockerCluster.up if backend == "docker" else DevCluster.up
    _install_sigterm_handler()
    root = _cluster_root()
    _roots.append(root)
    mine: list[AnyCluster] = []
    numbers = itertools.count()

    def factory(shards: int = 2, replicas: int = 1, **kw: Any) -> AnyCluster:
        cluster = up(root / f"cluster{next(numbers)}", shards, replicas, **kw)
        mine.append(cluster)
        with _live_lock:
            _live.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        errors = []
        for cluster in mine:
            try:
                _down(cluster)
            except DevClusterError as e:
                errors.append(e)
        if errors:
            raise DevClusterError("; ".join(e.message for e in errors), node=errors[0].node)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shardkit_dev_cluster(shardkit_cluster_factory: Callable[..., AnyCluster]) -> AnyCluster:
    """One shared 2-shard x 1-replica cluster; do not stop, kill or delay its nodes."""
    return shardkit_cluster_factory(shards=2, replicas=1)
