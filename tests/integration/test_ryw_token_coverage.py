"""Read-your-writes tokens at their edges: rows a commit writes after
shardkit noted the written shards (an application's before_commit or after_flush_postexec
listener), a token the replicas lack while the shard's primary hangs, a read of several
shards waiting for its token, and the WAL position a move records under asynchronous commit.

One 2-shard x 1-replica cluster serves the module; tests that delay replicas restore them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._replicas import parse_token
from replica_env import lagging, on_primary, replica_env
from waiting import server_pids

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "tk5_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata,
                           {"groups": {"tk5": {"tables": {"tk5_items": "id"}}}},
                           "tk5_items", "tk5_")


def read(env, s, k):
    return env.nodes(lambda: s.execute(select(Item.name).where(Item.id == k)).scalar())


# -- writes the commit makes after shardkit noted the written shards ----------------------


@pytest.mark.parametrize("hook", ["before_commit", "after_flush_postexec"])
def test_a_row_a_commit_listener_adds_on_another_shard_is_in_the_token(env, hook):
    """An application listener that adds a row while the session commits (an audit or
    outbox row in before_commit; a row added in after_flush_postexec, which SQLAlchemy's
    commit flushes again for) writes a shard the commit's first flush did not: the commit
    covers it, so the token must name it and later reads must see the row."""
    k0, k1 = env.key("s0"), env.key("s1")

    added = []

    def add_audit(session, *a):
        if not added:
            added.append(Item(id=k1, name="audit"))
            session.add(added[0])

    with lagging(env, shards=("s1",)):
        with env.Session() as s:
            event.listen(s, hook, add_audit)
            s.add(Item(id=k0, name="main"))
            s.commit()
            assert env.primary_value("s1", f"SELECT name FROM tk5_items WHERE id = {k1}") == "audit"
            tok = s.consistency_token()
            assert set(parse_token(tok)) == {"s0", "s1"}, tok
            name, nodes = read(env, s, k1)
            assert name == "audit", f"the session's own committed row read back as {name!r} on {nodes}"
        with env.Session(consistency_token=tok) as s2:
            name, nodes = read(env, s2, k1)
            assert name == "audit" and on_primary(nodes, "s1"), (name, nodes)


# -- a hung primary ---------------------------------------------------------------------


@pytest.mark.parametrize("token", ["own", "foreign"])
def test_a_token_the_replicas_lack_does_not_hang_a_read_on_a_hung_primary(env, token):
    """A primary that hangs (its processes stopped: TCP accepted, nothing answers) gets no
    new statements: writes fail fast (test_hung_primary), reads use its replicas.  A read
    whose token the replicas have not replayed (a write just before the hang, or a token
    past the primary's position) must not wait on it either: it fails fast with
    ShardUnavailable, as the read sent to that primary would.  The check of the token
    against the primary's position asked the hung primary on a pooled connection and
    waited for ever."""
    if not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    k = env.key("s0")
    with lagging(env, shards=("s0",)):
        with env.Session() as s:
            s.add(Item(id=k, name="new"))
            s.commit()
            tok = s.consistency_token() if token == "own" else "v1:s0=FF/0"
        pids = server_pids(env.dev.shard("s0").primary)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        out: dict = {}

        def reader():
            try:
                with env.Session(consistency_token=tok) as s2:
                    out["got"] = read(env, s2, k)
            except Exception as e:  # noqa: BLE001 - reported to the test
                out["error"] = e
        try:
            time.sleep(env.cluster.monitor().stale_after + 0.5)
            t = threading.Thread(target=reader, daemon=True)
            t.start()
            t.join(timeout=20)
            hung = t.is_alive()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        t.join(timeout=30)
        assert not hung, "a read of s0 is still waiting on its hung primary"
        assert isinstance(out.get("error"), shardkit.ShardUnavailable), out
        assert out["error"].shard == "s0" and "has not answered" in str(out["error"])


# -- waiting for a token on several shards ---------------------------------------------------


def test_a_read_of_several_shards_waits_for_the_token_once_not_once_per_shard(env):
    """wait_for_token is how long a read-your-writes read may wait for a replica to reach the
    session's position.  A read of several shards (a scatter read after a write to each, or to
    a reference table, which names every shard in the token) chose each shard's node in turn
    and gave each its own wait_for_token: N shards behind waited N times as long.  The waits
    of one read share one wait_for_token; the read is still served (by the primaries)."""
    wait = 1.0
    cfg = {**env.dev.config_dict(), "groups": {"tk5": {"tables": {"tk5_items": "id"}}},
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "wait_for_token": wait}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    try:
        cluster.start_monitor()
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        k0, k1 = env.key("s0"), env.key("s1")
        selector = cluster.selector
        waits: list[float] = []
        probe = selector.probe_reached

        def recorded(shard, replica, min_lsn, w):
            waits.append(w)
            return probe(shard, replica, min_lsn, w)
        with lagging(env, shards=("s0", "s1")):
            with Session() as s:
                s.add_all([Item(id=k0, name="a"), Item(id=k1, name="b")])
                s.commit()
                tok = s.consistency_token()
            assert set(parse_token(tok)) == {"s0", "s1"}, tok
            selector.probe_reached = recorded
            with Session(consistency_token=tok) as s2:
                got = s2.execute(select(Item.name).where(Item.id.in_([k0, k1]))).scalars().all()
        assert sorted(got) == ["a", "b"]
        assert len(waits) == 2, waits
        assert sum(waits) <= wait, f"one read waited {waits} for its token (wait_for_token = {wait})"
    finally:
        cluster.dispose()


# -- the position a move records after its commit -------------------------------------------


def test_the_position_a_move_records_covers_its_commit_under_asynchronous_commit(env):
    """A move records, after each commit the replicas must have replayed before they serve
    the moved buckets (the cut-over on the target, the clean-up on the source), the server's
    WAL position (Cluster.moved_lsn).  It read the flushed position, which under
    synchronous_commit = off (a common setting for write-heavy servers) is still before the
    commit it just made: a replica that had replayed only that far (it receives flushed WAL
    only) counted as past the move and served moved rows from before it.  A replica that has
    replayed the recorded position must have the commit."""
    from shardkit import rebalance
    from shardkit._replicas import parse_lsn

    k = env.key("s0")
    node = env.dev.shard("s0").primary
    replica = env.dev.shard("s0").replicas[0]
    with node.connect() as admin:
        admin.execute("ALTER SYSTEM SET wal_writer_delay = '5s'")
        admin.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)  # the WAL writer's sleep after the reload: not a wait for a result
        with node.connect(autocommit=False) as conn:
            conn.execute("SET synchronous_commit = off")
            conn.execute("INSERT INTO tk5_items (id, name) VALUES (%s, 'async')", (k,))
            conn.commit()
            position = parse_lsn(rebalance._committed_position(conn))
            conn.rollback()
        deadline = time.monotonic() + 60
        with replica.connect() as r:
            while parse_lsn(r.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()[0]) < position:
                assert time.monotonic() < deadline, "the replica never replayed the recorded position"
                time.sleep(0.05)
            seen = r.execute("SELECT name FROM tk5_items WHERE id = %s", (k,)).fetchone()
        assert seen == ("async",), "a replica past the recorded position lacks the commit before it"
    finally:
        with node.connect() as admin:
            admin.execute("ALTER SYSTEM RESET wal_writer_delay")
            admin.execute("SELECT pg_reload_conf()")
