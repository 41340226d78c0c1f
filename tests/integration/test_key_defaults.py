"""Shard keys a Python-side default makes (``default=uuid.uuid4``): the ORM makes the key
before choosing the shard, so the row lands where its key belongs; keys the database
makes at the INSERT (serial, identity, server defaults) are refused, saying why."""

from __future__ import annotations

import uuid

import pytest
from own_tables import cluster_with_tables, shards_holding
from sqlalchemy import BigInteger, ForeignKey, MetaData, String, Uuid, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit.errors import ShardKeyError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Doc(Base):
    __tablename__ = "kd_docs"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(40))
    pages: Mapped[list[Page]] = relationship(back_populates="doc")


class Page(Base):
    __tablename__ = "kd_pages"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    doc_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("kd_docs.id"), primary_key=True)
    doc: Mapped[Doc] = relationship(back_populates="pages")


class Region(Base):
    """A list-keyed table whose key has a scalar default."""
    __tablename__ = "kd_shops"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    region: Mapped[str] = mapped_column(String(8), default="eu")


class Serial(Base):
    __tablename__ = "kd_serials"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class ServerMade(Base):
    __tablename__ = "kd_server_made"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, server_default=func.gen_random_uuid())


class ContextMade(Base):
    __tablename__ = "kd_context_made"
    id: Mapped[str] = mapped_column(String(40), primary_key=True,
                                    default=lambda ctx: "k-" + ctx.get_current_parameters()["name"])
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def env(sharded_dev):
    names = [s.name for s in sharded_dev.shards]
    config = {"groups": {
        "docs": {"tables": {"kd_docs": "id", "kd_pages": "doc_id"}},
        "shops": {"strategy": "list", "tables": {"kd_shops": "region"},
                  "values": {names[1]: ["eu"], names[2]: ["us"]}},
        "misc": {"tables": {"kd_serials": "id", "kd_server_made": "id", "kd_context_made": "id"}},
    }}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        # (Primaries: which shard holds a row is the point here, not which node serves it.)
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def test_a_uuid4_default_key_is_made_before_the_shard_is_chosen(env):
    cluster, Session = env
    with Session() as s:
        docs = [Doc(title=f"d{i}", pages=[Page(id=1), Page(id=2)]) for i in range(30)]
        s.add_all(docs)
        s.commit()
        ids = [d.id for d in docs]
    assert all(isinstance(i, uuid.UUID) for i in ids) and len(set(ids)) == 30
    owners = {cluster.shard_for("kd_docs", i) for i in ids}
    assert len(owners) > 1  # the keys spread: the check below is not trivially one shard
    for i in ids:
        owner = cluster.shard_for("kd_docs", i)
        assert shards_holding(cluster, "kd_docs", "id", i) == [owner]
        assert shards_holding(cluster, "kd_pages", "doc_id", i) == [owner]  # the children follow
    with Session() as s:
        assert s.get(Doc, ids[0]).title == "d0"
        assert sorted(p.id for p in s.get(Doc, ids[3]).pages) == [1, 2]


def test_a_scalar_default_key_routes_by_its_value(env):
    cluster, Session = env
    with Session() as s:
        s.add_all([Region(id=1), Region(id=2, region="us")])
        s.commit()
    assert shards_holding(cluster, "kd_shops", "id", 1) == [cluster.shard_for("kd_shops", "eu")]
    assert shards_holding(cluster, "kd_shops", "id", 2) == [cluster.shard_for("kd_shops", "us")]
    with Session() as s:
        assert s.scalars(select(Region.region).order_by(Region.id)).all() == ["eu", "us"]


@pytest.mark.parametrize("make", [lambda: Serial(), lambda: ServerMade(), lambda: ContextMade(name="x")],
                         ids=["serial", "server_default", "context_default"])
def test_a_key_made_at_the_insert_is_refused_saying_why(env, make):
    cluster, Session = env
    with Session() as s:
        obj = make()
        s.add(obj)
        with pytest.raises(ShardKeyError) as err:
            s.flush()
        msg = str(err.value)
        assert f"has no value for shard key {obj.__tablename__}.id" in msg
        assert "default=uuid.uuid4" in msg and "comes after the shard is chosen" in msg
        s.rollback()
    for shard in cluster.shard_names:
        with cluster.primary(shard).connect() as c:
            assert c.execute(text(f"SELECT count(*) FROM {obj.__tablename__}")).scalar() == 0
