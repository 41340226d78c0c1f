"""The ORM write path as a SQLAlchemy 2.x user takes it: what
lands on each shard (read on each primary directly) compared with what one database
holds after the same unit of work."""

from __future__ import annotations

import datetime

import pytest
from own_tables import ShardEnv, one_database
from sqlalchemy import (BigInteger, DateTime, ForeignKey, Identity, Integer, MetaData, Sequence,
                        String, func, insert, select, text, update)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Tenant(Base):
    __tablename__ = "orw_tenants"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    notes: Mapped[list[Note]] = relationship(back_populates="tenant", cascade="all, delete-orphan",
                                             order_by="Note.id")


class Note(Base):
    """Identity primary key, keyed by tenant_id: each shard numbers its own rows."""
    __tablename__ = "orw_notes"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("orw_tenants.id"))
    body: Mapped[str] = mapped_column(String(40), default="")
    created: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    tenant: Mapped[Tenant] = relationship(back_populates="notes")


class Seqd(Base):
    __tablename__ = "orw_seqd"
    id: Mapped[int] = mapped_column(BigInteger, Sequence("orw_seqd_id"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(Integer, server_default="5")


class Item(Base):
    __tablename__ = "orw_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    qty: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(String(10), default="dflt")


CONFIG = {
    "groups": {
        "tenants": {"strategy": "hash", "tables": {"orw_tenants": "id", "orw_notes": "tenant_id",
                                                    "orw_seqd": "tenant_id"}},
        "items": {"strategy": "hash", "tables": {"orw_items": "id"}},
    },
}
TABLES = [t.name for t in reversed(Base.metadata.sorted_tables)]


class Env(ShardEnv):
    model = Tenant

    def rows(self, shard, sql):
        with self.autocommit(shard) as c:
            return sorted(tuple(r) for r in c.execute(text(sql)))

    def placed(self, sql):
        return {s: self.rows(s, sql) for s in self.names}


@pytest.fixture(scope="module")
def env_(shardkit_dev_cluster):
    with Env.started(shardkit_dev_cluster, CONFIG, Base.metadata) as env:
        env.oracle = one_database(shardkit_dev_cluster, "orw6g_oracle", Base.metadata)
        yield env
        env.oracle.dispose()


@pytest.fixture
def env(env_):
    env_.reset(*TABLES)
    with env_.oracle.begin() as c:
        c.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
        c.execute(text("ALTER SEQUENCE orw_seqd_id RESTART"))
    for s in env_.names:
        with env_.autocommit(s) as c:
            c.execute(text("ALTER TABLE orw_notes ALTER COLUMN id RESTART"))
            c.execute(text("ALTER SEQUENCE orw_seqd_id RESTART"))
    return env_


def S(env, **kw):
    kw.setdefault("consistency", "strong")
    return env.Session(**kw)


def oracle_rows(env, sql):
    with env.oracle.connect() as c:
        return sorted(tuple(r) for r in c.execute(text(sql)))


def both(env, fn, **kw):
    """fn(session) on the cluster and on one database; returns (cluster_out, oracle_out)."""
    with S(env, **kw)() as s:
        a = fn(s)
    with Session(env.oracle, **kw) as s:
        b = fn(s)
    return a, b


def test_one_flush_of_parents_on_two_shards_with_identity_children_appended_later(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]

    def work(s):
        t0, t1 = Tenant(id=k0, name="a"), Tenant(id=k1, name="b")
        t0.notes.append(Note(body="x0"))
        t1.notes.append(Note(body="x1"))
        s.add_all([t0, t1])
        s.flush()
        t0.notes.append(Note(body="y0"))
        n = Note(body="y1")
        n.tenant = t1
        s.add(n)
        s.flush()
        out = sorted((x.tenant_id, x.body, x.created is not None) for x in (*t0.notes, *t1.notes))
        s.commit()
        return out
    a, b = both(env, work)
    assert a == b
    assert env.placed("SELECT id, tenant_id, body FROM orw_notes") == {
        env.names[0]: [(1, k0, "x0"), (2, k0, "y0")], env.names[1]: [(1, k1, "x1"), (2, k1, "y1")]}


def test_delete_orphan_and_cascade_delete_on_each_parents_shard(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        for k in (k0, k1):
            s.add(Tenant(id=k, notes=[Note(body="a"), Note(body="b")]))
        s.commit()
    with S(env)() as s:
        t0, t1 = s.get(Tenant, k0), s.get(Tenant, k1)
        t0.notes.remove(t0.notes[0])
        s.delete(t1)
        s.commit()
    assert env.placed("SELECT tenant_id, body FROM orw_notes") == {env.names[0]: [(k0, "b")], env.names[1]: []}
    assert env.placed("SELECT id FROM orw_tenants") == {env.names[0]: [(k0,)], env.names[1]: []}


def test_merge_of_an_object_whose_id_another_shard_also_has(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        s.add_all([Tenant(id=k0), Tenant(id=k1)])
        n0, n1 = Note(tenant_id=k0, body="zero"), Note(tenant_id=k1, body="one")
        s.add_all([n0, n1])
        s.commit()
        assert n0.id == n1.id == 1
    # n1 detached (loaded). Another session holds n0; merge n1 changed.
    n1.body = "one-merged"
    with S(env)() as s:
        held = s.get(Note, 1, identity_token=env.names[0])
        m = s.merge(n1)
        assert m is not held
        assert inspect_token(m) == env.names[1]
        s.commit()
    with S(env)() as s:
        n1 = s.get(Note, 1, identity_token=env.names[1])
        s.expunge(n1)
    with S(env)() as s:
        held = s.get(Note, 1, identity_token=env.names[0])
        m = s.merge(n1, load=False)
        assert m is not held
        assert inspect_token(m) == env.names[1], inspect_token(m)
        m.body = "one-noload"
        s.commit()
    assert env.placed("SELECT id, tenant_id, body FROM orw_notes") == {
        env.names[0]: [(1, k0, "zero")], env.names[1]: [(1, k1, "one-noload")]}
    # a transient object with the same pk, merged: looked up by its tenant's shard
    with S(env)() as s:
        held = s.get(Note, 1, identity_token=env.names[0])
        m = s.merge(Note(id=1, tenant_id=k1, body="transient"))
        assert m is not held and inspect_token(m) == env.names[1]
        s.commit()
    assert env.placed("SELECT id, tenant_id, body FROM orw_notes") == {
        env.names[0]: [(1, k0, "zero")], env.names[1]: [(1, k1, "transient")]}


def inspect_token(obj):
    from sqlalchemy import inspect
    st = inspect(obj)
    return st.key[2] if st.key else st.identity_token


def test_sequence_ids_and_server_defaults_keyed_by_another_column(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]

    def work(s):
        objs = [Seqd(tenant_id=k) for k in (k0, k1, k0, k1)]
        s.add_all(objs)
        s.flush()
        out = [(o.tenant_id, o.n) for o in objs]
        s.commit()
        return out, [(o.tenant_id, o.id) for o in objs]
    (a, ida), (b, idb) = both(env, work)
    assert a == b
    got = env.placed("SELECT id, tenant_id FROM orw_seqd")
    assert sorted((t, i) for rs in got.values() for i, t in rs) == sorted(ida)


def test_refresh_with_for_update_locks_on_the_objects_shard_and_expire_on_commit_false(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        s.add_all([Tenant(id=k0), Tenant(id=k1)])
        s.add_all([Note(tenant_id=k0, body="a"), Note(tenant_id=k1, body="b")])
        s.commit()
    with S(env)() as s:
        n = s.scalars(select(Note).where(Note.tenant_id == k1)).one()
        with env.autocommit(env.names[1]) as c:
            c.execute(text("UPDATE orw_notes SET body='changed'"))
        s.refresh(n, with_for_update=True)
        assert n.body == "changed"
        with env.autocommit(env.names[1]) as c:
            locks = c.execute(text("SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
                                   "WHERE r.relname = 'orw_notes' AND l.mode = 'RowShareLock'")).scalar()
        assert locks == 1
        s.rollback()
    with S(env, expire_on_commit=False)() as s:
        t = s.get(Tenant, k1)
        t.name = "nn"
        s.commit()
        assert t.name == "nn"
        assert [x.body for x in t.notes] == ["changed"]


def test_savepoint_rolled_back_keeps_the_other_shards_earlier_writes(env):
    k0, k1 = env.keys_on(env.names[0], 2), env.keys_on(env.names[1], 2)

    def work(s):
        s.add(Item(id=k0[0], name="keep0"))
        s.flush()
        with s.begin_nested() as sp:
            s.add(Item(id=k1[0], name="keep1"))
        sp = s.begin_nested()
        s.add_all([Item(id=k1[1], name="gone1"), Item(id=k0[1], name="gone0")])
        s.get(Item, k0[0]).qty = 9
        s.flush()
        sp.rollback()
        out = sorted((i.id, i.name, i.qty) for i in s.scalars(select(Item)))
        s.commit()
        return out
    a, b = both(env, work)
    assert a == b
    assert sorted(r for rs in env.placed("SELECT id, name, qty FROM orw_items").values() for r in rs) == \
        oracle_rows(env, "SELECT id, name, qty FROM orw_items")


def test_integrity_error_on_one_shard_of_a_two_shard_flush_then_rollback_and_go_on(env):
    k0, k1 = env.keys_on(env.names[0], 2), env.keys_on(env.names[1], 2)
    with S(env)() as s:
        s.add(Item(id=k1[0], name="there"))
        s.commit()
    with Session(env.oracle) as s:
        s.add(Item(id=k1[0], name="there"))
        s.commit()

    def work(s):
        s.add(Item(id=k0[0], name="ok0"))
        s.flush()
        s.add_all([Item(id=k0[1], name="new0"), Item(id=k1[0], name="dup1")])
        with pytest.raises(sa_exc.IntegrityError):
            s.flush()
        with pytest.raises(sa_exc.PendingRollbackError):
            s.execute(select(Item)).all()
        s.rollback()
        s.add(Item(id=k1[1], name="after"))
        s.commit()
        return sorted((i.id, i.name) for i in s.scalars(select(Item)))
    a, b = both(env, work)
    assert a == b
    assert sorted(r for rs in env.placed("SELECT id, name FROM orw_items").values() for r in rs) == \
        oracle_rows(env, "SELECT id, name FROM orw_items")


def test_core_insert_returning_sorted_by_parameter_order_across_shards(env):
    keys = [k for pair in zip(env.keys_on(env.names[0], 3), env.keys_on(env.names[1], 3)) for k in pair]
    rows = [{"id": k, "name": f"n{k}"} for k in reversed(keys)]

    def work(s):
        r = s.execute(insert(Item.__table__).returning(Item.__table__.c.id, sort_by_parameter_order=True), rows)
        out = [x[0] for x in r]
        s.commit()
        return out
    a, b = both(env, work)
    assert a == b == [r["id"] for r in rows]



def test_upserts_keyed_by_the_shard_key_as_on_one_database(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]

    def work(s):
        s.add_all([Item(id=k0, name="a", qty=1)])
        s.commit()
        rows = [{"id": k0, "name": "a2", "qty": 5}, {"id": k1, "name": "b", "qty": 7}]
        st = postgresql.insert(Item.__table__)
        st = st.on_conflict_do_update(index_elements=["id"], set_={"qty": Item.__table__.c.qty + st.excluded.qty,
                                                                   "name": st.excluded.name})
        r1 = s.execute(st, rows)
        rc1 = r1.rowcount
        # ORM-level single row upsert returning
        st2 = postgresql.insert(Item).values(id=k1, name="b2", qty=1)
        st2 = st2.on_conflict_do_update(index_elements=[Item.id], set_={"qty": Item.qty + st2.excluded.qty}) \
            .returning(Item.id, Item.qty)
        r2 = s.execute(st2).all()
        # ORM bulk upsert
        st3 = postgresql.insert(Item)
        st3 = st3.on_conflict_do_update(index_elements=[Item.id], set_={"name": st3.excluded.name})
        s.execute(st3, [{"id": k0, "name": "z0"}, {"id": k1, "name": "z1"}])
        r3 = None
        s.commit()
        return rc1, [tuple(x) for x in r2], r3, sorted((i.id, i.name, i.qty) for i in s.scalars(select(Item)))
    a, b = both(env, work)
    assert a == b


@pytest.mark.parametrize("sync", ["fetch", "evaluate", "auto"])
def test_update_of_keys_in_a_list_synchronizes_as_on_one_database(env, sync):
    keys = [k for pair in zip(env.keys_on(env.names[0], 2), env.keys_on(env.names[1], 2)) for k in pair]

    def work(s):
        objs = [Item(id=k, name="x", qty=i) for i, k in enumerate(keys)]
        s.add_all(objs)
        s.commit()
        for o in objs:
            o.qty  # load
        r = s.execute(update(Item).where(Item.id.in_(keys[:3])).values(qty=Item.qty + 10, name="u"),
                      execution_options={"synchronize_session": sync})
        rc = r.rowcount
        out = [(o.id, o.name, o.qty) for o in objs]
        r2 = s.execute(update(Item).where(Item.id.in_(keys[1:])).values(qty=0).returning(Item.id, Item.qty),
                       execution_options={"synchronize_session": sync})
        ret = sorted(tuple(x) for x in r2)
        out2 = [(o.id, o.name, o.qty) for o in objs]
        s.commit()
        return rc, out, ret, out2
    a, b = both(env, work)
    assert a == b


@pytest.mark.parametrize("conflict", ["nothing", "update_where"])
def test_upsert_returning_sorted_by_parameter_order_with_skipped_rows(env, conflict):
    """returning(..., sort_by_parameter_order=True) gives the rows in the order of the
    parameter sets, also when ON CONFLICT skips some (one database leaves those out and
    keeps the others' order); split by shard, a shard returning fewer rows than it was
    given made shardkit return them shard by shard instead."""
    keys = [k for pair in zip(env.keys_on(env.names[0], 3), env.keys_on(env.names[1], 3)) for k in pair]
    rows = [{"id": k, "name": f"n{k}", "qty": 1} for k in reversed(keys)]
    t = Item.__table__

    def work(s):
        s.execute(insert(t), [{**rows[1], "qty": 9}, rows[2], rows[4]])
        st = postgresql.insert(t)
        st = st.on_conflict_do_nothing() if conflict == "nothing" else \
            st.on_conflict_do_update(index_elements=["id"], set_={"qty": 2}, where=t.c.qty > 5)
        r = s.execute(st.returning(t.c.id, t.c.qty, sort_by_parameter_order=True), rows)
        out = [tuple(x) for x in r]
        s.commit()
        return out
    a, b = both(env, work)
    assert a == b and len(a) == (3 if conflict == "nothing" else 4)
    assert sorted(r for rs in env.placed("SELECT id, name, qty FROM orw_items").values() for r in rs) == \
        oracle_rows(env, "SELECT id, name, qty FROM orw_items")


def test_merge_of_a_child_keyed_only_through_its_parent_relationship(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        s.add_all([Tenant(id=k0, notes=[Note(body="zero")]), Tenant(id=k1, notes=[Note(body="one")])])
        s.commit()

    with S(env)() as s:
        s.merge(Note(id=1, tenant=Tenant(id=k1), body="merged"))
        s.commit()
    assert env.placed("SELECT id, tenant_id, body FROM orw_notes") == {
        env.names[0]: [(1, k0, "zero")], env.names[1]: [(1, k1, "merged")]}


def test_refresh_and_select_for_update_read_the_primary_under_replica_consistency(env):
    k1 = env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        s.add(Tenant(id=k1, notes=[Note(body="b")]))
        s.commit()
    for consistency in ("eventual", "read_your_writes"):
        with env.Session(consistency=consistency)() as s:
            n = s.scalars(select(Note).where(Note.tenant_id == k1)).one()
            with env.autocommit(env.names[1]) as c:
                c.execute(text("UPDATE orw_notes SET body='changed'"))
            s.refresh(n, with_for_update=True)
            assert n.body == "changed"
            got = s.scalars(select(Note).where(Note.tenant_id == k1).with_for_update()
                            .execution_options(populate_existing=True)).one()
            assert got is n
            s.rollback()
            with env.autocommit(env.names[1]) as c:
                c.execute(text("UPDATE orw_notes SET body='b'"))


def test_flush_error_inside_a_savepoint_across_two_shards(env):
    k0, k1 = env.keys_on(env.names[0], 3), env.keys_on(env.names[1], 3)
    for mk in (S(env), lambda: Session(env.oracle)):
        with mk() as s:
            s.add(Item(id=k1[0], name="there"))
            s.commit()

    def work(s):
        s.add(Item(id=k0[0], name="before"))
        s.flush()
        sp = s.begin_nested()
        s.add_all([Item(id=k0[1], name="in-sp"), Item(id=k1[2], name="in-sp1"), Item(id=k1[0], name="dup")])
        with pytest.raises(sa_exc.IntegrityError):
            s.flush()
        assert not sp.is_active
        sp.rollback()
        s.add(Item(id=k0[2], name="after"))
        s.commit()
        return sorted((i.id, i.name) for i in s.scalars(select(Item)))
    a, b = both(env, work)
    assert a == b
    assert sorted(r for rs in env.placed("SELECT id, name FROM orw_items").values() for r in rs) == \
        oracle_rows(env, "SELECT id, name FROM orw_items")


def test_upsert_keeping_its_key_runs_and_moving_it_is_refused(env):
    k0, k1 = env.keys_on(env.names[0], 1)[0], env.keys_on(env.names[1], 1)[0]
    with S(env)() as s:
        st = postgresql.insert(Item)
        st = st.on_conflict_do_update(index_elements=[Item.id], set_={Item.id: st.excluded.id, Item.name: "u"})
        s.execute(st, [{"id": k0, "name": "a"}, {"id": k1, "name": "b"}])
        s.execute(st, [{"id": k0, "name": "a"}, {"id": k1, "name": "b"}])
        st2 = postgresql.insert(Item).values(id=k0, name="q")
        st2 = st2.on_conflict_do_update(index_elements=[Item.id], set_={Item.id: k1})
        with pytest.raises(shardkit.CrossShardWriteError):
            s.execute(st2)
        s.rollback()


def test_orm_insert_returning_of_one_row_and_the_refusal_of_bulk_returning_says_how(env):
    """One dict of parameters is an ORM bulk INSERT to SQLAlchemy too: its RETURNING is
    refused, and the error (and README) said only 'a list of rows' / 'add_all()', not
    that one row's values in the statement work."""
    k1 = env.keys_on(env.names[1], 1)[0]

    def work(s):
        r = s.execute(insert(Item).values(id=k1, name="x", qty=3).returning(Item.id, Item.qty)).all()
        o = s.execute(insert(Item).values(id=k1 + 1000, name="y").returning(Item)).scalar_one()
        out = [tuple(x) for x in r], (o.id, o.name, o.qty, o.note)
        s.commit()
        return out
    a, b = both(env, work)
    assert a == b
    with S(env)() as s, pytest.raises(shardkit.RoutingError, match=r"values\(\.\.\.\)"):
        s.execute(insert(Item).returning(Item.id), {"id": k1 + 5, "name": "x"})
