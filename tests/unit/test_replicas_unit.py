"""Replica selection, lag arithmetic and consistency tokens, with no server."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import shardkit
from shardkit._config import ReplicaSettings, load_config
from shardkit._replicas import (
    HealthMonitor,
    ReplicaSelector,
    format_lsn,
    format_token,
    parse_lsn,
    parse_token,
    replay_target,
)

CFG = {
    "shards": [{"name": "s0", "primary": "postgresql://u@p/db",
                "replicas": ["postgresql://u@r0/db", {"url": "postgresql://u@r1/db", "weight": 3}]}],
}


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_lsn_round_trip(v):
    assert parse_lsn(format_lsn(v)) == v


@given(st.dictionaries(st.sampled_from(["s0", "s1", "shard_2"]), st.integers(0, 2**64 - 1)))
def test_token_round_trip(d):
    assert parse_token(format_token(d)) == d


@pytest.mark.parametrize("bad", ["", "v2:s0=0/1", "v1", "v1:s0=zz", "hello"])
def test_malformed_tokens(bad):
    with pytest.raises(shardkit.ShardkitError):
        parse_token(bad)


def test_replay_target_steps_back_over_page_headers():
    assert replay_target(8192 + 24) == 8192              # short header
    assert replay_target(16 * 1024 * 1024 + 40) == 16 * 1024 * 1024  # segment start: long header
    assert replay_target(8192 + 100) == 8192 + 100


def make_monitor(**settings):
    cluster = shardkit.Cluster.from_config({**CFG, "replicas": settings})
    mon = HealthMonitor(cluster, cluster.replica_settings)   # not started: samples set by hand
    sel = ReplicaSelector(cluster, mon, cluster.replica_settings)
    st_ = mon.shards["s0"]
    now = time.monotonic()
    for n in (st_.primary, *st_.replicas):
        n.up, n.checked_at, n._seen = True, now, True
        n.in_recovery = n.role == "replica"
    return mon, sel, st_


def test_lag_zero_when_gap_not_positive_and_time_lag_only_with_gap():
    mon, sel, st_ = make_monitor()
    st_.primary.wal_lsn = 1000
    r0, r1 = st_.replicas
    r0.wal_lsn, r0.replay_timestamp_age = 1200, 50.0   # ahead of a stale primary sample
    r1.wal_lsn, r1.replay_timestamp_age = 900, 50.0
    mon._update_lag(st_)
    assert (r0.lag_bytes, r0.lag_seconds) == (0, 0.0)   # idle primary: no lag
    assert (r1.lag_bytes, r1.lag_seconds) == (100, 50.0)


def test_eligibility_by_limits_bans_and_token():
    mon, sel, st_ = make_monitor()
    st_.primary.wal_lsn = 10_000
    r0, r1 = st_.replicas
    r0.wal_lsn, r0.replay_timestamp_age = 10_000, 0.0
    r1.wal_lsn, r1.replay_timestamp_age = 9_000, 3.0
    mon._update_lag(st_)
    ok, behind = sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=10**6, min_lsn=None)
    assert [r.name for r in ok] == ["s0/r0", "s0/r1"]
    ok, _ = sel.eligible("s0", max_lag_seconds=1, max_lag_bytes=10**6, min_lsn=None)
    assert [r.name for r in ok] == ["s0/r0"]
    ok, _ = sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=500, min_lsn=None)
    assert [r.name for r in ok] == ["s0/r0"]
    ok, behind = sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=10**6, min_lsn=9_500)
    assert [r.name for r in ok] == ["s0/r0"] and [r.name for r in behind] == ["s0/r1"]
    mon.ban("s0", 0, "test", seconds=60)
    ok, _ = sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=10**6, min_lsn=None)
    assert [r.name for r in ok] == ["s0/r1"]
    r1.up = False
    assert sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=10**6, min_lsn=None)[0] == []


def test_stale_samples_are_not_trusted():
    mon, sel, st_ = make_monitor()
    st_.primary.wal_lsn = 100
    for r in st_.replicas:
        r.wal_lsn, r.replay_timestamp_age = 100, 0.0
        r.checked_at = time.monotonic() - 60
    mon._update_lag(st_)
    assert sel.eligible("s0", max_lag_seconds=5, max_lag_bytes=10**6, min_lsn=None)[0] == []


def test_round_robin_and_weighted_random():
    mon, sel, st_ = make_monitor(policy="round_robin")
    reps = st_.replicas
    picks = [sel.pick("s0", reps).name for _ in range(10)]
    assert picks.count("s0/r0") == 5
    mon, sel, st_ = make_monitor(policy="random")
    sel._rand.seed(1)
    picks = [sel.pick("s0", st_.replicas).name for _ in range(4000)]
    share = picks.count("s0/r1") / len(picks)
    assert 0.70 < share < 0.80          # weight 3 vs 1
    mon, sel, st_ = make_monitor(policy="lowest_latency")
    st_.replicas[0].latency_ms, st_.replicas[1].latency_ms = 5.0, 1.0
    assert sel.pick("s0", st_.replicas).name == "s0/r1"


def test_replica_settings_validation():
    with pytest.raises(shardkit.ConfigurationError, match="replicas.policy"):
        load_config({**CFG, "replicas": {"policy": "fastest"}})
    with pytest.raises(shardkit.ConfigurationError, match="replicas.max_lag_seconds"):
        load_config({**CFG, "replicas": {"max_lag_seconds": -1}})
    with pytest.raises(shardkit.ConfigurationError, match=r"replicas\[1\].weight"):
        load_config({"shards": [{"name": "s0", "primary": "postgresql://u@p/db",
                                 "replicas": ["postgresql://u@r/db", {"url": "postgresql://u@r/db", "weight": 0}]}]})
    c = load_config({**CFG, "replicas": {"consistency": "eventual", "max_lag_bytes": 1024}})
    assert c.replicas == ReplicaSettings(consistency="eventual", max_lag_bytes=1024)
    assert c.shards[0].replica_weights == (1.0, 3.0)


def test_first_poll_is_waited_for_outside_the_clusters_lock(monkeypatch):
    """monitor() waited for the monitor's first poll while holding the cluster's lock, so
    another thread's first engine() (or scatter threads) waited as long: up to the poll
    timeout and more when a node hangs."""
    import threading

    from shardkit._replicas import HealthMonitor

    release = threading.Event()
    waiting = threading.Event()

    def slow_first_poll(self, timeout=None):
        waiting.set()
        release.wait(10)

    monkeypatch.setattr(HealthMonitor, "wait_first_poll", slow_first_poll)
    monkeypatch.setattr(HealthMonitor, "start", lambda self: None)  # no polling threads
    cluster = shardkit.Cluster.from_config({"shards": [
        {"name": "s0", "primary": "postgresql://u@127.0.0.1:1/d", "replicas": ["postgresql://u@127.0.0.1:2/d"]}]})
    try:
        first = threading.Thread(target=cluster.start_monitor)
        first.start()
        assert waiting.wait(5)
        got = []
        other = threading.Thread(target=lambda: got.append(cluster.engine("s0")))
        other.start()
        other.join(5)
        assert got, "engine() waited for another thread's first poll"
        # (Set before the first poll; `cluster.selector`, a read's, waits for it, in every thread.)
        assert cluster._selector is not None
    finally:
        release.set()
        first.join(5)
        cluster.dispose()
