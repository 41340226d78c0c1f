"""`dev down` removes the directory `dev up` made, and only empties one that was there
before (an empty directory the user made: a mount point, a directory with its own owner
and mode).  Servers from the local PostgreSQL installation; 1 shard, no replica."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from shardkit.devcluster import STATE_FILE, DevCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def parent():
    d = Path(tempfile.mkdtemp(prefix="shardkit-owndir-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.chmod(d, 0o755)   # the servers' OS user must reach the data directories
    try:
        yield d
    finally:
        for c in (d / "made", d / "mine"):
            if (c / STATE_FILE).exists():
                DevCluster.load(c).down(remove=True)
        shutil.rmtree(d, ignore_errors=True)


def test_down_removes_a_directory_up_made(parent):
    DevCluster.up(parent / "made", shards=1, replicas=0)
    assert json.loads((parent / "made" / STATE_FILE).read_text())["made_base_dir"] is True
    DevCluster.load(parent / "made").down(remove=True)
    assert not (parent / "made").exists()


def test_down_empties_and_keeps_a_directory_that_was_there(parent):
    mine = parent / "mine"
    mine.mkdir(mode=0o750)
    os.chmod(mine, 0o751)
    DevCluster.up(mine, shards=1, replicas=0)
    # From another process's point of view: what down() knows comes from the state file.
    DevCluster.load(mine).down(remove=True)
    assert mine.is_dir(), "the directory the user made was deleted"
    assert list(mine.iterdir()) == []
    assert oct(mine.stat().st_mode & 0o777) == oct(0o751)
    # And it can hold a cluster again.
    DevCluster.up(mine, shards=1, replicas=0).down(remove=True)
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_state_file_without_the_field_is_removed_as_before(parent):
    DevCluster.up(parent / "made", shards=1, replicas=0)
    path = parent / "made" / STATE_FILE
    state = json.loads(path.read_text())
    del state["made_base_dir"]
    path.write_text(json.dumps(state))
    DevCluster.load(parent / "made").down(remove=True)
    assert not (parent / "made").exists()
