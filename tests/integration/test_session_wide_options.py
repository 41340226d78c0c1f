"""SQLAlchemy 2.1's session-wide execution options (``Session(execution_options={...})``,
also through a sessionmaker) route like the same options given per statement or per
call, on execute() and on the paths beside it (get, loads, legacy Query, scatter
reads, key-less writes, scopes); a statement's or call's own option still wins.  On
the shared local cluster, its own tables."""

from __future__ import annotations

import time

import pytest
from own_tables import cluster_with_tables, nodes_used
from sqlalchemy import BigInteger, ForeignKey, String, select, update
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, mapped_column, relationship,
                            selectinload, sessionmaker)

import shardkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif("execution_options" not in Session.__init__.__code__.co_varnames,
                       reason="session-wide execution options are new in SQLAlchemy 2.1"),
]


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "swo_review_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))
    pets: Mapped[list[Pet]] = relationship(back_populates="owner", order_by="Pet.id")


class Pet(Base):
    __tablename__ = "swo_review_pets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(Owner.id))
    owner: Mapped[Owner] = relationship(back_populates="pets")


CONFIG = {"groups": {"owners": {"tables": {Owner.__tablename__: "id", Pet.__tablename__: "owner_id"}}},
          "replicas": {"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                       "when_no_replica": "raise"}}
KEYS = range(1, 21)


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=c)() as s:
            s.add_all([Owner(id=k, v=f"v{k}", pets=[Pet(id=k * 100 + j) for j in range(2)])
                       for k in KEYS])
            s.commit()
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c,
                               execution_options={"shardkit_role": "replica"})
        deadline = time.monotonic() + 30
        with Session() as s:
            while len(s.execute(select(Pet)).all()) < 2 * len(KEYS):
                assert time.monotonic() < deadline, "rows did not reach the replicas"
                time.sleep(0.05)
        yield c


def _other_shard(cluster, key):
    own = cluster.shard_for(Owner, key)
    return own, next(s for s in cluster.shard_names if s != own)


def _maker(cluster, **eo):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, execution_options=eo)


def test_get_reads_the_shard_the_session_names(cluster):
    own, other = _other_shard(cluster, 3)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        per_call = s.get(Owner, 3, execution_options={"shardkit_shard": other})
    with _maker(cluster, shardkit_shard=other)() as s:
        assert s.execute(select(Owner).where(Owner.id == 3)).scalar() is None
        session_wide = s.get(Owner, 3)
    assert per_call is None
    assert session_wide is None


def test_a_statements_own_shard_naming_wins_over_the_sessions(cluster):
    own, other = _other_shard(cluster, 3)
    with _maker(cluster, shardkit_shard=other)() as s:
        o = s.query(Owner).set_shard(own).filter(Owner.id == 3).one()
        assert o.v == "v3"
    with _maker(cluster, shardkit_shard=other)() as s:
        stmt = select(Owner).where(Owner.id == 3).execution_options(identity_token=own)
        assert s.execute(stmt).scalar_one().v == "v3"


def test_a_calls_own_shard_naming_wins_over_the_sessions(cluster):
    own, other = _other_shard(cluster, 3)
    with _maker(cluster, shardkit_shard=other)() as s:
        stmt = select(Owner).where(Owner.id == 3)
        assert s.execute(stmt, execution_options={"identity_token": own}).scalar_one().v == "v3"
        assert s.get(Owner, 3, execution_options={"identity_token": own}).v == "v3"


def test_session_wide_streaming_scatter_reads_ordered_text(cluster):
    with _maker(cluster, yield_per=3, shardkit_role="replica")() as s:
        got = s.scalars(select(Owner.v).order_by(Owner.v)).all()
    assert got == sorted(f"v{k}" for k in KEYS)


def test_session_wide_scatter_timeout_and_partial_results(cluster):
    with _maker(cluster, shardkit_timeout=30, shardkit_partial_results=True)() as s:
        assert len(s.scalars(select(Pet).order_by(Pet.id)).all()) == 2 * len(KEYS)


def test_session_wide_primary_role_for_loads(cluster):
    with nodes_used(cluster) as used, _maker(cluster, shardkit_role="primary")() as s:
        o = s.get(Owner, 5)
        assert [p.id for p in o.pets] == [500, 501]          # lazy load
        s.refresh(o)
        s.expire(o, ["v"])
        assert o.v == "v5"
        os_ = s.scalars(select(Owner).where(Owner.id.in_([6, 7])).options(selectinload(Owner.pets))).all()
        assert sorted(len(x.pets) for x in os_) == [2, 2]
        assert s.scalar(select(Owner.v).where(Owner.id == 8)) == "v8"
        assert s.query(Owner).filter(Owner.id == 9).one().v == "v9"
        assert s.query(Owner).get(10).v == "v10"
        assert len(s.query(Owner).all()) == len(KEYS)
    assert used and all(n.endswith("/primary") for n in used), used


def test_session_wide_all_shards_allows_keyless_update(cluster):
    with _maker(cluster, shardkit_all_shards=True)() as s:
        s.execute(update(Owner).values(v=Owner.v))
        s.commit()


def test_scope_role_against_session_wide_role_as_per_statement(cluster):
    # Per statement: the statement's role wins over scope(role=...); the session's the same.
    with nodes_used(cluster) as per_stmt, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with shardkit.scope(role="primary"):
            s.execute(select(Owner).where(Owner.id == 3).execution_options(shardkit_role="replica")).all()
    with nodes_used(cluster) as session_wide, _maker(cluster, shardkit_role="replica")() as s:
        with shardkit.scope(role="primary"):
            s.execute(select(Owner).where(Owner.id == 3)).all()
    assert [n.split("/")[1] == "primary" for n in per_stmt] == [n.split("/")[1] == "primary" for n in session_wide]


def test_a_statements_own_role_wins_over_the_sessions(cluster):
    with nodes_used(cluster) as used, _maker(cluster, shardkit_role="primary")() as s:
        stmt = select(Owner.v).where(Owner.id == 3).execution_options(shardkit_role="replica")
        assert s.execute(stmt).scalar_one() == "v3"
    assert used and not any(n.endswith("/primary") for n in used), used


def test_a_session_wide_yield_per_streams_replica_reads(cluster):
    # (Before it routed, a replica read with it ran a server-side cursor in autocommit:
    # DECLARE CURSOR can only be used in transaction blocks.)
    with _maker(cluster, yield_per=5)() as s:
        assert sorted(o.id for o in s.execute(select(Owner)).scalars()) == list(KEYS)
        assert s.execute(select(Owner.v).where(Owner.id == 7)).scalar_one() == "v7"
