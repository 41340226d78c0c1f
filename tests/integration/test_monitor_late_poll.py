"""A write to a primary whose health poll is late: refused when the server has not
answered a poll sent to it (hung), not when this process stood still (a long garbage
collection, no CPU for it on a loaded host) and its poll thread has not asked yet.

Seen in a full test run on two busy cores: a writer woke 5.2 s after the primary's last
answer, with the poll thread not yet run either, and was refused at once with
ShardUnavailable ("has not answered the health poll for 5.2 s (hung ...)") although the
primary answered the next poll."""

from __future__ import annotations

import threading
import time

import pytest

import shardkit
from shardkit._replicas import HealthMonitor
from shardkit._session import _fail_fast_if_primary_down

pytestmark = pytest.mark.integration


@pytest.fixture
def parked(sharded_dev, monkeypatch):
    """A cluster whose monitor runs, with s0's primary's poll thread held between polls
    (at the start of its next one) until the returned gate is set."""
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), "replicas": {"poll_interval": 0.05}})
    cluster.start_monitor()
    mon = cluster.monitor()
    p = mon.shards["s0"].primary
    gate = threading.Event()
    at_gate = threading.Event()
    real = HealthMonitor._poll_once

    def poll_once(self, conn, node, started):
        if self is mon and node is p and not gate.is_set():
            at_gate.set()
            gate.wait(30)
            started = time.monotonic()
        return real(self, conn, node, started)

    monkeypatch.setattr(HealthMonitor, "_poll_once", poll_once)
    assert at_gate.wait(10)
    try:
        yield cluster, p, gate
    finally:
        gate.set()
        cluster.dispose()


def test_a_write_after_the_process_stood_still_waits_for_the_poll_it_sends_now(parked):
    cluster, p, gate = parked
    assert p._asking_since is None and p.up
    p.checked_at -= 5.0   # its last answer 5 s ago, as after 5 s without CPU; no poll out
    threading.Timer(0.3, gate.set).start()   # the poll thread runs again
    t0 = time.monotonic()
    _fail_fast_if_primary_down(cluster, "s0")   # not ShardUnavailable: the primary answers
    assert 0.2 <= time.monotonic() - t0 < 2.5
    assert p.heard_from(time.monotonic(), 2.0)


def test_a_write_to_a_primary_that_has_not_answered_a_poll_out_for_long_is_refused(parked):
    cluster, p, gate = parked
    now = time.monotonic()
    p.checked_at, p._asking_since = now - 5.1, now - 5.0   # a poll out for 5 s: hung
    t0 = time.monotonic()
    with pytest.raises(shardkit.ShardUnavailable, match="has not answered the health poll"):
        _fail_fast_if_primary_down(cluster, "s0")
    assert time.monotonic() - t0 < 1.5   # (a moment for an answer read late, no more)
