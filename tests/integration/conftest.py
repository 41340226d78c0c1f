"""Fixtures for integration tests: a real 3-shard cluster with the test models' schema."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import sessionmaker

import shardkit
from models import Base, groups_config


@dataclass
class Sharded:
    dev: Any            # DevCluster
    cluster: shardkit.Cluster
    Session: sessionmaker
    hits: Counter       # shard -> statements executed there (on primaries and replicas)

    def reset_hits(self) -> None:
        self.hits.clear()

    def count(self, shard: str, sql: str) -> int:
        with self.cluster.primary(shard).connect() as c:
            return c.execute(text(sql)).scalar_one()


@pytest.fixture(scope="session")
def sharded_dev(shardkit_cluster_factory):
    return shardkit_cluster_factory(shards=3, replicas=1)


@pytest.fixture(scope="session")
def sharded_session_env(sharded_dev):
    names = [s.name for s in sharded_dev.shards]
    cfg = {**sharded_dev.config_dict(), **groups_config(names)}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    hits: Counter = Counter()
    for s in names:
        Base.metadata.create_all(cluster.primary(s))

        def count(conn, cursor, statement, parameters, context, executemany, shard=s):
            hits[shard] += 1

        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "before_cursor_execute", count)
    # These tests are about which shard a statement reaches; reading from the
    # primaries ("strong") keeps them independent of replication timing, which
    # tests/integration/test_replicas.py covers.
    env = Sharded(sharded_dev, cluster,
                  sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong"),
                  hits)
    yield env
    cluster.dispose()


@pytest.fixture
def sharded(sharded_session_env):
    env = sharded_session_env
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).begin() as c:
            # A connection a test forgot to close would block TRUNCATE forever.
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {tables} CASCADE"))
    env.reset_hits()
    return env
