"""ORM features a power user relies on, through ShardedSession,
compared with what a plain Session on one database gives: version counters (client and
server side, on several shards in one flush), single- and joined-table inheritance,
refresh / expire / populate_existing / FOR UPDATE, ORM UPDATE/DELETE with every
synchronize_session, merge and make_transient_to_detached, mapper and do_orm_execute
listeners, identity primary keys beside a non-pk shard key, a key attribute named
unlike its column."""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables, keys_per_shard, nodes_used, shards_holding, truncate_everywhere
from sqlalchemy import (
    BigInteger,
    FetchedValue,
    Identity,
    ForeignKey,
    Integer,
    MetaData,
    String,
    delete,
    insert,
    event,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    make_transient_to_detached,
    mapped_column,
    selectin_polymorphic,
    sessionmaker,
    with_polymorphic,
)
from sqlalchemy.orm.exc import StaleDataError

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class VDoc(Base):
    __tablename__ = "opr_vdocs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"version_id_col": version}


class XDoc(Base):
    """A server-side version counter: a trigger bumps it."""
    __tablename__ = "opr_xdocs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"), server_onupdate=FetchedValue())
    __mapper_args__ = {"version_id_col": version, "version_id_generator": False}


class Animal(Base):
    """Single-table inheritance keyed on the base's id."""
    __tablename__ = "opr_animals"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40), default="")
    legs: Mapped[int | None] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Dog(Animal):
    bark: Mapped[str | None] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "dog"}


class Cat(Animal):
    __mapper_args__ = {"polymorphic_identity": "cat"}


class Employee(Base):
    """Joined-table inheritance keyed on the id joining the tables."""
    __tablename__ = "opr_employees"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(40), default="")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "opr_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("opr_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20), default="")
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    __tablename__ = "opr_managers"
    id: Mapped[int] = mapped_column(ForeignKey("opr_employees.id"), primary_key=True)
    reports: Mapped[int] = mapped_column(Integer, default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class VEmployee(Base):
    __tablename__ = "opr_vemployees"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee",
                       "version_id_col": version}


class VEngineer(VEmployee):
    __tablename__ = "opr_vengineers"
    id: Mapped[int] = mapped_column(ForeignKey("opr_vemployees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20), default="")
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Ticket(Base):
    """An identity primary key, keyed by a non-pk column."""
    __tablename__ = "opr_tickets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # serial
    account: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(40), default="")


class Renamed(Base):
    """The shard key column's attribute has another name than the column; versioned."""
    __tablename__ = "opr_renamed"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    owner: Mapped[int] = mapped_column("owner_no", BigInteger)
    note: Mapped[str] = mapped_column(String(40), default="")
    ver: Mapped[int] = mapped_column("row_version", Integer, nullable=False)
    __mapper_args__ = {"version_id_col": ver}


CONFIG = {"groups": {
    "docs": {"tables": {"opr_vdocs": "id", "opr_xdocs": "id", "opr_animals": "id",
                        "opr_employees": "id", "opr_engineers": "id", "opr_managers": "id",
                        "opr_vemployees": "id", "opr_vengineers": "id"}},
    "tickets": {"tables": {"opr_tickets": "account", "opr_renamed": "owner_no"}},
}}

TABLES = [t.name for t in Base.metadata.sorted_tables]


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        for shard in cluster.shard_names:
            with cluster.primary(shard).begin() as c:
                c.execute(text(
                    "CREATE OR REPLACE FUNCTION opr_bump() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN NEW.version := OLD.version + 1; RETURN NEW; END $$"))
                c.execute(text("CREATE TRIGGER opr_bump BEFORE UPDATE ON opr_xdocs "
                               "FOR EACH ROW EXECUTE FUNCTION opr_bump()"))
        yield cluster


@pytest.fixture
def cl(env):
    truncate_everywhere(env, *TABLES)
    return env


def S(cluster, **kw):
    """Strong consistency unless asked otherwise: a session reading what another one
    wrote (with no token) may otherwise read a replica that has not replayed it yet."""
    kw.setdefault("consistency", "strong")
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, **kw)


def two_keys(cluster, table="opr_vdocs", n=1):
    ks = keys_per_shard(cluster, table, n)
    a, b = cluster.shard_names
    return ks[a], ks[b]


def rows(cluster, shard, sql):
    with cluster.primary(shard).connect() as c:
        return [tuple(r) for r in c.execute(text(sql))]


# -- version_id_col --------------------------------------------------------------------


def test_versioned_objects_on_two_shards_in_one_flush(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl)
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()
    with Session() as s1, Session() as s2:
        da, db = s1.get(VDoc, a), s1.get(VDoc, b)
        s2.get(VDoc, b).name = "other"
        s2.commit()
        da.name, db.name = "a2", "b2"
        with pytest.raises(StaleDataError):
            s1.flush()
        s1.rollback()
        # A fresh update of both, in one flush
        da, db = s1.get(VDoc, a), s1.get(VDoc, b)
        da.name, db.name = "a3", "b3"
        s1.commit()
        assert (da.version, db.version) == (2, 3)
        # delete both, one stale
        s2.get(VDoc, a).name = "z"
        s2.commit()
        s1.delete(da)
        s1.delete(db)
        with pytest.raises(StaleDataError):
            s1.flush()
        s1.rollback()
    assert rows(cl, cl.shard_names[0], "SELECT name, version FROM opr_vdocs") == [("z", 3)]
    assert rows(cl, cl.shard_names[1], "SELECT name, version FROM opr_vdocs") == [("b3", 3)]


def test_server_side_version_counter(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl)
    with Session() as s:
        s.add_all([XDoc(id=a, name="a"), XDoc(id=b, name="b")])
        s.commit()
        assert s.get(XDoc, a).version is not None
    with Session() as s1, Session() as s2:
        da, db = s1.get(XDoc, a), s1.get(XDoc, b)
        va = da.version
        da.name, db.name = "a2", "b2"
        s1.commit()
        assert da.version != va
        s2x = s2.get(XDoc, a)
        s1.get(XDoc, a).name = "a3"
        s1.commit()
        s2x.name = "stale"
        with pytest.raises(StaleDataError):
            s2.flush()
        s2.rollback()


def test_versioned_with_replicas_default_consistency(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl, consistency=None)  # the cluster's: read_your_writes
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()
        token = s.consistency_token()
    with Session(consistency_token=token) as s:
        for k in (a, b):
            d = s.get(VDoc, k)
            d.name = "x"
        s.commit()
        for k in (a, b):
            d = s.get(VDoc, k)
            assert d.version == 2
            d.name = "y"
        s.commit()


# -- refresh / expire / populate_existing / with_for_update ------------------------------


def test_refresh_with_for_update_runs_on_each_objects_primary(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl)
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()
    Session = S(cl, consistency="eventual")
    with Session() as s:
        primary = {"shardkit_role": "primary"}  # (the rows just written, whatever the replicas' lag)
        da, db = s.get(VDoc, a, execution_options=primary), s.get(VDoc, b, execution_options=primary)
        with nodes_used(cl, lambda sql: "FOR UPDATE" in sql) as served:
            s.refresh(da, with_for_update=True)
            s.refresh(db, with_for_update=True)
        n0, n1 = cl.shard_names
        assert served == [f"{n0}/primary", f"{n1}/primary"]
        with nodes_used(cl, lambda sql: "opr_vdocs" in sql) as served:
            s.execute(select(VDoc).where(VDoc.id == a).with_for_update().execution_options(populate_existing=True)).all()
        assert served == [f"{n0}/primary"]


def test_refresh_sees_other_writers_change(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()
    with Session() as s1, Session() as s2:
        da, db = s1.get(VDoc, a), s1.get(VDoc, b)
        s2.get(VDoc, a).name = "A"
        s2.get(VDoc, b).name = "B"
        s2.commit()
        s1.expire(da)
        assert da.name == "A"
        s1.refresh(db)
        assert db.name == "B"
        s2.get(VDoc, a).name = "AA"
        s2.commit()
        s1.commit()
        got = s1.scalars(select(VDoc).execution_options(populate_existing=True).order_by(VDoc.id)).all()
        assert {d.name for d in got} == {"AA", "B"}


# -- inheritance ----------------------------------------------------------------------


def test_single_table_inheritance_across_shards(cl):
    ks = keys_per_shard(cl, "opr_animals", 2)
    a0, a1 = ks[cl.shard_names[0]]
    b0, b1 = ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([Dog(id=a0, name="d0", bark="woof"), Cat(id=a1, name="c0"),
                   Dog(id=b0, name="d1", bark="arf"), Cat(id=b1, name="c1")])
        s.commit()
    with Session() as s:
        dogs = s.scalars(select(Dog).order_by(Dog.id)).all()
        assert sorted(d.id for d in dogs) == sorted([a0, b0])
        animals = s.scalars(select(Animal).order_by(Animal.id)).all()
        assert {type(x).__name__ for x in animals} == {"Dog", "Cat"}
        assert len(animals) == 4
        assert s.scalar(select(Cat).where(Cat.id == b0)) is None
        n = s.execute(update(Dog).values(legs=4).execution_options(shardkit_all_shards=True)).rowcount
        assert n == 2
        s.commit()
        assert sorted((r or 0) for r in s.scalars(select(Animal.legs))) == [0, 0, 4, 4]


def test_joined_inheritance_polymorphic_loads(cl):
    ks = keys_per_shard(cl, "opr_employees", 2)
    a0, a1 = ks[cl.shard_names[0]]
    b0, b1 = ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([Engineer(id=a0, name="e0", language="py"), Manager(id=a1, name="m0", reports=3),
                   Engineer(id=b0, name="e1", language="c"), Manager(id=b1, name="m1", reports=5)])
        s.commit()
    with Session() as s:
        poly = with_polymorphic(Employee, [Engineer, Manager])
        got = s.scalars(select(poly).order_by(poly.id)).all()
        assert [type(x).__name__ for x in got] == [type(x).__name__ for x in sorted(
            got, key=lambda x: x.id)]
        assert len(got) == 4
        s.expunge_all()
        got = s.scalars(select(Employee).options(selectin_polymorphic(Employee, [Engineer, Manager]))
                        .order_by(Employee.id)).all()
        assert len(got) == 4
        for x in got:
            if isinstance(x, Engineer):
                assert "language" in x.__dict__
            else:
                assert "reports" in x.__dict__
        s.expunge_all()
        got = s.scalars(select(Employee).order_by(Employee.id)).all()
        assert {x.id: getattr(x, "language", None) for x in got}[b0] == "c"
        e = s.get(Employee, b0)
        assert isinstance(e, Engineer)
        e.language = "rust"
        s.commit()
        s.expire_all()
        assert s.get(Engineer, b0).language == "rust"
        s.delete(s.get(Employee, a1))
        s.commit()
    assert rows(cl, cl.shard_names[0], "SELECT count(*) FROM opr_managers") == [(0,)]


# -- update/delete with synchronize_session --------------------------------------------


@pytest.mark.parametrize("sync", ["fetch", "evaluate", False])
def test_orm_update_delete_synchronize(cl, sync):
    ks = keys_per_shard(cl, "opr_vdocs", 2)
    a0, a1 = ks[cl.shard_names[0]]
    b0, b1 = ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VDoc(id=k, name="n") for k in (a0, a1, b0, b1)])
        s.commit()
    with Session() as s:
        objs = s.scalars(select(VDoc)).all()
        res = s.execute(update(VDoc).where(VDoc.name == "n").values(name="m")
                        .execution_options(synchronize_session=sync, shardkit_all_shards=True))
        assert res.rowcount == 4
        if sync:
            assert {o.name for o in objs} == {"m"}
        res = s.execute(update(VDoc).where(VDoc.id == a0).values(name="k")
                        .execution_options(synchronize_session=sync))
        assert res.rowcount == 1
        if sync:
            assert s.get(VDoc, a0).name == "k"
        res = s.execute(delete(VDoc).where(VDoc.name == "m")
                        .execution_options(synchronize_session=sync, shardkit_all_shards=True))
        assert res.rowcount == 3
        if sync:
            assert len([o for o in objs if o in s]) == 1
        s.commit()


def test_update_returning_keyless(cl):
    ks = keys_per_shard(cl, "opr_vdocs", 2)
    keys = [k for v in ks.values() for k in v]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VDoc(id=k, name="n") for k in keys])
        s.commit()
    with Session() as s:
        objs = s.scalars(select(VDoc)).all()
        got = s.execute(update(VDoc).values(name="r").returning(VDoc.id, VDoc.name)
                        .execution_options(shardkit_all_shards=True, synchronize_session="fetch")).all()
        assert sorted(got) == sorted((k, "r") for k in keys)
        assert {o.name for o in objs} == {"r"}
        got = s.scalars(update(VDoc).values(name="q").returning(VDoc)
                        .execution_options(shardkit_all_shards=True)).all()
        assert sorted(o.id for o in got) == sorted(keys)
        assert all(o in s for o in got) and {o.name for o in objs} == {"q"}
        got = s.execute(delete(VDoc).where(VDoc.id.in_(keys[:3])).returning(VDoc.id)
                        .execution_options(synchronize_session="fetch")).scalars().all()
        assert sorted(got) == sorted(keys[:3])
        s.commit()


# -- merge, make_transient_to_detached, expunge + add -----------------------------------


def test_merge_and_transient_to_detached(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()
    with Session() as s:
        m = s.merge(VDoc(id=b, name="bm", version=1))
        s.commit()
        assert m.version == 2
    with Session() as s:
        d = VDoc(id=b, name="bx", version=2)
        make_transient_to_detached(d)
        m = s.merge(d, load=False)
        assert m in s
        m.name = "by"
        s.commit()
    assert rows(cl, cl.shard_names[1], "SELECT name, version FROM opr_vdocs") == [("by", 3)]
    with Session() as s:
        d = VDoc(id=a, name="a", version=1)
        make_transient_to_detached(d)
        s.add(d)
        d.name = "at"
        s.commit()
    assert rows(cl, cl.shard_names[0], "SELECT name, version FROM opr_vdocs") == [("at", 2)]
    with Session() as s1, Session() as s2:
        d = s1.get(VDoc, b)
        s1.expunge(d)
        s2.add(d)
        d.name = "moved"
        s2.commit()
    assert rows(cl, cl.shard_names[1], "SELECT name FROM opr_vdocs") == [("moved",)]


# -- events ----------------------------------------------------------------------------


def test_mapper_events_and_orm_execute_options(cl):
    (a,), (b,) = two_keys(cl)
    seen = []

    @event.listens_for(VDoc, "before_insert")
    def bi(mapper, conn, target):
        seen.append(("bi", target.id, conn.engine.info.get("node")))
        target.name = target.name + "!"

    @event.listens_for(VDoc, "after_update")
    def au(mapper, conn, target):
        seen.append(("au", target.id, conn.engine.info.get("node")))

    Session = S(cl, consistency="strong")

    try:
        with Session() as s:
            s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
            s.commit()
            s.get(VDoc, b).name = "bb"
            s.commit()
        n0, n1 = cl.shard_names
        assert ("bi", a, f"{n0}/primary") in seen
        assert ("bi", b, f"{n1}/primary") in seen
        assert ("au", b, f"{n1}/primary") in seen
        assert rows(cl, n0, "SELECT name FROM opr_vdocs") == [("a!",)]
    finally:
        event.remove(VDoc, "before_insert", bi)
        event.remove(VDoc, "after_update", au)

    with Session() as s:
        @event.listens_for(s, "do_orm_execute")
        def add(state):
            if state.is_select:
                state.statement = state.statement.options(
                    __import__("sqlalchemy.orm", fromlist=["x"]).with_loader_criteria(
                        VDoc, VDoc.name != "bb"))
        got = s.scalars(select(VDoc)).all()
        assert [d.id for d in got] == [a]
        assert s.get(VDoc, b) is None


# -- identity pk, non-pk shard key --------------------------------------------------------


def test_identity_pk_with_non_pk_shard_key(cl):
    (a,), (b,) = two_keys(cl, "opr_tickets")
    Session = S(cl, consistency="strong")
    with Session() as s:
        ta, tb = Ticket(account=a, note="x"), Ticket(account=b, note="y")
        s.add_all([ta, tb])
        s.commit()
        assert ta.id is not None and tb.id is not None
        idb = tb.id
    assert shards_holding(cl, "opr_tickets", "account", a) == [cl.shard_names[0]]
    with Session() as s:
        t = s.get(Ticket, idb, identity_token=cl.shard_names[1])
        assert t.account == b
        t = s.scalars(select(Ticket).where(Ticket.account == a)).one()
        t.note = "z"
        s.commit()
        s.refresh(t)
        assert t.note == "z"


@pytest.mark.parametrize("sync", ["fetch", "evaluate"])
def test_non_pk_key_update_delete_sync(cl, sync):
    (a,), (b,) = two_keys(cl, "opr_tickets")
    Session = S(cl, consistency="strong")
    with Session() as s:
        ta, tb = Ticket(account=a, note="x"), Ticket(account=b, note="x")
        s.add_all([ta, tb])
        s.commit()
        assert ta.id == tb.id  # each shard's own sequence
    with Session() as s:
        ta, tb = s.scalars(select(Ticket).order_by(Ticket.account)).all()
        if ta.account != a:
            ta, tb = tb, ta
        r = s.execute(update(Ticket).where(Ticket.account == b).values(note="y")
                      .execution_options(synchronize_session=sync))
        assert r.rowcount == 1
        assert (ta.note, tb.note) == ("x", "y")
        r = s.execute(update(Ticket).where(Ticket.note == "x").values(note="z")
                      .execution_options(synchronize_session=sync, shardkit_all_shards=True))
        assert r.rowcount == 1
        assert (ta.note, tb.note) == ("z", "y")
        r = s.execute(delete(Ticket).where(Ticket.account == a)
                      .execution_options(synchronize_session=sync))
        assert r.rowcount == 1
        assert ta not in s and tb in s
        s.commit()
    assert rows(cl, cl.shard_names[1], "SELECT note FROM opr_tickets") == [("y",)]
    assert rows(cl, cl.shard_names[0], "SELECT note FROM opr_tickets") == []


def test_renamed_key_attribute_versioned(cl):
    (a,), (b,) = two_keys(cl, "opr_renamed")
    Session = S(cl)
    with Session() as s:
        ra, rb = Renamed(owner=a, note="a"), Renamed(owner=b, note="b")
        s.add_all([ra, rb])
        s.commit()
        assert ra.id == rb.id
    assert shards_holding(cl, "opr_renamed", "owner_no", a) == [cl.shard_names[0]]
    assert shards_holding(cl, "opr_renamed", "owner_no", b) == [cl.shard_names[1]]
    with Session() as s1, Session() as s2:
        ra = s1.scalars(select(Renamed).where(Renamed.owner == a)).one()
        rb = s1.scalars(select(Renamed).where(Renamed.owner == b)).one()
        s2.scalars(select(Renamed).where(Renamed.owner == b)).one().note = "other"
        s2.commit()
        ra.note, rb.note = "a2", "b2"
        with pytest.raises(StaleDataError):
            s1.flush()
        s1.rollback()
        s1.execute(update(Renamed).where(Renamed.owner == a).values(note="u")
                   .execution_options(synchronize_session="evaluate"))
        s1.commit()
        merged = s1.merge(Renamed(id=ra.id, owner=a, note="m", ver=ra.ver))
        s1.commit()
        assert merged.note == "m"
    assert rows(cl, cl.shard_names[0], "SELECT note, row_version FROM opr_renamed") == [("m", 2)]
    assert rows(cl, cl.shard_names[1], "SELECT note, row_version FROM opr_renamed") == [("other", 2)]


def test_joined_inheritance_refresh_subclass_attrs(cl):
    ks = keys_per_shard(cl, "opr_employees", 1)
    (a0,), (b0,) = ks[cl.shard_names[0]], ks[cl.shard_names[1]]
    Session = S(cl)
    with Session() as s:
        s.add_all([Engineer(id=a0, name="e0", language="py"), Engineer(id=b0, name="e1", language="c")])
        s.commit()
    with cl.primary(cl.shard_names[1]).begin() as c:
        c.execute(text("UPDATE opr_engineers SET language = 'go'"))
    with Session() as s:
        es = s.scalars(select(Employee)).all()
        e = [x for x in es if x.id == b0][0]
        s.refresh(e, ["language"])
        assert e.language == "go"
        s.expire(e, ["language"])
        assert e.language == "go"
        s.refresh(e, with_for_update=True)
        assert e.language == "go"


@pytest.mark.parametrize("when", ["before_insert", "before_update"])
def test_a_mapper_listener_moving_the_shard_key_is_refused(cl, when):
    """The flush picks each object's shard before its before_insert / before_update
    listeners run; a listener that set the key to another shard's value (normalising
    it, filling it from context) had its row written on the old shard, keyed for the
    other one: a row no keyed read finds.  A plain Session writes the key it was given."""
    (a,), (b,) = two_keys(cl, "opr_tickets")
    with S(cl, consistency="strong")() as s:
        s.add(Ticket(account=a, note="x"))
        s.commit()

    def move(mapper, conn, target):
        if target.note == "move":
            target.account = b

    event.listen(Ticket, when, move)
    try:
        with S(cl, consistency="strong")() as s:
            if when == "before_insert":
                s.add(Ticket(account=a, note="move"))
            else:
                s.scalars(select(Ticket)).one().note = "move"
            with pytest.raises(shardkit.CrossShardWriteError,
                               match=f"on shard {cl.shard_names[0]} but its key now belongs on {cl.shard_names[1]}"):
                s.commit()
            s.rollback()
    finally:
        event.remove(Ticket, when, move)
    assert rows(cl, cl.shard_names[0], "SELECT account, note FROM opr_tickets") == [(a, "x")]
    assert rows(cl, cl.shard_names[1], "SELECT account, note FROM opr_tickets") == []
    # A listener that keeps the key on its shard is left alone.
    (a2,) = [k for k in keys_per_shard(cl, "opr_tickets", 2)[cl.shard_names[0]] if k != a]

    def same_shard(mapper, conn, target):
        target.account = a2

    event.listen(Ticket, when, same_shard)
    try:
        with S(cl, consistency="strong")() as s:
            if when == "before_insert":
                s.add(Ticket(account=a, note="y"))
            else:
                s.scalars(select(Ticket)).one().note = "y"
            s.commit()
    finally:
        event.remove(Ticket, when, same_shard)
    assert (a2, "y") in rows(cl, cl.shard_names[0], "SELECT account, note FROM opr_tickets")


def test_refresh_inside_scope_of_another_shard(cl):
    (a,), (b,) = two_keys(cl, "opr_tickets")
    Session = S(cl)
    with Session() as s:
        s.add_all([Ticket(account=a, note="on-a"), Ticket(account=b, note="on-b")])
        s.commit()
    with Session() as s:
        tb = s.scalars(select(Ticket).where(Ticket.account == b)).one()
        with shardkit.scope(shard=cl.shard_names[0]):
            s.refresh(tb)
            assert (tb.account, tb.note) == (b, "on-b")
            s.expire(tb)
            assert (tb.account, tb.note) == (b, "on-b")
            tb.note = "b2"
            s.flush()
            s.refresh(tb, with_for_update=True)
            assert tb.note == "b2"
            got = s.scalars(select(Ticket).execution_options(populate_existing=True)).all()
        assert [t.account for t in got] == [a]  # the scope's shard only
        s.commit()
    assert rows(cl, cl.shard_names[1], "SELECT note FROM opr_tickets") == [("b2",)]
    assert rows(cl, cl.shard_names[0], "SELECT note FROM opr_tickets") == [("on-a",)]


def test_session_option_shard_and_refresh(cl):
    (a,), (b,) = two_keys(cl, "opr_tickets")
    Session = S(cl)
    with Session() as s:
        s.add_all([Ticket(account=a, note="on-a"), Ticket(account=b, note="on-b")])
        s.commit()
    with Session() as s:
        tb = s.scalars(select(Ticket).where(Ticket.account == b)).one()
        tb2 = s.get(Ticket, tb.id, identity_token=cl.shard_names[1], with_for_update=True)
        assert tb2 is tb
        s.refresh(tb)
        s.commit()


def test_caching_listener_invoke_statement(cl):
    ks = keys_per_shard(cl, "opr_vdocs", 2)
    keys = [k for v in ks.values() for k in v]
    Session = S(cl)
    with Session() as s:
        s.add_all([VDoc(id=k, name=str(k)) for k in keys])
        s.commit()
    calls = []
    with Session() as s:
        @event.listens_for(s, "do_orm_execute")
        def wrap(state):
            if state.is_select:
                calls.append(1)
                res = state.invoke_statement()
                return res.freeze()()
        got = s.scalars(select(VDoc).order_by(VDoc.id)).all()
        assert [d.id for d in got] == sorted(keys)
        assert len(calls) == 2  # once per shard


def test_joined_inheritance_versioned_stale(cl):
    ks = keys_per_shard(cl, "opr_vemployees", 1)
    (a0,), (b0,) = ks[cl.shard_names[0]], ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VEngineer(id=a0, language="py"), VEngineer(id=b0, language="c")])
        s.commit()
    with Session() as s1, Session() as s2:
        e1 = s1.get(VEmployee, b0)
        e0 = s1.get(VEmployee, a0)
        s2.get(VEngineer, b0).language = "go"
        s2.commit()
        e1.language = "rust"
        e0.language = "zig"
        with pytest.raises(StaleDataError):
            s1.flush()
        s1.rollback()
    assert rows(cl, cl.shard_names[1], "SELECT language FROM opr_vengineers") == [("go",)]


@pytest.mark.parametrize("how", ["add", "merge_noload", "merge_load", "delete"])
def test_transient_to_detached_non_pk_key(cl, how):
    (a,), (b,) = two_keys(cl, "opr_tickets")
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([Ticket(account=a, note="on-a"), Ticket(account=b, note="on-b")])
        s.commit()
        tid = s.scalars(select(Ticket.id).where(Ticket.account == b)).one()
    with Session() as s:
        t = Ticket(id=tid, account=b, note="on-b")
        make_transient_to_detached(t)
        if how == "add":
            s.add(t)
            t.note = "new"
        elif how == "merge_noload":
            t = s.merge(t, load=False)
            t.note = "new"
        elif how == "merge_load":
            t.note = "new"
            t = s.merge(t)
        else:
            s.delete(t)
        s.commit()
    assert rows(cl, cl.shard_names[0], "SELECT note FROM opr_tickets") == [("on-a",)]
    assert rows(cl, cl.shard_names[1], "SELECT note FROM opr_tickets") == ([] if how == "delete" else [("new",)])


@pytest.mark.parametrize("keyed", [True, False])
def test_a_listener_adding_for_update_to_a_replica_read(cl, keyed):
    """shardkit routes a read before the do_orm_execute listeners run: one that adds
    FOR UPDATE to a read routed to a replica got PostgreSQL's "cannot execute SELECT FOR
    UPDATE in a read-only transaction" (across shards a ScatterError advising partial
    results).  It is refused saying what to do; read on the primary, it locks."""
    (a,), (b,) = two_keys(cl)
    with S(cl)() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b")])
        s.commit()

    def lock(state):
        if state.is_select:
            state.statement = state.statement.with_for_update()

    stmt = select(VDoc).where(VDoc.id == b) if keyed else select(VDoc)
    with S(cl, consistency="eventual")() as s:
        event.listen(s, "do_orm_execute", lock)
        with pytest.raises(shardkit.RoutingError, match="listener added FOR UPDATE.*shardkit_role='primary'"):
            s.scalars(stmt).all()
        s.rollback()
        with nodes_used(cl, lambda sql: "FOR UPDATE" in sql) as served:
            got = s.scalars(stmt.execution_options(shardkit_role="primary")).all()
        assert len(got) == (1 if keyed else 2)
        assert served and all(n.endswith("/primary") for n in served), served


def test_stale_deletes_server_versions_subclass_writes_and_locks(cl):
    ks = keys_per_shard(cl, "opr_vdocs", 2)
    a0, a1 = ks[cl.shard_names[0]]
    b0, b1 = ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.add_all([VDoc(id=k, name="n") for k in (a0, a1, b0, b1)])
        s.add_all([XDoc(id=k, name="n") for k in (a0, a1, b0, b1)])
        s.add_all([Engineer(id=a0, name="e0", language="py"), Engineer(id=b0, name="e1", language="c")])
        s.commit()
    # two stale deletes on one shard, one flush
    with Session() as s1, Session() as s2:
        x, y = s1.get(VDoc, a0), s1.get(VDoc, a1)
        s2.get(VDoc, a1).name = "z"
        s2.commit()
        s1.delete(x)
        s1.delete(y)
        with pytest.raises(StaleDataError):
            s1.flush()
        s1.rollback()
    # bulk update by pk with a server-side version
    with Session() as s:
        got = s.scalars(select(XDoc).order_by(XDoc.id)).all()
        vers = {d.id: d.version for d in got}
        s.execute(update(XDoc), [{"id": a0, "name": "b", "version": vers[a0]},
                                 {"id": b0, "name": "b", "version": vers[b0]}])
        s.commit()
    assert rows(cl, cl.shard_names[0], f"SELECT name, version FROM opr_xdocs WHERE id = {a0}") == [("b", 2)]
    assert rows(cl, cl.shard_names[1], f"SELECT name, version FROM opr_xdocs WHERE id = {b0}") == [("b", 2)]
    # joined inheritance ORM update / delete
    with Session() as s:
        r = s.execute(update(Engineer).where(Engineer.id == Employee.id, Employee.name == "e1").values(language="x")
                      .execution_options(shardkit_all_shards=True, synchronize_session="fetch"))
        assert r.rowcount == 1
        r = s.execute(update(Engineer).where(Engineer.id == b0).values(language="y")
                      .execution_options(synchronize_session="evaluate"))
        s.commit()
        e = s.get(Engineer, b0)
        assert e.language == "y"
        r = s.execute(delete(Engineer).where(Engineer.id == Employee.id, Employee.name == "e0").execution_options(shardkit_all_shards=True))
        assert r.rowcount == 1
        s.commit()
    with S(cl, consistency="eventual")() as s:
        with nodes_used(cl, lambda sql: " FOR " in sql.replace("\n", " ")) as served:
            s.get(VDoc, b0, with_for_update=True)
            s.scalars(select(VDoc).with_for_update(skip_locked=True, of=VDoc)).all()
            s.get(VDoc, a0, with_for_update={"key_share": True})
            s.query(VDoc).with_for_update(read=True).all()
        assert len(served) == 6 and all(n.endswith("/primary") for n in served), served



def test_merge_checks_versions_and_loads_subclasses(cl):
    (a,), (b,) = two_keys(cl)
    Session = S(cl)
    with Session() as s:
        s.add_all([VDoc(id=a, name="a"), VDoc(id=b, name="b"), Engineer(id=b, name="e", language="c")])
        s.commit()
        s.get(VDoc, b).name = "b2"
        s.commit()
    with Session() as s:
        with pytest.raises(StaleDataError, match="does not match existing version"):
            s.merge(VDoc(id=b, name="bx", version=1))
        s.rollback()
        m = s.merge(VDoc(id=b, name="bx"))
        s.commit()
        assert m.version == 3
        e = s.merge(Engineer(id=b, language="rust"))
        assert e.name == "e"
        s.commit()
        d = VDoc(id=b, name="q", version=3)
        make_transient_to_detached(d)
        d = s.merge(d, load=False)
        s.refresh(d, ["version", "name"])
        assert d.name == "bx"


def test_bulk_writes_with_a_renamed_key_attribute(cl):
    ks = keys_per_shard(cl, "opr_renamed", 2)
    a0, a1 = ks[cl.shard_names[0]]
    b0, b1 = ks[cl.shard_names[1]]
    Session = S(cl, consistency="strong")
    with Session() as s:
        s.execute(insert(Renamed), [{"owner": k, "note": "i", "ver": 1} for k in (a0, a1, b0, b1)])
        s.commit()
    assert shards_holding(cl, "opr_renamed", "owner_no", a1) == [cl.shard_names[0]]
    assert shards_holding(cl, "opr_renamed", "owner_no", b1) == [cl.shard_names[1]]
    with Session() as s:
        objs = s.scalars(select(Renamed)).all()
        ids = {o.owner: o.id for o in objs}
        s.execute(update(Renamed), [{"id": ids[k], "owner": k, "note": "u", "ver": 1} for k in (a0, b0)])
        s.bulk_update_mappings(Renamed, [{"id": ids[a1], "owner": a1, "note": "m", "ver": 1}])
        s.commit()
        assert sorted((o.owner, o.note, o.ver) for o in s.scalars(select(Renamed))) == sorted(
            [(a0, "u", 2), (b0, "u", 2), (a1, "m", 2), (b1, "i", 1)])
        s.bulk_insert_mappings(Renamed, [{"owner": a0, "note": "bi", "ver": 1}])
        s.commit()
    assert sorted(r[1:] for r in rows(cl, cl.shard_names[0], "SELECT id, owner_no, note FROM opr_renamed")) == sorted(
        [(a0, "u"), (a1, "m"), (a0, "bi")])
