"""Hard cases for `shardkit migrate` and `op.install_shardkit_guard()`: failures midway,
canaries, branches, drift, shards that are down, the guard around moves and new shards."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import inproc_cli
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
                 catalog: bool = False, all_shards_in_config: bool = True,
                 template: str | None = None) -> None:
        """``template``: each shard's database a copy of that shard's database of this name
        (another World's, built once: its connections closed)."""
        self.dev = dev
        self.db = f"mh{next(_names)}"
        self.tmp = tmp
        self.servers = dev.shards[:shards]
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.db}" + (f" TEMPLATE {template}" if template else ""))
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

    def cli(self, *args: str, cfg: Path | None = None, proc: bool = False) -> subprocess.CompletedProcess[str]:
        """The command in this process (``inproc_cli``); ``proc``: as ``python -m shardkit.cli``."""
        extra = ["--alembic-ini", str(self.ini)] if args[0] == "migrate" and args[1] != "current" else []
        return inproc_cli.shardkit([*args, "--config", str(cfg or self.cfg), *extra], proc=proc)

    def sql(self, i: int, query: str, params=None):
        with psycopg.connect(self.dsn(i), autocommit=True) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def insert_things(self, keys) -> None:
        """A row (key, key) of things for each key, on the shard the map gives it (one
        connection per shard)."""
        by: dict[int, list[tuple[int, int]]] = {}
        for k in keys:
            by.setdefault(int(self.cluster.shard_for("things", k)[1]), []).append((k, k))
        for i, rows in by.items():
            with psycopg.connect(self.dsn(i), autocommit=True) as c:
                c.cursor().executemany("INSERT INTO things VALUES (%s, %s)", rows)

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
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)


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



HASH = {"things": {"strategy": "hash", "tables": {"things": "id"}}}
SLICED = {
    "orders": {"strategy": "range", "tables": {"orders": "order_no"},
               "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["eu"], "s1": ["us"]}, "default": "s1"},
}
CREATE_ALL = """
op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True), sa.Column('v', sa.Integer))
op.create_table('orders', sa.Column('order_no', sa.BigInteger, primary_key=True))
op.create_table('stores', sa.Column('id', sa.BigInteger, primary_key=True), sa.Column('region', sa.Text))
"""
DROP_ALL = "op.drop_table('things')\nop.drop_table('orders')\nop.drop_table('stores')"


def three_revs(w: World) -> None:
    """a1, a2 succeed everywhere; a3 creates table u, which s1 already has (made by hand)."""
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    w.rev("a2", "a1", "op.add_column('t', sa.Column('x', sa.Integer))", "op.drop_column('t', 'x')")
    w.rev("a3", "a2", "op.create_table('u', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('u')")
    w.sql(1, "CREATE TABLE u (x int)")


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


# -- failures, canaries, branches, drift ------------------------------------------------


def test_failure_midway_same_outcome_serial_and_parallel(world):
    """Serial (--parallel 1) and parallel runs end in the same per-shard state; the one
    after the serial run is checked, reported and undone through the CLI."""
    w = world(shards=3)
    three_revs(w)
    for parallel in ("4", "1"):
        r = w.cli("migrate", "upgrade", "--parallel", parallel, "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert not out["ok"] and "failed on s1" in out["error"] and "s1 at a2" in out["error"]
        by = {s["shard"]: s for s in out["shards"]}
        assert {k: (v["ok"], v["revision_after"]) for k, v in by.items()} == \
            {"s0": (True, "a3"), "s1": (False, "a2"), "s2": (True, "a3")}
        assert 'relation "u" already exists' in by["s1"]["error"]
        cur = w.cli("migrate", "current", "--json")
        assert json.loads(cur.stdout) == {"s0": "a3", "s1": "a2", "s2": "a3"}
        if parallel == "4":
            # Back to where this run started by plain SQL (s1 keeps the u made by hand).
            for i in range(3):
                w.sql(i, "DROP TABLE t; DELETE FROM alembic_version")
            for i in (0, 2):
                w.sql(i, "DROP TABLE u")
            continue
        chk = w.cli("migrate", "check")
        assert chk.returncode == 1 and "DRIFT: shards are at different revisions" in chk.stdout
        assert "DRIFT: s1: u columns differ" in chk.stdout
        r = w.cli("migrate", "downgrade", "base")
        assert r.returncode == 0, r.stderr
        assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": None, "s1": None, "s2": None}
        assert not any(w.has_table(i, "t") for i in range(3))


def test_failed_shard_stays_at_the_last_revision_that_completed(world):
    """README: each revision commits on its own, so a shard whose a3 failed stays at a2,
    and the report says so."""
    w = world(shards=2)
    three_revs(w)
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 1 and "failed on s1" in r.stderr
    # The one failed shard is named once, and Alembic's "FAILED: " is not repeated.
    summary = [ln for ln in r.stderr.splitlines() if "failed on s1" in ln]
    assert len(summary) == 1 and "failed on s1: s1:" not in summary[0], r.stderr
    assert "FAILED: " not in summary[0], r.stderr
    assert json.loads(w.cli("migrate", "current", "--json").stdout)["s1"] == "a2"
    assert "s1 at a2" in r.stderr, r.stderr


def test_failed_canary_reports_where_it_stopped(world):
    w = world(shards=3)
    three_revs(w)
    r = w.cli("migrate", "upgrade", "--canary", "s1")
    assert r.returncode == 1
    assert "canary shard s1" in r.stderr and "(s0, s2) were not touched" in r.stderr
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": None, "s1": "a2", "s2": None}
    assert "s1 at a2" in r.stderr, r.stderr


def test_branches_and_merge_points(world):
    w = world(shards=2)
    w.rev("b0", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    w.rev("b1", "b0", "op.create_table('l', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('l')", labels=("left",))
    w.rev("b2", "b0", "op.create_table('r', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('r')", labels=("right",))
    r = w.cli("migrate", "upgrade", "head")
    assert r.returncode == 1 and "Multiple head revisions" in r.stderr and "s0 at base" in r.stderr
    no_traceback(r)
    r = w.cli("migrate", "upgrade", "heads")
    assert r.returncode == 0, r.stderr
    chk = w.cli("migrate", "check", "--json")
    out = json.loads(chk.stdout)
    assert chk.returncode == 0 and out["revisions"] == {"s0": "b1,b2", "s1": "b1,b2"}
    assert out["heads"] == ["b1", "b2"]
    w.rev("m", ("b1", "b2"), "pass")
    assert w.cli("migrate", "upgrade").returncode == 0
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "m", "s1": "m"}
    # One shard back on one branch (where `alembic -x shard=s1 downgrade b0` then `upgrade
    # b1` leave it; made by hand, no Alembic process): drift, and named.
    w.sql(1, "DROP TABLE r; UPDATE alembic_version SET version_num = 'b1' WHERE version_num = 'm'")
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "m", "s1": "b1"}
    chk = w.cli("migrate", "check")
    assert chk.returncode == 1 and "s1: b1\n" in chk.stdout and "DRIFT: s1: extra table r" not in chk.stdout
    assert "DRIFT: s1: table r missing (present on s0)" in chk.stdout


def test_check_reports_an_extra_index_and_a_column_type(world):
    w = world(shards=3)
    w.rev("c1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True), "
          "sa.Column('v', sa.Integer))", "op.drop_table('t')")
    # Every shard at c1, as `migrate upgrade` leaves them (made by hand: what `check` says
    # of them is this test's subject, not the upgrade, which the tests above run).
    for i in range(3):
        w.sql(i, "CREATE TABLE t (id bigserial PRIMARY KEY, v integer); "
                 "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                 "INSERT INTO alembic_version VALUES ('c1')")
    assert w.cli("migrate", "check").returncode == 0
    w.sql(2, "CREATE INDEX extra ON t (v) WHERE v > 0")
    w.sql(1, "ALTER TABLE t ALTER COLUMN v TYPE bigint")
    r = w.cli("migrate", "check")
    assert r.returncode == 1
    assert "DRIFT: s1: t columns differ from s0" in r.stdout and '"bigint"' in r.stdout
    assert "DRIFT: s2: t indexes differ from s0" in r.stdout and "WHERE (v > 0)" in r.stdout
    # What differs, not both whole lists: the extra index, the column's two types.
    assert 'indexes differ from s0, only on s2: [["extra", "CREATE INDEX extra ON' in r.stdout
    assert "only on s0" not in r.stdout.split("s2: t indexes")[1].splitlines()[0]
    assert 'only on s1: [["v", "bigint", true]]; only on s0: [["v", "integer", true]]' in r.stdout
    assert "DRIFT: shards are at different revisions" not in r.stdout
    # An extra index on the reference shard: the others differ from it.
    w.sql(2, "DROP INDEX extra")
    w.sql(1, "ALTER TABLE t ALTER COLUMN v TYPE integer")
    w.sql(0, "CREATE INDEX extra0 ON t (v)")
    r = w.cli("migrate", "check", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and not out["revision_drift"]
    assert sorted(d.split(":")[0] for d in out["schema_differences"]) == ["s1", "s2"]
    w.sql(0, "DROP INDEX extra0")
    assert w.cli("migrate", "check").returncode == 0


# -- shards that are down ---------------------------------------------------------------


def test_shard_down_before_upgrade_current_and_check(world, dev):
    w = world(shards=3)
    w.rev("d1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    dev.shards[1].primary.stop()
    try:
        # One line on stderr, exit status 2; the first as a shell sees it (a process of its own).
        for args in (("migrate", "upgrade"), ("migrate", "current"), ("migrate", "check")):
            r = w.cli(*args, proc=args[1] == "upgrade")
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            no_traceback(r)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: shard s1") and "unreachable" in lines[0]
    finally:
        dev.shards[1].primary.start()
    # Refused before anything ran: no shard was migrated.
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": None, "s1": None, "s2": None}


def test_shard_dying_during_upgrade_keeps_the_per_shard_report(world, dev):
    if not hasattr(dev.shards[1].primary, "datadir"):
        pytest.skip("stops a server from inside a migration through DevCluster.load: local clusters only")
    w = world(shards=2)   # s1 dies; s0 is the shard that goes on
    w.rev("d1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    w.rev("d2", "d1", f"""
if op.get_context().opts['shardkit_shard'] == 's1':
    from shardkit.devcluster import DevCluster
    DevCluster.load({str(dev.base_dir)!r}).shards[1].primary.stop(mode='immediate')
op.add_column('t', sa.Column('x', sa.Integer))
""", "op.drop_column('t', 'x')")
    try:
        r = w.cli("migrate", "upgrade", "--json")
    finally:
        dev.shards[1].primary.start()
    # What happened, after the fact: s0 upgraded, s1 not.
    assert json.loads(w.cli("migrate", "current", "--json").stdout) == {"s0": "d2", "s1": "d1"}
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert {s["shard"]: s["ok"] for s in out["shards"]} == {"s0": True, "s1": False}


def test_unknown_shard(world):
    w = world(shards=2)
    w.rev("x1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t')")
    r = subprocess.run([sys.executable, "-m", "alembic", "-c", str(w.ini), "-x", f"config={w.cfg}",
                        "-x", "shard=s9", "upgrade", "head"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown shard 's9' (shards: s0, s1)" in r.stderr
    with pytest.raises(shardkit.errors.ConfigurationError, match="unknown shard 's9'"):
        migrate.run_command(w.cluster, str(w.cfg), "upgrade", "head", alembic_ini=w.ini, shards=["s9"])
    r = w.cli("migrate", "upgrade", "--canary", "s9")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "s9" in r.stderr
    assert "--canary" in r.stderr and "--shard" not in r.stderr  # (no such flag)
    assert migrate.current(w.cluster) == {"s0": None, "s1": None}


# -- op.install_shardkit_guard() --------------------------------------------------------


def _try(w: World, i: int, sql: str, args) -> str:
    try:
        w.sql(i, sql, args)
        return "ok"
    except psycopg.Error as e:
        return e.sqlstate or "?"


def test_guard_on_range_and_list_tables_installed_twice(world):
    w = world(shards=2, groups={**HASH, **SLICED}, catalog=True)
    rebalance.init(w.cluster)
    owned = {i: w.owned(i) for i in range(2)}
    w.rev("g1", None, CREATE_ALL + "op.install_shardkit_guard()\nop.install_shardkit_guard()", DROP_ALL)
    w.rev("g2", "g1", "op.install_shardkit_guard()")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert all(w.has_trigger(i, t) for t in ("things", "orders", "stores")), i
        assert w.owned(i) == owned[i]
    mine = {0: (5, "eu"), 1: (2000, "us")}
    for i, (order, region) in mine.items():
        assert _try(w, i, "INSERT INTO orders VALUES (%s)", (order,)) == "ok"
        assert _try(w, i, "INSERT INTO stores VALUES (%s, %s)", (order, region)) == "ok"
        other, oregion = mine[1 - i]
        assert _try(w, i, "INSERT INTO orders VALUES (%s)", (other,)) == "SK001"
        assert _try(w, i, "INSERT INTO stores VALUES (%s, %s)", (other, oregion)) == "SK001"
    assert _try(w, 1, "INSERT INTO stores VALUES (9, 'jp')", None) == "ok"   # the default is s1's
    rebalance.Mover(w.cluster, grace=0)._check_triggers(["s0", "s1"], "orders")
    rebalance.Mover(w.cluster, grace=0)._check_triggers(["s0", "s1"], None)


def test_guard_for_a_range_group_added_after_init(world):
    w = world(shards=2, groups=HASH, catalog=True)
    rebalance.init(w.cluster)
    w.groups = {**HASH, **SLICED}
    w.write_config(2)
    w.rev("g1", None, CREATE_ALL + "op.install_shardkit_guard()", DROP_ALL)
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stderr
    # Routed by the config file (the catalog has no slices for the group yet): s0 holds
    # orders below 1000 and region eu.  The migration said ok; the table must be writable.
    assert _try(w, 0, "INSERT INTO orders VALUES (5)", None) == "ok"
    assert _try(w, 0, "INSERT INTO stores VALUES (1, 'eu')", None) == "ok"


def test_guard_refuses_unguardable_key_types_clearly(world):
    w = world(shards=2, groups={**HASH, "nums": {"strategy": "hash", "tables": {"nums": "k"}}}, catalog=True)
    rebalance.init(w.cluster)
    w.rev("g1", None, "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True))\n"
          "op.create_table('nums', sa.Column('k', sa.Numeric, primary_key=True, autoincrement=False))\n"
          "op.install_shardkit_guard()", "op.drop_table('things')\nop.drop_table('nums')")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: upgrade head failed on s0, s1")
    assert "column k: type numeric cannot be hashed in SQL" in lines[0] and "s0 at base, s1 at base" in lines[0]
    assert not w.has_table(0, "things") and not w.has_table(1, "nums")   # rolled back

    # (One shard: the error is the config's, the same on every shard.)
    w2 = world(shards=1, groups={**HASH, "comp": {"strategy": "hash", "tables": {"comp": ["a", "b"]}}},
               catalog=True)
    with pytest.raises(shardkit.errors.ConfigurationError, match="composite hash keys"):
        rebalance.init(w2.cluster)
    # A catalog with a map, as a config with the composite group added later would find.
    w2.cluster.catalog.ensure_schema()
    with w2.cluster.catalog.engine.begin() as c:
        w2.cluster.catalog.publish_map(c, w2.cluster.file_config.bucket_map, "test")
    w2.rev("g1", None, "op.create_table('comp', sa.Column('a', sa.BigInteger, primary_key=True), "
           "sa.Column('b', sa.BigInteger, primary_key=True))\nop.install_shardkit_guard()", "op.drop_table('comp')")
    r = w2.cli("migrate", "upgrade")
    assert r.returncode == 1
    no_traceback(r)
    assert "ConfigurationError: groups.comp.tables.comp: composite hash keys cannot be guarded" in r.stderr
    r = w2.cli("rebalance", "init")
    assert r.returncode == 2 and r.stderr.startswith("error: groups.comp.tables.comp: composite hash keys")


def test_guard_during_a_move_and_on_a_shard_added_after_init(world):
    from movers import kill_mover_after
    from shardkit.verify import verify

    w = world(shards=3, groups={**HASH, **SLICED}, catalog=True)
    two = shardkit.Cluster.from_config(w.config_dict(2), follow_map=False)
    rebalance.init(two)   # s2 is not in the config yet: no guard there
    two.dispose()
    assert not w.sql(2, "SELECT to_regclass('shardkit.owned_buckets') IS NOT NULL")[0][0]
    w.rev("n1", None, CREATE_ALL + "op.install_shardkit_guard()", DROP_ALL)
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stderr
    w.cluster.refresh_map()
    for i in range(3):
        assert all(w.has_trigger(i, t) for t in ("things", "orders", "stores")), i
    assert w.owned(2) == []                      # the catalog's map gives s2 nothing yet
    assert len(w.owned(0)) + len(w.owned(1)) == BUCKETS + 5
    assert w.sql(2, "SELECT count(*) FROM shardkit.slices")[0][0] == 5
    w.insert_things(range(300))

    move = kill_mover_after(w.cluster, w.cfg, "capturing", "--add", "s2", "--batch-buckets", "8")
    state = {i: (w.owned(i), w.sql(i, "SELECT * FROM shardkit.moving_buckets ORDER BY 1")) for i in range(3)}
    assert state[0][1]                            # s0's first batch is capturing
    w.groups = {**HASH, **SLICED, "more": {"strategy": "hash", "tables": {"more": "id"}}}
    w.write_config(3)
    w.rev("n2", "n1", "op.create_table('more', sa.Column('id', sa.BigInteger, primary_key=True))\n"
          "op.install_shardkit_guard()", "op.drop_table('more')")
    r = w.cli("migrate", "upgrade")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert (w.owned(i), w.sql(i, "SELECT * FROM shardkit.moving_buckets ORDER BY 1")) == state[i], i
        assert w.has_trigger(i, "more")
    # Writes during the move are still captured: an update in the moving batch survives.
    moving_key = next(k for k in range(300)
                      if shardkit.bucket_for(k, BUCKETS) in {b for b, _ in state[0][1]})
    w.sql(0, "UPDATE things SET v = -1 WHERE id = %s", (moving_key,))
    r = w.cli("rebalance", "resume", str(move), "--grace", "0.2")   # (movers.resume, in this process)
    assert r.returncode == 0, r.stderr
    c = shardkit.Cluster.from_config(w.cfg, follow_map=False)
    try:
        assert verify(c).ok
        assert c.shard_for("things", moving_key) == "s2"
    finally:
        c.dispose()
    rows = {k: v for i in range(3) for k, v in w.sql(i, "SELECT id, v FROM things")}
    assert len(rows) == 300 and rows[moving_key] == -1
    assert sum(w.sql(i, "SELECT count(*) FROM things")[0][0] for i in range(3)) == 300


# -- rebalance init and moves after migrations ----------------------------------------------


def test_init_with_a_table_on_some_shards_only(world):
    w = world(shards=2, groups=HASH, catalog=True)
    w.sql(0, "CREATE TABLE things (id bigint primary key, v int)")
    rebalance.init(w.cluster)
    assert w.has_trigger(0, "things") and not w.has_table(1, "things")
    assert len(w.owned(0)) == len(w.owned(1)) == BUCKETS // 2
    r = w.cli("rebalance", "apply", "--drain", "s1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: table(s) things do not exist on s1; create the schema there (`shardkit migrate upgrade`), "
        "run `shardkit rebalance init`, then apply or resume the move"]
    w.sql(1, "CREATE TABLE things (id bigint primary key, v int)")
    r = w.cli("rebalance", "apply", "--drain", "s1")
    assert r.returncode == 2 and "things on s1 have no ownership guard" in r.stderr
    assert "shardkit rebalance init" in r.stderr
    with w.cluster.catalog.engine.connect() as c:   # refused before anything was recorded
        assert c.execute(text("SELECT count(*) FROM shardkit_catalog.moves")).scalar() == 0
    assert w.cli("rebalance", "init").returncode == 0
    assert w.has_trigger(1, "things") and len(w.owned(1)) == BUCKETS // 2
    r = w.cli("rebalance", "apply", "--drain", "s1", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert w.owned(1) == [] and len(w.owned(0)) == BUCKETS


def test_move_refused_after_a_migration_that_forgot_the_guard(world):
    w = world(shards=2, groups=HASH, catalog=True)
    rebalance.init(w.cluster)
    w.rev("f1", None, "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True), "
          "sa.Column('v', sa.Integer))", "op.drop_table('things')")
    assert w.cli("migrate", "upgrade").returncode == 0
    w.cluster.refresh_map()
    w.insert_things(range(100))
    r = w.cli("rebalance", "apply", "--drain", "s1")
    assert r.returncode == 2
    no_traceback(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "things" in lines[0] and "no ownership guard" in lines[0]
    assert "`shardkit rebalance init`" in lines[0]
    assert len(w.owned(1)) == BUCKETS // 2
    w.rev("f2", "f1", "op.install_shardkit_guard()")
    assert w.cli("migrate", "upgrade").returncode == 0
    r = w.cli("rebalance", "apply", "--drain", "s1", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert w.sql(1, "SELECT count(*) FROM things")[0][0] == 0
    assert sorted(w.sql(0, "SELECT id, v FROM things")) == [(k, k) for k in range(100)]


def test_uninstall_shardkit_sql_under_the_guard(world):
    w = world(shards=2, groups=HASH, catalog=True)
    w.rev("u1", None, "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('things')")
    w.rev("u2", "u1", "op.install_shardkit_sql()", "op.uninstall_shardkit_sql()")
    assert w.cli("migrate", "upgrade").returncode == 0
    rebalance.init(w.cluster)
    key = next(k for k in range(1000) if w.cluster.shard_for("things", k) == "s0")
    r = w.cli("migrate", "downgrade", "u1")
    assert w.has_trigger(0, "things")
    # Either the downgrade refuses (the guard needs the functions), or writes still work.
    if r.returncode == 0:
        assert _try(w, 0, "INSERT INTO things VALUES (%s)", (key,)) == "ok"
