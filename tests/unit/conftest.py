"""Fixtures for server-free tests."""

import pytest

import shardkit
from models import groups_config


@pytest.fixture()
def offline_cluster():
    """A 3-shard, 16-bucket cluster of the test models whose servers are never contacted."""
    c = shardkit.Cluster.from_config({
        "bucket_count": 16,
        "shards": [{"name": f"s{i}", "primary": f"postgresql+psycopg://app@db{i}.example/app"}
                   for i in range(3)],
        **groups_config(["s0", "s1", "s2"]),
    })
    yield c
    c.dispose()
