"""Alembic on every shard: upgrade, downgrade, drift, a failure on one shard, canary."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import inproc_cli
import pytest
from sqlalchemy import inspect, text

import shardkit
from shardkit import migrate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

REV = '''"""{msg}"""
from alembic import op
import sqlalchemy as sa

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
{up}


def downgrade():
{down_body}
'''


def write_rev(versions: Path, rev: str, down: str | None, up: str, down_body: str) -> None:
    (versions / f"{rev}.py").write_text(REV.format(msg=rev, rev=rev, down=down,
                                                   up=up, down_body=down_body))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    work = tmp_path_factory.mktemp("mig")
    shutil.copytree(ROOT / "migrations", work / "migrations")
    versions = work / "migrations" / "versions"
    write_rev(versions, "r1", None,
              "    op.create_table('widgets', sa.Column('id', sa.BigInteger, primary_key=True),\n"
              "                    sa.Column('name', sa.String(50)))\n"
              "    op.install_shardkit_sql()\n"
              "    op.install_shardkit_guard()  # no catalog here: nothing to do",
              "    op.uninstall_shardkit_sql()\n    op.drop_table('widgets')")
    write_rev(versions, "r2", "r1",
              "    op.add_column('widgets', sa.Column('color', sa.String(20)))",
              "    op.drop_column('widgets', 'color')")
    write_rev(versions, "r3", "r2",
              "    op.create_table('gadgets', sa.Column('id', sa.BigInteger, primary_key=True))",
              "    op.drop_table('gadgets')")
    cfg = work / "shardkit.toml"
    dev.write_config(cfg)
    cluster = shardkit.Cluster.from_config(cfg)
    yield dev, cluster, cfg, work / "migrations" / "alembic.ini"
    cluster.dispose()


def cli(*args: str, proc: bool = False) -> subprocess.CompletedProcess[str]:
    """The command in this process; ``proc``: as ``python -m shardkit.cli``."""
    return inproc_cli.shardkit(args, proc=proc)


def ensure(cluster, cfg, ini, rev: str) -> None:
    """Bring every shard to ``rev`` (upgrading those behind it), migrating only the shards not there."""
    behind = [s for s, v in migrate.current(cluster).items() if v != rev]
    if behind:
        migrate.run_command(cluster, str(cfg), "upgrade", rev, alembic_ini=ini, shards=behind)
    assert set(migrate.current(cluster).values()) == {rev}


def columns(cluster, shard, table):
    with cluster.primary(shard).connect() as c:
        insp = inspect(c)
        return [col["name"] for col in insp.get_columns(table)] if insp.has_table(table) else None


def test_upgrade_downgrade_and_drift(env):
    dev, cluster, cfg, ini = env
    r = cli("migrate", "upgrade", "r2", "--config", str(cfg), "--alembic-ini", str(ini), "--json", proc=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and {s["shard"] for s in out["shards"]} == {"s0", "s1", "s2"}
    assert all(s["revision_after"] == "r2" for s in out["shards"])
    for s in cluster.shard_names:
        assert columns(cluster, s, "widgets") == ["id", "name", "color"]
        with cluster.primary(s).connect() as c:   # op.install_shardkit_sql() ran
            assert c.execute(text("SELECT shardkit.bucket(42::bigint, 1024)")).scalar() == \
                shardkit.bucket_for(42, 1024)
    assert migrate.current(cluster) == {"s0": "r2", "s1": "r2", "s2": "r2"}
    report = migrate.check(cluster, alembic_ini=ini)
    assert report.ok and report.heads == ["r3"]

    r = cli("migrate", "downgrade", "r1", "--config", str(cfg), "--alembic-ini", str(ini))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 3 shards ok" in r.stdout
    for s in cluster.shard_names:
        assert columns(cluster, s, "widgets") == ["id", "name"]

    # Drift: one shard's schema changed by hand.
    with cluster.primary("s2").begin() as c:
        c.execute(text("ALTER TABLE widgets ADD COLUMN rogue int"))
    r = cli("migrate", "check", "--config", str(cfg), "--alembic-ini", str(ini))
    assert r.returncode == 1
    assert "DRIFT: s2: widgets columns differ" in r.stdout
    with cluster.primary("s2").begin() as c:
        c.execute(text("ALTER TABLE widgets DROP COLUMN rogue"))
    # Drift: one shard at another revision (s1 left at r1).
    migrate.run_command(cluster, str(cfg), "upgrade", "r2", alembic_ini=ini, shards=["s0", "s2"])
    report = migrate.check(cluster, alembic_ini=ini)
    assert report.revision_drift and report.revisions["s1"] == "r1"
    assert any("s1: widgets columns differ" in d for d in report.schema_differences)
    r = cli("migrate", "upgrade", "r2", "--config", str(cfg), "--alembic-ini", str(ini))
    assert r.returncode == 0 and migrate.check(cluster, alembic_ini=ini).ok


def test_failure_on_one_shard_is_named_and_others_reported(env):
    dev, cluster, cfg, ini = env
    ensure(cluster, cfg, ini, "r2")   # (where the test before leaves every shard)
    with cluster.primary("s1").begin() as c:   # makes r3's CREATE TABLE fail on s1 only
        c.execute(text("CREATE TABLE gadgets (x int)"))
    r = cli("migrate", "upgrade", "head", "--config", str(cfg), "--alembic-ini", str(ini))
    assert r.returncode == 1
    assert "failed on s1" in r.stderr and 'relation "gadgets" already exists' in r.stderr
    assert "s0 at r3" in r.stderr and "s1 at r2" in r.stderr and "s2 at r3" in r.stderr
    assert migrate.current(cluster) == {"s0": "r3", "s1": "r2", "s2": "r3"}
    # Back to one revision everywhere (s1 is already there), then s1 as a canary:
    # it fails first and nothing else moves.
    migrate.run_command(cluster, str(cfg), "downgrade", "r2", alembic_ini=ini, shards=["s0", "s2"])
    assert migrate.current(cluster) == {"s0": "r2", "s1": "r2", "s2": "r2"}
    with pytest.raises(migrate.MigrationError) as ei:
        migrate.run_command(cluster, str(cfg), "upgrade", "head", alembic_ini=ini, canary="s1")
    assert set(ei.value.failed) == {"s0", "s1", "s2"}
    assert "canary shard s1" in str(ei.value) and "were not touched" in str(ei.value)
    assert migrate.current(cluster) == {"s0": "r2", "s1": "r2", "s2": "r2"}
    with cluster.primary("s1").begin() as c:
        c.execute(text("DROP TABLE gadgets"))
    results = migrate.run_command(cluster, str(cfg), "upgrade", "head", alembic_ini=ini, canary="s1")
    assert [r.shard for r in results][0] == "s1" and all(r.ok for r in results)
    assert migrate.current(cluster) == {"s0": "r3", "s1": "r3", "s2": "r3"}


def test_a_migration_guards_the_sharded_table_it_creates(env, tmp_path):
    """op.install_shardkit_guard() after creating a sharded table: every shard gets the
    table's guard trigger and keeps the buckets it owns; a move then accepts the table."""
    from shardkit import rebalance

    dev = env[0]
    catalog_url = dev.create_catalog("mig_catalog")
    cfg = dev.write_config(tmp_path / "shardkit.toml", {
        "groups": {"things": {"strategy": "hash", "tables": {"things": "id"}}},
        "catalog": {"url": catalog_url}})
    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    write_rev(tmp_path / "migrations" / "versions", "t1", None,
              "    op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True))\n"
              "    op.install_shardkit_guard()",
              "    op.drop_table('things')")
    ini = tmp_path / "migrations" / "alembic.ini"
    cluster = shardkit.Cluster.from_config(cfg, follow_map=False)
    # These databases carry the other tests' revisions; this chain starts afresh.
    saved = {}
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            saved[s] = c.execute(text("DELETE FROM alembic_version RETURNING version_num")).scalars().all()
    try:
        rebalance.init(cluster)  # before the table exists: nothing to put a trigger on yet
        owned_before = {}
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                owned_before[s] = sorted(c.execute(text("SELECT bucket FROM shardkit.owned_buckets")).scalars())
        assert sum(len(v) for v in owned_before.values()) == 1024
        r = cli("migrate", "upgrade", "head", "--config", str(cfg), "--alembic-ini", str(ini))
        assert r.returncode == 0, r.stdout + r.stderr
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                assert c.execute(text(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_guard' "
                    "AND tgrelid = 'things'::regclass")).scalar() == 1, s
                assert sorted(c.execute(text("SELECT bucket FROM shardkit.owned_buckets")).scalars()) \
                    == owned_before[s]
        rebalance.Mover(cluster, grace=0)._check_triggers(cluster.shard_names, None)
        # The guard works: s0 refuses a row of a bucket it does not own.
        key = next(k for k in range(1000) if cluster.shard_for("things", k) != "s0")
        with pytest.raises(Exception, match="SK001|does not own"):
            with cluster.primary("s0").begin() as c:
                c.execute(text("INSERT INTO things VALUES (:k)"), {"k": key})
        r = cli("migrate", "downgrade", "base", "--config", str(cfg), "--alembic-ini", str(ini))
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for s, versions in saved.items():
            with cluster.primary(s).begin() as c:
                c.execute(text("DELETE FROM alembic_version"))
                for v in versions:
                    c.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": v})
        cluster.dispose()
