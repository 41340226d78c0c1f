"""docker-compose.yml builds servers that behave as the dev and docker test clusters do
(no Docker engine needed: the compose file is read, not run)."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shardkit.testing import docker as dk

ROOT = Path(__file__).resolve().parents[2]

# Settings a hot standby needs at least as high as its primary's, else it pauses
# recovery ("hot standby is not possible because of insufficient parameter settings")
# and falls further behind for ever; PostgreSQL 16's defaults.
STANDBY_MINIMUMS = {"max_connections": 100, "max_prepared_transactions": 0,
                    "max_locks_per_transaction": 64, "max_wal_senders": 10,
                    "max_worker_processes": 8}


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _settings(args: list[str]) -> dict[str, str]:
    """The ``-c name=value`` options of a ``postgres`` command line."""
    out = {}
    for flag, value in zip(args, args[1:]):
        if flag == "-c":
            name, _, v = value.partition("=")
            out[name] = v
    return out


def _replica_server_args(service: dict) -> list[str]:
    script = service["entrypoint"][-1]
    [line] = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("exec postgres")]
    return shlex.split(line)[1:]


@pytest.mark.parametrize("name", ["s0-primary", "s1-primary", "catalog"])
def test_databases_are_initialised_with_the_c_locale_as_the_dev_and_test_clusters(services, name):
    # The image's LANG is en_US.utf8, which initdb takes as the default collation:
    # a cross-shard ORDER BY / min() / max() over text is then refused (ScatterRefused)
    # on the compose cluster while the same code passes on the dev and docker test clusters.
    args = services[name]["environment"].get("POSTGRES_INITDB_ARGS", "").split()
    assert "--locale=C" in args, (name, args)
    assert "--locale=C" in dk.PRIMARY_ENV["POSTGRES_INITDB_ARGS"].split()


@pytest.mark.parametrize("shard", ["s0", "s1"])
def test_primaries_allow_two_phase_commit_and_replicas_keep_up(services, shard):
    primary = _settings(services[f"{shard}-primary"]["command"])
    replica = _settings(_replica_server_args(services[f"{shard}-replica"]))
    # sessionmaker(twophase=True) needs it (the dev and docker test clusters set 50).
    assert int(primary.get("max_prepared_transactions", 0)) > 0, primary
    for name, default in STANDBY_MINIMUMS.items():
        assert int(replica.get(name, default)) >= int(primary.get(name, default)), name


def _bytes(size: str) -> int:
    """Docker's size notation ('256m', '256mb', '1g', or bytes) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(size).strip().lower())
    assert m, size
    return int(m[1]) * 1024 ** "bkmg".index(m[2] or "b")


@pytest.mark.parametrize("name", ["s0-primary", "s0-replica", "s1-primary", "s1-replica", "catalog"])
def test_servers_get_more_shared_memory_than_dockers_default(services, name):
    # The official image's documentation: "the default /dev/shm size for containers is
    # 64MB. If the shared memory is exhausted you will encounter ERROR: could not resize
    # shared memory segment . . . : No space left on device. You will want to pass
    # --shm-size=256MB ... or alternatively in docker compose".  The docker test backend
    # gives its containers 256 MB; the compose servers had Docker's 64 MB.
    size = services[name].get("shm_size")
    assert size is not None, f"{name}: no shm_size (Docker's default /dev/shm is 64 MB)"
    assert _bytes(size) >= _bytes(dk._SHM_SIZE), (name, size)


# --- the replicas' first-start script, run against stand-in programs -------------------

STAND_IN = """#!/bin/sh
basename "$0" >> "$CALLS"
"""
# The server also notes the mode of the data directory it was started on (PostgreSQL
# refuses anything but 0700 or 0750: "data directory ... has invalid permissions").
POSTGRES = STAND_IN + """stat -c %a "$PGDATA" > "$MODE"
"""
# Like the real one: refuses a non-empty directory, writes backup_manifest last.
BASEBACKUP = STAND_IN + """[ -z "$(ls -A "$PGDATA")" ] || { echo "directory exists but is not empty" >&2; exit 1; }
echo 16 > "$PGDATA/PG_VERSION"; touch "$PGDATA/standby.signal"
[ -n "$CUT_SHORT" ] && exit 137
echo '{}' > "$PGDATA/backup_manifest"
"""


@pytest.fixture(params=["s0", "s1"])
def replica_box(request, tmp_path, services):
    if shutil.which("bash") is None or shutil.which("stat") is None:
        pytest.skip("needs bash and stat")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("psql", STAND_IN), ("postgres", POSTGRES), ("pg_basebackup", BASEBACKUP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    calls = tmp_path / "calls"
    # Compose turns $$ into $ (the file's only interpolation in the script).
    script = services[f"{request.param}-replica"]["entrypoint"][-1].replace("$$", "$")

    def run(**extra):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "PGDATA": str(pgdata),
                                   "CALLS": str(calls), "MODE": str(tmp_path / "mode"), **extra})
        made = calls.read_text().split() if calls.exists() else []
        return proc, made

    return run, pgdata


def test_a_replica_clones_once_and_then_only_starts(replica_box):
    run, pgdata = replica_box
    proc, made = run()
    assert proc.returncode == 0, proc.stderr
    assert made == ["psql", "pg_basebackup", "postgres"]
    proc, made = run()
    assert (proc.returncode, made) == (0, ["postgres"]), proc.stderr


def test_a_clone_cut_short_is_made_again_at_the_next_start(replica_box):
    # `docker compose stop` during a long clone: bash, PID 1, ignores the SIGINT and
    # Docker SIGKILLs pg_basebackup 10 s later, leaving PG_VERSION and half a data
    # directory (no backup_manifest, which pg_basebackup renames into place last).
    # The next start skipped the clone and postgres failed for ever ("could not find
    # the database system"), though the README says the replica clones again.
    run, pgdata = replica_box
    proc, made = run(CUT_SHORT="1")
    assert proc.returncode != 0 and made == ["psql", "pg_basebackup"]
    assert (pgdata / "PG_VERSION").exists()
    proc, made = run()
    assert proc.returncode == 0, proc.stderr
    assert made == ["psql", "pg_basebackup", "postgres"]
    assert (pgdata / "backup_manifest").exists()


def test_a_completed_clone_left_with_the_volumes_mode_still_starts(replica_box, tmp_path):
    # pg_basebackup renamed backup_manifest into place, then the container was killed
    # (`docker compose kill`, a host crash, Docker's SIGKILL 10 s into `stop`) before the
    # script's `chmod 0700`: the next start skipped the clone, and with it the chmod, so
    # postgres refused the 1777 directory at every start until the volume was removed.
    run, pgdata = replica_box
    (pgdata / "PG_VERSION").write_text("16\n")
    (pgdata / "standby.signal").touch()
    (pgdata / "backup_manifest").write_text("{}\n")
    pgdata.chmod(0o1777)   # the image's mode of a new volume
    proc, made = run()
    assert (proc.returncode, made) == (0, ["postgres"]), proc.stderr   # no new clone
    assert (tmp_path / "mode").read_text().split() == ["700"]   # a data directory postgres accepts
