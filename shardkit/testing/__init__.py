"""Test helpers for applications built on shardkit.

Installing shardkit registers a pytest plugin (:mod:`shardkit.testing.plugin`)
with two fixtures:

``shardkit_cluster_factory``
    ``factory(shards=2, replicas=1, bucket_count=1024) -> DevCluster``: a fresh
    local cluster of real PostgreSQL servers, stopped at the end of the test session.
``shardkit_dev_cluster``
    one shared 2-shard x 1-replica cluster for tests that do not damage it.
"""

from ..devcluster import DevCluster, DevNode, DevShard

__all__ = ["DevCluster", "DevNode", "DevShard"]
