"""What a process that only runs a command or a shard's Alembic imports: not the ORM, nor
shardkit's session and routing code (every ``shardkit`` command and every shard's
``python -m alembic`` pays its imports); the package's public names still import."""

from __future__ import annotations

import subprocess
import sys

import shardkit

BASE = {"shards": [{"name": "s0", "primary": "postgresql+psycopg://app@db0.invalid/app"},
                   {"name": "s1", "primary": "postgresql+psycopg://app@db1.invalid/app"}]}


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.split())


def test_the_command_and_the_migration_driver_do_not_import_the_orm():
    loaded = _loaded_after("import shardkit.cli, shardkit.migrate\n"
                           "c = shardkit.migrate.Cluster.from_config(" + repr(BASE) + ", follow_map=False)\n"
                           "c.node_url('s1'); c.shard_names; c.dispose()")
    heavy = {"sqlalchemy.orm", "shardkit._session", "shardkit._routing", "shardkit._scatter"}
    assert not heavy & loaded, heavy & loaded


def test_import_shardkit_loads_nothing_until_a_name_is_used():
    loaded = _loaded_after("import shardkit")
    assert not {m for m in loaded if m.startswith(("sqlalchemy", "psycopg", "shardkit."))}


def test_every_public_name_imports():
    for name in shardkit.__all__:
        assert getattr(shardkit, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from shardkit import *", namespace)
    assert set(shardkit.__all__) <= set(namespace)
    from shardkit import _sql

    assert shardkit.install_sql is _sql.install and shardkit.uninstall_sql is _sql.uninstall
    assert set(shardkit.__all__) <= set(dir(shardkit))


def test_the_router_is_made_on_first_use_and_kept():
    cluster = shardkit.Cluster.from_config(BASE, follow_map=False)
    assert "router" not in vars(cluster)
    router = cluster.router
    assert vars(cluster)["router"] is router and cluster.router is router
    assert cluster.map_version is None
    cluster.foreign_buckets = {"s0": frozenset({3})}
    assert cluster.router is not router and cluster.foreign_buckets == {"s0": frozenset({3})}
    cluster._after_fork()   # the router's own state is reset too
    fresh = shardkit.Cluster.from_config(BASE, follow_map=False)
    fresh._after_fork()     # none made yet: none made by the fork hook either
    assert "router" not in vars(fresh)
    cluster.dispose()
    fresh.dispose()
