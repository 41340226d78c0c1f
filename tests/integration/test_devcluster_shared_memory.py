"""A server killed with SIGKILL and then removed leaves no shared memory behind: its
dynamic shared memory is files in its data directory, and `down()` removes the System V
header segment the dead postmaster left.  Servers from the local PostgreSQL installation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_dirs import cluster_parent
from shardkit.devcluster import DevCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/sysvipc/shm").exists(), reason="needs Linux's /proc/sysvipc"),
]


def _segments() -> set[tuple[str, str]]:
    """(key, shmid) of every System V shared memory segment of the machine."""
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {tuple(r.split()[:2]) for r in rows}


@pytest.fixture
def base():
    with cluster_parent("shardkit-ipc-") as d:
        yield d


def test_a_killed_server_removed_with_its_cluster_leaves_no_shared_memory(base):
    cluster = DevCluster.up(base / "c", shards=2, replicas=0)
    killed, kept = (s.primary for s in cluster.shards)
    with killed.connect() as c:
        assert c.execute("SHOW dynamic_shared_memory_type").fetchone()[0] == "mmap"
    # The control segment of its dynamic shared memory is a file of the data directory.
    assert any(p.name.startswith("mmap.") for p in (killed.datadir / "pg_dynshmem").iterdir())

    killed.kill()
    key, shmid = (killed.datadir / "postmaster.pid").read_text().splitlines()[6].split()
    assert (key, shmid) in _segments()     # what the dead postmaster left

    cluster.down(remove=True)
    assert (key, shmid) not in _segments()
    assert not (base / "c").exists()


def test_a_killed_server_started_again_keeps_working(base):
    """The stale pid file's segment is left to the server when it starts again (it removes
    it itself): stop() on a running server does not go near it."""
    cluster = DevCluster.up(base / "c", shards=1, replicas=0)
    node = cluster.shards[0].primary
    node.kill()
    node.start()
    with node.connect() as c:
        # A parallel query: its workers share memory through the data directory's files.
        c.execute("SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; "
                  "SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0")
        c.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        plan = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM t").fetchone()[0]
        gather = plan[0]["Plan"]["Plans"][0]
        assert gather["Node Type"] == "Gather" and gather["Workers Launched"] >= 1, gather
    cluster.down(remove=True)
