"""`shardkit migrate`: what a shard's Alembic warns of reaches the operator.

Each shard migrates in its own Alembic process, whose output `shardkit migrate` keeps
to itself when the shard succeeds.  shardkit's own warnings there say what the migration
did not do (`op.uninstall_shardkit_sql()` keeping the functions the ownership guard
uses; `op.install_shardkit_guard()` leaving a table unguarded): a report of plain "ok"
hid them."""

from __future__ import annotations

import json

import pytest
from test_migrate_failures import BUCKETS, HASH, world  # noqa: F401 - the same fixtures

from shardkit import rebalance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    """test_migrate_failures's cluster with the 2 shards this module uses."""
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)


def test_a_shards_warnings_are_reported_with_its_ok(world):
    w = world(shards=2, groups=HASH, catalog=True)
    w.rev("u1", None, "op.install_shardkit_sql()", "op.uninstall_shardkit_sql()")
    w.rev("u2", "u1", "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True))\n"
          "op.install_shardkit_guard()", "op.drop_table('things')")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stdout + r.stderr
    # A command without warnings: the plain summary.
    assert r.stdout.splitlines()[-1] == "upgrade head: all 2 shards ok", r.stdout
    rebalance.init(w.cluster)
    # Past the functions' revision: the guard uses them, so every shard keeps them.
    r = w.cli("migrate", "downgrade", "base")
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        assert w.sql(i, "SELECT to_regprocedure('shardkit.hash(bigint)') IS NOT NULL") == [(True,)]
    lines = r.stdout.splitlines()
    for s in ("s0", "s1"):
        assert any(ln.startswith(f"{s}: warning: ") and "SQL functions are kept" in ln for ln in lines), r.stdout
    assert lines[-1] == "downgrade base: all 2 shards ok (2 warnings above)", r.stdout

    # A shard without warnings: an empty list in --json.
    r = w.cli("migrate", "upgrade", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [s["warnings"] for s in json.loads(r.stdout)["shards"]] == [[], []], r.stdout
    # A downgrade without warnings: the plain summary.
    r = w.cli("migrate", "downgrade", "u1")
    assert r.stdout.splitlines()[-1] == "downgrade u1: all 2 shards ok", r.stdout
    r = w.cli("migrate", "downgrade", "base", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert [len(s["warnings"]) for s in out["shards"]] == [1, 1], out
    assert "SQL functions are kept" in out["shards"][0]["warnings"][0]
