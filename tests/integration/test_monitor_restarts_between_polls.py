"""The replica health monitor as a readiness check and across node restarts it did
not see happen (between two polls), on a 1-shard x 1-replica cluster of this module's own.

The monitor polls each node on a connection it keeps.  When that connection dies while the
server is (again) fine -- the server restarted between two polls, an operator or a proxy ended
the monitor's backend -- the next poll fails on it.  That failure says nothing about the node:
the poll asks again on a new connection before calling the node down (a primary reported down
refuses every write for a whole poll interval; a replica gets no reads).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

POLL = 1.5  # seconds between polls: a restart fits between two of them


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "mr_acct"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")


def _config(dev: Any, **replicas: Any) -> dict[str, Any]:
    return {**dev.config_dict(), "groups": {"a": {"strategy": "hash", "tables": {"mr_acct": "id"}}},
            "replicas": {"poll_interval": POLL, "consistency": "eventual", **replicas}}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    with dev.shard("s0").primary.connect(autocommit=True) as c:
        c.execute("CREATE TABLE mr_acct (id bigint PRIMARY KEY, name varchar(50) NOT NULL DEFAULT '')")
    dev.shard("s0").replicas[0].wait_caught_up()
    return dev


@pytest.fixture
def cluster(dev):
    cl = shardkit.Cluster.from_config(_config(dev), metadata=Base.metadata)
    yield cl
    cl.dispose()
    for n in dev.shard("s0").nodes:
        if not n.is_running():
            n.start()


def _node(cluster: shardkit.Cluster, name: str) -> Any:
    state = cluster.monitor().shards["s0"]
    return state.primary if name == "s0/primary" else state.replicas[0]


def _next_poll(cluster: shardkit.Cluster, name: str, after: float | None = None) -> float:
    """Wait for the monitor's next poll of ``name`` (one answered after ``after``, default
    now); its time (NodeHealth.checked_at)."""
    node = _node(cluster, name)
    since = node.checked_at if after is None else after
    deadline = time.monotonic() + 3 * POLL + 3
    while node.checked_at == since or node.checked_at <= (after or 0):
        assert time.monotonic() < deadline, f"no poll of {name}"
        time.sleep(0.01)
    return node.checked_at


# -- 1. the monitor's own connection lost while the node is fine ------------------------------


@pytest.mark.parametrize("name", ["s0/primary", "s0/r0"])
def test_monitor_connection_ended_by_the_server_does_not_report_the_node_down(cluster, dev, name, caplog):
    """An operator (or a proxy) ends the monitor's backend on a healthy node.  The next poll
    fails on that connection; the node is fine, and a new connection answers at once.  It
    must not be reported down: a primary reported down refuses writes until the poll after."""
    cluster.start_monitor()
    node = dev.shard("s0").primary if name == "s0/primary" else dev.shard("s0").replicas[0]
    polled = _next_poll(cluster, name)
    caplog.set_level(logging.INFO, logger="shardkit.replicas")
    with node.connect(autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE application_name = 'shardkit-monitor'")
    _next_poll(cluster, name, after=polled)
    h = {n["node"]: n for n in cluster.health().nodes}[name]
    downs = [r.getMessage() for r in caplog.records if " is down" in r.getMessage()]
    assert h["up"] and not downs, (h, downs)
    if name == "s0/primary":
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.merge(Acct(id=1, name="after the monitor's connection ended"))
            s.commit()


@pytest.mark.parametrize("mode", ["fast", "kill"])
def test_primary_restarted_between_two_polls_takes_writes_after_the_next_poll(cluster, dev, mode, caplog):
    """s0's primary restarts (stop + start, or kill -9 + start) between two polls: the monitor
    never saw it down.  Its next poll fails on the connection to the old server process; the
    server is up.  Writes must not be refused from then until the poll after (they were, with
    "primary s0/primary is down (AdminShutdown ...)"), and the pool's connections to the old
    server process are replaced (the restart is seen at that poll: its start time changed)."""
    cluster.start_monitor()
    primary = dev.shard("s0").primary
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session() as s:  # a pooled connection to the server process about to go
        s.merge(Acct(id=2, name="before"))
        s.commit()
    # (The monitor retires the pool's connections, keeping the pool and its count: see
    # test_pool_renewal_cap.py.)
    invalidated_before = cluster.primary("s0").pool._invalidate_time
    polled = _next_poll(cluster, "s0/primary")
    started = time.monotonic()
    if mode == "kill":
        primary.kill()
    else:
        primary.stop("fast")
    primary.start()
    if time.monotonic() - started > POLL * 0.8 or _node(cluster, "s0/primary").checked_at != polled:
        pytest.skip("the restart took longer than the poll interval: the monitor saw it")
    caplog.set_level(logging.INFO, logger="shardkit.replicas")
    _next_poll(cluster, "s0/primary", after=polled)
    downs = [r.getMessage() for r in caplog.records if " is down" in r.getMessage()]
    assert not downs, downs
    assert cluster.primary("s0").pool._invalidate_time > invalidated_before, \
        "the restart was not seen: the pool's connections were kept"
    with Session() as s:
        s.merge(Acct(id=2, name="after"))
        s.commit()
