"""Online rebalancing: move hash buckets between shards with nothing lost.

A move runs batch by batch; a batch is a group of buckets going from one
source shard to one target.  Each batch goes through these steps, each one
recorded in the catalog's journal before the next begins:

``pending``
    nothing done yet.
``capturing``
    the source's ownership guard records the primary key of every row written
    in the batch's buckets (``shardkit.changes``).  Before this step is
    recorded, the mover waits (by polling ``pg_locks``, blocking nobody) for
    every transaction holding a bucket's guard lock when capture began, so no
    write escapes both the copy and the log.
``copied``
    the buckets' rows were copied with ``COPY ... TO STDOUT`` /
    ``COPY ... FROM STDIN`` (binary), in one target transaction that first
    deletes whatever an interrupted copy left behind.
``switched``
    catch-up: the changes logged so far are applied to the target (re-reading
    each changed row from the source, so replaying a change twice is harmless),
    round after round until little is left, or until the rounds no longer
    shrink what is left (the writers log as much as a round applies).  Then the
    cut-over: writes to the batch's buckets are paused on the source (the mover takes the move's gate
    lock, which their writers share; other buckets are not paused), the last changes are applied, the target takes
    ownership and starts recording changes to the buckets, the source gives
    ownership up, and the catalog publishes the new map version.  Writers
    paused meanwhile are refused by the source (SQLSTATE SK001) and retry on
    the target.
``verified``
    per bucket, the row count and a checksum of every row on the source equal
    those on the target, leaving out rows written on the target since the
    switch (the target recorded their keys).
``cleaned``
    the source's copies of the rows are deleted (one statement per table);
    capture ends.

Killing the mover at any point and running ``shardkit rebalance resume``
redoes the interrupted step from its start; every step is idempotent.
Catch-up uses triggers with a change log rather than logical replication:
it needs no ``wal_level = logical``, no replication slots to leak when a mover
dies, and no superuser; the guard trigger that must exist anyway records the
changes for the moving buckets only.

The mover writes rows (the copy and the changes on the target, the clean-up's
deletes on the source) as logical replication's apply does, with
``session_replication_role = replica`` when its role may set it (a superuser,
or ``GRANT SET ON PARAMETER session_replication_role``, PostgreSQL 15 and
later): the application's triggers do not fire for rows that only move, nor do
foreign keys' checks and cascades (a table referencing itself, or tables in a
cycle, copy in any order; every moved table is deleted explicitly).  Changes
are applied by deleting the changed rows, then inserting the source's, so rows
that exchanged unique values arrive whole.  Without that privilege, tables with
triggers or such foreign keys are refused before the move starts.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import logging
import re
import shlex
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ._cluster import Cluster
from ._config import counted, conninfo, connect_timeout_args, with_bucket_map
from ._guard import (
    GATE_LOCK_CLASS,
    GUARD_LOCK_CLASS,
    GUARD_LOCK_STRIPES,
    INT_KEY_TYPES,
    MOVER_SETTING,
    Guarded,
    guard_fires_sql,
    guard_installed,
    guarded_tables,
    install_guard,
    slice_comparable,
    slice_key_sql,
    slice_function_name,
    CONFIGURED_TABLES,
    configured_tables,
    stale_guards,
    table_parts,
    table_shape,
    table_sql,
    type_label,
    unit_expression,
    write_slices,
)
from ._rebalance_plan import Plan, SlicePlan, keyless_moves, plan_from_dict
from ._replicas import WAL_POSITION_SQL, format_lsn, parse_lsn, replay_target
from ._slices import add_missing_groups, by_group, initial_slices, reassign
from ._sql import INSTALL_SQL, int8_bucket_scan
from .catalog import MOVER_LOCK_CLASS, Catalog
from .errors import RebalanceError, ShardUnavailable, first_line

__all__ = ["LEFTOVERS", "STEPS", "Mover", "abort", "init", "move_status"]

log = logging.getLogger("shardkit.rebalance")

STEPS = ("pending", "capturing", "copied", "switched", "verified", "cleaned")

# Rows are compared as text: the same on both servers whatever their settings.
_CANONICAL_TEXT = ("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
                   "SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 3; "
                   "SET LOCAL bytea_output = 'hex'")

# Catch-up rounds stop when a round applies fewer changes than this, then cut over
# (or when the rounds stop shrinking, or after _CATCH_UP_ROUNDS: see _catch_up_ends).
_CUTOVER_BELOW = 500
_CATCH_UP_ROUNDS = 50
_CHANGES_PER_ROUND = 5000
# Cut-overs that gave up at max_pause before the move stops (see Mover._cut_over).
_PAUSE_ATTEMPTS = 3


class _PauseOverrun(Exception):
    """The cut-over's pause reached max_pause between two of its statements."""


def _time_left(deadline: float, lock_timeout: float) -> str:
    """The settings that bound each statement of the cut-over by what is left until
    ``deadline`` (its lock waits by ``lock_timeout`` too, if that is less);
    _PauseOverrun if nothing is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _PauseOverrun()
    ms = max(1, int(left * 1000))
    return f"SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {min(ms, max(1, int(lock_timeout * 1000)))}"


def _bound(deadline: float | None, lock_timeout: float, *conns: psycopg.Connection) -> None:
    """Before a statement of the cut-over on ``conns``: bound it by what is left until
    ``deadline`` now (statement_timeout and lock_timeout count per statement: set once,
    each later statement would get the whole of what was left then); _PauseOverrun if
    nothing is left.  Nothing without a deadline (the catch-up's statements)."""
    if deadline is not None:
        for conn in conns:
            conn.execute(_time_left(deadline, lock_timeout))


# Bulk steps (copy, verify, clean-up) read tables in slices of this many pages
# (16 MB), so that a duty cycle below 1 can rest between them; resting movers
# take slices an eighth of that size, so that each burst of work is short.
_CHUNK_PAGES = 2048
# The least duty a Mover takes: it rests 99 times as long as it works (see Mover._rest).
_MIN_DUTY = 0.01
# The clean-up's duty cycle, whatever the mover's (see _clean_up).
_CLEAN_UP_DUTY = 0.5
# The step of a batch that `abort --target-lost` undid on its source only: its target
# (unreachable then) may still hold copies of the buckets' rows, and ownership a crashed
# cut-over gave it, until `abort` runs again on the aborted move and removes them.
LEFTOVERS = "leftovers"
# Journal entry (no batch step) made when a cut-over begins, before the target may own.
_CUTTING_OVER = "cutting-over"
# Journal entry (no batch step) made by an abort before it undoes a batch on its shards;
# the batch's "aborted" (or LEFTOVERS) entry follows once it is undone.  Without one after
# it (nor any later entry of the batch), the abort stopped (was killed, or failed) in
# between: the batch's capture may be stopped and its copies deleted, whatever its step.
_UNDOING = "undoing"
# Advisory lock (first key; second: the move) on a target, held by a copy and by an abort
# deleting the copies.  Not the catalog's class: the catalog may be the same database.
_COPY_LOCK_CLASS = 0x534A  # "SJ"


# Defaults a DBA may give the role or the database the mover connects as (for the
# application's sessions), which the mover's own sessions must not take (pg_dump resets
# them too): a statement_timeout cancels a slice of a long copy, and a wait for the gate
# below the cut-over's own lock_timeout, which fails the move instead of retrying; an idle
# timeout ends a transaction that waits, open, for the other server (the copy's target
# during the grace period, the verification's target while the source is read); and a
# default isolation above READ COMMITTED takes the cut-over's snapshot before the gate is
# granted, so the changes of the writers it waited for would not move; a lock_timeout fails
# the copy (or the clean-up) that waits for a moment's table lock (the cut-over sets its own).
_SESSION_SETTINGS = ("SET statement_timeout = 0; SET lock_timeout = 0; "
                     "SET idle_in_transaction_session_timeout = 0; SET default_transaction_isolation = 'read committed'")


def _connect(url: Any) -> psycopg.Connection:
    """An autocommit connection to the node at ``url``, with the mover's session settings
    (``_SESSION_SETTINGS``); the attempt gives up after the URL's ``connect_timeout``, else
    after 3 s, as for every node (a host that is gone, or a frozen server, would otherwise
    keep a mover or an abort waiting for minutes)."""
    conn = psycopg.connect(conninfo(url), autocommit=True, **connect_timeout_args(url))
    try:
        conn.execute(_SESSION_SETTINGS + ("; SET idle_session_timeout = 0"
                                          if conn.info.server_version >= 140000 else ""))
    except BaseException:
        conn.close()
        raise
    return conn


def _page_chunks(conn: psycopg.Connection, table: str, pages_per_chunk: int | None = None) -> list[str]:
    """SQL conditions cutting ``table`` into ranges of pages (``ctid``), in order.

    TID range scans read only those pages (PostgreSQL 14 and later); on older
    servers, or for an empty table, the one condition is ``true``.  The last
    range is open-ended, for rows written after the size was read.
    """
    if conn.info.server_version < 140000:
        return ["true"]
    pages = conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                         (_ident(table).as_string(conn),)).fetchone()[0]
    step = pages_per_chunk or _CHUNK_PAGES
    out = []
    for first in range(0, pages, step):
        last = first + step >= pages
        out.append(f"ctid >= '({first},0)'::tid" + ("" if last else f" AND ctid < '({first + step},0)'::tid"))
    return out or ["true"]


def _columns(conn: psycopg.Connection, table: str) -> tuple[dict[str, tuple[str, bool]], list[str]]:
    """The columns of ``table``, in order: name -> (type, as ``format_type`` writes it with
    its modifier; whether it is generated); and its primary key's columns, in the key's
    order.  Read again at each step: a migration may add, drop or retype columns, or change
    the primary key, while a move runs, and a value written to a column added since the
    batch began must move too."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', "
        "array_position(i.indkey::int2[], a.attnum) FROM pg_attribute a "
        "LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (_ident(table).as_string(conn),)).fetchall()
    pk = [r[0] for r in sorted((r for r in rows if r[3] is not None), key=lambda r: r[3])]
    return {r[0]: (r[1], r[2]) for r in rows}, pk


class SchemaMismatch(Exception):
    """A moved table's columns differ between the source and the target (a migration that
    has run on one of them only): its rows cannot move whole, or unchanged."""


def _reread_columns(src: psycopg.Connection, tgt: psycopg.Connection, t: _Table, *,
                    writing: bool = True) -> None:
    """Take ``t``'s columns (those the mover writes: generated ones are computed) from the
    source again (in its transaction's snapshot), and refuse if the target lacks one of
    them.  ``writing`` (rows are about to be written on the target): also if a column has
    another type there, or is generated on one side only.  Rows travel in COPY's binary
    format, which the target reads by its own column's type: a float8 read as a bigint,
    or a timestamp as a timestamptz, would arrive silently changed."""
    on_source, t.pk = _columns(src, t.name)  # (the key too: a migration may have changed it)
    on_target, _ = _columns(tgt, t.name)
    t.columns = [c for c, (_, generated) in on_source.items() if not generated]
    t.types = {c: typ for c, (typ, _) in on_source.items()}
    if not t.pk:
        raise SchemaMismatch(f"table {t.name} has no primary key on the source any more (a migration dropped "
                             "it while the move ran); rows are moved by primary key: add it back, then resume")
    missing = [c for c in t.columns if c not in on_target]
    if missing:
        raise SchemaMismatch(
            f"table {t.name} has column(s) {', '.join(missing)} on the source but not on the target "
            "(a migration has run on one of them only); give both the same columns")
    if not writing:
        return
    for c in on_source.keys() & on_target.keys():
        (src_type, src_gen), (tgt_type, tgt_gen) = on_source[c], on_target[c]
        if src_type != tgt_type or src_gen != tgt_gen:
            on_src = src_type + (" (generated)" if src_gen else "")
            on_tgt = tgt_type + (" (generated)" if tgt_gen else "")
            raise SchemaMismatch(
                f"table {t.name}: column {c} is {on_src} on the source but {on_tgt} on the target "
                "(a migration has run on one of them only); rows would not arrive unchanged: give "
                "both the same column types, then resume")


def _lock_copies(tgt: psycopg.Connection, move_id: int) -> None:
    """Take (for the target's transaction) the lock that copies of ``move_id`` and an
    abort's deletes of them take turns on."""
    tgt.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_COPY_LOCK_CLASS, move_id % 2147483647))


# Reads of the reference tables' copies before a move is refused for their difference.
_REFERENCE_READS = 5


def _committed_position(conn: psycopg.Connection) -> str:
    """The server's WAL position, past every commit it has acknowledged (the flushed position
    is not, under synchronous_commit = off: a replica that replayed that far may lack the
    commit), as a replica's replay position shows it once it has replayed everything before
    it (replay_target): its streaming replicas reach it once the WAL writer has flushed it,
    without waiting for more writes."""
    return format_lsn(replay_target(parse_lsn(conn.execute(WAL_POSITION_SQL).fetchone()[0])))


# The mover's own data statements (the copy, applying changes, the clean-up, an abort's
# deletes) run as logical replication's apply does: ordinary user triggers and the
# foreign keys' triggers do not fire (CHECK, NOT NULL and unique constraints still hold).
_REPLICA_ON = "SET LOCAL session_replication_role = replica"
_REPLICA_OFF = "SET LOCAL session_replication_role = DEFAULT"
# The relations of table ``c``: itself, and its partitions if it is partitioned.
_TREE = "(SELECT c.oid AS relid UNION SELECT relid FROM pg_partition_tree(c.oid))"
# CONFIGURED_TABLES for the mover's psycopg connections (its parameters by name).
_CONFIGURED_PG = CONFIGURED_TABLES.replace(":t", "%(t)s").replace(":q", "%(q)s")


def _ident(table: str) -> sql.Identifier:
    """A configured table's name as a psycopg identifier (``archive.users``: qualified)."""
    return sql.Identifier(*table_parts(table))


def _may_replicate(conn: psycopg.Connection) -> bool:
    """Whether this session may set ``session_replication_role`` (a superuser, or on
    PostgreSQL 15 and later a role granted ``SET ON PARAMETER session_replication_role``)."""
    try:
        with conn.transaction():
            conn.execute(_REPLICA_ON)
            raise psycopg.Rollback()
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def _may_replicate_sa(conn: Any) -> bool:
    """:func:`_may_replicate` on a SQLAlchemy connection (a savepoint of its transaction)."""
    return _may_replicate(conn.connection.dbapi_connection)


class _KeyClash(RebalanceError):
    """A moved row's key (or another unique value) is held by a row of another bucket on
    the target: the batch cannot switch until the keys are made unique across shards."""


class _UniqueViolation(Exception):
    """Applying changes to ``table`` violated a unique constraint (see ``_clash_error``)."""

    def __init__(self, table: str, whole: bool, error: psycopg.errors.UniqueViolation) -> None:
        super().__init__(str(error))
        self.table, self.whole, self.error = table, whole, error


def _unique_detail(e: psycopg.errors.UniqueViolation) -> str:
    diag = e.diag
    detail = (diag.message_detail or "").strip().rstrip(".")
    return f"{detail} (constraint {diag.constraint_name})" if diag.constraint_name else detail


# A moved row meeting a row of another bucket on the target: a unique constraint's
# violation, or an exclusion constraint's (EXCLUDE USING gist (during WITH &&)).
_CLASHES = (psycopg.errors.UniqueViolation, psycopg.errors.ExclusionViolation)


def _clash_error(table: str, e: psycopg.errors.UniqueViolation, where: str) -> _KeyClash:
    if isinstance(e, psycopg.errors.ExclusionViolation):
        return _KeyClash(
            f"table {table}: {where} conflicts, under an exclusion constraint, with a row of another "
            f"bucket already on the target shard ({_unique_detail(e)}); the values an exclusion "
            "constraint of a moved table keeps apart must be kept apart across shards (include "
            "the shard key in the constraint)")
    return _KeyClash(
        f"table {table}: {where} has the primary key or a unique value of a row of another bucket "
        f"already on the target shard ({_unique_detail(e)}); the primary keys and unique values of "
        "moved tables must be unique across shards (not per-shard sequences)")


def _address(url: Any) -> str:
    """``host:port`` of a shard's URL (no user, no password), for messages naming a server."""
    u = make_url(url) if isinstance(url, str) else url
    return f"{u.host}:{u.port or 5432}" if u.host else str(u.database or "")


def _masked_reason(error: BaseException, cluster: Cluster) -> str:
    """The first line of ``error``'s message, passwords masked."""
    return (mask_secrets(str(error), cluster).strip().splitlines() or [""])[0]


def mask_secrets(message: str, cluster: Cluster) -> str:
    """``message`` with every configured password replaced by ``***`` where a URL
    (``user:PASSWORD@``, ``?password=PASSWORD``), a connection string (``password=PASSWORD``,
    quoted or not) or connection arguments (``'password': 'PASSWORD'``) would carry it, as
    written or percent-encoded; not every occurrence of its letters (docker compose's
    default password ``shardkit`` is also the role, the schema and the command its hints
    name)."""
    urls = [cluster.config.catalog_url] + [u for s in cluster.config.shards for u in (s.primary, *s.replicas)]
    for url in urls:
        if url is not None and url.password:
            pw = str(url.password)
            # (Percent-encoded as a URL string holds it, SQLAlchemy's rendering among them:
            # quote(safe=" +") in the user info, quote_plus in the query string.)
            for form in {re.escape(pw), re.escape(quote(pw, safe="")), re.escape(quote(pw, safe=" +")),
                         re.escape(quote_plus(pw)),
                         re.escape(pw.replace("\\", "\\\\").replace("'", "\\'"))}:
                message = re.sub(
                    rf"(?<=:){form}(?=@)|(?P<key>(?i:password)['\"]?\s*[:=]\s*['\"]?){form}(?![^\s&'\",;)}}])",
                    lambda m: (m.group("key") or "") + "***", message)
    return message


def check_live_map(cluster: Cluster, current: Any) -> None:
    """Refuse to plan or move against a catalog map the config does not fit (another
    bucket_count, or shards it does not define): rows would be placed by a different map
    than the routers use."""
    with_bucket_map(cluster.file_config, current.bucket_map, current.slices)


def _fits_live_map(cluster: Cluster, catalog: Catalog) -> None:
    """Refuse to resume or abort a move with a config the catalog's map does not fit: the
    mover computes rows' buckets with the config's ``bucket_count``, and another count
    would copy, apply, verify and delete other rows than the batch's buckets hold."""
    current = catalog.current_map()
    if current is not None:
        check_live_map(cluster, current)


def refuse_unknown_targets(cluster: Cluster, plan: Plan | SlicePlan) -> None:
    """Refuse a plan (an edited or an old one) that moves buckets to a shard the config
    does not define."""
    gained = {s.shard for s in plan.gained} if isinstance(plan, SlicePlan) else set()
    unknown = sorted(({m.target for m in plan.moves} | gained) - set(cluster.shard_names))
    if unknown:
        raise RebalanceError(f"the plan moves buckets to {', '.join(unknown)}, which the config "
                             "does not define; add the shard to the config file first")


def refuse_onto_leftovers(conn: Any, plan: Plan | SlicePlan) -> None:
    """Refuse (on catalog connection ``conn``) a plan moving buckets to a shard that still
    holds leftovers of them from a move aborted with ``--target-lost``: the copy would
    land on those rows."""
    if not plan.moves or isinstance(plan, SlicePlan):
        return  # (leftovers are hash buckets: a slice move cannot leave any)
    onto = {(m.bucket, m.target) for m in plan.moves}
    for move_id, batch, target, buckets in conn.execute(text(
            "SELECT b.move_id, b.batch, b.target, b.buckets FROM shardkit_catalog.move_batches b "
            "JOIN shardkit_catalog.moves m ON m.id = b.move_id "
            "WHERE b.step = :s AND b.buckets && CAST(:b AS integer[]) "
            "AND coalesce(m.plan->>'kind', '') <> 'slices' ORDER BY b.move_id, b.batch"),
            {"s": LEFTOVERS, "b": sorted({m.bucket for m in plan.moves})}):
        clash = sorted(b for b in buckets if (b, target) in onto)
        if clash:
            raise RebalanceError(
                f"the plan moves buckets {clash[:10]} to {target}, which still holds rows of them "
                f"left by move {move_id} (batch {batch}, aborted with --target-lost while {target} "
                f"was unreachable); a copy onto them would clash: once {target} is reachable, run "
                f"`shardkit rebalance abort {move_id}` to remove them, then plan again",
                move_id=move_id)


def refuse_taken_slice_numbers(plan: Plan | SlicePlan, live_slices: Sequence[Any], version: int) -> None:
    """Refuse a slice plan whose split numbers a new slice with a number that a slice of
    another group has taken since the plan was made (every group's slices share one
    numbering: a shard owns numbers): the plan is stale."""
    if not isinstance(plan, SlicePlan):
        return
    others = {s.id: s for s in live_slices if s.group != plan.group}
    taken = sorted(s.id for s in plan.split if s.id in others)
    if taken:
        raise RebalanceError(
            f"the plan is stale: it numbers its new slice {taken[0]}, which is now slice "
            f"{taken[0]} of group {others[taken[0]].group} ({others[taken[0]].describe()}; live map "
            f"version {version}); make a new plan")


def refuse_published_gained(plan: Plan | SlicePlan, live_slices: Sequence[Any], version: int) -> None:
    """Refuse a plan that only gives a shard keys no slice held (:attr:`SlicePlan.gained`)
    once the live map has its slices (a stored plan applied before): nothing is left to do."""
    if not isinstance(plan, SlicePlan) or plan.moves or not plan.gained:
        return
    if tuple(s for s in live_slices if s.group == plan.group) == plan.split:
        raise RebalanceError(
            f"the plan's new slices of group {plan.group} ("
            + ", ".join(f"{s.describe()} on {s.shard}" for s in plan.gained)
            + f") are live already (map version {version}); nothing to do")


def _key_types(cluster: Cluster, config: Any, group: str,
               shards: Iterable[str] | None = None) -> list[tuple[Guarded, str]]:
    """(table, type of its key column) of each table of range or list group ``group``, as
    each of ``shards`` (default: every shard) that has the table holds it (once per
    distinct pair)."""
    tables = [g for g in guarded_tables(config) if g.group == group]
    out: list[tuple[Guarded, str]] = []
    for shard in (cluster.shard_names if shards is None else shards) if tables else ():
        with cluster.primary(shard).connect() as conn:
            for g in tables:
                if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_sql(g.table)}).scalar():
                    continue
                kind = table_shape(conn, g.table)[2].get(g.key)
                if kind is not None and (g, kind) not in out:
                    out.append((g, kind))
    return out


def _refuse_beyond_bigint(group: str, keys: Iterable[Any], types: Callable[[], list[tuple[Guarded, str]]],
                          what: str, fix: str) -> None:
    """Refuse ``keys`` (bounds or values of ``group``) outside bigint's range if a table of the
    group has an integer key column (``types()``, asked only then): no row holds such a key,
    and every shard's guard compares a row's key with each of its group's bounds and values
    as a bigint (shardkit._guard), so once they are written there, every write of the group
    fails with "out of range for type bigint" (an abort keeps a split)."""
    beyond = sorted(x for x in keys if isinstance(x, int) and not isinstance(x, bool)
                    and not -(2**63) <= x < 2**63)
    if not beyond:
        return
    for g, kind in types():
        if kind in INT_KEY_TYPES:
            raise RebalanceError(
                f"group {group}: {what} {beyond[0]} is beyond the range of {g.table}.{g.key} "
                f"({type_label(kind)}; bigint holds -9223372036854775808 to 9223372036854775807): no row "
                "has it, and the shards compare the group's keys with its bounds and values as "
                f"bigint, so it would make every write of the group fail; {fix}")


# The keys a key column of each integer type holds (a domain's: its base type's), and, by
# their text form (as slices compare them), those of a uuid column.
_INT_SPANS: dict[str, tuple[int, int]] = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1),
                                          "int8": (-(2**63), 2**63 - 1)}
_UUID_SPAN = ("00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff")


def key_span(kinds: Sequence[str]) -> tuple[Any, Any]:
    """(lowest, highest) key that key columns of types ``kinds`` (the tables of one group) can
    hold between them; None for an end one of them does not have (numeric, text, ...)."""
    if kinds and all(k in _INT_SPANS for k in kinds):
        return min(_INT_SPANS[k][0] for k in kinds), max(_INT_SPANS[k][1] for k in kinds)
    if kinds and all(k == "uuid" for k in kinds):
        return _UUID_SPAN
    return None, None


def _refuse_keyless_moves(plan: SlicePlan, types: list[tuple[Guarded, str]]) -> None:
    """Refuse a plan that moves a slice no row can be in: the lower side of a split at
    bigint's minimum on a bigint column, say, the upper side of one above an int4
    column's maximum, or a list value above it.  Nothing would move, yet the plan would
    be reported done."""
    lowest, highest = key_span([kind for _, kind in types])
    gained = {s.id for s in plan.gained}
    for s in keyless_moves(plan, lowest, highest):
        columns = ", ".join(f"{g.table}.{g.key} ({type_label(kind)})" for g, kind in types)
        span = "" if lowest is None else f", whose keys run from {lowest!r} to {highest!r}"
        if s.values:
            nothing = (f"{'no value of it' if len(s.values) > 1 else repr(s.values[0])} "
                       f"lies between {lowest!r} and {highest!r}")
            fix = "move a value the column can hold"
        elif s.lower is not None and highest is not None and s.lower > highest:
            nothing, fix = f"nothing lies at or above {s.lower!r}", f"split at a key of at most {highest!r}"
        else:
            nothing = f"nothing lies below {s.upper!r}"
            fix = (f"to move the keys below a key (--lower), split at a key above {s.upper!r}; to move "
                   f"the keys from {s.upper!r} up, leave out --lower")
        if s.id in gained:
            raise RebalanceError(
                f"group {plan.group}: the plan ({plan.reason}) gives {s.shard} slice {s.id} ({s.describe()}), "
                "which holds no key "
                f"of {columns or 'its key column'}{span}: {nothing}, so no row could ever be written to it; "
                f"{'give a shard a value the column can hold' if s.values else 'give a shard a key the column can hold'}")
        raise RebalanceError(
            f"group {plan.group}: the plan moves slice {s.id} ({s.describe()}), which holds no key of "
            f"{columns or 'its key column'}{span}: {nothing}, so the move would move no row; {fix}")


def _canonical_uuid(text_: str) -> str | None:
    """``text_`` as PostgreSQL prints the uuid it names (lowercase, hyphenated), or None."""
    try:
        return str(uuid.UUID(text_.strip()))
    except ValueError:
        return None


def slice_key(cluster: Cluster, group: str, key: Any, option: str, target: str) -> Any:
    """A ``--split`` or ``--move-value`` key of ``group`` as its key column holds it (read on
    shard ``target``, which the move needs): a string on a uuid column as PostgreSQL prints
    the uuid (slices of a uuid column compare keys by that text, in code point order:
    ``C0...`` sorts below ``a0...``); refused if it names no uuid."""
    if not isinstance(key, str):
        return key
    for g, kind in _key_types(cluster, cluster.config, group, [target]):
        if kind == "uuid":
            canon = _canonical_uuid(key)
            if canon is None:
                raise RebalanceError(f"{option}: {key!r} is not a uuid, and group {group}'s key column "
                                     f"{g.table}.{g.key} is {type_label(kind)}")
            return canon
    return key


def check_slice_plan(cluster: Cluster, plan: Plan | SlicePlan) -> None:
    """Refuse a slice plan the shards cannot carry out as planned, reading its group's key
    columns on the shards it moves between: a group whose bounds or values the guard cannot
    compare with its key column (its tables are left unguarded: the group cannot move
    online); a new bound or value beyond bigint's range on an integer column (see
    _refuse_beyond_bigint); on a uuid column, a new bound or value not written as
    PostgreSQL prints a uuid."""
    if not isinstance(plan, SlicePlan) or not (plan.moves or plan.gained):
        return  # (a plan that moves nothing writes nothing either: not even its split)
    gained = plan.gained
    # A plan giving a shard new keys reads every shard (refuse_rows_of_gained counts them there).
    types = _key_types(cluster, cluster.config, plan.group,
                       None if gained else sorted(({m.source for m in plan.moves} | {m.target for m in plan.moves})
                                                  & set(cluster.shard_names)))
    for g, kind in types:
        if g.value_kind and not slice_comparable(g.value_kind, kind):
            noun, how = ("strings", "by their text form") if g.value_kind == "str" else ("integers", "as numbers")
            raise RebalanceError(
                f"group {plan.group} cannot move online: {g.table}.{g.key} is {type_label(kind)}, and the group's "
                f"bounds or values are {noun}, which the shards' guard would compare with its keys "
                f"{how}, not as PostgreSQL compares {kind} values, so {g.table} is left without the "
                "ownership guard, on purpose, and the group's slices stay where they are (slices move "
                "for integer bounds on integer or numeric columns, and string bounds on columns whose "
                "keys are strings: text, varchar, enums, uuid)")
    before = {x for s in plan.old for x in (s.lower, s.upper, *s.values)}
    new = [x for s in plan.split for x in (s.lower, s.upper, *s.values) if x is not None and x not in before]
    _refuse_beyond_bigint(plan.group, new, lambda: types, "key",
                          "split at (or move) a key the column can hold")
    for g, kind in types:
        if kind == "uuid":
            for x in new:
                if isinstance(x, str) and (canon := _canonical_uuid(x)) != x:
                    raise RebalanceError(
                        f"group {plan.group}: key {x!r} is "
                        + ("not a uuid" if canon is None else "not written as PostgreSQL prints a uuid")
                        + f", and {g.table}.{g.key} is {type_label(kind)}, whose keys the slices compare by that text "
                        "form" + ("" if canon is None else f": write {canon}"))
    _refuse_keyless_moves(plan, types)
    if gained:
        refuse_rows_of_gained(cluster, plan)


def _keys_condition(g: Guarded, type_name: str, s: Any) -> tuple[str, dict[str, Any], str]:
    """(SQL condition, its parameters, a setting to run it with) that a row of ``g`` (key column
    of type ``type_name``) has a key of slice ``s``, compared as the guard's slice function
    compares them (shardkit._guard._slice_function_body)."""
    k, bound, floats = slice_key_sql(g.value_kind, type_name, '"' + g.key.replace('"', '""') + '"')
    setting = "SET LOCAL extra_float_digits = 1" if floats else ""

    def param(name: str) -> str:
        return bound(f"CAST(:{name} AS text)")

    if s.values:
        return (f"{k} IN ({', '.join(param(f'v{i}') for i in range(len(s.values)))})",
                {f"v{i}": str(v) for i, v in enumerate(s.values)}, setting)
    conds, params = [], {}
    if s.lower is not None:
        conds.append(f"{k} >= {param('lo')}")
        params["lo"] = str(s.lower)
    if s.upper is not None:
        conds.append(f"{k} < {param('hi')}")
        params["hi"] = str(s.upper)
    return (" AND ".join(conds) or f"{k} IS NOT NULL"), params, setting


def refuse_rows_of_gained(cluster: Cluster, plan: SlicePlan) -> None:
    """Refuse a plan giving a shard keys no slice held (:attr:`SlicePlan.gained`) while a
    shard holds rows with such keys: routers and the guard refuse those keys, so such a row
    was written around shardkit (with the guard off, or before `rebalance init`), maybe on
    another shard than the plan gives the keys, where no read by key would find it."""
    gained = plan.gained
    tables = [g for g in guarded_tables(cluster.config) if g.group == plan.group]
    found: list[str] = []
    for shard in cluster.shard_names:
        with cluster.primary(shard).begin() as conn:  # (read only: a SET LOCAL ends with it)
            for g in tables:
                if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_sql(g.table)}).scalar():
                    continue
                kind = table_shape(conn, g.table)[2].get(g.key)
                if kind is None or not slice_comparable(g.value_kind, kind):
                    continue
                for sl in gained:
                    cond, params, setting = _keys_condition(g, kind, sl)
                    if setting:
                        conn.exec_driver_sql(setting)
                    n = conn.execute(text(f"SELECT count(*) FROM {table_sql(g.table)} WHERE {cond}"),
                                     params).scalar()
                    if n:
                        found.append(f"{counted(n, 'row')} of {sl.describe()} in {g.table} on {shard}")
    if found:
        raise RebalanceError(
            f"group {plan.group}: the plan gives {', '.join(f'{s.describe()} to {s.shard}' for s in gained)}, keys "
            f"no slice held, yet rows have them: {'; '.join(found)}; routers and the ownership guard refuse such "
            "keys, so these rows were written around shardkit (or before `shardkit rebalance init`) and may not be "
            "where the plan puts their keys; run `shardkit verify` to list them, move or delete them, then plan "
            "again (nothing was published)")


def _need_catalog(cluster: Cluster, *, initialised: bool = False) -> Catalog:
    """The cluster's catalog; with ``initialised``, one that ``rebalance init`` has set up."""
    if cluster.catalog is None:
        raise RebalanceError(
            "this cluster has no catalog, so its bucket map is the config file's and cannot be "
            "rebalanced online; add [catalog] url = \"postgresql+psycopg://...\" to the config and "
            "run `shardkit rebalance init`")
    if initialised and not cluster.catalog.initialised():
        raise RebalanceError("the catalog is not set up yet: run `shardkit rebalance init` first")
    return cluster.catalog


def _shard_url(cluster: Cluster, shard: str, move_id: int, batch: int, role: str) -> Any:
    """The primary URL of ``shard``, the ``role`` (source or target) of a batch of move
    ``move_id``; refused clearly when the config no longer defines it."""
    try:
        return cluster.config.shard(shard).primary
    except KeyError:
        raise RebalanceError(
            f"move {move_id}: shard {shard}, the {role} of batch {batch}, is not in the config (renamed "
            "or removed since the move started); put it back, with its URL, then resume or abort "
            f"the move (`shardkit rebalance resume {move_id}` / `abort {move_id}`)", move_id=move_id) from None


def _refuse_configured_beyond_bigint(cluster: Cluster, slices: Sequence[Any]) -> None:
    """Refuse (before ``init`` publishes them) a range group's configured bounds or a list
    group's values beyond bigint's range on an integer key column (see _refuse_beyond_bigint)."""
    for group, mine in by_group(slices).items():
        field = "ranges" if mine[0].kind == "range" else "values"
        _refuse_beyond_bigint(
            group, [x for s in mine for x in (s.lower, s.upper, *s.values)],
            lambda group=group: _key_types(cluster, cluster.file_config, group),  # type: ignore[misc]
            "bound" if field == "ranges" else "value",
            f"give groups.{group}.{field} in the config file {'bounds' if field == 'ranges' else 'values'} "
            "the column can hold (a range without `from` or `to` is open at that end); nothing was published")


def init(cluster: Cluster) -> int:
    """Create the catalog, store the config's map as version 1 (if there is none yet) and
    install the ownership guard on every shard.  Idempotent.  Refused while a move runs; a
    move starting meanwhile waits until every shard has its ownership from the map init read.
    Returns the live map version."""
    catalog = _need_catalog(cluster)
    # Refuse what the guard cannot cover (a composite hash key) before writing anything:
    # a map published without a guard behind it is a half-done init.
    guarded_tables(cluster.file_config)
    catalog.ensure_schema()
    with catalog.engine.begin() as conn:
        # Moves start under this lock (Mover.start): none starts, so none switches a
        # bucket, until every shard's ownership has been reset from the map read here.
        conn.exec_driver_sql("LOCK TABLE shardkit_catalog.moves IN EXCLUSIVE MODE")
        running = conn.execute(text(
            "SELECT min(id) FROM shardkit_catalog.moves WHERE state = 'running'")).scalar()
        if running is not None:
            raise RebalanceError(
                f"move {running} is running; init resets each shard's ownership from the map, so "
                f"finish (`shardkit rebalance resume {running}`) or abort it first", move_id=running)
        current = catalog.current_map(conn)
        if current is None:
            slices = initial_slices(cluster.file_config.groups)
            _refuse_configured_beyond_bigint(cluster, slices)
            catalog.publish_map(conn, cluster.file_config.bucket_map, "initial map from the config file",
                                slices=slices)
        else:
            # Range and list groups the catalog does not know yet (added to the config
            # since, or a catalog made before slices existed) start as configured.
            have = current.slices
            full = add_missing_groups(have, cluster.file_config.groups)
            _refuse_configured_beyond_bigint(cluster, full[len(have):])
            if full != have:
                catalog.publish_map(conn, current.bucket_map,
                                    "slices of range and list groups from the config file", slices=full)
        current = catalog.current_map(conn)
        assert current is not None
        config = with_bucket_map(cluster.file_config, current.bucket_map, current.slices)
        names = sorted({g.table for g in guarded_tables(config)})
        for shard in cluster.shard_names:
            owned = [b for b, s in enumerate(config.bucket_map) if s == shard] + \
                [s.id for s in config.slices if s.shard == shard]
            with cluster.primary(shard).begin() as shard_conn:
                found = set(shard_conn.execute(text(f"SELECT n.tbl FROM {CONFIGURED_TABLES}"),
                                               configured_tables(names)).scalars())
                install_guard(shard_conn, config, owned, config.slices)
            if missing := [t for t in names if t not in found]:
                # A shard added to the config before its schema was created: said here,
                # not first by the move that refuses it.
                log.warning("%s lacks table(s) %s, so they are not guarded there and moves to or from %s "
                            "are refused: create the schema (`shardkit migrate upgrade`; a migration "
                            "calling op.install_shardkit_guard() guards the tables it creates), or run "
                            "`shardkit rebalance init` again once it exists", shard, ", ".join(missing), shard)
    version = cluster.refresh_map()
    return current.version if version is None else version


# -- the mover ---------------------------------------------------------------------


@dataclass
class _Table:
    name: str
    key: str
    key_type: str
    columns: list[str]
    pk: list[str]
    bucket_sql: str  # the row's bucket (or slice), for WHERE clauses
    guarded: Guarded
    # Its name and its partitions' (guards installed before the guard logged the configured
    # name logged the partition's): the names its changes may carry in shardkit.changes.
    names: tuple[str, ...] = ()
    # Whether a foreign key references it: without session_replication_role, its changed
    # rows are replaced in place (upserted), not deleted and inserted again.
    referenced: bool = False
    # For a scan that computes every row's bucket of an integer hash key: a LATERAL item
    # for its FROM clause and the bucket over it (_sql.int8_bucket_scan), about twice as
    # fast as bucket_sql; None: bucket_sql.
    scan: tuple[str, str] | None = None
    # The columns' types (``format_type``), read again with the columns: the logged keys
    # are read back by them (see ``logged_match``).
    types: dict[str, str] = field(default_factory=dict)

    def logged_match(self, keys: list[dict[str, Any]],
                     ref: Callable[[str], sql.Composable] = sql.Identifier) -> sql.Composable:
        """A condition true for the rows whose primary key is among ``keys`` (jsonb objects,
        as the guard logs them), the table's columns named by ``ref``.  Each key is matched
        by the columns it names, typed as the table's: a migration may have changed the
        primary key since the key was logged (added the shard key to it, say), and the rows
        matching the columns the key has include its row (the mover re-reads them whole).
        Refused (SchemaMismatch) when the table no longer has one of those columns.  Not
        ``jsonb_populate_recordset(NULL::t, ...)``: that runs every column the keys lack
        through its type's input, and a column of a domain declared NOT NULL refuses the NULL.
        (The keys are literals: run the statement without parameters, or a % in a key
        would be read as a placeholder.)"""
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for k in keys:
            shapes[tuple(sorted(k))].append(k)
        gone = sorted({c for shape in shapes for c in shape} - set(self.types))
        if gone:
            raise SchemaMismatch(
                f"table {self.name}: rows written during the move were recorded under primary-key "
                f"column(s) {', '.join(gone)}, which the table no longer has (a migration renamed or "
                "dropped them while the move ran), so those writes cannot be found to move them; give "
                "the table the column(s) back and resume, or abort the move (before its batch switches) "
                "and plan it again")
        return sql.SQL("({})").format(sql.SQL(" OR ").join(
            sql.SQL("({}) IN (SELECT {} FROM jsonb_to_recordset({}::jsonb) AS _shardkit_k ({}))").format(
                sql.SQL(", ").join(ref(c) for c in shape),
                sql.SQL(", ").join(map(sql.Identifier, shape)),
                sql.Literal(json.dumps(group)),
                sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(self.types[c]))
                                   for c in shape))
            for shape, group in shapes.items()) if shapes else sql.SQL("false"))

    def scan_sql(self) -> tuple[str, str]:
        """``(from_extra, bucket)`` for a scan of every row: SQL to write right after the
        table in its FROM clause (the table alone there), and the row's bucket (or slice)
        in that scan."""
        return self.scan if self.scan is not None else ("", self.bucket_sql)

    def qualified(self, columns: list[str]) -> sql.Composable:
        """``columns`` named with the table's name, for a scan's select list: the scan's
        LATERAL item has a column too (``_shardkit_h``), which a table may have."""
        return sql.SQL(", ").join(sql.Identifier(*table_parts(self.name), c) for c in columns)


def _move_group(conn: Any, move_id: int) -> str | None:
    """The range or list group whose slices move ``move_id`` moves (None: hash buckets)."""
    return conn.execute(text("SELECT plan->>'group' FROM shardkit_catalog.moves WHERE id = :m "
                             "AND plan->>'kind' = 'slices'"), {"m": move_id}).scalar()


def _moved_tables(cluster: Cluster, conn: psycopg.Connection, shard: str,
                  group: str | None = None, *, present_only: bool = False) -> list[_Table]:
    """The tables that move: the hash-sharded ones (``group`` None) or those of range or
    list group ``group``; parents before children (foreign keys among them).
    ``present_only``: those that exist on ``shard`` (else one missing is refused)."""
    out: dict[str, _Table] = {}
    with cluster.primary(shard).connect() as sa_conn:
        for g in guarded_tables(cluster.config):
            if (g.kind != "hash") if group is None else (g.group != group):
                continue
            if present_only and not sa_conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"),
                                                    {"t": table_sql(g.table)}).scalar():
                continue
            columns, pk, types = table_shape(sa_conn, g.table, keys=[g.key])
            if not pk:
                raise RebalanceError(f"table {g.table} has no primary key; rows are moved by primary key")
            out[g.table] = _Table(g.table, g.key, types[g.key], columns, pk,
                                  unit_expression(g, types[g.key], cluster.config.bucket_count), g,
                                  (g.table,))
            if g.kind == "hash" and types[g.key] in INT_KEY_TYPES and not sa_conn.execute(text(
                    # An index on shardkit.bucket(key, n) lets a pass read only the batch's
                    # rows (README: Rebalancing): keep the expression it indexes.
                    # (Found by the index's dependency on the function, whatever the
                    # search_path makes pg_get_indexdef() print.)
                    "SELECT EXISTS (SELECT FROM pg_index i JOIN pg_depend d "
                    "ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid "
                    "AND d.refclassid = 'pg_proc'::regclass JOIN pg_proc p ON p.oid = d.refobjid "
                    "WHERE i.indrelid = to_regclass(:t) AND p.proname = 'bucket' "
                    "AND p.pronamespace = 'shardkit'::regnamespace)"),
                    {"t": table_sql(g.table)}).scalar():
                out[g.table].scan = int8_bucket_scan(sql.Identifier(g.key).as_string(conn),
                                                     cluster.config.bucket_count)
    tree: dict[str, list[tuple[int, str]]] = defaultdict(list)
    named = configured_tables(out)
    for table, oid, part in conn.execute(
            "SELECT n.tbl, t.relid::oid, CASE WHEN t.relid <> c.oid THEN p.relname END "
            f"FROM {_CONFIGURED_PG} "
            f"CROSS JOIN LATERAL {_TREE} t JOIN pg_class p ON p.oid = t.relid "
            "WHERE c.relkind IN ('r', 'p')", named):
        tree[table].append((oid, part))
    referenced = {r[0] for r in conn.execute(
        "SELECT DISTINCT confrelid FROM pg_constraint WHERE contype = 'f' AND confrelid = ANY(%s::oid[])",
        ([oid for parts in tree.values() for oid, _ in parts],))}
    for table, parts in tree.items():
        t = out[table]
        t.names = (table, *sorted({p for _, p in parts if p is not None} - {table}))
        t.referenced = any(oid in referenced for oid, _ in parts)
    parents: dict[str, set[str]] = {t: set() for t in sorted(out)}
    for child, parent in conn.execute(
            f"WITH n AS (SELECT n.tbl, c.oid AS rel FROM {_CONFIGURED_PG}) "
            "SELECT a.tbl, b.tbl FROM pg_constraint k JOIN n a ON a.rel = k.conrelid "
            "JOIN n b ON b.rel = k.confrelid WHERE k.contype = 'f' AND a.rel <> b.rel", named):
        parents[child].add(parent)
    try:
        ordered = list(graphlib.TopologicalSorter(parents).static_order())
    except graphlib.CycleError:  # foreign keys in a cycle: moved only with session_replication_role
        ordered = sorted(out)
    return [out[t] for t in ordered]


def _refuse_unknown_guarded(cluster: Cluster, src: psycopg.Connection, shard: str, move_id: int) -> None:
    """Refuse to copy or switch buckets off ``shard`` while it has a table carrying the
    ownership guard that the config does not configure: a migration of a newer deploy
    created and guarded it (``op.install_shardkit_guard()``) while this mover runs with an
    older config.  Its rows of the buckets would neither move nor be deleted, and stay on a
    shard that no longer owns them, unseen by the new owner's readers."""
    configured = configured_tables(g.table for g in guarded_tables(cluster.config))
    unknown = [r[0] for r in src.execute(
        "SELECT t.tgrelid::regclass::text FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid "
        "WHERE t.tgname = 'shardkit_guard' AND NOT r.relispartition "
        f"AND t.tgrelid NOT IN (SELECT c.oid FROM {_CONFIGURED_PG}) ORDER BY 1", configured)]
    if unknown:
        raise RebalanceError(
            f"move {move_id}: table(s) {', '.join(unknown)} on {shard} have shardkit's ownership guard "
            "(a migration installed it) but the config this mover runs with does not configure them, "
            "so their rows of the moving buckets would stay behind on a shard that no longer owns "
            "them; nothing of the batch switched: run `shardkit rebalance resume "
            f"{move_id}` with the config that configures them (it copies them too), or, if a table "
            "is no longer sharded, drop its trigger (`DROP TRIGGER shardkit_guard ON <table>`)",
            move_id=move_id)


def _trigger_may_set(language: str, source: str | None, args: list[bytes], columns: list[str]) -> bool:
    """Whether a BEFORE row trigger's function may change one of ``columns`` of the row (or
    the whole row).  PL/pgSQL is read: an assignment to NEW.column or NEW, a SELECT ...
    INTO NEW..., or a RETURN of another row than NEW, OLD or NULL.  Built-in and C
    functions (tsvector_update_trigger, moddatetime, ...) change the columns their
    arguments name.  Other languages cannot be read: they may."""
    names = {c.lower() for c in columns}
    if any(a.decode(errors="replace").lower() in names for a in args if a):
        return True
    if language in ("internal", "c"):
        return False
    if language != "plpgsql" or source is None:
        return True
    code = re.sub(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", " ", source, flags=re.S)  # (comments, strings)
    col = "|".join(re.escape(c) for c in columns)
    target = rf'new\s*(?:\.\s*"?(?:{col})"?)?'
    return bool(re.search(rf'(?:^|;|\b(?:then|else|begin|loop)\b)\s*{target}\s*:?=(?!=)'
                          rf'|\binto\s+(?:strict\s+)?{target}\b'
                          r'|\breturn\s+(?!(?:new|old|null)\s*;)\S', code, flags=re.I | re.M))


def _catch_up_ends(rounds: Sequence[int]) -> str | None:
    """Why the catch-up ends after rounds that applied ``rounds`` changes each (the last
    one just finished), or None to run another round.

    * "below threshold": the last round applied fewer than _CUTOVER_BELOW changes;
    * "no longer shrinking": the last two rounds each applied at least as many changes
      as the fewest any round before them did.  The writers then log, while a round
      runs, about as many changes as it applies: more rounds would only repeat it.
      Two rounds and the fewest so far, because a single round that does not shrink is
      noise (a burst of writes, a round slowed by other work on the server), and
      rounds that only wobble (700, 690, 705, 695, ...) are never twice in a row
      larger than the round just before;
    * "round limit": _CATCH_UP_ROUNDS rounds, whatever they applied.

    The cut-over then applies, with the batch's writes paused, what the writers logged
    while the last round ran (they log nothing more during the pause): once the rounds
    no longer shrink, about one round's worth, applied without writers competing, so
    the pause is bounded by about one round's work.  More rounds would not have made it
    smaller: in that state the round limit reached the cut-over with as much left, only
    later (BENCHMARKS.md section 4: rounds of about 700 changes for 105 s, then a 27 ms
    pause)."""
    if rounds[-1] < _CUTOVER_BELOW:
        return "below threshold"
    if len(rounds) >= 3 and min(rounds[-2:]) >= min(rounds[:-2]):
        return "no longer shrinking"
    if len(rounds) >= _CATCH_UP_ROUNDS:
        return "round limit"
    return None


class _MoveLock:
    """The move's advisory lock (``MOVER_LOCK_CLASS``, the move's id), held by a catalog
    session of the process that runs the move (a mover) or undoes it (an abort): while that
    session lives, a second mover or abort is refused, and `rebalance status` shows that a
    process holds the move.

    A catalog restarted (or failed over, or a dropped connection) ends the session and so
    frees the lock while the process still runs (its pool reconnects: it sees nothing).
    :func:`_fence`, in each of the process's catalog writes, checks that the session still
    holds the lock and takes it again on a new session (see :meth:`again`), or stops the
    process if another took the move meanwhile.
    """

    def __init__(self, catalog: Catalog, move_id: int, who: str) -> None:
        self.catalog, self.move_id, self.who = catalog, move_id, who  # who: "mover" or "abort"
        self.conn: Any = None   # the session holding the lock
        self.pid = 0            # its backend

    def take(self) -> bool:
        """Take the lock on a new catalog session; False if another process holds it."""
        conn = self.catalog.engine.connect()
        try:
            got, pid = conn.execute(text("SELECT pg_try_advisory_lock(:c, :m), pg_backend_pid()"),
                                    {"c": MOVER_LOCK_CLASS, "m": self.move_id}).one()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self.conn, self.pid = conn, pid
        return True

    def again(self, note: str = "") -> None:
        """Take the lock again (the session holding it was lost), or stop: another process
        holds the move now."""
        old = self.conn
        if not self.take():
            raise RebalanceError(
                f"move {self.move_id}: this {self.who} lost its catalog session (and the move's lock with "
                f"it) and another process holds the move now; it stops here{note}", move_id=self.move_id)
        log.warning("move %s: the catalog session holding the move's lock was lost (the catalog "
                    "restarted, or the connection dropped); took the lock again", self.move_id)
        with contextlib.suppress(Exception):
            old.invalidate()  # (its server-side session is gone: nothing to unlock)
            old.close()

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:c, :m)"), {"c": MOVER_LOCK_CLASS, "m": self.move_id})
            conn.commit()
        except Exception:  # noqa: BLE001 - a dead session holds no lock; keep the real error
            log.warning("move %s: could not release the %s's lock (its session is gone)", self.move_id, self.who)
            with contextlib.suppress(Exception):
                conn.invalidate()
        finally:
            conn.close()


def _fence(conn: Any, move_id: int, runner: str, lock: _MoveLock | None, who: str, note: str = "") -> None:
    """Refuse (in the caller's catalog transaction) unless the process whose runner token is
    ``runner`` (a mover, or an abort: ``who``) still holds move ``move_id``; take its lock
    again if the session holding it was lost (see :class:`_MoveLock`).  ``note`` ends the
    message of a refusal."""
    held = conn.execute(text(
        "UPDATE shardkit_catalog.moves SET updated_at = now() "
        "WHERE id = :m AND state = 'running' AND runner = :r "
        "RETURNING EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = CAST(:c AS oid) AND objid = CAST(CAST(:m AS bigint) AS oid) AND objsubid = 2 "
        "AND pid = :p AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"),
        {"m": move_id, "r": runner, "c": MOVER_LOCK_CLASS, "p": lock.pid if lock else 0}).scalars().all()
    if len(held) != 1:
        by = ("aborted, or resumed by another mover" if who == "mover"
              else "resumed by a mover, or aborted by another `shardkit rebalance abort`")
        raise RebalanceError(f"move {move_id} was taken over ({by}) while this {who} ran; it stops here{note}",
                             move_id=move_id)
    if not held[0] and lock is not None:
        lock.again(note)


class Mover:
    """Runs (and resumes) moves recorded in the catalog.

    :param progress: called with one line of text per progress update
        (default: write to stderr when it is a terminal).
    :param grace: seconds to wait after a switch before deleting the source's
        rows, so processes reading with the previous map version have reloaded
        it (they are notified at once; this covers a slow notification); the
        verification runs meanwhile.  The copy, likewise, commits no sooner than
        ``grace`` after capture began.  A resumed batch counts both from the
        journal's entries, by the catalog's clock.
    :param step_delay: seconds to sleep after recording each step (to give
        fault-injection tests a window to kill the mover at a given step).
    :param duty: the share of time the bulk steps (copy, verification,
        clean-up) work; after each slice of a table they rest so that this
        holds.  ``1.0`` (the default) never rests; ``0.5`` takes about twice as
        long and leaves the servers' cores to other writers half of the time.
        At least 0.01 (resting 99 times as long as it works).
        The clean-up works at most half of the time whatever the duty.
    :param max_pause: seconds the cut-over may pause the writes of a batch's
        buckets (waiting for the writers in flight and for locks, and applying
        the last changes).  Past it the cut-over gives up (the writes go on),
        catches up and tries again; after _PAUSE_ATTEMPTS attempts that gave up,
        the move stops with a RebalanceError and can be resumed.
    :param lock_timeout: seconds the cut-over waits for a lock (at most what is
        left of ``max_pause``).
    """

    def __init__(self, cluster: Cluster, *, progress: Callable[[str], None] | None = None,
                 grace: float = 1.0, step_delay: float = 0.0, lock_timeout: float = 2.0,
                 duty: float = 1.0, max_pause: float = 1.0) -> None:
        if not _MIN_DUTY <= duty <= 1.0:
            # (Below _MIN_DUTY a rest is so long that it never ends, or overflows mid-move.)
            raise RebalanceError(f"duty {duty!r} must be more than 0 and at most 1 (the share of time "
                                 f"the mover works; 1 never rests), and at least {_MIN_DUTY} (which rests "
                                 f"{1 / _MIN_DUTY - 1:.0f} times as long as it works)")
        if not 0.0 < max_pause <= threading.TIMEOUT_MAX:
            raise RebalanceError(f"max_pause (--max-pause) {max_pause!r} must be a number of seconds more "
                                 f"than 0 and at most {threading.TIMEOUT_MAX:.0f} (the longest the cut-over "
                                 "pauses a batch's writes before it gives up and tries again)")
        for name, value in (("grace", grace), ("step_delay", step_delay), ("lock_timeout", lock_timeout)):
            # (At most what time.sleep() and lock waits take: more raises OverflowError mid-move.)
            if not 0 <= value <= threading.TIMEOUT_MAX:
                raise RebalanceError(f"{name} {value!r} must be a number of seconds >= 0 and at most "
                                     f"{threading.TIMEOUT_MAX:.0f}")
        self.cluster = cluster
        self.catalog = _need_catalog(cluster)
        self.duty = duty
        self.grace = grace
        self.step_delay = step_delay
        self.lock_timeout = lock_timeout
        self.max_pause = max_pause
        if progress is None:
            progress = (lambda line: print(line, file=sys.stderr, flush=True)) if sys.stderr.isatty() \
                else (lambda line: log.info("%s", line))
        self.progress = progress
        self.longest_pause = 0.0  # seconds writes to a batch's buckets were paused, at most
        self.cut_overs = 0  # batches this mover switched (a resumed move's may have switched before)
        self.batches_run = 0  # batches of the move run() last ran, those finished before included
        self._visibility_wait = 0.0
        self._runner = ""
        # The move's lock, held by a catalog session, in run()
        self._lock: _MoveLock | None = None
        self._batch: tuple[int, str, str] | None = None  # the batch being run: number, source, target
        # id(connection) -> whether it may set session_replication_role (see _may_replicate)
        self._replica: dict[int, bool] = {}

    @property
    def _lock_wait(self) -> float:
        """How long the cut-over waits for a lock: lock_timeout (0: no bound of its own), at
        most max_pause."""
        return min(self.lock_timeout or self.max_pause, self.max_pause)

    # -- starting ----------------------------------------------------------------

    def start(self, plan: Plan | SlicePlan, *, max_buckets: int = 256) -> int:
        """Record ``plan`` as a new move in the catalog and return its id (does not run it).

        Refused if the plan no longer matches the live map, or if another
        unfinished move includes any of its buckets (or, for a slice plan,
        moves slices of the same group).
        """
        if not plan.moves and not (isinstance(plan, SlicePlan) and plan.gained):
            raise RebalanceError("the plan moves no buckets; nothing to do")
        with self.catalog.engine.connect() as conn:  # (again under the lock below)
            # First: the shards are asked next, and a target lost with leftovers cannot answer.
            if self.catalog.initialised(conn):
                refuse_onto_leftovers(conn, plan)
        # Asked of the shards before the catalog is locked (other movers wait on that lock).
        if isinstance(plan, SlicePlan) and plan.gained and (current := self.catalog.current_map()) is not None:
            refuse_published_gained(plan, current.slices, current.version)  # (before counting their rows)
        check_slice_plan(self.cluster, plan)
        if isinstance(plan, SlicePlan) and plan.splits:
            self._check_slice_copies(plan)
        self._check_triggers(({m.source for m in plan.moves} | {m.target for m in plan.moves})
                             & set(self.cluster.shard_names),  # an unknown one is refused below
                             plan.group if isinstance(plan, SlicePlan) else None)
        self._check_reference_copies(plan)
        with self.catalog.engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE shardkit_catalog.moves IN EXCLUSIVE MODE")
            current = self.catalog.current_map(conn)
            if current is None:
                raise RebalanceError("the catalog has no map yet: run `shardkit rebalance init`")
            check_live_map(self.cluster, current)
            version, live, live_slices = current
            if isinstance(plan, SlicePlan):
                mine = tuple(s for s in live_slices if s.group == plan.group)
                refuse_taken_slice_numbers(plan, live_slices, version)
                # New slices of other groups' moves not split yet are taken too.
                for other, other_group, other_split in conn.execute(text(
                        "SELECT id, plan->>'group', plan->'split' FROM shardkit_catalog.moves "
                        "WHERE state = 'running' AND plan->>'kind' = 'slices' AND plan->>'group' <> :g "
                        "ORDER BY id"), {"g": plan.group}):
                    taken = {int(d["id"]) for d in other_split} & {s.id for s in plan.split}
                    if taken:
                        raise RebalanceError(
                            f"the plan numbers its new slice {min(taken)}, as move {other} (group "
                            f"{other_group}, still running) numbers one of its own: once that move has "
                            f"split (`shardkit rebalance status {other}`; resume it if it stopped, or abort "
                            "it), make a new plan", move_id=other)
                if not mine:
                    raise RebalanceError(f"the catalog has no slices of group {plan.group}; run "
                                         "`shardkit rebalance init` after adding it to the config")
                if mine not in (plan.old, plan.split):
                    raise RebalanceError(f"the plan is stale: group {plan.group}'s ranges or values changed "
                                         f"since it was made (live map version {version}); make a new plan")
                refuse_published_gained(plan, live_slices, version)
                self._check_guarded(plan)
                other = conn.execute(text(
                    "SELECT min(id) FROM shardkit_catalog.moves WHERE state = 'running' "
                    "AND plan->>'kind' = 'slices' AND plan->>'group' = :g"), {"g": plan.group}).scalar()
                if other is not None:
                    raise RebalanceError(
                        f"move {other} is still running on group {plan.group}; finish it (`shardkit "
                        f"rebalance resume {other}`) or abort it first", move_id=other)
                stale = []
            else:
                stale = [m for m in plan.moves if live[m.bucket] != m.source]
            if stale:
                m = stale[0]
                raise RebalanceError(
                    f"the plan is stale: bucket {m.bucket} is on {live[m.bucket]}, the plan moves it "
                    f"from {m.source} ({len(stale)} such buckets; live map version {version}); "
                    "make a new plan")
            refuse_unknown_targets(self.cluster, plan)
            busy = conn.execute(text(
                "SELECT b.move_id, array_agg(DISTINCT x) FROM shardkit_catalog.move_batches b "
                "JOIN shardkit_catalog.moves m ON m.id = b.move_id, unnest(b.buckets) AS x "
                "WHERE m.state = 'running' AND x = ANY(:b) GROUP BY b.move_id"),
                {"b": [m.bucket for m in plan.moves]}).first()
            if busy:
                raise RebalanceError(
                    f"move {busy[0]} is still running on buckets {sorted(busy[1])[:10]}; finish it "
                    f"(`shardkit rebalance resume {busy[0]}`) or abort it first", move_id=busy[0])
            refuse_onto_leftovers(conn, plan)
            move_id = conn.execute(text(
                "INSERT INTO shardkit_catalog.moves (state, reason, plan) "
                "VALUES ('running', :r, CAST(:p AS jsonb)) RETURNING id"),
                {"r": plan.reason, "p": json.dumps(plan.as_dict())}).scalar_one()
            for i, batch in enumerate(plan.batches(max_buckets)):
                conn.execute(text(
                    "INSERT INTO shardkit_catalog.move_batches (move_id, batch, source, target, buckets, step) "
                    "VALUES (:m, :i, :s, :t, :b, 'pending')"),
                    {"m": move_id, "i": i, "s": batch[0].source, "t": batch[0].target,
                     "b": [mv.bucket for mv in batch]})
            Catalog.record(conn, move_id, None, "planned", {"map_version": version,
                                                           "buckets": len(plan.moves)})
        return int(move_id)

    def _check_reference_copies(self, plan: Plan | SlicePlan) -> None:
        """Refuse a move to a shard whose copies of the reference tables have other row
        counts than its source's (a shard just added, its schema made by a migration, has
        none of their rows): the moved rows would meet other reference rows there (foreign keys the copy
        does not check, joins that lose rows), and reference reads taking turns over the
        shards would answer differently on it."""
        tables = self.cluster.config.reference_tables
        names = self.cluster.shard_names  # (an unknown shard is refused later, saying so)
        pairs = sorted({(m.source, m.target) for m in plan.moves if m.source in names and m.target in names})
        if not tables or not pairs:
            return
        # Read again while they differ, for a moment: a reference write commits on one shard
        # after another, and the application may be making one now.
        for attempt in range(_REFERENCE_READS):
            problem = self._reference_difference(tables, pairs)
            if problem is None:
                return
            if attempt + 1 < _REFERENCE_READS:
                time.sleep(0.2)
        raise RebalanceError(problem)

    def _reference_difference(self, tables: Iterable[str], pairs: list[tuple[str, str]]) -> str | None:
        """How a target's reference copies differ from its source's in rows (None: they do not)."""
        # Their rows' counts: rows an update is changing on one shard after another are
        # `shardkit migrate check`'s to compare, not a reason to stop a move.
        counts: dict[str, dict[str, int]] = {}
        for shard in sorted({s for pair in pairs for s in pair}):
            with self.cluster.primary(shard).connect() as conn:
                counts[shard] = {t: conn.execute(text(f"SELECT count(*) FROM {table_sql(t)}")).scalar()
                                 for t in tables if conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"),
                                                                 {"t": table_sql(t)}).scalar()}
        for source, target in pairs:
            for t in tables:
                mine, theirs = counts[target].get(t), counts[source].get(t)
                if mine == theirs:
                    continue
                if mine is None or theirs is None:
                    what = f"missing on {target if mine is None else source}"
                else:
                    what = f"{counted(mine, 'row')}, {theirs} on {source}"
                return (f"reference table {t} on {target} differs from {source}'s ({what}): moved rows "
                        f"would meet other reference rows on {target}, and reads of {t} would answer "
                        f"differently there; copy {source}'s rows of {t} to {target} first (e.g. "
                        f"`pg_dump --data-only --table={t} SOURCE_URL | psql TARGET_URL`), then apply "
                        "again (`shardkit migrate check` compares the copies)")
        return None

    def _check_slice_copies(self, plan: SlicePlan) -> None:
        """Refuse a slice plan that splits (or gives a shard keys no slice held) while a shard
        has no copy of the slices (``shardkit.slices``: a shard added to the config after
        `shardkit rebalance init`): the move writes the group's new slices on every shard, and
        would stop there, running, with resume and abort failing the same way (and init is
        refused while a move runs)."""
        missing = []
        for shard in self.cluster.shard_names:
            with self.cluster.primary(shard).connect() as conn:
                if not conn.execute(text("SELECT to_regclass('shardkit.slices') IS NOT NULL")).scalar():
                    missing.append(shard)
        if missing:
            raise RebalanceError(
                f"the plan ({plan.reason}) writes group {plan.group}'s new slices on every shard, and "
                f"{', '.join(missing)} has no ownership guard (no copy of the slices: added to the config "
                "after `shardkit rebalance init`?); run `shardkit rebalance init` (it installs the guard "
                "there), then apply the plan again (nothing was started)")

    def _check_guarded(self, plan: SlicePlan) -> None:
        """Refuse a slice plan of a group whose tables are not guarded on its sources."""
        tables = [g.table for g in guarded_tables(self.cluster.config) if g.group == plan.group]
        if not tables:
            raise RebalanceError(f"group {plan.group} cannot be rebalanced (see `shardkit rebalance init`)")
        for source in sorted({m.source for m in plan.moves}):
            with self.cluster.primary(source).connect() as conn:
                for table in tables:
                    fn = 'shardkit."' + slice_function_name(table).replace('"', '""') + '"'
                    if not conn.execute(text("SELECT to_regproc(:f) IS NOT NULL"), {"f": fn}).scalar():
                        raise RebalanceError(
                            f"table {table} of group {plan.group} is not guarded on {source} (its key "
                            "column's type does not compare with the group's bounds in SQL, or "
                            "`shardkit rebalance init` has not run since the group was added); "
                            "this group cannot be moved online")

    def _check_triggers(self, shards: Iterable[str], group: str | None, *, guard: bool = True,
                        copying: bool = True) -> None:
        """Refuse to move the tables of ``group`` (None: hash tables) unless each can move
        faithfully on every one of ``shards``, before anything moves.

        With ``guard``: each has the ownership guard's trigger, as this version of
        shardkit installs it (without it, writes made during the copy would not be
        captured, lost on the target, nor stale writes refused; a table created after
        `shardkit rebalance init` has none yet).  Always: each has a primary key, and
        nothing would change the rows as the mover writes them (see
        :meth:`_check_fidelity`; ``copying``: rows are still to be written on the target,
        not only deleted on the source)."""
        guarded = [g for g in guarded_tables(self.cluster.config)
                   if ((g.kind == "hash") if group is None else (g.group == group))]
        tables = sorted(g.table for g in guarded)
        if not tables:
            return
        for shard in sorted(set(shards)):
            with self.cluster.primary(shard).connect() as conn:
                found = dict(conn.execute(text(
                    f"SELECT n.tbl, {guard_fires_sql('c.oid')} FROM {CONFIGURED_TABLES} "
                    "WHERE c.relkind IN ('r', 'p')"), configured_tables(tables)).all())
                absent = [t for t in tables if t not in found]
                if absent:
                    raise RebalanceError(
                        f"table(s) {', '.join(absent)} do not exist on {shard}; create the schema there "
                        "(`shardkit migrate upgrade`), run `shardkit rebalance init`, then apply or "
                        "resume the move")
                no_pk = [r[0] for r in conn.execute(text(
                    f"SELECT n.tbl FROM {CONFIGURED_TABLES} WHERE c.relkind IN ('r', 'p') "
                    "AND NOT EXISTS (SELECT 1 FROM pg_index i "
                    "WHERE i.indrelid = c.oid AND i.indisprimary) ORDER BY 1"), configured_tables(tables))]
                if no_pk:
                    raise RebalanceError(
                        f"table(s) {', '.join(no_pk)} on {shard} have no primary key; rows are moved and "
                        "verified by primary key: add one, run `shardkit rebalance init` (the guard "
                        "records written rows by it), then apply the move")
                # psycopg reads a % in a statement that has parameters as a placeholder,
                # also inside a quoted name, and the mover's statements name every column.
                pct: dict[str, list[str]] = {t: ["its name"] for t in tables if "%" in t}
                for tbl, col in conn.execute(text(
                        f"SELECT n.tbl, a.attname FROM {CONFIGURED_TABLES} JOIN pg_attribute a "
                        "ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
                        "WHERE strpos(a.attname, chr(37)) > 0 ORDER BY 1, a.attnum"), configured_tables(tables)):
                    pct.setdefault(tbl, []).append(f"column {col}")
                if pct:
                    which = "; ".join(f"{t} ({', '.join(w)})" for t, w in sorted(pct.items()))
                    raise RebalanceError(
                        f"table(s) {which} on {shard}: a name with a % cannot be moved (the mover's "
                        "driver, psycopg, reads % in a statement with parameters as a placeholder, also "
                        "inside a quoted name); rename it, then apply or resume the move")
                if guard:
                    missing = [t for t in tables if not found[t]]
                    if missing:
                        raise RebalanceError(
                            f"table(s) {', '.join(missing)} on {shard} have no ownership guard, so writes "
                            "to them during a move would not be captured; run a migration calling "
                            "`op.install_shardkit_guard()` (or, when no move is running, `shardkit rebalance "
                            "init`: both install the guard on tables added since), then apply or resume the move")
                    stale = self._stale_guards(conn, guarded)
                    if stale:
                        raise RebalanceError(
                            f"the ownership guard of table(s) {', '.join(stale)} on {shard} is out of date "
                            "(installed by an older shardkit, before the table's primary key or shard "
                            "key changed, or before a partition was added), so it could record writes "
                            "during a move under names or keys the mover does not apply (or let a "
                            "TRUNCATE through); run a migration calling `op.install_shardkit_guard()` (or, "
                            "when no move is running, `shardkit rebalance init`), then apply or resume the move")
                self._check_fidelity(conn, shard, tables, copying, keys={g.table: g.key for g in guarded})

    def _stale_guards(self, conn: Any, guarded: list[Guarded]) -> list[str]:
        return stale_guards(conn, guarded, self.cluster.config.bucket_count)

    def _check_fidelity(self, conn: Any, shard: str, tables: list[str], copying: bool = True, *,
                        keys: dict[str, str] | None = None) -> None:
        """Refuse tables whose rows the mover could not write on ``shard`` exactly as they are.

        The mover's writes (the copy and applied changes on the target, the
        clean-up's deletes on the source) run with ``session_replication_role =
        replica`` when its role may set that: user triggers and foreign keys do not
        fire, as for logical replication.  Refused: a CHECK constraint added NOT
        VALID (old rows may break it, and the copy checks every row); a trigger
        enabled ALWAYS or REPLICA (it fires anyway); a foreign key from a table
        that does not move with the tables (its rows would point at rows that
        moved away, or be deleted with them); and where the role may not set
        ``session_replication_role``: any user trigger, a foreign key of a table
        to itself or a cycle of them, a NOT VALID foreign key.  NOT VALID constraints
        only while ``copying`` (deletes do not check them).  Always: a table with
        inheritance children (INHERITS; declarative partitions move), whose rows the
        copy would read through the parent and write into the parent itself.  While
        ``copying`` (the guard's change log still matters), whatever the privilege: a
        primary-key or shard-key column ``GENERATED ALWAYS AS ... STORED`` (``keys``: table
        -> shard key), and a BEFORE INSERT or UPDATE row trigger that fires after the guard
        (PostgreSQL fires them in name order): the guard, a BEFORE trigger, sees neither a
        generated value (computed after BEFORE triggers) nor what a later trigger sets, so it
        would check and log the row under another key than the row is written with, and
        catch-up would miss it."""
        replica = _may_replicate_sa(conn)
        role = conn.execute(text("SELECT current_user")).scalar()
        moved = (f"WITH m AS (SELECT n.tbl, t.relid AS rel FROM {CONFIGURED_TABLES} "
                 f"CROSS JOIN LATERAL {_TREE} t WHERE c.relkind IN ('r', 'p')) ")
        named = configured_tables(tables)
        grant = (f"the mover writes with session_replication_role = replica, as logical replication "
                 f"does, only where its role may set it, and {role} may not on {shard}: grant it "
                 f"(`GRANT SET ON PARAMETER session_replication_role TO {role}`, PostgreSQL 15 and "
                 "later, or move as a superuser)")
        if copying and keys:
            for tbl, col in conn.execute(text(
                    f"SELECT n.tbl, a.attname FROM {CONFIGURED_TABLES} JOIN pg_attribute a ON a.attrelid = c.oid "
                    "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> '' "
                    "JOIN unnest(CAST(:kt AS text[]), CAST(:kc AS text[])) AS s(tbl, col) ON s.tbl = n.tbl "
                    "WHERE c.relkind IN ('r', 'p') AND (a.attname = s.col OR EXISTS (SELECT FROM pg_index i "
                    "WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey))) ORDER BY 1, 2"),
                    {**named, "kt": list(keys), "kc": list(keys.values())}):
                what = "shard key" if keys.get(tbl) == col else "primary key"
                raise RebalanceError(
                    f"table {tbl} on {shard}: its {what} column {col} is generated (GENERATED ALWAYS AS "
                    "... STORED), computed after BEFORE triggers, so shardkit's ownership guard (a BEFORE "
                    "trigger) cannot see its value: it would record rows written during the move under "
                    f"a NULL key and catch-up would miss them; make {col} an ordinary column (set by the "
                    "application or a trigger named to fire before shardkit_guard), then apply the move")
            for tbl, name, lang, src, args, pk in conn.execute(text(
                    moved + "SELECT DISTINCT m.tbl, t.tgname, l.lanname, p.prosrc, t.tgargs, ARRAY(SELECT a.attname "
                    "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                    "WHERE i.indrelid = m.rel AND i.indisprimary)::text[] FROM m JOIN pg_trigger t ON t.tgrelid = m.rel "
                    "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang "
                    "WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND t.tgtype & 3 = 3 "
                    "AND t.tgtype & 20 <> 0 AND t.tgname COLLATE \"C\" > 'shardkit_guard' ORDER BY 1, 2"), named):
                columns = [*pk, keys[tbl]] if tbl in keys else list(pk)
                if not _trigger_may_set(lang, src, bytes(args or b"").split(b"\0"), columns):
                    continue
                raise RebalanceError(
                    f"table {tbl} on {shard} has BEFORE INSERT or UPDATE trigger {name}, which PostgreSQL "
                    "fires after shardkit's ownership guard (triggers of one kind fire in name order), and "
                    f"whose function ({lang}) may set the row's primary key or shard key ({', '.join(columns)}): "
                    "the guard would check and record the row under the key it had before, and a write "
                    "during the move would not reach the target; rename it to sort before shardkit_guard "
                    f"(`ALTER TRIGGER {name} ON {tbl} RENAME TO ...`, e.g. a name starting with 'a'), "
                    "then apply the move")
        for tbl, name, kind in conn.execute(text(
                moved + "SELECT DISTINCT m.tbl, k.conname, k.contype::text FROM m JOIN pg_constraint k "
                "ON k.conrelid = m.rel WHERE NOT k.convalidated AND k.contype IN ('c', 'f') "
                "AND :copying ORDER BY 1, 2"), {**named, "copying": copying}):
            if kind == "c" or not replica:
                raise RebalanceError(
                    f"table {tbl} on {shard} has {'check' if kind == 'c' else 'foreign key'} constraint "
                    f"{name} added NOT VALID: rows older than it may break it, and the target checks "
                    f"every row the mover copies; validate it (`ALTER TABLE {tbl} VALIDATE CONSTRAINT "
                    f"{name}`) or drop it, then apply the move"
                    + ("" if kind == "c" else f" (or: {grant})"))
        for tbl, name, enabled in conn.execute(text(
                moved + "SELECT DISTINCT m.tbl, t.tgname, t.tgenabled::text FROM m JOIN pg_trigger t "
                "ON t.tgrelid = m.rel WHERE NOT t.tgisinternal AND t.tgname <> 'shardkit_guard' "
                "AND t.tgenabled <> 'D' AND t.tgtype & 28 <> 0 ORDER BY 1, 2"), named):
            what = (f"table {tbl} on {shard} has trigger {name}, which would fire on the mover's "
                    "copies and deletes of its rows (changing moved rows, or recording the move as "
                    "the application's inserts and deletes)")
            if enabled in ("A", "R"):
                raise RebalanceError(
                    f"{what}: it is enabled {'ALWAYS' if enabled == 'A' else 'REPLICA'}, so it fires "
                    "even for replication; make it an ordinary trigger (`ALTER TABLE "
                    f"{tbl} ENABLE TRIGGER {name}`) or disable it for the move")
            if not replica:
                raise RebalanceError(f"{what}; {grant}, or disable the trigger for the move "
                                     f"(`ALTER TABLE {tbl} DISABLE TRIGGER {name}`)")
        parents: dict[str, set[str]] = {t: set() for t in tables}
        for name, child, parent in conn.execute(text(
                moved + "SELECT DISTINCT k.conname, a.tbl, b.tbl FROM pg_constraint k "
                "JOIN m a ON a.rel = k.conrelid JOIN m b ON b.rel = k.confrelid "
                "WHERE k.contype = 'f' ORDER BY 1"), named):
            if child == parent and not replica:
                raise RebalanceError(
                    f"table {child} on {shard} has a foreign key to itself ({name}): the mover copies "
                    "and deletes its rows a slice at a time, where a row's parent may come later; "
                    f"{grant}, or drop the foreign key for the move")
            if child != parent:
                parents[child].add(parent)
        if not replica:
            try:
                graphlib.TopologicalSorter(parents).prepare()
            except graphlib.CycleError as e:
                raise RebalanceError(
                    f"tables {', '.join(sorted(set(e.args[1])))} on {shard} reference each other in a "
                    f"cycle of foreign keys, so no order of copying satisfies them; {grant}") from None
        for name, child, parent in conn.execute(text(
                moved + "SELECT DISTINCT k.conname, r.relname, m.tbl FROM pg_constraint k "
                "JOIN m ON m.rel = k.confrelid JOIN pg_class r ON r.oid = k.conrelid "
                "WHERE k.contype = 'f' AND k.conrelid NOT IN (SELECT rel FROM m) ORDER BY 1"),
                named):
            raise RebalanceError(
                f"table {child} on {shard} references moved table {parent} (foreign key {name}) but "
                "does not move with it: its rows would point at rows that moved to another shard, "
                f"or be deleted with them; configure {child} in the same group as {parent}, keyed by "
                "the same shard key, or drop the foreign key")
        for tbl, children in conn.execute(text(
                moved + "SELECT m.tbl, string_agg(c.relname, ', ' ORDER BY c.relname) FROM m "
                "JOIN pg_inherits i ON i.inhparent = m.rel JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE NOT c.relispartition GROUP BY 1 ORDER BY 1"), named):
            raise RebalanceError(
                f"table {tbl} on {shard} has child table(s) {children} that inherit from it (INHERITS, "
                f"not declarative partitions): the mover reads their rows through {tbl}, so they would "
                f"arrive in {tbl} itself on the target, not in the child tables, and writes made to a "
                "child table directly pass no ownership guard; make them declarative partitions, or tables "
                f"of their own (`ALTER TABLE <child> NO INHERIT {tbl}`, each configured in the group)")

    def apply(self, plan: Plan, *, max_buckets: int = 256) -> int:
        move_id = self.start(plan, max_buckets=max_buckets)
        self.run(move_id)
        return move_id

    # -- running -----------------------------------------------------------------

    def run(self, move_id: int) -> None:
        """Run (or resume) move ``move_id`` to the end."""
        _fits_live_map(self.cluster, _need_catalog(self.cluster, initialised=True))
        self._batch = None
        lock = _MoveLock(self.catalog, move_id, "mover")
        if not lock.take():
            raise RebalanceError(f"move {move_id} is being run by another mover (or aborted by "
                                 "`shardkit rebalance abort`)", move_id=move_id)
        self._lock = lock
        try:
            # The advisory lock keeps a second mover out while its session lives; the
            # runner token fences every catalog write in case it does not (a dropped
            # connection releases the lock while this mover still runs: see _fence).
            self._runner = uuid.uuid4().hex
            with self.catalog.engine.begin() as conn:
                # (The error of the run that stopped, if any, is history: this run records its own.)
                conn.execute(text("UPDATE shardkit_catalog.moves SET runner = :r, "
                                  "error = CASE WHEN state = 'running' THEN NULL ELSE error END WHERE id = :m"),
                             {"r": self._runner, "m": move_id})
            clash = None
            try:
                self._run_locked(move_id)
            except _KeyClash as e:
                clash = e
            except ShardUnavailable as e:
                if e.node != "catalog":
                    raise
                # (Its error could not be recorded there either: the message is all there is.)
                where = ""
                if self._batch is not None:
                    batch, source, target = self._batch
                    where = f", batch {batch} ({source} -> {target})"
                # Still a ShardUnavailable (of the catalog node), as the catalog's own error is.
                raise ShardUnavailable(
                    f"move {move_id}{where} stopped: {e}; the move stays running: once the catalog "
                    f"answers again, run `shardkit rebalance resume {move_id}` (or `shardkit rebalance "
                    f"abort {move_id}` before its batches switch)", node="catalog", cause=e.cause) from e
            except KeyboardInterrupt as e:
                # Ctrl-C: the move stays running, where it stopped (each step is redone
                # whole); say so in the catalog, where `shardkit rebalance status` shows it.
                # (What stopped it, when not Ctrl-C: SIGTERM, SIGHUP, its output closed.)
                raise KeyboardInterrupt(self._stopped_by_interrupt(move_id, str(e) or "Ctrl-C")) from None
        finally:
            self._lock = None
            lock.release()
        if clash is not None:
            self._abort_on_clash(move_id, clash)

    def _stopped_by_interrupt(self, move_id: int, cause: str = "Ctrl-C") -> str:
        """Record that Ctrl-C (or ``cause``) stopped the move; the message for the operator."""
        where = ""
        if self._batch is not None:
            batch, source, target = self._batch
            where = f" in batch {batch} ({source} -> {target})"
        try:
            with self.catalog.engine.begin() as conn:
                conn.execute(text("UPDATE shardkit_catalog.moves SET error = :e, updated_at = now() "
                                  "WHERE id = :m AND state = 'running'"),
                             {"e": f"interrupted ({cause}){where}; the move stopped there", "m": move_id})
                Catalog.record(conn, move_id, None, "error", {"error": f"interrupted{where}"})
        except Exception as e:  # noqa: BLE001 - the interrupt is what the operator must hear of
            log.warning("move %d: could not record the interrupt in the catalog: %s", move_id, first_line(e))
        return (f"move {move_id} stopped{where}; it stays running, nothing of it is lost: `shardkit "
                f"rebalance resume {move_id}` goes on from there (`shardkit rebalance abort {move_id}` "
                "undoes the batches that have not switched)")

    def _abort_on_clash(self, move_id: int, clash: _KeyClash) -> None:
        """Abort a move whose rows clash with other buckets' rows on the target (raised
        before its batch switched): resuming would meet the same rows again."""
        try:
            result = abort(self.cluster, move_id)
        except Exception as e:  # noqa: BLE001 - the clash is the error to report
            raise RebalanceError(
                f"move {move_id}: {clash}; aborting the move failed too ({mask_secrets(str(e), self.cluster)}): "
                f"make the keys unique, then resume it, or run `shardkit rebalance abort {move_id}`",
                move_id=move_id, step=clash.step) from clash
        kept = result["finished_batches"]
        # The row already there may be a leftover of a move aborted with --target-lost (a
        # copy of a row that has since changed bucket on its shard), not another bucket's.
        with self.catalog.engine.connect() as conn:
            left = conn.execute(text(
                "SELECT move_id, target FROM shardkit_catalog.move_batches WHERE step = :s AND target IN "
                "(SELECT target FROM shardkit_catalog.move_batches WHERE move_id = :m) ORDER BY 1 LIMIT 1"),
                {"s": LEFTOVERS, "m": move_id}).first()
        fix = "make the keys unique across shards, then plan the move again" if left is None else (
            f"{left[1]} still holds rows left by move {left[0]} (aborted with --target-lost while "
            f"{left[1]} was unreachable), and the row there may be one of them: run `shardkit "
            f"rebalance abort {left[0]}` to remove them, then plan the move again (if it clashes "
            "again, make the keys unique across shards)")
        raise RebalanceError(
            f"move {move_id}: {clash}.  The move was aborted: nothing of the batch switched"
            + (f" (batches {kept} had finished and stay moved)" if kept else "")
            + "; " + fix, move_id=move_id, step=clash.step) from clash

    def _run_locked(self, move_id: int) -> None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(text("SELECT state, plan FROM shardkit_catalog.moves WHERE id = :m"),
                               {"m": move_id}).first()
            if row is None:
                raise RebalanceError(f"there is no move {move_id}", move_id=move_id)
            state, raw_plan = row
            if state != "running":
                raise RebalanceError(f"move {move_id} is {state}; only a running move can be resumed",
                                     move_id=move_id)
            batches = conn.execute(text(
                "SELECT batch, source, target, buckets, step FROM shardkit_catalog.move_batches "
                "WHERE move_id = :m ORDER BY batch"), {"m": move_id}).all()
        # An abort that stopped half-way (a shard of a later batch unreachable) leaves the
        # move running with batches it undid ("aborted": undone on both sides, as if never
        # begun) or left to an unreachable target (LEFTOVERS: their copies may still be there).
        left = [b.batch for b in batches if b.step == LEFTOVERS]
        if left:
            raise RebalanceError(
                f"move {move_id} is being aborted: batches {left} were undone on their source alone "
                f"(--target-lost) and their target may still hold copies; run `shardkit rebalance "
                f"abort {move_id}` to finish the abort", move_id=move_id)
        batches = [(b.batch, b.source, b.target, b.buckets, "pending" if b.step == "aborted" else b.step)
                   for b in batches]
        plan = plan_from_dict(raw_plan)
        group = plan.group if isinstance(plan, SlicePlan) else None
        if isinstance(plan, SlicePlan) and plan.splits:
            self._split(move_id, plan)
        total = self.batches_run = len(batches)
        # A resumed move skips its finished batches: the ETA is the pace of the batches this
        # run has done, times those it has left.
        todo = [b for b in batches if b[4] != "cleaned"]
        finished = total - len(todo)
        if finished or any(b[4] != "pending" for b in todo):
            # Resumed: say where it goes on from before the first step's line, which may be a
            # copy's time away.
            self.progress(f"move {move_id}: resuming: {finished} of {counted(total, 'batch', 'batches')} "
                          "finished; " + ", ".join(f"batch {b[0]} ({b[1]} -> {b[2]}) at step {b[4]}" for b in todo[:3])
                          + (f" and {len(todo) - 3} more" if len(todo) > 3 else ""))
        started = time.monotonic()
        for done, (batch, source, target, buckets, step) in enumerate(todo):
            self._batch = (batch, source, target)
            try:
                self._run_batch(move_id, batch, source, target, list(buckets), step, group)
            except Exception as e:
                # Ctrl-C in a driver call whose clean-up then failed (SQLAlchemy's pre-ping,
                # interrupted, resets psycopg's autocommit on a connection still ACTIVE):
                # the interrupt is what stopped the batch, not a cause to fix.
                context: BaseException | None = e
                for _ in range(20):  # (a chain may loop)
                    if context is None or isinstance(context, KeyboardInterrupt):
                        break
                    context = context.__cause__ or context.__context__
                if isinstance(context, KeyboardInterrupt):
                    raise type(context)(*context.args) from e
                message = mask_secrets(str(e), self.cluster)[:2000]
                with self.catalog.engine.begin() as conn:
                    conn.execute(text("UPDATE shardkit_catalog.moves SET error = :e, updated_at = now() "
                                      "WHERE id = :m AND state = 'running'"),
                                 {"e": f"batch {batch} ({source} -> {target}): {message}", "m": move_id})
                    Catalog.record(conn, move_id, None, "error", {"batch": batch, "error": message})
                if isinstance(e, RebalanceError):
                    raise
                first = message.strip().splitlines()[0] if message.strip() else ""
                raise RebalanceError(
                    f"move {move_id}, batch {batch} ({source} -> {target}): {type(e).__name__}: "
                    f"{first}; fix the cause and run `shardkit rebalance resume {move_id}` "
                    f"(or `shardkit rebalance abort {move_id}` before its batches switch)",
                    move_id=move_id, step=step) from e
            elapsed = time.monotonic() - started
            eta = elapsed / (done + 1) * (len(todo) - done - 1)
            n = finished + done + 1
            self.progress(f"move {move_id}: batch {n}/{total} done "
                          f"[{'#' * (20 * n // total):<20}] elapsed {elapsed:.1f}s, ETA {eta:.1f}s")
        with self.catalog.engine.begin() as conn:
            self._fence(conn, move_id)
            conn.execute(text("UPDATE shardkit_catalog.moves SET state = 'done', error = NULL, "
                              "updated_at = now() WHERE id = :m"), {"m": move_id})
            Catalog.record(conn, move_id, None, "done", {"longest_pause_s": round(self.longest_pause, 4)})

    @property
    def _chunk_pages(self) -> int:
        return _CHUNK_PAGES if self.duty >= 1.0 else max(1, _CHUNK_PAGES // 8)

    def _rest(self, worked_since: float, duty: float | None = None) -> None:
        """Rest after a slice of bulk work so the mover works ``duty`` of the time."""
        duty = self.duty if duty is None else duty
        if duty < 1.0:
            time.sleep((time.monotonic() - worked_since) * (1.0 - duty) / duty)

    def _fence(self, conn: Any, move_id: int) -> None:
        """Refuse (in the caller's catalog transaction) unless this mover still runs the move.

        Also checks that the session holding the move's lock is still alive: one lost with
        the catalog's server (a restart, a failover) left the move free for another mover,
        and `rebalance status` saying that no process runs it while this one does.  The lock
        is then taken again on a new session, or the mover stops if another process holds it
        (see _MoveLock).
        """
        _fence(conn, move_id, self._runner, self._lock, "mover")

    def _still_mine(self, move_id: int) -> None:
        """Refuse unless this mover still runs the move, before it writes to a shard: its
        lock goes with its catalog session, and another mover may have taken over."""
        with self.catalog.engine.begin() as conn:
            self._fence(conn, move_id)

    def _record(self, move_id: int, batch: int, step: str, detail: dict[str, Any] | None = None) -> None:
        with self.catalog.engine.begin() as conn:
            self._fence(conn, move_id)
            Catalog.record(conn, move_id, batch, step, detail)
        if self.step_delay:
            time.sleep(self.step_delay)

    def _run_batch(self, move_id: int, batch: int, source: str, target: str,
                   buckets: list[int], step: str, group: str | None = None) -> None:
        src_url = _shard_url(self.cluster, source, move_id, batch, "source")
        tgt_url = _shard_url(self.cluster, target, move_id, batch, "target")
        units = counted(len(buckets), "bucket") if group is None else f"{counted(len(buckets), 'slice')} of {group}"
        label = f"move {move_id} batch {batch} ({units} {source} -> {target})"
        # The guard: resumed after `rebalance init` added tables, or started before it did.
        # The rest (a trigger added, a privilege revoked) at every step, on the shards the
        # remaining steps write to (after the switch, only the source's clean-up does).
        copying = step in ("pending", "capturing", "copied")
        self._check_triggers((source, target) if copying else (source,), group,
                             guard=step in ("pending", "capturing"), copying=copying)
        with self._batch_connections(move_id, batch, source, target, src_url, tgt_url) as (src, tgt):
            self._replica = {id(src): _may_replicate(src), id(tgt): _may_replicate(tgt)}
            tables = _moved_tables(self.cluster, src, source, group)
            if copying:
                _refuse_unknown_guarded(self.cluster, src, source, move_id)
            if step in ("capturing", "copied") and self._capture_undone(src, move_id, buckets):
                # An abort that stopped half-way (killed, or the target unreachable after
                # the source's undo) stopped the capture and gave the source its buckets
                # back, and did not record it: the writes since are not captured, and the
                # target's copies may be gone.  Begin the batch again.
                log.warning("move %s batch %s: its capture on %s was undone (by an abort that "
                            "stopped half-way); capturing and copying the batch again",
                            move_id, batch, source)
                step = "pending"
                self._check_triggers((source, target), group, guard=True, copying=True)
            if step == "copied" and (uncopied := self._not_copied(move_id, batch, tables)):
                # Resumed with a config that configures tables the copy did not know
                # (see _refuse_unknown_guarded): copy again, capture goes on.
                log.warning("move %s batch %s: table(s) %s were not copied (the mover that copied "
                            "the batch did not configure them); copying the batch again",
                            move_id, batch, ", ".join(uncopied))
                # The copy captures their writes from here on: refuse, as a capture would,
                # tables without the guard (their writes during the copy would be lost).
                self._check_triggers((source, target), group, guard=True, copying=True)
                step = "capturing"
            # Readers learn from the "capturing" record that the target will hold
            # rows it does not own; the copy commits no sooner than `grace` after it.
            visible_after = 0.0
            if STEPS.index(step) < STEPS.index("capturing"):
                t0 = time.monotonic()
                self._still_mine(move_id)  # an abort may have undone the batch meanwhile
                self._capture(src, move_id, buckets, group)
                self.progress(f"{label}: capturing changes ({time.monotonic() - t0:.2f}s)")
                self._record(move_id, batch, "capturing")
                visible_after = time.monotonic() + self.grace
                step = "capturing"
            elif step == "capturing":
                # Resumed: what is left of the grace since the stopped mover recorded it.
                visible_after = time.monotonic() + self._grace_left(move_id, batch, "capturing")
            if step == "capturing":
                t0 = time.monotonic()
                self._visibility_wait = 0.0
                rows = self._copy(src, tgt, tables, buckets, visible_after, move_id)
                # Not counting the wait for readers to learn of the copy.
                dt = time.monotonic() - t0 - self._visibility_wait
                self.progress(f"{label}: copied {counted(rows, 'row')} in {dt:.2f}s "
                              f"({rows / dt if dt else 0:,.0f} rows/s)")
                self._record(move_id, batch, "copied", {"rows": rows, "seconds": round(dt, 3),
                                                        "tables": [t.name for t in tables]})
                step = "copied"
            # The source's rows are deleted no sooner than `grace` after the switch; the
            # verification (which only reads) runs meanwhile.
            clean_after = 0.0
            if step == "copied":
                t0 = time.monotonic()
                caught_up = self._catch_up(src, tgt, tables, buckets, target)
                version, pause, caught_up = self._cut_over(src, tgt, tables, move_id, batch, buckets, target,
                                                           group, caught_up)
                clean_after = time.monotonic() + self.grace
                self.longest_pause = max(self.longest_pause, pause)
                self.cut_overs += 1
                applied, rounds, ended = caught_up
                self.progress(f"{label}: caught up {counted(applied, 'change')} in {time.monotonic() - t0:.2f}s "
                              f"({counted(rounds, 'round')}: {ended}), switched to map version {version}; "
                              f"writes paused {pause * 1000:.0f} ms")
                step = "switched"
            elif step in ("switched", "verified"):
                # Resumed: what is left of the grace since the stopped mover switched.
                clean_after = time.monotonic() + self._grace_left(move_id, batch, "switched")
            if step == "switched":
                t0 = time.monotonic()
                checked = self._verify(src, tgt, tables, buckets, label)
                dt = time.monotonic() - t0
                self.progress(f"{label}: verified {counted(checked, 'row')} in {dt:.2f}s")
                self._record(move_id, batch, "verified", {"rows": checked, "seconds": round(dt, 3)})
                step = "verified"
            if step == "verified":
                if (left := clean_after - time.monotonic()) > 0:
                    time.sleep(left)
                t0 = time.monotonic()
                deleted = self._clean_up(src, tgt, tables, buckets, move_id)
                # The source's replicas serve reads once they have replayed the deletes
                # (before that they would show the moved rows on both shards).
                lsn = _committed_position(src)
                with self.catalog.engine.begin() as conn:
                    Catalog.set_floor(conn, move_id, batch, "source", lsn)
                dt = time.monotonic() - t0
                self.progress(f"{label}: deleted {counted(deleted, 'row')} from {source} in {dt:.2f}s")
                self._record(move_id, batch, "cleaned", {"deleted": deleted, "seconds": round(dt, 3)})

    @contextlib.contextmanager
    def _batch_connections(self, move_id: int, batch: int, source: str, target: str,
                           src_url: Any, tgt_url: Any) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
        """The batch's connections to its source and target; a server that cannot be reached,
        or whose connection breaks while the batch runs (it died, restarted, the network
        dropped), stops the move with an error naming that shard and its role (the driver's
        message names neither)."""
        def fail(lost: list[tuple[str, str, Any]], error: BaseException, what: str) -> RebalanceError:
            return self._server_lost(move_id, batch, source, target, lost, error, what)

        with _batch_ends((("source", source, src_url), ("target", target, tgt_url)), fail) as conns:
            yield conns[0], conns[1]

    @staticmethod
    def _server_lost(move_id: int, batch: int, source: str, target: str,
                     lost: list[tuple[str, str, Any]], error: BaseException, what: str) -> RebalanceError:
        named = " and ".join(f"{shard} (the batch's {role}, {_address(url)})" for role, shard, url in lost)
        shards = " and ".join(shard for _role, shard, _url in lost)
        return RebalanceError(
            f"move {move_id}, batch {batch} ({source} -> {target}): {what} {named}: "
            f"{type(error).__name__}: {first_line(error)}; the move stays running: once {shards} "
            f"answer{'s' if len(lost) == 1 else ''} again, run `shardkit rebalance resume {move_id}` "
            f"(or `shardkit rebalance abort {move_id}` before its batches switch)", move_id=move_id)

    def _grace_left(self, move_id: int, batch: int, step: str) -> float:
        """What is left of the grace period since the batch's ``step`` was recorded (by a
        mover that stopped since), by the catalog's clock; all of it if no entry says when."""
        if not self.grace:
            return 0.0
        with self.catalog.engine.connect() as conn:
            elapsed = conn.execute(text(
                "SELECT extract(epoch FROM clock_timestamp() - at) FROM shardkit_catalog.journal "
                "WHERE move_id = :m AND batch = :b AND step = :s ORDER BY id DESC LIMIT 1"),
                {"m": move_id, "b": batch, "s": step}).scalar()
        if elapsed is None:
            return self.grace
        return min(self.grace, max(0.0, self.grace - float(elapsed)))

    @staticmethod
    def _capture_undone(src: psycopg.Connection, move_id: int, buckets: list[int]) -> bool:
        """Whether the source of a batch recorded as capturing (or copied) owns its buckets
        and no longer captures them all: an abort undid the batch there and stopped before
        recording it.  (A source that gave the buckets up has switched: a cut-over also
        ends the capture, and the resume redoes it.)"""
        owned, captured = src.execute(
            "SELECT (SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = ANY(%s::integer[])), "
            "(SELECT count(*) FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[]) "
            "AND move_id = %s)", (buckets, buckets, move_id)).fetchone()
        return owned > 0 and captured < len(set(buckets))

    def _not_copied(self, move_id: int, batch: int, tables: list[_Table]) -> list[str]:
        """The tables of ``tables`` that the batch's last copy did not copy (a copy recorded
        by an older shardkit, without its tables: none)."""
        with self.catalog.engine.connect() as conn:
            detail = conn.execute(text(
                "SELECT detail FROM shardkit_catalog.journal WHERE move_id = :m AND batch = :b "
                "AND step = 'copied' ORDER BY id DESC LIMIT 1"), {"m": move_id, "b": batch}).scalar()
        if not detail or "tables" not in detail:
            return []
        return sorted({t.name for t in tables} - set(detail["tables"]))

    # -- steps ---------------------------------------------------------------------

    def _capture(self, src: psycopg.Connection, move_id: int, buckets: list[int],
                 group: str | None = None) -> None:
        with src.transaction():
            src.execute("INSERT INTO shardkit.moving_buckets (bucket, move_id) "
                        "SELECT unnest(%s::integer[]), %s ON CONFLICT (bucket) DO NOTHING",
                        (buckets, move_id))
        # Wait out the writers that may have checked moving_buckets before the
        # insert committed: every writer of a bucket holds its guard lock (shared)
        # until it ends, from before that check.  For a slice, also the writers of
        # its group's other slices: one that read the slices just before a split
        # locked the slice the key was in then.
        if group is not None:
            buckets = buckets + [r[0] for r in src.execute(
                "SELECT DISTINCT id FROM shardkit.slices WHERE grp = %s", (group,))]
        self._wait_for_writers(src, move_id, buckets)

    def _wait_for_writers(self, src: psycopg.Connection, move_id: int, buckets: list[int]) -> None:
        """Wait for the transactions now holding a guard lock of ``buckets`` on ``src`` to end
        (the locks of their stripes: writers of other buckets of those stripes too).

        By polling: waiting on the lock itself would queue new writers behind a
        long-running one."""
        stripes = sorted({b % GUARD_LOCK_STRIPES for b in buckets})
        vxids = [r[0] for r in src.execute(
            "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = %s AND objid = ANY(%s::oid[]) AND objsubid = 2 AND granted "
            "AND pid <> pg_backend_pid()", (GUARD_LOCK_CLASS, stripes))]
        waited = time.monotonic()
        warned = False
        while vxids:
            vxids = [r[0] for r in src.execute(
                "SELECT DISTINCT virtualxid FROM pg_locks WHERE locktype = 'virtualxid' "
                "AND virtualxid = ANY(%s)", (vxids,))]
            if vxids:
                if not warned and time.monotonic() - waited > 10:
                    log.warning("move %s: waiting for %d transactions that were writing the buckets "
                                "when capture began (one may be long-running)", move_id, len(vxids))
                    warned = True
                time.sleep(0.01)

    def _split(self, move_id: int, plan: SlicePlan) -> None:
        """Give the shards, then the catalog, the group's slices after the plan's split.

        Idempotent (a resumed move skips it once the catalog has them).  The
        owner of the split slice changes its copy of the slices and takes the
        new slice in one transaction, then waits for writers that may have
        computed a row's slice by the old ones (their guard lock is the old
        slice's, not the new one's that capture will wait for).  Other shards
        own neither part; their copy only has to be right before a move to them.
        """
        current = self.catalog.current_map()
        live = current.slices if current else ()
        # Done once the catalog has the split's slices (a resumed move may have moved them since).
        if {s.id for s in plan.split} <= {s.id for s in live if s.group == plan.group}:
            return
        t0 = time.monotonic()
        new = [s for s in plan.split if s.id not in {o.id for o in plan.old}]
        gained = {s.id for s in plan.gained}
        owners = sorted({s.shard for s in new})
        # Keys no slice held (gained) have no writers to wait for: the guard refused them.
        splitting = {s.shard for s in new if s.id not in gained}
        for shard in owners + sorted(set(self.cluster.shard_names) - set(owners)):
            with self.cluster.primary(shard).begin() as c:
                write_slices(c, plan.split, groups=[plan.group])
                mine = [s.id for s in new if s.shard == shard]
                if mine:
                    c.execute(text("INSERT INTO shardkit.owned_buckets SELECT unnest(CAST(:b AS integer[])) "
                                   "ON CONFLICT DO NOTHING"), {"b": mine})
            if shard in splitting:
                with _connect(self.cluster.config.shard(shard).primary) as src:
                    self._wait_for_writers(src, move_id, [s.id for s in plan.old])
        with self.catalog.engine.begin() as conn:
            self._fence(conn, move_id)
            conn.exec_driver_sql("LOCK TABLE shardkit_catalog.maps IN EXCLUSIVE MODE")
            current = self.catalog.current_map(conn)
            assert current is not None
            others = tuple(s for s in current.slices if s.group != plan.group)
            what = "new keys of" if gained else "split"
            version = self.catalog.publish_map(conn, current.bucket_map, f"move {move_id}: {what} {plan.group}",
                                               slices=others + plan.split)
            Catalog.record(conn, move_id, None, "split", {"map_version": version,
                                                         "slices": [s.describe() for s in new]})
        self.progress(f"move {move_id}: " + ", ".join(
            f"new slice {s.describe()} on {s.shard}" if s.id in gained else f"split {s.describe()}" for s in new)
            + f" (map version {version}, {time.monotonic() - t0:.2f}s)")
        if self.step_delay:
            time.sleep(self.step_delay)

    def _copy(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
              buckets: list[int], visible_after: float, move_id: int) -> int:
        rows = 0
        current = ""
        try:
            with tgt.transaction():
                # Copies of the move (by a mover that lost its catalog session and the
                # one that took over) and an abort's deletes take turns: each waits for a
                # copy in flight, or this mover learns here that it was taken over.
                _lock_copies(tgt, move_id)
                self._still_mine(move_id)
                tgt.execute(f"SET LOCAL {MOVER_SETTING} = 'on'")
                if self._replica.get(id(tgt)):
                    # No user triggers, no foreign-key checks (a row's parent may come in a
                    # later slice of pages).
                    tgt.execute(_REPLICA_ON)
                for t in reversed(tables):  # leftovers of an interrupted copy; children first
                    tgt.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::integer[])").format(
                        _ident(t.name), sql.SQL(t.bucket_sql)), (buckets,))
                with src.transaction():
                    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    for t in tables:
                        current = t.name
                        _reread_columns(src, tgt, t)  # at the copy's snapshot
                        cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
                        in_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
                            _ident(t.name), cols)
                        # All slices at the one snapshot of the source's transaction.
                        scan, bucket = t.scan_sql()
                        for chunk in _page_chunks(src, t.name, self._chunk_pages):
                            t0 = time.monotonic()
                            out_sql = sql.SQL("COPY (SELECT {} FROM {} {} WHERE {} AND {} = ANY(%s::integer[])) "
                                              "TO STDOUT (FORMAT binary)").format(
                                t.qualified(t.columns), _ident(t.name), sql.SQL(scan), sql.SQL(chunk),
                                sql.SQL(bucket))
                            with src.cursor() as sc, tgt.cursor() as tc:
                                with sc.copy(out_sql, (buckets,)) as out, tc.copy(in_sql) as inp:
                                    for data in out:
                                        inp.write(data)
                                rows += max(sc.rowcount, 0)
                            self._rest(t0)
                self._visibility_wait = max(0.0, visible_after - time.monotonic())
                time.sleep(self._visibility_wait)
        except _CLASHES as e:
            raise _clash_error(current, e, "a row of the moving buckets") from e
        return rows

    def _apply_changes(self, src: psycopg.Connection, tgt: psycopg.Connection,
                       tables: list[_Table], buckets: list[int], limit: int | None,
                       up_to: int | None = None, deadline: float | None = None) -> int:
        """Apply logged changes of ``buckets`` (the first ``limit``, of ids up to ``up_to``)
        to the target, in the callers' open transactions.

        Each changed key's row is re-read on the source (if it is still in the
        batch's buckets) and replaces the target's; a key whose row is gone (or
        left the buckets) is deleted on the target.  Returns how many change
        records were consumed.

        The changed keys' rows are deleted on the target, then the source's rows
        inserted, so that rows which exchanged unique values (two rows swapping
        their emails) arrive whole.  Without ``session_replication_role`` (see
        :func:`_may_replicate`), a table other rows reference by foreign key is
        upserted row by row instead (deleting a parent would cascade to, or be
        refused for, its children); such a swap then fails (``_UniqueViolation``).

        With a ``deadline`` (the cut-over's), each statement that may wait or take long runs
        under what is left of it (:func:`_bound`); _PauseOverrun once it has passed.
        """
        q = ("DELETE FROM shardkit.changes WHERE id IN (SELECT id FROM shardkit.changes "
             "WHERE bucket = ANY(%s::integer[])" + (f" AND id <= {int(up_to)}" if up_to is not None else "") +
             " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "") + ") RETURNING tbl, pk")
        # Guards installed before they logged the configured name logged a partition's.
        owner = {name: t.name for t in tables for name in t.names}
        changed: dict[str, dict[str, Any]] = defaultdict(dict)
        n = 0
        wait = self._lock_wait
        _bound(deadline, wait, src)
        for tbl, pk in src.execute(q, (buckets,)):
            changed[owner.get(tbl, tbl)][json.dumps(pk, sort_keys=True)] = pk
            n += 1
        if not n:
            return 0
        replica = bool(self._replica.get(id(tgt)))
        tgt.execute(f"SET LOCAL {MOVER_SETTING} = 'on'")
        if replica:
            tgt.execute(_REPLICA_ON)
        staged: list[tuple[_Table, sql.Composable, sql.Composable, sql.Composable, bool]] = []
        for i, t in enumerate(tables):
            keys = list(changed.get(t.name, {}).values())
            if not keys:
                continue
            _bound(deadline, wait, src, tgt)
            _reread_columns(src, tgt, t)  # at the snapshot the changed rows are read at
            name = _ident(t.name)
            cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
            pkc = sql.SQL(", ").join(map(sql.Identifier, t.pk))
            stage = sql.Identifier(f"_shardkit_stage_{i}")  # by position: names may be long
            tgt.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(stage))
            _bound(deadline, wait, tgt)  # (a lock on the table: a migration's, or one queued)
            # The columns the mover writes, with their types and no constraints: not (LIKE t),
            # which keeps the NOT NULL of a column the stage gets no value for (a generated
            # one, or one a migration added on the target only) and fails the COPY into it.
            tgt.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                stage, cols, name))
            keys_lit = t.logged_match(keys)
            out_sql = sql.SQL(
                "COPY (SELECT {cols} FROM {t} WHERE {keys} AND {b} = ANY({buckets}::integer[])) "
                "TO STDOUT (FORMAT binary)").format(
                cols=cols, t=name, keys=keys_lit, b=sql.SQL(t.bucket_sql), buckets=sql.Literal(buckets))
            in_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(stage, cols)
            _bound(deadline, wait, src)  # (the target's COPY lasts as long as the source's)
            with src.cursor() as sc, tgt.cursor() as tc:
                with sc.copy(out_sql) as out, tc.copy(in_sql) as inp:
                    for data in out:
                        inp.write(data)
            staged.append((t, pkc, keys_lit, stage, replica or not t.referenced))
        # Deletes first (children first): every changed row (a row kept only when it is
        # replaced in place), so that a row taking over another's unique value finds it free.
        for t, pkc, keys_lit, stage, whole in reversed(staged):
            _bound(deadline, wait, tgt)
            tgt.execute(sql.SQL(
                "DELETE FROM {t} WHERE {keys} "
                "AND {b} = ANY({buckets}::integer[])"
                + ("" if whole else " AND ({pk}) NOT IN (SELECT {pk} FROM {s})")).format(
                t=_ident(t.name), pk=pkc, keys=keys_lit, s=stage, b=sql.SQL(t.bucket_sql),
                buckets=sql.Literal(buckets)))
        for t, pkc, keys_lit, stage, whole in staged:  # parents first
            _bound(deadline, wait, tgt)
            name = _ident(t.name)
            clash = tgt.execute(sql.SQL(
                "SELECT count(*) FROM {t} JOIN {s} USING ({pk}) WHERE NOT ({b} = ANY(%s::integer[]))").format(
                t=name, s=stage, pk=pkc, b=sql.SQL(unit_expression(
                    t.guarded, t.key_type, self.cluster.config.bucket_count,
                    row=_ident(t.name).as_string(tgt)))), (buckets,)).fetchone()[0]
            if clash:
                raise _KeyClash(
                    f"table {t.name}: {clash} changed rows have the primary key of a row of another "
                    "bucket on the target shard; the primary keys of moved tables must be unique "
                    "across shards (not per-shard sequences)")
            cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
            if whole:
                conflict = sql.SQL("")
            else:
                updates = sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in t.columns if c not in t.pk)
                conflict = sql.SQL("ON CONFLICT ({pk}) {c}").format(
                    pk=pkc, c=sql.SQL("DO UPDATE SET {}").format(updates) if t.columns != t.pk
                    else sql.SQL("DO NOTHING"))
            _bound(deadline, wait, tgt)
            try:
                tgt.execute(sql.SQL(
                    "INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {s} {c}").format(
                    t=name, cols=cols, s=stage, c=conflict))
            except _CLASHES as e:
                raise _UniqueViolation(t.name, whole, e) from e
        if replica:
            tgt.execute(_REPLICA_OFF)
        return n

    def _unique_error(self, e: _UniqueViolation, target: str, role: str) -> RebalanceError:
        """The error for a unique constraint that applying changes violated (with the
        consistent, unlimited set of changes)."""
        if e.whole:
            # Every changed row was deleted first: another bucket's row holds the value.
            return _clash_error(e.table, e.error, "a row changed during the move")
        return RebalanceError(
            f"table {e.table}: applying the rows changed during the move one by one violates a unique "
            f"constraint ({_unique_detail(e.error)}): rows exchanged unique values (or a value is "
            f"held by a row of another bucket on {target}).  The mover applies such changes whole "
            "(deleting, then inserting) only with session_replication_role = replica, which its role "
            f"may not set on {target} (table {e.table} is referenced by foreign keys, whose triggers "
            f"would fire): grant it (`GRANT SET ON PARAMETER session_replication_role TO {role}`, "
            "PostgreSQL 15 and later) and resume the move, or abort it")

    def _catch_up(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
                  buckets: list[int], target: str = "") -> tuple[int, int, str]:
        """Apply the logged changes round after round until _catch_up_ends says why to stop:
        the changes applied, the rounds, and why they ended."""
        rounds: list[int] = []
        while True:
            # A round applies the changes logged before it began (ids up to the log's
            # highest now: writers that go on logging cannot keep one round going), so its
            # size is the backlog it began with, which _catch_up_ends compares.  (A change
            # committed later with a lower id is left to the next round.)
            mark = src.execute("SELECT coalesce(max(id), 0) FROM shardkit.changes").fetchone()[0]
            round_total = 0
            while True:
                n = self._catch_up_round(src, tgt, tables, buckets, target, mark)
                round_total += n
                if n < _CHANGES_PER_ROUND:
                    break
            rounds.append(round_total)
            if ended := _catch_up_ends(rounds):
                return sum(rounds), len(rounds), ended

    def _catch_up_round(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
                        buckets: list[int], target: str, up_to: int | None = None) -> int:
        """Apply up to _CHANGES_PER_ROUND changes (of ids up to ``up_to``), reading the log and
        the rows at one snapshot of the source (writers go on meanwhile)."""
        limit: int | None = _CHANGES_PER_ROUND
        for _attempt in range(2):
            try:
                # The target commits first: a crash in between replays changes, never loses them.
                with src.transaction(), tgt.transaction():
                    src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    return self._apply_changes(src, tgt, tables, buckets, limit, up_to)
            except _UniqueViolation as e:
                if limit is None:
                    raise self._unique_error(e, target, tgt.info.user) from e.error
                # The limit (or the round's last id) may have cut a transaction's changes in
                # two (one row of a swap applied, not the other): every change up to the
                # snapshot is consistent.
                limit = up_to = None
        raise AssertionError("unreachable")

    def _cut_over(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
                  move_id: int, batch: int, buckets: list[int], target: str,
                  group: str | None = None,
                  caught_up: tuple[int, int, str] = (0, 0, "")) -> tuple[int, float, tuple[int, int, str]]:
        """Pause writes to ``buckets``, apply the last changes, switch ownership and the map.
        ``caught_up`` is what the catch-up before it returned (changes, rounds, why it ended);
        returned with those of the catch-ups between attempts added (the journal's "switched"
        entry tells them)."""
        gate = (GATE_LOCK_CLASS, move_id % 2147483647)
        source = self._batch[1] if self._batch else "the source"
        # Writers of the batch's buckets wait while the mover waits for the gate (they
        # queue behind it), and while it holds it: both count towards max_pause.
        wait = self._lock_wait
        longest = 0.0  # writes paused by attempts that gave up
        gave_up = 0  # attempts that gave up with the writes paused
        while True:
            gated = False
            try:
                with src.transaction():
                    # Every writer of a moving bucket shares the move's gate until it
                    # commits: taking it waits for those in flight and holds new ones
                    # (of moving buckets only) until the source has given ownership up.
                    # One lock, taken holding nothing else: no deadlock with writers.
                    src.execute(f"SET LOCAL lock_timeout = {max(1, int(wait * 1000))}")
                    started = time.monotonic()
                    src.execute("SELECT pg_advisory_xact_lock(%s, %s)", gate)
                    gated = True
                    # What is left of max_pause bounds every statement from here to the
                    # target's commit (not the source's after it: see below).
                    deadline = started + self.max_pause
                    _bound(deadline, wait, src)
                    # A table guarded since the batch began (a migration).  Its writes of
                    # the batch's buckets wait for the gate from here on, and are refused
                    # once the switch commits.
                    _refuse_unknown_guarded(self.cluster, src, source, move_id)
                    # Still this mover's move?  An abort takes the same gate to undo
                    # the batch, so it cannot slip in between this check and the commit.
                    # Recorded before the target takes ownership: if the mover dies
                    # between the target's commit and the source's, an abort that cannot
                    # reach the target knows it may own the buckets (see abort()).
                    try:
                        with self.catalog.engine.begin() as conn:
                            # (The catalog's statements count too: a lock on the move's row,
                            # held by another process, would keep the writes paused.)
                            conn.exec_driver_sql(_time_left(deadline, wait))
                            self._fence(conn, move_id)
                            Catalog.record(conn, move_id, None, _CUTTING_OVER, {"batch": batch})
                    except DBAPIError as e:
                        if not isinstance(e.orig, (psycopg.errors.QueryCanceled,
                                                   psycopg.errors.LockNotAvailable)):
                            raise
                        raise _PauseOverrun() from e
                    with tgt.transaction():
                        # The target's statements wait no longer than the source's while the
                        # writes are paused: a table lock there (a migration's ALTER TABLE
                        # queued behind a long query, and every statement behind it) would
                        # keep them paused for as long as that query runs.
                        _bound(deadline, wait, tgt)
                        try:
                            while self._apply_changes(src, tgt, tables, buckets, None, deadline=deadline):
                                pass
                        except _UniqueViolation as e:
                            raise self._unique_error(e, target, tgt.info.user) from e.error
                        _bound(deadline, wait, tgt)
                        tgt.execute("INSERT INTO shardkit.owned_buckets SELECT unnest(%s::integer[]) "
                                    "ON CONFLICT DO NOTHING", (buckets,))
                        tgt.execute("INSERT INTO shardkit.moving_buckets (bucket, move_id) "
                                    "SELECT unnest(%s::integer[]), %s ON CONFLICT (bucket) DO NOTHING",
                                    (buckets, move_id))
                        # Once the target has taken the buckets, the source gives them up
                        # whatever that takes (a statement that failed there would leave both
                        # owning them until the next attempt), bar a lock wait past lock_timeout.
                        src.execute(f"SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = "
                                    f"{int(self.lock_timeout * 1000)}")
                        # The target's COMMIT too (deferred constraint triggers run in it).
                        _bound(deadline, wait, tgt)
                    src.execute("DELETE FROM shardkit.owned_buckets WHERE bucket = ANY(%s::integer[])",
                                (buckets,))
                    src.execute("DELETE FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[])",
                                (buckets,))
                break
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled, _PauseOverrun) as e:
                if not gated and not isinstance(e, psycopg.errors.LockNotAvailable):
                    raise  # (statement_timeout is set once the gate is taken)
                if not gated:
                    # A long transaction kept writing the buckets: writers of these buckets
                    # waited for the gate at most `wait`.  Let them go, catch up, try again.
                    log.warning("move %s: a writer held the buckets past %.1f s (lock_timeout, max_pause); "
                                "catching up and trying again", move_id, wait)
                else:
                    held = time.monotonic() - started
                    longest = max(longest, held)
                    self.longest_pause = max(self.longest_pause, held)
                    gave_up += 1
                    what = (f"a lock on a moved table on {source} or {target} (DDL, such as a migration's "
                            "ALTER TABLE or CREATE INDEX, or a statement queued behind one)"
                            if isinstance(e, psycopg.errors.LockNotAvailable) else
                            f"applying the last changes, or a lock on a moved table on {source} or {target} "
                            "(DDL, such as a migration's ALTER TABLE or CREATE INDEX, or a statement queued "
                            "behind one),")
                    if gave_up >= _PAUSE_ATTEMPTS:
                        batch_no = self._batch[0] if self._batch else batch
                        raise RebalanceError(
                            f"move {move_id}, batch {batch_no} ({source} -> {target}): the cut-over gave up "
                            f"{gave_up} times after pausing the batch's writes for {held * 1000:.0f} ms "
                            f"(max_pause {self.max_pause:g} s, lock_timeout {self.lock_timeout:g} s): "
                            f"{what} took longer.  Nothing is lost: the batch stays copied and its "
                            f"changes are still captured.  Resume the move when its writers or the DDL "
                            f"are quieter (`shardkit rebalance resume {move_id}`), or with a larger "
                            f"--max-pause; or abort it and apply it again with fewer --batch-buckets",
                            move_id=move_id) from e
                    log.warning("move %s: the cut-over gave up after %.0f ms with the batch's writes paused "
                                "(max_pause %g s, lock_timeout %g s): %s took that long; they go on "
                                "meanwhile; catching up and trying again (attempt %d of %d)", move_id,
                                held * 1000, self.max_pause, self.lock_timeout, what, gave_up + 1,
                                _PAUSE_ATTEMPTS)
                # By the same rule as the first catch-up (writers that go on as before stop
                # it within a few rounds); the "switched" entry counts these rounds too.
                changes, rounds, ended = self._catch_up(src, tgt, tables, buckets, target)
                caught_up = (caught_up[0] + changes, caught_up[1] + rounds, ended)
        # The target's WAL position after the switch: its replicas serve the moved
        # buckets only once they have replayed it (reads stay as fresh as before).
        target_lsn = _committed_position(tgt)
        # The source has given the buckets up (a paused writer is now refused and
        # polls the catalog for the next version); the target owns them.  Publish.
        # A crash before this commits leaves the batch at "copied": resuming
        # redoes the (then empty) cut-over and publishes.
        with self.catalog.engine.begin() as conn:
            self._fence(conn, move_id)
            # Read and write the map under its lock: moves of other buckets publish too.
            conn.exec_driver_sql("LOCK TABLE shardkit_catalog.maps IN EXCLUSIVE MODE")
            current = self.catalog.current_map(conn)
            assert current is not None
            if group is None:
                new_map = list(current.bucket_map)
                for b in buckets:
                    new_map[b] = target
                version = self.catalog.publish_map(
                    conn, new_map, f"move {move_id}: {counted(len(buckets), 'bucket')} to {target}")
            else:
                slices = reassign(current.slices, {b: target for b in buckets})
                version = self.catalog.publish_map(
                    conn, current.bucket_map,
                    f"move {move_id}: {len(buckets)} slice(s) of {group} to {target}", slices=slices)
            conn.execute(text("UPDATE shardkit_catalog.move_batches SET map_version = :v, "
                              "target_lsn = CAST(:l AS pg_lsn) WHERE move_id = :m AND batch = :b"),
                         {"v": version, "l": target_lsn, "m": move_id, "b": batch})
            Catalog.record(conn, move_id, batch, "switched", {
                "map_version": version, "catch_up_changes": caught_up[0], "catch_up_rounds": caught_up[1],
                "catch_up_ended": caught_up[2]})
        pause = max(longest, time.monotonic() - started)
        if self.step_delay:
            time.sleep(self.step_delay)
        return version, pause, caught_up

    def _verify(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
                 buckets: list[int], label: str) -> int:
        checked = 0
        for t in tables:
            _reread_columns(src, tgt, t, writing=False)  # the source's rows no longer change
            # The subquery's columns renamed by position (x.b, x.c0, x.c1, ...): a table's
            # column may be named like the bucket's, or like the scan's LATERAL item's.
            inner = t.columns + [c for c in t.pk if c not in t.columns]
            at = {c: sql.Identifier(f"c{i}") for i, c in enumerate(inner)}
            cols = sql.SQL(", ").join(sql.SQL("x.") + at[c] for c in t.columns)
            # The bucket once per row: computed in a subquery that OFFSET 0 keeps the
            # planner from merging (it would compute it again for GROUP BY).
            # sum() of bigints is exact (its result is numeric) and sums in 128 bits: a
            # cast of every hash to numeric first made the scan about 10% slower.
            scan, bucket = t.scan_sql()
            q = ("SELECT x.b, count(*), "
                 "coalesce(sum(hashtextextended(ROW({cols})::text, 0)), 0) "
                 "FROM (SELECT {bucket}, {plain} FROM {t} {scan} WHERE {chunk} "
                 "OFFSET 0) AS x (b, {names}) "
                 "WHERE x.b = ANY({buckets}::integer[]) "
                 "AND NOT {recent} "
                 "GROUP BY 1")
            # (SQL text with the key column's name in it goes in as an argument: a name may
            # hold braces, which format() would read in the template.)
            parts = dict(cols=cols, t=_ident(t.name), plain=t.qualified(inner),
                         bucket=sql.SQL(bucket), scan=sql.SQL(scan),
                         names=sql.SQL(", ").join(at[c] for c in inner), buckets=sql.Literal(buckets))

            def sums(conn: psycopg.Connection, recent: sql.Composable) -> dict[Any, tuple[int, Any]]:
                """Per bucket (count, checksum), slice by slice of the table, in conn's transaction."""
                out: dict[Any, tuple[int, Any]] = {}
                for chunk in _page_chunks(conn, t.name, self._chunk_pages):
                    t0 = time.monotonic()
                    query = sql.SQL(q).format(chunk=sql.SQL(chunk), recent=recent, **parts)
                    for b, n, h in conn.execute(query):
                        n0, h0 = out.get(b, (0, 0))
                        out[b] = (n0 + n, h0 + h)
                    self._rest(t0)
                return out
            with tgt.transaction():
                tgt.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                tgt.execute(_CANONICAL_TEXT)
                # Rows written on the target since the switch are the new truth:
                # compare everything else, at one snapshot of the target.
                recent = t.logged_match([r[0] for r in tgt.execute(
                    "SELECT DISTINCT pk FROM shardkit.changes WHERE tbl = ANY(%s) "
                    "AND bucket = ANY(%s::integer[])", (list(t.names), buckets))],
                    lambda c: sql.SQL("x.") + at[c])
                # The source no longer changes (it does not own the buckets).  One
                # side after the other: scanning both at once took the cores other
                # writers need, for no gain in the move's time.
                def source_side() -> dict[Any, Any]:
                    with src.transaction():
                        src.execute("SET TRANSACTION READ ONLY")
                        src.execute(_CANONICAL_TEXT)
                        return sums(src, recent)

                theirs = sums(tgt, recent)
                ours = source_side()
            if ours != theirs:
                bad = sorted(b for b in set(ours) | set(theirs) if ours.get(b) != theirs.get(b))
                detail = ", ".join(
                    f"bucket {b}: source {ours.get(b, (0, 0))[0]} rows, target {theirs.get(b, (0, 0))[0]} rows"
                    + (" with different contents" if ours.get(b, (0,))[0] == theirs.get(b, (0,))[0] else "")
                    for b in bad[:5])
                raise RebalanceError(
                    f"{label}: verification failed for table {t.name} in {counted(len(bad), 'bucket')} ({detail}); "
                    "the source's rows are kept; investigate, then resume to re-verify", step="verified")
            checked += sum(c for c, _ in ours.values())
        return checked

    def _clean_up(self, src: psycopg.Connection, tgt: psycopg.Connection, tables: list[_Table],
                  buckets: list[int], move_id: int) -> int:
        deleted = 0
        for t in reversed(tables):  # children first
            # One statement per slice of pages (each reads only its pages), each its
            # own transaction: nobody else writes these rows (the shard does not own
            # them), so resuming after a crash just deletes what is left.  Always
            # gently: deleting dirties every page it touches, and the WAL it writes
            # delays other writers' commits (measured: 10-18x their p99 at full
            # speed); nothing waits for the clean-up, the map has switched already.
            for chunk in _page_chunks(src, t.name, max(1, _CHUNK_PAGES // 8)):
                t0 = time.monotonic()
                # A mover that lost its catalog session may wake up after another
                # finished the move and a later one brought the buckets back here: its
                # deletes would remove live rows.  (One catalog write per slice.)
                self._still_mine(move_id)
                with src.transaction():
                    src.execute(f"SET LOCAL {MOVER_SETTING} = 'on'")
                    if self._replica.get(id(src)):
                        # No user triggers (the move deletes nothing of the application's), no
                        # foreign-key checks (a row's children may lie in a later slice); so no
                        # ON DELETE CASCADE either: every moved table is deleted here.
                        src.execute(_REPLICA_ON)
                    cur = src.execute(sql.SQL("DELETE FROM {t} WHERE {c} AND {b} = ANY(%s::integer[])").format(
                        t=_ident(t.name), c=sql.SQL(chunk), b=sql.SQL(t.bucket_sql)), (buckets,))
                    deleted += cur.rowcount
                self._rest(t0, min(self.duty, _CLEAN_UP_DUTY))
        with src.transaction():
            src.execute("DELETE FROM shardkit.changes WHERE bucket = ANY(%s::integer[])", (buckets,))
            src.execute("DELETE FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[])", (buckets,))
        # The target owns the buckets and its writers log their changes (for the
        # verification) until this delete commits; one that read moving_buckets before
        # that still logs its change, and commits it after a delete of the log in the same
        # transaction would have run: wait for those (by their guard locks, as capture
        # does), then empty the log, or that change stays there for good.
        with tgt.transaction():
            tgt.execute("DELETE FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[])", (buckets,))
        self._wait_for_writers(tgt, move_id, buckets)
        with tgt.transaction():
            tgt.execute("DELETE FROM shardkit.changes WHERE bucket = ANY(%s::integer[])", (buckets,))
        return deleted


# -- status and abort ----------------------------------------------------------------


#: Whether move ``moves.id`` published its split's slices: Mover._split records "split" in
#: the journal in the transaction that publishes them.
_SPLIT_PUBLISHED_SQL = ("EXISTS (SELECT 1 FROM shardkit_catalog.journal j WHERE j.move_id = moves.id "
                        "AND j.batch IS NULL AND j.step = 'split')")


def move_status(cluster: Cluster, move_id: int | None = None) -> list[dict[str, Any]]:
    """Moves (all, or one) with their batches and the step each batch has reached.

    A few catalog queries, no shard's: what an abort or a mover that stopped half-way
    did on the shards and did not record is told from the journal entries they make
    before they begin (``undoing``, ``cutting-over``), as "may have"."""
    catalog = _need_catalog(cluster)
    if not catalog.initialised():
        return []
    with catalog.engine.connect() as conn:
        # The moves whose lock a process holds: a mover running it (or an abort undoing it).
        # A running move without one stopped: its mover was interrupted or killed.
        held = set(conn.execute(text(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = CAST(:c AS oid) AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"c": MOVER_LOCK_CLASS}).scalars())
        moves = conn.execute(text(
            "SELECT id, state, reason, error, created_at, updated_at, plan->>'kind' = 'slices' AS slices, "
            # An abort fences movers out with a runner of its own; a mover puts its own back
            # as soon as it holds the move.
            "coalesce(runner LIKE 'abort-%', false) AS abort_runner, "
            # A slice move whose plan writes new slices (a split, or keys no slice held):
            # whether the catalog published them (Mover._split records "split" as it does).
            "CASE WHEN plan->>'kind' = 'slices' AND plan->'split' IS DISTINCT FROM plan->'old' "
            f"THEN {_SPLIT_PUBLISHED_SQL} END AS split_published "
            "FROM shardkit_catalog.moves "
            + ("WHERE id = :m " if move_id is not None else "") + "ORDER BY id"),
            {"m": move_id}).mappings().all()
        out = []
        for m in moves:
            batches = conn.execute(text(
                "SELECT batch, source, target, buckets, step, map_version FROM shardkit_catalog.move_batches "
                "WHERE move_id = :m ORDER BY batch"), {"m": m["id"]}).mappings().all()
            # Each batch's latest copy: a batch resumed with tables its copy did not
            # know is copied again (Mover._run_batch), its earlier copy replaced.  The
            # copies of a batch an abort undid were deleted: counted apart.
            latest = conn.execute(text(
                "SELECT DISTINCT ON (batch) batch, (detail->>'rows')::bigint FROM shardkit_catalog.journal "
                "WHERE move_id = :m AND step = 'copied' ORDER BY batch, id DESC"), {"m": m["id"]}).all()
            # Per batch: its latest step entry, and the latest abort's undo and cut-over
            # begun on it.  One begun after the batch's latest step did not record its end.
            marks = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT coalesce(batch, (detail->>'batch')::int), max(id) FILTER (WHERE batch IS NOT NULL), "
                "max(id) FILTER (WHERE batch IS NULL AND step = :u), "
                "max(id) FILTER (WHERE batch IS NULL AND step = :c) FROM shardkit_catalog.journal "
                "WHERE move_id = :m AND (batch IS NOT NULL OR step IN (:u, :c)) GROUP BY 1"),
                {"m": m["id"], "u": _UNDOING, "c": _CUTTING_OVER})}

            def begun(batch: int, which: int) -> bool:
                # The latest of the batch's step, undo and cut-over entries: an undo that
                # stopped before it touched the shards, then a resume that began a cut-over,
                # leaves the cut-over the one that did not record its end.
                mark = marks.get(batch, (None, None, None))
                return mark[which] is not None and all(
                    other is None or mark[which] > other for i, other in enumerate(mark) if i != which)

            # Batches an abort began to undo and did not record undone (it was killed, or
            # failed): its capture may be stopped and its copies deleted, whatever the step.
            undoing = {b["batch"] for b in batches if b["step"] not in ("aborted", LEFTOVERS, "cleaned")
                       and begun(b["batch"], 1)}
            # Batches whose cut-over began and did not record the switch: the source may
            # have given the buckets up (then abort is refused: resume finishes it).
            cutting = {b["batch"] for b in batches if b["step"] == "copied" and b["batch"] not in undoing
                       and begun(b["batch"], 2)}
            undone = {b["batch"] for b in batches if b["step"] == "aborted"}
            left = {b["batch"] for b in batches if b["step"] == LEFTOVERS}
            copied = sum(n or 0 for b, n in latest if b not in undone and b not in left and b not in undoing)
            running = m["state"] == "running"
            mover = m["id"] in held
            # A running move that an abort began to undo and that no process holds: the abort
            # stopped half-way (killed, failed, or a shard it needed was unreachable).
            abort_stopped = running and not mover and bool(undoing or undone or left)
            if not running or mover:
                then: list[str] = [] if m["state"] != "aborted" or not left else ["abort"]
            elif left:
                then = ["abort"]  # resume is refused: their target may still hold copies
            elif any(b["step"] in ("switched", "verified") for b in batches):
                then = ["resume"]  # abort is refused while a batch has switched
            elif abort_stopped:
                then = ["abort", "resume"]
            else:
                then = ["resume", "abort"]  # (every batch finished: either records it done)
            out.append({
                "move": m["id"], "state": m["state"], "reason": m["reason"], "error": m["error"],
                "mover": mover,
                # The process holding it is an abort (undoing it), not a mover.
                "aborting": mover and bool(m["abort_runner"]),
                # An abort of the running move stopped before it finished (see "next").
                "abort_stopped": abort_stopped,
                # The commands that go on from here, the first the usual one (none while a
                # process holds the move, or once it is done or aborted without leftovers).
                "next": then,
                # What the batches' "buckets" count: hash buckets, or a range or list group's slices.
                "unit": "slice" if m["slices"] else "bucket",
                # A slice move that splits (or gives a shard keys no slice held): whether its
                # new slices are published (None: a move that makes none).  Until they are,
                # abort takes them back off the shards; once they are, it keeps them.
                "split_published": m["split_published"],
                "created_at": m["created_at"].isoformat(), "updated_at": m["updated_at"].isoformat(),
                # Rows copied by batches no abort undid (for an aborted move: those that
                # finished, whose rows moved), and by those it undid (their copies deleted;
                # batches with leftovers count in neither: see "leftovers"; nor do batches
                # an abort began to undo: see "rows_undoing").
                "rows_copied": int(copied),
                "rows_undone": int(sum(n or 0 for b, n in latest if b in undone)),
                # Rows copied by the batches an abort began to undo and has not recorded
                # undone (their copies may be deleted).
                "rows_undoing": int(sum(n or 0 for b, n in latest if b in undoing)),
                "batches": [{"batch": b["batch"], "source": b["source"], "target": b["target"],
                             "buckets": len(b["buckets"]), "step": b["step"],
                             "map_version": b["map_version"],
                             # An abort began to undo it and has not recorded it undone (no
                             # process holding the move: the abort stopped; its capture may be
                             # stopped and its copies deleted, whatever "step" says).
                             "undoing": b["batch"] in undoing,
                             # A cut-over began and has not recorded the switch (no process
                             # holding the move: the source may have given the buckets up).
                             "cutting_over": b["batch"] in cutting} for b in batches],
                # Batches aborted with --target-lost: the shard that may still hold their
                # rows (and ownership), until `abort` on the aborted move removes them.
                "leftovers": [{"batch": b["batch"], "shard": b["target"], "buckets": sorted(b["buckets"])}
                              for b in batches if b["step"] == LEFTOVERS],
            })
    return out


def abort(cluster: Cluster, move_id: int, *, target_lost: bool = False) -> dict[str, Any]:
    """Stop a running move and give its unswitched buckets back to their source.

    Batches that have not switched are undone: the target gives up any
    ownership a crashed cut-over left it and its copies are deleted; the
    source stops capturing and owns the buckets.  A batch that has switched
    (by the journal, or in fact on the shards: a mover may have died between
    the source's commit and the catalog's) blocks the abort: resume the move,
    then plan the buckets back.  Batches already finished stay moved.

    ``target_lost`` (``--target-lost``): a batch whose target cannot be reached
    is undone on its source alone (capture stops, the source owns the buckets);
    the batch is recorded as :data:`LEFTOVERS`: its target may still hold copies
    of the buckets' rows, and the ownership a crashed cut-over gave it.  Until
    they are removed, cross-shard reads leave those rows out and moves of those
    buckets to that shard are refused; ``abort`` again on the aborted move removes
    them once the shard is reachable.  Refused for a move of a range or list
    group's slices, and when a cut-over of the batch began and a map version once
    gave its buckets to the target (a process holding that map could write there
    if the target came back owning them).

    On a move already aborted with leftovers, removes them (every shard holding
    them must be reachable).

    A running move whose batches have all finished (its mover stopped before it
    recorded the end) has nothing to undo: it is recorded ``done``, as ``resume``
    would, not ``aborted`` (the result's ``done`` is True).
    """
    catalog = _need_catalog(cluster, initialised=True)
    _fits_live_map(cluster, catalog)
    # The move's lock, on a catalog session, as a mover holds it; and, like a mover's, every
    # catalog write of the abort checks the move is still its own and takes the lock again if
    # a catalog restart took its session (else a resume started then ran alongside it).
    lock = _MoveLock(catalog, move_id, "abort")
    if not lock.take():
        raise RebalanceError(f"move {move_id} is being run by a mover, or aborted by another `shardkit "
                             "rebalance abort`; stop the mover (or let the abort finish) first", move_id=move_id)
    runner = "abort-" + uuid.uuid4().hex
    undone: list[int] = []

    def fence(conn: Any) -> None:
        _fence(conn, move_id, runner, lock, "abort",
               (f" (batches {undone} are undone already)" if undone else "")
               + f"; `shardkit rebalance status {move_id}` shows the move")

    try:
        with catalog.engine.begin() as conn:
            state = conn.execute(text("SELECT state FROM shardkit_catalog.moves WHERE id = :m"),
                                 {"m": move_id}).scalar()
            if state == "running":
                # Fence out a mover that lost its lock but still runs (before the
                # batches are read: it records no step after this).
                conn.execute(text("UPDATE shardkit_catalog.moves SET runner = :r WHERE id = :m"),
                             {"r": runner, "m": move_id})
            batches = conn.execute(text(
                "SELECT batch, source, target, buckets, step FROM shardkit_catalog.move_batches "
                "WHERE move_id = :m ORDER BY batch"), {"m": move_id}).all()
            left = [b for b in batches if b.step == LEFTOVERS]
            if state != "running" and not (state == "aborted" and left):
                raise RebalanceError(f"move {move_id} is {state or 'unknown'}; nothing to abort",
                                     move_id=move_id)
            group = _move_group(conn, move_id)
        if state == "aborted":
            # Aborted with --target-lost: remove what it left on the targets.
            return _remove_leftovers(cluster, catalog, move_id, left)
        if all(b.step == "cleaned" for b in batches) and (batches or _split_published(catalog, move_id)):
            # Every batch finished (a move without batches, one giving a shard new keys, once
            # the catalog has published its slices) (its mover stopped before it recorded the move done):
            # nothing is left to undo and everything moved, so the move is done, as
            # `resume` would record it; "aborted" would say its buckets went back.
            finished = [b.batch for b in batches]
            with catalog.engine.begin() as conn:
                fence(conn)
                conn.execute(text("UPDATE shardkit_catalog.moves SET state = 'done', error = NULL, "
                                  "updated_at = now() WHERE id = :m"), {"m": move_id})
                Catalog.record(conn, move_id, None, "done", {"by": "abort", "finished": finished})
            return {"move": move_id, "undone_batches": [], "finished_batches": finished, "leftovers": [],
                    "removed_leftovers": [], "done": True}
        pending = [b for b in batches if b.step != "cleaned"]
        # Every shard the undo reads and writes, before anything is undone.
        urls = {(b.batch, role): _shard_url(cluster, shard, move_id, b.batch, role)
                for b in pending for role, shard in (("source", b.source), ("target", b.target))}
        for b in pending:
            switched = b.step in ("switched", "verified")
            if not switched and b.step != "pending":
                with cluster.primary(b.source).connect() as c:
                    source_owns = c.execute(text(
                        "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = ANY(:b)"),
                        {"b": list(b.buckets)}).scalar()
                switched = source_owns == 0
            if switched:
                back = "plan those buckets back" if group is None else _slices_back(catalog, move_id, b)
                raise RebalanceError(
                    f"move {move_id}: batch {b.batch} has switched to {b.target}; run `shardkit "
                    f"rebalance resume {move_id}` to finish it, then {back}",
                    move_id=move_id, step=b.step)
        # Batches --target-lost may not leave to their target (None: it may), refused
        # before anything is undone when their target is down.
        unsafe = _unsafe_without_target(cluster, catalog, move_id, pending, group) if target_lost else {}
        for b in pending:
            if unsafe.get(b.batch) and _unreachable(cluster, urls[(b.batch, "target")]) is not None:
                raise RebalanceError(
                    f"move {move_id}: cannot reach {b.target}, the target of batch {b.batch}, and "
                    f"--target-lost cannot undo the batch without it: {unsafe[b.batch]}; the move "
                    f"stays running: run `shardkit rebalance abort {move_id}` once {b.target} is "
                    "reachable again (or rebuilt with its tables)", move_id=move_id, step=b.step)
        leftovers: list[dict[str, Any]] = []
        for b in pending:
            buckets = list(b.buckets)
            lost = target_lost and not unsafe.get(b.batch)
            with _connect_for_abort(cluster, urls, b, move_id, undone, lost) as (src, tgt, why):
                tables = _moved_tables(cluster, src, b.source, group)
                # Before the shards change: an abort that stops before it records the
                # batch undone leaves its step as it was, and `status` must tell.
                with catalog.engine.begin() as conn:
                    fence(conn)
                    Catalog.record(conn, move_id, None, _UNDOING, {"batch": b.batch})
                with src.transaction():
                    # Writers in flight, and a cut-over in flight, finish first: none
                    # logs a change after this, and the source owns the buckets after.
                    src.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                (GATE_LOCK_CLASS, move_id % 2147483647))
                    src.execute("DELETE FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[])",
                                (buckets,))
                    src.execute("DELETE FROM shardkit.changes WHERE bucket = ANY(%s::integer[])", (buckets,))
                    src.execute("INSERT INTO shardkit.owned_buckets SELECT unnest(%s::integer[]) "
                                "ON CONFLICT DO NOTHING", (buckets,))
                lsn = None if tgt is None else _undo_on_target(tgt, tables, buckets, move_id)
            undone.append(b.batch)
            with catalog.engine.begin() as conn:
                fence(conn)
                if lsn is not None:
                    Catalog.set_floor(conn, move_id, b.batch, "target", lsn)
                    Catalog.record(conn, move_id, b.batch, "aborted")
                elif b.step == "pending":
                    # Nothing of the batch reached the target (the copy follows the
                    # "capturing" record, and a cut-over the "copied" one).
                    Catalog.record(conn, move_id, b.batch, "aborted", {"target_unreachable": why})
                else:
                    Catalog.record(conn, move_id, b.batch, LEFTOVERS, {
                        "shard": b.target, "buckets": buckets, "step": b.step, "target_unreachable": why,
                        # a cut-over began: the target may own the buckets too
                        "may_own": b.batch in unsafe})
                    leftovers.append({"batch": b.batch, "shard": b.target, "buckets": sorted(buckets)})
        if group is not None:
            with catalog.engine.begin() as conn:
                fence(conn)
            _restore_group(cluster, catalog, group, move_id)
        kept = [b.batch for b in batches if b.step == "cleaned"]
        with catalog.engine.begin() as conn:
            fence(conn)
            conn.execute(text("UPDATE shardkit_catalog.moves SET state = 'aborted', updated_at = now() "
                              "WHERE id = :m"), {"m": move_id})
            Catalog.record(conn, move_id, None, "aborted", {
                "undone": undone, "kept": kept, **({"leftovers": leftovers} if leftovers else {})})
    except ShardUnavailable as e:
        if e.node != "catalog":
            raise
        # A catalog that died (or restarted) under the abort: say where it stopped and what to
        # run (still a ShardUnavailable of the catalog node, as the catalog's own error is).
        raise ShardUnavailable(
            f"move {move_id}: the abort stopped: {e}"
            + (f" (batches {undone} are undone already)" if undone else "")
            + f"; once the catalog answers again, run `shardkit rebalance abort {move_id}` again "
            f"(`shardkit rebalance status {move_id}` shows what is undone)", node="catalog", cause=e.cause) from e
    finally:
        lock.release()
    return {"move": move_id, "undone_batches": undone, "finished_batches": kept, "leftovers": leftovers,
            "removed_leftovers": []}


def _split_published(catalog: Catalog, move_id: int) -> bool:
    """Whether slice move ``move_id`` published its new slices."""
    with catalog.engine.connect() as conn:
        return bool(conn.execute(text(f"SELECT {_SPLIT_PUBLISHED_SQL} FROM shardkit_catalog.moves "
                                      "WHERE id = :m"), {"m": move_id}).scalar())


def _slices_back(catalog: Catalog, move_id: int, b: Any) -> str:
    """What moves the slices of batch ``b`` of slice move ``move_id`` back to its source."""
    with catalog.engine.connect() as conn:
        raw = conn.execute(text("SELECT plan FROM shardkit_catalog.moves WHERE id = :m"), {"m": move_id}).scalar()
    plan = plan_from_dict(raw)
    assert isinstance(plan, SlicePlan)
    out = []
    for s in (s for s in plan.split if s.id in set(b.buckets)):
        if len(s.values) == 1:
            how = f"--move-value {shlex.quote(f'{s.group}:{s.values[0]}')}"
        elif not s.values and not s.default and (s.lower is not None or s.upper is not None):
            how = (f"--split {shlex.quote(f'{s.group}:{s.lower}')}" if s.lower is not None
                   else f"--split {shlex.quote(f'{s.group}:{s.upper}')} --lower")
        else:
            out.append(f"slice {s.id} ({s.describe()}) back to {b.source} (--split or --move-value)")
            continue
        out.append(f"slice {s.id} ({s.describe()}) back to {b.source}: `shardkit rebalance apply {how} "
                   f"--to {b.source}`")
    return "move " + ("; ".join(out) or f"its slices back to {b.source} (--split or --move-value)")


def _undo_on_target(tgt: psycopg.Connection, tables: list[_Table], buckets: list[int], move_id: int) -> str:
    """Delete ``buckets``' copies and ownership (and capture) from a batch's target; return
    its WAL position after the deletes."""
    replica = _may_replicate(tgt)
    guarded = tgt.execute("SELECT to_regclass('shardkit.owned_buckets') IS NOT NULL").fetchone()[0]
    # A target rebuilt since may lack tables (they hold no copies) or shardkit's SQL
    # functions, which the deletes compute the rows' buckets with (installed here, as
    # `rebalance init` would: it is refused while the move runs).
    present = {r[0] for r in tgt.execute(f"SELECT n.tbl FROM {_CONFIGURED_PG}",
                                         configured_tables(t.name for t in tables))}
    tables = [t for t in tables if t.name in present]
    hashing = tgt.execute("SELECT to_regprocedure('shardkit.hash_version()') IS NOT NULL").fetchone()[0]
    with tgt.transaction():
        if tables and not hashing:
            tgt.execute(INSTALL_SQL)
        # A copy in flight (a mover that lost its lock) commits first.
        _lock_copies(tgt, move_id)
        tgt.execute(f"SET LOCAL {MOVER_SETTING} = 'on'")
        if guarded:  # (a target rebuilt without shardkit's tables owns nothing)
            # A cut-over that died after the target's commit left it owning them.
            tgt.execute("DELETE FROM shardkit.owned_buckets WHERE bucket = ANY(%s::integer[])", (buckets,))
            tgt.execute("DELETE FROM shardkit.moving_buckets WHERE bucket = ANY(%s::integer[])", (buckets,))
            tgt.execute("DELETE FROM shardkit.changes WHERE bucket = ANY(%s::integer[])", (buckets,))
        if replica:  # the copies go as the mover wrote them: no user triggers
            tgt.execute(_REPLICA_ON)
        for t in reversed(tables):
            tgt.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::integer[])").format(
                _ident(t.name), sql.SQL(t.bucket_sql)), (buckets,))
    # The target's replicas serve reads once they have replayed the deletes.
    return _committed_position(tgt)


def _unreachable(cluster: Cluster, url: Any) -> str | None:
    """None if a server answers at ``url``, else the first line of why not (no password)."""
    try:
        _connect(url).close()
    except psycopg.OperationalError as e:
        return _masked_reason(e, cluster)
    return None


def _unsafe_without_target(cluster: Cluster, catalog: Catalog, move_id: int, pending: list[Any],
                           group: str | None) -> dict[int, str | None]:
    """Per batch of ``pending``, why ``--target-lost`` may not undo it without its target
    (a string), or None (it may, though a cut-over began: the target may own the buckets);
    batches missing: it may, and the target owns none of the buckets."""
    out: dict[int, str | None] = {}
    with catalog.engine.connect() as conn:
        cut = {int(r[0]) for r in conn.execute(text(
            "SELECT DISTINCT (detail->>'batch')::int FROM shardkit_catalog.journal "
            "WHERE move_id = :m AND step = :s"), {"m": move_id, "s": _CUTTING_OVER})}
        for b in pending:
            if group is not None:
                out[b.batch] = (f"an abort of a move of group {group}'s slices gives every shard the "
                                "catalog's slices again, the target included")
                continue
            if b.step == "pending":
                continue
            if b.batch not in cut:
                continue
            # The target commits ownership before the source gives it up: a mover that died in
            # between left the target owning the buckets.  That is harmless while no map, not
            # even an old one a process may still hold, sends their writes there.
            mapped = conn.execute(text(
                "SELECT array_agg(DISTINCT x ORDER BY x) FROM shardkit_catalog.maps, unnest(CAST(:b AS integer[])) x "
                "WHERE bucket_map[x + 1] = :t"), {"b": list(b.buckets), "t": b.target}).scalar()
            out[b.batch] = None if not mapped else (
                f"a cut-over of the batch began, so {b.target} may own buckets {mapped[:10]}, which an "
                f"older map version gave it: a process still holding that map could write to them there "
                f"if {b.target} came back with its data")
    return out


@contextlib.contextmanager
def _connect_for_abort(cluster: Cluster, urls: dict[tuple[int, str], Any], b: Any, move_id: int,
                       undone: list[int], target_lost: bool = False
                       ) -> Iterator[tuple[psycopg.Connection, psycopg.Connection | None, str | None]]:
    """Connections to the source and the target of batch ``b``, for an abort to undo it; a
    shard that cannot be reached, or lost while the batch is undone, is refused saying what
    is left to undo.  With ``target_lost``, a target that cannot be reached gives None, and why."""
    why = None

    def spare(end: tuple[str, str, Any], error: BaseException) -> bool:
        nonlocal why
        if end[0] != "target" or not target_lost:
            return False
        why = _masked_reason(error, cluster)
        log.warning("move %s: cannot reach %s, the target of batch %s (%s); undoing the "
                    "batch on its source only (--target-lost)", move_id, end[1], b.batch, why)
        return True

    def refused(lost: list[tuple[str, str, Any]], error: BaseException, what: str) -> RebalanceError:
        role, shard, url = lost[0]
        reason = _masked_reason(error, cluster)
        if what == _CANNOT_CONNECT:
            what = f"cannot reach {shard}, the {role} of batch {b.batch} ({reason})"
        else:
            # A shard that died (or restarted) while the batch was being undone: its undo
            # rolled back, or committed unseen; the next abort does it again either way.
            what = (f"lost the connection to {shard}, the {role} of batch {b.batch} "
                    f"({_address(url)}: {reason}) while undoing it")
        gone = "" if role == "source" else (
            f", or, if {shard} is lost (its data gone, or down for long), `shardkit rebalance "
            f"abort {move_id} --target-lost`: it undoes the batch on {b.source} alone (capture "
            f"stops, {b.source} keeps the buckets) and records that {shard} still holds copies "
            "of their rows (and, after a crashed cut-over, their ownership); moves of them to "
            f"{shard} are refused until `shardkit rebalance abort {move_id}`, run once {shard} "
            "is back, removes them")
        return RebalanceError(
            f"move {move_id}: {what}; the abort needs it to undo the batch"
            + (f" (batches {undone} are undone already)" if undone else "")
            + f": the move stays running; run `shardkit rebalance abort {move_id}` again once "
            f"{shard} is reachable" + gone, move_id=move_id)

    ends = [(role, shard, urls[(b.batch, role)]) for role, shard in (("source", b.source), ("target", b.target))]
    with _batch_ends(ends, refused, spare=spare) as conns:
        yield conns[0], (conns[1] if len(conns) > 1 else None), why


_CANNOT_CONNECT = "cannot connect to"


@contextlib.contextmanager
def _batch_ends(ends: Sequence[tuple[str, str, Any]],
                fail: Callable[[list[tuple[str, str, Any]], BaseException, str], BaseException],
                spare: Callable[[tuple[str, str, Any], BaseException], bool] | None = None
                ) -> Iterator[list[psycopg.Connection]]:
    """Connections to a batch's ends (``(role, shard, url)``: its source, its target), for a
    mover or an abort.  A server that cannot be reached, or whose connection breaks inside
    the block (it died, restarted, the network dropped), raises ``fail(ends lost, error,
    what)`` (``what``: :data:`_CANNOT_CONNECT` or "lost the connection to"), which names
    them (the driver's message names neither the shard nor its role); an end ``spare``
    answers True for is left out instead."""
    conns: list[tuple[tuple[str, str, Any], psycopg.Connection]] = []
    try:
        for end in ends:
            try:
                conns.append((end, _connect(end[2])))
            except psycopg.OperationalError as e:
                if spare is not None and spare(end, e):
                    continue
                raise fail([end], e, _CANNOT_CONNECT) from e
        try:
            yield [conn for _end, conn in conns]
        except psycopg.OperationalError as e:
            lost = [end for end, conn in conns if conn.broken]
            if not lost:
                raise
            raise fail(lost, e, "lost the connection to") from e
    finally:
        for _end, conn in conns:
            conn.close()


def _remove_leftovers(cluster: Cluster, catalog: Catalog, move_id: int, left: list[Any]) -> dict[str, Any]:
    """Delete from their shards the rows (and ownership) that ``abort --target-lost`` left of
    move ``move_id``'s batches ``left``; each batch is recorded "aborted" once its shard is
    clean.  A shard still unreachable is refused: its leftovers stay recorded."""
    removed: list[int] = []
    for b in left:
        buckets = list(b.buckets)
        url = _shard_url(cluster, b.target, move_id, b.batch, "target")
        current = catalog.current_map()
        assert current is not None
        # Moves of these buckets to the shard are refused while they are recorded, so its
        # rows of them are leftovers; were they its own, deleting them would lose them.
        owned = [x for x in buckets if x < len(current.bucket_map) and current.bucket_map[x] == b.target]
        if owned:
            raise RebalanceError(
                f"move {move_id}: the live map gives buckets {owned[:10]} to {b.target}, which holds "
                f"leftovers of them from batch {b.batch}: its rows of them are not leftovers any more; "
                "nothing was deleted", move_id=move_id)
        try:
            tgt = _connect(url)
        except psycopg.OperationalError as e:
            first = _masked_reason(e, cluster)
            raise RebalanceError(
                f"move {move_id} is aborted; cannot reach {b.target} ({first}), which may still hold rows "
                f"of {len(buckets)} buckets of batch {b.batch}"
                + (f" (batches {removed} are clean already)" if removed else "")
                + f": they stay recorded and moves of them to {b.target} refused; run `shardkit "
                f"rebalance abort {move_id}` again once {b.target} is reachable", move_id=move_id) from None
        with tgt:
            # (A table the shard was rebuilt without holds no leftovers.)
            tables = _moved_tables(cluster, tgt, b.target, present_only=True)
            lsn = _undo_on_target(tgt, tables, buckets, move_id)
        with catalog.engine.begin() as conn:
            Catalog.set_floor(conn, move_id, b.batch, "target", lsn)
            Catalog.record(conn, move_id, b.batch, "aborted", {"leftovers_removed_from": b.target})
        removed.append(b.batch)
    with catalog.engine.begin() as conn:
        Catalog.record(conn, move_id, None, "leftovers removed", {"batches": removed})
    return {"move": move_id, "undone_batches": [], "finished_batches": [], "leftovers": [],
            "removed_leftovers": removed}


def _restore_group(cluster: Cluster, catalog: Catalog, group: str, move_id: int) -> None:
    """Give every shard the catalog's slices of ``group`` and their ownership again.

    After an abort (no batch of the move has switched, so the catalog is right):
    a mover that died inside its split may have left shards with the split's
    slices, or with a new slice the catalog never heard of.
    """
    with catalog.engine.connect() as conn:
        current = catalog.current_map(conn)
        live = [s for s in (current.slices if current else ()) if s.group == group]
        raw = conn.execute(text("SELECT plan->'split' FROM shardkit_catalog.moves WHERE id = :m"),
                           {"m": move_id}).scalar() or []
    ids = sorted({s.id for s in live} | {int(d["id"]) for d in raw})
    for shard in cluster.shard_names:
        with cluster.primary(shard).begin() as c:
            write_slices(c, live, groups=[group])
            c.execute(text("DELETE FROM shardkit.owned_buckets WHERE bucket = ANY(CAST(:b AS integer[]))"),
                      {"b": ids})
            c.execute(text("INSERT INTO shardkit.owned_buckets SELECT unnest(CAST(:b AS integer[]))"),
                      {"b": [s.id for s in live if s.shard == shard]})


def shard_weights(cluster: Cluster, *, by: str = "rows",
                  bucket_map: Sequence[str] | None = None) -> dict[int, float]:
    """Per bucket, its rows (``by="rows"``) or bytes (``by="bytes"``) across the guarded tables,
    counted on the shard that owns it in ``bucket_map`` (default: the cluster's): during a
    move, and until a batch's clean-up or an abort deletes them, a bucket's rows are on its
    source and on its target too, and counting both would weigh it twice."""
    owner = cluster.config.bucket_map if bucket_map is None else bucket_map
    weights: dict[int, float] = defaultdict(float)
    for shard in cluster.shard_names:
        with cluster.primary(shard).connect() as conn:
            if not guard_installed(conn):
                continue
            for g in guarded_tables(cluster.config):
                if g.kind != "hash":
                    continue
                _, _, types = table_shape(conn, g.table)
                b = unit_expression(g, types[g.key], cluster.config.bucket_count)
                measure = "count(*)" if by == "rows" else "sum(pg_column_size(x.*))"
                for bucket, w in conn.execute(text(
                        f"SELECT {b} AS b, {measure} FROM {table_sql(g.table)} AS x GROUP BY 1")):
                    if bucket is not None and owner[int(bucket)] == shard:
                        weights[int(bucket)] += float(w or 0)
    return dict(weights)
