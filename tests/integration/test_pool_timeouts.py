"""A checkout that times out is counted per node: in pool_stats(), health() and the
Prometheus metrics (an exhausted pool is what an operator most needs to see)."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import shardkit

pytestmark = pytest.mark.integration


def small_pool_cluster(dev):
    return shardkit.Cluster.from_config(
        {**dev.config_dict(), "pool": {"size": 1, "max_overflow": 0, "timeout": 0.2}})


def test_checkout_timeouts_are_counted_per_node(shardkit_dev_cluster):
    cluster = small_pool_cluster(shardkit_dev_cluster)
    try:
        eng = cluster.primary("s0")
        other = cluster.primary("s1")
        with other.connect() as c:
            c.execute(text("SELECT 1"))
        assert cluster.pool_stats()["s0/primary"]["timeouts"] == 0
        with eng.connect() as held:
            held.execute(text("SELECT 1"))
            for _ in range(2):
                with pytest.raises(sa_exc.TimeoutError, match="node s0/primary"):
                    eng.connect()
        stats = cluster.pool_stats()
        assert stats["s0/primary"]["timeouts"] == 2
        assert stats["s1/primary"]["timeouts"] == 0
        # The pool works again once the connection is back, and the count stays.
        with eng.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
        assert cluster.pool_stats()["s0/primary"]["timeouts"] == 2
        health = {n["node"]: n for n in cluster.health().nodes}
        assert health["s0/primary"]["pool"]["timeouts"] == 2
        # dispose() makes a new pool, which carries the count on (a Prometheus counter
        # must not drop while the process lives).
        cluster.dispose()
        with cluster.primary("s0").connect():
            pass
        assert cluster.pool_stats()["s0/primary"]["timeouts"] == 2
    finally:
        cluster.dispose()


@pytest.mark.parametrize("pool, says", [
    ({"size": 1, "max_overflow": 0, "timeout": 0.2},
     "raise that node's [pool] size or max_overflow (max_connections caps both)"),
    # The cap is the limit met: raising size would change nothing (it said so all the same).
    ({"size": 5, "max_overflow": 10, "timeout": 0.2, "max_connections": 1},
     "raise that node's max_connections (1), which caps its size and max_overflow"),
    ({"size": 1, "max_overflow": 0, "timeout": 0.2, "max_connections": 3},
     "raise that node's [pool] size or max_overflow (max_connections caps both)"),
])
def test_a_checkout_timeout_names_the_limit_it_met(shardkit_dev_cluster, pool, says):
    cluster = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(), "pool": pool})
    try:
        eng = cluster.primary("s0")
        with eng.connect() as held:
            held.execute(text("SELECT 1"))
            with pytest.raises(sa_exc.TimeoutError) as e:
                eng.connect()
        assert says in str(e.value), e.value
        # A new pool (dispose()) knows its cap too.
        cluster.dispose()
        eng = cluster.primary("s0")
        with eng.connect():
            with pytest.raises(sa_exc.TimeoutError) as e:
                eng.connect()
        assert says in str(e.value), e.value
    finally:
        cluster.dispose()


def test_checkout_timeouts_are_exported(shardkit_dev_cluster):
    prometheus_client = pytest.importorskip("prometheus_client")
    import shardkit.metrics

    cluster = small_pool_cluster(shardkit_dev_cluster)
    registry = prometheus_client.CollectorRegistry()
    metrics = shardkit.metrics.instrument(cluster, registry)
    try:
        eng = cluster.primary("s0")
        with eng.connect():
            with pytest.raises(sa_exc.TimeoutError):
                eng.connect()
        labels = {"shard": "s0", "node": "s0/primary", "role": "primary"}
        assert registry.get_sample_value("shardkit_pool_timeouts_total", labels) == 1.0
        assert "shardkit_pool_timeouts_total" in prometheus_client.generate_latest(registry).decode()
    finally:
        metrics.close()
        cluster.dispose()
