"""Test helpers for applications built on shardkit.

Installing shardkit registers a pytest plugin (:mod:`shardkit.testing.plugin`)
with these fixtures:

``shardkit_cluster_factory`` (session)
    ``factory(shards=2, replicas=1, **kw) -> DevCluster``: a fresh local cluster
    of real PostgreSQL servers (keywords go to :meth:`DevCluster.up`), stopped
    and removed at the end of the test session.
``shardkit_module_cluster_factory`` (module)
    the same factory, whose clusters are stopped and removed when the test
    module that used it ends.
``shardkit_dev_cluster`` (session)
    one shared 2-shard x 1-replica cluster, for tests that do not damage it.

The servers come from the local PostgreSQL installation (see
:mod:`shardkit.devcluster` for where it is looked for).
"""

from ..devcluster import DevCluster, DevNode, DevShard

__all__ = ["DevCluster", "DevNode", "DevShard"]
