"""Online rebalancing and verify as a demanding operator runs them: abort and resume at
awkward points, and what the commands print and exit with."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

import shardkit
from shardkit import cli, rebalance
from shardkit._rebalance_plan import plan_from_maps
from rebalance_world import World
from test_rebalance_crashes import HookedMover

pytestmark = pytest.mark.integration

BUCKETS = 8
ROWS_PER_BUCKET = 5

SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, balance int NOT NULL DEFAULT 0);
CREATE TABLE stores (id bigint PRIMARY KEY, region text NOT NULL);
CREATE TABLE events (id bigint PRIMARY KEY);
"""
GROUPS = {
    "accounts": {"strategy": "hash", "tables": {"accounts": "id"}},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"},
    # Bounded at the top: keys from 2000 on have no shard.
    "events": {"strategy": "range", "tables": {"events": "id"},
               "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "to": 2000, "shard": "s1"}]},
}


class Stop(Exception):
    """Stands for the mover being killed at a hook point."""


def _stop():
    raise Stop()


def _noop(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    """3 shards, 8 buckets on s0 and s1 (s2 owns none); ROWS_PER_BUCKET rows in each."""
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)
    catalog_url = dev.create_catalog()
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(SCHEMA)
    two = {**dev.config_dict(), "groups": GROUPS, "catalog": {"url": catalog_url}}
    two["shards"] = two["shards"][:2]
    c2 = shardkit.Cluster.from_config(two, follow_map=False)
    rebalance.init(c2)
    c2.dispose()
    cfg_path = dev.write_config(tmp_path_factory.mktemp("rebal7b") / "shardkit.toml",
                                {"groups": GROUPS, "catalog": {"url": catalog_url}})
    w = World(dev, cfg_path, catalog_url)
    w.init_with_accounts(BUCKETS, ROWS_PER_BUCKET)
    yield w


@pytest.fixture
def clean(world):
    """Abort every move a test leaves running."""
    yield world
    world.finish_running_moves()


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _config_with_dead_shard(world: World, tmp_path: Path, *shards: str) -> Path:
    """The world's config with each of ``shards``' primary on a port nobody listens on."""
    text = world.cfg_path.read_text(encoding="utf-8")
    for shard in shards:
        url = next(s for s in world.dev.shards if s.name == shard).primary.url
        host_port = url.split("@", 1)[1].split("/", 1)[0]
        host = host_port.rsplit(":", 1)[0]
        text = text.replace(url, url.replace(host_port, f"{host}:1"))
    out = tmp_path / "dead.toml"
    out.write_text(text, encoding="utf-8")
    return out


# -- 1. resume after an abort that stopped half-way ---------------------------------------------


def _two_batches_stopped_after_copy(world: World) -> tuple[int, int, int]:
    """A move of one bucket of s0 (batch 0) and one of s1 (batch 1) to s2, stopped once
    batch 0 has copied; (move id, the two buckets)."""
    cluster = world.cluster()
    try:
        live = cluster.config.bucket_map
        b0, b1 = live.index("s0"), live.index("s1")
        new = list(live)
        new[b0] = new[b1] = "s2"
        mover = HookedMover(cluster, hooks={"after_copy": _stop})
        move_id = mover.start(plan_from_maps(live, new, "two buckets to s2"))
        with pytest.raises(rebalance.RebalanceError, match="Stop"):
            mover.run(move_id)
    finally:
        cluster.dispose()
    return move_id, b0, b1


def test_resume_after_an_abort_that_stopped_half_way(clean, tmp_path, capsys):
    """An abort undid batch 0, then could not reach batch 1's source: the move stays running,
    as the abort said, with batch 0 at step "aborted".  `resume` then must not crash on that
    step (it was `ValueError: tuple.index(x): x not in tuple`); it finishes the move, every
    batch moved."""
    world = clean
    move_id, b0, b1 = _two_batches_stopped_after_copy(world)
    dead = _config_with_dead_shard(world, tmp_path, "s1")
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", str(dead))
    assert rc == 2 and "cannot reach s1" in err and "batches [0] are undone already" in err, (out, err)
    steps = world.catalog_sql("SELECT batch, step FROM shardkit_catalog.move_batches "
                              "WHERE move_id = %s ORDER BY batch", (move_id,))
    assert steps == [(0, "aborted"), (1, "pending")]
    rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0",
                            "-c", str(world.cfg_path))
    assert rc == 0, (out, err)
    assert "ValueError" not in out + err
    cluster = world.cluster()
    try:
        cluster.refresh_map()
        assert cluster.config.bucket_map[b0] == cluster.config.bucket_map[b1] == "s2"
    finally:
        cluster.dispose()
    assert world.sql("s2", "SELECT count(*) FROM accounts")[0][0] == 2 * ROWS_PER_BUCKET
    rc, out, err = _run_cli(capsys, "verify", "-c", str(world.cfg_path))
    assert rc == 0, out




# -- 2. --split KEY --lower at the top of a bounded range ----------------------------------------


def test_split_lower_at_the_end_of_the_last_bounded_range(clean, capsys):
    """`--split events:2000 --lower --to s2` moves the keys below 2000 (down to the start of
    the range ending there), as README says; with no range above 2000 (the config's ranges
    end there) it was refused: "no range of group 'events' holds 2000"."""
    world = clean
    cfg = str(world.cfg_path)
    world.sql("s0", "INSERT INTO events VALUES (999)")
    world.sql("s1", "INSERT INTO events VALUES (1000), (1999)")
    rc, out, err = _run_cli(capsys, "rebalance", "plan", "--split", "events:2000", "--lower", "--to", "s2",
                            "-c", cfg)
    assert rc == 0, err
    assert "events: [1000, 2000)  s1      -> s2" in out, out
    rc, out, err = _run_cli(capsys, "rebalance", "apply", "--split", "events:2000", "--lower", "--to", "s2",
                            "--grace", "0", "-c", cfg)
    assert rc == 0, err
    assert sorted(r[0] for r in world.sql("s2", "SELECT id FROM events")) == [1000, 1999]
    assert world.sql("s1", "SELECT count(*) FROM events")[0][0] == 0
    rc, out, err = _run_cli(capsys, "verify", "-c", cfg)
    assert rc == 0, out
    # Above the last range there is nothing to split or move: the keys no range held (from
    # 2000 up) become a new range on s0 (nothing moves).
    rc, out, err = _run_cli(capsys, "rebalance", "plan", "--split", "events:2000", "--to", "s0", "-c", cfg)
    assert rc == 0 and "New slice" in out and "events: [2000, +inf) on s0" in out, (out, err)



def test_resume_after_a_target_lost_abort_that_stopped_half_way(clean, tmp_path, capsys):
    """`abort --target-lost` left batch 0's copies on s2 (unreachable) and then could not reach
    batch 1's source: `resume` is refused, naming the abort to finish (it does not copy onto
    the leftovers, nor crash on the step); `abort` once the shards are back finishes it."""
    world = clean
    move_id, b0, _ = _two_batches_stopped_after_copy(world)
    dead = _config_with_dead_shard(world, tmp_path, "s1", "s2")
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "--target-lost", "-c", str(dead))
    assert rc == 2 and "cannot reach s1" in err, (out, err)
    steps = world.catalog_sql("SELECT batch, step FROM shardkit_catalog.move_batches "
                              "WHERE move_id = %s ORDER BY batch", (move_id,))
    assert steps == [(0, "leftovers"), (1, "pending")]
    rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0",
                            "-c", str(world.cfg_path))
    assert rc == 2, (out, err)
    assert f"run `shardkit rebalance abort {move_id}` to finish the abort" in err, err
    assert "ValueError" not in err
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", str(world.cfg_path))
    assert rc == 0, err
    # (The copies of batch 0's bucket are gone from s2.)
    assert not [k for (k,) in world.sql("s2", "SELECT id FROM accounts") if shardkit.bucket_for(k, BUCKETS) == b0]
    # status: an error kept is the run's before the abort, not a failure of the abort.
    world.catalog_sql("UPDATE shardkit_catalog.moves SET error = 'connection lost' WHERE id = %s", (move_id,))
    rc, out, err = _run_cli(capsys, "rebalance", "status", str(move_id), "-c", str(world.cfg_path))
    assert rc == 0 and f"move {move_id}: aborted" in out, (out, err)
    assert "\n  error:" not in out and "\n  error of the run before the abort: connection lost" in out, out
    rc, out, err = _run_cli(capsys, "verify", "-c", str(world.cfg_path))
    assert rc == 0, out
