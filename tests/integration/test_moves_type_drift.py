"""Online moves over column types and schemas that differ between the shards, and an
operator whose config no longer reaches a move's target.

The mover sends rows in COPY's binary format, which the target reads by its own columns'
types: a column retyped on one shard only (a migration rolled out shard by shard) must
stop the move before the switch, not arrive silently changed.  A table with inheritance
children (INHERITS) must be refused: its children's rows would land in the parent.  An
abort or a resume naming a shard the config dropped, or cannot reach, must say so, and
neither may run with a config whose bucket_count the catalog's map does not have.

Worlds as in ``test_move_fidelity`` (fresh databases per test on a module-scoped
2-shard, 8-bucket cluster without replicas; moves in-process, grace 0).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_move_fidelity import World, assert_refused_cleanly, drain_s0, hash_group, keys_on, make_world

import shardkit
from shardkit import rebalance
from shardkit._guard import uninstall_guard
from shardkit._rebalance_plan import plan_drain
from shardkit.devcluster import to_toml
from shardkit.errors import RebalanceError, ShardkitError
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


def _state(w: World) -> tuple[tuple[str, ...], list[str], list[str]]:
    w.cluster.refresh_map()
    return tuple(w.cluster.config.bucket_map), w.rows("s0", "boxes"), w.rows("s1", "boxes")


# -- a column retyped on one shard only -------------------------------------------------------

RETYPED = {
    # source type, target type, a value, the migration that brings the source in line
    "float8-bigint": ("float8", "bigint", "1.5", "ALTER TABLE boxes ALTER COLUMN v TYPE bigint"),
    "timestamp-timestamptz": ("timestamp", "timestamptz", "'2024-06-01 12:00'",
                              "ALTER TABLE boxes ALTER COLUMN v TYPE timestamptz"),
    "numeric-scale": ("numeric(10,2)", "numeric(10,4)", "1.25",
                      "ALTER TABLE boxes ALTER COLUMN v TYPE numeric(10,4)"),
    "generated-plain": ("int GENERATED ALWAYS AS (id * 10) STORED", "int", None,
                        "ALTER TABLE boxes ALTER COLUMN v DROP EXPRESSION"),
}


@pytest.mark.parametrize("kind", sorted(RETYPED))
def test_a_column_of_another_type_on_the_target_stops_the_move_before_the_switch(mkworld, kind):
    """The target's migration ran, the source's not yet.  Before: float8 1.5 arrived as the
    bigint 4609434218613702656, a timestamp as that wall time in UTC, 1.25 as 1.2500, and
    a generated column the target has as a plain one arrived NULL (verification passed);
    the others switched, then failed verification with the target serving the values."""
    src_type, tgt_type, value, migrate = RETYPED[kind]
    table = "CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v {})"
    w = mkworld("", hash_group({"boxes": "tenant"}),
                per_shard={"s0": table.format(src_type), "s1": table.format(tgt_type)})
    for i in range(20):
        if value is None:
            w.on_owner("boxes", i, "INSERT INTO boxes (id, tenant) VALUES (%s, %s)", (i, i))
            if w.owner("boxes", i) == "s1":
                w.sql("s1", "UPDATE boxes SET v = id * 10 WHERE id = %s", (i,))
        else:
            w.on_owner("boxes", i, f"INSERT INTO boxes VALUES (%s, %s, {value})", (i, i))
    before = _state(w)
    with pytest.raises(RebalanceError) as err:
        drain_s0(w, ["boxes"])
    message = str(err.value)
    assert "column v" in message and "on the target" in message and "resume" in message, message
    assert _state(w) == before, "rows moved (or the map switched) although the column types differ"

    # The source's migration: resume carries every row, unchanged from the source's view.
    w.sql("s0", migrate)
    expected = sorted(w.rows("s0", "boxes") + w.rows("s1", "boxes"))
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert not w.rows("s0", "boxes")
    assert w.rows("s1", "boxes") == expected
    assert verify(w.cluster).ok


def test_a_column_retyped_on_the_target_during_the_move_stops_catch_up(mkworld):
    """The target's migration lands after the copy (its ALTER converts the copies), and the
    application updates a moving row on the source: catch-up must not send the updated
    float8 to the target's bigint column as raw bytes."""
    w = mkworld("CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v float8)",
                hash_group({"boxes": "tenant"}))
    for i in range(20):
        w.on_owner("boxes", i, "INSERT INTO boxes VALUES (%s, %s, 1.5)", (i, i))
    (a,) = keys_on(w, "boxes", "s0", range(20), 1)

    def during(w: World) -> None:
        w.sql("s1", "ALTER TABLE boxes ALTER COLUMN v TYPE bigint")
        w.sql("s0", "UPDATE boxes SET v = 41.75 WHERE id = %s", (a,))

    map_before = _state(w)[0]
    with pytest.raises(RebalanceError) as err:
        drain_s0(w, ["boxes"], during)
    assert "column v is double precision on the source but bigint on the target" in str(err.value)
    assert _state(w)[0] == map_before, "the batch switched with a column of another type"
    w.sql("s0", "ALTER TABLE boxes ALTER COLUMN v TYPE bigint")
    (move_id,) = w.running_moves()
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    got = dict(w.sql("s1", "SELECT id, v FROM boxes"))
    assert got == {i: 42 if i == a else 2 for i in range(20)}
    assert not w.rows("s0", "boxes")
    assert verify(w.cluster).ok


# -- inheritance children ---------------------------------------------------------------------


def test_a_table_with_inheritance_children_is_refused_before_anything_moves(mkworld):
    """Old-style partitioning: ev_2023 INHERITS ev.  The copy read the children's rows
    through ev and wrote them into ev itself on the target; verification compared ev with
    its children on both sides and passed."""
    w = mkworld("CREATE TABLE ev (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text); "
                "CREATE TABLE ev_2023 (PRIMARY KEY (id)) INHERITS (ev);",
                hash_group({"ev": "tenant"}))
    for i in range(20):
        w.sql(w.owner("ev", i), f"INSERT INTO {'ev_2023' if i % 2 else 'ev'} VALUES (%s, %s, 'x')", (i, i))
    tables = ["ev", "ev_2023"]
    before = w.all_rows(tables)
    w.cluster.refresh_map()
    map_before = tuple(w.cluster.config.bucket_map)
    with pytest.raises(ShardkitError) as err:
        drain_s0(w, ["ev"])
    assert_refused_cleanly(w, err.value, before, map_before, ["ev_2023", "inherit"])


# -- the config no longer has (or reaches) a move's target ------------------------------------


class _Stop(Exception):
    pass


def _move_stopped_after_the_copy(w: World) -> int:
    """Empty s1, then start moving s0's buckets to it and stop after the copy."""
    w.cluster.refresh_map()
    rebalance.Mover(w.cluster, grace=0).apply(plan_drain(w.cluster.config.bucket_map, "s1"))
    w.cluster.refresh_map()

    def stop(line: str) -> None:
        if ": copied " in line:
            raise _Stop()

    mover = rebalance.Mover(w.cluster, grace=0, progress=stop)
    move_id = mover.start(plan_drain(w.cluster.config.bucket_map, "s0", remaining=["s1"]))
    with pytest.raises(RebalanceError, match=r"batch 0 \(s0 -> s1\): _Stop"):
        mover.run(move_id)
    return move_id


def _cluster_with(w: World, tmp_path: Path, name: str, change: Any) -> shardkit.Cluster:
    cfg = tomllib.loads(w.cfg_path.read_text(encoding="utf-8"))
    cfg["shards"] = [s for s in (change(s) for s in cfg["shards"]) if s is not None]
    path = tmp_path / f"{w.db}_{name}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return shardkit.Cluster.from_config(path, follow_map=False)


def test_abort_and_resume_of_a_move_whose_target_left_the_config_say_so(mkworld, tmp_path):
    """The operator gives up on a new shard: removes it from the config (or it is down) and
    aborts.  Before: the abort died with a bare KeyError('s1') (or psycopg's
    OperationalError) traceback, resume said "KeyError: 's1'"."""
    w = mkworld("CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text)",
                hash_group({"boxes": "tenant"}))
    for i in range(20):
        w.on_owner("boxes", i, "INSERT INTO boxes VALUES (%s, %s, 'x')", (i, i))
    move_id = _move_stopped_after_the_copy(w)
    port = str(w.dev.shard("s1").primary.port)
    removed = _cluster_with(w, tmp_path, "removed", lambda s: None if s["name"] == "s1" else s)
    down = _cluster_with(w, tmp_path, "down", lambda s: dict(s, primary=s["primary"].replace(f":{port}/", ":1/"))
                         if s["name"] == "s1" else s)
    try:
        for what in ("abort", "resume"):
            with pytest.raises(RebalanceError) as err:
                if what == "abort":
                    rebalance.abort(removed, move_id)
                else:
                    rebalance.Mover(removed, grace=0).run(move_id)
            message = str(err.value)
            assert "s1" in message and "not in the config" in message, (what, message)
        with pytest.raises(RebalanceError) as err:
            rebalance.abort(down, move_id)
        message = str(err.value)
        assert "cannot reach s1" in message and "abort" in message and "again" in message, message
    finally:
        removed.dispose()
        down.dispose()
    # Nothing was undone by the refused aborts: the real config aborts the move cleanly.
    assert w.running_moves() == [move_id]
    rebalance.abort(w.cluster, move_id)
    w.cluster.refresh_map()
    assert set(w.cluster.config.bucket_map) == {"s0"}
    assert len(w.rows("s0", "boxes")) == 20 and not w.rows("s1", "boxes")
    for shard in ("s0", "s1"):
        assert w.sql(shard, "SELECT count(*) FROM shardkit.moving_buckets")[0][0] == 0
    assert verify(w.cluster).ok


class _StopBeforeCutOver(rebalance.Mover):
    """Copies and catches up, then the application updates every moving row and the mover
    stops (the batch is at ``copied``, its changes not yet applied)."""

    def __init__(self, w: World, **kw: Any) -> None:
        super().__init__(w.cluster, grace=0, **kw)
        self.w = w

    def _cut_over(self, *a: Any, **kw: Any) -> Any:
        self.w.sql("s0", "UPDATE boxes SET v = 'changed'")
        raise _Stop()


def test_resume_and_abort_refuse_a_config_whose_bucket_count_changed(mkworld, tmp_path):
    """bucket_count is fixed for a cluster's life; an operator edits it anyway between a
    mover's stop and `resume`.  The cluster routes by the file then (it logs the catalog's
    misfit), and the mover computed buckets with the new count.  Before: the resumed move
    finished, 9 of the 18 rows updated meanwhile kept their old value on the target, and
    9 stayed on the source as well (verify: misplaced duplicates)."""
    w = mkworld("CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text)",
                hash_group({"boxes": "tenant"}))
    for i in range(40):
        w.on_owner("boxes", i, "INSERT INTO boxes VALUES (%s, %s, 'x')", (i, i))
    moving = len(w.rows("s0", "boxes"))
    w.cluster.refresh_map()
    mover = _StopBeforeCutOver(w)
    move_id = mover.start(plan_drain(w.cluster.config.bucket_map, "s0"))
    with pytest.raises(RebalanceError):
        mover.run(move_id)
    cfg = tomllib.loads(w.cfg_path.read_text(encoding="utf-8"))
    cfg["bucket_count"] = 16
    path = tmp_path / f"{w.db}_16.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    edited = shardkit.Cluster.from_config(path, follow_map=False)
    try:
        for what in ("resume", "abort"):
            with pytest.raises(ShardkitError) as err:
                if what == "resume":
                    rebalance.Mover(edited, grace=0).run(move_id)
                else:
                    rebalance.abort(edited, move_id)
            assert "8 buckets" in str(err.value) and "16" in str(err.value), (what, str(err.value))
    finally:
        edited.dispose()
    assert w.running_moves() == [move_id]
    # With the right config the move finishes, every update on the target.
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    assert not w.rows("s0", "boxes")
    assert w.sql("s1", "SELECT count(*) FROM boxes WHERE v = 'changed'")[0][0] == moving > 0
    assert verify(w.cluster).ok


def _truncate_refused_while_moving(w: World, tables: list[str]) -> None:
    """20 rows of ``boxes``; a move of s0's buckets to s1 stopped after its copy: TRUNCATE
    of each of ``tables`` on s0 is refused; the move then finishes with every row."""
    for i in range(20):
        w.on_owner("boxes", i, "INSERT INTO boxes VALUES (%s, %s, 'x')", (i, i))
    move_id = _move_stopped_after_the_copy(w)
    for table in tables:
        with pytest.raises(Exception) as err:
            w.sql("s0", f"TRUNCATE {table}")
        assert "cannot be truncated while buckets move" in str(err.value), str(err.value)
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    w.cluster.refresh_map()
    assert verify(w.cluster).ok and len(w.rows("s1", "boxes")) == 20


def _stale_until_init(w: World) -> None:
    """A move back to s0 is refused, the guard being stale, until rebalance init."""
    with pytest.raises(RebalanceError, match="rebalance init"):
        rebalance.Mover(w.cluster, grace=0).apply(
            plan_drain(w.cluster.config.bucket_map, "s1", remaining=["s0"]))
    rebalance.init(w.cluster)


def test_truncate_while_buckets_move_is_refused_and_a_guard_without_it_is_stale(mkworld):
    """TRUNCATE fires no row trigger: run on the source during a move, it emptied the
    table and left the target's copies, which the switch then served (the rows came back).
    Refused on the source while its buckets move away; allowed once the move is done.
    (On the target before the switch it removes copies: verification then stops the move
    with the source's rows kept.)"""
    w = mkworld("CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text)",
                hash_group({"boxes": "tenant"}))
    _truncate_refused_while_moving(w, ["boxes"])
    # A guard installed before the TRUNCATE trigger existed is stale: moves refuse it.
    w.sql("s1", "DROP TRIGGER shardkit_guard_truncate ON boxes")
    _stale_until_init(w)
    w.sql("s0", "TRUNCATE boxes")  # no move: a table may be emptied


PARTITIONED = (
    "CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text) PARTITION BY RANGE (id); "
    "CREATE TABLE boxes_low PARTITION OF boxes FOR VALUES FROM (0) TO (10); "
    "CREATE TABLE boxes_high PARTITION OF boxes FOR VALUES FROM (10) TO (1000)")


def test_truncate_of_a_partition_while_its_buckets_move_is_refused(mkworld):
    """TRUNCATE of the partitioned table was refused during a move, but the guard's TRUNCATE
    trigger (a statement trigger) was on the partitioned table only: PostgreSQL does not
    clone those to partitions, and TRUNCATE boxes_low fired nothing, so it emptied the
    source and the switch served the target's copies (the rows came back).  A partition
    added after the guard lacks the trigger: the guard is stale until rebalance init."""
    w = mkworld(PARTITIONED, hash_group({"boxes": "tenant"}))
    _truncate_refused_while_moving(w, ["boxes_low", "boxes_high"])
    # A partition created since the guard was installed: moves refuse until init.
    w.sql("s1", "CREATE TABLE boxes_more PARTITION OF boxes FOR VALUES FROM (1000) TO (2000)")
    _stale_until_init(w)
    count = "SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_guard_truncate'"
    assert w.sql("s1", count)[0][0] == 4
    with w.cluster.primary("s1").begin() as c:
        uninstall_guard(c, w.cluster.config)
    assert w.sql("s1", count)[0][0] == 0
