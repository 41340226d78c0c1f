"""The migrations a team writes over a year, through `shardkit migrate` on shards with
replicas: CREATE INDEX CONCURRENTLY while a second deploy waits for the shard, a unique
index whose concurrent build failed on one shard, `downgrade -1` after a deploy that
failed on one shard, and a data migration of a reference table whose rows come out
different on each shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest
from alembic_inproc import upgrade_every_shard
from test_migrate_failures import World

import shardkit
from shardkit import migrate

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


def replica_sql(w: World, i: int, query: str, params=None, until=None):
    """``query`` on shard ``i``'s first replica, polled until ``until(rows)`` holds (the
    replica replays the primary's changes a moment later)."""
    dsn = w.servers[i].replicas[0].dsn.replace("dbname=shardkit", f"dbname={w.db}")
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                rows = c.execute(query, params).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = None
        if until is None or (rows is not None and until(rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def index_state(w: World, i: int, name: str):
    return w.sql(i, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,))


USERS = """
op.create_table('users', sa.Column('id', sa.BigInteger, primary_key=True), sa.Column('email', sa.Text))
op.execute("INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 500) g")
"""


def test_create_index_concurrently_while_a_second_deploy_waits_for_the_shard(world, tmp_path):
    """A revision builds an index with CREATE INDEX CONCURRENTLY (in an autocommit block,
    as PostgreSQL requires) while a second deploy's `migrate upgrade` waits for the shard.
    The concurrent build waits for every transaction holding an older snapshot: a waiter
    holding one while it waits for the first migration's lock is a deadlock, which
    PostgreSQL broke by failing the first deploy's index build (leaving an INVALID index
    that made the second deploy fail too).  Both deploys must succeed."""
    w = world(shards=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    w.rev("i1", None, USERS, "op.drop_table('users')")
    w.rev("i2", "i1", f"""
import os, time
open(os.path.join({str(marks)!r}, 'in-%d' % os.getpid()), 'w').close()
while not os.path.exists(os.path.join({str(marks)!r}, 'go')):
    time.sleep(0.05)
with op.get_context().autocommit_block():
    op.create_index('users_email', 'users', ['email'], postgresql_concurrently=True)
""", """
with op.get_context().autocommit_block():
    op.drop_index('users_email', 'users', postgresql_concurrently=True)
""")
    upgrade_every_shard(w.ini, w.cfg, "i1")
    cmd = [sys.executable, "-m", "shardkit.cli", "migrate", "upgrade", "--config", str(w.cfg),
           "--alembic-ini", str(w.ini)]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = None
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(marks):
            assert time.monotonic() < deadline and a.poll() is None, a.communicate()
            time.sleep(0.05)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The second deploy waits for the shard (its lock request is its last statement).
        while not w.sql(0, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND query LIKE '%%advisory_lock%%' AND pid <> pg_backend_pid()")[0][0]:
            assert time.monotonic() < deadline and b.poll() is None, b.communicate()
            time.sleep(0.05)
        time.sleep(1.5)   # past PostgreSQL's deadlock_timeout: the waiter's own check has run
        (marks / "go").touch()
        out_a, out_b = a.communicate(timeout=120), b.communicate(timeout=120)
    finally:
        (marks / "go").touch()
        a.kill()
        if b is not None:
            b.kill()
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "i2"}
    assert index_state(w, 0, "users_email") == [(True,)]
    assert replica_sql(w, 0, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('users_email')",
                       until=lambda rows: rows == [(True,)]) == [(True,)]


def test_check_names_a_unique_index_whose_concurrent_build_failed_on_one_shard(world):
    """A unique index built concurrently (written to be re-run: if_not_exists) fails on the
    shard whose data has duplicates, and leaves an INVALID index there (outside a
    transaction, nothing rolls back).  After the data is fixed the re-run "succeeds" on that
    shard by skipping the existing index: every shard at head, and `migrate check` must
    not say there is no drift while one shard's index is unusable."""
    w = world(shards=2)
    w.rev("u1", None, USERS, "op.drop_table('users')")
    w.rev("u2", "u1", """
with op.get_context().autocommit_block():
    op.create_index('users_email_key', 'users', ['email'], unique=True,
                    postgresql_concurrently=True, if_not_exists=True)
""", "op.drop_index('users_email_key', 'users')")
    upgrade_every_shard(w.ini, w.cfg, "u1")
    w.sql(1, "UPDATE users SET email = 'dup@example.com' WHERE id IN (2, 4)")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 1 and "failed on s1" in r.stderr and "s1 at u1" in r.stderr, r.stderr
    assert index_state(w, 0, "users_email_key") == [(True,)]
    assert index_state(w, 1, "users_email_key") == [(False,)]
    w.sql(1, "UPDATE users SET email = 'u' || id || '@example.com'")
    assert w.cli("migrate", "upgrade").returncode == 0
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "u2", "s1": "u2"}
    assert index_state(w, 1, "users_email_key") == [(False,)]   # skipped: still unusable
    r = w.cli("migrate", "check", "--json")
    assert r.returncode == 1, r.stdout
    diffs = json.loads(r.stdout)["schema_differences"]
    assert len(diffs) == 1 and diffs[0].startswith("s1: index users_email_key of users is INVALID"), diffs
    assert "REINDEX INDEX CONCURRENTLY" in diffs[0]
    # As the report says; the replica follows.
    w.sql(1, "REINDEX INDEX CONCURRENTLY users_email_key")
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok
    assert replica_sql(w, 1, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('users_email_key')",
                       until=lambda rows: rows == [(True,)]) == [(True,)]


def test_relative_downgrade_is_refused_while_shards_are_at_different_revisions(world):
    """A deploy failed on one shard (s0 at r3, s1 at r2); the operator rolls it back with
    `migrate downgrade -1`.  Each Alembic counts from its own shard's revision: s0 would go
    to r2 and s1 to r1, dropping s1's column x with its data.  Refused, naming where each
    shard is; an absolute revision works, and so does -1 once the shards agree."""
    w = world(shards=2)
    w.rev("r1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    w.rev("r2", "r1", "op.add_column('t', sa.Column('x', sa.Integer))\n"
          "op.execute('INSERT INTO t VALUES (1, 42)')", "op.drop_column('t', 'x')")
    w.rev("r3", "r2", "op.create_table('u', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('u')")
    w.sql(1, "CREATE TABLE u (x int)")   # made by hand: r3 fails on s1
    assert w.cli("migrate", "upgrade").returncode == 1
    assert migrate.current(w.cluster) == {"s0": "r3", "s1": "r2"}
    for args in (("downgrade", "-1"), ("upgrade", "+1")):
        r = w.cli("migrate", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and "s0 at r3, s1 at r2" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert migrate.current(w.cluster) == {"s0": "r3", "s1": "r2"}
    assert w.sql(1, "SELECT x FROM t") == [(42,)]
    with pytest.raises(shardkit.errors.ConfigurationError, match="different revisions"):
        migrate.run_command(w.cluster, str(w.cfg), "downgrade", "-1", alembic_ini=w.ini)
    assert w.cli("migrate", "downgrade", "r2").returncode == 0
    assert migrate.current(w.cluster) == {"s0": "r2", "s1": "r2"}
    r = w.cli("migrate", "downgrade", "-1")
    assert r.returncode == 0, r.stderr
    assert migrate.current(w.cluster) == {"s0": "r1", "s1": "r1"}


def test_check_reports_reference_table_rows_that_differ_between_shards(world):
    """A data migration of a reference table runs once per shard: rows whose values the
    database makes up (gen_random_uuid(), now()) differ on every shard, and joins from
    sharded rows to them break on the shards whose copy differs.  `migrate check`
    compares the copies; equal values shown differently (a shard whose database has
    another TimeZone) are not drift."""
    w = world(shards=2)
    data = w.config_dict(2)
    data["reference_tables"] = ["plans"]
    from shardkit.devcluster import to_toml
    w.cfg.write_text(to_toml(data), encoding="utf-8")
    w.cluster.dispose()
    w.cluster = shardkit.Cluster.from_config(w.cfg, follow_map=False)
    w.rev("p1", None, """
op.create_table('plans', sa.Column('id', sa.Uuid, primary_key=True, server_default=sa.text('gen_random_uuid()')),
                sa.Column('name', sa.Text, nullable=False),
                sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()')))
""", "op.drop_table('plans')")
    w.rev("p2", "p1", "op.execute(\"INSERT INTO plans (name) VALUES ('free'), ('pro')\")",
          "op.execute('DELETE FROM plans')")
    upgrade_every_shard(w.ini, w.cfg)
    r = w.cli("migrate", "check", "--json")
    assert r.returncode == 1, r.stdout
    out = json.loads(r.stdout)
    assert out["reference_differences"] == ["s1: reference table plans rows differ from s0 (2 rows on each)"], out
    assert not out["schema_differences"] and not out["revision_drift"]
    r = w.cli("migrate", "check")
    assert "DRIFT: s1: reference table plans rows differ from s0" in r.stdout, r.stdout
    # Written so that every shard makes the same rows: no drift, whatever each shows them as.
    w.rev("p3", "p2", """
op.execute("DELETE FROM plans")
op.execute("INSERT INTO plans VALUES ('00000000-0000-0000-0000-000000000001', 'free', "
           "'2024-01-01 00:00:00+00'), ('00000000-0000-0000-0000-000000000002', 'pro', NULL)")
""", "pass")
    w.sql(1, f"ALTER DATABASE {w.db} SET TimeZone = 'Asia/Tokyo'")
    upgrade_every_shard(w.ini, w.cfg)
    assert w.sql(1, "SELECT created_at::text FROM plans WHERE name = 'free'") == [("2024-01-01 09:00:00+09",)]
    report = migrate.check(w.cluster, alembic_ini=w.ini)
    assert report.ok, report.as_dict()
    # The replicas hold the same rows.
    want = w.sql(0, "SELECT id, name, created_at FROM plans ORDER BY id")
    for i in range(2):
        assert replica_sql(w, i, "SELECT id, name, created_at FROM plans ORDER BY id",
                           until=lambda rows: rows == want) == want
    # A row changed by hand on one shard.
    w.sql(0, "UPDATE plans SET name = 'Pro' WHERE name = 'pro'")
    report = migrate.check(w.cluster, alembic_ini=w.ini)
    assert report.reference_differences == ["s1: reference table plans rows differ from s0 (2 rows on each)"]
    w.sql(1, "DELETE FROM plans WHERE name = 'free'")
    assert migrate.check(w.cluster, alembic_ini=w.ini).reference_differences == \
        ["s1: reference table plans rows differ from s0 (1 row, 2 on s0)"]
