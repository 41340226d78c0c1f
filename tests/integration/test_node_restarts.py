"""Servers that restart (stop, then start again: `pg_ctl restart -m fast` or
`-m immediate`) as a web app running many requests sees it: what pooled connections to the
old server process do to the sessions holding them, and to the first write once the monitor
says the cluster is ready again.

The module reuses test_replica_failover's cluster (2 shards x 2 replicas, the monitor
polling every 0.1 s), its models and its restore fixture, which starts any node left stopped.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from test_replica_failover import (  # noqa: F401 - env and _restore are fixtures
    Acct,
    _make_cluster,
    _restore,
    _seed,
    env,
)
from waiting import health_by_node, wait_for

import shardkit

pytestmark = pytest.mark.integration


def _restart(cluster: shardkit.Cluster, node: Any, name: str, mode: str) -> None:
    """Restart ``node`` (``name`` in ``cluster``) with ``mode``, and wait until ``cluster``'s
    monitor has seen it down and then up again, with every primary ready."""
    node.stop(mode)
    wait_for(lambda: health_by_node(cluster)[name]["up"] is False, 5, f"{name} seen down")
    node.start()
    wait_for(lambda: health_by_node(cluster)[name]["up"] and cluster.health().ready, 10,
             f"{name} seen up again, the cluster ready")


# -- 1. a session holding a connection to a primary that restarted ---------------------------


@pytest.mark.parametrize("end, mode", [("close", "fast"), ("rollback", "immediate"), ("with", "fast")])
def test_session_that_read_a_restarted_primary_ends_without_an_error(env, end, mode):
    """A request reads both shards' primaries (consistency strong), s0's primary restarts
    before the request ends (the monitor sees it come back, health() is ready).  The reads
    succeeded; the transaction wrote nothing, and PostgreSQL ended it with the server
    process.  Its end (``close()``, ``rollback()``, the ``with`` block) must not raise
    PostgreSQL's "terminating connection due to administrator command" (which turns a
    request that did its work into an error page), as ``commit()`` does not in the same
    case, and as a replica's connection lost so does not; and it must give every connection
    back to its pool (s1's is lost when the end raises first)."""
    k0, k1 = env.key("s0"), env.key("s1")
    _seed(env, {k0: "a0", k1: "b0"})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster, consistency="strong")
    primary = env.dev.shard("s0").primary
    s = Session()
    raised = None
    try:
        try:
            if end == "with":
                with s:
                    assert s.execute(select(Acct.name).where(Acct.id == k1)).scalar() == "b0"
                    assert s.execute(select(Acct.name).where(Acct.id == k0)).scalar() == "a0"
                    _restart(env.cluster, primary, "s0/primary", mode)
            else:
                assert s.execute(select(Acct.name).where(Acct.id == k1)).scalar() == "b0"
                assert s.execute(select(Acct.name).where(Acct.id == k0)).scalar() == "a0"
                _restart(env.cluster, primary, "s0/primary", mode)
                getattr(s, end)()
        except Exception as e:  # noqa: BLE001 - reported below
            raised = e
        stats = env.cluster.pool_stats()
        assert raised is None, (
            f"{end}() of a session that only read from s0's primary raised after that primary "
            f"restarted: {type(raised).__name__}: {str(raised).splitlines()[0]}")
        assert stats["s1/primary"]["checkedout"] == 0, stats["s1/primary"]
        assert not s.in_transaction()
    finally:
        s.close()
    # The session and the cluster go on: the next transaction reads and writes s0.
    with Session() as s2:
        s2.get(Acct, k0).name = "a1"
        s2.commit()
    assert env.primary_value(k0) == "a1"


def test_rollback_after_a_flush_to_a_restarted_primary_is_quiet_and_loses_the_write(env):
    """A transaction flushed a write to s0, then s0's primary restarted (fast: its backend
    was told to end).  PostgreSQL rolled the write back with the server process; the
    application's rollback() (its error handler's, or the request's teardown) must not
    fail on the connection that went with it, and the write must not be there."""
    k = env.key("s0")
    _seed(env, {k: "before"})
    s = env.Session()
    try:
        s.get(Acct, k).name = "flushed, never committed"
        s.flush()
        _restart(env.cluster, env.dev.shard("s0").primary, "s0/primary", "fast")
        s.rollback()
    finally:
        s.close()
    assert env.primary_value(k) == "before"


# -- 2. the first write after a restart, with a monitor started while the node was down --------


def test_first_write_succeeds_when_the_monitor_started_while_the_primary_was_down(env):
    """The process wrote to s0 (its pool holds connections to that server process) without
    starting the monitor (strong reads, no replica read yet).  s0's primary stops; a
    readiness check (health()) starts the monitor, whose first poll finds it down; it
    starts again and health() says ready.  The next write must succeed: the monitor saw the
    node come up after it was down, so the connections pooled before are to a server process
    that is gone (README: the monitor replaces them; pre_ping is off by default).  They were
    kept, as the monitor had no earlier start time to compare with."""
    cluster = _make_cluster(env.dev)
    primary = env.dev.shard("s0").primary
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        k = env.key("s0")
        _seed(env, {k: "w0"})
        for i in range(1, 3):
            with Session() as s:
                s.get(Acct, k).name = f"w{i}"
                s.commit()
        assert cluster._monitor is None  # (nothing started it: strong reads, writes)
        assert cluster.pool_stats()["s0/primary"]["checkedin"] >= 1
        primary.stop("fast")
        assert cluster.health().ready is False  # starts the monitor: s0's primary is down
        primary.start()
        wait_for(lambda: cluster.health().ready, 10, "s0's primary back and the cluster ready")
        with Session() as s:
            s.get(Acct, k).name = "after the restart"
            s.commit()
        assert env.primary_value(k) == "after the restart"
    finally:
        cluster.dispose()
