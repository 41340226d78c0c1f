"""Real PgBouncer processes in front of a dev cluster's nodes, for integration tests.

One :class:`PgBouncer` per server: ``pool_mode = transaction`` by default, a small
``default_pool_size`` (so clients really share server connections), ``auth_type =
trust`` (the dev cluster's own ``pg_hba.conf`` trusts loopback), a free loopback
port, its ini, log and pid files in a directory of its own.  As root it runs as
the OS user the dev cluster runs PostgreSQL as (PgBouncer refuses to run as root).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from shardkit.devcluster import DB_NAME, DB_USER, HOST, _server_os_user

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)

_live: list[PgBouncer] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PgBouncer:
    """One PgBouncer process in front of the server at ``127.0.0.1:server_port``."""

    def __init__(self, server_port: int, *, name: str, pool_mode: str = "transaction",
                 pool_size: int = 2, settings: dict[str, Any] | None = None) -> None:
        if PGBOUNCER is None:
            raise RuntimeError("pgbouncer is not installed")
        self.server_port = server_port
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"pgbouncer-{name.replace('/', '-')}-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        user = pwd.getpwnam(_server_os_user())
        self._uid, self._gid = user.pw_uid, user.pw_gid
        self._switch = os.geteuid() != self._uid
        self.settings = {
            "listen_addr": HOST,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "userlist.txt"),
            "admin_users": DB_USER,
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 500,
            "logfile": str(self.dir / "pgbouncer.log"),
            "pidfile": str(self.dir / "pgbouncer.pid"),
            # A client that waits this long for a server connection is an error, not a hang.
            "query_wait_timeout": 30,
            # A server login that fails once (a busy machine) is retried after 1 s, not
            # after the default 15 s: longer than the clients' query_wait_timeout, so every
            # client waiting meanwhile would fail.
            "server_login_retry": 1,
            **(settings or {}),
        }

    # -- process ------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> PgBouncer:
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                # Another process took the free port between picking and binding it.
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> PgBouncer:
        self.port = _free_port()
        ini = "\n".join([
            "[databases]",
            f"{DB_NAME} = host={HOST} port={self.server_port} dbname={DB_NAME} user={DB_USER}",
            "",
            "[pgbouncer]",
            f"listen_port = {self.port}",
            *(f"{k} = {v}" for k, v in self.settings.items()),
            "",
        ])
        (self.dir / "pgbouncer.ini").write_text(ini)
        (self.dir / "userlist.txt").write_text(f'"{DB_USER}" ""\n')
        self.dir.chmod(0o755)
        if self._switch:
            for p in (self.dir, *self.dir.iterdir()):
                os.chown(p, self._uid, self._gid)
        args = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        setpriv = shutil.which("setpriv")
        kw: dict[str, Any] = {}
        if setpriv:
            # The kernel stops it if this process dies without teardown (SIGKILL, a CI timeout).
            ids = ["--reuid", str(self._uid), "--regid", str(self._gid), "--clear-groups"] if self._switch else []
            args = [setpriv, *ids, "--pdeathsig", "TERM", *args]
        elif self._switch:
            kw = {"user": self._uid, "group": self._gid, "extra_groups": []}
        with open(self.dir / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(args, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr, **kw)
        _live.append(self)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                raise RuntimeError(f"pgbouncer for {self.name} exited with {rc}:\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer for {self.name} did not listen within {timeout} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # PgBouncer: immediate shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self in _live:
            _live.remove(self)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for f in ("stderr.log", "pgbouncer.log"):
            try:
                out += (self.dir / f).read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                pass
        return "\n".join(out)

    # -- clients ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}@{HOST}:{self.port}/{DB_NAME}"

    @property
    def dsn(self) -> str:
        return f"host={HOST} port={self.port} user={DB_USER} dbname={DB_NAME}"

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        """A client connection through this PgBouncer (no prepared statements)."""
        kw.setdefault("autocommit", True)
        kw.setdefault("prepare_threshold", None)
        return psycopg.connect(self.dsn, **kw)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run ``command`` on the admin console (which speaks the simple query protocol only)."""
        with psycopg.connect(f"host={HOST} port={self.port} user={DB_USER} dbname=pgbouncer",
                             autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
            cur = c.execute(command)
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def show(self, what: str) -> list[dict[str, Any]]:
        return self.admin(f"SHOW {what}")

    def server_connections(self) -> int:
        """Server connections this PgBouncer has open to its server now (any state)."""
        return sum(1 for s in self.show("SERVERS") if s.get("database") == DB_NAME)


def stop_all() -> None:
    for b in list(_live):
        b.stop()


atexit.register(stop_all)
