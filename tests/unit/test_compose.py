"""docker-compose.yml is valid and matches shardkit.compose.toml (no Docker engine needed)."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import shardkit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_docker_compose_config_when_available():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("the docker compose plugin is not installed; the structural checks below still run")
    r = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_services_are_two_shards_with_replicas_and_a_catalog(compose):
    services = compose["services"]
    assert set(services) == {"s0-primary", "s0-replica", "s1-primary", "s1-replica", "catalog"}
    for name, svc in services.items():
        assert re.fullmatch(r"postgres:\d+", svc["image"]), (name, svc["image"])
        # Ready means ready over TCP (what replicas and shardkit connect with): during its
        # first start the image's temporary server listens on the Unix socket only.
        assert "pg_isready -h 127.0.0.1 " in svc["healthcheck"]["test"][-1], name
        # Published on the loopback interface only (the default password is public).
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), (name, svc["ports"])
    for shard in ("s0", "s1"):
        rep = services[f"{shard}-replica"]
        assert rep["depends_on"][f"{shard}-primary"]["condition"] == "service_healthy"
        script = rep["entrypoint"][-1]
        assert f"pg_basebackup -h {shard}-primary" in script and " -R " in script
    prim = services["s0-primary"]
    assert "wal_level=logical" in prim["command"]
    assert "allow-replication" in compose["configs"]
    assert "host replication" in compose["configs"]["allow-replication"]["content"]


def test_compose_toml_points_at_the_published_ports(compose):
    cfg = shardkit.load_config(ROOT / "shardkit.compose.toml", env={})
    ports = {name: int(svc["ports"][0].split(":")[-2]) for name, svc in compose["services"].items()}
    for shard in cfg.shards:
        assert shard.primary.port == ports[f"{shard.name}-primary"]
        assert [r.port for r in shard.replicas] == [ports[f"{shard.name}-replica"]]
        assert shard.primary.password == "shardkit"   # ${SHARDKIT_PASSWORD:-shardkit}
    assert cfg.catalog_url is not None
    assert cfg.catalog_url.port == ports["catalog"]
    assert cfg.catalog_url.database == compose["services"]["catalog"]["environment"]["POSTGRES_DB"]
    raw = tomllib.loads((ROOT / "shardkit.compose.toml").read_text())
    assert raw["bucket_count"] == 1024
