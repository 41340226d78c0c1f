"""A thread's ``scoped_session`` given to ``run_transaction``, which runs ``fn`` in a new
session.  A session that the factory returns with work in progress (the thread's session
in use) is refused before anything runs, and its work is left as it was; a thread's idle
session is used as before.  On the shared local cluster, its own tables."""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, func, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "rtx_scoped_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}}}


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        yield c, sessionmaker(class_=shardkit.ShardedSession, cluster=c)


def _ids(m):
    with m() as s:
        return sorted(s.scalars(select(Item.id)))


def test_a_scoped_session_with_pending_objects_is_refused_and_left_alone(env):
    # (run_transaction used the thread's session: fn's commit committed the pending
    # object the caller had not decided to write, and its end closed the session.)
    c, m = env
    registry = scoped_session(m)
    try:
        mine = registry()
        mine.add(Item(id=1, v="not yet"))
        ran = []
        with pytest.raises(InvalidRequestError, match="session_factory"):
            shardkit.run_transaction(registry, lambda s: (ran.append(s), s.add(Item(id=2, v="fn"))))
        assert ran == []
        assert _ids(m) == []
        assert registry() is mine and [o.id for o in mine.new] == [1]
        mine.rollback()
    finally:
        registry.remove()


def test_a_scoped_session_in_a_transaction_is_refused_and_keeps_it(env):
    c, m = env
    registry = scoped_session(m)
    try:
        mine = registry()
        mine.execute(select(func.count()).select_from(Item)).scalar_one()
        assert mine.in_transaction()
        with pytest.raises(InvalidRequestError, match="session_factory"):
            shardkit.run_transaction(registry, lambda s: s.add(Item(id=3, v="fn")))
        assert mine.in_transaction()
        assert _ids(m) == []
    finally:
        registry.remove()


def test_an_idle_scoped_session_and_its_sessionmaker_still_run(env):
    c, m = env
    registry = scoped_session(m)
    tokens = []
    try:
        assert shardkit.run_transaction(registry, lambda s: s.add(Item(id=4, v="a")) or 4,
                                        on_commit=tokens.append) == 4
        assert shardkit.run_transaction(registry.session_factory,
                                        lambda s: s.add(Item(id=5, v="b")) or 5) == 5
        assert {4, 5} <= set(_ids(m))
        assert tokens and tokens[0].startswith("v1:")
    finally:
        registry.remove()
        with m() as s:
            s.query(Item).filter(Item.id.in_([4, 5])).delete()
            s.commit()
