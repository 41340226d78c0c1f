"""`shardkit dev up|down` and `shardkit demo` as an operator meets them after
something went wrong.

Every cluster lives under a fresh ``/tmp/dev7b-*`` directory that the test
stops and removes; processes are found by that directory only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from inproc_cli import run as shardkit_here
from shardkit.devcluster import STATE_FILE, DevCluster, find_pg_bin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("SHARDKIT_TEST_BACKEND", "local") == "docker",
        reason="tests local DevCluster files, processes and the dev/demo commands"),
]


def _processes_naming(root: Path) -> list[int]:
    """Pids of live processes (not this one) whose command line names a path under ``root``."""
    found = []
    needle = str(root).encode() + b"/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _wait_gone(root: Path, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_naming(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="dev7b-", dir="/tmp"))
    d.chmod(0o755)  # the servers' OS user must reach the data directories
    try:
        yield d
    finally:
        for state in sorted(d.rglob(STATE_FILE)):
            try:
                DevCluster.load(state.parent).down()
            except Exception:  # noqa: BLE001
                pass
        for pid in _processes_naming(d):  # ours: they work under our directory
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(d)
        shutil.rmtree(d, ignore_errors=True)


def _slow_initdb_bin(root: Path) -> Path:
    """A copy of the PostgreSQL bin directory whose initdb is still writing its data
    directory when the test kills `dev up` (a real initdb takes ~1 s to do that)."""
    real = find_pg_bin()
    fake = root / "bin"
    fake.mkdir()
    fake.chmod(0o755)
    for prog in ("pg_ctl", "postgres", "pg_basebackup"):
        (fake / prog).symlink_to(real / prog)
    initdb = fake / "initdb"
    initdb.write_text('#!/bin/sh\n# initdb -D DATADIR ...: busy writing DATADIR\n'
                      'mkdir -p "$2"\nwhile :; do mkdir -p "$2/base/$$"; sleep 0.01; done\n')
    initdb.chmod(0o755)
    return fake


def test_down_after_up_was_killed_mid_start_stops_what_it_left_and_removes_the_dir(root):
    """`dev up` killed (kill -9, an OOM kill, a closed CI job) while initdb ran: its initdb
    went on writing the data directory.  `dev down` then died with a FileNotFoundError
    traceback from rmtree (or removed the directory, which initdb made again), leaving a
    directory that `dev up` refuses (not empty, no cluster) and `dev down` calls empty."""
    base = root / "half started"
    env = dict(os.environ, SHARDKIT_PG_BIN=str(_slow_initdb_bin(root)), PYTHONUNBUFFERED="1")
    up = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "dev", "up", "--shards", "1",
                           "--replicas", "0", "--dir", str(base)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (base / "s0" / "primary" / "data" / "base").exists():
            assert up.poll() is None and time.monotonic() < deadline, "dev up did not reach initdb"
            time.sleep(0.02)
    finally:
        up.kill()
        up.wait()
    assert _processes_naming(base), "the killed dev up's initdb should still be running"

    r = shardkit_here(["dev", "down", "--dir", str(base)])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert _wait_gone(base) == [], "dev down left the killed start's programs running"
    time.sleep(0.1)
    assert not base.exists(), f"dev down left {sorted(p.name for p in base.rglob('*'))}"


@pytest.mark.parametrize("made_by_up", [True, False], ids=["dir made by up", "empty dir there before"])
def test_down_deletes_what_up_made_and_not_the_files_put_in_the_dir_since(root, made_by_up):
    """`dev up --dir D` (D new, or an empty directory: a new project's, say), then files of
    the user's own in D: `dev down` deleted all of them (rmtree of D, or every entry of D),
    though `dev up` refuses a non-empty D precisely because it is not its own."""
    base = root / "my cluster"
    if not made_by_up:
        base.mkdir()
        base.chmod(0o755)
    DevCluster.up(base, shards=1, replicas=0)
    (base / "notes.txt").write_text("mine\n")
    (base / "app").mkdir()
    (base / "app" / "main.py").write_text("print('mine')\n")

    r = shardkit_here(["dev", "down", "--dir", str(base)])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert _wait_gone(base) == []
    assert sorted(p.name for p in base.iterdir()) == ["app", "notes.txt"]
    assert (base / "app" / "main.py").read_text() == "print('mine')\n"
    assert "notes.txt" in r.stderr, "say why the directory was kept"
