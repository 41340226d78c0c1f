"""Reads during and after an online move, with streaming replicas.

Uses the module-scoped 2-shard x 1-replica world of test_reads_during_moves (its own
instance here).  Each test moves a few buckets with a PausingMover and reads from an
application Cluster that follows the catalog.
"""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

import shardkit
import test_reads_during_moves
from test_reads_during_moves import BUCKETS, Moving, PausingMover, Purchase, _move_plan, truth

world = test_reads_during_moves.world

pytestmark = pytest.mark.integration


def _moving_purchase(w, buckets):
    t = truth(w)
    return next(p for p, v in sorted(t["purchases"].items()) if shardkit.bucket_for(v[0], BUCKETS) in buckets)


# -- (d) an expired object whose primary key does not hold the shard key ----------------------


WAYS = {
    "get()": lambda s, p, pid: s.get(Purchase, pid),
    "attribute access": lambda s, p, pid: (p.amount, p)[1],
    "refresh()": lambda s, p, pid: (s.refresh(p), p)[1],
}
STEPS = ("switched", "verified", "cleaned")


@pytest.mark.parametrize("consistency", ["strong", "eventual", "strict", "scope-key"])
def test_expired_child_loaded_before_the_move(world, consistency):
    """A Purchase (primary key ``id``, shard key ``member_id``) loaded from the source before
    its bucket moved, then expired (a commit): get(), attribute access and refresh() load it
    again from the shard it was loaded from (its identity token).  After the switch that
    shard's copy is out of date (the new owner took a write).  The read must not answer the
    stale value: NotOwned (as for an object whose primary key holds the shard key, README
    "Reads during a move"), or the owner's row."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 2)
    pid = _moving_purchase(w, buckets)
    mid = truth(w)["purchases"][pid][0]
    # A strict session (no reads across shards), and a scope(key=...) naming another key
    # of the old owner: the refresh is the object's own, whatever they say of other reads.
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=w.app, consistency="eventual",
                           strict=True) if consistency == "strict" else w.sessions(
        "eventual" if consistency == "scope-key" else consistency)
    other_key = next(k for k in range(1, 10**4) if w.app.shard_for("members", k) == "s0"
                     and shardkit.bucket_for(k, BUCKETS) not in buckets)
    in_scope = (lambda: shardkit.scope(key=other_key)) if consistency == "scope-key" else contextlib.nullcontext
    kept = {}
    for step in STEPS:
        for way in WAYS:
            s = Session()
            p = s.scalars(select(Purchase).where(Purchase.member_id == mid, Purchase.id == pid)).one()
            s.commit()                      # expires p; it keeps identity token s0
            kept[step, way] = (s, p)
    mover = PausingMover(w.admin, set(STEPS))
    problems: list[str] = []
    run = Moving(mover, plan)
    try:
        while (step := run.next_step()) is not None:
            assert not w.sync_app()
            if step == "switched":
                with w.sessions("strong")() as s:
                    s.execute(update(Purchase).where(Purchase.member_id == mid, Purchase.id == pid)
                              .values(amount=Purchase.amount + 1000))
                    s.commit()
            w.replicas_caught_up()
            want = truth(w)["purchases"][pid]
            for way, fn in WAYS.items():
                s, p = kept[step, way]
                try:
                    with in_scope():
                        got = fn(s, p, pid)
                    seen = None if got is None else (got.member_id, got.amount)
                    if seen != want:
                        problems.append(f"after {step}: {way} -> {seen}, the owner has {want}")
                except shardkit.NotOwned as e:
                    if e.shard != "s0" or "no longer owns it" not in str(e):
                        problems.append(f"after {step}: {way}: unclear refusal: {e}")
                    s.rollback()
                    s.expunge(p)               # as the refusal says: loaded again, from its owner
                    got = s.scalars(select(Purchase).where(Purchase.member_id == mid, Purchase.id == pid)).first()
                    if got is None or (got.member_id, got.amount) != want:
                        problems.append(f"after {step}: {way}: loaded again -> {got}, the owner has {want}")
                except Exception as e:  # noqa: BLE001
                    problems.append(f"after {step}: {way}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                s.close()
            run.resume()
    finally:
        run.finish()
        for s, _ in kept.values():
            s.close()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


# -- (a), (b) another process's reads right after the switch, the target's replica behind ----


def test_fresh_cluster_reads_moved_keys_with_lagging_target_replica(world):
    """A Cluster made after the switch (another process), its target replica 3 s behind:
    a moved key reads as it is on its owner under every consistency, with a token taken
    from a write on the old owner before the move; a read forced to replicas is refused
    with a reason that names the move, not this session's writes (it wrote nothing)."""
    from test_reads_during_moves import Member, keys_in

    w = world
    plan, buckets = _move_plan(w, "s1", "s0", 2)
    k = keys_in(buckets)[0]
    with w.sessions("read_your_writes")() as s:
        s.get(Member, k).score = 777
        s.commit()
        token = s.consistency_token()
    assert "s1=" in token and "s0=" not in token
    target_replica = w.shard("s0").replicas[0]
    mover = PausingMover(w.admin, {"switched"})
    problems: list[str] = []
    target_replica.set_apply_delay(3.0)
    other = None
    run = Moving(mover, plan)
    try:
        assert run.next_step() == "switched"
        other = shardkit.Cluster.from_config(w.cfg)
        assert other.shard_for("members", k) == "s0"
        other.start_monitor()
        for consistency in ("eventual", "read_your_writes", "strong"):
            Session = sessionmaker(class_=shardkit.ShardedSession, cluster=other, consistency=consistency)
            with Session(consistency_token=token) as s:
                m = s.get(Member, k)
                if m is None or m.score != 777:
                    problems.append(f"{consistency}: get(Member, {k}) -> {None if m is None else m.score}")
                n = s.scalar(select(func.count()).select_from(Member).where(Member.id.in_(keys_in(buckets))))
                if n != len(keys_in(buckets)):
                    problems.append(f"{consistency}: count of moved keys {n}, expected {len(keys_in(buckets))}")
        # The reads above ran while the target's replica had not replayed the move.
        assert k not in w.replica_ids("s0", [k]), "the target's replica did not lag"
        with sessionmaker(class_=shardkit.ShardedSession, cluster=other, consistency="eventual")() as s:
            try:
                s.execute(select(Member).where(Member.id == k), execution_options={"shardkit_role": "replica"}).all()
                problems.append("a read forced to the lagging replica was answered")
            except shardkit.ShardUnavailable as e:
                if "this session's writes" in str(e) or "move" not in str(e):
                    problems.append(f"forced replica read refused for an unclear reason: {e}")
        run.resume()
    finally:
        run.finish()
        if other is not None:
            other.dispose()
        target_replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert not run.errors, run.errors
    assert not problems, "\n".join(problems)


def _floor_past_s1s_primary(w):
    """Move a bucket to s1, then make the catalog's record of that move's WAL position on
    s1 one past its primary's (the position of a server s1 had before it was replaced):
    the batch's (move_id, batch, its real position), to put it back."""
    from sqlalchemy import text

    plan, _ = _move_plan(w, "s0", "s1", 1)
    run = Moving(PausingMover(w.admin, set()), plan)
    run.finish()
    assert not run.errors, run.errors
    w.replicas_caught_up()
    with w.admin.catalog.engine.begin() as c:
        row = c.execute(text("SELECT move_id, batch, target_lsn::text FROM shardkit_catalog.move_batches "
                             "WHERE target = 's1' AND target_lsn IS NOT NULL ORDER BY move_id DESC LIMIT 1")).one()
        c.execute(text("UPDATE shardkit_catalog.move_batches SET target_lsn = 'FFFF/0' "
                       "WHERE move_id = :m AND batch = :b"), {"m": row[0], "b": row[1]})
    return row


# -- a floor that is not the shard's server's position ---------------------------------------


def test_move_floor_past_the_primary_does_not_retire_the_replicas(world):
    """The catalog keeps, per shard, the WAL position after the latest move to it; its
    replicas serve once they have replayed it.  A shard whose server was replaced since (a
    dump/restore or logical-replication upgrade to a new server: positions start over, far
    below) never reaches it: every read of the shard then probed its replica and went to the
    primary, until the next move to it.  As with a consistency token past the primary (README),
    the floor is the primary's own only if the primary has reached it."""
    from sqlalchemy import event, text

    from test_reads_during_moves import Member

    w = world
    row = _floor_past_s1s_primary(w)
    hits = {"replica": 0}

    def count(conn, cursor, statement, *a):
        if "FROM members" in statement:           # (not the probes of its replay position)
            hits["replica"] += 1

    replica = w.app.engine("s1", "replica", 0)
    event.listen(replica, "before_cursor_execute", count)
    try:
        w.app.refresh_map()
        assert w.app.moved_lsn["s1"] == 0xFFFF << 32
        k = next(k for k in sorted(truth(w)["members"]) if w.app.shard_for("members", k) == "s1")
        for _ in range(5):
            with w.sessions("eventual")() as s:
                assert s.get(Member, k) is not None
        assert hits["replica"] >= 4, f"{hits['replica']} of 5 eventual reads of s1 used its replica"
    finally:
        event.remove(replica, "before_cursor_execute", count)
        with w.admin.catalog.engine.begin() as c:
            c.execute(text("UPDATE shardkit_catalog.move_batches SET target_lsn = CAST(:l AS pg_lsn) "
                           "WHERE move_id = :m AND batch = :b"), {"l": row[2], "m": row[0], "b": row[1]})
        w.app.refresh_map()


# -- the lookup of an expired child's owner ------------------------------------------------


def test_expired_child_deleted_on_its_new_owner_before_the_cleanup(world):
    """A Purchase loaded from s0, expired, whose bucket then moved to s1, where the row was
    deleted (the clean-up has not run: s0 still has its leftover copy).  The lookup by
    primary key finds no row on any shard; the refresh must then say the row is gone
    (ObjectDeletedError; get() None), not answer s0's leftover copy."""
    from sqlalchemy import delete
    from sqlalchemy.orm.exc import ObjectDeletedError

    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 2)
    pid = _moving_purchase(w, buckets)
    mid = truth(w)["purchases"][pid][0]
    kept = []
    for _ in range(2):
        s = w.sessions("strong")()
        p = s.scalars(select(Purchase).where(Purchase.member_id == mid, Purchase.id == pid)).one()
        s.commit()
        kept.append((s, p))
    run = Moving(PausingMover(w.admin, {"switched"}), plan)
    try:
        assert run.next_step() == "switched"
        assert not w.sync_app()
        with w.sessions("strong")() as s:
            s.execute(delete(Purchase).where(Purchase.member_id == mid, Purchase.id == pid))
            s.commit()
        (s1, p1), (s2, p2) = kept
        with pytest.raises(ObjectDeletedError):
            p1.amount
        assert s2.get(Purchase, pid) is None
        run.resume()
    finally:
        run.finish()
        for s, _ in kept:
            s.close()
    assert not run.errors, run.errors


def test_expired_child_after_an_unrelated_move_asks_the_shards_once(world):
    """After a move of other buckets, a long-lived session's expired Purchase (its bucket
    did not move) refreshes from its shard; asking every shard where its row lives is done
    once for the object, not again at each refresh after each commit."""
    from sqlalchemy import event

    w = world
    plan, buckets = _move_plan(w, "s1", "s0", 1)
    t = truth(w)
    pid = next(p for p, v in sorted(t["purchases"].items())
               if shardkit.bucket_for(v[0], BUCKETS) not in buckets)
    mid = t["purchases"][pid][0]
    lookups = []

    def count(conn, cursor, statement, *a):
        if statement.lstrip().startswith("SELECT purchases.member_id \nFROM purchases") \
                or statement.lstrip().startswith("SELECT purchases.member_id FROM purchases"):
            lookups.append(statement)

    engines = [w.app.primary(n) for n in w.app.shard_names]
    s = w.sessions("strong")()
    try:
        p = s.scalars(select(Purchase).where(Purchase.member_id == mid, Purchase.id == pid)).one()
        s.commit()
        run = Moving(PausingMover(w.admin, set()), plan)
        run.finish()
        assert not run.errors, run.errors
        assert not w.sync_app()
        for e in engines:
            event.listen(e, "before_cursor_execute", count)
        try:
            for _ in range(3):
                assert p.amount == t["purchases"][pid][1]
                s.commit()
        finally:
            for e in engines:
                event.remove(e, "before_cursor_execute", count)
    finally:
        s.close()
    assert len(lookups) <= len(engines), f"{len(lookups)} lookups for 3 refreshes of one object"


def test_a_set_aside_move_floor_does_not_hide_the_next_move(world):
    """After a move floor past s1's primary (another server's) was set aside, buckets move
    to s1 again, its replica 3 s behind: the new move's floor (the new server's) must still
    keep the replica from serving the moved buckets before it replayed the switch.  The
    catalog takes the highest position ever recorded for the shard, the set-aside one: the
    primary's own position stands in for it, taken again when the map changes."""
    from sqlalchemy import text

    from test_reads_during_moves import Member, keys_in

    w = world
    row = _floor_past_s1s_primary(w)
    target_replica = w.shard("s1").replicas[0]
    problems = []
    run = None
    try:
        w.app.refresh_map()
        k = next(k for k in sorted(truth(w)["members"]) if w.app.shard_for("members", k) == "s1")
        with w.sessions("eventual")() as s:
            assert s.get(Member, k) is not None      # the floor is found past the primary
        plan, buckets = _move_plan(w, "s0", "s1", 3)
        moved = keys_in(buckets)
        assert moved
        target_replica.set_apply_delay(3.0)
        run = Moving(PausingMover(w.admin, {"switched"}), plan)
        assert run.next_step() == "switched"
        assert not w.sync_app()
        with w.sessions("eventual")() as s:
            n = s.scalar(select(func.count()).select_from(Member).where(Member.id.in_(moved)))
            if n != len(moved):
                problems.append(f"eventual count of the moved keys after the switch: {n} of {len(moved)}")
        run.resume()
    finally:
        if run is not None:
            run.finish()
        target_replica.set_apply_delay(0)
        with w.admin.catalog.engine.begin() as c:
            c.execute(text("UPDATE shardkit_catalog.move_batches SET target_lsn = CAST(:l AS pg_lsn) "
                           "WHERE move_id = :m AND batch = :b"), {"l": row[2], "m": row[0], "b": row[1]})
        w.app.refresh_map()
        w.replicas_caught_up()
    assert run is None or not run.errors, run.errors
    assert not problems, "\n".join(problems)
