"""An operator's view of the Prometheus metrics and health(): node gauges that exist
whatever the application's reads, and a hung replica's time lag.

The tests run against this module's own local cluster (1 shard x 1 replica): one of them
freezes the replica."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import text

import shardkit
from waiting import resume, server_pids, wait_for

pytestmark = pytest.mark.integration

prometheus_client = pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=1, replicas=1)


def labels(node: str) -> dict[str, str]:
    return {"shard": node.split("/")[0], "node": node,
            "role": "primary" if node.endswith("/primary") else "replica"}


def test_node_gauges_are_exported_without_any_replica_read(dev):
    """`shardkit_node_up` (and the replicas' lag) must not depend on the application
    happening to read from a replica: an application that only writes (or a cluster
    whose reads all go to primaries) would have no `shardkit_node_up` series at all, so
    an alert on `shardkit_node_up == 0` never fires when a primary dies.  They must also
    come back after `dispose()` (a forked worker's `dispose(close=False)`, say)."""
    from shardkit import metrics

    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), "replicas": {"poll_interval": 0.05}})
    m = metrics.instrument(cluster, registry)
    try:
        for _ in range(2):
            with cluster.primary("s0").begin() as c:
                c.execute(text("SELECT 1"))

            def gauges():
                return (registry.get_sample_value("shardkit_node_up", labels("s0/primary")),
                        registry.get_sample_value("shardkit_node_up", labels("s0/r0")),
                        registry.get_sample_value("shardkit_replica_lag_bytes", labels("s0/r0")))

            wait_for(lambda: gauges()[0] == 1.0 and gauges()[1] == 1.0 and gauges()[2] is not None, 8.0,
                     "node gauges without a replica read")
            cluster.dispose()
            # The scrape right after: no node reported down because it was not polled yet,
            # and no monitor started for a cluster nothing uses (the next round uses it).
            assert _up_zero(registry) == ""
            assert cluster._monitor is None
    finally:
        m.close()
        cluster.dispose()


def _up_zero(registry) -> str:
    return "\n".join(line for line in prometheus_client.generate_latest(registry).decode().splitlines()
                     if line.startswith("shardkit_node_up{") and line.endswith(" 0.0"))


def test_a_hung_replica_has_no_time_lag_in_metrics_or_health(dev):
    """A replica that stops answering (frozen, not refusing connections) is reported down
    once nothing has been heard from it for the stale window; its time lag is then
    unknown, as a stopped replica's is: no `shardkit_replica_lag_seconds` sample and
    `lag_seconds` None in health(), not the last value frozen at 0.0 (an alert on the lag
    would never fire)."""
    from shardkit import metrics

    node = dev.shards[0].replicas[0]
    if not hasattr(node, "_pid") or not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), "replicas": {"poll_interval": 0.05}})
    m = metrics.instrument(cluster, registry)
    try:
        cluster.start_monitor()
        r0 = labels("s0/r0")
        wait_for(lambda: registry.get_sample_value("shardkit_replica_lag_seconds", r0) is not None, 8.0,
                 "the replica's lag")
        pids = server_pids(node)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: registry.get_sample_value("shardkit_node_up", r0) == 0.0, 8.0,
                     "the hung replica reported down")
            assert registry.get_sample_value("shardkit_replica_lag_seconds", r0) is None
            h = {n["node"]: n for n in cluster.health().nodes}["s0/r0"]
            assert h["up"] is False and "no answer" in h["error"], h
            assert h["lag_seconds"] is None, h
        finally:
            resume(pids)
        wait_for(lambda: registry.get_sample_value("shardkit_node_up", r0) == 1.0, 8.0, "the replica back")
    finally:
        m.close()
        cluster.dispose()



def test_listeners_of_engines_a_dispose_let_go_of_are_not_kept(dev):
    """A process that disposes and reuses its cluster (a config reload, a forked worker)
    instruments each new engine; what it keeps for close() must not grow with every cycle."""
    import gc

    from shardkit import metrics

    cluster = shardkit.Cluster.from_config(dev.config_dict())
    m = metrics.instrument(cluster, prometheus_client.CollectorRegistry())

    def use() -> None:  # (no connection left in this frame to keep an engine alive)
        with cluster.primary("s0").begin() as c:
            c.execute(text("SELECT 1"))

    try:
        for _ in range(5):
            use()
            cluster.dispose()
            gc.collect()
        use()
        assert len(m._listeners) == 3, len(m._listeners)   # the live engine's three
    finally:
        m.close()
        cluster.dispose()
