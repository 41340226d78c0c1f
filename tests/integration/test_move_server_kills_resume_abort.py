"""Servers killed where test_move_server_kills.py does not kill them: during
`shardkit rebalance resume` and `shardkit rebalance abort` (the catalog dying in the middle
of an abort among them), an abort whose catalog session a restart took (its lock on the
move went with it), and `shardkit verify` / `shardkit rebalance status` while a shard or
the catalog is down.

The worlds, writers, ledger and checks are that module's (imported, not copied).

CI runs a few fixed seeds; ``SHARDKIT_SERVER_KILL2_SEEDS=N`` runs N more (seeds 5000 to
5000+N-1; ``SHARDKIT_SERVER_KILL2_SEED=S``: the one seed S).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import test_move_server_kills as ks
from sqlalchemy import text as text_
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.catalog import MOVER_LOCK_CLASS, Catalog
from shardkit.verify import verify

pytestmark = pytest.mark.integration

servers = ks.servers  # (the module's own cluster of three servers: s0, s1, the catalog's)


# -- servers killed during `resume` and `abort` --------------------------------------------

# The `rebalance` command of the first module, which also marks the parts of an abort.
_EXTRA = r"""
wrap(rebalance, "_undo_on_target", "undo target")
wrap(rebalance, "_moved_tables", "tables")
if "abort" in sys.argv:
    wrap(Catalog, "record", "record", static=True)
"""
_PHASED2 = ks._PHASED.replace('mark("start")\n', _EXTRA + 'mark("start")\n', 1)
assert _PHASED2 != ks._PHASED
ABORT_PHASES = ["undo target", "tables", "record", "after undo target", "after record"]


def _proc(w: ks.World, *args: str, rest: float = 0.0) -> ks.Proc:
    return ks.Proc(w, *args, rest=rest, script=_PHASED2)


def _stopped_move(w: ks.World, rnd: random.Random, plan_path: Path, rest: float) -> int | None:
    """A move whose mover was SIGKILLed at a random moment (the move stays running)."""
    mover = _proc(w, "apply", "--plan", str(plan_path), "--batch-buckets", str(rnd.choice([2, 4])),
                  "--grace", "0", rest=rest)
    phase = rnd.choice(["copy", "catch-up", "cut-over", "publish", "verify", "after copy"])
    t0 = time.monotonic()
    while mover.p.poll() is None and phase not in mover.phase():
        assert time.monotonic() < t0 + 120, f"the mover never reached {phase}"
        time.sleep(0.002)
    time.sleep(rnd.uniform(0, rest))
    w.say(f"mover SIGKILLed in {mover.phase()!r}")
    mover.p.kill()
    mover.wait()
    move_id = ks._latest_move(w)
    assert move_id is not None, (mover.output, w.text())
    ks._wait_for_lock_release(w, move_id)
    return move_id


def _check_abort_failure(w: ks.World, kill: ks.Kill, rc: int, proc: ks.Proc, move_id: int) -> None:
    """An abort that met a dead server stops with one clear line naming it and saying what
    to run once it is back."""
    err = proc.stderr
    assert "Traceback" not in err, f"{err}\n{w.text()}"
    assert ks.PASSWORD not in proc.output, f"{proc.output}\n{w.text()}"
    if rc == 0:
        return
    assert rc == 2, f"rc {rc}: {err}\n{w.text()}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"{err}\n{w.text()}"
    message = lines[0]
    if "has switched" in message:
        return  # (refused before it undid anything: the status marks the cut-over)
    if kill.victim == "catalog":
        assert "the catalog" in message, f"the error does not name the catalog: {message}\n{w.text()}"
    else:
        assert kill.node.shard in message and str(kill.node.port) in message, (
            f"the error does not name {kill.node.shard}, the {kill.victim}: {message}\n{w.text()}")
    assert f"shardkit rebalance abort {move_id}`" in message, (
        f"the error does not say how to go on: {message}\n{w.text()}")


def run_episode(dev: Any, tmp: Path, seed: int) -> None:
    w = ks._make_world(dev, tmp / f"ep{seed}", f"ks2e{seed}")
    try:
        _episode(w, random.Random(seed), seed)
    finally:
        print(w.text(), flush=True)  # (shown with -s)
        ks._drop_world(w)


def _episode(w: ks.World, rnd: random.Random, seed: int) -> None:
    admin = w.cluster()
    app = w.cluster(follow_map=True, metadata=ks.Base.metadata)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=app)
    try:
        before = list(admin.config.bucket_map)
        moving = sorted(rnd.sample([b for b, s in enumerate(before) if s == "s0"], 8))
        new = list(before)
        for b in moving:
            new[b] = "s1"
        plan_path = w.tmp / "plan.json"
        plan_path.write_text(json.dumps(plan_from_maps(before, new, f"seed {seed}").as_dict()))
        rest = rnd.choice([0.05, 0.1, 0.2])
        writers = ks.Writers(Session, 2, seed)
        with writers:
            time.sleep(0.3)
            move_id = _stopped_move(w, rnd, plan_path, rest)
            st = ks._status(w, move_id)
            verb = rnd.choice(st["next"]) if st["next"] else "resume"
            victim = rnd.choice(["catalog", "source", "target"])
            node = {"catalog": w.catalog_node, "source": w.node("s0"), "target": w.node("s1")}[victim]
            kill = ks.Kill(victim, node, rnd.choice(["kill", "immediate"]))
            target_phase = rnd.choice((ABORT_PHASES if verb == "abort" else ks.PHASES) + ["any time"])
            w.say(f"seed {seed}: move {move_id} ({st['state']}, next {st['next']}); {verb}, {victim} "
                  f"({node.name}) dies ({kill.how}) at {target_phase} (rest {rest})")
            proc = _proc(w, verb, str(move_id), *(["--grace", "0"] if verb == "resume" else []), rest=rest)
            rc = ks._kill_during(w, rnd, proc, kill, target_phase, rest)
            if verb == "resume":
                ks._check_failure(w, kill, rc, proc, move_id)
            else:
                _check_abort_failure(w, kill, rc, proc, move_id)
            move_id = ks._finish(w, rnd, move_id)
            time.sleep(0.3)
        assert not writers.crashed, writers.crashed[:3]
        ks._check(w, admin, Session, writers, move_id, kill, moving, before)
    finally:
        app.dispose()
        admin.dispose()


def _seeds() -> list[int]:
    if one := os.environ.get("SHARDKIT_SERVER_KILL2_SEED"):
        return [int(one)]
    more = int(os.environ.get("SHARDKIT_SERVER_KILL2_SEEDS", "0"))
    # 1, 2, 2013: resume, the catalog, source or target killed; 2002: the catalog killed in the
    # middle of an abort; 2015: the target killed while an abort undoes a batch there.
    return [1, 2, 2002, 2013, 2015] + list(range(5000, 5000 + more))


@pytest.mark.parametrize("seed", _seeds())
def test_a_server_killed_during_resume_or_abort(servers, tmp_path, seed):
    run_episode(servers, tmp_path, seed)


# -- an abort whose catalog session a restart took ------------------------------------------


def _started_move(admin: Any, batches: int = 2) -> int:
    """A move of 4 buckets of s0 to s1 per batch, stopped before its first cut-over (its
    first batch copied, the others pending), as a mover killed there leaves it."""
    live = admin.config.bucket_map
    new = list(live)
    for b in [b for b, s in enumerate(live) if s == "s0"][:4 * batches]:
        new[b] = "s1"

    class StopsBeforeTheCutOver(rebalance.Mover):
        def _cut_over(self, *a: Any, **kw: Any) -> Any:
            raise KeyboardInterrupt("test")

    mover = StopsBeforeTheCutOver(admin, grace=0, progress=lambda line: None)
    move_id = mover.start(plan_from_maps(live, new, "test"), max_buckets=4)
    with pytest.raises(KeyboardInterrupt):
        mover.run(move_id)
    return move_id


def _lock_held(w: ks.World, move_id: int) -> bool:
    with w.catalog() as c:
        return bool(c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                              "AND objid = %s AND granted", (MOVER_LOCK_CLASS, move_id)).fetchone()[0])


def test_an_abort_whose_catalog_restarted_holds_the_move_again(servers, tmp_path):
    """`abort` holds the move's lock on a catalog session, as the mover does; a catalog
    restarted while the abort undoes a batch took it (the abort's pool reconnects: it saw
    nothing), and a `resume` started then was accepted and ran the move alongside the
    abort, which went on undoing batches and recorded the move aborted over what the resume
    did.  At its next catalog write the abort takes the lock again (or stops, if another
    process holds it), as the mover does."""
    w = ks._make_world(servers, tmp_path / "w", "ks2lock")
    admin = w.cluster()
    seen: dict[str, Any] = {}
    record = Catalog.record
    try:
        move_id = _started_move(admin)

        def restarts_the_catalog(conn: Any, m: int, batch: Any, step: str, detail: Any = None) -> None:
            record(conn, m, batch, step, detail)
            if m != move_id or seen.get("busy"):
                return
            if step == rebalance._UNDOING and detail == {"batch": 0} and "restarted" not in seen:
                # (Committed first: the entry must survive the restart.)
                conn.commit()
                w.catalog_node.stop("immediate")
                w.catalog_node.start()
                seen["restarted"] = True
            elif step == "aborted" and batch == 0 and "restarted" in seen:
                # The abort's next catalog write (committed: a resume run now must not wait on it).
                conn.commit()
                seen["busy"] = True
                observer = w.cluster()
                try:
                    seen["status"] = rebalance.move_status(observer, move_id)[0]
                    seen["held"] = _lock_held(w, move_id)
                    # (Unheld, the resume would run the move here, alongside the abort.)
                    if seen["held"]:
                        try:
                            rebalance.Mover(observer, grace=0, progress=lambda line: None).run(move_id)
                            seen["resume"] = "ran"
                        except rebalance.RebalanceError as e:
                            seen["resume"] = str(e)
                finally:
                    observer.dispose()

        with mock.patch.object(Catalog, "record", staticmethod(restarts_the_catalog)):
            result = rebalance.abort(admin, move_id)
        assert seen.get("restarted"), seen
        assert seen["held"] and seen["status"]["mover"] and seen["status"]["aborting"], seen
        assert seen["status"]["next"] == [], seen["status"]
        assert "being run by another mover" in seen["resume"], seen
        assert sorted(result["undone_batches"]) == [0, 1], result
        admin.refresh_map()
        status = rebalance.move_status(admin, move_id)[0]
        assert status["state"] == "aborted" and not status["mover"], status
        assert verify(admin).ok
        ks._wait_for_lock_release(w, move_id, timeout=5)
    finally:
        admin.dispose()
        ks._drop_world(w)


def test_an_abort_that_lost_the_move_to_a_resume_while_the_catalog_restarted_stops(servers, tmp_path):
    """The abort's lock lost with the catalog's session, a resume took the move before the
    abort's next catalog write: the abort stops there (before it undoes anything more), and
    says so; the resume runs the move to the end."""
    w = ks._make_world(servers, tmp_path / "w", "ks2lock2")
    admin = w.cluster()
    record = Catalog.record
    seen: dict[str, Any] = {}
    try:
        move_id = _started_move(admin)
        other = w.cluster()

        def restarts_the_catalog(conn: Any, m: int, batch: Any, step: str, detail: Any = None) -> None:
            record(conn, m, batch, step, detail)
            if m == move_id and step == "aborted" and batch == 0 and "restarted" not in seen:
                conn.commit()
                w.catalog_node.stop("immediate")
                w.catalog_node.start()
                seen["restarted"] = True
                # A resume takes the move (its lock, then its runner) and stops at once.
                held = other.catalog.engine.connect()
                seen["held"] = held
                assert held.execute(text_("SELECT pg_try_advisory_lock(:c, :m)"),
                                    {"c": MOVER_LOCK_CLASS, "m": m}).scalar()
                held.execute(text_("UPDATE shardkit_catalog.moves SET runner = 'resume' WHERE id = :m"),
                             {"m": m})
                held.commit()

        with mock.patch.object(Catalog, "record", staticmethod(restarts_the_catalog)):
            with pytest.raises(rebalance.RebalanceError) as e:
                rebalance.abort(admin, move_id)
        message = str(e.value)
        assert "another process holds the move" in message or "taken over" in message, message
        status = rebalance.move_status(admin, move_id)[0]
        assert status["state"] == "running" and status["mover"], status
        with w.catalog() as c:
            steps = dict(c.execute("SELECT batch, step FROM shardkit_catalog.move_batches WHERE move_id = %s",
                                   (move_id,)).fetchall())
        assert steps == {0: "aborted", 1: "pending"}, steps
        with w.catalog() as c:   # batch 1 left alone
            assert not c.execute("SELECT count(*) FROM shardkit_catalog.journal WHERE move_id = %s AND step = %s "
                                 "AND detail->>'batch' = '1'", (move_id, rebalance._UNDOING)).fetchone()[0]
        seen["held"].execute(text_("SELECT pg_advisory_unlock_all()"))
        seen["held"].commit()
        seen["held"].close()
        other.dispose()
        rebalance.Mover(admin, grace=0, progress=lambda line: None).run(move_id)
        admin.refresh_map()
        status = rebalance.move_status(admin, move_id)[0]
        assert status["state"] == "done", status
        assert verify(admin).ok
    finally:
        admin.dispose()
        ks._drop_world(w)


# -- verify and status while a server is down ------------------------------------------------


@pytest.fixture(scope="module")
def down_world(servers, tmp_path_factory):
    """One world for the six cases below: they only read it (verify, status), and each
    starts the server it stopped again (a world costs three databases and an init)."""
    w = ks._make_world(servers, tmp_path_factory.mktemp("down") / "w", "ks2down")
    yield w
    ks._drop_world(w)


@pytest.mark.parametrize("down", ["catalog", "s0", "s1"])
@pytest.mark.parametrize("how", ["kill", "immediate"])
def test_verify_and_status_with_a_server_down(down_world, down, how):
    """`shardkit verify` and `shardkit rebalance status` while a shard's primary or the
    catalog is down: one clear line naming that server, a non-zero status, no traceback,
    no password."""
    w = down_world
    node = w.catalog_node if down == "catalog" else w.node(down)
    for n in (w.catalog_node, w.node("s0"), w.node("s1")):
        assert n.is_running(), n.name  # (the case before started its server again)
    try:
        if how == "kill":
            node.kill()
        else:
            node.stop("immediate")
        for args in (["verify"], ["rebalance", "status"], ["rebalance", "status", "--json"]):
            if down != "catalog" and args[0] == "rebalance":
                # (It reads the catalog alone.)
                r = ks._cli(w, *args)
                assert r.returncode == 0 and not r.stderr, (args, r.stdout + r.stderr)
                continue
            r = ks._cli(w, *args)
            out = r.stdout + r.stderr
            assert r.returncode != 0, (args, out)
            assert "Traceback" not in out, (args, out)
            assert ks.PASSWORD not in out, (args, out)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1, (args, out)
            if down == "catalog":
                assert "the catalog" in errors[0], (args, out)
            else:
                assert down in errors[0] and f":{node.port}" in errors[0], (args, out)
    finally:
        if not node.is_running():
            node.start()
