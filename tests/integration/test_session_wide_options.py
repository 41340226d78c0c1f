"""SQLAlchemy 2.1's session-wide execution options (``Session(execution_options={...})``,
also through a sessionmaker) route like the same options given per statement: a
session made for primary-only reads reads the primaries, a streaming session streams
its replica reads in a transaction, a statement's own option still wins.  On the shared
local cluster, its own table."""

from __future__ import annotations

import time

import pytest
from own_tables import cluster_with_tables, nodes_used
from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import shardkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif("execution_options" not in Session.__init__.__code__.co_varnames,
                       reason="session-wide execution options are new in SQLAlchemy 2.1"),
]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "session_wide_options_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}},
          "replicas": {"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                       "when_no_replica": "raise"}}
KEYS = range(1, 21)


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=c)() as s:
            s.add_all([Item(id=k, v=f"v{k}") for k in KEYS])
            s.commit()
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c,
                               execution_options={"shardkit_role": "replica"})
        deadline = time.monotonic() + 30
        with Session() as s:   # every row on the replicas before the tests read them there
            while len(s.execute(select(Item)).all()) < len(KEYS):
                assert time.monotonic() < deadline, "rows did not reach the replicas"
                time.sleep(0.05)
        yield c


def test_a_session_wide_primary_role_reads_the_primaries(cluster):
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                           execution_options={"shardkit_role": "primary"})
    with nodes_used(cluster) as used, Session() as s:
        assert s.execute(select(Item.v).where(Item.id == 3)).scalar_one() == "v3"
        assert s.get(Item, 4).v == "v4"
        assert len(s.execute(select(Item)).scalars().all()) == len(KEYS)
    assert used and all(n.endswith("/primary") for n in used), used


def test_a_statements_own_role_wins_over_the_sessions(cluster):
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                           execution_options={"shardkit_role": "primary"})
    with nodes_used(cluster) as used, Session() as s:
        stmt = select(Item.v).where(Item.id == 3).execution_options(shardkit_role="replica")
        assert s.execute(stmt).scalar_one() == "v3"
    assert used and not any(n.endswith("/primary") for n in used), used


def test_a_session_wide_yield_per_streams_replica_reads(cluster):
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                           execution_options={"yield_per": 5})
    with Session() as s:
        got = sorted(i.id for i in s.execute(select(Item)).scalars())
        assert got == list(KEYS)
        assert s.execute(select(Item.v).where(Item.id == 7)).scalar_one() == "v7"
