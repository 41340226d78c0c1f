"""The local dev cluster against real PostgreSQL servers."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import psycopg
import pytest

from ports import free_port_run
from shardkit import DevClusterError, load_config
from shardkit.devcluster import DevCluster, find_pg_bin

pytestmark = pytest.mark.integration

# Tests of what a DevCluster is on this machine (its data directories, its
# processes, re-attaching from another process), not of the fixture's API.
local_only = pytest.mark.skipif(
    os.environ.get("SHARDKIT_TEST_BACKEND", "local") == "docker",
    reason="tests a local DevCluster's files and processes; the docker backend has none")


@pytest.fixture(scope="module")
def own_cluster(shardkit_module_cluster_factory):
    """A 1 x 1 cluster these tests may stop, kill and delay."""
    return shardkit_module_cluster_factory(shards=1, replicas=1)


@pytest.fixture
def table(shardkit_dev_cluster):
    """A fresh table on every shard of the shared cluster, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    for shard in shardkit_dev_cluster.shards:
        with shard.primary.connect() as conn:
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    yield name
    for shard in shardkit_dev_cluster.shards:
        with shard.primary.connect() as conn:
            conn.execute(f"DROP TABLE {name}")


def _processes_mentioning(text):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def test_shape_names_and_urls(shardkit_dev_cluster):
    c = shardkit_dev_cluster
    assert [s.name for s in c.shards] == ["s0", "s1"]
    for s in c.shards:
        assert [n.name for n in s.nodes] == [f"{s.name}/primary", f"{s.name}/r0"]
        assert [n.role for n in s.nodes] == ["primary", "replica"]
        for n in s.nodes:
            assert n.shard == s.name
            assert n.is_running()
            assert n.url == f"postgresql+psycopg://shardkit@127.0.0.1:{n.port}/shardkit"
            with psycopg.connect(n.dsn) as conn:
                assert conn.execute("SELECT current_database(), inet_server_port()").fetchone() == (
                    "shardkit", n.port)
    assert len({n.port for n in c.nodes}) == 4


def test_replicas_stream_from_their_primary(shardkit_dev_cluster, table):
    for i, shard in enumerate(shardkit_dev_cluster.shards):
        replica = shard.replicas[0]
        with replica.connect() as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            receiver = conn.execute("SELECT status, slot_name FROM pg_stat_wal_receiver").fetchone()
            assert receiver == ("streaming", replica.slot_name)
        with shard.primary.connect() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, shard.name))
        replica.wait_caught_up(timeout=10)
        with replica.connect() as conn:
            assert conn.execute(f"SELECT v FROM {table}").fetchall() == [(shard.name,)]


def test_replica_is_read_only(shardkit_dev_cluster):
    with shardkit_dev_cluster.shards[0].replicas[0].connect() as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE never (id int)")


@local_only
def test_pg_stat_statements_is_loaded_when_installed(shardkit_dev_cluster):
    pkglibdir = subprocess.run([str(find_pg_bin() / "pg_config"), "--pkglibdir"],
                               capture_output=True, text=True).stdout.strip()
    if not (Path(pkglibdir) / "pg_stat_statements.so").exists():
        pytest.skip("pg_stat_statements is not installed")
    for node in shardkit_dev_cluster.nodes:
        with node.connect() as conn:
            assert conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()[0] >= 0


def test_apply_delay_makes_a_replica_lag(own_cluster):
    shard = own_cluster.shards[0]
    replica = shard.replicas[0]
    with shard.primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lag (id int PRIMARY KEY)")
    replica.wait_caught_up(timeout=10)
    replica.set_apply_delay(3)
    try:
        with shard.primary.connect() as conn:
            conn.execute("INSERT INTO lag VALUES (1)")
        time.sleep(0.5)
        with replica.connect() as conn:
            assert conn.execute("SELECT count(*) FROM lag").fetchone() == (0,)
    finally:
        replica.set_apply_delay(0)
    replica.wait_caught_up(timeout=10)
    with replica.connect() as conn:
        assert conn.execute("SELECT count(*) FROM lag").fetchone() == (1,)


def test_apply_delay_and_catch_up_are_for_replicas_only(own_cluster):
    primary = own_cluster.shards[0].primary
    with pytest.raises(DevClusterError, match="needs a replica"):
        primary.set_apply_delay(1)
    with pytest.raises(DevClusterError, match="needs a replica"):
        primary.wait_caught_up()


@local_only
def test_kill_then_start(own_cluster):
    shard = own_cluster.shards[0]
    primary, replica = shard.primary, shard.replicas[0]
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS crash (id int PRIMARY KEY)")
        conn.execute("TRUNCATE crash")
        # Asynchronous commit would lose this row to the kill; wait for its WAL write.
        conn.execute("SET synchronous_commit = on")
        conn.execute("INSERT INTO crash VALUES (1)")
    held = primary.connect()
    pid = int((primary.datadir / "postmaster.pid").read_text().split()[0])

    primary.kill()
    assert not primary.is_running()
    assert (primary.datadir / "postmaster.pid").exists()  # stale, as after a crash
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    with pytest.raises(psycopg.OperationalError):
        primary.connect(connect_timeout=2)
    with pytest.raises(DevClusterError, match="not running"):
        primary.kill()

    primary.start()
    assert primary.is_running()
    assert int((primary.datadir / "postmaster.pid").read_text().split()[0]) != pid
    with primary.connect() as conn:
        assert conn.execute("SELECT id FROM crash").fetchall() == [(1,)]
        conn.execute("INSERT INTO crash VALUES (2)")
    replica.wait_streaming(timeout=20)
    replica.wait_caught_up(timeout=10)
    with replica.connect() as conn:
        assert conn.execute("SELECT count(*) FROM crash").fetchone() == (2,)

    replica.kill()
    replica.start()
    replica.wait_streaming(timeout=20)
    replica.wait_caught_up(timeout=10)


@local_only
def test_stop_and_start(own_cluster):
    replica = own_cluster.shards[0].replicas[0]
    replica.stop()
    assert not replica.is_running()
    assert not (replica.datadir / "postmaster.pid").exists()
    replica.stop()  # stopping a stopped node is a no-op
    with pytest.raises(ValueError, match="smart, fast, immediate"):
        replica.stop("hard")
    replica.start()
    replica.wait_streaming(timeout=20)


@local_only
def test_load_reattaches_from_another_process(shardkit_dev_cluster):
    c = shardkit_dev_cluster
    script = (
        "import json, sys\n"
        "from shardkit.devcluster import DevCluster\n"
        "c = DevCluster.load(sys.argv[1])\n"
        "out = []\n"
        "for n in c.nodes:\n"
        "    with n.connect() as conn:\n"
        "        port = conn.execute('SELECT inet_server_port()').fetchone()[0]\n"
        "    out.append([n.name, n.role, n.port, str(n.datadir), n.is_running(), port])\n"
        "print(json.dumps({'nodes': out, 'config': c.config_dict()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(c.base_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["nodes"] == [[n.name, n.role, n.port, str(n.datadir), True, n.port] for n in c.nodes]
    assert got["config"] == c.config_dict()


@local_only
def test_up_reuses_a_running_cluster_of_the_same_shape(shardkit_dev_cluster):
    c = shardkit_dev_cluster
    again = DevCluster.up(c.base_dir, shards=2, replicas=1)
    assert [(n.name, n.port) for n in again.nodes] == [(n.name, n.port) for n in c.nodes]
    with pytest.raises(DevClusterError, match=r"shardkit dev down --dir .*first"):
        DevCluster.up(c.base_dir, shards=3, replicas=1)
    with pytest.raises(DevClusterError, match="2 shard"):
        DevCluster.up(c.base_dir, shards=2, replicas=1, bucket_count=64)


@local_only
def test_up_writes_the_config(shardkit_dev_cluster):
    c = shardkit_dev_cluster
    with open(c.base_dir / "shardkit.toml", "rb") as f:
        assert tomllib.load(f) == c.config_dict()


def test_write_config_merges_extra(shardkit_dev_cluster, tmp_path):
    c = shardkit_dev_cluster
    extra = {
        "groups": {"users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}}},
        "reference_tables": ["countries"],
        "replicas": {"max_lag_seconds": 2.5, "consistency": "read_your_writes"},
    }
    path = c.write_config(tmp_path / "cfg.toml", extra)
    with open(path, "rb") as f:
        got = tomllib.load(f)
    assert got == {**c.config_dict(), **extra}
    cfg = load_config(got)
    assert [s.name for s in cfg.shards] == ["s0", "s1"]


def test_a_failed_up_stops_and_removes_what_it_started(monkeypatch):
    # A copy of the server programs whose pg_basebackup fails: primaries
    # start, then the first replica cannot be made.
    fast = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="shardkit-test-fail-", dir=fast))
    work.chmod(0o755)
    try:
        fake_bin = work / "bin"
        fake_bin.mkdir()
        real_bin = find_pg_bin()
        for program in ("initdb", "pg_ctl", "postgres", "pg_config"):
            (fake_bin / program).symlink_to(real_bin / program)
        fake = fake_bin / "pg_basebackup"
        fake.write_text("#!/bin/sh\necho 'pg_basebackup: simulated failure' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("SHARDKIT_PG_BIN", str(fake_bin))
        base = work / "cluster"
        with pytest.raises(DevClusterError, match="simulated failure") as ei:
            DevCluster.up(base, shards=2, replicas=1)
        assert ei.value.node in ("s0/r0", "s1/r0")
        assert not base.exists()
        assert _processes_mentioning(str(base)) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_up_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DevClusterError, match="not an empty directory"):
        DevCluster.up(tmp_path)


@local_only
def test_fixed_ports_and_down(shardkit_module_cluster_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DevClusterError, match=f"port {port} .* is in use"):
            shardkit_module_cluster_factory(shards=1, replicas=0, port_start=port)

    start = free_port_run(2)
    c = shardkit_module_cluster_factory(shards=1, replicas=1, port_start=start)
    assert [n.port for n in c.nodes] == [start, start + 1]
    c.down(remove=False)
    assert not any(n.is_running() for n in c.nodes)
    assert c.base_dir.exists()

    again = DevCluster.up(c.base_dir, shards=1, replicas=1)  # starts the stopped nodes
    assert all(n.is_running() for n in again.nodes)
    again.shards[0].replicas[0].stop()
    again = DevCluster.up(c.base_dir, shards=1, replicas=1)  # and a lone stopped replica
    assert all(n.is_running() for n in again.nodes)
    again.shards[0].replicas[0].wait_caught_up(timeout=10)
    again.down()
    assert not c.base_dir.exists()
    assert _processes_mentioning(str(c.base_dir)) == []
