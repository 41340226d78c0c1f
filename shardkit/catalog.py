"""The catalog: the live bucket map in a PostgreSQL database, versioned, with a move journal.

A cluster whose config has a ``[catalog]`` table routes by the catalog's map,
not the config file's.  The catalog holds, in the schema ``shardkit_catalog``:

``maps(version, bucket_map, slices, reason, created_at)``
    every version of the map: the bucket map of hash groups and the slices
    (key ranges, list values) of range and list groups; the highest version
    is the live one.
    Publishing a version sends ``NOTIFY shardkit_map, '<version>'``.
``moves(id, state, plan, ...)`` and ``move_batches(move_id, batch, ...)``
    rebalancing moves and the step each batch of buckets has reached.
``journal(id, move_id, batch, step, at, detail)``
    every step a mover took, append-only.

``shardkit rebalance init`` creates the schema, stores the config's bucket map
as version 1 and installs the ownership guard on every shard.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine

from ._config import connect_timeout_args, mask_url, split_secret_query
from ._replicas import parse_lsn
from ._slices import Slice, slices_from_json, slices_to_json
from .errors import ShardUnavailable, unreachable_reason

__all__ = ["Catalog", "MAP_CHANNEL"]

log = logging.getLogger("shardkit.catalog")

#: The NOTIFY channel on which a new map version is announced.
MAP_CHANNEL: Final = "shardkit_map"
#: Advisory lock key (first half) of movers in the catalog database.
MOVER_LOCK_CLASS: Final = 0x534B  # "SK"
#: Seconds a process waits for the catalog to answer a read of the live map.
ANSWER_TIMEOUT: Final = 5.0
#: The least a read of the live map is given by a caller with little time left (see
#: :meth:`Catalog.current_state`): a catalog that answers in time is never cut off at once.
MIN_ANSWER_TIMEOUT: Final = 0.5

_SCHEMA_SQL: Final = (
    "SELECT pg_advisory_xact_lock(5456785)",
    "CREATE SCHEMA IF NOT EXISTS shardkit_catalog",
    "CREATE TABLE IF NOT EXISTS shardkit_catalog.maps ("
    " version bigint PRIMARY KEY,"
    " bucket_map text[] NOT NULL,"
    " reason text NOT NULL DEFAULT '',"
    " created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS shardkit_catalog.moves ("
    " id bigserial PRIMARY KEY,"
    " state text NOT NULL CHECK (state IN ('running', 'done', 'aborted', 'failed')),"
    " reason text NOT NULL,"
    " plan jsonb NOT NULL,"
    " error text,"
    " created_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS shardkit_catalog.move_batches ("
    " move_id bigint NOT NULL REFERENCES shardkit_catalog.moves (id),"
    " batch integer NOT NULL,"
    " source text NOT NULL,"
    " target text NOT NULL,"
    " buckets integer[] NOT NULL,"
    " step text NOT NULL,"
    " rows_copied bigint NOT NULL DEFAULT 0,"
    " map_version bigint,"
    " updated_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (move_id, batch))",
    "ALTER TABLE shardkit_catalog.moves ADD COLUMN IF NOT EXISTS runner text",
    "ALTER TABLE shardkit_catalog.move_batches ADD COLUMN IF NOT EXISTS target_lsn pg_lsn",
    # The source's WAL position after its copies were deleted (clean-up).
    "ALTER TABLE shardkit_catalog.move_batches ADD COLUMN IF NOT EXISTS source_lsn pg_lsn",
    # The slices of range and list groups (JSON, see shardkit._slices); NULL: none yet.
    "ALTER TABLE shardkit_catalog.maps ADD COLUMN IF NOT EXISTS slices jsonb",
    "CREATE TABLE IF NOT EXISTS shardkit_catalog.journal ("
    " id bigserial PRIMARY KEY,"
    " move_id bigint NOT NULL,"
    " batch integer,"
    " step text NOT NULL,"
    " at timestamptz NOT NULL DEFAULT clock_timestamp(),"
    " detail jsonb)",
)


_ADD_COLUMN: Final = re.compile(
    r"ALTER TABLE (?P<table>\S+) ADD COLUMN IF NOT EXISTS (?P<column>\w+) .*")


class LiveMap(NamedTuple):
    """The live version of the map."""

    version: int
    bucket_map: tuple[str, ...]
    #: the slices of range and list groups (empty: route them by the config file)
    slices: tuple[Slice, ...]


@dataclass(frozen=True)
class CatalogState:
    """What routers follow: the map, and what moves in flight mean for reads."""

    version: int
    bucket_map: tuple[str, ...]
    #: the slices of range and list groups (empty: route them by the config file)
    slices: tuple[Slice, ...]
    #: shard -> buckets it holds rows of without owning them (cross-shard reads leave them out)
    foreign_buckets: dict[str, frozenset[int]]
    #: shard -> WAL position after the latest switch to it (its replicas serve once there)
    moved_lsn: dict[str, int]
    #: grows with every journal entry: an older state never replaces a newer one
    seq: int
    #: which catalog answered: its database, its maps table and its server's start.  A
    #: catalog restored from a backup, re-initialised or failed over has another one, and
    #: its map may go back (None: not known)
    identity: str | None = None


class Catalog:
    """The catalog database of one cluster.

    A connection attempt to the catalog gives up after ``connect_timeout`` seconds
    when the URL has one (``...?connect_timeout=10``), else after 3 s; a read of the
    live map without a connection (:meth:`current_state`) waits ``answer_timeout``
    seconds for the catalog's answer, the connection attempt included.
    """

    def __init__(self, url: URL | str, *, engine: Engine | None = None,
                 answer_timeout: float = ANSWER_TIMEOUT) -> None:
        self.url = url
        self._initialised = False
        #: seconds :meth:`current_state` (without a connection) waits for an answer
        self.answer_timeout = answer_timeout
        # A small pool: processes poll the catalog while they wait for a new map
        # version (a refused write), and a mover holds one connection for its lock.
        if engine is None:
            # A secret in the query string would show in the engine's repr.
            bare, secrets = split_secret_query(url)
            engine = create_engine(bare, pool_size=2, max_overflow=4, pool_pre_ping=True,
                                   connect_args={**connect_timeout_args(url), **secrets})
        self.engine = engine
        event.listen(self.engine, "handle_error", self._unreachable, retval=True)

    def _unreachable(self, context: Any) -> Exception | None:
        """A handle_error hook: a catalog that cannot be reached is a ShardUnavailable naming it."""
        reason = unreachable_reason(context)
        if reason is None:
            return None
        cause = context.original_exception
        err = ShardUnavailable(f"the catalog ({mask_url(self.url)}) is unreachable: {reason}",
                               node="catalog", cause=cause)
        err.__cause__ = cause
        return err

    def __repr__(self) -> str:
        return f"Catalog({mask_url(self.url)!r})"

    # -- schema and map ------------------------------------------------------------

    def ensure_schema(self) -> None:
        with self.engine.begin() as conn:
            for statement in _SCHEMA_SQL:
                add = _ADD_COLUMN.fullmatch(statement)
                if add and conn.execute(text(
                        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(:t) "
                        "AND attname = :c AND NOT attisdropped)"),
                        {"t": add["table"], "c": add["column"]}).scalar():
                    # ALTER TABLE locks the table before it finds the column there: with
                    # routers reading the catalog (one transaction over several tables),
                    # running `rebalance init` again could deadlock with them.
                    continue
                conn.exec_driver_sql(statement)

    def initialised(self, conn: Connection | None = None) -> bool:
        # Once there, the schema stays: routers re-read the map often, ask once.
        if self._initialised:
            return True

        def check(c: Connection) -> bool:
            return bool(c.execute(text(
                "SELECT to_regclass('shardkit_catalog.maps') IS NOT NULL")).scalar())
        if conn is not None:
            self._initialised = check(conn)
        else:
            with self.engine.connect() as c:
                self._initialised = check(c)
        return self._initialised

    def current_map(self, conn: Connection | None = None) -> LiveMap | None:
        """The live map (version, bucket map, slices), or None if there is none yet."""
        def read(c: Connection) -> LiveMap | None:
            if not self.initialised(c):
                return None
            row = c.execute(text(
                "SELECT version, bucket_map, slices FROM shardkit_catalog.maps "
                "ORDER BY version DESC LIMIT 1")).first()
            if row is None:
                return None
            return LiveMap(int(row[0]), tuple(row[1]), () if row[2] is None else slices_from_json(row[2]))
        if conn is not None:
            return read(conn)
        with self.engine.connect() as c:
            return read(c)

    def current_state(self, conn: Connection | None = None, *,
                      timeout: float | None = None) -> CatalogState | None:
        """The live map and the moves in flight, at one snapshot; None without a map.

        Without ``conn``, waits ``timeout`` seconds for the answer (default and most:
        ``answer_timeout``), then raises ShardUnavailable."""
        def read(c: Connection) -> CatalogState | None:
            current = self.current_map(c)
            if current is None:
                return None
            foreign: dict[str, set[int]] = {}
            # (A batch an abort left "leftovers" of, its target unreachable then, may
            # still have its copies there until they are removed.)
            for source, target, buckets, step in c.execute(text(
                    "SELECT b.source, b.target, b.buckets, b.step FROM shardkit_catalog.move_batches b "
                    "JOIN shardkit_catalog.moves m ON m.id = b.move_id "
                    "WHERE (m.state = 'running' AND b.step IN ('capturing', 'copied', 'switched', 'verified')) "
                    "OR b.step = 'leftovers'")):
                holder = target if step in ("capturing", "copied", "leftovers") else source
                foreign.setdefault(holder, set()).update(buckets)
            # Per shard, the WAL position its replicas must have replayed to serve reads:
            # a target's after a switch (or after an abort deleted its copies), a
            # source's after its clean-up deleted the rows it gave away.
            moved_lsn = {t: parse_lsn(lsn) for t, lsn in c.execute(text(
                "SELECT shard, max(lsn)::text FROM (SELECT target AS shard, target_lsn AS lsn "
                "FROM shardkit_catalog.move_batches UNION ALL SELECT source, source_lsn "
                "FROM shardkit_catalog.move_batches) x WHERE lsn IS NOT NULL GROUP BY shard"))}
            # The identity in the same round trip: the database and the maps table change
            # when the catalog is restored into a new database or re-initialised, the
            # server's start time when it is restored in place or failed over.
            seq, identity = c.execute(text(
                "SELECT coalesce(max(id), 0), (SELECT oid FROM pg_database WHERE datname = current_database())"
                "::text || '/' || to_regclass('shardkit_catalog.maps')::oid::text || '/' || "
                "pg_postmaster_start_time()::text FROM shardkit_catalog.journal")).one()
            return CatalogState(current.version, current.bucket_map, current.slices,
                                {k: frozenset(v) for k, v in foreign.items()}, moved_lsn, int(seq), identity)
        if conn is not None:
            return read(conn)

        def read_own() -> CatalogState | None:
            with self.engine.connect() as c:
                c.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                try:
                    return read(c)
                finally:
                    c.rollback()
        return self._answer_within(read_own, timeout)

    def _answer_within(self, fn: Any, timeout: float | None = None) -> Any:
        """``fn()``, or ShardUnavailable once the catalog has not answered for ``timeout``
        seconds (at most, and by default, ``answer_timeout``).

        Application threads reload the map (a write refused as not owned), and a
        catalog that is frozen (a paused VM, a storage stall) or cut off without a
        reset keeps its connections open and silent: the driver would wait for its
        answer for as long as the kernel keeps the connection (minutes, or until the
        server resumes).  So the read runs in a thread of its own, which is left to
        finish (or fail) by itself when the caller gives up on it.
        """
        answer: Future[Any] = Future()

        def run() -> None:
            try:
                answer.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                answer.set_exception(e)
        threading.Thread(target=run, name="shardkit-catalog-read", daemon=True).start()
        wait = self.answer_timeout if timeout is None else min(timeout, self.answer_timeout)
        try:
            return answer.result(wait)
        except FutureTimeout:
            raise ShardUnavailable(
                f"the catalog ({mask_url(self.url)}) did not answer within {wait:.3g} s",
                node="catalog") from None

    def publish_map(self, conn: Connection, bucket_map: Sequence[str], reason: str,
                    *, slices: Sequence[Slice] | None = None, expect_version: int | None = None) -> int:
        """Store ``bucket_map`` (and ``slices``) as the next version, in ``conn``'s transaction;
        return it.  Without ``slices``, the live version's slices are kept.

        Serialised with other publishers by a lock on the maps table.  With
        ``expect_version``, refuses (``RuntimeError``) if the live version is
        another: someone else changed the map meanwhile.  Listeners are
        notified when the transaction commits.
        """
        conn.exec_driver_sql("LOCK TABLE shardkit_catalog.maps IN EXCLUSIVE MODE")
        live = self.current_map(conn)
        current = live.version if live else None
        if expect_version is not None and current != expect_version:
            raise RuntimeError(f"the catalog's map is at version {current}, expected {expect_version}")
        version = (current or 0) + 1
        if slices is None:
            slices = live.slices if live else ()
        conn.execute(text(
            "INSERT INTO shardkit_catalog.maps (version, bucket_map, slices, reason) "
            "VALUES (:v, :m, CAST(:s AS jsonb), :r)"),
            {"v": version, "m": list(bucket_map), "s": json.dumps(slices_to_json(slices)) if slices else None,
             "r": reason})
        conn.execute(text("SELECT pg_notify(:ch, :v)"), {"ch": MAP_CHANNEL, "v": str(version)})
        return version

    # -- journal -------------------------------------------------------------------

    @staticmethod
    def set_floor(conn: Connection, move_id: int, batch: int, side: str, lsn: str) -> None:
        """Record the WAL position the batch's ``side`` (``"source"`` or ``"target"``) must
        have replayed before its replicas serve reads again (see :meth:`current_state`)."""
        column = {"source": "source_lsn", "target": "target_lsn"}[side]
        conn.execute(text(f"UPDATE shardkit_catalog.move_batches SET {column} = CAST(:l AS pg_lsn) "
                          "WHERE move_id = :m AND batch = :b"), {"l": lsn, "m": move_id, "b": batch})

    @staticmethod
    def record(conn: Connection, move_id: int, batch: int | None, step: str,
               detail: dict[str, Any] | None = None) -> None:
        conn.execute(text(
            "INSERT INTO shardkit_catalog.journal (move_id, batch, step, detail) "
            "VALUES (:m, :b, :s, CAST(:d AS jsonb))"),
            {"m": move_id, "b": batch, "s": step, "d": json.dumps(detail or {})})
        if batch is not None:
            conn.execute(text(
                "UPDATE shardkit_catalog.move_batches SET step = :s, updated_at = now() "
                "WHERE move_id = :m AND batch = :b"), {"m": move_id, "b": batch, "s": step})
            # Which shards hold rows they do not own changes with the step:
            # followers re-read it.
            conn.execute(text("SELECT pg_notify(:ch, 'moves')"), {"ch": MAP_CHANNEL})
        conn.execute(text("UPDATE shardkit_catalog.moves SET updated_at = now() WHERE id = :m"),
                     {"m": move_id})

    def dispose(self) -> None:
        self.engine.dispose()
