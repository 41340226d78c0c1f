"""Parent directories for the dev clusters a test starts itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shardkit.devcluster import STATE_FILE, DevCluster


@contextlib.contextmanager
def cluster_parent(prefix: str) -> Iterator[Path]:
    """A new directory (on /dev/shm where there is one) for clusters in subdirectories;
    at the end every cluster in it is stopped and the directory removed."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.chmod(d, 0o755)   # the servers' OS user must reach the data directories
    try:
        yield d
    finally:
        for c in d.iterdir():
            if (c / STATE_FILE).exists():
                DevCluster.load(c).down(remove=True)
        shutil.rmtree(d, ignore_errors=True)
