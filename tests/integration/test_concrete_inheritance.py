"""Concrete inheritance (``ConcreteBase``): the base is read through a UNION of its
classes' tables, which each shard would compute over its own rows, and is refused with
words of the mapping; a concrete class without subclasses is read through a "UNION" of
one SELECT, which is just that SELECT, and loads like any table: by key, or merged."""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, func, select
from sqlalchemy.ext.declarative import ConcreteBase
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from own_tables import cluster_with_tables
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Doc(ConcreteBase, Base):
    __tablename__ = "conc_docs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    __mapper_args__ = {"polymorphic_identity": "doc", "concrete": True}


class Invoice(Doc):
    __tablename__ = "conc_invoices"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column(BigInteger)
    __mapper_args__ = {"polymorphic_identity": "invoice", "concrete": True}


GROUPS = {"groups": {"docs": {"tables": {"conc_docs": "id", "conc_invoices": "id"}}}}
N = 30


@pytest.fixture(scope="module")
def Session(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.add_all([Invoice(id=i, total=i * 10) for i in range(N)])
            s.add_all([Doc(id=1000 + i) for i in range(5)])
            s.commit()
        assert len({cluster.shard_for(Invoice, i) for i in range(N)}) > 1
        yield Session


def test_the_base_of_a_concrete_hierarchy_is_refused_in_its_words(Session):
    with Session() as s:
        for stmt in (select(Doc), select(Doc).where(Doc.id == 3)):
            with pytest.raises(ScatterRefused, match=r"Doc is read through a UNION .*polymorphic_union"):
                s.execute(stmt).all()


def test_a_concrete_class_without_subclasses_loads_exactly(Session):
    with Session() as s:
        got = s.scalars(select(Invoice).order_by(Invoice.id.desc()).limit(5)).all()
        assert [(i.id, i.total) for i in got] == [(i, i * 10) for i in range(N - 1, N - 6, -1)]
        assert s.scalar(select(func.count()).select_from(Invoice)) == N
        assert s.scalar(select(func.sum(Invoice.total))) == sum(i * 10 for i in range(N))
        one = s.scalars(select(Invoice).where(Invoice.id == 7)).one()
        assert one.total == 70
        assert s.get(Invoice, 8).total == 80
