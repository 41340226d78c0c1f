"""A cluster over the shared local servers with a test module's own tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text

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


@contextmanager
def statements_per_shard(cluster: shardkit.Cluster) -> Iterator[Counter[str]]:
    """Count the statements each shard's primary runs inside the block (a Counter by
    shard name, which the caller may clear)."""
    hits: Counter[str] = Counter()
    hooks = []
    for name in cluster.shard_names:
        def count(*_a: Any, name: str = name) -> None:
            hits[name] += 1
        eng = cluster.primary(name)
        event.listen(eng, "before_cursor_execute", count)
        hooks.append((eng, count))
    try:
        yield hits
    finally:
        for eng, fn in hooks:
            event.remove(eng, "before_cursor_execute", fn)


@contextmanager
def nodes_used(cluster: shardkit.Cluster, counts: Any = lambda statement: True) -> Iterator[list[str]]:
    """The nodes (``s1/primary``, ``s1/r0``), in order, that run the statements ``counts``
    accepts (given the SQL) inside the block, over every primary and replica."""
    served: list[str] = []
    hooks = []
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)

            def note(conn: Any, cursor: Any, statement: str, *a: Any, node: str = eng.info["node"]) -> None:
                if counts(statement):
                    served.append(node)
            event.listen(eng, "before_cursor_execute", note)
            hooks.append((eng, note))
    try:
        yield served
    finally:
        for eng, fn in hooks:
            event.remove(eng, "before_cursor_execute", fn)


def shards_holding(cluster: shardkit.Cluster, table: str, column: str, value: Any) -> list[str]:
    """The shards whose primary has a row of ``table`` with ``column`` = ``value``."""
    found = []
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            if c.execute(text(f"SELECT count(*) FROM {table} WHERE {column} = :v"), {"v": value}).scalar():
                found.append(s)
    return found
