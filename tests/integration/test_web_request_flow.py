"""Replica routing as a web application meets it: a Session per request, the consistency
token in a cookie, a readiness check, errors shown to an operator.

Against a real 2-shard cluster (one streaming replica per shard) of this module's own.
Each test leaves the cluster as it found it (nodes running, no apply delay).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import BigInteger, String, event, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import resume, server_pids, wait_for, wait_replicas_usable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "wr6e_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


GROUPS = {"groups": {"items": {"tables": {"wr6e_items": "id"}}}}
REPLICAS = {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 1.0}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    d = shardkit_module_cluster_factory(shards=2, replicas=1)
    cluster = shardkit.Cluster.from_config({**d.config_dict(), **GROUPS})
    try:
        for s in cluster.shard_names:
            Base.metadata.create_all(cluster.primary(s))
    finally:
        cluster.dispose()
    return d


@pytest.fixture
def env(dev):
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS, "replicas": REPLICAS})
    served: list[tuple[str, str]] = []
    for s in cluster.shard_names:
        for eng in (cluster.primary(s), cluster.engine(s, "replica", 0)):
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k: served.append((node, st)))
    cluster.start_monitor()
    wait_replicas_usable(cluster)
    try:
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served
    finally:
        cluster.dispose()


_used: set[int] = set()


def _key(cluster: shardkit.Cluster, shard: str) -> int:
    k = next(k for k in range(1, 100_000) if k not in _used and cluster.shard_for("wr6e_items", k) == shard)
    _used.add(k)
    return k


def _caught_up(dev: Any, shard: str) -> None:
    with dev.shard(shard).primary.connect() as c:
        c.execute("SELECT txid_current()")
    dev.shard(shard).replicas[0].wait_caught_up()


def test_a_read_forced_to_a_hung_only_replica_says_why_not_no_replicas(dev, env):
    """The shard's only replica stops answering (its processes stopped: it accepts TCP,
    never answers).  health() reports it down; a read forced to replicas (a report kept
    off the primary) is refused: the error must name the replica and why, as health()
    does, not claim the shard has "no replicas" (which sends an operator to the config)."""
    cluster, Session, _ = env
    node = dev.shard("s0").replicas[0]
    if not hasattr(node, "datadir") or not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    k = _key(cluster, "s0")
    pids = server_pids(node)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not {n["node"]: n for n in cluster.health().nodes}["s0/r0"]["up"], 10,
                 "health() to report the stopped replica down")
        with Session() as s:
            with pytest.raises(shardkit.ShardUnavailable) as ei:
                s.execute(select(Item.name).where(Item.id == k)
                          .execution_options(shardkit_role="replica")).all()
        msg = str(ei.value)
        assert "no replicas" not in msg, msg
        assert "s0/r0" in msg and "health poll" in msg, msg
    finally:
        resume(pids)
    wait_replicas_usable(cluster)


def test_a_down_primary_of_a_shard_without_replicas_is_not_said_to_leave_replicas(dev):
    """A shard configured without replicas (the other has one), the monitor running (a
    readiness check calls health()): its primary goes down.  A read of that shard is
    refused too (it has nowhere else to go); its error must not say the read was a write,
    nor that "reads can still use its replicas"."""
    cfg = {**dev.config_dict(), **GROUPS, "replicas": REPLICAS}
    cfg["shards"] = [dict(sc) for sc in cfg["shards"]]
    cfg["shards"][1]["replicas"] = []
    cluster = shardkit.Cluster.from_config(cfg)
    primary = dev.shard("s1").primary
    try:
        assert cluster.health().ready
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        k = _key(cluster, "s1")
        primary.stop()
        try:
            wait_for(lambda: not cluster.health().ready, 10, "s1's primary to be seen down")
            with Session() as s:
                with pytest.raises(shardkit.ShardUnavailable) as read:
                    s.get(Item, k)
            with Session() as s:
                s.add(Item(id=k, name="w"))
                with pytest.raises(shardkit.ShardUnavailable) as write:
                    s.commit()
        finally:
            primary.start()
        for err in (read.value, write.value):
            msg = str(err)
            assert err.shard == "s1", msg
            assert "its replicas" not in msg, msg
            assert "no replicas" in msg, msg
        wait_for(lambda: cluster.health().ready, 30, "s1's primary back")
    finally:
        cluster.dispose()
    _caught_up(dev, "s1")


def test_a_commit_whose_connection_is_lost_after_the_server_committed_is_read_back(dev, env, monkeypatch):
    """The primary commits, then the connection goes before its answer arrives (a network
    blip): commit() raises, and the README says to check the rows before re-applying them.
    That check, in the same session (and in one given its token), must see the commit if
    it happened, never read a lagging replica that lacks it and conclude the write is
    missing (re-applying it would write it twice)."""
    cluster, Session, served = env
    k = _key(cluster, "s0")
    eng = cluster.primary("s0")
    dialect = eng.dialect
    committed = dialect.do_commit
    fired: list[int] = []

    def commit_then_lose(dbapi_connection: Any) -> None:
        committed(dbapi_connection)
        if fired:
            return
        raw = dbapi_connection.driver_connection
        fired.append(raw.info.backend_pid)
        with psycopg.connect(dev.shard("s0").primary.dsn, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (raw.info.backend_pid,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                raw.execute("SELECT 1")  # the server's end is gone: OperationalError
            except psycopg.OperationalError:
                raise
            time.sleep(0.05)
        raise AssertionError("the backend was not terminated")

    replica = dev.shard("s0").replicas[0]
    replica.set_apply_delay(30)
    try:
        time.sleep(0.3)
        monkeypatch.setattr(dialect, "do_commit", commit_then_lose)
        with Session() as s:
            s.add(Item(id=k, name="paid"))
            with pytest.raises(Exception):  # the driver's error (or ShardUnavailable)
                s.commit()
            monkeypatch.setattr(dialect, "do_commit", committed)
            assert fired, "the simulated loss did not happen"
            s.rollback()
            # The write is on the primary (its COMMIT ran), not on the lagging replica.
            with eng.connect() as c:
                assert c.execute(text("SELECT name FROM wr6e_items WHERE id = :k"), {"k": k}).scalar() == "paid"
            n0 = len(served)
            row = s.execute(select(Item.name).where(Item.id == k)).scalar()
            nodes = [n for n, st in served[n0:] if "wr6e_items" in st]
            assert row == "paid", (row, nodes)
            token = s.consistency_token()
        with Session(consistency_token=token) as s2:
            assert s2.execute(select(Item.name).where(Item.id == k)).scalar() == "paid"
    finally:
        replica.set_apply_delay(0)
        _caught_up(dev, "s0")
