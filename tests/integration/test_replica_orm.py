"""ORM behaviour of ShardedSession on a cluster with streaming replicas.

Relationship loaders, refresh/expire, legacy Query, autoflush, savepoints, per-statement
and per-scope routing options, bulk operations: each compared with what a plain Session
on one database does, and checked against the node that served each statement.

One 2-shard x 2-replica cluster serves the module; tests that delay replicas restore them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, Sequence, String, func, insert, inspect, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
)

import shardkit
from replica_env import ReplicaEnv, lagging, on_primary, on_replica, replica_env
from waiting import wait_for

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "rvw_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    entries: Mapped[list[Entry]] = relationship(lazy="select", order_by="Entry.id",
                                                back_populates="account")


class Entry(Base):
    __tablename__ = "rvw_entries"
    account_id: Mapped[int] = mapped_column(ForeignKey("rvw_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(50))
    account: Mapped[Account] = relationship(back_populates="entries")


GROUPS = {"rvw": {"tables": {"rvw_accounts": "id", "rvw_entries": "account_id"}}}


class Env(ReplicaEnv):
    def seed(self, rows: dict[int, str], entries: dict[int, list[str]] | None = None) -> None:
        with self.Session() as s:
            s.add_all(Account(id=k, name=v) for k, v in rows.items())
            for k, notes in (entries or {}).items():
                s.add_all(Entry(account_id=k, id=i, note=n) for i, n in enumerate(notes, 1))
            s.commit()
        self.caught_up()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata, {"groups": GROUPS},
                           "rvw_accounts", "rvw_", replicas=2, env_class=Env)


def token(obj: Any) -> str:
    return inspect(obj).key[2]


# -- autoflush --------------------------------------------------------------------------


def test_execution_option_autoflush_false_does_not_flush_pending_objects(env):
    """SQLAlchemy: ``execution_options(autoflush=False)`` on a SELECT skips the autoflush, so a
    pending object stays pending (and an incomplete one raises nothing).  shardkit must not
    flush it anyway before choosing the node."""
    k = env.key("s0")
    with env.Session() as s:
        pending = Account(id=k)             # name (NOT NULL) not set yet: a flush would fail
        s.add(pending)
        stmt = select(Account.id).where(Account.id == k).execution_options(autoflush=False)
        try:
            ids, nodes = env.nodes(lambda: s.execute(stmt).scalars().all())
        except sa_exc.IntegrityError as e:
            pytest.fail(f"autoflush=False read flushed the pending object: {str(e.orig).splitlines()[0]}")
        assert ids == [] and pending in s.new, (ids, nodes)
        assert not any("INSERT" in st for _, st in env.served[-5:] if "rvw_" in st)
        s.rollback()


def test_query_autoflush_false_does_not_flush_pending_objects(env):
    """Legacy ``Query.autoflush(False)``: the same, through the Query API."""
    k = env.key("s1")
    with env.Session() as s:
        pending = Account(id=k, name="pending")
        s.add(pending)
        n, nodes = env.nodes(lambda: s.query(Account).autoflush(False).filter(Account.id == k).count())
        assert n == 0 and pending in s.new, (n, nodes, pending in s.new)
        s.rollback()


def test_autoflush_of_pending_object_before_replica_read_finds_it(env):
    """Default autoflush: a pending object is flushed before the read, and the read of its
    shard (keyed, IN list, cross-shard count) runs on the primary and finds it; the other
    shard still reads from a replica."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k1: "other"})
    with env.Session() as s:
        s.add(Account(id=k0, name="pending-af"))
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k0)).scalar())
        assert name == "pending-af" and on_primary(nodes, "s0"), nodes
        s.add(Entry(account_id=k0, id=1, note="e"))
        rows, nodes = env.nodes(lambda: s.execute(
            select(Account.id).where(Account.id.in_([k0, k1])).order_by(Account.id)).scalars().all())
        assert rows == sorted([k0, k1])
        assert "s0/primary" in nodes and any(n.startswith("s1/r") for n in nodes), nodes
        cnt = s.query(Entry).filter(Entry.note == "e", Entry.account_id.in_([k0, k1])).count()
        assert cnt == 1
        s.rollback()


def test_no_autoflush_block_leaves_pending_object_unflushed(env):
    """Inside ``session.no_autoflush`` a pending object is not flushed: the replica read
    does not find it, and the object is still pending afterwards."""
    k = env.key("s0")
    with env.Session() as s:
        a = Account(id=k, name="nf")
        with s.no_autoflush:
            s.add(a)
            got, nodes = env.nodes(lambda: s.execute(select(Account).where(Account.id == k)).scalars().all())
        assert got == [] and a in s.new and on_replica(nodes, "s0"), (got, nodes)
        s.flush()
        assert s.execute(select(Account.name).where(Account.id == k)).scalar() == "nf"
        s.rollback()


# -- per-statement options and eager loads ---------------------------------------------------


@pytest.mark.parametrize("opts", [{"shardkit_role": "primary"}, {"shardkit_consistency": "strong"}],
                         ids=["role_primary", "strong"])
def test_selectinload_follows_the_statements_routing_options(env, opts):
    """A statement asked to read the primary (role or strong consistency) whose entities
    selectin-load a collection: SQLAlchemy passes the top-level statement's execution
    options to the eager load (``sa_top_level_orm_context``), so the collection must come
    from the primary too, not from a replica 30 s behind."""
    k = env.key("s0")
    env.seed({k: "p"}, {k: ["old"]})
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.add(Entry(account_id=k, id=2, note="new"))
            w.commit()
        with env.Session() as s:
            stmt = select(Account).where(Account.id == k).options(selectinload(Account.entries)) \
                .execution_options(**opts)
            (acc,), nodes = env.nodes(lambda: s.scalars(stmt).all())
            notes = [e.note for e in acc.entries]
        assert notes == ["old", "new"] and on_primary(nodes, "s0"), (notes, nodes)


def test_joinedload_follows_the_statements_routing_options(env):
    """The same with joinedload (one statement): the collection is the primary's."""
    k = env.key("s1")
    env.seed({k: "p"}, {k: ["old"]})
    with lagging(env, shards=("s1",)):
        with env.Session() as w:
            w.add(Entry(account_id=k, id=2, note="new"))
            w.commit()
        with env.Session() as s:
            stmt = select(Account).where(Account.id == k).options(joinedload(Account.entries)) \
                .execution_options(shardkit_role="primary")
            (acc,), nodes = env.nodes(lambda: s.scalars(stmt).unique().all())
            notes = [e.note for e in acc.entries]
    assert notes == ["old", "new"] and on_primary(nodes, "s1"), (notes, nodes)


def test_subqueryload_of_a_keyed_read_runs_on_the_parents_shard_only(env):
    """README: 'lazy / eager loads, refresh: the shard of the object they load for'.  A
    subqueryload for an account read by its key (on a replica) must run on that account's
    shard only, with the statement's options (here shardkit_role='primary' too)."""
    k = env.key("s0")
    env.seed({k: "sq"}, {k: ["a", "b"]})
    with env.Session(consistency="eventual") as s:
        stmt = select(Account).where(Account.id == k).options(subqueryload(Account.entries))
        (acc,), nodes = env.nodes(lambda: s.scalars(stmt).all())
        notes = [e.note for e in acc.entries]
        assert notes == ["a", "b"] and all(token(e) == "s0" for e in acc.entries)
        assert on_replica(nodes, "s0"), nodes
        s.expunge_all()
        (acc,), nodes = env.nodes(lambda: s.scalars(stmt.execution_options(shardkit_role="primary")).all())
        assert [e.note for e in acc.entries] == ["a", "b"] and on_primary(nodes, "s0"), nodes


def test_query_count_keeps_the_querys_routing_options(env):
    """Legacy ``Query.execution_options(shardkit_role='primary').count()`` (and
    ``.first()``): the option is part of the query, the count of it must obey it."""
    k = env.key("s0")
    env.seed({k: "c"}, {k: ["a"]})
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.add(Entry(account_id=k, id=2, note="b"))
            w.commit()
        with env.Session() as s:
            q = s.query(Entry).filter(Entry.account_id == k).execution_options(shardkit_role="primary")
            n, nodes = env.nodes(q.count)
            assert n == 2 and on_primary(nodes), (n, nodes)
            first, nodes = env.nodes(lambda: q.order_by(Entry.id.desc()).first())
            assert first.note == "b" and on_primary(nodes, "s0"), nodes


# -- transactions ------------------------------------------------------------------------------


def test_replica_read_inside_a_savepoint(env):
    """Reads inside ``begin_nested()`` of shards the transaction has not written (keyed, an
    IN list over both shards, a lazy load): as on a plain Session they return the rows.  A
    replica connection runs in autocommit, where PostgreSQL cannot open a SAVEPOINT."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "a", k1: "b"}, {k1: ["x"]})
    problems = []
    with env.Session() as s:
        acc1 = s.get(Account, k1)
        for what, fn, want in [
            ("keyed", lambda: s.execute(select(Account.name).where(Account.id == k0)).scalar(), "a"),
            ("in-list", lambda: sorted(s.execute(select(Account.id).where(Account.id.in_([k0, k1])))
                                       .scalars().all()), sorted([k0, k1])),
            ("lazy", lambda: [e.note for e in acc1.entries], ["x"]),
        ]:
            sp = s.begin_nested()
            try:
                got, nodes = env.nodes(fn)
                if got != want:
                    problems.append(f"{what}: {got!r} on {nodes}")
            except sa_exc.DBAPIError as e:
                problems.append(f"{what}: {type(e.orig).__name__}: {str(e.orig).splitlines()[0]}")
            try:
                sp.rollback()
            except sa_exc.SQLAlchemyError:
                s.rollback()
                acc1 = s.get(Account, k1)
        s.rollback()
    assert not problems, problems


def test_streamed_reads_with_selectinload_on_replicas(env):
    """yield_per with selectinload: SQLAlchemy runs the selectin query with the top-level
    statement's options (yield_per included), i.e. through a server-side cursor, which on a
    replica needs the streaming transaction shardkit gives streamed reads.  Checked for a
    keyed read, and for a read over both shards after the transaction wrote (uncommitted)
    to s0: s0 from its primary (own write visible), s1 from a replica."""
    k0, k1 = env.key("s0"), env.key("s1")
    tag = f"ys-{k0}"
    env.seed({k0: tag, k1: tag}, {k0: ["a"], k1: ["b"]})
    problems = []
    with env.Session(consistency="eventual") as s:
        stmt = select(Account).where(Account.id == k1).options(selectinload(Account.entries)) \
            .execution_options(yield_per=1)
        try:
            got, nodes = env.nodes(lambda: [[e.note for e in a.entries] for a in s.scalars(stmt)])
            if got != [["b"]] or not on_replica(nodes, "s1"):
                problems.append(f"keyed: {got} on {nodes}")
        except sa_exc.DBAPIError as e:
            problems.append(f"keyed: {str(e.orig).splitlines()[0]}")
    with env.Session() as s:
        s.add(Entry(account_id=k0, id=2, note="a2"))
        s.flush()
        stmt = select(Account).where(Account.name == tag).order_by(Account.id) \
            .options(selectinload(Account.entries)).execution_options(yield_per=1)
        try:
            got, nodes = env.nodes(lambda: [(a.id, token(a), [e.note for e in a.entries])
                                            for a in s.scalars(stmt)])
            want = sorted([(k0, "s0", ["a", "a2"]), (k1, "s1", ["b"])])
            if got != want or any(n.startswith("s0/r") for n in nodes) or "s0/primary" not in nodes:
                problems.append(f"after a write: {got} on {nodes}")
        except sa_exc.DBAPIError as e:
            problems.append(f"after a write: {str(e.orig).splitlines()[0]}")
        s.rollback()
    assert not problems, problems


def test_write_through_session_connection_is_read_back_in_the_transaction(env):
    """``session.connection(bind_arguments={'shard_id': ...})`` is SQLAlchemy's way to the
    session's connection of a shard; a write made through it is part of the session's
    transaction, and a plain Session's next read sees it."""
    k = env.key("s1")
    env.seed({k: "old"})
    with env.Session() as s:
        s.connection(bind_arguments={"shard_id": "s1"}).execute(
            text("UPDATE rvw_accounts SET name = 'raw' WHERE id = :k"), {"k": k})
        name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k)).scalar())
        s.rollback()
    assert name == "raw", (name, nodes)



# -- loaders on objects read from replicas ---------------------------------------------------


def test_loaders_on_cross_shard_replica_read_stay_on_each_objects_shard(env):
    """Accounts of both shards read without a key (replicas): every loader (lazy, selectin,
    subquery, joined) gives each account its own entries, with shard-qualified identities,
    every statement on a replica; the many-to-one back is served from the identity map."""
    k0, k1 = env.key("s0"), env.key("s1")
    tag = f"ld-{k0}-{k1}"
    env.seed({k0: tag, k1: tag}, {k0: ["a0", "b0"], k1: ["a1"]})
    for loader in (None, selectinload, subqueryload, joinedload):
        name = getattr(loader, "__name__", "lazy")
        with env.Session(consistency="eventual") as s:
            stmt = select(Account).where(Account.name == tag).order_by(Account.id)
            if loader is not None:
                stmt = stmt.options(loader(Account.entries))
            accs, nodes = env.nodes(lambda: s.scalars(stmt).unique().all())
            got, nodes2 = env.nodes(lambda: {a.id: [(e.note, token(e)) for e in a.entries] for a in accs})
            assert [a.id for a in accs] == sorted([k0, k1]), name
            assert [token(a) for a in accs] == [env.cluster.shard_for(Account, a.id) for a in accs], name
            assert got == {k0: [("a0", "s0"), ("b0", "s0")], k1: [("a1", "s1")]}, (name, got)
            assert on_replica(nodes + nodes2), (name, nodes + nodes2)
            if loader is None:
                assert sorted(n.split("/")[0] for n in nodes2) == ["s0", "s1"], nodes2
            back, nodes3 = env.nodes(lambda: [e.account is a for a in accs for e in a.entries])
            assert all(back) and nodes3 == [], (name, nodes3)


def test_raiseload_on_replica_read_objects(env):
    """raiseload: no SQL for the collection, an error instead, on either shard."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "rl", k1: "rl"}, {k0: ["x"]})
    with env.Session(consistency="eventual") as s:
        accs, nodes = env.nodes(lambda: s.scalars(
            select(Account).where(Account.id.in_([k0, k1])).options(raiseload(Account.entries))).all())
        assert sorted(a.id for a in accs) == sorted([k0, k1]) and on_replica(nodes), nodes
        for a in accs:
            n0 = len(env.served)
            with pytest.raises(sa_exc.InvalidRequestError):
                a.entries  # noqa: B018
            assert len(env.served) == n0


def test_refresh_expire_and_loaders_after_own_commit_while_replicas_lag(env):
    """An account read from a replica, changed (name, one more entry) and committed while the
    replicas are 30 s behind: expire/refresh/lazy load/selectinload with populate_existing/
    Query.populate_existing all show the commit."""
    k = env.key("s1")
    env.seed({k: "v1"}, {k: ["e1"]})
    with lagging(env, shards=("s1",)):
        with env.Session() as s:
            acc, nodes = env.nodes(lambda: s.get(Account, k))
            assert on_replica(nodes, "s1") and [e.note for e in acc.entries] == ["e1"]
            acc.name = "v2"
            acc.entries.append(Entry(id=2, note="e2"))
            s.commit()
            assert [e.note for e in acc.entries] == ["e1", "e2"]
            s.expire(acc)
            assert acc.name == "v2"
            s.expire(acc, ["entries"])
            assert [e.note for e in acc.entries] == ["e1", "e2"]
            s.refresh(acc)
            assert acc.name == "v2"
            s.expunge_all()
            acc = s.scalars(select(Account).where(Account.id == k).options(selectinload(Account.entries))
                            .execution_options(populate_existing=True)).one()
            assert [e.note for e in acc.entries] == ["e1", "e2"]
            s.expunge_all()
            acc = s.query(Account).populate_existing().options(subqueryload(Account.entries)) \
                .filter(Account.id == k).one()
            assert (acc.name, [e.note for e in acc.entries]) == ("v2", ["e1", "e2"])
            s.expunge_all()
            acc = s.query(Account).options(joinedload(Account.entries)).filter_by(id=k).one()
            assert [e.note for e in acc.entries] == ["e1", "e2"]


# -- legacy Query and cross-shard reads ---------------------------------------------------------


def test_legacy_query_api_across_shards_on_replicas(env):
    """filter_by / order_by+limit+offset / first / one_or_none / get / count / with_entities /
    group_by / distinct / yield_per over both shards: one database's answers, from replicas."""
    keys = sorted([env.key("s0") for _ in range(3)] + [env.key("s1") for _ in range(3)])
    tag = f"lq-{keys[0]}"
    env.seed({k: tag for k in keys}, {k: ["x"] * (i % 3) for i, k in enumerate(keys)})
    with env.Session(consistency="eventual") as s:
        q = s.query(Account).filter_by(name=tag)

        def run():
            out = {
                "page": [a.id for a in q.order_by(Account.id.desc()).limit(3).offset(1)],
                "first": q.order_by(Account.id).first().id,
                "none": s.query(Account).filter_by(name=tag + "-none").one_or_none(),
                "one": s.query(Account).filter_by(name=tag, id=keys[-1]).one_or_none().id,
                "get": s.query(Account).get(keys[2]).id,
                "count": q.count(),
                "ids": [r.id for r in q.with_entities(Account.id).order_by(Account.id)],
                "groups": sorted(tuple(r) for r in s.query(Entry.account_id, func.count(Entry.id))
                                 .filter(Entry.account_id.in_(keys)).group_by(Entry.account_id)),
                "distinct": sorted(r[0] for r in s.query(Account.name).filter(Account.id.in_(keys)).distinct()),
                "yield": [a.id for a in q.order_by(Account.id).yield_per(2)],
            }
            return out

        out, nodes = env.nodes(run)
    expected_groups = sorted((k, i % 3) for i, k in enumerate(keys) if i % 3)
    assert out == {"page": keys[::-1][1:4], "first": keys[0], "none": None, "one": keys[-1],
                   "get": keys[2], "count": 6, "ids": keys, "groups": expected_groups,
                   "distinct": [tag], "yield": keys}, out
    assert on_replica(nodes) and {n.split("/")[0] for n in nodes} == {"s0", "s1"}, nodes


def test_read_your_writes_across_shards_after_commit_while_replicas_lag(env):
    """After a commit that wrote to both shards (replicas 30 s behind), key-less reads with
    ORDER BY/LIMIT/OFFSET, count(), GROUP BY, DISTINCT and yield_per, and the legacy Query
    forms of them, all see it."""
    keys = sorted([env.key("s0"), env.key("s0"), env.key("s1"), env.key("s1")])
    tag = f"ryw-{keys[0]}"
    env.seed({k: tag for k in keys})
    with lagging(env):
        with env.Session() as s:
            for a in s.scalars(select(Account).where(Account.name == tag)):
                a.name = tag + "!"
            s.add_all(Entry(account_id=k, id=1, note=tag) for k in keys)
            s.commit()
            new = tag + "!"
            assert s.scalars(select(Account.id).where(Account.name == new)
                             .order_by(Account.id.desc()).limit(2).offset(1)).all() == keys[::-1][1:3]
            assert s.scalar(select(func.count()).select_from(Account).where(Account.name == new)) == 4
            assert s.query(Account).filter(Account.name == new).count() == 4
            assert sorted(tuple(r) for r in s.execute(
                select(Entry.note, func.count()).where(Entry.note == tag).group_by(Entry.note))) == [(tag, 4)]
            assert s.scalars(select(Account.name).where(Account.id.in_(keys)).distinct()).all() == [new]
            assert s.scalars(select(Account.id).where(Account.name == new).order_by(Account.id)
                             .execution_options(yield_per=1)).all() == keys
            assert [a.id for a in s.query(Account).filter(Account.name == new).order_by(Account.id)
                    .yield_per(1)] == keys
            assert s.query(Entry).filter(Entry.note == tag).count() == 4


# -- scopes and options -----------------------------------------------------------------------


def test_scope_role_primary_and_max_lag_cover_lazy_and_eager_loads(env):
    """Inside ``scope(role='primary')`` every statement (query, lazy load, selectinload,
    refresh) runs on the primary; inside ``scope(max_lag_seconds=...)`` replicas further
    behind are skipped for all of them too."""
    k = env.key("s0")
    env.seed({k: "sc"}, {k: ["a"]})
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.get(Account, k).name = "sc2"
            w.add(Entry(account_id=k, id=2, note="b"))
            w.commit()
        with env.Session() as s, shardkit.scope(role="primary"):
            def run():
                acc = s.get(Account, k)
                notes = [e.note for e in acc.entries]
                s.refresh(acc)
                s.expunge_all()
                acc2 = s.scalars(select(Account).where(Account.id == k)
                                 .options(selectinload(Account.entries))).one()
                return acc.name, notes, [e.note for e in acc2.entries]
            out, nodes = env.nodes(run)
            assert out == ("sc2", ["a", "b"], ["a", "b"]) and on_primary(nodes, "s0"), (out, nodes)
        # Until the monitor sees the replicas over 1 s behind (a fixed sleep can beat its polls).
        wait_for(lambda: all((n["lag_seconds"] or 0) > 1.0 for n in env.cluster.health().nodes
                             if n["shard"] == "s0" and n["role"] == "replica"), 15,
                 "the monitor to see s0's replicas over 1 s behind")
        with env.Session() as s, shardkit.scope(max_lag_seconds=1.0):
            def run2():
                acc = s.get(Account, k)
                return acc.name, [e.note for e in acc.entries]
            out, nodes = env.nodes(run2)
            assert out == ("sc2", ["a", "b"]) and on_primary(nodes, "s0"), (out, nodes)


def test_scope_consistency_strong_and_eventual_with_loaders(env):
    """``scope(consistency='strong')`` sends reads and their lazy loads to the primary; an
    inner ``scope(consistency='eventual')`` sends a new transaction's back to replicas (in
    the same transaction they stay on the primary, which has shown newer data)."""
    k = env.key("s1")
    env.seed({k: "st"}, {k: ["a"]})
    with env.Session() as s:
        with shardkit.scope(consistency="strong"):
            acc, nodes = env.nodes(lambda: s.get(Account, k))
            notes, nodes2 = env.nodes(lambda: [e.note for e in acc.entries])
            assert notes == ["a"] and on_primary(nodes + nodes2, "s1"), nodes + nodes2
            s.expunge_all()
            with shardkit.scope(consistency="eventual"):
                acc, nodes = env.nodes(lambda: s.get(Account, k))
                assert on_primary(nodes, "s1"), nodes
                s.rollback()
                s.expunge_all()
                acc, nodes = env.nodes(lambda: s.get(Account, k))
                notes, nodes2 = env.nodes(lambda: [e.note for e in acc.entries])
                assert notes == ["a"] and on_replica(nodes + nodes2, "s1"), nodes + nodes2


# -- locking ------------------------------------------------------------------------------------


def test_locking_reads_pin_their_shards_for_the_rest_of_the_transaction(env):
    """Query.with_for_update() across shards, refresh(with_for_update=True) and a joinedload
    under FOR UPDATE lock on the primaries; the transaction's later reads of those shards
    (lazy loads, key-less reads) see what the primaries hold, not the lagging replicas."""
    k0, k1 = env.key("s0"), env.key("s1")
    env.seed({k0: "lk", k1: "lk"}, {k0: ["a"], k1: ["a"]})
    with lagging(env):
        with env.Session() as w:
            for k in (k0, k1):
                w.get(Account, k).name = "lk2"
                w.add(Entry(account_id=k, id=2, note="b"))
            w.commit()
        with env.Session() as s:
            accs, nodes = env.nodes(lambda: s.query(Account).filter(Account.id.in_([k0, k1]))
                                    .order_by(Account.id).with_for_update().all())
            assert [a.name for a in accs] == ["lk2", "lk2"] and on_primary(nodes), nodes
            notes, nodes = env.nodes(lambda: [[e.note for e in a.entries] for a in accs])
            assert notes == [["a", "b"], ["a", "b"]] and on_primary(nodes), (notes, nodes)
            n, nodes = env.nodes(lambda: s.query(Entry).filter(Entry.note == "b",
                                                                Entry.account_id.in_([k0, k1])).count())
            assert n == 2 and on_primary(nodes), nodes
            s.rollback()
        with env.Session() as s:
            acc = s.get(Account, k1)            # replica: stale
            assert acc.name == "lk"
            s.refresh(acc, with_for_update=True)
            assert acc.name == "lk2"
            s.expire(acc, ["entries"])
            notes, nodes = env.nodes(lambda: [e.note for e in acc.entries])
            assert notes == ["a", "b"] and on_primary(nodes, "s1"), (notes, nodes)
            s.rollback()
        with env.Session() as s:
            acc = s.scalars(select(Account).where(Account.id == k0).options(joinedload(Account.entries))
                            .with_for_update(of=Account)).unique().one()
            assert acc.name == "lk2" and [e.note for e in acc.entries] == ["a", "b"]
            name, nodes = env.nodes(lambda: s.execute(select(Account.name).where(Account.id == k0)).scalar())
            assert name == "lk2" and on_primary(nodes, "s0"), nodes
            s.rollback()


# -- merge, bulk ---------------------------------------------------------------------------------


def test_merge_after_commit_and_into_another_session_while_replicas_lag(env):
    """merge() of a detached object loads the current row: after this session's commit (and
    in a session given its token) that is the committed row, not the lagging replica's;
    merge(load=False) keeps the object's shard in its identity."""
    k = env.key("s0")
    env.seed({k: "m1"})
    with lagging(env, shards=("s0",)):
        with env.Session() as s:
            s.merge(Account(id=k, name="m2"))
            s.commit()
            tok = s.consistency_token()
            s.expunge_all()
            merged = s.merge(Account(id=k, name="m3"))
            assert inspect(merged).attrs.name.history.deleted == ["m2"]
            s.rollback()
        with env.Session(consistency_token=tok) as s2:
            merged = s2.merge(Account(id=k, name="m4"))
            assert inspect(merged).attrs.name.history.deleted == ["m2"] and token(merged) == "s0"
            s2.rollback()
        with env.Session(consistency="eventual") as s3:
            det = s3.get(Account, k)
            s3.expunge(det)
        with env.Session(consistency="eventual") as s4:
            m = s4.merge(det, load=False)
            assert inspect(m).key == (Account, (k,), "s0")


def test_bulk_operations_then_reads_in_and_after_the_transaction(env):
    """insert(Model) with rows of both shards, bulk_update_mappings, bulk_save_objects: the
    transaction's own reads see them (primaries), and after commit, with replicas 30 s behind,
    every read path does too."""
    k0, k1, k2, k3 = env.key("s0"), env.key("s1"), env.key("s0"), env.key("s1")
    tag = f"bk-{k0}"
    with lagging(env):
        with env.Session() as s:
            s.execute(insert(Account), [{"id": k0, "name": tag}, {"id": k1, "name": tag}])
            n, nodes = env.nodes(lambda: s.query(Account).filter_by(name=tag).count())
            assert n == 2 and on_primary(nodes), nodes
            s.bulk_save_objects([Account(id=k2, name=tag), Account(id=k3, name=tag)])
            s.bulk_insert_mappings(Entry, [{"account_id": k, "id": 1, "note": tag} for k in (k0, k1, k2, k3)])
            s.bulk_update_mappings(Account, [{"id": k0, "name": tag + "u"}, {"id": k3, "name": tag + "u"}])
            s.execute(update(Account), [{"id": k1, "name": tag + "v"}])
            assert s.get(Account, k2).name == tag
            s.commit()
            rows = s.execute(select(Account.id, Account.name).where(Account.name.like(tag + "%"))
                             .order_by(Account.id)).all()
            assert [tuple(r) for r in rows] == sorted([(k0, tag + "u"), (k1, tag + "v"), (k2, tag),
                                                       (k3, tag + "u")])
            assert s.get(Account, k3).name == tag + "u"
            assert [e.note for e in s.get(Account, k2).entries] == [tag]
            assert s.query(Entry).filter(Entry.note == tag).count() == 4


# -- odd statements ----------------------------------------------------------------------------


def test_selects_with_side_effects_run_where_they_can_take_effect(env):
    """SELECTs that write or lock, on a named shard, with ``shardkit_role="primary"`` as the
    README asks (shardkit sees a SELECT; it cannot know a function writes): over an INSERT ...
    RETURNING CTE (inserts the row), ``select(Sequence.next_value())`` (takes an id) and
    ``select(func.pg_advisory_xact_lock(n))`` (holds the lock until the transaction ends)."""
    problems = []
    k = env.key("s1")
    seq = Sequence("rvw_seq")
    for shard in ("s0", "s1"):
        with env.cluster.primary(shard).begin() as c:
            c.execute(text("CREATE SEQUENCE IF NOT EXISTS rvw_seq"))
    env.caught_up()

    def where(word: str, n0: int) -> list[str]:
        return [n for n, st in env.served[n0:] if word in st]

    with env.Session() as s:
        cte = insert(Account).values(id=k, name="cte").returning(Account.id).cte("ins")
        n0 = len(env.served)
        try:
            got = s.execute(select(cte.c.id).execution_options(shardkit_shard="s1", shardkit_role="primary")).scalars().all()
            if got != [k]:
                problems.append(f"INSERT CTE returned {got}")
        except sa_exc.DBAPIError as e:
            problems.append(f"INSERT CTE on {where('INSERT', n0)}: {str(e.orig).splitlines()[0]}")
        s.rollback()
        n0 = len(env.served)
        try:
            s.scalar(select(seq.next_value()).execution_options(shardkit_shard="s0", shardkit_role="primary"))
        except sa_exc.DBAPIError as e:
            problems.append(f"nextval on {where('nextval', n0)}: {str(e.orig).splitlines()[0]}")
        s.rollback()
        lock_id = 424242
        n0 = len(env.served)
        s.execute(select(func.pg_advisory_xact_lock(lock_id)).execution_options(
            shardkit_shard="s1", shardkit_role="primary")).all()
        lock_nodes = where("pg_advisory_xact_lock", n0)
        held = env.primary_value("s1", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                       f"AND objid = {lock_id} AND granted")
        if held != 1:
            problems.append(f"advisory xact lock taken on {lock_nodes}, not held on s1's primary")
        s.rollback()
    assert not problems, problems


# -- freshness between an object and its loads ----------------------------------------------------


def test_lazy_load_is_not_older_than_the_object_it_loads_for(env):
    """With one replica of s0 30 s behind and the other current, a commit by another session
    changes an account's name and adds an entry in ONE transaction.  A later session reads the
    account and then lazy-loads its entries: on one database (READ COMMITTED, which the README
    says replica reads are like) the second statement never sees an older state than the first,
    so a name and an entry list from different sides of that commit cannot be seen together."""
    k = env.key("s0")
    env.seed({k: "before"}, {k: ["e1"]})
    r0 = env.dev.shard("s0").replicas[0]
    try:
        r0.set_apply_delay(30)
        time.sleep(0.3)
        with env.Session() as w:
            w.get(Account, k).name = "after"
            w.add(Entry(account_id=k, id=2, note="e2"))
            w.commit()
        env.dev.shard("s0").replicas[1].wait_caught_up()
        time.sleep(0.3)
        seen = []
        for _ in range(4):
            with env.Session() as s:
                acc, n1 = env.nodes(lambda: s.get(Account, k))
                notes, n2 = env.nodes(lambda: [e.note for e in acc.entries])
                seen.append((acc.name, notes, n1 + n2))
        mixed = [x for x in seen if (x[0] == "after") != (x[1] == ["e1", "e2"])]
        assert not mixed, mixed
    finally:
        r0.set_apply_delay(0)
        env.caught_up(("s0",))
