"""A connection the transaction only read from, lost at its COMMIT.

A session that wrote to one shard and read another's primary commits each connection in
turn.  When the server behind a primary connection that only read goes away before its
COMMIT, nothing written is lost: the commit goes on and succeeds (as it does for a
replica's connection, and as the partial-results path drops such connections).  When a
written shard's COMMIT fails, a shard that was only read is never reported as one whose
"writes are committed".
Against a real 2-shard cluster (one replica per shard) of this module's own.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import BigInteger, String, event, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from own_tables import ShardEnv
from test_threads_sharing_a_cluster import checked_out
from waiting import wait_for, wait_replicas_usable

pytestmark = pytest.mark.integration


class ClBase(DeclarativeBase):
    pass


class Note(ClBase):
    __tablename__ = "cl_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50), default="")


GROUPS = {"groups": {"notes": {"strategy": "hash", "tables": {"cl_notes": "id"}}}}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    class Env(ShardEnv):
        model = Note

    with Env.started(shardkit_module_cluster_factory(shards=2, replicas=1), GROUPS,
                     ClBase.metadata) as e:
        yield e


@pytest.fixture
def cl(env):
    env.reset("cl_notes")
    a, b = env.keys_on("s0", 2), env.keys_on("s1", 2)
    with env.Session()() as s:
        s.add_all([Note(id=k, body="seed") for k in a + b])
        s.commit()
    for shard, keys in (("s0", a), ("s1", b)):
        replica = env.cluster.engine(shard, "replica", 0)
        wait_for(lambda: _count_on(replica, keys) == len(keys), 30, f"{shard}'s replica to replay")
    wait_replicas_usable(env.cluster)
    return env, a, b


def _count_on(engine, keys) -> int:
    """Rows of ``keys`` on ``engine``'s node; -1 while a replica has not replayed the table's
    creation yet (a fresh module cluster's)."""
    with engine.connect() as c:
        try:
            return c.execute(select(func.count()).select_from(Note).where(Note.id.in_(keys))).scalar_one()
        except sa_exc.ProgrammingError as e:
            if getattr(e.orig, "sqlstate", None) != "42P01":  # undefined_table
                raise
            return -1


def _terminate(engine, pid: int) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})


def _at_first_commit(env, action):
    """Call ``action()`` when either primary's first COMMIT is about to be sent."""
    fired: list[str] = []

    def hook(conn):
        if not fired:
            fired.append(conn.engine.info["shard"])
            action()

    for s in env.names:
        event.listen(env.cluster.primary(s), "commit", hook)

    def remove():
        for s in env.names:
            event.remove(env.cluster.primary(s), "commit", hook)
    return fired, remove


@pytest.mark.parametrize("attempt", range(3))
def test_primary_only_read_lost_at_commit_does_not_fail_the_commit(cl, caplog, attempt):
    """Write on s0, read on s1's primary (strong); s1's server connection is killed just
    before the first COMMIT (whichever shard's comes first): s0's write commits, commit()
    returns, a warning names s1/primary, and the session goes on."""
    env, a, b = cl
    s = env.Session(consistency="strong")()
    key = env.keys_on("s0", 1, 50_000)[0]
    s.add(Note(id=key, body="w"))
    s.flush()
    assert s.execute(select(Note.body).where(Note.id == b[0])).scalar_one() == "seed"
    pid = s.execute(select(func.pg_backend_pid()).select_from(Note).where(Note.id == b[0])).scalar_one()
    fired, remove = _at_first_commit(env, lambda: _terminate(env.cluster.primary("s1"), pid))
    caplog.set_level(logging.WARNING, logger="shardkit")
    try:
        s.commit()
    finally:
        remove()
    assert fired
    assert key in env.ids("s0")
    assert any("s1/primary" in r.getMessage() and "only read" in r.getMessage() for r in caplog.records)
    assert s.execute(select(Note.body).where(Note.id == b[1])).scalar_one() == "seed"
    s.close()
    assert checked_out(env.cluster) == {}


def test_a_shard_only_read_is_never_reported_as_committed_writes(cl):
    """Write on s0, read on s1's primary; s0's connection is killed when s1's COMMIT is
    sent.  When s1's COMMIT comes first, s0's then fails: nothing was written anywhere but
    s0, so commit() raises the driver's error as a plain Session does, not a CommitError
    saying s1's "writes are committed".  (When s0's comes first, it commits and nothing
    fails.)  Repeated until both orders were seen, or 20 times."""
    env, a, b = cl
    seen = set()
    for i in range(20):
        key = env.keys_on("s0", 1, 70_000 + 1000 * i)[0]
        s = env.Session(consistency="strong")()
        s.add(Note(id=key, body="w"))
        s.flush()
        pid0 = s.connection(bind_arguments={"shard_id": "s0"}).exec_driver_sql(
            "SELECT pg_backend_pid()").scalar()
        s.execute(select(Note.body).where(Note.id == b[0])).scalar_one()
        order: list[str] = []

        def hook(conn):
            order.append(conn.engine.info["shard"])
            if order == ["s1"]:
                _terminate(env.cluster.primary("s0"), pid0)

        for sh in env.names:
            event.listen(env.cluster.primary(sh), "commit", hook)
        try:
            try:
                s.commit()
                outcome = "committed"
            except shardkit.CommitError as e:
                pytest.fail(f"a shard only read was reported as committed: {e}")
            except sa_exc.OperationalError as e:
                assert e.connection_invalidated, e
                outcome = "failed"
                s.rollback()
        finally:
            for sh in env.names:
                event.remove(env.cluster.primary(sh), "commit", hook)
            s.close()
        first = order[0]
        seen.add(first)
        if first == "s1":
            assert outcome == "failed" and key not in env.ids("s0")
        else:
            assert outcome == "committed" and key in env.ids("s0")
        if seen == {"s0", "s1"}:
            break
    assert "s1" in seen, "s1's COMMIT never came first in 20 commits"
    assert checked_out(env.cluster) == {}
