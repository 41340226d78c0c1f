"""A cross-shard read's fail-fast, as a user whose reads go to replicas sees it.

Cluster: 2 shards, one replica each (this module's own).  ``rv_gate(p0, p1, r0, r1)``
waits on shard ``sN``'s primary ``pN`` seconds and on its replica ``rN`` seconds; a
negative value waits ``-value`` seconds and then ends its own backend (a lost connection).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, MetaData, func, insert, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.errors import ScatterError
from waiting import wait_replicas_usable

pytestmark = pytest.mark.integration

N = 200
SHARDS = ("s0", "s1")


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "rv_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer)


GROUPS = {"rv": {"strategy": "hash", "tables": {"rv_items": "id"}}}
REPLICAS = {"poll_interval": 0.2, "max_lag_seconds": 300.0, "wait_for_token": 0.0}


def gate(p0: float = 0, p1: float = 0, r0: float = 0, r1: float = 0) -> Any:
    return func.rv_gate(float(p0), float(p1), float(r0), float(r1))


@dataclass
class Env:
    dev: Any

    @property
    def config(self) -> dict[str, Any]:
        return {**self.dev.config_dict(), "groups": GROUPS, "replicas": REPLICAS}

    def make_cluster(self, replica_options: dict[str, str] | None = None) -> shardkit.Cluster:
        """A Cluster of the module's servers, its monitor's replicas usable;
        ``replica_options``: shard -> libpq ``options`` for that shard's replica."""
        cfg = self.config
        if replica_options:
            cfg["shards"] = [{**s, "replicas": [str(make_url(u).update_query_dict(
                {"options": replica_options[s["name"]]})) for u in s["replicas"]]}
                if s["name"] in replica_options else s for s in cfg["shards"]]
        cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
        cluster.start_monitor()
        wait_replicas_usable(cluster)
        return cluster

    def running(self, cluster: shardkit.Cluster, marker: str) -> dict[str, int]:
        """Node -> queries containing ``marker`` active there (not this one)."""
        out = {}
        for sh in SHARDS:
            for role, eng in (("primary", cluster.primary(sh)), ("replica", cluster.engine(sh, "replica", 0))):
                with eng.connect() as c:
                    n = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                       "AND pid <> pg_backend_pid() AND query LIKE :m"),
                                  {"m": f"%{marker}%"}).scalar()
                if n:
                    out[f"{sh}/{role}"] = n
        return out


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    e = Env(dev)
    cluster = shardkit.Cluster.from_config(e.config, metadata=Base.metadata)
    for i, s in enumerate(SHARDS):
        Base.metadata.create_all(cluster.primary(s))
        with cluster.primary(s).begin() as c:
            c.execute(text(
                "CREATE FUNCTION rv_gate(p0 float8, p1 float8, r0 float8, r1 float8) RETURNS boolean "
                "LANGUAGE plpgsql STABLE AS $$ DECLARE d float8 := CASE WHEN pg_is_in_recovery() "
                f"THEN r{i} ELSE p{i} END; BEGIN PERFORM pg_sleep(abs(d)); IF d < 0 THEN "
                "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END IF; "
                "RETURN true; END $$"))
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        s.execute(insert(Item), [{"id": i, "v": i % 7} for i in range(N)])
        s.commit()
    cluster.dispose()
    yield e


def test_a_replica_past_its_statement_timeout_fails_the_read_at_once(env):
    """Replicas for reports often carry a statement_timeout.  s0's replica cancels its
    query after 300 ms: that failure is not one shardkit reads again on another node
    (only a dead replica or a recovery conflict is), so without partial results the read
    has failed, whatever s1 answers.  It waited for s1's replica (20 s) first, holding the
    caller and s1's replica connection: the fail-fast of a primary's failure, not a replica's."""
    cluster = env.make_cluster({"s0": "-c statement_timeout=300"})
    try:
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with S() as s:
            t0 = time.monotonic()
            with pytest.raises(ScatterError) as ei:
                s.execute(select(Item.id).where(gate(r0=2, r1=20))
                          .execution_options(shardkit_role="replica")).all()
            took = time.monotonic() - t0
            assert env.running(cluster, "rv_gate(") == {}
        assert took < 10, f"the read failed after {took:.1f} s: it waited for the other shard"
        assert set(ei.value.failures) == {"s0"}
        assert "statement timeout" in str(ei.value)
    finally:
        cluster.dispose()


def test_a_replica_read_is_not_read_again_once_another_shard_failed_the_read(env):
    """s1's replica dies under the read (a replica failure shardkit reads again elsewhere),
    then s0's primary (read there: the session wrote to s0) loses its backend: the read has
    failed whatever s1 answers.  It still read s1 again on its primary (20 s) before
    raising the ScatterError it had already."""
    cluster = env.make_cluster()
    try:
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        k0 = next(i for i in range(N, 2 * N) if cluster.shard_for(Item, i) == "s0")
        with S() as s:
            s.add(Item(id=k0, v=0))
            s.flush()  # s0 is read on its primary from now on
            t0 = time.monotonic()
            with pytest.raises(ScatterError) as ei:
                s.execute(select(Item.id).where(gate(p0=-1.5, r1=-0.01, p1=20))).all()
            took = time.monotonic() - t0
            assert env.running(cluster, "rv_gate(") == {}
        assert took < 10, f"the read failed after {took:.1f} s: it read s1 again on its primary first"
        assert "s0" in ei.value.failures
    finally:
        cluster.dispose()


def test_a_failed_fast_read_in_a_savepoint_leaves_the_transaction_usable(env):
    """The README's way to go on after an error in a transaction: run the statement in
    begin_nested().  s0's failure stops s1's query (a cancel, which aborts s1's part of the
    transaction too): rolling the savepoint back must leave both shards usable, and the
    transaction's earlier writes on s1 must commit."""
    cluster = env.make_cluster()
    try:
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        k1 = next(i for i in range(2 * N, 3 * N) if cluster.shard_for(Item, i) == "s1")
        with S() as s:
            s.add(Item(id=k1, v=1))
            s.flush()
            s.connection(bind_arguments={"shard_id": "s0"}).exec_driver_sql("SET LOCAL statement_timeout = 300")
            t0 = time.monotonic()
            with pytest.raises(ScatterError) as ei:
                with s.begin_nested():
                    s.execute(select(Item.id).where(gate(p0=2, p1=20))).all()
            assert time.monotonic() - t0 < 10
            assert set(ei.value.failures) == {"s0"}
            assert s.scalar(select(func.count()).select_from(Item)) == N + 1
            s.commit()
            token = s.consistency_token()
        with S(consistency_token=token) as s:  # (a replica may not have replayed the commit)
            assert s.get(Item, k1).v == 1
    finally:
        cluster.dispose()
