"""The live shard map and its enforcement (catalog, guard, init) under races.

Against real servers: a writer in REPEATABLE READ or SERIALIZABLE whose snapshot
predates a switch, which read the shard's ownership as it was before; and
`rebalance init` run while a move starts and switches, which reset each shard's
ownership from the map it had read before the switch.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._config import conninfo
from shardkit._rebalance_plan import plan_from_maps
from shardkit.verify import verify
from movers import guarded_cluster
from test_rebalance_crashes import BUCKETS, Account, Base  # (and its Note: a table the groups leave alone)

pytestmark = pytest.mark.integration

GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {"accounts": "id"}}}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    """2 shards (no replicas), 64 buckets, a catalog on s0's server, the guard installed."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)
    cfg_path = tmp_path_factory.mktemp("catalog_switch_races") / "shardkit.toml"
    cluster = guarded_cluster(dev, Base.metadata, GROUPS, cfg_path, follow_map=False)
    yield dev, cluster, cfg_path
    cluster.dispose()


def _move(cluster, bucket: int, target: str, reason: str) -> None:
    cluster.refresh_map()
    live = cluster.config.bucket_map
    new_map = list(live)
    new_map[bucket] = target
    rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new_map), reason))
    cluster.refresh_map()


def _dsn(dev, shard: str) -> str:
    return next(s for s in dev.shards if s.name == shard).primary.dsn


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_snapshot_writer_cannot_write_a_bucket_switched_away_after_its_snapshot(world, isolation):
    """The guard reads ownership with the transaction's snapshot.  In READ COMMITTED that
    is the statement's; in REPEATABLE READ or SERIALIZABLE it is the transaction's first
    one, which may predate a switch: the shard, which gave the bucket away since, still
    looked like its owner and took the row, which then lived on a shard that does not own
    it (reads, routed to the owner, never saw it).  It is a serialization failure now."""
    dev, cluster, cfg_path = world
    engine_options = {"isolation_level": isolation}
    stale = shardkit.Cluster.from_config(cfg_path, follow_map=False, engine_options=engine_options)
    live = cluster.config.bucket_map
    source, target = "s0", "s1"
    first = 10**6 if isolation == "SERIALIZABLE" else 2 * 10**6
    keys = [k for k in range(first, first + 5000) if live[shardkit.bucket_for(k, BUCKETS)] == source]
    key = keys[0]
    bucket = shardkit.bucket_for(key, BUCKETS)
    other = next(k for k in keys if shardkit.bucket_for(k, BUCKETS) != bucket)
    try:
        Stale = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
        with Stale() as s:
            s.add(Account(id=other, balance=0))
            s.commit()
            # The transaction's snapshot on s0 is taken here, before the move.
            assert s.execute(select(Account.balance).where(Account.id == other)).scalar_one() == 0
            _move(cluster, bucket, target, f"test: bucket {bucket} away under a {isolation} snapshot")
            assert stale.shard_for("accounts", key) == source  # the stale process's map
            s.add(Account(id=key, balance=1))
            with pytest.raises(OperationalError) as ei:
                s.commit()
            assert getattr(ei.value.orig, "sqlstate", None) == "40001", ei.value
        # Nothing landed on the shard that gave the bucket away.
        with psycopg.connect(_dsn(dev, source)) as c:
            assert c.execute("SELECT count(*) FROM accounts WHERE id = %s", (key,)).fetchone()[0] == 0
        # A new transaction of the stale process is refused as not owned and retried on the owner.
        shardkit.run_transaction(Stale, lambda s: s.add(Account(id=key, balance=2)))
        with psycopg.connect(_dsn(dev, target)) as c:
            assert c.execute("SELECT balance FROM accounts WHERE id = %s", (key,)).fetchone()[0] == 2
        # Writes of buckets the shard still owns are not disturbed by the check.
        with Stale() as s:
            s.execute(select(Account.id).where(Account.id == other)).all()
            s.get(Account, other).balance = 5
            s.commit()
    finally:
        stale.dispose()
        if cluster.config.bucket_map[bucket] != source:  # back to the initial map
            _move(cluster, bucket, source, "test: bucket back")


def _owned(dev, shard: str) -> set[int]:
    with psycopg.connect(_dsn(dev, shard)) as c:
        return {r[0] for r in c.execute("SELECT bucket FROM shardkit.owned_buckets")}


def test_init_while_a_move_starts_does_not_reset_ownership_from_an_older_map(world, monkeypatch):
    """`rebalance init` refuses to run while a move is running, then resets every shard's
    ownership from the map it read.  A move that started after that check and switched
    before init reached a shard had that shard's ownership reset from the map before the
    switch: the source owned the moved bucket again (it took writes routed by the old map
    there, where no reader looks) and the target refused every write of it, until the
    next init.  Moves now start only once init has installed the guards."""
    dev, cluster, cfg_path = world
    cluster.refresh_map()
    live = cluster.config.bucket_map
    bucket = next(b for b, s in enumerate(live) if s == "s0")
    new_map = list(live)
    new_map[bucket] = "s1"
    plan = plan_from_maps(live, tuple(new_map), "test: a move racing init")
    mover_cluster = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    failures: list[BaseException] = []

    def move() -> None:
        try:
            rebalance.Mover(mover_cluster, grace=0, progress=lambda line: None).apply(plan)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)

    mover = threading.Thread(target=move, name="test-mover")
    real_install = rebalance.install_guard

    def install_racing_a_move(conn, config, owned, slices=()):
        if not mover.is_alive() and mover.ident is None:
            # init has read the map: a move starts now, and runs until it is done or waits for init.
            mover.start()
            with psycopg.connect(conninfo(cluster.config.catalog_url), autocommit=True) as cat:
                deadline = time.monotonic() + 120
                while mover.is_alive() and time.monotonic() < deadline:
                    waiting = cat.execute(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
                        "'shardkit_catalog.moves'::regclass").fetchone()[0]
                    if waiting:
                        break
                    time.sleep(0.02)
        return real_install(conn, config, owned, slices)

    monkeypatch.setattr(rebalance, "install_guard", install_racing_a_move)
    try:
        rebalance.init(cluster)
        mover.join(120)
        assert not mover.is_alive() and not failures, failures
    finally:
        mover_cluster.dispose()
    cluster.refresh_map()
    assert cluster.config.bucket_map[bucket] == "s1"
    assert bucket not in _owned(dev, "s0") and bucket in _owned(dev, "s1")
    assert verify(cluster).ownership == []
    monkeypatch.undo()
    _move(cluster, bucket, "s0", "test: bucket back after the init race")
