"""The catalog follower's logging during an outage (shardkit/_mapsync.py): a warning once
per outage and cause, retries at DEBUG.  Without a server: the follower's connection and
the catalog's engine are stubbed, as in test_catalog_polish.py."""

from __future__ import annotations

import itertools
import logging
import re
import time

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import shardkit
from models import groups_config
from shardkit._mapsync import MapFollower
from shardkit.catalog import Catalog

URL = "postgresql+psycopg://app:Sk-pw-4417@127.0.0.1:1/catalog_db"
SHARDS = ["s0", "s1"]


@pytest.fixture
def cluster():
    c = shardkit.Cluster.from_config({
        "bucket_count": 16,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://app@db{i}.example/app"}
                   for i, s in enumerate(SHARDS)],
        **groups_config(SHARDS),
        "catalog": {"url": URL},
    }, follow_map=False)
    yield c
    c.dispose()


class _ListeningConnection:
    """The follower's LISTEN connection, connected (the map read is what fails)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql):
        pass

    def notifies(self, timeout, stop_after):
        time.sleep(timeout)
        return iter(())


def _retries(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardkit.catalog" and "retrying in" in r.getMessage()]


def _follow(follower: MapFollower, caplog, retries: int) -> None:
    follower.start()
    try:
        t0 = time.monotonic()
        while len(_retries(caplog)) < retries:
            assert time.monotonic() - t0 < 20, f"waited 20 s for {retries} retries"
            time.sleep(0.02)
    finally:
        follower.stop()


def test_two_causes_in_turn_are_each_warned_once(cluster, caplog):
    """A catalog URL with two hosts and load_balance_hosts=random, both down: psycopg
    tries them in a random order and its error's first line is the last host's, so the
    cause the follower sees changes from one retry to the next.  Each cause is warned
    once for the outage (then a reminder a minute), not at every change."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")
    hosts = itertools.cycle(["10.0.0.1", "10.0.0.2"])

    def refuse():
        raise psycopg.OperationalError(
            f'connection failed: connection to server at "{next(hosts)}", port 5432 failed: '
            "Connection refused\nMultiple connection attempts failed. All failures were: ...")

    follower = MapFollower(cluster)
    follower._connect = refuse  # type: ignore[method-assign]
    _follow(follower, caplog, 6)
    warned = [r.getMessage() for r in _retries(caplog) if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned


def test_retries_back_off_when_the_catalog_connects_but_its_map_cannot_be_read(cluster, caplog):
    """The LISTEN connection works, the map read fails (its engine cannot connect, the
    map table refuses the role...): the follower must back off between attempts as it
    does when it cannot connect at all, not reconnect every 0.2 s for as long as it
    lasts (which, said at DEBUG now, nothing shows)."""
    caplog.set_level(logging.DEBUG, logger="shardkit.catalog")

    def refuse():
        raise psycopg.OperationalError("test: connection refused")

    cluster.catalog.dispose()
    cluster.catalog = Catalog(URL, engine=create_engine("postgresql+psycopg://", creator=refuse,
                                                        poolclass=NullPool))
    follower = MapFollower(cluster, poll_interval=0.05)
    follower._connect = _ListeningConnection  # type: ignore[method-assign]
    _follow(follower, caplog, 4)
    delays = [float(re.search(r"retrying in ([0-9.]+) s", r.getMessage()).group(1))
              for r in _retries(caplog)]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6], delays
