"""A close look at get()'s kept statement (ShardedSession._get_impl, _get_load): each
get() here must give what SQLAlchemy's own way gives (the kept statement turned off, as
tests/integration/test_get_kept_statement.py does): objects, errors, SQL, nodes."""

from __future__ import annotations


import pytest
from get_paths import with_and_without_kept
from own_tables import cluster_with_tables, truncate_everywhere
from sqlalchemy import BigInteger, Column, String, Table, inspect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    mapped_column,
    registry,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Purse(Base):
    __tablename__ = "gh_purses"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(String(20), default="")


# Imperatively mapped, remapped by a test (the "classical mapping" of a test suite that
# maps its domain classes once per test and clears them after).
imperative = registry()
things = Table("gh_things", Base.metadata,
               Column("id", BigInteger, primary_key=True, autoincrement=False),
               Column("label", String(20)))


class Thing:
    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


imperative.map_imperatively(Thing, things)


CONFIG = {"groups": {
    "purses": {"tables": {"gh_purses": "id"}},
    "things": {"tables": {"gh_things": "id"}},
}}
TABLES = ["gh_purses", "gh_things"]


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def rows(env):
    _seed(env)


def _seed(env):
    truncate_everywhere(env, *TABLES)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=env)() as s:
        s.add_all([Purse(id=i, owner=f"p{i}") for i in range(1, 6)])
        s.add_all([Thing(id=i, label=f"t{i}") for i in range(1, 4)])
        s.commit()

    # (the replicas' lag does not matter: every session here reads with consistency="strong")


def _both(cluster, monkeypatch, fn, **maker):
    """(with the kept statement, SQLAlchemy's own way), each read with consistency="strong"."""
    return with_and_without_kept(cluster, monkeypatch, fn, between=lambda: _seed(cluster),
                                 consistency="strong", **maker)


def test_an_aliased_class_is_refused_as_sqlalchemy_refuses_it(env, rows, monkeypatch):
    kept, theirs = _both(env, monkeypatch, lambda s: s.get(aliased(Purse), 1))
    assert theirs[0][:2] == ("error", "ArgumentError")
    assert kept[0] == theirs[0]


def _remapped(label_prop):
    """Thing mapped again (as a test suite's per-test mapping does), with ``label`` under
    another attribute name."""
    imperative.dispose()
    imperative.map_imperatively(Thing, things, properties={label_prop: things.c.label})


def _warm(s):
    """get() of Thing until its plan is kept (SQLAlchemy resets a mapper's memos as it
    configures it and at its first loads, and the plan is made again then)."""
    for k in range(100, 110):
        s.get(Thing, k)
    plan = s.cluster.router.get_plans[Thing]
    assert plan[0]._with_polymorphic_mappers is plan[2]


def test_a_class_mapped_again_loads_by_its_new_mapper(env, rows, monkeypatch):
    # (A test suite that maps its classes imperatively per test: registry.dispose() or
    # clear_mappers() after each, the same classes mapped again before the next.)
    def fn(s):
        _warm(s)
        first = s.get(Thing, 1)
        seen = sorted(k for k in vars(first) if not k.startswith("_"))
        s.close()
        _remapped("name")
        try:
            again = s.get(Thing, 2)
            return seen, sorted(k for k in vars(again) if not k.startswith("_")), inspect_mapper(again)
        finally:
            _remapped("label")
    kept, theirs = _both(env, monkeypatch, fn)
    assert theirs[0] == ("ok", [["id", "label"], ["id", "name"], True])
    assert kept[0] == theirs[0]
    assert kept[3] == theirs[3]


def test_a_class_no_longer_mapped_is_refused_as_sqlalchemy_refuses_it(env, rows, monkeypatch):
    def fn(s):
        _warm(s)
        s.close()
        imperative.dispose()
        try:
            return s.get(Thing, 2)
        finally:
            imperative.map_imperatively(Thing, things)
    kept, theirs = _both(env, monkeypatch, fn)
    assert theirs[0][0] == "error"
    assert kept[0] == theirs[0]


def inspect_mapper(obj):
    return inspect(obj).mapper is inspect(Thing)


