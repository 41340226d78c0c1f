"""The guard installed again only where it is not current meets a partition whose clone of
the guard was disabled, and the mover's reset session settings meet a DBA's lock_timeout.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own (test_move_fidelity's worlds).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from test_move_fidelity import World, hash_group, make_world

from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain

pytestmark = pytest.mark.integration

PARTITIONED = ("CREATE TABLE ev (id bigint, tenant bigint NOT NULL, y int NOT NULL, PRIMARY KEY (id, y)) "
               "PARTITION BY LIST (y); "
               "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES IN (1); "
               "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES IN (2)")


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def world(dev, tmp_path):
    made: list[World] = []

    def make(tables, schema) -> World:
        w = make_world(dev, tmp_path, schema, hash_group(tables))
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def test_rebalance_init_enables_again_a_partitions_disabled_guard(world):
    """A DBA disabled the guard on one partition (ALTER TABLE ev_2 DISABLE TRIGGER ...,
    say for a bulk load) and forgot it: writes to ev_2 on a shard that does not own their
    key are accepted, and a move does not capture the writes of its buckets there.  `shardkit
    rebalance init` (and op.install_shardkit_guard()) make the guard as it should be; the
    parent's guard being current must not hide the partition's."""
    w = world({"ev": "tenant"}, PARTITIONED)
    w.sql("s0", "ALTER TABLE ev_2 DISABLE TRIGGER shardkit_guard")
    rebalance.init(w.cluster)
    tenant = next(i for i in range(100) if w.owner("ev", i) == "s1")
    with pytest.raises(psycopg.DatabaseError, match="not owned by this shard"):
        # s0 does not own the tenant: the guard refuses the row.
        w.sql("s0", "INSERT INTO ev VALUES (1, %s, 2)", (tenant,))


def test_a_database_default_lock_timeout_does_not_fail_the_movers_copy(world):
    """The DBA gives the application's database a lock_timeout default (ALTER DATABASE ...
    SET lock_timeout, common advice), which the mover's sessions also get, as they got the
    statement and idle timeouts the mover now resets.  A short lock on the target's table
    (a migration's, a VACUUM FULL's, a LOCK TABLE) while the batch is copied must make the
    copy wait, not fail the move."""
    w = world({"accounts": "tenant"}, "CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL)")
    for i in range(40):
        w.sql(w.owner("accounts", i), "INSERT INTO accounts VALUES (%s, %s)", (i, i))
    w.sql("s1", f"ALTER DATABASE {w.db} SET lock_timeout = '100ms'")
    held = threading.Event()

    def hold() -> None:
        with w.conn("s1") as c:
            c.execute("BEGIN")
            c.execute("LOCK TABLE accounts IN SHARE MODE")
            held.set()
            time.sleep(1.0)
            c.execute("COMMIT")

    threads: list[threading.Thread] = []

    def progress(line: str) -> None:
        if "capturing changes" in line and not threads:
            threads.append(threading.Thread(target=hold, daemon=True))
            threads[0].start()
            assert held.wait(10)

    w.cluster.refresh_map()
    try:
        rebalance.Mover(w.cluster, grace=0, progress=progress).apply(plan_drain(w.cluster.config.bucket_map, "s0"))
    finally:
        for t in threads:
            t.join(10)
    assert threads
    assert w.sql("s1", "SELECT count(*) FROM accounts")[0][0] == 40
