"""Pools per node, as a demanding user checks them: the monitor's renewal of a node's pool
keeps the node's max_connections cap and pool_stats() true.
On the session-shared cluster (no node is stopped: a first poll that fails and a restart
are made by the monitor's poll function)."""

from __future__ import annotations

import threading

import psycopg
import pytest
from own_tables import cluster_with_tables
from waiting import wait_for
from sqlalchemy import BigInteger, String, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._replicas import HealthMonitor

pytestmark = pytest.mark.integration

APP = "pools-renewal"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pools_renewal_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


def _named(url: str) -> str:
    return make_url(url).update_query_dict({"application_name": APP}).render_as_string(hide_password=False)


def _config(dev, named=True, **extra):
    """The cluster's config; ``named``: its connections carry APP as their application_name."""
    cfg = dev.config_dict()
    for s in cfg["shards"] if named else ():
        s["primary"] = _named(s["primary"])
        s["replicas"] = [_named(r) for r in s["replicas"]]
    return {**cfg, "groups": {"items": {"tables": {Item.__tablename__: "id"}}}, **extra}


def _renewed_while_held(cluster, eng, node, renewed) -> None:
    """Hold the node's two connections (its cap) while the monitor renews its pool."""
    # (The connections of a test before, closed, leave pg_stat_activity a moment later.)
    wait_for(lambda: _backends(node) == 0, 10, "the connections of the test before to close")
    held = [eng.connect() for _ in range(2)]
    more = []
    try:
        for c in held:
            c.execute(text("SELECT 1"))
        cluster.start_monitor()
        # (Renewed at the second poll, 0.05 s after the first: the bound is for a loaded host.)
        if not renewed.wait(30):
            mon = cluster.monitor(wait=False)
            n = mon.shards["s2"].primary
            threads = [t.name for t in mon._threads if t.is_alive()]
            pytest.fail(f"the monitor did not renew s2/primary's pool: up={n.up} error={n.error!r} "
                        f"seen={n._seen} start={n._server_start!r} running={mon.running} "
                        f"live poll threads={threads}")
        assert cluster.pool_stats()["s2/primary"]["checkedout"] == 2, cluster.pool_stats()["s2/primary"]
        with pytest.raises(sa_exc.TimeoutError, match="node s2/primary"):
            more.append(eng.connect())
        assert _backends(node) <= 2
    finally:
        for c in held + more:
            c.close()


def _backends(node) -> int:
    """This module's connections to a dev node (the monitor's are named shardkit-monitor)."""
    with psycopg.connect(node.dsn, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                         (APP,)).fetchone()[0]


@pytest.fixture(scope="module")
def dev(sharded_dev):
    with cluster_with_tables(sharded_dev, _config(sharded_dev, named=False), Base.metadata) as c:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
        with Session() as s:
            s.add_all([Item(id=i, v=str(i)) for i in range(24)])
            s.commit()
        for shard in sharded_dev.shards:
            for r in shard.replicas:
                r.wait_caught_up()
        yield sharded_dev


@pytest.mark.parametrize("how", ["first poll failed", "restarted"])
def test_a_renewed_pool_keeps_the_node_cap_and_its_count(dev, monkeypatch, how):
    """The monitor renews a node's pool when its first polls failed and it answers now, or
    when its start time changed.  The connections in use then are live (the server never
    restarted; or, after a restart, made since by a checkout that reconnected): they must
    stay counted, so that the process never holds more than max_connections to the node, and
    pool_stats() shows them; once returned, none may stay open outside the pool."""
    cluster = shardkit.Cluster.from_config(
        _config(dev, pool={"max_connections": 2, "timeout": 0.3}, replicas={"poll_interval": 0.05}))
    node = dev.shard("s2").primary
    real = HealthMonitor._poll
    renewed = threading.Event()
    polls = []

    def poll(self, conn, n):
        # (Only this cluster's monitor: another one of the process, such as a session-wide
        # fixture's, polls nodes of the same names; had it taken the failing first poll,
        # this monitor's first poll would answer, with no reason to renew anything.)
        if self.cluster is not cluster or n.name != "s2/primary":
            return real(self, conn, n)
        polls.append(n)
        if how == "first poll failed" and len(polls) == 1:
            raise psycopg.OperationalError("a first poll failing (made by the test)")
        row = real(self, conn, n)
        if how == "restarted" and len(polls) >= 3:
            row = (*row[:3], "2999-01-01 00:00:00+00", *row[4:])  # a new server start time
        return row

    def renew(*args):
        renew_pool(*args)
        renewed.set()

    monkeypatch.setattr(HealthMonitor, "_poll", poll)
    renew_pool = cluster._renew_pool
    monkeypatch.setattr(cluster, "_renew_pool", renew)
    eng = cluster.primary("s2")
    try:
        _renewed_while_held(cluster, eng, node, renewed)
        # The connections renewed are replaced as they are checked out again.
        with eng.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
        # (A closed connection's server process leaves pg_stat_activity a moment later.)
        wait_for(lambda: _backends(node) <= 2, 5, "the old pool's returned connections to close")
        assert cluster.pool_stats()["s2/primary"]["checkedout"] == 0
    finally:
        cluster.dispose()
