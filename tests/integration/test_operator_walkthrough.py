"""An operator's day by the README's "Operations" and "Command line", and the mistakes
an operator makes: Ctrl-C (SIGINT) in the middle of `shardkit migrate upgrade` and of
`shardkit rebalance apply`, and a mover that was killed.  Each must say what stopped and
what to do, lose nothing, and leave a state that `rebalance status` explains.

The commands interrupted run as the operator runs them: `python -m shardkit.cli` in a
process of its own, interrupted by a signal, on a 2-shard cluster with a catalog.  The
commands run afterwards to see where things stand (`rebalance status`, `resume`,
`verify`, `migrate current`) run in this process, in the project's directory
(``tests/inproc_cli.py``): what they do and say is what is checked, not their process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from inproc_cli import run
from waiting import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
B = 16
ROWS = 200
_dbs = itertools.count()

REV = '''"""{rev}"""
from alembic import op

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    {up}


def downgrade():
    pass
'''


def _to_toml(data) -> str:
    from shardkit.devcluster import to_toml

    return to_toml(data)


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGV`` run in ``cwd``, in this process."""
    with contextlib.chdir(cwd):
        return run(argv)


def _interruptible() -> None:
    # Ctrl-C's default: a suite run as a background job (`cmd &` in a script) starts with
    # SIGINT ignored, which its children inherit, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    """A command started as from a shell: the leader of its own process group."""
    return subprocess.Popen([sys.executable, "-m", "shardkit.cli", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_interruptible)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> SimpleNamespace:
    """Its outcome; a command that does not end within ``timeout`` s is killed (with its
    process group) and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the command did not end within {timeout} s of the signal; stdout: {out[-800:]!r}; "
                    f"stderr: {err[-800:]!r}")
    return SimpleNamespace(rc=proc.returncode, out=out, err=err)


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=B)


def _database(dev) -> str:
    db = f"walk{next(_dbs)}"
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
    return db


def _config(dev, db: str, catalog: str | None = None) -> dict:
    cfg = {"bucket_count": B,
           "shards": [{"name": s.name, "primary": s.primary.url.rsplit("/", 1)[0] + "/" + db, "replicas": []}
                      for s in dev.shards],
           "groups": {"users": {"strategy": "hash", "tables": {"users": "id"}}}}
    if catalog:
        cfg["catalog"] = {"url": catalog}
    return cfg


def _sql(dev, shard: int, db: str, query: str, params=None):
    dsn = dev.shards[shard].primary.dsn.replace("dbname=shardkit", f"dbname={db}")
    with psycopg.connect(dsn, autocommit=True) as c:
        cur = c.execute(query, params)
        return cur.fetchall() if cur.description else None


# -- Ctrl-C in `migrate upgrade` ------------------------------------------------------------------


@pytest.fixture
def project(dev, tmp_path):
    """A project directory: migrations/ (r1 creates users; r2 adds a column, then takes a
    minute) and shardkit.toml, on databases of its own."""
    db = _database(dev)
    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    versions = tmp_path / "migrations" / "versions"
    (versions / "r1.py").write_text(REV.format(
        rev="r1", down=None, up='op.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")'))
    (versions / "r2.py").write_text(REV.format(
        rev="r2", down="r1", up='op.execute("ALTER TABLE users ADD COLUMN email text")\n'
                                '    op.execute("SELECT pg_sleep(60)")'))
    (tmp_path / "shardkit.toml").write_text(_to_toml(_config(dev, db)))
    yield SimpleNamespace(dir=tmp_path, db=db)
    for i in range(len(dev.shards)):  # nothing of a failed run may sleep on
        _sql(dev, i, db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def _sleeping(dev, shard: int, db: str) -> bool:
    return bool(_sql(dev, shard, db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND query LIKE 'SELECT pg_sleep%%' AND pid <> pg_backend_pid()")[0][0])


@pytest.mark.parametrize("to", ["process group", "command only"])
def test_ctrl_c_in_migrate_upgrade_stops_every_shard_and_reports_where_each_stands(dev, project, to):
    """Ctrl-C reaches the command's process group from a terminal; a deploy tool that
    cancels sends SIGINT to the command alone.  Either way the command stops soon, the
    revision running on a shard rolls back (PostgreSQL DDL is transactional), no shard
    starts after it, and the command says, in one line, where every shard stands."""
    proc = start("migrate", "upgrade", "--parallel", "1", cwd=project.dir)
    wait_for(lambda: _sleeping(dev, 0, project.db) or proc.poll() is not None, 60, "r2 running on s0")
    assert proc.poll() is None, finish(proc)
    if to == "process group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    res = finish(proc)
    assert "Traceback" not in res.err, res.err
    assert res.rc == 130, (res.rc, res.err[-1500:])
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), res.err
    assert "s0 at r1" in lines[0] and "s1 at base (not started)" in lines[0], lines[0]
    assert "shardkit migrate upgrade head" in lines[0], lines[0]
    # The Alembic process cancelled r2's statement as it stopped; its server process notes
    # the cancel, then the closed connection, a moment later (pg_stat_activity shows the
    # statement until it exits): not the 60 s r2 sleeps.
    wait_for(lambda: not _sleeping(dev, 0, project.db), 10, "r2 to stop on s0 after the command ended")
    current = json.loads(cli("migrate", "current", "--json", cwd=project.dir).stdout)
    assert current == {"s0": "r1", "s1": None}, current
    cols = _sql(dev, 0, project.db, "SELECT count(*) FROM information_schema.columns "
                                    "WHERE table_name = 'users' AND column_name = 'email'")[0][0]
    assert cols == 0, "r2's column stayed on s0 without its revision"


# -- Ctrl-C in `rebalance apply`, a killed mover ----------------------------------------------------


@pytest.fixture(scope="module")
def moving(dev, tmp_path_factory):
    """A catalog initialised over a users table of ROWS rows."""
    db = _database(dev)
    catalog = dev.create_catalog(db + "_catalog")
    here = tmp_path_factory.mktemp("moving")
    (here / "shardkit.toml").write_text(_to_toml(_config(dev, db, catalog)))
    for i in range(len(dev.shards)):
        _sql(dev, i, db, "CREATE TABLE users (id bigint PRIMARY KEY, name text)")
    res = cli("rebalance", "init", cwd=here)
    assert res.returncode == 0, res.stderr
    import shardkit

    cluster = shardkit.Cluster.from_config(here / "shardkit.toml", follow_map=False)
    try:
        by_shard: dict[int, list[tuple[int, str]]] = {}
        for i in range(ROWS):
            by_shard.setdefault(cluster.shard_names.index(cluster.shard_for("users", i)), []).append((i, f"u{i}"))
    finally:
        cluster.dispose()
    for shard, rows in by_shard.items():   # one connection a shard (not one a row)
        dsn = dev.shards[shard].primary.dsn.replace("dbname=shardkit", f"dbname={db}")
        with psycopg.connect(dsn, autocommit=True) as c, c.cursor() as cur:
            cur.executemany("INSERT INTO users VALUES (%s, %s)", rows)
    return SimpleNamespace(dir=here, db=db)


def _a_move(w) -> list[str]:
    """What to apply: drain s1 while it owns buckets (in the catalog's map), else give
    them back.  (Read in-process: choosing the move is not what the tests check.)"""
    import shardkit

    cluster = shardkit.Cluster.from_config(w.dir / "shardkit.toml", follow_map=False)
    try:
        owns_s1 = "s1" in cluster.catalog.current_map().bucket_map
    finally:
        cluster.dispose()
    return ["--drain", "s1"] if owns_s1 else ["--add", "s1"]


def _move(w, move_id: int | None = None) -> dict:
    res = cli("rebalance", "status", "--json", *([str(move_id)] if move_id else []), cwd=w.dir)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)[-1]


def _step_reached(dev, w) -> bool:
    """A running move's first batch has taken a step (read from the catalog itself)."""
    dsn = dev.shards[0].primary.dsn.replace("dbname=shardkit", f"dbname={w.db}_catalog")
    with psycopg.connect(dsn, autocommit=True) as c:
        return bool(c.execute("SELECT count(*) FROM shardkit_catalog.move_batches b JOIN shardkit_catalog.moves m "
                              "ON m.id = b.move_id WHERE m.state = 'running' AND b.step <> 'pending'").fetchone()[0])


def _rows(dev, w) -> int:
    return sum(_sql(dev, i, w.db, "SELECT count(*) FROM users")[0][0] for i in range(len(dev.shards)))


def _finish_the_move(w, move_id: int) -> None:
    res = cli("rebalance", "resume", str(move_id), "--grace", "0", cwd=w.dir)
    assert res.returncode == 0, res.stderr[-1500:]
    assert _move(w, move_id)["state"] == "done"
    res = cli("verify", cwd=w.dir)
    assert res.returncode == 0, res.stdout[-1500:]


def test_ctrl_c_in_rebalance_apply_says_how_to_go_on_and_status_shows_it(dev, moving):
    """README: killing the mover at any point and running `resume` redoes the interrupted
    step.  Ctrl-C is how an operator stops it: one line saying that the move stopped and
    how to go on (not a traceback), status 130, and `rebalance status` showing why the
    move, still `running`, does not progress."""
    proc = start("rebalance", "apply", *_a_move(moving), "--grace", "0", "--step-delay", "60", cwd=moving.dir)
    wait_for(lambda: _step_reached(dev, moving) or proc.poll() is not None, 60, "the move's first step")
    assert proc.poll() is None, finish(proc)
    move_id = _move(moving)["move"]
    os.killpg(proc.pid, signal.SIGINT)
    res = finish(proc)
    assert "Traceback" not in res.err, res.err[-1500:]
    assert res.rc == 130, (res.rc, res.err[-1500:])
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), res.err
    assert f"shardkit rebalance resume {move_id}" in lines[0], lines[0]

    m = _move(moving, move_id)
    assert m["state"] == "running", m
    assert m["error"] and "interrupted" in m["error"], m
    assert m["mover"] is False, m
    text_status = cli("rebalance", "status", str(move_id), cwd=moving.dir).stdout
    assert "interrupted" in text_status and "no mover is running it" in text_status, text_status
    assert f"shardkit rebalance resume {move_id}" in text_status, text_status

    _finish_the_move(moving, move_id)
    assert _move(moving, move_id)["error"] is None
    assert _rows(dev, moving) == ROWS


def test_rebalance_status_tells_a_running_mover_from_a_killed_one(dev, moving):
    """A move is `running` in the catalog both while its mover works and after the mover
    was killed (SIGKILL, an OOM kill, a lost machine): `rebalance status` says which, so
    the operator knows whether to wait or to `resume`."""
    proc = start("rebalance", "apply", *_a_move(moving), "--grace", "0", "--step-delay", "60", cwd=moving.dir)
    wait_for(lambda: _step_reached(dev, moving) or proc.poll() is not None, 60, "the move's first step")
    assert proc.poll() is None, finish(proc)
    m = _move(moving)
    move_id = m["move"]
    assert m.get("mover") is True, m
    assert "a mover is running it now" in cli("rebalance", "status", str(move_id), cwd=moving.dir).stdout
    proc.kill()
    finish(proc)
    wait_for(lambda: _move(moving, move_id).get("mover") is False, 10, "the killed mover's lock to go")
    text_status = cli("rebalance", "status", str(move_id), cwd=moving.dir).stdout
    assert "no mover is running it" in text_status and f"resume {move_id}" in text_status, text_status
    _finish_the_move(moving, move_id)
    assert _rows(dev, moving) == ROWS


def test_apply_while_an_interrupted_move_is_pending_says_so_as_plan_does(dev, moving):
    """README: a plan made while a move is in progress says so.  `apply` plans too (it
    takes every planning option) and gave no word: here it drains s1 while a stopped
    move is still to give s1 a bucket, so s1 is not empty once that move is resumed."""
    import shardkit
    from shardkit import rebalance
    from shardkit._rebalance_plan import plan_from_maps

    if _a_move(moving) == ["--add", "s1"]:
        assert cli("rebalance", "apply", "--add", "s1", "--grace", "0", cwd=moving.dir).returncode == 0
    cluster = shardkit.Cluster.from_config(moving.dir / "shardkit.toml", follow_map=False)
    try:
        live = list(cluster.catalog.current_map().bucket_map)
        new = list(live)
        new[live.index("s0")] = "s1"
        pending = rebalance.Mover(cluster, grace=0).start(plan_from_maps(live, new, "one bucket to s1"))
        try:
            res = cli("rebalance", "apply", "--drain", "s1", "--grace", "0", cwd=moving.dir)
            assert res.returncode == 0, res.stderr[-1500:]
            assert f"note: move {pending} is in progress" in res.stderr, res.stderr[-1500:]
        finally:
            rebalance.abort(cluster, pending)
    finally:
        cluster.dispose()
    assert cli("verify", cwd=moving.dir).returncode == 0


def test_rebalance_init_names_a_shard_added_to_the_config_without_its_tables(dev, tmp_path):
    """README: adding a shard is "create its schema, add it to the config file, then
    `shardkit rebalance init`".  An operator who skips the first step was told the guard
    was installed on every shard, and learnt otherwise only when a move was refused."""
    db = _database(dev)
    for i in range(len(dev.shards)):
        _sql(dev, i, db, "CREATE TABLE users (id bigint PRIMARY KEY, name text)")
    _sql(dev, 1, db, f"CREATE DATABASE {db}_new")
    cfg = _config(dev, db, dev.create_catalog(db + "_catalog"))
    cfg["shards"].append({"name": "s2", "primary": cfg["shards"][1]["primary"] + "_new", "replicas": []})
    (tmp_path / "shardkit.toml").write_text(_to_toml(cfg))
    res = cli("rebalance", "init", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "s2" in ln and "users" in ln]
    assert warned and "shardkit migrate upgrade" in warned[0], res.stderr
    assert not any("s0" in ln or "s1 " in ln for ln in res.stderr.splitlines()), res.stderr
