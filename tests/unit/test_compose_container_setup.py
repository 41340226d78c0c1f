"""docker-compose.yml's containers: shared memory for parallel queries, and a replica's
data directory permissions at every start (no Docker engine needed: the compose file is
read, and the replica's script runs against stand-in programs)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shardkit.testing import docker as dk

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ["s0-primary", "s0-replica", "s1-primary", "s1-replica", "catalog"]


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _bytes(size: str) -> int:
    """Docker's size notation ('256m', '256mb', '1g', or bytes) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(size).strip().lower())
    assert m, size
    return int(m[1]) * 1024 ** "bkmg".index(m[2] or "b")


@pytest.mark.parametrize("name", SERVERS)
def test_servers_get_more_shared_memory_than_dockers_default(services, name):
    # The official image's documentation: "the default /dev/shm size for containers is
    # 64MB. If the shared memory is exhausted you will encounter ERROR: could not resize
    # shared memory segment . . . : No space left on device. You will want to pass
    # --shm-size=256MB ... or alternatively in docker compose".  The docker test backend
    # gives its containers 256 MB; the compose servers had Docker's 64 MB.
    size = services[name].get("shm_size")
    assert size is not None, f"{name}: no shm_size (Docker's default /dev/shm is 64 MB)"
    assert _bytes(size) >= _bytes(dk._SHM_SIZE), (name, size)


# --- a replica's start, with a data directory already cloned ------------------------------

# The server: notes the mode of $PGDATA it was started on (PostgreSQL refuses anything
# but 0700 or 0750: "data directory ... has invalid permissions").
POSTGRES = """#!/bin/sh
echo "postgres $(stat -c %a "$PGDATA")" >> "$CALLS"
"""
OTHER = """#!/bin/sh
echo "$(basename "$0")" >> "$CALLS"
"""


@pytest.fixture(params=["s0", "s1"])
def replica_start(request, tmp_path, services):
    if shutil.which("bash") is None or shutil.which("stat") is None:
        pytest.skip("needs bash and stat")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("postgres", POSTGRES), ("psql", OTHER), ("pg_basebackup", OTHER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    calls = tmp_path / "calls"
    # Compose turns $$ into $ (the only interpolation in the script).
    script = services[f"{request.param}-replica"]["entrypoint"][-1].replace("$$", "$")

    def run():
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "PGDATA": str(pgdata), "CALLS": str(calls)})
        assert proc.returncode == 0, proc.stderr
        return calls.read_text().split("\n")[:-1] if calls.exists() else []

    return run, pgdata


def test_a_completed_clone_left_with_the_volumes_mode_still_starts(replica_start):
    # pg_basebackup renamed backup_manifest into place, then the container was killed
    # (`docker compose kill`, a host crash, Docker's SIGKILL 10 s into `stop`) before the
    # script's `chmod 0700`: the next start skipped the clone, and with it the chmod, so
    # postgres refused the 1777 directory at every start until the volume was removed.
    run, pgdata = replica_start
    (pgdata / "PG_VERSION").write_text("16\n")
    (pgdata / "standby.signal").touch()
    (pgdata / "backup_manifest").write_text("{}\n")
    pgdata.chmod(0o1777)   # the image's mode of a new volume
    assert run() == ["postgres 700"]   # no new clone; a data directory postgres accepts
