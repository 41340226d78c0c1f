"""A replica connection's life: what the pool gets back after a
streamed read, a hand-begun transaction or a connection that died, and failover under load.

Most tests use the shared local cluster (2 shards x 1 replica), with their own table; a
replica's server is never stopped there, only one of its backends is terminated
(``pg_terminate_backend``, as a standby does to a session that conflicts with WAL replay
or outlives ``idle_in_transaction_session_timeout``).  The kill test has a small cluster
of its own."""

from __future__ import annotations

import logging
import threading
from collections import Counter

import pytest
from own_tables import cluster_with_tables
from psycopg.pq import TransactionStatus
from sqlalchemy import BigInteger, String, event, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from waiting import wait_for, wait_replicas_usable

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "replconn_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}},
          "replicas": {"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                       "when_no_replica": "raise"}}
ROWS = 120


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        for shard in c.shard_names:
            keys = [k for k in range(1, 2000) if c.shard_for(Item, k) == shard][:ROWS]
            with c.primary(shard).begin() as conn:
                conn.execute(Item.__table__.insert(), [{"id": k, "v": str(k)} for k in keys])
        for s in shardkit_dev_cluster.shards:
            for r in s.replicas:
                r.wait_caught_up()
        yield shardkit_dev_cluster


@pytest.fixture
def cluster(dev):
    c = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=Base.metadata)
    yield c
    c.dispose()


RESETS = [("close", None), ("rollback", None), ("commit", None), ("close", {"pool_reset_on_return": "rollback"}),
          ("close", {"pool_reset_on_return": "commit"}), ("close", {"pool_reset_on_return": None})]
RESET_IDS = [f"{end}-{'default' if o is None else o['pool_reset_on_return']}" for end, o in RESETS]


def key_on(c, shard):
    return next(k for k in range(1, 2000) if c.shard_for(Item, k) == shard)


def checked_out(c):
    return {node: st["checkedout"] for node, st in c.pool_stats().items() if st}


def terminate(dev, shard, pid):
    """End one backend of ``shard``'s replica, as a standby ends a session that conflicts
    with replay, and wait until it is gone."""
    node = dev.shard(shard).replicas[0]
    with node.connect() as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]

    def gone():
        with node.connect() as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0
    wait_for(gone, 30, f"backend {pid} to exit")


def streamed_read(s, shard):
    """A complete streamed (server-side cursor) read of ``shard``'s replica; the pid of the
    replica backend that served it."""
    rows = s.execute(select(Item.id, func.pg_backend_pid()).execution_options(
        yield_per=25, shardkit_shard=shard)).all()
    assert len(rows) == ROWS
    return rows[0][1]


# -- 1. a replica connection that died after its read: the session's end is quiet --------------


@pytest.mark.parametrize("end, engine_options", RESETS, ids=RESET_IDS)
def test_a_finished_streamed_read_whose_replica_backend_died_does_not_fail_the_session_end(
        dev, end, engine_options, caplog):
    """The read delivered every row; its READ COMMITTED transaction on the standby wrote
    nothing.  Its connection dying before the session ends (a recovery conflict, an idle
    timeout, a restart) must not make close()/rollback()/commit() raise: there is nothing
    to roll back or commit there (README: "a dead replica leaves no transaction to roll
    back"), whatever pool_reset_on_return engine_options give.  The pool replaces that
    connection, and nothing stays checked out."""
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=Base.metadata,
                                           engine_options=engine_options)
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        s = Session()
        pid = streamed_read(s, "s0")
        terminate(dev, "s0", pid)
        with caplog.at_level(logging.ERROR):
            getattr(s, end)()
            s.close()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert set(checked_out(cluster).values()) == {0}, cluster.pool_stats()
        # The replica serves the next streamed read (on a new connection), and is not banned.
        with Session() as s2:
            assert streamed_read(s2, "s0") != pid
        health = {n["node"]: n for n in cluster.health().nodes}
        assert not health["s0/r0"]["banned_for_s"], health["s0/r0"]
    finally:
        cluster.dispose()


def test_a_write_commits_when_a_finished_streamed_reads_replica_backend_died(dev, cluster):
    """A transaction writes s1 and streams a read of s0 from its replica; the replica's
    backend dies before the commit.  Before: commit() raised psycopg's OperationalError
    (SQLAlchemy commits the connections in no set order: the write was committed or not,
    at random), so an application retrying on that error could apply its write twice.
    The commit must commit the write and return."""
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    k = key_on(cluster, "s1")
    try:
        with Session() as s:
            s.execute(update(Item).where(Item.id == k).values(v="written"))
            pid = streamed_read(s, "s0")
            terminate(dev, "s0", pid)
            s.commit()
        with cluster.primary("s1").connect() as conn:
            assert conn.execute(select(Item.v).where(Item.id == k)).scalar_one() == "written"
        assert set(checked_out(cluster).values()) == {0}, cluster.pool_stats()
    finally:
        with cluster.primary("s1").begin() as conn:
            conn.execute(update(Item).where(Item.id == k).values(v=str(k)))


def test_a_replica_connection_begun_by_hand_and_then_lost_comes_back_replaced(dev, cluster, caplog):
    """BEGIN run by hand on a replica's DBAPI connection, whose backend then dies: the
    pool's check-in must not log an error, and the next checkout of that pool (of one)
    is a live connection in autocommit with no transaction."""
    c = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG, "pool": {"size": 1, "max_overflow": 0}},
                                     metadata=Base.metadata)
    try:
        eng = c.engine("s0", "replica", 0)
        raw = eng.raw_connection()
        raw.driver_connection.execute("BEGIN")
        pid = raw.driver_connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        terminate(dev, "s0", pid)
        with caplog.at_level(logging.ERROR):
            raw.close()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        with eng.connect() as conn:
            dc = conn.connection.driver_connection
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
            assert dc.pgconn.transaction_status == TransactionStatus.IDLE and dc.autocommit
    finally:
        c.dispose()


# -- 2. a replica SIGKILLed under reads from several threads -------------------------------------


@pytest.fixture(scope="module")
def killable(shardkit_module_cluster_factory):
    """A cluster of its own (1 shard x 2 replicas): its replica r0 is killed.  Stopped when
    the module ends."""
    dev = shardkit_module_cluster_factory(shards=1, replicas=2)
    cfg = {**dev.config_dict(), **CONFIG, "pool": {"size": 4, "max_overflow": 0},
           "replicas": {**CONFIG["replicas"], "poll_interval": 0.1, "ban_seconds": 2.0}}
    with cluster_with_tables(dev, cfg, Base.metadata) as c:
        with c.primary("s0").begin() as conn:
            conn.execute(Item.__table__.insert(), [{"id": k, "v": str(k)} for k in range(1, ROWS + 1)])
        for r in dev.shard("s0").replicas:
            r.wait_caught_up()
        yield dev, c


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_reads_from_threads_survive_a_killed_replica_and_leave_no_checkout(killable, streamed):
    """Four threads read (each read its own session, outside any transaction) while r0's
    postmaster is SIGKILLed and later started again.  A plain read never fails (it is
    retried on r1); a streamed one fails only with ShardUnavailable naming r0 (README: the
    replica died while its result was being read), never with a driver error at the
    session's end.  r0 is out while down, serves again once back, and no connection stays
    checked out of any pool."""

    dev, c = killable
    victim = dev.shard("s0").replicas[0]
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
    served: Counter = Counter()
    listeners = [(c.engine("s0", "replica", i), lambda *a, i=i: served.update([i])) for i in range(2)]
    for eng, fn in listeners:
        event.listen(eng, "after_cursor_execute", fn)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = Counter()

    def read(n):
        while not stop.is_set():
            try:
                with Session() as s:
                    if streamed:
                        got = len(s.execute(select(Item).execution_options(yield_per=25)).scalars().all())
                    else:
                        got = s.execute(select(Item.v).where(Item.id == 1 + reads[n] % ROWS)).scalar_one()
                assert got
                reads[n] += 1
            except Exception as e:  # noqa: BLE001 - judged below
                errors.append(e)

    c.start_monitor()
    wait_replicas_usable(c, every=True)
    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served[0] > 20 and served[1] > 20, 30, "both replicas to serve reads")
        victim.kill()
        wait_for(lambda: not {n["node"]: n for n in c.health().nodes}["s0/r0"]["up"], 30,
                 "the monitor to see r0 down")
        at_r1 = served[1]
        wait_for(lambda: served[1] > at_r1 + 50, 30, "r1 to serve reads while r0 is down")
        victim.start()
        victim.wait_streaming()
        wait_replicas_usable(c, every=True)
        at_r0 = served[0]
        wait_for(lambda: served[0] > at_r0 + 20, 30, "r0 to serve reads again")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for eng, fn in listeners:
            event.remove(eng, "after_cursor_execute", fn)
        if not victim.is_running():
            victim.start()
    assert all(not t.is_alive() for t in threads)
    if streamed:
        bad = [e for e in errors if not (isinstance(e, shardkit.ShardUnavailable) and "s0/r0" in str(e))]
    else:
        bad = errors
    assert not bad, [f"{type(e).__name__}: {e}" for e in bad[:5]]
    assert all(reads[n] for n in range(4)), reads
    assert set(checked_out(c).values()) == {0}, c.pool_stats()
