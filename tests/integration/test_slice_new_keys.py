"""A catalog-routed range or list group gains keys: `rebalance plan|apply --move-value
GROUP:VALUE --to SHARD` of a value no slice lists (a list group without a default), and
`--split GROUP:KEY --to SHARD` of a key in a gap of a range group's ranges.

Once `rebalance init` has stored a group's slices, the catalog routes it and the config
file's ranges and values are not read again: a value added to the file, or a key in a gap,
had no command that gave it a shard, and every message pointed at the config file.

One module-scoped dev cluster (3 shards); each test makes its own world: fresh databases
of one name on every shard plus its own catalog.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_move_value, plan_split_range
from shardkit._slices import SLICE_BASE
from shardkit.verify import verify

import inproc_cli
from rebalance_world import CatalogWorld, databases_with_catalog

pytestmark = pytest.mark.integration

md = MetaData()
CODES = Table("nk_codes", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
              Column("code", String(8)))
SPANS = Table("nk_spans", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
              Column("k", BigInteger))

SCHEMA = """
CREATE TABLE nk_codes (id bigint PRIMARY KEY, code varchar(8));
CREATE TABLE nk_spans (id bigint PRIMARY KEY, k bigint);
"""

GROUPS = """
[groups.codes]
strategy = "list"
tables = { nk_codes = "code" }
values = { s0 = ["aa"], s1 = ["bb"] }

[groups.spans]
strategy = "range"
tables = { nk_spans = "k" }
ranges = [ { from = 0, to = 100, shard = "s0" }, { from = 200, to = 300, shard = "s1" } ]
"""

_numbers = itertools.count()


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=16)


class World(CatalogWorld):
    def __init__(self, dev: Any, db: str, cfg: Path, plain: Path) -> None:
        super().__init__(dev, db, cfg, md)
        self.plain = plain

    def around_shardkit(self, shard: str, statement: str) -> None:
        """``statement`` on ``shard`` with the ownership guard's trigger not firing."""
        with self.dev.shard(shard).primary.connect(dbname=self.db, autocommit=True) as c:
            c.execute("SET session_replication_role = replica")
            c.execute(statement)

    def version(self) -> int:
        return self.cluster(follow_map=False).catalog.current_map().version

    def cli(self, *args: str) -> Any:
        return inproc_cli.run([*args, "--config", str(self.cfg)])

    def guards_match_the_catalog(self, group: str) -> None:
        """Every shard's copy of ``group``'s slices are the catalog's live ones, and the slices
        it owns are exactly the live ones on it (no slice the catalog does not have)."""
        live = self.cluster(follow_map=False).catalog.current_map().slices
        want = sorted((s.id, None if s.lower is None else str(s.lower), None if s.upper is None else str(s.upper),
                       str(s.values[0]) if s.values else None) for s in live if s.group == group)
        for shard in self.dev.shards:
            with shard.primary.connect(dbname=self.db, autocommit=True) as c:
                have = sorted(c.execute("SELECT id, lower, upper, val FROM shardkit.slices WHERE grp = %s",
                                        (group,)).fetchall())
                owned = sorted(r[0] for r in c.execute(
                    "SELECT bucket FROM shardkit.owned_buckets WHERE bucket >= %s", (SLICE_BASE,)))
            assert have == want, (shard.name, have, want)
            assert owned == sorted(s.id for s in live if s.shard == shard.name), (shard.name, owned)


@pytest.fixture
def world(dev, tmp_path):
    db = f"nkw{next(_numbers)}"
    plain = tmp_path / f"{db}_plain.toml"   # the same cluster without a catalog
    path = databases_with_catalog(dev, db, SCHEMA, GROUPS, tmp_path / f"{db}.toml", plain=plain)
    w = World(dev, db, path, plain)
    rebalance.init(w.cluster(follow_map=False))
    yield w
    w.close()


def _session(cluster: shardkit.Cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _write(cluster: shardkit.Cluster, table: Table, **row: Any) -> None:
    with _session(cluster)() as s:
        s.execute(insert(table).values(**row))
        s.commit()


def _wait_for(cluster: shardkit.Cluster, version: int) -> None:
    deadline = time.monotonic() + 40   # (the follower also re-reads every 30 s)
    while (cluster.map_version or 0) < version and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.map_version == version


def _routers_write_the_new_key(world: World, table: Table, column: str, key: Any, shard: str,
                               stale: shardkit.Cluster, follower: shardkit.Cluster, version: int) -> None:
    """A follower and a router made after the change write ``key``; it lands on ``shard``.
    ``stale`` (follow_map=False, the map of before) refuses it, and run_transaction's retry
    (which reloads the map) writes it there too."""
    _wait_for(follower, version)
    _write(follower, table, id=1, **{column: key})
    fresh = world.cluster(follow_map=False)
    assert fresh.map_version == version and fresh.shard_for(table, key) == shard
    _write(fresh, table, id=2, **{column: key})
    assert stale.map_version == version - 1
    with pytest.raises(shardkit.NoShardForKey):
        stale.shard_for(table, key)
    attempts = []

    def fn(s):
        attempts.append(s.cluster.map_version)
        s.execute(insert(table).values(id=3, **{column: key}))

    shardkit.run_transaction(_session(stale), fn)
    assert attempts == [version - 1, version]
    rows = world.rows(table.name)
    assert sorted(r[0] for r in rows[shard]) == [1, 2, 3], rows
    assert all(not r for name, r in rows.items() if name != shard), rows
    report = verify(fresh)
    assert report.ok, report.render()


# -- a list value no slice lists ----------------------------------------------------------------


def test_the_cli_gives_an_unlisted_value_a_shard(world):
    """`rebalance plan|apply --move-value codes:zz --to s2` for a list group without a default:
    refused with "add the value to the config's list, or give the group a default", which
    does nothing once the catalog routes the group.  It plans a new slice on s2 (nothing
    moves), and apply publishes it: routers write 'zz' there."""
    stale = world.cluster(follow_map=False)
    follower = world.cluster()
    before = world.version()
    r = world.cli("route", "nk_codes", "zz")
    assert r.returncode != 0 and "--move-value codes:zz --to SHARD" in r.stderr, r.stderr
    assert "add it to the list" not in r.stderr, r.stderr

    r = world.cli("rebalance", "plan", "--move-value", "codes:zz", "--to", "s2")
    assert r.returncode == 0, r.stderr
    assert "New slice" in r.stdout and "codes: 'zz' on s2" in r.stdout and "Nothing to move" in r.stdout, r.stdout
    assert world.version() == before   # a plan publishes nothing

    r = world.cli("rebalance", "apply", "--move-value", "codes:zz", "--to", "s2", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert "codes: 'zz' to s2" in r.stdout and "done" in r.stdout, r.stdout
    assert world.version() == before + 1
    r = world.cli("route", "nk_codes", "zz")
    assert r.returncode == 0 and "-> shard s2 " in r.stdout, (r.stdout, r.stderr)
    _routers_write_the_new_key(world, CODES, "code", "zz", "s2", stale, follower, before + 1)
    # The other values stay where they were; a plan of it again plans nothing.
    assert world.cluster(follow_map=False).shard_for(CODES, "aa") == "s0"
    r = world.cli("rebalance", "apply", "--move-value", "codes:zz", "--to", "s2", "--grace", "0")
    assert r.returncode == 0 and "nothing to move" in r.stdout, (r.stdout, r.stderr)
    assert world.version() == before + 1


def test_the_python_planner_and_mover_give_an_unlisted_value_a_shard(world):
    stale = world.cluster(follow_map=False)
    follower = world.cluster()
    mover_cluster = world.cluster(follow_map=False)
    current = mover_cluster.catalog.current_map()
    plan = plan_move_value(current.slices, "codes", "cc", "s1")
    assert not plan.moves and [(s.values, s.shard) for s in plan.gained] == [(("cc",), "s1")]
    rebalance.Mover(mover_cluster, grace=0, progress=lambda line: None).apply(plan)
    _routers_write_the_new_key(world, CODES, "code", "cc", "s1", stale, follower, current.version + 1)


# -- a key in a gap of a range group --------------------------------------------------------------


def test_the_cli_gives_a_gap_between_ranges_a_shard(world, tmp_path):
    """`--split spans:150 --to s2` with ranges [0, 100) on s0 and [200, 300) on s1: 150 was
    refused by every router ("add a range that covers it") and by the planner ("no range
    of group 'spans' holds 150").  The gap [100, 200) becomes a range on s2."""
    stale = world.cluster(follow_map=False)
    follower = world.cluster()
    before = world.version()
    with pytest.raises(shardkit.NoShardForKey) as e:
        stale.shard_for(SPANS, 150)
    assert "`shardkit rebalance apply --split spans:150 --to SHARD`" in str(e.value), str(e.value)
    assert "add a range" not in str(e.value)
    # --lower has no side to move in a gap: refused, saying what to do.
    r = world.cli("rebalance", "plan", "--split", "spans:150", "--lower", "--to", "s2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error: --split spans:150: no range of group 'spans' holds 150" in r.stderr, r.stderr
    assert "gap [100, 200)" in r.stderr and "leave out --lower" in r.stderr, r.stderr

    stored = tmp_path / "gap.json"
    r = world.cli("rebalance", "plan", "--split", "spans:150", "--to", "s2", "--out", str(stored))
    assert r.returncode == 0, r.stderr
    assert "spans: [100, 200) on s2" in r.stdout, r.stdout
    assert world.version() == before
    r = world.cli("rebalance", "apply", "--plan", str(stored), "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert world.version() == before + 1
    # The stored plan again: nothing left to do (not a refusal over rows written since).
    r = world.cli("rebalance", "apply", "--plan", str(stored), "--grace", "0")
    assert r.returncode == 2 and "live already" in r.stderr, (r.stdout, r.stderr)
    assert world.version() == before + 1
    _routers_write_the_new_key(world, SPANS, "k", 150, "s2", stale, follower, before + 1)
    # Both neighbours' keys stay where they were.
    fresh = world.cluster(follow_map=False)
    assert [fresh.shard_for(SPANS, k) for k in (99, 100, 199, 200)] == ["s0", "s2", "s2", "s1"]


@pytest.mark.parametrize("key, gap, shard", [(-5, (None, 0), "s1"), (1000, (300, None), "s0")])
def test_the_python_planner_gives_the_keys_below_or_above_every_range_a_shard(world, key, gap, shard):
    stale = world.cluster(follow_map=False)
    follower = world.cluster()
    mover_cluster = world.cluster(follow_map=False)
    current = mover_cluster.catalog.current_map()
    plan = plan_split_range(current.slices, "spans", key, shard)
    assert not plan.moves and [(s.lower, s.upper, s.shard) for s in plan.gained] == [(*gap, shard)]
    rebalance.Mover(mover_cluster, grace=0, progress=lambda line: None).apply(plan)
    _routers_write_the_new_key(world, SPANS, "k", key, shard, stale, follower, current.version + 1)


# -- rows that have the key already ---------------------------------------------------------------


@pytest.mark.parametrize("verb", ["plan", "apply"])
@pytest.mark.parametrize("option, spec, table, row, where", [
    ("--move-value", "codes:zz", "nk_codes", "(7, 'zz')", "s0"),
    ("--split", "spans:150", "nk_spans", "(7, 199)", "s1"),
])
def test_rows_of_the_new_keys_written_around_shardkit_refuse_the_plan(world, verb, option, spec, table, row,
                                                                       where):
    """A row holding a key no slice held can only have been written around shardkit (the guard
    off, or before init), maybe on another shard than the new slice's: giving the key a shard
    is refused before anything is published, naming where the rows are and `shardkit verify`."""
    before = world.version()
    world.around_shardkit(where, f"INSERT INTO {table} VALUES {row}")
    r = world.cli("rebalance", verb, option, spec, "--to", "s2", *(("--grace", "0") if verb == "apply" else ()))
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "1 row of" in r.stderr and f"in {table} on {where}" in r.stderr, r.stderr
    assert "shardkit verify" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert world.version() == before
    assert rebalance.move_status(world.cluster(follow_map=False)) == []
    # Once the row is gone, the same command goes through.
    world.around_shardkit(where, f"DELETE FROM {table}")
    r = world.cli("rebalance", verb, option, spec, "--to", "s2", *(("--grace", "0") if verb == "apply" else ()))
    assert r.returncode == 0, r.stderr


# -- where the config file routes the group, its wording stays -------------------------------------


def test_without_a_catalog_the_messages_name_the_config_file(world):
    plain = world.cluster(world.plain)
    with pytest.raises(shardkit.NoShardForKey, match=r"add it to the list or set `default`") as e:
        plain.shard_for(CODES, "zz")
    assert "rebalance" not in str(e.value)
    with pytest.raises(shardkit.NoShardForKey, match=r"add a range that covers it") as e:
        plain.shard_for(SPANS, 150)
    assert "rebalance" not in str(e.value)
    with_catalog = world.cluster(follow_map=False)
    with pytest.raises(shardkit.NoShardForKey, match=r"--move-value codes:zz --to SHARD"):
        with_catalog.shard_for(CODES, "zz")
