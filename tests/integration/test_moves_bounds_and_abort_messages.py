"""Online rebalancing: a configured bound beyond bigint at
`init`, what `status` and `abort` say of an aborted or finished move, uuid split keys as
PostgreSQL prints them, and a group whose bounds do not compare with its key column."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import inproc_cli
import psycopg
import pytest
from sqlalchemy import text

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_split_range
from shardkit.errors import RebalanceError
from shardkit.verify import verify
from movers import journal_steps, kill_mover_after, rows_by_key
from test_moves_split_edges_and_stale_plans import _clear
from test_range_list_e2e import Event, Token, _where, world  # noqa: F401 (world: a fixture)

pytestmark = pytest.mark.integration

BIGINT_MAX = 2**63 - 1


@pytest.fixture
def subprocess_path(monkeypatch):
    """The killed movers (tests/movers.py) load the config, whose custom strategy names a
    function of test_range_list_e2e: let them import it."""
    here = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(here), str(here.parent), str(Path(shardkit.__file__).parents[1])]))


def _cli(cfg, *args):
    """`shardkit rebalance ARGS --config CFG` run in this process (tests/inproc_cli.py: exit
    status, stdout and stderr as a process's, without its ~0.6 s of imports); the killed
    movers (kill_mover_after) keep processes of their own."""
    return inproc_cli.run(["rebalance", *args, "--config", str(cfg)])


def resume(cfg, move_id):
    """`shardkit rebalance resume MOVE` (in this process), which must succeed."""
    r = _cli(cfg, "resume", str(move_id), "--grace", "0.2")
    assert r.returncode == 0, r.stderr
    return r


def _catalog_state(cluster):
    with cluster.catalog.engine.connect() as c:
        return c.execute(text("SELECT max(version) FROM shardkit_catalog.maps")).scalar()


def _shard_groups(dev):
    out = set()
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn) as c:
            out |= {r[0] for r in c.execute("SELECT DISTINCT grp FROM shardkit.slices")}
    return out


@pytest.mark.parametrize("group,table,spec,bound", [
    ("huge_r", "rl_huge_r", 'ranges = [ { to = 9223372036854775808, shard = "s0" }, '
                            '{ from = 9223372036854775808, shard = "s1" } ]', 9223372036854775808),
    ("huge_l", "rl_huge_l", 'values = { s0 = [1, -9223372036854775809], s1 = [2] }', -9223372036854775809),
])
def test_init_refuses_a_configured_bound_beyond_bigint_before_publishing_anything(world, tmp_path, group,
                                                                                  table, spec, bound):
    """A range group's bound (or a list group's value) in the config file beyond bigint's
    range, on a bigint key column: `rebalance init` published it and installed the guard,
    which compares every row of the group with the group's bounds as bigint, so every
    write of the group failed with "out of range for type bigint".  init refuses, naming
    the group, the bound and the column, and publishes nothing."""
    dev, cluster, cfg, Session = world
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY)")
    strategy = "range" if spec.startswith("ranges") else "list"
    cfg2 = tmp_path / "huge.toml"
    cfg2.write_text(cfg.read_text() + f'\n[groups.{group}]\nstrategy = "{strategy}"\n'
                    f'tables = {{ {table} = "id" }}\n{spec}\n')
    version = _catalog_state(cluster)
    r = _cli(cfg2, "init")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"group {group}" in r.stderr and str(bound) in r.stderr, r.stderr
    assert f"{table}.id" in r.stderr and "bigint" in r.stderr, r.stderr
    assert _catalog_state(cluster) == version
    assert group not in _shard_groups(dev)
    cluster.refresh_map()
    assert not [s for s in cluster.config.slices if s.group == group]


def test_status_of_an_aborted_move_says_its_copies_were_deleted(world, subprocess_path):
    """`rebalance status` of a move aborted after its copy said "(300 rows copied)": the
    abort deleted those copies and nothing moved.  It says so (the JSON alike)."""
    dev, cluster, cfg, Session = world
    with Session() as s:
        s.add_all(Event(id=i) for i in range(1000, 1800))
        s.commit()
    move_id = kill_mover_after(cluster, cfg, "copied", "--split", "events:1500", "--to", "s0")
    rebalance.abort(cluster, move_id)
    r = _cli(cfg, "status", str(move_id))
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert "rows copied" not in head, head
    assert "nothing moved" in head and "the abort deleted the copies of 300 rows" in head, head
    (m,) = json.loads(_cli(cfg, "status", str(move_id), "--json").stdout)
    assert (m["rows_copied"], m["rows_undone"]) == (0, 300), m
    assert _where(dev, "SELECT count(*) FROM rl_events")["s0"] == [(0,)]


def test_abort_of_a_switched_slice_move_says_how_to_move_the_slice_back(world, subprocess_path):
    """The refusal to abort a switched batch said "plan those buckets back": a slice
    move has no buckets to plan back.  It names the slice and the command that moves it
    back."""
    dev, cluster, cfg, Session = world
    cluster.refresh_map()
    assert cluster.shard_for(Event, 1700) == "s1"
    move_id = kill_mover_after(cluster, cfg, "switched", "--split", "events:1700", "--to", "s0")
    with pytest.raises(RebalanceError) as ei:
        rebalance.abort(cluster, move_id)
    message = str(ei.value)
    assert "bucket" not in message, message
    assert "events: [1700, 2000)" in message, message
    assert "`shardkit rebalance apply --split events:1700 --to s1`" in message, message
    r = resume(cfg, move_id)
    # It says where it goes on first, and, its batch having switched before, that it paused
    # no writes (it said "longest write pause 0 ms").
    lines = r.stdout.splitlines()
    assert lines[0] == f"move {move_id}: resuming: 0 of 1 batch finished; batch 0 (s1 -> s0) at step switched", lines
    assert lines[-1] == f"move {move_id}: done; no cut-over in this run (its batches had switched before)", lines
    cluster.refresh_map()
    assert cluster.shard_for(Event, 1700) == "s0"
    # What the message says moves the slice back.
    r = _cli(cfg, "apply", "--split", "events:1700", "--to", "s1", "--grace", "0.1")
    assert r.returncode == 0, r.stderr
    cluster.refresh_map()
    assert cluster.shard_for(Event, 1700) == cluster.shard_for(Event, 1999) == "s1"
    assert verify(cluster).ok


def test_abort_of_a_move_whose_batches_all_finished_records_it_done(world, subprocess_path):
    """A mover killed after its last batch was cleaned, before it recorded the move done:
    `abort` marked the move "aborted", though every row had moved and nothing was undone.
    Nothing can be undone, so abort records it done, as `resume` would, and says so."""
    dev, cluster, cfg, Session = world
    with Session() as s:
        s.add_all(Event(id=i) for i in range(1800, 2000))
        s.commit()
    cluster.refresh_map()
    assert cluster.shard_for(Event, 1800) == "s1"
    move_id = kill_mover_after(cluster, cfg, "cleaned", "--split", "events:1800", "--to", "s2")
    r = _cli(cfg, "abort", str(move_id))
    assert r.returncode == 0, r.stderr
    assert "aborted" not in r.stdout and "every batch had finished" in r.stdout, r.stdout
    (m,) = rebalance.move_status(cluster, move_id)
    assert m["state"] == "done" and m["batches"][0]["step"] == "cleaned", m
    assert journal_steps(cluster, move_id)[-1] == "done"
    cluster.refresh_map()
    assert cluster.shard_for(Event, 1800) == "s2"
    assert sorted(k for k, where in rows_by_key(dev.shards, "SELECT id FROM rl_events").items()
                  if where[0][0] == "s2") == list(range(1800, 2000))
    # (Not "nothing to abort" the second time either: it is done.)
    r = _cli(cfg, "abort", str(move_id))
    assert r.returncode == 2 and f"move {move_id} is done" in r.stderr, r.stderr
    assert verify(cluster).ok
    _clear(dev)


def test_a_uuid_split_key_is_taken_as_postgresql_prints_it(world):
    """tokens is a range group on a uuid column; keys compare by their text form, which
    PostgreSQL prints in lowercase.  `--split tokens:C0000000-...` split at the uppercase
    text, which sorts below every key starting with a-f: the move took keys a... and b...
    too.  The key is read as the uuid it names; what names none is refused."""
    dev, cluster, cfg, Session = world
    a, c = uuid.UUID("a0000000-0000-0000-0000-000000000001"), uuid.UUID("c0000000-0000-0000-0000-000000000001")
    with Session() as s:
        s.add_all([Token(id=a), Token(id=c)])
        s.commit()
    try:
        r = _cli(cfg, "plan", "--split", "tokens:C0000000-0000-0000-0000-000000000000", "--to", "s2", "--json")
        assert r.returncode == 0, r.stderr
        assert "c0000000-0000-0000-0000-000000000000" in {s["lower"] for s in json.loads(r.stdout)["split"]}
        r = _cli(cfg, "plan", "--split", "tokens:not-a-uuid", "--to", "s2")
        assert r.returncode == 2 and "not a uuid" in r.stderr and "rl_tokens.id" in r.stderr, r.stderr
        # A plan made by the API (or edited) with such text is refused before it moves.
        cluster.refresh_map()
        plan = plan_split_range(cluster.config.slices, "tokens", "D0000000-0000-0000-0000-000000000000", "s2")
        with pytest.raises(RebalanceError, match="d0000000-0000-0000-0000-000000000000"):
            rebalance.Mover(cluster).start(plan)
        r = _cli(cfg, "apply", "--split", "tokens:C0000000-0000-0000-0000-000000000000", "--to", "s2",
                 "--grace", "0.1")
        assert r.returncode == 0, r.stderr
        cluster.refresh_map()
        assert cluster.shard_for(Token, a) == "s1" and cluster.shard_for(Token, c) == "s2"
        placed = rows_by_key(dev.shards, "SELECT id FROM rl_tokens")
        assert placed == {a: [("s1",)], c: [("s2",)]}
        assert verify(cluster).ok
    finally:
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM rl_tokens")


def test_a_date_group_with_string_bounds_is_refused_at_plan_for_what_it_is(world, tmp_path):
    """A range group on a date column whose bounds are written as strings: `init` leaves
    its table unguarded (a string never compares with a date as PostgreSQL compares
    dates), but `plan --split` planned it and `apply` then said the table had no guard
    and to run `rebalance init`, which cannot help.  plan (and apply) refuse it saying
    why."""
    dev, cluster, cfg, Session = world
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS rl_days (day date PRIMARY KEY)")
    cfg2 = tmp_path / "days.toml"
    cfg2.write_text(cfg.read_text() + '\n[groups.days]\nstrategy = "range"\ntables = { rl_days = "day" }\n'
                    'ranges = [ { to = "2024-01-01", shard = "s0" }, { from = "2024-01-01", shard = "s1" } ]\n')
    r = _cli(cfg2, "init")
    assert r.returncode == 0, r.stderr
    for verb in ("plan", "apply"):
        r = _cli(cfg2, verb, "--split", "days:2024-06-01", "--to", "s2",
                 *(("--grace", "0.1") if verb == "apply" else ()))
        assert r.returncode == 2, (verb, r.stdout, r.stderr)
        assert "rebalance init" not in r.stderr, r.stderr
        assert "rl_days.day is date" in r.stderr and "strings" in r.stderr, r.stderr
        assert "cannot move online" in r.stderr, r.stderr
