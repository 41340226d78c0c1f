"""Configured tables found by their (possibly schema-qualified) names: the guard, moves and
the change-capture log for tables of another schema next to public tables of the same short
name, declarative partitions, and key columns whose type lives in the table's schema.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own on both servers plus a catalog database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain, plan_move_value
from shardkit.verify import verify

from test_schema_tables import World as SchemaWorld

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


def World(dev: Any, tmp_path: Path, ddl: str, groups: dict[str, Any],
          reference: list[str] = ()) -> SchemaWorld:
    """test_schema_tables's world of its own databases, without ``rebalance init``."""
    return SchemaWorld(dev, tmp_path, ddl=ddl, groups=groups, reference=reference, init=False)


@pytest.fixture
def world(dev, tmp_path):
    made: list[SchemaWorld] = []

    def make(*a: Any, **kw: Any) -> SchemaWorld:
        w = World(dev, tmp_path, *a, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


ENUM_DDL = {
    "schema": """CREATE SCHEMA archive;
                 CREATE TYPE archive.region AS ENUM ('eu', 'us');
                 CREATE TABLE archive.accounts (id bigint PRIMARY KEY, region archive.region NOT NULL);""",
    "mixed-case": """CREATE SCHEMA archive;
                     CREATE TYPE "Region" AS ENUM ('eu', 'us');
                     CREATE TABLE archive.accounts (id bigint PRIMARY KEY, region "Region" NOT NULL);""",
}


@pytest.mark.parametrize("enum", sorted(ENUM_DDL))
def test_list_group_keyed_on_an_enum_of_the_tables_schema(world, enum):
    """A list group whose key column is an enum type of the table's own schema (SQLAlchemy's
    ``Enum(..., inherit_schema=True)``), or one whose name needs quoting: the guard's slice
    function was declared with the type's bare, unquoted name, and `rebalance init` failed
    with 'type "region" does not exist'."""
    w = world(ENUM_DDL[enum], {"r": {"strategy": "list", "values": {"s0": ["eu"], "s1": ["us"]},
                                     "tables": {"archive.accounts": "region"}}})
    rebalance.init(w.cluster)
    w.sql("s0", "INSERT INTO archive.accounts VALUES (1, 'eu')")
    with pytest.raises(psycopg.Error, match="not owned by this shard"):
        w.sql("s0", "INSERT INTO archive.accounts VALUES (2, 'us')")
    w.sql("s1", "INSERT INTO archive.accounts VALUES (2, 'us')")
    w.cluster.refresh_map()
    mover = rebalance.Mover(w.cluster, grace=0)
    mover.apply(plan_move_value(list(w.cluster.config.slices), "r", "eu", "s1"))
    assert w.ids("s0", "archive.accounts") == []
    assert w.ids("s1", "archive.accounts") == [1, 2]


PARTS_DDL = """
CREATE SCHEMA archive;
CREATE TABLE users (id bigint PRIMARY KEY, name text);
CREATE TABLE archive.users (id bigint PRIMARY KEY, name text) PARTITION BY HASH (id);
CREATE TABLE archive.users_0 PARTITION OF archive.users FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE archive.users_1 PARTITION OF archive.users FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE archive.orders (id bigint PRIMARY KEY, user_id bigint NOT NULL
                             REFERENCES archive.users (id), note text);
CREATE TABLE events (id bigint, user_id bigint NOT NULL REFERENCES users (id), note text,
                     PRIMARY KEY (user_id, id)) PARTITION BY HASH (user_id);
CREATE TABLE users_0 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE users_1 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
"""


def test_public_and_schema_namesakes_partitioned_move_together_with_writes(world):
    """``users`` (public) and ``archive.users`` (partitioned, referenced by a foreign key) both
    configured and moving, with ``events`` partitioned into tables named ``users_0`` and
    ``users_1`` like archive.users' partitions; rows of each written while the copy runs
    reach the target once, in their own table."""
    w = world(PARTS_DDL, {"p": {"strategy": "hash", "tables": {"users": "id", "events": "user_id"}},
                          "a": {"strategy": "hash", "tables": {"archive.users": "id",
                                                               "archive.orders": "user_id"}}})
    rebalance.init(w.cluster)
    owner = {i: w.cluster.shard_for("users", i) for i in range(40)}
    for shard in ("s0", "s1"):
        mine = [i for i in range(40) if owner[i] == shard]
        w.sql(shard, "INSERT INTO users SELECT g, 'public' FROM unnest(%s::bigint[]) g", (mine,))
        w.sql(shard, "INSERT INTO archive.users SELECT g, 'archive' FROM unnest(%s::bigint[]) g", (mine,))
        w.sql(shard, "INSERT INTO archive.orders SELECT 1000 + g, g, 'o' FROM unnest(%s::bigint[]) g", (mine,))
        w.sql(shard, "INSERT INTO events SELECT 2000 + g, g, 'e' FROM unnest(%s::bigint[]) g", (mine,))
    on_s0 = [i for i in range(40) if owner[i] == "s0"]
    k, k2 = on_s0[0], on_s0[1]
    done: list[str] = []

    def during(line: str) -> None:
        if ": copied " not in line or done:
            return
        done.append(line)
        w.sql("s0", "UPDATE archive.users SET name = 'renamed' WHERE id = %s", (k,))
        w.sql("s0", "UPDATE users SET name = 'pub-renamed' WHERE id = %s", (k2,))
        w.sql("s0", "INSERT INTO archive.orders VALUES (%s, %s, 'late')", (5000 + k, k))
        w.sql("s0", "INSERT INTO events VALUES (%s, %s, 'late')", (6000 + k2, k2))
        w.sql("s0", "DELETE FROM events WHERE id = %s", (2000 + k,))

    w.cluster.refresh_map()
    rebalance.Mover(w.cluster, grace=0, progress=during).apply(
        plan_drain(w.cluster.config.bucket_map, "s0"))
    assert done
    for table in ("users", "archive.users", "archive.orders", "events"):
        assert w.ids("s0", table) == [], table
    assert w.ids("s1", "users") == list(range(40))
    assert w.ids("s1", "archive.users") == list(range(40))
    assert w.sql("s1", "SELECT id, name FROM archive.users WHERE id IN (%s, %s) ORDER BY id", (k, k2)) == \
        sorted([(k, "renamed"), (k2, "archive")])
    assert w.sql("s1", "SELECT id, name FROM users WHERE id IN (%s, %s) ORDER BY id", (k, k2)) == \
        sorted([(k, "public"), (k2, "pub-renamed")])
    assert w.ids("s1", "archive.orders") == sorted([1000 + i for i in range(40)] + [5000 + k])
    assert w.ids("s1", "events") == sorted([2000 + i for i in range(40) if i != k] + [6000 + k2])
    assert verify(w.cluster).ok


@pytest.mark.parametrize("then", ["abort", "resume"])
def test_a_crash_in_the_cut_over_then_abort_or_resume_with_namesakes(world, then):
    """The cut-over fails at the source's commit (after the target's), with ``users`` and the
    partitioned ``archive.users`` both moving; a write to the source follows (the map still
    says s0). Abort must give back every copied row of both tables; resume must carry the
    write, into the right one."""
    w = world(PARTS_DDL, {"p": {"strategy": "hash", "tables": {"users": "id", "events": "user_id"}},
                          "a": {"strategy": "hash", "tables": {"archive.users": "id",
                                                               "archive.orders": "user_id"}}})
    rebalance.init(w.cluster)
    k = next(i for i in range(100) if w.cluster.shard_for("users", i) == "s0")
    w.sql("s0", "INSERT INTO users VALUES (%s, 'public')", (k,))
    w.sql("s0", "INSERT INTO archive.users VALUES (%s, 'archive')", (k,))
    w.sql("s0", "INSERT INTO archive.orders VALUES (%s, %s, 'o')", (1000 + k, k))
    w.sql("s0", "INSERT INTO events VALUES (%s, %s, 'e')", (2000 + k, k))
    w.sql("s0", """
        CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS
        $$BEGIN RAISE EXCEPTION 'simulated crash before the source commit'; END$$;
        CREATE TRIGGER fail_once BEFORE DELETE ON shardkit.owned_buckets
        FOR EACH ROW EXECUTE FUNCTION public.fail_once();""")
    w.cluster.refresh_map()
    with pytest.raises(rebalance.RebalanceError):
        rebalance.Mover(w.cluster, grace=0).apply(plan_drain(w.cluster.config.bucket_map, "s0"))
    w.sql("s0", "DROP TRIGGER fail_once ON shardkit.owned_buckets; DROP FUNCTION public.fail_once()")
    w.sql("s0", "UPDATE archive.users SET name = 'later' WHERE id = %s", (k,))
    w.sql("s0", "INSERT INTO archive.orders VALUES (%s, %s, 'later')", (5000 + k, k))
    move_id = max(m["move"] for m in rebalance.move_status(w.cluster))
    if then == "abort":
        rebalance.abort(w.cluster, move_id)
        home, away = "s0", "s1"
    else:
        rebalance.Mover(w.cluster, grace=0).run(move_id)
        home, away = "s1", "s0"
    w.cluster.refresh_map()
    for table in ("users", "archive.users", "archive.orders", "events"):
        assert w.ids(away, table) == [], (table, away)
    assert w.sql(home, "SELECT name FROM users WHERE id = %s", (k,)) == [("public",)]
    assert w.sql(home, "SELECT name FROM archive.users WHERE id = %s", (k,)) == [("later",)]
    assert w.ids(home, "archive.orders") == [1000 + k, 5000 + k]
    assert w.ids(home, "events") == [2000 + k]
    report = verify(w.cluster)
    assert report.ok, report.render()


def test_an_unqualified_name_is_the_table_the_search_path_finds(world):
    """``things`` configured unqualified, the database's search_path putting ``archive`` first
    (so the application's ``FROM things`` reads archive.things), and a public namesake: the
    guard, the copy, the catch-up and the clean-up all act on archive.things."""
    w = world("""CREATE SCHEMA archive;
                 CREATE TABLE public.things (id bigint PRIMARY KEY, v text);
                 CREATE TABLE archive.things (id bigint PRIMARY KEY, v text);""",
              {"t": {"strategy": "hash", "tables": {"things": "id"}}})
    for shard in ("s0", "s1"):
        w.sql(shard, f"ALTER DATABASE {w.db} SET search_path = archive, public")
        w.sql(shard, "INSERT INTO public.things SELECT g, 'public' FROM generate_series(0, 19) g")
    rebalance.init(w.cluster)
    owner = {i: w.cluster.shard_for("things", i) for i in range(20)}
    for shard in ("s0", "s1"):
        mine = [i for i in range(20) if owner[i] == shard]
        w.sql(shard, "INSERT INTO things SELECT g, 'a' FROM unnest(%s::bigint[]) g", (mine,))
    k = next(i for i in range(20) if owner[i] == "s0")
    done: list[str] = []

    def during(line: str) -> None:
        if ": copied " in line and not done:
            done.append(line)
            w.sql("s0", "UPDATE things SET v = 'late' WHERE id = %s", (k,))

    w.cluster.refresh_map()
    rebalance.Mover(w.cluster, grace=0, progress=during).apply(plan_drain(w.cluster.config.bucket_map, "s0"))
    assert done
    assert w.ids("s0", "archive.things") == [] and w.ids("s1", "archive.things") == list(range(20))
    assert w.sql("s1", "SELECT v FROM archive.things WHERE id = %s", (k,)) == [("late",)]
    for shard in ("s0", "s1"):
        assert w.ids(shard, "public.things") == list(range(20)), shard
    assert verify(w.cluster).ok
