"""README claims that need a server: what the query metrics count."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import shardkit

pytestmark = pytest.mark.integration

prometheus_client = pytest.importorskip("prometheus_client")


def _value(registry, name, node):
    shard = node.split("/")[0]
    role = "primary" if node.endswith("/primary") else "replica"
    v = registry.get_sample_value(name, {"shard": shard, "node": node, "role": role})
    return 0.0 if v is None else v


def test_a_failed_statement_counts_as_an_error_only(shardkit_dev_cluster):
    """README (Metrics): a statement that fails counts in shardkit_query_errors_total, and
    neither in shardkit_queries_total nor in the histogram; a connection that cannot be
    opened counts as an error too."""
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    cfg = shardkit_dev_cluster.config_dict()
    cfg["shards"][1]["primary"] = "postgresql+psycopg://nobody@127.0.0.1:9/none"
    cluster = shardkit.Cluster.from_config(cfg)
    m = metrics.instrument(cluster, registry)
    try:
        with cluster.primary("s0").connect() as c:
            c.execute(text("SELECT 1"))
            with pytest.raises(Exception):
                c.execute(text("SELECT * FROM no_such_table_docs_metrics"))
        assert _value(registry, "shardkit_queries_total", "s0/primary") == 1.0
        assert _value(registry, "shardkit_query_errors_total", "s0/primary") == 1.0
        assert _value(registry, "shardkit_query_duration_seconds_count", "s0/primary") == 1.0
        with pytest.raises(shardkit.ShardUnavailable):
            with cluster.primary("s1").connect():
                pass
        assert _value(registry, "shardkit_query_errors_total", "s1/primary") == 1.0
        assert _value(registry, "shardkit_queries_total", "s1/primary") == 0.0
    finally:
        m.close()
        cluster.dispose()
