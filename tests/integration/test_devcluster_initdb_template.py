"""Within one process, initdb runs once per (bin dir, OS user, initdb arguments): later
primaries are copies of the first one's pristine data directory.  Servers from the local
PostgreSQL installation."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from cluster_dirs import cluster_parent
from shardkit import devcluster
from shardkit.devcluster import DevCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def parent():
    with cluster_parent("shardkit-template-") as d:
        yield d


@pytest.fixture
def initdb_runs(monkeypatch):
    """The data directories initdb was run for, through the _Programs.run seam."""
    runs: list[str] = []
    real_run = devcluster._Programs.run

    def run(self, args, **kwargs):
        if os.path.basename(args[0]) == "initdb":
            runs.append(args[args.index("-D") + 1])
        return real_run(self, args, **kwargs)

    monkeypatch.setattr(devcluster._Programs, "run", run)
    return runs


def _template_of(cluster: DevCluster) -> Path | None:
    p = cluster._programs
    for key, path in devcluster._initdb_templates._templates.items():
        if key[:2] == (str(p.bin_dir), p.os_user):
            return path
    return None


def _check_datadir(cluster: DevCluster) -> None:
    p = cluster._programs
    for shard in cluster.shards:
        st = shard.primary.datadir.stat()
        assert st.st_uid == p.uid, f"{shard.primary.name} is not owned by {p.os_user}"
        assert stat.S_IMODE(st.st_mode) in (0o700, 0o750)
        for f in (shard.primary.datadir / "global").iterdir():
            assert f.stat().st_uid == p.uid, f"{f} is not owned by {p.os_user}"
            assert f.stat().st_nlink == 1, f"{f} is hard-linked"


def test_a_second_cluster_copies_instead_of_running_initdb(parent, initdb_runs):
    first = DevCluster.up(parent / "a", shards=2, replicas=0)
    template = _template_of(first)
    assert template is not None and template.is_dir()
    # The template is pristine: no shardkit settings block in it.
    assert devcluster._SETTINGS_MARKER not in (template / "postgresql.conf").read_text()
    # Its private directory is closed to others.
    assert stat.S_IMODE(template.parent.stat().st_mode) == 0o700

    del initdb_runs[:]
    second = DevCluster.up(parent / "b", shards=2, replicas=1)
    assert initdb_runs == [], f"initdb ran for {initdb_runs}"
    _check_datadir(second)

    # The primaries start, accept writes, replicate, and share nothing with the first cluster.
    for shard in second.shards:
        with shard.primary.connect() as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
        shard.replicas[0].wait_caught_up()
        with shard.replicas[0].connect() as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    for shard in first.shards:
        with shard.primary.connect() as conn:
            assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
            conn.execute("CREATE TABLE only_in_first (x int)")
    with second.shards[0].primary.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.only_in_first')").fetchone() == (None,)
    # The template itself stayed pristine.
    assert devcluster._SETTINGS_MARKER not in (template / "postgresql.conf").read_text()


def _up_by_initdb(base: Path, initdb_runs: list) -> DevCluster:
    """A 1-shard cluster at ``base`` whose primary initdb made (the fallback), in working order."""
    del initdb_runs[:]
    cluster = DevCluster.up(base, shards=1, replicas=0)
    assert initdb_runs == [str(cluster.shards[0].primary.datadir)]
    _check_datadir(cluster)
    with cluster.shards[0].primary.connect() as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    return cluster


def test_a_vanished_template_falls_back_to_initdb(parent, initdb_runs):
    DevCluster.up(parent / "a", shards=1, replicas=0)
    template = _template_of(DevCluster.load(parent / "a"))
    assert template is not None
    shutil.rmtree(template)

    cluster = _up_by_initdb(parent / "b", initdb_runs)
    # The fallback's initdb output is the new template, and the next cluster copies it.
    new = _template_of(cluster)
    assert new is not None and new.is_dir() and new != template
    del initdb_runs[:]
    DevCluster.up(parent / "c", shards=1, replicas=0)
    assert initdb_runs == []


def test_a_failed_copy_falls_back_to_initdb(parent, initdb_runs, monkeypatch):
    DevCluster.up(parent / "a", shards=1, replicas=0)
    real_copy = devcluster._copy_datadir

    def failing_copy(src, dst, programs):
        if Path(dst).name == "data":     # into a primary's data directory, not a template
            dst.mkdir()                  # half done
            raise OSError("simulated copy failure")
        return real_copy(src, dst, programs)

    monkeypatch.setattr(devcluster, "_copy_datadir", failing_copy)
    _up_by_initdb(parent / "b", initdb_runs)


def test_templates_go_at_exit_and_a_killed_process_s_are_swept(parent):
    """atexit removes the process's templates; one killed before (no atexit) leaves
    its own, which the next process that keeps a template removes."""
    import subprocess
    import sys

    script = (
        "import os, sys, signal\n"
        "from shardkit import devcluster\n"
        "from shardkit.devcluster import DevCluster\n"
        "c = DevCluster.up(sys.argv[1], shards=1, replicas=0)\n"
        "print(devcluster._initdb_templates._root, flush=True)\n"
        "c.down()\n"
        "if sys.argv[2] == 'kill':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    def run(name: str, how: str) -> Path:
        proc = subprocess.run([sys.executable, "-c", script, str(parent / name), how],
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip(), proc.stderr
        return Path(proc.stdout.strip().splitlines()[-1])

    assert not run("a", "exit").exists(), "atexit left the templates"
    killed = run("b", "kill")
    assert killed.exists()
    assert not run("c", "exit").exists()
    assert not killed.exists(), "a killed process's templates were not swept"
