"""A cancel request sent with psycopg's C implementation over libpq older than 17 holds
the GIL while a server that does not answer keeps it waiting (every thread of the
process stalls): shardkit says so, once, the first time it sends one there, and not
when the cancel can end at its timeout (libpq 17+, or the python implementation, whose
ctypes call releases the GIL).  No server: the cancel's connection is a stand-in."""

from __future__ import annotations

import logging

import pytest
from psycopg import pq

from shardkit import _scatter


class _Conn:
    def __init__(self):
        self.sent = []

    def cancel_safe(self, timeout):
        self.sent.append(timeout)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_scatter, "_cancel_checked", False)


@pytest.mark.parametrize(("impl", "version", "warned"), [
    ("binary", 160003, True), ("c", 150018, True),
    ("binary", 170000, False), ("c", 180006, False), ("python", 150018, False)])
def test_the_first_cancel_warns_when_it_would_hold_the_gil(fresh, monkeypatch, caplog, impl, version, warned):
    monkeypatch.setattr(pq, "__impl__", impl)
    monkeypatch.setattr(pq, "version", lambda: version)
    caplog.set_level(logging.WARNING, logger="shardkit")
    conns = [_Conn(), _Conn()]
    for c in conns:
        _scatter.send_cancel(c, 0.5).join(5)
    assert [c.sent for c in conns] == [[0.5], [0.5]]
    said = [r.getMessage() for r in caplog.records if "cancel requests hold the GIL" in r.getMessage()]
    assert len(said) == (1 if warned else 0), said
    if warned:
        assert f"implementation runs on libpq {version}" in said[0] and "psycopg[binary] >= 3.2.3" in said[0]

