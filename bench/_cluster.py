"""What the routing and flush benchmarks share: the shards to run on, and raw psycopg
connections to their primaries."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

import shardkit
from shardkit.devcluster import DevCluster


@contextmanager
def bench_shards(config_path: str | None, shards: int = 2) -> Iterator[dict[str, Any]]:
    """``bucket_count`` and ``shards`` (primaries only) of an existing cluster's
    shardkit.toml, or of a local cluster of ``shards`` primaries started for the
    benchmark and stopped after it; the caller adds its groups."""
    if config_path:
        cfg = shardkit.load_config(config_path)
        yield {"bucket_count": cfg.bucket_count,
               "shards": [{"name": s.name, "primary": s.primary.render_as_string(hide_password=False)}
                          for s in cfg.shards]}
        return
    d = tempfile.mkdtemp(prefix="shardkit-bench-")
    os.chmod(d, 0o755)
    dev = DevCluster.up(os.path.join(d, "c"), shards=shards, replicas=0)
    try:
        yield {k: v for k, v in dev.config_dict().items() if k in ("bucket_count", "shards")}
    finally:
        dev.down()
        shutil.rmtree(d, ignore_errors=True)


def raw_primaries(cluster: shardkit.Cluster, autocommit: bool) -> dict[str, psycopg.Connection]:
    """A psycopg connection to each shard's primary, by shard name."""
    raw = {}
    for s in cluster.shard_names:
        u = cluster.config.shard(s).primary
        raw[s] = psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                                 password=u.password, autocommit=autocommit)
    return raw
