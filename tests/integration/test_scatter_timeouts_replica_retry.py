"""Cross-shard reads, operationally: ``shardkit_timeout`` holds when a replica fails under
the read and the shard is read again on another node, and a ``shardkit_timeout`` (or
``cluster.scatter_timeout``) that is no limit at all is refused as the caller's mistake,
before any shard runs the read, not reported as every shard failing.

Cluster: 2 shards, each a primary with one replica (this module's own).  ``st_gate(s)``
on s1's replica ends its own backend (as a replica dying under the read); on s1's primary
it sleeps ``s`` seconds; elsewhere it does nothing.
"""

from __future__ import annotations

import fractions
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, MetaData, exc, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.errors import ScatterError, ShardUnavailable
from replica_env import replayed

pytestmark = pytest.mark.integration

N = 200


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "sst_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer)


GROUPS = {"sst": {"strategy": "hash", "tables": {"sst_items": "id"}}}
T = Item.__table__


@dataclass
class Env:
    dev: Any

    def cluster(self) -> shardkit.Cluster:
        """A new Cluster (its own monitor: no replica banned by an earlier test)."""
        return shardkit.Cluster.from_config({**self.dev.config_dict(), "groups": GROUPS},
                                            metadata=Base.metadata)


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def checked_out(cluster: shardkit.Cluster) -> dict[str, int]:
    return {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st and st["checkedout"]}


def busy(cluster: shardkit.Cluster) -> dict[str, int]:
    """Node -> this module's queries still running or transactions left open there."""
    out = {}
    for sh in cluster.shard_names:
        for role in ("primary", "replica"):
            with cluster.engine(sh, role).connect() as c:
                n = c.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database() AND state <> 'idle' AND query LIKE '%sst_items%'")).scalar()
            if n:
                out[f"{sh}/{role}"] = n
    return out


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    e = Env(dev)
    cluster = e.cluster()
    for sh in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(sh))
        body = ("BEGIN IF pg_is_in_recovery() THEN PERFORM pg_terminate_backend(pg_backend_pid()); "
                "ELSE PERFORM pg_sleep(s); END IF; RETURN true; END") if sh == "s1" else "BEGIN RETURN true; END"
        with cluster.primary(sh).begin() as c:
            c.execute(text(f"CREATE FUNCTION st_gate(s float8) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $${body}$$"))
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session() as s:
        s.execute(insert(Item), [{"id": i, "v": i % 7} for i in range(N)])
        s.commit()
    # The replicas have the rows and the function (once they have replayed everything: a
    # replica that has not replayed the CREATE TABLE yet has no sst_items to count).
    replayed(dev)
    for sh in cluster.shard_names:
        with cluster.engine(sh, "replica").connect() as c:
            assert c.execute(text("SELECT count(*) FROM sst_items")).scalar() == sum(
                cluster.shard_for(Item, i) == sh for i in range(N))
            assert c.execute(text("SELECT count(*) FROM pg_proc WHERE proname = 'st_gate'")).scalar() == 1
    cluster.dispose()
    yield e


def gated(seconds: float) -> Any:
    # An uncorrelated scalar subquery: the gate runs once per shard, not once per row.
    return select(T.c.id).where(select(func.st_gate(seconds)).scalar_subquery()).order_by(T.c.id)


# ---------------------------------------------------------------------------
# A replica failing under the read: the shard read again within shardkit_timeout
# ---------------------------------------------------------------------------


def test_a_shard_read_again_after_its_replica_failed_answers_within_the_timeout(env):
    """Control: s1's replica ends under the read, its primary answers at once: the read is
    whole (read again there), within the timeout, and leaves nothing behind."""
    cluster = env.cluster()
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            rows = s.execute(gated(0.0), execution_options={"shardkit_timeout": 5}).scalars().all()
        assert rows == list(range(N))
        assert wait_until(lambda: not checked_out(cluster)), checked_out(cluster)
    finally:
        cluster.dispose()


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_shard_read_again_after_its_replica_failed_is_bounded_by_shardkit_timeout(env, partial, streamed):
    """s1's replica ends under the read, and s1's primary, where it is read again, takes
    6 s: with ``shardkit_timeout=1`` the caller hears within about that second (plus the
    cancel's grace), s1 named as not answering in time, and the primary's query is
    cancelled, not left running.  (It was read again in the caller's thread with no limit:
    6 s, whatever shardkit_timeout said.)"""
    cluster = env.cluster()
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        opts: dict[str, Any] = {"shardkit_timeout": 1, "shardkit_partial_results": partial}
        if streamed:
            opts["yield_per"] = 20
        t0 = time.monotonic()
        with Session() as s:
            if partial:
                result = s.execute(gated(6.0), execution_options=opts)
                rows = result.scalars().all()
                assert set(result.missing_shards) == {"s1"}
                assert isinstance(result.missing_shards["s1"], ShardUnavailable)
                assert "no answer within 1 s" in str(result.missing_shards["s1"])
                assert rows == [i for i in range(N) if cluster.shard_for(Item, i) == "s0"]
            else:
                with pytest.raises(ScatterError) as ei:
                    s.execute(gated(6.0), execution_options=opts).all()
                assert set(ei.value.failures) == {"s1"}
                assert "no answer within 1 s" in str(ei.value.failures["s1"])
        elapsed = time.monotonic() - t0
        assert elapsed < 4.0, f"shardkit_timeout=1, and the read took {elapsed:.1f} s"
        assert wait_until(lambda: not checked_out(cluster)), checked_out(cluster)
        assert wait_until(lambda: not busy(cluster), 3), busy(cluster)
    finally:
        cluster.dispose()


# ---------------------------------------------------------------------------
# shardkit_timeout values that are no limit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, -1, float("nan"), float("inf"), "2", True])
def test_a_timeout_that_is_no_limit_is_refused_before_any_shard_runs(env, value):
    """``shardkit_timeout=0`` (``statement_timeout = 0`` is "no limit" to a PostgreSQL
    user), a negative or NaN one failed every shard at once as "no answer within 0 s", a
    ScatterError blaming shards that were fine (with partial results: every shard missing);
    a string failed with a TypeError of ``float + str`` after the shards' queries were sent.
    Each is the caller's ArgumentError naming the option, and no shard runs the read."""
    cluster = env.cluster()
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            for partial in (False, True):
                with pytest.raises(exc.ArgumentError, match="shardkit_timeout") as ei:
                    s.execute(select(Item.id), execution_options={
                        "shardkit_timeout": value, "shardkit_partial_results": partial}).all()
                assert "execution option shardkit_timeout" in str(ei.value)
            # the session goes on
            assert s.execute(select(func.count()).select_from(Item)).scalar() == N
        cluster.scatter_timeout = value
        with Session() as s:
            with pytest.raises(exc.ArgumentError, match="cluster.scatter_timeout"):
                s.execute(select(Item.id)).all()
            # a statement's own valid timeout is used instead
            assert len(s.execute(select(Item.id), execution_options={"shardkit_timeout": 5}).all()) == N
        assert not checked_out(cluster)
    finally:
        cluster.dispose()


def test_valid_timeouts_still_work(env):
    cluster = env.cluster()
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            for value in (5, 2.5, fractions.Fraction(5, 2), None):
                assert len(s.execute(select(Item.id), execution_options={"shardkit_timeout": value}).all()) == N
    finally:
        cluster.dispose()
