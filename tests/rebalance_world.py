"""A local cluster with a catalog, as the rebalancing tests use it: a Cluster of its config,
SQL on a shard's primary or on the catalog, and keys of a given bucket."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import shardkit


@dataclass
class World:
    dev: Any
    cfg_path: Path
    catalog_url: str

    def cluster(self, path: Path | None = None) -> shardkit.Cluster:
        return shardkit.Cluster.from_config(path or self.cfg_path, follow_map=False)

    def sql(self, shard: str, query: str, params: Any = None) -> Any:
        node = next(s for s in self.dev.shards if s.name == shard).primary
        with psycopg.connect(node.dsn, autocommit=True) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def catalog_sql(self, query: str, params: Any = None) -> Any:
        with psycopg.connect(self.catalog_url.replace("postgresql+psycopg", "postgresql"),
                             autocommit=True) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None


def key_in_bucket(bucket: int, buckets: int, start: int = 1) -> int:
    """The first integer key from ``start`` on that hashes to ``bucket`` of ``buckets``."""
    k = start
    while shardkit.bucket_for(k, buckets) != bucket:
        k += 1
    return k
