"""A ``column_property`` is loaded with every row of its entity, in the same SELECT: one
that reads a table of another group would be computed by each shard over its own rows
(a count of another group's rows would come back as one shard's share of it).  Loading
such an entity is refused, as the same subquery written into the SELECT is; one over a
colocated table, or a deferred one, loads as usual, with exact values."""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, column_property, mapped_column, sessionmaker

import shardkit
from own_tables import cluster_with_tables
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Tag(Base):  # its own group, keyed by its id: not colocated with the accounts
    __tablename__ = "cpg_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(BigInteger)


class Line(Base):  # colocated with the accounts on acct_id
    __tablename__ = "cpg_lines"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(BigInteger)


class Acct(Base):
    __tablename__ = "cpg_accts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    n_lines = column_property(select(func.count(Line.id)).where(Line.acct_id == id)
                              .correlate_except(Line).scalar_subquery())
    shout = column_property(func.upper(name))
    n_tags_never = column_property(select(func.count(Tag.id)).where(Tag.acct_id == id)
                                   .correlate_except(Tag).scalar_subquery(), deferred=True,
                                   raiseload=True)


class LaterAcct(Base):  # deferred: loaded on first access, from the object's shard alone
    __tablename__ = "cpg_later"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    n_tags = column_property(select(func.count(Tag.id)).where(Tag.acct_id == id)
                             .correlate_except(Tag).scalar_subquery(), deferred=True)


class TaggedAcct(Base):
    __tablename__ = "cpg_tagged"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    n_tags = column_property(select(func.count(Tag.id)).where(Tag.acct_id == id)
                             .correlate_except(Tag).scalar_subquery())


GROUPS = {"groups": {
    "accts": {"tables": {"cpg_accts": "id", "cpg_lines": "acct_id", "cpg_tagged": "id",
                        "cpg_later": "id"}},
    "tags": {"tables": {"cpg_tags": "id"}},
}}
N = 40


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as session:
            for a in range(N):
                session.add(Acct(id=a, name=f"a{a}"))
                session.add(TaggedAcct(id=a))
                for j in range(a % 4):
                    session.add(Line(id=a * 10 + j, acct_id=a))
                for j in range(3):  # tags live by their own id: most on another shard
                    session.add(Tag(id=a * 10 + j, acct_id=a))
            session.commit()
        yield cluster


@pytest.fixture
def session(cluster):
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                      consistency="strong")() as s:
        yield s


def test_an_entity_whose_column_property_reads_another_group_is_refused(session):
    alias = aliased(TaggedAcct)
    for stmt in (select(TaggedAcct), select(TaggedAcct).where(TaggedAcct.id == 3),
                 select(alias).where(alias.id > 3)):
        with pytest.raises(ScatterRefused, match=r"TaggedAcct\.n_tags \(a column_property") as e:
            session.execute(stmt).all()
        assert "cpg_tags" in str(e.value) and "deferred=True" in str(e.value)
    with pytest.raises(ScatterRefused, match=r"TaggedAcct\.n_tags"):
        session.get(TaggedAcct, 3)
    for load in (lambda: session.execute(select(LaterAcct).where(LaterAcct.id == 3)).all(),
                 lambda: session.get(LaterAcct, 3)):
        with pytest.raises(ScatterRefused, match=r"LaterAcct\.n_tags .*raiseload=True"):
            load()


def test_what_the_refusal_protects_from(cluster, session):
    # Named shard by shard, each answers with its own share of an account's tags.
    whole = {a: 3 for a in range(N)}
    shares = {}
    for s in cluster.shard_names:
        with shardkit.scope(shard=s):
            for a in range(N):
                obj = session.get(TaggedAcct, a)
                if obj is not None:
                    shares[a] = obj.n_tags
        session.expunge_all()
    assert set(shares) == set(whole)
    assert shares != whole  # some accounts' tags are partly on another shard


def test_colocated_and_deferred_column_properties_load_exactly(session):
    rows = session.execute(select(Acct).order_by(Acct.id)).scalars().all()
    assert [(a.id, a.n_lines, a.shout) for a in rows] == [(a, a % 4, f"A{a}") for a in range(N)]
    session.expunge_all()
    one = session.execute(select(Acct).where(Acct.id == 7)).scalar_one()
    assert (one.n_lines, one.shout) == (3, "A7")
    session.expunge_all()
    assert session.get(Acct, 6).n_lines == 2
    # Columns without the entity do not load the property.
    assert session.execute(select(TaggedAcct.id).where(TaggedAcct.id == 5)).scalar_one() == 5


def test_route_and_explain_say_why(cluster):
    with pytest.raises(ScatterRefused, match="n_tags"):
        cluster.explain(select(TaggedAcct).where(TaggedAcct.id == 1))
    assert cluster.explain(select(Acct).where(Acct.id == 1)).kind == "direct"
    assert cluster.explain(select(Acct)).kind == "all"
    assert cluster.router.mapper_problem(Acct.__mapper__) is None
