"""The :class:`Cluster`: configuration, router and one engine (pool) per node."""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from dataclasses import dataclass

from psycopg.pq import TransactionStatus
from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy import exc as sa_exc
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from ._config import PRIMARY, REPLICA, ClusterConfig, ReplicaSettings, connect_timeout_args, load_config, mask_url, split_secret_query, with_bucket_map
from ._guard import NOT_OWNED_SQLSTATE, guard_covers
from ._guard import guard_installed as _guard_installed
from ._replicas import HealthMonitor, ReplicaSelector
from ._pgtypes import unwrap
from ._scope import scope as _scope
from ._scope import switch_problem
from ._slices import SLICE_BASE, initial_slices
from ._strategies import HashStrategy, ListStrategy, RangeStrategy
from .errors import ConfigurationError, NotOwned, RoutingError, ShardUnavailable, first_line, unreachable_reason

if TYPE_CHECKING:
    from ._routing import Route, Router

__all__ = ["Cluster", "ClusterHealth"]

log = logging.getLogger("shardkit.cluster")

_POOL_KEYS = {
    "size": "pool_size",
    "max_overflow": "max_overflow",
    "timeout": "pool_timeout",
    "recycle": "pool_recycle",
    "pre_ping": "pool_pre_ping",
}


class _NodePool(QueuePool):
    """The pool of one node (its name is the pool's logging name): a checkout that times
    out says which node's pool is exhausted, and is counted (``timeouts``)."""

    # SQLAlchemy names a pool's logger after its class: without this, QueuePool's own
    # records (a checkout and a checkin per statement at DEBUG, invalidations and disposals
    # at INFO) would come out under "shardkit._cluster._NodePool.<node>", so that turning
    # shardkit's logging up turns SQLAlchemy's pool logging on.  They stay where SQLAlchemy
    # documents them ("sqlalchemy.pool", here "sqlalchemy.pool.impl.QueuePool.<node>").
    _sqla_logger_namespace = "sqlalchemy.pool.impl.QueuePool"

    #: Checkouts that waited longer than the pool's timeout, since the node's engine was
    #: made (a new pool, after dispose() or a server restart, carries the count on: a
    #: Prometheus counter drops only when the process restarts).
    timeouts = 0
    _timeouts_lock = threading.Lock()
    #: The node's max_connections when it lowered the pool's size or overflow (the limit a
    #: checkout that timed out met), else None.
    cap: int | None = None

    def recreate(self) -> _NodePool:
        pool = super().recreate()
        pool.timeouts, pool.cap = self.timeouts, self.cap
        return pool  # type: ignore[return-value]

    def dispose(self) -> None:
        # (Engine.dispose(), close=True: the engine takes a new pool.)  A connection in use
        # now comes back to this pool, which nothing takes from again: QueuePool would keep
        # it open there, idle, until the pool is garbage collected (a full collection, many
        # seconds later in a busy process), outside the node's max_connections (the new
        # pool counts only its own) and pool_stats().  Closed as it comes back instead.
        # (An instance attribute: the pools in use pay nothing per checkin.)
        self._do_return_conn = self._close_returned  # type: ignore[method-assign]
        super().dispose()

    def _close_returned(self, record: Any) -> None:
        try:
            record.close()
        finally:
            self._dec_overflow()

    def _do_get(self) -> Any:
        try:
            return _queue_pool_get(self)  # (super()'s, without finding it)
        except sa_exc.TimeoutError as e:
            if getattr(e, "shardkit_node", None) is not None:
                raise
            with self._timeouts_lock:
                self.timeouts += 1
            raise_ = (f"raise that node's max_connections ({self.cap}), which caps its size and max_overflow"
                      if self.cap is not None else
                      "raise that node's [pool] size or max_overflow (max_connections caps both)")
            err = sa_exc.TimeoutError(
                f"node {self._orig_logging_name}: {e.args[0]}; {raise_}, or hold connections for less time "
                "(Cluster.pool_stats() shows their use)")
            err.shardkit_node = self._orig_logging_name  # type: ignore[attr-defined]
            raise err from e


_queue_pool_get = QueuePool._do_get

# [pool] settings that only a QueuePool takes (max_connections: as its size and overflow).
_QUEUE_POOL_ONLY = ("size", "max_overflow", "timeout", "max_connections")


def _refuse_queue_pool_settings(config: ClusterConfig, poolclass: Any) -> None:
    """An engine_options ``poolclass`` that is not a QueuePool takes no size, overflow or
    timeout: a node's engine, made on first use, would fail then with SQLAlchemy's
    "Invalid argument(s) 'pool_size','max_overflow'", arguments a ``max_connections``
    alone turns into.  Said now, naming the setting."""
    if poolclass is None or (isinstance(poolclass, type) and issubclass(poolclass, QueuePool)):
        return
    name = getattr(poolclass, "__name__", repr(poolclass))
    places = [("pool", config.pool)]
    for i, sc in enumerate(config.shards):
        places += [(f"shards[{i}].pool", sc.pool), (f"shards[{i}].primary_pool", sc.primary_pool)]
        places += [(f"shards[{i}].replicas[{j}].pool", rp) for j, rp in enumerate(sc.replica_pools)]
    for where, settings in places:
        for key in _QUEUE_POOL_ONLY:
            if key in settings:
                raise ConfigurationError(
                    f"{where}.{key}", f"a QueuePool setting, but engine_options' poolclass is "
                    f"{name}, which takes none (max_connections cannot cap its connections)",
                    "leave size, max_overflow, timeout and max_connections unset with your own "
                    "poolclass, or drop the poolclass to have shardkit's QueuePool")


class _Router:
    """``Cluster.router``: the :class:`~shardkit._routing.Router` of the config in use, made
    on first use (importing the routing code, and the ORM it builds on, only then: a
    ``shardkit migrate`` command or a shard's Alembic never routes).  A non-data descriptor:
    once made, the router is the instance's own attribute, read as any other."""

    def __get__(self, cluster: Cluster | None, owner: type | None = None) -> Any:
        if cluster is None:
            return self
        from ._routing import Router

        with cluster._map_lock:   # not made from a config _install_map() is replacing
            router = cluster.__dict__.get("router")
            if router is None:
                router = cluster.__dict__["router"] = Router(cluster.config)
        return router


class Cluster:
    """A sharded PostgreSQL cluster: where every shard's nodes are and how keys map to shards.

    Create it once per process with :meth:`from_config` and share it; it is
    thread-safe.  Engines are created lazily, one per node.
    """

    #: Seconds a cross-shard read waits for each shard when its statement gives no
    #: ``shardkit_timeout`` (``None``: no limit).  Set it on the instance.
    scatter_timeout: float | None = None

    #: The :class:`~shardkit._routing.Router` of the map in use (made on first use).
    router: Router = _Router()  # type: ignore[assignment]

    def __init__(
        self,
        config: ClusterConfig,
        *,
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
        follow_map: bool = True,
    ) -> None:
        if problem := switch_problem("follow_map", follow_map):  # ("false" would follow)
            raise ValueError(problem)
        self.config = config
        # The config as loaded; with a catalog, self.config routes by the catalog's map.
        self.file_config = config
        weighted = [f"{s.name}/r{i}" for s in config.shards for i, w in enumerate(s.replica_weights)
                    if w != 1.0]
        if weighted and config.replicas.policy != "random":
            log.warning("replica weights (%s) are used by policy = \"random\" only; [replicas] policy "
                        "is %r, which ignores them", ", ".join(weighted), config.replicas.policy)
        # shard -> WAL position after the latest move to it: its replicas serve from there on.
        self.moved_lsn: dict[str, int] = {}
        # shard -> (a moved_lsn floor, the map version it was checked under, and None if the
        # primary had reached it, else the primary's position then, which stands in for a
        # floor past it): see ShardedSession._floor_beyond_primary.
        self._floor_verdicts: dict[str, tuple[int, int | None, int | None]] = {}
        self._state_seq = -1
        # Which catalog the state in use came from (CatalogState.identity), and the
        # ticket of the read that brought it: reads take increasing tickets as they begin.
        self._catalog_identity: str | None = None
        self._state_ticket = -1
        self._read_tickets = itertools.count()
        # How many times another catalog's state changed the map (see _set_state).
        self._catalog_replacements = 0
        self._map_lock = threading.RLock()
        self.catalog: Any = None
        self._follower: Any = None
        self._follow_map = False
        # Why the catalog's map could not be used when this cluster was made (None: it
        # was, or there is no catalog); `shardkit status` says it.
        self._catalog_error: str | None = None
        # Why the catalog's live map cannot route this process (it places keys on a shard
        # its config file does not define, or has another bucket count); None: it can.
        # Meanwhile its sessions refuse every statement (see refuse_misfit).
        self._map_misfit: ConfigurationError | None = None
        self._engine_options = dict(engine_options or {})
        _refuse_queue_pool_settings(config, self._engine_options.get("poolclass"))
        self._engines: dict[tuple[str, str, int], Engine] = {}
        self._streaming: dict[tuple[str, str, int], Engine] = {}
        # The engines dispose() let go of (their pools emptied), with the engine hooks that
        # had seen each: a node used again gets its engine back, so that a session whose
        # transaction holds a connection of it goes on with that connection (a new engine
        # would be a second connection, another transaction, on the same node).
        self._retired: dict[tuple[str, str, int], tuple[Engine, tuple[Any, ...]]] = {}
        self._lock = threading.Lock()
        self._monitor: HealthMonitor | None = None
        self._selector: ReplicaSelector | None = None
        self.has_replicas = any(s.replicas for s in config.shards)
        # Shards and their nodes come from the file; a catalog map only moves keys.
        self._replica_counts = {s.name: len(s.replicas) for s in config.shards}
        self._scatter_pool: ThreadPoolExecutor | None = None
        # function name -> whether the databases define it as an aggregate (or window)
        # function: the cross-shard merge refuses those it does not know.
        self.function_kinds: dict[str, bool] = {}
        # shard -> its database's default collation if it does not order text by code
        # point, else "" (the merge refuses text comparisons under such a collation).
        self.text_collations: dict[str, str] = {}
        # Called with each engine as it is created (metrics instrument them this way).
        self._engine_hooks: list[Any] = []
        # shard -> True once its ownership guard was seen, or when to look again.
        self._guard_seen: dict[str, float | bool] = {}
        _LIVE.add(self)  # see _after_fork_in_child
        if metadata is not None:
            self.validate_metadata(metadata)
        if config.catalog_url is not None:
            from .catalog import Catalog

            self.catalog = Catalog(config.catalog_url)
            if self._read_catalog_at_start:
                self._first_map()
        # A Cluster used again after dispose() follows the map again (see engine()).
        self._follow_map = follow_map and self.catalog is not None
        if self._follow_map:
            self._start_follower()

    @classmethod
    def from_config(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        metadata: MetaData | None = None,
        engine_options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        follow_map: bool = True,
    ) -> Cluster:
        """Build a cluster from a ``shardkit.toml`` path or the same structure as a dict.

        :param metadata: your models' ``MetaData``; when given, every configured
            table and key column must exist in it (catches typos at start-up).
        :param engine_options: extra keyword arguments for every node's
            :func:`sqlalchemy.create_engine` (e.g. ``echo=True``); they override the
            ``[pool]`` settings, within ``max_connections``; replicas keep autocommit
            whatever ``isolation_level`` they give.
        :param env: the environment used for ``${VAR}`` interpolation
            (default ``os.environ``).
        :param follow_map: with a ``[catalog]``, keep a thread that reloads
            the bucket map when the catalog announces a new version.
        """
        return cls(load_config(source, env=env), metadata=metadata, engine_options=engine_options,
                   follow_map=follow_map)

    # -- the live bucket map -------------------------------------------------------

    #: Whether __init__ reads the catalog's map (shardkit.migrate's cluster of a shard's
    #: Alembic reads it only for the migration that asks for it: see _first_map()).
    _read_catalog_at_start = True

    def _first_map(self) -> None:
        """Route by the catalog's live map, read now; a catalog that cannot be read, or whose
        map does not fit the config file, is logged and left to ``_catalog_error`` (routing
        by the file's map meanwhile)."""
        url = self.config.catalog_url
        try:
            self.refresh_map()
        except ConfigurationError as e:
            # The catalog answered: its map names what the file does not (a shard,
            # another bucket count).  Restarting with a fixed file is the cure;
            # meanwhile the guards make routing by the file's map safe.
            log.error("catalog %s: %s", mask_url(url), e)
            self._catalog_error = first_line(e)
        except (SQLAlchemyError, ShardUnavailable) as e:  # refused, or no answer in time
            # The shards' ownership guards make routing by the file's map
            # safe: a write to a bucket that has moved is refused, not lost.
            reason = first_line(e)
            if not isinstance(e, ShardUnavailable):  # its message names the catalog
                reason = f"the catalog ({mask_url(url)}) cannot be read: {reason}"
            log.warning("%s; routing by the config file's map until it answers", reason)
            self._catalog_error = reason

    def refresh_map(self, *, newer_than: int | None = None, timeout: float = 0.0) -> int | None:
        """Load the catalog's live map if it is newer than the one in use; return its version.

        With ``newer_than``, poll up to ``timeout`` seconds until the catalog has
        a version above it (a move is switching ownership right now), or until
        the map in use changed otherwise (a catalog that went back, see
        :meth:`_set_state`); each read of the catalog then waits what is left of
        ``timeout`` for its answer (at least ``MIN_ANSWER_TIMEOUT``, at most the
        catalog's ``answer_timeout``) before it raises ShardUnavailable.  Without
        a catalog, does nothing and returns None.

        Raises ConfigurationError, and keeps the map in use, when the catalog's
        map does not fit the config file (a shard the file does not name).
        """
        # (Checked with or without a catalog: a bad value must not pass in development and
        # fail, or poll for ever with a NaN, once a catalog is configured.)
        if newer_than is not None and (isinstance(newer_than, bool) or not isinstance(newer_than, int)):
            raise ValueError(f"refresh_map(newer_than=...) must be a map version (an int) or None, "
                             f"not {newer_than!r}")
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 <= timeout <= threading.TIMEOUT_MAX):
            raise ValueError(f"refresh_map(timeout=...) must be a number of seconds >= 0 (finite), "
                             f"not {timeout!r}")
        if self.catalog is None:
            return None
        from .catalog import MIN_ANSWER_TIMEOUT

        deadline = time.monotonic() + timeout
        replacements = self._catalog_replacements
        while True:
            wait = None if newer_than is None else max(deadline - time.monotonic(), MIN_ANSWER_TIMEOUT)
            ticket = next(self._read_tickets)
            state = self.catalog.current_state(timeout=wait)
            if state is not None:
                self._set_state(state, ticket)
            if newer_than is None or (self.map_version or 0) > newer_than or time.monotonic() >= deadline:
                return self.map_version
            if self._catalog_replacements != replacements:
                return self.map_version  # the catalog went back: its map is the one to use now
            time.sleep(0.05)

    def _set_state(self, state: Any, ticket: int | None = None) -> None:
        """Use ``state`` (a CatalogState) read by a read that took ``ticket`` as it began.

        A slower read of an older state is ignored: its journal position (``seq``)
        is behind the one in use, and its map version is not above it.  A state of
        another catalog (``identity`` changed: restored from a backup,
        re-initialised, failed over to a server that lost its latest writes) is the
        truth even if its version is lower: it is used, with a warning when its map
        went back, unless the read began before the one of the state in use (a read
        of the catalog as it was before).  Nothing of a state whose map does not fit
        the config file is used (ConfigurationError).
        """
        with self._map_lock:
            identity = getattr(state, "identity", None)
            replaced = None not in (identity, self._catalog_identity) and identity != self._catalog_identity
            if replaced:
                if ticket is not None and ticket < self._state_ticket:
                    return  # read before the state in use: the catalog as it was before
            elif state.seq < self._state_seq:
                return  # a slower read of an older state
            held = self.map_version
            try:
                config = self._map_config(state.version, state.bucket_map, state.slices, replaced=replaced)
            except ConfigurationError as e:
                # The map in use is out of date, and the catalog's cannot be followed: a
                # keyed read by it would find nothing where its row moved away, a read
                # across shards would miss the shards the file does not define.
                self._map_misfit = e
                raise
            self._map_misfit = None
            if replaced and config is not None and held is not None and state.version <= held:
                self._catalog_replacements += 1
                went = (f"went back from version {held} to version {state.version}" if state.version < held
                        else f"version {state.version} is not the map this process had as version {held}")
                log.warning(
                    "the catalog's map %s (the catalog was restored from a backup, re-initialised, or failed "
                    "over to a server that lost its latest writes): routing by the catalog's map, which is the "
                    "truth.  If buckets moved since, the shards' guards refuse the writes this map sends "
                    "them: run `shardkit verify` to compare the shards' ownership with the map", went)
            if identity is not None:
                self._catalog_identity = identity
            if ticket is not None:
                self._state_ticket = max(self._state_ticket, ticket)
            self._state_seq = state.seq
            # The replicas' floors first: with the old router they only ask more.
            self.moved_lsn = state.moved_lsn
            foreign_changed = dict(state.foreign_buckets) != dict(self.foreign_buckets)
            if foreign_changed:
                log.info("shards holding rows of buckets they do not own: %s",
                         {k: len(v) for k, v in state.foreign_buckets.items()} or "none")
            if config is not None:
                self._install_map(config, state.version, state.foreign_buckets)
            elif foreign_changed:
                # The same map, another step of a move: the router carries both.
                self.foreign_buckets = state.foreign_buckets

    @property
    def map_version(self) -> int | None:
        """The catalog's version of the map in use (None: the config file's map); the
        router in use carries it, so the two never disagree."""
        return self.router.map_version

    @property
    def foreign_buckets(self) -> Mapping[str, frozenset[int]]:
        """shard -> the units (buckets, slices) it holds rows of without owning them (a
        move in progress), as the router in use knows them: they change with it, in one
        assignment, so a statement routed by a map is filtered by that map's state."""
        return self.router.foreign_buckets

    @foreign_buckets.setter
    def foreign_buckets(self, foreign: Mapping[str, frozenset[int]]) -> None:
        from ._routing import Router

        with self._map_lock:
            self.router = Router(self.config, like=self.router, foreign_buckets=foreign,
                                 map_version=self.router.map_version)

    def _map_config(self, version: int, bucket_map: tuple[str, ...], slices: tuple[Any, ...],
                    *, replaced: bool = False) -> ClusterConfig | None:
        """The config routing by this map, or None to keep the one in use: the version is
        not above it (unless ``replaced``: another catalog's, then only the same map is
        kept).  ConfigurationError if the map does not fit the config file."""
        held = self.map_version
        if held is not None and version <= held and not replaced:
            return None
        if replaced and version == held and tuple(bucket_map) == self.config.bucket_map and \
                tuple(slices) == tuple(self.config.slices):
            return None
        try:
            return with_bucket_map(self.file_config, bucket_map, slices)
        except ConfigurationError as e:
            using = "the config file's map" if held is None else f"map version {held}"
            raise ConfigurationError(
                e.field, f"map version {version} does not fit the config file: {e.problem}",
                f"{e.hint or 'make the config file match the catalog'}, then restart this process; until "
                f"then its sessions refuse every statement, which {using} would route to the wrong shards") from None

    def _set_map(self, version: int, bucket_map: tuple[str, ...], slices: tuple[Any, ...] = ()) -> None:
        """Route by this map if its version is above the one in use."""
        with self._map_lock:
            config = self._map_config(version, bucket_map, slices)
            if config is not None:
                self._install_map(config, version)

    def _install_map(self, config: ClusterConfig, version: int,
                     foreign: Mapping[str, frozenset[int]] | None = None) -> None:
        from ._routing import Router

        with self._map_lock:
            # One assignment each: a thread routing now uses the old router or the new one
            # (with the moves' state of its map: the old one's when none is given).
            self.config = config
            previous = self.map_version
            self.router = Router(config, like=self.router,
                                 foreign_buckets=self.router.foreign_buckets if foreign is None else foreign,
                                 map_version=version)
        log.info("bucket map version %s (was %s) from the catalog", version, previous)

    def units_of(self, shard: str, table: Any, router: Router | None = None
                 ) -> tuple[tuple[int, ...], str | None, tuple[int, ...]] | None:
        """What this process's map says about ``shard`` for ``table``'s group: the units
        (buckets or slices) it gives the shard, and for range and list groups the group's
        name and every slice it knows of; ``None`` when the ownership guard does not
        cover the table.  ``router``: ask the map of that router (one that routed a
        statement) instead of the one in use now."""
        if router is None:
            router = self.router  # and its config: one map, even if a new one arrives meanwhile
        config = router.config
        cache = router.units  # what its map says: kept with it
        tr = router.table_route(table)
        key = (shard, tr.table)
        if key in cache:
            return cache[key]
        group = router.groups.get(tr.group) if tr.group is not None else None
        out: tuple[tuple[int, ...], str | None, tuple[int, ...]] | None
        if group is None or not guard_covers(group, tr.key_columns):
            out = None
        elif isinstance(group.strategy, HashStrategy):
            out = (tuple(b for b, s in enumerate(group.strategy.bucket_map) if s == shard), None, ())
        else:
            # A map loaded from the catalog numbers its slices; the file's map has
            # the first numbering (a process that could not reach the catalog).
            slices = [s for s in config.slices or initial_slices(config.groups) if s.group == group.name]
            out = (tuple(s.id for s in slices if s.shard == shard), group.name, tuple(s.id for s in slices))
        cache[key] = out
        return out

    def guard_installed(self, shard: str, conn: Any) -> bool:
        """Whether ``shard`` has the ownership guard (asked on ``conn`` at most every 30 s
        until it has; ``shardkit rebalance init`` installs it)."""
        seen = self._guard_seen.get(shard)
        if seen is True:
            return True
        if seen is not None and time.monotonic() < seen:
            return False
        found = _guard_installed(conn)
        self._guard_seen[shard] = True if found else time.monotonic() + 30.0
        return found

    def refuse_misfit(self) -> None:
        """Raise RoutingError while the catalog's live map does not fit the config file."""
        misfit = self._map_misfit
        if misfit is not None:
            raise RoutingError(
                f"this process cannot route by the catalog's map: {misfit.problem} ({misfit.hint})")

    def map_stale(self) -> str:
        """A shard refused a write as not owned: reload the map soon.  Returns what the
        refusal's error says of the map: the follower reloads it, or (``follow_map=False``)
        nothing does until the application or run_transaction asks."""
        if self._follower is not None:
            self._follower.poke()
        if self._follow_map:
            return "the map is being reloaded from the catalog"
        return ("this process does not follow the catalog (follow_map=False), so its map stays "
                "as it is until cluster.refresh_map() reloads it")

    # -- topology ------------------------------------------------------------------

    @property
    def shard_names(self) -> tuple[str, ...]:
        """The shards' names, in the config's order."""
        return self.config.shard_names

    def shard_for(self, table: Any, key: Any) -> str:
        """The shard that owns ``key`` in ``table`` (name, Table, mapped class or mapper)."""
        self.refuse_misfit()
        return self.router.shard_for(table, key)

    def bucket_for(self, table: Any, key: Any) -> int | None:
        """The hash bucket of ``key`` (``None`` if the table is not hash-sharded)."""
        return self.router.bucket_for(table, key)

    def explain(self, statement: Any, params: Any = None, *, all_shards: bool = False) -> Route:
        """The :class:`Route` a statement would take, without running it: the route
        ``session.execute(statement, params)`` takes in a new session, here (in the
        scope in force, with the statement's own execution options; ``all_shards``
        as ``execution_options={"shardkit_all_shards": True}``).

        For a read on several shards, ``route.merge`` describes how the rows
        are merged (or, as ``"refused: ..."``, why shardkit cannot merge them).
        A statement that execution refuses before it asks a database (no shard
        key in a write, not colocated on the shard key, rows of reference tables
        every shard would return, a reference table's write leaving a column to a
        value each shard would make, ``FOR UPDATE``/``populate_existing`` with
        ``LIMIT``, strict mode of the statement or scope) raises the same error
        here.  The refusals that ask the database are not foreseen: an aggregate
        shardkit does not know, text ordered or compared under a non-``C``
        database collation, grouping or ``DISTINCT`` under a nondeterministic
        collation; nor a session's own settings (``strict=``, its transaction).
        """
        from ._session import explain_route

        self.refuse_misfit()  # as execution would
        return explain_route(self, statement, params, all_shards)

    def validate_metadata(self, metadata: MetaData) -> None:
        """Check every configured table and shard-key column exists in ``metadata``, and
        learn the key columns' types (a key given with a table's name is then read as
        one given with its model is)."""
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
                # A key column is configured by its name in the database (the routing,
                # the guard's triggers and the moves' SQL use it), which a Column(...,
                # key="...") does not share with its key in table.c.
                named = {col.name: col for col in table.c}
                for c in cols:
                    if c not in named:
                        keyed = table.c.get(c)
                        raise ConfigurationError(
                            field, f"table {tname!r} has no column {c!r}" + (
                                f" (that is the key of its column {keyed.name!r} in table.c)"
                                if keyed is not None else ""),
                            "name the column as the database does: " + ", ".join(named),
                        )
                    unhashable = _unhashable(named[c].type) if g.strategy.kind == "hash" else None
                    if unhashable:
                        # Every write of such a key would be refused (ShardKeyError): say so now.
                        raise ConfigurationError(
                            field, f"shard key column {tname}.{c} is {unhashable}, which the hash "
                            "strategy cannot place (it hashes integers, strings, uuids and bytes)",
                            "key the group on such a column, or use a range, list or custom "
                            "strategy for this key")
                    misfit = _value_misfit(g.strategy, cols.index(c), named[c].type)
                    if misfit:
                        where, value, why = misfit
                        raise ConfigurationError(
                            f"groups.{g.name}.{where}",
                            f"{value!r} ({type(value).__name__}) cannot be a key of {tname}.{c}, "
                            f"which is {_type_sql(named[c].type)}", why)
                    if g.strategy.kind != "custom" and getattr(named[c].type, "_has_bind_expression", False):
                        # The database stores lower(:value) (say), not the value shardkit placed
                        # the row by: a read by the stored value would look on another shard.
                        raise ConfigurationError(
                            field, f"shard key column {tname}.{c} is of type "
                            f"{type(named[c].type).__name__}, whose bind_expression() computes the "
                            "stored value in SQL; shardkit places a row by the value given, before "
                            "the database computes it, so the row could live on a shard that does "
                            "not own the key it stores",
                            "compute the value in Python (the type's process_bind_param) or give the "
                            "key already computed; or use a custom strategy that computes it")
                    if g.strategy.kind != "custom" and _case_insensitive(named[c].type):
                        # 'Ada' = 'ada' in the database, but they hash (and sort, and
                        # match list values) as different strings: the same key would
                        # live on two shards, and a read by one spelling miss the other.
                        raise ConfigurationError(
                            field, f"shard key column {tname}.{c} is "
                            f"{_citext_label(named[c].type)}, which compares "
                            "without case; shardkit places keys by their exact string",
                            "key on a text column holding the value normalised (lower(...)), "
                            "and keep the citext column beside it if you need it",
                        )
        for i, tname in enumerate(sorted(self.config.reference_tables)):
            if tname not in by_name:
                raise ConfigurationError(
                    "reference_tables", f"unknown table {tname!r}",
                    "known tables: " + ", ".join(sorted(metadata.tables)),
                )
        self.router.know_tables(metadata.tables.values())

    # -- engines -------------------------------------------------------------------

    def node_url(self, shard: str, role: str = PRIMARY, index: int = 0) -> URL:
        """The URL of one node (``role`` ``"primary"`` or ``"replica"``, ``index`` the
        replica's), as configured: its password included (its ``str()`` hides it, but
        ``render_as_string(hide_password=False)`` and ``.password`` show it; do not log
        those: :func:`shardkit.mask_url` masks it).  ``RoutingError`` for a shard or
        replica the config does not have."""
        try:
            sc = self.config.shard(shard)
        except KeyError:
            raise RoutingError(
                f"unknown shard {shard!r}; shards: {', '.join(self.shard_names)}"
            ) from None
        if role not in (PRIMARY, REPLICA):
            raise ValueError(f"role must be 'primary' or 'replica', not {role!r}")
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"index must be an int (a replica's number: 0 for r0), not {index!r}")
        if role == PRIMARY:
            if index != 0:
                # (engine() would make a second engine, another pool, for the same primary,
                # outside its max_connections.)
                raise RoutingError(f"shard {shard!r} has one primary: index must be 0, not {index}")
            return sc.primary
        if not 0 <= index < len(sc.replicas):
            raise RoutingError(f"shard {shard!r} has no replica r{index}")
        return sc.replicas[index]

    def engine(self, shard: str, role: str = PRIMARY, index: int = 0) -> Engine:
        """The engine (connection pool) of one node, created on first use."""
        k = (shard, role, index)
        eng = self._engines.get(k)
        if eng is not None:
            return eng
        with self._lock:
            eng = self._engines.get(k)
            if eng is None:
                if self._follow_map and self._follower is None:
                    # Used again after dispose(): follow the catalog's map again (the
                    # follower reads it first thing).
                    self._start_follower()
                retired = self._retired.pop(k, None)
                if retired is not None:
                    eng, seen = retired
                    for hook in self._engine_hooks:
                        if hook not in seen:
                            hook(eng)
                    self._engines[k] = eng
                    return eng
                url = self.node_url(shard, role, index)
                opts: dict[str, Any] = {}
                pool_cfg = self.config.shard(shard).node_pool(self.config.pool, role, index)
                for key, sa_key in _POOL_KEYS.items():
                    if key in pool_cfg:
                        opts[sa_key] = pool_cfg[key]
                node = _node_name(shard, role, index)
                opts["poolclass"] = _NodePool
                opts["pool_logging_name"] = node
                opts.update(self._engine_options)
                cap = pool_cfg.get("max_connections")
                capped = False
                if cap is not None:
                    # One engine per node per Cluster: capping its pool caps the
                    # process's connections to that node (engine_options' pool_size
                    # and max_overflow included).
                    size = min(opts.get("pool_size", 5), cap)
                    # The cap lowers the pool's limit, never raises it.
                    overflow = opts.get("max_overflow", 10)
                    capped = overflow < 0 or size + overflow > cap
                    opts["pool_size"] = size
                    opts["max_overflow"] = cap - size if overflow < 0 else min(overflow, cap - size)
                if role == REPLICA:
                    # Replica reads run in autocommit, whatever isolation level
                    # engine_options give the primaries (a standby refuses
                    # SERIALIZABLE): each statement sees the latest replayed data
                    # (as READ COMMITTED would), a read that fails on a dead
                    # connection is retried on another node (no pre-ping round trip
                    # needed), and a dead replica leaves no transaction to roll back.
                    opts["isolation_level"] = "AUTOCOMMIT"
                    xo = opts.get("execution_options")
                    if xo and "isolation_level" in xo:
                        opts["execution_options"] = {k: v for k, v in xo.items() if k != "isolation_level"}
                connect_args = dict(opts.pop("connect_args", {}))
                connect_args = {**connect_timeout_args(url), **connect_args}
                if pool_cfg.get("prepared_statements") is False:
                    # Behind PgBouncer in transaction mode: psycopg prepares no statement.
                    connect_args.setdefault("prepare_threshold", None)
                url, secrets = split_secret_query(url)
                for name, v in secrets.items():   # (not k: the node's key, used below)
                    connect_args.setdefault(name, v)
                eng = create_engine(url, connect_args=connect_args, **opts)
                if capped and isinstance(eng.pool, _NodePool):
                    eng.pool.cap = cap
                eng.info = {"shard": shard, "role": role, "node": node, "index": index}  # type: ignore[attr-defined]
                if role == PRIMARY and opts.get("isolation_level") == "AUTOCOMMIT":
                    # Each statement commits as it runs (read-your-writes must know: see
                    # _session._record_autocommitted).  As an execution option it shows
                    # in every connection's own.
                    eng.info["autocommit"] = True  # type: ignore[attr-defined]
                event.listen(eng, "handle_error", _translate_errors(self, shard, node, url, index if role == REPLICA else None),
                             retval=True)
                if role == REPLICA:
                    _end_replica_transactions(eng.dialect, only_open="pool_reset_on_return" not in opts)
                    _keep_replica_isolation(eng.dialect, node)
                if role == PRIMARY:
                    from ._session import _watch_primary

                    _quiet_lost_rollback(eng.dialect)
                    _watch_primary(eng.dialect, short_writes=self.config.catalog_url is not None,
                                   autocommit=bool(eng.info.get("autocommit")))
                for hook in self._engine_hooks:
                    hook(eng)
                log.debug("created engine for %s (%s)", _node_name(shard, role, index), mask_url(url))
                self._engines[k] = eng
        return eng

    def _start_follower(self) -> None:
        from ._mapsync import MapFollower

        self._follower = MapFollower(self)
        self._follower.start()

    def _renew_pool(self, shard: str, role: str = PRIMARY, index: int = 0) -> None:
        """Replace a node's pooled connections (after the node restarted, or came up after
        every poll since the monitor started found it down): each is replaced at its next
        checkout, one in use too once returned.  The pool stays, with its count of the
        connections in use: a new pool (Engine.dispose()) would leave those outside any
        count, so that the process could hold twice max_connections to the node (one made
        after the restart is live, and so is every one when the server never restarted and
        only the first polls failed), and keep them open, once returned, in the old pool
        until it is garbage collected; pool_stats() would not show them."""
        eng = self._engines.get((shard, role, index))
        if eng is not None:
            log.info("%s restarted: its pooled connections are replaced", eng.info["node"])  # type: ignore[attr-defined]
            # (SQLAlchemy's own way to retire every connection of a pool, which Connection
            # uses after a disconnect: no public API does it without a new pool.)
            eng.pool._invalidate(None)  # type: ignore[arg-type]

    def streaming_engine(self, shard: str, index: int) -> Engine:
        """Replica ``index`` of ``shard`` for reads through a server-side cursor (``yield_per``,
        ``stream_results``): PostgreSQL opens those only inside a transaction, which the
        replica's autocommit engine never begins.  Same pool; each checkout reads in a
        READ COMMITTED transaction and gets autocommit back when returned."""
        k = (shard, REPLICA, index)
        base = self.engine(shard, REPLICA, index)  # (back in use after dispose(), say)
        eng = self._streaming.get(k)
        if eng is None:
            eng = base.execution_options(isolation_level="READ COMMITTED")
            eng.info = base.info  # type: ignore[attr-defined]
            eng = self._streaming.setdefault(k, eng)
        return eng

    def pool_stats(self) -> dict[str, dict[str, Any] | None]:
        """Per node (of those with an engine yet): pool size, checked out, checked in,
        overflow, and ``timeouts``: checkouts that waited longer than the pool's timeout
        (since the node's engine was made: the new pools of ``dispose()`` carry it on)."""
        return {eng.info["node"]: _pool_stats(eng) for eng in list(self._engines.values())}  # type: ignore[attr-defined]

    def primary(self, shard: str) -> Engine:
        """The primary's engine of ``shard``."""
        return self.engine(shard, PRIMARY)

    def scope(self, **kw: Any) -> Any:
        """Same as :func:`shardkit.scope`."""
        return _scope(**kw)

    # -- replicas -------------------------------------------------------------------

    def replica_count(self, shard: str) -> int:
        return self._replica_counts[shard]

    @property
    def replica_settings(self) -> ReplicaSettings:
        return self.config.replicas

    def monitor(self, *, wait: bool = True) -> HealthMonitor:
        """The health monitor, started on first use (``wait``: until every node was polled once)."""
        mon = self._monitor
        if mon is None:
            with self._lock:
                if self._monitor is None:
                    mon = HealthMonitor(self, self.config.replicas)
                    # The selector first: a thread that finds the monitor set (without
                    # taking the lock) uses the selector at once.
                    self._selector = ReplicaSelector(self, mon, self.config.replicas)
                    self._monitor = mon
                    mon.start()
                mon = self._monitor
        if wait and not mon.first_polled:
            # Every thread's first use waits, not only the one that started the monitor: one
            # an instant later would find every replica unmeasured, and read the primary or,
            # under when_no_replica = "raise", fail.  Not under the lock: other threads'
            # first engine() would wait for the first poll too (a hung node makes it last
            # the poll timeout).
            mon.wait_first_poll()
        return mon

    @property
    def selector(self) -> ReplicaSelector:
        """The replica selector reads choose their node with (starts the monitor)."""
        while True:
            self.monitor()
            selector = self._selector
            if selector is not None:
                return selector
            # dispose() stopped the monitor meanwhile: the cluster is used again.

    def start_monitor(self) -> None:
        """Start polling nodes now (otherwise the first replica read starts it)."""
        self.monitor(wait=True)

    def health(self) -> ClusterHealth:
        """Per node: role, up, lag, bans and pool use.  ``.ready`` is a readiness check: every
        primary is up and accepts writes (not in recovery).  Waits for the monitor's first
        poll of every node, also one another thread (a read, a metrics scrape) started an
        instant ago: a node not polled yet would read as down, and the cluster as not ready."""
        mon = self.monitor()
        nodes = []
        for state in mon.shards.values():
            for n in (state.primary, *state.replicas):
                d = mon.describe(n)
                eng = self._engines.get((n.shard, n.role, n.index))
                d["pool"] = _pool_stats(eng)
                nodes.append(d)
        # A "primary" that is in recovery (a URL pointing at a standby) takes no writes.
        ready = all(d["up"] and d["in_recovery"] is False and not d["read_only"]
                    for d in nodes if d["role"] == "primary")
        catalog = None
        if self.catalog is not None:
            follower = self._follower
            error = follower.error if follower is not None else None
            misfit = self._map_misfit
            if error is None and misfit is not None:
                error = f"this process cannot route by the catalog's map: {misfit.problem}"
            if error is None and self.map_version is None:
                error = self._catalog_error  # (it could not be read when this process started)
            catalog = {"url": mask_url(self.config.catalog_url), "map_version": self.map_version,
                       "following": follower is not None and follower.connected.is_set() and error is None,
                       "error": error}
        return ClusterHealth(nodes=nodes, ready=ready, catalog=catalog)

    def scatter_executor(self) -> ThreadPoolExecutor:
        """The threads cross-shard reads run on (psycopg releases the GIL while it waits)."""
        pool = self._scatter_pool
        if pool is None:
            with self._lock:
                if self._scatter_pool is None:
                    workers = min(64, 4 * len(self.shard_names))
                    self._scatter_pool = ThreadPoolExecutor(max_workers=workers,
                                                            thread_name_prefix="shardkit-scatter")
                pool = self._scatter_pool
        return pool

    def scatter_submit(self, fn: Any, *args: Any) -> Any:
        """``scatter_executor().submit(fn, *args)``; on the cluster's new threads if a
        ``dispose()`` shut the ones it found down meanwhile."""
        while True:
            pool = self.scatter_executor()
            try:
                return pool.submit(fn, *args)
            except RuntimeError:
                if self._scatter_pool is pool:
                    raise  # not dispose(): the interpreter is shutting down
                # dispose() shut it down since: the cluster is used again.

    def dispose(self, close: bool = True) -> None:
        """Stop the monitor and the map follower and close every pooled connection of every
        node (and of the catalog).  The cluster can be used again: engines (each node's same
        Engine, its pool new), the monitor, the scatter threads and the map follower start
        again on first use; a session in a transaction goes on with the connections it holds.

        :param close: ``False``: the pooled connections are let go without being closed,
            as SQLAlchemy's ``Engine.dispose(close=False)`` does: what a forked process
            does with the parent's (closing them would end the parent's sessions).  A
            forked child does it by itself at the fork (see ``_after_fork_in_child``).
        """
        if problem := switch_problem("dispose(close=...)", close):  # ("false" would close them)
            raise ValueError(problem)
        with self._lock:  # engine() starts a follower under it
            follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop()
        if self.catalog is not None:
            if close:
                self.catalog.dispose()
            else:
                self.catalog.engine.dispose(close=False)
        with self._lock:  # scatter_executor() makes one under it
            scatter, self._scatter_pool = self._scatter_pool, None
        if scatter is not None:
            scatter.shutdown(wait=False)  # (what a scatter submitted to it still runs)
        with self._lock:  # monitor() starts one under it: never one this misses
            monitor, self._monitor, self._selector = self._monitor, None, None
        if monitor is not None:
            monitor.stop()
        with self._lock:
            # With the retired ones: the application may hold one (cluster.primary(shard)
            # kept) and have pooled connections through it since the last dispose().
            engines = [*self._engines.values(), *(e for e, _ in self._retired.values())]
            hooks = tuple(self._engine_hooks)
            self._retired.update((k, (e, hooks)) for k, e in self._engines.items())
            self._engines.clear()
        for e in engines:
            e.dispose(close=close)

    def _after_fork(self) -> None:
        """In a child process just forked (see _after_fork_in_child): none of the parent's
        threads (monitor, map follower, scatter workers) exists here, and a lock one of
        them held at the fork stays held for ever; the pooled connections are the
        parent's.  New locks, and dispose(close=False): they all start again on first use."""
        self._lock = threading.Lock()
        self._map_lock = threading.RLock()
        router = self.__dict__.get("router")   # none yet: made on first use, here too
        if router is not None:
            router._after_fork()
        # Not stopped (their threads are not here): forgotten.
        self._follower = self._scatter_pool = self._monitor = self._selector = None
        self.dispose(close=False)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dispose()

    def __repr__(self) -> str:
        return (
            f"<Cluster {self.config.name!r}: {len(self.shard_names)} shards, "
            f"{self.config.bucket_count} buckets>"
        )


# Every Cluster of this process, for the fork hook below.
_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a pre-forking server's worker, multiprocessing with fork) lets go of
    what it inherited of each cluster, as SQLAlchemy asks of a forked process for its
    pools (``Engine.dispose(close=False)``), whether or not the application remembers to."""
    _NodePool._timeouts_lock = threading.Lock()
    for cluster in list(_LIVE):
        try:
            cluster._after_fork()
        except Exception:  # noqa: BLE001 - a fork hook must not fail the fork
            log.exception("%r: could not let go of the parent's pools and threads after a fork; "
                          "call cluster.dispose(close=False) in the child", cluster)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class ClusterHealth:
    """A snapshot of :meth:`Cluster.health`: ``nodes`` (one dict each), ``ready``, and
    ``catalog`` (None without one): its ``url`` (password masked), the ``map_version``
    routing this process, whether its map is ``following`` the catalog, and the
    ``error`` that keeps it from it (None: none)."""

    nodes: list[dict[str, Any]]
    ready: bool
    catalog: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "nodes": self.nodes, "catalog": self.catalog}


def _pool_stats(engine: Engine | None) -> dict[str, Any] | None:
    if engine is None:
        return None
    pool = engine.pool
    stats: dict[str, Any] = {}
    for name in ("size", "checkedout", "checkedin", "overflow"):
        fn = getattr(pool, name, None)
        if callable(fn):
            # QueuePool counts overflow from -size (connections it may still open
            # within size); report only connections beyond the pool's size.
            stats[name] = max(0, fn()) if name == "overflow" else fn()
    if isinstance(pool, _NodePool):
        stats["timeouts"] = pool.timeouts
    return stats


def _end_replica_transactions(dialect: Any, only_open: bool) -> None:
    """Make a replica's dialect end a connection's transaction (COMMIT or ROLLBACK) quietly
    when the connection is gone, and (``only_open``) only if it is in a transaction.

    Replica connections run in autocommit: the ROLLBACK with which SQLAlchemy ends a
    session's connection and resets one that goes back to the pool would be a no-op that
    still costs every read some CPU (the driver's rollback() takes its lock and runs its
    generator to find nothing to do).  A connection in a transaction all the same (a read
    streamed through a server-side cursor, BEGIN run by hand) is rolled back as before.
    Rather than the pool's "reset" event: a reset listener costs every checkin more than
    this check.  A ``pool_reset_on_return`` in engine_options (``only_open=False``): the
    dialect's rollback and commit are called as SQLAlchemy calls them.

    A standby's transaction writes nothing: one whose connection died after its reads (a
    backend ended by a recovery conflict or idle_in_transaction_session_timeout, a
    restart) has nothing left to commit or roll back, so neither the session's commit(),
    rollback() or close() nor the pool's check-in fails on it (a commit would otherwise
    fail after committing some shards, or before, in no set order).  The connection is
    soft-invalidated: the pool replaces it at its next checkout (nor is a streamed read's
    isolation level set back on it as it goes back to the pool).  (A replica that dies
    under a streamed read fails that read, and the commit refuses the transaction first.)"""
    reset_isolation_level = dialect.reset_isolation_level

    def reset_isolation(dbapi_connection: Any) -> None:
        if not dbapi_connection.closed:
            reset_isolation_level(dbapi_connection)

    dialect.do_rollback = _quietly_when_lost(dialect, dialect.do_rollback, only_open)
    dialect.do_commit = _quietly_when_lost(dialect, dialect.do_commit, only_open)
    dialect.reset_isolation_level = reset_isolation


def _quiet_lost_rollback(dialect: Any) -> None:
    """Make a primary's dialect roll back a connection whose server is gone quietly (a
    restart, a backend ended by an operator or a proxy): PostgreSQL rolled its transaction
    back as the server process ended, so there is nothing left to undo.  The session's
    rollback() and close() (the end of a request that only read, or whose statements an error
    stopped) then go on, and give the transaction's other connections back to their pools, as
    its commit() goes on past a primary it only read from (_finish_past_lost_readers).  The
    connection is soft-invalidated: the pool replaces it at its next checkout.  A COMMIT that
    meets its connection gone still raises: whether it committed is not known."""
    dialect.do_rollback = _quietly_when_lost(dialect, dialect.do_rollback, only_open=False)


def _quietly_when_lost(dialect: Any, end: Any, only_open: bool) -> Any:
    """``end`` (a dialect's do_rollback or do_commit), which lets a connection that is gone go
    quietly (soft-invalidated) and (``only_open``) is not called when it is not in a
    transaction."""
    error = dialect.loaded_dbapi.Error

    def lost(dbapi_connection: Any, e: Exception) -> None:
        # (SQLAlchemy passes the pool's proxy; its dbapi_connection is psycopg's.)
        raw = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        invalidate = getattr(dbapi_connection, "invalidate", None)
        if invalidate is None or not dialect.is_disconnect(e, raw, None):
            raise e
        invalidate(e, soft=True)

    if not only_open:
        # (Every primary transaction's end passes here, twice (the transaction's ROLLBACK,
        # then the pool's reset): nothing more than the call.)
        if (getattr(end, "__func__", None) is DefaultDialect.do_rollback
                and not getattr(dialect, "skip_autocommit_rollback", False)):
            # SQLAlchemy's own do_rollback() comes to the driver's rollback() when it does
            # not skip an autocommit connection's: called here, one call the shorter.
            def rollback_lost_quietly(dbapi_connection: Any) -> None:
                try:
                    dbapi_connection.rollback()
                except error as e:
                    lost(dbapi_connection, e)
            return rollback_lost_quietly

        def end_lost_quietly(dbapi_connection: Any) -> None:
            try:
                end(dbapi_connection)
            except error as e:
                lost(dbapi_connection, e)
        return end_lost_quietly

    def end_quietly(dbapi_connection: Any) -> None:
        raw = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        if raw.pgconn.transaction_status == TransactionStatus.IDLE:
            return
        try:
            end(dbapi_connection)
        except error as e:
            lost(dbapi_connection, e)
    return end_quietly


def _keep_replica_isolation(dialect: Any, node: str) -> None:
    """Wrap replica ``node``'s own dialect so that its connections keep their isolation
    (autocommit, or a streamed read's READ COMMITTED): an ``isolation_level`` given to one
    is for the primaries, as one in engine_options is.  SQLAlchemy 2.1 gives a session's
    execution_options to every connection of the session, replicas' included (a standby
    refuses SERIALIZABLE).  Said once per node (WARNING).  Rather than the engine's
    "set_connection_execution_options" event: a connection-event listener makes every
    statement on the engine dispatch all the connection events (see _watch_primary)."""
    set_options = dialect.set_connection_execution_options
    said = False

    def keep_isolation(connection: Any, opts: Mapping[str, Any]) -> None:
        nonlocal said
        level = opts.get("isolation_level")
        if level is not None:
            opts = {k: v for k, v in opts.items() if k != "isolation_level"}
            # (AUTOCOMMIT is what replica reads run in: nothing to say.  A streamed read's
            # READ COMMITTED is kept from it too: its server-side cursor needs a transaction.)
            if not said and str(level).upper() != "AUTOCOMMIT":
                said = True
                log.warning("isolation_level %s is not applied on replica %s: replica reads run in "
                            "autocommit (it applies to the primaries); a read that must run at that "
                            "level asks the primary (shardkit_role='primary' or consistency='strong')",
                            level, node)
        set_options(connection, opts)

    dialect.set_connection_execution_options = keep_isolation


def _translate_errors(cluster: Cluster, shard: str, node: str, url: URL,
                      replica: int | None = None) -> Any:
    """A handle_error hook: "cannot reach the node" -> ShardUnavailable, guard refusal -> NotOwned.

    ``replica``: the node's replica index (None for a primary)."""

    def handle(context: Any) -> Exception | None:
        if context.is_pre_ping:
            return None  # the pool reconnects by itself
        if context.is_disconnect and _shut_down_here(context):
            # A scatter shut this connection's socket down past its timeout: the connection
            # goes, but the node is fine: its other pooled connections stay, and it is not
            # reported unreachable (the scatter reports the timeout).
            context.invalidate_pool_on_disconnect = False
            return None
        cause = context.original_exception
        if getattr(cause, "sqlstate", None) == NOT_OWNED_SQLSTATE:
            diag = getattr(cause, "diag", None)
            detail = getattr(diag, "message_detail", None)
            bucket = int(detail) if detail and detail.isdigit() else None
            unit = "slice" if bucket is not None and bucket >= SLICE_BASE else "bucket"
            # The map in use now: the one that routed the write, or (if another arrived
            # meanwhile) a newer one; either way a retry needs a newer map than this.
            version = cluster.map_version
            reload = cluster.map_stale()
            err: Exception = NotOwned(
                f"shard {shard} refused the write: it does not own {unit} {bucket} (this process "
                f"routes by map version {version}); {reload}: retry the transaction "
                "(shardkit.run_transaction reloads the map and retries it)",
                shard=shard, bucket=bucket, table=getattr(diag, "table_name", None),
                statement=context.statement, map_version=version,
            )
            # map_version may be newer than the map that routed the write (see above):
            # run_transaction then checks where the map in use puts the bucket.
            err._sk_guard_refusal = True  # type: ignore[attr-defined]
            err.__cause__ = cause
            # Returned, not raised: SQLAlchemy raises it after the other handle_error
            # hooks (metrics count it) have seen it.
            return err
        fetching = context.statement is None and context.execution_context is not None
        if context.statement is None and context.connection is not None and not fetching:
            return None  # a failed COMMIT/ROLLBACK: SQLAlchemy's own error says what happened
        reason = unreachable_reason(context)
        if reason is None:
            return None
        err = ShardUnavailable(
            f"shard {shard}: node {node} ({mask_url(url)}) is unreachable: {reason}",
            shard=shard, node=node, cause=cause,
        )
        err.__cause__ = cause
        monitor = cluster._monitor  # (read once: a dispose() in another thread clears it)
        if fetching and replica is not None and monitor is not None:
            # A streamed read's replica died while the caller was reading its rows
            # (past any retry): keep the next reads off it.
            monitor.ban(shard, replica, f"read failed: {reason}"[:200])
        return err

    return handle


def _shut_down_here(context: Any) -> bool:
    """shardkit._scatter.shut_down_here(): False while that module is not loaded (only
    a cross-shard read, which loads it, shuts connections down)."""
    scatter = sys.modules.get("shardkit._scatter")
    return scatter is not None and scatter.shut_down_here(context)


def _node_name(shard: str, role: str, index: int) -> str:
    return f"{shard}/primary" if role == PRIMARY else f"{shard}/r{index}"


def _pg_type(type_: Any) -> Any:
    """The type PostgreSQL gets for a column: through ``with_variant(..., "postgresql")``
    and TypeDecorators (their implementation, or ``load_dialect_impl``), and for a
    ``postgresql.DOMAIN`` its base type, through domains over domains (a domain's values
    are its base type's: hashed, compared and stored as those)."""
    return _pg_types(type_)[1]


def _pg_types(type_: Any) -> tuple[Any, Any]:
    """(the type PostgreSQL gets for a column, as declared: a domain, if it is one; its
    :func:`_pg_type`)."""
    domain, base, _ = unwrap(type_)
    return (base if domain is None else domain), base


def _case_insensitive(type_: Any) -> bool:
    """Whether a column type compares text without case on PostgreSQL (``citext``, or a
    domain over it)."""
    return getattr(_pg_type(type_), "__visit_name__", None) == "CITEXT"


def _citext_label(type_: Any) -> str:
    """``citext``, or ``ci_name (a domain over citext)`` for a domain over it."""
    declared, base = _pg_types(type_)
    if declared is base:
        return "citext"
    from sqlalchemy.dialects.postgresql.base import PGDialect

    return f"{declared.compile(dialect=PGDialect())} (a domain over citext)"


def _type_sql(type_: Any) -> str:
    """A column type as PostgreSQL names it, for a message: ``amount (a domain over
    NUMERIC(10, 2))`` for a domain's."""
    from sqlalchemy.dialects.postgresql.base import PGDialect

    def sql(t: Any) -> str:
        try:
            return str(t.compile(dialect=PGDialect()))
        except Exception:  # noqa: BLE001 - only for the message
            return type(t).__name__

    declared, base = _pg_types(type_)
    return sql(base) if declared is base else f"{sql(declared)} (a domain over {sql(base)})"


def _value_misfit(strategy: Any, part: int, type_: Any) -> tuple[str, Any, str] | None:
    """A range bound or list value (its part ``part`` of a composite one) that a key column
    of ``type_`` never holds, as (the field under the group, the value, why it matters).

    A key is read in its column's Python type, so a list value of another type is never
    found (the row goes to the default shard), and a bound of another type cannot be
    compared with the keys the database gives back."""
    if isinstance(strategy, RangeStrategy):
        given = [("ranges", x) for r in strategy.ranges for x in (r.lower, r.upper) if x is not None]
        miss = "no key of the column can be compared with it"
    elif isinstance(strategy, ListStrategy):
        given = [(f"values.{shard}", v) for v, shard in strategy.mapping.items()]
        miss = "no key of the column is ever equal to it, so its rows would go to the default shard"
    else:
        return None
    miss += ("; write every bound or value as the column holds it (a string for a text column, "
             "an integer for an integer one, a TOML date for a date column)")
    pg = _pg_type(type_)
    for where, v in given:
        v = v[part] if isinstance(v, tuple) else v
        if isinstance(pg, sqltypes.Enum):
            continue  # the strings it stores (README); a member routes as its string
        if isinstance(pg, sqltypes.Uuid):
            if isinstance(v, str):  # a range bound too: keys compare by their text form
                try:
                    text = str(uuid.UUID(v))
                except ValueError:
                    return where, v, "it is not a UUID: " + miss
                if text != v:
                    return where, v, (f"a uuid key is matched by its text form, as PostgreSQL prints "
                                      f"it: write it as {text!r}")
            continue
        if isinstance(pg, sqltypes.Integer):
            fits = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(pg, sqltypes.String):
            fits = isinstance(v, str)
        elif isinstance(pg, (sqltypes.Numeric, sqltypes.Float)):
            fits = isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)
        elif isinstance(pg, sqltypes.DateTime):
            fits = isinstance(v, datetime.datetime)
            if fits and (v.utcoffset() is not None) != bool(pg.timezone):
                return where, v, (
                    "the column gives back date-times with an offset, which cannot be compared "
                    "with a local one: give the bound an offset (2024-01-01T00:00:00Z)"
                    if pg.timezone else
                    "the column holds local date-times, which cannot be compared with one with "
                    "an offset: give the bound without one")
        elif isinstance(pg, sqltypes.Date):
            fits = isinstance(v, datetime.date) and not isinstance(v, datetime.datetime)
        elif isinstance(pg, sqltypes.Time):
            fits = isinstance(v, datetime.time)
        elif isinstance(pg, sqltypes.Boolean):
            fits = isinstance(v, bool)
        else:
            continue
        if not fits:
            return where, v, miss
    return None


def _unhashable(type_: Any) -> str | None:
    """The name of a column type whose values the hash strategy refuses (it hashes ints,
    strings, uuids and bytes), or None."""
    from sqlalchemy import types as sqltypes
    from sqlalchemy.dialects.postgresql import INTERVAL

    pg = _pg_type(type_)
    # (postgresql.INTERVAL, what an Interval becomes for PostgreSQL, is not an Interval)
    if isinstance(pg, (sqltypes.Numeric, sqltypes.Float, sqltypes.Boolean, sqltypes.Date, sqltypes.DateTime,
                       sqltypes.Time, sqltypes.Interval, INTERVAL, sqltypes.JSON, sqltypes.ARRAY)):
        return _type_sql(type_)
    return None
