"""Tests of get()'s short path to a replica (ShardedSession.execute() ->
_replica_read) under failures: a replica SIGKILLed in the middle of a get()'s load (four
threads, fresh sessions; a transaction pinned to it; one of two replicas; all of them), a
primary stopped while gets go on, replicas past the lag limit, read-your-writes.

get(), get_one(), Query.get() and get() with statement options (selectinload) take that
path; get(populate_existing=True) does not (SQLAlchemy passes populate_existing as an
execution option too, so its load has two: the general path), and is checked as the
baseline it is.  Where a failure's outcome is
a choice, the short path's is compared with the general path's (_short_path_open
patched to False).  A replica is killed deterministically in the middle of a load: a
before_cursor_execute hook on the replicas' engines SIGKILLs the node that is about to
run the load's statement, so the statement meets a dead server.

One 2-shard x 2-replica cluster of its own serves the module; each test restores the nodes
it killed, stopped or delayed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import BigInteger, ForeignKey, String, event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker

import shardkit
import shardkit._session as sk_session
from replica_env import ReplicaEnv, record_statements, replica_cluster, replica_env
from waiting import health_by_node, resume, server_pids, wait_for, wait_replicas_usable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "grf_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    notes: Mapped[list[Note]] = relationship(lazy="select", order_by="Note.id")


class Note(Base):
    __tablename__ = "grf_notes"
    acct_id: Mapped[int] = mapped_column(ForeignKey("grf_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50))


GROUPS = {"accts": {"tables": {"grf_accounts": "id", "grf_notes": "acct_id"}}}


def _query_get(s: Any, k: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa_exc.LegacyAPIWarning)
        return s.query(Acct).get(k)


GETS = {
    "get": lambda s, k: s.get(Acct, k),
    "get_one": lambda s, k: s.get_one(Acct, k),
    "query_get": _query_get,
    "populate_existing": lambda s, k: s.get(Acct, k, populate_existing=True),
    "selectinload": lambda s, k: s.get(Acct, k, options=[selectinload(Acct.notes)]),
}


@dataclass
class Env(ReplicaEnv):
    # shard -> the keys seeded with one account each (name n{key}, one note b{key})
    seeded: dict[str, list[int]] = field(default_factory=dict)

    def replica(self, shard: str, i: int) -> Any:
        return self.dev.shard(shard).replicas[i]


def _make_cluster(dev: Any, **replicas: Any) -> shardkit.Cluster:
    """Another cluster of the module's nodes, with other [replicas] settings."""
    return replica_cluster(dev, {"groups": GROUPS}, **replicas)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    made = replica_env(shardkit_module_cluster_factory, Base.metadata, {"groups": GROUPS},
                       "grf_accounts", "grf_", replicas=2, env_class=Env)
    e = next(made)
    e.seeded = {s: [e.key(s) for _ in range(40)] for s in e.cluster.shard_names}
    with e.Session() as s:
        for ks in e.seeded.values():
            s.add_all(Acct(id=k, name=f"n{k}", notes=[Note(id=1, body=f"b{k}")]) for k in ks)
        s.commit()
    e.caught_up()
    wait_replicas_usable(e.cluster, every=True)
    yield e
    next(made, None)  # (the cluster disposed)


@pytest.fixture(autouse=True)
def _restore(env):
    yield
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
    for sh in env.dev.shards:
        for r in sh.replicas:
            if _apply_delay(r) != "0":   # (a test delayed it: ALTER SYSTEM and a reload)
                r.set_apply_delay(0)
            r.wait_streaming()
    env.caught_up()
    wait_replicas_usable(env.cluster, every=True)


def _apply_delay(node: Any) -> str:
    """The replica's recovery_min_apply_delay (ms) as a new session sees it."""
    with node.connect() as c:
        return str(c.execute("SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'")
                   .fetchone()[0])


@pytest.fixture
def short_path_taken(monkeypatch):
    """Which get() loads _replica_read served (True) or left to the general path (False)."""
    taken: list[bool] = []
    real = sk_session.ShardedSession._replica_read

    def replica_read(self, *a, **k):
        out = real(self, *a, **k)
        taken.append(out is not sk_session._GENERAL)
        return out
    monkeypatch.setattr(sk_session.ShardedSession, "_replica_read", replica_read)
    return taken


@contextlib.contextmanager
def general_path_only(monkeypatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(sk_session.ShardedSession, "_short_path_open", lambda self, *a: False)
        yield


@contextlib.contextmanager
def kill_first_reader(env: Env, shard: str, armed: bool = True,
                      table: str = "grf_") -> Iterator[dict[str, Any]]:
    """SIGKILL whichever replica of ``shard`` is about to run the next statement on the
    module's tables, before it runs (so that statement meets a dead server: a load killed
    midway; ``table``: only a statement on it).  ``box["arm"]()`` arms it later;
    ``box["victim"]``: the node killed."""
    lock = threading.Lock()
    box: dict[str, Any] = {"armed": armed, "victim": None}
    hooks = []
    for i, node in enumerate(env.dev.shard(shard).replicas):
        eng = env.cluster.engine(shard, "replica", i)

        def before(conn, cursor, statement, *a, node=node):
            if table not in statement:
                return
            with lock:
                if not box["armed"]:
                    return
                box["armed"] = False
                box["victim"] = node
                node.kill()
        event.listen(eng, "before_cursor_execute", before)
        hooks.append((eng, before))

    def arm() -> None:
        with lock:
            box["armed"] = True
    box["arm"] = arm
    try:
        yield box
    finally:
        for eng, fn in hooks:
            event.remove(eng, "before_cursor_execute", fn)


def _logged(caplog: Any) -> list[str]:
    """The warnings logged since caplog was cleared."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _check(obj: Any, k: int, shard: str, name: str | None = None) -> None:
    assert obj is not None and obj.id == k, (obj, k)
    assert obj.name == (name or f"n{k}"), (obj.name, k)
    assert inspect(obj).identity_token == shard


# -- 1. four threads of gets in fresh sessions while a replica is SIGKILLed --------------------


def test_four_threads_of_gets_lose_none_when_a_replica_is_killed_mid_load(env, short_path_taken, caplog):
    shard = "s0"
    keys = env.seeded[shard]
    errors: list[tuple[str, int, BaseException]] = []
    wrong: list[Any] = []
    done = threading.Event()
    count = [0]

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        names = list(GETS)
        while not done.is_set():
            k, name = rnd.choice(keys), rnd.choice(names)
            try:
                with env.Session(consistency="eventual") as s:
                    obj = GETS[name](s, k)
                    _check(obj, k, shard)
                    if name == "selectinload":
                        assert [n.body for n in obj.notes] == [f"b{k}"]
                count[0] += 1
            except AssertionError as e:
                wrong.append((name, k, e))
            except BaseException as e:  # noqa: BLE001
                errors.append((name, k, e))

    caplog.set_level(logging.WARNING, logger="shardkit")
    caplog.clear()
    with kill_first_reader(env, shard, armed=False) as box:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.6)                         # every replica has pooled connections
            box["arm"]()
            wait_for(lambda: box["victim"] is not None, 5, "a replica to be killed")
            time.sleep(0.3)                         # (reads begun before the kill end)
            n_after = len(env.served)
            time.sleep(1.2)
        finally:
            done.set()
            for t in threads:
                t.join(30)
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    victim = box["victim"].name
    assert any(f"read on {victim} failed, retrying elsewhere" in m for m in _logged(caplog)), _logged(caplog)[:5]
    h = health_by_node(env.cluster)[victim]
    assert h["banned_for_s"] > 0 or h["up"] is False, h
    other = f"{shard}/r{1 - int(victim[-1])}"
    after = env.nodes_since(n_after)
    assert victim not in after and other in after, sorted(set(after))
    assert count[0] > 40 and sum(short_path_taken) > 20, (count[0], sum(short_path_taken))


# -- 2. outside a transaction, one of two replicas killed mid-load: the other serves ----------


# (Since SQLAlchemy 2.1, get() with populate_existing=True passes it as an execution option
# as well: its load has two, and takes the general path; on 2.0 it takes the short path,
# as the others do.)
SHORT = ("get", "get_one", "query_get", "selectinload") + (
    () if tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1) else ("populate_existing",))


@pytest.mark.parametrize("name", ["get", "get_one", "query_get", "populate_existing", "missing"])
def test_a_get_whose_replica_dies_mid_load_is_served_by_the_other_replica(env, short_path_taken, name,
                                                                           caplog):
    shard = "s1"
    k = env.seeded[shard][3] if name != "missing" else env.key(shard)
    caplog.set_level(logging.WARNING, logger="shardkit")
    caplog.clear()
    with kill_first_reader(env, shard) as box:
        with env.Session(consistency="eventual") as s:
            n0 = len(env.served)
            if name == "missing":
                assert s.get(Acct, k) is None
            else:
                _check(GETS[name](s, k), k, shard)
            nodes = env.nodes_since(n0)
            pins = dict(s._sk_replica)
    victim = box["victim"].name
    other = f"{shard}/r{1 - int(victim[-1])}"
    assert nodes == [other], nodes
    assert short_path_taken == ([True] if name in SHORT or name == "missing" else []), short_path_taken
    assert pins == {shard: int(other[-1])}, pins
    assert [m for m in _logged(caplog) if victim in m and "retrying" in m], _logged(caplog)


def test_a_get_whose_replica_dies_between_its_load_and_its_selectinload(env, short_path_taken):
    """The object's row came from replica X (the transaction's first read of the shard:
    X is its pin); X dies before the eager load of its collection, which is then the
    transaction's later read: the primary serves it (never another replica)."""
    shard = "s1"
    k = env.seeded[shard][4]
    with kill_first_reader(env, shard, table="grf_notes") as box:
        with env.Session(consistency="eventual") as s:
            n0 = len(env.served)
            obj = GETS["selectinload"](s, k)
            _check(obj, k, shard)
            assert [n.body for n in obj.notes] == [f"b{k}"]
            nodes = env.nodes_since(n0)
    assert short_path_taken == [True]
    assert nodes == [box["victim"].name, f"{shard}/primary"], nodes


# -- 3. inside a transaction pinned to the replica that dies: as the general path --------------


def _pinned_then_killed(env: Env, name: str, when: str) -> tuple[Any, ...]:
    """A transaction reads k1 on replica X (its pin); the other replica Y is made to lag
    and k2 is changed on the primary; X has replayed it.  X is killed in the middle of the
    transaction's get() of k2 (``when="mid_load"``), or before it, seen down by the monitor
    (``"seen_down"``); then the transaction changes k1 and commits.  (the name read or the
    error, the nodes that ran it, the pin, the commit's outcome)."""
    shard = "s0"
    k1, k2 = env.key(shard), env.key(shard)
    with env.Session() as s:
        s.add_all([Acct(id=k1, name="one"), Acct(id=k2, name="v1")])
        s.commit()
    env.caught_up((shard,))
    wait_replicas_usable(env.cluster, every=True)
    s = env.Session(consistency="eventual")
    try:
        s.begin()
        n0 = len(env.served)
        assert s.get(Acct, k1).name == "one"
        (x,) = env.nodes_since(n0)
        assert x.startswith(f"{shard}/r"), x
        X, Y = env.replica(shard, int(x[-1])), env.replica(shard, 1 - int(x[-1]))
        Y.set_apply_delay(60)
        with env.dev.shard(shard).primary.connect() as c:
            c.execute("UPDATE grf_accounts SET name = 'v2' WHERE id = %s", (k2,))
        X.wait_caught_up()
        with Y.connect() as c:  # Y really is behind
            assert c.execute("SELECT name FROM grf_accounts WHERE id = %s", (k2,)).fetchone()[0] == "v1"
        if when == "seen_down":
            X.kill()
            wait_for(lambda: health_by_node(env.cluster)[X.name]["up"] is False, 5, "X seen down")
        with kill_first_reader(env, shard, armed=when == "mid_load") as box:
            n1 = len(env.served)
            try:
                got: Any = GETS[name](s, k2).name
            except Exception as e:  # noqa: BLE001 - compared
                got = type(e).__name__
        assert box["victim"] is (X if when == "mid_load" else None)
        nodes, pin = env.nodes_since(n1), s._sk_replica.get(shard)
        try:
            s.get(Acct, k1).name = "one2"
            s.commit()
            committed: Any = "ok"
        except Exception as e:  # noqa: BLE001 - compared
            committed = f"{type(e).__name__}: {e}"[:300]
        return got, nodes, pin, committed
    finally:
        s.close()


@pytest.mark.parametrize("when", ["mid_load", "seen_down"])
@pytest.mark.parametrize("name", ["get", "query_get"])
def test_a_pinned_get_whose_replica_dies_never_goes_back_in_time_as_the_general_path(
        env, monkeypatch, short_path_taken, name, when):
    short = _pinned_then_killed(env, name, when)
    assert short_path_taken[0] is True
    # restore before the general path's turn
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
    for r in env.dev.shard("s0").replicas:
        r.set_apply_delay(0)
        r.wait_streaming()
    env.caught_up(("s0",))
    with general_path_only(monkeypatch):
        general = _pinned_then_killed(env, name, when)
    assert short[0] == "v2", f"the pinned get went back in time: {short}"
    assert short == general, (short, general)
    assert short[1] == ["s0/primary"] and short[2] == sk_session._ON_PRIMARY and short[3] == "ok", short


def test_pinned_get_when_every_replica_dies_under_raise_names_them_as_the_general_path(env, monkeypatch):
    """[replicas] when_no_replica = "raise": a transaction read the shard on X; Y is down
    and X dies mid-load: ShardUnavailable naming both replicas (README), by either path."""
    shard = "s0"
    strict = _make_cluster(env.dev, when_no_replica="raise")
    strict.start_monitor()
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=strict)
    k1, k2 = env.seeded[shard][1], env.seeded[shard][2]
    out = []
    try:
        for general in (False, True):
            wait_replicas_usable(strict, every=True)
            ctx = general_path_only(monkeypatch) if general else contextlib.nullcontext()
            with ctx, Session(consistency="eventual") as s:
                s.begin()
                assert s.get(Acct, k1).name == f"n{k1}"
                x = s._sk_replica[shard]
                Y = env.replica(shard, 1 - x)
                Y.kill()
                wait_for(lambda: health_by_node(strict)[Y.name]["up"] is False, 5, "Y seen down")
                t0 = time.monotonic()
                with _kill_on(strict, env.replica(shard, x), shard, x):
                    with pytest.raises(shardkit.ShardUnavailable) as ei:
                        s.get(Acct, k2)
                msg = str(ei.value)
                out.append((msg.split(" (")[0], f"{shard}/r0" in msg and f"{shard}/r1" in msg,
                            time.monotonic() - t0 < 2.0))
            for node in env.dev.shard(shard).replicas:
                if not node.is_running():
                    node.start()
                node.wait_streaming()
    finally:
        strict.dispose()
    assert out[0] == out[1], out
    assert out[0][1] and out[0][2], out


@contextlib.contextmanager
def _kill_on(cluster: shardkit.Cluster, node: Any, shard: str, index: int) -> Iterator[None]:
    eng = cluster.engine(shard, "replica", index)
    fired = []

    def before(conn, cursor, statement, *a):
        if "grf_" in statement and not fired:
            fired.append(statement)
            node.kill()
    event.listen(eng, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(eng, "before_cursor_execute", before)
    assert fired, "the replica was not read"


# -- 3b. a replica restarted while no get used it: its pooled connections are replaced --------


def test_gets_after_a_replica_restarts_meet_no_dead_pooled_connection(env, short_path_taken, caplog):
    """README: once the monitor sees a node restarted, it replaces its pooled connections,
    so the next statement does not meet a dead one: no get() fails over, no ban."""
    shard = "s1"
    ks = env.seeded[shard][10:20]
    for _ in range(6):                      # pooled connections on both replicas
        with env.Session(consistency="eventual") as s:
            for k in ks:
                s.get(Acct, k)
    r = env.replica(shard, 0)
    r.kill()
    wait_for(lambda: health_by_node(env.cluster)[r.name]["up"] is False, 5, "r0 seen down")
    r.start()
    r.wait_streaming()
    wait_replicas_usable(env.cluster, every=True)
    n0 = len(env.served)
    caplog.set_level(logging.WARNING, logger="shardkit")
    caplog.clear()
    for _ in range(6):
        with env.Session(consistency="eventual") as s:
            for k in ks:
                _check(s.get(Acct, k), k, shard)
    assert not [m for m in _logged(caplog) if "retrying" in m or "banned" in m], _logged(caplog)
    assert r.name in env.nodes_since(n0)


# -- 4. every replica down ---------------------------------------------------------------------


def _every_replica_down_outcomes(env: Env, cluster: shardkit.Cluster, served: list, k: int,
                                 monkeypatch: Any) -> list[tuple[Any, ...]]:
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    out = []
    for general in (False, True):
        ctx = general_path_only(monkeypatch) if general else contextlib.nullcontext()
        with ctx:
            for name in ("get", "get_one", "populate_existing"):
                with Session(consistency="eventual") as s:
                    n0 = len(served)
                    t0 = time.monotonic()
                    try:
                        obj = GETS[name](s, k)
                        got: Any = ("ok", obj.name)
                    except Exception as e:  # noqa: BLE001
                        got = ("error", type(e).__name__, str(e).split(" (")[0])
                    out.append((general, name, got, env.nodes_since(n0, served),
                                time.monotonic() - t0 < 2.0))
    return out


def test_every_replica_down_get_reads_the_primary_or_raises_when_told(env, monkeypatch):
    shard = "s1"
    k = env.seeded[shard][5]
    strict = _make_cluster(env.dev, when_no_replica="raise")
    strict_served: list = []
    record_statements(strict, strict_served)
    strict.start_monitor()
    try:
        wait_replicas_usable(strict, every=True)
        # warm pooled connections on every node for both clusters
        for c in (env.cluster, strict):
            for _ in range(4):
                with sessionmaker(class_=shardkit.ShardedSession, cluster=c)(consistency="eventual") as s:
                    s.get(Acct, k)
        for r in env.dev.shard(shard).replicas:
            r.kill()
        # at once (the monitor may not have seen them down: the pooled connections fail)
        soft = _every_replica_down_outcomes(env, env.cluster, env.served, k, monkeypatch)
        hard = _every_replica_down_outcomes(env, strict, strict_served, k, monkeypatch)
        wait_for(lambda: all(not h["up"] for n, h in health_by_node(strict).items() if n.startswith("s1/r")),
                 5, "s1's replicas seen down")
        soft += _every_replica_down_outcomes(env, env.cluster, env.served, k, monkeypatch)
        hard += _every_replica_down_outcomes(env, strict, strict_served, k, monkeypatch)
    finally:
        strict.dispose()
    for general, name, got, nodes, quick in soft:
        assert got == ("ok", f"n{k}") and nodes == ["s1/primary"] and quick, (general, name, got, nodes)
    for general, name, got, nodes, quick in hard:
        assert got[:2] == ("error", "ShardUnavailable") and nodes == [] and quick, (general, name, got)
    # the short path and the general path say the same
    by = {}
    for general, name, got, *_ in hard:
        by.setdefault(name, set()).add(got)
    assert all(len(v) == 1 for v in by.values()), by


# -- 5. a stopped primary: gets go on from the replicas -----------------------------------------


@pytest.mark.parametrize("how", ["stop", "sigstop"])
def test_stopped_primary_gets_served_by_replicas_writes_fail_fast(env, short_path_taken, how):
    """The primary stopped (pg_ctl stop), or hung (its processes sent SIGSTOP): gets of
    every kind go on from the replicas, quickly, also with the session's own token, and
    when one replica dies mid-load; writes and strong gets fail with ShardUnavailable
    quickly (a hung primary: once the monitor has not heard from it for hung_after)."""
    shard = "s1"
    k = env.seeded[shard][7]
    kw = env.key(shard)
    with env.Session() as s:        # a token of this session's own write, before the stop
        s.add(Acct(id=kw, name="mine"))
        s.commit()
        token = s.consistency_token()
    env.caught_up((shard,))
    wait_replicas_usable(env.cluster, every=True)
    primary = env.dev.shard(shard).primary
    hung_after = env.cluster.monitor().hung_after
    pids = server_pids(primary) if how == "sigstop" else []
    if how == "stop":
        primary.stop()
    else:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
    try:
        if how == "stop":
            wait_for(lambda: health_by_node(env.cluster)[f"{shard}/primary"]["up"] is False, 5, "primary down")
        else:
            time.sleep(hung_after + 0.3)
        n0 = len(env.served)
        slow = []
        for consistency in ("eventual", "read_your_writes"):
            for name in GETS:
                t0 = time.monotonic()
                with env.Session(consistency=consistency, consistency_token=token) as s:
                    _check(GETS[name](s, k), k, shard)
                    _check(GETS[name](s, kw), kw, shard, "mine")
                if time.monotonic() - t0 > 1.0:
                    slow.append((consistency, name, time.monotonic() - t0))
        nodes = env.nodes_since(n0)
        assert nodes and all(n.startswith(f"{shard}/r") for n in nodes), nodes
        assert not slow, slow
        assert sum(short_path_taken) >= 10, short_path_taken
        # a replica killed mid-load while the primary is down: the other replica serves
        with kill_first_reader(env, shard) as box, env.Session(consistency="eventual") as s:
            n1 = len(env.served)
            _check(s.get(Acct, k), k, shard)
            assert env.nodes_since(n1) == [f"{shard}/r{1 - int(box['victim'].name[-1])}"]
        # writes and strong reads: ShardUnavailable, quickly
        for maker, fn in (({}, lambda s: (setattr(s.get(Acct, k), "name", "x"), s.commit())),
                          ({"consistency": "strong"}, lambda s: s.get(Acct, env.seeded[shard][8]))):
            t0 = time.monotonic()
            with env.Session(**maker) as s:
                with pytest.raises(shardkit.ShardUnavailable) as ei:
                    fn(s)
            assert ei.value.shard == shard and time.monotonic() - t0 < 2.0 + hung_after
    finally:
        resume(pids)
        primary.start()
        wait_for(lambda: health_by_node(env.cluster)[f"{shard}/primary"]["up"], 10, "primary back")
        env.cluster.primary(shard).dispose()


# -- 6. a replica past the lag limit gets no gets ----------------------------------------------


def test_replica_past_the_lag_limit_gets_no_gets_and_read_your_writes_is_never_stale(env, short_path_taken):
    shard = "s0"
    tight = _make_cluster(env.dev, max_lag_seconds=1.0, wait_for_token=0.5)
    served: list = []
    record_statements(tight, served)
    tight.start_monitor()
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=tight)
    k = env.key(shard)
    try:
        wait_replicas_usable(tight, every=True)
        with Session() as s:
            s.add(Acct(id=k, name="w0"))
            s.commit()
        env.caught_up((shard,))
        late = env.replica(shard, 0)
        late.set_apply_delay(30)
        stale: list[Any] = []
        for i in range(1, 4):
            with Session(consistency="read_your_writes") as s:
                s.get(Acct, k).name = f"w{i}"
                s.commit()
                for name in GETS:
                    got = GETS[name](s, k).name
                    if got != f"w{i}":
                        stale.append((i, name, got))
                token = s.consistency_token()
            with Session(consistency="read_your_writes", consistency_token=token) as s:
                for name in GETS:
                    s.expire_all()
                    got = GETS[name](s, k).name
                    if got != f"w{i}":
                        stale.append((i, name, "token", got))
        assert not stale, stale
        wait_for(lambda: (health_by_node(tight)[late.name]["lag_seconds"] or 0) > 1.5, 10, "r0's lag seen")
        env.replica(shard, 1).wait_caught_up()
        n0 = len(served)
        for _ in range(3):
            for name in GETS:
                with Session(consistency="eventual") as s:
                    assert GETS[name](s, k).name == "w3"
        nodes = env.nodes_since(n0, served)
        assert nodes and late.name not in nodes, nodes
        assert any(n == f"{shard}/r1" for n in nodes), nodes
    finally:
        tight.dispose()


# -- 7. read-your-writes while the replica that has the write dies mid-load -------------------


@pytest.mark.parametrize("who", ["same_session", "token"])
@pytest.mark.parametrize("name", ["get", "get_one", "query_get", "populate_existing"])
def test_read_your_writes_get_is_never_stale_when_the_caught_up_replica_dies_mid_load(
        env, short_path_taken, name, who):
    """A session wrote k ('w2') and committed; replica A has replayed it (the monitor has
    seen it), B replays 60 s late (within the lag limit, short of the session's position).
    A dies in the middle of the get: neither the session (its objects expunged) nor a fresh
    one given its token reads B's 'w1'."""
    shard = "s1"
    k = env.key(shard)
    with env.Session() as s:
        s.add(Acct(id=k, name="w1"))
        s.commit()
    env.caught_up((shard,))
    wait_replicas_usable(env.cluster, every=True)
    A, B = env.dev.shard(shard).replicas
    B.set_apply_delay(60)
    s = env.Session(consistency="read_your_writes")
    try:
        s.get(Acct, k).name = "w2"
        s.commit()
        token = s.consistency_token()
        lsn = s._sk_tokens[shard]
        A.wait_caught_up()
        wait_for(lambda: [r.index for r in env.cluster.selector.eligible(
            shard, max_lag_seconds=300, max_lag_bytes=1 << 40, min_lsn=lsn)[0]] == [0], 5,
            "A seen past the session's write, B not")
        reader = s if who == "same_session" else env.Session(consistency_token=token)
        reader.expunge_all()
        short_path_taken.clear()
        with kill_first_reader(env, shard) as box:
            n0 = len(env.served)
            value = GETS[name](reader, k).name
            nodes = env.nodes_since(n0)
        reader.close()
    finally:
        s.close()
    assert box["victim"] is A
    assert value == "w2", (value, nodes)
    assert nodes == [f"{shard}/primary"], nodes
    assert short_path_taken == ([True] if name in SHORT else []), short_path_taken
