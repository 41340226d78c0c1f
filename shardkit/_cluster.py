"""The :class:`Cluster`: configuration, router and one engine (pool) per node."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import URL, Engine

from ._config import ClusterConfig, load_config, mask_url
from ._routing import PRIMARY, REPLICA, Route, Router
from ._scope import scope as _scope
from .errors import ConfigurationError, RoutingError

__all__ = ["Cluster"]

log = logging.getLogger("shardkit.cluster")

_POOL_KEYS = {
    "size": "pool_size",
    "max_overflow": "max_overflow",
    "timeout": "pool_timeout",
    "recycle": "pool_recycle",
    "pre_ping": "pool_pre_ping",
}


class Cluster:
    """A sharded PostgreSQL cluster: where every shard's nodes are and how keys map to shards.

    Create it once per process with :meth:`from_config` and share it; it is
    thread-safe.  Engines are created lazily, one per node.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.router = Router(config)
        self._engine_options = dict(engine_options or {})
        self._engines: dict[tuple[str, str, int], Engine] = {}
        self._lock = threading.Lock()
        if metadata is not None:
            self.validate_metadata(metadata)

    @classmethod
    def from_config(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Cluster:
        """Build a cluster from a ``shardkit.toml`` path or the same structure as a dict.

        :param metadata: your models' ``MetaData``; when given, every configured
            table and key column must exist in it (catches typos at start-up).
        :param engine_options: extra keyword arguments for every node's
            :func:`sqlalchemy.create_engine` (e.g. ``echo=True``).
        :param env: the environment used for ``${VAR}`` interpolation
            (default ``os.environ``).
        """
        return cls(load_config(source, env=env), metadata=metadata, engine_options=engine_options)

    # -- topology ------------------------------------------------------------------

    @property
    def shard_names(self) -> tuple[str, ...]:
        return self.config.shard_names

    def shard_for(self, table: Any, key: Any) -> str:
        """The shard that owns ``key`` in ``table`` (name, Table, mapped class or mapper)."""
        return self.router.shard_for(table, key)

    def bucket_for(self, table: Any, key: Any) -> int | None:
        """The hash bucket of ``key`` (``None`` if the table is not hash-sharded)."""
        return self.router.bucket_for(table, key)

    def explain(self, statement: Any, params: Any = None, *, all_shards: bool = False) -> Route:
        """The :class:`Route` a statement would take, without running it."""
        return self.router.route(statement, params, all_shards=all_shards)

    def validate_metadata(self, metadata: MetaData) -> None:
        """Check every configured table and shard-key column exists in ``metadata``."""
        by_name = {t.name: t for t in metadata.tables.values()}
        by_name.update(metadata.tables)
        for g in self.config.groups:
            for tname, cols in g.tables.items():
                field = f"groups.{g.name}.tables.{tname}"
                table = by_name.get(tname)
                if table is None:
                    raise ConfigurationError(
                        field, f"unknown table {tname!r}",
                        "known tables: " + ", ".join(sorted(metadata.tables)),
                    )
                for c in cols:
                    if c not in table.c:
                        raise ConfigurationError(
                            field, f"table {tname!r} has no column {c!r}",
                            "columns: " + ", ".join(table.c.keys()),
                        )
        for i, tname in enumerate(sorted(self.config.reference_tables)):
            if tname not in by_name:
                raise ConfigurationError(
                    "reference_tables", f"unknown table {tname!r}",
                    "known tables: " + ", ".join(sorted(metadata.tables)),
                )

    # -- engines -------------------------------------------------------------------

    def node_url(self, shard: str, role: str = PRIMARY, index: int = 0) -> URL:
        try:
            sc = self.config.shard(shard)
        except KeyError:
            raise RoutingError(
                f"unknown shard {shard!r}; shards: {', '.join(self.shard_names)}"
            ) from None
        if role == PRIMARY:
            return sc.primary
        if role == REPLICA:
            if not 0 <= index < len(sc.replicas):
                raise RoutingError(f"shard {shard!r} has no replica r{index}")
            return sc.replicas[index]
        raise ValueError(f"role must be 'primary' or 'replica', not {role!r}")

    def engine(self, shard: str, role: str = PRIMARY, index: int = 0) -> Engine:
        """The engine (connection pool) of one node, created on first use."""
        k = (shard, role, index)
        eng = self._engines.get(k)
        if eng is not None:
            return eng
        with self._lock:
            eng = self._engines.get(k)
            if eng is None:
                url = self.node_url(shard, role, index)
                opts: dict[str, Any] = {}
                for key, sa_key in _POOL_KEYS.items():
                    if key in self.config.pool:
                        opts[sa_key] = self.config.pool[key]
                opts.update(self._engine_options)
                eng = create_engine(url, **opts)
                eng.info = {"shard": shard, "role": role, "node": _node_name(shard, role, index)}  # type: ignore[attr-defined]
                log.debug("created engine for %s (%s)", _node_name(shard, role, index), mask_url(url))
                self._engines[k] = eng
        return eng

    def primary(self, shard: str) -> Engine:
        """The primary's engine of ``shard``."""
        return self.engine(shard, PRIMARY)

    def scope(self, **kw: Any) -> Any:
        """Same as :func:`shardkit.scope`."""
        return _scope(**kw)

    def dispose(self) -> None:
        """Close every pooled connection of every node."""
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for e in engines:
            e.dispose()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dispose()

    def __repr__(self) -> str:
        return (
            f"<Cluster {self.config.name!r}: {len(self.shard_names)} shards, "
            f"{self.config.bucket_count} buckets>"
        )


def _node_name(shard: str, role: str, index: int) -> str:
    return f"{shard}/primary" if role == PRIMARY else f"{shard}/r{index}"
