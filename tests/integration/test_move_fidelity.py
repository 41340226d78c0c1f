"""Data fidelity of online moves.

Every row and every value must arrive on the target exactly as it was on the
source, the source must be left without the moved rows, and ``verify`` must be
clean.  Where a table cannot be moved, the mover must say so clearly before any
data moves (no move left half-done, nothing changed).

One module-scoped dev cluster (2 shards, 8 buckets, no replicas).  Each test
makes its own *world*: fresh databases of the same name on both servers plus a
catalog database, so a test that leaves a shard in a bad state cannot disturb
another.  Moves run in-process with ``grace=0``.  Writes "during the move" are
made from the mover's progress callback right after the copy (before catch-up
and cut-over), directly on the source with a plain session, as an application
would: the ownership guard logs them and catch-up must replay them.

Rows are compared as text (``row::text`` with fixed TimeZone, DateStyle,
IntervalStyle, extra_float_digits and bytea_output), every column included.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain, plan_move_value, plan_split_range
from shardkit.devcluster import to_toml
from shardkit.errors import ConfigurationError, RebalanceError, ShardkitError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

CANON = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
         "SET extra_float_digits = 3; SET bytea_output = 'hex'")


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


_numbers = itertools.count()


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class World:
    dev: Any
    db: str
    cfg_path: Path
    cluster: shardkit.Cluster

    def conn(self, shard: str) -> psycopg.Connection:
        return self.dev.shard(shard).primary.connect(dbname=self.db, autocommit=True)

    def sql(self, shard: str, query: str, params: Any = None) -> list[tuple] | None:
        with self.conn(shard) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def owner(self, table: str, key: Any) -> str:
        return self.cluster.shard_for(table, key)

    def on_owner(self, table: str, key: Any, query: str, params: Any = None) -> None:
        """Run ``query`` on the shard owning ``key``, as the application would (guard on)."""
        shard = self.owner(table, key)
        held = self.__dict__.get("_held")
        if held is None:
            self.sql(shard, query, params)
            return
        if shard not in held:
            held[shard] = self.conn(shard)
        held[shard].execute(query, params)

    @contextlib.contextmanager
    def one_connection_per_shard(self) -> Iterator[None]:
        """Within it, ``on_owner`` runs its statements (each committed, in their order on
        each shard) over one connection per shard: a connection each costs a server backend."""
        held: dict[str, psycopg.Connection] = {}
        self.__dict__["_held"] = held
        try:
            yield
        finally:
            del self.__dict__["_held"]
            for c in held.values():
                c.close()

    def on_owners(self, table: str, writes: Iterable[tuple[Any, str, Any]]) -> None:
        """``on_owner`` for each (key, query, params) of ``writes``, over one connection per shard."""
        with self.one_connection_per_shard():
            for key, query, params in writes:
                self.on_owner(table, key, query, params)

    def rows(self, shard: str, table: str) -> list[str]:
        with self.conn(shard) as c:
            c.execute(CANON)
            return sorted(r[0] for r in c.execute(f"SELECT x::text FROM {ident(table)} AS x"))

    def all_rows(self, tables: Iterable[str]) -> dict[str, list[str]]:
        return {t: sorted(self.rows("s0", t) + self.rows("s1", t)) for t in tables}

    def slices(self, group: str | None = None):
        self.cluster.refresh_map()
        return [s for s in self.cluster.config.slices if group is None or s.group == group]

    def running_moves(self) -> list[int]:
        return [m["move"] for m in rebalance.move_status(self.cluster) if m["state"] == "running"]


def make_world(dev, tmp_path: Path, schema: str, groups: dict[str, Any], *,
               per_shard: dict[str, str] | None = None, init: bool = True) -> World:
    """Fresh databases on both servers; ``per_shard[shard]`` runs there before ``schema``."""
    db = f"fid{os.getpid()}_{next(_numbers)}"
    for shard in dev.shards:
        with shard.primary.connect(dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
        with shard.primary.connect(dbname=db, autocommit=True) as c:
            if per_shard and shard.name in per_shard:
                c.execute(per_shard[shard.name])
            c.execute(schema)
    catalog_url = dev.create_catalog(f"{db}_catalog")
    cfg = dev.config_dict()
    for s in cfg["shards"]:
        s["primary"] = s["primary"].rsplit("/", 1)[0] + "/" + db
    cfg.update({"groups": groups, "catalog": {"url": catalog_url}})
    path = tmp_path / f"{db}.toml"
    try:
        path.write_text(to_toml(cfg), encoding="utf-8")
    except TypeError:  # values TOML cannot hold (dates): the dict itself
        cluster = shardkit.Cluster.from_config(cfg, follow_map=False)
    else:
        cluster = shardkit.Cluster.from_config(path, follow_map=False)
    if init:
        rebalance.init(cluster)
    return World(dev, db, path, cluster)


@pytest.fixture
def mkworld(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, groups: dict[str, Any], **kw) -> World:
        w = make_world(dev, tmp_path, schema, groups, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def hash_group(tables: dict[str, str]) -> dict[str, Any]:
    return {"g": {"strategy": "hash", "tables": tables}}


def keys_on(w: World, table: str, shard: str, candidates: Iterable[Any], n: int) -> list[Any]:
    out = [k for k in candidates if w.owner(table, k) == shard][:n]
    assert len(out) == n
    return out


# -- running a move ------------------------------------------------------------------------


@dataclass
class Outcome:
    move_id: int | None
    expected: dict[str, list[str]]   # every table's rows (all shards) at the cut-over


def run_plan(w: World, plan: Any, tables: list[str], during: Callable[[World], None] | None = None,
             **mover_kw: Any) -> Outcome:
    """Apply ``plan``; ``during`` runs right after the copy (writes to capture).  The
    expected final rows are every shard's rows once ``during`` is done."""
    state: dict[str, Any] = {"expected": w.all_rows(tables)}
    # Writes during the move go to the source (s0); the target (s1) meanwhile holds
    # its own rows plus the copies, so its own rows are taken from before the move.
    target_before = {t: w.rows("s1", t) for t in tables}

    def progress(line: str) -> None:
        if during is not None and ": copied " in line and "ran" not in state:
            state["ran"] = True
            try:
                during(w)
            except BaseException as e:  # surfaced below, not as the mover's error
                state["error"] = e
                raise
            state["expected"] = {t: sorted(w.rows("s0", t) + target_before[t]) for t in tables}

    mover = rebalance.Mover(w.cluster, grace=0, progress=progress, **mover_kw)
    try:
        move_id = mover.apply(plan)
    except Exception:
        if "error" in state:
            raise state["error"]
        raise
    # Without this, a move that never printed its copy line would pass with no writes during it.
    assert during is None or state.get("ran"), "the mover never printed ': copied ': `during` did not run"
    return Outcome(move_id, state["expected"])


def drain_s0(w: World, tables: list[str], during: Callable[[World], None] | None = None,
             **mover_kw: Any) -> Outcome:
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    assert plan.moves
    return run_plan(w, plan, tables, during, **mover_kw)


def _diff(a: list[str], b: list[str]) -> str:
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    cut = (lambda s: s if len(s) < 300 else s[:300] + f"...({len(s)} chars)")
    return (f"{len(only_a)} expected rows missing, e.g. {[cut(x) for x in only_a[:3]]}; "
            f"{len(only_b)} unexpected rows, e.g. {[cut(x) for x in only_b[:3]]}")


def assert_faithful(w: World, out: Outcome, tables: list[str], *, drained: bool = True) -> None:
    """Every row arrived as it was, nothing is left behind, verify is clean."""
    w.cluster.refresh_map()
    for t in tables:
        if drained:
            left = w.rows("s0", t)
            assert not left, f"{t}: {len(left)} rows left on the drained source, e.g. {left[:2]}"
            got = w.rows("s1", t)
        else:
            got = sorted(w.rows("s0", t) + w.rows("s1", t))
        assert got == out.expected[t], f"{t}: {_diff(out.expected[t], got)}"
    report = verify(w.cluster)
    assert report.ok, report.render()
    assert all(not r.in_flight for r in report.tables), report.render()
    status = rebalance.move_status(w.cluster, out.move_id)[0]
    assert status["state"] == "done", status
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.changes")[0][0] == 0
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0


def assert_refused_cleanly(w: World, err: BaseException, before: dict[str, list[str]],
                           map_before: tuple, words: Iterable[str]) -> None:
    """A refusal is fine only if it says what is wrong and nothing moved or stays half-done."""
    message = str(err)
    for word in words:
        assert word.lower() in message.lower(), f"the error does not mention {word!r}: {message}"
    assert w.all_rows(before) == before, "rows changed although the move was refused"
    assert not w.running_moves(), (f"the refused move is left running (half-done, its buckets "
                                   f"captured): {rebalance.move_status(w.cluster)[-1]}; error: {message}")
    w.cluster.refresh_map()
    assert tuple(w.cluster.config.bucket_map) == map_before
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0, \
            f"{shard} still captures the refused move's buckets"


def faithful_or_refused(w: World, tables: list[str], words: Iterable[str],
                        during: Callable[[World], None] | None = None, **mover_kw: Any) -> None:
    """Either the move is faithful, or it is refused up front (clearly, nothing moved)."""
    before = w.all_rows(tables)
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    try:
        out = drain_s0(w, tables, during, **mover_kw)
    except ShardkitError as e:
        assert_refused_cleanly(w, e, before, map_before, words)
        return
    assert_faithful(w, out, tables)


# -- keys, composite primary keys ------------------------------------------------------------


def test_composite_pk_with_a_shard_key_outside_it_survives_writes_during_the_move(mkworld):
    """PK (order_id, line_no), shard key tenant_id (not in the PK).  During the move: an
    update, a delete, an insert, a PK change, and a key change to another moving bucket."""
    w = mkworld("CREATE TABLE line_items (order_id bigint, line_no int, tenant_id bigint NOT NULL, "
                "sku text, qty int, PRIMARY KEY (order_id, line_no))",
                hash_group({"line_items": "tenant_id"}))
    with w.one_connection_per_shard():
        for tenant in range(40):
            for line in range(3):
                w.on_owner("line_items", tenant, "INSERT INTO line_items VALUES (%s, %s, %s, %s, %s)",
                           (tenant * 100, line, tenant, f"sku-{tenant}-{line}", line + 1))
    a, b, c, d = keys_on(w, "line_items", "s0", range(40), 4)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("UPDATE line_items SET qty = 99, sku = NULL WHERE order_id = %s AND line_no = 0",
                         (a * 100,))
            conn.execute("DELETE FROM line_items WHERE order_id = %s AND line_no = 1", (a * 100,))
            conn.execute("INSERT INTO line_items VALUES (%s, 7, %s, 'new', 1)", (b * 100, b))
            conn.execute("UPDATE line_items SET line_no = 42 WHERE order_id = %s AND line_no = 2", (b * 100,))
            conn.execute("UPDATE line_items SET tenant_id = %s WHERE order_id = %s AND line_no = 0",
                         (d, c * 100))

    out = drain_s0(w, ["line_items"], during)
    assert_faithful(w, out, ["line_items"])


def test_table_without_a_primary_key_is_refused_at_init_naming_it(mkworld):
    w = mkworld("CREATE TABLE events (tenant bigint NOT NULL, payload text)",
                hash_group({"events": "tenant"}), init=False)
    with pytest.raises(ShardkitError) as ei:
        rebalance.init(w.cluster)
    assert "events" in str(ei.value) and "primary key" in str(ei.value).lower(), str(ei.value)


def test_primary_key_dropped_after_init_is_refused_before_the_move_starts(mkworld):
    """The table lost its primary key after `rebalance init`: the move must be refused with a
    clear error, and not be left running (capturing) for someone to abort."""
    w = mkworld("CREATE TABLE events (id bigint PRIMARY KEY, tenant bigint NOT NULL, payload text)",
                hash_group({"events": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("events", i, "INSERT INTO events VALUES (%s, %s, %s)", (i, i, f"p{i}"))
    for shard in ("s0", "s1"):
        w.sql(shard, "ALTER TABLE events DROP CONSTRAINT events_pkey")
    before = w.all_rows(["events"])
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    with pytest.raises(ShardkitError) as ei:
        drain_s0(w, ["events"])
    assert_refused_cleanly(w, ei.value, before, map_before, ["events", "primary key"])


# -- identity, serial, sequences, generated columns ---------------------------------------------


def test_per_shard_sequences_that_overlap_are_refused_clearly_and_nothing_moves(mkworld):
    """README: moved tables need a primary key unique across shards, "not a per-shard
    sequence; the mover refuses to overwrite another bucket's row".  Both shards numbered
    their rows 1, 2, 3 ...: the mover must refuse saying so, and leave no move half-done."""
    w = mkworld("CREATE TABLE notes (id serial PRIMARY KEY, tenant bigint NOT NULL, body text)",
                hash_group({"notes": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(30):
            w.on_owner("notes", i, "INSERT INTO notes (tenant, body) VALUES (%s, %s)", (i, f"n{i}"))
    before = w.all_rows(["notes"])
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    with pytest.raises(ShardkitError) as ei:
        drain_s0(w, ["notes"])
    assert_refused_cleanly(w, ei.value, before, map_before, ["notes", "unique across shards"])


def test_identity_keys_interleaved_per_shard_move_and_the_app_can_insert_afterwards(mkworld):
    """GENERATED ALWAYS identity PK, made unique across shards by interleaving (odd on s0,
    even on s1), plus a bigserial column.  Rows inserted during the move take the source's
    sequence.  Every value must arrive as is (not renumbered by the target), and the
    application can insert on the target afterwards."""
    schema = ("CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY ({seq}) PRIMARY KEY, "
              "tenant bigint NOT NULL, seq bigserial, title text)")
    w = mkworld("", hash_group({"tickets": "tenant"}),
                per_shard={"s0": schema.format(seq="START WITH 1 INCREMENT BY 2"),
                           "s1": schema.format(seq="START WITH 2 INCREMENT BY 2")})
    with w.one_connection_per_shard():
        for i in range(30):
            w.on_owner("tickets", i, "INSERT INTO tickets (tenant, title) VALUES (%s, %s)", (i, f"t{i}"))
    (a,) = keys_on(w, "tickets", "s0", range(30), 1)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("INSERT INTO tickets (tenant, title) VALUES (%s, 'during')", (a,))
            conn.execute("UPDATE tickets SET title = 'changed' WHERE tenant = %s", (a,))

    out = drain_s0(w, ["tickets"], during)
    assert_faithful(w, out, ["tickets"])
    with w.conn("s1") as conn:
        for i in range(5):
            conn.execute("INSERT INTO tickets (tenant, title) VALUES (%s, 'after')", (a,))


def test_generated_stored_columns_are_recomputed_not_copied(mkworld):
    w = mkworld("CREATE TABLE items (id bigint PRIMARY KEY, tenant bigint NOT NULL, qty int, "
                "price numeric(12,2), total numeric GENERATED ALWAYS AS (qty * price) STORED, "
                "label text GENERATED ALWAYS AS (upper(coalesce(name, '?'))) STORED, name text)",
                hash_group({"items": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(30):
            w.on_owner("items", i, "INSERT INTO items (id, tenant, qty, price, name) VALUES (%s, %s, %s, %s, %s)",
                       (i, i, i, Decimal("1.25") * i, None if i % 5 == 0 else f"name{i}"))
    a, b = keys_on(w, "items", "s0", range(30), 2)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("UPDATE items SET qty = 1000, name = 'late' WHERE tenant = %s", (a,))
            conn.execute("INSERT INTO items (id, tenant, qty, price) VALUES (1000, %s, 3, 3.33)", (b,))

    out = drain_s0(w, ["items"], during)
    assert_faithful(w, out, ["items"])


# -- values ------------------------------------------------------------------------------------


RICH = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE rich (
    id uuid PRIMARY KEY,
    big_text text, big_bytes bytea, ints int[], grid text[], doc jsonb, raw json,
    m mood, n numeric, f float8, ts timestamptz, span interval, addr inet, d date, p point
);
"""


def _incompressible(n: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


def test_rich_values_toast_arrays_json_enum_numeric_null_survive(mkworld):
    """uuid hash key; TOASTed (incompressible) text and bytea, arrays with NULLs, 2-D arrays,
    jsonb and json (whitespace kept), an enum, huge numeric and NaN, float specials,
    timestamptz with microseconds, intervals, inet, point, and a row of NULLs.  Some are
    rewritten during the move (catch-up path)."""
    w = mkworld(RICH, hash_group({"rich": "id"}), per_shard={"s1": "CREATE TYPE zz_shift AS ENUM ('z')"})
    ids = [uuid.UUID(int=i * 7919 + 1) for i in range(24)]
    with w.one_connection_per_shard():
        for i, key in enumerate(ids):
            if i == 0:
                w.on_owner("rich", key, "INSERT INTO rich (id) VALUES (%s)", (key,))
                continue
            w.on_owner("rich", key,
                       "INSERT INTO rich VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                       (key, _incompressible(150_000, i).hex() if i % 3 == 0 else f"t{i}\n\\ 'q\"\t",
                        _incompressible(100_000, -i) if i % 4 == 0 else b"\x00\xff" * i,
                        [1, None, i], [["a", None], ["c,d", "e\"f"]],
                        psycopg.types.json.Jsonb({"k": [1, 2.5, None], "s": "é\\u00e9 \"q\"", "n": {"deep": i}}),
                        psycopg.types.json.Json({"b": 1, "a": [i]}),
                        ("sad", "ok", "happy")[i % 3],
                        Decimal("1" + "0" * 900 + "." + "9" * 300) if i % 2 else Decimal("NaN"),
                        (float("inf"), float("-inf"), -0.0, 1e-310, 0.1)[i % 5],
                        datetime.datetime(1999, 12, 31, 23, 59, 59, 123456, tzinfo=datetime.timezone.utc),
                        datetime.timedelta(days=-3, microseconds=1),
                        "2001:db8::1/64", datetime.date(1, 1, 1), "(1.5,-2)"))
    # Raw SQL for values psycopg would not send as is.
    a, b = keys_on(w, "rich", "s0", ids[1:], 2)
    w.sql("s0", "UPDATE rich SET raw = '{ \"spaced\" :  [1,   2] }', span = '1 year 2 mons -3 days 04:05:06.7', "
                "d = 'infinity', ts = '-infinity' WHERE id = %s", (a,))

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("UPDATE rich SET big_text = %s, big_bytes = %s, ints = ARRAY[NULL]::int[], "
                         "m = NULL, doc = 'null' WHERE id = %s",
                         (_incompressible(200_000, 99).hex(), _incompressible(120_000, 98), b))
            conn.execute("UPDATE rich SET n = n + 1 WHERE id = %s", (a,))

    out = drain_s0(w, ["rich"], during)
    assert_faithful(w, out, ["rich"])


USER_TYPES = {
    "enum_array": ("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');",
                   "mood[]", "ARRAY['ok', NULL, 'happy']::mood[]"),
    "composite": ("CREATE TYPE pair AS (a int, b text);",
                  "pair", "ROW(7, 'x y')::pair"),
    "domain_array": ("CREATE DOMAIN posint AS int CHECK (VALUE > 0);",
                     "posint[]", "ARRAY[1, 2, 3]::posint[]"),
}


@pytest.mark.parametrize("kind", sorted(USER_TYPES))
def test_columns_of_user_defined_container_types_move(mkworld, kind):
    """Arrays of enums or domains and composite types are legal column types.  The target's
    copy of the type has another OID than the source's (each server numbers its own
    objects): the rows must still arrive identical (or the move be refused up front)."""
    type_sql, col_type, value = USER_TYPES[kind]
    w = mkworld(type_sql + f"CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v {col_type})",
                hash_group({"boxes": "tenant"}),
                per_shard={"s1": "CREATE TYPE zz_a AS ENUM ('z'); CREATE TYPE zz_b AS (z int); "
                                 "CREATE DOMAIN zz_c AS int"})
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("boxes", i, f"INSERT INTO boxes VALUES (%s, %s, {value})", (i, i))
    faithful_or_refused(w, ["boxes"], ["boxes", "type"])


# -- names ------------------------------------------------------------------------------------


def test_quoted_mixed_case_names_keywords_and_a_text_key(mkworld):
    """Table "Order Lines" keyed by the text column "TenantKey"; columns named select,
    order, from, a quote and mixed case; writes during the move."""
    w = mkworld('CREATE TABLE "Order Lines" ("Id" bigint, "select" int, "order" text, "from" timestamptz, '
                '"we""ird" text, "TenantKey" text NOT NULL, PRIMARY KEY ("Id", "order"))',
                hash_group({"Order Lines": "TenantKey"}))
    tenants = [f"Tenant-{i}-é" for i in range(30)] + ["", "O'Brien", "x\"y"]
    with w.one_connection_per_shard():
        for i, t in enumerate(tenants):
            w.on_owner("Order Lines", t, 'INSERT INTO "Order Lines" VALUES (%s, %s, %s, now(), %s, %s)',
                       (i, i, f"o{i}", f"w{i}", t))
    a, b = keys_on(w, "Order Lines", "s0", tenants, 2)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute('UPDATE "Order Lines" SET "select" = -1, "we""ird" = NULL WHERE "TenantKey" = %s', (a,))
            conn.execute('UPDATE "Order Lines" SET "order" = \'renamed\' WHERE "TenantKey" = %s', (b,))
            conn.execute('INSERT INTO "Order Lines" VALUES (999, 0, \'late\', now(), \'\', %s)', (a,))

    out = drain_s0(w, ["Order Lines"], during)
    assert_faithful(w, out, ["Order Lines"])


def test_table_in_a_non_public_schema_on_the_search_path(mkworld):
    """The application keeps its tables in schema app (the database's search_path)."""
    w = mkworld("CREATE SCHEMA app; CREATE TABLE app.accounts (id bigint PRIMARY KEY, owner text); "
                "DO $$BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = app, public', "
                "current_database()); END$$;",
                hash_group({"accounts": "id"}), init=False)
    rebalance.init(w.cluster)
    with w.one_connection_per_shard():
        for i in range(30):
            w.on_owner("accounts", i, "INSERT INTO accounts VALUES (%s, %s)", (i, f"o{i}"))
    out = drain_s0(w, ["accounts"])
    assert_faithful(w, out, ["accounts"])


# -- foreign keys, triggers, constraints --------------------------------------------------------


FAMILY = """
CREATE TABLE customers (id bigint PRIMARY KEY, name text);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers ON DELETE CASCADE,
                     total numeric, UNIQUE (id, customer_id));
CREATE TABLE order_items (order_id bigint, line int, customer_id bigint NOT NULL, qty int,
                          PRIMARY KEY (order_id, line),
                          FOREIGN KEY (order_id, customer_id) REFERENCES orders (id, customer_id) ON DELETE CASCADE);
"""


def test_colocated_parent_child_grandchild_with_cascades(mkworld):
    tables = ["customers", "orders", "order_items"]
    w = mkworld(FAMILY, hash_group({"customers": "id", "orders": "customer_id", "order_items": "customer_id"}))
    with w.one_connection_per_shard():
        for c in range(30):
            w.on_owner("customers", c, "INSERT INTO customers VALUES (%s, %s)", (c, f"c{c}"))
            for o in range(2):
                oid = c * 10 + o
                w.on_owner("customers", c, "INSERT INTO orders VALUES (%s, %s, %s)", (oid, c, o))
                w.on_owner("customers", c, "INSERT INTO order_items VALUES (%s, 1, %s, 5), (%s, 2, %s, 6)",
                           (oid, c, oid, c))
    a, b = keys_on(w, "customers", "s0", range(30), 2)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("DELETE FROM customers WHERE id = %s", (a,))          # cascades twice
            conn.execute("INSERT INTO orders VALUES (5000, %s, 1)", (b,))
            conn.execute("INSERT INTO order_items VALUES (5000, 1, %s, 1)", (b,))
            conn.execute("UPDATE order_items SET qty = 0 WHERE customer_id = %s", (b,))

    out = drain_s0(w, tables, during)
    assert_faithful(w, out, tables)


def test_self_referencing_rows_spread_over_several_copy_slices(mkworld):
    """A tree in one table (parent_id references the same table), bigger than one copy
    slice (2 MB with duty 0.5; 16 MB otherwise).  The root was updated after its children
    were written, so its live version lies in a later slice than a child.  The copy must not
    check the reference before the root has arrived."""
    w = mkworld("CREATE TABLE nodes (id bigint PRIMARY KEY, tenant bigint NOT NULL, "
                "parent_id bigint REFERENCES nodes (id), pad text)",
                hash_group({"nodes": "tenant"}))
    (t,) = keys_on(w, "nodes", "s0", range(50), 1)
    with w.conn("s0") as conn:
        conn.execute("INSERT INTO nodes VALUES (1, %s, NULL, 'root'), (2, %s, 1, 'child')", (t, t))
        conn.execute("INSERT INTO nodes SELECT g, %s, NULL, md5(g::text) || repeat(md5((g + 1)::text), 6) "
                     "FROM generate_series(3, 14000) g", (t,))
        conn.execute("UPDATE nodes SET pad = 'root, updated' WHERE id = 1")
        root_page, child_page = (conn.execute(
            f"SELECT (ctid::text::point)[0]::int FROM nodes WHERE id = {i}").fetchone()[0] for i in (1, 2))
    assert child_page < 256 <= root_page, (child_page, root_page)  # the scenario holds
    out = drain_s0(w, ["nodes"], duty=0.5)
    assert_faithful(w, out, ["nodes"])


def test_self_referencing_rows_cleaned_up_over_several_delete_slices(mkworld):
    """The same tree, laid out the usual way (the root written first, a child last), in a
    table of about 3 MB.  The copy (16 MB slices) and the switch succeed; the clean-up deletes
    the source's rows 2 MB of pages at a time, each slice its own transaction: deleting the
    root's slice while its child (a later slice) still exists breaks the foreign key, and
    every resume stops at the same slice, so the moved rows stay on the source for good."""
    w = mkworld("CREATE TABLE nodes (id bigint PRIMARY KEY, tenant bigint NOT NULL, "
                "parent_id bigint REFERENCES nodes (id), pad text)",
                hash_group({"nodes": "tenant"}))
    (t,) = keys_on(w, "nodes", "s0", range(50), 1)
    with w.conn("s0") as conn:
        conn.execute("INSERT INTO nodes VALUES (1, %s, NULL, 'root')", (t,))
        conn.execute("INSERT INTO nodes SELECT g, %s, NULL, md5(g::text) || repeat(md5((g + 1)::text), 6) "
                     "FROM generate_series(3, 14000) g", (t,))
        conn.execute("INSERT INTO nodes VALUES (2, %s, 1, 'child')", (t,))
        root_page, child_page = (conn.execute(
            f"SELECT (ctid::text::point)[0]::int FROM nodes WHERE id = {i}").fetchone()[0] for i in (1, 2))
    assert root_page < 256 <= child_page, (root_page, child_page)  # the scenario holds
    expected = w.all_rows(["nodes"])
    try:
        out = drain_s0(w, ["nodes"])
    except RebalanceError:
        # Generous: a resume that finishes the move would do.
        (move_id,) = w.running_moves()
        try:
            rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).run(move_id)
        except RebalanceError as e:
            left = w.sql("s0", "SELECT count(*) FROM nodes")[0][0]
            pytest.fail(f"the move switched, then its clean-up failed and resuming fails again; "
                        f"{left} moved rows stay on the source: {e}")
        out = Outcome(move_id, expected)
    assert_faithful(w, out, ["nodes"])


def test_partitioned_table_moves_with_writes_during_the_move(mkworld):
    """A hash-sharded table that is itself partitioned (by month) on every shard (the mover
    accepts partitioned tables).  Writes during the move must reach the target: the guard's
    trigger runs on the partitions, so it must log them under the configured table."""
    w = mkworld("CREATE TABLE readings (id bigint, tenant bigint NOT NULL, at date NOT NULL, v float8, "
                "PRIMARY KEY (id, at)) PARTITION BY RANGE (at); "
                "CREATE TABLE readings_1 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2024-02-01'); "
                "CREATE TABLE readings_2 PARTITION OF readings FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');",
                hash_group({"readings": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(30):
            w.on_owner("readings", i, "INSERT INTO readings VALUES (%s, %s, %s, %s)",
                       (i, i, datetime.date(2024, 1 + i % 2, 1 + i % 28), i / 7))
    a, b = keys_on(w, "readings", "s0", range(30), 2)

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("UPDATE readings SET v = -1 WHERE tenant = %s", (a,))                  # same partition
            conn.execute("UPDATE readings SET at = '2024-02-15' WHERE tenant = %s", (b,))      # other partition
            conn.execute("INSERT INTO readings VALUES (1000, %s, '2024-01-05', 0.5)", (a,))

    out = drain_s0(w, ["readings"], during)
    assert_faithful(w, out, ["readings"])


def test_columns_in_another_order_on_the_target(mkworld):
    """Migrations added two columns in a different order on each shard: columns must be
    matched by name, not by position."""
    w = mkworld("CREATE TABLE prefs (id bigint PRIMARY KEY, tenant bigint NOT NULL)",
                hash_group({"prefs": "tenant"}),
                per_shard={"s0": "", "s1": ""})
    w.sql("s0", "ALTER TABLE prefs ADD COLUMN color text, ADD COLUMN size int")
    w.sql("s1", "ALTER TABLE prefs ADD COLUMN size int, ADD COLUMN color text")
    rebalance.init(w.cluster)
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("prefs", i, "INSERT INTO prefs (id, tenant, color, size) VALUES (%s, %s, %s, %s)",
                       (i, i, f"c{i}", i))
    (a,) = keys_on(w, "prefs", "s0", range(20), 1)

    def during(w: World) -> None:
        w.sql("s0", "UPDATE prefs SET color = 'late', size = -1 WHERE tenant = %s", (a,))

    before = {(i, i, f"c{i}", i) for i in range(20)} - {(a, a, f"c{a}", a)} | {(a, a, "late", -1)}
    drain_s0(w, ["prefs"], during)
    got = {tuple(r) for r in w.sql("s1", "SELECT id, tenant, color, size FROM prefs")}
    assert got == before
    assert not w.sql("s0", "SELECT * FROM prefs")
    assert verify(w.cluster).ok


def test_user_trigger_that_stamps_updates_does_not_rewrite_moved_rows(mkworld):
    """A common `updated_at` trigger (BEFORE UPDATE).  A row updated during the move is
    replayed on the target by catch-up; the trigger must not give it a new timestamp there
    (the target would silently differ, and verification fails after the switch)."""
    w = mkworld("CREATE TABLE docs (id bigint PRIMARY KEY, tenant bigint NOT NULL, body text, "
                "updated_at timestamptz NOT NULL DEFAULT '2000-01-01'); "
                "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                "$$BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END$$; "
                "CREATE TRIGGER docs_touch BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION touch();",
                hash_group({"docs": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("docs", i, "INSERT INTO docs (id, tenant, body) VALUES (%s, %s, %s)", (i, i, f"b{i}"))
    (a,) = keys_on(w, "docs", "s0", range(20), 1)

    def during(w: World) -> None:
        w.sql("s0", "UPDATE docs SET body = 'edited' WHERE tenant = %s", (a,))

    faithful_or_refused(w, ["docs"], ["docs", "trigger"], during)


def test_user_audit_trigger_sees_no_inserts_or_deletes_from_a_move(mkworld):
    """An AFTER INSERT OR DELETE audit trigger writing to a local audit table.  Moving rows
    is neither the application inserting them on the target nor deleting them on the source:
    the audit history must not claim so (or the move must be refused up front)."""
    w = mkworld("CREATE TABLE audit (n bigserial PRIMARY KEY, op text, doc_id bigint); "
                "CREATE TABLE docs (id bigint PRIMARY KEY, tenant bigint NOT NULL, body text); "
                "CREATE FUNCTION log_doc() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
                "INSERT INTO audit (op, doc_id) VALUES (TG_OP, coalesce(NEW.id, OLD.id)); RETURN NULL; END$$; "
                "CREATE TRIGGER docs_audit AFTER INSERT OR DELETE ON docs FOR EACH ROW EXECUTE FUNCTION log_doc();",
                hash_group({"docs": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("docs", i, "INSERT INTO docs VALUES (%s, %s, %s)", (i, i, f"b{i}"))
    audit_before = {s: w.rows(s, "audit") for s in ("s0", "s1")}
    faithful_or_refused(w, ["docs"], ["docs", "trigger"])
    audit_after = {s: w.rows(s, "audit") for s in ("s0", "s1")}
    assert audit_after == audit_before, (
        f"the move wrote {len(audit_after['s0']) - len(audit_before['s0'])} audit rows on s0 "
        f"(e.g. {audit_after['s0'][len(audit_before['s0']):][:2]}) and "
        f"{len(audit_after['s1']) - len(audit_before['s1'])} on s1")


def test_unique_values_swapped_during_the_move(mkworld):
    """Two rows of a moving bucket swap their (unique) emails in one transaction on the
    source during the move: a legal change that catch-up must replay."""
    w = mkworld("CREATE TABLE users (id bigint PRIMARY KEY, tenant bigint NOT NULL, email text UNIQUE, name text)",
                hash_group({"users": "tenant"}))
    (t,) = keys_on(w, "users", "s0", range(20), 1)
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("users", i, "INSERT INTO users VALUES (%s, %s, %s, %s)", (i, i, f"u{i}@x", f"n{i}"))
    w.on_owner("users", t, "INSERT INTO users VALUES (100, %s, 'a@x', 'A'), (101, %s, 'b@x', 'B')", (t, t))

    def during(w: World) -> None:
        with w.conn("s0") as conn, conn.transaction():
            conn.execute("UPDATE users SET email = 'tmp' WHERE id = 100")
            conn.execute("UPDATE users SET email = 'a@x' WHERE id = 101")
            conn.execute("UPDATE users SET email = 'b@x' WHERE id = 100")

    out = drain_s0(w, ["users"], during)
    assert_faithful(w, out, ["users"])


def test_not_valid_check_constraint_with_old_rows_that_break_it(mkworld):
    """A CHECK added NOT VALID (old rows predate it) is legal; the rows exist on the source
    and must move as they are, or the move be refused up front."""
    w = mkworld("CREATE TABLE prices (id bigint PRIMARY KEY, tenant bigint NOT NULL, amount int)",
                hash_group({"prices": "tenant"}))
    with w.one_connection_per_shard():
        for i in range(20):
            w.on_owner("prices", i, "INSERT INTO prices VALUES (%s, %s, %s)", (i, i, -i))
    for shard in ("s0", "s1"):
        w.sql(shard, "ALTER TABLE prices ADD CONSTRAINT positive CHECK (amount >= 0) NOT VALID")
    faithful_or_refused(w, ["prices"], ["prices", "constraint"])


# -- range and list groups -------------------------------------------------------------------


def test_range_group_with_text_keys_split_and_moved(mkworld):
    w = mkworld("CREATE TABLE names (id bigint PRIMARY KEY, name text NOT NULL, note text)",
                {"names": {"strategy": "range", "tables": {"names": "name"},
                           "ranges": [{"to": "m", "shard": "s0"}, {"from": "m", "shard": "s1"}]}})
    keys = ["", " ", "A", "Zed", "a", "e", "ezzz", "f", "f ", "fa", "g", "l", "lzz", "m", "x", "é", "\U0001f600"]
    with w.one_connection_per_shard():
        for i, k in enumerate(keys):
            w.on_owner("names", k, "INSERT INTO names VALUES (%s, %s, %s)", (i, k, f"n{i}"))
    plan = plan_split_range(w.slices(), "names", "f", "s1")

    def during(w: World) -> None:
        with w.conn("s0") as conn:
            conn.execute("UPDATE names SET note = 'moved?' WHERE name IN ('f', 'e')")
            conn.execute("INSERT INTO names VALUES (100, 'fz', 'late')")

    out = run_plan(w, plan, ["names"], during)
    assert_faithful(w, out, ["names"], drained=False)
    assert sorted(r[0] for r in w.sql("s0", "SELECT name FROM names")) == \
        sorted(k for k in ["", " ", "A", "Zed", "a", "e", "ezzz"])


def test_list_group_value_moved(mkworld):
    w = mkworld("CREATE TABLE shops (id bigint PRIMARY KEY, region text NOT NULL, data jsonb)",
                {"regions": {"strategy": "list", "tables": {"shops": "region"},
                             "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"}})
    with w.one_connection_per_shard():
        for i, r in enumerate(["eu", "uk", "uk", "us", "UK", "ca", "uk "]):
            w.on_owner("shops", r, "INSERT INTO shops VALUES (%s, %s, %s)", (i, r, psycopg.types.json.Jsonb({"i": i})))
    plan = plan_move_value(w.slices(), "regions", "uk", "s1")
    out = run_plan(w, plan, ["shops"])
    assert_faithful(w, out, ["shops"], drained=False)
    assert sorted(r[0] for r in w.sql("s0", "SELECT region FROM shops")) == ["eu"]
    # A value taken out of the default (s1) and moved to s0.
    plan = plan_move_value(w.slices(), "regions", "ca", "s0")
    out = run_plan(w, plan, ["shops"])
    assert_faithful(w, out, ["shops"], drained=False)
    assert sorted(r[0] for r in w.sql("s0", "SELECT region FROM shops")) == ["ca", "eu"]


def test_range_group_with_date_bounds_is_refused_clearly(mkworld):
    """README: range groups with date bounds are not moved online; the refusal comes when
    planning, before anything moves."""
    w = mkworld("CREATE TABLE logs (id bigint PRIMARY KEY, day date NOT NULL)",
                {"logs": {"strategy": "range", "tables": {"logs": "day"},
                          "ranges": [{"to": datetime.date(2024, 1, 1), "shard": "s0"},
                                     {"from": datetime.date(2024, 1, 1), "shard": "s1"}]}})
    with pytest.raises((ConfigurationError, RebalanceError)) as ei:
        plan_split_range(w.slices(), "logs", datetime.date(2023, 6, 1), "s1")
    assert "logs" in str(ei.value)
