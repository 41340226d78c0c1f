"""docker-compose.yml builds servers that behave as the dev and docker test clusters do
(no Docker engine needed: the compose file is read, not run)."""

import shlex
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


# --- the replicas' first-start script, run against stand-in programs -------------------

STAND_IN = """#!/bin/sh
basename "$0" >> "$CALLS"
"""
# Like the real one: refuses a non-empty directory, writes backup_manifest last.
BASEBACKUP = STAND_IN + """[ -z "$(ls -A "$PGDATA")" ] || { echo "directory exists but is not empty" >&2; exit 1; }
echo 16 > "$PGDATA/PG_VERSION"; touch "$PGDATA/standby.signal"
[ -n "$CUT_SHORT" ] && exit 137
echo '{}' > "$PGDATA/backup_manifest"
"""


@pytest.fixture
def replica_box(tmp_path, services):
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("psql", STAND_IN), ("postgres", STAND_IN), ("pg_basebackup", BASEBACKUP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    calls = tmp_path / "calls"
    # Compose turns $$ into $ (the file's only interpolation in the script).
    script = services["s0-replica"]["entrypoint"][-1].replace("$$", "$")

    def run(**extra):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "PGDATA": str(pgdata), "CALLS": str(calls), **extra})
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
