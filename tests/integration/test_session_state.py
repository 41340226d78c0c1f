"""What a ShardedSession keeps between statements and transactions, and what it leaves
behind: the shards a transaction wrote, its replica pins, read-your-writes positions and
the connections it holds, checked against a real 2-shard x 1-replica cluster of this
module's own (tests that stop a node start it again).
"""

from __future__ import annotations

import gc
import time

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, event, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit
from replica_env import ReplicaEnv, replica_env
from waiting import wait_replicas_usable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Box(Base):
    __tablename__ = "ssr_boxes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    items: Mapped[list[Thing]] = relationship(order_by="Thing.id")


class Thing(Base):
    __tablename__ = "ssr_things"
    box_id: Mapped[int] = mapped_column(ForeignKey("ssr_boxes.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(50))


GROUPS = {"boxes": {"tables": {"ssr_boxes": "id", "ssr_things": "box_id"}}}


class Env(ReplicaEnv):
    baseline: dict[str, int] = {}  # set per test (_restore)

    def seed(self, shard: str) -> int:
        k = self.key(shard)
        with self.cluster.primary(shard).begin() as c:
            c.execute(text("INSERT INTO ssr_boxes (id, name) VALUES (:k, 'seed')"), {"k": k})
        self.caught_up((shard,))
        return k

    def checked_out(self) -> dict[str, int]:
        now = {node: (st or {}).get("checkedout", 0) for node, st in self.cluster.pool_stats().items()}
        return {node: n - self.baseline.get(node, 0) for node, n in now.items()
                if n - self.baseline.get(node, 0)}

    def rows(self, shard: str) -> dict[int, str]:
        with self.dev.shard(shard).primary.connect() as c:
            return dict(c.execute("SELECT id, name FROM ssr_boxes").fetchall())

    def primary_up(self, shard: str, up: bool) -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            nodes = {n["node"]: n for n in self.cluster.health().nodes}
            if nodes[f"{shard}/primary"]["up"] == up:
                if up:
                    time.sleep(2 * self.cluster.replica_settings.poll_interval)
                return
            time.sleep(0.05)
        raise AssertionError(f"the monitor never saw {shard}/primary {'up' if up else 'down'}")


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata, {"groups": GROUPS},
                           "ssr_boxes", "ssr_", env_class=Env)


@pytest.fixture(autouse=True)
def _restore(env):
    gc.collect()
    env.baseline = {}
    env.baseline = env.checked_out()
    yield
    for sh in env.dev.shards:
        if not sh.primary.is_running():
            sh.primary.start()
            env.primary_up(sh.name, True)
        for r in sh.replicas:
            if not r.is_running():
                r.start()
            r.wait_streaming()
    # A replica banned by a test (a read failed on it) serves the next test's reads.
    deadline = time.monotonic() + 5.0
    while any(r.banned_until > time.monotonic() for st in env.cluster.selector.monitor.shards.values()
              for r in st.replicas) and time.monotonic() < deadline:
        time.sleep(0.05)
    # (A replica restarted above is streaming; the monitor must also have seen it up.)
    wait_replicas_usable(env.cluster, every=True)


# -- state recorded by a statement that never started the transaction ---------------------------


def test_statement_refused_by_a_down_primary_leaves_no_state_for_the_next_transaction(env):
    """The first statement of a session (or of one reused after rollback()/close()) needs
    the primary of a shard that is down (a write, or a read with shardkit_role="primary"):
    ShardUnavailable, before any transaction began.  What it had recorded for its
    transaction (the shard as written, the shard's reads pinned to its primary) was
    kept, and no transaction end ever cleared it: the next transaction read that shard
    from its (down) primary instead of its replica, as a new session does, and the
    commit of a transaction that wrote only the other shard failed with
    ShardUnavailable for the shard it never used."""
    k0, k1 = env.seed("s0"), env.seed("s1")
    s = env.Session()
    try:
        env.dev.shard("s1").primary.stop(mode="immediate")
        env.primary_up("s1", False)
        with pytest.raises(shardkit.ShardUnavailable):
            s.execute(update(Box).where(Box.id == k1).values(name="lost"))
        s.rollback()
        with pytest.raises(shardkit.ShardUnavailable):
            s.execute(select(Box.name).where(Box.id == k1).execution_options(shardkit_role="primary"))
        s.close()
        # The replica serves s1's reads, as it does for a new session.
        box, nodes = env.nodes(lambda: s.get(Box, k1))
        assert box.name == "seed" and nodes == ["s1/r0"]
        s.get(Box, k0).name = "changed"
        s.commit()
        assert env.checked_out() == {}
    finally:
        s.close()
        env.dev.shard("s1").primary.start()
        env.primary_up("s1", True)
    assert env.rows("s0")[k0] == "changed"


def test_write_refused_by_a_down_primary_inside_a_transaction_does_not_fail_its_commit(env):
    """Inside a transaction, an UPDATE of s1 is refused because s1's primary is down
    (ShardUnavailable before anything ran: the transaction is intact, as the caller who
    catches it expects).  s1 still counted as written: the transaction's reads of s1 went
    to its down primary (README: its replicas keep serving reads), and the commit of the
    rest (a change on s0) failed with ShardUnavailable for s1: it asked for s1's primary
    connection to read its WAL position, for a shard the transaction never wrote."""
    k0, k1 = env.seed("s0"), env.seed("s1")
    s = env.Session()
    try:
        box = s.get(Box, k0)
        env.dev.shard("s1").primary.stop(mode="immediate")
        env.primary_up("s1", False)
        with pytest.raises(shardkit.ShardUnavailable):
            s.execute(update(Box).where(Box.id == k1).values(name="lost"))
        # Nothing was written on s1: its replica still serves the transaction's reads.
        name, nodes = env.nodes(lambda: s.execute(select(Box.name).where(Box.id == k1)).scalar_one())
        assert name == "seed" and nodes == ["s1/r0"], nodes
        box.name = "kept"
        s.commit()
        assert env.checked_out() == {}
    finally:
        s.close()
        env.dev.shard("s1").primary.start()
        env.primary_up("s1", True)
    assert env.rows("s0")[k0] == "kept" and env.rows("s1")[k1] == "seed"


# -- read-your-writes positions ------------------------------------------------------------------


def test_wal_position_lost_with_the_commit_connection_does_not_pin_reads_to_the_primary_forever(env):
    """The commit went through, but the connection died before the session read the
    shard's WAL position on it (a server restart, a proxy's idle cut): the session took
    an unreachable position for the shard, so its reads there went to the primary for
    the rest of its life, and so did those of every session handed its token (a cookie
    passed on from request to request kept it forever).  Any connection to the primary
    gives a position at or after the commit: it is read on a new one."""
    k0 = env.seed("s0")
    primary = env.cluster.primary("s0")
    armed = [True]

    def kill_before_position(conn, cursor, statement, *args):
        if armed[0] and "pg_current_wal_insert_lsn" in statement:
            armed[0] = False
            pid = conn.connection.dbapi_connection.info.backend_pid
            with env.dev.shard("s0").primary.connect() as c:
                c.execute("SELECT pg_terminate_backend(%s)", (pid,))

    event.listen(primary, "before_cursor_execute", kill_before_position)
    s = env.Session()
    try:
        s.execute(update(Box).where(Box.id == k0).values(name="committed"))
        s.commit()
    finally:
        event.remove(primary, "before_cursor_execute", kill_before_position)
    try:
        assert not armed[0]
        assert env.rows("s0")[k0] == "committed"
        token = s.consistency_token()
        env.caught_up(("s0",))
        name, nodes = env.nodes(lambda: s.execute(select(Box.name).where(Box.id == k0)).scalar_one())
        assert name == "committed" and nodes == ["s0/r0"], nodes
    finally:
        s.close()
    with env.Session(consistency_token=token) as s2:
        name, nodes = env.nodes(lambda: s2.execute(select(Box.name).where(Box.id == k0)).scalar_one())
        assert name == "committed" and nodes == ["s0/r0"], (nodes, token)
    assert env.checked_out() == {}


# -- connections a failed read leaves in the transaction ----------------------------------------


def test_replica_lost_under_a_read_inside_a_savepoint_leaves_the_savepoint_usable(env):
    """Inside begin_nested(), a read forced to a replica runs in a transaction there (it
    holds the savepoint too).  The replica's connection dies under it: shardkit drops the
    connection so the transaction goes on without it, but dropped it from the outermost
    transaction only; the savepoint still held it, and releasing the savepoint raised
    "This nested transaction is inactive", leaving the session stuck in a 'prepared'
    state where the savepoint's own write (on the primary) could only be rolled back."""
    k0 = env.seed("s0")
    replica_read = select(Box.name).where(Box.id == k0).execution_options(shardkit_role="replica")
    s = env.Session()
    try:
        s.execute(select(Box.name).where(Box.id == k0)).all()
        with s.begin_nested():
            _, nodes = env.nodes(lambda: s.execute(replica_read).all())
            assert nodes == ["s0/r0"]
            with env.dev.shard("s0").replicas[0].connect() as c:
                killed = c.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                    "backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "AND query LIKE '%ssr_boxes%'").fetchone()[0]
            assert killed >= 1
            with pytest.raises(shardkit.ShardUnavailable, match="no replica can serve"):
                s.execute(replica_read).all()
            s.execute(update(Box).where(Box.id == k0).values(name="in savepoint"))
        s.commit()
    finally:
        s.close()
    assert env.rows("s0")[k0] == "in savepoint"
    assert env.checked_out() == {}
