"""Ordinary ORM loads and writes through ShardedSession after the routing of
relationships, column_properties and many-to-many rows by their tables: colocated lazy
and eager loads, relationships to and from reference tables, refreshes, flushes,
get() and scope(shard=...) run the same statements on the same shards as before."""

from __future__ import annotations


import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, String, Table, event, func, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, column_property, joinedload, mapped_column,
                            relationship, selectinload, sessionmaker, subqueryload)

import shardkit
from models import Order, User
from own_tables import cluster_with_tables, statements_per_shard
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


# -- the shared models (users / orders colocated) ------------------------------------


def _user_with_orders(sharded, uid: int, n: int = 3) -> None:
    with sharded.Session() as s:
        s.add(User(id=uid, name=f"u{uid}"))
        for j in range(n):
            s.add(Order(id=uid * 100 + j, user_id=uid, amount=j))
        s.commit()
    sharded.reset_hits()


def test_colocated_lazy_loads_run_once_on_the_objects_shard(sharded):
    for uid in range(6):
        _user_with_orders(sharded, uid)
    for uid in range(6):
        shard = sharded.cluster.shard_for(User, uid)
        with sharded.Session() as s:
            user = s.get(User, uid)
            sharded.reset_hits()
            assert sorted(o.id for o in user.orders) == [uid * 100 + j for j in range(3)]
            assert dict(sharded.hits) == {shard: 1}
        with sharded.Session() as s:
            order = s.get(Order, uid * 100 + 1, identity_token=shard)
            sharded.reset_hits()
            assert order.user.id == uid
            assert dict(sharded.hits) == {shard: 1}


@pytest.mark.parametrize("opt", [selectinload, joinedload, subqueryload])
def test_colocated_eager_loads_are_exact(sharded, opt):
    for uid in range(6):
        _user_with_orders(sharded, uid, n=uid % 3 + 1)
    with sharded.Session() as s:
        users = s.scalars(select(User).options(opt(User.orders))).unique().all()
        assert sorted((u.id, len(u.orders)) for u in users) == [(u, u % 3 + 1) for u in range(6)]
    with sharded.Session() as s:
        sharded.reset_hits()
        user = s.scalars(select(User).where(User.id == 4).options(opt(User.orders))).unique().one()
        assert len(user.orders) == 2
        assert set(sharded.hits) == {sharded.cluster.shard_for(User, 4)}


def test_get_refresh_and_expire_run_one_statement(sharded):
    _user_with_orders(sharded, 7)
    shard = sharded.cluster.shard_for(User, 7)
    with sharded.Session() as s:
        user = s.get(User, 7)
        assert dict(sharded.hits) == {shard: 1}
        sharded.reset_hits()
        s.refresh(user)
        assert dict(sharded.hits) == {shard: 1}
        sharded.reset_hits()
        s.expire(user)
        assert user.name == "u7"
        assert dict(sharded.hits) == {shard: 1}


def test_scope_shard_loads_run_there_only(sharded):
    _user_with_orders(sharded, 8)
    shard = sharded.cluster.shard_for(User, 8)
    with sharded.Session() as s, shardkit.scope(shard=shard):
        user = s.scalars(select(User).where(User.name == "u8")).one()
        assert len(user.orders) == 3
        assert set(sharded.hits) == {shard}


def test_strict_mode_colocated_loads(sharded):
    _user_with_orders(sharded, 9)
    with sharded.Session(strict=True) as s:
        user = s.get(User, 9)
        assert len(user.orders) == 3
        assert s.scalars(select(User).where(User.id == 9).options(selectinload(User.orders))).one() is user


# -- own tables: reference rows, many-to-many keyed on the parent --------------------


class Base(DeclarativeBase):
    pass


member_tags = Table(
    "odr_member_tags", Base.metadata,
    Column("member_id", ForeignKey("odr_members.id"), primary_key=True),
    Column("tag_id", ForeignKey("odr_tags.id"), primary_key=True),
)


class Country(Base):  # reference
    __tablename__ = "odr_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    members = relationship("Member", viewonly=True, order_by="Member.id")


class Tag(Base):  # reference
    __tablename__ = "odr_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class Member(Base):
    __tablename__ = "odr_members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    country_code: Mapped[str | None] = mapped_column(ForeignKey("odr_countries.code"))
    country = relationship(Country)
    tags = relationship(Tag, secondary=member_tags, order_by=Tag.id)


class Widget(Base):  # another group
    __tablename__ = "odr_widgets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger)


class Tally(Base):  # counts another group's rows: each shard would count its own
    __tablename__ = "odr_tallies"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    widgets = column_property(select(func.count(Widget.id)).where(Widget.owner_id == id)
                              .correlate_except(Widget).scalar_subquery())


class Holder(Base):  # loads another group's rows in its own statement, by default
    __tablename__ = "odr_holders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    widgets = relationship(Widget, primaryjoin="Holder.id == foreign(Widget.owner_id)",
                           viewonly=True, lazy="joined")


GROUPS = {
    "groups": {"members": {"tables": {"odr_members": "id", "odr_member_tags": "member_id",
                                      "odr_tallies": "id", "odr_holders": "id"}},
               "widgets": {"tables": {"odr_widgets": "id"}}},
    "reference_tables": ["odr_countries", "odr_tags"],
}


@pytest.fixture(scope="module")
def own(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster, \
            statements_per_shard(cluster) as hits:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add_all([Country(code="fr"), Country(code="de")])
            s.add_all([Tag(id=i) for i in range(3)])
            s.commit()
        yield cluster, hits


@pytest.fixture
def Session(own):
    cluster, hits = own
    for sh in cluster.shard_names:
        with cluster.primary(sh).begin() as c:
            c.execute(text("DELETE FROM odr_member_tags"))
            c.execute(text("DELETE FROM odr_members"))
            c.execute(text("DELETE FROM odr_widgets; DELETE FROM odr_tallies; DELETE FROM odr_holders"))
    hits.clear()
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _two_members_on_two_shards(cluster) -> tuple[int, int]:
    by_shard: dict[str, int] = {}
    for i in range(1, 50):
        by_shard.setdefault(cluster.shard_for(Member, i), i)
    low, high = sorted(by_shard)[:2]
    return by_shard[low], by_shard[high]


def test_reference_relationships_from_and_to_sharded_objects(own, Session):
    cluster, hits = own
    with Session() as s:
        s.add_all([Member(id=i, country_code="fr" if i % 2 else "de") for i in range(8)])
        s.commit()
    for strict in (False, True):
        with Session(strict=strict) as s:
            m = s.get(Member, 3)
            hits.clear()
            assert m.country.code == "fr"
            assert dict(hits) == {cluster.shard_for(Member, 3): 1}
            if strict:  # by key (strict refuses reading every shard)
                ms = [s.scalars(select(Member).where(Member.id == i)
                                .options(joinedload(Member.country))).one() for i in range(8)]
            else:
                ms = s.scalars(select(Member).options(joinedload(Member.country))).all()
            assert sorted((x.id, x.country.code) for x in ms) == [
                (i, "fr" if i % 2 else "de") for i in range(8)]
            if not strict:  # (a reference row's sharded collection is on every shard)
                fr = s.get(Country, "fr")
                assert [x.id for x in fr.members] == [1, 3, 5, 7]
        with Session(strict=strict) as s:
            if strict:
                continue
            fr = s.scalars(select(Country).where(Country.code == "fr")
                           .options(selectinload(Country.members))).one()
            assert [x.id for x in fr.members] == [1, 3, 5, 7]


def test_a_flush_of_ordinary_objects_runs_only_its_writes(own, Session):
    cluster, _hits = own
    seen: list[tuple[str, str]] = []
    hooks = []
    for name in cluster.shard_names:
        def record(_conn, _cur, statement, *_a, name=name):
            seen.append((name, statement.split()[0].upper()))
        eng = cluster.primary(name)
        event.listen(eng, "before_cursor_execute", record)
        hooks.append((eng, record))
    try:
        with Session() as s:
            s.add_all([Member(id=i) for i in range(6)])
            s.flush()
            # INSERTs on the objects' shards, nothing else (no many-to-many copies).
            assert {sh for sh, _ in seen} == {cluster.shard_for(Member, i) for i in range(6)}
            assert {verb for _, verb in seen} <= {"INSERT", "BEGIN"}
            s.commit()
        with Session() as s:
            m = s.get(Member, 2)
            seen.clear()
            m.country_code = "de"
            s.flush()
            assert [verb for _, verb in seen if verb != "BEGIN"] == ["UPDATE"]
            assert {sh for sh, _ in seen} == {cluster.shard_for(Member, 2)}
    finally:
        for eng, fn in hooks:
            event.remove(eng, "before_cursor_execute", fn)


def test_many_to_many_keyed_on_the_parent_writes_on_its_shard(own, Session):
    cluster, _hits = own
    a, b = _two_members_on_two_shards(cluster)
    with Session() as s:
        tags = s.scalars(select(Tag).order_by(Tag.id)).all()
        s.add(Member(id=a, tags=tags[:2]))
        s.flush()  # one shard's rows per flush
        s.add(Member(id=b, tags=tags[1:]))
        s.commit()
    for mid, want in ((a, [0, 1]), (b, [1, 2])):
        sh = cluster.shard_for(Member, mid)
        with cluster.primary(sh).connect() as c:
            assert c.execute(text("SELECT tag_id FROM odr_member_tags WHERE member_id = :m ORDER BY 1"),
                             {"m": mid}).scalars().all() == want
    with Session() as s:
        assert [t.id for t in s.get(Member, a).tags] == [0, 1]


def test_deleting_a_member_with_unloaded_tags_beside_another_shards_write(own, Session):
    cluster, _hits = own
    a, b = _two_members_on_two_shards(cluster)
    with Session() as s:
        tags = s.scalars(select(Tag)).all()
        s.add(Member(id=b, tags=tags))
        s.commit()
    with Session() as s:
        victim = s.get(Member, b)  # its tags not loaded
        s.add(Member(id=a))        # a write on another (lower) shard in the same flush
        s.delete(victim)
        s.commit()
    for sh in cluster.shard_names:
        with cluster.primary(sh).connect() as c:
            assert c.execute(text("SELECT count(*) FROM odr_member_tags")).scalar_one() == 0


@pytest.mark.parametrize("cls", [Tally, Holder])
def test_a_refused_entity_stays_refused_by_key_after_a_select_of_its_columns(own, Session, cls):
    """select(E).where(E.id == v) is refused for an entity whose load reads another group;
    select(E.id).where(E.id == v), which loads its column alone, is not.  The route the
    router keeps per key column for the latter must not let the former through."""
    with Session() as s:
        s.add(cls(id=4))
        s.add_all([Widget(id=i, owner_id=4) for i in range(6)])
        s.commit()
    for _ in range(2):
        with Session() as s:
            assert s.scalar(select(cls.id).where(cls.id == 4)) == 4
            with pytest.raises(ScatterRefused, match=rf"{cls.__name__}\.widgets"):
                s.execute(select(cls).where(cls.id == 4)).unique().all()
            with pytest.raises(ScatterRefused, match=rf"{cls.__name__}\.widgets"):
                s.get(cls, 4)
