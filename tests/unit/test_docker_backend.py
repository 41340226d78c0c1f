"""The docker backend of the pytest plugin, without a Docker engine.

What runs in the containers is run here against stand-in programs; node
control against a stand-in for docker-py's Container; backend selection
against a stand-in ``docker info``.
"""

import os
import shutil
import socket
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ports import free_port_run
from shardkit import DevClusterError
from shardkit.devcluster import DevCluster, DevNode, DevShard
from shardkit.testing import docker as dk
from shardkit.testing import plugin
from shardkit.testing.docker import DockerCluster, DockerNode

pytest_plugins = ["pytester"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# --- what runs in the containers -------------------------------------------------------

RECORDER = """#!/bin/sh
# Appends "<name>\\t<arg>\\t<arg>..." to $CALLS.
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\\t%s' "$a"; done; echo; } >> "$CALLS"
"""


@pytest.fixture
def box(tmp_path):
    """A fake container: stand-in programs on PATH, an empty PGDATA as the image makes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("postgres", "docker-entrypoint.sh"):
        (bin_dir / name).write_text(RECORDER)
    # Clones like the real one: the data directory gets a PG_VERSION.
    (bin_dir / "pg_basebackup").write_text(
        RECORDER + '[ -z "$FAIL_CLONE" ] || exit 1\necho 16 > "$PGDATA/PG_VERSION"\n')
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    pgdata.chmod(0o1777)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PGDATA": str(pgdata), "CALLS": str(calls)}

    def run(script, **extra):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "-c", script], env={**env, **extra},
                              capture_output=True, text=True, timeout=30)
        recorded = calls.read_text().splitlines() if calls.exists() else []
        return proc, [line.split("\t") for line in recorded]

    return types.SimpleNamespace(run=run, pgdata=pgdata, hba=tmp_path / "pg_hba.conf")


@needs_bash
def test_replica_clones_its_primary_once_then_runs_the_server(box):
    script = dk.replica_script(40002, "s1-primary", 40000, "shardkit_r1", hba_file=str(box.hba))
    server = dk.server_args(40002, str(box.hba))

    proc, calls = box.run(script)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        ["pg_basebackup", "-h", "s1-primary", "-p", "40000", "-U", "shardkit", "-w",
         "-D", str(box.pgdata), "-R", "-X", "stream", "-c", "fast", "-C", "-S", "shardkit_r1",
         "--no-sync"],
        server,
    ]
    # PostgreSQL refuses to start on a data directory others can enter.
    assert stat.S_IMODE(box.pgdata.stat().st_mode) == 0o700
    assert box.hba.read_text().splitlines() == list(dk.HBA_LINES)
    assert ["-c", f"hba_file={box.hba}"] in [server[i:i + 2] for i in range(len(server))]

    # Restarted (after stop() or kill()): the data directory is kept, no new clone.
    proc, calls = box.run(script)
    assert proc.returncode == 0, proc.stderr
    assert calls == [server]


@needs_bash
def test_a_failed_clone_stops_the_replica_before_the_server_starts(box):
    script = dk.replica_script(40001, "s0-primary", 40000, "shardkit_r0", hba_file=str(box.hba))
    proc, calls = box.run(script, FAIL_CLONE="1")
    assert proc.returncode != 0
    assert [c[0] for c in calls] == ["pg_basebackup"]


@needs_bash
def test_primary_writes_its_hba_and_hands_over_to_the_image_entrypoint(box):
    proc, calls = box.run(dk.primary_script(40000, hba_file=str(box.hba)))
    assert proc.returncode == 0, proc.stderr
    assert calls == [["docker-entrypoint.sh", *dk.server_args(40000, str(box.hba))]]
    assert box.hba.read_text().splitlines() == list(dk.HBA_LINES)


def test_server_settings():
    args = dk.server_args(40000)
    assert args[0] == "postgres" and set(args[1::2]) == {"-c"}
    settings = dict(a.split("=", 1) for a in args[2::2])
    assert len(settings) == len(args[2::2])  # no setting given twice
    # Inside its container a server listens on the port it is published on.
    assert (settings["port"], settings["listen_addresses"]) == ("40000", "*")
    assert settings["wal_level"] == "replica"
    assert int(settings["max_wal_senders"]) >= 2 and int(settings["max_replication_slots"]) >= 2
    assert (settings["fsync"], settings["synchronous_commit"]) == ("off", "on")
    assert settings["hba_file"] == dk.HBA_FILE
    # Command-line settings win over ALTER SYSTEM (set_apply_delay) and over what
    # pg_basebackup -R writes to postgresql.auto.conf.
    assert not settings.keys() & {"recovery_min_apply_delay", "primary_conninfo",
                                  "primary_slot_name"}


def test_hba_admits_replication_from_other_containers_and_the_entrypoint_socket():
    rules = [tuple(line.split()) for line in dk.HBA_LINES]
    assert ("host", "replication", "all", "all", "trust") in rules
    # The image's entrypoint sets the primary up through a socket-only server.
    assert ("local", "all", "all", "trust") in rules


# --- plan and config ---------------------------------------------------------------------


def test_plan_names_nodes_and_links_replicas_to_their_primary(tmp_path):
    c = DockerCluster(tmp_path, 1024, [])
    start = free_port_run(6)
    c._plan(2, 2, start)
    assert [n.name for n in c.nodes] == ["s0/primary", "s0/r0", "s0/r1",
                                         "s1/primary", "s1/r0", "s1/r1"]
    assert [n.port for n in c.nodes] == list(range(start, start + 6))
    assert [n.role for n in c.shard("s1").nodes] == ["primary", "replica", "replica"]
    r1 = c.shard("s1").replicas[1]
    assert (r1.alias, r1.slot_name) == ("s1-r1", "shardkit_r1")
    assert r1.primary_node is c.shard("s1").primary and r1.primary_node.alias == "s1-primary"
    assert r1.container_name == f"{c.name}-s1-r1"
    # Container names are unique across clusters; aliases only within one network.
    other = DockerCluster(tmp_path, 1024, [])
    other._plan(2, 2, None)
    assert not {n.container_name for n in c.nodes} & {n.container_name for n in other.nodes}
    assert len({n.port for n in c.nodes + other.nodes}) == 12
    with pytest.raises(DevClusterError, match="needs a replica"):
        _ = c.shard("s0").primary.primary_node


def test_plan_refuses_a_port_start_that_is_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DevClusterError,
                           match=rf"port {port} \(port_start \+ 0\) for s0/primary is in use"):
            DockerCluster(tmp_path, 1024, [])._plan(1, 0, port)


def test_config_is_written_exactly_as_devcluster_writes_it(tmp_path):
    docker = DockerCluster(tmp_path, 64, [])
    docker._plan(2, 1, None)
    dev_shards = []
    for s in docker.shards:
        nodes = [DevNode(shard=s.name, name=n.name, role=n.role, port=n.port, datadir=tmp_path,
                         programs=None) for n in s.nodes]
        dev_shards.append(DevShard(s.name, nodes[0], nodes[1:]))
    dev = DevCluster(tmp_path, 64, dev_shards, None)
    extra = {"groups": {"users": {"tables": {"users": "id"}}}, "replicas": {"max_lag_seconds": 2}}

    assert docker.config_dict() == dev.config_dict()
    ours = docker.write_config(tmp_path / "docker.toml", extra).read_bytes()
    assert ours == dev.write_config(tmp_path / "dev.toml", extra).read_bytes()
    p = docker.shards[0].primary
    assert docker.config_dict()["shards"][0]["primary"] == (
        f"postgresql+psycopg://shardkit@127.0.0.1:{p.port}/shardkit")


def test_up_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DevClusterError, match="not an empty directory"):
        DockerCluster.up(tmp_path)
    with pytest.raises(DevClusterError, match="shards >= 1"):
        DockerCluster.up(tmp_path / "new", shards=0)


# --- node control against a stand-in container -------------------------------------------


class FakeContainer:
    """docker-py's Container as DockerNode uses it."""

    def __init__(self, *, obeys_signals=True):
        self.status = "running"
        self.attrs = {"State": {"ExitCode": 0}}
        self.signals = []
        self.obeys_signals = obeys_signals
        self.start_error = None
        self.on_start = "running"
        self.log = b""

    def reload(self):
        pass

    def kill(self, signal=None):
        self.signals.append(signal)
        if self.obeys_signals:
            self.status = "exited"

    def start(self):
        if self.start_error is not None:
            raise self.start_error
        self.status = self.on_start

    def logs(self):
        return self.log


class FakeTestcontainer:
    def __init__(self, container):
        self.container = container

    def get_wrapped_container(self):
        return self.container


@pytest.fixture
def node(tmp_path):
    pytest.importorskip("docker")
    n = DockerNode(shard="s0", name="s0/r0", role="replica", port=5999,
                   container_name="shardkit-test-s0-r0", alias="s0-r0",
                   log_copy=tmp_path / "s0" / "r0.log")
    n._container = FakeTestcontainer(FakeContainer())
    return n


@pytest.mark.parametrize("mode, signal", [("smart", "SIGTERM"), ("fast", "SIGINT"),
                                          ("immediate", "SIGQUIT")])
def test_stop_sends_the_postmaster_the_signal_of_its_mode(node, mode, signal):
    node.stop(mode)
    assert node._container.container.signals == [signal]
    assert not node.is_running()
    node.stop(mode)  # stopping a stopped node is a no-op
    assert node._container.container.signals == [signal]


def test_stop_rejects_unknown_modes_and_times_out_with_a_hint(node):
    with pytest.raises(ValueError, match="smart, fast, immediate"):
        node.stop("hard")
    node._container.container.obeys_signals = False
    with pytest.raises(DevClusterError, match=r"still running 0.2 s after SIGINT .*immediate"):
        node.stop(timeout=0.2)


def test_kill_sigkills_a_running_container_only(node):
    node.kill()
    assert node._container.container.signals == ["SIGKILL"]
    with pytest.raises(DevClusterError, match="cannot kill s0/r0: it is not running"):
        node.kill()


def test_start_says_when_the_host_port_was_taken_meanwhile(node):
    from docker.errors import APIError

    fake = node._container.container
    fake.status = "exited"
    fake.start_error = APIError(
        "500 Server Error", explanation="driver failed programming external connectivity on "
        "endpoint shardkit-test-s0-r0: Bind for 127.0.0.1:5999 failed: port is already allocated")
    with pytest.raises(DevClusterError, match="host port 5999 was taken by another program"):
        node.start()


def test_start_fails_early_with_the_log_when_the_container_exits(node):
    fake = node._container.container
    fake.status, fake.on_start = "exited", "exited"
    fake.attrs["State"]["ExitCode"] = 1
    fake.log = b"LOG:  starting\nFATAL:  could not map anonymous shared memory\n"
    with pytest.raises(DevClusterError) as ei:
        node.start(timeout=30)
    assert "exited (exit code 1) before PostgreSQL accepted connections" in str(ei.value)
    assert "FATAL:  could not map anonymous shared memory" in str(ei.value)


def test_log_tail_reads_the_container_log_and_keeps_the_last_copy(node):
    node._container.container.log = b"".join(b"line %d\n" % i for i in range(30))
    assert node.log_tail(2) == "line 28\nline 29"
    node._container = None  # the cluster was taken down
    assert node.log_tail(1) == "line 29"
    assert not node.is_running()


@pytest.mark.parametrize("message, conflict", [
    ("driver failed programming external connectivity on endpoint x: Bind for "
     "127.0.0.1:5432 failed: port is already allocated", True),
    ("Error starting userland proxy: listen tcp4 127.0.0.1:5432: bind: address already in use",
     True),
    ("No such image: postgres:16", False),
])
def test_port_conflicts_are_told_from_other_docker_errors(message, conflict):
    assert dk._is_port_conflict(message) is conflict


# --- backend selection -------------------------------------------------------------------


@pytest.mark.parametrize("version, ok", [("4.7.2", False), ("3.7.1", False), ("4.8.0", True),
                                         ("4.15.0", True), ("5.0.0", True)])
def test_testcontainers_version_gate(version, ok):
    problem = dk._version_problem(version)
    if ok:
        assert problem is None
    else:
        assert f"testcontainers {version} is too old" in problem and ">= 4.8" in problem


@pytest.fixture
def docker_backend(monkeypatch):
    """SHARDKIT_TEST_BACKEND=docker with a docker command, usable testcontainers, no probe yet."""
    monkeypatch.setenv("SHARDKIT_TEST_BACKEND", "docker")
    monkeypatch.setattr(plugin, "testcontainers_problem", lambda: None)
    monkeypatch.setattr(plugin.shutil, "which", lambda name: f"/usr/bin/{name}")
    probes = []

    def docker_info(answer):
        def run(args, **kw):
            probes.append(args)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        monkeypatch.setattr(plugin.subprocess, "run", run)

    return types.SimpleNamespace(docker_info=docker_info, probes=probes)


def _skip_reason(excinfo):
    return str(excinfo.value.msg)


def test_docker_backend_skips_saying_why_when_no_engine_answers(docker_backend):
    docker_backend.docker_info(subprocess.CompletedProcess(
        ["docker", "info"], 1, stdout="Client:\n Version: 27.1.1\n",
        stderr="Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
               "Is the docker daemon running?\n"))
    with pytest.raises(pytest.skip.Exception) as ei:
        plugin._check_backend()
    assert _skip_reason(ei) == (
        "SHARDKIT_TEST_BACKEND=docker, but no Docker engine is reachable (`docker info` failed: "
        "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker "
        "daemon running?); unset it to run against the local PostgreSQL installation")
    assert docker_backend.probes == [["/usr/bin/docker", "info"]]


def test_docker_backend_skips_when_docker_info_hangs(docker_backend):
    docker_backend.docker_info(subprocess.TimeoutExpired(["docker", "info"], 30))
    with pytest.raises(pytest.skip.Exception, match=r"`docker info` did not answer within 30 s"):
        plugin._check_backend()


def test_docker_backend_skips_without_the_docker_command(docker_backend, monkeypatch):
    monkeypatch.setattr(plugin.shutil, "which", lambda name: None)
    docker_backend.docker_info(AssertionError("must not run"))
    with pytest.raises(pytest.skip.Exception, match="the docker command is not installed"):
        plugin._check_backend()


def test_docker_backend_skips_without_testcontainers_before_probing(docker_backend, monkeypatch):
    monkeypatch.setattr(plugin, "testcontainers_problem", dk.testcontainers_problem)
    monkeypatch.setitem(sys.modules, "testcontainers", None)  # import fails
    docker_backend.docker_info(AssertionError("must not run"))
    with pytest.raises(pytest.skip.Exception, match=r"testcontainers is not installed"):
        plugin._check_backend()
    assert docker_backend.probes == []


def test_docker_backend_skips_with_a_too_old_testcontainers(docker_backend, monkeypatch):
    monkeypatch.setattr(plugin, "testcontainers_problem", dk.testcontainers_problem)
    monkeypatch.setitem(sys.modules, "testcontainers", types.ModuleType("testcontainers"))
    monkeypatch.setattr(dk.importlib.metadata, "version",
                        lambda name: "4.4.1" if name == "testcontainers" else "0")
    docker_backend.docker_info(AssertionError("must not run"))
    with pytest.raises(pytest.skip.Exception, match=r"testcontainers 4\.4\.1 is too old"):
        plugin._check_backend()


def test_docker_backend_runs_when_an_engine_answers(docker_backend):
    docker_backend.docker_info(subprocess.CompletedProcess(["docker", "info"], 0, "", ""))
    assert plugin._check_backend() == "docker"


def test_local_backend_never_probes_docker(docker_backend, monkeypatch):
    monkeypatch.delenv("SHARDKIT_TEST_BACKEND")
    docker_backend.docker_info(AssertionError("must not run"))
    assert plugin._check_backend() == "local"
    assert docker_backend.probes == []


def test_an_unknown_backend_fails(monkeypatch):
    monkeypatch.setenv("SHARDKIT_TEST_BACKEND", "podman")
    with pytest.raises(pytest.fail.Exception, match="'podman' is not a backend"):
        plugin._check_backend()


@pytest.mark.parametrize("backend, chosen", [("docker", DockerCluster), ("local", DevCluster)])
def test_the_factory_starts_clusters_on_the_chosen_backend(pytester, monkeypatch, tmp_path,
                                                           backend, chosen):
    events = []

    class Started:
        def __init__(self, kind, base):
            self.kind, self.base_dir = kind, base

        def down(self, remove=True):
            events.append(("down", self.kind, self.base_dir, remove))

    def fake_up(kind):
        def up(base_dir, shards=2, replicas=1, **kw):
            events.append(("up", kind, Path(base_dir).name, shards, replicas, kw))
            return Started(kind, base_dir)
        return up

    monkeypatch.setattr(DockerCluster, "up", fake_up("docker"))
    monkeypatch.setattr(DevCluster, "up", fake_up("local"))
    monkeypatch.setattr(plugin, "_docker_unavailable", lambda: None)
    monkeypatch.setenv("SHARDKIT_TEST_BACKEND", backend)
    monkeypatch.setenv("SHARDKIT_TEST_DIR", str(tmp_path))
    pytester.makepyfile("""
        def test_two(shardkit_cluster_factory, shardkit_dev_cluster):
            c = shardkit_cluster_factory(shards=1, replicas=2, bucket_count=8)
            assert c.kind == shardkit_dev_cluster.kind
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1)
    kind = "docker" if chosen is DockerCluster else "local"
    ups = [e for e in events if e[0] == "up"]
    assert ups == [("up", kind, "cluster0", 2, 1, {}),
                   ("up", kind, "cluster1", 1, 2, {"bucket_count": 8})]
    # Both are taken down at the end of the session, and their root directory removed.
    downs = [e for e in events if e[0] == "down"]
    assert sorted((k, Path(base).name, remove) for _, k, base, remove in downs) == [
        (kind, "cluster0", True), (kind, "cluster1", True)]
    assert list(tmp_path.glob("shardkit-test-*")) == []
