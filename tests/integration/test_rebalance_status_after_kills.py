"""`shardkit rebalance status` after a mover or an abort was killed: an operator
reads it to choose between `resume` and `abort`, so at each kill point it must tell the step
the batches are really at, whether a process holds the move, the rows copied, and what to
run next (text, and --json's "next").

Kill points: a mover SIGKILLed after each journal step and inside a cut-over (after the
source gave its buckets up, before the catalog published); an abort SIGKILLed after it undid
a batch on its shards and before it recorded it (the batch stayed "copied" and its copies,
deleted, were counted as copied), an abort that stopped after recording one batch undone,
and one that left leftovers (`--target-lost`) and stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import shardkit
from movers import kill_mover_after, wait_for_mover_lock_release
from rebalance_world import World
from shardkit import cli, rebalance
from shardkit._rebalance_plan import plan_from_maps

pytestmark = pytest.mark.integration

BUCKETS = 16
ROWS_PER_BUCKET = 5
SCHEMA = "CREATE TABLE accounts (id bigint PRIMARY KEY, balance int NOT NULL DEFAULT 0);"
GROUPS = {"accounts": {"strategy": "hash", "tables": {"accounts": "id"}}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    """3 shards, 16 buckets on s0 and s1 (s2 owns none at first); ROWS_PER_BUCKET rows in each."""
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
    cfg_path = dev.write_config(tmp_path_factory.mktemp("rstatus") / "shardkit.toml",
                                {"groups": GROUPS, "catalog": {"url": catalog_url}})
    w = World(dev, cfg_path, catalog_url)
    w.init_with_accounts(BUCKETS, ROWS_PER_BUCKET)
    yield w


@pytest.fixture
def clean(world):
    """Finish every move a test leaves running."""
    yield world
    world.finish_running_moves()


class Stop(Exception):
    """Stands for a mover killed at a hook point."""


def _status(world: World, move_id: int, capsys: Any) -> tuple[dict[str, Any], str]:
    """`rebalance status MOVE --json` (the move) and `rebalance status MOVE` (the text)."""
    assert cli.main(["rebalance", "status", str(move_id), "--json", "-c", str(world.cfg_path)]) == 0
    out, _ = capsys.readouterr()
    [move] = json.loads(out)
    assert cli.main(["rebalance", "status", str(move_id), "-c", str(world.cfg_path)]) == 0
    text, _ = capsys.readouterr()
    return move, text


def _run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _plan(world: World, count: int = 1) -> tuple[Any, list[int]]:
    """A plan moving ``count`` buckets to s2 (1: one of s0's, or s1's when s0 has one left;
    2: one of s0's, then one of s1's: the abort tests make the second batch's source
    unreachable, which must not be s0, whose server holds the catalog)."""
    cluster = world.cluster()
    try:
        cluster.refresh_map()
        live = cluster.config.bucket_map
    finally:
        cluster.dispose()
    if count == 1:
        owners = ["s0" if list(live).count("s0") > 1 else "s1"]
    else:
        owners = ["s0", "s1"]
    buckets = [live.index(owner) for owner in owners]
    new = list(live)
    for b in buckets:
        new[b] = "s2"
    return plan_from_maps(live, new, f"{count} bucket(s) to s2"), buckets


def _stopped_after_copy(world: World, count: int = 1) -> tuple[int, list[int]]:
    """A move of ``count`` buckets to s2 (one batch each) whose mover stopped once the first
    batch had copied (the others pending); its id and buckets."""
    plan, buckets = _plan(world, count)

    class StopsAfterCopy(rebalance.Mover):
        def _catch_up(self, *a: Any, **kw: Any) -> Any:
            raise Stop("the mover died here")

    cluster = world.cluster()
    try:
        mover = StopsAfterCopy(cluster, grace=0, progress=lambda line: None)
        move_id = mover.start(plan, max_buckets=1)
        with pytest.raises(rebalance.RebalanceError):
            mover.run(move_id)
    finally:
        cluster.dispose()
    return move_id, buckets


def _rows_on(world: World, shard: str, buckets: list[int]) -> int:
    return sum(1 for (k,) in world.sql(shard, "SELECT id FROM accounts")
               if shardkit.bucket_for(k, BUCKETS) in buckets)


# `shardkit rebalance ARGS` (the CLI's main) that, on reaching OWNER.ATTR (before or after
# it runs), creates the file MARKER and sleeps until it is killed.
_HELD = r"""
import sys, time
from shardkit import cli, rebalance
from shardkit.catalog import Catalog

where, when, marker = sys.argv[1:4]
del sys.argv[1:4]
owner_name, attr = where.split(".")
owner = {"rebalance": rebalance, "Mover": rebalance.Mover, "Catalog": Catalog}[owner_name]
f = getattr(owner, attr)


def hold():
    open(marker, "w").close()
    time.sleep(3600)


def held(*a, **kw):
    if when == "before":
        hold()
    result = f(*a, **kw)
    if when == "after":
        hold()
    return result


setattr(owner, attr, held)
sys.exit(cli.main(sys.argv[1:]))
"""


def _kill_when_held(world: World, tmp: Path, where: str, when: str, move_id: int, *argv: str) -> None:
    """Run `shardkit rebalance ARGV` held at ``where`` (see _HELD), SIGKILL it there, and wait
    until the catalog lets move ``move_id`` go."""
    marker = tmp / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", _HELD, where, when, str(marker), "rebalance", *argv,
                             "--config", str(world.cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"never reached {where}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cluster = world.cluster()
    try:
        wait_for_mover_lock_release(cluster, move_id)
    finally:
        cluster.dispose()


# -- an abort killed between the undo on the shards and the catalog's record ----------------


@pytest.mark.parametrize("then", ["abort", "resume"])
def test_status_of_an_abort_killed_after_undoing_a_batch_before_recording_it(clean, tmp_path, capsys, then):
    """The abort deleted the batch's copies from s2 and gave its source the buckets back, and
    was killed before the catalog recorded the batch "aborted".  status said "copied", counted
    the deleted copies as copied, and "no mover is running it: resume goes on, abort undoes
    the batches that have not switched", as if nothing had happened.  It now says that an
    abort stopped there (its copies may be gone: not counted as copied), and that `abort`
    finishes it or `resume` captures and copies again; while the abort runs, that an abort
    (not a mover) holds the move.  Both then end the move, and status agrees."""
    world = clean
    move_id, buckets = _stopped_after_copy(world)
    cfg = str(world.cfg_path)

    seen: dict[str, Any] = {}
    marker = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", _HELD, "rebalance._undo_on_target", "after", str(marker),
                             "rebalance", "abort", str(move_id), "--config", cfg],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the abort never undid the batch"
            time.sleep(0.05)
        seen["held"] = _status(world, move_id, capsys)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cluster = world.cluster()
    try:
        wait_for_mover_lock_release(cluster, move_id)
    finally:
        cluster.dispose()

    # While the abort held the move: an abort is undoing it (not "a mover is running it").
    move, text = seen["held"]
    assert move["mover"] is True and move["aborting"] is True and move["next"] == [], move
    assert "an abort is undoing it now" in text and "a mover is running it" not in text, text

    # The copies are gone from s2 and the source owns the bucket again: the batch is undone.
    assert _rows_on(world, "s2", buckets) == 0
    assert world.sql("s0" if _rows_on(world, "s0", buckets) else "s1",
                     "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = ANY(%s)", (buckets,))[0][0] == 1

    move, text = _status(world, move_id, capsys)
    assert move["state"] == "running" and move["mover"] is False and move["aborting"] is False, move
    [batch] = move["batches"]
    # The step is the journal's (the abort recorded nothing), marked as being undone.
    assert batch["step"] == "copied" and batch["undoing"] is True, batch
    assert move["abort_stopped"] is True and move["next"] == ["abort", "resume"], move
    # Rows whose copies an abort deleted (or may have) are not copied rows.
    assert move["rows_copied"] == 0 and move["rows_undoing"] == ROWS_PER_BUCKET, move
    assert f"running - {move['reason']} (0 rows copied; an abort began to delete the copies of 5 rows " \
           "(they may be gone))" in text, text
    assert "an abort stopped before it finished" in text, text
    assert f"`shardkit rebalance abort {move_id}` finishes the abort" in text, text
    assert f"`shardkit rebalance resume {move_id}` goes on" in text, text
    assert "an abort began to undo it and stopped" in text, text
    assert "undoes the batches that have not switched" not in text, text

    if then == "abort":
        rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", cfg)
        assert rc == 0, (out, err)
        move, text = _status(world, move_id, capsys)
        assert move["state"] == "aborted" and move["next"] == [], move
        assert (move["rows_copied"], move["rows_undone"], move["rows_undoing"]) == (0, ROWS_PER_BUCKET, 0), move
        assert move["batches"][0]["step"] == "aborted" and not move["batches"][0]["undoing"], move
        assert "nothing moved; the abort deleted the copies of 5 rows" in text, text
    else:
        rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0", "-c", cfg)
        assert rc == 0, (out, err)
        move, text = _status(world, move_id, capsys)
        assert move["state"] == "done" and move["next"] == [], move
        assert (move["rows_copied"], move["rows_undoing"]) == (ROWS_PER_BUCKET, 0), move
        assert move["batches"][0]["step"] == "cleaned" and not move["batches"][0]["undoing"], move
        assert _rows_on(world, "s2", buckets) == ROWS_PER_BUCKET
        assert "began to undo" not in text, text
    rc, out, err = _run_cli(capsys, "verify", "-c", cfg)
    assert rc == 0, out


def test_status_of_an_abort_that_stopped_after_recording_a_batch_undone(clean, tmp_path, capsys):
    """An abort undid and recorded batch 0, then could not reach batch 1's source: the move
    stays running, no process holds it.  status names that an abort stopped half-way and
    both ways on (`abort` finishes it; `resume` copies batch 0 again), not only "no mover"."""
    world = clean
    move_id, buckets = _stopped_after_copy(world, 2)
    text = world.cfg_path.read_text(encoding="utf-8")
    cluster = world.cluster()
    try:
        sources = [b["source"] for b in rebalance.move_status(cluster, move_id)[0]["batches"]]
    finally:
        cluster.dispose()
    assert sources == ["s0", "s1"], sources
    # Batch 1's source on a port nobody listens on, for the abort.
    url = next(s for s in world.dev.shards if s.name == sources[1]).primary.url
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    dead = tmp_path / "dead.toml"
    dead.write_text(text.replace(url, url.replace(host_port, host_port.rsplit(":", 1)[0] + ":1")), encoding="utf-8")
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", str(dead))
    assert rc == 2 and "batches [0] are undone already" in err, (out, err)

    move, text = _status(world, move_id, capsys)
    assert [b["step"] for b in move["batches"]] == ["aborted", "pending"], move
    assert move["mover"] is False and move["abort_stopped"] is True and move["next"] == ["abort", "resume"], move
    assert (move["rows_copied"], move["rows_undone"]) == (0, ROWS_PER_BUCKET), move
    assert "(0 rows copied; an abort deleted the copies of 5 rows)" in text, text
    assert "an abort stopped before it finished" in text, text
    assert f"`shardkit rebalance abort {move_id}` finishes the abort" in text, text


def test_status_of_a_target_lost_abort_that_stopped_names_abort_not_resume(clean, tmp_path, capsys):
    """`abort --target-lost` left batch 0's copies on an unreachable s2 and then could not reach
    batch 1's source: `resume` is refused (finish the abort), so status must not say that
    `resume` goes on."""
    world = clean
    move_id, buckets = _stopped_after_copy(world, 2)
    cluster = world.cluster()
    try:
        sources = [b["source"] for b in rebalance.move_status(cluster, move_id)[0]["batches"]]
    finally:
        cluster.dispose()
    assert sources == ["s0", "s1"], sources
    text = world.cfg_path.read_text(encoding="utf-8")
    for shard in {"s2", sources[1]}:
        url = next(s for s in world.dev.shards if s.name == shard).primary.url
        host_port = url.split("@", 1)[1].split("/", 1)[0]
        text = text.replace(url, url.replace(host_port, host_port.rsplit(":", 1)[0] + ":1"))
    dead = tmp_path / "dead.toml"
    dead.write_text(text, encoding="utf-8")
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "--target-lost", "-c", str(dead))
    assert rc == 2, (out, err)

    move, text = _status(world, move_id, capsys)
    assert [b["step"] for b in move["batches"]] == ["leftovers", "pending"], move
    assert move["state"] == "running" and move["next"] == ["abort"], move
    assert f"`shardkit rebalance abort {move_id}` finishes the abort" in text, text
    assert "goes on" not in text and "is refused" in text, text
    # What status says: resume is refused.
    rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0", "-c", str(world.cfg_path))
    assert rc == 2 and "to finish the abort" in err, (out, err)


# -- a mover killed at each step ----------------------------------------------------------


@pytest.mark.parametrize("step", ["capturing", "copied", "switched", "verified", "cleaned"])
def test_status_of_a_mover_killed_after_each_step(clean, tmp_path, capsys, step):
    """A mover SIGKILLed after each journal step of its one batch: status shows the step, no
    process holding the move, the rows copied, and a hint that is true: `abort` is refused
    once the batch has switched (it said "abort undoes the batches that have not switched"
    as for the others), and once every batch finished both record the move done."""
    world = clean
    plan, buckets = _plan(world)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.as_dict()), encoding="utf-8")
    cluster = world.cluster()
    try:
        move_id = kill_mover_after(cluster, world.cfg_path, step, "--plan", str(plan_file))
    finally:
        cluster.dispose()
    move, text = _status(world, move_id, capsys)
    assert move["state"] == "running" and move["mover"] is False and move["aborting"] is False, move
    assert [b["step"] for b in move["batches"]] == [step], move
    assert move["abort_stopped"] is False and not move["batches"][0]["undoing"], move
    assert move["rows_copied"] == (0 if step == "capturing" else ROWS_PER_BUCKET), move
    assert "no mover is running it" in text, text
    assert f"`shardkit rebalance resume {move_id}` goes on" in text or step == "cleaned", text
    if step in ("switched", "verified"):
        assert move["next"] == ["resume"], move
        assert f"`shardkit rebalance abort {move_id}` is refused while batch 0 switched" in text, text
        # As status says.
        rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", str(world.cfg_path))
        assert rc == 2 and "has switched" in err, (out, err)
    elif step == "cleaned":
        assert move["next"] == ["resume", "abort"], move
        assert "every batch finished" in text and f"`shardkit rebalance resume {move_id}` records it done" in text
    else:
        assert move["next"] == ["resume", "abort"], move
        assert "undoes the batches that have not switched" in text and "cut-over" not in text, text
    rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0", "-c", str(world.cfg_path))
    assert rc == 0, (out, err)
    move, text = _status(world, move_id, capsys)
    assert move["state"] == "done" and move["next"] == [] and move["rows_copied"] == ROWS_PER_BUCKET, move
    assert "no mover" not in text, text


def test_status_of_a_mover_killed_inside_a_cut_over(clean, tmp_path, capsys):
    """A mover SIGKILLed after the source gave the buckets up and before the catalog published:
    the batch is recorded "copied", yet it has switched on the shards and `abort` is refused.
    status says that a cut-over began and stopped, so it may have switched."""
    world = clean
    plan, buckets = _plan(world)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.as_dict()), encoding="utf-8")
    cluster = world.cluster()
    try:
        before = max([m["move"] for m in rebalance.move_status(cluster)] or [0])
    finally:
        cluster.dispose()
    _kill_when_held(world, tmp_path, "Catalog.publish_map", "before", before + 1,
                    "apply", "--plan", str(plan_file), "--grace", "0")
    move_id = before + 1
    move, text = _status(world, move_id, capsys)
    assert move["state"] == "running" and move["mover"] is False, move
    [batch] = move["batches"]
    assert batch["step"] == "copied" and batch["cutting_over"] is True and not batch["undoing"], move
    assert "a cut-over began and stopped: it may have switched" in text, text
    assert "if it switched" in text and "is refused" in text, text
    # As status warns: the source gave the buckets up, abort is refused; resume finishes it.
    rc, out, err = _run_cli(capsys, "rebalance", "abort", str(move_id), "-c", str(world.cfg_path))
    assert rc == 2 and "has switched" in err, (out, err)
    rc, out, err = _run_cli(capsys, "rebalance", "resume", str(move_id), "--grace", "0", "-c", str(world.cfg_path))
    assert rc == 0, (out, err)
    move, text = _status(world, move_id, capsys)
    assert move["state"] == "done" and not move["batches"][0]["cutting_over"], move
    assert "cut-over" not in text, text
