"""Many threads sharing one Cluster (one per process, a Session per thread): the router's
memo caches under concurrent first use, scatters on tiny pools, scatters abandoned or
interrupted by the consuming thread, per-shard timeouts and a primary stopped while a
scatter runs.

Cluster: 3 shards, no replicas (this module's own: a test stops a primary).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, event, func, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit._routing import Router
from test_scatter_load import JOIN, run_threads

pytestmark = pytest.mark.integration



class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "cdr_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer)


class Tag(Base):
    """Of another group than Owner's: a join from Owner reads each shard's tags only."""
    __tablename__ = "cdr_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class Owner(Base):
    __tablename__ = "cdr_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tag_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("cdr_tags.id"))
    # Loaded by default in the same rows: across shards that cannot be right.
    tag: Mapped[Tag] = relationship(lazy="joined")


GROUPS = {"groups": {"items": {"tables": {"cdr_items": "id"}},
                     "owners": {"tables": {"cdr_owners": "id"}},
                     "tags": {"tables": {"cdr_tags": "id"}}}}
N = 300


def checked_out(cluster: shardkit.Cluster) -> dict[str, int]:
    return {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st and st["checkedout"]}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cfg = {**dev.config_dict(), **GROUPS}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with S() as s:
        s.add_all(Item(id=i, v=i % 10) for i in range(N))
        s.commit()
    cluster.dispose()
    return dev


def make_cluster(dev: Any, **pool: Any) -> shardkit.Cluster:
    cfg = {**dev.config_dict(), **GROUPS}
    if pool:
        cfg["pool"] = pool
    return shardkit.Cluster.from_config(cfg, metadata=Base.metadata)


@pytest.fixture
def cluster(dev) -> Iterator[shardkit.Cluster]:
    c = make_cluster(dev)
    yield c
    c.dispose()


# ---------------------------------------------------------------------------
# The router's memo caches, first used by several threads at once
# ---------------------------------------------------------------------------


def test_concurrent_first_reads_of_an_entity_all_see_its_joined_load_refused(cluster, monkeypatch):
    """Owner.tag (lazy='joined', another group's rows) cannot be loaded shard by shard:
    every cross-shard read of Owner is refused.  Two threads reading Owner for the first
    time at once (a web application just started) must both be refused; neither may read
    while the other is still working out the answer."""
    in_progress = threading.Event()
    second_done = threading.Event()
    real = Router.related_problem

    def slow_related_problem(self, *a, **kw):
        # The first thread is in the middle of mapper_problem(Owner) (as a busy machine
        # may leave it): the second reads meanwhile (or, once that waits for the first,
        # the first goes on after a while).
        if not in_progress.is_set():
            in_progress.set()
            second_done.wait(3)
        return real(self, *a, **kw)

    monkeypatch.setattr(Router, "related_problem", slow_related_problem)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    outcome: dict[int, str] = {}

    def read(k: int) -> None:
        if k == 1:
            assert in_progress.wait(10)
        try:
            with Session() as s:
                s.execute(select(Owner)).all()
            outcome[k] = "read"
        except shardkit.ScatterRefused as e:
            outcome[k] = "refused: " + str(e)
        finally:
            if k == 1:
                second_done.set()

    errors = run_threads(read, 2)
    assert not errors, errors
    assert outcome[0].startswith("refused") and "Owner.tag" in outcome[0], outcome
    assert outcome[1].startswith("refused") and "Owner.tag" in outcome[1], outcome
    # ... and every later read of that shape too (the route's plan is kept per shape).
    with Session() as s:
        with pytest.raises(shardkit.ScatterRefused, match="Owner.tag"):
            s.execute(select(Owner)).all()


# ---------------------------------------------------------------------------
# Tiny pools: what one statement checks out
# ---------------------------------------------------------------------------


def test_a_cross_shard_write_and_a_cross_shard_read_do_not_deadlock_on_pools_of_one(dev):
    """Shards named as operators name them (by region), listed in the config in no
    particular order.  A key-less UPDATE of every shard and a cross-shard read, in two
    threads, on pools of one connection per node: each statement must wait for the other
    (one connection per shard), not take a connection the other needs while the other
    holds one it needs (each would then wait for its pool's timeout)."""
    cfg = {**dev.config_dict(), **GROUPS, "pool": {"size": 1, "max_overflow": 0, "timeout": 8}}
    names = {"s0": "west", "s1": "east", "s2": "north"}
    cfg["shards"] = [{**sh, "name": names[sh["name"]]} for sh in cfg["shards"]]
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    assert cluster.shard_names == ("west", "east", "north")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    count = select(func.count()).select_from(Item)
    with Session() as s:
        assert s.execute(count).scalar_one() == N   # (what it asks the database once, asked)
    read_holds_one: threading.Event = threading.Event()
    write_started = threading.Event()

    def on_west(conn, cursor, statement, *a):
        # The write runs on west first; meanwhile the read takes what it takes.
        if statement.startswith("UPDATE") and not write_started.is_set():
            write_started.set()
            read_holds_one.wait(3)

    def on_checkout(*a):
        if threading.current_thread().name == "reader":
            read_holds_one.set()

    event.listen(cluster.primary("west"), "before_cursor_execute", on_west)
    for n in ("east", "north"):
        event.listen(cluster.primary(n).pool, "checkout", on_checkout)
    outcome: dict[str, Any] = {}

    def write() -> None:
        try:
            with Session() as s:
                r = s.execute(update(Item).values(v=Item.v),
                              execution_options={"shardkit_all_shards": True})
                outcome["write"] = r.rowcount
                s.commit()
        except Exception as e:  # noqa: BLE001
            outcome["write"] = e

    def read() -> None:
        try:
            with Session() as s:
                outcome["read"] = s.execute(count).scalar_one()
        except Exception as e:  # noqa: BLE001
            outcome["read"] = e

    writer = threading.Thread(target=write, name="writer", daemon=True)
    reader = threading.Thread(target=read, name="reader", daemon=True)
    try:
        writer.start()
        assert write_started.wait(JOIN)
        reader.start()
        writer.join(JOIN)
        reader.join(JOIN)
        assert not writer.is_alive() and not reader.is_alive(), "hang"
        assert outcome == {"write": N, "read": N}, outcome
        assert checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_a_cross_shard_read_after_an_error_in_the_transaction_does_not_wait_on_itself(dev):
    """An error aborts the session's transaction on s1 (the caller catches it).  Its next
    cross-shard read, the first of this process with abs() (what a read asks the database
    once per name), must fail at once with the aborted transaction, as on one database,
    not wait for a second connection of s1's pool of one, which the session itself holds,
    and then blame the pool.  With partial results, the other shards answer."""
    cluster = make_cluster(dev, size=1, max_overflow=0, timeout=8)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    k1 = next(i for i in range(N) if cluster.shard_for(Item, i) == "s1")
    with cluster.primary("s1").connect() as c:
        n1 = c.execute(text("SELECT count(*) FROM cdr_items")).scalar_one()
    try:
        with Session() as s:
            with pytest.raises(sa_exc.DataError):
                s.execute(select(Item.v / 0).where(Item.id == k1)).all()
            with pytest.raises(shardkit.ScatterError) as ei:
                s.execute(select(Item.id, func.abs(Item.v)).order_by(Item.id)).all()
            assert set(ei.value.failures) == {"s1"}, ei.value
            assert "current transaction is aborted" in str(ei.value)
            r = s.execute(select(Item.id, func.sign(Item.v)),
                          execution_options={"shardkit_partial_results": True})
            assert len(r.all()) == N - n1 and set(r.missing_shards) == {"s1"}
            s.rollback()
            assert len(s.execute(select(Item.id, func.abs(Item.v))).all()) == N
            # Every shard's transaction aborted: the read says so, and nothing waits.
            with pytest.raises(sa_exc.DataError):
                s.execute(select(func.sum(Item.v / 0))).all()
            with pytest.raises(shardkit.ScatterError) as ei:
                s.execute(select(func.max(func.ceil(Item.v)))).all()
            assert set(ei.value.failures) == {"s0", "s1", "s2"}, ei.value
        assert checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_burst_of_mixed_reads_on_pools_of_one(dev):
    """16 threads, a Session each per unit of work, pools of one connection per node:
    cross-shard reads, reads by key, streamed reads abandoned after their first rows
    (break out of partitions() and of the loop, the result dropped, not closed): every
    answer exact, nothing hangs, nothing left checked out."""
    cluster = make_cluster(dev, size=1, max_overflow=0, timeout=30)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    bad: list[Any] = []

    def work(k: int) -> None:
        for i in range(5):
            with Session() as s:
                n = s.execute(select(func.count()).select_from(Item)).scalar_one()
                if n != N:
                    bad.append(("count", n))
                got = s.execute(select(Item.id).order_by(Item.id.desc()).limit(3)).scalars().all()
                if got != [N - 1, N - 2, N - 3]:
                    bad.append(("order", got))
            with Session() as s:
                key = (k * 7 + i) % N
                if s.get(Item, key).v != key % 10:
                    bad.append("get")
            with Session() as s:
                r = s.scalars(select(Item).order_by(Item.id), execution_options={"yield_per": 4})
                for part in r.partitions():
                    if [o.id for o in part] != [0, 1, 2, 3]:
                        bad.append("part")
                    break
                r2 = s.scalars(select(Item.id).where(Item.v == 3).order_by(Item.id),
                               execution_options={"yield_per": 2})
                for _ in r2:
                    break
                del r, r2
                if s.get(Item, 5).v != 5:
                    bad.append("get2")
                n = s.execute(select(func.count()).select_from(Item),
                              execution_options={"shardkit_timeout": 30}).scalar_one()
                if n != N:
                    bad.append(("count2", n))

    try:
        errors = run_threads(work, 16)
        assert not errors, [repr(e) for e in errors[:3]]
        assert not bad, bad[:5]
        assert checked_out(cluster) == {}
    finally:
        cluster.dispose()


# ---------------------------------------------------------------------------
# The consuming thread interrupted; a primary stopped under a burst of scatters
# ---------------------------------------------------------------------------


def _sleeping(cluster: shardkit.Cluster) -> dict[str, int]:
    """Shards whose primary runs a pg_sleep() for another connection (a streamed read
    shows as its FETCH, so it is found by what it waits for)."""
    out = {}
    for sh in cluster.shard_names:
        with cluster.primary(sh).connect() as c:
            n = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                               "AND pid <> pg_backend_pid() AND wait_event = 'PgSleep'")).scalar()
        if n:
            out[sh] = n
    return out


def test_ctrl_c_while_the_caller_reads_a_streamed_cross_shard_result(dev, cluster):
    """Ctrl-C while the consuming thread waits for a later batch of a streamed (yield_per)
    cross-shard read (a FETCH on s1 that would take 30 s): the query is cancelled, leaving
    the ``with`` closes the other shards' cursors, and after a rollback the session reads
    every shard again."""
    import signal

    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    slow = next(i for i in range(N - 1, 0, -1) if cluster.shard_for(Item, i) == "s1")
    stmt = select(Item.id, text(f"(SELECT pg_sleep(30 * (cdr_items.id = {slow})::int)) IS NULL AS z"))
    main = threading.main_thread().ident

    def interrupt(*_a):
        raise KeyboardInterrupt

    def when_sleeping():
        for _ in range(600):
            if _sleeping(cluster):
                signal.pthread_kill(main, signal.SIGALRM)
                return
            time.sleep(0.05)

    old = signal.signal(signal.SIGALRM, interrupt)
    watcher = threading.Thread(target=when_sleeping)
    s = Session()
    try:
        watcher.start()
        got = []
        with pytest.raises(KeyboardInterrupt):
            with s.execute(stmt, execution_options={"yield_per": 2}) as r:
                for row in r:
                    got.append(row.id)
        watcher.join()
        assert got and slow not in got
        assert _sleeping(cluster) == {}
        s.rollback()
        assert s.execute(select(func.count()).select_from(Item)).scalar_one() == N
        cursors = {sh: s.connection(bind_arguments={"shard_id": sh}).exec_driver_sql(
            "SELECT count(*) FROM pg_cursors").scalar() for sh in cluster.shard_names}
        assert cursors == {"s0": 0, "s1": 0, "s2": 0}
        s.close()
        assert checked_out(cluster) == {}
    finally:
        signal.signal(signal.SIGALRM, old)
        watcher.join()
        s.close()


def test_primary_stopped_under_a_burst_of_partial_scatters(dev):
    """12 threads run cross-shard counts with partial results while s1's primary stops
    (immediate) and starts again: each answer is whole or exactly the other shards' share
    with s1 named missing, nothing hangs, nothing stays checked out, and once s1 is back
    the reads are whole again.  (A COMMIT that meets s1 gone, when it stops between a read
    and the commit, does not fail: the transaction only read there.)"""
    cluster = make_cluster(dev, size=2, max_overflow=0, timeout=30)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with cluster.primary("s1").connect() as c:
        n1 = c.execute(text("SELECT count(*) FROM cdr_items")).scalar_one()
    primary = dev.shards[1].primary
    stop = threading.Event()
    seen: list[tuple[str, ...]] = []
    bad: list[Any] = []
    stmt = select(func.count()).select_from(Item).where(text("pg_sleep(0.001) IS NOT NULL"))

    def work(k: int) -> None:
        while not stop.is_set():
            with Session() as s:
                r = s.execute(stmt, execution_options={"shardkit_partial_results": True,
                                                       "shardkit_timeout": 20})
                n = r.scalar_one()
                miss = set(r.missing_shards)
                seen.append(tuple(miss))
                if (miss == set() and n != N) or (miss == {"s1"} and n != N - n1) or miss - {"s1"}:
                    bad.append((n, r.missing_shards))
                s.commit()

    def chaos() -> None:
        try:
            time.sleep(1)
            primary.stop(mode="immediate")
            time.sleep(1)
        finally:
            primary.start()
            stop.set()

    ct = threading.Thread(target=chaos)
    ct.start()
    try:
        errors = run_threads(work, 12)
        ct.join(JOIN)
        assert not errors, [repr(e) for e in errors[:3]]
        assert not bad, bad[:5]
        assert ("s1",) in seen
        assert checked_out(cluster) == {}
        with Session() as s:
            r = s.execute(stmt, execution_options={"shardkit_partial_results": True})
            assert (r.scalar_one(), r.missing_shards) == (N, {})
    finally:
        stop.set()
        ct.join(JOIN)
        cluster.dispose()
