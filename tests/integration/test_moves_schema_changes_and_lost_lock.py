"""Online moves from an operator's seat: a migration that changes a moving table's columns
while the move runs (on every shard, or on one of them only), and a mover that lost its
catalog session (a catalog restart) while another mover, or an abort, takes the move over.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas).  Each test makes fresh
databases of its own on both servers plus a catalog database.  Moves run in-process with
``grace=0``; what happens "during the move" runs from the mover's progress callback, at
the line the test names.  Rows are compared exactly, every column, as text.  The
databases and their world are test_move_fidelity's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from movers import wait_for_mover_lock_release
from test_move_fidelity import World, hash_group, make_world

from shardkit import rebalance
from shardkit._rebalance_plan import plan_add_shards, plan_drain
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


def drain_s0_at(w: World, at: str, during: Callable[[], None]) -> int:
    """Drain s0 onto s1; ``during`` runs once, at the first progress line containing ``at``."""
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    assert plan.moves
    ran: list[bool] = []

    def progress(line: str) -> None:
        if at in line and not ran:
            ran.append(True)
            during()

    move_id = rebalance.Mover(w.cluster, grace=0, progress=progress).apply(plan)
    assert ran, f"the mover never printed {at!r}"
    return move_id


def lose_the_mover_lock(w: World, move_id: int) -> None:
    """End the catalog session holding the mover's lock (as a catalog restart does), and
    wait until the lock is gone: pg_terminate_backend() only signals the backend."""
    with w.cluster.catalog.engine.connect() as c:
        c.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            f"AND classid = {rebalance.MOVER_LOCK_CLASS} AND objid = {move_id}")
    wait_for_mover_lock_release(w.cluster, move_id, timeout=10)


@pytest.fixture
def world(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, tables: dict[str, str]) -> World:
        w = make_world(dev, tmp_path, schema, hash_group(tables))
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


# -- a migration adds a column while a move runs --------------------------------------------------


@pytest.mark.parametrize("at", [
    "capturing changes",   # after capture began, before the copy
    ": copied ",           # after the copy, before catch-up and the switch
])
def test_a_column_added_during_the_move_keeps_the_values_written_to_it(world, at):
    """`shardkit migrate` adds a column on every shard while a move runs, and the new code
    writes it on rows of the moving buckets (on their owner, the source).  Those writes were
    acknowledged: the target must end up with them, not with the column's default."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(40) if w.owner("accounts", i) == "s0"]
    assert moving

    def migrate_and_write() -> None:
        for shard in ("s0", "s1"):
            w.sql(shard, "ALTER TABLE accounts ADD COLUMN color text")
        w.sql("s0", "UPDATE accounts SET color = 'red' || id WHERE tenant = ANY(%s)", (moving,))

    drain_s0_at(w, at, migrate_and_write)
    expected = sorted(f"({i},{i},n{i}," + (f"red{i})" if i in moving else ")") for i in range(40))
    assert not w.rows("s0", "accounts")
    got = w.rows("s1", "accounts")
    lost = [r for r in expected if r not in got]
    assert got == expected, f"{len(lost)} acknowledged writes of the new column lost, e.g. {lost[:3]}"
    assert verify(w.cluster).ok


def test_verification_compares_a_column_added_after_the_copy(world):
    """The migration gives the new column another default on each shard (run twice, with a
    changed default): the moved rows then differ between source and target in that column.
    The move's verification compares "every row"; it must not pass them as equal (by the
    columns the table had when the batch began) and delete the source's copies."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(40) if w.owner("accounts", i) == "s0"]

    def migrate() -> None:
        w.sql("s0", "ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'gold'")
        w.sql("s1", "ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free'")

    with pytest.raises(RebalanceError, match="verification failed for table accounts"):
        drain_s0_at(w, ": copied ", migrate)
    # The source's rows (the truth before the switch) are kept.
    left = w.sql("s0", "SELECT tenant, plan FROM accounts ORDER BY tenant")
    assert left == [(i, "gold") for i in moving]


def test_a_column_the_target_lacks_stops_the_move_clearly_and_resume_carries_its_values(world):
    """The migration has reached the source only (the operator migrates shard by shard) and
    the new code already writes the new column there during the move.  The move must not
    switch without those values: it stops, saying which column the target lacks, and once
    the target is migrated `resume` carries them."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(40) if w.owner("accounts", i) == "s0"]

    def migrate_source_and_write() -> None:
        w.sql("s0", "ALTER TABLE accounts ADD COLUMN color text")
        w.sql("s0", "UPDATE accounts SET color = 'red' || id WHERE tenant = ANY(%s)", (moving,))

    with pytest.raises(RebalanceError) as err:
        drain_s0_at(w, ": copied ", migrate_source_and_write)
    message = str(err.value)
    assert "color" in message and "not on the target" in message and "resume" in message, message
    (move_id,) = [m["move"] for m in rebalance.move_status(w.cluster) if m["state"] == "running"]
    w.cluster.refresh_map()
    assert set(w.cluster.config.bucket_map) == {"s0", "s1"}, "the batch switched without the new column"
    w.sql("s1", "ALTER TABLE accounts ADD COLUMN color text")
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    expected = sorted(f"({i},{i},n{i}," + (f"red{i})" if i in moving else ")") for i in range(40))
    assert not w.rows("s0", "accounts")
    assert w.rows("s1", "accounts") == expected
    assert verify(w.cluster).ok


# -- a mover that lost its catalog session -------------------------------------------------------


def test_a_mover_that_lost_its_lock_does_not_copy_over_a_batch_another_mover_switched(world):
    """The catalog restarts (or fails over) during a move: the mover's advisory lock goes
    with its session, while the mover itself goes on.  The operator (or a job that resumes
    moves nobody holds) runs `resume`, which finishes the batch: it switches to the target
    and writes go there.  The first mover, about to copy the same batch, must not delete the
    target's rows as "leftovers of an interrupted copy": they are now the only copy."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(40) if w.owner("accounts", i) == "s0"]
    w.cluster.refresh_map()
    first = rebalance.Mover(w.cluster, grace=0)
    move_id = first.start(plan_drain(w.cluster.config.bucket_map, "s0"))
    copy = first._copy
    after_switch: list[int] = []

    def lose_the_lock_then_copy(*args: Any, **kw: Any) -> int:
        lose_the_mover_lock(w, move_id)
        rebalance.Mover(w.cluster, grace=0).run(move_id)
        # The application writes to a moved row on its new owner.
        w.sql("s1", "UPDATE accounts SET name = 'afterswitch' WHERE tenant = %s", (moving[0],))
        after_switch.append(moving[0])
        return copy(*args, **kw)

    first._copy = lose_the_lock_then_copy  # type: ignore[method-assign]
    with pytest.raises(RebalanceError):
        first.run(move_id)
    assert after_switch
    expected = sorted(f"({i},{i}," + ("afterswitch" if i == moving[0] else f"n{i}") + ")"
                      for i in range(40))
    assert not w.rows("s0", "accounts")
    got = w.rows("s1", "accounts")
    missing = [r for r in expected if r not in got]
    assert got == expected, f"{len(missing)} rows lost from the target, e.g. {missing[:3]}"
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "done"
    assert verify(w.cluster).ok


def test_a_mover_that_lost_its_lock_does_not_capture_a_batch_after_an_abort(world):
    """Same outage, then the operator aborts the move (the mover's lock is free, so abort
    runs).  The first mover, about to begin its batch, must not start capturing it again:
    the source would log every write of those buckets for a move that no longer exists, and
    the next move of them would keep that dead move's gate (its cut-over would not pause
    their writers)."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    moving = [i for i in range(40) if w.owner("accounts", i) == "s0"]
    before = {s: w.rows(s, "accounts") for s in ("s0", "s1")}
    w.cluster.refresh_map()
    first = rebalance.Mover(w.cluster, grace=0)
    move_id = first.start(plan_drain(w.cluster.config.bucket_map, "s0"))
    check = first._check_triggers

    def lose_the_lock_then_go_on(*args: Any, **kw: Any) -> None:
        lose_the_mover_lock(w, move_id)
        rebalance.abort(w.cluster, move_id)
        check(*args, **kw)

    first._check_triggers = lose_the_lock_then_go_on  # type: ignore[method-assign]
    with pytest.raises(RebalanceError):
        first.run(move_id)
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "aborted"
    w.sql("s0", "UPDATE accounts SET name = 'later' WHERE tenant = %s", (moving[0],))
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT bucket, move_id FROM shardkit.moving_buckets") == [], \
            f"{shard} captures the buckets of aborted move {move_id}"
        assert w.sql(shard, "SELECT count(*) FROM shardkit.changes") == [(0,)]
    assert {s: w.rows(s, "accounts") for s in ("s0", "s1")} == {
        "s0": sorted(r if not r.startswith(f"({moving[0]},") else f"({moving[0]},{moving[0]},later)"
                     for r in before["s0"]), "s1": before["s1"]}
    assert verify(w.cluster).ok


def test_an_abort_during_the_copy_of_a_mover_that_lost_its_lock_leaves_no_copies(world):
    """Same outage, and the operator aborts while the first mover is still copying (its
    lock is free, so abort runs).  The abort deletes the target's copies; the copy still in
    flight must not commit its rows afterwards: they would stay on a shard that does not own
    them, where key-less reads (no move in flight any more) count them twice."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    before = {s: w.rows(s, "accounts") for s in ("s0", "s1")}
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    first = rebalance.Mover(w.cluster, grace=0)
    move_id = first.start(plan_drain(w.cluster.config.bucket_map, "s0"))
    rest = first._rest
    aborted: list[Any] = []   # abort()'s result, or its exception
    threads: list[threading.Thread] = []

    def run_abort() -> None:
        try:
            aborted.append(rebalance.abort(w.cluster, move_id))
        except BaseException as e:  # noqa: BLE001 - checked below
            aborted.append(e)

    def abort_while_copying(*args: Any, **kw: Any) -> None:
        if not threads:  # after the first slice of pages: rows copied, not committed
            lose_the_mover_lock(w, move_id)
            threads.append(threading.Thread(target=run_abort))
            threads[0].start()
            threads[0].join(3)  # it may wait for this copy to commit
        rest(*args, **kw)

    first._rest = abort_while_copying  # type: ignore[method-assign]
    with pytest.raises(RebalanceError):
        first.run(move_id)
    threads[0].join(30)
    assert len(aborted) == 1 and isinstance(aborted[0], dict), aborted
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "aborted"
    w.cluster.refresh_map()
    assert tuple(w.cluster.config.bucket_map) == map_before
    assert {s: w.rows(s, "accounts") for s in ("s0", "s1")} == before, "copies left on the target"
    assert verify(w.cluster).ok


def test_a_mover_that_lost_its_lock_does_not_clean_up_buckets_moved_back_since(world):
    """The mover loses its catalog session after verifying its batch; another mover resumes
    and finishes the move (clean-up included), and a later move brings the buckets back to
    the first source.  The first mover, going on to its clean-up, must not delete those
    rows there: they are live again."""
    w = world("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text)",
              {"accounts": "tenant"})
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
    w.cluster.refresh_map()
    first = rebalance.Mover(w.cluster, grace=0)
    move_id = first.start(plan_drain(w.cluster.config.bucket_map, "s0"))
    clean_up = first._clean_up
    moved_back: list[int] = []

    def lose_the_lock_then_clean_up(*args: Any, **kw: Any) -> int:
        if not moved_back:
            lose_the_mover_lock(w, move_id)
            rebalance.Mover(w.cluster, grace=0).run(move_id)
            w.cluster.refresh_map()
            back = plan_add_shards(w.cluster.config.bucket_map, ["s0"])
            assert back.moves
            moved_back.append(rebalance.Mover(w.cluster, grace=0).apply(back))
        return clean_up(*args, **kw)

    first._clean_up = lose_the_lock_then_clean_up  # type: ignore[method-assign]
    with pytest.raises(RebalanceError):
        first.run(move_id)
    assert moved_back
    expected = sorted(f"({i},{i},n{i})" for i in range(40))
    got = sorted(w.rows("s0", "accounts") + w.rows("s1", "accounts"))
    missing = [r for r in expected if r not in got]
    assert got == expected, f"{len(missing)} rows lost, e.g. {missing[:3]}"
    assert verify(w.cluster).ok
