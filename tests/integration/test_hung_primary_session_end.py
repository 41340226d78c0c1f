"""Ending and committing sessions when a primary's health poll is late or the session wrote
in autocommit or used an engine of its own, and `status` of such a primary."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import health_by_node, resume, server_pids, wait_for, wait_replicas_usable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "hung_primary_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(20))


@pytest.fixture(scope="module")
def dev_1x1(shardkit_module_cluster_factory):
    """The servers of ``autocommit_world`` (1 shard with 1 replica), started once for the
    module: its tests stop a primary with SIGSTOP and let it go on (SIGCONT) before they end."""
    return shardkit_module_cluster_factory(shards=1, replicas=1)


@pytest.fixture(scope="module")
def dev_1x0(shardkit_module_cluster_factory):
    """The server of ``late_world`` (1 shard, no replica), started once for the module (as
    ``dev_1x1``)."""
    return shardkit_module_cluster_factory(shards=1, replicas=0)


@pytest.fixture
def autocommit_world(dev_1x1):
    """(dev cluster, Cluster whose primary runs in autocommit and is polled every 0.1 s,
    sessionmaker): 1 shard with 1 replica."""
    dev = dev_1x1
    if not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    cfg = {**dev.config_dict(), "groups": {"notes": {"tables": {"hung_primary_notes": "id"}}},
           "replicas": {"poll_interval": 0.1, "poll_timeout": 0.5}}
    plain = shardkit.Cluster.from_config(cfg)
    Base.metadata.create_all(plain.primary("s0"))
    plain.dispose()
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata,
                                           engine_options={"isolation_level": "AUTOCOMMIT"})
    try:
        cluster.start_monitor()
        wait_replicas_usable(cluster)
        yield dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    finally:
        cluster.dispose()


@pytest.mark.parametrize("end", ["close", "rollback"])
def test_ending_a_session_that_wrote_in_autocommit_does_not_hang_on_a_hung_primary(autocommit_world, end):
    """The transaction's end reads the primary's WAL position for read-your-writes (the
    writes committed as they ran).  A primary that hangs (stopped, accepting TCP) would
    hold close()/rollback() for ever on the pooled connection: the monitor knows it does
    not answer, so the position is unknown (reads go to the primary) without asking."""
    dev, cluster, Session = autocommit_world
    mon = cluster.monitor()
    s = Session()
    s.add(Note(id=int(time.time() * 1000) % 10**9, body="x"))
    s.flush()                                  # committed as it ran
    pids = server_pids(dev.shards[0].primary)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # until the monitor has not heard from the primary for hung_after (health() then
        # reports it down), the state the session's end must cope with
        wait_for(lambda: not health_by_node(cluster)["s0/primary"]["up"], mon.hung_after + 5,
                 "the monitor to find the stopped primary hung")
        out: dict = {}

        def end_it() -> None:
            try:
                getattr(s, end)()
                out["ok"] = True
            except Exception as e:  # noqa: BLE001 - reported to the test
                out["error"] = e

        t = threading.Thread(target=end_it, daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(timeout=5)
        assert not t.is_alive(), f"session.{end}() waits for the hung primary"
        assert out == {"ok": True}, out
        assert time.monotonic() - t0 < 3  # ms without asking; waiting for the poll's answer: hung_after (4 s)
        # Its writes stay visible to it: reads of s0 go to the primary.
        assert s._sk_tokens.get("s0") is not None
    finally:
        resume(pids)
        s.close()


@pytest.fixture
def late_world(dev_1x0):
    """(dev cluster, Cluster polling every 0.1 s): 1 shard, no replica."""
    dev = dev_1x0
    if not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    cfg = {**dev.config_dict(), "groups": {"notes": {"tables": {"hung_primary_notes": "id"}}},
           "replicas": {"poll_interval": 0.1, "poll_timeout": 0.5}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    try:
        Base.metadata.create_all(cluster.primary("s0"))
        cluster.start_monitor()
        yield dev, cluster
    finally:
        cluster.dispose()


def test_status_of_a_primary_whose_poll_is_late_does_not_query_it(late_world):
    """health() reports a primary whose poll is late as up (its writes wait for the answer,
    up to hung_after).  `shardkit status` (collect) counted its connections and rows on it
    as on any node up: on a pooled connection to a stopped server that query never ends.
    It shows the node as health() does, without asking it."""
    from shardkit._status import collect, render

    dev, cluster = late_world
    mon = cluster.monitor()
    with cluster.primary("s0").connect() as c:       # a pooled connection to s0 exists
        c.exec_driver_sql("SELECT 1")
    p = mon.shards["s0"].primary
    pids = server_pids(dev.shards[0].primary)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        while p.heard_from(time.monotonic(), mon.stale_after):
            time.sleep(0.02)
        out: dict = {}

        def run() -> None:
            try:
                out["data"] = collect(cluster)
            except Exception as e:  # noqa: BLE001 - reported to the test
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout=mon.hung_after - mon.stale_after)
        assert not t.is_alive(), "status waits for the primary whose poll is late"
        data = out["data"]
        node = data["shards"][0]["nodes"][0]
        assert node["up"] and data["ready"], node
        assert node["connections"] is None
        text = render(data)
        assert "writes wait" in text, text
    finally:
        resume(pids)


@pytest.mark.parametrize("end", ["close", "rollback"])
def test_ending_a_session_that_also_used_an_engine_of_its_own(late_world, end):
    """A session may run a statement on an engine the application gives it (an explicit
    ``bind``: another database, in the same session).  The end of a transaction that
    wrote to a shard looks at every connection's engine for autocommit: one that is not
    a shardkit engine (no ``info``) made rollback() and close() raise AttributeError."""
    from sqlalchemy import create_engine, text

    dev, cluster = late_world
    other = create_engine("sqlite://")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    s = Session()
    try:
        s.add(Note(id=424242, body="x"))
        s.flush()
        conn = s.connection(bind_arguments={"bind": other})
        assert conn.execute(text("SELECT 1")).scalar() == 1
        getattr(s, end)()                  # nothing committed: the row is gone
        assert s.get(Note, 424242) is None
    finally:
        s.close()
        other.dispose()


def test_committing_a_session_that_also_used_an_engine_of_its_own(late_world):
    """The same at commit: the checks before the COMMIT name each connection's node, and an
    engine the application gave (no ``info``) made commit() raise AttributeError."""
    from sqlalchemy import create_engine, text

    dev, cluster = late_world
    other = create_engine("sqlite://")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    try:
        with Session() as s:
            s.add(Note(id=424243, body="y"))
            s.flush()
            assert s.connection(bind_arguments={"bind": other}).execute(text("SELECT 1")).scalar() == 1
            s.commit()
        with Session(consistency="strong") as s:
            assert s.get(Note, 424243).body == "y"
            s.delete(s.get(Note, 424243))
            s.commit()
    finally:
        other.dispose()
