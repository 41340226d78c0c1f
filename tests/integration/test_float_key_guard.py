"""The ownership guard of range and list groups keyed by a ``double precision`` or ``real``
column (and integer bounds or values: only those groups are guarded) reads a key as shardkit
places it: by the shortest decimal that reads back as the float (its ``repr()``,
PostgreSQL's text form), not by a cast to ``numeric``, which keeps 15 significant digits
(6 for a ``real``).  Before, a key needing more digits than that with a bound or listed
value between its two readings (2.9999999999999996 below a bound 3, read as 3;
3.0000000000000004, not listed, read as the listed 3) was refused by its owner with
``NotOwned``, which no retry could cure.

One module-scoped dev cluster (3 shards, no replicas) and one world: databases of one name
on every shard plus a catalog, guarded by ``rebalance init``.
"""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import REAL, BigInteger, Column, MetaData, Table, insert, select, text
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._guard import NOT_OWNED_SQLSTATE, guarded_tables, stale_guards
from shardkit.verify import verify

from rebalance_world import databases_with_catalog

pytestmark = pytest.mark.integration

md = MetaData()
RANGED = Table("fk_ranged", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
               Column("x", DOUBLE_PRECISION))
RANGED4 = Table("fk_ranged4", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
                Column("x", REAL))
LISTED = Table("fk_listed", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
               Column("x", DOUBLE_PRECISION))

SCHEMA = """
CREATE TABLE fk_ranged (id bigint PRIMARY KEY, x double precision);
CREATE TABLE fk_ranged4 (id bigint PRIMARY KEY, x real);
CREATE TABLE fk_listed (id bigint PRIMARY KEY, x double precision);
"""

GROUPS = """
[groups.ranged]
strategy = "range"
tables = { fk_ranged = "x", fk_ranged4 = "x" }
ranges = [ { to = 1, shard = "s0" }, { from = 1, to = 3, shard = "s1" },
           { from = 3, to = 10000000000000001, shard = "s2" }, { from = 10000000000000001, shard = "s0" } ]

[groups.listed]
strategy = "list"
tables = { fk_listed = "x" }
values = { s0 = [3], s1 = [1] }
default = "s2"
"""

# Keys and the shard shardkit places each on.  The ones marked * were refused by their owner
# (the guard's 15-digit reading put them in a neighbour's range or on a listed value).
DOUBLE_KEYS = {
    "ranged": [
        (0.9999999999999999, "s0"),  # * read as 1
        (1.0, "s1"),
        (2.9999999999999996, "s1"),  # * read as 3
        (3.0, "s2"),
        (3.0000000000000004, "s2"),
        (-0.0, "s0"),
        (5e-324, "s0"),
        (1e16, "s2"),
        (10000000000000002.0, "s0"),  # * read as 1e16
        (1e300, "s0"),
    ],
    "listed": [
        (3.0, "s0"),
        (1.0, "s1"),
        (2.9999999999999996, "s2"),  # * read as the listed 3
        (3.0000000000000004, "s2"),  # * read as the listed 3
        (0.9999999999999999, "s2"),  # * read as the listed 1
        (7.0, "s2"),
    ],
}
# A ``real`` stores a float's nearest float4; these keys are ones a real holds at their
# repr(), so the column keeps the value shardkit places.
REAL_KEYS = [
    (0.99999994, "s0"),  # * read as 1.00000
    (1.0, "s1"),
    (2.9999998, "s1"),  # * read as 3.00000
    (3.0, "s2"),
]


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=16)
    db = "fkguard"
    path = databases_with_catalog(dev, db, SCHEMA, GROUPS, tmp_path_factory.mktemp("fkguard") / "shardkit.toml")
    cluster = shardkit.Cluster.from_config(path, metadata=md, follow_map=False)
    rebalance.init(cluster)
    yield dev, db, cluster
    cluster.dispose()


def _table_keys():
    for x, shard in DOUBLE_KEYS["ranged"]:
        yield RANGED, x, shard
    for x, shard in DOUBLE_KEYS["listed"]:
        yield LISTED, x, shard
    for x, shard in REAL_KEYS:
        yield RANGED4, x, shard


def _raw_insert(dev, db, shard_name, table, row_id, x, *, digits=None):
    """Insert straight into one shard's primary, as an application process writing there
    would; ``digits``: the session's ``extra_float_digits``."""
    shard = next(s for s in dev.shards if s.name == shard_name)
    with shard.primary.connect(dbname=db, autocommit=True) as c:
        if digits is not None:
            c.execute(f"SET extra_float_digits = {digits}")
        c.execute(f"INSERT INTO {table} (id, x) VALUES (%s, %s)", (row_id, x))


def test_float_keys_land_on_their_owner_and_no_other_shard_takes_them(world):
    """Every key is written through the session to the shard shardkit places it on, which
    accepts it; the other shards' guards refuse it; verify finds nothing misplaced."""
    dev, db, cluster = world
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    refused = []
    for i, (table, x, owner) in enumerate(_table_keys()):
        assert cluster.shard_for(table, x) == owner, (table.name, x)
        with Session() as s:
            try:
                s.execute(insert(table).values(id=i, x=x))
                s.commit()
            except shardkit.NotOwned:
                refused.append((table.name, x))
    assert refused == []
    for i, (table, x, owner) in enumerate(_table_keys()):
        # (A real compared with a float is compared as a float8: 0.99999994 is not equal.)
        where = table.c.x == x if table is not RANGED4 else table.c.id == i
        with Session() as s:
            assert s.execute(select(table.c.id).where(where)).scalars().all() == [i], (table.name, x)
        for shard in dev.shards:
            with shard.primary.connect(dbname=db, autocommit=True) as c:
                there = c.execute(f"SELECT count(*) FROM {table.name} WHERE id = %s", (i,)).fetchone()[0]
            assert there == (shard.name == owner), (table.name, x, shard.name)
            if shard.name != owner:
                # A stale writer on another shard is refused, whatever its session's digits.
                with pytest.raises(psycopg.Error) as err:
                    _raw_insert(dev, db, shard.name, table.name, 10_000 + i, x, digits=0)
                assert err.value.sqlstate == NOT_OWNED_SQLSTATE, err.value
    report = verify(cluster)
    assert report.ok, report.render()


def test_the_owner_reads_a_key_alike_whatever_the_writers_float_digits(world):
    """``extra_float_digits`` set low by a writer's session (0 prints a float8 with 15 digits)
    does not change how the guard reads its key: the function sets its own."""
    dev, db, cluster = world
    for j, digits in enumerate((0, -15, 3)):
        for i, (table, x, owner) in enumerate(_table_keys()):
            _raw_insert(dev, db, owner, table.name, 20_000 + 1000 * j + i, x, digits=digits)


def test_a_guard_reading_float_keys_by_the_older_cast_is_stale(world):
    """A slice function made by an older shardkit (``k::numeric``, 15 digits) is out of date:
    moves and `shardkit migrate check` report it, and `rebalance init` remakes it."""
    dev, db, cluster = world
    guarded = [g for g in guarded_tables(cluster.config) if g.table == "fk_ranged"]
    engine = cluster.primary("s1")
    with engine.begin() as conn:
        assert stale_guards(conn, guarded, cluster.config.bucket_count) == []
        src = conn.execute(text("SELECT prosrc FROM pg_proc WHERE oid = to_regproc('shardkit.slice__fk_ranged')")
                           ).scalar()
        assert "k::text::numeric" in src
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION shardkit.slice__fk_ranged(k double precision) RETURNS integer "
            "LANGUAGE sql STABLE AS $f$" + src.replace("k::text::numeric", "k::numeric").replace("%", "%%")
            + "$f$")
        assert stale_guards(conn, guarded, cluster.config.bucket_count) == ["fk_ranged"]
    with pytest.raises(psycopg.Error) as err:
        _raw_insert(dev, db, "s1", "fk_ranged", 30_000, 2.9999999999999996)
    assert err.value.sqlstate == NOT_OWNED_SQLSTATE
    rebalance.init(cluster)
    with engine.begin() as conn:
        assert stale_guards(conn, guarded, cluster.config.bucket_count) == []
    _raw_insert(dev, db, "s1", "fk_ranged", 30_000, 2.9999999999999996)
