"""Replica routing, continued: every read path under read-your-writes, transactions
and savepoints, per-statement and per-scope overrides, tokens, lag limits, node
failures, health and password masking.

One 2-shard x 2-replica cluster serves the whole module.  Tests that delay,
stop or kill a replica restore it before they end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, Text, cast, event, func, inspect, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from waiting import health_by_node, resume, server_pids, wait_for, wait_replicas_usable

pytestmark = pytest.mark.integration

PASSWORD = "Pw9fQz7xSecret"
BAD_VALUE_ERRORS = (ValueError, sa_exc.ArgumentError, shardkit.ShardkitError)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "rv_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    entries: Mapped[list[Entry]] = relationship(lazy="select", order_by="Entry.id")


class Entry(Base):
    __tablename__ = "rv_entries"
    account_id: Mapped[int] = mapped_column(ForeignKey("rv_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(50))


GROUPS = {"accounts": {"tables": {"rv_accounts": "id", "rv_entries": "account_id"}}}


@dataclass
class Env:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker
    served: list[tuple[float, str, str]]          # (time, node, statement), successful only
    _keys: dict[str, Any] = field(default_factory=dict)

    def key(self, shard: str) -> int:
        """A shard key of ``shard`` no other test uses."""
        return next(self._keys[shard])

    def replica(self, shard: str, index: int) -> Any:
        return self.dev.shard(shard).replicas[index]

    def replicas(self) -> list[Any]:
        return [r for s in self.dev.shards for r in s.replicas]

    def flush_wal(self, shard: str) -> None:
        """Commit a transaction on ``shard``'s primary: it flushes (and so streams) every WAL
        record before it, such as those of an open transaction or of page pruning."""
        with self.dev.shard(shard).primary.connect() as c:
            c.execute("SELECT txid_current()")

    def caught_up(self, shards: tuple[str, ...] = ("s0", "s1")) -> None:
        for shard in shards:
            self.flush_wal(shard)
        for shard in shards:
            for r in self.dev.shard(shard).replicas:
                r.wait_caught_up()

    def nodes(self, fn: Any) -> tuple[Any, list[str]]:
        """Run ``fn``; return its result and the nodes that ran its statements on our tables."""
        n0 = len(self.served)
        out = fn()
        return out, [node for _, node, st in self.served[n0:] if "rv_" in st]

    def seed(self, rows: dict[int, str]) -> None:
        """Insert accounts ``{id: name}`` and wait for every replica to replay them."""
        with self.Session() as s:
            s.add_all(Account(id=k, name=v) for k, v in rows.items())
            s.commit()
        self.caught_up()


def _record(cluster: shardkit.Cluster, served: list) -> None:
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k:
                         served.append((time.monotonic(), node, st)))


def _cluster(dev: Any, **replicas: Any) -> shardkit.Cluster:
    cfg = {**dev.config_dict(), "groups": GROUPS,
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 1.0,
                        **replicas}}
    return shardkit.Cluster.from_config(cfg)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=2)
    cluster = _cluster(dev)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    served: list[tuple[float, str, str]] = []
    _record(cluster, served)
    cluster.start_monitor()
    by_shard: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
    for k in range(1, 20_000):
        by_shard[cluster.shard_for("rv_accounts", k)].append(k)
    e = Env(dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served,
            {s: iter(v) for s, v in by_shard.items()})
    e.caught_up()
    yield e
    cluster.dispose()


@pytest.fixture(autouse=True)
def _nodes_running(env):
    yield
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
    for r in env.replicas():
        r.wait_streaming()
    # (A replica restarted above is streaming; the monitor must also have seen it up.)
    wait_replicas_usable(env.cluster, every=True)


@contextlib.contextmanager
def lagging(env: Env, shards: tuple[str, ...] = ("s0", "s1"), indexes: tuple[int, ...] = (0, 1),
            seconds: float = 30.0):
    """Replicas that apply each commit ``seconds`` late (restored afterwards)."""
    nodes = [env.replica(s, i) for s in shards for i in indexes]
    try:
        for n in nodes:
            n.set_apply_delay(seconds)
        time.sleep(0.2)  # a couple of polls
        yield nodes
    finally:
        for n in nodes:
            n.set_apply_delay(0)
        env.caught_up(shards)


def _eventual_name(env: Env, k: int) -> tuple[str | None, list[str]]:
    with env.Session(consistency="eventual") as s:
        return env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())


# -- read-your-writes through every read path ------------------------------------------


def test_read_your_writes_after_commit_through_get_query_select_and_refresh(env):
    """After a commit, every way the session reads a row (get, Query, select, scalars,
    refresh) sees the committed value, while the replicas are 30 s behind."""
    k = env.key("s0")
    env.seed({k: "old"})
    with lagging(env, shards=("s0",)):
        with env.Session() as s:
            obj = s.get(Account, k)
            obj.name = "new"
            s.commit()
            assert s.get(Account, k).name == "new"
            s.expunge_all()
            assert s.get(Account, k, populate_existing=True).name == "new"
            s.expunge_all()
            assert s.query(Account).filter(Account.id == k).one().name == "new"
            assert s.query(Account.name).filter(Account.id == k).scalar() == "new"
            assert s.execute(select(Account.name).where(Account.id == k)).scalar_one() == "new"
            assert s.scalars(select(Account).where(Account.id == k)).one().name == "new"
            obj = s.get(Account, k)
            s.refresh(obj)
            assert obj.name == "new"
        # The replicas really are stale: without the token a read gets the old value.
        stale, nodes = _eventual_name(env, k)
        assert stale == "old" and nodes and nodes[0].startswith("s0/r"), (stale, nodes)


def test_objects_read_from_replicas_carry_their_shard_whatever_the_load_options(env):
    """Rows read on a replica, with or without the ORM's own load options (populate_existing,
    yield_per, autoflush, a get), come back as objects whose identity names their shard,
    and a lazy load from them runs on that shard."""
    keys = {shard: env.key(shard) for shard in ("s0", "s1")}
    env.seed({k: f"n{k}" for k in keys.values()})
    with env.Session() as s:
        s.add_all(Entry(account_id=k, id=1, note=shard) for shard, k in keys.items())
        s.commit()
    env.caught_up()
    statements = [
        lambda k: select(Account).where(Account.id == k),
        lambda k: select(Account).where(Account.id == k).execution_options(populate_existing=True),
        lambda k: select(Account).where(Account.id == k).execution_options(yield_per=10),
        lambda k: select(Account).where(Account.id == k).execution_options(autoflush=False),
    ]
    for make in statements:
        for shard, k in keys.items():
            with env.Session(consistency="eventual") as s:
                (obj,), nodes = env.nodes(lambda: s.scalars(make(k)).all())
                assert nodes and nodes[0].startswith(f"{shard}/r"), nodes
                assert inspect(obj).key == (Account, (k,), shard)
                entries, nodes = env.nodes(lambda: [e.note for e in obj.entries])
                assert entries == [shard] and nodes[0].startswith(f"{shard}/"), (entries, nodes)
    for shard, k in keys.items():
        with env.Session(consistency="eventual") as s:
            for kw in ({}, {"populate_existing": True}):
                obj, nodes = env.nodes(lambda: s.get(Account, k, **kw))
                assert inspect(obj).key == (Account, (k,), shard)
                assert not nodes or nodes[0].startswith(f"{shard}/r"), nodes


def test_streamed_reads_run_on_replicas_in_a_transaction_of_their_own(env):
    """yield_per, stream_results and legacy Query.yield_per fetch through a server-side
    cursor, which PostgreSQL opens only inside a transaction: on a replica (whose engine
    runs in autocommit) such a read still streams from the replica, for one shard and
    across shards, and the connection goes back to the pool in autocommit."""
    keys = {shard: [env.key(shard) for _ in range(5)] for shard in ("s0", "s1")}
    everything = sorted(k for ks in keys.values() for k in ks)
    env.seed({k: f"n{k}" for k in everything})
    mine = Account.id.in_(everything)
    for shard, ks in keys.items():
        with env.Session(consistency="eventual") as s:
            one = select(Account.id).where(Account.id.in_(ks)).order_by(Account.id)
            for run in (lambda: s.execute(one.execution_options(yield_per=2)).scalars().all(),
                        lambda: s.execute(one, execution_options={"stream_results": True}).scalars().all(),
                        lambda: [a.id for a in s.query(Account).filter(Account.id.in_(ks))
                                 .order_by(Account.id).yield_per(2)]):
                ids, nodes = env.nodes(run)
                assert ids == ks and nodes and nodes[0].startswith(f"{shard}/r"), (ids, nodes)
            # The session's other reads on that replica still work after the streamed one.
            assert s.execute(select(Account.name).where(Account.id == ks[0])).scalar() == f"n{ks[0]}"
    with env.Session(consistency="eventual") as s:
        ids, nodes = env.nodes(lambda: s.execute(
            select(Account.id).where(mine).order_by(Account.id.desc()).execution_options(yield_per=3)
        ).scalars().all())
        assert ids == everything[::-1]
        assert {n.split("/")[0] for n in nodes} == {"s0", "s1"} and all("/r" in n for n in nodes), nodes
    for shard in ("s0", "s1"):
        for i in range(env.cluster.replica_count(shard)):
            with env.cluster.engine(shard, "replica", i).connect() as c:
                assert c.connection.dbapi_connection.autocommit


def test_read_your_writes_after_commit_in_list_scatter_and_lazy_load(env):
    """An IN list over both shards, a key-less (scatter) read, a count and a lazy load
    after a commit that wrote to both shards all see the commit."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "old", k1: "old"})
    with lagging(env):
        with env.Session() as s:
            a0, a1 = s.get(Account, k0), s.get(Account, k1)
            assert a0.entries == [] and a1.entries == []
            a0.name = a1.name = "scattered"
            s.add_all([Entry(account_id=k0, id=1, note="e0"), Entry(account_id=k1, id=1, note="e1")])
            s.commit()
            rows = s.execute(select(Account.id, Account.name)
                             .where(Account.id.in_([k0, k1])).order_by(Account.id)).all()
            assert [tuple(r) for r in rows] == sorted([(k0, "scattered"), (k1, "scattered")])
            ids = s.scalars(select(Account.id).where(Account.name == "scattered")
                            .order_by(Account.id)).all()
            assert ids == sorted([k0, k1])
            assert s.scalar(select(func.count()).select_from(Account)
                            .where(Account.name == "scattered")) == 2
            assert [e.note for e in a0.entries] == ["e0"]
            assert [e.note for e in a1.entries] == ["e1"]
            token = s.consistency_token()
        # the token carries all of it into another session, lazy loads included
        with env.Session(consistency_token=token) as s2:
            assert [e.note for e in s2.get(Account, k1).entries] == ["e1"]
            assert s2.query(Account).filter(Account.name == "scattered").count() == 2
        stale, nodes = _eventual_name(env, k1)
        assert stale == "old" and nodes and nodes[0].startswith("s1/r"), (stale, nodes)


def test_read_your_writes_after_bulk_update_statement(env):
    """A Core/ORM UPDATE statement (not a flush) counts as a write: a read after the
    commit sees it."""
    k = env.key("s1")
    env.seed({k: "old"})
    with lagging(env, shards=("s1",)):
        with env.Session() as s:
            s.execute(update(Account).where(Account.id == k).values(name="bulk"))
            s.commit()
            assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "bulk"
        stale, nodes = _eventual_name(env, k)
        assert stale == "old" and nodes and nodes[0].startswith("s1/r"), (stale, nodes)


def test_wait_for_token_waits_for_a_replica_instead_of_using_the_primary(env):
    """With wait_for_token, a read after a commit waits for a replica to replay it and
    reads there (fresh)."""
    k = env.key("s0")
    env.seed({k: "old"})
    cluster = _cluster(env.dev, wait_for_token=10.0)
    served: list = []
    _record(cluster, served)
    cluster.start_monitor()
    wait_replicas_usable(cluster, ("s0",), every=True)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    try:
        with lagging(env, shards=("s0",), seconds=1.0):
            with Session() as s:
                s.get(Account, k).name = "waited"
                s.commit()
                n0 = len(served)
                assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "waited"
                nodes = [n for _, n, st in served[n0:] if "rv_" in st]
                assert nodes and nodes[0] in ("s0/r0", "s0/r1"), nodes
    finally:
        cluster.dispose()


# -- transactions ---------------------------------------------------------------------------


def test_transaction_that_wrote_one_shard_reads_the_other_from_replicas(env):
    """In a transaction that wrote to s0, reads of s0 see the uncommitted write (primary)
    while reads of s1 still use s1's replicas; an IN list over both does both."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "old", k1: "other"})
    with env.Session() as s:
        s.get(Account, k0).name = "mine"
        s.flush()
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k0)).scalar())
        assert (name, nodes) == ("mine", ["s0/primary"])
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k1)).scalar())
        assert name == "other" and nodes[0] in ("s1/r0", "s1/r1"), nodes
        rows, nodes = env.nodes(lambda: s.execute(
            select(Account.id, Account.name).where(Account.id.in_([k0, k1])).order_by(Account.id)).all())
        assert [tuple(r) for r in rows] == sorted([(k0, "mine"), (k1, "other")])
        assert "s0/primary" in nodes and "s1/primary" not in nodes, nodes
        s.rollback()


def test_read_after_savepoint_rollback_still_sees_the_transactions_own_write(env):
    """A user who writes, then rolls back an inner savepoint, expects the outer
    transaction's own (still uncommitted) write to be visible to its next read: rolling
    back a savepoint does not end the transaction, so the shard must stay on its primary."""
    k, other = env.key("s0"), env.key("s0")
    env.seed({k: "old", other: "x"})
    with env.Session() as s:
        s.get(Account, k).name = "outer"
        s.flush()
        sp = s.begin_nested()
        s.get(Account, other).name = "inner"
        s.flush()
        sp.rollback()
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
        assert name == "outer", f"read {name!r} on {nodes} after a savepoint rollback"
        s.rollback()


def test_read_after_savepoint_release_still_sees_the_transactions_own_write(env):
    """Committing a savepoint (begin_nested) is not committing the transaction: its
    later reads of that shard must still see its own uncommitted writes."""
    k = env.key("s1")
    env.seed({k: "old"})
    with env.Session() as s:
        s.get(Account, k).name = "outer"
        s.flush()
        with s.begin_nested():
            s.get(Account, k).name = "inner"
        # let the replicas replay everything the primary has logged so far
        env.caught_up(("s1",))
        time.sleep(0.3)
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
        assert name == "inner", f"read {name!r} on {nodes} after releasing a savepoint"
        s.rollback()


def test_rollback_does_not_advance_the_token(env):
    """A rolled-back transaction leaves no token: its writes never happened."""
    k = env.key("s0")
    env.seed({k: "old"})
    with env.Session() as s:
        s.get(Account, k).name = "gone"
        s.flush()
        s.rollback()
        assert s.consistency_token() == "v1:"
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
        assert name == "old" and nodes[0] in ("s0/r0", "s0/r1"), nodes


def test_rolled_back_transaction_with_a_savepoint_leaves_no_token(env):
    """A transaction that released a savepoint and was then rolled back committed
    nothing; its session's token must stay empty (else a token handed to other sessions
    pins their reads to positions of writes that never happened)."""
    k = env.key("s0")
    env.seed({k: "old"})
    with env.Session() as s:
        s.get(Account, k).name = "gone"
        with s.begin_nested():
            s.get(Account, k).name = "gone too"
        s.rollback()
        assert s.consistency_token() == "v1:"


def test_write_through_connection_for_shard_is_read_back(env):
    """``connection_for_shard`` joins the session's transaction; a write made through it
    must be visible to the session's next read, in the transaction and after commit
    (read-your-writes)."""
    k = env.key("s0")
    env.seed({k: "old"})
    with lagging(env, shards=("s0",)):
        with env.Session() as s:
            s.connection_for_shard("s0").execute(
                text("UPDATE rv_accounts SET name = 'raw' WHERE id = :k"), {"k": k})
            in_tx, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
            s.commit()
            after, nodes2 = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
        assert (in_tx, after) == ("raw", "raw"), (in_tx, nodes, after, nodes2)


def test_select_for_update_pins_the_shard_to_its_primary_for_the_transaction(env):
    """After locking a row with SELECT ... FOR UPDATE, reading that row again in the same
    transaction must not return an older version from a lagging replica.  (Locking it
    through ``session.get(..., with_for_update=True)`` already behaves so.)"""
    k = env.key("s1")
    env.seed({k: "v1"})
    with lagging(env, shards=("s1",)):
        with env.Session() as other:
            other.get(Account, k).name = "v2"
            other.commit()
        with env.Session() as s:
            assert s.get(Account, k, with_for_update=True).name == "v2"
            s.expunge_all()
            assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "v2"
            s.rollback()
        with env.Session() as s:
            locked = s.execute(select(Account.name).where(Account.id == k).with_for_update()).scalar()
            again, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
            s.rollback()
        assert (locked, again) == ("v2", "v2"), f"locked {locked!r}, then read {again!r} on {nodes}"


# -- overrides --------------------------------------------------------------------------------


def test_role_overrides_and_their_precedence(env):
    """Statement options beat the scope; execute()'s options beat the statement's own;
    Query and session.get take execution options too."""
    k = env.key("s0")
    env.seed({k: "x"})
    stmt = select(Account.name).where(Account.id == k)
    replicas = {"s0/r0", "s0/r1"}
    with env.Session() as s:
        assert env.nodes(lambda: s.execute(stmt).scalar())[1][0] in replicas
        assert env.nodes(lambda: s.execute(stmt.execution_options(shardkit_role="primary")).scalar())[1] \
            == ["s0/primary"]
        with shardkit.scope(role="replica"):
            assert env.nodes(lambda: s.execute(stmt.execution_options(shardkit_role="primary"))
                             .scalar())[1] == ["s0/primary"]
        with shardkit.scope(role="primary"):
            assert env.nodes(lambda: s.execute(stmt).scalar())[1] == ["s0/primary"]
            assert env.nodes(lambda: s.execute(stmt.execution_options(shardkit_role="replica"))
                             .scalar())[1][0] in replicas
            with shardkit.scope(consistency="eventual"):  # inner scope keeps the outer role
                assert env.nodes(lambda: s.execute(stmt).scalar())[1] == ["s0/primary"]
        assert env.nodes(lambda: s.execute(stmt.execution_options(shardkit_role="replica"),
                                           execution_options={"shardkit_role": "primary"})
                         .scalar())[1] == ["s0/primary"]
        assert env.nodes(lambda: s.query(Account).execution_options(shardkit_role="primary")
                         .filter(Account.id == k).one())[1] == ["s0/primary"]
        s.expunge_all()
        assert env.nodes(lambda: s.get(Account, k, execution_options={"shardkit_role": "primary"}))[1] \
            == ["s0/primary"]
        s.expunge_all()
        assert env.nodes(lambda: s.scalars(stmt, execution_options={"shardkit_role": "primary"})
                         .one())[1] == ["s0/primary"]


def test_consistency_overrides_and_their_precedence(env):
    """With replicas 30 s behind a commit of this session: eventual (per scope or
    statement) reads the stale replica; read_your_writes or strong (per statement, scope
    or session) reads the fresh value; the innermost setting wins.  Each read is a
    transaction of its own: within one, a read after a read of the primary stays there."""
    k = env.key("s1")
    env.seed({k: "old"})
    stmt = select(Account.name).where(Account.id == k)
    with lagging(env, shards=("s1",)):
        with env.Session() as s:
            s.get(Account, k).name = "new"
            s.commit()

            def read(statement):
                s.rollback()  # a new transaction: the token stays, the node is chosen afresh
                return s.execute(statement).scalar()

            assert read(stmt) == "new"
            with shardkit.scope(consistency="eventual"):
                assert read(stmt) == "old"
                assert read(stmt.execution_options(shardkit_consistency="read_your_writes")) == "new"
                assert env.nodes(lambda: read(stmt.execution_options(shardkit_consistency="strong"))) \
                    == ("new", ["s1/primary"])
            assert read(stmt.execution_options(shardkit_consistency="eventual")) == "old"
            # a per-statement lag limit does not switch read-your-writes off
            assert read(stmt.execution_options(shardkit_max_lag_seconds=1000)) == "new"
            # a read forced to replicas that cannot honour the token fails, it does not go stale
            with pytest.raises(shardkit.ShardUnavailable, match="replayed"):
                read(stmt.execution_options(shardkit_role="replica"))
            # Within one transaction: the primary's "new", then an eventual read stays on
            # the primary (it would otherwise go back to "old"); forced to a replica, it
            # reads the replica, staleness accepted.
            s.rollback()
            assert s.execute(stmt).scalar() == "new"
            assert env.nodes(lambda: s.execute(stmt.execution_options(shardkit_consistency="eventual"))
                             .scalar()) == ("new", ["s1/primary"])
            assert s.execute(stmt.execution_options(shardkit_role="replica", shardkit_consistency="eventual")) \
                .scalar() == "old"
            assert s.execute(stmt.execution_options(shardkit_consistency="eventual")).scalar() == "new"
            token = s.consistency_token()
        with env.Session(consistency="eventual", consistency_token=token) as s2:
            assert s2.execute(stmt).scalar() == "old"
            with shardkit.scope(consistency="read_your_writes"):
                assert s2.execute(stmt).scalar() == "new"
        with env.Session(consistency="strong") as s3:
            assert env.nodes(lambda: s3.execute(stmt).scalar()) == ("new", ["s1/primary"])


def test_unknown_role_option_is_an_error(env):
    """``shardkit_role`` accepts 'primary' or 'replica'; a typo must raise a clear error
    (as ``shardkit.scope(role=...)`` does), not silently read from a replica."""
    k = env.key("s0")
    env.seed({k: "x"})
    with env.Session() as s:
        for bad in ("primay", "Primary", "master"):
            stmt = select(Account.name).where(Account.id == k).execution_options(shardkit_role=bad)
            try:
                _, nodes = env.nodes(lambda: s.execute(stmt).scalar())
            except BAD_VALUE_ERRORS as e:
                assert bad in str(e) and "role" in str(e)
            else:
                pytest.fail(f"shardkit_role={bad!r} was accepted; the read ran on {nodes}")


def test_unknown_consistency_option_is_an_error(env):
    """A misspelt ``shardkit_consistency`` (e.g. 'read-your-writes') must raise a clear
    error (as the session, scope and config do), not fall back to eventual consistency
    and return a value older than the session's own commit."""
    k = env.key("s0")
    env.seed({k: "old"})
    with lagging(env, shards=("s0",)):
        with env.Session() as s:
            s.get(Account, k).name = "new"
            s.commit()
            for bad in ("read-your-writes", "STRONG"):
                stmt = select(Account.name).where(Account.id == k) \
                    .execution_options(shardkit_consistency=bad)
                try:
                    value, nodes = env.nodes(lambda: s.execute(stmt).scalar())
                except BAD_VALUE_ERRORS as e:
                    assert bad in str(e) and "consistency" in str(e)
                else:
                    pytest.fail(f"shardkit_consistency={bad!r} was accepted; the read returned "
                                f"{value!r} from {nodes} though the session had committed 'new'")


def test_bad_values_in_session_scope_and_config_are_errors(env):
    with pytest.raises(sa_exc.ArgumentError, match="consistency"):
        env.Session(consistency="read-your-writes")
    with pytest.raises(ValueError, match="consistency"):
        with shardkit.scope(consistency="weak"):
            pass
    with pytest.raises(ValueError, match="role"):
        with shardkit.scope(role="master"):
            pass
    for key, value in (("consistency", "weak"), ("when_no_replica", "fail"), ("policy", "fastest")):
        with pytest.raises(shardkit.ConfigurationError, match=key):
            _cluster(env.dev, **{key: value})


# -- tokens -----------------------------------------------------------------------------------


def test_consistency_token_edge_cases(env):
    k = env.key("s0")
    env.seed({k: "x"})
    stmt = select(Account.name).where(Account.id == k)
    with env.Session() as s:
        assert s.consistency_token() == "v1:"
    for empty in ("", "v1:"):
        with env.Session(consistency_token=empty) as s:
            assert s.consistency_token() == "v1:"
            assert env.nodes(lambda: s.execute(stmt).scalar())[1][0] in ("s0/r0", "s0/r1")
    for bad in ("v1", "v2:s0=0/1", "s0=0/1", "v1:s0", "v1:s0=", "v1:s0=0/1,", "v1:s0=zz/1",
                "v1:s0=0/1;s1=0/2", "v1:s0=1"):
        with pytest.raises(shardkit.ShardkitError, match="token"):
            env.Session(consistency_token=bad)
        with env.Session() as s, pytest.raises(shardkit.ShardkitError, match="token"):
            s.require_token(bad)
    # a token of another cluster: shards it names that this cluster lacks are ignored
    with env.Session(consistency_token="v1:x9=FF/0,s0=0/1") as s:
        assert s.consistency_token() == "v1:s0=0/1"
        assert env.nodes(lambda: s.execute(stmt).scalar())[1][0] in ("s0/r0", "s0/r1")
    # a position no replica has reached (a write they have not replayed): reads go to the
    # primary, or fail if forced ("FFFF/0", past the primary's own, is corrected instead:
    # test_untrusted_tokens.py)
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.execute(update(Account).where(Account.id == k).values(name="x"))
            w.commit()
            behind = w.consistency_token()
        with env.Session(consistency_token=behind) as s:
            assert env.nodes(lambda: s.execute(stmt).scalar()) == ("x", ["s0/primary"])
            with pytest.raises(shardkit.ShardUnavailable, match="not replayed"):
                s.execute(stmt.execution_options(shardkit_role="replica"))
    # positions only move forward
    with env.Session() as s:
        s.get(Account, k).name = "y"
        s.commit()
        tok = s.consistency_token()
        s.require_token("v1:s0=0/1")
        assert s.consistency_token() == tok
        s2 = env.Session()
        s2.require_token(tok)
        s2.require_token("v1:s1=0/10")
        assert set(s2.consistency_token()[3:].split(",")) == set(tok[3:].split(",")) | {"s1=0/10"}
        s2.close()


# -- lag limits -------------------------------------------------------------------------------


def test_max_lag_override_avoids_a_lagging_replica_and_eventual_still_uses_it(env):
    """s1/r0 falls seconds behind: reads with a 1 s limit (statement or scope) avoid it;
    eventual reads within the default limit keep using it (and see stale data); health
    shows the lag."""
    k = env.key("s1")
    env.seed({k: "old"})
    r0 = env.replica("s1", 0)
    with lagging(env, shards=("s1",), indexes=(0,)):
        with env.Session() as s:
            s.get(Account, k).name = "new"
            s.commit()
        wait_for(lambda: (health_by_node(env.cluster)["s1/r0"]["lag_seconds"] or 0) > 1.5, 15,
                  "s1/r0 to lag more than 1.5 s")
        h = health_by_node(env.cluster)
        assert h["s1/r0"]["up"] is True and h["s1/r0"]["lag_bytes"] > 0
        assert h["s1/r1"]["lag_bytes"] == 0 and h["s1/r1"]["lag_seconds"] == 0
        assert env.cluster.health().ready is True

        stmt = select(Account.name).where(Account.id == k)

        def spread(options: dict[str, Any] | None = None, **scope_kw: Any) -> Counter:
            used: Counter = Counter()
            for _ in range(16):
                with env.Session(consistency="eventual") as s, shardkit.scope(**scope_kw):
                    value, nodes = env.nodes(lambda: s.execute(stmt, execution_options=options or {})
                                             .scalar())
                used[(nodes[0], value)] += 1
            return used

        default = spread()
        assert default[("s1/r0", "old")] > 0 and default[("s1/r1", "new")] > 0, default
        assert set(default) <= {("s1/r0", "old"), ("s1/r1", "new")}, default
        assert set(spread({"shardkit_max_lag_seconds": 1})) == {("s1/r1", "new")}
        assert set(spread(max_lag_seconds=1)) == {("s1/r1", "new")}
        looser = spread({"shardkit_max_lag_seconds": 300}, max_lag_seconds=1)
        assert looser[("s1/r0", "old")] > 0, looser
    assert r0.is_running()


# -- failures -------------------------------------------------------------------------------


def _reader(env: Env, k: int, stop: threading.Event, failures: list, ok: Counter) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            try:
                with env.Session(consistency="eventual") as s:
                    assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "r"
                ok["reads"] += 1
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
            time.sleep(0.005)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_stopped_replica_then_restarted_gets_reads_back(env):
    """A stopped replica costs no failed read and gets no reads once the monitor sees it
    down; health says so; after a restart it serves reads again."""
    k = env.key("s1")
    env.seed({k: "r"})
    r0 = env.replica("s1", 0)
    stop, failures, ok = threading.Event(), [], Counter()
    threads = [_reader(env, k, stop, failures, ok) for _ in range(2)]
    try:
        time.sleep(0.5)
        r0.stop()
        stopped_at = time.monotonic()
        wait_for(lambda: health_by_node(env.cluster)["s1/r0"]["up"] is False, 5, "the monitor to see s1/r0 down")
        h = health_by_node(env.cluster)
        assert h["s1/r0"]["error"], h["s1/r0"]
        assert h["s1/r1"]["up"] is True and env.cluster.health().ready is True
        time.sleep(1.5)
        late = [n for t, n, st in env.served if t > stopped_at + 0.5 and "rv_" in st]
        assert late and "s1/r0" not in late and "s1/r1" in late
        r0.start()
        restarted_at = time.monotonic()
        wait_for(lambda: any(n == "s1/r0" and t > restarted_at for t, n, _ in env.served), 20,
                  "s1/r0 to serve reads again after its restart")
        assert health_by_node(env.cluster)["s1/r0"]["up"] is True
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert ok["reads"] > 50


def test_all_replicas_down_reads_go_to_primary_or_raise(env):
    """With every replica of s1 down: reads use s1's primary by default; with
    when_no_replica='raise', or a read forced to replicas, they fail with
    ShardUnavailable naming the shard and why.  Other shards are unaffected."""
    k1, k0 = env.key("s1"), env.key("s0")
    env.seed({k1: "one", k0: "zero"})
    strict = _cluster(env.dev, when_no_replica="raise")
    strict.start_monitor()
    Strict = sessionmaker(class_=shardkit.ShardedSession, cluster=strict)
    reps = env.dev.shard("s1").replicas
    try:
        for r in reps:
            r.stop()
        for c in (env.cluster, strict):
            wait_for(lambda c=c: not any(health_by_node(c)[f"s1/r{i}"]["up"] for i in (0, 1)), 5,
                      "the monitor to see s1's replicas down")
        stmt1 = select(Account.name).where(Account.id == k1)
        for consistency in ("eventual", "read_your_writes"):
            with env.Session(consistency=consistency) as s:
                assert env.nodes(lambda: s.execute(stmt1).scalar()) == ("one", ["s1/primary"])
                with pytest.raises(shardkit.ShardUnavailable) as ei:
                    s.execute(stmt1.execution_options(shardkit_role="replica"))
                assert ei.value.shard == "s1" and "down" in str(ei.value)
        with Strict() as s:
            t0 = time.monotonic()
            with pytest.raises(shardkit.ShardUnavailable) as ei:
                s.execute(stmt1).scalar()
            assert time.monotonic() - t0 < 5
            assert ei.value.shard == "s1" and "down" in str(ei.value) and "when_no_replica" in str(ei.value)
            assert s.execute(stmt1.execution_options(shardkit_role="primary")).scalar() == "one"
            assert s.execute(select(Account.name).where(Account.id == k0)).scalar() == "zero"
    finally:
        for r in reps:
            r.start()
        strict.dispose()
    for r in reps:
        r.wait_streaming()


def _kill_under_read(env: Env, shard: str, stmt: Any) -> tuple[dict[str, Any], Any, list[str]]:
    """Run ``stmt`` (a slow read) in a thread; kill the replica of ``shard`` running it.
    Returns the read's outcome, the killed node and the nodes whose runs of it succeeded."""
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            with env.Session(consistency="eventual") as s:
                result["rows"] = sorted(tuple(r) for r in s.execute(stmt).all())
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    n0 = len(env.served)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    victim = None
    deadline = time.monotonic() + 10
    while victim is None and time.monotonic() < deadline:
        for r in env.dev.shard(shard).replicas:
            with r.connect() as c:
                if c.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                             "AND query LIKE '%pg_sleep%rv_accounts%'").fetchone()[0]:
                    victim = r
        time.sleep(0.02)
    assert victim is not None, "the read never started on a replica"
    victim.kill()
    t.join(20)
    assert not t.is_alive()
    return result, victim, [n for _, n, st in env.served[n0:] if "pg_sleep" in st]


def _slow(where: Any) -> Any:
    return select(Account.name, func.length(cast(func.pg_sleep(2), Text))).where(where)


def test_replica_killed_mid_read_is_retried_elsewhere(env):
    """A read running on a replica that is killed under it returns the right rows from
    another node; the dead replica is banned (health shows why)."""
    k = env.key("s0")
    env.seed({k: "survivor"})
    result, victim, nodes = _kill_under_read(env, "s0", _slow(Account.id == k))
    try:
        assert "error" not in result, result.get("error")
        assert result["rows"] == [("survivor", 0)]
        assert nodes and victim.name not in nodes, nodes
        h = health_by_node(env.cluster)[victim.name]
        assert h["banned_for_s"] > 0 or h["up"] is False, h
        assert h["ban_reason"] or h["error"], h
    finally:
        victim.start()
        victim.wait_streaming()


def test_replica_killed_mid_scatter_read_is_retried_elsewhere(env):
    """The same during a cross-shard read: every shard's rows come back."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "scatter-survivor", k1: "scatter-survivor"})
    result, victim, nodes = _kill_under_read(env, "s1", _slow(Account.name == "scatter-survivor"))
    try:
        assert "error" not in result, result.get("error")
        assert result["rows"] == [("scatter-survivor", 0)] * 2
        assert victim.name not in nodes and any(n.startswith("s1/") for n in nodes), nodes
    finally:
        victim.start()
        victim.wait_streaming()


def test_health_of_a_down_replica_does_not_report_a_frozen_lag(env):
    """A replica that has been down for seconds while its primary kept committing is at
    least that far behind (or its lag is unknown); health() (and the lag metrics built
    on it) must not keep showing the last sub-second measurement as its lag."""
    k = env.key("s1")
    env.seed({k: "0"})
    r1 = env.replica("s1", 1)
    sample = env.cluster.monitor().shards["s1"].replicas[1]

    def measured_just_after_a_commit() -> bool:
        with env.Session() as s:
            s.get(Account, k).name = f"t{time.monotonic()}"
            s.commit()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if sample.up and sample.replay_timestamp_age is not None \
                    and sample.replay_timestamp_age < 1.0:
                return True
            time.sleep(0.02)
        return False

    wait_for(measured_just_after_a_commit, 10, "a sample of s1/r1 taken just after a commit")
    r1.stop()
    down_at = time.monotonic()
    try:
        wait_for(lambda: health_by_node(env.cluster)["s1/r1"]["up"] is False, 5, "s1/r1 to be seen down")
        for i in range(1, 6):
            with env.Session() as s:
                s.get(Account, k).name = str(i)
                s.commit()
            time.sleep(0.6)
        h = health_by_node(env.cluster)["s1/r1"]
        down_for = time.monotonic() - down_at
        assert h["up"] is False and h["lag_bytes"] > 0
        assert h["lag_seconds"] is None or h["lag_seconds"] >= down_for - 1.0, (down_for, h)
    finally:
        r1.start()
        r1.wait_streaming()


def test_passwords_never_appear_in_health_logs_or_errors(env, caplog):
    """Node URLs carry a password: health(), log records and error messages show the
    URL masked, never the password."""
    caplog.set_level(logging.DEBUG, logger="shardkit")
    cfg = env.dev.config_dict()
    for sh in cfg["shards"]:
        sh["primary"] = sh["primary"].replace("://shardkit@", f"://shardkit:{PASSWORD}@")
        sh["replicas"] = [u.replace("://shardkit@", f"://shardkit:{PASSWORD}@") for u in sh["replicas"]]
    assert PASSWORD in cfg["shards"][1]["replicas"][0]
    cluster = shardkit.Cluster.from_config({**cfg, "groups": GROUPS,
                                            "replicas": {"poll_interval": 0.1, "ban_seconds": 1.0}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    k = env.key("s1")
    env.seed({k: "pw"})
    texts: list[str] = []
    reps = env.dev.shard("s1").replicas
    try:
        for _ in range(4):
            with Session(consistency="eventual") as s:
                assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "pw"
        for r in reps:
            r.stop()
        with Session(consistency="eventual") as s:  # may meet the dead pooled connections
            assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "pw"
        wait_for(lambda: not any(health_by_node(cluster)[f"s1/r{i}"]["up"] for i in (0, 1)), 5,
                  "the monitor to see s1's replicas down")
        texts.append(repr(cluster.health().as_dict()))
        with Session() as s, pytest.raises(shardkit.ShardUnavailable) as ei:
            s.execute(select(Account.name).where(Account.id == k).execution_options(shardkit_role="replica"))
        texts += [str(ei.value), repr(ei.value)]
        with pytest.raises(shardkit.ShardUnavailable) as ei2:
            with cluster.engine("s1", "replica", 0).connect() as c:
                c.exec_driver_sql("SELECT 1")
        texts += [str(ei2.value), repr(ei2.value), repr(ei2.value.__cause__)]
        assert "***" in str(ei2.value)
        texts += [repr(cluster), repr(cluster.config), str(cluster.config.shards),
                  repr(cluster.engine("s1", "replica", 1)), repr(cluster.engine("s1", "replica", 1).url)]
    finally:
        for r in reps:
            r.start()
        cluster.dispose()
    texts.append(caplog.text)
    texts += [str(rec.args) for rec in caplog.records]
    assert "s1/r0 is down" in caplog.text
    leaks = [t for t in texts if PASSWORD in t]
    assert not leaks, leaks[:2]


def test_read_your_writes_with_when_no_replica_raise_reads_own_commit(env):
    """when_no_replica='raise' is about replicas being out (down, banned, too far
    behind).  A session's read right after its own commit, while healthy replicas are
    a moment behind it, must still return the committed value ("use only replicas that
    have replayed it ... else the primary"), not fail with ShardUnavailable."""
    k = env.key("s0")
    env.seed({k: "old"})
    strict = _cluster(env.dev, when_no_replica="raise")
    strict.start_monitor()
    wait_replicas_usable(strict, ("s0",))
    Strict = sessionmaker(class_=shardkit.ShardedSession, cluster=strict)
    try:
        with lagging(env, shards=("s0",), seconds=2.0):
            with Strict() as s:
                assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "old"
                s.get(Account, k).name = "new"
                s.commit()
                assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "new"
    finally:
        strict.dispose()


def test_scatter_with_partial_results_when_one_shard_has_no_replica(env):
    """A cross-shard read with shardkit_partial_results=True, under
    when_no_replica='raise', while s1 has no replica up: the rows of s0 come back and
    s1 is listed in missing_shards; without partial results it fails naming s1."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "part", k1: "part"})
    strict = _cluster(env.dev, when_no_replica="raise")
    strict.start_monitor()
    wait_replicas_usable(strict, ("s0",))
    Strict = sessionmaker(class_=shardkit.ShardedSession, cluster=strict)
    reps = env.dev.shard("s1").replicas
    stmt = select(Account.id).where(Account.name == "part")
    try:
        for r in reps:
            r.stop()
        wait_for(lambda: not any(health_by_node(strict)[f"s1/r{i}"]["up"] for i in (0, 1)), 5,
                  "the monitor to see s1's replicas down")
        with Strict() as s:
            with pytest.raises((shardkit.ShardUnavailable, shardkit.ScatterError)) as ei:
                s.execute(stmt).all()
            assert "s1" in str(ei.value)
        with Strict() as s:
            result = s.execute(stmt.execution_options(shardkit_partial_results=True))
            assert result.scalars().all() == [k0]
            assert set(result.missing_shards) == {"s1"}
    finally:
        for r in reps:
            r.start()
        strict.dispose()
    for r in reps:
        r.wait_streaming()


def test_read_cancelled_by_a_recovery_conflict_is_retried_elsewhere(env):
    """A replica cancels a running read when replaying the primary's WAL conflicts with
    it ("canceling statement due to conflict with recovery").  That is a replica failing
    a read: like a dead replica, it should be retried on another node (replica reads
    are autocommit), not surface to the caller."""
    k = env.key("s0")
    env.seed({k: "conflict"})
    reps = env.dev.shard("s0").replicas

    def set_delay(value: str) -> None:
        for r in reps:
            with r.connect() as c:
                c.execute(f"ALTER SYSTEM SET max_standby_streaming_delay = {value}")
                c.execute("SELECT pg_reload_conf()")

    result: dict[str, Any] = {}

    def read() -> None:
        try:
            with env.Session(consistency="eventual") as s:
                result["rows"] = [tuple(r) for r in s.execute(_slow(Account.id == k)).all()]
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    set_delay("0")
    try:
        time.sleep(0.3)
        t = threading.Thread(target=read, daemon=True)
        t.start()
        running = False
        deadline = time.monotonic() + 10
        while not running and time.monotonic() < deadline:
            for r in reps:
                with r.connect() as c:
                    running = running or bool(c.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE '%pg_sleep%rv_accounts%'").fetchone()[0])
            time.sleep(0.02)
        assert running, "the read never started on a replica"
        with env.dev.shard("s0").primary.connect(autocommit=False) as c:
            c.execute("LOCK TABLE rv_accounts IN ACCESS EXCLUSIVE MODE")
            c.commit()
        t.join(20)
        assert not t.is_alive()
    finally:
        set_delay("DEFAULT")
    assert "error" not in result, repr(result.get("error"))[:300]
    assert result["rows"] == [("conflict", 0)]


def test_hung_replica_gets_no_reads_and_health_does_not_call_it_up(env):
    """A replica that stops answering (frozen, not refusing connections): reads avoid it
    once its samples are stale, and health() must not keep reporting it as up, since
    nothing has been heard from it for seconds."""
    node = env.replica("s1", 0)
    if not hasattr(node, "datadir") or not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    k = env.key("s1")
    env.seed({k: "alive"})
    pids = server_pids(node)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
        for _ in range(6):
            name, nodes = _eventual_name(env, k)
            assert (name, nodes) == ("alive", ["s1/r1"])
        h = health_by_node(env.cluster)["s1/r0"]
        assert h["checked_ago_s"] is None or h["checked_ago_s"] > 2, h
        assert h["up"] is False, h
    finally:
        resume(pids)
