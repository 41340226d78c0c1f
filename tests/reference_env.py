"""A cluster with reference tables for tests of their writes: the copies of a row as
each shard's primary holds them, compared across shards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import shardkit


class ReferenceEnv:
    """``dev``'s nodes as ``cluster``, with a session maker reading primaries only
    (``consistency="strong"``: what a test wrote is what it reads)."""

    def __init__(self, dev: Any, cluster: shardkit.Cluster) -> None:
        self.dev = dev
        self.cluster = cluster
        self.names = list(cluster.shard_names)
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

    def keys_on_shards(self, model: Any, shards: int = 2) -> list[int]:
        """One key of ``model`` owned by each of the first ``shards`` shards."""
        keys: list[int] = []
        for shard in self.names[:shards]:
            keys.append(next(k for k in range(1, 1000)
                             if self.cluster.shard_for(model, k) == shard and k not in keys))
        return keys

    def copies(self, sql: str) -> dict[str, list]:
        """``sql``'s rows on each shard's primary."""
        out = {}
        for s in self.names:
            with self.cluster.primary(s).connect() as c:
                out[s] = [tuple(r) for r in c.execute(text(sql))]
        return out

    def same(self, sql: str, rows: list | None = None) -> list:
        """``sql``'s rows, the same on every shard (and equal to ``rows`` if given)."""
        got = self.copies(sql)
        first = got[self.names[0]]
        assert got == {n: first for n in self.names}, got
        if rows is not None:
            assert first == rows
        return first
