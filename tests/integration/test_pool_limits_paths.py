"""The per-node cap (``max_connections``) on the paths around ``cluster.dispose()``: a
connection in use when the cluster is disposed is closed when it comes back, not kept
open, idle, in the pool the engine let go of (outside the cap and ``pool_stats()``) until
that pool is garbage collected.  Counted on the servers (``pg_stat_activity`` by
``application_name``).  On the shared local cluster (its own table; no node stopped)."""

from __future__ import annotations

import gc

import psycopg
import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

import shardkit

pytestmark = pytest.mark.integration

APP = "sk_pool_limits_paths"
CAP = 2


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pool_limits_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


GROUPS = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}}}


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata):
        yield shardkit_dev_cluster


def capped_cluster(dev):
    shards = [{"name": s.name, "primary": f"{s.primary.url}?application_name={APP}",
               "replicas": [f"{r.url}?application_name={APP}" for r in s.replicas]}
              for s in dev.shards]
    return shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS, "shards": shards,
         "pool": {"max_connections": CAP, "timeout": 2}},
        metadata=Base.metadata, follow_map=False)


def server_connections(dev, shard):
    """The connections of this module's clusters on ``shard``'s primary, on the server."""
    dsn = next(s for s in dev.shards if s.name == shard).primary.dsn
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                         (APP,)).fetchone()[0]


@pytest.fixture
def no_cyclic_gc():
    # A busy process's pools are old objects: only a full collection, rare, frees the
    # pool a dispose() let go of.  Without the collector the test sees what it keeps.
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def test_a_connection_in_use_at_dispose_is_closed_when_it_comes_back(dev, no_cyclic_gc):
    cluster = capped_cluster(dev)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    try:
        shard = cluster.shard_names[0]
        # Two sessions in a transaction on the shard's primary: the whole cap.
        sessions = []
        for _ in range(CAP):
            s = Session()
            s.connection_for_shard(shard).execute(text("SELECT 1"))
            sessions.append(s)
        assert server_connections(dev, shard) == CAP
        cluster.dispose()
        # They go on in their transactions, then end.
        for s in sessions:
            assert s.connection_for_shard(shard).execute(text("SELECT 2")).scalar() == 2
            s.commit()
            s.close()
        assert server_connections(dev, shard) == 0, (
            "a connection in use at dispose() stays open after it was returned")
        # The cluster used again: within the cap on the server, as pool_stats() says.
        eng = cluster.primary(shard)
        held = [eng.connect() for _ in range(CAP)]
        try:
            for c in held:
                c.execute(text("SELECT 1"))
            assert server_connections(dev, shard) == CAP
            assert cluster.pool_stats()[f"{shard}/primary"]["checkedout"] == CAP
        finally:
            for c in held:
                c.close()
        assert cluster.pool_stats()[f"{shard}/primary"]["checkedin"] == CAP
    finally:
        cluster.dispose()


def test_a_connection_in_use_at_dispose_close_false_is_not_closed(dev, no_cyclic_gc):
    # dispose(close=False) (a forked child's) leaves every connection alone: the one in
    # use here is still the process's own, and its session goes on and ends normally.
    cluster = capped_cluster(dev)
    try:
        shard = cluster.shard_names[0]
        conn = cluster.primary(shard).connect()
        conn.execute(text("SELECT 1"))
        cluster.dispose(close=False)
        assert conn.execute(text("SELECT 3")).scalar() == 3
        conn.close()
        assert server_connections(dev, shard) == 1
    finally:
        cluster.dispose()


@pytest.mark.parametrize("pool, field", [
    ({"pool": {"max_connections": 3}}, "pool.max_connections"),
    ({"replica_pool": {"size": 2}}, "shards[1].replicas[0].pool.size"),
], ids=["global-cap", "replica-size"])
def test_a_poolclass_of_your_own_with_queue_pool_settings_is_refused_up_front(dev, pool, field):
    # Not at the node's first use, as SQLAlchemy's "Invalid argument(s) 'pool_size',
    # 'max_overflow'" (arguments a max_connections alone becomes).
    config = {**dev.config_dict(), **GROUPS, **{k: v for k, v in pool.items() if k == "pool"}}
    if "replica_pool" in pool:
        config["shards"] = [dict(s) for s in config["shards"]]
        s1 = config["shards"][1]
        s1["replicas"] = [{"url": s1["replicas"][0], "pool": pool["replica_pool"]}]
    with pytest.raises(shardkit.ConfigurationError) as e:
        shardkit.Cluster.from_config(config, engine_options={"poolclass": NullPool}, follow_map=False)
    assert e.value.field == field
    assert "NullPool" in str(e.value) and "max_connections" in str(e.value)
    # Without those settings (prepared_statements, pre_ping and recycle are any pool's)
    # that pool is used, and a QueuePool of your own takes them all.
    plain = {**dev.config_dict(), **GROUPS, "pool": {"pre_ping": True, "prepared_statements": False}}
    for options, config in (({"poolclass": NullPool}, plain),
                            ({"poolclass": QueuePool}, {**dev.config_dict(), **GROUPS, "pool": {"max_connections": 1}})):
        cluster = shardkit.Cluster.from_config(config, engine_options=options, follow_map=False)
        try:
            with cluster.primary(cluster.shard_names[0]).connect() as c:
                assert c.execute(text("SELECT 1")).scalar() == 1
            assert isinstance(cluster.primary(cluster.shard_names[0]).pool, options["poolclass"])
        finally:
            cluster.dispose()
