"""Replica lag when it cannot be told, and replicas that do not follow their primary
(the monitor's arithmetic, with samples set by hand)."""

import time

from test_replicas_unit import make_monitor  # samples set by hand, nothing started

LIMITS = {"max_lag_seconds": 5.0, "max_lag_bytes": 10**9, "min_lsn": None}


def names(nodes):
    return [n.name for n in nodes]


def test_lag_of_a_replica_behind_all_history_with_no_replayed_transaction_is_unknown():
    """The primary sits idle at 1000 from the monitor's first poll; r0 stopped at 900 and
    has no replay timestamp (nothing replayed since it started).  Each poll of the idle
    primary refreshes the history's only entry: the lag must not read as ~0 s."""
    mon, sel, st_ = make_monitor()
    r0, r1 = st_.replicas
    r0.wal_lsn, r0.replay_timestamp_age = 900, None
    r1.wal_lsn, r1.replay_timestamp_age = 1000, 0.5
    for _ in range(3):
        mon._record(st_.primary, up=True, in_recovery=False, lsn=1000, rtt=1.0,
                    asked_at=time.monotonic())
    assert r0.lag_bytes == 100 and r0.lag_seconds is None
    assert names(sel.eligible("s0", **LIMITS)[0]) == ["s0/r1"]
    assert names(sel.eligible("s0", **{**LIMITS, "max_lag_seconds": 1e9})[0]) == ["s0/r1"]


def test_lag_with_no_replayed_transaction_is_bounded_by_the_history():
    """Seen at or before r0's position 2 s ago: at most 2 s behind, timestamp or not."""
    mon, sel, st_ = make_monitor()
    now = time.monotonic()
    st_.history = [(now - 2.0, 900), (now - 1.0, 1000)]
    st_.primary.wal_lsn = 1000
    r0 = st_.replicas[0]
    r0.wal_lsn, r0.replay_timestamp_age = 900, None
    mon._update_lag(st_)
    assert 1.9 < r0.lag_seconds < 3.0
    assert "s0/r0" in names(sel.eligible("s0", **LIMITS)[0])


def test_replica_clock_behind_the_primary_does_not_hide_its_lag():
    """r0's clock runs 10 s behind the primary's: its replay timestamp's age reads ~0 (or
    negative) while the primary was seen past r0's position 4 s ago.  The lag is at least
    that, and a 1 s limit keeps reads off it; r1, caught up, keeps them."""
    mon, sel, st_ = make_monitor()
    now = time.monotonic()
    st_.history = [(now - 6.0, 900), (now - 4.0, 1000), (now - 0.1, 1100)]
    st_.primary.wal_lsn = 1100
    r0, r1 = st_.replicas
    r0.wal_lsn, r0.replay_timestamp_age = 900, -5.0
    r1.wal_lsn, r1.replay_timestamp_age = 1100, 0.0
    r0._lsn_sample, r1._lsn_sample = (now, 900), (now, 1100)
    mon._update_lag(st_)
    assert 3.9 < r0.lag_seconds < 6.5, r0.lag_seconds
    assert r1.lag_seconds == 0.0
    assert names(sel.eligible("s0", **{**LIMITS, "max_lag_seconds": 1.0})[0]) == ["s0/r1"]


def test_a_replica_keeping_up_is_not_given_the_primarys_sampling_as_lag():
    """The primary was seen past r0's position 0.2 s ago, but r0 was seen there before
    that: the history proves no lag."""
    mon, sel, st_ = make_monitor()
    now = time.monotonic()
    st_.history = [(now - 0.5, 900), (now - 0.2, 1000)]
    st_.primary.wal_lsn = 1000
    r0 = st_.replicas[0]
    r0.wal_lsn, r0.replay_timestamp_age, r0._lsn_sample = 950, 0.01, (now - 0.3, 950)
    mon._update_lag(st_)
    assert r0.lag_seconds == 0.01


def _replica_answers(mon, node, lsn):
    mon._record(node, up=True, in_recovery=True, lsn=lsn, age=0.1, rtt=1.0,
                asked_at=time.monotonic())


def _primary_answers(mon, node, lsn, asked_at):
    mon._record(node, up=True, in_recovery=False, lsn=lsn, rtt=1.0, asked_at=asked_at)


def test_replica_past_a_later_primary_position_does_not_follow_it():
    """r0 answers 5000; the primary, asked after that answer, is at 3000 (a promoted
    replica that forked earlier): r0 gets no reads, for any token or mode, and keeps
    getting none while it stays at 5000, until its replay moves again."""
    mon, sel, st_ = make_monitor()
    p, (r0, r1) = st_.primary, st_.replicas
    _replica_answers(mon, r1, 2900)
    _replica_answers(mon, r0, 5000)
    _primary_answers(mon, p, 3000, time.monotonic())
    assert r0.not_following and r0.lag_bytes is None
    for min_lsn in (None, 2500, 4000):
        ok, behind = sel.eligible("s0", **{**LIMITS, "min_lsn": min_lsn})
        assert "s0/r0" not in names(ok) + names(behind)
    assert "does not follow" in r0.as_dict(mon.stale_after)["error"]
    for lsn in (3100, 3200, 4999):  # the new primary writes on; r0 stays where it was
        _primary_answers(mon, p, lsn, time.monotonic())
        _replica_answers(mon, r0, 5000)
        assert r0.not_following and "s0/r0" not in names(sel.eligible("s0", **LIMITS)[0])
    _primary_answers(mon, p, 6000, time.monotonic())
    assert r0.not_following  # overtaken by the primary, it is still not on its timeline
    _replica_answers(mon, r0, 6000)  # rewound and following again: judged afresh
    assert not r0.not_following and r0.lag_bytes == 0
    assert "s0/r0" in names(sel.eligible("s0", **LIMITS)[0])


def test_replica_ahead_of_an_older_primary_sample_is_fresh():
    """The primary's last sample was taken before r0 answered: r0 being past it is
    ordinary (the primary wrote on meanwhile), never taken for a replica that does not
    follow it."""
    mon, sel, st_ = make_monitor()
    p, r0 = st_.primary, st_.replicas[0]
    asked = time.monotonic()
    _replica_answers(mon, r0, 5000)
    _primary_answers(mon, p, 3000, asked - 0.001)   # sent before r0's answer came
    assert not r0.not_following and r0.lag_bytes == 0 and r0.lag_seconds == 0.0
    assert "s0/r0" in names(sel.eligible("s0", **LIMITS)[0])
    mon.note_replay_position("s0", 0, 5100)        # a probe: later than the primary's sample
    assert not r0.not_following


def test_monitor_connections_drop_a_poll_the_network_never_acknowledges():
    """The monitor's connections carry libpq's tcp_user_timeout (milliseconds), so a host
    that vanishes from the network frees its poll thread in seconds, not when TCP gives
    up; libpq accepts the parameter (it is checked by building the conninfo)."""
    from psycopg.conninfo import make_conninfo

    import shardkit
    from shardkit._replicas import HealthMonitor

    cluster = shardkit.Cluster.from_config({
        "shards": [{"name": "s0", "primary": "postgresql+psycopg://app@db.example/app",
                    "replicas": ["postgresql+psycopg://app@db-r.example/app"]}],
        "groups": {"g": {"tables": {"t": "id"}}}, "replicas": {"poll_timeout": 0.5}})
    mon = HealthMonitor(cluster, cluster.config.replicas)
    for node in (mon.shards["s0"].primary, *mon.shards["s0"].replicas):
        kw = mon._conninfo(node)
        assert kw["tcp_user_timeout"] == 2000
        make_conninfo("", **{k: v for k, v in kw.items() if k != "autocommit"})
    cluster.dispose()
