"""Loads of an entity whose ``column_property`` reads another group's table, by every
path the ORM takes: each must refuse (or give the value one database gives), never a
shard's share of it."""

from __future__ import annotations

import pytest
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, ForeignKey, String, Table, func, literal, select
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (DeclarativeBase, Mapped, column_property, composite, contains_eager,
                            joinedload, mapped_column, query_expression, relationship,
                            sessionmaker, with_expression, with_polymorphic)

import shardkit
from own_tables import cluster_with_tables
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Tag(Base):  # its own group, keyed by its id
    __tablename__ = "cpgr_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(BigInteger)


class Tagged(Base):
    __tablename__ = "cpgr_tagged"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    n_tags = column_property(select(func.count(Tag.id)).where(Tag.acct_id == id)
                             .correlate_except(Tag).scalar_subquery())


class Code(Base):  # a reference table
    __tablename__ = "cpgr_codes"
    code: Mapped[str] = mapped_column(String(10), primary_key=True)


class Line(Base):  # colocated with Good on the key
    __tablename__ = "cpgr_lines"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    good_id: Mapped[int] = mapped_column(BigInteger)


@dataclass
class Pair:
    x: int
    y: int


class Good(Base):  # column_properties each shard computes exactly
    __tablename__ = "cpgr_goods"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(10))
    x: Mapped[int] = mapped_column(BigInteger, default=1)
    y: Mapped[int] = mapped_column(BigInteger, default=2)
    n_lines = column_property(select(func.count(Line.id)).where(Line.good_id == id)
                              .correlate_except(Line).scalar_subquery())
    n_codes = column_property(select(func.count(Code.code)).where(Code.code <= code)
                              .correlate_except(Code).scalar_subquery())
    seven = column_property(literal(7))
    shout = column_property(func.upper(code))
    pair = composite(Pair, "x", "y")
    counted = query_expression()

    @hybrid_property
    def twice(self):
        return self.id * 2


imp_table = Table("cpgr_imps", Base.metadata,
                  Column("id", BigInteger, primary_key=True, autoincrement=False))


class Imp:  # mapped imperatively
    pass


Base.registry.map_imperatively(Imp, imp_table, properties={
    "n_lines": column_property(select(func.count(Line.id)).where(Line.good_id == imp_table.c.id)
                               .correlate_except(Line).scalar_subquery())})


class Owner(Base):  # colocated with Tagged and Good on the key
    __tablename__ = "cpgr_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tagged_id: Mapped[int] = mapped_column(BigInteger)
    tagged: Mapped[Tagged] = relationship(primaryjoin="foreign(Owner.tagged_id) == Tagged.id",
                                          viewonly=True)
    good: Mapped[Good] = relationship(primaryjoin="foreign(Owner.tagged_id) == Good.id",
                                      viewonly=True)
    counted = query_expression()


class Holder(Base):  # loads its Tagged with it, by default
    __tablename__ = "cpgr_holders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tagged: Mapped[Tagged] = relationship(primaryjoin="foreign(Holder.id) == Tagged.id",
                                          viewonly=True, lazy="joined")


class Emp(Base):
    __tablename__ = "cpgr_emps"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "emp"}


class Mgr(Emp):
    __tablename__ = "cpgr_mgrs"
    id: Mapped[int] = mapped_column(ForeignKey("cpgr_emps.id"), primary_key=True)
    n_tags = column_property(select(func.count(Tag.id)).where(Tag.acct_id == id)
                             .correlate_except(Tag).scalar_subquery())
    __mapper_args__ = {"polymorphic_identity": "mgr"}


GROUPS = {"groups": {
    "accts": {"tables": {"cpgr_tagged": "id", "cpgr_owners": "tagged_id", "cpgr_emps": "id",
                        "cpgr_mgrs": "id", "cpgr_goods": "id", "cpgr_lines": "good_id",
                        "cpgr_imps": "id", "cpgr_holders": "id"}},
    "tags": {"tables": {"cpgr_tags": "id"}},
}, "reference_tables": ["cpgr_codes"]}
N = 12
TAGS = 8  # per account, by their own ids: spread over the shards


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as session:
            for a in range(N):
                session.add(Tagged(id=a))
                session.add(Owner(id=a, tagged_id=a))
                session.add(Mgr(id=a))
                session.add(Good(id=a, code="c2"))
                imp = Imp()
                imp.id = a
                session.add(imp)
                session.add(Holder(id=a))
                for j in range(a % 3):
                    session.add(Line(id=a * 10 + j, good_id=a))
                for j in range(TAGS):
                    session.add(Tag(id=a * 100 + j, acct_id=a))
            for j in range(TAGS):
                session.add(Tag(id=50_000 + j, acct_id=500))
            for c in ("c1", "c2", "c3"):
                session.add(Code(code=c))
            session.commit()
        yield cluster


@pytest.fixture
def session(cluster):
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                      consistency="strong")() as s:
        yield s


def shares(session, cluster, load):
    """What ``load`` gives on each shard the caller names (the refusal's alternative)."""
    out = []
    for s in cluster.shard_names:
        with shardkit.scope(shard=s):
            out.append(load())
        session.expunge_all()
    return out


def test_an_expired_attribute_or_a_refresh_is_refused(session):
    # Committed objects expire; their next read used to come from their shard alone.
    t = Tagged(id=500)
    session.add(t)
    session.commit()
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags \(a column_property"):
        t.n_tags
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags"):
        session.refresh(t)
    # The caller who names the shard gets that shard's rows, as with get().
    with shardkit.scope(shard=session.cluster.router.route(
            select(Tagged.id).where(Tagged.id == 500)).shards[0]):
        assert 0 < t.n_tags < TAGS  # (the tags of 500 are spread over the shards)
    g = Good(id=600, code="c3")
    session.add(g)
    session.commit()
    assert (g.n_lines, g.n_codes, g.seven, g.shout, g.pair) == (0, 3, 7, "C3", Pair(1, 2))
    session.refresh(g)
    assert g.n_codes == 3


def test_a_lazy_load_of_the_entity_is_refused(session):
    o = session.execute(select(Owner).where(Owner.tagged_id == 5)).scalar_one()
    assert (o.good.n_lines, o.good.n_codes) == (2, 2)
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags"):
        o.tagged


def test_a_joined_eager_load_of_the_entity_is_refused(session):
    stmt = select(Owner).where(Owner.tagged_id == 6)
    for opt in (joinedload(Owner.tagged),):
        with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags"):
            session.execute(stmt.options(opt)).all()
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags"):
        session.execute(stmt.join(Owner.tagged).options(contains_eager(Owner.tagged))).all()
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags .*Holder\.tagged's lazy='joined'"):
        session.execute(select(Holder).where(Holder.id == 6)).all()
    with pytest.raises(ScatterRefused, match=r"Tagged\.n_tags"):
        session.get(Holder, 6)
    good = session.execute(select(Owner).options(joinedload(Owner.good)).order_by(Owner.id)
                           ).scalars().all()
    assert [(o.good.id, o.good.n_lines) for o in good] == [(a, a % 3) for a in range(N)]


def test_a_with_expression_over_another_group_is_refused(session):
    per_owner = select(func.count(Tag.id)).where(Tag.acct_id == Owner.tagged_id).scalar_subquery()
    stmt = select(Owner).where(Owner.tagged_id == 8).options(with_expression(Owner.counted, per_owner))
    with pytest.raises(ScatterRefused, match=r"with_expression\(\) of Owner\.counted.*cpgr_tags"):
        session.execute(stmt).all()
    own = select(func.count(Line.id)).where(Line.good_id == Good.id).scalar_subquery()
    rows = session.execute(select(Good).where(Good.id < N).options(with_expression(Good.counted, own))
                           .order_by(Good.id)).scalars().all()
    assert [g.counted for g in rows] == [a % 3 for a in range(N)]


def test_subclasses_loaded_with_the_base_are_checked(session):
    wp = with_polymorphic(Emp, [Mgr])
    with pytest.raises(ScatterRefused, match=r"Mgr\.n_tags"):
        session.execute(select(wp).where(wp.id == 9)).all()
    # Plain loads of the base, and of entities whose properties are exact, are not refused.
    assert session.execute(select(Emp.id).where(Emp.id == 9)).scalar_one() == 9
    imps = session.execute(select(Imp).order_by(Imp.id)).scalars().all()
    assert [i.n_lines for i in imps] == [a % 3 for a in range(N)]


def test_what_the_refusals_protect_from(session, cluster):
    # Named shard by shard, an owner's joined Tagged and its lazy load each count one
    # shard's share of the tags.
    got = shares(session, cluster, lambda: [o.tagged.n_tags for o in session.execute(
        select(Owner).options(joinedload(Owner.tagged))).scalars()])
    assert sorted(n for part in got for n in part) != [TAGS] * N
