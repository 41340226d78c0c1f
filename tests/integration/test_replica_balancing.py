"""Replica balancing and lag limits, as a user tuning a read-heavy app with two replicas
per shard sees them on real streaming replicas.

Selector arithmetic with no server: tests/unit/test_replica_balancing_unit.py."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

TABLE = "bal6h_items"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(50))


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    """2 shards, 2 replicas each: the module's own (tests here delay replicas)."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=2)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), "groups": {"g": {"tables": {TABLE: "id"}}}},
                                           metadata=Base.metadata)
    try:
        for s in cluster.shard_names:
            Base.metadata.create_all(cluster.primary(s))
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add_all(Item(id=i, v="x") for i in range(1, 41))
            s.commit()
    finally:
        cluster.dispose()
    caught_up(dev)
    return dev


def caught_up(dev: Any) -> None:
    for shard in dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()


class Env:
    def __init__(self, dev: Any, **replicas: Any) -> None:
        cfg = {**dev.config_dict(), "groups": {"g": {"tables": {TABLE: "id"}}},
               "replicas": {"poll_interval": 0.1, "consistency": "eventual", **replicas}}
        self.cluster = cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
        self.served: list[str] = []
        for s in cluster.shard_names:
            for i in range(-1, cluster.replica_count(s)):
                eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
                event.listen(eng, "before_cursor_execute",
                             lambda c, cur, st, *a, node=eng.info["node"], **k:
                             self.served.append(node) if TABLE in st else None)
        cluster.start_monitor()
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        self.k0 = next(k for k in range(1, 41) if cluster.shard_for(TABLE, k) == "s0")

    def nodes(self, fn: Any) -> list[str]:
        n0 = len(self.served)
        fn()
        return self.served[n0:]

    def per_session(self, fn: Any, n: int) -> list[str]:
        """The node(s) each of ``n`` sessions' ``fn(session)`` read, one string per session."""
        out = []
        for _ in range(n):
            with self.Session() as s:
                out.append(",".join(sorted(set(self.nodes(lambda: fn(s))))))
        return out


@pytest.fixture
def make(dev):
    envs: list[Env] = []

    def make(**replicas: Any) -> Env:
        envs.append(Env(dev, **replicas))
        return envs[-1]

    yield make
    for e in envs:
        e.cluster.dispose()


def test_round_robin_alternates_on_every_read_path(make):
    env = make(policy="round_robin")
    k0 = env.k0
    paths = {
        "get": lambda s: s.get(Item, k0),
        "select": lambda s: s.execute(select(Item).where(Item.id == k0)).all(),
        "query": lambda s: s.query(Item).filter(Item.id == k0).all(),
        "yield_per": lambda s: list(s.execute(select(Item).where(Item.id == k0).execution_options(yield_per=2))),
        "query_yield_per": lambda s: list(s.query(Item).filter(Item.id == k0).yield_per(2)),
        "lag_option": lambda s: s.execute(select(Item).where(Item.id == k0)
                                          .execution_options(shardkit_max_lag_seconds=60)).all(),
    }
    for name, fn in paths.items():
        seq = env.per_session(fn, 6)
        assert set(seq) == {"s0/r0", "s0/r1"}, (name, seq)
        assert all(a != b for a, b in zip(seq, seq[1:])), (name, seq)   # strictly alternating
    seq = env.per_session(lambda s: s.execute(select(Item)).all(), 6)          # scatter
    for shard in ("s0", "s1"):
        mine = [next(n for n in nodes.split(",") if n.startswith(shard)) for nodes in seq]
        assert all(a != b for a, b in zip(mine, mine[1:])), (shard, seq)


def test_round_robin_across_threads_starves_no_replica(make):
    env = make(policy="round_robin")

    def run() -> None:
        for _ in range(40):
            with env.Session() as s:
                s.get(Item, env.k0)

    n0 = len(env.served)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    used = Counter(env.served[n0:])
    assert set(used) == {"s0/r0", "s0/r1"} and abs(used["s0/r0"] - used["s0/r1"]) <= 8, used


def test_least_outstanding_spreads_reads_that_do_not_overlap(make):
    """A sync web worker serves one request at a time: at each read every replica of this
    process is idle.  Every such read went to r0; r1 got none."""
    env = make(policy="least_outstanding")
    used = Counter(env.per_session(lambda s: s.get(Item, env.k0), 20))
    assert used == {"s0/r0": 10, "s0/r1": 10}, used


def test_least_outstanding_sends_reads_past_a_replica_holding_streamed_reads(make):
    env = make(policy="least_outstanding")
    with env.Session() as held:
        rows = held.execute(select(Item).where(Item.id == env.k0).execution_options(yield_per=1))
        busy = env.served[-1]
        idle = ({"s0/r0", "s0/r1"} - {busy}).pop()
        assert env.per_session(lambda s: s.get(Item, env.k0), 10) == [idle] * 10
        rows.all()
    # Both idle again: in turn.
    assert Counter(env.per_session(lambda s: s.get(Item, env.k0), 10)) == {"s0/r0": 5, "s0/r1": 5}


def test_weighted_random_three_to_one(dev):
    cfg = dev.config_dict()
    s0 = cfg["shards"][0]
    urls = list(s0["replicas"])
    s0["replicas"] = [{"url": urls[0], "weight": 3}, {"url": urls[1], "weight": 1}]
    cluster = shardkit.Cluster.from_config({**cfg, "groups": {"g": {"tables": {TABLE: "id"}}},
                                            "replicas": {"poll_interval": 0.1, "consistency": "eventual",
                                                         "policy": "random"}}, metadata=Base.metadata)
    k0 = next(k for k in range(1, 41) if cluster.shard_for(TABLE, k) == "s0")
    try:
        served: list[str] = []
        for i in range(2):
            eng = cluster.engine("s0", "replica", i)
            event.listen(eng, "before_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k:
                         served.append(node) if TABLE in st else None)
        cluster.start_monitor()
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        n = 2000
        for _ in range(n):
            with Session() as s:
                s.get(Item, k0)
        used = Counter(served)
        assert sum(used.values()) == n, used
        # 6 standard deviations of a binomial draw: a false failure about once in 10^9 runs.
        assert abs(used["s0/r0"] - 0.75 * n) < 6 * math.sqrt(n * 0.75 * 0.25), used
    finally:
        cluster.dispose()


def _behind(dev: Any, shard: str = "s0", commits: int = 40) -> None:
    """Make both replicas of ``shard`` a few KB behind (they apply commits 60 s late)."""
    for r in dev.shard(shard).replicas:
        r.set_apply_delay(60)
    with dev.shard(shard).primary.connect() as c:
        for _ in range(commits):
            c.execute("SELECT txid_current()")


def _restore(dev: Any, shard: str = "s0") -> None:
    for r in dev.shard(shard).replicas:
        r.set_apply_delay(0)
    caught_up(dev)


def _wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _s0_replicas_lag(env: Env) -> list[int]:
    return [n["lag_bytes"] or 0 for n in env.cluster.health().nodes
            if n["shard"] == "s0" and n["role"] == "replica"]


def test_when_no_replica_raise_says_which_limit_each_replica_is_past(dev, make):
    """max_lag_bytes = 1000: the error said "s0/r0 is 1.2 s (0.0 MB) behind; limit 300 s /
    0.0 MB", naming neither the limit passed nor the gap."""
    env = make(when_no_replica="raise", max_lag_bytes=1000, max_lag_seconds=300)
    try:
        _behind(dev)
        _wait(lambda: min(_s0_replicas_lag(env)) > 1000)
        with env.Session() as s, pytest.raises(shardkit.ShardUnavailable) as ei:
            s.get(Item, env.k0)
        msg = str(ei.value)
        assert ei.value.shard == "s0" and "when_no_replica" in msg, msg
        assert "0.0 MB" not in msg, msg
        for r in ("s0/r0", "s0/r1"):
            assert f"{r} is " in msg, msg
        assert msg.count("past max_lag_bytes = 1000") == 2 and "max_lag_seconds" not in msg, msg
        # A read's own looser limit serves it; a stricter one is refused the same way.
        with env.Session() as s:
            nodes = env.nodes(lambda: s.execute(select(Item).where(Item.id == env.k0)
                                                .execution_options(shardkit_max_lag_bytes=10**9)).all())
            assert nodes and all(n in ("s0/r0", "s0/r1") for n in nodes), nodes
        with env.Session() as s, shardkit.scope(max_lag_bytes=10**9):
            assert set(env.nodes(lambda: s.get(Item, env.k0))) <= {"s0/r0", "s0/r1"}
    finally:
        _restore(dev)


def test_when_no_replica_raise_holds_for_a_transaction_whose_replica_fell_out(dev, make):
    """A transaction read s0 from a replica; then every replica of s0 fell past the lag
    limit.  A new session's read raises (when_no_replica = "raise"), but the transaction's
    next read went to the primary, silently: the setting did not hold within it."""
    env = make(when_no_replica="raise", max_lag_bytes=1000, max_lag_seconds=300)
    try:
        with env.Session() as s:
            first = env.nodes(lambda: s.execute(select(Item).where(Item.id == env.k0)).all())
            assert first and first[0] in ("s0/r0", "s0/r1"), first
            _behind(dev)
            _wait(lambda: min(_s0_replicas_lag(env)) > 1000)
            with env.Session() as fresh, pytest.raises(shardkit.ShardUnavailable):
                fresh.get(Item, env.k0)
            with pytest.raises(shardkit.ShardUnavailable, match="when_no_replica"):
                s.execute(select(Item.v).where(Item.id == env.k0)).all()
    finally:
        _restore(dev)


def test_per_read_lag_limits_override_config_both_ways(dev, make):
    """Config 300 s / 1000 bytes; both replicas a few KB behind.  Looser per statement and
    per scope: replicas serve.  Then config loose, per read stricter: the primary."""
    strict = make(max_lag_bytes=1000, max_lag_seconds=300)
    loose = make(max_lag_bytes=10**9, max_lag_seconds=300)
    q = select(Item).where(Item.id == strict.k0)
    try:
        _behind(dev)
        # Each cluster's own monitor must have seen the gap (loose's reads below judge by it).
        _wait(lambda: min(_s0_replicas_lag(strict)) > 1000 and min(_s0_replicas_lag(loose)) > 1000)
        reps = {"s0/r0", "s0/r1"}
        with strict.Session() as s:
            assert set(strict.nodes(lambda: s.execute(q).all())) == {"s0/primary"}
        for env, opts, want in (
                (strict, {"shardkit_max_lag_bytes": 10**9}, reps),
                (loose, {}, reps),
                (loose, {"shardkit_max_lag_bytes": 1000}, {"s0/primary"}),
                (loose, {"shardkit_max_lag_seconds": 0.0, "shardkit_max_lag_bytes": 100}, {"s0/primary"})):
            with env.Session() as s:
                got = set(env.nodes(lambda: s.execute(q.execution_options(**opts)).all()))
                assert got and got <= want, (opts, got)
            with env.Session() as s:
                got = set(env.nodes(lambda: list(s.execute(q.execution_options(yield_per=5, **opts)))))
                assert got and got <= want, ("yield_per", opts, got)
        with loose.Session() as s, shardkit.scope(max_lag_bytes=1000):
            assert set(loose.nodes(lambda: s.get(Item, loose.k0))) == {"s0/primary"}
        with strict.Session() as s, shardkit.scope(max_lag_bytes=10**9):
            assert set(strict.nodes(lambda: s.query(Item).filter(Item.id == strict.k0).all())) <= reps
        # A statement's limit overrides its block's, both ways.
        with loose.Session() as s, shardkit.scope(max_lag_bytes=1000):
            got = set(loose.nodes(lambda: s.execute(q.execution_options(shardkit_max_lag_bytes=10**9)).all()))
            assert got and got <= reps, got
    finally:
        _restore(dev)


@pytest.mark.parametrize("name,value", [("shardkit_max_lag_seconds", -1), ("shardkit_max_lag_seconds", "5"),
                                        ("shardkit_max_lag_bytes", 1.5), ("shardkit_max_lag_bytes", -3),
                                        ("shardkit_max_lag_seconds", float("nan"))])
def test_bad_per_read_lag_limits_are_refused_before_any_read(make, name, value):
    env = make()
    from sqlalchemy.exc import ArgumentError
    with env.Session() as s:
        with pytest.raises(ArgumentError, match=name.removeprefix("shardkit_")):
            env.nodes(lambda: s.execute(select(Item).where(Item.id == env.k0).execution_options(**{name: value})))
        with pytest.raises(ValueError, match=name.removeprefix("shardkit_")), \
                shardkit.scope(**{name.removeprefix("shardkit_"): value}):
            pass
    assert env.served == []
