"""The Prometheus metrics through a cluster's lifecycle: statements run through an engine
the application kept across dispose() (or a fork) and engines made while instrument()
runs are counted like any other."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import MetaData, text

from own_tables import cluster_with_tables

pytestmark = pytest.mark.integration

prometheus_client = pytest.importorskip("prometheus_client")


def _queries(registry, shard, node, role):
    return registry.get_sample_value("shardkit_queries_total",
                                     {"shard": shard, "node": node, "role": role}) or 0.0


def test_an_engine_kept_across_dispose_is_counted_once_instrumented_after(sharded_dev):
    """README: after dispose() "the application may hold one (cluster.primary(shard) kept)"
    and a forked worker's cluster is disposed by itself: metrics instrumented then (a
    worker's post-fork hook) count the statements run through the kept engine, and once
    the cluster hands that engine out again, each statement counts once."""
    from shardkit import metrics

    s0 = sharded_dev.shards[0].name
    with cluster_with_tables(sharded_dev, {}, MetaData()) as cluster:
        kept = cluster.primary(s0)
        cluster.dispose()                    # (what a fork does, with close=False)
        registry = prometheus_client.CollectorRegistry()
        m = metrics.instrument(cluster, registry)
        try:
            with kept.connect() as c:
                c.execute(text("SELECT 1"))
            assert _queries(registry, s0, f"{s0}/primary", "primary") == 1.0
            assert cluster.primary(s0) is kept   # handed out again: not attached twice
            with kept.connect() as c:
                c.execute(text("SELECT 1"))
            assert _queries(registry, s0, f"{s0}/primary", "primary") == 2.0
            m.close()
            with kept.connect() as c:
                c.execute(text("SELECT 1"))
            assert _queries(registry, s0, f"{s0}/primary", "primary") == 0.0  # unregistered
            assert m.queries.labels(s0, f"{s0}/primary", "primary")._value.get() == 2.0
        finally:
            m.close()


class _EnginesMadeMeanwhile(dict):
    """A cluster's engine dict whose values() (instrument()'s look at the engines there
    are) lets another thread make an engine once it has looked: what a request served
    meanwhile does."""

    def __init__(self, cluster, key, *a):
        super().__init__(*a)
        self.cluster, self.key, self.armed = cluster, key, True
        self.thread = None

    def values(self):
        seen = list(super().values())
        if self.armed:
            self.armed = False
            self.thread = threading.Thread(target=self.cluster.engine, args=self.key)
            self.thread.start()
            self.thread.join(timeout=1.0)    # (longer, if instrument() holds the lock)
        return seen


def test_an_engine_made_while_instrument_runs_is_counted(sharded_dev):
    from shardkit import metrics

    s1 = sharded_dev.shards[1].name
    with cluster_with_tables(sharded_dev, {}, MetaData()) as cluster:
        assert (s1, "replica", 0) not in cluster._engines
        cluster._engines = engines = _EnginesMadeMeanwhile(cluster, (s1, "replica", 0), cluster._engines)
        registry = prometheus_client.CollectorRegistry()
        m = metrics.instrument(cluster, registry)
        try:
            engines.thread.join(timeout=10)
            assert not engines.thread.is_alive()
            with cluster.engine(s1, "replica", 0).connect() as c:
                c.execute(text("SELECT 1"))
            assert _queries(registry, s1, f"{s1}/r0", "replica") == 1.0
            cluster.dispose()   # and after a dispose(), handed out again: still counted, once
            with cluster.engine(s1, "replica", 0).connect() as c:
                c.execute(text("SELECT 1"))
            assert _queries(registry, s1, f"{s1}/r0", "replica") == 2.0
        finally:
            m.close()
