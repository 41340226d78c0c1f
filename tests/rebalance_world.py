"""A local cluster with a catalog, as the rebalancing tests use it: a Cluster of its config,
SQL on a shard's primary or on the catalog, and keys of a given bucket."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import shardkit
from shardkit import rebalance
from shardkit.devcluster import to_toml


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

    def init_with_accounts(self, buckets: int, rows_per_bucket: int) -> None:
        """`rebalance init`, then ``rows_per_bucket`` rows of table accounts (id, balance) in
        each bucket, on the shard the live map gives it."""
        cluster = self.cluster()
        try:
            rebalance.init(cluster)
            live = cluster.config.bucket_map
            for b in range(buckets):
                k = 0
                for _ in range(rows_per_bucket):
                    k = key_in_bucket(b, buckets, k + 1)
                    self.sql(live[b], "INSERT INTO accounts VALUES (%s, 0)", (k,))
        finally:
            cluster.dispose()

    def finish_running_moves(self) -> None:
        """Abort every move left running (one past its switch: run to its end)."""
        cluster = self.cluster()
        try:
            for (move_id,) in self.catalog_sql("SELECT id FROM shardkit_catalog.moves WHERE state = 'running'"):
                try:
                    rebalance.abort(cluster, move_id)
                except rebalance.RebalanceError as e:
                    if "has switched" not in str(e):
                        raise
                    rebalance.Mover(cluster, grace=0, progress=lambda line: None).run(move_id)
        finally:
            cluster.dispose()

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


def databases_with_catalog(dev: Any, db: str, schema: str, groups: str | dict[str, Any], path: Path, *,
                           plain: Path | None = None) -> Path:
    """A database ``db`` made on every shard's primary with ``schema``, a catalog database
    ``<db>_catalog``, and at ``path`` the config of the three with ``groups``: the config's
    ``groups`` table, or TOML appended to it (which may hold dates).  ``plain``: where to
    write the same config without the catalog too."""
    for shard in dev.shards:
        with shard.primary.connect(dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
        with shard.primary.connect(dbname=db, autocommit=True) as c:
            c.execute(schema)
    cfg = dev.config_dict()
    for s in cfg["shards"]:
        s["primary"] = s["primary"].rsplit("/", 1)[0] + "/" + db
    for where, catalog in ((plain, None), (path, dev.create_catalog(f"{db}_catalog"))):
        if where is None:
            continue
        both = {**cfg, "catalog": {"url": catalog}} if catalog else cfg
        if isinstance(groups, str):
            where.write_text(to_toml(both) + "\n" + groups, encoding="utf-8")
        else:
            where.write_text(to_toml({**both, "groups": groups}), encoding="utf-8")
    return path


class CatalogWorld:
    """Databases ``db`` of dev cluster ``dev`` and their config ``cfg`` (tables of ``metadata``):
    the clusters :meth:`cluster` makes are disposed by :meth:`close`."""

    def __init__(self, dev: Any, db: str, cfg: Path, metadata: Any = None) -> None:
        self.dev, self.db, self.cfg, self.metadata = dev, db, cfg, metadata
        self.clusters: list[shardkit.Cluster] = []

    def cluster(self, cfg: Path | None = None, **kw: Any) -> shardkit.Cluster:
        c = shardkit.Cluster.from_config(cfg or self.cfg, metadata=self.metadata, **kw)
        self.clusters.append(c)
        return c

    def rows(self, table: str) -> dict[str, list[tuple]]:
        """Every row of ``table`` on each shard's primary, sorted."""
        out = {}
        for shard in self.dev.shards:
            with shard.primary.connect(dbname=self.db, autocommit=True) as c:
                out[shard.name] = sorted(c.execute(f"SELECT * FROM {table}").fetchall())
        return out

    def close(self) -> None:
        for c in self.clusters:
            c.dispose()
