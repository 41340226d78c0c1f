"""The session's short path for a key read (ShardedSession._plain_read,
Router.key_select_route) against a plain SQLAlchemy Session and shardkit's general path,
on a real cluster with a replica."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, select, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, mapped_column, relationship,
                            selectinload, sessionmaker)

import shardkit
from shardkit import _session

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "rfr_parents"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    children: Mapped[list[Child]] = relationship(lazy="subquery", order_by="Child.id")


class Child(Base):
    __tablename__ = "rfr_children"
    parent_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("rfr_parents.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    cfg = {**dev.config_dict(),
           "groups": {"family": {"tables": {"rfr_parents": "id", "rfr_children": "parent_id"}}},
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    Base.metadata.create_all(cluster.primary("s0"))
    cluster.start_monitor()
    yield dev, cluster
    cluster.dispose()


@pytest.fixture
def fresh(env):
    dev, cluster = env
    with cluster.primary("s0").begin() as c:
        c.execute(text("SET LOCAL lock_timeout = '10s'"))
        c.execute(text("TRUNCATE rfr_children, rfr_parents"))
        c.execute(Parent.__table__.insert(), [{"id": k, "name": f"p{k}"} for k in (1, 2, 3)])
        c.execute(Child.__table__.insert(), [{"parent_id": 1, "id": 10}])
    for r in dev.shard("s0").replicas:
        r.wait_caught_up()
    deadline = time.monotonic() + 30
    while not cluster.selector.eligible("s0", max_lag_seconds=300.0, max_lag_bytes=2**62, min_lsn=None)[0]:
        assert time.monotonic() < deadline, "the health monitor never found the replica usable"
        time.sleep(0.05)
    return cluster


def _took_short_path(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    took: list[bool] = []
    plain_read = _session.ShardedSession._plain_read

    def spy(self: Any, statement: Any, params: Any) -> Any:
        out = plain_read(self, statement, params)
        took.append(out is not _session._GENERAL and not isinstance(out, _session.Route))
        return out
    monkeypatch.setattr(_session.ShardedSession, "_plain_read", spy)
    return took


def _children_after_adding_one(s: Any) -> list[int]:
    result = s.execute(select(Parent).where(Parent.id == 1))
    # Added after the statement ran, before its rows (and the subquery load of their
    # children, which the ORM autoflushes before) are fetched.
    s.add(Child(parent_id=1, id=11))
    parent = result.scalar_one()
    return [c.id for c in parent.children]


def test_subqueryload_after_a_short_path_read_autoflushes_as_a_session_does(fresh, monkeypatch):
    with Session(fresh.primary("s0")) as plain:
        expected = _children_after_adding_one(plain)
        plain.rollback()
    assert expected == [10, 11]  # SQLAlchemy: the subquery load autoflushed the new child
    took = _took_short_path(monkeypatch)
    Sharded = sessionmaker(class_=shardkit.ShardedSession, cluster=fresh)
    with Sharded() as s:
        s.execute(select(Parent).where(Parent.id == 2)).scalar_one()  # the replica's engine made
        took.clear()
        assert _children_after_adding_one(s) == expected
        assert took[0] is True
        s.rollback()


def test_a_subclass_default_gives_way_to_what_the_constructor_is_given(env):
    """The class's defaults are kept unless the constructor is given others: given
    strict=False, a session of a strict subclass (or of a sessionmaker configured strict)
    is not strict."""
    _, cluster = env

    class StrictSession(shardkit.ShardedSession):
        strict = True

    assert StrictSession(cluster=cluster).strict is True
    assert StrictSession(cluster=cluster, strict=False).strict is False
    Strict = sessionmaker(class_=StrictSession, cluster=cluster)
    Strict.configure(strict=False)
    with Strict() as s:
        assert s.strict is False
    assert shardkit.ShardedSession(cluster=cluster, strict=True).strict is True
    assert shardkit.ShardedSession(cluster=cluster).strict is False


def test_a_subclass_default_consistency_is_checked_as_the_argument_is(env):
    """A class default is a session's setting like the argument: a misspelt one is refused
    (as consistency="read-your-writes" given to the constructor is), not read as eventual."""
    _, cluster = env
    with pytest.raises(ArgumentError, match="Misspelt.consistency must be one of eventual, read_your_writes, "
                                            "strong \\(or None, the cluster.s\\), not .read-your-writes."):
        class Misspelt(shardkit.ShardedSession):
            consistency = "read-your-writes"

    class Strong(shardkit.ShardedSession):
        consistency = "strong"
    assert Strong(cluster=cluster).consistency == "strong"
    assert Strong(cluster=cluster, consistency="eventual").consistency == "eventual"

    class PerRequest(shardkit.ShardedSession):
        @property
        def consistency(self) -> str:
            return "strong"
    assert PerRequest(cluster=cluster).consistency == "strong"


def _selectin_children_after_adding_one(s: Any) -> list[int]:
    result = s.execute(select(Parent).where(Parent.id == 1).options(selectinload(Parent.children)))
    # Added after the statement ran, before its rows (and the selectin load of their
    # children, which the ORM autoflushes before) are fetched.
    s.add(Child(parent_id=1, id=11))
    parent = result.scalar_one()
    return [c.id for c in parent.children]


@pytest.mark.parametrize("consistency", [None, "read_your_writes", "eventual"])
def test_selectinload_after_a_plain_read_autoflushes_as_a_session_does(fresh, consistency):
    """The short path's load options turn the ORM's autoflush off for the key read itself
    (nothing to flush then); the selectin load that follows when its rows are fetched is a
    statement of its own, which SQLAlchemy autoflushes before whatever the statement it
    loads for said.  shardkit read the top statement's autoflush=False for the selectin
    load too: no flush before routing it, so it went to the replica and missed the child
    the session holds (the ORM's own autoflush then wrote it on the primary)."""
    with Session(fresh.primary("s0")) as plain:
        expected = _selectin_children_after_adding_one(plain)
        plain.rollback()
    assert expected == [10, 11]
    with shardkit.ShardedSession(fresh, consistency=consistency) as s:
        s.execute(select(Parent).where(Parent.id == 2)).scalar_one()  # the replica's engine made
        assert _selectin_children_after_adding_one(s) == expected
        s.rollback()
