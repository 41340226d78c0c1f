"""A cluster over the shared local servers with a test module's own tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import shardkit


@contextmanager
def cluster_with_tables(dev: Any, config: dict[str, Any], metadata: Any) -> Iterator[shardkit.Cluster]:
    """A Cluster of ``dev``'s shards with ``config`` (groups, reference tables) whose
    ``metadata`` tables are created empty on every shard, and dropped afterwards."""
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **config}, metadata=metadata)
    try:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
            metadata.create_all(cluster.primary(s))
        yield cluster
    finally:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
        cluster.dispose()
