"""`shardkit migrate` through a week of schema changes: a unique index that the
rows of one shard violate, deployed with a canary (the report names the shard, the
cause and the rows to fix; that shard rolls back whole; `current` and `check` tell the
truth; fixing the data and upgrading again converges), and a primary that accepts
connections but never answers (the commands give up as the cluster's own connections do,
naming the shard, the password masked, instead of hanging)."""

from __future__ import annotations

import json
import socket
import time

import inproc_cli
import pytest
from alembic_inproc import upgrade_every_shard
from test_migrate_failures import dev, world  # noqa: F401 - the same fixtures

from shardkit import migrate
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration


USERS = ("op.create_table('users', sa.Column('id', sa.BigInteger, primary_key=True), "
         "sa.Column('email', sa.Text))")


def test_canary_deploy_that_fails_on_one_shard_names_the_rows_and_converges(world):
    """r2 lower-cases the emails (a data step) and adds a unique index on them; s2's rows
    violate it.  `--canary s0`: s0 and s1 upgrade, s2 rolls back r2 whole (neither the
    index nor the UPDATE stay) and the report gives PostgreSQL's DETAIL, which names the
    duplicated key, the one thing the operator needs to fix the data."""
    w = world(shards=3)
    w.rev("r1", None, USERS, "op.drop_table('users')")
    upgrade_every_shard(w.ini, w.cfg)
    for i in range(3):
        w.sql(i, "INSERT INTO users VALUES (%s, %s), (%s, %s)",
              (i * 10 + 1, f"A{i}@x", i * 10 + 2, f"b{i}@x"))
    w.sql(2, "INSERT INTO users VALUES (99, 'B2@x')")    # lower-cased, a duplicate of 22
    w.rev("r2", "r1", """
op.execute("UPDATE users SET email = lower(email)")
op.create_index('users_email', 'users', ['email'], unique=True)
""", "op.drop_index('users_email')")
    r = w.cli("migrate", "upgrade", "--canary", "s0", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    by = {s["shard"]: s for s in out["shards"]}
    assert {s: (v["ok"], v["revision_before"], v["revision_after"]) for s, v in by.items()} == \
        {"s0": (True, "r1", "r2"), "s1": (True, "r1", "r2"), "s2": (False, "r1", "r1")}
    err = by["s2"]["error"]
    assert 'could not create unique index "users_email"' in err, err
    assert "Key (email)=(b2@x) is duplicated" in err, err
    assert "failed on s2" in out["error"] and "Key (email)=(b2@x) is duplicated" in out["error"]
    # s2: no half-applied revision (the data step rolled back with the index).
    assert w.sql(2, "SELECT count(*) FROM pg_indexes WHERE indexname = 'users_email'") == [(0,)]
    assert w.sql(2, "SELECT email FROM users ORDER BY id") == [("A2@x",), ("b2@x",), ("B2@x",)]
    assert w.sql(0, "SELECT email FROM users ORDER BY id") == [("a0@x",), ("b0@x",)]
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "r2", "s1": "r2", "s2": "r1"}
    c = w.cli("migrate", "check")
    assert c.returncode == 1 and "DRIFT: shards are at different revisions" in c.stdout, c.stdout
    assert "s2: users indexes differ from s0, only on s0" in c.stdout, c.stdout
    # Fix the data, deploy again: every shard at r2, no drift.
    w.sql(2, "DELETE FROM users WHERE id = 99")
    r = w.cli("migrate", "upgrade", "--canary", "s0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "r2", "s1": "r2", "s2": "r2"}
    assert migrate.check(w.cluster, alembic_ini=w.ini).ok


def test_error_line_keeps_postgresqls_detail_and_hint():
    out = """INFO  [alembic.runtime.migration] Running upgrade r1 -> r2
Traceback (most recent call last):
  File "x.py", line 1, in <module>
psycopg.errors.UniqueViolation: could not create unique index "u"
DETAIL:  Key (email)=(a@x) is duplicated.

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "x.py", line 1, in <module>
sqlalchemy.exc.IntegrityError: (psycopg.errors.UniqueViolation) could not create unique index "u"
DETAIL:  Key (email)=(a@x) is duplicated.
HINT:  something to do.
[SQL: CREATE UNIQUE INDEX u ON users (email)]
(Background on this error at: https://sqlalche.me/e/20/gkpj)
"""
    assert migrate._error_line(out) == (
        'sqlalchemy.exc.IntegrityError: (psycopg.errors.UniqueViolation) could not create unique '
        'index "u" DETAIL:  Key (email)=(a@x) is duplicated. HINT:  something to do.')
    # Alembic's own one-line failure, and a plain exception, as before.
    assert migrate._error_line("FAILED: Multiple head revisions") == "FAILED: Multiple head revisions"
    assert migrate._error_line("Traceback (most recent call last):\n  File x\nValueError: no\n") == \
        "ValueError: no"


def test_a_primary_that_never_answers_is_reported_not_waited_for(world, tmp_path):
    """A primary whose address accepts the connection and never answers (a stopped VM, a
    half-open firewall, a server stuck in recovery): the cluster's connections give up
    after 3 s (README, `pool.*`); `migrate current`, `check` and `upgrade` waited forever.
    They give up likewise, name the shard, and do not print its password."""
    w = world(shards=3)
    w.rev("r1", None, USERS, "op.drop_table('users')")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)   # the kernel completes the handshake; nothing ever answers
    try:
        cfg = w.config_dict(3)
        cfg["shards"][2]["primary"] = \
            f"postgresql+psycopg://app:hunter2secret@127.0.0.1:{silent.getsockname()[1]}/{w.db}"
        path = tmp_path / "silent.toml"
        path.write_text(to_toml(cfg), encoding="utf-8")
        for verb in ("current", "check", "upgrade"):
            t = time.monotonic()
            # (In this process: a command that waited forever would fail at the suite's
            # per-test timeout, one that waited long at the assertion below.)
            r = inproc_cli.run(["migrate", verb, "--config", str(path), "--alembic-ini", str(w.ini)])
            assert r.returncode == 2, (verb, r.stdout, r.stderr)
            assert time.monotonic() - t < 20
            assert r.stderr.startswith("error: shard s2: node s2/primary (") and "unreachable" in r.stderr, r.stderr
            assert "hunter2secret" not in r.stdout + r.stderr
    finally:
        silent.close()
    # Nothing was migrated (refused before any shard was touched).
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": None, "s1": None, "s2": None}
