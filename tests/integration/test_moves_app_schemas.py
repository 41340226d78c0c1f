"""Online moves of the schemas real applications have.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own on both servers plus a catalog.  Moves run in-process (grace 0);
writes "during the move" are made right after the copy, on the source, as an application
would (the guard logs them, catch-up replays them).  Full row sets (every column, as text
under fixed settings) are compared before and after; verify must be clean.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain, plan_move_value, plan_split_range
from shardkit.errors import RebalanceError
from shardkit.verify import verify

from rebalance_world import databases_with_catalog

pytestmark = pytest.mark.integration

CANON = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
         "SET extra_float_digits = 3; SET bytea_output = 'hex'")

_numbers = itertools.count()


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@dataclass
class World:
    dev: Any
    db: str
    cluster: shardkit.Cluster

    def conn(self, shard: str) -> psycopg.Connection:
        return self.dev.shard(shard).primary.connect(dbname=self.db, autocommit=True)

    def sql(self, shard: str, query: str, params: Any = None) -> list[tuple] | None:
        with self.conn(shard) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def owner(self, table: str, key: Any) -> str:
        return self.cluster.shard_for(table, key)

    def rows(self, shard: str, table: str) -> list[str]:
        with self.conn(shard) as c:
            c.execute(CANON)
            return sorted(r[0] for r in c.execute(f"SELECT x::text FROM {table} AS x"))

    def all_rows(self, tables: Iterable[str]) -> dict[str, list[str]]:
        return {t: sorted(self.rows("s0", t) + self.rows("s1", t)) for t in tables}

    def slices(self):
        self.cluster.refresh_map()
        return list(self.cluster.config.slices)


@pytest.fixture
def mkworld(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, groups: dict[str, Any]) -> World:
        db = f"dec{os.getpid()}_{next(_numbers)}"
        path = databases_with_catalog(dev, db, schema, groups, tmp_path / f"{db}.toml")
        cluster = shardkit.Cluster.from_config(path, follow_map=False)
        rebalance.init(cluster)
        w = World(dev, db, cluster)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def keys_on(w: World, table: str, shard: str, candidates: Iterable[Any], n: int) -> list[Any]:
    out = [k for k in candidates if w.owner(table, k) == shard][:n]
    assert len(out) == n
    return out


def run_plan(w: World, plan: Any, tables: list[str], during: Callable[[World], None] | None = None,
             switched: Callable[[World], None] | None = None) -> tuple[int, dict[str, list[str]]]:
    """Apply ``plan``; ``during`` runs on the source right after the copy, ``switched`` on
    the shards right after the switch (before verification).  Returns the move and every
    table's rows (both shards) as they must be once it is done."""
    state: dict[str, Any] = {}
    source = plan.moves[0].source
    others = [s for s in ("s0", "s1") if s != source]
    before = {t: [r for s in others for r in w.rows(s, t)] for t in tables}

    def progress(line: str) -> None:
        if during is not None and ": copied " in line and "ran" not in state:
            state["ran"] = True
            during(w)
            # (the target holds copies now: its own rows are those from before)
            state["expected"] = {t: sorted(w.rows(source, t) + before[t]) for t in tables}
        if switched is not None and "switched to map version" in line and "switched" not in state:
            state["switched"] = True
            w.cluster.refresh_map()
            switched(w)
            state["after_switch"] = {t: sorted(w.rows(others[0], t)) for t in tables}

    expected_before = w.all_rows(tables)
    move_id = rebalance.Mover(w.cluster, grace=0, progress=progress).apply(plan)
    assert during is None or state.get("ran")
    assert switched is None or state.get("switched")
    expected = state.get("expected", expected_before)
    if switched is not None:  # a drain: the target holds every row from the switch on
        expected = state["after_switch"]
    return move_id, expected


def assert_done_and_faithful(w: World, move_id: int, expected: dict[str, list[str]]) -> None:
    assert w.all_rows(expected) == expected
    report = verify(w.cluster)
    assert report.ok, report.render()
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "done"
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.changes")[0][0] == 0
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0


def drain_s0(w: World, tables: list[str], during=None, switched=None):
    w.cluster.refresh_map()
    return run_plan(w, plan_drain(w.cluster.config.bucket_map, "s0"), tables, during, switched)


# -- NOT NULL domains ------------------------------------------------------------------------


def test_a_not_null_domain_column_moves_with_writes_during_the_move(mkworld):
    """A column of a domain declared NOT NULL (`CREATE DOMAIN email AS text NOT NULL`) is an
    ordinary schema.  Writes during the move are replayed by catch-up, which must not trip
    over the domain (the row's values are all there)."""
    w = mkworld("CREATE DOMAIN email AS text NOT NULL CHECK (VALUE LIKE '%@%'); "
                "CREATE TABLE users (id bigint PRIMARY KEY, tenant bigint NOT NULL, mail email, name text)",
                {"g": {"strategy": "hash", "tables": {"users": "tenant"}}})
    for i in range(30):
        w.sql(w.owner("users", i), "INSERT INTO users VALUES (%s, %s, %s, %s)", (i, i, f"u{i}@x", f"n{i}"))
    a, b = keys_on(w, "users", "s0", range(30), 2)

    def during(w: World) -> None:
        w.sql("s0", "UPDATE users SET name = 'changed' WHERE tenant = %s", (a,))
        w.sql("s0", "INSERT INTO users VALUES (1000, %s, 'late@x', 'late')", (b,))
        w.sql("s0", "DELETE FROM users WHERE tenant = %s AND id <> 1000", (b,))

    def switched(w: World) -> None:  # the new owner's writes, which verification leaves out
        w.sql("s1", "INSERT INTO users VALUES (2000, %s, 'new@x', 'on the target')", (a,))
        w.sql("s1", "UPDATE users SET name = 'edited on the target' WHERE id = 1000")

    move_id, expected = drain_s0(w, ["users"], during, switched)
    assert_done_and_faithful(w, move_id, expected)


# -- keys the guard cannot see: refused up front ------------------------------------------


def assert_refused_up_front(w: World, tables: list[str], words: Iterable[str]) -> None:
    """A drain of s0 is refused before anything moves: clearly, no move left running."""
    before = w.all_rows(tables)
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    with pytest.raises(RebalanceError) as ei:
        drain_s0(w, tables)
    for word in words:
        assert word in str(ei.value), str(ei.value)
    assert w.all_rows(tables) == before
    assert not rebalance.move_status(w.cluster), rebalance.move_status(w.cluster)
    w.cluster.refresh_map()
    assert tuple(w.cluster.config.bucket_map) == map_before
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0


ASSIGN_ID = ("CREATE SEQUENCE ids START 5000; "
             "CREATE TABLE docs (id bigint PRIMARY KEY, tenant bigint NOT NULL, body text); "
             # Unique across shards: odd on one server, even on the other.
             "CREATE FUNCTION assign_id() RETURNS trigger LANGUAGE plpgsql AS "
             "$$BEGIN IF NEW.id IS NULL THEN NEW.id := nextval('ids') * 2 + "
             "current_setting('port')::int % 2; END IF; RETURN NEW; END$$; "
             "CREATE TRIGGER trg_assign_id BEFORE INSERT ON docs FOR EACH ROW EXECUTE FUNCTION assign_id();")


def test_a_before_trigger_firing_after_the_guard_is_refused_and_moves_once_renamed(mkworld):
    """A legacy BEFORE INSERT trigger assigns the primary key.  Named trg_assign_id, it fires
    after shardkit_guard (name order), so the guard logged a row inserted during the move
    with id NULL: catch-up missed it, the batch switched, verification failed for good and
    the row stayed on the source, unseen by the new owner.  It must be refused up front,
    naming the trigger; renamed to fire first, the move is faithful."""
    w = mkworld(ASSIGN_ID, {"g": {"strategy": "hash", "tables": {"docs": "tenant"}}})
    for i in range(20):
        w.sql(w.owner("docs", i), "INSERT INTO docs VALUES (%s, %s, %s)", (i, i, f"b{i}"))
    (a,) = keys_on(w, "docs", "s0", range(20), 1)
    assert_refused_up_front(w, ["docs"], ["docs", "trg_assign_id", "shardkit_guard", "rename"])

    for shard in ("s0", "s1"):
        w.sql(shard, "ALTER TRIGGER trg_assign_id ON docs RENAME TO assign_id")

    def during(w: World) -> None:
        w.sql("s0", "INSERT INTO docs (tenant, body) VALUES (%s, 'during')", (a,))
        w.sql("s0", "UPDATE docs SET body = 'changed' WHERE tenant = %s AND id < 5000", (a,))

    move_id, expected = drain_s0(w, ["docs"], during)
    assert any("during" in r for r in expected["docs"])
    assert_done_and_faithful(w, move_id, expected)


TOUCH = ("CREATE TABLE notes (id bigint PRIMARY KEY, tenant bigint NOT NULL, body text, n int DEFAULT 0); "
         "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
         "$$BEGIN IF NEW.id = OLD.id THEN NEW.n := OLD.n + 1; END IF; RETURN NEW; END$$; "
         "CREATE TRIGGER trg_touch BEFORE UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION touch();")


def test_a_before_trigger_after_the_guard_that_sets_no_key_does_not_stop_a_move(mkworld):
    """Triggers named trg_... fire after shardkit_guard: one that sets only other columns
    (a counter, an updated_at) changes nothing the guard records, and must not stop the
    move (only one that may set the key is refused)."""
    w = mkworld(TOUCH, {"g": {"strategy": "hash", "tables": {"notes": "tenant"}}})
    for i in range(20):
        w.sql(w.owner("notes", i), "INSERT INTO notes (id, tenant, body) VALUES (%s, %s, %s)", (i, i, f"b{i}"))
    (a,) = keys_on(w, "notes", "s0", range(20), 1)

    def during(w: World) -> None:
        w.sql("s0", "INSERT INTO notes (id, tenant, body) VALUES (100, %s, 'during')", (a,))
        w.sql("s0", "UPDATE notes SET body = 'changed' WHERE tenant = %s", (a,))

    move_id, expected = drain_s0(w, ["notes"], during)
    assert any("changed" in r for r in expected["notes"])
    assert_done_and_faithful(w, move_id, expected)


def test_a_generated_primary_key_column_is_refused_up_front(mkworld):
    """PRIMARY KEY (tenant, slug), slug GENERATED ALWAYS AS (lower(name)) STORED.  The guard
    (a BEFORE trigger) sees slug NULL: a write during the move stopped catch-up halfway
    (after the copy) with a NotNullViolation on the mover's staging table.  Refused before
    anything moves, naming the column."""
    w = mkworld("CREATE TABLE items (tenant bigint NOT NULL, name text NOT NULL, "
                "slug text GENERATED ALWAYS AS (lower(name)) STORED, qty int, PRIMARY KEY (tenant, slug))",
                {"g": {"strategy": "hash", "tables": {"items": "tenant"}}})
    for i in range(20):
        w.sql(w.owner("items", i), "INSERT INTO items (tenant, name, qty) VALUES (%s, %s, 1)", (i, f"N{i}"))
    assert_refused_up_front(w, ["items"], ["items", "slug", "generated"])


# -- range and list groups, named the hard way ----------------------------------------------


def test_range_split_of_a_mixed_case_table_in_a_schema(mkworld):
    w = mkworld('CREATE SCHEMA "Sales"; CREATE TABLE "Sales"."Invoices" ("Num" bigint PRIMARY KEY, '
                '"Amount" numeric(12,2), "Note" text)',
                {"inv": {"strategy": "range", "tables": {"Sales.Invoices": "Num"},
                         "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]}})
    for i in range(0, 2000, 37):
        w.sql(w.owner("Sales.Invoices", i), 'INSERT INTO "Sales"."Invoices" VALUES (%s, %s, %s)', (i, i / 7, f"n{i}"))
    plan = plan_split_range(w.slices(), "inv", 500, "s1")

    def during(w: World) -> None:
        w.sql("s0", 'UPDATE "Sales"."Invoices" SET "Note" = \'late\' WHERE "Num" BETWEEN 500 AND 700')
        w.sql("s0", 'INSERT INTO "Sales"."Invoices" VALUES (501, 1, \'new\')')
        w.sql("s0", 'DELETE FROM "Sales"."Invoices" WHERE "Num" = 518')

    move_id, expected = run_plan(w, plan, ['"Sales"."Invoices"'], during)
    assert_done_and_faithful(w, move_id, expected)


def test_list_value_move_of_a_mixed_case_table_in_a_schema(mkworld):
    w = mkworld('CREATE SCHEMA "Geo"; CREATE TABLE "Geo"."Shops" ("Id" bigint PRIMARY KEY, '
                '"Region" text NOT NULL, "Tags" text[])',
                {"regions": {"strategy": "list", "tables": {"Geo.Shops": "Region"},
                             "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"}})
    for i, r in enumerate(["eu", "uk", "uk", "us", "ca", "uk"]):
        w.sql(w.owner("Geo.Shops", r), 'INSERT INTO "Geo"."Shops" VALUES (%s, %s, %s)', (i, r, [r, None]))
    plan = plan_move_value(w.slices(), "regions", "uk", "s1")

    def during(w: World) -> None:
        w.sql("s0", 'UPDATE "Geo"."Shops" SET "Tags" = NULL WHERE "Region" = \'uk\'')
        w.sql("s0", 'INSERT INTO "Geo"."Shops" VALUES (100, \'uk\', \'{}\')')

    move_id, expected = run_plan(w, plan, ['"Geo"."Shops"'], during)
    assert_done_and_faithful(w, move_id, expected)


def test_deferrable_unique_values_swapped_during_the_move(mkworld):
    w = mkworld("CREATE TABLE users (id bigint PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, tenant bigint NOT NULL, "
                "email text, CONSTRAINT u_email UNIQUE (email) DEFERRABLE INITIALLY DEFERRED)",
                {"g": {"strategy": "hash", "tables": {"users": "tenant"}}})
    (t,) = keys_on(w, "users", "s0", range(20), 1)
    for i in range(20):
        w.sql(w.owner("users", i), "INSERT INTO users VALUES (%s, %s, %s)", (i, i, f"u{i}"))
    w.sql("s0", "INSERT INTO users VALUES (100, %s, 'a'), (101, %s, 'b')", (t, t))

    def during(w: World) -> None:
        with w.conn("s0") as c, c.transaction():
            c.execute("UPDATE users SET email = 'b' WHERE id = 100")
            c.execute("UPDATE users SET email = 'a' WHERE id = 101")

    move_id, expected = drain_s0(w, ["users"], during)
    assert_done_and_faithful(w, move_id, expected)


@pytest.mark.parametrize("when", ["before", "during"])
def test_an_exclusion_constraint_clash_aborts_the_move_like_a_unique_clash(mkworld, when):
    """A moved row that an exclusion constraint (EXCLUDE USING gist (during WITH &&)) keeps
    apart from a row of another bucket on the target, there before the move (the copy) or
    written during it (catch-up).  A unique value's clash aborts the move, nothing
    switched, saying why; this one left it running, capturing, its error saying to fix
    "the cause" and resume."""
    w = mkworld("CREATE TABLE slots (id bigint PRIMARY KEY, tenant bigint NOT NULL, during tstzrange, "
                "EXCLUDE USING gist (during WITH &&))",
                {"g": {"strategy": "hash", "tables": {"slots": "tenant"}}})
    a, = keys_on(w, "slots", "s0", range(20), 1)
    b, = keys_on(w, "slots", "s1", range(20), 1)
    w.sql("s1", "INSERT INTO slots VALUES (2, %s, '[2024-01-02, 2024-01-04)')", (b,))
    clash = "INSERT INTO slots VALUES (1, %s, '[2024-01-01, 2024-01-03)')"
    if when == "before":
        w.sql("s0", clash, (a,))
    else:
        w.sql("s0", "INSERT INTO slots VALUES (3, %s, '[2025-01-01, 2025-01-03)')", (a,))
    before = w.all_rows(["slots"])

    def during(w: World) -> None:
        w.sql("s0", clash, (a,))

    with pytest.raises(RebalanceError) as ei:
        drain_s0(w, ["slots"], during if when == "during" else None)
    message = str(ei.value)
    assert "slots" in message and "exclusion constraint" in message and "aborted" in message, message
    (status,) = rebalance.move_status(w.cluster)
    assert status["state"] == "aborted", status
    if when == "before":
        assert w.all_rows(["slots"]) == before
    else:
        assert len(w.all_rows(["slots"])["slots"]) == len(before["slots"]) + 1
    assert verify(w.cluster).ok
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0
