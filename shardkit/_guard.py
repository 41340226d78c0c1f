"""The ownership guard: each shard refuses writes to buckets it does not own.

Installed on every shard's primary by ``shardkit rebalance init`` (or
:func:`install_guard`).  It adds to the ``shardkit`` schema:

``shardkit.owned_buckets(bucket)``
    the buckets this shard owns.  Rebalancing changes it, in the same
    transaction that moves ownership.
``shardkit.moving_buckets(bucket, move_id)``
    buckets whose writes are being recorded for a move in progress (on the
    source while rows are copied, on the target until the move is verified).
``shardkit.changes(id, bucket, tbl, pk)``
    the primary keys written in moving buckets, read (and deleted) by the mover.

``shardkit.slices(grp, id, lower, upper, val, is_default)``
    this shard's copy of the slices of range and list groups (their movable
    units, numbered above every bucket; see ``shardkit._slices``).

and one ``BEFORE INSERT OR UPDATE OR DELETE`` row trigger per hash-sharded
table and per table of a movable range or list group.  The trigger

1. computes the row's bucket with ``shardkit.bucket()``, or its slice with
   ``shardkit.slice__<table>()`` (old and new row); below, "bucket" stands
   for either;
2. takes a shared transaction-level advisory lock on the bucket's stripe
   (``pg_advisory_xact_lock_shared(GUARD_LOCK_CLASS, bucket % GUARD_LOCK_STRIPES)``),
   held until the writer's transaction ends: a mover that begins to capture
   buckets waits for the transactions holding their stripes (one lock per stripe,
   not per bucket, so that a transaction writing rows of thousands of buckets does
   not fill PostgreSQL's shared lock table); then, for a moving bucket, the
   move's gate (``GATE_LOCK_CLASS``), which the mover takes exclusively to pause
   the moving buckets' writes while it switches them;
3. raises SQLSTATE ``SK001`` if this shard does not own the bucket, so a
   process holding a stale map can never write to the wrong shard;
4. records the primary key in ``shardkit.changes`` if the bucket is moving,
   under the configured table's name (a partitioned table's trigger runs on its
   partitions; guards installed before this logged the partition's name, which
   the mover still reads as the table's).

The mover's own sessions set ``shardkit.mover = on`` to write rows of buckets
the shard does not own yet (the copy) or any more (the clean-up).  The setting
is a guard against stale maps, not an access control: any role can set it.
Where their role may, they also write with ``session_replication_role =
replica``, under which this trigger (an ordinary one) does not fire either: the
mover's own rows are neither refused nor recorded as changes.

Writers should use READ COMMITTED (PostgreSQL's default) on guarded tables: the
trigger reads the ownership tables with a fresh snapshot per statement.  In
REPEATABLE READ or SERIALIZABLE it reads them with the transaction's snapshot, so
it also locks the ``owned_buckets`` rows it relies on (``FOR KEY SHARE``: the
writer's role needs UPDATE on that table): a switch committed since the snapshot
makes the write a serialization failure (SQLSTATE ``40001``), not a row on a shard
that gave its bucket away.  Writes such a snapshot makes to a bucket whose capture
began after it are not recorded as changes (the move's verification then finds the
row missing on the target and stops before the clean-up).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ._slices import movable_kind
from ._sql import install as install_sql
from ._strategies import HashStrategy
from .errors import ConfigurationError

log = logging.getLogger("shardkit.guard")

#: SQLSTATE raised by a shard for a write to a bucket it does not own.
NOT_OWNED_SQLSTATE: Final = "SK001"
#: First key of the advisory locks a writer holds per stripe of buckets it writes.
GUARD_LOCK_CLASS: Final = 0x5348  # "SH"
#: Buckets (and slices) share these many guard locks: bucket b's is b % GUARD_LOCK_STRIPES.
GUARD_LOCK_STRIPES: Final = 64
#: First key of the advisory lock ("gate") that writers of a move's buckets
#: share and the mover takes exclusively to switch them; second key: move id.
GATE_LOCK_CLASS: Final = 0x5349  # "SI"
#: The setting the mover sets in its own sessions to pass the guard.
MOVER_SETTING: Final = "shardkit.mover"

# PostgreSQL type name -> cast to the argument type of shardkit.bucket().
_BUCKET_CASTS: Final[dict[str, str]] = {
    "int2": "::bigint", "int4": "::bigint", "int8": "",
    "text": "", "varchar": "::text", "bpchar": "::text",
    "uuid": "", "bytea": "",
}

#: Key column types whose bucket PostgreSQL computes (``shardkit.bucket()``).
SQL_HASHABLE_TYPES: Final = frozenset(_BUCKET_CASTS)

_TABLES_SQL: Final = (
    "CREATE TABLE IF NOT EXISTS shardkit.owned_buckets (bucket integer PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS shardkit.moving_buckets ("
    " bucket integer PRIMARY KEY, move_id bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS shardkit.changes ("
    " id bigserial PRIMARY KEY, bucket integer NOT NULL, tbl text NOT NULL, pk jsonb NOT NULL)",
    "CREATE INDEX IF NOT EXISTS changes_bucket ON shardkit.changes (bucket)",
    # The slices of range and list groups (a copy of the catalog's, see shardkit._slices):
    # one row per range, per list value, per list default.
    "CREATE TABLE IF NOT EXISTS shardkit.slices ("
    " grp text NOT NULL, id integer NOT NULL, lower text, upper text, val text,"
    " is_default boolean NOT NULL DEFAULT false)",
    "CREATE INDEX IF NOT EXISTS slices_grp_val ON shardkit.slices (grp, val)",
    # TRUNCATE fires no row trigger: while buckets move away from this shard (the source
    # lists them from capture to clean-up), it would empty the table and leave the
    # target's copies, which the switch then serves as if the rows had never been removed.
    "CREATE OR REPLACE FUNCTION shardkit.guard_truncate() RETURNS trigger LANGUAGE plpgsql AS $t$\n"
    "BEGIN\n"
    "    IF EXISTS (SELECT 1 FROM shardkit.moving_buckets) THEN\n"
    "        RAISE EXCEPTION 'shardkit: table % cannot be truncated while buckets move to or from "
    "this shard', TG_TABLE_NAME USING ERRCODE = '55000', HINT = 'wait for the move to finish "
    "(shardkit rebalance status) or abort it, then truncate';\n"
    "    END IF;\n"
    "    RETURN NULL;\n"
    "END $t$",
)


def _function_name(prefix: str, table: str) -> str:
    # PostgreSQL cuts names at 63 bytes: long table names would share one function.
    name = f"{prefix}__{table}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:10]
    cut = table.encode()[:40].decode(errors="ignore")
    return f"{prefix}__{cut}_{digest}"


def trigger_function_name(table: str) -> str:
    return _function_name("guard", table)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def table_parts(table: str) -> tuple[str, ...]:
    """The identifiers a configured table name stands for: ``archive.users`` is table
    ``users`` of schema ``archive`` (as SQLAlchemy's ``Table.fullname`` writes it, and as
    the router reads it); ``users`` is found on the server's ``search_path``."""
    schema, dot, name = table.rpartition(".")
    return (schema, name) if dot else (name,)


def table_sql(table: str) -> str:
    """A configured table's name as SQL, each part quoted: ``"archive"."users"``; also what
    ``to_regclass()`` takes to find the table the application's queries name."""
    return ".".join(_ident(p) for p in table_parts(table))


# Configured tables (:t, names as configured; :q, the same as table_sql() writes them) as
# rows n(tbl, q) with their pg_class c, each found as the application's queries find it (a
# schema-qualified name in its schema, another on the search_path); tables that do not
# exist have no row.  Its parameters: configured_tables().
CONFIGURED_TABLES = ("unnest(CAST(:t AS text[]), CAST(:q AS text[])) AS n(tbl, q) "
                     "JOIN pg_class c ON c.oid = to_regclass(n.q)")


def configured_tables(tables: Iterable[str]) -> dict[str, list[str]]:
    """The parameters of :data:`CONFIGURED_TABLES` for ``tables``."""
    tables = list(tables)
    return {"t": tables, "q": [table_sql(t) for t in tables]}


class KeyType(str):
    """The type name (``pg_type.typname``) of a column of a domain, as shardkit decides by
    it: the base type's, under any number of domains (``CREATE DOMAIN tenant_id AS bigint``
    is ``int8``).  ``domain`` is the column's own type, the domain, for messages."""

    domain: str


def _key_type(type_name: str, base_name: str | None) -> str:
    if base_name is None:
        return type_name
    t = KeyType(base_name)
    t.domain = type_name
    return t


def type_label(type_name: str) -> str:
    """``type_name`` for a message: ``tenant_id (a domain over int8)`` for a domain's."""
    domain = getattr(type_name, "domain", None)
    return type_name if domain is None else f"{domain} (a domain over {type_name})"


# The base type of the domain t (pg_type), through domains over domains: a column whose
# type is a domain has its base type's values, which shardkit hashes, compares and moves
# as the base type's.  One row, NULL for a type that is no domain.
_DOMAIN_BASE: Final = (
    "LEFT JOIN LATERAL (WITH RECURSIVE d(base, depth) AS ("
    "SELECT t.typbasetype, 1 WHERE t.typtype = 'd' "
    "UNION ALL SELECT dt.typbasetype, d.depth + 1 FROM d JOIN pg_type dt ON dt.oid = d.base "
    "WHERE dt.typtype = 'd' AND d.depth < 100) "
    "SELECT bt.typname FROM d JOIN pg_type bt ON bt.oid = d.base ORDER BY d.depth DESC LIMIT 1"
    ") b ON true ")


def table_shape(conn: Connection, table: str, keys: Sequence[str] = ()
                ) -> tuple[list[str], list[str], dict[str, str]]:
    """(columns in order, primary-key columns, column -> type name) of ``table`` on this
    server; refuses shard key columns ``keys`` that compare text without case
    (:func:`_refuse_case_insensitive_key`).  A column of a domain has its base type's name,
    under any number of domains, as a :class:`KeyType` naming the domain."""
    rows = conn.execute(text(
        "SELECT a.attname, t.typname, b.typname, c.collname, c.collisdeterministic, "
        "a.attgenerated <> '' FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        + _DOMAIN_BASE +
        "LEFT JOIN pg_collation c ON c.oid = a.attcollation "
        "WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum"), {"t": table_sql(table)}).all()
    if not rows:
        raise ConfigurationError(f"table {table}", "does not exist on this shard",
                                 "create it (shardkit migrate upgrade) before installing the guard")
    missing = [k for k in keys if k not in {r[0] for r in rows}]
    if missing:
        # PostgreSQL cuts a longer name at 63 bytes (CREATE TABLE only NOTICEs it, and a
        # query's name is cut too, so the application works): the column is there, cut.
        cut = missing[0].encode()[:63].decode(errors="ignore")
        if cut != missing[0] and cut in {r[0] for r in rows}:
            raise ConfigurationError(
                f"table {table}",
                f"shard key column {table}.{missing[0]} (the config's) is longer than PostgreSQL's "
                f"63-byte limit on names: PostgreSQL stored it cut, as {cut}",
                f"name the column {cut} (or another name of at most 63 bytes) in the model and "
                "the config's groups, then run again")
        raise ConfigurationError(
            f"table {table}",
            f"shard key column {table}.{missing[0]} (the config's) does not exist on this shard "
            "(renamed or dropped by a migration?)",
            "name the column the table has now in the config's groups, or give the table that "
            "column back, then run again")
    for column, type_name, base_name, collation, deterministic, _ in rows:
        if column in keys:
            _refuse_case_insensitive_key(table, column, type_name, base_name, collation, deterministic)
    pk = [r[0] for r in conn.execute(text(
        "SELECT a.attname FROM pg_index i "
        "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = to_regclass(:t) AND i.indisprimary ORDER BY k.n"), {"t": table_sql(table)})]
    stored = [r for r in rows if not r[5]]   # generated columns are not copied
    return [r[0] for r in stored], pk, {r[0]: _key_type(r[1], r[2]) for r in stored}


def _refuse_case_insensitive_key(table: str, column: str, type_name: str, base_name: str | None,
                                 collation: str | None, deterministic: bool | None) -> None:
    """Refuse a shard key column that PostgreSQL compares other than by its exact string:
    ``citext`` (or a domain over it), or text under a nondeterministic collation (a
    case-insensitive ICU one, set in the database where models cannot show it).  There
    'Ada' = 'ada', but shardkit hashes, matches list values and orders ranges by the exact
    string: one key would live on two shards, and a read by one spelling miss the rows
    stored under the other."""
    if "citext" in (type_name, base_name):
        why = (f"is {type_name}" + (" (over citext)" if type_name != "citext" else "")
               + ", which compares without case")
    elif deterministic is False:
        why = f"is under collation {collation}, which is nondeterministic"
    else:
        return
    raise ConfigurationError(
        f"table {table}",
        f"shard key column {table}.{column} {why}: the database takes 'Ada' and 'ada' for one "
        "value, but shardkit places keys by their exact string, so one key would live on two shards",
        "key on a column holding the value normalised, lower(...), under a deterministic collation")


def bucket_expression(column: str, type_name: str, bucket_count: int, row: str = "") -> str:
    """SQL for the bucket of ``column`` (optionally qualified by ``row``, e.g. NEW)."""
    cast = _BUCKET_CASTS.get(type_name)
    if cast is None:
        raise ConfigurationError(
            f"column {column}", f"type {type_label(type_name)} cannot be hashed in SQL",
            "hash-sharded keys must be integer, text, varchar, uuid or bytea (or a domain over one) "
            "to be guarded and moved")
    ref = f"{row}.{_ident(column)}" if row else _ident(column)
    return f"shardkit.bucket({ref}{cast}, {int(bucket_count)})"


def _trigger_sql(g: Guarded, key_type: str, pk: Sequence[str], bucket_count: int) -> list[str]:
    table = g.table
    fn = f"shardkit.{_ident(trigger_function_name(table))}"
    body = trigger_body(g, key_type, pk, bucket_count)
    t = _literal(table_sql(table))
    return [
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $guard${body}$guard$",
        # Made again only when it is not there as made here: DROP TRIGGER waits for an
        # ACCESS EXCLUSIVE lock on the table, so behind any open transaction that read it,
        # and every read and write of the table queues behind that wait (`rebalance init`
        # is run again, with the application running, after each change of the shards).
        # A new body needs no new trigger: the function is replaced in place.
        "DO $g$ BEGIN\n"
        "    IF NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = "
        f"{t}::regclass AND t.tgname = 'shardkit_guard' AND t.tgfoid = {_literal(fn + '()')}::regprocedure "
        # BEFORE, FOR EACH ROW, INSERT, DELETE, UPDATE (pg_trigger.h's bits), enabled
        f"        AND t.tgtype = {_ROW_TRIGGER_TYPE} AND t.tgenabled = 'O' "
        f"        AND pg_get_triggerdef(t.oid) LIKE {_literal('%' + MOVER_SETTING + '%')}) "
        # ... or a partition's clone of it is disabled (made again, it is cloned anew)
        f"        OR EXISTS ({partition_unguarded_sql(t + '::regclass')}) THEN\n"
        f"        DROP TRIGGER IF EXISTS shardkit_guard ON {table_sql(table)};\n"
        # The WHEN condition spares the mover's bulk copies and deletes the cost
        # of calling the function for every row.
        f"        CREATE TRIGGER shardkit_guard BEFORE INSERT OR UPDATE OR DELETE ON {table_sql(table)} "
        f"FOR EACH ROW WHEN (current_setting('{MOVER_SETTING}', true) IS DISTINCT FROM 'on') "
        f"EXECUTE FUNCTION {fn}();\n"
        "    END IF;\n"
        "END $g$",
        _truncate_trigger_sql(table, create=True),
    ]


# pg_trigger.tgenabled of a trigger that fires in the application's sessions: enabled
# ('O') or ENABLE ALWAYS ('A'); not disabled ('D'), nor ENABLE REPLICA ('R'), which fires
# only under session_replication_role = replica.
_FIRES = "IN ('O', 'A')"


def partition_unguarded_sql(table: str) -> str:
    """A query with a row for each partition of ``table`` (an SQL regclass expression) whose
    clone of the guard's row trigger is missing or does not fire."""
    return ("SELECT FROM pg_partition_tree(" + table + ") p WHERE p.relid <> " + table + " AND NOT EXISTS "
            "(SELECT FROM pg_trigger pt WHERE pt.tgrelid = p.relid AND pt.tgname = 'shardkit_guard' "
            f"AND pt.tgenabled {_FIRES})")


def guard_fires_sql(table: str) -> str:
    """An SQL condition: the guard's row trigger fires in the application's sessions on
    ``table`` (an SQL regclass expression) and on each of its partitions (each has its
    own clone of it)."""
    return (f"EXISTS (SELECT FROM pg_trigger gt WHERE gt.tgrelid = {table} AND gt.tgname = 'shardkit_guard' "
            f"AND gt.tgenabled {_FIRES}) AND NOT EXISTS ({partition_unguarded_sql(table)})")


# pg_trigger.tgtype of the guard's row trigger: TRIGGER_TYPE_ROW | _BEFORE | _INSERT |
# _DELETE | _UPDATE.
_ROW_TRIGGER_TYPE: Final = 1 | 2 | 4 | 8 | 16


def _truncate_trigger_sql(table: str, *, create: bool) -> str:
    """(Re)make, or drop, the guard's TRUNCATE trigger on ``table`` and on each of its
    partitions: a statement trigger is not cloned to partitions (as the row trigger is),
    and ``TRUNCATE <partition>`` fires only the partition's own."""
    t = _literal(table_sql(table))
    # Made only where it is missing (a new partition), dropped and made again where it is
    # not the guard's: DROP TRIGGER waits for an ACCESS EXCLUSIVE lock (see _trigger_sql).
    make = ("IF NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = r AND t.tgname = "
            "'shardkit_guard_truncate' AND t.tgfoid = 'shardkit.guard_truncate()'::regprocedure "
            "AND t.tgenabled = 'O') THEN\n"
            "            EXECUTE format('DROP TRIGGER IF EXISTS shardkit_guard_truncate ON %s', r);\n"
            "            EXECUTE format('CREATE TRIGGER shardkit_guard_truncate BEFORE TRUNCATE ON %s "
            "FOR EACH STATEMENT EXECUTE FUNCTION shardkit.guard_truncate()', r);\n"
            "        END IF;") if create else \
        "EXECUTE format('DROP TRIGGER IF EXISTS shardkit_guard_truncate ON %s', r);"
    return (
        "DO $t$ DECLARE r regclass; BEGIN\n"
        # (pg_partition_tree() of a table that is not partitioned lists nothing)
        f"    FOR r IN SELECT c.oid FROM pg_class c WHERE c.relkind IN ('r', 'p') AND (c.oid = {t}::regclass "
        f"OR c.oid IN (SELECT relid FROM pg_partition_tree({t}::regclass))) LOOP\n"
        f"        {make}\n"
        "    END LOOP;\n"
        "END $t$")


def trigger_body(g: Guarded, key_type: str, pk: Sequence[str], bucket_count: int) -> str:
    """The source of the guard's trigger function for ``g`` (its key column of type
    ``key_type``, primary key ``pk``): what ``pg_proc.prosrc`` holds once installed, so the
    mover can tell a guard installed by an older shardkit, or before the key changed."""
    table = g.table
    new_b = unit_expression(g, key_type, bucket_count, "NEW")
    old_b = unit_expression(g, key_type, bucket_count, "OLD")
    unit = "bucket" if g.kind == "hash" else "slice"
    pk_new = "jsonb_build_object(" + ", ".join(f"{_literal(c)}, NEW.{_ident(c)}" for c in pk) + ")"
    pk_old = "jsonb_build_object(" + ", ".join(f"{_literal(c)}, OLD.{_ident(c)}" for c in pk) + ")"
    # The configured table's name, not TG_TABLE_NAME: on a partitioned table the trigger
    # runs on the partitions, and the mover looks changes up by the configured name.
    name = _literal(table)

    def refuse(v: str) -> str:
        return (f"RAISE EXCEPTION 'shardkit: {unit} % of table % is not owned by this shard', {v}, "
                f"{name} USING ERRCODE = '{NOT_OWNED_SQLSTATE}', DETAIL = {v}::text, "
                f"TABLE = {name}, HINT = 'the shard map has changed: refresh it and retry "
                "on the owner';")

    body = f"""
DECLARE
    b integer;
    ob integer;
    m bigint;
    om bigint;
BEGIN
    IF TG_OP <> 'DELETE' THEN b := {new_b}; END IF;
    IF TG_OP <> 'INSERT' THEN ob := {old_b}; END IF;
    IF ob IS NOT DISTINCT FROM b THEN ob := NULL; END IF;  -- same bucket: check it once
    -- Held until commit: a mover starting to capture a bucket waits for its holders.
    IF b IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared({GUARD_LOCK_CLASS}, mod(b, {GUARD_LOCK_STRIPES}));
    END IF;
    IF ob IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared({GUARD_LOCK_CLASS}, mod(ob, {GUARD_LOCK_STRIPES}));
    END IF;
    -- A moving bucket: pass its move's gate, which the mover holds while it switches.
    SELECT mb.move_id INTO m FROM shardkit.moving_buckets mb WHERE mb.bucket = b;
    SELECT mb.move_id INTO om FROM shardkit.moving_buckets mb WHERE mb.bucket = ob;
    IF m IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared({GATE_LOCK_CLASS}, (m % 2147483647)::integer);
    END IF;
    IF om IS NOT NULL AND om IS DISTINCT FROM m THEN
        PERFORM pg_advisory_xact_lock_shared({GATE_LOCK_CLASS}, (om % 2147483647)::integer);
    END IF;
    -- Ownership, read after the gate: a switch may have just given the bucket away.
    -- Outside READ COMMITTED it is read with the transaction's snapshot, which may
    -- predate a switch: lock the rows relied on, so that a switch committed since (it
    -- deletes them) is a serialization failure rather than a row on a shard that gave
    -- its bucket away.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM 1 FROM shardkit.owned_buckets o WHERE o.bucket IN (b, ob) FOR KEY SHARE;
    END IF;
    IF b IS NOT NULL AND NOT EXISTS (SELECT 1 FROM shardkit.owned_buckets o WHERE o.bucket = b) THEN
        {refuse("b")}
    END IF;
    IF ob IS NOT NULL AND NOT EXISTS (SELECT 1 FROM shardkit.owned_buckets o WHERE o.bucket = ob) THEN
        {refuse("ob")}
    END IF;
    -- Record the keys written in moving buckets: the new row's, and the old row's
    -- when it leaves (deleted, another key, another bucket).
    IF b IS NOT NULL AND EXISTS (SELECT 1 FROM shardkit.moving_buckets mb WHERE mb.bucket = b) THEN
        INSERT INTO shardkit.changes (bucket, tbl, pk) VALUES (b, {name}, {pk_new});
    END IF;
    IF TG_OP = 'DELETE' THEN
        ob := {old_b};
    ELSIF TG_OP = 'UPDATE' AND ob IS NULL AND {pk_old} IS NOT DISTINCT FROM {pk_new} THEN
        ob := NULL;                 -- same row, same bucket: logged above
    ELSIF TG_OP = 'UPDATE' THEN
        ob := {old_b};
    END IF;
    IF ob IS NOT NULL AND EXISTS (SELECT 1 FROM shardkit.moving_buckets mb WHERE mb.bucket = ob) THEN
        INSERT INTO shardkit.changes (bucket, tbl, pk) VALUES (ob, {name}, {pk_old});
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
"""
    return body


class Guarded(NamedTuple):
    """A table the guard covers: its key column, its group and how the group is sharded."""

    table: str
    key: str
    group: str
    kind: str  # "hash", "range" or "list"
    value_kind: str = ""  # range and list groups: "int" or "str", their bounds' type


def guard_covers(group: Any, key_columns: Sequence[str]) -> bool:
    """Whether the guard covers a table of ``group`` keyed by ``key_columns``: hash
    groups with a one-column key, and range and list groups whose slices can move."""
    if isinstance(group.strategy, HashStrategy):
        return len(key_columns) == 1
    return movable_kind(group)[0] is not None


def guarded_tables(config: Any) -> list[Guarded]:
    """Every hash-sharded table (composite keys are refused), and every table of a range
    or list group whose slices can move (see :func:`shardkit._slices.movable_kind`)."""

    out = []
    for g in config.groups:
        if isinstance(g.strategy, HashStrategy):
            for table, cols in g.tables.items():
                if len(cols) != 1:
                    raise ConfigurationError(
                        f"groups.{g.name}.tables.{table}",
                        "composite hash keys cannot be guarded or moved yet, and the guard covers "
                        "every hash group, so no bucket of this cluster can move online",
                        "give every hash group a single-column key in a cluster that is rebalanced, "
                        "or route it by the config file (no [catalog])")
                out.append(Guarded(table, cols[0], g.name, "hash"))
        elif guard_covers(g, ()):
            out.extend(Guarded(table, cols[0], g.name, g.strategy.kind, movable_kind(g)[0] or "")
                       for table, cols in g.tables.items())
    return out


def slice_function_name(table: str) -> str:
    return _function_name("slice", table)


#: Key column types (``pg_type`` names) of integers.
INT_KEY_TYPES: Final = frozenset({"int2", "int4", "int8"})
_FLOAT_TYPES: Final = frozenset({"float4", "float8"})
_NUMERIC_TYPES: Final = frozenset({"numeric"}) | _FLOAT_TYPES
#: Key column types whose keys Python reads as no string (numbers, dates and times, bools,
#: bytes): string bounds or values never equal nor order them as their text form does in SQL.
_NOT_TEXT_TYPES: Final = INT_KEY_TYPES | _NUMERIC_TYPES | frozenset(
    {"date", "timestamp", "timestamptz", "time", "timetz", "interval", "bool", "bytea"})


def slice_comparable(value_kind: str, type_name: str) -> bool:
    """Whether a key column of ``type_name`` compares with integer or string bounds in SQL
    as in Python: integers against integer and numeric columns; strings against a column
    whose keys Python reads as strings, by its text form (text, varchar, enums, uuid in
    lowercase, ...), not against numbers, dates and times: there Python never finds the
    key ``5`` under the value ``"5"`` while SQL's ``5::text`` would."""
    if value_kind == "str":
        return type_name not in _NOT_TEXT_TYPES
    return type_name in INT_KEY_TYPES | _NUMERIC_TYPES


def unit_expression(g: Guarded, type_name: str, bucket_count: int, row: str = "") -> str:
    """SQL for the bucket (hash) or slice number (range, list) of a row of ``g``."""
    if g.kind == "hash":
        return bucket_expression(g.key, type_name, bucket_count, row)
    ref = f"{row}.{_ident(g.key)}" if row else _ident(g.key)
    return f"shardkit.{_ident(slice_function_name(g.table))}({ref})"


def slice_key_sql(value_kind: str, type_name: str, key: str) -> tuple[str, Callable[[str], str], bool]:
    """How the guard compares the key ``key`` (SQL) of a range or list group whose bounds or
    values are of ``value_kind`` ("int" or "str"), on a key column of type ``type_name``, with
    a bound or value (held as text): (the key as compared, a function making a bound's SQL
    expression as compared, whether it needs ``extra_float_digits`` >= 1 to read so)."""
    if value_kind != "int":  # the text form in code point order, as Python compares strings
        return f'{key}::text COLLATE "C"', lambda b: f'{b} COLLATE "C"', False
    cast = "bigint" if type_name in INT_KEY_TYPES else "numeric"
    if type_name in _FLOAT_TYPES:
        # A float by the shortest decimal that reads back as it (its text form since
        # PostgreSQL 12, with extra_float_digits >= 1 whatever the writer's session sets),
        # as shardkit places it (repr()); a cast to numeric keeps only 15 (float4: 6)
        # significant digits, and read 2.9999999999999996 as 3.
        return f"{key}::text::numeric", lambda b: f"{b}::numeric", True
    return f"{key}::{cast}", lambda b: f"{b}::{cast}", False


def _slice_function_sql(g: Guarded, type_name: str, param_type: str | None = None) -> str:
    """``shardkit.slice__<table>(key)``: the key's slice number on this shard's copy of the
    slices; NULL for a NULL key, -1 for a key no slice holds (refused as not owned).
    ``param_type``: the key column's type as SQL (``format_type``: schema-qualified when
    the search_path does not find it, an enum of the table's schema), else ``type_name``."""
    body, settings = _slice_function_body(g, type_name)
    fn = f"shardkit.{_ident(slice_function_name(g.table))}"
    return (f"CREATE OR REPLACE FUNCTION {fn}(k {param_type or type_name}) RETURNS integer LANGUAGE sql STABLE"
            f"{settings} AS $slice${body}$slice$")


def _slice_function_body(g: Guarded, type_name: str) -> tuple[str, str]:
    """The SQL body of :func:`_slice_function_sql`'s function, and the settings it runs with."""
    value_kind = g.value_kind
    if not slice_comparable(value_kind, type_name):
        raise ConfigurationError(
            f"groups.{g.group}.tables.{g.table}",
            f"key column {g.key} is {type_label(type_name)}, but the group's bounds or values are "
            f"{value_kind}s",
            "make the config's bounds or values the same type as the column")
    grp = _literal(g.group)
    k, bound, floats = slice_key_sql(value_kind, type_name, "k")
    lo, hi, val = bound("s.lower"), bound("s.upper"), bound("s.val")
    settings = " SET extra_float_digits = 1" if floats else ""
    if g.kind == "range":
        # CASE: the casts run only on this group's rows.
        found = (f"SELECT s.id FROM shardkit.slices s WHERE s.grp = {grp} AND CASE WHEN s.grp = {grp} "
                 f"THEN (s.lower IS NULL OR {k} >= {lo}) AND (s.upper IS NULL OR {k} < {hi}) "
                 "ELSE false END LIMIT 1")
        body = f"SELECT CASE WHEN k IS NULL THEN NULL ELSE coalesce(({found}), -1) END"
    else:
        body = (f"SELECT CASE WHEN k IS NULL THEN NULL ELSE coalesce("
                f"(SELECT s.id FROM shardkit.slices s WHERE s.grp = {grp} AND CASE WHEN s.grp = {grp} "
                f"AND s.val IS NOT NULL THEN {val} = {k} ELSE false END LIMIT 1), "
                f"(SELECT s.id FROM shardkit.slices s WHERE s.grp = {grp} AND s.is_default LIMIT 1), "
                "-1) END")
    return body, settings


def write_slices(conn: Connection, slices: Iterable[Any], groups: Iterable[str] | None = None) -> None:
    """Replace this shard's copy of the slices of ``groups`` (default: of every group) by
    ``slices``, in the caller's transaction."""
    slices = list(slices)
    rows = []
    for sl in slices:
        if sl.default:
            rows.append((sl.group, sl.id, None, None, None, True))
        elif sl.values:
            rows.extend((sl.group, sl.id, None, None, str(v), False) for v in sl.values)
        else:
            rows.append((sl.group, sl.id, None if sl.lower is None else str(sl.lower),
                         None if sl.upper is None else str(sl.upper), None, False))
    if groups is None:
        conn.exec_driver_sql("DELETE FROM shardkit.slices")
    else:
        conn.execute(text("DELETE FROM shardkit.slices WHERE grp = ANY(CAST(:g AS text[]))"),
                     {"g": sorted(set(groups))})
    if rows:
        conn.execute(text(
            "INSERT INTO shardkit.slices (grp, id, lower, upper, val, is_default) "
            "SELECT * FROM unnest(CAST(:g AS text[]), CAST(:i AS integer[]), CAST(:lo AS text[]), "
            "CAST(:hi AS text[]), CAST(:v AS text[]), CAST(:d AS boolean[]))"),
            {"g": [r[0] for r in rows], "i": [r[1] for r in rows], "lo": [r[2] for r in rows],
             "hi": [r[3] for r in rows], "v": [r[4] for r in rows], "d": [r[5] for r in rows]})


def install_guard(conn: Connection, config: Any, owned: Iterable[int] | None,
                  slices: Sequence[Any] = ()) -> None:
    """Install (or refresh) the guard on the shard of ``conn``, owning exactly ``owned``
    (bucket and slice numbers), with ``slices`` as the range and list groups' slices.
    With ``owned=None``, only the triggers and functions are (re)made, for every table
    the config guards: the shard's ownership and its copy of the slices are kept.

    Idempotent; runs in the connection's transaction, which the caller commits.
    """
    install_sql(conn)
    for statement in _TABLES_SQL:
        conn.exec_driver_sql(statement.replace("%", "%%"))  # (% is the driver's placeholder)
    if owned is not None:
        write_slices(conn, slices)
        sliced = None
    else:
        # Range and list groups this shard has slices of (`rebalance init` stores them):
        # a group's trigger without them would refuse every row as not owned.
        sliced = set(conn.execute(text("SELECT DISTINCT grp FROM shardkit.slices")).scalars())
    for g in guarded_tables(config):
        if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_sql(g.table)}).scalar():
            # Configured, not created yet (a later migration): guarded once it exists and
            # this runs again (`op.install_shardkit_guard()`, `shardkit rebalance init`);
            # a move refuses it until then.
            log.info("table %s does not exist on this shard yet; not guarded", g.table)
            continue
        if sliced is not None and g.kind != "hash" and g.group not in sliced:
            log.warning("table %s: group %s has no slices on this shard yet; run `shardkit "
                        "rebalance init` to guard it", g.table, g.group)
            continue
        _, pk, types = table_shape(conn, g.table, keys=[g.key])
        if not pk:
            raise ConfigurationError(f"table {g.table}", "has no primary key",
                                     "rows can only be moved and verified by primary key; add one")
        if g.kind != "hash":
            if not slice_comparable(g.value_kind, types[g.key]):
                # The group cannot move (the mover refuses it); hash groups still can.
                log.warning("table %s: key column %s is %s and group %s's bounds or values are %ss; "
                            "its rows are not guarded and the group cannot be rebalanced (write them "
                            "in the config as the column holds them, e.g. 5 unquoted for an integer "
                            "column, and run `shardkit rebalance init` again)", g.table, g.key,
                            type_label(types[g.key]), g.group, g.value_kind)
                for statement in (f"DROP TRIGGER IF EXISTS shardkit_guard ON {table_sql(g.table)}",
                                  _truncate_trigger_sql(g.table, create=False),
                                  f"DROP FUNCTION IF EXISTS shardkit.{_ident(slice_function_name(g.table))}"):
                    conn.exec_driver_sql(statement.replace("%", "%%"))
                continue
            param_type = conn.execute(text(
                "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = to_regclass(:t) "
                "AND attname = :c"), {"t": table_sql(g.table), "c": g.key}).scalar()
            conn.exec_driver_sql(_slice_function_sql(g, types[g.key], param_type))
        for statement in _trigger_sql(g, types[g.key], pk, config.bucket_count):
            # The driver reads % as a placeholder even without parameters.
            conn.exec_driver_sql(statement.replace("%", "%%"))
    if owned is not None:
        # Only the rows that change: writers outside READ COMMITTED hold a lock on the rows
        # they rely on, which deleting them would wait for (and their next writers behind it).
        owned = sorted(set(owned))
        conn.execute(text("DELETE FROM shardkit.owned_buckets WHERE bucket <> ALL(CAST(:b AS integer[]))"),
                     {"b": owned})
        conn.execute(text("INSERT INTO shardkit.owned_buckets SELECT unnest(CAST(:b AS integer[])) "
                          "ON CONFLICT DO NOTHING"), {"b": owned})


def stale_guards(conn: Connection, guarded: Iterable[Guarded], bucket_count: int) -> list[str]:
    """The tables of ``guarded`` whose guard trigger runs another function than
    :func:`trigger_body` makes for them now (installed by an older shardkit, before the
    table was renamed or its primary key or shard key changed), or that lack the guard's
    TRUNCATE trigger (installed by an older shardkit), on themselves or on a partition
    (created or attached since the guard was installed), or whose range or list group's
    slice function is not the one :func:`_slice_function_sql` makes now.  Tables without
    the guard's trigger, or without the configured key column, are not listed."""
    guarded = list(guarded)
    installed = {r[0]: (r[1], r[2]) for r in conn.execute(text(
        # The TRUNCATE trigger on the table and each of its partitions (a statement
        # trigger is not cloned to a partition created or attached later).
        "SELECT n.tbl, p.prosrc, NOT EXISTS (SELECT 1 FROM pg_class pc WHERE pc.relkind IN ('r', 'p') "
        "AND (pc.oid = c.oid OR pc.oid IN (SELECT relid FROM pg_partition_tree(c.oid))) "
        "AND NOT EXISTS (SELECT 1 FROM pg_trigger tt WHERE tt.tgrelid = pc.oid "
        f"AND tt.tgname = 'shardkit_guard_truncate' AND tt.tgenabled {_FIRES})) "
        f"FROM {CONFIGURED_TABLES} JOIN pg_trigger t ON t.tgrelid = c.oid "
        "AND t.tgname = 'shardkit_guard' JOIN pg_proc p ON p.oid = t.tgfoid"),
        configured_tables(g.table for g in guarded))}
    stale = []
    for g in guarded:
        if g.table not in installed:
            continue
        source, truncate_guarded = installed[g.table]
        if not truncate_guarded:
            stale.append(g.table)
            continue
        _, pk, types = table_shape(conn, g.table)
        try:
            want = trigger_body(g, types[g.key], pk, bucket_count)
        except Exception:  # noqa: BLE001 - a key the guard cannot cover: not ours to judge here
            continue
        if source != want:
            stale.append(g.table)
            continue
        if g.kind != "hash":
            # Its slice function too (an older shardkit read a float key at 15 digits).
            try:
                want = _slice_function_body(g, types[g.key])[0]
            except ConfigurationError:  # a key the guard cannot cover: not ours to judge here
                continue
            fn = f"shardkit.{_ident(slice_function_name(g.table))}"
            if conn.execute(text("SELECT prosrc FROM pg_proc WHERE oid = to_regproc(:f)"),
                            {"f": fn}).scalar() not in (want, None):
                stale.append(g.table)
    return sorted(stale)


def guard_installed(conn: Connection) -> bool:
    return bool(conn.execute(text(
        "SELECT to_regclass('shardkit.owned_buckets') IS NOT NULL")).scalar())


def uninstall_guard(conn: Connection, config: Any) -> None:
    """Remove the triggers and ownership tables (not the hash functions)."""
    for g in guarded_tables(config):
        if conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_sql(g.table)}).scalar():
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS shardkit_guard ON {table_sql(g.table)}")
            conn.exec_driver_sql(_truncate_trigger_sql(g.table, create=False).replace("%", "%%"))
        conn.exec_driver_sql(
            f"DROP FUNCTION IF EXISTS shardkit.{_ident(trigger_function_name(g.table))}()")
        if g.kind != "hash":
            conn.exec_driver_sql(
                f"DROP FUNCTION IF EXISTS shardkit.{_ident(slice_function_name(g.table))}")
    conn.exec_driver_sql("DROP FUNCTION IF EXISTS shardkit.guard_truncate()")
    for t in ("changes", "moving_buckets", "owned_buckets", "slices"):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS shardkit.{t}")
