"""A local cluster of real PostgreSQL servers, for development, the demo and tests.

``DevCluster.up(dir, shards=2, replicas=1)`` starts one primary per shard, each
with streaming replicas made by ``pg_basebackup``, on free loopback ports, and
writes ``dir/shardkit.toml``.  PostgreSQL refuses to run as root, so when this
process is root the servers run as an unprivileged ``shardkit`` system user
(created if missing).

The servers are disposable: durability settings are off for speed.  Never
point this module at data you care about.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DevClusterError

__all__ = ["DevCluster", "DevNode", "DevShard", "find_pg_bin", "to_toml"]

log = logging.getLogger("shardkit.devcluster")

DB = "shardkit"
USER = "shardkit"
STATE_FILE = "devcluster.json"
_port_lock = threading.Lock()
_ports_taken: set[int] = set()

# Disposable dev servers: no fsync, small memory, logical WAL for online moves.
_SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_keep_size": "512MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
    "max_prepared_transactions": "50",
}


def find_pg_bin() -> Path:
    """The directory holding ``initdb``/``pg_ctl``/``pg_basebackup``."""
    looked: list[str] = []
    env = os.environ.get("SHARDKIT_PG_BIN")
    candidates: list[str] = []
    if env:
        candidates.append(env)
    else:
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0:
                candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                          key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                          reverse=True)
        candidates.extend(versions)
        which = shutil.which("initdb")
        if which:
            candidates.append(str(Path(which).resolve().parent))
    for c in candidates:
        looked.append(c)
        if all((Path(c) / b).exists() for b in ("initdb", "pg_ctl", "pg_basebackup", "postgres")):
            return Path(c)
    raise DevClusterError(
        "PostgreSQL server binaries not found (looked in: "
        + (", ".join(looked) or "SHARDKIT_PG_BIN, pg_config, /usr/lib/postgresql/*/bin, PATH")
        + "); install them with `apt-get install -y postgresql` or set SHARDKIT_PG_BIN "
        "to the directory holding initdb"
    )


def _free_port() -> int:
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_taken:
                _ports_taken.add(port)
                return port
    raise DevClusterError("no free loopback port found")


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the servers as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in (USER, "nobody"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            if name == USER and shutil.which("useradd"):
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                    capture_output=True,
                )
                try:
                    pw = pwd.getpwnam(USER)
                    return pw.pw_uid, pw.pw_gid
                except KeyError:
                    continue
    raise DevClusterError("running as root and no unprivileged user to run PostgreSQL as; "
                          "create one with `useradd --system shardkit`")


@dataclass
class DevNode:
    """One PostgreSQL server of the local cluster."""

    shard: str
    name: str
    role: str
    port: int
    datadir: str
    _cluster: DevCluster = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{DB}"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={DB}"

    @property
    def logfile(self) -> str:
        return self.datadir + ".log"

    def _pg(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._cluster._run([str(self._cluster.pg_bin / args[0]), *args[1:]],
                                  check=check, timeout=timeout, node=self.name)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        pidfile = Path(self.datadir) / "postmaster.pid"
        if pidfile.exists() and not self.is_running():
            pidfile.unlink()  # left behind by kill()
        self._pg("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                 "-o", f"-p {self.port}", "start")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                # The maintenance database exists before ours is created.
                dsn = f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres"
                with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as c:
                    c.execute("select 1")
                return
            except psycopg.Error as e:
                last = e
                time.sleep(0.1)
        raise DevClusterError(f"{self.name} did not accept connections within {timeout} s: {last}"
                              f"\n{self.log_tail()}", node=self.name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        if not self.is_running():
            return
        r = self._pg("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "10", "stop",
                     check=False, timeout=30)
        if r.returncode != 0 and mode != "immediate":
            self._pg("pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop", check=False)

    def pid(self) -> int | None:
        try:
            return int((Path(self.datadir) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie or a recycled pid: check it is a postgres process.
        try:
            return "postgres" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, like a crash."""
        pid = self.pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        for p in [pid, *map(int, children)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)

    def connect(self, **kw: Any) -> Any:
        """A psycopg connection (autocommit) to this node."""
        import psycopg

        kw.setdefault("autocommit", True)
        kw.setdefault("connect_timeout", 5)
        return psycopg.connect(self.dsn, **kw)

    def set_apply_delay(self, seconds: float) -> None:
        """Make a replica apply WAL ``seconds`` late (``recovery_min_apply_delay``)."""
        if self.role != "replica":
            raise DevClusterError(f"{self.name} is not a replica", node=self.name)
        with self.connect() as c:
            c.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(seconds * 1000)}ms'")
            c.execute("SELECT pg_reload_conf()")

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Wait until this replica has replayed everything its primary has written."""
        primary = self._cluster.shard(self.shard).primary
        with primary.connect() as pc:
            # The insert position: with asynchronous commit, recent commits may not
            # be written yet, but they are what a reader expects to see.
            target = pc.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        with self.connect() as c:
            while True:
                ok = c.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]
                if ok:
                    return
                if time.monotonic() > deadline:
                    raise DevClusterError(f"{self.name} did not catch up within {timeout} s",
                                          node=self.name)
                time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.logfile).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


@dataclass
class DevShard:
    name: str
    primary: DevNode
    replicas: list[DevNode]

    @property
    def nodes(self) -> list[DevNode]:
        return [self.primary, *self.replicas]


class DevCluster:
    """A running local cluster.  Use :meth:`up` to start one, :meth:`load` to reattach."""

    def __init__(self, base_dir: Path, shards: list[DevShard], bucket_count: int, pg_bin: Path,
                 run_as: tuple[int, int] | None) -> None:
        self.base_dir = Path(base_dir)
        self.shards = shards
        self.bucket_count = bucket_count
        self.pg_bin = pg_bin
        self.run_as = run_as
        for s in shards:
            for n in s.nodes:
                n._cluster = self

    # -- process helpers -------------------------------------------------------------

    def _run(self, cmd: list[str], *, check: bool = True, timeout: float = 120,
             node: str | None = None) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {}
        if self.run_as is not None:
            kw["user"], kw["group"] = self.run_as
            kw["extra_groups"] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                               cwd="/", **kw)
        except subprocess.TimeoutExpired:
            raise DevClusterError(f"{' '.join(cmd[:2])} timed out after {timeout} s", node=node) from None
        if check and r.returncode != 0:
            raise DevClusterError(
                f"{Path(cmd[0]).name} failed for {node or 'cluster'} (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[-2000:]}",
                node=node,
            )
        return r

    def shard(self, name: str) -> DevShard:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def nodes(self) -> list[DevNode]:
        return [n for s in self.shards for n in s.nodes]

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def up(cls, base_dir: str | os.PathLike[str], shards: int = 2, replicas: int = 1, *,
           bucket_count: int = 1024) -> DevCluster:
        """Start ``shards`` primaries with ``replicas`` streaming replicas each."""
        if shards < 1 or replicas < 0:
            raise DevClusterError(f"need shards >= 1 and replicas >= 0 (got {shards}, {replicas})")
        base = Path(base_dir).absolute()
        if (base / STATE_FILE).exists():
            existing = cls.load(base)
            shape = (len(existing.shards), len(existing.shards[0].replicas))
            if shape == (shards, replicas) and existing.bucket_count == bucket_count:
                for n in existing.nodes:
                    if not n.is_running():
                        n.start()
                return existing
            raise DevClusterError(
                f"{base} already holds a {shape[0]}x{shape[1]} cluster; run "
                f"`shardkit dev down --dir {base_dir}` first"
            )
        pg_bin = find_pg_bin()
        run_as = _run_as()
        base.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            os.chown(base, *run_as)
            # Parents must be traversable by the server user.
            for parent in base.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise DevClusterError(
                        f"{parent} is not searchable by the unprivileged PostgreSQL user; "
                        "choose a --dir under a world-searchable directory (e.g. /tmp)"
                    )
        shard_objs = []
        for i in range(shards):
            name = f"s{i}"
            primary = DevNode(name, f"{name}/primary", "primary", _free_port(), str(base / name / "primary"))
            reps = [DevNode(name, f"{name}/r{j}", "replica", _free_port(), str(base / name / f"r{j}"))
                    for j in range(replicas)]
            shard_objs.append(DevShard(name, primary, reps))
        cluster = cls(base, shard_objs, bucket_count, pg_bin, run_as)
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=min(4, max(1, shards))) as ex:
                list(ex.map(cluster._start_shard, shard_objs))
        except BaseException:
            cluster.down(remove=True)
            raise
        cluster._save()
        cluster.write_config(base / "shardkit.toml")
        log.info("local cluster %dx%d up in %.1f s", shards, replicas, time.monotonic() - started)
        return cluster

    def _start_shard(self, shard: DevShard) -> None:
        p = shard.primary
        Path(p.datadir).parent.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            os.chown(Path(p.datadir).parent, *self.run_as)
        self._run([str(self.pg_bin / "initdb"), "-D", p.datadir, "-U", USER, "--auth=trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"], node=p.name)
        settings = dict(_SERVER_SETTINGS)
        pkglib = self._pkglibdir()
        if pkglib and (Path(pkglib) / "pg_stat_statements.so").exists():
            settings["shared_preload_libraries"] = "'pg_stat_statements'"
        conf = Path(p.datadir) / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# shardkit dev cluster (disposable)\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        (Path(p.datadir) / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        p.start()
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={p.port} user={USER} dbname=postgres",
                             autocommit=True) as c:
            c.execute(f"CREATE DATABASE {DB}")
        if "shared_preload_libraries" in settings:
            with p.connect() as c:
                c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for r in shard.replicas:
            slot = r.name.replace("/", "_")
            self._run([str(self.pg_bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(p.port),
                       "-U", USER, "-D", r.datadir, "-R", "-X", "stream", "-c", "fast",
                       "-C", "-S", slot, "--no-sync"], node=r.name)
            r.start()
        for r in shard.replicas:
            self._wait_streaming(r)

    def _pkglibdir(self) -> str | None:
        pg_config = self.pg_bin / "pg_config"
        exe = str(pg_config) if pg_config.exists() else shutil.which("pg_config")
        if not exe:
            lib = self.pg_bin.parent / "lib"
            return str(lib) if lib.exists() else None
        try:
            return subprocess.run([exe, "--pkglibdir"], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    def _wait_streaming(self, r: DevNode, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with r.connect() as c:
            while True:
                row = c.execute(
                    "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)"
                ).fetchone()
                if row[0] and row[1] == "streaming":
                    return
                if time.monotonic() > deadline:
                    raise DevClusterError(f"{r.name} is not streaming after {timeout} s\n{r.log_tail()}",
                                          node=r.name)
                time.sleep(0.05)

    def down(self, remove: bool = True) -> None:
        """Stop every node (replicas first) and, with ``remove``, delete the directory."""
        nodes = [n for s in self.shards for n in s.replicas] + [s.primary for s in self.shards]
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(lambda n: n.stop("fast"), nodes))
        if remove and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @classmethod
    def load(cls, base_dir: str | os.PathLike[str]) -> DevCluster:
        """Reattach to a cluster started by :meth:`up` (possibly in another process)."""
        base = Path(base_dir).absolute()
        try:
            state = json.loads((base / STATE_FILE).read_text())
        except FileNotFoundError:
            raise DevClusterError(f"no local cluster in {base} (no {STATE_FILE})") from None
        shards = []
        for s in state["shards"]:
            primary = DevNode(**s["primary"])
            reps = [DevNode(**r) for r in s["replicas"]]
            shards.append(DevShard(s["name"], primary, reps))
        run_as = tuple(state["run_as"]) if state.get("run_as") else None
        return cls(base, shards, state["bucket_count"], Path(state["pg_bin"]), run_as)  # type: ignore[arg-type]

    def _save(self) -> None:
        def node(n: DevNode) -> dict[str, Any]:
            return {"shard": n.shard, "name": n.name, "role": n.role, "port": n.port,
                    "datadir": n.datadir}
        state = {
            "bucket_count": self.bucket_count,
            "pg_bin": str(self.pg_bin),
            "run_as": list(self.run_as) if self.run_as else None,
            "shards": [{"name": s.name, "primary": node(s.primary),
                        "replicas": [node(r) for r in s.replicas]} for s in self.shards],
        }
        (self.base_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # -- configuration ---------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        return {
            "bucket_count": self.bucket_count,
            "shards": [{"name": s.name, "primary": s.primary.url,
                        "replicas": [r.url for r in s.replicas]} for s in self.shards],
        }

    def write_config(self, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        data = _deep_merge(self.config_dict(), extra or {})
        p = Path(path)
        p.write_text("# written by shardkit dev up\n" + to_toml(data))
        return p


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for configuration data (scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, items in arrays:
        name = f"{prefix}{_toml_key(k)}"
        for item in items:
            out += f"\n[[{name}]]\n" + to_toml(item, prefix=f"{name}.")
    for k, v in tables:
        name = f"{prefix}{_toml_key(k)}"
        out += f"\n[{name}]\n" + to_toml(v, prefix=f"{name}.")
    return out
