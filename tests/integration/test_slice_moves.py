"""Online range and list slice moves in adverse situations, on real servers.

One module-scoped dev cluster (3 shards, no replicas).  Each test makes its own
*world*: fresh databases with the same name on every shard's server plus its own
catalog database, so a scenario that leaves a shard in a bad state cannot
disturb another test.  Moves run in-process with ``grace=0``.  The pure tests
(slices, plans, CLI key parsing) are at the end.

Each docstring says what must hold and what would go wrong otherwise.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import BigInteger, Integer, String, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._config import load_config, with_bucket_map
from shardkit._rebalance_plan import SlicePlan, plan_from_dict, plan_move_value, plan_split_range
from shardkit._slices import (
    SLICE_BASE,
    carve_value,
    initial_slices,
    reassign,
    slices_from_json,
    slices_to_json,
    split_range,
)
from shardkit.cli import UsageError, _group_key
from shardkit.devcluster import to_toml
from shardkit.errors import ConfigurationError, RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration


def _noop(line: str) -> None:
    pass


class Base(DeclarativeBase):
    pass


class Ev(Base):  # range group "ev": int4 key, negative and beyond-int4 bounds
    __tablename__ = "ev"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    k: Mapped[int] = mapped_column(Integer)


class Name(Base):  # range group "names": varchar key, code point order
    __tablename__ = "names"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Tag(Base):  # list group "tags": text key, '' and a quote among the values
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tag: Mapped[str] = mapped_column(Text, nullable=True)


class Coll(Base):  # list group "colls" (own world): text key, case-insensitive collation
    __tablename__ = "colls"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tag: Mapped[str] = mapped_column(Text)


class _Ca(Base):  # range group "ca" (and its twin "cb"): bigint key
    __tablename__ = "ca"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    k: Mapped[int] = mapped_column(BigInteger)


CA = _Ca.__table__

SCHEMA = """
CREATE TABLE ev (id bigint PRIMARY KEY, k int4);
CREATE TABLE names (id bigint PRIMARY KEY, name varchar(40));
CREATE TABLE tags (id bigint PRIMARY KEY, tag text);
CREATE TABLE nums (id bigint PRIMARY KEY, n int2);
CREATE TABLE colls (id bigint PRIMARY KEY, tag text);
CREATE TABLE ca (id bigint PRIMARY KEY, k bigint NOT NULL);
CREATE TABLE cb (id bigint PRIMARY KEY, k bigint NOT NULL);
"""

BIG = 3_000_000_000  # beyond int4

GROUPS: dict[str, Any] = {
    "ev": {"strategy": "range", "tables": {"ev": "k"},
           "ranges": [{"to": -100, "shard": "s0"}, {"from": -100, "to": BIG, "shard": "s1"},
                      {"from": BIG, "shard": "s2"}]},
    "names": {"strategy": "range", "tables": {"names": "name"},
              "ranges": [{"to": "M", "shard": "s0"}, {"from": "M", "shard": "s1"}]},
    "tags": {"strategy": "list", "tables": {"tags": "tag"},
             "values": {"s0": ["", "o'k"], "s1": ["x"]}, "default": "s2"},
    "nums": {"strategy": "list", "tables": {"nums": "n"},
             "values": {"s0": [-1], "s1": [0, 7]}, "default": "s1"},
    "ca": {"strategy": "range", "tables": {"ca": "k"},
           "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
    "cb": {"strategy": "range", "tables": {"cb": "k"},
           "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
}

# "colls" gets its own world (with a case-insensitive collation on its column).
COLLS = {"colls": {"strategy": "list", "tables": {"colls": "tag"},
                   "values": {"s0": ["a"], "s1": ["b"]}, "default": "s2"}}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=16)


_numbers = itertools.count()


@dataclass
class World:
    dev: Any
    db: str
    cfg_path: Path
    cluster: shardkit.Cluster

    def conn(self, shard: str) -> psycopg.Connection:
        node = self.dev.shard(shard).primary
        return node.connect(dbname=self.db, autocommit=True)

    def sql(self, shard: str, query: str, params: Any = None) -> list[tuple] | None:
        with self.conn(shard) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def Session(self):
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, consistency="strong")

    def slices(self, group: str | None = None):
        self.cluster.refresh_map()
        return [s for s in self.cluster.config.slices if group is None or s.group == group]

    def mover(self, **kw) -> rebalance.Mover:
        kw.setdefault("grace", 0)
        kw.setdefault("progress", _noop)
        return rebalance.Mover(self.cluster, **kw)


def _make_world(dev, tmp_path: Path, groups: dict[str, Any], *, init: bool = True,
                extra_schema: str = "") -> World:
    db = f"world{next(_numbers)}"
    for shard in dev.shards:
        with shard.primary.connect(dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
        with shard.primary.connect(dbname=db, autocommit=True) as c:
            c.execute(SCHEMA + extra_schema)
    catalog_url = dev.create_catalog(f"{db}_catalog")
    cfg = dev.config_dict()
    for s in cfg["shards"]:
        s["primary"] = s["primary"].rsplit("/", 1)[0] + "/" + db
    cfg.update({"groups": groups, "catalog": {"url": catalog_url}})
    path = tmp_path / f"{db}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    cluster = shardkit.Cluster.from_config(path, follow_map=False)
    if init:
        rebalance.init(cluster)
    return World(dev, db, path, cluster)


@pytest.fixture
def world(dev, tmp_path):
    w = _make_world(dev, tmp_path, GROUPS)
    yield w
    w.cluster.dispose()



def _sql_slice(world: World, shard: str, table: str, keys: list[Any]) -> dict[Any, Any]:
    """shardkit.slice__<table>(key) on ``shard``, per key (the guard's answer)."""
    col_type = {"ev": "int4", "names": "varchar", "tags": "text", "nums": "int2", "ca": "int8"}[table]
    with world.conn(shard) as c:
        return {k: c.execute(f"SELECT shardkit.slice__{table}(%s::{col_type})", (k,)).fetchone()[0]
                for k in keys}


PARITY_KEYS = {
    "ev": [None, -2**31, -101, -100, -99, -1, 0, 1, 2**31 - 1],
    "names": [None, "", " ", "A", "L", "Lzzz", "M", "M ", "Ma", "Z", "[", "a", "m", "z", "\u00e9", "\u00c9",
              "o'k", "\U0001f600", "\uffff"],
    "tags": [None, "", " ", "o'k", "o''k", "O'K", "x", "X", "x ", "y", "\u00e9", "default?"],
    "nums": [None, -32768, -2, -1, 0, 1, 7, 8, 32767],
}


def _python_unit(world: World, table: str, key: Any) -> Any:
    group = next(g for g in world.cluster.config.groups if table in g.tables)
    return group.strategy.unit_for_key(key)


@pytest.mark.parametrize("table", sorted(PARITY_KEYS))
def test_sql_slice_function_agrees_with_the_python_strategy(world, table):
    """For tricky keys (negatives, int4 limits, '', quotes, case, non-ASCII, NULL), every
    shard's guard computes the slice the router computes."""
    keys = PARITY_KEYS[table]
    want = {k: _python_unit(world, table, k) for k in keys}
    for shard in ("s0", "s1", "s2"):
        got = _sql_slice(world, shard, table, keys)
        assert got == want, {k: (got[k], want[k]) for k in keys if got[k] != want[k]}


def test_sql_slice_function_agrees_after_splits_at_tricky_keys(world):
    """Split the text range at a key with a quote, at a non-ASCII key and at ''; the new
    slices are numbered above every group's, and SQL and Python still agree."""
    mover = world.mover()
    for at, target in [("o'k", "s2"), ("\u00e9", "s0"), ("", "s2")]:
        plan = plan_split_range(world.slices(), "names", at, target)
        assert plan.moves
        mover.apply(plan)
    ids = [s.id for s in world.slices()]
    assert len(ids) == len(set(ids))
    keys = PARITY_KEYS["names"]
    want = {k: _python_unit(world, "names", k) for k in keys}
    for shard in ("s0", "s1", "s2"):
        got = _sql_slice(world, shard, "names", keys)
        assert got == want, {k: (got[k], want[k]) for k in keys if got[k] != want[k]}


def test_list_group_on_a_case_insensitive_text_column_is_refused(dev, tmp_path):
    """A list group whose key column has a nondeterministic (case-insensitive) collation.
    Python looks values up exactly (code points): 'a' goes to s0 and 'A' to the default
    (s2), yet the database holds them one value, so a read of 'A' would miss the row
    stored as 'a'.  `rebalance init` refuses the key column, naming its collation,
    before it guards anything."""
    ci = ("CREATE COLLATION IF NOT EXISTS ci (provider = icu, locale = 'und-u-ks-level2', "
          "deterministic = false); ALTER TABLE colls ALTER COLUMN tag TYPE text COLLATE ci;")
    w = _make_world(dev, tmp_path, COLLS, extra_schema=ci, init=False)
    try:
        assert w.cluster.shard_for("colls", "a") == "s0" and w.cluster.shard_for("colls", "A") == "s2"
        with pytest.raises(ConfigurationError, match=r"colls\.tag is under collation ci, which is "
                                                     r"nondeterministic.*lower\(\.\.\.\)"):
            rebalance.init(w.cluster)
        with w.conn("s0") as c:
            assert c.execute("SELECT to_regclass('shardkit.owned_buckets')").fetchone()[0] is None
    finally:
        w.cluster.dispose()


def test_two_groups_started_together_do_not_number_a_slice_alike(world):
    """Two moves of different groups, planned and started from the same live map before
    either runs.  Each plan numbers its new slice max+1; with ``lower=True`` the new
    upper part is not what moves, so only a check against the new slices of running
    moves keeps both groups from owning the same slice number."""
    a = plan_split_range(world.slices(), "ca", 500, "s2")               # new slice N+1 moves to s2
    b = plan_split_range(world.slices(), "cb", 500, "s2", lower=True)   # new slice N+1 stays on s0
    mover = world.mover()
    ma = mover.start(a)
    try:
        mb = mover.start(b)
    except RebalanceError:
        mover.run(ma)
        return  # refused: fine
    mover.run(ma)
    mover.run(mb)
    slices = world.slices()
    ids = [s.id for s in slices]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    shared = ", ".join(f"{s.describe()} on {s.shard}" for s in slices if s.id in dup)
    problems = [f"slice number(s) {dup} used by {shared}"] if dup else []
    # The guard on s0 must refuse ca's keys 500..999 (now s2's): a stale writer's row
    # would land on s0 and be lost to the application.
    with world.conn("s0") as c:
        try:
            c.execute("INSERT INTO ca VALUES (1, 700)")
            problems.append("s0 accepted a write of ca key 700, which s2 owns")
        except psycopg.Error as e:
            assert e.sqlstate == "SK001"
    assert not problems, problems


def _shard_slices(world: World, shard: str, group: str) -> list[tuple]:
    return world.sql(shard, "SELECT id, lower, upper, val, is_default FROM shardkit.slices "
                            "WHERE grp = %s ORDER BY id, val", (group,))


def _catalog_slices(world: World, group: str) -> list[tuple]:
    out = []
    for s in world.slices(group):
        lo = None if s.lower is None else str(s.lower)
        hi = None if s.upper is None else str(s.upper)
        if s.default:
            out.append((s.id, None, None, None, True))
        elif s.values:
            out += [(s.id, None, None, str(v), False) for v in s.values]
        else:
            out.append((s.id, lo, hi, None, False))
    return sorted(out, key=lambda r: (r[0], r[3] or ""))


def _owned(world: World, shard: str) -> set[int]:
    return {r[0] for r in world.sql(shard, "SELECT bucket FROM shardkit.owned_buckets")}


def _fill_ca(world: World, keys) -> None:
    Session = world.Session()
    with Session() as s:
        for k in keys:
            s.execute(CA.insert().values(id=k, k=k))
        s.commit()


def _ca_everywhere(world: World) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for shard in ("s0", "s1", "s2"):
        for (k,) in world.sql(shard, "SELECT k FROM ca"):
            out.setdefault(k, []).append(shard)
    return out


def test_abort_of_a_move_that_never_ran_leaves_no_phantom_slice(world):
    """Start a split-and-move, then abort it before any mover ran it.  The source must not
    end up owning the plan's new slice number, which the catalog never heard of (a later
    split numbering its new slice the same would let the source accept its writes)."""
    plan = plan_split_range(world.slices(), "ca", 500, "s2")
    new_id = plan.moves[0].bucket
    move_id = world.mover().start(plan)
    rebalance.abort(world.cluster, move_id)
    assert new_id not in {s.id for s in world.slices()}  # the split never happened
    problems = [f"{shard} owns slice {new_id}, which the catalog does not have"
                for shard in ("s0", "s1", "s2") if new_id in _owned(world, shard)]
    report = verify(world.cluster)
    if not report.ok:
        problems.append("verify: " + report.render().splitlines()[-2])
    assert not problems, problems


class _CrashBeforeSplitPublish(rebalance.Mover):
    """Dies in _split after every shard has the new slices, before the catalog has them
    (the first _fence of a run is the split's publish)."""

    def _fence(self, conn, move_id):
        if not getattr(self, "_crashed", False):
            self._crashed = True
            raise RuntimeError("simulated crash before the split's publish")
        return super()._fence(conn, move_id)


def test_abort_after_a_crash_inside_the_split_restores_the_shards_slices(world):
    """The mover dies inside the split: every shard has the split slices (and the owner the
    new one), the catalog does not.  Abort must bring the shards' copies back to the
    catalog's; otherwise a later move of the whole range [-inf, 1000) copies only the keys
    the *shard* puts in that slice (< 500) and strands keys 500..999 on s0."""
    _fill_ca(world, range(0, 1000, 10))
    plan = plan_split_range(world.slices(), "ca", 500, "s2")
    mover = _CrashBeforeSplitPublish(world.cluster, grace=0, progress=_noop)
    move_id = mover.start(plan)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mover.run(move_id)
    rebalance.abort(world.cluster, move_id)

    problems = []
    want = _catalog_slices(world, "ca")
    for shard in ("s0", "s1", "s2"):
        have = _shard_slices(world, shard, "ca")
        if have != want:
            problems.append(f"{shard}'s copy of ca's slices has {len(have)} rows, the catalog {len(want)}")
    # What that leads to: move the whole lower range to s2.
    whole = plan_split_range(world.slices(), "ca", 1000, "s2", lower=True)
    assert not whole.splits
    world.mover().apply(whole)
    world.cluster.refresh_map()
    placed = _ca_everywhere(world)
    wrong = sorted(k for k, shards in placed.items() if shards != [world.cluster.shard_for("ca", k)])
    if wrong:
        problems.append(f"{len(wrong)} rows not (only) on their owner, e.g. key {wrong[0]} on "
                        f"{placed[wrong[0]]}, owner {world.cluster.shard_for('ca', wrong[0])}")
    try:
        with world.Session()() as s:
            s.execute(CA.insert().values(id=705, k=705))
            s.commit()
    except Exception as e:  # noqa: BLE001 - reported below
        problems.append(f"inserting key 705 failed: {type(e).__name__}: {str(e)[:120]}")
    assert not problems, problems


def test_resume_after_a_crash_inside_the_split_finishes_the_move(world):
    """Same crash point as above, then resume: one split, every row once on its owner."""
    _fill_ca(world, range(0, 1000, 10))
    plan = plan_split_range(world.slices(), "ca", 500, "s2")
    mover = _CrashBeforeSplitPublish(world.cluster, grace=0, progress=_noop)
    move_id = mover.start(plan)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mover.run(move_id)
    world.mover().run(move_id)
    assert rebalance.move_status(world.cluster, move_id)[0]["state"] == "done"
    world.cluster.refresh_map()
    placed = _ca_everywhere(world)
    assert sorted(placed) == list(range(0, 1000, 10))
    assert all(shards == [world.cluster.shard_for("ca", k)] for k, shards in placed.items())
    assert world.cluster.shard_for("ca", 500) == "s2" and world.cluster.shard_for("ca", 499) == "s0"
    for shard in ("s0", "s1", "s2"):
        assert _shard_slices(world, shard, "ca") == _catalog_slices(world, "ca")
    report = verify(world.cluster)
    assert report.ok, report.render()


def test_a_plan_made_before_another_move_of_its_group_is_refused(world):
    """Two plans of one group from the same map: after the first ran, the second (whose
    new slice has the same number but other bounds) is stale."""
    p1 = plan_split_range(world.slices(), "ca", 300, "s2")
    p2 = plan_split_range(world.slices(), "ca", 600, "s2")
    assert p1.moves[0].bucket == p2.moves[0].bucket
    world.mover().apply(p1)
    with pytest.raises(RebalanceError, match="stale"):
        world.mover().start(p2)
    # A plan whose split is already live (here: p1's own, after p1 ran) but whose move
    # is not (the slice has moved since) is refused too.
    with pytest.raises(RebalanceError):
        world.mover().start(p1)


class _HookedMover(rebalance.Mover):
    """Calls ``hook(step)`` right after the copy (the target holds copies it does not
    own) and right before verification (the source holds rows it no longer owns)."""

    def __init__(self, cluster, hook, **kw):
        super().__init__(cluster, grace=0, progress=_noop, **kw)
        self.hook = hook

    def _copy(self, *a, **kw):
        n = super()._copy(*a, **kw)
        self.hook("copied")
        return n

    def _verify(self, *a, **kw):
        self.hook("switched")
        return super()._verify(*a, **kw)


NAME_KEYS = ["", " ", "A", "L", "Lzzz", "M", "M ", "Ma", "Z", "[", "a", "m", "o'k", "o'ka", "o&", "oz", "z",
             "\u00e9", "\u00c9", "\U0001f600"]
TAG_KEYS = [None, "", " ", "o'k", "O'K", "x", "X", "y", "Y", "z"]


def _fill_names_and_tags(world: World) -> None:
    Session = world.Session()
    with Session() as s:
        s.add_all(Name(id=i, name=k) for i, k in enumerate(NAME_KEYS))
        s.add_all(Ev(id=i, k=k) for i, k in enumerate(EV_KEYS))
        s.add_all(Tag(id=i, tag=k) for i, k in enumerate(TAG_KEYS) if k is not None)
        s.commit()
    # The session refuses NULL keys; the guard lets them in anywhere (slice NULL).
    for i, k in enumerate(TAG_KEYS):
        if k is None:
            world.sql("s2", "INSERT INTO tags VALUES (%s, NULL)", (i,))


EV_KEYS = [-2**31, -101, -100, -1, 0, 5, 999_999, 2**31 - 1]


@pytest.mark.parametrize("what", ["names o'k+", "ev 0+", "tags ''", "tags y (carved)"])
def test_cross_shard_reads_during_a_slice_move_see_each_row_once(world, what):
    """Reads (count, rows, a range predicate) while the target holds copies and while the
    source keeps rows it gave away: each row once, for text ranges split at a key with a
    quote, for the '' list value, for a value carved from the default, NULL keys too, and
    for a range of an int4 column whose bound does not fit int4 (compared as bigint).
    `shardkit verify` is clean at both points."""
    _fill_names_and_tags(world)
    reader = shardkit.Cluster.from_config(world.cfg_path, follow_map=False)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=reader, consistency="strong")
    if what.startswith("names"):
        model, plan = Name, plan_split_range(world.slices(), "names", "o'k", "s2")
        queries = {"all": select(Name.id), "ranged": select(Name.id).where(Name.name >= "o'k"),
                   "below": select(Name.id).where(Name.name < "o'k")}
        expect = {"all": set(range(len(NAME_KEYS))),
                  "ranged": {i for i, k in enumerate(NAME_KEYS) if k >= "o'k"},
                  "below": {i for i, k in enumerate(NAME_KEYS) if k < "o'k"}}
    elif what.startswith("ev"):  # int4 column, the moved range ends beyond int4
        model, plan = Ev, plan_split_range(world.slices(), "ev", 0, "s0")
        queries = {"all": select(Ev.id), "ranged": select(Ev.id).where(Ev.k >= 0),
                   "below": select(Ev.id).where(Ev.k < 0)}
        expect = {"all": set(range(len(EV_KEYS))),
                  "ranged": {i for i, k in enumerate(EV_KEYS) if k >= 0},
                  "below": {i for i, k in enumerate(EV_KEYS) if k < 0}}
    else:
        value = "" if what == "tags ''" else "y"
        target = "s1" if value == "" else "s0"
        model, plan = Tag, plan_move_value(world.slices(), "tags", value, target)
        queries = {"all": select(Tag.id), "value": select(Tag.id).where(Tag.tag == value),
                   "others": select(Tag.id).where(Tag.tag != value)}
        expect = {"all": set(range(len(TAG_KEYS))),
                  "value": {i for i, k in enumerate(TAG_KEYS) if k == value},
                  "others": {i for i, k in enumerate(TAG_KEYS) if k is not None and k != value}}
    seen, problems = [], []

    def hook(step: str) -> None:
        reader.refresh_map()
        assert reader.foreign_buckets, f"{step}: no shard holds foreign rows?"
        seen.append(step)
        with Session() as s:
            for name, q in [*queries.items(), ("count", select(func.count()).select_from(model))]:
                try:
                    got = s.scalars(q).all()
                except Exception as e:  # noqa: BLE001 - reported below
                    problems.append(f"{step} {name}: {type(e).__name__}: {str(e)[:160]}")
                    s.rollback()
                    continue
                if name == "count":
                    if got != [len(expect["all"])]:
                        problems.append(f"{step} count: {got[0]} rows, expected {len(expect['all'])}")
                elif sorted(got) != sorted(expect[name]):
                    problems.append(f"{step} {name}: ids {sorted(got)}, expected {sorted(expect[name])}")
        report = verify(reader)  # rows in flight are not misplaced (the NULL-key tag is)
        bad = [f"{t.shard} {t.table} {dict(t.misplaced)}" for t in report.tables
               if set(t.misplaced) - {"(null key)"}]
        if bad or report.ownership or report.missing_tables:
            problems.append(f"{step} verify: {bad} {report.ownership}")

    try:
        _HookedMover(world.cluster, hook).apply(plan)
    finally:
        reader.dispose()
    assert seen == ["copied", "switched"]
    assert not problems, problems


def test_init_with_a_list_group_on_an_enum_column(dev, tmp_path):
    """A list group keyed by a PostgreSQL enum (regions often are) next to a hash group:
    `rebalance init` succeeds, the enum group is guarded (its values compare by their
    text), and the hash group can still be rebalanced."""
    schema = ("CREATE TYPE region AS ENUM ('eu', 'us', 'jp'); "
              "CREATE TABLE shops (id bigint PRIMARY KEY, region region NOT NULL); "
              "CREATE TABLE users (id bigint PRIMARY KEY);")
    groups = {"shops": {"strategy": "list", "tables": {"shops": "region"},
                        "values": {"s0": ["eu"], "s1": ["us"]}, "default": "s2"},
              "users": {"strategy": "hash", "tables": {"users": "id"}}}
    w = _make_world(dev, tmp_path, groups, init=False, extra_schema=schema)
    try:
        rebalance.init(w.cluster)
        w.sql("s0", "INSERT INTO shops VALUES (1, 'eu')")
        with pytest.raises(psycopg.Error) as ei:  # 'jp' is the default's, on s2
            w.sql("s0", "INSERT INTO shops VALUES (2, 'jp')")
        assert ei.value.sqlstate == "SK001"
        w.sql("s2", "INSERT INTO shops VALUES (2, 'jp')")
        assert verify(w.cluster).ok
        # Enum values move like strings.
        plan = plan_move_value(w.slices(), "shops", "jp", "s1")
        w.mover().apply(plan)
        assert w.sql("s1", "SELECT id FROM shops") == [(2,)]
        assert verify(w.cluster).ok
    finally:
        w.cluster.dispose()


def test_tables_with_long_names_get_their_own_slice_function(dev, tmp_path):
    """Two range tables (of groups with opposite ranges) whose 60-character names differ only
    at the end: their guard and slice functions must not be cut to the same 63-byte name,
    or one table would be guarded with the other group's slices."""
    a, b = "r" * 58 + "_a", "r" * 58 + "_b"
    schema = (f"CREATE TABLE {a} (id bigint PRIMARY KEY, k bigint NOT NULL); "
              f"CREATE TABLE {b} (id bigint PRIMARY KEY, k bigint NOT NULL);")
    groups = {"ga": {"strategy": "range", "tables": {a: "k"},
                     "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
              "gb": {"strategy": "range", "tables": {b: "k"},
                     "ranges": [{"to": 1000, "shard": "s1"}, {"from": 1000, "shard": "s0"}]}}
    w = _make_world(dev, tmp_path, groups, extra_schema=schema)
    try:
        assert w.cluster.shard_for(a, 5) == "s0" and w.cluster.shard_for(b, 5) == "s1"
        problems = []
        for table, shard in ((a, "s0"), (b, "s1")):
            try:
                w.sql(shard, f"INSERT INTO {table} VALUES (1, 5)")
            except psycopg.Error as e:
                problems.append(f"{table[-2:]}: its owner {shard} refused key 5: {e.sqlstate} {e}")
        assert not problems, problems
    finally:
        w.cluster.dispose()


def test_a_move_of_one_group_does_not_refuse_reads_of_another(world):
    """While a value of list group "tags" moves, a cross-shard read of the *names* table
    (another group, nothing of it in flight) through a subquery is not refused: only the
    tables of what moves are filtered."""
    _fill_names_and_tags(world)
    reader = shardkit.Cluster.from_config(world.cfg_path, follow_map=False)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=reader, consistency="strong")
    q = select(func.count()).select_from(select(Name.id).where(Name.id >= 0).subquery())
    with Session() as s:
        assert s.scalar(q) == len(NAME_KEYS)
    results = {}

    def hook(step: str) -> None:
        reader.refresh_map()
        with Session() as s:
            try:
                results[step] = s.scalar(q)
            except Exception as e:  # noqa: BLE001 - reported below
                results[step] = f"{type(e).__name__}: {str(e)[:80]}"

    try:
        _HookedMover(world.cluster, hook).apply(plan_move_value(world.slices(), "tags", "x", "s0"))
    finally:
        reader.dispose()
    assert results == {"copied": len(NAME_KEYS), "switched": len(NAME_KEYS)}, results


def test_range_predicates_on_a_collated_text_key_find_every_row(dev, tmp_path):
    """A text range group whose key column has a linguistic collation (ICU "en"): each shard
    evaluates ``name >= 'a'`` in that collation, where 'B' >= 'a', so the router must not
    leave shards out by code point order ('B' < 'M' <= 'a')."""
    schema = 'ALTER TABLE names ALTER COLUMN name TYPE varchar(40) COLLATE "en-x-icu";'
    w = _make_world(dev, tmp_path, {"names": GROUPS["names"]}, extra_schema=schema)
    try:
        keys = ["B", "a", "b", "Z", "z"]
        Session = w.Session()
        with Session() as s:
            s.add_all(Name(id=i, name=k) for i, k in enumerate(keys))
            s.commit()
        # What PostgreSQL says the predicate matches, asked of every shard.
        truth = sorted(r[0] for shard in ("s0", "s1", "s2")
                       for r in w.sql(shard, "SELECT id FROM names WHERE name >= 'a'"))
        with Session() as s:
            got = sorted(s.scalars(select(Name.id).where(Name.name >= "a")).all())
        assert got == truth, f"{[keys[i] for i in got]} != {[keys[i] for i in truth]}"
    finally:
        w.cluster.dispose()


def test_key_changes_into_and_out_of_a_moving_range_during_the_move(world):
    """While [500, 1000) of "ca" moves s0 -> s2: after the copy one row's key leaves the
    moving range (700 -> 300), one enters it (200 -> 800), one is deleted and one inserted;
    between the cut-over and verification the new owner changes one more.  Every row ends
    once, on its owner, with its last value."""
    _fill_ca(world, [100, 200, 300, 600, 700, 900])

    def after_copy():
        with world.conn("s0") as c:
            c.execute("UPDATE ca SET k = 300 WHERE id = 700")
            c.execute("UPDATE ca SET k = 800 WHERE id = 200")
            c.execute("DELETE FROM ca WHERE id = 900")
            c.execute("INSERT INTO ca VALUES (950, 950)")

    def before_verify():
        with world.conn("s2") as c:
            c.execute("UPDATE ca SET k = 650 WHERE id = 600")

    hooks = {"copied": after_copy, "switched": before_verify}
    _HookedMover(world.cluster, lambda step: hooks.pop(step)()).apply(
        plan_split_range(world.slices(), "ca", 500, "s2"))
    world.cluster.refresh_map()
    rows: dict[int, list[tuple[str, int]]] = {}
    for shard in ("s0", "s1", "s2"):
        for i, k in world.sql(shard, "SELECT id, k FROM ca"):
            rows.setdefault(i, []).append((shard, k))
    want = {100: 100, 200: 800, 300: 300, 600: 650, 700: 300, 950: 950}
    assert {i: [k for _, k in places] for i, places in rows.items()} == {i: [k] for i, k in want.items()}
    for i, [(shard, k)] in rows.items():
        assert shard == world.cluster.shard_for("ca", k), f"row {i} (key {k}) on {shard}"
    report = verify(world.cluster)
    assert report.ok, report.render()


def test_a_plan_whose_split_moves_a_boundary_is_refused(world):
    """A slice plan read from JSON (``rebalance apply --plan FILE``, hand-edited) whose
    ``split`` moves the boundary between s0 and s1 (1000 -> 500) instead of only cutting
    a slice in two is refused: a split must keep every key on its shard, or keys 500..999
    would stay on s0 while the map sends them to s1."""
    _fill_ca(world, range(0, 1000, 100))
    real = plan_split_range(world.slices(), "ca", 250, "s2", lower=True)  # moves [-inf, 250)
    d = real.as_dict()
    low, high = [s for s in d["old"]]
    d["split"] = [dict(d["split"][0]), {**high, "lower": 500}, dict(d["split"][1], upper=500)]
    try:
        plan = plan_from_dict(json.loads(json.dumps(d)))
        move_id = world.mover().start(plan)
    except Exception as e:  # noqa: BLE001 - refused: fine
        assert "split" in str(e) or "plan" in str(e)
        return
    world.mover().run(move_id)
    world.cluster.refresh_map()
    placed = _ca_everywhere(world)
    wrong = {k: (shards, world.cluster.shard_for("ca", k)) for k, shards in placed.items()
             if shards != [world.cluster.shard_for("ca", k)]}
    assert not wrong, f"rows not on their owner (found on, owner): {wrong}"


def _cli(world: World, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardkit.cli", "rebalance", *args, "--config",
                           str(world.cfg_path)], capture_output=True, text=True, timeout=120)


def test_cli_moves_the_empty_value_and_splits_at_a_negative_key(world):
    """`--move-value tags:` (the value '') and `--split ev:-5 --lower` (a negative key)."""
    r = _cli(world, "apply", "--move-value", "tags:", "--to", "s1", "--grace", "0")
    assert r.returncode == 0, r.stderr
    r = _cli(world, "apply", "--split", "ev:-5", "--lower", "--to", "s2", "--grace", "0")
    assert r.returncode == 0, r.stderr
    world.cluster.refresh_map()
    assert world.cluster.shard_for("tags", "") == "s1"
    assert world.cluster.shard_for("tags", "o'k") == "s0"
    assert [world.cluster.shard_for("ev", k) for k in (-101, -100, -6, -5, 0)] == ["s0", "s2", "s2", "s1", "s1"]
    with world.conn("s1") as c:
        c.execute("INSERT INTO tags VALUES (1, '')")
        c.execute("INSERT INTO ev VALUES (1, -5)")
    with world.conn("s2") as c:
        c.execute("INSERT INTO ev VALUES (2, -100)")
    r = _cli(world, "plan", "--split", "names:o'k", "--to", "s2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["split"][-1]["lower"] == "o'k"


# -- pure: slices, slice plans and the CLI's key parsing (no server) ------------------------
# (Here rather than in tests/unit/test_slice_moves.py: two test modules with one basename
# break collection of the whole suite in pytest's default import mode.)

PURE_GROUPS = GROUPS  # the same groups, without a server


def _pure_config():
    return load_config({"bucket_count": 8, "shards": [
        {"name": f"s{i}", "primary": f"postgresql://u@h/db{i}"} for i in range(3)], "groups": PURE_GROUPS})


def _pure_slices():
    return initial_slices(_pure_config().groups)


def _pure_strategies(slices):
    cfg = _pure_config()
    return {g.name: g.strategy for g in with_bucket_map(cfg, cfg.bucket_map, tuple(slices)).groups}


def test_cli_parses_negative_integers_and_strings_with_colons_and_quotes():
    slices = _pure_slices()
    assert _group_key("ev:-5", slices, "--split") == ("ev", -5)
    assert _group_key("ev:-2147483649", slices, "--split") == ("ev", -2147483649)
    assert _group_key("names:a:b", slices, "--split") == ("names", "a:b")
    assert _group_key("names:o'k", slices, "--split") == ("names", "o'k")
    assert _group_key("tags:", slices, "--move-value") == ("tags", "")
    assert _group_key("nums:-1", slices, "--move-value") == ("nums", -1)
    assert _group_key("names:007", slices, "--split") == ("names", "007")  # strings stay strings
    with pytest.raises(UsageError, match="nums's keys are integers"):
        _group_key("nums:x", slices, "--move-value")
    # As `route` reads an integer key: ASCII digits only (int() alone reads these too).
    for raw in ("1_000", "\uff11\uff12", "\u0661\u0662"):
        with pytest.raises(UsageError, match="ASCII digits"):
            _group_key(f"ev:{raw}", slices, "--split")


def test_new_slices_are_numbered_above_every_groups():
    slices = _pure_slices()
    top = max(s.id for s in slices)
    plan = plan_split_range(slices, "ev", 0, "s2")
    assert plan.moves[0].bucket == top + 1
    plan = plan_move_value(slices, "tags", "zz", "s0")
    assert plan.moves[0].bucket == top + 1
    assert all(s.id >= SLICE_BASE for s in plan.split)


@pytest.mark.parametrize("group,value,target", [("tags", "", "s1"), ("tags", "o'k", "s2"),
                                                ("nums", -1, "s2"), ("tags", "a\"b'c", "s0")])
def test_list_values_that_are_falsy_or_quoted_move_alone(group, value, target):
    slices = _pure_slices()
    plan = plan_move_value(slices, group, value, target)
    moved = next(s for s in plan.split if s.id == plan.moves[0].bucket)
    assert moved.values == (value,)
    after = _pure_strategies(reassign(tuple(s for s in slices if s.group != group) + plan.split,
                                 {plan.moves[0].bucket: target}))[group]
    assert after.shard_for_key(value) == target
    assert after.unit_for_key(value) == moved.id
    # ...and nothing else moved
    before = _pure_strategies(slices)[group]
    for other in ["", "o'k", "x", "y", -1, 0, 7, 8]:
        if other != value and type(other) is type(value):
            assert after.shard_for_key(other) == before.shard_for_key(other)


def test_slice_plans_survive_json():
    slices = _pure_slices()
    for plan in (plan_split_range(slices, "names", "o'k", "s2"), plan_split_range(slices, "ev", 0, "s0", lower=True),
                 plan_move_value(slices, "tags", "", "s1"), plan_move_value(slices, "tags", "new'one", "s0")):
        again = plan_from_dict(json.loads(json.dumps(plan.as_dict())))
        assert isinstance(again, SlicePlan)
        assert (again.old, again.split, again.moves, again.group) == (plan.old, plan.split, plan.moves, plan.group)
    assert slices_from_json(json.loads(json.dumps(slices_to_json(slices)))) == slices


def test_split_at_an_existing_boundary_moves_that_slice_or_the_one_below():
    slices = _pure_slices()
    up = plan_split_range(slices, "ev", -100, "s2")
    assert not up.splits and up.moves[0].source == "s1"
    down = plan_split_range(slices, "ev", -100, "s2", lower=True)
    assert not down.splits and down.moves[0].source == "s0"
    with pytest.raises(ConfigurationError):
        plan_split_range(slices, "ev", "a", "s2")
    with pytest.raises(ConfigurationError):
        plan_split_range(slices, "ev", None, "s2")
    with pytest.raises(ConfigurationError):
        carve_value(slices, "ev", 5)


int_keys = st.integers(min_value=-2**40, max_value=2**40)
str_keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=4)


@pytest.mark.parametrize("group,key_strategy,extra_keys", [
    ("ev", int_keys, [-100, 3_000_000_000]),
    ("names", str_keys, []),
], ids=["int", "str"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_splits_never_change_where_a_key_lives(group, key_strategy, extra_keys, data):
    cuts = data.draw(st.lists(key_strategy, min_size=1, max_size=6), label="cuts")
    keys = data.draw(st.lists(key_strategy, max_size=30), label="keys")
    slices = _pure_slices()
    before = _pure_strategies(slices)[group]
    for at in cuts:
        slices, new = split_range(slices, group, at)
        assert new.lower == at
        ids = [s.id for s in slices]
        assert len(ids) == len(set(ids))
    after = _pure_strategies(slices)[group]
    for k in keys + cuts + extra_keys:
        assert after.shard_for_key(k) == before.shard_for_key(k)
        holder = [s for s in slices if s.group == group and s.contains(k)]
        assert [s.id for s in holder] == [after.unit_for_key(k)]
