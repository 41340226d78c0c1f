"""Replica routing: a read-only primary and readiness, a replica whose lag
is unknown, and a replica left ahead of a newly promoted primary (failover).

One 1-shard x 2-replica cluster serves the module; the failover test is last (it
promotes a replica and leaves the old primary stopped).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import health_by_node, wait_for

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "fe_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))


GROUPS = {"items": {"tables": {"fe_items": "id"}}}
FAST = {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 3.0}


def _cluster(cfg: dict[str, Any], **replicas: Any) -> shardkit.Cluster:
    return shardkit.Cluster.from_config({**cfg, "groups": GROUPS, "replicas": {**FAST, **replicas}})


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=2)
    cluster = _cluster(dev.config_dict())
    try:
        Base.metadata.create_all(cluster.primary("s0"))
    finally:
        cluster.dispose()
    return dev


@pytest.fixture
def cluster(dev):
    c = _cluster(dev.config_dict())
    c.start_monitor()
    yield c
    c.dispose()


def _caught_up(dev: Any) -> None:
    for r in dev.shard("s0").replicas:
        if r.is_running():
            r.wait_caught_up()


def test_read_only_primary_is_not_ready(dev, cluster):
    """A primary set read-only (default_transaction_read_only, as a full disk or a
    maintenance window makes it) refuses every write: health() must not call the
    cluster ready."""
    primary = dev.shard("s0").primary
    assert cluster.health().ready
    with primary.connect() as c:
        c.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        c.execute("SELECT pg_reload_conf()")
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with pytest.raises(Exception, match="read-only transaction"):
            with Session() as s:
                s.add(Item(id=1, name="x"))
                s.commit()
        wait_for(lambda: not cluster.health().ready, 10, "health() to say not ready with the primary read-only")
    finally:
        with primary.connect() as c:
            c.execute("ALTER SYSTEM RESET default_transaction_read_only")
            c.execute("SELECT pg_reload_conf()")
    wait_for(lambda: cluster.health().ready, 5, "ready again")


def test_replica_behind_an_idle_primary_with_no_replayed_transaction_gets_no_reads(dev):
    """r0 restarted (after a restartpoint) and has replayed no transaction since, so it
    has no replay timestamp; it stops short of a commit the primary made before this
    process started (here: recovery_min_apply_delay holds it), and the primary is idle
    since.  How far behind it is cannot be told (the primary was never seen at its
    position): it must get no reads, not be taken for 0 s behind for as long as the
    primary stays idle."""
    sh = dev.shard("s0")
    primary, r0 = sh.primary, sh.replicas[0]
    try:
        for attempt in range(5):
            _caught_up(dev)
            with primary.connect() as c:
                c.execute("CHECKPOINT")
            r0.wait_caught_up()
            with r0.connect() as c:
                c.execute("CHECKPOINT")  # a restartpoint: the restart replays no commit...
            r0.set_apply_delay(3600)
            r0.stop()
            r0.start()
            with r0.connect() as c:
                if c.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0] is None:
                    break
            # ... unless the primary committed (autovacuum's ANALYZE, say) after it: such a
            # commit is replayed before the restart reaches a consistent state, undelayed.
            r0.set_apply_delay(0)
        else:
            pytest.fail("r0 replayed a commit at each of 5 restarts: the test cannot set up")
        with primary.connect() as c:
            c.execute("INSERT INTO fe_items VALUES (50, 'committed before the process started')")
        with r0.connect() as c:
            assert c.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0] is None
        cfg = {"bucket_count": dev.config_dict()["bucket_count"],
               "shards": [{"name": "s0", "primary": primary.url, "replicas": [r0.url]}]}
        cluster = _cluster(cfg, max_lag_seconds=5.0, consistency="eventual")
        try:
            cluster.start_monitor()
            Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            for _ in range(5):
                time.sleep(0.3)
                with Session() as s:
                    assert s.execute(select(Item.name).where(Item.id == 50)).scalar() is not None, \
                        health_by_node(cluster)["s0/r0"]
            h = health_by_node(cluster)["s0/r0"]
            assert h["lag_bytes"] > 0 and h["lag_seconds"] is None, h
        finally:
            cluster.dispose()
    finally:
        r0.set_apply_delay(0)
    r0.wait_caught_up()


# -- last: a failover (the old primary stays stopped, r1 is promoted) ------------------------


def test_replica_ahead_of_a_promoted_primary_never_serves_reads(dev):
    """Failover: r1 had fallen behind r0 when the primary died and is promoted; r0 is left
    ahead of the new primary's fork point, frozen on the old timeline (it cannot follow
    r1 without pg_rewind).  Its replay position is past every position the new primary
    has written yet, so by positions alone it looks fully caught up and past every token:
    it must get no reads (its rows miss everything written since the failover, the
    session's own commit included)."""
    sh = dev.shard("s0")
    primary, r0, r1 = sh.primary, *sh.replicas
    with primary.connect() as c:
        c.execute("INSERT INTO fe_items VALUES (100, 'seen by all')")
    _caught_up(dev)
    r1.stop()
    with primary.connect() as c:  # WAL that r0 replays and r1 never receives
        for i in range(20):
            c.execute("INSERT INTO fe_items SELECT g, repeat('x', 150) FROM generate_series(%s::bigint, %s::bigint) g",
                      (1000 + i * 500, 1000 + i * 500 + 499))
    r0.wait_caught_up()
    primary.stop()
    r1.start()
    with r0.connect() as c:
        r0_at = c.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()[0]
    with r1.connect() as c:
        c.execute("SELECT pg_promote(true, 60)")
        ahead = c.execute("SELECT %s::pg_lsn > pg_current_wal_lsn()", (r0_at,)).fetchone()[0]
    assert ahead, "the test needs r0 ahead of the new primary"
    cfg = {"bucket_count": dev.config_dict()["bucket_count"],
           "shards": [{"name": "s0", "primary": r1.url, "replicas": [r0.url]}]}
    cluster = _cluster(cfg)
    try:
        cluster.start_monitor()
        # The monitor's verdict on r0 (polled, and seen past the new primary) before any read.
        wait_for(lambda: health_by_node(cluster)["s0/r0"]["lag_bytes"] is None
                 and health_by_node(cluster)["s0/r0"]["error"], 10,
                 "the monitor to find r0 not following the new primary")
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.add(Item(id=7, name="after failover"))
            s.commit()
            token = s.consistency_token()
            for _ in range(3):
                got = s.execute(select(Item.name).where(Item.id == 7)).scalar()
                assert got == "after failover", "read-your-writes read a replica that does not follow the primary"
                s.commit()
        with Session(consistency_token=token) as s:
            assert s.execute(select(Item.name).where(Item.id == 7)).scalar() == "after failover"
        with Session(consistency="eventual") as s:
            assert s.execute(select(Item.name).where(Item.id == 7)).scalar() == "after failover"
        h = health_by_node(cluster)["s0/r0"]
        assert h["lag_bytes"] is None and h["error"], h
    finally:
        cluster.dispose()
