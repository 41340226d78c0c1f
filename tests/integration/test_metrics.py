"""Prometheus metrics against a real cluster."""

import pytest
from sqlalchemy import text

import shardkit

pytestmark = pytest.mark.integration

prometheus_client = pytest.importorskip("prometheus_client")


def test_metrics_count_queries_errors_and_report_lag(shardkit_dev_cluster):
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(),
                                            "replicas": {"poll_interval": 0.1}})
    try:
        with cluster.primary("s0").connect() as c:    # created before instrument()
            c.execute(text("SELECT 1"))
        metrics.instrument(cluster, registry)
        for _ in range(3):
            with cluster.primary("s0").connect() as c:
                c.execute(text("SELECT 1"))
        with cluster.engine("s1", "replica", 0).connect() as c:   # created after
            c.execute(text("SELECT 1"))
            with pytest.raises(Exception):
                c.execute(text("SELECT * FROM no_such_table"))
        cluster.start_monitor()
        out = prometheus_client.generate_latest(registry).decode()
        assert 'shardkit_queries_total{node="s0/primary",role="primary",shard="s0"} 3.0' in out
        assert 'shardkit_query_errors_total{node="s1/r0",role="replica",shard="s1"} 1.0' in out
        assert 'shardkit_query_duration_seconds_count{node="s0/primary",role="primary",shard="s0"} 3.0' in out
        assert 'shardkit_node_up{node="s1/r0",role="replica",shard="s1"} 1.0' in out
        assert 'shardkit_replica_lag_bytes{node="s0/r0",role="replica",shard="s0"}' in out
        assert 'shardkit_pool_size{node="s0/primary",role="primary",shard="s0"}' in out
    finally:
        cluster.dispose()


def test_a_registry_holds_one_cluster_until_its_metrics_are_closed(shardkit_dev_cluster):
    """A config reload makes a new Cluster: instrumenting it on the same registry is
    refused with advice (prometheus_client's own error names only a metric), and works
    once the previous cluster's metrics are closed; those then stop counting."""
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    old = shardkit.Cluster.from_config(shardkit_dev_cluster.config_dict())
    new = shardkit.Cluster.from_config(shardkit_dev_cluster.config_dict())
    try:
        first = metrics.instrument(old, registry)
        with old.primary("s0").connect() as c:
            c.execute(text("SELECT 1"))
        with pytest.raises(ValueError, match="close\\(\\) on the ClusterMetrics"):
            metrics.instrument(new, registry)
        first.close()
        assert "shardkit_queries_total" not in prometheus_client.generate_latest(registry).decode()
        second = metrics.instrument(new, registry)
        for cluster in (old, new):
            with cluster.primary("s0").connect() as c:
                c.execute(text("SELECT 1"))
        out = prometheus_client.generate_latest(registry).decode()
        assert 'shardkit_queries_total{node="s0/primary",role="primary",shard="s0"} 1.0' in out
        assert first.queries.labels("s0", "s0/primary", "primary")._value.get() == 1.0  # not counting
        second.close()
        assert prometheus_client.generate_latest(registry).decode() == ""
    finally:
        old.dispose()
        new.dispose()

def test_a_banned_replica_shows_in_the_ban_gauge_until_the_ban_ends(shardkit_dev_cluster):
    import re

    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(),
                                            "replicas": {"poll_interval": 0.1}})

    def banned_s(node):
        out = prometheus_client.generate_latest(registry).decode()
        m = re.search(rf'shardkit_replica_banned_seconds{{node="{node}",role="replica",shard="s0"}} (\S+)', out)
        assert m, out
        return float(m.group(1))
    try:
        metrics.instrument(cluster, registry)
        cluster.start_monitor()
        assert banned_s("s0/r0") == 0.0
        cluster.monitor().ban("s0", 0, "read failed: test")
        assert 0 < banned_s("s0/r0") <= cluster.config.replicas.ban_seconds
        mon = cluster.monitor()
        mon.shards["s0"].replicas[0].banned_until = 0.0   # the ban ran out
        assert banned_s("s0/r0") == 0.0
        out = prometheus_client.generate_latest(registry).decode()
        assert 'shardkit_replica_banned_seconds{node="s0/primary"' not in out   # replicas only
    finally:
        cluster.dispose()
