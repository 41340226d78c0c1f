"""Prometheus metrics for a cluster (needs the ``metrics`` extra: ``pip install 'shardkit[metrics]'``).

    from prometheus_client import start_http_server
    import shardkit.metrics

    shardkit.metrics.instrument(cluster)
    start_http_server(9100)

Per node (labels ``shard``, ``node``, ``role``):

=====================================  =========  ==========================================
``shardkit_queries_total``             counter    statements executed
``shardkit_query_errors_total``        counter    statements that raised
``shardkit_query_duration_seconds``    histogram  statement latency, client side
``shardkit_node_up``                   gauge      1 if the health monitor reached the node
``shardkit_replica_lag_bytes``         gauge      replica WAL gap (replicas only)
``shardkit_replica_lag_seconds``       gauge      replica time lag (replicas only)
``shardkit_replica_banned_seconds``    gauge      what is left of a replica's ban (0: none)
``shardkit_pool_checked_out``          gauge      connections in use from the node's pool
``shardkit_pool_size``                 gauge      the node's pool size
``shardkit_pool_timeouts_total``       counter    checkouts that waited past the pool timeout
=====================================  =========  ==========================================

The node and lag gauges come from the cluster's health monitor, started by a scrape if
nothing else has started it and the cluster is in use.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from ._cluster import Cluster, _NodePool

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "shardkit.metrics needs prometheus-client: pip install 'shardkit[metrics]'"
    ) from e

__all__ = ["ClusterMetrics", "instrument"]

_LABELS = ("shard", "node", "role")


class ClusterMetrics:
    """The metrics of one cluster; created by :func:`instrument`."""

    def __init__(self, cluster: Cluster, registry: CollectorRegistry) -> None:
        self.cluster = cluster
        self.registry = registry
        # (engine, event name, listener): what close() removes; weakly, so that engines a
        # dispose() let go of are freed.
        self._listeners: list[tuple[weakref.ref[Engine], str, Any]] = []
        self._collectors: list[Any] = []
        try:
            self.queries = self._register(Counter(
                "shardkit_queries_total", "Statements executed, per node", _LABELS, registry=None))
            self.errors = self._register(Counter(
                "shardkit_query_errors_total", "Statements that raised, per node", _LABELS, registry=None))
            self.latency = self._register(Histogram(
                "shardkit_query_duration_seconds", "Statement latency per node, client side", _LABELS,
                registry=None, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                        1, 2.5, 5, 10)))
            self._register(_StateCollector(cluster))
        except ValueError as e:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
            self._unregister()
            raise ValueError(
                f"this registry already holds shardkit's metrics ({e}): it holds one cluster's; "
                "call close() on the ClusterMetrics that instrument() returned for the previous "
                "cluster (after a config reload, say), or pass each cluster a CollectorRegistry "
                "of its own") from None

    def _register(self, collector: Any) -> Any:
        self.registry.register(collector)
        self._collectors.append(collector)
        return collector

    def _unregister(self) -> None:
        for collector in self._collectors:
            self.registry.unregister(collector)
        self._collectors.clear()

    def close(self) -> None:
        """Stop exporting this cluster's metrics: unregister them from the registry and stop
        timing its engines' statements (a new cluster can then be instrumented)."""
        with self.cluster._lock:   # (engine() runs the hooks under it)
            try:
                self.cluster._engine_hooks.remove(self.attach)
            except ValueError:
                pass
        for ref, name, fn in self._listeners:
            engine = ref()
            if engine is not None and event.contains(engine, name, fn):
                event.remove(engine, name, fn)
        self._listeners.clear()
        self._unregister()

    def attach(self, engine: Engine) -> None:
        info = engine.info  # type: ignore[attr-defined]
        labels = (info["shard"], info["node"], info["role"])

        def before(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any,
                   executemany: Any) -> None:
            conn.info.setdefault("shardkit_t0", []).append(time.perf_counter())

        def after(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any,
                  executemany: Any) -> None:
            starts = conn.info.get("shardkit_t0")
            if starts:
                self.latency.labels(*labels).observe(time.perf_counter() - starts.pop())
            self.queries.labels(*labels).inc()

        def failed(ctx: Any) -> None:
            if ctx.is_pre_ping:
                return  # the pool's own check of a pooled connection, not a query (the pool reconnects)
            self.errors.labels(*labels).inc()
            try:
                starts = ctx.connection.info.get("shardkit_t0") if ctx.connection is not None else None
            except Exception:  # noqa: BLE001 - an invalidated connection has no info left
                starts = None
            if starts:
                starts.pop()

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        # First: the cluster's own handler turns connection failures into
        # ShardUnavailable by raising, and SQLAlchemy calls no handler after that.
        event.listen(engine, "handle_error", failed, insert=True)
        ref = weakref.ref(engine)
        # (Entries of engines a dispose() let go of go here, not at close(): a process
        # that reloads its cluster would otherwise keep three per node per reload.)
        self._listeners = [entry for entry in self._listeners if entry[0]() is not None]
        self._listeners += [(ref, "before_cursor_execute", before),
                            (ref, "after_cursor_execute", after), (ref, "handle_error", failed)]


class _StateCollector:
    """Gauges read at scrape time from the health monitor and the pools."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, doc, labels=_LABELS) for name, doc in (
            ("shardkit_node_up", "1 if the node answered the last health poll"),
            ("shardkit_replica_lag_bytes", "Replica WAL gap in bytes"),
            ("shardkit_replica_lag_seconds", "Replica time lag in seconds"),
            ("shardkit_replica_banned_seconds",
             "Seconds left of a replica's ban after a failed read (0: not banned)"),
            ("shardkit_pool_checked_out", "Connections in use from the pool"),
            ("shardkit_pool_size", "Pool size"))]

    @staticmethod
    def _timeouts() -> CounterMetricFamily:
        # (Read from the pools at scrape time, like the gauges: a pool counts its own.)
        return CounterMetricFamily("shardkit_pool_timeouts_total",
                                   "Checkouts that waited longer than the pool's timeout", labels=_LABELS)

    def describe(self) -> list[Any]:
        """The names, for the registry: registering then starts no monitor (see collect)."""
        return [*self._families(), self._timeouts()]

    def collect(self) -> Iterator[Any]:
        up, lag_b, lag_s, banned, used, size = self._families()
        timeouts = self._timeouts()
        # Started here if nothing else started it (an application that reads no replica):
        # without it no node would be reported, down or up; but only for a cluster in use
        # (with engines): a scrape must not bring back the monitor of one that dispose()
        # stopped and nothing uses again.  Not waited for: a node not polled yet has no
        # sample rather than a false "down".
        cluster = self.cluster
        mon = cluster._monitor
        if mon is None and cluster._engines:
            mon = cluster.monitor(wait=False)
        for state in (mon.shards.values() if mon is not None else ()):
            for n in (state.primary, *state.replicas):
                if not n.checked_at:
                    continue
                labels = [n.shard, n.name, n.role]
                d = mon.describe(n)  # what health() says: a hung node is down
                up.add_metric(labels, 1.0 if d["up"] else 0.0)
                if n.role == "replica" and d["lag_bytes"] is not None:
                    lag_b.add_metric(labels, float(d["lag_bytes"]))
                    # A down or hung replica's time lag is unknown: no sample rather than
                    # a frozen one.
                    if d["lag_seconds"] is not None:
                        lag_s.add_metric(labels, float(d["lag_seconds"]))
                if n.role == "replica":
                    banned.add_metric(labels, float(d["banned_for_s"]))
        for eng in list(self.cluster._engines.values()):
            info = eng.info  # type: ignore[attr-defined]
            labels = [info["shard"], info["node"], info["role"]]
            pool = eng.pool
            if hasattr(pool, "checkedout"):
                used.add_metric(labels, float(pool.checkedout()))  # type: ignore[attr-defined]
            if hasattr(pool, "size"):
                size.add_metric(labels, float(pool.size()))  # type: ignore[attr-defined]
            if isinstance(pool, _NodePool):
                timeouts.add_metric(labels, float(pool.timeouts))
        yield from (up, lag_b, lag_s, banned, used, size, timeouts)


def instrument(cluster: Cluster, registry: CollectorRegistry | None = None) -> ClusterMetrics:
    """Export the cluster's metrics to ``registry`` (default: prometheus_client's global one).

    Engines created later are instrumented as they are created; so are those a ``dispose()``
    (or a fork) let go of, through which the application may still run statements.  A
    registry holds one cluster's metrics: ``close()`` the returned :class:`ClusterMetrics`
    before instrumenting another cluster on the same registry (a second one is refused
    with ``ValueError``).
    """
    metrics = ClusterMetrics(cluster, registry if registry is not None else REGISTRY)
    # Under the lock engine() makes an engine under: one made meanwhile is either attached
    # here or given the hook, never neither.
    with cluster._lock:
        for eng in cluster._engines.values():
            metrics.attach(eng)
        # Engines a dispose() (or a fork) let go of: the application may still run
        # statements through one it kept.  Attached now, and marked as such, so that
        # engine() handing it out again does not attach it a second time.
        for k, (eng, seen) in list(cluster._retired.items()):
            metrics.attach(eng)
            cluster._retired[k] = (eng, (*seen, metrics.attach))
        cluster._engine_hooks.append(metrics.attach)
    return metrics
