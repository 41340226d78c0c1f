"""Replica connections are not rolled back when they are in no transaction (they run in autocommit):
one that is in a transaction all the same (BEGIN run by hand, a streamed read) must come
out of the pool again with none.  On the shared local cluster, its own table."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from own_tables import cluster_with_tables
from psycopg.pq import TransactionStatus
from sqlalchemy import BigInteger, String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "replica_pool_reset_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}},
          "replicas": {"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                       "when_no_replica": "raise"}}


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata):
        yield shardkit_dev_cluster


def one_connection_cluster(dev, engine_options=None):
    """A cluster whose pools hold one connection each, so that every checkout of a node
    gets the connection the previous one returned."""
    return shardkit.Cluster.from_config(
        {**dev.config_dict(), **CONFIG, "pool": {"size": 1, "max_overflow": 0}},
        metadata=Base.metadata, engine_options=engine_options)


def status(conn):
    return conn.connection.driver_connection.pgconn.transaction_status


@pytest.mark.parametrize("engine_options", [None, {"pool_reset_on_return": "rollback"}],
                         ids=["default", "engine_options reset"])
def test_a_transaction_begun_by_hand_does_not_outlive_the_checkout(dev, engine_options):
    """Through the DBAPI connection (engine.raw_connection(): no SQLAlchemy transaction
    to end it), so only the pool's reset can end it."""
    c = one_connection_cluster(dev, engine_options)
    try:
        eng = c.engine("s0", "replica", 0)
        raw = eng.raw_connection()
        raw.driver_connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        raw.driver_connection.execute("SELECT 1")
        assert raw.driver_connection.pgconn.transaction_status == TransactionStatus.INTRANS
        first = raw.driver_connection
        raw.close()
        with eng.connect() as conn:
            assert conn.connection.driver_connection is first, "the pool gave another connection"
            assert status(conn) == TransactionStatus.IDLE
            assert conn.connection.driver_connection.autocommit is True
            # A snapshot per statement again, not the REPEATABLE READ one left open.
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
            assert status(conn) == TransactionStatus.IDLE
    finally:
        c.dispose()


def test_a_failed_statement_in_a_hand_begun_transaction_leaves_a_usable_connection(dev):
    c = one_connection_cluster(dev)
    try:
        eng = c.engine("s0", "replica", 0)
        raw = eng.raw_connection()
        raw.driver_connection.execute("BEGIN")
        with pytest.raises(Exception, match="division by zero"):
            raw.driver_connection.execute("SELECT 1/0")
        assert raw.driver_connection.pgconn.transaction_status == TransactionStatus.INERROR
        raw.close()
        with eng.connect() as conn:
            assert status(conn) == TransactionStatus.IDLE
            assert conn.exec_driver_sql("SELECT 41 + 1").scalar() == 42
    finally:
        c.dispose()


def test_a_streamed_replica_read_then_plain_reads_on_the_same_connection(dev):
    """A streamed read (server-side cursor) runs in a READ COMMITTED transaction on the
    replica's pool; the next checkout must be back in autocommit with no transaction."""
    c = one_connection_cluster(dev)
    try:
        with c.primary(c.shard_for(Item, 1)).begin() as conn:
            conn.execute(Item.__table__.insert(), [{"id": 1, "v": "one"}])
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
        shard = c.shard_for(Item, 1)
        autocommit_seen = []

        def seen(conn, *_a):
            autocommit_seen.append(conn.connection.driver_connection.autocommit)
        replicas = [c.engine(shard, "replica", r.index) for r in c.selector.monitor.shards[shard].replicas]
        for eng in replicas:
            event.listen(eng, "before_cursor_execute", seen)
        for _ in range(200):
            with Session() as s:
                got = list(s.execute(select(Item.v).where(Item.id == 1).execution_options(yield_per=10)).scalars())
            if got:
                break
            time.sleep(0.05)
        assert got == ["one"]
        # Streamed through a server-side cursor: in a transaction, not in autocommit.
        assert autocommit_seen and not any(autocommit_seen)
        for eng in replicas:
            with eng.connect() as conn:
                assert status(conn) == TransactionStatus.IDLE
                assert conn.connection.driver_connection.autocommit is True
    finally:
        with c.primary(c.shard_for(Item, 1)).begin() as conn:
            conn.execute(Item.__table__.delete())
        c.dispose()



@pytest.mark.parametrize("engine_options, rollbacks", [(None, 0), ({"pool_reset_on_return": "rollback"}, 2)],
                         ids=["default", "engine_options reset"])
def test_a_replica_read_ends_without_a_dbapi_rollback(dev, engine_options, rollbacks, monkeypatch):
    """An autocommit connection has no transaction to roll back: neither the session's end
    nor the pool's reset calls the driver's rollback() (a no-op that still costs every
    read some CPU), unless the application asked for the pool's reset by ROLLBACK."""
    c = one_connection_cluster(dev, engine_options)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
    try:
        with Session() as s:  # (the replica's engine and its connection made)
            s.execute(select(Item).where(Item.id == 1)).first()
        calls = []
        here = threading.get_ident()  # (not the health monitor's connections)
        real = psycopg.Connection.rollback
        monkeypatch.setattr(psycopg.Connection, "rollback",
                            lambda conn: (threading.get_ident() == here and calls.append(conn), real(conn))[1])
        with Session() as s:
            s.execute(select(Item).where(Item.id == 1)).first()
        assert len(calls) == rollbacks, calls
    finally:
        c.dispose()
