"""Cross-shard reads the application abandons midway: a streamed result closed after a
few rows, a shard that dies mid-stream, Ctrl-C while the shards run: no cursor, query
or connection is left behind."""
from __future__ import annotations

import signal
import threading
import time

import pytest
from own_tables import cluster_with_tables
from waiting import wait_replicas_usable
from sqlalchemy import BigInteger, Integer, MetaData, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.errors import ShardUnavailable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "ab_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    v: Mapped[int] = mapped_column(Integer)


N = 3000


@pytest.fixture(scope="module")
def env(sharded_dev):
    config = {"groups": {"ab": {"tables": {"ab_items": "id"}}}}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        with Session() as s:
            s.add_all(Item(id=i, v=i % 7) for i in range(N))
            s.commit()
        yield cluster, Session


def checked_out(cluster):
    return {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st and st["checkedout"]}


def _cursors(conn) -> list[str]:
    return conn.exec_driver_sql("SELECT name FROM pg_cursors WHERE name <> ''").scalars().all()


@pytest.mark.parametrize("how", ["close", "with", "scalars-close", "partitions-with"])
def test_closing_a_streamed_cross_shard_result_closes_every_shards_cursor(env, how):
    """On one database, closing a yield_per result (close(), or leaving its ``with``)
    closes its server-side cursor at once; a cross-shard one must close every shard's,
    or each abandoned scan keeps a cursor (and its sort) open on every shard until the
    transaction ends."""
    cluster, Session = env
    stmt = select(Item).order_by(Item.id).execution_options(yield_per=10)
    with Session() as s:
        conns = {sh: s.connection(bind_arguments={"shard_id": sh}) for sh in cluster.shard_names}
        for _ in range(3):
            if how == "close":
                r = s.execute(stmt)
                r.fetchmany(3)
                r.close()
            elif how == "with":
                with s.execute(stmt) as r:
                    r.fetchmany(3)
            elif how == "scalars-close":
                r = s.scalars(stmt)
                next(iter(r))
                r.close()
            else:
                with s.scalars(stmt) as r:
                    for _part in r.partitions():
                        break
        assert {sh: _cursors(c) for sh, c in conns.items()} == {sh: [] for sh in conns}
        assert s.scalar(select(func.count()).select_from(Item)) == N


def _running(cluster, marker: str) -> dict[str, int]:
    out = {}
    for sh in cluster.shard_names:
        with cluster.primary(sh).connect() as c:
            n = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                               "AND pid <> pg_backend_pid() AND query LIKE :m"),
                          {"m": f"%{marker}%"}).scalar()
        if n:
            out[sh] = n
    return out


def _cancel(cluster, marker: str) -> None:
    for sh in cluster.shard_names:
        with cluster.primary(sh).connect() as c:
            c.execute(text("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE state = 'active' "
                           "AND pid <> pg_backend_pid() AND query LIKE :m"), {"m": f"%{marker}%"}).all()


def test_ctrl_c_during_a_cross_shard_read_cancels_every_shards_query(env):
    """Ctrl-C (KeyboardInterrupt) while a cross-shard read waits for its shards: as psycopg
    does on one connection, the queries are cancelled on the servers before the exception
    reaches the caller, not left running (holding the session's connections, and the
    scatter threads, until they end on their own)."""
    cluster, Session = env
    marker = "pg_sleep(30.5)"
    stmt = select(Item.id).where(Item.id < 0).where(
        text(f"(SELECT {marker})::text IS NOT NULL"))
    main = threading.main_thread().ident

    def interrupt(*_a):
        raise KeyboardInterrupt

    def when_running():
        # Interrupt once every shard runs the query (the caller waits in the scatter).
        for _ in range(600):
            if len(_running(cluster, marker)) == len(cluster.shard_names):
                signal.pthread_kill(main, signal.SIGALRM)
                return
            time.sleep(0.05)

    s = Session()
    old = signal.signal(signal.SIGALRM, interrupt)
    watcher = threading.Thread(target=when_running)
    try:
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            s.execute(stmt).all()
        watcher.join()
        assert _running(cluster, marker) == {}
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Item)) == N
        s.close()
        assert checked_out(cluster) == {}
    finally:
        signal.signal(signal.SIGALRM, old)
        watcher.join()
        _cancel(cluster, marker)
        s.close()


def test_a_replica_failing_mid_stream_leaves_no_cursor_open_on_the_other_shards(env, sharded_dev):
    """A cross-shard read streamed from replicas, one of which dies while the caller reads:
    the error reaches the caller as it is (closing the result does not mask it), and
    leaving the ``with`` block closes the other shards' cursors."""
    cluster, _ = env
    for sh in sharded_dev.shards:
        for r in sh.replicas:
            r.wait_caught_up()
    cluster.start_monitor()
    # (Its first poll may find a primary's background WAL not replayed yet, with no
    # history of the primary's positions to date the gap: the replica's age then counts.)
    wait_replicas_usable(cluster)
    RS = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="eventual")
    stream = {"shardkit_role": "replica", "shardkit_replica": 0, "shardkit_stream": True}
    with RS() as s:
        with pytest.raises(ShardUnavailable, match="s2/r0"):
            with s.scalars(select(Item).order_by(Item.id).execution_options(yield_per=10)) as r:
                it = iter(r)
                for _ in range(5):
                    next(it)
                held = {sh: s.connection(bind_arguments={"shard_id": sh, **stream}) for sh in ("s0", "s1")}
                assert all(_cursors(c) for c in held.values())  # (streaming from those replicas)
                with cluster.engine("s2", "replica", 0).connect() as c:
                    assert c.execute(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                        "pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")).scalar() == 1
                for _ in it:
                    pass
        assert {sh: _cursors(c) for sh, c in held.items()} == {"s0": [], "s1": []}
    assert checked_out(cluster) == {}
