"""ShardedSession.connection() without a shard: the error names the ways to choose one.
(No server: the session refuses before connecting anywhere.)"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import sessionmaker

import shardkit

CONFIG = {
    "bucket_count": 16,
    "shards": [
        {"name": "s0", "primary": "postgresql+psycopg://u@127.0.0.1:1/db"},
        {"name": "s1", "primary": "postgresql+psycopg://u@127.0.0.1:2/db"},
    ],
}


def test_connection_without_a_shard_says_how_to_name_one():
    cluster = shardkit.Cluster.from_config(CONFIG, follow_map=False)
    try:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            with pytest.raises(shardkit.RoutingError) as info:
                s.connection()
            message = str(info.value)
            assert "for None" not in message
            assert "session.connection() needs a shard" in message
            assert "connection_for_shard" in message and "scope(shard=" in message
    finally:
        cluster.dispose()
