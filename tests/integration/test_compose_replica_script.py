"""docker-compose.yml's replica set-up script, run without Docker against a local
primary (a ``shardkit_module_cluster_factory`` cluster) with the real ``pg_basebackup``
and ``psql``."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _pg_program(name):
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"needs {name}")
    return found


def test_compose_replica_setup_recovers_a_lost_replica_volume(compose, shardkit_module_cluster_factory,
                                                              tmp_path):
    """The replica's entrypoint, run as Compose runs it, against a local primary:
    it clones on an empty data directory only, and clones again once its volume is
    gone (removed to rebuild the replica, or a clone that failed half way), although
    the primary still holds the replica's slot: `pg_basebackup -C` refuses an
    existing slot, which left the replica unable to start, ever."""
    dev = shardkit_module_cluster_factory(shards=1, replicas=0)
    primary = dev.shards[0].primary
    argv = compose["services"]["s0-replica"]["entrypoint"]
    assert argv[:2] == ["bash", "-c"]
    # What the container's shell sees: Compose turns $$ into $; the service name
    # resolves to the primary, here a local server.
    script = argv[2].replace("$$", "$").replace("s0-primary", "127.0.0.1")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("pg_basebackup", "psql"):
        (bin_dir / program).symlink_to(_pg_program(program))
    calls = tmp_path / "server-calls"
    (bin_dir / "postgres").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # the server: noted
    (bin_dir / "postgres").chmod(0o755)
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PGDATA": str(pgdata),
           "PGPORT": str(primary.port), "PGPASSWORD": "unused", "PGCONNECT_TIMEOUT": "5"}

    def start_container():
        return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                              timeout=120)

    try:
        r = start_container()
        assert r.returncode == 0, r.stderr
        assert (pgdata / "standby.signal").exists()
        auto = (pgdata / "postgresql.auto.conf").read_text()
        assert "primary_conninfo" in auto and "primary_slot_name = 's0_replica'" in auto
        assert oct(pgdata.stat().st_mode & 0o777) == oct(0o700)
        assert calls.read_text().split() == ["-c", "hot_standby_feedback=on", "-c", "max_prepared_transactions=50"]

        # A restart keeps the data directory: no new clone.
        version = (pgdata / "PG_VERSION").stat().st_mtime_ns
        r = start_container()
        assert r.returncode == 0, r.stderr
        assert (pgdata / "PG_VERSION").stat().st_mtime_ns == version

        # The replica's volume is removed (to rebuild it): the next start clones again.
        shutil.rmtree(pgdata)
        pgdata.mkdir()
        r = start_container()
        assert r.returncode == 0, r.stderr
        assert (pgdata / "standby.signal").exists()
    finally:
        with primary.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = 's0_replica'")
