"""Cross-shard reads on a cluster with streaming replicas: what happens to a scatter's
shards when a replica hangs or dies under it.

One 2-shard x 1-replica cluster serves the module; tests that stop, kill or delay a
replica restore it before they end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from replica_env import ReplicaEnv, replica_env
from waiting import health_by_node, resume, server_pids, wait_for

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "srr_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


GROUPS = {"srr": {"tables": {"srr_accounts": "id"}}}


class Env(ReplicaEnv):
    def keys(self, shard: str, n: int) -> list[int]:
        return [self.key(shard) for _ in range(n)]

    def replica(self, shard: str) -> Any:
        return self.dev.shard(shard).replicas[0]

    def on_primary(self, shard: str, sql: str, **params: Any) -> list[Any]:
        with self.cluster.primary(shard).connect() as c:
            return list(c.execute(text(sql), params).all())


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata, {"groups": GROUPS},
                           "srr_accounts", "srr_", env_class=Env)


@pytest.fixture(autouse=True)
def _replicas_running(env):
    yield
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
    for s in env.dev.shards:
        for r in s.replicas:
            r.wait_streaming()
    wait_for(lambda: all(h["up"] and not h["banned_for_s"] for h in health_by_node(env.cluster).values()),
             10, "the monitor to see every node up")


def _seed(env: Env, rows: dict[int, str]) -> None:
    with env.Session() as s:
        s.add_all(Acct(id=k, name=v) for k, v in rows.items())
        s.commit()
    env.caught_up()


# -- a replica that hangs under a scatter with shardkit_timeout -----------------------------------


def test_scatter_timeout_holds_when_a_replica_hangs_under_the_read(env):
    """s1's replica is frozen (SIGSTOP: a paused VM, a storage stall) just after the monitor
    last saw it, and a cross-shard read with shardkit_timeout=1 and partial results asks it.
    The read must come back soon after its timeout with s1 in missing_shards.  It waited
    for as long as the replica stayed frozen (here until the test thawed it, 20 s later):
    the cancel request sent at the deadline (libpq's PQcancel) waits for the frozen server
    to answer, so the socket shut-down meant for a cancel that does not work never came."""
    node = env.replica("s1")
    if not hasattr(node, "_pid") or not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    k0, k1 = env.keys("s0", 1)[0], env.keys("s1", 1)[0]
    _seed(env, {k0: "hang-a", k1: "hang-b"})
    stmt = select(Acct.name).where(Acct.name.like("hang-%")).order_by(Acct.name)
    for _ in range(2):  # pooled connections on both replicas
        with env.Session(consistency="eventual") as s:
            rows, nodes = env.nodes(lambda: s.execute(stmt).all())
            assert rows == [("hang-a",), ("hang-b",)] and sorted(nodes) == ["s0/r0", "s1/r0"], nodes
    pids = server_pids(node)
    # Thawed by a process of its own, whatever happens to this one.
    thaw = subprocess.Popen(["sh", "-c", "sleep 20; kill -CONT " + " ".join(map(str, pids))])
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with env.Session(consistency="eventual") as s:
            result = s.execute(stmt.execution_options(shardkit_timeout=1.0, shardkit_partial_results=True))
            rows = result.all()
            elapsed = time.monotonic() - t0
            assert rows == [("hang-a",)]
            assert set(result.missing_shards) == {"s1"}
            assert "no answer within 1 s" in str(result.missing_shards["s1"])
        assert elapsed < 10, f"the scatter took {elapsed:.1f} s with shardkit_timeout=1"
    finally:
        resume(pids)
        thaw.kill()
        thaw.wait()


# -- a replica that dies under a streamed scatter inside a transaction that wrote ----------------


def _stream_then_kill(env: Env, s: Any, stmt: Any, victim: Any) -> BaseException | None:
    result, nodes = env.nodes(lambda: s.execute(stmt))
    assert victim.name in nodes, nodes
    try:
        for i, _row in enumerate(result):
            if i == 300:
                victim.kill()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("scatter", [True, False], ids=["scatter", "one-shard"])
def test_commit_after_a_replica_died_under_a_stream_is_refused_not_half_done(env, scatter):
    """A transaction writes a row to s0, then streams (yield_per) rows of s1 from s1's
    replica, which dies mid-stream: the iteration fails with ShardUnavailable (README).
    If the application goes on and commits, the commit must either commit everything or
    refuse clearly with nothing committed.  It raised SQLAlchemy's PendingRollbackError
    ("Can't reconnect until invalid transaction is rolled back") from the dead replica's
    connection, which the transaction still held; in the cross-shard read, s0's primary
    had committed just before, so the caller was told the commit failed while its write
    was in (and got no read-your-writes token for it); in the one-shard read the write
    was lost.  Now the commit is refused before any shard commits (CommitError naming
    the replica, nothing committed), as for a shard whose transaction an error aborted."""
    ks = env.keys("s1", 1500)
    _seed(env, {k: f"n{k:06d}" for k in ks})
    mine = env.keys("s0", 1)[0]
    victim = env.replica("s1")
    stmt = select(Acct.id).order_by(Acct.id).execution_options(yield_per=100)
    if scatter:
        stmt = stmt.where(Acct.name.like("n%"))
    else:
        stmt = stmt.where(Acct.id.in_(ks))
    s = env.Session(consistency="eventual")
    try:
        s.add(Acct(id=mine, name="mine"))
        s.flush()
        error = _stream_then_kill(env, s, stmt, victim)
        assert isinstance(error, shardkit.ShardUnavailable), repr(error)
        with pytest.raises(shardkit.CommitError) as ei:
            s.commit()
        assert "s1/r0" in str(ei.value) and ei.value.committed == [], str(ei.value)
        s.rollback()
    finally:
        s.close()
    assert env.on_primary("s0", "SELECT name FROM srr_accounts WHERE id = :k", k=mine) == []
    # The session works again: the same write commits once the transaction is run again.
    with env.Session() as s:
        s.add(Acct(id=mine, name="mine"))
        s.commit()
    assert env.on_primary("s0", "SELECT name FROM srr_accounts WHERE id = :k", k=mine) == [("mine",)]
