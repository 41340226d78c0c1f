"""Operations that overlap in time on a live cluster with a catalog:
a migration run while a table's buckets move, plan/apply/verify/status while a move is
active or interrupted, the catalog or a primary restarted mid-move, `migrate check` during
a move.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas), stopped at the end of the
module; each test makes fresh databases of its own on both servers plus a catalog database
(the worlds of test_move_fidelity).  Moves run in-process with grace 0; what
happens "during the move" runs from the mover's progress callback at the line named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_move_fidelity import World, hash_group, make_world

from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain
from shardkit.errors import RebalanceError, ShardUnavailable
from shardkit.verify import verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def world(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, tables: dict[str, str], **kw: Any) -> World:
        w = make_world(dev, tmp_path, schema, hash_group(tables), **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def drain_s0_at(w: World, at: str, during: Callable[[], None], **mover_kw: Any) -> int:
    """Drain s0 onto s1; ``during`` runs once, at the first progress line containing ``at``."""
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    assert plan.moves
    ran: list[bool] = []

    def progress(line: str) -> None:
        if at in line and not ran:
            ran.append(True)
            during()

    move_id = rebalance.Mover(w.cluster, grace=0, progress=progress, **mover_kw).apply(plan)
    assert ran, f"the mover never printed {at!r}"
    return move_id


# -- a migration while the buckets move ------------------------------------------------------


def test_a_not_null_generated_column_does_not_stop_catch_up(world):
    """Catch-up stages the changed rows in a temporary table.  Made (LIKE the table), it
    kept the NOT NULL of a generated column that the stage is given no value for: the
    first row changed during the move failed the COPY into the stage (NotNullViolation on
    _shardkit_stage_0), and so did every resume, for any table with such a column."""
    w = world("CREATE TABLE items (id bigint PRIMARY KEY, tenant bigint NOT NULL, qty int NOT NULL, "
              "total int GENERATED ALWAYS AS (qty * 2) STORED NOT NULL)", {"items": "tenant"})
    for i in range(20):
        w.on_owner("items", i, "INSERT INTO items (id, tenant, qty) VALUES (%s, %s, %s)", (i, i, i))
    moving = [i for i in range(20) if w.owner("items", i) == "s0"]

    def write() -> None:
        w.sql("s0", "UPDATE items SET qty = qty + 100 WHERE tenant = ANY(%s)", (moving,))

    drain_s0_at(w, ": copied ", write)
    assert not w.rows("s0", "items")
    assert w.rows("s1", "items") == sorted(
        f"({i},{i},{i + 100 if i in moving else i},{2 * (i + 100 if i in moving else i)})" for i in range(20))
    assert verify(w.cluster).ok


def test_a_not_null_column_the_migration_added_on_the_target_first(world):
    """`shardkit migrate` reaches the target before the source (shard by shard, or the
    source's run failed), adding a NOT NULL column with a default, while the source's rows
    change.  The copy fills the column with its default; catch-up failed on its stage table
    (NotNullViolation) until the source was migrated too.  Now the move finishes."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(20) if w.owner("accounts", i) == "s0"]

    def migrate_target_then_write() -> None:
        w.sql("s1", "ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free'")
        w.sql("s0", "UPDATE accounts SET name = 'late' || id WHERE tenant = ANY(%s)", (moving,))

    drain_s0_at(w, ": copied ", migrate_target_then_write)
    w.sql("s0", "ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free'")
    assert not w.rows("s0", "accounts")
    assert w.rows("s1", "accounts") == sorted(
        f"({i},{i},{'late' if i in moving else 'n'}{i},free)" for i in range(20))
    assert verify(w.cluster).ok


class Stop(Exception):
    """Stops the mover (as a kill would) right after the batch was recorded "copied"."""


def stop_after_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    real = rebalance.Mover._catch_up
    calls: list[int] = []

    def catch_up(self: Any, *a: Any, **k: Any) -> tuple[int, int, str]:
        if not calls:
            calls.append(1)
            raise Stop()
        return real(self, *a, **k)
    monkeypatch.setattr(rebalance.Mover, "_catch_up", catch_up)


def reguard(w: World) -> None:
    """What a migration's op.install_shardkit_guard() does on every shard."""
    from shardkit._guard import install_guard
    for s in ("s0", "s1"):
        with w.cluster.primary(s).begin() as c:
            install_guard(c, w.cluster.config, None)


def test_a_primary_key_widened_while_the_move_is_stopped_keeps_the_writes_logged_before(world, monkeypatch):
    """The mover stops after the copy (killed, Ctrl-C); meanwhile a deploy's migration adds
    the shard key to the primary key, (id) -> (tenant, id), and re-guards the table.  Writes
    logged before it carry {"id": ...}, later ones {"id", "tenant"}.  Before: the resumed
    mover read every logged key by the new primary key, found none of the earlier ones
    (tenant NULL), switched without those writes (the target served the old rows), then
    failed verification on every resume, and abort refused a switched batch."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, n int NOT NULL DEFAULT 0)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts (id, tenant) VALUES (%s, %s)", (i, i))
    moving = [i for i in range(20) if w.owner("accounts", i) == "s0"]

    def write_then_migrate() -> None:
        w.sql("s0", "UPDATE accounts SET n = 1 WHERE tenant = ANY(%s)", (moving,))
        for s in ("s0", "s1"):
            w.sql(s, "ALTER TABLE accounts DROP CONSTRAINT accounts_pkey, ADD PRIMARY KEY (tenant, id)")
        reguard(w)
        w.sql("s0", "UPDATE accounts SET n = n + 10 WHERE tenant = ANY(%s) AND tenant %% 2 = 0", (moving,))

    stop_after_copied(monkeypatch)
    with pytest.raises(RebalanceError, match="Stop"):
        drain_s0_at(w, ": copied ", write_then_migrate)
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert not w.rows("s0", "accounts")
    assert w.sql("s1", "SELECT tenant, n FROM accounts ORDER BY tenant") == [
        (i, (11 if i % 2 == 0 else 1) if i in moving else 0) for i in range(20)]
    assert verify(w.cluster).ok


@pytest.mark.parametrize("stopped", [True, False], ids=["stopped", "running"])
def test_a_primary_key_column_renamed_during_the_move_is_refused_before_the_switch(world, monkeypatch, stopped):
    """A migration renames the primary-key column (and re-guards) while the move runs, or
    while it is stopped after the copy.  The writes logged before name a column the table
    no longer has.  Before: a KeyError, or (resumed) a switch without those writes, then
    verification failing forever.  Now: refused before the switch, naming the column, and
    abort gives the buckets back with every write."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, n int NOT NULL DEFAULT 0)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts (id, tenant) VALUES (%s, %s)", (i, i))
    moving = [i for i in range(20) if w.owner("accounts", i) == "s0"]
    w.cluster.refresh_map()
    before = tuple(w.cluster.config.bucket_map)

    def write_then_migrate() -> None:
        w.sql("s0", "UPDATE accounts SET n = 1 WHERE tenant = ANY(%s)", (moving,))
        for s in ("s0", "s1"):
            w.sql(s, "ALTER TABLE accounts RENAME COLUMN id TO account_id")
        reguard(w)

    if stopped:
        stop_after_copied(monkeypatch)
        with pytest.raises(RebalanceError, match="Stop"):
            drain_s0_at(w, ": copied ", write_then_migrate)
        monkeypatch.undo()
        (move_id,) = w.running_moves()
        with pytest.raises(RebalanceError) as err:
            rebalance.Mover(w.cluster, grace=0).run(move_id)
    else:
        with pytest.raises(RebalanceError) as err:
            drain_s0_at(w, ": copied ", write_then_migrate)
        (move_id,) = w.running_moves()
    message = str(err.value)
    assert "column(s) id" in message and "no longer has" in message and "abort" in message, message
    w.cluster.refresh_map()
    assert tuple(w.cluster.config.bucket_map) == before, "the batch switched without the writes"
    rebalance.abort(w.cluster, move_id)
    assert w.sql("s0", "SELECT tenant, n FROM accounts ORDER BY tenant") == [(i, 1) for i in moving]
    assert verify(w.cluster).ok


def test_a_key_with_a_percent_sign_written_during_the_move(world):
    """Text keys may hold '%' ("50%off").  Catch-up deleted the changed rows on the target
    with the keys written into the statement as a literal and the buckets passed as a
    parameter: psycopg read the '%o' in the literal as a placeholder and the move stopped
    (ProgrammingError) on every resume; a '%s' in a key took the buckets' place."""
    w = world("CREATE TABLE codes (code text PRIMARY KEY, label text)", {"codes": "code"})
    keys = [f"{i}%off" for i in range(20)] + [f"%s{i}" for i in range(5)]
    for k in keys:
        w.on_owner("codes", k, "INSERT INTO codes VALUES (%s, 'x')", (k,))
    moving = [k for k in keys if w.owner("codes", k) == "s0"]
    assert any("%o" in k for k in moving) and any("%s" in k for k in moving)

    def write() -> None:
        w.sql("s0", "UPDATE codes SET label = 'late' WHERE code = ANY(%s)", (moving,))

    drain_s0_at(w, ": copied ", write)
    assert not w.rows("s0", "codes")
    assert w.sql("s1", "SELECT code, label FROM codes ORDER BY code") == sorted(
        (k, "late" if k in moving else "x") for k in keys)
    assert verify(w.cluster).ok


# -- readers, the catalog and primaries while a move runs ------------------------------------


@pytest.mark.parametrize("at", ["capturing changes", ": copied ", "switched to map version", "verified ", "deleted "])
def test_verify_status_and_migrate_check_at_each_step_of_a_move(world, at):
    """`verify`, `rebalance status`, `migrate check` and `status`, each from another
    process's view (a cluster of its own), at each step: no false alarm, no crash."""
    from pathlib import Path

    import shardkit
    from shardkit import _status, migrate

    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    seen: dict[str, Any] = {}

    def look() -> None:
        other = shardkit.Cluster.from_config(w.cfg_path, follow_map=False)
        try:
            seen["verify"] = verify(other)
            seen["status"] = rebalance.move_status(other)
            seen["check"] = migrate.check(other, alembic_ini=Path(__file__).parents[2] / "migrations" / "alembic.ini")
            seen["collect"] = _status.collect(other, str(w.cfg_path))
        finally:
            other.dispose()

    drain_s0_at(w, at, look)
    assert seen["verify"].ok, seen["verify"].render()
    assert seen["check"].ok, seen["check"].as_dict()
    assert seen["collect"]["ready"]
    (move,) = seen["status"]
    assert move["state"] == "running" and move["mover"]


def catalog_down(w: World) -> None:
    """The catalog refuses connections and drops those it has (a restart, as its clients see it)."""
    db = w.db + "_catalog"
    with w.dev.shards[0].primary.connect(dbname="postgres", autocommit=True) as c:
        c.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))


def catalog_up(w: World) -> None:
    with w.dev.shards[0].primary.connect(dbname="postgres", autocommit=True) as c:
        c.execute(f"ALTER DATABASE {w.db}_catalog ALLOW_CONNECTIONS true")


@pytest.mark.parametrize("at", ["capturing changes", ": copied ", "switched to map version", "verified "])
def test_the_catalog_lost_mid_move_stops_the_mover_clearly_and_resume_finishes(world, at):
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(20) if w.owner("accounts", i) == "s0"]
    switched = at in ("switched to map version", "verified ")

    def lose() -> None:
        w.sql("s1" if switched else "s0", "UPDATE accounts SET name = 'a' || id WHERE tenant = ANY(%s)", (moving,))
        catalog_down(w)

    try:
        with pytest.raises(ShardUnavailable, match="catalog"):
            drain_s0_at(w, at, lose)
        # Routers keep their map meanwhile: the owner's rows are still written.
    finally:
        catalog_up(w)
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert not w.rows("s0", "accounts")
    assert w.rows("s1", "accounts") == sorted(f"({i},{i},{'a' if i in moving else 'n'}{i})" for i in range(20))
    assert verify(w.cluster).ok


@pytest.mark.parametrize("shard", ["s0", "s1"])
def test_a_primary_restarted_between_copy_and_cut_over(world, dev, shard):
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(20):
        w.on_owner("accounts", i, "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(20) if w.owner("accounts", i) == "s0"]

    def restart() -> None:
        w.sql("s0", "UPDATE accounts SET name = 'a' || id WHERE tenant = ANY(%s)", (moving,))
        node = dev.shard(shard).primary
        node.stop("immediate")
        node.start()

    with pytest.raises(RebalanceError, match="resume"):
        drain_s0_at(w, ": copied ", restart)
    w.cluster.dispose()  # (the pools' connections died with the server; pre_ping is off)
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert not w.rows("s0", "accounts")
    assert w.rows("s1", "accounts") == sorted(f"({i},{i},{'a' if i in moving else 'n'}{i})" for i in range(20))
    assert verify(w.cluster).ok
