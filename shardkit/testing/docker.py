"""PostgreSQL clusters in Docker containers: the ``docker`` backend of the pytest plugin.

:meth:`DockerCluster.up` starts what :meth:`shardkit.devcluster.DevCluster.up`
starts, in containers of the official ``postgres`` image::

    cluster = DockerCluster.up(tmp_dir, shards=2, replicas=1)
    cluster.shards[0].replicas[0].set_apply_delay(2)
    cluster.down()

The cluster offers the part of :class:`~shardkit.devcluster.DevCluster`'s API
that tests use: ``shards`` (:class:`~shardkit.devcluster.DevShard` objects with
``.primary`` and ``.replicas``), ``nodes``, ``shard()``, ``config_dict()``,
``write_config()``, ``down()`` and use as a context manager.  Its nodes are
:class:`DockerNode` objects, a :class:`~shardkit.devcluster.DevNode` whose
server runs in a container: ``name``, ``role``, ``shard``, ``port``, ``url``,
``dsn``, ``slot_name``, ``connect()``, ``set_apply_delay()``,
``wait_caught_up()`` and ``wait_streaming()`` are DevNode's own (plain SQL
over the published port); ``is_running()``, ``start()``, ``stop()``,
``kill()`` and the logs work on the container.  A node has no ``datadir``
(``hasattr(node, "datadir")`` is false, so code that edits a local node's
files can tell): its data directory, ``container_datadir``, is inside its
container.

Layout.  Each cluster has a Docker network of its own.  A shard's primary is a
``postgres`` container initialised by the image's entrypoint (user and
database ``shardkit``, trust authentication, ``--locale=C``); each replica is a
container that clones its primary over that network with
``pg_basebackup -R -C -S shardkit_r<i>`` on first start (so it holds a
physical slot and never falls off), then runs ``postgres`` as a hot standby.
Settings are passed as ``-c`` options (see :data:`SERVER_SETTINGS`), as in
DevCluster tuned for speed (``fsync = off``) but with ``synchronous_commit =
on``; ``recovery_min_apply_delay`` is left to ``ALTER SYSTEM``.

Ports.  Each node gets a host port when the cluster starts: a free one, or
``port_start + i`` in node order when given.  Its server listens on that port
number inside its container too (so ``inet_server_port()`` agrees with the
URL, as with DevCluster), published on ``127.0.0.1`` only: the servers trust
every connection.  The port is fixed in the container's configuration rather
than left to Docker, which would pick a new random one on every start and so
move a node that a test stops and starts under the engines that point at it.
:meth:`DockerNode.stop` / :meth:`DockerNode.start` and :meth:`DockerNode.kill`
/ ``start()`` keep the port; if another program took it while the node was
down, ``start()`` raises :class:`~shardkit.errors.DevClusterError` saying so.

Differences from DevCluster:

* no reattaching: there is no ``load()``, and ``up()`` wants a new or empty
  ``base_dir``, which holds ``shardkit.toml`` (written as DevCluster writes it)
  and copies of the node logs;
* a node's data directory is inside its container (``container_datadir``; there
  is no ``datadir`` nor ``postmaster.pid`` on this machine); ``log_file`` is a
  copy of the container's log (``docker logs``), refreshed each time it is read;
* ``stop(mode)`` sends the postmaster (the container's PID 1) the signal of
  that shutdown mode: ``smart`` SIGTERM, ``fast`` SIGINT, ``immediate``
  SIGQUIT; ``kill()`` SIGKILLs the container;
* ``wal_level`` is ``replica`` (DevCluster: ``logical``).

Requirements: testcontainers >= 4.8 (earlier versions attach a container to a
network only after starting it, which loses its published ports), and a
Docker engine that publishes container ports on this machine's loopback (a
local Docker Engine or Docker Desktop, not a remote ``DOCKER_HOST`` or
Docker-outside-of-Docker from inside a container).  An engine on another
machine (``DOCKER_HOST``, the Docker context or ``TC_HOST`` naming a host
other than this one) is refused at once, saying so (see
:func:`docker_host_problem`), rather than left to time out.  Containers and networks
carry testcontainers' session labels, so its reaper (Ryuk) removes what a
killed test session left behind.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shlex
import shutil
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg

from ..devcluster import (
    _STOP_MODES,
    _STOP_TIMEOUT,
    CONFIG_FILE,
    DB_NAME,
    DB_USER,
    HOST,
    DevNode,
    DevShard,
    _Cancelled,
    _ClusterLayout,
    _in_parallel,
    _pick_port,
    _port_free,
    plan_nodes,
    stop_nodes,
)
from ..errors import DevClusterError

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

__all__ = ["IMAGE", "SERVER_SETTINGS", "DockerCluster", "DockerNode", "docker_host_problem",
           "testcontainers_problem"]

log = logging.getLogger("shardkit.testing.docker")

IMAGE = "postgres:16"
#: Data directory inside the containers of the official image (up to PostgreSQL 17).
CONTAINER_PGDATA = PurePosixPath("/var/lib/postgresql/data")
#: pg_hba.conf of every node, written by the container's command at each start:
#: the image's own admits no replication connections from other containers.
HBA_FILE = "/tmp/shardkit-pg_hba.conf"
HBA_LINES = (
    "local all all trust",
    "host all all all trust",
    "host replication all all trust",
)
MIN_TESTCONTAINERS = (4, 8)

#: ``postgres -c`` settings of every node, besides ``port`` and ``hba_file``.
#: Command-line settings win over ALTER SYSTEM, so nothing that is changed at
#: run time (``recovery_min_apply_delay``) or that ``pg_basebackup -R`` writes
#: (``primary_conninfo``, ``primary_slot_name``) may be here.
SERVER_SETTINGS: tuple[tuple[str, str], ...] = (
    ("listen_addresses", "*"),
    ("max_connections", "300"),
    ("shared_buffers", "64MB"),
    # A disposable test cluster: speed over crash safety.  Commits still flush
    # WAL before returning, so replicas receive a commit once it is acknowledged.
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("wal_level", "replica"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("hot_standby", "on"),
    ("hot_standby_feedback", "on"),
    ("wal_keep_size", "512MB"),
    ("max_prepared_transactions", "50"),
    # The role is named shardkit, like the schema of shardkit's SQL objects: the
    # default search_path ("$user", public) would create tables in that schema.
    ("search_path", "public"),
    # Replicas reconnect within 0.5 s (default 5 s) when a test restarts a primary.
    ("wal_retrieve_retry_interval", "500ms"),
    # The image ships the contrib modules.
    ("shared_preload_libraries", "pg_stat_statements"),
)

#: Environment of a primary's first start, read by the image's entrypoint.
PRIMARY_ENV = {
    "POSTGRES_USER": DB_USER,
    "POSTGRES_DB": DB_NAME,
    # No password: the servers listen on 127.0.0.1 and the cluster's own network only.
    "POSTGRES_HOST_AUTH_METHOD": "trust",
    "POSTGRES_INITDB_ARGS": "--locale=C --encoding=UTF8 --no-sync",
}

# Docker's default /dev/shm (64 MB) is tight for parallel queries.
_SHM_SIZE = "256m"
_STOP_SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}
# First starts include initdb or pg_basebackup (the image pull happens before).
_FIRST_START_TIMEOUT = 120.0
_RESTART_TIMEOUT = 60.0
_POLL_INTERVAL = 0.1
_LOG_LINES = 40

# testcontainers starts its reaper container on the first container start of a
# process, unguarded: two threads starting the first containers at once would
# both try to create it.  Container starts (not the waits after) go one at a time.
_start_lock = threading.Lock()


# --------------------------------------------------------------------------
# What runs in the containers


def server_args(port: int, hba_file: str = HBA_FILE) -> list[str]:
    """The server command of a node: ``postgres -c name=value ...``."""
    args = ["postgres"]
    for name, value in (("port", str(port)), ("hba_file", hba_file), *SERVER_SETTINGS):
        args += ["-c", f"{name}={value}"]
    return args


def _write_hba(hba_file: str) -> str:
    """A shell command that writes :data:`HBA_LINES` to ``hba_file``."""
    lines = " ".join(shlex.quote(line) for line in HBA_LINES)
    return f"printf '%s\\n' {lines} > {shlex.quote(hba_file)}"


def primary_script(port: int, hba_file: str = HBA_FILE) -> str:
    """The shell script a primary's container runs (as root) at every start.

    It writes the node's pg_hba.conf and hands over to the image's entrypoint,
    which initialises an empty data directory, drops to the ``postgres`` user
    and finally execs the server (PID 1, so signals to the container reach it).
    """
    return "\n".join([
        "set -e",
        _write_hba(hba_file),
        f"exec docker-entrypoint.sh {shlex.join(server_args(port, hba_file))}",
    ]) + "\n"


def replica_script(port: int, primary_host: str, primary_port: int, slot: str,
                   hba_file: str = HBA_FILE) -> str:
    """The shell script a replica's container runs (as ``postgres``) at every start.

    On the first start the data directory is empty and becomes a clone of the
    primary (``pg_basebackup -R`` writes ``standby.signal``, ``primary_conninfo``
    and ``primary_slot_name``); then, and on every later start, it execs the server.
    """
    clone = " ".join([
        shlex.join(["pg_basebackup", "-h", primary_host, "-p", str(primary_port),
                    "-U", DB_USER, "-w", "-D"]),
        '"$PGDATA"',
        shlex.join(["-R", "-X", "stream", "-c", "fast", "-C", "-S", slot, "--no-sync"]),
    ])
    return "\n".join([
        "set -e",
        _write_hba(hba_file),
        'if [ ! -s "$PGDATA/PG_VERSION" ]; then',
        f"  {clone}",
        # PostgreSQL refuses a data directory others can read; the image's is 1777.
        '  chmod 0700 "$PGDATA"',
        "fi",
        f"exec {shlex.join(server_args(port, hba_file))}",
    ]) + "\n"


# --------------------------------------------------------------------------
# testcontainers and docker


def _version_problem(version: str) -> str | None:
    """Why testcontainers ``version`` cannot run the backend, or None if it can."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) >= MIN_TESTCONTAINERS:
        return None
    need = ".".join(map(str, MIN_TESTCONTAINERS))
    return (f"testcontainers {version} is too old (the docker backend needs >= {need}, which "
            "attaches a container to its network when it creates it); "
            "pip install -U 'testcontainers[postgres]'")


def testcontainers_problem() -> str | None:
    """Why the installed testcontainers cannot run this backend, or None if it can."""
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        return "testcontainers is not installed (pip install 'shardkit[docker]')"
    try:
        return _version_problem(importlib.metadata.version("testcontainers"))
    except importlib.metadata.PackageNotFoundError:
        return None


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _remote_host(address: str | None) -> str | None:
    """``scheme://host`` of a Docker engine address on another machine, None for this one.

    Unix sockets and named pipes are local; ``tcp://``, ``http(s)://`` and
    ``ssh://`` addresses are local when their host is a loopback name.  Only
    the scheme and host are returned: an address may carry a user name or a
    password.
    """
    if not address:
        return None
    if "://" not in address:  # TC_HOST and the like: a bare host name
        address = f"tcp://{address}"
    parts = urlsplit(address)
    if parts.scheme in ("unix", "npipe"):
        return None
    try:
        host = parts.hostname
    except ValueError:
        host = None
    if not host or host in _LOCAL_HOSTS or host.startswith("127."):
        return None
    return f"{parts.scheme}://{host}"


def docker_host_problem() -> str | None:
    """Why the Docker engine testcontainers would use cannot run this backend, or None.

    The servers trust every connection, so their ports are published on the
    engine's 127.0.0.1 and reached at this machine's 127.0.0.1: an engine on
    another machine (``DOCKER_HOST``, the current Docker context, or
    testcontainers' ``TC_HOST`` override) would start them where this machine
    cannot connect.
    """
    try:
        from testcontainers.core.docker_client import get_docker_host
        engine = get_docker_host()
    except ImportError:
        engine = os.environ.get("DOCKER_HOST")
    override = os.environ.get("TC_HOST") or os.environ.get("TESTCONTAINERS_HOST_OVERRIDE")
    for what, address, fix in (
            ("the Docker engine", engine, "unset DOCKER_HOST, or `docker context use default`"),
            ("TC_HOST", override, "unset TC_HOST and TESTCONTAINERS_HOST_OVERRIDE")):
        remote = _remote_host(address)
        if remote:
            return (f"{what} is on another machine ({remote}); the docker backend publishes the "
                    "servers' ports on 127.0.0.1 and connects there, so it needs an engine on "
                    f"this machine ({fix})")
    return None


def _is_port_conflict(message: str) -> bool:
    """Whether a Docker error says the host port to publish on is taken."""
    # "Bind for 127.0.0.1:5432 failed: port is already allocated" (another container),
    # "listen tcp4 127.0.0.1:5432: bind: address already in use" (another program).
    return "port is already allocated" in message or "address already in use" in message


def _error_text(e: Exception) -> str:
    """The engine's own words for a docker-py APIError."""
    return str(getattr(e, "explanation", None) or e)


# --------------------------------------------------------------------------
# Nodes and the cluster


class DockerNode(DevNode):
    """A node of a :class:`DockerCluster`: a DevNode whose server runs in a container.

    ``container_name`` is the container's name (``docker logs`` / ``docker exec``
    take it); ``alias`` its host name on the cluster's network.
    """

    def __init__(self, *, shard: str, name: str, role: str, port: int, container_name: str,
                 alias: str, log_copy: Path, primary: DockerNode | None = None) -> None:
        # No local programs: the DevNode methods kept here only run SQL.
        super().__init__(shard=shard, name=name, role=role, port=port,
                         datadir=CONTAINER_PGDATA, programs=None,  # type: ignore[arg-type]
                         primary=primary)
        self.container_name = container_name
        self.alias = alias
        self._log_copy = log_copy
        self._container: DockerContainer | None = None
        self._exit_code: int | None = None

    def __repr__(self) -> str:
        return f"<DockerNode {self.name} {self.role} {HOST}:{self.port} {self.container_name}>"

    # DevNode's datadir is a directory on this machine, which tests and DevNode's
    # helpers (``_pid()``) read and edit; a container's is not one.  Absent here,
    # so that ``hasattr(node, "datadir")`` tells a local node from this one.
    @property  # type: ignore[override]
    def datadir(self) -> Path:
        raise AttributeError(
            f"{self.name} runs in container {self.container_name}: its data directory "
            f"({self.container_datadir}) is not on this machine")

    @datadir.setter
    def datadir(self, value: str | os.PathLike[str]) -> None:
        self.container_datadir = PurePosixPath(value)

    @property
    def primary_node(self) -> DockerNode:
        """The node a replica clones and streams from (``alias`` and ``port`` reach it)."""
        primary = self._require_replica("primary_node")
        assert isinstance(primary, DockerNode)
        return primary

    # -- logs ----------------------------------------------------------------

    @property
    def log_file(self) -> Path:
        """A copy of the container's log (``docker logs``), refreshed each time this is read.

        After the container is gone, the last copy made.
        """
        text = self._container_log()
        if text is not None:
            self._log_copy.parent.mkdir(parents=True, exist_ok=True)
            self._log_copy.write_text(text, encoding="utf-8")
        return self._log_copy

    def _container_log(self) -> str | None:
        if self._container is None:
            return None
        try:
            raw: bytes = self._container.get_wrapped_container().logs()
        # Only for error messages: whatever went wrong must not hide the error
        # being reported.
        except Exception as e:  # noqa: BLE001
            log.debug("%s: cannot read the container log: %s", self.name, e)
            return None
        return raw.decode("utf-8", "replace")

    # -- the container -------------------------------------------------------

    def _docker_container(self) -> Any:
        """The docker-py ``Container`` of this node."""
        if self._container is None:
            raise DevClusterError(f"{self.name} has no container (its cluster is down)",
                                  node=self.name)
        return self._container.get_wrapped_container()

    def _state(self) -> str:
        """The container's status (``running``, ``exited``, ...), or ``removed``."""
        if self._container is None:
            return "removed"
        from docker.errors import NotFound

        container = self._docker_container()
        try:
            container.reload()
        except NotFound:
            return "removed"
        self._exit_code = container.attrs.get("State", {}).get("ExitCode")
        return str(container.status)

    def is_running(self) -> bool:
        """Whether the node's container runs (the server may still be starting)."""
        return self._state() == "running"

    def _signal(self, signal: str) -> None:
        from docker.errors import APIError

        try:
            self._docker_container().kill(signal=signal)
        except APIError as e:
            if self.is_running():
                raise DevClusterError(f"cannot send {signal} to {self.name}: {_error_text(e)}",
                                      node=self.name) from None
            # It stopped on its own meanwhile: what the signal was for.

    def _wait_stopped(self, timeout: float, what: str, hint: str = "") -> None:
        deadline = time.monotonic() + timeout
        while self._state() in ("running", "restarting", "removing"):
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"{self.name}: container {self.container_name} still running {timeout:g} s "
                    f"after {what}; retry with a longer timeout{hint}", node=self.name)
            time.sleep(_POLL_INTERVAL / 2)

    def _wait_accepting(self, timeout: float) -> None:
        """Wait until the server accepts connections; fail early if the container exits."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            state = self._state()
            if state not in ("running", "created", "restarting"):
                raise DevClusterError(
                    f"{self.name}: container {self.container_name} {state} (exit code "
                    f"{self._exit_code}) before PostgreSQL accepted connections\n"
                    f"--- last lines of its log ---\n{self.log_tail(_LOG_LINES)}",
                    node=self.name,
                )
            try:
                with self.connect(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last_error = e
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"{self.name}: not accepting connections on {HOST}:{self.port} {timeout:g} s "
                    f"after its container started; last connection error: "
                    f"{str(last_error).strip()}\n"
                    f"--- last lines of the log of {self.container_name} ---\n"
                    f"{self.log_tail(_LOG_LINES)}",
                    node=self.name,
                )
            time.sleep(_POLL_INTERVAL)

    def start(self, timeout: float = _RESTART_TIMEOUT) -> None:
        """Start the stopped container and wait until the server accepts connections.

        No-op if it runs.  After :meth:`kill` the server runs crash recovery.
        The host port stays the same; if another program took it meanwhile
        this raises :class:`~shardkit.errors.DevClusterError`.
        """
        if self.is_running():
            return
        from docker.errors import APIError

        try:
            self._docker_container().start()
        except APIError as e:
            text = _error_text(e)
            if _is_port_conflict(text):
                raise DevClusterError(
                    f"could not start {self.name}: host port {self.port} was taken by another "
                    f"program while it was stopped (Docker: {text}); a node keeps its port for "
                    "the life of its container, so that URLs stay valid: stop that program, or "
                    "start a new cluster", node=self.name) from None
            raise DevClusterError(f"could not start {self.name} (container "
                                  f"{self.container_name}): {text}", node=self.name) from None
        self._wait_accepting(timeout)

    def stop(self, mode: str = "fast", timeout: float = _STOP_TIMEOUT) -> None:
        """Shut the server down in ``mode`` and wait until its container has exited.

        ``mode`` is ``smart``, ``fast`` (disconnect clients, clean shutdown) or
        ``immediate`` (no shutdown checkpoint; crash recovery on next start),
        sent as SIGTERM, SIGINT or SIGQUIT to the postmaster.  No-op if the
        container is not running.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(_STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            return
        self._signal(_STOP_SIGNALS[mode])
        hint = " or stop(mode='immediate')" if mode != "immediate" else ""
        self._wait_stopped(timeout, f"{_STOP_SIGNALS[mode]} ({mode} shutdown)", hint)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the container, as a machine crash would, and wait until it has exited.

        Every process in it dies at once; the next :meth:`start` runs crash recovery.
        """
        if not self.is_running():
            raise DevClusterError(f"cannot kill {self.name}: it is not running", node=self.name)
        self._signal("SIGKILL")
        self._wait_stopped(timeout, "SIGKILL")
        log.info("%s killed (container %s)", self.name, self.container_name)


class DockerCluster(_ClusterLayout):
    """Shards of a primary and streaming replicas, each server in a ``postgres`` container.

    Make one with :meth:`up` and remove it with :meth:`down` (or use it as a
    context manager).  See the module documentation for what differs from
    :class:`~shardkit.devcluster.DevCluster`.
    """

    def __init__(self, base_dir: Path, bucket_count: int, shards: list[DevShard], *,
                 image: str = IMAGE) -> None:
        self.base_dir = base_dir
        self.bucket_count = bucket_count
        self.shards = shards
        self.image = image
        self.name = f"shardkit-{uuid.uuid4().hex[:8]}"
        self._network: Network | None = None

    def __repr__(self) -> str:
        return f"<DockerCluster {self.name} {len(self.shards)} shard(s) {self.shards!r}>"

    def __enter__(self) -> DockerCluster:
        return self

    # -- up ------------------------------------------------------------------

    @classmethod
    def up(cls, base_dir: str | os.PathLike[str], shards: int = 2, replicas: int = 1, *,
           bucket_count: int = 1024, port_start: int | None = None,
           image: str = IMAGE) -> DockerCluster:
        """Start ``shards`` primaries with ``replicas`` streaming replicas each, in containers.

        Shards are named ``s0``, ``s1``, ...; host ports are free loopback
        ports, or ``port_start``, ``port_start + 1``, ... in node order when
        given.  ``base_dir`` must be new or empty; it receives
        ``shardkit.toml``.  If ``up`` fails, it removes what it made.
        """
        cls._check_shape(shards, replicas, bucket_count, port_start)
        base = Path(base_dir).expanduser().absolute()
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise DevClusterError(
                f"{base} is not an empty directory; a docker cluster starts in a new or empty "
                "one (it cannot reattach to containers started before)"
            )
        problem = testcontainers_problem() or docker_host_problem()
        if problem:
            raise DevClusterError(problem)
        from testcontainers.core.network import Network

        created_base = not base.exists()
        base.mkdir(parents=True, exist_ok=True)
        cluster = cls(base, bucket_count, [], image=image)
        started = time.monotonic()
        cancel = threading.Event()
        try:
            cluster._plan(shards, replicas, port_start)
            cluster._network = Network().create()
            _in_parallel(lambda s: cluster._build_shard(s, cancel, port_start is not None),
                         cluster.shards, cancel)
            cluster.write_config(base / CONFIG_FILE)
        except BaseException:
            cluster._abort(created_base)
            raise
        log.info("docker cluster %s of %d shard(s) x %d replica(s) up in %.2f s",
                 cluster.name, shards, replicas, time.monotonic() - started)
        return cluster

    def _plan(self, shards: int, replicas: int, port_start: int | None) -> None:
        """Name the nodes and choose their host ports (nothing runs yet)."""
        for shard, layout in plan_nodes(shards, replicas, port_start):
            nodes: list[DockerNode] = []
            for j, (node_name, port) in enumerate(layout):
                nodes.append(DockerNode(
                    shard=shard, name=f"{shard}/{node_name}",
                    role="primary" if j == 0 else "replica", port=port,
                    container_name=f"{self.name}-{shard}-{node_name}",
                    alias=f"{shard}-{node_name}",
                    log_copy=self.base_dir / shard / f"{node_name}.log",
                    primary=nodes[0] if nodes else None,
                ))
            self.shards.append(DevShard(shard, nodes[0], list(nodes[1:])))

    def _new_container(self, node: DockerNode) -> DockerContainer:
        """The (not yet started) container of ``node``."""
        from testcontainers.core.container import DockerContainer

        assert self._network is not None
        container = (DockerContainer(self.image)
                     .with_name(node.container_name)
                     .with_network(self._network)
                     .with_network_aliases(node.alias))
        # Published on loopback only, at the port the server listens on inside.
        # with_bind_ports() takes no host address (testcontainers 4.15 rejects
        # one); `ports` goes to docker-py as is, which documents (address, port)
        # tuples for this.
        container.ports[f"{node.port}/tcp"] = (HOST, node.port)  # type: ignore[assignment]
        # The entrypoint's set-up server and `docker exec ... psql` use it too.
        container.with_env("PGPORT", str(node.port))
        kwargs: dict[str, Any] = {"entrypoint": ["bash", "-c"], "shm_size": _SHM_SIZE}
        if node.role == "primary":
            for key, value in PRIMARY_ENV.items():
                container.with_env(key, value)
            container.with_command([primary_script(node.port)])
        else:
            kwargs["user"] = "postgres"
            primary = node.primary_node
            container.with_command([replica_script(node.port, primary.alias, primary.port,
                                                   node.slot_name)])
        return container.with_kwargs(**kwargs)

    def _start_container(self, node: DockerNode, cancel: threading.Event,
                         fixed_ports: bool) -> None:
        """Create and start the node's container; if its port was taken meanwhile, take another."""
        from docker.errors import APIError

        for attempt in range(3):
            if cancel.is_set():
                raise _Cancelled()
            if not fixed_ports and not _port_free(node.port):
                node.port = _pick_port()
            container = self._new_container(node)
            try:
                with _start_lock:
                    container.start()
            except APIError as e:
                self._discard(node.container_name)
                text = _error_text(e)
                if _is_port_conflict(text) and not fixed_ports and attempt < 2:
                    log.info("%s: port %d was taken; trying another", node.name, node.port)
                    node.port = _pick_port()
                    continue
                raise DevClusterError(
                    f"could not start the container of {node.name} ({self.image}) on "
                    f"{HOST}:{node.port}: {text}", node=node.name) from None
            except BaseException:
                # Created, perhaps, before the engine or this process gave up.
                self._discard(node.container_name)
                raise
            node._container = container
            return

    def _build_shard(self, shard: DevShard, cancel: threading.Event, fixed_ports: bool) -> None:
        """Start the primary, then clone and start its replicas."""
        primary: DockerNode = shard.primary  # type: ignore[assignment]
        t0 = time.monotonic()
        self._start_container(primary, cancel, fixed_ports)
        primary._wait_accepting(_FIRST_START_TIMEOUT)
        with primary.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        log.info("%s up on port %d in %.2f s", primary.name, primary.port, time.monotonic() - t0)
        if shard.replicas:
            replicas: list[DockerNode] = shard.replicas  # type: ignore[assignment]
            _in_parallel(lambda r: self._build_replica(r, cancel, fixed_ports), replicas, cancel)

    def _build_replica(self, replica: DockerNode, cancel: threading.Event,
                       fixed_ports: bool) -> None:
        if cancel.is_set():
            raise _Cancelled()
        t0 = time.monotonic()
        self._start_container(replica, cancel, fixed_ports)
        replica._wait_accepting(_FIRST_START_TIMEOUT)
        replica.wait_streaming()
        log.info("%s streaming on port %d in %.2f s", replica.name, replica.port,
                 time.monotonic() - t0)

    # -- down ----------------------------------------------------------------

    def _discard(self, name: str) -> None:
        """Remove, if it exists, a container that was created but did not start."""
        from docker.errors import NotFound
        from testcontainers.core.docker_client import DockerClient

        try:
            client = DockerClient().client
            try:
                client.containers.get(name).remove(force=True, v=True)
            finally:
                client.close()
        except NotFound:
            pass
        # Clean-up after a failure: report, but do not hide the failure.
        except Exception as e:  # noqa: BLE001
            log.error("could not remove container %s: %s", name, e)

    def _remove_all(self) -> list[str]:
        """Remove every container (and its data volume) and the network; return the failures."""
        from docker.errors import NotFound

        failures: list[str] = []

        def remove(node: DockerNode) -> None:
            if node._container is None:
                return
            try:
                node._container.stop(force=True, delete_volume=True)
            except NotFound:
                pass
            # Teardown reports what it could not remove, whatever the reason.
            except Exception as e:  # noqa: BLE001
                failures.append(f"{node.name} (container {node.container_name}): {e}")
                return
            node._container = None

        _in_parallel(remove, self.nodes, threading.Event())
        if self._network is not None and not failures:
            try:
                self._network.remove()
            except NotFound:
                pass
            except Exception as e:  # noqa: BLE001
                failures.append(f"network {self._network.name}: {e}")
            else:
                self._network = None
        return failures

    def _abort(self, created_base: bool) -> None:
        """Remove what a failed :meth:`up` made."""
        failures = self._remove_all()
        for failure in failures:
            log.error("cleaning up a failed start: could not remove %s", failure)
        self._empty_base_dir(created_base)

    def down(self, remove: bool = True) -> None:
        """Remove every container, its data and the network, then delete ``base_dir``.

        With ``remove=False`` the servers are only shut down (fast, then
        immediate if one takes over 10 s) and the containers kept: each
        node's :meth:`~DockerNode.start` starts it again.  Calling ``down``
        again is harmless.
        """
        if not remove:
            failures = stop_nodes(n for n in self.nodes if n._container is not None)  # type: ignore[attr-defined]
            if failures:
                raise DevClusterError(
                    f"could not stop {', '.join(str(e.node) for e in failures)}: "
                    f"{'; '.join(e.message for e in failures)}", node=failures[0].node)
            log.info("docker cluster %s stopped", self.name)
            return
        failed = self._remove_all()
        if failed:
            raise DevClusterError(
                f"could not remove {'; '.join(failed)}; remove them with `docker rm -f -v` "
                f"(`docker ps -a --filter name={self.name}` lists them) and "
                "`docker network rm`")
        if self.base_dir.exists():
            shutil.rmtree(self.base_dir)
        log.info("docker cluster %s removed", self.name)
