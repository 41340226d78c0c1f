"""The flush that writes each shard's objects together (the session's
_connections_for_states) and shard_of_instance's cached key attributes and
_key_changed's look at committed_state: flushes the unit of work runs in other ways
(cycles of one class, post_update, row switches, version counters, eager defaults,
joined inheritance, listeners) still write every row where it belongs, and a plain
Session or SQLAlchemy's own ShardedSession flushes as it did."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from own_tables import alternating_keys, cluster_with_tables, statements_counted, truncate_everywhere
from sqlalchemy import (BigInteger, ForeignKeyConstraint, Identity, Integer, MetaData,
                        String, event, select, text)
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, attributes, composite, defer, mapped_column,
                            relationship, sessionmaker, synonym)
from sqlalchemy.orm.exc import StaleDataError

import shardkit
from shardkit.errors import CrossShardWriteError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Node(Base):
    """An adjacency list on one shard per tenant (the unit of work writes it row by row,
    in cycles), with a post_update pointer from a node to one of its children."""

    __tablename__ = "fgr_nodes"
    tenant: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(BigInteger)
    favorite_id: Mapped[int | None] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(30), default="")
    __table_args__ = (
        ForeignKeyConstraint(["tenant", "parent_id"], ["fgr_nodes.tenant", "fgr_nodes.id"]),
        ForeignKeyConstraint(["tenant", "favorite_id"], ["fgr_nodes.tenant", "fgr_nodes.id"],
                             use_alter=True, name="fgr_nodes_fav"),
    )
    children: Mapped[list[Node]] = relationship(
        back_populates="parent", cascade="all, delete-orphan",
        foreign_keys="[Node.tenant, Node.parent_id]")
    parent: Mapped[Node | None] = relationship(
        back_populates="children", remote_side="[Node.tenant, Node.id]",
        foreign_keys="[Node.tenant, Node.parent_id]")
    favorite: Mapped[Node | None] = relationship(
        primaryjoin="and_(Node.tenant == remote(Node.tenant), "
                    "foreign(Node.favorite_id) == remote(Node.id))",
        post_update=True, viewonly=False)


class Ver(Base):
    __tablename__ = "fgr_vers"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ver: Mapped[int] = mapped_column(Integer, nullable=False)
    v: Mapped[str] = mapped_column(String(30))
    __mapper_args__ = {"version_id_col": ver}


class Eager(Base):
    """Columns the INSERT makes (per shard sequence, server default), fetched by RETURNING."""

    __tablename__ = "fgr_eager"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), nullable=False)
    label: Mapped[str] = mapped_column(String(30), server_default=text("'made-' || 'here'"))
    v: Mapped[str] = mapped_column(String(30))
    __mapper_args__ = {"eager_defaults": True}


class Acct(Base):
    """Keyed on tenant; the primary key alone (unique per shard only) is not the key."""

    __tablename__ = "fgr_accts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant: Mapped[int] = mapped_column(BigInteger, nullable=False)
    v: Mapped[str] = mapped_column(String(30))


class Animal(Base):
    __tablename__ = "fgr_animals"
    tenant: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(30))
    __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "animal"}


class Dog(Animal):
    __tablename__ = "fgr_dogs"
    tenant: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    bark: Mapped[str] = mapped_column(String(30))
    __table_args__ = (ForeignKeyConstraint(["tenant", "id"], ["fgr_animals.tenant", "fgr_animals.id"]),)
    __mapper_args__ = {"polymorphic_identity": "dog"}


class Cat(Animal):
    __tablename__ = "fgr_cats"
    tenant: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    lives: Mapped[int] = mapped_column(Integer)
    __table_args__ = (ForeignKeyConstraint(["tenant", "id"], ["fgr_animals.tenant", "fgr_animals.id"]),)
    __mapper_args__ = {"polymorphic_identity": "cat"}


class Moved(Base):
    """For listeners that set the shard key during the flush (kept to this class)."""

    __tablename__ = "fgr_moved"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(30))


@dataclasses.dataclass
class Where:
    tenant: int
    region: str


class Syn(Base):
    """Its shard key column mapped under another name, reached through a synonym and a
    composite."""

    __tablename__ = "fgr_syn"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    _tenant: Mapped[int] = mapped_column("tenant", BigInteger, nullable=False)
    region: Mapped[str] = mapped_column(String(10), default="eu")
    tenant = synonym("_tenant")
    where: Mapped[Where] = composite("_tenant", "region")


CONFIG = {"groups": {
    "nodes": {"tables": {"fgr_nodes": "tenant", "fgr_accts": "tenant", "fgr_animals": "tenant",
                         "fgr_dogs": "tenant", "fgr_cats": "tenant", "fgr_syn": "tenant"}},
    "ids": {"tables": {"fgr_vers": "id", "fgr_eager": "id", "fgr_moved": "id",
                        "fgr_lockees": "id"}}}}


@pytest.fixture(scope="module")
def env(sharded_dev):
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as cluster:
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _fresh_vers(cluster, Session, n, v):
    """``n`` Ver rows a shard, value ``v``, in an emptied table: (keys by shard, the keys
    taken from each shard in turn)."""
    truncate_everywhere(cluster, "fgr_vers")
    by_shard, keys = alternating_keys(cluster, "fgr_vers", n)
    with Session() as s:
        s.add_all(Ver(id=k, v=v) for k in keys)
        s.commit()
    return by_shard, keys


def _rows(cluster, shard, sql, **params):
    with cluster.primary(shard).connect() as c:
        return c.execute(text(sql), params).all()


@pytest.fixture
def statements(env):
    """(shard, first word) -> statements run on each primary inside the test."""
    cluster, _ = env
    with statements_counted(cluster) as hits:
        yield hits


# -- a class that refers to itself: cycles and post_update ---------------------------


def test_adjacency_lists_of_alternating_tenants_with_post_update(env):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_nodes")
    by_shard, tenants = alternating_keys(cluster, "fgr_nodes", 4)
    with Session() as s:
        for t in tenants:
            root = Node(tenant=t, id=1, name=f"root{t}")
            kid = Node(tenant=t, id=2, name="kid")
            kid.children.append(Node(tenant=t, id=3, name="grandkid"))
            root.children = [kid, Node(tenant=t, id=4, name="kid2")]
            root.favorite = kid
            s.add(root)
        s.commit()
    for shard, own in by_shard.items():
        rows = _rows(cluster, shard, "SELECT tenant, id, parent_id, favorite_id FROM fgr_nodes "
                                     "ORDER BY tenant, id")
        assert rows == [(t, i, p, f) for t in sorted(own)
                        for i, p, f in ((1, None, 2), (2, 1, None), (3, 2, None), (4, 1, None))]
    with Session() as s:
        # post_update on every tenant in one flush, then a cascade delete of every tree
        roots = s.scalars(select(Node).where(Node.id == 1, Node.tenant.in_(tenants))).all()
        assert len(roots) == len(tenants)
        for r in roots:
            r.favorite = next(c for c in r.children if c.id == 4)
        s.commit()
        for shard, own in by_shard.items():
            assert {f for (f,) in _rows(cluster, shard, "SELECT favorite_id FROM fgr_nodes WHERE id = 1")} == {4}
        for r in s.scalars(select(Node).where(Node.id == 1, Node.tenant.in_(tenants))):
            r.favorite = None
            s.delete(r)
        s.commit()
    for shard in cluster.shard_names:
        assert _rows(cluster, shard, "SELECT count(*) FROM fgr_nodes") == [(0,)]


# -- row switch --------------------------------------------------------------------------


def test_row_switch_of_alternating_keys_updates_each_row_on_its_shard(env, statements):
    cluster, Session = env
    by_shard, keys = _fresh_vers(cluster, Session, 5, "old")
    statements.clear()
    with Session() as s:
        for e in s.scalars(select(Ver).where(Ver.id.in_(keys))):
            s.delete(e)
        s.add_all(Ver(id=k, v=f"new{k}") for k in keys)   # the same primary keys: row switch
        s.commit()
    assert not any(verb == "INSERT" for _, verb in statements)
    for shard, own in by_shard.items():
        assert _rows(cluster, shard, "SELECT id, v, ver FROM fgr_vers ORDER BY id") == [
            (k, f"new{k}", 2) for k in sorted(own)]


def test_delete_and_add_of_one_primary_key_on_two_shards(env):
    """Acct's key is tenant: id 1 deleted on one shard and id 1 added for a tenant of
    another shard is a DELETE there and an INSERT here (no row switch)."""
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_accts")
    by_shard, tenants = alternating_keys(cluster, "fgr_accts", 2)
    a, b = tenants[0], tenants[1]
    sa, sb = cluster.shard_for("fgr_accts", a), cluster.shard_for("fgr_accts", b)
    assert sa != sb
    with Session() as s:
        s.add_all([Acct(id=1, tenant=a, v="a"), Acct(id=2, tenant=b, v="b2"),
                   Acct(id=3, tenant=a, v="a3")])
        s.commit()
    with Session() as s:
        s.delete(s.scalars(select(Acct).where(Acct.tenant == a, Acct.id == 1)).one())
        s.add_all([Acct(id=1, tenant=b, v="moved"), Acct(id=3, tenant=b, v="b3")])
        s.commit()
    assert _rows(cluster, sa, "SELECT id, tenant, v FROM fgr_accts ORDER BY id") == [(3, a, "a3")]
    assert _rows(cluster, sb, "SELECT id, tenant, v FROM fgr_accts ORDER BY id") == [
        (1, b, "moved"), (2, b, "b2"), (3, b, "b3")]


# -- version counters, eager defaults ----------------------------------------------------


def test_version_counters_on_every_shard_and_a_stale_one_rolls_back_all(env, statements):
    cluster, Session = env
    by_shard, keys = _fresh_vers(cluster, Session, 10, "a")
    statements.clear()
    with Session() as s:
        objs = s.scalars(select(Ver).where(Ver.id.in_(keys))).all()
        for o in objs:
            o.v = "b"
        s.commit()
        assert {o.ver for o in objs} == {2}
    for shard, own in by_shard.items():
        assert _rows(cluster, shard, "SELECT id, v, ver FROM fgr_vers ORDER BY id") == [
            (k, "b", 2) for k in sorted(own)]
    # One row changed behind the session's back: the flush fails on its shard, and the
    # rows of the other shards (written first or not) are not changed either.
    victim = keys[-1]
    with Session() as s:
        objs = s.scalars(select(Ver).where(Ver.id.in_(keys))).all()
        with cluster.primary(cluster.shard_for("fgr_vers", victim)).begin() as c:
            c.execute(text("UPDATE fgr_vers SET ver = 9 WHERE id = :k"), {"k": victim})
        for o in objs:
            o.v = "c"
        with pytest.raises(StaleDataError):
            s.commit()
    for shard, own in by_shard.items():
        assert {v for (v,) in _rows(cluster, shard, "SELECT v FROM fgr_vers")} == {"b"}


def test_eager_defaults_returned_to_the_object_that_made_them(env, statements):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_eager")
    by_shard, keys = alternating_keys(cluster, "fgr_eager", 40)
    with Session() as s:
        objs = [Eager(id=k, v=f"v{k}") for k in keys]
        s.add_all(objs)
        s.commit()
        got = {o.id: (o.__dict__["seq"], o.__dict__["label"]) for o in objs}
    assert {(sh, verb) for sh, verb in statements if verb == "INSERT"} == {
        (sh, "INSERT") for sh in cluster.shard_names}
    for shard, own in by_shard.items():
        rows = _rows(cluster, shard, "SELECT id, seq, label FROM fgr_eager ORDER BY seq")
        assert [r[0] for r in rows] == own
        for k, seq, label in rows:
            assert got[k] == (seq, label)


# -- joined inheritance --------------------------------------------------------------------


def test_subclasses_of_a_joined_hierarchy_on_every_shard(env, statements):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_dogs", "fgr_cats", "fgr_animals")
    by_shard, tenants = alternating_keys(cluster, "fgr_animals", 5)
    with Session() as s:
        for i, t in enumerate(tenants):
            s.add(Dog(tenant=t, id=i, name=f"d{i}", bark="woof"))
            s.add(Cat(tenant=t, id=100 + i, name=f"c{i}", lives=9))
            s.add(Animal(tenant=t, id=200 + i, name=f"a{i}"))
        s.commit()
    inserts = {k: n for k, n in statements.items() if k[1] == "INSERT"}
    # base rows on each shard, then each subclass table's: three statements a shard
    assert inserts == {(sh, "INSERT"): 3 for sh in cluster.shard_names}
    for shard, own in by_shard.items():
        assert _rows(cluster, shard, "SELECT count(*) FROM fgr_animals") == [(3 * len(own),)]
        assert _rows(cluster, shard, "SELECT count(*) FROM fgr_dogs") == [(len(own),)]
        assert _rows(cluster, shard, "SELECT count(*) FROM fgr_cats") == [(len(own),)]
    with Session() as s:
        for a in s.scalars(select(Animal).where(Animal.tenant.in_(tenants))):
            if isinstance(a, Cat):
                a.lives = 8
                a.name = "cc"
            else:
                s.delete(a)
        s.commit()
    for shard, own in by_shard.items():
        assert _rows(cluster, shard, "SELECT kind, count(*) FROM fgr_animals GROUP BY kind") == [
            ("cat", len(own))]
        assert _rows(cluster, shard, "SELECT DISTINCT lives FROM fgr_cats") == [(8,)]


# -- listeners that set the key during the flush ---------------------------------------


def _moved_listener(kind, target_id, new_id):
    def listener(mapper, connection, target):
        if target.id == target_id:
            target.id = new_id
    event.listen(Moved, kind, listener)
    return listener


@pytest.mark.parametrize("kind", ["before_insert", "before_update"])
def test_a_listener_moving_one_key_of_many_fails_the_flush_with_nothing_written(env, kind):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_moved")
    by_shard, keys = alternating_keys(cluster, "fgr_moved", 6)
    victim = keys[4]
    elsewhere = next(k for k in range(max(keys) + 1, max(keys) + 1000)
                     if cluster.shard_for("fgr_moved", k) != cluster.shard_for("fgr_moved", victim))
    if kind == "before_update":
        with Session() as s:
            s.add_all(Moved(id=k, v="a") for k in keys)
            s.commit()
    fn = _moved_listener(kind, victim, elsewhere)
    try:
        with Session() as s:
            if kind == "before_insert":
                s.add_all(Moved(id=k, v="a") for k in keys)
            else:
                for o in s.scalars(select(Moved).where(Moved.id.in_(keys))):
                    o.v = "b"
            with pytest.raises(CrossShardWriteError, match="changed during the flush"):
                s.commit()
    finally:
        event.remove(Moved, kind, fn)
    want = set() if kind == "before_insert" else {(k, "a") for k in keys}
    found = set()
    for shard in cluster.shard_names:
        found |= set(_rows(cluster, shard, "SELECT id, v FROM fgr_moved"))
    assert found == want


# -- _key_changed: keys set in other ways ------------------------------------------------


def _other_tenant(cluster, t):
    return next(k for k in range(t + 1, t + 1000)
                if cluster.shard_for("fgr_syn", k) != cluster.shard_for("fgr_syn", t))


@pytest.mark.parametrize("how", ["synonym", "composite", "column", "expired", "expired_all",
                                 "deferred_unloaded", "no_autoflush_twice"])
def test_a_key_moved_to_another_shard_is_refused_however_it_is_set(env, how):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_syn")
    t = 1
    other = _other_tenant(cluster, t)
    with Session() as s:
        s.add(Syn(id=1, tenant=t))
        s.commit()
    with Session() as s:
        o = s.scalars(select(Syn).where(Syn._tenant == t)).one()
        if how == "synonym":
            o.tenant = other
        elif how == "composite":
            o.where = Where(other, "us")
        elif how == "column":
            o._tenant = other
        elif how == "expired":
            s.expire(o, ["_tenant"])
            o._tenant = other
        elif how == "expired_all":
            s.expire(o)
            o.tenant = other
        elif how == "deferred_unloaded":
            s.expunge(o)
            o = s.scalars(select(Syn).where(Syn._tenant == t)
                          .options(defer(Syn._tenant))).one()
            o._tenant = other
        elif how == "no_autoflush_twice":
            o._tenant = other
            o._tenant = t
            o.region = "x"
            o._tenant = other
        with pytest.raises(CrossShardWriteError, match="would move it"):
            s.flush()
    found = []
    for shard in cluster.shard_names:
        found += _rows(cluster, shard, "SELECT id, tenant FROM fgr_syn")
    assert found == [(1, t)]


def test_flag_modified_and_set_committed_value_of_a_key_are_not_moves(env):
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_syn")
    with Session() as s:
        s.add(Syn(id=1, tenant=5, region="eu"))
        s.commit()
    with Session() as s:
        o = s.scalars(select(Syn).where(Syn._tenant == 5)).one()
        attributes.flag_modified(o, "_tenant")
        o.region = "us"
        s.commit()
    assert [r for sh in cluster.shard_names
            for r in _rows(cluster, sh, "SELECT id, tenant, region FROM fgr_syn")] == [(1, 5, "us")]


# -- other sessions --------------------------------------------------------------------


def test_a_plain_session_and_sqlalchemys_sharded_session_flush_as_before(env):
    cluster, _ = env
    truncate_everywhere(cluster, "fgr_eager")
    by_shard, keys = alternating_keys(cluster, "fgr_eager", 4)
    names = cluster.shard_names
    # A plain Session on one shard: everything there, in one INSERT, in the order added.
    with statements_counted(cluster) as hits, Session(cluster.primary(names[0])) as s:
        objs = [Eager(id=k, v="plain") for k in keys]
        s.add_all(objs)
        s.commit()
        assert [o.id for o in sorted(objs, key=lambda o: o.seq)] == keys
    assert {k: n for k, n in hits.items() if k[1] == "INSERT"} == {(names[0], "INSERT"): 1}
    truncate_everywhere(cluster, "fgr_eager")
    # SQLAlchemy's own ShardedSession: unchanged (a statement per row of alternating shards,
    # each object routed just before its before_insert listeners run).
    order = []

    def chooser(mapper, instance, clause=None):
        order.append(("route", instance.id))
        return cluster.shard_for("fgr_eager", instance.id)

    def before_insert(mapper, connection, target):
        order.append(("listener", target.id))

    sa_session = SAShardedSession(
        shards={n: cluster.primary(n) for n in names}, shard_chooser=chooser,
        identity_chooser=lambda *a, **k: names, execute_chooser=lambda ctx: names)
    event.listen(Eager, "before_insert", before_insert)
    try:
        with statements_counted(cluster) as hits, sa_session as s:
            s.add_all(Eager(id=k, v="sa") for k in keys)
            s.commit()
    finally:
        event.remove(Eager, "before_insert", before_insert)
    assert sum(n for (sh, verb), n in hits.items() if verb == "INSERT") == len(keys)
    assert order == [(w, k) for k in keys for w in ("route", "listener")]
    for shard, own in by_shard.items():
        assert [r[0] for r in _rows(cluster, shard, "SELECT id FROM fgr_eager ORDER BY seq")] == own


# -- the order shards are written in ---------------------------------------------------


class Lockee(Base):
    __tablename__ = "fgr_lockees"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(30))





@pytest.mark.filterwarnings("ignore:DELETE statement on table 'fgr_lockees' expected")
@pytest.mark.parametrize("verb", ["update", "delete"])
def test_two_flushes_of_overlapping_rows_on_two_shards_do_not_deadlock(env, verb):
    """Each flush locks rows shard by shard.  With the shards taken in the order of each
    flush's first object, flush A (keys k1 on X, k2 on Y, k3 on X: X first) and flush B
    (k2 on Y, k3 on X: Y first) could each hold a row the other waits for, on two
    databases: a deadlock neither database sees, until a lock timeout (or for ever).
    In one order of shards for every flush (the cluster's, as a statement on several
    shards takes them), also a flush of two rows, they cannot."""
    cluster, Session = env
    truncate_everywhere(cluster, "fgr_lockees")
    names = cluster.shard_names
    x, y = names[:2]   # (B writes two rows: Y's first by primary key, then X's)
    kx = [k for k in range(1, 500) if cluster.shard_for("fgr_lockees", k) == x]
    ky = [k for k in range(1, 500) if cluster.shard_for("fgr_lockees", k) == y]
    k1 = kx[0]
    k2 = next(k for k in ky if k > k1)
    k3 = next(k for k in kx if k > k2)
    with Session() as s:
        s.add_all(Lockee(id=k, v="0") for k in (k1, k2, k3))
        s.commit()
    b_has_y = threading.Event()
    who = threading.local()
    errors: dict[str, BaseException] = {}

    def before(conn, cursor, statement, *a):
        if getattr(who, "name", None) == "A" and conn.engine is cluster.primary(y) \
                and statement.lstrip().upper().startswith(verb.upper()):
            b_has_y.wait(3)   # (B's row on Y locked first, if B goes there first)

    def after(conn, cursor, statement, *a):
        if getattr(who, "name", None) == "B" and conn.engine is cluster.primary(y) \
                and statement.lstrip().upper().startswith(verb.upper()):
            b_has_y.set()

    def run(name, keys):
        who.name = name
        try:
            with Session() as s:
                for n in names:
                    s.connection(bind_arguments={"shard_id": n}).exec_driver_sql(
                        "SET LOCAL lock_timeout = '6s'")
                for o in s.scalars(select(Lockee).where(Lockee.id.in_(keys))):
                    if verb == "update":
                        o.v = name
                    else:
                        s.delete(o)
                s.commit()
        except BaseException as e:  # noqa: BLE001
            errors[name] = e

    hooks = [(cluster.primary(y), "before_cursor_execute", before),
             (cluster.primary(y), "after_cursor_execute", after)]
    for h in hooks:
        event.listen(*h)
    try:
        a = threading.Thread(target=run, args=("A", [k1, k2, k3]))
        b = threading.Thread(target=run, args=("B", [k2, k3]))
        a.start()
        time.sleep(0.5)   # A holds its rows of the shard it writes first
        b.start()
        a.join(30)
        b.join(30)
    finally:
        for h in hooks:
            event.remove(*h)
    assert not a.is_alive() and not b.is_alive()
    assert errors == {}, errors
