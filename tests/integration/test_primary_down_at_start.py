"""An SRE's day with the operations surface: `shardkit status`, `cluster.health()`,
metrics and replica reads in a process started while a shard's primary is down.

The cluster is this module's own (1 shard x 1 replica): the tests stop its primary and
delay its replica."""

from __future__ import annotations

import json
import time
import traceback

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
import shardkit.metrics
from shardkit import cli
from shardkit.devcluster import to_toml
from waiting import wait_for

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sre_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE sre_items (id bigint PRIMARY KEY, v varchar(40))")
    dev.shards[0].replicas[0].wait_caught_up()
    return dev


def config(dev, **extra):
    data = dev.config_dict()
    data.pop("catalog", None)
    data["groups"] = {"items": {"tables": {"sre_items": "id"}}}
    data.update(extra)
    return data


def run_cli(argv, capsys):
    tb = ""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    except Exception:  # noqa: BLE001
        rc, tb = None, traceback.format_exc()
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, tb


def test_a_replica_behind_a_primary_that_is_down_when_the_process_starts_is_not_zero_lag(dev, capsys, tmp_path):
    """The primary is down when `shardkit status` (or a web worker) starts; its replica had
    received writes it has not replayed (recovery_min_apply_delay: an hour behind).  Its lag
    was reported as 0 s / 0 B (nothing to compare its position with: taken as no gap), in
    status, health() and the metrics, and it got reads under max_lag_seconds = 1 (it is seconds behind by its last replayed transaction).  It is
    behind by at least what it received and has not replayed."""
    primary, r0 = dev.shards[0].primary, dev.shards[0].replicas[0]
    r0.set_apply_delay(3600)
    cluster = None
    try:
        with primary.connect() as c:
            c.execute("INSERT INTO sre_items VALUES (1, 'written before the outage')")
        deadline = time.monotonic() + 10
        while True:   # the replica received it (not replayed: the delay)
            with r0.connect() as c:
                got = c.execute("SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()").fetchone()[0]
            if got or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got, "the replica did not receive the write"
        time.sleep(1.0)   # a second old: its time lag is above 0
        primary.stop()
        cfg = tmp_path / "sre.toml"
        cfg.write_text(to_toml(config(dev, replicas={"max_lag_seconds": 1, "consistency": "eventual"})))

        rc, out, err, tb = run_cli(["status", "--config", cfg, "--json"], capsys)
        assert not tb, tb
        assert rc == 1   # a primary down: not ready
        nodes = {n["node"]: n for s in json.loads(out)["shards"] for n in s["nodes"]}
        replica = nodes["s0/r0"]
        assert replica["up"] is True
        assert replica["lag_bytes"] is None or replica["lag_bytes"] > 0, replica
        assert replica["lag_seconds"] is None or replica["lag_seconds"] >= 1.0, replica

        cluster = shardkit.Cluster.from_config(config(dev, replicas={"max_lag_seconds": 1,
                                                                     "consistency": "eventual"}))
        registry = CollectorRegistry()
        shardkit.metrics.instrument(cluster, registry)
        health = {n["node"]: n for n in cluster.health().nodes}
        assert health["s0/r0"]["lag_bytes"] is None or health["s0/r0"]["lag_bytes"] > 0
        assert health["s0/r0"]["lag_seconds"] is None or health["s0/r0"]["lag_seconds"] >= 1.0
        lag = registry.get_sample_value("shardkit_replica_lag_bytes",
                                        {"shard": "s0", "node": "s0/r0", "role": "replica"})
        assert lag is None or lag > 0, lag
        # No stale read from it: the replica is over the limits (the primary is down, so
        # the read fails rather than answering from an hour ago).
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            with pytest.raises(shardkit.ShardUnavailable):
                s.execute(select(Item).where(Item.id == 1)).all()
    finally:
        if cluster is not None:
            cluster.dispose()
        if not primary.is_running():
            primary.start()
        r0.set_apply_delay(0)
        r0.wait_caught_up()


def test_a_caught_up_replica_of_a_primary_down_at_start_still_serves_reads(dev):
    """The other side: a replica that has replayed all it received from a primary that is
    down when the process starts has no known gap, and keeps serving reads."""
    primary, r0 = dev.shards[0].primary, dev.shards[0].replicas[0]
    with primary.connect() as c:
        c.execute("INSERT INTO sre_items VALUES (2, 'caught up') ON CONFLICT DO NOTHING")
    r0.wait_caught_up()
    primary.stop()

    # The primary's shutdown checkpoint (a 120-byte record) reaches the replica as it
    # stops: replayed a moment later, which a loaded machine can make the first poll see.
    def replayed_all_received() -> bool:
        with r0.connect() as c:
            return c.execute("SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()").fetchone()[0]

    wait_for(replayed_all_received, 30, "r0 to replay the primary's shutdown checkpoint")
    cluster = shardkit.Cluster.from_config(config(dev, replicas={"consistency": "eventual"}))
    try:
        health = {n["node"]: n for n in cluster.health().nodes}
        assert health["s0/r0"]["up"] and health["s0/r0"]["lag_bytes"] == 0, health["s0/r0"]
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            assert s.execute(select(Item.v).where(Item.id == 2)).scalar_one() == "caught up"
    finally:
        cluster.dispose()
        primary.start()
