"""A module's own cluster with streaming replicas, for ORM tests that check which node
served each statement: keys per shard, replicas made to lag on purpose."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import sessionmaker

import shardkit


@dataclass
class ReplicaEnv:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker
    served: list[tuple[str, str]]          # (node, statement), every statement of every node
    prefix: str                             # the module's table names start with it
    _keys: dict[str, Any] = field(default_factory=dict)

    def key(self, shard: str) -> int:
        """A key of the module's first group that ``shard`` owns, unused so far."""
        return next(self._keys[shard])

    def caught_up(self, shards: tuple[str, ...] = ("s0", "s1")) -> None:
        replayed(self.dev, shards)

    def nodes(self, fn: Any) -> tuple[Any, list[str]]:
        """``fn()``, and the nodes that served its statements on the module's tables."""
        n0 = len(self.served)
        out = fn()
        return out, self.nodes_since(n0)

    def nodes_since(self, n0: int, served: list[tuple[str, str]] | None = None) -> list[str]:
        """The nodes that served the statements on the module's tables recorded in
        ``served`` (default: the module's cluster's, see :func:`record_statements`) from
        position ``n0`` on."""
        return [node for node, st in (self.served if served is None else served)[n0:] if self.prefix in st]

    def primary_value(self, shard: str, sql: str) -> Any:
        with self.cluster.primary(shard).connect() as c:
            return c.execute(text(sql)).scalar()


def replayed(dev: Any, shards: Any = None) -> None:
    """Wait until every running replica of ``shards`` (default: all of ``dev``'s) has
    replayed what its primary had committed: for a read in a session that holds no token
    of those writes (a new session, the writes another session's, a primary connection's
    or another process's), which may otherwise read a replica that has not replayed them."""
    chosen = [sh for sh in dev.shards if shards is None or sh.name in shards]
    for sh in chosen:
        with sh.primary.connect() as c:
            c.execute("SELECT txid_current()")
    for sh in chosen:
        for r in sh.replicas:
            if r.is_running():  # (one a test stopped has nothing to catch up)
                r.wait_caught_up()


def replica_cluster(dev: Any, config: dict[str, Any], metadata: Any = None,
                    **replicas: Any) -> shardkit.Cluster:
    """A cluster of ``dev``'s nodes with ``config`` (groups, reference tables), the monitor
    polling every 0.1 s, a lag limit of 300 s (so a delayed replica stays eligible, and a
    read that should not use it shows stale rows) and a ban of 1 s; ``replicas``: other
    [replicas] settings."""
    cfg = {**dev.config_dict(), **config,
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 1.0, **replicas}}
    return shardkit.Cluster.from_config(cfg, metadata=metadata)


def record_statements(cluster: shardkit.Cluster, served: list[tuple[str, str]]) -> None:
    """Append (node, statement) to ``served`` for every statement any node of ``cluster`` runs."""
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k: served.append((node, st)))


def replica_env(factory: Any, metadata: Any, config: dict[str, Any], key_table: str, prefix: str,
                replicas: int = 1, env_class: type[ReplicaEnv] = ReplicaEnv) -> Iterator[ReplicaEnv]:
    """For a module-scoped fixture (``yield from``): 2 shards with ``replicas`` each, the
    ``metadata`` tables on every primary, a :func:`replica_cluster` of ``config`` over them."""
    dev = factory(shards=2, replicas=replicas)
    cluster = replica_cluster(dev, config, metadata)
    for s in cluster.shard_names:
        metadata.create_all(cluster.primary(s))
    served: list[tuple[str, str]] = []
    record_statements(cluster, served)
    cluster.start_monitor()
    by_shard: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
    for k in range(1, 20_000):
        by_shard[cluster.shard_for(key_table, k)].append(k)
    env = env_class(dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served,
                    prefix, {s: iter(v) for s, v in by_shard.items()})
    env.caught_up()
    yield env
    cluster.dispose()


@contextlib.contextmanager
def lagging(env: ReplicaEnv, shards: tuple[str, ...] = ("s0", "s1"), seconds: float = 30.0,
            settle: float = 0.3) -> Iterator[list[Any]]:
    """The replicas of ``shards`` replay ``seconds`` behind inside the block."""
    nodes = [r for s in shards for r in env.dev.shard(s).replicas]
    try:
        for n in nodes:
            n.set_apply_delay(seconds)
        time.sleep(settle)
        yield nodes
    finally:
        for n in nodes:
            n.set_apply_delay(0)
        env.caught_up(shards)


def on_replica(nodes: list[str], shard: str | None = None) -> bool:
    return bool(nodes) and all("/r" in n and (shard is None or n.startswith(shard + "/")) for n in nodes)


def on_primary(nodes: list[str], shard: str | None = None) -> bool:
    return bool(nodes) and all(n.endswith("/primary") and (shard is None or n.startswith(shard + "/"))
                               for n in nodes)
