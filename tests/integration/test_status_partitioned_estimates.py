"""Pools, pool statistics, health, `shardkit status` and metrics.

On the shared local cluster (own tables; no node is stopped or delayed)."""

from __future__ import annotations

import json

import pytest

import shardkit
from shardkit import cli
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration

PART = "p5b_parted"


def _sql(cluster, shard, *statements):
    with cluster.primary(shard).connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")  # ANALYZE runs outside a transaction
        for sql in statements:
            c.exec_driver_sql(sql)


def test_status_estimates_a_partitioned_table_from_its_partitions(shardkit_dev_cluster, tmp_path, capsys):
    """A partitioned table has no rows of its own: PostgreSQL 14+ leaves its reltuples at -1
    until an ANALYZE names it, and autovacuum never analyses it (only its partitions), so
    after an explicit ANALYZE its estimate stays frozen at that day's count.  `status` must
    give the sum of its partitions' estimates: not "never analysed" while they are analysed,
    nor a stale count once the partitions have moved on."""
    dev = shardkit_dev_cluster
    data = {**dev.config_dict(), "groups": {"parted": {"tables": {PART: "id"}}}}
    path = tmp_path / "status.toml"
    path.write_text(to_toml(data))
    cluster = shardkit.Cluster.from_config(data)

    def estimates():
        assert cli.main(["status", "--config", str(path), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        return {s["shard"]: (s["rows_estimate"], s["rows_estimate_unknown"]) for s in out["shards"]}

    try:
        for s in cluster.shard_names:
            _sql(cluster, s, f"DROP TABLE IF EXISTS {PART}",
                 f"CREATE TABLE {PART} (id bigint PRIMARY KEY) PARTITION BY RANGE (id)",
                 f"CREATE TABLE {PART}_a PARTITION OF {PART} FOR VALUES FROM (0) TO (1000)",
                 f"CREATE TABLE {PART}_b PARTITION OF {PART} FOR VALUES FROM (1000) TO (2000)",
                 f"CREATE TABLE {PART}_c PARTITION OF {PART} FOR VALUES FROM (2000) TO (3000)",
                 f"INSERT INTO {PART} SELECT g FROM generate_series(1, 1500) g",
                 # What autovacuum does: the partitions, never the partitioned table.
                 f"ANALYZE {PART}_a", f"ANALYZE {PART}_b")
        # (_c, empty and never analysed, as next month's partition is: it adds nothing.)
        assert estimates() == {s: ({PART: 1500}, {}) for s in cluster.shard_names}
        for s in cluster.shard_names:
            _sql(cluster, s, f"ANALYZE {PART}",  # by hand, once
                 f"INSERT INTO {PART} SELECT g FROM generate_series(1501, 2500) g",
                 f"ANALYZE {PART}_b", f"ANALYZE {PART}_c")
        assert estimates() == {s: ({PART: 2500}, {}) for s in cluster.shard_names}
    finally:
        for s in cluster.shard_names:
            _sql(cluster, s, f"DROP TABLE IF EXISTS {PART}")
        cluster.dispose()
