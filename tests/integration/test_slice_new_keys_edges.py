"""Edges of a catalog-routed range or list group gaining keys (`rebalance apply --split` of a
key in a gap, `--move-value` of a value no slice lists): a move without batches.

- A shard of the config without the ownership guard (added after `rebalance init`) has no
  copy of the slices: the move wrote the new slices on every shard and stopped there,
  running, with `resume` and `abort` failing on the same missing table (and `init` refused
  while a move runs).  It is refused before the move starts, naming `rebalance init`.
- A mover stopped before the catalog published the new slices: `rebalance status` said
  "every batch finished ... abort: nothing is left to undo", while abort takes the new slice
  back off the shards (the move ends aborted); status now tells published from not
  (`--json`: "split_published"), and resume's last line no longer speaks of batches.

The new-keys module's world: one module-scoped dev cluster (3 shards); each test makes its own
world (fresh databases).
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest

from shardkit import rebalance
from shardkit._rebalance_plan import plan_split_range

import movers
from test_slice_new_keys import CODES, SCHEMA, SPANS, World, dev, world  # noqa: F401 - dev, world: fixtures

pytestmark = pytest.mark.integration


def _add_unguarded_shard(world: World) -> None:
    """Shard s3 in the config: a database with the group's tables, on s0's server, made after
    `rebalance init` (no ownership guard, no copy of the slices)."""
    db3 = world.db + "_s3"
    server = world.dev.shards[0].primary
    with server.connect(dbname="postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db3}")
    with server.connect(dbname=db3, autocommit=True) as c:
        c.execute(SCHEMA)
    config = world.cfg.read_text()
    url = tomllib.loads(config)["shards"][0]["primary"].rsplit("/", 1)[0] + "/" + db3
    world.cfg.write_text(config.replace("[catalog]", f'[[shards]]\nname = "s3"\nprimary = "{url}"\n\n[catalog]', 1))


@pytest.mark.parametrize("option, spec, to", [("--split", "spans:150", "s3"), ("--move-value", "codes:zz", "s2")])
def test_a_shard_without_the_guard_refuses_new_keys_before_a_move_starts(world, option, spec, to):
    """The move writes the group's new slices on every shard: one without the guard (to the
    new shard, or to another one) left it running with 'relation "shardkit.slices" does not
    exist', and abort failed the same way.  Refused first, nothing started; after `init`
    it goes through."""
    _add_unguarded_shard(world)
    before = world.version()
    r = world.cli("rebalance", "apply", option, spec, "--to", to, "--grace", "0")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "s3 has no ownership guard" in r.stderr and "`shardkit rebalance init`" in r.stderr, r.stderr
    assert "UndefinedTable" not in r.stderr and "nothing was started" in r.stderr, r.stderr
    assert rebalance.move_status(world.cluster(follow_map=False)) == []
    assert world.version() == before
    r = world.cli("rebalance", "init")
    assert r.returncode == 0, r.stderr
    r = world.cli("rebalance", "apply", option, spec, "--to", to, "--grace", "0")
    assert r.returncode == 0, (r.stdout, r.stderr)
    key = spec.split(":", 1)[1]
    r = world.cli("route", "nk_spans" if option == "--split" else "nk_codes", key)
    assert r.returncode == 0 and f"-> shard {to} " in r.stdout, (r.stdout, r.stderr)


def _stopped_before_publishing(world: World, monkeypatch: Any, plan: Any) -> int:
    """Run ``plan`` and stop its mover (an exception, as a kill would) once the new slice's
    shard has the new slices and its ownership, before the others and the catalog."""
    real = rebalance.write_slices
    calls = []

    def write_then_stop(*a: Any, **kw: Any) -> None:
        real(*a, **kw)
        calls.append(1)
        if len(calls) == 2:   # (the first shard written, the new slice's, has committed)
            raise RuntimeError("the mover stopped")

    monkeypatch.setattr(rebalance, "write_slices", write_then_stop)
    cluster = world.cluster(follow_map=False)
    with pytest.raises(RuntimeError, match="the mover stopped"):
        rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(plan)
    monkeypatch.setattr(rebalance, "write_slices", real)
    (m,) = rebalance.move_status(cluster)
    assert m["state"] == "running" and m["batches"] == [] and not m["mover"]
    return m["move"]


@pytest.mark.parametrize("then", ["abort", "resume"])
def test_status_of_a_new_keys_move_stopped_before_publishing(world, monkeypatch, then):
    current = world.cluster(follow_map=False).catalog.current_map()
    move = _stopped_before_publishing(world, monkeypatch, plan_split_range(current.slices, "spans", 150, "s2"))
    assert world.version() == current.version
    r = world.cli("rebalance", "status", str(move))
    assert "nothing is left to undo" not in r.stdout and "every batch finished" not in r.stdout, r.stdout
    assert "before the catalog published its new slices" in r.stdout, r.stdout
    assert "takes them back off the shards" in r.stdout, r.stdout
    (m,) = json.loads(world.cli("rebalance", "status", str(move), "--json").stdout)
    assert m["split_published"] is False and m["next"] == ["resume", "abort"], m
    r = world.cli("rebalance", then, str(move), *(("--grace", "0") if then == "resume" else ()))
    assert r.returncode == 0, (r.stdout, r.stderr)
    (m,) = rebalance.move_status(world.cluster(follow_map=False), move)
    if then == "abort":
        assert m["state"] == "aborted" and m["split_published"] is False, m
        assert world.version() == current.version
        # (It said "batches undone [], already finished []".)
        assert r.stdout.strip() == (f"move {move} aborted: nothing had moved; its new slices, not published, "
                                    "were taken back off the shards"), r.stdout
    else:
        assert m["state"] == "done" and m["split_published"] is True, m
        assert "its new slices are published (nothing moves)" in r.stdout, r.stdout
        assert "batches had switched" not in r.stdout, r.stdout
        assert world.cluster(follow_map=False).shard_for(SPANS, 150) == "s2"
    world.guards_match_the_catalog("spans")


def test_status_of_a_new_keys_move_killed_after_publishing(world):
    cluster = world.cluster(follow_map=False)
    move = movers.kill_mover_after(cluster, world.cfg, "split", "--move-value", "codes:zz", "--to", "s2")
    (m,) = json.loads(world.cli("rebalance", "status", str(move), "--json").stdout)
    assert m["split_published"] is True and m["batches"] == [], m
    r = world.cli("rebalance", "status", str(move))
    assert "the catalog published its new slices" in r.stdout and "nothing is left to undo" in r.stdout, r.stdout
    r = world.cli("rebalance", "resume", str(move), "--grace", "0")
    assert r.returncode == 0 and "its new slices are published (nothing moves)" in r.stdout, (r.stdout, r.stderr)
    world.guards_match_the_catalog("codes")
    assert world.cluster(follow_map=False).shard_for(CODES, "zz") == "s2"
    assert rebalance.move_status(cluster, move)[0]["state"] == "done"


def test_a_plan_that_moves_without_splitting_has_no_split_published(world):
    r = world.cli("rebalance", "apply", "--split", "spans:200", "--to", "s2", "--grace", "0")
    assert r.returncode == 0, (r.stdout, r.stderr)
    (m,) = rebalance.move_status(world.cluster(follow_map=False))
    assert m["split_published"] is None and m["state"] == "done", m
