"""docker-compose.yml and the docker test backend, checked without a Docker engine.

The compose file is read as YAML; the backend runs against stand-ins for
testcontainers.  (The replica set-up script runs against a local server in
tests/integration/test_compose_replica_script.py.)
"""

import subprocess
import sys
import types
from pathlib import Path, PurePosixPath

import pytest
import yaml

from shardkit import DevClusterError
from shardkit.testing import docker as dk
from shardkit.testing import plugin
from shardkit.testing.docker import DockerCluster, DockerNode

ROOT = Path(__file__).resolve().parents[2]
PGDATA = "/var/lib/postgresql/data"  # the official image's PGDATA (up to PostgreSQL 17)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_data_survives_down_and_up(compose):
    """`docker compose down` then `up` must not start every server on an empty data
    directory: Compose does not mount a service's anonymous volumes (the image's
    VOLUME) again after `down`, so each server's data must be on a named volume."""
    declared = compose.get("volumes") or {}
    for name, svc in compose["services"].items():
        mounts = [m for m in svc.get("volumes", []) if m.split(":")[1] == PGDATA]
        assert len(mounts) == 1, f"{name}: no named volume at {PGDATA}"
        volume = mounts[0].split(":")[0]
        assert not volume.startswith(("/", ".")), (name, volume)   # a named volume, not a path
        assert volume in declared, (name, volume)
    data = [m.split(":")[0] for svc in compose["services"].values() for m in svc["volumes"]]
    assert len(set(data)) == len(data)  # no two servers share a data directory


# --- a Docker engine on another machine ---------------------------------------------------


def _fake_testcontainers(monkeypatch, docker_host, networks):
    """testcontainers as the backend imports it, its engine at ``docker_host``."""
    class Network:
        name = "net"

        def create(self):
            networks.append(self)
            return self

        def remove(self):
            pass

    modules = {
        "testcontainers": types.ModuleType("testcontainers"),
        "testcontainers.core": types.ModuleType("testcontainers.core"),
        "testcontainers.core.docker_client": types.ModuleType("testcontainers.core.docker_client"),
        "testcontainers.core.network": types.ModuleType("testcontainers.core.network"),
    }
    modules["testcontainers.core.docker_client"].get_docker_host = lambda: docker_host
    modules["testcontainers.core.network"].Network = Network
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(dk.importlib.metadata, "version",
                        lambda name: "4.15.0" if name == "testcontainers" else "0")


@pytest.mark.parametrize("address, remote", [
    (None, None),
    ("unix:///var/run/docker.sock", None),
    ("npipe:////./pipe/docker_engine", None),
    ("tcp://127.0.0.1:2375", None),
    ("tcp://localhost:2376", None),
    ("tcp://docker:2375", "tcp://docker"),
    ("tcp://10.1.2.3:2376", "tcp://10.1.2.3"),
    ("ssh://deploy:s3cret@build-box", "ssh://build-box"),  # no user name or password shown
    ("build-box", "tcp://build-box"),                        # TC_HOST takes a bare host
])
def test_remote_engines_are_told_from_local_ones(address, remote):
    assert dk._remote_host(address) == remote


def test_the_backend_skips_saying_why_when_the_engine_is_on_another_machine(monkeypatch):
    """`docker info` answers for a remote engine (DOCKER_HOST=tcp://docker:2375, as with a
    CI's docker:dind service), but the servers' ports are published on that machine's
    127.0.0.1: the session used to start clusters and wait 120 s per node for servers
    this machine cannot reach, then blame PostgreSQL ("not accepting connections")."""
    _fake_testcontainers(monkeypatch, "tcp://docker:2375", [])
    for name in ("DOCKER_HOST", "TC_HOST", "TESTCONTAINERS_HOST_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHARDKIT_TEST_BACKEND", "docker")
    monkeypatch.setattr(plugin.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(plugin.subprocess, "run",
                        lambda args, **kw: subprocess.CompletedProcess(args, 0, "", ""))
    with pytest.raises(pytest.skip.Exception) as ei:
        plugin._check_backend()
    reason = str(ei.value.msg)
    assert "the Docker engine is on another machine (tcp://docker)" in reason
    assert "unset DOCKER_HOST" in reason


def test_up_refuses_a_remote_engine_before_making_anything(monkeypatch, tmp_path):
    networks = []
    _fake_testcontainers(monkeypatch, None, networks)
    monkeypatch.setenv("TC_HOST", "10.1.2.3")
    with pytest.raises(DevClusterError, match=r"TC_HOST is on another machine \(tcp://10\.1\.2\.3\)"):
        DockerCluster.up(tmp_path / "c", shards=1, replicas=0)
    assert networks == [] and not (tmp_path / "c").exists()


# --- tests about a local cluster's files must be able to tell a container's node ---------


def test_a_container_node_has_no_local_data_directory(tmp_path):
    """Tests that edit a local node's files skip other nodes with `hasattr(n, "datadir")`
    (tests/integration/test_ops_surface.py, test_cli_config_edges.py,
    test_replica_paths.py); a DockerNode had one, the path inside its container, so
    under SHARDKIT_TEST_BACKEND=docker they wrote to this machine's
    /var/lib/postgresql/data/pg_hba.conf or read its postmaster.pid instead of skipping."""
    node = DockerNode(shard="s0", name="s0/primary", role="primary", port=5999,
                      container_name="shardkit-x-s0-primary", alias="s0-primary",
                      log_copy=tmp_path / "s0" / "primary.log")
    assert not hasattr(node, "datadir")
    assert node.container_datadir == PurePosixPath(PGDATA)
    # DevNode's helpers that read the data directory say why they cannot.
    with pytest.raises(AttributeError, match=r"runs in container shardkit-x-s0-primary: its "
                                             r"data directory \(/var/lib/postgresql/data\) is "
                                             r"not on this machine"):
        node._pid()
