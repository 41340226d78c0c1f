"""A team's weekly Alembic workflows through shardkit's `migrations/` environment: a
migration that renames a sharded table's shard-key column or the table itself (and what
`op.install_shardkit_guard()` and `migrate check` say then), plain `alembic` commands
that loop over the shards (which shard an error is about), and offline mode."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from test_migrate_failures import World, world  # noqa: F401 - world: a fixture (over this module's dev)

from shardkit import rebalance

pytestmark = pytest.mark.integration

GROUPS = {"users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}}}

CREATE = ("op.create_table('users', sa.Column('id', sa.BigInteger, primary_key=True))\n"
          "op.create_table('orders', sa.Column('id', sa.BigInteger, primary_key=True), "
          "sa.Column('user_id', sa.BigInteger, nullable=False))\n"
          "op.install_shardkit_sql()\n"
          "op.install_shardkit_guard()")


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0)


@pytest.fixture(scope="module")
def at_a1(dev, tmp_path_factory) -> str:
    """The name of both shards' databases that `migrate upgrade` brought to a1 (CREATE),
    with a catalog configured but not initialised (the guard then waits for `rebalance
    init`): the tests' worlds start from copies of them (``World(template=...)``)."""
    w = World(dev, tmp_path_factory.mktemp("a1"), shards=2, groups=GROUPS, catalog=True)
    w.rev("a1", None, CREATE, "op.drop_table('orders')\nop.drop_table('users')")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(w.has_table(i, "orders") and not w.has_trigger(i, "orders") for i in range(2))
    w.close()
    return w.db


def alembic(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alembic", "-c", str(w.ini), "-x", f"config={w.cfg}", *args],
                          capture_output=True, text=True, timeout=120)


def guarded_world(world, at_a1: str) -> World:
    """Users and orders (hash group, keyed by users.id and orders.user_id), guarded after
    `rebalance init`, at revision a1 on both shards (copies of ``at_a1``'s)."""
    w = world(shards=2, groups={k: {**v, "tables": dict(v["tables"])} for k, v in GROUPS.items()},
              catalog=True, template=at_a1)
    w.rev("a1", None, CREATE, "op.drop_table('orders')\nop.drop_table('users')")
    rebalance.init(w.cluster)
    assert all(w.has_trigger(i, "orders") for i in range(2))
    return w


def key_owned_by(w: World, shard: int) -> int:
    name = w.servers[shard].name
    return next(k for k in range(1000) if w.cluster.shard_for("orders", k) == name)


def test_guarding_after_the_shard_key_column_was_renamed_names_the_column(world, at_a1):
    """A migration renames orders.user_id and calls op.install_shardkit_guard() while the
    config still names user_id: every shard failed with `KeyError: 'user_id'`, which says
    neither what is wrong (config and schema disagree) nor what to do."""
    w = guarded_world(world, at_a1)
    w.rev("a2", "a1", "op.alter_column('orders', 'user_id', new_column_name='customer_id')\n"
                      "op.install_shardkit_guard()",
          "op.alter_column('orders', 'customer_id', new_column_name='user_id')")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "KeyError" not in r.stderr, r.stderr
    for s in ("s0", "s1"):
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"{s}: FAILED"))
        assert "shard key column orders.user_id" in line and "does not exist" in line, line
        assert "config" in line, line     # what to do: name the column the table has
    # The config says what the table has now: the same migration goes through.
    w.groups["users"]["tables"]["orders"] = "customer_id"
    w.write_config(2)
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stdout + r.stderr
    w.sql(0, "INSERT INTO orders VALUES (1, %s)", (key_owned_by(w, 0),))


def test_check_reports_a_shard_key_column_and_guard_a_rename_broke(world, at_a1):
    """After a migration renamed the shard-key column, every write to the table failed on
    every shard (the guard's function reads NEW.user_id), and `migrate check` said
    "no drift: every shard has the same revision and schema", exit 0."""
    w = guarded_world(world, at_a1)
    w.rev("a2", "a1", "op.alter_column('orders', 'user_id', new_column_name='customer_id')",
          "op.alter_column('orders', 'customer_id', new_column_name='user_id')")
    assert w.cli("migrate", "upgrade").returncode == 0
    with pytest.raises(psycopg.Error, match='has no field "user_id"'):
        w.sql(0, "INSERT INTO orders VALUES (1, %s)", (key_owned_by(w, 0),))
    # The config still names the old column.
    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout
    for s in ("s0", "s1"):
        assert f"DRIFT: {s}: orders has no column user_id, its shard key in the config" in r.stdout, r.stdout
    # The config names the new one; the guard still reads the old one.
    w.groups["users"]["tables"]["orders"] = "customer_id"
    w.write_config(2)
    r = w.cli("migrate", "check", "--json")
    assert r.returncode == 1, r.stdout
    for s in ("s0", "s1"):
        assert f"DRIFT: {s}: the ownership guard of orders is out of date" in w.cli("migrate", "check").stdout
    assert "op.install_shardkit_guard()" in r.stdout
    # What the message says to do.
    w.rev("a3", "a2", "op.install_shardkit_guard()")
    assert w.cli("migrate", "upgrade").returncode == 0
    r = w.cli("migrate", "check")
    assert r.returncode == 0, r.stdout
    w.sql(0, "INSERT INTO orders VALUES (1, %s)", (key_owned_by(w, 0),))


def test_check_reports_the_guard_of_a_renamed_table(world, at_a1):
    """A migration renames a guarded table (the config follows): the trigger moves with the
    table but records the writes of a move under the old name, which the mover does not
    apply; `migrate check` said nothing."""
    w = guarded_world(world, at_a1)
    w.rev("a2", "a1", "op.rename_table('orders', 'purchases')", "op.rename_table('purchases', 'orders')")
    assert w.cli("migrate", "upgrade").returncode == 0
    w.groups["users"]["tables"] = {"users": "id", "purchases": "user_id"}
    w.write_config(2)
    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout
    assert "DRIFT: s0: the ownership guard of purchases is out of date" in r.stdout, r.stdout
    r = w.cli("rebalance", "init")
    assert r.returncode == 0, r.stdout + r.stderr
    assert w.cli("migrate", "check").returncode == 0


def test_plain_alembic_names_the_shard_an_error_is_about(world):
    """`alembic check`, `alembic revision --autogenerate` and `alembic upgrade` run env.py
    over every shard; an error said "FAILED: Target database is not up to date." or
    "Can't locate revision ..." without saying which of the shards."""
    w = world(shards=2)
    w.rev("b1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    w.rev("b2", "b1", "op.add_column('t', sa.Column('v', sa.Integer))", "op.drop_column('t', 'v')")
    assert alembic(w, "upgrade", "b1").returncode == 0   # (each shard, one process)
    assert alembic(w, "-x", "shard=s1", "upgrade", "head").returncode == 0
    for args in (("check",), ("revision", "--autogenerate", "-m", "x")):
        r = alembic(w, *args)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert "Target database is not up to date" in out and "shard s0" in out, out
        assert "shard s1" not in out, out
        assert "Traceback" not in out, out
    # A shard stamped with a revision these scripts do not know.
    assert alembic(w, "-x", "shard=s0", "upgrade", "head").returncode == 0
    w.sql(1, "UPDATE alembic_version SET version_num = 'elsewhere'")
    r = alembic(w, "upgrade", "head")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "elsewhere" in out and "shard s1" in out, out


def test_offline_mode_refusal_says_what_to_do_for_the_command_given(world):
    """`alembic downgrade --sql` (or `stamp --sql`) was told to "run `shardkit migrate
    upgrade` instead", after a traceback."""
    w = world(shards=2)
    w.rev("c1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    for args, verb in ((("upgrade", "head", "--sql"), "upgrade"),
                       (("downgrade", "c1:base", "--sql"), "downgrade"),
                       (("stamp", "head", "--sql"), "stamp")):
        r = alembic(w, *args)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "Traceback" not in out, out
        assert "offline (--sql)" in out, out
        assert f"alembic ... {verb}" in out or f"shardkit migrate {verb}" in out, out
        if verb != "upgrade":
            assert "shardkit migrate upgrade" not in out, out


def test_check_reports_a_sharded_table_a_migration_created_without_its_guard(world, at_a1):
    """A migration adds a sharded table (configured in a group) to a rebalanced cluster
    but forgets `op.install_shardkit_guard()`: its writes are not checked against the
    shard's buckets (a process with a stale map writes rows to the wrong shard) nor
    captured by a move, and `migrate check` said "no drift"."""
    w = world(shards=2, groups={"users": {"strategy": "hash", "tables": {
        "users": "id", "orders": "user_id", "invoices": "user_id"}}}, catalog=True, template=at_a1)
    w.rev("a1", None, CREATE, "op.drop_table('orders')\nop.drop_table('users')")
    rebalance.init(w.cluster)
    w.rev("a2", "a1", "op.create_table('invoices', sa.Column('id', sa.BigInteger, primary_key=True), "
                      "sa.Column('user_id', sa.BigInteger, nullable=False))", "op.drop_table('invoices')")
    assert w.cli("migrate", "upgrade").returncode == 0
    not_mine = next(k for k in range(1000) if w.cluster.shard_for("invoices", k) != "s0")
    w.sql(0, "INSERT INTO invoices VALUES (1, %s)", (not_mine,))   # unguarded: accepted
    w.sql(0, "DELETE FROM invoices")
    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout
    for s in ("s0", "s1"):
        assert f"DRIFT: {s}: invoices has no ownership guard" in r.stdout, r.stdout
    assert "op.install_shardkit_guard()" in r.stdout
    w.rev("a3", "a2", "op.install_shardkit_guard()")
    assert w.cli("migrate", "upgrade").returncode == 0
    assert w.cli("migrate", "check").returncode == 0
    with pytest.raises(psycopg.Error, match="not owned by this shard"):
        w.sql(0, "INSERT INTO invoices VALUES (1, %s)", (not_mine,))


def test_env_py_cannot_take_over_what_shardkit_sets_per_shard(world):
    w = world(shards=1)
    env = w.ini.parent / "env.py"
    env.write_text(env.read_text().replace("run_migrations(context)",
                                           "run_migrations(context, connection=None)"))
    r = alembic(w, "current")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "connection is set by shardkit for each shard" in out and "leave it out" in out, out
