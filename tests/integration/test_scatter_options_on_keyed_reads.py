"""The cross-shard options (``shardkit_strict``, ``shardkit_partial_results``,
``shardkit_all_shards``, ``shardkit_timeout``) are checked on every statement that has
them, not only on those that happen to scatter: a bad value on a read its key sends to
one shard is refused the day it is written, not the day the key goes away.  On the
shared local cluster, its own tables."""

from __future__ import annotations

import math

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, delete, select, update
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "read_switches_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}}}


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        m = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
        with m() as s:
            s.add_all([Item(id=k, v=f"v{k}") for k in range(6)])
            s.commit()
        yield c, m


BAD = [("shardkit_strict", "false"), ("shardkit_strict", 1),
       ("shardkit_partial_results", "yes"), ("shardkit_partial_results", 0),
       ("shardkit_all_shards", "true"),
       ("shardkit_timeout", "2"), ("shardkit_timeout", 0), ("shardkit_timeout", -1.0),
       ("shardkit_timeout", math.nan), ("shardkit_timeout", True)]


def _message(name, value):
    return "use True or False" if name != "shardkit_timeout" else "an int or float above 0"


@pytest.mark.parametrize(("name", "value"), BAD, ids=repr)
def test_a_keyed_read_refuses_a_bad_option(env, name, value):
    c, m = env
    with m() as s:
        with pytest.raises(ArgumentError, match=f"{name}={value!r}.*{_message(name, value)}"):
            s.execute(select(Item).where(Item.id == 3), execution_options={name: value}).all()
        with pytest.raises(ArgumentError, match=name):
            s.execute(select(Item).where(Item.id == 3).execution_options(**{name: value})).all()
        with pytest.raises(ArgumentError, match=name):
            s.get(Item, 3, execution_options={name: value})


@pytest.mark.parametrize(("name", "value"), BAD, ids=repr)
def test_a_read_on_a_named_shard_or_in_a_scope_refuses_a_bad_option(env, name, value):
    c, m = env
    with m() as s:
        with pytest.raises(ArgumentError, match=name):
            s.execute(select(Item), execution_options={name: value, "shardkit_shard": "s0"}).all()
        with shardkit.scope(key=3):
            with pytest.raises(ArgumentError, match=name):
                s.execute(select(Item), execution_options={name: value}).all()


@pytest.mark.parametrize(("name", "value"), BAD, ids=repr)
def test_a_keyed_write_refuses_a_bad_option_and_writes_nothing(env, name, value):
    c, m = env
    with m() as s:
        with pytest.raises(ArgumentError, match=name):
            s.execute(update(Item).where(Item.id == 4).values(v="changed"), execution_options={name: value})
        with pytest.raises(ArgumentError, match=name):
            s.execute(delete(Item).where(Item.id == 4), execution_options={name: value})
        s.rollback()
    with m() as s:
        assert s.get(Item, 4).v == "v4"


@pytest.mark.parametrize(("name", "value"), [("shardkit_strict", True), ("shardkit_strict", False),
                                             ("shardkit_partial_results", True),
                                             ("shardkit_partial_results", False),
                                             ("shardkit_timeout", 2), ("shardkit_timeout", 0.5),
                                             ("shardkit_timeout", None)], ids=repr)
def test_good_values_still_read(env, name, value):
    c, m = env
    with m() as s:
        assert [i.id for i in s.scalars(select(Item).where(Item.id == 3),
                                        execution_options={name: value})] == [3]
        assert s.get(Item, 2, execution_options={name: value}).v == "v2"
