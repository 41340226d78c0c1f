"""Online moves of hash tables with awkward column names, and ``shardkit verify`` of them.

The copy and the verification of an integer key's table compute each row's bucket in the
scan (``_sql.int8_bucket_scan``: a LATERAL item beside the table), and the verification
names the bucket in a subquery beside the table's columns.  A table may have columns of
any name, those of the LATERAL item and of the subquery included: the move must carry its
rows whole (every acknowledged row once, on its owner, checked on each shard), and
``shardkit verify`` must read it.

Worlds as in ``test_move_fidelity`` (fresh databases per test on a module-scoped
2-shard, 8-bucket cluster without replicas; moves in-process, grace 0).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from test_move_fidelity import CANON, World, hash_group, make_world

from shardkit import rebalance
from shardkit._guard import table_sql
from shardkit._rebalance_plan import plan_drain
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def mkworld(dev, tmp_path):
    made: list[World] = []

    def make(schema: str, groups: dict[str, Any], **kw: Any) -> World:
        made.append(make_world(dev, tmp_path, schema, groups, **kw))
        return made[-1]

    yield make
    for w in made:
        w.cluster.dispose()


def placed_rows(w: World, tables: dict[str, str]) -> Counter[tuple[str, str]]:
    """Every row of ``tables`` (name -> key column) on every shard, as (table, row text),
    each checked to be on the shard the live map gives its key."""
    w.cluster.refresh_map()
    out: Counter[tuple[str, str]] = Counter()
    for shard in ("s0", "s1"):
        with w.conn(shard) as c:
            c.execute(CANON)
            for table, key in tables.items():
                q = f'SELECT x::text, x."{key}" FROM {table_sql(table)} AS x'
                for text, k in c.execute(q):
                    assert w.cluster.shard_for(table, k) == shard, f"{table} row {text} is on {shard}"
                    out[(table, text)] += 1
    return out


def drain(w: World, **kw: Any) -> int:
    w.cluster.refresh_map()
    return rebalance.Mover(w.cluster, grace=0, **kw).apply(plan_drain(w.cluster.config.bucket_map, "s0"))


def assert_done(w: World, move_id: int) -> None:
    assert rebalance.move_status(w.cluster, move_id)[0]["state"] == "done"
    report = verify(w.cluster)
    assert report.ok and not any(r.in_flight for r in report.tables), report.render()


# Columns named like what the scan and the verification add beside the table's own:
# the LATERAL item (_shardkit_m) and its column (_shardkit_h), the bucket (_shardkit_b).
NAMESAKES = '_shardkit_h int, _shardkit_m text, _shardkit_b int, "Ctid" text, big text'

SHAPES = {
    # an int4 key of a quoted name, in another schema; its bucket index is made mid-move
    "int4-schema": (
        f'CREATE SCHEMA "Ops"; CREATE TABLE "Ops"."Boxes" ("Select Key" int PRIMARY KEY, {NAMESAKES})',
        {"Ops.Boxes": "Select Key"}),
    # an int2 key, hash-partitioned, with a colocated child keyed by another name, range-partitioned
    "int2-partitioned": (
        f'CREATE TABLE boxes ("K" smallint PRIMARY KEY, {NAMESAKES}) PARTITION BY HASH ("K");'
        "CREATE TABLE boxes_0 PARTITION OF boxes FOR VALUES WITH (MODULUS 2, REMAINDER 0);"
        "CREATE TABLE boxes_1 PARTITION OF boxes FOR VALUES WITH (MODULUS 2, REMAINDER 1);"
        f'CREATE TABLE lines (id int, "Box" smallint NOT NULL REFERENCES boxes, {NAMESAKES}, '
        'PRIMARY KEY ("Box", id)) PARTITION BY RANGE ("Box");'
        "CREATE TABLE lines_neg PARTITION OF lines FOR VALUES FROM (MINVALUE) TO (0);"
        "CREATE TABLE lines_pos PARTITION OF lines FOR VALUES FROM (0) TO (MAXVALUE);",
        {"boxes": "K", "lines": "Box"}),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_table_with_columns_named_like_the_scans_moves_whole(mkworld, shape):
    """Before: the copy failed with "column reference "_shardkit_h" is ambiguous" (the
    scan's select list named the table's columns unqualified, beside the LATERAL item's),
    and the error told the operator to "fix the cause and resume"; after the switch the
    verification failed the same way on "_shardkit_b", for good."""
    schema, tables = SHAPES[shape]
    w = mkworld(schema, hash_group(tables))
    parent, child = (list(tables) + [None])[:2]
    vals = "%s, %s, 'm', %s, 'c', repeat(md5(%s::text), 200)"  # big: TOASTed

    def inserts(key: int) -> list[tuple[int, str, tuple]]:
        out = [(key, f"INSERT INTO {table_sql(parent)} VALUES ({vals})", (key, key, key, key))]
        if child:
            out += [(key, f"INSERT INTO {table_sql(child)} VALUES (%s, {vals})", (j, key, j, j, j))
                    for j in range(2)]
        return out

    def insert(key: int) -> None:
        w.on_owners(parent, inserts(key))

    def where(table: str) -> str:
        return f'WHERE "{tables[table]}" = %s'

    w.on_owners(parent, [i for k in range(-150, 150) for i in inserts(k)])
    s0_keys = [k for k in range(-150, 150) if w.owner(parent, k) == "s0"]
    s0_new, s1_new = (next(k for k in range(1000, 2000) if w.owner(parent, k) == s) for s in ("s0", "s1"))
    state: dict[str, Any] = {}

    def progress(line: str) -> None:
        if ": copied " in line and "during" not in state:
            state["during"] = True
            # Acknowledged writes on the source while the move runs: caught up.
            insert(s0_new)
            w.sql("s0", f"UPDATE {table_sql(parent)} SET big = 'changed', _shardkit_h = -1 {where(parent)}",
                  (s0_keys[0],))
            if child:
                w.sql("s0", f"DELETE FROM {table_sql(child)} {where(child)}", (s0_keys[1],))
        if "switched to map version" in line and "killed" not in state:
            state["killed"] = True
            raise RuntimeError("the mover is killed between the switch and the verification")

    with pytest.raises(RebalanceError, match="killed"):
        drain(w, progress=progress)
    # Meanwhile the application writes the moved buckets on their new owner, s1...
    w.cluster.refresh_map()
    assert w.owner(parent, s0_new) == "s1"
    insert(s1_new)
    w.sql("s1", f"UPDATE {table_sql(parent)} SET _shardkit_m = 'after' {where(parent)}", (s0_keys[2],))
    # ... which holds every row now (the source keeps its copies until the clean-up).
    with w.conn("s1") as c:
        c.execute(CANON)
        expected = Counter((t, r[0]) for t in tables for r in c.execute(f"SELECT x::text FROM {table_sql(t)} x"))
    if shape == "int4-schema":  # the resumed passes compute the bucket the other way
        w.sql("s0", f'CREATE INDEX ON {table_sql(parent)} (shardkit.bucket("{tables[parent]}", 8))')
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert placed_rows(w, tables) == expected
    assert_done(w, move_id)


def test_a_text_keyed_table_with_a_column_named_like_the_verifications_bucket_moves(mkworld):
    """Before: verification, after the switch, failed with "column reference "_shardkit_b"
    is ambiguous" at every resume: the move could never finish, the source kept its copies."""
    w = mkworld('CREATE TABLE tags (name text PRIMARY KEY, _shardkit_b int, b int)',
                hash_group({"tags": "name"}))
    w.on_owners("tags", [(f"t{i}", "INSERT INTO tags VALUES (%s, %s, %s)", (f"t{i}", i, i % 7))
                         for i in range(300)])
    before = placed_rows(w, {"tags": "name"})
    move_id = drain(w)
    assert placed_rows(w, {"tags": "name"}) == before
    assert_done(w, move_id)


@pytest.mark.parametrize("key_type", ["bigint", "text"])
def test_verify_reads_a_hash_table_with_a_column_named_b(mkworld, key_type):
    """Before: `shardkit verify` failed with a GroupingError ("column ... must appear in the
    GROUP BY clause"): it grouped by "b", which PostgreSQL reads as the table's column b
    rather than the bucket's alias."""
    w = mkworld(f"CREATE TABLE notes (id {key_type} PRIMARY KEY, b int NOT NULL)",
                hash_group({"notes": "id"}))
    keys = list(range(100)) if key_type == "bigint" else [f"n{i}" for i in range(100)]
    w.on_owners("notes", [(k, "INSERT INTO notes VALUES (%s, %s)", (k, i % 3)) for i, k in enumerate(keys)])
    report = verify(w.cluster)
    assert report.ok and {r.method for r in report.tables} == {"sql"}, report.render()
    # A misplaced row is still found (on the wrong shard, and a duplicate of its owner's).
    stray = keys[0]
    other = "s0" if w.owner("notes", stray) == "s1" else "s1"
    with w.conn(other) as c:  # past the guard, as a bad restore would
        c.execute("SET shardkit.mover = 'on'")
        c.execute("INSERT INTO notes VALUES (%s, 9)", (stray,))
    report = verify(w.cluster)
    assert not report.ok
    (bad,) = [r for r in report.tables if r.misplaced]
    assert bad.shard == other and sum(bad.misplaced.values()) == 1 and bad.duplicates == 1, report.render()


def test_a_table_with_a_percent_in_a_column_name_is_refused_before_anything_moves(mkworld):
    """Before: the move started, captured its buckets, then its copy failed with psycopg's
    "the query has 2 placeholders but 1 parameters were passed" and "fix the cause and run
    `shardkit rebalance resume`", which no fix of the data could satisfy: the move stayed
    running, its buckets captured, until aborted."""
    w = mkworld('CREATE TABLE rates ("id%s" int PRIMARY KEY, "share %" numeric, note text)',
                hash_group({"rates": "id%s"}))
    w.on_owners("rates", [(i, "INSERT INTO rates VALUES (%s, 0.5, 'x')", (i,)) for i in range(50)])
    before = placed_rows(w, {"rates": "id%s"})
    with pytest.raises(RebalanceError) as err:
        drain(w)
    message = str(err.value)
    assert "rates (column id%s, column share %)" in message and "rename" in message, message
    assert "placeholder" in message and "resume" in message, message
    assert not w.running_moves(), "the refused move is left running, its buckets captured"
    assert placed_rows(w, {"rates": "id%s"}) == before
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0
    assert verify(w.cluster).ok
