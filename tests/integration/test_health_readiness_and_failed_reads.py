"""Pools and observability as an operator sees them: health() as a readiness check when
another thread (or a Prometheus scrape) started the monitor, and what health(), the log
and the metrics say of a replica whose read failed and was retried elsewhere.

The tests run against this module's own local cluster (1 shard x 2 replicas): one of them
stops a replica."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import BigInteger, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import health_by_node, wait_for

pytestmark = pytest.mark.integration

prometheus_client = pytest.importorskip("prometheus_client")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "readiness_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=2)
    with shardkit.Cluster.from_config(dev.config_dict()) as cluster:
        Base.metadata.create_all(cluster.primary("s0"))
    return dev


def config(dev, **replicas):
    return {**dev.config_dict(),
            "groups": {"g": {"strategy": "hash", "tables": {Item.__tablename__: ["id"]}}},
            "replicas": {"consistency": "eventual", "max_lag_seconds": 60,
                         "max_lag_bytes": 1 << 40, **replicas}}


def samples(registry, name):
    return {s.labels["node"]: s.value for fam in registry.collect() for s in fam.samples
            if s.name == name}


def test_health_after_a_scrape_started_the_monitor_does_not_call_a_healthy_cluster_not_ready(dev):
    """A Prometheus scrape starts the monitor without waiting (a node not polled yet has
    no sample).  A readiness probe right after must not read those nodes as down: health()
    said every replica `up: False` (with no error) and `.ready` False on a healthy cluster,
    as it did when several threads called it at once (only the one that started the
    monitor waited for its first poll)."""
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config(config(dev))
    m = metrics.instrument(cluster, registry)
    try:
        with cluster.primary("s0").connect() as c:   # the cluster in use: a scrape starts the monitor
            c.execute(text("SELECT 1"))
        prometheus_client.generate_latest(registry)
        h = cluster.health()
        assert h.ready, h
        assert all(n["up"] and n["checked_ago_s"] is not None for n in h.nodes), h.nodes
    finally:
        m.close()
        cluster.dispose()

    cluster = shardkit.Cluster.from_config(config(dev))
    got: dict[int, bool] = {}
    try:
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, cluster.health().ready))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {0: True, 1: True, 2: True, 3: True}, got
    finally:
        cluster.dispose()


def test_a_replica_read_that_fails_is_one_error_on_that_node_and_its_ban_says_why(dev, caplog):
    """A replica stopped under pooled connections: the read fails there, is retried on the
    other replica and succeeds.  `shardkit_query_errors_total` counts it once, on the
    failed node; the retry counts as a query on the other one; health() gives the ban and
    why in the driver's words (its first line, as the ban of a failed stream says it), not
    a Python repr with escaped newlines cut at 200 characters."""
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    # A slow poll: the read, not the monitor, finds the replica gone.
    cluster = shardkit.Cluster.from_config(config(dev, poll_interval=5, ban_seconds=60,
                                                  policy="round_robin"))
    m = metrics.instrument(cluster, registry)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    stopped = None
    try:
        with Session() as s:
            s.merge(Item(id=1, v="a"))
            s.commit()
        cluster.start_monitor()
        wait_for(lambda: len(cluster.selector.eligible("s0", max_lag_seconds=60, max_lag_bytes=1 << 40,
                                                       min_lsn=None)[0]) == 2, 30, "both replicas usable")
        for _ in range(4):   # a pooled connection on each replica
            with Session() as s:
                s.execute(select(Item.v).where(Item.id == 1)).all()
        assert cluster.pool_stats()["s0/r0"]["checkedin"] >= 1, cluster.pool_stats()
        before_q = samples(registry, "shardkit_queries_total")
        before_e = samples(registry, "shardkit_query_errors_total")
        stopped = dev.shards[0].replicas[0]
        stopped.stop(mode="immediate")
        for _ in range(2):
            with Session() as s:
                assert s.execute(select(Item.v).where(Item.id == 1)).all() in ([("a",)], [])
        q, e = samples(registry, "shardkit_queries_total"), samples(registry, "shardkit_query_errors_total")
        assert e.get("s0/r0", 0) - before_e.get("s0/r0", 0) == 1, (before_e, e)
        assert e.get("s0/r1", 0) == before_e.get("s0/r1", 0) and not e.get("s0/primary"), e
        assert q.get("s0/r0", 0) == before_q.get("s0/r0", 0), (before_q, q)
        assert q["s0/r1"] - before_q.get("s0/r1", 0) == 2, (before_q, q)

        r0 = health_by_node(cluster)["s0/r0"]
        assert r0["banned_for_s"] > 30, r0
        reason = r0["ban_reason"]
        assert reason.startswith("read failed: ") and "server closed the connection" in reason, reason
        assert "\n" not in reason and "\\n" not in reason and "OperationalError(" not in reason, reason
        bans = [r.getMessage() for r in caplog.records if "banned for" in r.getMessage()]
        assert bans and all("\\n" not in b and "\n" not in b for b in bans), bans
    finally:
        if stopped is not None:
            stopped.start()
        m.close()
        cluster.dispose()
