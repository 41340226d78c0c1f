"""get()'s kept load statement (ShardedSession._get_impl,
_get_load) and the keyed select's given cache key (Router.route, _give_cache_key) while
buckets move between shards, with threads, and with a lagging replica.

Each scenario runs with both fast paths and again with both disabled (``_get_load``
returning None, ``_give_cache_key`` a no-op, the router's get plans cleared): what a read
returns, which shard it came from and what it raises must be the same, and match the
rows on their owners' primaries.  Uses the module-scoped 2-shard x 1-replica world of
test_reads_during_moves (its own instance here).
"""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
from sqlalchemy import create_engine, inspect, select, update
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
import shardkit._routing as routing_mod
import shardkit._session as session_mod
import test_reads_during_moves
from waiting import wait_for
from shardkit._rebalance_plan import plan_from_maps
from test_reads_during_moves import (BUCKETS, N_USERS, Base, Member, Moving, PausingMover, Purchase, World, _groups,
                                     keys_in, truth)

world = test_reads_during_moves.world


@pytest.fixture(scope="module")
def plain_world(shardkit_module_cluster_factory):
    """The same tables and rows on 2 shards without replicas (get()'s load then takes
    execute()'s short path to the primary), following a catalog."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)
    catalog_url = dev.create_catalog()
    for s in dev.shards:
        eng = create_engine(s.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    cfg = {**dev.config_dict(), **_groups([s.name for s in dev.shards]), "catalog": {"url": catalog_url}}
    admin = shardkit.Cluster.from_config(cfg, follow_map=False)
    rebalance.init(admin)
    admin.dispose()
    w = World(dev, cfg)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=w.admin, consistency="strong")() as s:
        s.add_all(Member(id=i, name=f"m{i}", score=i % 97) for i in range(1, N_USERS + 1))
        s.add_all(Purchase(id=i * 10, member_id=i, amount=i) for i in range(1, N_USERS + 1))
        s.commit()
    yield w
    w.app.dispose()
    w.admin.dispose()

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def paths(w, mode: str, calls: dict | None = None):
    """``mode`` "fast": both fast paths on (their uses counted in ``calls``); "slow": both off."""
    saved = session_mod._get_load, routing_mod._give_cache_key
    given = routing_mod._give_cache_key
    if mode == "slow":
        session_mod._get_load = lambda mapper, scalar: None
        routing_mod._give_cache_key = lambda statement, form, b: None
    elif calls is not None:
        def counting(statement, form, b):
            calls["given"] = calls.get("given", 0) + 1
            given(statement, form, b)
        routing_mod._give_cache_key = counting
    w.app.router.get_plans.clear()
    try:
        yield
    finally:
        session_mod._get_load, routing_mod._give_cache_key = saved
        w.app.router.get_plans.clear()


def _sessions(w, consistency: str) -> sessionmaker:
    return sessionmaker(class_=shardkit.ShardedSession, cluster=w.app, consistency=consistency)


def _kept_load(w) -> bool:
    plan = w.app.router.get_plans.get(Member)
    return plan is not None and plan[4] is not None


def _outcome(fn, want_id: int, want_score: int, where: dict) -> str:
    """What a read did, in words the two modes share: "ok@target", "NotOwned(source)", ..."""
    try:
        got = fn()
    except shardkit.NotOwned as e:
        return f"NotOwned({where.get(e.shard, e.shard)})"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if got is None:
        return "None"
    token = inspect(got).identity_token
    if got.id != want_id:
        return f"WRONG ROW id {got.id} (asked {want_id})"
    if got.score != want_score:
        return f"stale score {got.score} (owner has {want_score}) from {where.get(token, token)}"
    return f"ok@{where.get(token, token)}"


def _plan(w, source: str, target: str, n: int):
    """A plan moving ``n`` buckets of ``source`` that hold members to ``target``."""
    live = w.live_map()
    buckets = [b for b, s in enumerate(live) if s == source and keys_in([b])][:n]
    new = list(live)
    for b in buckets:
        new[b] = target
    return plan_from_maps(live, tuple(new), f"test: {buckets} {source} -> {target}"), buckets


# -- get() and keyed selects across a move, fast and slow ------------------------------------


def _across_a_move(w, source: str, target: str) -> list[str]:
    plan, buckets = _plan(w, source, target, 1)
    k = keys_in(buckets)[0]
    assert w.app.shard_for("members", k) == source
    where = {source: "source", target: "target"}
    shared = select(Member).where(Member.id == k)     # one statement object, run before and after
    held_s = _sessions(w, "eventual")()
    held = held_s.get(Member, k)                     # kept loaded (token: source)
    lazy_s0 = _sessions(w, "eventual")()
    lazy0 = lazy_s0.get(Member, k)                   # its purchases not loaded yet
    exp_s = _sessions(w, "eventual")()
    expired = exp_s.get(Member, k)
    exp_s.commit()                                   # expired, token: source
    for c in ("eventual", "strong"):
        with _sessions(w, c)() as s:
            assert s.scalars(shared).one().id == k
            assert s.get(Member, k).id == k
    out: list[str] = []
    replicas = w.shard(target).replicas
    target_replica = replicas[0] if replicas else None
    if target_replica is not None:
        target_replica.set_apply_delay(2.0)        # the target's replica has not replayed the switch
    run = Moving(PausingMover(w.admin, {"switched"}), plan)
    try:
        assert run.next_step() == "switched"
        assert not w.sync_app()
        with _sessions(w, "strong")() as s:
            s.execute(update(Member).where(Member.id == k).values(score=Member.score + 1000))
            s.commit()
        for phase in ("switched", "cleaned"):
            want = truth(w)["members"][k][1]
            for c in ("eventual", "read_your_writes", "strong"):
                with _sessions(w, c)() as s:
                    out.append(f"{phase} {c} new get: " + _outcome(lambda: s.get(Member, k), k, want, where))
                with _sessions(w, c)() as s:
                    out.append(f"{phase} {c} fresh select: " + _outcome(
                        lambda: s.scalars(select(Member).where(Member.id == k)).one_or_none(), k, want, where))
                with _sessions(w, c)() as s:
                    out.append(f"{phase} {c} shared select: " + _outcome(
                        lambda: s.scalars(shared).one_or_none(), k, want, where))
                with _sessions(w, c)() as s:   # get() then a keyed select in one session
                    out.append(f"{phase} {c} get twice: " + _outcome(
                        lambda: (s.get(Member, k), s.get(Member, k))[1], k, want, where))
            if phase == "switched":
                # A session holding the object loaded from the source: get() loads the owner's
                # row (README), the held object's refresh is refused.
                out.append("held get: " + _outcome(lambda: held_s.get(Member, k), k, want, where))
                out.append("held refresh: " + _outcome(lambda: (held_s.refresh(held), held)[1], k, want, where))
                held_s.rollback()
                # A lazy load from an object get() loaded from the source (the relationship is
                # joined on the key: it runs on the object's shard).
                out.append("lazy load from a get() before the switch: " + _outcome(
                    lambda: (len(lazy0.purchases), lazy0)[1], k, want, where))
                lazy_s0.rollback()
                out.append("expired get: " + _outcome(lambda: exp_s.get(Member, k), k, want, where))
                out.append("expired attribute: " + _outcome(lambda: (expired.score, expired)[1], k, want, where))
                exp_s.rollback()
                run.resume()
                run.finish()
                assert not run.errors, run.errors
                assert not w.sync_app()
                if target_replica is not None:
                    target_replica.set_apply_delay(0)
    finally:
        run.finish()
        held_s.close()
        exp_s.close()
        lazy_s0.close()
        if target_replica is not None:
            target_replica.set_apply_delay(0)
    return out


@pytest.mark.parametrize("which", ["replicas", "no replicas"])
def test_get_and_keyed_select_across_a_move_fast_as_slow(which, request):
    """get(Member, k) and select(Member).where(Member.id == k) (a fresh statement and one
    statement object run before the move) after k's bucket switched (the target's replica
    behind) and after the clean-up: the owner's row, from the owner, under every
    consistency; a session holding the source's copy gets the owner's row and has its
    copy's refresh refused.  The same with both fast paths off."""
    w = request.getfixturevalue("world" if which == "replicas" else "plain_world")
    calls: dict = {}
    with paths(w, "fast", calls):
        fast = _across_a_move(w, "s0", "s1")
        assert _kept_load(w), "get() did not take the kept load"
    assert calls.get("given"), "no keyed select was given its form's cache key"
    with paths(w, "slow"):
        slow = _across_a_move(w, "s1", "s0")
    bad = [o for o in fast if not (o.endswith(": ok@target") or o.endswith("NotOwned(source)"))]
    assert fast == slow, "\n".join(f"{a}  |  {b}" for a, b in zip(fast, slow) if a != b)
    assert not bad, "\n".join(bad)


# -- many threads, shared and fresh statements, a map change in the middle --------------------


@pytest.mark.parametrize("which", ["replicas", "no replicas"])
def test_threads_read_their_own_key_through_a_move(which, request):
    """8 threads doing get() and keyed selects (statement objects shared by every thread,
    and fresh ones), new sessions and long-lived ones, while 2 buckets move: every object
    read is the key asked, none is missing, and nothing raises."""
    w = request.getfixturevalue("world" if which == "replicas" else "plain_world")
    plan, buckets = _plan(w, "s1", "s0", 2)
    moving = keys_in(buckets)
    t = truth(w)["members"]
    others = [k for k in sorted(t) if k not in moving][:40]
    keys = moving + others
    shared = {k: select(Member).where(Member.id == k) for k in keys}
    stop = threading.Event()
    problems: list[str] = []
    counts = {"reads": 0}
    lock = threading.Lock()

    def worker(n: int) -> None:
        rnd = random.Random(n)
        Session = _sessions(w, ("eventual", "read_your_writes", "strong")[n % 3])
        kept = Session() if n % 2 else None
        try:
            while not stop.is_set():
                k = rnd.choice(keys)
                how = rnd.randrange(3)
                s = kept or Session()
                try:
                    if how == 0:
                        got = s.get(Member, k)
                    elif how == 1:
                        got = s.scalars(shared[k]).one_or_none()
                    else:
                        got = s.scalars(select(Member).where(Member.id == k)).one_or_none()
                    if got is None:
                        problems.append(f"t{n} {('get', 'shared', 'fresh')[how]} {k}: None")
                    elif got.id != k or got.name != f"m{k}":
                        problems.append(f"t{n} {('get', 'shared', 'fresh')[how]} {k}: got {got.id} {got.name}")
                    s.commit()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"t{n} {('get', 'shared', 'fresh')[how]} {k}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160]}")
                    s.rollback()
                finally:
                    if kept is None:
                        s.close()
                with lock:
                    counts["reads"] += 1
        finally:
            if kept is not None:
                kept.close()

    def reads_more(n: int) -> None:
        """Wait until the threads have read ``n`` more times (each thread several times)."""
        with lock:
            goal = counts["reads"] + n
        wait_for(lambda: counts["reads"] >= goal or bool(problems), 60, f"{n} more reads")

    calls: dict = {}
    with paths(w, "fast", calls):
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(8)]
        for th in threads:
            th.start()
        try:
            reads_more(300)
            assert _kept_load(w), "get() did not take the kept load"
            for p in (plan, "back"):
                if p == "back":
                    live = w.live_map()
                    p = plan_from_maps(live, tuple("s1" if b in buckets else o for b, o in enumerate(live)),
                                       "test: back")
                before = w.app.map_version
                run = Moving(PausingMover(w.admin, set(), grace=1.0), p)
                run.finish()
                assert not run.errors, run.errors
                assert not w.sync_app()
                assert w.app.map_version != before
                reads_more(300)
        finally:
            stop.set()
            for th in threads:
                th.join(30)
    assert calls.get("given"), "no keyed select was given its form's cache key"
    assert counts["reads"] > 100, counts
    assert not problems, f"{len(problems)} of {counts['reads']} reads:\n" + "\n".join(problems[:20])


# -- read your writes on a lagging replica ----------------------------------------------------


def _ryw(w, k: int, score: int) -> list[str]:
    shard = w.app.shard_for("members", k)
    where = {shard: "owner"}
    out: list[str] = []
    Ryw = _sessions(w, "read_your_writes")
    with Ryw() as s:
        # Core write, nothing of k in the identity map: get() runs the load.
        s.execute(update(Member).where(Member.id == k).values(score=score))
        out.append("in transaction get: " + _outcome(lambda: s.get(Member, k), k, score, where))
        s.commit()
        s.expunge_all()
        out.append("after commit get: " + _outcome(lambda: s.get(Member, k), k, score, where))
        s.expunge_all()
        out.append("after commit select: " + _outcome(
            lambda: s.scalars(select(Member).where(Member.id == k)).one_or_none(), k, score, where))
        token = s.consistency_token()
    for c in ("read_your_writes", "strong"):
        with _sessions(w, c)(consistency_token=token) as s:
            out.append(f"token {c} get: " + _outcome(lambda: s.get(Member, k), k, score, where))
        with _sessions(w, c)(consistency_token=token) as s:
            out.append(f"token {c} select: " + _outcome(
                lambda: s.scalars(select(Member).where(Member.id == k)).one_or_none(), k, score, where))
    # An ORM write (the object loaded first, from the replica), then get() in new sessions.
    with Ryw() as s:
        m = s.get(Member, k)
        m.score = score + 1
        s.commit()
        token = s.consistency_token()
        s.expunge_all()
        out.append("orm write, same session get: " + _outcome(lambda: s.get(Member, k), k, score + 1, where))
    with Ryw(consistency_token=token) as s:
        out.append("orm write, token get: " + _outcome(lambda: s.get(Member, k), k, score + 1, where))
    return out


def test_read_your_writes_get_on_a_lagging_replica_fast_as_slow(world):
    """The owner's replica 3 s behind: get() (and a keyed select) after a write, in the
    same session and in a new one given the consistency token, sees the write; the same
    with both fast paths off."""
    w = world
    t = truth(w)["members"]
    k1, k2 = [k for k in sorted(t) if w.app.shard_for("members", k) == "s0"][5:7]
    replica = w.shard("s0").replicas[0]
    w.replicas_caught_up()
    replica.set_apply_delay(3.0)
    try:
        with paths(w, "fast"):
            fast = _ryw(w, k1, 50_001)
            assert _kept_load(w)
        with paths(w, "slow"):
            slow = _ryw(w, k2, 50_001)
        with _sessions(w, "eventual")() as s:   # the replica did lag: an eventual read is stale
            lagging = s.get(Member, k1).score != 50_002
    finally:
        replica.set_apply_delay(0)
        w.replicas_caught_up()
    assert lagging, "the replica was not behind: the test proved nothing"
    bad = [o for o in fast if not o.endswith(": ok@owner")]
    assert fast == slow, "\n".join(f"{a}  |  {b}" for a, b in zip(fast, slow) if a != b)
    assert not bad, "\n".join(bad)
