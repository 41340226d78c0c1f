"""Shard keys whose column is of a PostgreSQL DOMAIN type (`CREATE DOMAIN tenant_id AS bigint
CHECK (VALUE > 0)`, a domain over text, uuid, char(n), or over another domain).

A domain's values are its base type's: PostgreSQL hashes them with shardkit's SQL functions
as the base type, and drivers read them as the base type, so the router places them as it
places the base type's keys.  Where shardkit decides by the column's type read from the
catalog (the guard's bucket expression, verify's SQL check, the mover's scans, the slices'
comparisons), it must see the base type through any number of domains, not refuse the
domain's name as a type it cannot hash.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own on both servers plus a catalog.  Moves run in-process (grace 0).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

import shardkit
from shardkit import rebalance
from shardkit._guard import bucket_expression, table_shape
from shardkit._rebalance_plan import plan_drain, plan_move_value, plan_split_range
from shardkit.errors import ConfigurationError
from shardkit.verify import verify

from rebalance_world import databases_with_catalog

pytestmark = pytest.mark.integration

BUCKETS = 8
CANON = "SET TimeZone = 'UTC'; SET bytea_output = 'hex'"
_numbers = itertools.count()

DOMAINS = (
    "CREATE DOMAIN tenant_id AS bigint CHECK (VALUE > 0); "
    "CREATE DOMAIN small_id AS int4 CHECK (VALUE > 0); "
    "CREATE DOMAIN deep_id AS tenant_id CHECK (VALUE < 1000000); "   # a domain over a domain
    "CREATE DOMAIN handle AS text CHECK (VALUE <> ''); "
    "CREATE DOMAIN code AS varchar(20); "
    "CREATE DOMAIN padded AS char(6); "
    "CREATE DOMAIN ref AS uuid; "
    "CREATE DOMAIN deep_ref AS ref NOT NULL; "
    "CREATE DOMAIN blob AS bytea; "
)

# table -> (key column's domain, Python keys of that column)
KEYED = {
    "t_tenant": ("tenant_id", list(range(1, 41))),
    "t_small": ("small_id", list(range(1, 41))),
    "t_deep": ("deep_id", list(range(1, 41))),
    "t_handle": ("handle", [f"user-{i}" for i in range(40)]),
    "t_code": ("code", [f"C{i:03}" for i in range(40)]),
    "t_padded": ("padded", [f"p{i}" for i in range(40)]),   # shorter than 6: stored padded
    "t_ref": ("ref", [uuid.UUID(int=i * 7919 + 1) for i in range(40)]),
    "t_deep_ref": ("deep_ref", [uuid.UUID(int=i * 104729 + 3) for i in range(40)]),
    "t_blob": ("blob", [bytes([i, 255 - i, 7]) for i in range(40)]),
}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)


@dataclass
class World:
    dev: Any
    db: str
    cluster: shardkit.Cluster

    def conn(self, shard: str) -> psycopg.Connection:
        return self.dev.shard(shard).primary.connect(dbname=self.db, autocommit=True)

    def sql(self, shard: str, query: str, params: Any = None) -> Any:
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


@pytest.fixture
def mkworld(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, groups: dict[str, Any], init: bool = True) -> World:
        db = f"dom{os.getpid()}_{next(_numbers)}"
        path = databases_with_catalog(dev, db, schema, groups, tmp_path / f"{db}.toml")
        cluster = shardkit.Cluster.from_config(path, follow_map=False)
        w = World(dev, db, cluster)
        made.append(w)
        if init:
            rebalance.init(cluster)
        return w

    yield make
    for w in made:
        w.cluster.dispose()
        for shard in dev.shards:
            with shard.primary.connect(dbname="postgres", autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {w.db} WITH (FORCE)")


def keyed_schema(tables: Iterable[str]) -> str:
    # The shard key leads the primary key (ids from each shard's own sequence are unique
    # with it across shards), so the keys the guard logs during a move are read back by
    # the domain's type too.
    return DOMAINS + "".join(f"CREATE TABLE {t} (id bigserial, k {KEYED[t][0]} NOT NULL, note text, "
                             "PRIMARY KEY (k, id)); " for t in tables)


def hash_groups(tables: Iterable[str]) -> dict[str, Any]:
    return {f"g_{t}": {"strategy": "hash", "tables": {t: "k"}} for t in tables}


def other(shard: str) -> str:
    return "s1" if shard == "s0" else "s0"


def assert_clean(w: World, method: str = "sql") -> None:
    report = verify(w.cluster)
    assert report.ok, report.render()
    assert {t.method for t in report.tables} == {method}, report.render()


# -- hash keys: the guard, SQL's bucket, verify ---------------------------------------------


def test_hash_keys_of_domain_types_are_guarded_placed_by_the_map_and_verified_in_sql(mkworld):
    """`rebalance init` guards a table keyed by a domain column (it refused the domain's name
    as a type it cannot hash); each row is accepted on the shard `cluster.shard_for` names
    and refused (SK001) on the other, so the guard's SQL bucket is Python's; the bucket
    shardkit computes in SQL for the column equals `bucket_for` of the key, row by row;
    `shardkit verify` checks the tables in SQL and finds every row in place."""
    w = mkworld(keyed_schema(KEYED), hash_groups(KEYED))
    for table, (_, keys) in KEYED.items():
        for k in keys:
            w.sql(w.owner(table, k), f"INSERT INTO {table} (k, note) VALUES (%s, 'x')", (k,))
        k = keys[0]
        with pytest.raises(psycopg.Error) as e:
            w.sql(other(w.owner(table, k)), f"INSERT INTO {table} (k, note) VALUES (%s, 'wrong')", (k,))
        assert e.value.sqlstate == "SK001", (table, e.value)

    for shard in ("s0", "s1"):
        with w.cluster.primary(shard).connect() as c:
            for table, (domain, keys) in KEYED.items():
                _, _, types = table_shape(c, table, keys=["k"])
                expr = bucket_expression("k", types["k"], BUCKETS)
                got = dict(c.execute(text(f"SELECT id, {expr} FROM {table}")).all())
                by_id = dict(c.execute(text(f"SELECT id, k FROM {table}")).all())
                for i, b in got.items():
                    key = by_id[i]
                    if domain == "padded":
                        key = key.rstrip(" ")   # char(n) comes back padded; the key is not
                    assert b == shardkit.bucket_for(key, BUCKETS), (table, key)
                    assert w.owner(table, key) == shard, (table, key)
    assert_clean(w)


def test_a_value_stored_on_the_wrong_shard_is_reported_misplaced(mkworld):
    """Verify's SQL check of a domain key is a real check: a row written past the guard (the
    mover's setting) on a shard that does not own its bucket is reported."""
    w = mkworld(keyed_schema(["t_deep"]), hash_groups(["t_deep"]))
    k = 7
    wrong = other(w.owner("t_deep", k))
    with w.conn(wrong) as c:
        c.execute("SET shardkit.mover = on")
        c.execute("INSERT INTO t_deep (k, note) VALUES (%s, 'stray')", (k,))
    report = verify(w.cluster)
    assert not report.ok
    rep = next(t for t in report.tables if t.table == "t_deep" and t.shard == wrong)
    assert rep.method == "sql" and sum(rep.misplaced.values()) == 1, report.render()


# -- moves -----------------------------------------------------------------------------------


def run_plan(w: World, plan: Any, tables: list[str],
             during: Callable[[World], None] | None = None) -> tuple[int, dict[str, list[str]]]:
    """Apply ``plan``; ``during`` runs on the source right after the copy.  Returns the move
    and every table's rows (both shards) as they must be once it is done."""
    state: dict[str, Any] = {}
    source = plan.moves[0].source
    target = other(source)
    before = {t: w.rows(target, t) for t in tables}

    def progress(line: str) -> None:
        if during is not None and ": copied " in line and "ran" not in state:
            state["ran"] = True
            during(w)
            state["expected"] = {t: sorted(w.rows(source, t) + before[t]) for t in tables}

    expected = w.all_rows(tables)
    move_id = rebalance.Mover(w.cluster, grace=0, progress=progress).apply(plan)
    assert during is None or state.get("ran")
    return move_id, state.get("expected", expected)


def assert_done_and_placed(w: World, move_id: int, expected: dict[str, list[str]],
                           keys: dict[str, Iterable[Any]], method: str = "sql") -> None:
    assert w.all_rows(expected) == expected
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "done"
    w.cluster.refresh_map()
    for table, ks in keys.items():
        for k in ks:
            owner = w.owner(table, k)
            assert w.sql(owner, f"SELECT count(*) FROM {table} WHERE k = %s", (k,))[0][0] >= 1, (table, k)
            assert w.sql(other(owner), f"SELECT count(*) FROM {table} WHERE k = %s", (k,))[0][0] == 0, (table, k)
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.changes")[0][0] == 0
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0
    assert_clean(w, method)


def test_a_drain_moves_rows_keyed_by_domains_with_writes_during_the_move(mkworld):
    """Draining s0 copies, catches up, verifies and cleans up tables keyed by a domain over
    bigint (the integer scan), over a domain over bigint, and over a domain over uuid; each
    row ends on the shard the new map names, and verify is clean."""
    tables = ["t_tenant", "t_deep", "t_deep_ref", "t_padded"]
    w = mkworld(keyed_schema(tables), hash_groups(tables))
    for t in tables:
        for k in KEYED[t][1]:
            w.sql(w.owner(t, k), f"INSERT INTO {t} (k, note) VALUES (%s, 'x')", (k,))
    on_s0 = {t: [k for k in KEYED[t][1] if w.owner(t, k) == "s0"][:2] for t in tables}

    def during(w: World) -> None:
        for t, (a, b) in on_s0.items():
            w.sql("s0", f"UPDATE {t} SET note = 'changed' WHERE k = %s", (a,))
            w.sql("s0", f"INSERT INTO {t} (k, note) VALUES (%s, 'late')", (a,))
            w.sql("s0", f"DELETE FROM {t} WHERE k = %s", (b,))

    w.cluster.refresh_map()
    move_id, expected = run_plan(w, plan_drain(w.cluster.config.bucket_map, "s0"), tables, during)
    assert all(any("late" in r for r in expected[t]) for t in tables)
    assert not any(w.rows("s0", t) for t in tables)
    kept = {t: [k for k in KEYED[t][1] if k != on_s0[t][1]] for t in tables}   # (b deleted)
    assert_done_and_placed(w, move_id, expected, kept)


# -- range groups ----------------------------------------------------------------------------


def test_a_range_group_keyed_by_a_domain_over_an_integer_is_guarded_and_splits(mkworld):
    """A range group with integer bounds on a domain over bigint: its slices are guarded
    (they were left unguarded, and the group could not move, as if the column were not an
    integer) and a split moves its upper side, verify clean."""
    w = mkworld(DOMAINS + "CREATE TABLE invoices (id bigint PRIMARY KEY, k deep_id NOT NULL, note text)",
                {"inv": {"strategy": "range", "tables": {"invoices": "k"},
                         "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]}})
    keys = list(range(1, 2000, 37))
    for i, k in enumerate(keys):
        w.sql(w.owner("invoices", k), "INSERT INTO invoices VALUES (%s, %s, 'x')", (i, k))
    with pytest.raises(psycopg.Error) as e:
        w.sql("s1", "INSERT INTO invoices VALUES (9999, 5, 'wrong shard')")
    assert e.value.sqlstate == "SK001", e.value
    w.cluster.refresh_map()
    plan = plan_split_range(list(w.cluster.config.slices), "inv", 500, "s1")

    def during(w: World) -> None:
        w.sql("s0", "UPDATE invoices SET note = 'late' WHERE k BETWEEN 500 AND 700")
        w.sql("s0", "INSERT INTO invoices VALUES (10000, 501, 'new')")

    move_id, expected = run_plan(w, plan, ["invoices"], during)
    # (verify reads range groups' keys through Python)
    assert_done_and_placed(w, move_id, expected, {"invoices": [*keys, 501]}, method="python")
    assert w.owner("invoices", 600) == "s1" and w.owner("invoices", 400) == "s0"


def test_a_split_beyond_bigint_is_refused_for_a_domain_over_an_integer(mkworld):
    """A split at a key no bigint holds is refused for a domain over an integer as for the
    integer itself, naming the column and its domain (once written to the shards' slices,
    every write of the group would fail "out of range for type bigint")."""
    w = mkworld(DOMAINS + "CREATE TABLE invoices (id bigint PRIMARY KEY, k deep_id NOT NULL)",
                {"inv": {"strategy": "range", "tables": {"invoices": "k"},
                         "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]}})
    w.cluster.refresh_map()
    plan = plan_split_range(list(w.cluster.config.slices), "inv", 2**63, "s0")
    with pytest.raises(rebalance.RebalanceError) as e:
        rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).apply(plan)
    msg = str(e.value)
    assert str(2**63) in msg and "invoices.k" in msg and "deep_id (a domain over int8)" in msg, msg
    assert not rebalance.move_status(w.cluster)


# -- refused as clearly as the base type -----------------------------------------------------


def test_citext_under_two_domains_is_refused_like_citext(mkworld, dev):
    with dev.shards[0].primary.connect(dbname="postgres", autocommit=True) as c:
        if not c.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'citext'").fetchone()[0]:
            pytest.skip("no citext extension on this server")
    w = mkworld("CREATE EXTENSION citext; CREATE DOMAIN email AS citext; CREATE DOMAIN work_email AS email; "
                "CREATE TABLE users (id bigint PRIMARY KEY, mail work_email NOT NULL)",
                {"g": {"strategy": "hash", "tables": {"users": "mail"}}}, init=False)
    with pytest.raises(ConfigurationError) as e:
        rebalance.init(w.cluster)
    msg = str(e.value)
    assert "users.mail" in msg and "citext" in msg and "without case" in msg, msg


def test_a_domain_over_an_unhashable_type_is_refused_naming_both(mkworld):
    w = mkworld("CREATE DOMAIN amount AS numeric(12, 2); "
                "CREATE TABLE bills (id bigint PRIMARY KEY, k amount NOT NULL)",
                {"g": {"strategy": "hash", "tables": {"bills": "k"}}}, init=False)
    with pytest.raises(ConfigurationError) as e:
        rebalance.init(w.cluster)
    msg = str(e.value)
    assert "amount" in msg and "numeric" in msg and "cannot be hashed in SQL" in msg, msg


def test_verify_without_the_sql_functions_reads_a_char_domain_key_unpadded(mkworld):
    """Without shardkit's SQL functions on the shards (no `rebalance init`), verify streams
    the keys through Python: a char(n) column's values come back padded with blanks its keys
    do not have, and are read unpadded, under a domain too (it reported every padded key
    of the domain as misplaced)."""
    w = mkworld(keyed_schema(["t_padded"]), hash_groups(["t_padded"]), init=False)
    for k in KEYED["t_padded"][1]:
        w.sql(w.owner("t_padded", k), "INSERT INTO t_padded (k, note) VALUES (%s, 'x')", (k,))
    assert_clean(w, "python")


def test_a_list_value_on_a_domain_over_uuid_is_read_as_the_uuid_postgresql_prints(mkworld):
    """A list group keyed by a domain over a domain over uuid: a `--move-value` key is taken
    as PostgreSQL prints the uuid (the slices compare keys by that text), and a plan whose
    value is not written so is refused, as for a uuid column (the domain hid the uuid: the
    value was taken as given, and no key would ever be found under it)."""
    a, b = (str(uuid.UUID(int=n)) for n in (11, 22))
    w = mkworld(DOMAINS + "CREATE TABLE stores (id bigint PRIMARY KEY, k deep_ref, note text)",
                {"st": {"strategy": "list", "tables": {"stores": "k"},
                        "values": {"s0": [a], "s1": [b]}, "default": "s1"}})
    assert rebalance.slice_key(w.cluster, "st", a.upper(), "--move-value", "s1") == a
    w.cluster.refresh_map()
    plan = plan_move_value(list(w.cluster.config.slices), "st", a.upper(), "s0")  # (from the default)
    with pytest.raises(rebalance.RebalanceError) as e:
        rebalance.check_slice_plan(w.cluster, plan)
    assert f"write {a}" in str(e.value) and "stores.k is deep_ref (a domain over uuid)" in str(e.value), e.value
    w.sql("s0", "INSERT INTO stores VALUES (1, %s, 'x')", (uuid.UUID(a),))
    move_id, expected = run_plan(w, plan_move_value(list(w.cluster.config.slices), "st", a, "s1"), ["stores"])
    assert_done_and_placed(w, move_id, expected, {"stores": [uuid.UUID(a)]}, method="python")
