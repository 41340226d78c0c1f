"""`shardkit rebalance abort MOVE --target-lost`: a move whose target is gone is undone on its
source alone, what the target may still hold is recorded, refused as a target, and removed
by `abort MOVE` again once the target is back; nothing is lost.

One 3-shard cluster for the module (no replicas, 64 buckets, the catalog on s0's server);
each test moves buckets of its own from s0 (or s1) to s2 and stops s2 under the move.
"""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import cli, rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.errors import RebalanceError
from shardkit.verify import verify
from movers import guarded_cluster, kill_mover_after
from test_rebalance_crashes import BUCKETS, Account, Base, Note

pytestmark = pytest.mark.integration

GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {"accounts": "id", "notes": "account_id"}}}}


def make_world(factory, tmp_path_factory, name: str) -> SimpleNamespace:
    """3 shards, the accounts group guarded, a catalog; s2 is the target the tests lose."""
    dev = factory(shards=3, replicas=0, bucket_count=BUCKETS)
    cfg_path = tmp_path_factory.mktemp(name) / "shardkit.toml"
    guarded_cluster(dev, Base.metadata, GROUPS, cfg_path, follow_map=False).dispose()
    return SimpleNamespace(dev=dev, cfg=cfg_path, s2=dev.shard("s2").primary, next_key=[1], used=set())


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    return make_world(shardkit_module_cluster_factory, tmp_path_factory, "target_lost")


@pytest.fixture
def s2_back(world):
    """s2 runs again after the test, whatever happened in it."""
    yield
    if not world.s2.is_running():
        world.s2.start()


def _cluster(world) -> shardkit.Cluster:
    c = shardkit.Cluster.from_config(world.cfg, follow_map=False)
    c.refresh_map()
    return c


def _session(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _keys_in(bucket: int, n: int, world) -> list[int]:
    out, k = [], world.next_key[0]
    while len(out) < n:
        if shardkit.bucket_for(k, BUCKETS) == bucket:
            out.append(k)
        k += 1
    world.next_key[0] = k
    return out


def _sql(world, shard: str, query: str, params=None):
    with psycopg.connect(world.dev.shard(shard).primary.dsn, autocommit=True) as c:
        cur = c.execute(query, params)
        return cur.fetchall() if cur.description else None


def _rows(world, shards=("s0", "s1", "s2")) -> dict:
    """(table, id) -> (shard, row) for every row of every reachable shard; a row on two
    shards is kept twice (as a list)."""
    out: dict = {}
    for shard in shards:
        for table, q in (("accounts", "SELECT id, balance FROM accounts"),
                         ("notes", "SELECT id, account_id, body FROM notes")):
            for r in _sql(world, shard, q):
                out.setdefault((table, r[0]), []).append((shard, r))
    return out


def _seed(world, cluster, buckets: list[int]) -> list[int]:
    keys = [k for b in buckets for k in _keys_in(b, 3, world)]
    with _session(cluster)() as s:
        s.add_all(Account(id=k, balance=k % 7) for k in keys)
        s.add_all(Note(id=k, account_id=k, body=f"n{k}") for k in keys)
        s.commit()
    return keys


def _plan_file(world, cluster, buckets: list[int], target: str, name: str):
    live = cluster.config.bucket_map
    new = list(live)
    for b in buckets:
        new[b] = target
    plan = plan_from_maps(live, tuple(new), f"test: {buckets} to {target}")
    path = world.cfg.parent / f"{name}.json"
    path.write_text(json.dumps(plan.as_dict()))
    return plan, path


def _cli(world, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([*argv, "--config", str(world.cfg)])
        except SystemExit as e:
            rc = e.code
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def _password(cluster) -> str | None:
    return cluster.config.shard("s2").primary.password


@pytest.mark.parametrize("step", ["capturing", "copied"])
def test_target_lost_mid_move_is_undone_on_the_source_and_finished_when_it_is_back(world, s2_back, step):
    cluster = _cluster(world)
    buckets = [b for b, s in enumerate(cluster.config.bucket_map) if s == "s0"][:2] if step == "capturing" \
        else [b for b, s in enumerate(cluster.config.bucket_map) if s == "s0"][2:4]
    keys = _seed(world, cluster, buckets)
    plan, path = _plan_file(world, cluster, buckets, "s2", f"to_s2_{step}")
    move_id = kill_mover_after(cluster, world.cfg, step, "--plan", str(path))
    before = _rows(world)
    world.s2.stop()
    copies = {(t, k) for t in ("accounts", "notes") for k in keys}
    # What the shards hold once s2's copies of the moving rows are gone.
    expected = {k: [(s, r) for s, r in v if not (s == "s2" and k in copies)] for k, v in before.items()}
    extra = _keys_in(buckets[0], 1, world)[0]

    # Without the flag: refused, the move stays running, and the message says what the flag does.
    with pytest.raises(RebalanceError) as refused:
        rebalance.abort(cluster, move_id)
    message = str(refused.value)
    assert "--target-lost" in message and "s2" in message and f"abort {move_id}" in message, message
    assert _password(cluster) is None or _password(cluster) not in message
    assert rebalance.move_status(cluster, move_id)[0]["state"] == "running"

    res = _cli(world, "rebalance", "abort", str(move_id), "--target-lost")
    assert res.rc == 0, res.err
    assert "s2" in res.out and f"abort {move_id}" in res.out, res.out
    status = rebalance.move_status(cluster, move_id)[0]
    assert status["state"] == "aborted", status
    assert status["leftovers"] == [{"batch": 0, "shard": "s2", "buckets": sorted(buckets)}], status
    assert status["batches"][0]["step"] == rebalance.LEFTOVERS
    shown = _cli(world, "rebalance", "status", str(move_id))
    assert "leftovers: s2" in shown.out and f"shardkit rebalance abort {move_id}" in shown.out, shown.out

    # The source owns the buckets and no longer captures; writers of the moving keys go on there.
    fresh = _cluster(world)
    try:
        def write(s):
            for k in keys:
                s.get(Account, k).balance += 100
            s.add(Account(id=extra, balance=1))
        shardkit.run_transaction(_session(fresh), write)
        assert _sql(world, "s0", "SELECT count(*) FROM shardkit.changes WHERE bucket = ANY(%s)", (buckets,)) == [(0,)]
        assert _sql(world, "s0", "SELECT count(*) FROM shardkit.moving_buckets") == [(0,)]
        assert _sql(world, "s0", "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = ANY(%s)",
                    (buckets,)) == [(len(buckets),)]
        for k in keys:
            (shard, (_, bal)), = expected[("accounts", k)]
            assert shard == "s0"
            expected[("accounts", k)] = [(shard, (k, bal + 100))]
        expected[("accounts", extra)] = [("s0", (extra, 1))]
        on_s0_s1 = {k: [(s, r) for s, r in v if s != "s2"] for k, v in expected.items()}
        assert _rows(world, ("s0", "s1")) == {k: v for k, v in on_s0_s1.items() if v}

        # Moving those buckets to s2 again is refused, naming the move and the fix.
        with pytest.raises(RebalanceError) as again:
            rebalance.Mover(fresh, grace=0).start(_plan_file(world, fresh, buckets, "s2", "again")[0])
        assert f"move {move_id}" in str(again.value) and f"shardkit rebalance abort {move_id}" in str(again.value)
        res = _cli(world, "rebalance", "plan", "--plan", str(world.cfg.parent / "again.json"))
        assert res.rc == 2 and f"rebalance abort {move_id}" in res.err, (res.rc, res.err)
        # Still down: the clean-up says so and keeps the leftovers recorded.
        with pytest.raises(RebalanceError, match="cannot reach s2"):
            rebalance.abort(fresh, move_id)
        assert rebalance.move_status(fresh, move_id)[0]["leftovers"]

        world.s2.start()
        left = _sql(world, "s2", "SELECT count(*) FROM accounts WHERE id = ANY(%s)", (keys,))[0][0]
        if step == "copied":
            assert left == len(keys)  # the copies are there, and reads across shards leave them out
        fresh.refresh_map()
        with _session(fresh)() as s:
            assert s.scalar(select(func.count()).select_from(Account)) == sum(
                1 for (t, _), v in expected.items() if t == "accounts" and v)

        res = _cli(world, "rebalance", "abort", str(move_id))
        assert res.rc == 0 and "removed" in res.out, (res.rc, res.out, res.err)
        assert _sql(world, "s2", "SELECT count(*) FROM accounts WHERE id = ANY(%s)", (keys,)) == [(0,)]
        assert _sql(world, "s2", "SELECT count(*) FROM notes WHERE id = ANY(%s)", (keys,)) == [(0,)]
        assert rebalance.move_status(fresh, move_id)[0]["leftovers"] == []
        fresh.refresh_map()
        report = verify(fresh)
        assert report.ok, report.render()

        # And the buckets move to s2 now.
        fresh.refresh_map()
        rebalance.Mover(fresh, grace=0, progress=lambda line: None).apply(
            _plan_file(world, fresh, buckets, "s2", "finally")[0])
        fresh.refresh_map()
        assert all(fresh.config.bucket_map[b] == "s2" for b in buckets)
        after = _rows(world)
        assert {k: [r for _, r in v] for k, v in after.items()} == \
            {k: [r for _, r in v] for k, v in expected.items() if v}
        assert all(s == "s2" for k in copies | {("accounts", extra)} for s, _ in after[k])
        report = verify(fresh)
        assert report.ok, report.render()
    finally:
        fresh.dispose()
        cluster.dispose()


def _crash_between_target_and_source_commit(world, cluster, bucket: int, source: str) -> int:
    """Move ``bucket`` from ``source`` to s2 with a mover whose cut-over fails at the source's
    commit, after the target's (as if it were killed right before it); return the move."""
    _sql(world, source, """
        CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS
        $$BEGIN RAISE EXCEPTION 'simulated crash before the source commit'; END$$;
        CREATE TRIGGER fail_once BEFORE DELETE ON shardkit.owned_buckets
        FOR EACH ROW EXECUTE FUNCTION public.fail_once();""")
    try:
        plan, _ = _plan_file(world, cluster, [bucket], "s2", "crash")
        mover = rebalance.Mover(cluster, grace=0, progress=lambda line: None)
        move_id = mover.start(plan)
        with pytest.raises(RebalanceError):
            mover.run(move_id)
    finally:
        _sql(world, source, "DROP TRIGGER fail_once ON shardkit.owned_buckets; DROP FUNCTION public.fail_once()")
    assert _sql(world, "s2", "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = %s", (bucket,)) == [(1,)]
    return move_id


def test_a_target_a_crashed_cut_over_left_owning_the_buckets(world, s2_back):
    cluster = _cluster(world)
    try:
        # A bucket that was never on s2: the target's ownership is dropped when it is back.
        b = [x for x, s in enumerate(cluster.config.bucket_map) if s == "s1"][0]
        keys = _seed(world, cluster, [b])
        move_id = _crash_between_target_and_source_commit(world, cluster, b, "s1")
        world.s2.stop()
        result = rebalance.abort(cluster, move_id, target_lost=True)
        assert result["leftovers"] == [{"batch": 0, "shard": "s2", "buckets": [b]}], result
        with cluster.catalog.engine.connect() as cat:
            detail = cat.execute(text("SELECT detail FROM shardkit_catalog.journal WHERE move_id = :m AND step = :s"),
                                 {"m": move_id, "s": rebalance.LEFTOVERS}).scalar_one()
        assert detail["may_own"] is True, detail
        world.s2.start()
        cluster.dispose()  # (its pooled connections to s2 died with it: as a new process would)
        cluster = _cluster(world)
        assert _sql(world, "s2", "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = %s", (b,)) == [(1,)]
        rebalance.abort(cluster, move_id)
        assert _sql(world, "s2", "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = %s", (b,)) == [(0,)]
        assert _sql(world, "s2", "SELECT count(*) FROM shardkit.moving_buckets") == [(0,)]
        assert _sql(world, "s2", "SELECT count(*) FROM accounts WHERE id = ANY(%s)", (keys,)) == [(0,)]
        assert _sql(world, "s1", "SELECT count(*) FROM accounts WHERE id = ANY(%s)", (keys,)) == [(len(keys),)]
        cluster.refresh_map()
        report = verify(cluster)
        assert report.ok, report.render()

        # A bucket an older map version gave to s2: a process still holding that map could
        # write to it there if s2 came back owning it, so --target-lost refuses.
        b2 = [x for x, s in enumerate(cluster.config.bucket_map) if s == "s2"][0]
        keys2 = _seed(world, cluster, [b2])
        plan, _ = _plan_file(world, cluster, [b2], "s1", "off_s2")
        rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(plan)
        cluster.refresh_map()
        move2 = _crash_between_target_and_source_commit(world, cluster, b2, "s1")
        world.s2.stop()
        with pytest.raises(RebalanceError) as refused:
            rebalance.abort(cluster, move2, target_lost=True)
        assert "older map" in str(refused.value) and "running" in str(refused.value), refused.value
        assert rebalance.move_status(cluster, move2)[0]["state"] == "running"
        assert _sql(world, "s1", "SELECT count(*) FROM shardkit.moving_buckets WHERE bucket = %s", (b2,)) == [(1,)]
        world.s2.start()
        cluster.dispose()
        cluster = _cluster(world)
        rebalance.abort(cluster, move2)
        assert _sql(world, "s2", "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = %s", (b2,)) == [(0,)]
        assert _sql(world, "s1", "SELECT count(*) FROM accounts WHERE id = ANY(%s)", (keys2,)) == [(len(keys2),)]
        cluster.refresh_map()
        report = verify(cluster)
        assert report.ok, report.render()
    finally:
        cluster.dispose()
