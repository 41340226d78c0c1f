"""A local cluster of real PostgreSQL servers, for development, the demo and tests.

Each shard is a primary with streaming replicas, every server on 127.0.0.1::

    from shardkit.devcluster import DevCluster

    with DevCluster.up(".shardkit-dev", shards=2, replicas=1) as cluster:
        cluster.write_config("shardkit.toml")
        ...                                  # cluster.down() runs on exit

The servers are tuned for speed, not durability (``fsync = off``): the data is
disposable.  PostgreSQL refuses to run as root, so when the current user is
root the servers run as the unprivileged OS user ``shardkit`` (created on first
use; ``nobody`` where users cannot be created).

Layout of a base directory::

    shardkit.toml         the cluster config, as config_dict() returns it
    devcluster.json       what DevCluster.load() needs to reattach from another process
    s0/primary/data       a server's data directory
    s0/primary/postgres.log  and its log
    s0/r0/...             the shard's first replica

The server programs are looked for in ``$SHARDKIT_PG_BIN``, then
``pg_config --bindir``, then the newest ``/usr/lib/postgresql/*/bin``, then on
``PATH``.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import json
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from ._config import MAX_BUCKET_COUNT
from .errors import DevClusterError

__all__ = ["DevCluster", "DevNode", "DevShard", "find_pg_bin", "to_toml"]

log = logging.getLogger("shardkit.devcluster")

HOST = "127.0.0.1"
DB_NAME = "shardkit"
DB_USER = "shardkit"
SERVER_OS_USER = "shardkit"
STATE_FILE = "devcluster.json"
CONFIG_FILE = "shardkit.toml"
# What `shardkit demo` writes in a cluster's directory (its marker, lock and config):
# down() removes them with the cluster's own files.
_DEMO_FILES = (".shardkit-demo", ".shardkit-demo.lock", "shardkit-demo.toml")

_STATE_VERSION = 1
_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_STOP_MODES = ("smart", "fast", "immediate")
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_READY_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
#: shmctl()'s command to remove a System V shared memory segment (<sys/ipc.h>, Linux).
_IPC_RMID = 0
_SETTINGS_MARKER = "# --- shardkit.devcluster: everything below is rewritten by shardkit ---"
# More servers than this in one cluster is a typo, not a development setup.
MAX_NODES = 256
_PICK_PORT_ATTEMPTS = 1000
# pg_ctl runs the server through /bin/sh with the paths in double quotes, where
# these characters still mean something to the shell.
_UNSAFE_PATH_CHARS = {"$": "$", "`": "`", '"': '"', "\\": "\\", "\n": "newline",
                      "\r": "carriage return", "\0": "NUL"}

_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Finding the server programs and the OS user that runs them


def find_pg_bin() -> Path:
    """Return the directory that holds the PostgreSQL server programs.

    Looks at ``$SHARDKIT_PG_BIN``, then ``pg_config --bindir``, then the
    newest ``/usr/lib/postgresql/*/bin``, then ``initdb`` on ``PATH``; a
    directory counts only if it has all of initdb, pg_ctl, postgres and
    pg_basebackup.  Raises :class:`DevClusterError` saying how to install
    them when none is found.
    """
    env = os.environ.get("SHARDKIT_PG_BIN")
    if env:
        missing = _missing_programs(Path(env))
        if missing:
            raise DevClusterError(
                f"SHARDKIT_PG_BIN={env} does not hold the PostgreSQL server programs "
                f"(missing: {', '.join(missing)}); point it at the bin directory of a "
                "PostgreSQL installation (the one with initdb), or unset it to search "
                "the usual places"
            )
        return Path(env)

    looked: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            looked.append(f"pg_config --bindir ({out})")
            if not _missing_programs(Path(out)):
                return Path(out)
    looked.append("/usr/lib/postgresql/*/bin")
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if not _missing_programs(Path(candidate)):
            return Path(candidate)
    looked.append("initdb on PATH")
    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin may hold a symlink to initdb alone; its target's
        # directory has the other programs.
        candidate = Path(initdb).resolve().parent
        if not _missing_programs(candidate):
            return candidate
    raise DevClusterError(
        f"PostgreSQL server programs not found (looked in: {', '.join(looked)}); install them "
        "with `apt-get install -y postgresql` or set SHARDKIT_PG_BIN to the directory that "
        "holds initdb"
    )


def _missing_programs(bin_dir: Path) -> list[str]:
    return [p for p in _SERVER_PROGRAMS if not os.access(bin_dir / p, os.X_OK)]


def _version_key(bin_dir: str) -> tuple[int, ...]:
    """Sort key of ``/usr/lib/postgresql/<version>/bin``: 15 > 9.6, unparseable first."""
    version = Path(bin_dir).parent.name
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return ()


class _Programs:
    """Runs the PostgreSQL programs of one installation as the OS user that owns the servers."""

    def __init__(self, bin_dir: Path, os_user: str) -> None:
        self.bin_dir = bin_dir
        self.os_user = os_user
        entry = pwd.getpwnam(os_user)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.switch_user = os.geteuid() != self.uid
        if self.switch_user and os.geteuid() != 0:
            raise DevClusterError(
                f"the servers of this cluster run as OS user {os_user!r}; "
                f"run this as {os_user!r} or as root"
            )
        # Drop the caller's libpq settings (PGHOST, PGOPTIONS, ...): they must
        # not redirect or alter what these programs do.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # English messages: start failures are recognised by their log text.
        self.env["LC_ALL"] = "C"
        if self.switch_user:
            self.env.update(HOME=entry.pw_dir, USER=os_user, LOGNAME=os_user)
        self.pg_stat_statements = (self._pkglibdir() / "pg_stat_statements.so").exists()

    def _pkglibdir(self) -> Path:
        pg_config = self.bin_dir / "pg_config"
        if os.access(pg_config, os.X_OK):
            try:
                return Path(self.run([str(pg_config), "--pkglibdir"], what="pg_config").strip())
            except DevClusterError:
                pass
        # Debian and the PostgreSQL source layout keep modules in ../lib.
        return self.bin_dir.parent / "lib"

    def path(self, program: str) -> str:
        return str(self.bin_dir / program)

    def own(self, path: Path) -> None:
        """Give a directory shardkit created to the server user."""
        if self.switch_user:
            os.chown(path, self.uid, self.gid)

    def run(self, args: list[str], *, what: str, node: str | None = None,
            timeout: float = 120.0) -> str:
        """Run a program as the server user; return its stdout, raise DevClusterError on failure."""
        log.debug("%s: %s", node or "devcluster", " ".join(args))
        kwargs: dict[str, Any] = {}
        if self.switch_user:
            kwargs = {"user": self.uid, "group": self.gid, "extra_groups": []}
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                # The caller's working directory may be closed to the server user.
                cwd="/", env=self.env, timeout=timeout, **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise DevClusterError(f"{what} did not finish within {timeout:g} s",
                                  node=node) from None
        except OSError as e:
            raise DevClusterError(f"{what}: cannot run {args[0]}: {e}", node=node) from e
        if proc.returncode != 0:
            output = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
            raise DevClusterError(f"{what} failed (exit {proc.returncode}): {output}", node=node)
        return proc.stdout


def _server_os_user() -> str:
    """The OS user to run servers as: ourselves, or when root an unprivileged one."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(SERVER_OS_USER)
        return SERVER_OS_USER
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd:
        proc = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVER_OS_USER],
            capture_output=True, text=True,
        )
        try:
            # Also covers a concurrent start that created the user first.
            pwd.getpwnam(SERVER_OS_USER)
            log.info("created OS user %s to run the PostgreSQL servers", SERVER_OS_USER)
            return SERVER_OS_USER
        except KeyError:
            log.warning("useradd %s failed: %s", SERVER_OS_USER, proc.stderr.strip())
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        raise DevClusterError(
            f"running as root, and there is no unprivileged OS user to run PostgreSQL as: "
            f"create one with `useradd --system --no-create-home {SERVER_OS_USER}`"
        ) from None
    log.warning("running the PostgreSQL servers as OS user nobody")
    return "nobody"


def _unreachable_ancestor(path: Path, programs: _Programs) -> Path | None:
    """The first directory on the way to ``path`` that the server user cannot enter."""
    if not programs.switch_user:
        return None
    groups = set(os.getgrouplist(programs.os_user, programs.gid))
    for d in reversed([path, *path.parents]):
        st = d.stat()
        if st.st_uid == programs.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


# --------------------------------------------------------------------------
# Ports and processes


_port_lock = threading.Lock()
# Ports handed out by this process: two clusters started at once in threads
# must not pick the same one between picking and binding.
_ports_handed_out: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL does: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_port() -> int:
    """A loopback port that nothing listens on now (the kernel picks it)."""
    with _port_lock:
        for _ in range(_PICK_PORT_ATTEMPTS):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, 0))
                except OSError as e:
                    raise DevClusterError(f"no free loopback port for a server: {e}") from None
                port = s.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise DevClusterError(
        f"no free loopback port for a server: this process has handed out "
        f"{len(_ports_handed_out)} ports already and {_PICK_PORT_ATTEMPTS} tries found no other; "
        "start fewer servers"
    )


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _is_postgres(pid: int, datadir: Path | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) PostgreSQL process; with ``datadir``,
    one that serves that data directory.

    A pid file can outlive its server (a crash, a reboot) and its pid be reused
    by another program -- another cluster's server, too: the process must work
    in ``datadir`` (a postmaster's working directory is its data directory), or
    name it after ``-D`` on its command line.
    """
    if not Path("/proc").is_dir():
        # No /proc (macOS): all we can tell is whether the pid exists.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, under another user
        return True
    st = _proc_stat(pid)
    if st is None or st[0] == "Z":
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    if comm not in ("postgres", "postmaster"):
        return False
    return datadir is None or _serves(pid, datadir)


def _serves(pid: int, datadir: Path) -> bool:
    """Whether the PostgreSQL process ``pid`` works in ``datadir`` (Linux /proc)."""
    want = os.path.realpath(datadir)
    try:
        return os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == want
    except PermissionError:
        pass  # another user's process, and we are not root: try its command line
    except OSError:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-D":
            return os.path.realpath(os.fsdecode(argv[i + 1])) == want
    return False


def _children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (empty where there is no /proc)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] == pid:
                found.append(int(entry.name))
    return found


def _leftovers(datadir: Path) -> list[int]:
    """Pids of PostgreSQL processes still working in ``datadir`` (empty where there is no /proc).

    Once a postmaster has died, its backends and workers run on (a busy one until
    its query ends) and keep the old shared memory, so no new server can start.
    """
    if not Path("/proc").is_dir():
        return []
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and _is_postgres(int(e.name), datadir)]


# What ``up`` runs on a data directory (``-D DATADIR``) besides the server itself.
_HELPER_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup")


def _helpers_on(datadirs: Iterable[Path]) -> list[int]:
    """Pids of initdb, pg_ctl and pg_basebackup runs on one of ``datadirs`` (``-D DATADIR``
    on their command line; empty where there is no /proc): what an ``up`` killed mid-start
    leaves working, writing or starting servers in directories ``down`` removes."""
    if not Path("/proc").is_dir():
        return []
    want = {os.path.realpath(d) for d in datadirs}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"-D" not in argv[:-1]:
                continue
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm not in _HELPER_PROGRAMS:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-D" and os.path.realpath(os.fsdecode(argv[i + 1])) in want:
                found.append(int(entry.name))
                break
    return found


# Base directories an up() of this process holds locked (flock: a second lock of this
# process on another descriptor would wait for itself, e.g. a SIGTERM handler's down()).
_held_here: set[Path] = set()
_held_lock = threading.Lock()


def _lock_existing(base: Path) -> int | None:
    """Lock ``base`` as ``up`` does (waiting for an ``up`` still starting there); the
    descriptor that holds the lock, or None when ``base`` is gone or this process's
    up() holds it."""
    with _held_lock:
        if base in _held_here:
            return None
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kill_and_wait(victims: list[int], what: str, timeout: float, node: str | None,
                   alive: Callable[[], bool] | None = None) -> None:
    """SIGKILL ``victims`` and wait until none is a live PostgreSQL process (or until
    ``alive()`` is false)."""
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive() if alive is not None else any(_is_postgres(p) for p in victims):
        if time.monotonic() > deadline:
            raise DevClusterError(
                f"{what}: processes {victims} still alive {timeout:g} s after SIGKILL", node=node)
        time.sleep(_POLL_INTERVAL)


def _tail(path: Path, lines: int = 25, offset: int = 0) -> str:
    """The last ``lines`` lines of a text file from byte ``offset`` on ('' if missing)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class _Retry(Exception):
    """The directory ``up`` waited for was removed meanwhile: look at it again."""


def _check_path(base: Path) -> None:
    """Refuse a base directory that pg_ctl's /bin/sh command line would not take literally."""
    bad = sorted({name for ch, name in _UNSAFE_PATH_CHARS.items() if ch in str(base)})
    if bad:
        raise DevClusterError(
            f"the cluster directory {str(base)!r} contains {', '.join(bad)}: pg_ctl runs the "
            "server through /bin/sh, where these characters are not taken literally, so "
            f"they are not allowed ({' '.join(_UNSAFE_PATH_CHARS.values())}); choose another "
            "directory"
        )


def _make_and_lock(base: Path) -> tuple[bool, int]:
    """Create ``base`` if missing and lock it exclusively (waiting for another ``up``).

    Returns whether this call created it, and the open descriptor that holds
    the lock (closing it releases the lock).  Raises :class:`_Retry` when the
    directory was removed while we waited (a concurrent ``up`` failed).
    """
    if base.exists() and not base.is_dir():
        raise DevClusterError(
            f"{base} exists and is not a directory; choose a new or empty directory"
        )
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        try:
            base.mkdir()
            created = True
        except FileExistsError:
            created = False
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DevClusterError(
            f"cannot create or open the cluster directory {base}: {e.strerror or e}; "
            "choose a directory you can write to"
        ) from None
    try:
        # Another `dev up` on this directory holds it until its servers are up.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(base))
        except FileNotFoundError:
            same = False
        if not same:
            raise _Retry()
    except BaseException:
        os.close(fd)
        raise
    return created, fd


class _InitdbTemplates:
    """Pristine initdb output kept for this process, so later primaries copy it.

    One template per (server bin dir, OS user, initdb arguments): the data
    directory of the first primary initdb made, copied right after initdb
    (before any setting is written to it) into a private temporary directory
    (mode 0700, on /dev/shm when writable), removed at process exit.  Copies
    keep modes and the server user as owner (``cp -a``, which as root keeps
    owners).  Not
    removed by ``down()``: later clusters of the process use it.  Thread-safe: a
    build that finds no template yet, or whose copy fails for any reason (logged
    at debug level), just runs initdb.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> template data directory, or None while one build is keeping it.
        self._templates: dict[tuple[str, ...], Path | None] = {}
        self._root: Path | None = None
        self._count = 0

    def get(self, key: tuple[str, ...]) -> Path | None:
        with self._lock:
            return self._templates.get(key)

    def make(self, key: tuple[str, ...], datadir: Path, programs: _Programs) -> Path | None:
        """A data directory at ``datadir`` copied from the template, or None if there is none."""
        template = self.get(key)
        if template is None or os.path.lexists(datadir):
            return None
        try:
            _copy_datadir(template, datadir, programs)
        except Exception as e:  # noqa: BLE001 - any failure: initdb as before
            log.debug("copying the initdb template %s to %s failed (%s); running initdb",
                      template, datadir, e)
            shutil.rmtree(datadir, ignore_errors=True)
            self.forget(key, template)
            return None
        return template

    def keep(self, key: tuple[str, ...], datadir: Path, programs: _Programs) -> None:
        """Keep a copy of ``datadir``, fresh from initdb, unless there is one already."""
        with self._lock:
            if key in self._templates:
                return
            self._templates[key] = None
            try:
                if self._root is None:
                    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
                    self._remove_stale(Path(shm or tempfile.gettempdir()))
                    self._root = Path(tempfile.mkdtemp(prefix=f"shardkit-initdb-{os.getpid()}-",
                                                       dir=shm))
                    # Only by this process, not by a forked child that exits.
                    atexit.register(self._remove_all, self._root, os.getpid())
                self._count += 1
                template = self._root / f"t{self._count}"
            except Exception as e:  # noqa: BLE001
                log.debug("cannot make a directory for initdb templates: %s", e)
                del self._templates[key]
                return
        try:
            _copy_datadir(datadir, template, programs)
        except Exception as e:  # noqa: BLE001
            log.debug("keeping %s as the initdb template failed: %s", datadir, e)
            shutil.rmtree(template, ignore_errors=True)
            with self._lock:
                self._templates.pop(key, None)
            return
        with self._lock:
            self._templates[key] = template

    def forget(self, key: tuple[str, ...], template: Path) -> None:
        with self._lock:
            if self._templates.get(key) == template:
                del self._templates[key]
        shutil.rmtree(template, ignore_errors=True)

    @staticmethod
    def _remove_stale(parent: Path) -> None:
        """Remove the templates of processes that died without running atexit (killed).

        Safe even if a pid was not ours to judge (another pid namespace): a
        build whose template vanished runs initdb instead.
        """
        for path in parent.glob("shardkit-initdb-*-*"):
            try:
                pid = int(path.name.split("-")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except (ValueError, OSError):
                pass

    @staticmethod
    def _remove_all(root: Path, pid: int) -> None:
        if os.getpid() == pid:
            shutil.rmtree(root, ignore_errors=True)


def _copy_datadir(src: Path, dst: Path, programs: _Programs) -> None:
    """Copy a stopped data directory to the new path ``dst``, keeping modes and the owner."""
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} exists")
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    # cp -a keeps modes, and as root the owner too (without cp, the caller runs initdb).
    cp = shutil.which("cp")
    if cp is None:
        raise FileNotFoundError("no cp program")
    proc = subprocess.run([cp, "-a", "--", str(src), str(dst)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise OSError(f"cp -a failed: {proc.stderr.strip()}")
    st = dst.stat()
    if st.st_uid != programs.uid or stat.S_IMODE(st.st_mode) not in (0o700, 0o750):
        raise OSError(f"{dst} has owner uid {st.st_uid} and mode "
                      f"{stat.S_IMODE(st.st_mode):o}, not uid {programs.uid} and 700/750")


_initdb_templates = _InitdbTemplates()


class _PortInUse(DevClusterError):
    """A server could not start because another process took its port first."""


class _Cancelled(Exception):
    """A step of ``DevCluster.up`` stopped because another step failed."""


def _in_parallel(fn: Callable[[_T], None], items: Iterable[_T], cancel: threading.Event) -> None:
    """Run ``fn`` on every item in its own thread; re-raise the first real failure.

    The first failure sets ``cancel`` so the other threads stop at their next
    step instead of finishing work that is about to be thrown away.
    """
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(len(items), thread_name_prefix="shardkit-devcluster") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # KeyboardInterrupt while waiting
            cancel.set()
            raise
        if any(f.exception() is not None for f in done):
            cancel.set()
    errors = [e for f in futures
              if (e := f.exception()) is not None and not isinstance(e, _Cancelled)]
    for extra in errors[1:]:
        log.error("also failed: %s", extra)
    if errors:
        raise errors[0]
    if cancel.is_set():
        raise _Cancelled()


# --------------------------------------------------------------------------
# Nodes, shards, clusters


class DevNode:
    """One PostgreSQL server of a dev cluster: a shard's primary or one of its replicas.

    ``name`` is ``<shard>/primary`` or ``<shard>/r<i>``; ``shard`` is the shard's name.
    """

    def __init__(self, *, shard: str, name: str, role: str, port: int, datadir: Path,
                 programs: _Programs, primary: DevNode | None = None) -> None:
        self.shard = shard
        self.name = name
        self.role = role
        self.port = port
        self.datadir = datadir
        self._programs = programs
        # A replica's primary: wait_caught_up() compares positions with it.
        self._primary = primary

    def __repr__(self) -> str:
        return f"<DevNode {self.name} {self.role} 127.0.0.1:{self.port}>"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the node's ``shardkit`` database."""
        return f"postgresql+psycopg://{DB_USER}@{HOST}:{self.port}/{DB_NAME}"

    @property
    def dsn(self) -> str:
        """libpq / psycopg connection string of the node's ``shardkit`` database."""
        return f"host={HOST} port={self.port} user={DB_USER} dbname={DB_NAME}"

    @property
    def log_file(self) -> Path:
        """The server log (outside the data directory, so replicas do not copy it)."""
        return self.datadir.parent / "postgres.log"

    @property
    def slot_name(self) -> str:
        """Name of the physical replication slot a replica holds on its primary."""
        return f"shardkit_{self.name.rsplit('/', 1)[-1]}"

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server log, for error messages and failing tests."""
        return _tail(self.log_file, lines)

    # -- processes -----------------------------------------------------------

    def _pid(self) -> int | None:
        """The postmaster pid from postmaster.pid, or None when there is no pid file."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return int(first)
        except ValueError:
            return None

    def is_running(self) -> bool:
        """Whether the node's postmaster is alive."""
        pid = self._pid()
        return pid is not None and _is_postgres(pid, self.datadir)

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server and wait until it accepts connections; no-op if it runs.

        A stale ``postmaster.pid`` (left by :meth:`kill`) is removed first:
        the server would refuse to start if its pid had been reused.
        """
        if self.is_running():
            return
        self._kill_leftovers()
        (self.datadir / "postmaster.pid").unlink(missing_ok=True)
        offset = _file_size(self.log_file)
        try:
            self._programs.run(
                [self._programs.path("pg_ctl"), "start", "-w", "-t", str(max(1, round(timeout))),
                 "-D", str(self.datadir), "-l", str(self.log_file)],
                what=f"pg_ctl start of {self.name}", node=self.name, timeout=timeout + 10,
            )
        except DevClusterError as e:
            new_log = _tail(self.log_file, offset=offset)
            cls, hint = DevClusterError, "see the server log below"
            if "Address already in use" in new_log:
                cls = _PortInUse
                base = shlex.quote(str(self.datadir.parents[2]))  # base/<shard>/<node>/data
                hint = (f"port {self.port} is taken by another program; stop it, or run "
                        f"`shardkit dev down --dir {base}` and `shardkit dev up --dir {base}` "
                        "again to get new ports")
            elif "pre-existing shared memory block" in new_log or "lock file" in new_log:
                hint = ("old server processes of this data directory are still running; "
                        f"stop them (`pgrep -af {self.datadir}` lists them) and start again")
            raise cls(
                f"could not start {self.name} on port {self.port}: {e.message}; {hint}\n"
                f"--- last lines of {self.log_file} ---\n{new_log}",
                node=self.name,
            ) from None

    def stop(self, mode: str = "fast", timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server with ``pg_ctl stop -m MODE`` and wait; no-op if it is not running.

        ``mode`` is ``smart``, ``fast`` (disconnect clients, clean shutdown) or
        ``immediate`` (no shutdown checkpoint; crash recovery on next start).
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(_STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            self._kill_leftovers()
            self._release_shared_memory()
            return
        try:
            self._programs.run(
                [self._programs.path("pg_ctl"), "stop", "-w", "-m", mode,
                 "-t", str(max(1, round(timeout))), "-D", str(self.datadir)],
                what=f"pg_ctl stop -m {mode} of {self.name}", node=self.name, timeout=timeout + 10,
            )
        except DevClusterError as e:
            hint = " or stop(mode='immediate')" if mode != "immediate" else ""
            raise DevClusterError(
                f"{e.message}; retry with a longer timeout{hint}", node=self.name
            ) from None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the server, as a machine crash would, and wait until it is gone.

        The postmaster is frozen, its children noted, then all are killed:
        the next :meth:`start` would otherwise be refused while any of them
        still held the old shared memory.  The next start runs crash recovery.
        """
        pid = self._pid()
        if pid is None or not _is_postgres(pid, self.datadir):
            raise DevClusterError(f"cannot kill {self.name}: it is not running", node=self.name)
        # Frozen, the postmaster cannot fork a child we would not know about.
        os.kill(pid, signal.SIGSTOP)
        _kill_and_wait([pid, *_children(pid)], self.name, timeout, self.name)
        log.info("%s killed (postmaster pid %d)", self.name, pid)

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        """Kill what a dead postmaster left running in the data directory (see _leftovers)."""
        victims = _leftovers(self.datadir)
        if victims:
            log.warning("%s: its postmaster is gone but processes %s of it still run; killing them",
                        self.name, victims)
            _kill_and_wait(victims, self.name, timeout, self.name)

    def _release_shared_memory(self) -> None:
        """Remove the System V shared memory header a killed postmaster left behind.

        A server started again in this directory removes it itself; once the directory is
        deleted nothing would, until the machine restarts, and the kernel allows a few
        thousand (``kernel.shmmni``).  Its key and id are in the stale postmaster.pid; it is
        removed only while that key still names it and nothing is attached.  (The dynamic
        shared memory segments are files in the data directory: see _write_settings.)
        """
        try:
            key, shmid = (int(x) for x in
                          (self.datadir / "postmaster.pid").read_text().splitlines()[6].split())
            rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        except (OSError, IndexError, ValueError):
            return
        for row in rows:
            f = row.split()
            if f[:2] == [str(key), str(shmid)] and f[6] == "0":
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.shmctl(ctypes.c_int(shmid), _IPC_RMID, None) != 0:
                    log.warning("%s: could not remove the shared memory segment %d its killed "
                                "server left: %s", self.name, shmid, os.strerror(ctypes.get_errno()))

    # -- SQL -----------------------------------------------------------------

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection to the node's ``shardkit`` database, in autocommit mode.

        Keyword arguments go to :func:`psycopg.connect` and win over the
        defaults, e.g. ``dbname="postgres"`` or ``autocommit=False``.
        """
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.dsn, **kwargs)

    def _require_replica(self, what: str) -> DevNode:
        if self._primary is None:
            raise DevClusterError(f"{what} needs a replica, and {self.name} is a primary",
                                  node=self.name)
        return self._primary

    def set_apply_delay(self, seconds: float) -> None:
        """Make a replica apply each commit ``seconds`` after it happened (0 to stop).

        Sets ``recovery_min_apply_delay`` with ALTER SYSTEM and reloads; returns
        once new sessions see the new value, by which time the startup process
        has been told to re-read it too.
        """
        self._require_replica("set_apply_delay")
        if seconds < 0:
            raise ValueError(f"apply delay must be >= 0 seconds, not {seconds}")
        ms = round(seconds * 1000)
        with self.connect() as conn:
            # ALTER SYSTEM takes no bind parameters; ms is an int we formatted.
            conn.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = {ms}")
            conn.execute("SELECT pg_reload_conf()")
        self._wait_for(
            lambda: self._new_session_setting("recovery_min_apply_delay") == str(ms),
            f"recovery_min_apply_delay = {ms} ms to take effect", _READY_TIMEOUT,
        )

    def _new_session_setting(self, name: str) -> str:
        with self.connect() as conn:
            row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s",
                               (name,)).fetchone()
        return str(row[0]) if row else ""

    def wait_caught_up(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait until a replica has replayed everything its primary had written when called."""
        primary = self._require_replica("wait_caught_up")
        with primary.connect() as conn:
            row = conn.execute(
                "SELECT pg_current_wal_insert_lsn()::text,"
                " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_block_size'),"
                " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
            ).fetchone()
            # A commit flushes the WAL up to its own record, past that position: a record
            # no commit follows (a page pruned by a read) stays in an idle primary's WAL
            # buffers, out of the replica's reach, until a background flush seconds later.
            conn.execute("SELECT txid_current()")
        assert row is not None
        target = _replay_target(_lsn(row[0]), row[1], row[2])
        replayed: list[str | None] = [None]

        def caught_up() -> bool:
            with self.connect() as conn:
                r = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
            replayed[0] = r[0] if r else None
            return replayed[0] is not None and _lsn(replayed[0]) >= target

        self._wait_for(
            caught_up, f"replay to reach {_lsn_text(target)}, {primary.name}'s position", timeout,
            detail=lambda: (f"replayed so far: {replayed[0]} (an apply delay, see "
                            "set_apply_delay(), or a stopped primary keeps a replica behind)"),
        )

    def wait_streaming(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait until a replica is in recovery and streaming WAL from its primary."""
        primary = self._require_replica("wait_streaming")
        status: list[str | None] = [None]

        def streaming() -> bool:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)"
                ).fetchone()
            assert row is not None
            status[0] = row[1]
            return bool(row[0]) and row[1] == "streaming"

        self._wait_for(
            streaming, f"streaming from {primary.name} (port {primary.port})", timeout,
            detail=lambda: f"WAL receiver status: {status[0]}",
        )

    def _wait_for(self, check: Callable[[], bool], what: str, timeout: float,
                  detail: Callable[[], str] | None = None) -> None:
        """Poll ``check`` until true; connection errors count as not yet."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                if check():
                    return
            except psycopg.OperationalError as e:
                last_error = e
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_INTERVAL)
        parts = [f"{self.name}: timed out after {timeout:g} s waiting for {what}"]
        if detail:
            parts.append(detail())
        if last_error:
            parts.append(f"last connection error: {str(last_error).strip()}")
        raise DevClusterError(
            "; ".join(parts) + f"\n--- last lines of {self.log_file} ---\n{_tail(self.log_file)}",
            node=self.name,
        )

    # -- set-up --------------------------------------------------------------

    def _write_settings(self) -> None:
        """(Re)write the server settings block of postgresql.conf and pg_hba.conf."""
        conf = self.datadir / "postgresql.conf"
        text = conf.read_text()
        # A replica's postgresql.conf is its primary's copy: replace its block.
        text = text.split("\n" + _SETTINGS_MARKER, 1)[0].rstrip("\n") + "\n\n"
        settings = [
            _SETTINGS_MARKER,
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            "# TCP only: socket paths under a deep base directory exceed the 107-byte limit.",
            "unix_socket_directories = ''",
            "max_connections = 300",
            "shared_buffers = '64MB'",
            "# Parallel queries' shared memory as files in the data directory (pg_dynshmem),",
            "# not in /dev/shm: a server killed with SIGKILL and then deleted leaves nothing.",
            "dynamic_shared_memory_type = mmap",
            "# A disposable development cluster: speed over crash safety.  Commits",
            "# still flush WAL before returning (cheap without fsync), so replicas",
            "# receive a commit as soon as it is acknowledged, as in production.",
            "fsync = off",
            "synchronous_commit = on",
            "full_page_writes = off",
            "wal_level = logical",
            "max_wal_senders = 20",
            "max_replication_slots = 20",
            "hot_standby = on",
            "hot_standby_feedback = on",
            "wal_keep_size = '512MB'",
            "# Lets two-phase commit across shards be tried locally (off by default).",
            "max_prepared_transactions = 50",
            "# The role is named shardkit, like the schema of shardkit's SQL objects: the",
            "# default search_path (\"$user\", public) would create tables in that schema.",
            "search_path = 'public'",
            "# Replicas reconnect within 0.5 s (default 5 s) when a test restarts a primary.",
            "wal_retrieve_retry_interval = '500ms'",
            "log_min_messages = warning",
            "logging_collector = off",
        ]
        if self._programs.pg_stat_statements:
            settings.append("shared_preload_libraries = 'pg_stat_statements'")
        conf.write_text(text + "\n".join(settings) + "\n")
        (self.datadir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE     USER  ADDRESS        METHOD\n"
            "host    all          all   127.0.0.1/32   trust\n"
            "host    replication  all   127.0.0.1/32   trust\n"
        )


def _replay_target(insert_lsn: int, block_size: int, segment_size: int) -> int:
    """The replay position that means "everything up to ``insert_lsn`` is applied".

    The insert position of a page that holds nothing yet is reported past the
    page header, but replay stops at the end of the last record, the page
    boundary: without this a replica could look behind forever.
    """
    header = 40 if insert_lsn % segment_size < block_size else 24  # long / short page header
    if insert_lsn % block_size == header:
        return insert_lsn - header
    return insert_lsn


class DevShard:
    """A shard of a dev cluster: its primary and replicas."""

    def __init__(self, name: str, primary: DevNode, replicas: list[DevNode]) -> None:
        self.name = name
        self.primary = primary
        self.replicas = replicas

    def __repr__(self) -> str:
        replicas = ", ".join(str(r.port) for r in self.replicas)
        return f"<DevShard {self.name} primary :{self.primary.port} replicas [{replicas}]>"

    @property
    def nodes(self) -> list[DevNode]:
        """The primary, then the replicas."""
        return [self.primary, *self.replicas]


def stop_nodes(nodes: Iterable[Any]) -> list[DevClusterError]:
    """Stop ``nodes`` in parallel, fast mode, then immediate for any that takes over
    10 s; return the failures of those that would not stop at all."""
    failures: list[DevClusterError] = []

    def stop(node: Any) -> None:
        try:
            node.stop("fast", timeout=_STOP_TIMEOUT)
        except DevClusterError as e:
            log.warning("%s; stopping it in immediate mode", e)
            try:
                node.stop("immediate", timeout=_STOP_TIMEOUT)
            except DevClusterError as e2:
                failures.append(e2)

    _in_parallel(stop, list(nodes), threading.Event())
    return failures


def plan_nodes(shards: int, replicas: int, port_start: int | None
               ) -> list[tuple[str, list[tuple[str, int]]]]:
    """Per shard ``s0, s1, ...``: its nodes ``primary, r0, r1, ...`` with a host port each.

    A free port each, or ``port_start`` onwards in node order (refused if taken).
    """
    node_names = ["primary"] + [f"r{j}" for j in range(replicas)]
    out = []
    for i in range(shards):
        shard = f"s{i}"
        layout = []
        for j, node_name in enumerate(node_names):
            if port_start is None:
                port = _pick_port()
            else:
                port = port_start + i * len(node_names) + j
                if not _port_free(port):
                    raise DevClusterError(
                        f"port {port} (port_start + {port - port_start}) for "
                        f"{shard}/{node_name} is in use; choose another port_start or stop "
                        "what listens there", node=f"{shard}/{node_name}"
                    )
            layout.append((node_name, port))
        out.append((shard, layout))
    return out


class _ClusterLayout:
    """What every local cluster offers, whatever runs its servers: its shards and
    nodes, its configuration, a catalog database.  Subclasses set ``base_dir``,
    ``shards`` and ``bucket_count`` and define ``down()``."""

    base_dir: Path
    shards: list[DevShard]
    bucket_count: int
    down: Callable[..., None]

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _empty_base_dir(self, created_base: bool) -> None:
        """After a failed start: remove ``base_dir`` if up() made it, else empty it
        (up() only starts in an empty directory: everything in it is ours)."""
        if created_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            return
        for child in self.base_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    @staticmethod
    def _check_shape(shards: int, replicas: int, bucket_count: int, port_start: int | None) -> None:
        if shards < 1 or replicas < 0 or not 1 <= bucket_count <= MAX_BUCKET_COUNT:
            raise DevClusterError(
                f"need shards >= 1, replicas >= 0 and 1 <= buckets <= {MAX_BUCKET_COUNT}; "
                f"got shards={shards}, replicas={replicas}, buckets={bucket_count}"
            )
        if bucket_count < shards:
            # The config it writes lists no shard's buckets: an even split must give each one.
            raise DevClusterError(f"{bucket_count} buckets cannot be split over {shards} shards (each "
                                  f"needs one): ask for {shards} buckets or more (--buckets; 1024 is a "
                                  "good default)")
        n_nodes = shards * (1 + replicas)
        if n_nodes > MAX_NODES:
            raise DevClusterError(
                f"{shards} shard(s) x (1 primary + {replicas} replica(s)) is {n_nodes} servers; "
                f"a local cluster has at most {MAX_NODES}"
            )
        if port_start is not None and not 1024 <= port_start <= 65536 - n_nodes:
            raise DevClusterError(f"port_start must leave room for {n_nodes} ports in 1024..65535, "
                                  f"not {port_start}")

    @property
    def nodes(self) -> list[DevNode]:
        """Every node, shard by shard, each primary before its replicas."""
        return [n for s in self.shards for n in s.nodes]

    def shard(self, name: str) -> DevShard:
        """The shard called ``name``; KeyError if there is none."""
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    # -- config --------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """The cluster as a shardkit configuration (see :func:`shardkit.load_config`)."""
        return {
            "bucket_count": self.bucket_count,
            "shards": [
                {"name": s.name, "primary": s.primary.url, "replicas": [r.url for r in s.replicas]}
                for s in self.shards
            ],
        }

    def create_catalog(self, name: str = "shardkit_catalog") -> str:
        """Create (if missing) a catalog database on the first shard's primary; return its URL.

        A catalog holds the live bucket map for online rebalancing; see
        ``shardkit rebalance``.  Put the URL in the config's ``[catalog] url``.
        """
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise DevClusterError(f"catalog database name {name!r}: use lowercase letters, digits and _")
        node = self.shards[0].primary
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {name}")
        return node.url.rsplit("/", 1)[0] + "/" + name

    def write_config(self, path: str | os.PathLike[str],
                     extra: Mapping[str, Any] | None = None) -> Path:
        """Write :meth:`config_dict` deep-merged with ``extra`` as TOML; return the path.

        ``extra`` adds or replaces keys, e.g. ``groups`` and ``reference_tables``;
        tables merge key by key, anything else replaces.
        """
        data = _deep_merge(self.config_dict(), extra or {})
        out = Path(path)
        out.write_text("# written by shardkit.devcluster\n" + to_toml(data), encoding="utf-8")
        return out


class DevCluster(_ClusterLayout):
    """A local cluster of PostgreSQL servers: shards of one primary and streaming replicas.

    Make one with :meth:`up`, reattach to a running one with :meth:`load`,
    and stop it with :meth:`down` (or use it as a context manager).
    """

    def __init__(self, base_dir: Path, bucket_count: int, shards: list[DevShard],
                 programs: _Programs) -> None:
        self.base_dir = base_dir
        self.bucket_count = bucket_count
        self.shards = shards
        self._programs = programs
        # Whether up() made base_dir (else it was an empty directory already, which down()
        # empties but leaves: it may be a mount point, or have an owner and mode of its own).
        self._made_base_dir = True

    def __repr__(self) -> str:
        return f"<DevCluster {self.base_dir} {len(self.shards)} shard(s) {self.shards!r}>"

    def __enter__(self) -> DevCluster:
        return self


    # -- state ---------------------------------------------------------------

    def _write_state(self, complete: bool) -> None:
        state = {
            "version": _STATE_VERSION,
            "complete": complete,
            "bucket_count": self.bucket_count,
            "pg_bin": str(self._programs.bin_dir),
            "os_user": self._programs.os_user,
            "made_base_dir": self._made_base_dir,
            "shards": [
                {"name": s.name, "nodes": [
                    {"name": n.name, "role": n.role, "port": n.port,
                     "datadir": str(n.datadir.relative_to(self.base_dir))}
                    for n in s.nodes
                ]}
                for s in self.shards
            ],
        }
        tmp = self.base_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        # Atomic, so a concurrent load() never reads half a file.
        tmp.replace(self.base_dir / STATE_FILE)

    @classmethod
    def load(cls, base_dir: str | os.PathLike[str]) -> DevCluster:
        """Reattach to the cluster that :meth:`up` made in ``base_dir`` (from any process)."""
        cluster, _ = cls._load(Path(base_dir).expanduser().absolute())
        return cluster

    @classmethod
    def _load(cls, base: Path) -> tuple[DevCluster, bool]:
        """The cluster in ``base`` and whether its ``up`` finished."""
        path = base / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise DevClusterError(
                f"no dev cluster in {base} ({STATE_FILE} is missing); "
                f"start one with `shardkit dev up --dir {shlex.quote(str(base))}`"
            ) from None
        except (OSError, ValueError) as e:
            raise DevClusterError(f"cannot read {path}: {e}; remove {base} and start again") from e
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise DevClusterError(
                f"{path} was written by another shardkit version; stop its servers by hand "
                f"(`pg_ctl stop -D DATADIR` for each data directory), remove {base} and start again"
            )
        bin_dir = Path(state["pg_bin"])
        if _missing_programs(bin_dir):
            raise DevClusterError(
                f"the PostgreSQL programs this cluster was made with are gone from {bin_dir}; "
                f"reinstall them, or remove {base} and start a new cluster"
            )
        try:
            programs = _Programs(bin_dir, state["os_user"])
        except KeyError:
            raise DevClusterError(
                f"OS user {state['os_user']!r} that runs this cluster's servers no longer exists; "
                f"remove {base} and start a new cluster"
            ) from None
        shards = []
        for s in state["shards"]:
            primary: DevNode | None = None
            replicas = []
            for n in s["nodes"]:
                node = DevNode(shard=s["name"], name=n["name"], role=n["role"], port=n["port"],
                               datadir=base / n["datadir"], programs=programs, primary=primary)
                if n["role"] == "primary":
                    primary = node
                else:
                    replicas.append(node)
            assert primary is not None, f"{path}: shard {s['name']} has no primary"
            shards.append(DevShard(s["name"], primary, replicas))
        cluster = cls(base, state["bucket_count"], shards, programs)
        # (A state written before the field: up() made the directory, as down() assumed.)
        cluster._made_base_dir = state.get("made_base_dir", True) is not False
        return cluster, bool(state.get("complete"))

    # -- up / down -----------------------------------------------------------

    @classmethod
    def up(cls, base_dir: str | os.PathLike[str], shards: int = 2, replicas: int = 1, *,
           bucket_count: int = 1024, port_start: int | None = None) -> DevCluster:
        """Start ``shards`` primaries with ``replicas`` streaming replicas each.

        Shards are named ``s0``, ``s1``, ...; ports are free loopback ports, or
        ``port_start``, ``port_start + 1``, ... in node order when given.  Writes
        ``base_dir/shardkit.toml`` and the state :meth:`load` reads.  If
        ``base_dir`` already holds a cluster of the same shape it is reused
        (stopped nodes are started); if ``up`` fails, it stops and removes
        what it made.  Within one process initdb runs once per PostgreSQL
        installation and server OS user: later primaries start from a copy of
        the first one's fresh data directory, kept in a private temporary
        directory until the process exits.
        """
        cls._check_shape(shards, replicas, bucket_count, port_start)
        base = Path(base_dir).expanduser().absolute()
        _check_path(base)
        while True:
            created_base, lock_fd = _make_and_lock(base)
            with _held_lock:
                _held_here.add(base)
            try:
                if (base / STATE_FILE).exists():
                    return cls._reuse(base, shards, replicas, bucket_count)
                if any(base.iterdir()):
                    raise DevClusterError(
                        f"{base} is not an empty directory and holds no dev cluster; "
                        "choose a new or empty directory"
                    )
                return cls._up_new(base, created_base, shards, replicas, bucket_count,
                                   port_start)
            except _Retry:
                continue
            finally:
                with _held_lock:
                    _held_here.discard(base)
                os.close(lock_fd)

    @classmethod
    def _up_new(cls, base: Path, created_base: bool, shards: int, replicas: int,
                bucket_count: int, port_start: int | None) -> DevCluster:
        """Start a new cluster in the empty directory ``base``, which the caller has locked."""
        try:
            programs = _Programs(find_pg_bin(), _server_os_user())
        except BaseException:
            if created_base:
                base.rmdir()
            raise
        if created_base:
            programs.own(base)
        blocked = _unreachable_ancestor(base, programs)
        if blocked is not None:
            if created_base:
                base.rmdir()
            raise DevClusterError(
                f"the servers run as OS user {programs.os_user!r} (PostgreSQL refuses to run as "
                f"root), which cannot enter {blocked} "
                f"(mode {stat.S_IMODE(blocked.stat().st_mode):o}); "
                f"choose a base directory it can reach, e.g. under /tmp, or `chmod o+x {blocked}`"
            )

        cluster = cls(base, bucket_count, [], programs)
        cluster._made_base_dir = created_base
        started = time.monotonic()
        cancel = threading.Event()
        try:
            cluster._plan(shards, replicas, port_start)
            cluster._write_state(complete=False)
            _in_parallel(lambda s: cluster._build_shard(s, cancel, port_start is not None),
                         cluster.shards, cancel)
            cluster._write_state(complete=True)
            cluster.write_config(base / CONFIG_FILE)
        except BaseException:
            cluster._abort(created_base)
            raise
        log.info("dev cluster of %d shard(s) x %d replica(s) up in %s in %.2f s",
                 shards, replicas, base, time.monotonic() - started)
        return cluster

    @classmethod
    def _reuse(cls, base: Path, shards: int, replicas: int, bucket_count: int) -> DevCluster:
        cluster, complete = cls._load(base)
        shape = (len(cluster.shards), [len(s.replicas) for s in cluster.shards],
                 cluster.bucket_count)
        if not complete or shape != (shards, [replicas] * shards, bucket_count):
            what = ("a dev cluster whose start did not finish" if not complete else
                    f"a dev cluster of {shape[0]} shard(s) x {shape[1][0]} replica(s) and "
                    f"{shape[2]} buckets")
            raise DevClusterError(
                f"{base} already holds {what}, not the {shards} shard(s) x {replicas} replica(s) "
                f"and {bucket_count} buckets asked for; run `shardkit dev down --dir {shlex.quote(str(base))}` first"
            )
        stopped = [n for n in cluster.nodes if not n.is_running()]
        if stopped:
            log.info("restarting %s", ", ".join(n.name for n in stopped))
            cancel = threading.Event()
            _in_parallel(DevNode.start, [n for n in stopped if n.role == "primary"], cancel)

            def start_replica(node: DevNode) -> None:
                node.start()
                node.wait_streaming()

            _in_parallel(start_replica, [n for n in stopped if n.role == "replica"], cancel)
        if not (base / CONFIG_FILE).exists():
            cluster.write_config(base / CONFIG_FILE)
        return cluster

    def _plan(self, shards: int, replicas: int, port_start: int | None) -> None:
        """Choose ports and create the node directories (nothing runs yet)."""
        for name, layout in plan_nodes(shards, replicas, port_start):
            nodes: list[DevNode] = []
            for j, (node_name, port) in enumerate(layout):
                node_dir = self.base_dir / name / node_name
                node_dir.mkdir(parents=True)
                self._programs.own(node_dir.parent)
                self._programs.own(node_dir)
                nodes.append(DevNode(shard=name, name=f"{name}/{node_name}",
                                     role="primary" if j == 0 else "replica", port=port,
                                     datadir=node_dir / "data", programs=self._programs,
                                     primary=nodes[0] if nodes else None))
            self.shards.append(DevShard(name, nodes[0], nodes[1:]))

    def _build_shard(self, shard: DevShard, cancel: threading.Event, fixed_ports: bool) -> None:
        """initdb and start the primary, create the database, then clone and start replicas.

        Within one process, initdb runs once per (server bin dir, OS user, initdb
        arguments): the first primary's fresh data directory is kept as a template
        (before any settings are written to it) and later primaries are copies of
        it, with the same modes and owner (see :class:`_InitdbTemplates`).  A
        build with no template yet, or whose copy fails, runs initdb.
        """
        p, primary = self._programs, shard.primary
        t0 = time.monotonic()
        args = ["-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        key = (str(p.bin_dir), p.os_user, *args)
        if _initdb_templates.make(key, primary.datadir, p) is None:
            p.run([p.path("initdb"), "-D", str(primary.datadir), *args],
                  what=f"initdb of {primary.name}", node=primary.name)
            _initdb_templates.keep(key, primary.datadir, p)
        primary._write_settings()
        self._first_start(primary, cancel, fixed_ports)
        with primary.connect(dbname="postgres") as conn:
            conn.execute(f"CREATE DATABASE {DB_NAME}")
        if p.pg_stat_statements:
            with primary.connect() as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        log.info("%s up on port %d in %.2f s", primary.name, primary.port, time.monotonic() - t0)
        if shard.replicas:
            _in_parallel(lambda r: self._build_replica(r, cancel, fixed_ports), shard.replicas,
                         cancel)

    def _build_replica(self, replica: DevNode, cancel: threading.Event, fixed_ports: bool) -> None:
        """Clone the primary with a physical slot of its own, so it never falls off."""
        if cancel.is_set():
            raise _Cancelled()
        p, primary = self._programs, replica._require_replica("cloning")
        t0 = time.monotonic()
        p.run([p.path("pg_basebackup"), "-h", HOST, "-p", str(primary.port), "-U", DB_USER,
               "-w", "-D", str(replica.datadir), "-R", "-X", "stream", "-c", "fast",
               "-C", "-S", replica.slot_name, "--no-sync"],
              what=f"pg_basebackup of {replica.name} from {primary.name}", node=replica.name)
        replica._write_settings()
        self._first_start(replica, cancel, fixed_ports)
        replica.wait_streaming()
        log.info("%s streaming on port %d in %.2f s", replica.name, replica.port,
                 time.monotonic() - t0)

    def _first_start(self, node: DevNode, cancel: threading.Event, fixed_ports: bool) -> None:
        """Start a new node; if another process took its port meanwhile, take another."""
        for attempt in range(3):
            if cancel.is_set():
                raise _Cancelled()
            if not fixed_ports and not _port_free(node.port):
                node.port = _pick_port()
                node._write_settings()
            try:
                node.start()
                return
            except _PortInUse:
                if fixed_ports or attempt == 2:
                    raise
                log.info("%s: port %d was taken; trying another", node.name, node.port)
                node.port = _pick_port()
                node._write_settings()

    def _abort(self, created_base: bool) -> None:
        """Stop and remove what a failed :meth:`up` made."""
        running = [n for n in self.nodes if n.is_running()]
        leftovers = []
        for node in running:
            try:
                node.stop("immediate")
            except DevClusterError as e:
                leftovers.append(node)
                log.error("cleaning up a failed start: %s", e)
        if leftovers:
            log.error("left running after a failed start: %s; files kept in %s",
                      ", ".join(n.name for n in leftovers), self.base_dir)
            return
        self._empty_base_dir(created_base)

    def down(self, remove: bool = True) -> None:
        """Stop every node (fast, then immediate if one takes over 10 s) and delete what
        :meth:`up` (and ``shardkit demo``) put in base_dir, then base_dir itself if up made
        it and nothing else is left in it: files put there since are kept.  Waits for an
        ``up`` still starting in base_dir; stops what one killed mid-start left running.

        With ``remove=False`` the data directories are kept, and :meth:`up`
        on the same directory starts them again.
        """
        lock_fd = _lock_existing(self.base_dir)
        try:
            self._down(remove)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        log.info("dev cluster in %s stopped%s", self.base_dir, " and removed" if remove else "")

    def _down(self, remove: bool) -> None:
        # An up killed mid-start (kill -9) leaves its initdb, pg_basebackup or pg_ctl
        # running: they would write (or start a server) in the directories removed below.
        helpers = _helpers_on(n.datadir for n in self.nodes)
        if helpers:
            log.warning("stopping processes %s that a start of the cluster in %s left running",
                        helpers, self.base_dir)
            _kill_and_wait(helpers, f"an unfinished start of the cluster in {self.base_dir}",
                           _STOP_TIMEOUT, None,
                           alive=lambda: bool(_helpers_on(n.datadir for n in self.nodes)))
        failures = stop_nodes(self.nodes)
        if failures:
            raise DevClusterError(
                f"could not stop {', '.join(str(e.node) for e in failures)}: "
                f"{'; '.join(e.message for e in failures)}; kill the pid in each one's "
                f"postmaster.pid, then run `shardkit dev down --dir {shlex.quote(str(self.base_dir))}` again",
                node=failures[0].node,
            )
        if remove and self.base_dir.exists():
            try:
                self._remove_files()
            except OSError as e:
                raise DevClusterError(
                    f"the servers are stopped, but removing {self.base_dir} failed: {e}; "
                    f"remove it by hand") from None

    def _remove_files(self) -> None:
        """Delete what up() (and the demo) put in base_dir, and base_dir itself if up() made
        it; not what the user put there since (up() starts only in an empty directory)."""
        ours = {STATE_FILE, STATE_FILE + ".tmp", CONFIG_FILE, *_DEMO_FILES,
                *(s.name for s in self.shards)}
        for name in ours:
            child = self.base_dir / name
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink(missing_ok=True)
        others = sorted(p.name for p in self.base_dir.iterdir())
        if others:
            log.warning("kept %s: it holds files the cluster did not make: %s", self.base_dir,
                        ", ".join(others))
        elif self._made_base_dir:
            self.base_dir.rmdir()


# --------------------------------------------------------------------------
# TOML


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``: tables merge key by key, other values replace."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}
_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: object, path: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{path}: TOML keys must be strings, not {type(key).__name__} {key!r}")
    return key if key and set(key) <= _BARE_KEY_CHARS else _toml_str(key)


def _toml_value(value: Any, path: str) -> str:
    """An inline TOML value: scalars, arrays, and tables as inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"{path}: {value} does not fit TOML's 64-bit integers")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form; always valid TOML
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(
            f"{_toml_key(k, path)} = {_toml_value(v, f'{path}.{k}')}" for k, v in value.items()
        ) + " }"
    raise TypeError(f"{path}: cannot write {type(value).__name__} {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, Mapping) for v in value))


def to_toml(data: Mapping[str, Any]) -> str:
    """Render nested dicts as TOML: str, int, float, bool, lists, tables, arrays of tables.

    Sub-tables become ``[a.b]`` sections and non-empty lists of tables
    ``[[a.b]]`` sections; tables nested in arrays are written inline.
    """
    lines: list[str] = []

    def table(tbl: Mapping[str, Any], keys: tuple[str, ...]) -> None:
        where = ".".join(keys) or "<top level>"
        sections = []
        # Plain keys first: after a section header they would belong to that section.
        for k, v in tbl.items():
            key = _toml_key(k, where)
            if isinstance(v, Mapping) or _is_table_array(v):
                sections.append((key, v))
            else:
                lines.append(f"{key} = {_toml_value(v, f'{where}.{k}' if keys else k)}")
        for key, v in sections:
            sub = (*keys, key)
            if isinstance(v, Mapping):
                lines.extend(["", f"[{'.'.join(sub)}]"])
                table(v, sub)
            else:
                for item in v:
                    lines.extend(["", f"[[{'.'.join(sub)}]]"])
                    table(item, sub)

    table(data, ())
    return "\n".join(lines).lstrip("\n") + "\n" if lines else ""
