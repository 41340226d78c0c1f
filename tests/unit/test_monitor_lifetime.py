"""A cluster dropped without dispose() takes its background threads with it.

The health monitor's poll threads, and the map follower's thread, held the cluster for
ever: every Cluster an application built and let go of (one per request by mistake, one
per test, a config reload) kept one thread per node polling its server every poll
interval (and one following the catalog) for the life of the process.  No server is
needed: the nodes are on loopback ports nothing listens on (a poll then fails at once
and records the node down).
"""

from __future__ import annotations

import gc
import threading
import time

import pytest

import shardkit
from ports import free_port_run


def _config(tag: str) -> dict:
    port = free_port_run(2)
    return {
        "shards": [{"name": f"{tag}{i}",
                    "primary": f"postgresql+psycopg://app@127.0.0.1:{port + i}/app",
                    "replicas": [f"postgresql+psycopg://app@127.0.0.1:{port + i}/app"]}
                   for i in range(2)],
        "replicas": {"poll_interval": 0.05},
    }


def _threads(tag: str) -> list[str]:
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith(f"shardkit-monitor-{tag}"))


def _wait_none(tag: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _threads(tag) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return _threads(tag)


def test_a_dropped_cluster_stops_polling():
    cluster = shardkit.Cluster.from_config(_config("lifea"))
    cluster.health()  # starts the monitor
    assert len(_threads("lifea")) == 4
    del cluster
    assert _wait_none("lifea") == []


def test_a_kept_cluster_keeps_polling_and_dispose_stops_it():
    """The monitor of a cluster still in use is not stopped by the change above."""
    cluster = shardkit.Cluster.from_config(_config("lifeb"))
    cluster.health()
    gc.collect()
    time.sleep(0.3)
    assert len(_threads("lifeb")) == 4
    cluster.dispose()
    assert _wait_none("lifeb") == []


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dropped_cluster_with_a_catalog_stops_following_the_map(caplog):
    """The same for the map follower of a cluster with a catalog (here one that does not
    answer: the follower retries with back-off for as long as its cluster lives), which
    ends quietly (no exception in the thread) whenever the cluster goes."""
    port = free_port_run(3)
    cfg = {"shards": [{"name": f"lifec{i}", "primary": f"postgresql+psycopg://app@127.0.0.1:{port + i}/app"}
                      for i in range(2)],
           "catalog": {"url": f"postgresql+psycopg://app@127.0.0.1:{port + 2}/cat"}}
    cluster = shardkit.Cluster.from_config(cfg)
    cluster.engine("lifec0", "primary")  # (a follower starts with the first engine)
    follower = cluster._follower._thread
    assert follower.is_alive()
    del cluster
    deadline = time.monotonic() + 5
    while follower.is_alive() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not follower.is_alive()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
