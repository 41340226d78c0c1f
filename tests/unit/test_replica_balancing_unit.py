"""Replica balancing as a user tuning a read-heavy app sees it, with no server: the
selector's policies over samples and pools set by hand."""

from __future__ import annotations

import math
import time
from collections import Counter
from types import SimpleNamespace

import pytest

import shardkit
from shardkit._session import _why_not
from test_replicas_unit import make_monitor  # samples set by hand, nothing started

CFG3 = {"shards": [{"name": "s0", "primary": "postgresql://u@p/db",
                    "replicas": ["postgresql://u@r0/db", "postgresql://u@r1/db", "postgresql://u@r2/db"]}]}


def _fake_pools(sel, counts):
    """Replica i's pool holds counts[i] connections checked out (this process's reads)."""
    for i, n in enumerate(counts):
        sel.cluster._engines[("s0", "replica", i)] = SimpleNamespace(
            pool=SimpleNamespace(checkedout=lambda n=n: n))


def test_least_outstanding_spreads_reads_when_no_replica_is_busier():
    """Reads that do not overlap (a sync web worker: one request at a time; a worker
    process of several, each counting only its own connections) find every replica idle.
    The tie went to the first replica every time: r1 never got a read, and r0 took the
    read load of every process."""
    mon, sel, st_ = make_monitor(policy="least_outstanding")
    _fake_pools(sel, [0, 0])
    used = Counter(sel.pick("s0", st_.replicas).name for _ in range(100))
    assert used["s0/r0"] == used["s0/r1"] == 50, used


def test_least_outstanding_still_prefers_the_idle_replica():
    mon, sel, st_ = make_monitor(policy="least_outstanding")
    _fake_pools(sel, [3, 0])
    assert {sel.pick("s0", st_.replicas).name for _ in range(20)} == {"s0/r1"}
    _fake_pools(sel, [0, 3])
    assert {sel.pick("s0", st_.replicas).name for _ in range(20)} == {"s0/r0"}
    # No engine yet for a replica (none of its reads ran in this process): idle.
    sel.cluster._engines.pop(("s0", "replica", 0))
    _fake_pools(sel, [])
    sel.cluster._engines[("s0", "replica", 1)] = SimpleNamespace(pool=SimpleNamespace(checkedout=lambda: 1))
    assert {sel.pick("s0", st_.replicas).name for _ in range(20)} == {"s0/r0"}


def test_least_outstanding_ties_among_the_least_busy_only():
    """Three replicas, one busy: the two idle ones share the reads, the busy one gets none."""
    cluster = shardkit.Cluster.from_config({**CFG3, "replicas": {"policy": "least_outstanding"}})
    from shardkit._replicas import HealthMonitor, ReplicaSelector
    mon = HealthMonitor(cluster, cluster.replica_settings)
    sel = ReplicaSelector(cluster, mon, cluster.replica_settings)
    reps = mon.shards["s0"].replicas
    _fake_pools(sel, [0, 2, 0])
    used = Counter(sel.pick("s0", reps).name for _ in range(100))
    assert set(used) == {"s0/r0", "s0/r2"} and abs(used["s0/r0"] - used["s0/r2"]) <= 2, used


def test_weighted_random_three_to_one_over_many_reads_unseeded():
    """weight 3 vs 1 (CFG's r1 and r0): about 75/25, within 6 standard deviations of a
    binomial draw (a false failure about once in 10^9 runs)."""
    mon, sel, st_ = make_monitor(policy="random")
    n = 20_000
    used = Counter(sel.pick("s0", st_.replicas).name for _ in range(n))
    sd = math.sqrt(n * 0.75 * 0.25)
    assert abs(used["s0/r1"] - 0.75 * n) < 6 * sd, used
    # Only the eligible ones are drawn from, each with its own weight.
    assert {sel.pick("s0", [st_.replicas[0]]).name for _ in range(50)} == {"s0/r0"}


def test_lowest_latency_follows_a_slow_replica_and_comes_back_after_it_recovers():
    """Driven through the monitor's own record of poll round trips."""
    mon, sel, st_ = make_monitor(policy="lowest_latency")
    r0, r1 = st_.replicas

    def poll(node, rtt):
        mon._record(node, up=True, in_recovery=True, lsn=None, rtt=rtt,
                    server_start=node._server_start, asked_at=time.monotonic())

    for _ in range(5):
        poll(r0, 1.0)
        poll(r1, 1.2)
    assert sel.pick("s0", st_.replicas) is r0
    for _ in range(3):                  # r0 under load: its polls take 40 ms
        poll(r0, 40.0)
        poll(r1, 1.2)
    assert sel.pick("s0", st_.replicas) is r1
    back = None
    for i in range(100):                # r0 recovers
        poll(r0, 1.0)
        poll(r1, 1.2)
        if sel.pick("s0", st_.replicas) is r0:
            back = i
            break
    assert back is not None and back < 30, back


def _lagging(max_lag_bytes, lag_bytes, lag_s=0.5):
    mon, sel, st_ = make_monitor(max_lag_bytes=max_lag_bytes, when_no_replica="raise")
    for r in st_.replicas:
        r.lag_bytes, r.lag_seconds = lag_bytes, lag_s
    return mon, sel, st_


def test_why_no_replica_names_the_limit_a_replica_is_past(monkeypatch):
    """max_lag_bytes below a megabyte: the error said "0.0 MB behind; limit 5 s / 0.0 MB",
    which does not tell which limit the replica is past, nor by how much."""
    mon, sel, st_ = _lagging(2000, 3024)
    monkeypatch.setattr(shardkit.Cluster, "selector", property(lambda self: sel))
    why = _why_not(sel.cluster, "s0", 5.0, 2000, None)
    assert "0.0 MB" not in why, why
    assert "3024 bytes" in why and "max_lag_bytes" in why and "2000" in why, why
    assert "max_lag_seconds" not in why, why      # within that one
    why = _why_not(sel.cluster, "s0", 0.25, 10**9, None)
    assert "max_lag_seconds" in why and "0.25" in why and "max_lag_bytes" not in why, why
    for r in st_.replicas:
        r.lag_seconds = None
    why = _why_not(sel.cluster, "s0", 5.0, 2000, None)
    assert "0.0 MB" not in why and "3024 bytes" in why, why
    # Large gaps still read in MB.
    for r in st_.replicas:
        r.lag_bytes, r.lag_seconds = 50_000_000, 0.5
    why = _why_not(sel.cluster, "s0", 5.0, 16 * 1024 * 1024, None)
    assert "50.0 MB" in why and "max_lag_bytes" in why, why


def test_why_no_replica_says_a_replica_not_polled_yet_is_that(monkeypatch):
    """A replica the monitor has not polled yet was "down (None)"."""
    mon, sel, st_ = make_monitor(when_no_replica="raise")
    monkeypatch.setattr(shardkit.Cluster, "selector", property(lambda self: sel))
    r0, r1 = st_.replicas
    r0.up, r0.checked_at, r0.error = False, 0.0, None
    r1.up, r1.checked_at, r1.error = False, time.monotonic(), "connection refused"
    why = _why_not(sel.cluster, "s0", 5.0, 10**9, None)
    assert f"{r0.name} has not answered its first health poll yet" in why, why
    assert f"{r1.name} is down (connection refused)" in why and "(None)" not in why, why


@pytest.mark.parametrize("w", [0, -1, float("nan"), float("inf"), "3", True, None])
def test_bad_weights_are_refused_naming_the_field(w):
    cfg = {"shards": [{"name": "s0", "primary": "postgresql://u@p/db",
                       "replicas": ["postgresql://u@r0/db", {"url": "postgresql://u@r1/db", "weight": w}]}]}
    with pytest.raises(shardkit.ConfigurationError, match=r"shards\[0\]\.replicas\[1\]\.weight"):
        shardkit.load_config(cfg)


@pytest.mark.parametrize("policy", ["round_robin", "least_outstanding", "lowest_latency", "random"])
def test_weights_another_policy_ignores_are_named_in_a_warning(policy, caplog):
    """Weights apply to policy = "random" only: under another policy they were silently
    ignored (a weight of 3 sent a replica no more reads than one of 1)."""
    cfg = {"shards": [{"name": "s0", "primary": "postgresql://u@p/db",
                       "replicas": ["postgresql://u@r0/db", {"url": "postgresql://u@r1/db", "weight": 3}]}],
           "replicas": {"policy": policy}}
    with caplog.at_level("WARNING", logger="shardkit.cluster"):
        shardkit.Cluster.from_config(cfg).dispose()
    warned = [r.getMessage() for r in caplog.records if "weights" in r.getMessage()]
    if policy == "random":
        assert not warned
    else:
        assert len(warned) == 1 and "s0/r1" in warned[0] and repr(policy) in warned[0], warned
