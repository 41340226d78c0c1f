"""`shardkit dev up|down` and `shardkit demo` after a crash, run twice at once, and
on a cluster kept stopped.

Every cluster lives under a fresh ``/dev/shm/demo5b-*`` directory that the test
stops and removes; processes are found by that directory only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import inproc_cli
import psycopg
import pytest

from shardkit.devcluster import DevCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("SHARDKIT_TEST_BACKEND", "local") == "docker",
        reason="tests local DevCluster files, processes and the dev/demo commands"),
]


def _postgres_in(root: Path) -> list[int]:
    """Pids of live PostgreSQL processes working in a data directory under ``root``
    (a postmaster's children do not name it on their command line: their working
    directory does)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if state != "Z" and cwd.startswith(str(root) + "/"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="demo5b-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for state in sorted(d.rglob("devcluster.json")):
            try:
                DevCluster.load(state.parent).down()
            except Exception:
                pass
        for pid in _postgres_in(d):  # ours: they work under our directory
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def shardkit(*args: str) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGS`` in this process (``tests/inproc_cli.py``): what the command does
    and says.  The demo that is stopped with a signal runs in a process of its own."""
    return inproc_cli.run(args)


def _busy_backend_then_crash(cluster: DevCluster) -> int:
    """A backend busy in a loop that never checks for postmaster death, then the
    postmaster killed (kill -9 of its pid, as a crash or an OOM kill would): returns
    the backend's pid, left running as PostgreSQL leaves it."""
    node = cluster.shards[0].primary
    conn = psycopg.connect(node.dsn, autocommit=True)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute("SET statement_timeout = '300s'")  # a bound, should everything else fail

    def spin() -> None:
        try:
            conn.execute("DO $$ BEGIN LOOP END LOOP; END $$")
        except psycopg.Error:
            pass

    threading.Thread(target=spin, daemon=True).start()
    with psycopg.connect(node.dsn, autocommit=True) as other:
        while other.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                            (backend,)).fetchone() != ("active",):
            time.sleep(0.02)
    postmaster = int((node.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
    os.kill(postmaster, signal.SIGKILL)
    while node.is_running():
        time.sleep(0.02)
    assert backend in _postgres_in(node.datadir.parent)  # PostgreSQL leaves it running
    return backend


def test_dev_down_after_the_postmaster_died_stops_its_leftover_backends(root):
    """`dev down` on a cluster whose postmaster died (stale postmaster.pid) said
    "stopped" and removed the data directory, while a backend of the dead server
    went on running (here spinning a CPU) with a deleted working directory."""
    cluster = DevCluster.up(root / "c", shards=1, replicas=0)
    backend = _busy_backend_then_crash(cluster)
    r = shardkit("dev", "down", "--dir", str(root / "c"))
    assert r.returncode == 0, r.stderr
    assert not (root / "c").exists()
    assert backend not in _postgres_in(root), "a backend of the crashed server is left running"


def test_dev_up_restarts_a_node_whose_dead_postmaster_left_a_backend(root):
    """`dev up` on the same directory failed: the leftover backend still holds the
    old shared memory ("pre-existing shared memory block is still in use"), and the
    hint's `pgrep -af DATADIR` lists nothing (children do not name the directory)."""
    cluster = DevCluster.up(root / "c", shards=1, replicas=0)
    _busy_backend_then_crash(cluster)
    again = DevCluster.up(root / "c", shards=1, replicas=0)
    with again.shards[0].primary.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_second_demo_on_the_same_dir_refuses_instead_of_wrecking_the_first(root):
    """Two `shardkit demo --dir D` at once: the second took the first's cluster for
    one it reuses, dropped its catalog and tables under it and ran its own tour on
    them (or crashed with a raw UniqueViolation traceback creating the catalog)."""
    base = root / "c"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "demo", "--dir", str(base),
                              "--shards", "1", "--replicas", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout is not None
        seen = []
        for line in first.stdout:
            seen.append(line)
            if "config written to" in line:
                break
        else:
            pytest.fail(f"the first demo ended early: {''.join(seen)} {first.stderr.read()}")
        first.send_signal(signal.SIGSTOP)  # the first demo is mid-tour while the second runs
        try:
            second = shardkit("demo", "--dir", str(base), "--shards", "1", "--replicas", "0")
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr
    assert "another `shardkit demo`" in second.stderr and "Traceback" not in second.stderr, second.stderr
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    assert not base.exists(), "the first demo (no --keep) should have removed its cluster"
    assert _postgres_in(root) == []


def test_demo_on_a_stopped_kept_cluster_does_not_claim_it_was_running(root):
    """`demo --keep`, `dev down --keep-files` (or a reboot), then `demo --dir` again:
    the demo started the stopped servers itself, yet said "reusing the cluster
    already running" and "the cluster was running before the demo"."""
    base = root / "c"
    DevCluster.up(base, shards=1, replicas=0).down(remove=False)
    r = shardkit("demo", "--dir", str(base))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "already running" not in r.stdout and "was running before" not in r.stdout, r.stdout
    assert f"dev down --dir {base}" in r.stdout  # it says how to stop what it started


def test_port_taken_on_restart_names_the_directory_in_its_advice(root):
    """A kept cluster whose port another program took meanwhile: the error said to run
    `shardkit dev down` and `shardkit dev up` with no --dir, which for any directory but
    the default answers "no local cluster in .shardkit-dev" and leaves this one as it is."""
    import shlex
    import socket

    base = root / "my dev"
    cluster = DevCluster.up(base, shards=1, replicas=0)
    port = cluster.shards[0].primary.port
    cluster.down(remove=False)
    with socket.socket() as squatter:
        # (The stopped server's closed connections may hold the port in TIME_WAIT, as
        # they do for the server itself, which binds the same way.)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        r = shardkit("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(base))
    assert r.returncode == 2 and f"port {port} is taken" in r.stderr, r.stderr
    assert f"shardkit dev down --dir {shlex.quote(str(base))}" in r.stderr, r.stderr
