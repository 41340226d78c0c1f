"""Long-running commands stopped the other ways an operator stops them: SIGTERM (a process
manager, `timeout`, `kill PID`), which Python's default turns into an immediate death with
no `finally`, and a reader of the output that went away (`shardkit rebalance apply | head`).

* `dev up` terminated while it started its servers left them running, orphaned (pg_ctl
  puts them in a session of their own), and the next `dev up` on the directory refused it.
* `rebalance apply` terminated died saying nothing and recorded nothing: `rebalance
  status` could not tell why the move stopped.  It now stops as for Ctrl-C.
* `rebalance apply | head -2` failed the batch ("BrokenPipeError ... fix the cause",
  status 2) where the README promises that a reader that stops early ends a command
  quietly with status 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import shardkit
from inproc_cli import run
from shardkit import rebalance

pytestmark = pytest.mark.integration

ROWS = 200
GROUPS = {"groups": {"users": {"strategy": "hash", "tables": {"users": "id"}}}}


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """A command whose process is not what is checked (what stands after one was stopped):
    in this process (``tests/inproc_cli.py``).  The commands stopped run in processes."""
    return run(argv)


def _start(*argv: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shardkit.cli", *argv], text=True, stderr=subprocess.PIPE,
                            start_new_session=True, **kw)


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the command did not end within {timeout} s of its signal")
    return proc.returncode, err


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _servers_under(d: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in ps.splitlines() if str(d) in ln and "postgres" in ln]


def test_dev_up_terminated_while_starting_stops_the_servers_it_started():
    d = Path(tempfile.mkdtemp(prefix="sk-interrupts-", dir="/tmp")) / "c"
    d.parent.chmod(0o755)
    try:
        proc = _start("dev", "up", "--shards", "2", "--replicas", "1", "--dir", str(d), stdout=subprocess.PIPE)
        # Once a server runs, and before `up` has finished (its replicas come after).
        _wait(lambda: _servers_under(d) or proc.poll() is not None, 60, "a server of `dev up`")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        rc, err = _finish(proc)
        assert "Traceback" not in err, err
        assert rc == 130, (rc, err)
        assert err.strip().startswith("interrupted"), err
        _wait(lambda: not _servers_under(d), 10, f"no server left running: {_servers_under(d)}")
        # The directory is free for the next `dev up`, which starts the cluster.
        again = _cli("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(d))
        assert again.returncode == 0, again.stderr
    finally:
        _cli("dev", "down", "--dir", str(d))
        for line in _servers_under(d):   # (only servers of this test's directory)
            os.kill(int(line.split()[0]), signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(d.parent)])


@pytest.fixture(scope="module")
def moving(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
    cfg = tmp_path_factory.mktemp("interrupts") / "shardkit.toml"
    dev.write_config(cfg, {**GROUPS, "catalog": {"url": dev.create_catalog()}})
    cluster = shardkit.Cluster.from_config(cfg, follow_map=False)
    rebalance.init(cluster)
    by_shard: dict[str, list[dict[str, int]]] = {}
    for i in range(ROWS):
        by_shard.setdefault(cluster.shard_for("users", i), []).append({"i": i})
    for shard, rows in by_shard.items():   # one transaction a shard (not one a row)
        with cluster.engine(shard).begin() as c:
            c.execute(text("INSERT INTO users VALUES (:i, 'u')"), rows)
    yield dev, cluster, cfg
    cluster.dispose()


def _a_move(cluster) -> list[str]:
    owns_s1 = "s1" in cluster.catalog.current_map().bucket_map
    return ["--drain" if owns_s1 else "--add", "s1"]


def _step_reached(cluster, before: int) -> bool:
    with cluster.catalog.engine.connect() as c:
        return bool(c.execute(text("SELECT count(*) FROM shardkit_catalog.move_batches "
                                   "WHERE move_id > :b AND step <> 'pending'"), {"b": before}).scalar())


def _last_move(cluster) -> int:
    with cluster.catalog.engine.connect() as c:
        return c.execute(text("SELECT coalesce(max(id), 0) FROM shardkit_catalog.moves")).scalar()


def _status(cfg, move_id: int) -> dict:
    res = _cli("rebalance", "status", str(move_id), "--json", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)[-1]


def _resume_and_check(dev, cfg, move_id: int) -> None:
    res = _cli("rebalance", "resume", str(move_id), "--grace", "0", "--config", str(cfg))
    assert res.returncode == 0, res.stderr[-1500:]
    assert _status(cfg, move_id)["state"] == "done"
    rows = 0
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn) as c:
            rows += c.execute("SELECT count(*) FROM users").fetchone()[0]
    assert rows == ROWS
    assert _cli("verify", "--config", str(cfg)).returncode == 0


def test_rebalance_apply_terminated_stops_as_for_ctrl_c_and_says_so(moving):
    dev, cluster, cfg = moving
    before = _last_move(cluster)
    proc = _start("rebalance", "apply", *_a_move(cluster), "--grace", "0", "--step-delay", "60",
                  "--config", str(cfg), stdout=subprocess.DEVNULL)
    _wait(lambda: _step_reached(cluster, before) or proc.poll() is not None, 60, "the move's first step")
    assert proc.poll() is None, proc.communicate()
    move_id = _last_move(cluster)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert "Traceback" not in err, err
    assert rc == 130, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    assert f"shardkit rebalance resume {move_id}" in lines[0], lines[0]
    m = _status(cfg, move_id)
    assert m["state"] == "running" and m["mover"] is False, m
    assert m["error"] and "SIGTERM" in m["error"], m
    _resume_and_check(dev, cfg, move_id)


def test_rebalance_apply_whose_reader_went_away_stops_the_move_quietly_with_status_1(moving):
    dev, cluster, cfg = moving
    before = _last_move(cluster)
    proc = _start("rebalance", "apply", *_a_move(cluster), "--grace", "0", "--step-delay", "0.5",
                  "--config", str(cfg), stdout=subprocess.PIPE)
    first = proc.stdout.readline()
    assert first.startswith("move "), first
    proc.stdout.close()   # as `| head -1` does: the next progress line meets a closed pipe
    rc, err = _finish(proc)
    move_id = _last_move(cluster)
    assert move_id > before
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 1, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    assert f"shardkit rebalance resume {move_id}" in lines[0], lines[0]
    m = _status(cfg, move_id)
    assert m["state"] == "running" and m["mover"] is False, m
    assert "output was closed" in m["error"], m
    _resume_and_check(dev, cfg, move_id)
