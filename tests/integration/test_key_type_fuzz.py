"""Key types, fuzzed: for every supported key column type, the Python router,
the SQL that runs on the shards (the ownership guard's and the mover's bucket or slice of a
row: ``unit_expression``) and ``verify`` must agree on where each key value lives.

One module-scoped dev cluster (3 shards, no replicas), one database of its own on every
shard with a catalog and the guard installed (``rebalance.init``), every session in a
TimeZone that is not UTC (``America/St_Johns``, -03:30 / -02:30).  Each table has a key
column ``k`` (or ``a``, ``b`` for a composite key) and the primary key ``(id, k)``, so that
``session.get`` routes by the key.  For each table, hypothesis (derandomized) generates
batches of key values of the column's type and of the neighbouring types the README says it
accepts, incl. edge values; each value is

* inserted by an ORM flush and by a Core executemany: the guard refusing it means the router
  and the SQL disagree; a ShardKeyError from the router is a refusal, allowed for neighbouring
  types only, and then for every write and read of that value;
* found on exactly the shard the router names, whose SQL unit (bucket or slice) of the stored
  row is the one Python computes for the value (guarded tables);
* read back by ``session.get``, ``key == v``, ``key.in_([v, w])`` and (range groups)
  ``BETWEEN v AND w``: the rows each finds are those the same statement finds run on every
  shard's primary directly (one database holding every row);

and ``verify`` is clean at the end of each table.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (BigInteger, Boolean, Column, Date, Enum, Integer, MetaData, Numeric,
                        SmallInteger, String, Table, Text, Uuid, and_, bindparam, create_engine,
                        insert, select, text)
from sqlalchemy.dialects.postgresql import CHAR, TIMESTAMP, VARCHAR
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, registry, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._guard import table_shape, unit_expression, guarded_tables
from shardkit._routing import coercer_for
from shardkit.devcluster import to_toml
from own_tables import database_on_every_shard
from shardkit.verify import verify

pytestmark = pytest.mark.integration

TZ = "America/St_Johns"
UTC = dt.timezone.utc


class Color(enum.Enum):
    RED = 1
    green = 2
    Blue = 3


md = MetaData()
mapper_registry = registry(metadata=md)


def _table(name: str, *types: Any) -> Table:
    cols = ["k"] if len(types) == 1 else ["a", "b"][:len(types)]
    return Table(name, md, Column("id", BigInteger, primary_key=True, autoincrement=False),
                 *[Column(c, t, primary_key=True) for c, t in zip(cols, types)])


TABLES: dict[str, Table] = {t.name: t for t in [
    # hash groups: guarded, bucket in SQL, verified in SQL
    _table("kf_h_small", SmallInteger),
    _table("kf_h_int", Integer),
    _table("kf_h_big", BigInteger),
    _table("kf_h_text", Text),
    _table("kf_h_varchar", VARCHAR(6)),
    _table("kf_h_char", CHAR(6)),
    _table("kf_h_uuid", Uuid),
    # range and list groups of integer or string bounds: guarded (slices)
    _table("kf_r_int", Integer),
    _table("kf_r_num", Numeric(12, 2)),
    _table("kf_r_numu", Numeric),
    _table("kf_r_text", Text),
    _table("kf_r_varchar", VARCHAR(6)),
    _table("kf_r_char", CHAR(4)),
    _table("kf_r_uuid", Uuid),
    _table("kf_l_enum", Enum(Color, name="kf_color")),
    _table("kf_l_small", SmallInteger),
    _table("kf_l_text", Text),
    _table("kf_l_num", Numeric(8, 2)),
    _table("kf_l_numu", Numeric),
    _table("kf_l_uuid", Uuid),
    # range and list groups of other bounds: not guarded, verified through Python
    _table("kf_r_date", Date),
    _table("kf_r_ts", TIMESTAMP(precision=3)),
    _table("kf_r_tstz", TIMESTAMP(timezone=True)),
    _table("kf_r_numf", Numeric(10, 3)),
    _table("kf_l_bool", Boolean),
    _table("kf_l_date", Date),
    _table("kf_c_range", Text, Integer),
    _table("kf_c_list", String(4), SmallInteger),
]}

CLASSES: dict[str, type] = {}
for _name, _t in TABLES.items():
    CLASSES[_name] = type(_name.title().replace("_", ""), (), {})
    mapper_registry.map_imperatively(CLASSES[_name], _t)

U = "00000000-0000-0000-0000-000000000000"
GROUPS = f"""
[groups.h_small]
tables = {{ kf_h_small = "k" }}
[groups.h_int]
tables = {{ kf_h_int = "k" }}
[groups.h_big]
tables = {{ kf_h_big = "k" }}
[groups.h_text]
tables = {{ kf_h_text = "k" }}
[groups.h_varchar]
tables = {{ kf_h_varchar = "k" }}
[groups.h_char]
tables = {{ kf_h_char = "k" }}
[groups.h_uuid]
tables = {{ kf_h_uuid = "k" }}

[groups.r_int]
strategy = "range"
tables = {{ kf_r_int = "k" }}
ranges = [ {{ to = 0, shard = "s0" }}, {{ from = 0, to = 1000, shard = "s1" }}, {{ from = 1000, shard = "s2" }} ]
[groups.r_num]
strategy = "range"
tables = {{ kf_r_num = "k" }}
ranges = [ {{ to = 0, shard = "s0" }}, {{ from = 0, to = 100, shard = "s1" }}, {{ from = 100, shard = "s2" }} ]
[groups.r_numu]
strategy = "range"
tables = {{ kf_r_numu = "k" }}
ranges = [ {{ to = 0, shard = "s0" }}, {{ from = 0, to = 3, shard = "s1" }}, {{ from = 3, shard = "s2" }} ]
[groups.r_text]
strategy = "range"
tables = {{ kf_r_text = "k" }}
ranges = [ {{ to = "M", shard = "s0" }}, {{ from = "M", to = "m", shard = "s1" }}, {{ from = "m", shard = "s2" }} ]
[groups.r_varchar]
strategy = "range"
tables = {{ kf_r_varchar = "k" }}
ranges = [ {{ to = "M", shard = "s0" }}, {{ from = "M", to = "abcdef", shard = "s1" }}, {{ from = "abcdef", shard = "s2" }} ]
[groups.r_char]
strategy = "range"
tables = {{ kf_r_char = "k" }}
ranges = [ {{ to = "M", shard = "s0" }}, {{ from = "M", to = "m", shard = "s1" }}, {{ from = "m", shard = "s2" }} ]
[groups.r_uuid]
strategy = "range"
tables = {{ kf_r_uuid = "k" }}
ranges = [ {{ to = "40000000-0000-0000-0000-000000000000", shard = "s0" }},
           {{ from = "40000000-0000-0000-0000-000000000000", to = "c0000000-0000-0000-0000-000000000000", shard = "s1" }},
           {{ from = "c0000000-0000-0000-0000-000000000000", shard = "s2" }} ]
[groups.l_enum]
strategy = "list"
tables = {{ kf_l_enum = "k" }}
values = {{ s0 = ["RED"], s1 = ["green"] }}
default = "s2"
[groups.l_small]
strategy = "list"
tables = {{ kf_l_small = "k" }}
values = {{ s0 = [0, -32768], s1 = [32767, 1] }}
default = "s2"
[groups.l_text]
strategy = "list"
tables = {{ kf_l_text = "k" }}
values = {{ s0 = ["", "a"], s1 = ["A", "ß"] }}
default = "s2"
[groups.l_num]
strategy = "list"
tables = {{ kf_l_num = "k" }}
values = {{ s0 = [0, 100], s1 = [3] }}
default = "s2"
[groups.l_numu]
strategy = "list"
tables = {{ kf_l_numu = "k" }}
values = {{ s0 = [0, 100], s1 = [3] }}
default = "s2"
[groups.l_uuid]
strategy = "list"
tables = {{ kf_l_uuid = "k" }}
values = {{ s0 = ["{U}"] }}
default = "s1"

[groups.r_date]
strategy = "range"
tables = {{ kf_r_date = "k" }}
ranges = [ {{ to = 2000-02-29, shard = "s0" }}, {{ from = 2000-02-29, to = 2024-02-29, shard = "s1" }}, {{ from = 2024-02-29, shard = "s2" }} ]
[groups.r_ts]
strategy = "range"
tables = {{ kf_r_ts = "k" }}
ranges = [ {{ to = 2000-01-01T00:00:00, shard = "s0" }}, {{ from = 2000-01-01T00:00:00, to = 2024-02-29T23:59:59.999, shard = "s1" }},
           {{ from = 2024-02-29T23:59:59.999, shard = "s2" }} ]
[groups.r_tstz]
strategy = "range"
tables = {{ kf_r_tstz = "k" }}
ranges = [ {{ to = 2000-01-01T00:00:00Z, shard = "s0" }}, {{ from = 2000-01-01T00:00:00Z, to = 2024-02-29T23:59:59.999999+05:45, shard = "s1" }},
           {{ from = 2024-02-29T23:59:59.999999+05:45, shard = "s2" }} ]
[groups.r_numf]
strategy = "range"
tables = {{ kf_r_numf = "k" }}
ranges = [ {{ to = 0.1, shard = "s0" }}, {{ from = 0.1, to = 99.995, shard = "s1" }}, {{ from = 99.995, shard = "s2" }} ]
[groups.l_bool]
strategy = "list"
tables = {{ kf_l_bool = "k" }}
values = {{ s0 = [true], s1 = [false] }}
[groups.l_date]
strategy = "list"
tables = {{ kf_l_date = "k" }}
values = {{ s0 = [2024-02-29], s1 = [2000-02-29] }}
default = "s2"
[groups.c_range]
strategy = "range"
tables = {{ kf_c_range = ["a", "b"] }}
ranges = [ {{ to = ["m", 0], shard = "s0" }}, {{ from = ["m", 0], to = ["m", 1000], shard = "s1" }}, {{ from = ["m", 1000], shard = "s2" }} ]
[groups.c_list]
strategy = "list"
tables = {{ kf_c_list = ["a", "b"] }}
values = {{ s0 = [["eu", 1], ["us", 1]], s1 = [["eu", 2]] }}
default = "s2"
"""

_dbs = itertools.count()


# -- value generators ---------------------------------------------------------------------------

def _ints(lo: int, hi: int, edges: list[int]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


SMALL = (-2**15, 2**15 - 1)
INT = (-2**31, 2**31 - 1)
BIG = (-2**63, 2**63 - 1)

_texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
_case = st.sampled_from(["", " ", "M", "m", "Ma", "ma", "MA", "mA", "L\u00ff", "\u00df", "SS", "ss", "\u0130",
                         "i\u0307", "\u00e9", "e\u0301", "\U0001f600", "a\tb", "a ", "a  ", " a", "M ", "\u00a0"])


def _short_texts(n: int, *, trailing: bool) -> st.SearchStrategy[str]:
    base = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=n)
    if not trailing:
        return base
    # a value of at most n characters, with blanks after it (PostgreSQL stores a varchar(n)
    # or char(n) value whose excess characters are all blanks cut to n, no error)
    return st.one_of(base, st.builds(lambda s, k: s + " " * k, base, st.integers(0, 4)))


def _decimals(places: int, big: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.decimals(min_value=-big, max_value=big, places=places, allow_nan=False, allow_infinity=False),
        st.decimals(min_value=-1000, max_value=1000, allow_nan=False, allow_infinity=False),
    )


def _floats(big: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=-big, max_value=big, allow_nan=False, allow_infinity=False)


NUM_EDGES = [Decimal("-0"), Decimal("-0.00"), Decimal("99.995"), Decimal("99.994999"), Decimal("-0.005"),
             Decimal("-0.004999"), Decimal("0.004999999999"), Decimal("-99.995"), Decimal("100.00"),
             Decimal("1E-30"), Decimal("-1E-30"), Decimal("99.99500000000000000000000001"),
             Decimal("2.995"), Decimal("2.9949"), Decimal("1E+2"), Decimal("0E+3"),
             0, 100, -1, 3, 99.995, 0.1, 2.9999999999999996, 99.99999999999999, -0.0, 0.0,
             2.995, 0.30000000000000004, 1e-300, -1e-300, 3.0000000000000004]

_dates = st.one_of(st.sampled_from([dt.date(2000, 2, 29), dt.date(2024, 2, 29), dt.date(2000, 2, 28),
                                    dt.date(2024, 3, 1), dt.date(1, 1, 1), dt.date(9999, 12, 31)]),
                   st.dates())
_naive = st.one_of(
    st.sampled_from([dt.datetime(2000, 1, 1), dt.datetime(1999, 12, 31, 23, 59, 59, 999500),
                     dt.datetime(1999, 12, 31, 23, 59, 59, 999999), dt.datetime(2024, 2, 29, 23, 59, 59, 999500),
                     dt.datetime(2024, 2, 29, 23, 59, 59, 998500), dt.datetime(2024, 2, 29, 23, 59, 59, 999499),
                     dt.datetime(1999, 12, 31, 23, 59, 59, 999499), dt.datetime(1, 1, 1),
                     dt.datetime(9999, 12, 31, 23, 59, 59, 999000), dt.datetime(2024, 2, 29, 12)]),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)))
_offsets = st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=5, minutes=45)),
                            dt.timezone(dt.timedelta(hours=-3, minutes=-30)), dt.timezone(dt.timedelta(hours=14)),
                            dt.timezone(dt.timedelta(hours=-12)), dt.timezone(dt.timedelta(seconds=-1))])
_aware = st.one_of(
    st.sampled_from([dt.datetime(2000, 1, 1, tzinfo=UTC), dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                     dt.datetime(2024, 3, 1, 5, 44, 59, 999999, tzinfo=UTC),
                     dt.datetime(2024, 2, 29, 23, 59, 59, 999999,
                                 tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
                     dt.datetime(2024, 2, 29, 18, 14, 59, 999999, tzinfo=UTC),
                     dt.datetime(2024, 2, 29, 18, 15, tzinfo=UTC)]),
    st.builds(lambda d, tz: d.replace(tzinfo=tz),
              st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31)), _offsets))


def _uuids() -> st.SearchStrategy[Any]:
    u = st.one_of(st.sampled_from([uuid.UUID(U), uuid.UUID("40000000-0000-0000-0000-000000000000"),
                                   uuid.UUID("3fffffff-ffff-ffff-ffff-ffffffffffff"),
                                   uuid.UUID("c0000000-0000-0000-0000-000000000000"),
                                   uuid.UUID("bfffffff-ffff-ffff-ffff-ffffffffffff"),
                                   uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")]), st.uuids())
    # and its string forms, which the column accepts
    return st.one_of(u, u.map(str), u.map(lambda x: str(x).upper()), u.map(lambda x: x.hex),
                     u.map(lambda x: "{" + str(x) + "}"))


#: table -> (values the router must accept, neighbouring values it may refuse)
VALUES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any] | None]] = {
    "kf_h_small": (_ints(*SMALL, [SMALL[0], SMALL[1], 0, -1, 1]), None),
    "kf_h_int": (_ints(*INT, [INT[0], INT[1], 0, -1, 1, SMALL[0] - 1, SMALL[1] + 1]), None),
    "kf_h_big": (_ints(*BIG, [BIG[0], BIG[1], 0, -1, INT[0] - 1, INT[1] + 1]), None),
    "kf_h_text": (st.one_of(_case, _texts), None),
    "kf_h_varchar": (st.one_of(_case, _short_texts(6, trailing=True)), None),
    "kf_h_char": (st.one_of(_case, _short_texts(6, trailing=True)), None),
    "kf_h_uuid": (_uuids(), None),
    "kf_r_int": (_ints(*INT, [INT[0], INT[1], 0, -1, 999, 1000]), None),
    "kf_r_num": (st.one_of(st.sampled_from(NUM_EDGES), _decimals(4, 10**9), _floats(1e9),
                           st.integers(-10**9, 10**9)), None),
    "kf_r_numu": (st.one_of(st.sampled_from(NUM_EDGES), _decimals(20, 10**20), _floats(1e20),
                            st.integers(-10**20, 10**20)), None),
    "kf_r_text": (st.one_of(_case, _texts), None),
    "kf_r_varchar": (st.one_of(_case, st.sampled_from(["abcdef", "abcdef ", "abcde", "abcdef   "]),
                               _short_texts(6, trailing=True)), None),
    "kf_r_char": (st.one_of(_case, _short_texts(4, trailing=True)), None),
    "kf_r_uuid": (_uuids(), None),
    "kf_l_enum": (st.one_of(st.sampled_from(list(Color)), st.sampled_from([c.name for c in Color])), None),
    "kf_l_small": (_ints(*SMALL, [SMALL[0], SMALL[1], 0, -1, 1, 2]), None),
    "kf_l_text": (st.one_of(_case, st.sampled_from(["", "a", "A", "ß", "a "]), _texts), None),
    "kf_l_num": (st.one_of(st.sampled_from(NUM_EDGES), _decimals(4, 10**5), _floats(1e5),
                           st.integers(-10**5, 10**5)), None),
    "kf_l_numu": (st.one_of(st.sampled_from(NUM_EDGES), _decimals(20, 10**20), _floats(1e20),
                            st.integers(-10**20, 10**20)), None),
    "kf_l_uuid": (_uuids(), None),
    "kf_r_date": (_dates, _naive),
    "kf_r_ts": (_naive, _aware),
    "kf_r_tstz": (_aware, _naive),
    "kf_r_numf": (st.one_of(st.sampled_from(NUM_EDGES + [Decimal("0.1"), Decimal("0.0995"), Decimal("0.09949"),
                                                         Decimal("99.9945"), Decimal("99.995")]),
                            _decimals(5, 10**6), _floats(1e6), st.integers(-10**6, 10**6)), None),
    "kf_l_bool": (st.booleans(), None),
    "kf_l_date": (_dates, _naive),
    "kf_c_range": (st.tuples(st.one_of(_case, _texts), _ints(*INT, [0, -1, 999, 1000, INT[0], INT[1]])), None),
    "kf_c_list": (st.tuples(st.one_of(st.sampled_from(["eu", "us", "EU", "eu ", "eu  ", ""]),
                                      _short_texts(4, trailing=False)),
                            _ints(*SMALL, [1, 2, 0, SMALL[0], SMALL[1]])), None),
}
RANGE_TABLES = {n for n in TABLES if n.startswith(("kf_r_", "kf_c_range"))}


# -- the world ----------------------------------------------------------------------------------

class World:
    def __init__(self, dev: Any, cluster: shardkit.Cluster, direct: dict[str, Any]) -> None:
        self.dev, self.cluster, self.direct = dev, cluster, direct
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        self.ids = itertools.count(1)
        self.guarded = {g.table: g for g in guarded_tables(cluster.config)}

    def one_database(self, stmt: Any, params: Any = None) -> list[Any]:
        """What ``stmt`` reads from one database holding every row: run on each shard."""
        out = []
        for eng in self.direct.values():
            with eng.connect() as c:
                out.extend(c.execute(stmt, params).scalars().all())
        return sorted(out)

    def where(self, name: str, row_id: int) -> list[str]:
        return self.where_many(name, [row_id])[row_id]

    def where_many(self, name: str, row_ids: list[int]) -> dict[int, list[str]]:
        """row id -> the shards holding a row of that id (one query per shard)."""
        t = TABLES[name]
        out: dict[int, list[str]] = {i: [] for i in row_ids}
        for shard, eng in self.direct.items():
            with eng.connect() as c:
                for found in c.execute(select(t.c.id).where(t.c.id.in_(row_ids))).scalars():
                    out[found].append(shard)
        return out


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=16)


def make_world(dev: Any, directory: Path) -> World:
    db = f"kf8w{next(_dbs)}"
    cfg = database_on_every_shard(dev, db)
    for s in cfg["shards"]:
        s["primary"] += "?options=-c%20TimeZone%3D" + TZ.replace("/", "%2F")
    # (autocommit: the reads of every shard's rows, many per value, need no BEGIN and
    # ROLLBACK round trips around them)
    direct = {s["name"]: create_engine(s["primary"].replace("postgresql://", "postgresql+psycopg://", 1),
                                       isolation_level="AUTOCOMMIT")
              for s in cfg["shards"]}
    for eng in direct.values():
        md.create_all(eng)
        with eng.connect() as c:
            assert c.execute(text("SHOW TimeZone")).scalar() == TZ
    cfg["catalog"] = {"url": dev.create_catalog(f"{db}_catalog")}
    path = directory / f"{db}.toml"
    path.write_text(to_toml(cfg) + "\n" + GROUPS, encoding="utf-8")
    init_cluster = shardkit.Cluster.from_config(path, metadata=md, follow_map=False)
    rebalance.init(init_cluster)
    init_cluster.dispose()
    return World(dev, shardkit.Cluster.from_config(path, metadata=md, follow_map=False), direct)


@pytest.fixture(scope="module")
def world(dev, tmp_path_factory):
    w = make_world(dev, Path(tmp_path_factory.mktemp("kf8")))
    yield w
    w.cluster.dispose()
    for eng in w.direct.values():
        eng.dispose()


# -- the check ----------------------------------------------------------------------------------

def _key_cols(t: Table) -> list[Column]:
    return [c for c in t.c if c.name != "id"]


def _kw(t: Table, v: Any) -> dict[str, Any]:
    cols = _key_cols(t)
    return {cols[0].name: v} if len(cols) == 1 else {c.name: p for c, p in zip(cols, v)}


def _eq(t: Table, v: Any) -> Any:
    cols = _key_cols(t)
    return cols[0] == v if len(cols) == 1 else and_(*[c == p for c, p in zip(cols, v)])


def _routed(w: World, name: str, v: Any) -> str | None:
    """The router's shard for ``v``, None if it refuses the value (ShardKeyError)."""
    try:
        return w.cluster.shard_for(TABLES[name], v)
    except shardkit.ShardKeyError:
        return None


def _sql_units(w: World, name: str) -> dict[int, int]:
    """id -> the bucket or slice the shard's SQL (guard and mover) computes for its row."""
    g = w.guarded[name]
    out = {}
    for eng in w.direct.values():
        with eng.connect() as c:
            _, _, types = table_shape(c, name, keys=[g.key])
            expr = unit_expression(g, types[g.key], w.cluster.config.bucket_count)
            out.update(c.execute(text(f"SELECT id, {expr} FROM {name}")).all())
    return out


def _python_unit(w: World, name: str, v: Any) -> int | None:
    t = TABLES[name]
    co = coercer_for(t.c.k.type)
    key = co(v) if co is not None else v
    group = next(g for g in w.cluster.config.groups if name in g.tables)
    return group.strategy.unit_for_key(key)


def check_values(w: World, name: str, values: list[Any], refusable: set[int]) -> None:
    """The whole check for ``values`` of table ``name`` (indices in ``refusable`` may be
    refused by the router; the others must be accepted)."""
    t, cls = TABLES[name], CLASSES[name]
    accepted: list[tuple[Any, str, int, int]] = []   # (value, shard, orm id, core id)
    for i, v in enumerate(values):
        shard = _routed(w, name, v)
        if shard is None:
            assert i in refusable, f"{name}: the router refused {v!r}, a value of the column's type"
            with w.Session() as s, pytest.raises(shardkit.ShardKeyError):
                s.execute(insert(t).values(id=next(w.ids), **_kw(t, v)))
            continue
        accepted.append((v, shard, next(w.ids), next(w.ids)))
    if not accepted:
        return
    with w.Session() as s:
        for v, _, orm_id, _ in accepted:
            obj = cls()
            obj.id = orm_id
            for k, p in _kw(t, v).items():
                setattr(obj, k, p)
            s.add(obj)
        try:
            s.commit()
        except shardkit.NotOwned as e:
            pytest.fail(f"{name}: ORM flush of {[a[0] for a in accepted]!r} refused by the guard: {e}")
    with w.Session() as s:
        try:
            s.execute(insert(t), [{"id": core_id, **_kw(t, v)} for v, _, _, core_id in accepted])
            s.commit()
        except shardkit.NotOwned as e:
            pytest.fail(f"{name}: Core executemany of {[a[0] for a in accepted]!r} refused by the guard: {e}")
    units = _sql_units(w, name) if name in w.guarded else {}
    stored = w.where_many(name, [i for a in accepted for i in a[2:]])
    for v, shard, orm_id, core_id in accepted:
        for row_id in (orm_id, core_id):
            assert stored[row_id] == [shard], (name, v, "stored on another shard than routed")
            if units:
                assert units[row_id] == _python_unit(w, name, v), (
                    name, v, "the shard's SQL puts the stored row in another bucket or slice than Python")
    # reads
    others = [a[0] for a in accepted]
    for n, (v, shard, orm_id, core_id) in enumerate(accepted):
        w2 = others[(n + 1) % len(others)]
        pk = (orm_id, v) if not isinstance(v, tuple) else (orm_id, *v)
        with w.Session() as s:
            got = s.get(cls, pk)
        want = []
        for eng in w.direct.values():   # a plain Session's get() on one database
            with Session(eng) as plain:
                found = plain.get(cls, pk)
                want += [] if found is None else [found.id]
        assert ([got.id] if got is not None else []) == want, (name, v, "session.get")
        stmts = [("==", select(t.c.id).where(_eq(t, v)))]
        if len(_key_cols(t)) == 1:
            # (an int first types the whole list INTEGER, a float FLOAT: both are read as
            # PostgreSQL casts and compares them)
            stmts.append(("in", select(t.c.id).where(t.c.k.in_([v, w2]))))
            if name in RANGE_TABLES:
                stmts.append(("between", select(t.c.id).where(t.c.k.between(v, w2))))
                stmts.append(("between", select(t.c.id).where(t.c.k.between(w2, v))))
        for what, stmt in stmts:
            try:
                want = w.one_database(stmt)
            except DBAPIError:   # (e.g. 2147483648.0 cast to integer): an error on every database
                with w.Session() as s, pytest.raises(Exception):
                    s.execute(stmt).all()
                continue
            with w.Session() as s:
                got = sorted(s.execute(stmt).scalars().all())
            assert got == want, (name, v, w2, what)


class _Near:
    """A value of a neighbouring type, which the router may refuse."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"near({self.value!r})"


def _report_ok(w: World) -> None:
    report = verify(w.cluster)
    assert report.ok, report.render()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_key_values_land_where_the_guard_reads_and_verify_look(world, name):
    """Every generated value of the table's key type is placed, guarded, found and verified
    alike (see the module's docstring)."""
    good, near = VALUES[name]
    batch = st.lists(good, min_size=1, max_size=5)
    if near is not None:
        batch = st.tuples(batch, st.lists(near, max_size=3)).map(lambda p: p[0] + [_Near(x) for x in p[1]])

    @settings(max_examples=10, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch)
    def run(values):
        refusable = {i for i, v in enumerate(values) if isinstance(v, _Near)}
        plain = [v.value if i in refusable else v for i, v in enumerate(values)]
        check_values(world, name, plain, refusable)

    run()
    _report_ok(world)


# -- what the fuzzer found, minimised ------------------------------------------------------------


def test_a_varchar_key_with_blanks_past_its_length_is_placed_as_stored(world):
    """PostgreSQL stores a ``varchar(n)`` value whose characters past n are all blanks cut
    to n, with no error: ``'000000 '`` in a ``varchar(6)`` is ``'000000'``.  The router
    hashed the value given, the guard (and verify, and the mover) the value stored: the ORM
    flush and the Core insert were refused with NotOwned ("the shard map has changed: refresh
    it and retry"), which no retry cures; without the guard the row would have been stored
    where no read by its key looks.  The key is read as stored, as a ``char(n)`` key is."""
    t, cls = TABLES["kf_h_varchar"], CLASSES["kf_h_varchar"]
    key, stored = "000000 ", "000000"
    assert world.cluster.shard_for(t, key) == world.cluster.shard_for(t, stored)
    orm_id, core_id = next(world.ids), next(world.ids)
    with world.Session() as s:
        obj = cls()
        obj.id, obj.k = orm_id, key
        s.add(obj)
        s.commit()
    with world.Session() as s:
        s.execute(insert(t), [{"id": core_id, "k": key}, {"id": next(world.ids), "k": "ab" + " " * 9}])
        s.commit()
    owner = world.cluster.shard_for(t, stored)
    assert world.where("kf_h_varchar", orm_id) == world.where("kf_h_varchar", core_id) == [owner]
    with world.Session() as s:
        assert {orm_id, core_id} <= set(s.execute(select(t.c.id).where(t.c.k == stored)).scalars())
        assert s.get(cls, (orm_id, stored)) is not None
        # A read by the longer value finds nothing, as on one database (varchar = varchar
        # compares the blanks), wherever it is sent.
        assert s.execute(select(t.c.id).where(t.c.k == key)).all() == []
        assert s.get(cls, (core_id, key)) is None
    _report_ok(world)


def test_a_float_key_of_an_unscaled_numeric_column_is_placed_as_postgresql_stores_it(world):
    """psycopg sends a float as a float8, which PostgreSQL stores in an unscaled NUMERIC at 15
    significant digits: 2.9999999999999996 (below the range bound 3: s1) is stored as 3 (s2).
    A comparison with a float (also get()'s) is in float8, where only a stored
    2.9999999999999996 is equal (on s1): reads route by the float as it is."""
    t, cls = TABLES["kf_r_numu"], CLASSES["kf_r_numu"]
    v = 2.9999999999999996
    core_id, orm_id, exact_id = next(world.ids), next(world.ids), next(world.ids)
    with world.Session() as s:
        s.execute(insert(t).values(id=core_id, k=v))
        obj = cls()
        obj.id, obj.k = orm_id, v
        s.add(obj)
        s.execute(insert(t).values(id=exact_id, k=Decimal(repr(v))))
        s.commit()
    assert world.where("kf_r_numu", core_id) == world.where("kf_r_numu", orm_id) == ["s2"]
    assert world.where("kf_r_numu", exact_id) == ["s1"]
    assert world.cluster.shard_for(t, v) == "s2"
    for pk, found in (((core_id, v), False), ((exact_id, v), True), ((core_id, Decimal(3)), True)):
        want = []
        for eng in world.direct.values():   # a plain Session's get() on one database
            with Session(eng) as plain:
                want += [] if plain.get(cls, pk) is None else [pk[0]]
        assert want == ([pk[0]] if found else []), pk
        with world.Session() as s:
            assert getattr(s.get(cls, pk), "id", None) == (pk[0] if found else None), pk
    for stmt in (select(t.c.id).where(t.c.k == v), select(t.c.id).where(t.c.k.in_([v, 5.5])),
                 select(t.c.id).where(t.c.k.between(v, v)),
                 select(t.c.id).where(t.c.k.in_([Decimal(1), v])),      # typed NUMERIC: 3
                 select(t.c.id).where(t.c.k.in_([1, v]))):              # typed INTEGER: 3
        want = world.one_database(stmt)
        assert want, stmt
        with world.Session() as s:
            assert sorted(s.execute(stmt).scalars()) == want, stmt


def test_an_in_list_typed_integer_by_its_first_value_is_routed_as_postgresql_casts_it(world):
    t = TABLES["kf_l_num"]
    row_id = next(world.ids)
    with world.Session() as s:
        s.execute(insert(t).values(id=row_id, k=Decimal("100")))
        s.commit()
    assert world.where("kf_l_num", row_id) == ["s0"]
    stmt = select(t.c.id).where(t.c.id == row_id, t.c.k.in_([3, Decimal("99.6")]))
    assert world.one_database(stmt) == [row_id]
    with world.Session() as s:
        assert s.execute(stmt).scalars().all() == [row_id]
    # Each value is cast as PostgreSQL casts it to integer: numeric half away from zero,
    # float8 half to even; a float list is typed by its first value as well.
    for values, found in (([3, Decimal("100.4")], True), ([3, Decimal("99.5")], True),
                          ([3, Decimal("100.5")], False), ([3, 99.5], True), ([3, 100.5], True),
                          ([3, 100.6], False), ([3.0, Decimal("99.6")], False)):
        stmt = select(t.c.id).where(t.c.id == row_id, t.c.k.in_(values))
        want = [row_id] if found else []
        assert world.one_database(stmt) == want, values
        with world.Session() as s:
            assert s.execute(stmt).scalars().all() == want, values
    stmt = select(t.c.id).where(t.c.id == row_id, t.c.k == bindparam("v", type_=Integer))
    for v in (Decimal("99.6"), 99.6, 100):
        assert world.one_database(stmt, {"v": v}) == [row_id], v
        with world.Session() as s:
            assert s.execute(stmt, {"v": v}).scalars().all() == [row_id], v
