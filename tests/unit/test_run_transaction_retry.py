"""run_transaction's retry after a refused write: when to wait for a newer map."""

import time
from types import SimpleNamespace

import pytest

from shardkit import NotOwned, run_transaction
from shardkit._slices import SLICE_BASE


class FakeCluster:
    def __init__(self, bucket_map, slices=(), version=6):
        self.config = SimpleNamespace(bucket_map=tuple(bucket_map), slices=tuple(slices))
        self.map_version = version
        self.waits = []

    def refresh_map(self, *, newer_than=None, timeout=0.0):
        if newer_than is not None:
            self.waits.append((newer_than, timeout))
        return self.map_version


class FakeSession:
    def __init__(self, cluster):
        self.cluster = cluster

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def commit(self):
        pass

    def rollback(self):
        pass


def guard_refusal(**kw):
    """A NotOwned as the ownership guard's refusal is reported (its map_version is the
    map in use when the shard refused)."""
    err = NotOwned("refused", **kw)
    err._sk_guard_refusal = True
    return err


def run(cluster, refusal):
    calls = []

    def fn(session):
        calls.append(session.cluster.map_version)
        if len(calls) == 1:
            raise refusal
        return "done"

    assert run_transaction(lambda: FakeSession(cluster), fn, refresh_timeout=30.0) == "done"
    assert len(calls) == 2


def test_no_wait_when_the_map_in_use_already_moved_the_refused_bucket():
    # The map that moved bucket 3 to s1 (version 6) arrived between the write's
    # routing (by version 5) and s0's refusal, which therefore reports version 6.
    cluster = FakeCluster(["s0", "s0", "s0", "s1"])
    t0 = time.monotonic()
    run(cluster, guard_refusal(shard="s0", bucket=3, map_version=6))
    assert cluster.waits == [] and time.monotonic() - t0 < 5


def test_no_wait_for_a_moved_slice():
    cluster = FakeCluster(["s0"], slices=[SimpleNamespace(id=SLICE_BASE + 2, shard="s1")])
    run(cluster, guard_refusal(shard="s0", bucket=SLICE_BASE + 2, map_version=6))
    assert cluster.waits == []


@pytest.mark.parametrize("refusal", [
    # The shard refused before the catalog published the move: the map in use still
    # gives the bucket (or slice) to the refusing shard.
    guard_refusal(shard="s0", bucket=1, map_version=6),
    guard_refusal(shard="s0", bucket=SLICE_BASE + 2, map_version=6),
    # Nothing to check the map against.
    guard_refusal(shard="s0", map_version=6),
    # The session's own check: the new owner s1 refused a statement that took its copy
    # of bucket 1 for a foreign one (the map in use still gives it to s0); map_version
    # is the map that routed it, and only a newer one can route the retry right.
    NotOwned("refused", shard="s1", bucket=1, map_version=6),
])
def test_waits_for_a_newer_map_when_the_map_in_use_does_not_show_the_move(refusal):
    cluster = FakeCluster(["s0", "s0", "s0", "s1"], slices=[SimpleNamespace(id=SLICE_BASE + 2, shard="s0")])
    run(cluster, refusal)
    assert cluster.waits == [(6, 30.0)]
