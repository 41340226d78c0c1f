"""Online rebalancing (plan/apply/status/resume/abort, verify): defects an operator
meets while a move is half-done, and in the wording of the commands' output."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import psycopg
import pytest

import shardkit
from shardkit import cli, rebalance
from shardkit._rebalance_plan import plan_from_maps
from rebalance_world import World
from test_rebalance_crashes import HookedMover as CrashHookedMover

pytestmark = pytest.mark.integration

BUCKETS = 16
ROWS_PER_BUCKET = 10

SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, balance int NOT NULL DEFAULT 0);
CREATE TABLE people (name text PRIMARY KEY, note text NOT NULL DEFAULT '');
CREATE TABLE stores (id bigint PRIMARY KEY, region text NOT NULL);
CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL);
"""
GROUPS = {"groups": {
    "accounts": {"strategy": "hash", "tables": {"accounts": "id"}},
    "people": {"strategy": "range", "tables": {"people": "name"},
               "ranges": [{"to": "m", "shard": "s0"}, {"from": "m", "shard": "s1"}]},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"},
    "events": {"strategy": "range", "tables": {"events": "at"},
               "ranges": [{"to": datetime(2024, 1, 1, tzinfo=timezone.utc), "shard": "s0"},
                          {"from": datetime(2024, 1, 1, tzinfo=timezone.utc), "shard": "s1"}]},
}}
EVENTS_TOML = """
[groups.events]
strategy = "range"
tables = { events = "at" }
ranges = [{ to = 2024-01-01T00:00:00Z, shard = "s0" }, { from = 2024-01-01T00:00:00Z, shard = "s1" }]
"""


class Stop(Exception):
    """Stands for the mover being killed at a hook point."""


def _noop(line: str) -> None:
    pass


class HookedMover(CrashHookedMover):
    """The crash tests' mover (hooks ``after_copy``, ``before_cut_over``, ``before_verify``),
    also calling ``hooks["batch N"]()`` as batch N starts."""

    def _run_batch(self, move_id, batch, *a, **kw):
        self._fire(f"batch {batch}")
        return super()._run_batch(move_id, batch, *a, **kw)


def _stop():
    raise Stop()


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    """3 shards, 16 buckets; s0 and s1 own them (s2 none); ROWS_PER_BUCKET rows in each bucket."""
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)
    catalog_url = dev.create_catalog()
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(SCHEMA)
    two = {**dev.config_dict(), **GROUPS, "catalog": {"url": catalog_url}}
    two["shards"] = two["shards"][:2]
    c2 = shardkit.Cluster.from_config(two, follow_map=False)
    rebalance.init(c2)
    c2.dispose()
    # (devcluster's TOML writer takes no date-time: the events group is written by hand.)
    plain = {g: v for g, v in GROUPS["groups"].items() if g != "events"}
    cfg_path = dev.write_config(tmp_path_factory.mktemp("rebal5b") / "shardkit.toml",
                                {"groups": plain, "catalog": {"url": catalog_url}})
    cfg_path.write_text(cfg_path.read_text() + EVENTS_TOML, encoding="utf-8")
    w = World(dev, cfg_path, catalog_url)
    w.init_with_accounts(BUCKETS, ROWS_PER_BUCKET)
    yield w


@pytest.fixture
def clean(world):
    """Abort every move a test leaves running."""
    yield world
    world.finish_running_moves()


def _one_bucket_plan(cluster, bucket: int, target: str):
    live = cluster.config.bucket_map
    new = list(live)
    new[bucket] = target
    return plan_from_maps(live, tuple(new), f"test: bucket {bucket} to {target}")


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- 1. plan --even while a move is half-done ------------------------------------------------


@pytest.mark.parametrize("hook", ["after_copy", "before_verify"])
def test_plan_even_counts_rows_of_a_moving_bucket_once(clean, capsys, hook):
    world = clean
    cluster = world.cluster()
    try:
        bucket = cluster.config.bucket_map.index("s0")
        mover = HookedMover(cluster, hooks={hook: _stop})
        move_id = mover.start(_one_bucket_plan(cluster, bucket, "s2"))
        with pytest.raises(rebalance.RebalanceError, match="Stop"):
            mover.run(move_id)
    finally:
        cluster.dispose()
    # The bucket's rows are on both shards now (copied, not yet deleted from the source).
    assert world.sql("s2", "SELECT count(*) FROM accounts")[0][0] == ROWS_PER_BUCKET
    rc, out, err = _run_cli(capsys, "rebalance", "plan", "--even", "rows", "--json",
                            "-c", str(world.cfg_path))
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["weights"][bucket] == ROWS_PER_BUCKET
    assert sum(plan["old_weights"].values()) == BUCKETS * ROWS_PER_BUCKET



# -- 2. the map while a move cuts over ---------------------------------------------------------


def test_map_changes_during_a_cut_over_are_refused(clean, capsys, tmp_path):
    """Not a defect: during a batch's cut-over another plan of its buckets, a hand-edited
    map of them and `rebalance init` are each refused, saying which move holds them; a plan
    of other buckets made before the switch is refused after it as made against an old map."""
    world = clean
    cluster = world.cluster()
    live = cluster.config.bucket_map
    bucket = live.index("s0")
    other = live.index("s1")
    overlapping = tmp_path / "overlap.json"
    hand = list(live)
    hand[bucket] = "s1"
    overlapping.write_text(json.dumps(plan_from_maps(live, hand, "hand-edited").as_dict()))
    elsewhere = tmp_path / "elsewhere.json"
    hand = list(live)
    hand[other] = "s2"
    elsewhere.write_text(json.dumps(plan_from_maps(live, hand, "hand-edited").as_dict()))
    seen = {}

    def during_cut_over():
        cfg = str(world.cfg_path)
        seen["overlap"] = _run_cli(capsys, "rebalance", "apply", "--plan", str(overlapping), "-c", cfg)
        seen["init"] = _run_cli(capsys, "rebalance", "init", "-c", cfg)

    try:
        mover = HookedMover(cluster, hooks={"before_cut_over": during_cut_over})
        mover.apply(_one_bucket_plan(cluster, bucket, "s2"))
    finally:
        cluster.dispose()
    rc, _, err = seen["overlap"]
    assert rc == 2 and "is still running on buckets" in err and "abort it first" in err
    rc, _, err = seen["init"]
    assert rc == 2 and "is running; init resets each shard's ownership" in err
    rc, _, err = _run_cli(capsys, "rebalance", "apply", "--plan", str(elsewhere), "-c", str(world.cfg_path))
    assert rc == 2 and "was planned against another map than the live one" in err


# -- 3. progress of a resumed move -------------------------------------------------------------


def test_eta_of_a_resumed_move_counts_only_the_batches_it_runs(clean):
    """Resuming a move whose first batch had finished: the ETA after the next batch is the
    time that batch took times the batches left, not shrunk by the finished one (which took
    no time in this run)."""
    world = clean
    cluster = world.cluster()
    try:
        live = cluster.config.bucket_map
        buckets = [b for b, s in enumerate(live) if s == "s0"][:3]
        new = list(live)
        for b in buckets:
            new[b] = "s2"
        plan = plan_from_maps(live, new, "three buckets to s2")
        mover = HookedMover(cluster, hooks={"batch 1": _stop})
        move_id = mover.start(plan, max_buckets=1)
        with pytest.raises(rebalance.RebalanceError, match="Stop"):
            mover.run(move_id)
        lines = []
        # Each recorded step sleeps step_delay: a batch takes over a second.
        rebalance.Mover(cluster, grace=0, step_delay=0.25, progress=lines.append).run(move_id)
    finally:
        cluster.dispose()
    done = [re.search(r"batch (\d+)/(\d+) done .* elapsed ([\d.]+)s, ETA ([\d.]+)s", x) for x in lines]
    done = [m.groups() for m in done if m]
    assert [(a, b) for a, b, _, _ in done] == [("2", "3"), ("3", "3")]
    elapsed, eta = float(done[0][2]), float(done[0][3])
    # One batch ran in this run and one is left: about as long again (printed to 0.1 s).
    assert eta >= 0.75 * elapsed, lines


# -- 4. verify's wording of ownership problems -------------------------------------------------


def test_verify_names_a_slice_it_finds_unowned_as_a_slice_of_its_group(clean, capsys):
    """A range group's slice the map gives s0 that s0 does not own is reported as that slice
    (its number, group and keys), not as "1 buckets" numbered 1073741824."""
    world = clean
    cluster = world.cluster()
    try:
        people = next(s for s in cluster.config.slices if s.group == "people" and s.shard == "s0")
        bucket = cluster.config.bucket_map.index("s0")
    finally:
        cluster.dispose()
    world.sql("s0", "DELETE FROM shardkit.owned_buckets WHERE bucket = ANY(%s)", ([people.id, bucket],))
    try:
        rc, out, err = _run_cli(capsys, "verify", "-c", str(world.cfg_path))
    finally:
        world.sql("s0", "INSERT INTO shardkit.owned_buckets VALUES (%s), (%s)", (people.id, bucket))
    assert rc == 1, err
    problems = [line for line in out.splitlines() if line.startswith("ownership:")]
    assert problems == [
        f"ownership: s0 does not own 1 bucket the map gives it: {bucket}",
        f"ownership: s0 does not own 1 slice the map gives it: {people.id} (people: [-inf, 'm'))",
    ], out
