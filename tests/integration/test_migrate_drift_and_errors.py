"""`shardkit migrate` from an operator's seat: drift in column defaults and check
constraints, the error a failed shard is reported with, two upgrades started at once,
and `op.install_shardkit_guard()` while the catalog does not answer."""

from __future__ import annotations

import fcntl
import os
import re
import pty
import struct
import subprocess
import sys
import termios
import time

import pytest
from alembic_inproc import alembic as alembic_inproc
from alembic_inproc import upgrade_every_shard
from ports import free_port_run
from test_migrate_failures import HASH, World, _try

from shardkit import migrate, rebalance

pytestmark = pytest.mark.integration


@pytest.fixture
def world(shardkit_dev_cluster, tmp_path):
    made = []

    def make(**kw) -> World:
        w = World(shardkit_dev_cluster, tmp_path / f"w{len(made)}", **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


TABLE_T = ("op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True), "
           "sa.Column('v', sa.Integer, server_default='1'))")


def test_check_reports_a_column_default_and_a_check_constraint_that_differ(world):
    """A default changed by hand on one shard makes its rows differ from the others';
    a check constraint on one shard refuses rows the others accept: both are drift."""
    w = world(shards=2)
    w.rev("c1", None, TABLE_T, "op.drop_table('t')")
    upgrade_every_shard(w.ini, w.cfg)
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok
    w.sql(1, "ALTER TABLE t ALTER COLUMN v SET DEFAULT 5")
    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout
    assert 'DRIFT: s1: t defaults differ from s0, only on s1: [["v", "5"]]; only on s0: [["v", "1"]]' \
        in r.stdout, r.stdout
    w.sql(1, "ALTER TABLE t ALTER COLUMN v SET DEFAULT 1")
    w.sql(0, "ALTER TABLE t ADD CONSTRAINT v_positive CHECK (v > 0)")
    report = migrate.check(w.cluster, alembic_ini=w.ini)
    assert not report.ok and len(report.schema_differences) == 1, report.as_dict()
    assert report.schema_differences[0].startswith("s1: t check constraints differ from s0, only on s0: ")
    assert "v_positive" in report.schema_differences[0]
    w.sql(0, "ALTER TABLE t DROP CONSTRAINT v_positive")
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok


def test_a_failed_shard_is_reported_with_alembics_error_not_a_warning(world):
    """Alembic prints its own failures ("FAILED: ...") on stdout, wrapped to the width of
    a terminal on its stdin: run from a terminal, with a warning on stderr (a catalog with
    no map yet, before `shardkit rebalance init`), the report still gives the whole error."""
    w = world(shards=2, catalog=True)
    w.rev("e1", None, TABLE_T, "op.drop_table('t')")
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
        r = subprocess.run([sys.executable, "-m", "shardkit.cli", "migrate", "upgrade", "nosuchrev",
                            "--config", str(w.cfg), "--alembic-ini", str(w.ini)],
                           stdin=follower, capture_output=True, text=True, timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert r.returncode == 1
    error = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1, r.stderr
    for shard in ("s0", "s1"):
        # (Without Alembic's "FAILED: ", as in the progress lines.)
        assert f"{shard}: Can't locate revision identified by 'nosuchrev'" in error[0], error
        assert "FAILED" not in error[0], error
        # The progress line says FAILED once (not again with Alembic's "FAILED: ").
        progress = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(f"{shard}: FAILED in ")]
        assert len(progress) == 1, r.stdout + r.stderr
        assert re.match(rf"{shard}: FAILED in [0-9.]+ s: Can't locate revision identified by 'nosuchrev'$",
                        progress[0]), progress
    assert "no bucket map yet" not in error[0]


def test_error_line_names_shardkits_exception_over_the_drivers_it_wraps():
    out = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
psycopg.OperationalError: consuming input failed: server closed the connection unexpectedly

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "x.py", line 2, in <module>
shardkit.errors.ShardUnavailable: shard s1: node s1/primary (postgresql+psycopg://u@h/db) is \
unreachable: server closed the connection unexpectedly
"""
    assert migrate._error_line(out).startswith("shardkit.errors.ShardUnavailable: shard s1: node s1/primary")
    sa_out = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
sqlalchemy.exc.ProgrammingError: (psycopg.errors.DuplicateTable) relation "u" already exists
[SQL: CREATE TABLE u (id BIGSERIAL NOT NULL, PRIMARY KEY (id))]
(Background on this error at: https://sqlalche.me/e/20/f405)
"""
    assert migrate._error_line(sa_out) == \
        'sqlalchemy.exc.ProgrammingError: (psycopg.errors.DuplicateTable) relation "u" already exists'


def test_two_upgrades_started_at_once_both_succeed(world, tmp_path):
    """Two deploys run `shardkit migrate upgrade` at the same time: the second waits for
    the first on each shard, then finds it at head; neither reports a failure."""
    w = world(shards=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    w.rev("p1", None, f"""
import os, time
open(os.path.join({str(marks)!r}, 'in-%d' % os.getpid()), 'w').close()
while not os.path.exists(os.path.join({str(marks)!r}, 'go')):
    time.sleep(0.05)
op.create_table('plans', sa.Column('id', sa.Integer, primary_key=True), sa.Column('n', sa.Text))
op.execute("INSERT INTO plans VALUES (1, 'free')")
""", "op.drop_table('plans')")
    cmd = [sys.executable, "-m", "shardkit.cli", "migrate", "upgrade", "--config", str(w.cfg),
           "--alembic-ini", str(w.ini)]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(marks):
            assert time.monotonic() < deadline and a.poll() is None, a.communicate()
            time.sleep(0.05)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # The second is inside the migration too, or waiting on the shard.
            while len(os.listdir(marks)) < 2 and not w.sql(0, (
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"))[0][0]:
                assert time.monotonic() < deadline and b.poll() is None, b.communicate()
                time.sleep(0.05)
            (marks / "go").touch()
            out_a, out_b = a.communicate(timeout=120), b.communicate(timeout=120)
        finally:
            b.kill()
    finally:
        (marks / "go").touch()
        a.kill()
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert w.sql(0, "SELECT * FROM plans") == [(1, "free")]
    assert w.sql(0, "SELECT version_num FROM alembic_version") == [("p1",)]


def test_guard_on_a_new_table_while_the_catalog_does_not_answer(world, tmp_path):
    """The shards carry their own ownership record: a migration that creates a sharded
    table while the catalog is down still guards it, so a process routing by a stale map
    cannot write a row to a shard that does not own it."""
    w = world(shards=2, groups=HASH, catalog=True)
    rebalance.init(w.cluster)
    owned = {i: w.owned(i) for i in range(2)}
    data = w.config_dict(2)
    data["catalog"] = {"url": f"postgresql+psycopg://shardkit@127.0.0.1:{free_port_run(1)}/cat"}
    from shardkit.devcluster import to_toml
    down = tmp_path / "catalog-down.toml"
    down.write_text(to_toml(data), encoding="utf-8")
    w.rev("g1", None, "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True), "
          "sa.Column('v', sa.Integer))\nop.install_shardkit_guard()", "op.drop_table('things')")
    r = w.cli("migrate", "upgrade", cfg=down)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        assert w.has_trigger(i, "things"), i
        assert w.owned(i) == owned[i]
    key = next(k for k in range(1000) if w.cluster.shard_for("things", k) == "s1")
    assert _try(w, 0, "INSERT INTO things VALUES (%s, 0)", (key,)) == "SK001"
    assert _try(w, 1, "INSERT INTO things VALUES (%s, 0)", (key,)) == "ok"


MODELS = '''
import sqlalchemy as sa
metadata = sa.MetaData()
sa.Table("gadgets", metadata, sa.Column("id", sa.BigInteger, primary_key=True),
         sa.Column("name", sa.Text))
'''


def _alembic(w: World, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """Plain `alembic`, in this process (``alembic_inproc``), tmp_path on sys.path."""
    return alembic_inproc(["-c", str(w.ini), "-x", f"config={w.cfg}", *args], path=tmp_path)


def test_autogenerate_and_alembic_check_compare_every_shard_and_keep_one_diff(world, tmp_path):
    """`alembic revision --autogenerate` runs env.py's comparison on every shard: the
    revision holds the models' changes once (not one shard's), `alembic check` reads
    them, and shards whose schemas differ are refused instead of giving a revision
    right for one of them only.  The metadata option may be quoted, as the ini's
    comment writes it."""
    (tmp_path / "gadget_models.py").write_text(MODELS)
    w = world(shards=2)
    ini = w.ini.read_text().replace("# shardkit_metadata = myapp.models:Base.metadata",
                                    'shardkit_metadata = "gadget_models:metadata"')
    w.ini.write_text(ini)
    r = _alembic(w, tmp_path, "check")
    assert r.returncode != 0 and "New upgrade operations detected" in r.stdout + r.stderr, r.stdout
    r = _alembic(w, tmp_path, "revision", "--autogenerate", "-m", "gadgets")
    assert r.returncode == 0, r.stderr
    [script] = list(w.versions.glob("*gadgets.py"))
    body = script.read_text()
    assert body.count("op.create_table('gadgets'") == 1, body
    assert body.count("op.drop_table('gadgets')") == 1, body
    assert _alembic(w, tmp_path, "upgrade", "head").returncode == 0
    r = _alembic(w, tmp_path, "check")
    assert r.returncode == 0 and "No new upgrade operations detected" in r.stdout, r.stdout + r.stderr
    # s0 drifts: a column the models do not have (the last shard compared is clean).
    w.sql(0, "ALTER TABLE gadgets ADD COLUMN colour text")
    for args in (("check",), ("revision", "--autogenerate", "-m", "drifted")):
        r = _alembic(w, tmp_path, *args)
        assert r.returncode != 0, r.stdout
        out = r.stdout + r.stderr
        assert "shard s1's schema compares with the models differently from shard s0's" in out, out
        assert "-x shard=s0" in out
    assert not list(w.versions.glob("*drifted.py"))
    # One shard on its own, as the error says.
    r = _alembic(w, tmp_path, "-x", "shard=s0", "revision", "--autogenerate", "-m", "only_s0")
    assert r.returncode == 0, r.stderr
    assert "op.drop_column('gadgets', 'colour')" in next(w.versions.glob("*only_s0.py")).read_text()


def test_check_reports_enum_types_whose_labels_differ(world):
    """A label added by hand on one shard (ALTER TYPE ... ADD VALUE) lets that shard
    accept rows the others refuse; a type on one shard only is drift too."""
    w = world(shards=2)
    w.rev("n1", None, "op.execute(\"CREATE TYPE mood AS ENUM ('calm', 'angry')\")",
          "op.execute('DROP TYPE mood')")
    upgrade_every_shard(w.ini, w.cfg)
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok
    w.sql(1, "ALTER TYPE mood ADD VALUE 'sleepy'")
    w.sql(0, "CREATE TYPE colour AS ENUM ('red')")
    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout
    assert 's1: enum type mood labels are ["calm", "angry", "sleepy"], on s0 ["calm", "angry"]' \
        in r.stdout, r.stdout
    assert "s1: enum type colour missing (present on s0)" in r.stdout, r.stdout
