"""Hostile cases for `shardkit migrate` and `op.install_shardkit_guard()`: failures midway,
canaries, branches, drift, shards that are down, the guard around moves and new shards."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import shardkit
from shardkit import migrate, rebalance

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUCKETS = 64

REV = '''"""{rev}"""
from alembic import op
import sqlalchemy as sa

revision = {rev!r}
down_revision = {down!r}
branch_labels = {labels!r}
depends_on = None


def upgrade():
{up}


def downgrade():
{down_body}
'''

_names = itertools.count()


def _indent(body: str) -> str:
    return "\n".join("    " + ln if ln.strip() else ln for ln in body.strip("\n").splitlines()) or "    pass"


class World:
    """Fresh databases (one per shard server), a config, a migrations directory."""

    def __init__(self, dev, tmp: Path, shards: int = 2, groups: dict | None = None,
                 catalog: bool = False, all_shards_in_config: bool = True) -> None:
        self.dev = dev
        self.db = f"mh{next(_names)}"
        self.tmp = tmp
        self.servers = dev.shards[:shards]
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.db}")
        self.groups = groups or {}
        self.catalog_url = dev.create_catalog(self.db + "_cat") if catalog else None
        shutil.copytree(ROOT / "migrations", tmp / "migrations")
        self.versions = tmp / "migrations" / "versions"
        self.ini = tmp / "migrations" / "alembic.ini"
        self.cfg = tmp / "shardkit.toml"
        self.write_config(shards)
        self.cluster = shardkit.Cluster.from_config(self.cfg, follow_map=False)

    def url(self, i: int) -> str:
        return self.servers[i].primary.url.rsplit("/", 1)[0] + "/" + self.db

    def dsn(self, i: int) -> str:
        return self.servers[i].primary.dsn.replace("dbname=shardkit", f"dbname={self.db}")

    def config_dict(self, shards: int) -> dict:
        cfg = {"bucket_count": BUCKETS,
               "shards": [{"name": self.servers[i].name, "primary": self.url(i), "replicas": []}
                          for i in range(shards)]}
        if self.groups:
            cfg["groups"] = self.groups
        if self.catalog_url:
            cfg["catalog"] = {"url": self.catalog_url}
        return cfg

    def write_config(self, shards: int, path: Path | None = None) -> Path:
        from shardkit.devcluster import to_toml
        path = path or self.cfg
        path.write_text(to_toml(self.config_dict(shards)), encoding="utf-8")
        return path

    def rev(self, rev: str, down, up: str, down_body: str = "pass", labels=None) -> None:
        (self.versions / f"{rev}.py").write_text(REV.format(
            rev=rev, down=down, labels=labels, up=_indent(up), down_body=_indent(down_body)))

    def cli(self, *args: str, cfg: Path | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--alembic-ini", str(self.ini)] if args[0] == "migrate" and args[1] != "current" else []
        return subprocess.run([sys.executable, "-m", "shardkit.cli", *args, "--config", str(cfg or self.cfg),
                               *extra], capture_output=True, text=True, timeout=300)

    def sql(self, i: int, query: str, params=None):
        with psycopg.connect(self.dsn(i), autocommit=True) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def has_table(self, i: int, table: str) -> bool:
        return self.sql(i, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]

    def has_trigger(self, i: int, table: str) -> bool:
        return self.sql(i, "SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_guard' "
                           "AND tgrelid = to_regclass(%s)", (table,))[0][0] == 1

    def owned(self, i: int) -> list[int]:
        return [r[0] for r in self.sql(i, "SELECT bucket FROM shardkit.owned_buckets ORDER BY 1")]

    def close(self) -> None:
        self.cluster.dispose()


@pytest.fixture(scope="module")
def dev(shardkit_cluster_factory):
    return shardkit_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)


@pytest.fixture
def world(dev, tmp_path):
    made = []

    def make(**kw) -> World:
        w = World(dev, tmp_path / f"w{len(made)}", **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()



def show(r):
    print("RC", r.returncode, "\nOUT", r.stdout, "\nERR", r.stderr)


def test_p_midway(world):
    w = world(shards=3)
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    w.rev("a2", "a1", "op.add_column('t', sa.Column('x', sa.Integer))", "op.drop_column('t', 'x')")
    w.rev("a3", "a2", "op.create_table('u', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('u')")
    w.sql(1, "CREATE TABLE u (x int)")
    for par in ("1", "4"):
        show(w.cli("migrate", "upgrade", "--parallel", par, "--json"))
        show(w.cli("migrate", "current"))
        show(w.cli("migrate", "check"))
        show(w.cli("migrate", "downgrade", "base"))
        show(w.cli("migrate", "current", "--json"))
    show(w.cli("migrate", "upgrade", "--canary", "s1"))
    show(w.cli("migrate", "upgrade", "--canary", "s1", "--json"))
    show(w.cli("migrate", "current"))
    show(w.cli("migrate", "upgrade", "--canary", "s9"))
    show(w.cli("migrate", "upgrade", "--parallel", "0"))
    show(w.cli("migrate", "downgrade", "zz"))
    show(w.cli("migrate", "upgrade", "zz"))
    assert 0


def test_p_branches(world):
    w = world(shards=2)
    w.rev("b0", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    w.rev("b1", "b0", "op.create_table('l', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('l')", labels=("left",))
    w.rev("b2", "b0", "op.create_table('r', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('r')", labels=("right",))
    show(w.cli("migrate", "upgrade"))
    show(w.cli("migrate", "upgrade", "heads"))
    show(w.cli("migrate", "current"))
    show(w.cli("migrate", "check"))
    w.rev("m", ("b1", "b2"), "pass")
    show(w.cli("migrate", "upgrade", "head"))
    show(w.cli("migrate", "check"))
    show(w.cli("migrate", "downgrade", "b1"))
    show(w.cli("migrate", "current"))
    show(w.cli("migrate", "downgrade", "-1"))
    show(w.cli("migrate", "current"))
    show(w.cli("migrate", "check"))
    assert 0


def test_p_down(world, dev):
    w = world(shards=3)
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    dev.shards[1].primary.stop()
    try:
        show(w.cli("migrate", "upgrade"))
        show(w.cli("migrate", "current"))
        show(w.cli("migrate", "check"))
        r = subprocess.run([sys.executable, "-m", "alembic", "-c", str(w.ini), "-x", f"config={w.cfg}", "-x", "shard=s9", "upgrade", "head"], capture_output=True, text=True)
        show(r)
    finally:
        dev.shards[1].primary.start()
    show(w.cli("migrate", "current"))
    assert 0


def test_p_check(world):
    w = world(shards=3)
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True), sa.Column('v', sa.Integer))", "op.drop_table('t')")
    show(w.cli("migrate", "upgrade"))
    w.sql(2, "CREATE INDEX extra ON t (v)")
    w.sql(1, "ALTER TABLE t ALTER COLUMN v TYPE bigint")
    show(w.cli("migrate", "check"))
    w.sql(0, "CREATE INDEX extra0 ON t (v)")
    show(w.cli("migrate", "check"))
    w.sql(0, "DROP INDEX extra0"); w.sql(2, "DROP INDEX extra"); w.sql(1, "ALTER TABLE t ALTER COLUMN v TYPE int")
    w.sql(1, "ALTER TABLE t ALTER COLUMN v SET DEFAULT 5")
    w.sql(2, "ALTER TABLE t ADD CONSTRAINT ck CHECK (v > 0)")
    show(w.cli("migrate", "check"))
    w.sql(2, "CREATE VIEW vv AS SELECT 1")
    w.sql(1, "CREATE SCHEMA other; CREATE TABLE other.z (a int)")
    w.sql(1, "CREATE TYPE color AS ENUM ('a','b')")
    show(w.cli("migrate", "check"))
    assert 0
