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
