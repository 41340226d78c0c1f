"""merge(load=False) of a detached object without its key, text fragments whose OR narrows or
does not narrow a key read, and a scope key's route: regressions and edge cases."""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, MetaData, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient_to_detached, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Shop(Base):
    """A list-keyed table whose key (not in the primary key) has a scalar default."""
    __tablename__ = "tdr_shops"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    region: Mapped[str] = mapped_column(String(8), default="eu")
    name: Mapped[str] = mapped_column(String(20), default="")


@pytest.fixture(scope="module")
def env(sharded_dev):
    names = [s.name for s in sharded_dev.shards]
    config = {"groups": {
        "shops": {"strategy": "list", "tables": {"tdr_shops": "region"},
                  "values": {names[1]: ["eu"], names[2]: ["us"]}},
    }}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def test_merge_load_false_of_a_detached_object_without_its_key_does_not_make_one(env):
    # A key default is for a new row: merge(load=False) of an object whose key was not
    # loaded must neither write the default into the caller's object nor route by it.
    cluster, Session = env
    with Session() as s:
        s.add(Shop(id=10, region="us", name="ny"))
        s.commit()
    given = Shop(id=10, name="ny")
    make_transient_to_detached(given)
    with Session() as s:
        merged = s.merge(given, load=False)
        assert "region" not in given.__dict__
        assert merged.name == "ny"


# -- text() with an OR beside the key: only a bare OR reaches past it ------------------

from models import User, offline_cluster  # noqa: E402
from sqlalchemy import literal_column, update  # noqa: E402


@pytest.fixture(scope="module")
def offline():
    return offline_cluster(["s0", "s1", "s2"])


@pytest.mark.parametrize("frag", [
    "(name = 'a' OR name = 'b')",              # the text's own parentheses bound its OR
    "name IN ('x or y', 'z')",                 # an OR inside a string literal is no operator
    "coalesce(name, 'a') = 'b' AND (name IS NULL OR name = 'c')",
])
def test_text_whose_or_is_inside_parentheses_or_quotes_still_narrows(offline, frag):
    owner = offline.shard_for(User, 7)
    assert offline.explain(select(User).where(User.id == 7, text(frag))).shards == (owner,)
    assert offline.explain(update(User).where(User.id == 7, text(frag)).values(name="n")).shards == (owner,)
    lit = User.name == literal_column("'black or white'")
    assert offline.explain(update(User).where(User.id == 7, lit).values(name="n")).shards == (owner,)


def test_text_with_an_or_inside_case_or_cast_still_narrows(offline):
    from sqlalchemy import Boolean, case, cast
    owner = offline.shard_for(User, 7)
    for cond in (case((text("name = 'a' OR name = 'b'"), 1), else_=0) == 1,
                 cast(text("name = 'a' OR name = 'b'"), Boolean)):
        assert offline.explain(select(User).where(User.id == 7, cond)).shards == (owner,)


def test_text_with_a_bare_or_still_does_not_narrow(offline):
    assert offline.explain(select(User).where(User.id == 7, text("name = 'a' OR name = 'b'"))).kind == "all"
    assert offline.explain(select(User).where(
        User.id == 7, text("(name = 'a') OR (name = 'b')"))).kind == "all"


# -- scope(key=): typing the key through the statement's tables costs a walk of it -----

def test_scope_key_route_does_not_walk_the_statement_when_the_key_types_are_known(offline, monkeypatch):
    # The cluster was given metadata=: the key's column types are known by table name, so
    # a key-less statement inside scope(key=...) (the hot path of a tenant-scoped app) is
    # not walked for its tables on every execution.
    from shardkit import _session

    stmt = select(User).where(User.name == "x")
    route = offline.router.route(stmt, None, all_shards=True)

    def walked(*a, **kw):
        raise AssertionError("the statement was walked for its tables")

    monkeypatch.setattr(_session.sql_util, "find_tables", walked)
    assert _session._route_by_scope_key(offline, route, 7, stmt).shards == (offline.shard_for(User, 7),)
