"""Replica routing as an application sees it on real streaming replicas: the first reads of
a process, made by several threads at once (a web server's first requests), before the
health monitor's first poll has answered."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, MetaData, Table, func, select
from sqlalchemy.orm import sessionmaker

import shardkit

pytestmark = pytest.mark.integration

TABLE = "rrp_items"
metadata = MetaData()
items = Table(TABLE, metadata, Column("id", BigInteger, primary_key=True, autoincrement=False))


@pytest.fixture(scope="module")
def dev(sharded_dev):
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), "groups": {"g": {"tables": {TABLE: "id"}}}},
                                           metadata=metadata)
    try:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
            metadata.create_all(cluster.primary(s))
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.execute(items.insert(), [{"id": i} for i in range(1, 21)])
            s.commit()
    finally:
        cluster.dispose()
    for shard in sharded_dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()
    yield sharded_dev
    cluster = shardkit.Cluster.from_config(sharded_dev.config_dict())
    try:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
    finally:
        cluster.dispose()


def first_reads_at_once(dev: Any, threads: int, **replicas: Any) -> list[Any]:
    """Each of ``threads`` threads makes its first read of key 1 at the same moment, in a
    new cluster (its monitor not started): what each read ran on (``pg_is_in_recovery()``)
    or the error it raised."""
    cfg = {**dev.config_dict(), "groups": {"g": {"tables": {TABLE: "id"}}},
           "replicas": {"consistency": "eventual", **replicas}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=metadata)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    barrier = threading.Barrier(threads)
    got: list[Any] = []

    def read() -> None:
        barrier.wait()
        try:
            with Session() as s:
                got.append(s.execute(select(items.c.id, func.pg_is_in_recovery())
                                     .where(items.c.id == 1)).one()[1])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            got.append(e)

    try:
        ts = [threading.Thread(target=read) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    finally:
        cluster.dispose()
    assert len(got) == threads
    return got


def test_concurrent_first_reads_under_raise_wait_for_the_first_poll(dev):
    """Only the thread whose read started the monitor waited for its first poll: the
    others, an instant later, found every replica not measured yet and, under
    when_no_replica = "raise", failed with ShardUnavailable ('s0/r0 is down (None)')."""
    for _ in range(3):
        got = first_reads_at_once(dev, 6, when_no_replica="raise")
        assert got == [True] * 6, got


def test_concurrent_first_reads_use_the_replicas_not_the_primary(dev):
    """The same race under the default when_no_replica = "primary": the other threads'
    first reads went to the primary, which replicas are there to spare."""
    for _ in range(3):
        got = first_reads_at_once(dev, 6)
        assert got == [True] * 6, got
