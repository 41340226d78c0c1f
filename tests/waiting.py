"""Waiting for a cluster to reach a state, reading its health by node name, and finding a
local node's server processes."""

from __future__ import annotations

import time
from typing import Any


def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll ``check()`` every 50 ms until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def health_by_node(cluster: Any) -> dict[str, dict[str, Any]]:
    """``cluster.health()``'s nodes, keyed by node name."""
    return {n["node"]: n for n in cluster.health().nodes}


def server_pids(node: Any) -> list[int]:
    """The postmaster of a local node and its children (to stop them: a hung server)."""
    from shardkit.devcluster import _children

    pid = node._pid()
    return [pid, *_children(pid)]


def resume(pids: Any) -> None:
    """Let stopped server processes (``server_pids``, sent SIGSTOP) run again."""
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def wait_replicas_usable(cluster: Any, shards: Any = None, timeout: float = 30.0,
                         every: bool = False) -> None:
    """Wait until the monitor finds a replica (``every``: each replica) of each of ``shards``
    (default: every shard) usable under the cluster's lag limits.  Its first poll may find
    a primary's background WAL record not replayed yet, with no history of the primary's
    positions to date the gap (the replica's last-replay age then counts as its lag), a
    poll may time out on a loaded machine, and a restarted replica is up only once polled."""
    limits = cluster.replica_settings
    names = list(cluster.shard_names if shards is None else shards)

    def usable() -> bool:
        for s in names:
            ok = cluster.selector.eligible(s, max_lag_seconds=limits.max_lag_seconds,
                                           max_lag_bytes=limits.max_lag_bytes, min_lsn=None)[0]
            if len(ok) < (cluster.replica_count(s) if every else 1):
                return False
        return True

    wait_for(usable, timeout, f"the monitor to find {'every' if every else 'a'} replica of {names} usable")
