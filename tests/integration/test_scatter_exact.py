"""Exactness checks for cross-shard (key-less) reads.

The promise (README, "Cross-shard reads: parallel, merged exactly"): a read without
the shard key returns EXACTLY what one database holding all rows would return, or
raises ``shardkit.ScatterRefused`` naming the construct; never a silently different
answer.

Every statement here runs twice: through a ``ShardedSession`` on this module's own
3-shard cluster (no replicas), and on ONE plain database (``hx_oracle``, created on
shard s0's server) holding the same rows.  Results are compared value by value, with
types and exact digits (1.50 != 1.5, 1 != 1.0 != True), in order where ORDER BY
determines it (a unique tiebreak) and as multisets otherwise.

Complements test_scatter.py, test_scatter_edges.py and test_scatter_load.py:
parameters bound at execution time, comparisons of numeric aggregates with floats,
EXISTS over subqueries that are not per-row filters, subqueries in GROUP BY, result
types that convert values (asdecimal=False, TypeDecorator), column-level collations,
char(n) and time with time zone ordering, and a broad property test.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from own_tables import truncate_everywhere
from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Text,
    Time,
    TypeDecorator,
    Uuid,
    bindparam,
    case,
    create_engine,
    exists,
    func,
    insert,
    inspect,
    literal,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Session,
    aliased,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = dt.timezone.utc


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


class HBase(DeclarativeBase):
    pass


class Priority(TypeDecorator):
    """A small integer in the database (1 < 2 < 3), a label in Python."""

    impl = SmallInteger
    cache_ok = True
    names = {1: "low", 2: "medium", 3: "high"}
    codes = {v: k for k, v in names.items()}

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else self.codes[value]

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else self.names[value]


class Size(enum.IntEnum):
    SMALL = 1
    MEDIUM = 2
    LARGE = 3


class HItem(HBase):
    __tablename__ = "hx_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    big = mapped_column(BigInteger)
    name = mapped_column(Text)
    code = mapped_column(CHAR(3))
    label = mapped_column(String(20, collation="und-x-icu"))
    amt = mapped_column(Numeric(12, 2))
    famt = mapped_column(Numeric(12, 2, asdecimal=False))
    ts = mapped_column(DateTime(timezone=True))
    d = mapped_column(Date)
    tt = mapped_column(Time(timezone=True))
    flag = mapped_column(Boolean)
    u = mapped_column(Uuid)
    prio = mapped_column(Priority)
    size = mapped_column(Enum(Size, native_enum=False, length=10))
    cc = mapped_column(String(2))
    lines = relationship("HLine", back_populates="item", order_by="HLine.no")


class HLine(HBase):
    """Colocated with hx_items (sharded by item_id)."""

    __tablename__ = "hx_lines"
    item_id = mapped_column(ForeignKey("hx_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)
    item = relationship(HItem, back_populates="lines")


class HRef(HBase):
    """A reference table: a full copy on every shard."""

    __tablename__ = "hx_ref"
    cc = mapped_column(String(2), primary_key=True)
    region = mapped_column(Text)


I, L, R = HItem, HLine, HRef
ITEM_COLS = [c.key for c in HItem.__table__.columns]
LINE_COLS = [c.key for c in HLine.__table__.columns]
GROUPS = {
    "groups": {"hx": {"strategy": "hash", "tables": {"hx_items": "id", "hx_lines": "item_id"}}},
    "reference_tables": ["hx_ref"],
}


# ---------------------------------------------------------------------------
# Fixture and comparison helpers
# ---------------------------------------------------------------------------


@dataclass
class Hx:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine

    def ids_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for("hx_items", k) == shard:
                out.append(k)
            k += 1
        return out

    def place(self, values: Sequence[dict[str, Any]], shards: Sequence[int] | None = None,
              start: int = 1) -> list[dict[str, Any]]:
        """Rows ``values[i]`` on shard ``s{shards[i]}`` (default ``i % 3``), ids ascending
        within each shard in the order given."""
        names = self.cluster.shard_names
        where = [i % len(names) for i in range(len(values))] if shards is None else list(shards)
        ids = {s: iter(self.ids_on(names[s], where.count(s), start)) for s in set(where)}
        return [{"id": next(ids[s]), **v} for s, v in zip(where, values)]

    def load(self, items: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]] = (),
             refs: Sequence[dict[str, Any]] = ()) -> None:
        """Replace every row of every table, on the shards and in the oracle."""
        items = [{c: r.get(c) for c in ITEM_COLS} for r in items]
        lines = [{c: r.get(c) for c in LINE_COLS} for r in lines]
        truncate_everywhere(self.cluster, "hx_items", "hx_lines", "hx_ref")
        with self.oracle.begin() as c:
            c.execute(text("TRUNCATE hx_items, hx_lines, hx_ref"))
            for table, rows in ((HItem.__table__, items), (HLine.__table__, lines),
                                (HRef.__table__, refs)):
                if rows:
                    c.execute(insert(table), list(rows))
        with self.Session() as s:
            for model, rows in ((HItem, items), (HLine, lines), (HRef, refs)):
                if rows:
                    s.execute(insert(model), list(rows))
            s.commit()


@pytest.fixture(scope="module")
def hx(shardkit_module_cluster_factory) -> Iterator[Hx]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=HBase.metadata)
    assert cluster.shard_names == ("s0", "s1", "s2")
    for s in cluster.shard_names:
        HBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS hx_oracle"))
        c.execute(text("CREATE DATABASE hx_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="hx_oracle"))
    HBase.metadata.create_all(oracle)
    yield Hx(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    oracle.dispose()
    cluster.dispose()


def exact(v: Any) -> Any:
    """A value with its type and exact digits (1.50 != 1.5, 1 != 1.0 != True)."""
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (dt.time, dt.datetime)):
        return (type(v).__name__, v.isoformat())
    if isinstance(v, HBase):
        return (type(v).__name__,) + tuple(exact(getattr(v, a.key))
                                           for a in inspect(v).mapper.column_attrs)
    return (type(v).__name__, v)


def norm(rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(exact(v) for v in r) for r in rows]


def run_oracle(hx: Hx, stmt: Any, params: Any = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    with Session(hx.oracle) as s:
        r = s.execute(stmt, params)
        return list(r.keys()), norm(r.all())


def run_sharded(hx: Hx, stmt: Any, params: Any = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    with hx.Session() as s:
        r = s.execute(stmt, params)
        return list(r.keys()), norm(r.all())


def _plain(rows: Sequence[tuple[Any, ...]]) -> str:
    text_ = repr([tuple(v[1] if v[0] != "float" else float.fromhex(v[1]) if v[1] != "nan" else v[1]
                        for v in r) for r in rows])
    return text_ if len(text_) < 700 else text_[:700] + "..."


def check(hx: Hx, stmt: Any, params: Any = None, *, ordered: bool = True) -> list[tuple[Any, ...]]:
    """Same column names and rows (in order if ``ordered``) as the one database."""
    want_keys, want = run_oracle(hx, stmt, params)
    got_keys, got = run_sharded(hx, stmt, params)
    assert got_keys == want_keys
    msg = f"\nsharded:      {_plain(got)}\none database: {_plain(want)}"
    if ordered:
        assert got == want, msg
    else:
        assert Counter(got) == Counter(want), msg
    return want


def check_or_refused(hx: Hx, stmt: Any, params: Any = None, *, ordered: bool = True) -> str | None:
    """The one database's answer, or ScatterRefused naming a construct; nothing else."""
    try:
        run_sharded(hx, stmt, params)
    except shardkit.ScatterRefused as e:
        assert e.construct, "ScatterRefused must name the construct"
        return e.construct
    check(hx, stmt, params, ordered=ordered)
    return None


def base_items(hx: Hx, n: int = 45) -> list[dict[str, Any]]:
    """A mixed data set, every shard holding rows, NULLs in every column."""
    names = [None, "", "a", "B", "b", "\u00e9t\u00e9", "Zz", "a b", "\u00c5"]
    out = []
    for i in range(n):
        out.append({
            "grp": None if i % 7 == 3 else i % 4,
            "qty": None if i % 5 == 2 else (i * 37) % 23 - 11,
            "big": None if i % 6 == 1 else (2**62 if i % 3 else -(2**61)) + i,
            "name": names[i % len(names)],
            "amt": None if i % 8 == 5 else D((i * 53) % 997) / 100,
            "ts": dt.datetime(2024, 3, 1, tzinfo=UTC) + dt.timedelta(hours=13 * i, seconds=i),
            "d": None if i % 9 == 4 else dt.date(2024, 1, 1) + dt.timedelta(days=(i * 5) % 17),
            "flag": None if i % 4 == 1 else bool(i % 3),
            "u": uuid.UUID(int=(i * 2654435761) % 2**128),
            "cc": ["de", "fr", "us", None][i % 4],
        })
    return hx.place(out)


# ---------------------------------------------------------------------------
# HAVING with parameters and floats
# ---------------------------------------------------------------------------


def test_having_with_a_parameter_bound_at_execution_time(hx):
    """``HAVING count(*) > :n`` with n given to execute(): the merged HAVING must compare
    with that n (one database returns the groups with more than 3 rows)."""
    hx.load(base_items(hx))
    stmt = (select(I.grp, func.count()).group_by(I.grp)
            .having(func.count() > bindparam("n", type_=Integer)).order_by(I.grp))
    assert run_oracle(hx, stmt, {"n": 3})[1], "the oracle must return groups for this to test anything"
    check_or_refused(hx, stmt, {"n": 3})


def test_having_compares_a_numeric_aggregate_with_a_float(hx):
    """``HAVING sum(amt) >= 0.1``: PostgreSQL compares numeric with double precision by
    casting the numeric to double (0.10 -> 0.1, equal); the merge must not compare the
    Decimal with the float's exact binary value (0.1000000000000000055...)."""
    rows = hx.place([{"grp": 1, "amt": D("0.04")}, {"grp": 1, "amt": D("0.06")},
                     {"grp": 2, "amt": D("0.05")}, {"grp": 3, "amt": D("0.30")}])
    hx.load(rows)
    stmt = (select(I.grp, func.sum(I.amt)).group_by(I.grp)
            .having(func.sum(I.amt) >= 0.1).order_by(I.grp))
    assert len(run_oracle(hx, stmt)[1]) == 2
    check_or_refused(hx, stmt)


# ---------------------------------------------------------------------------
# SELECT EXISTS (subquery that is more than a filter)
# ---------------------------------------------------------------------------


def test_exists_over_a_subquery_with_offset(hx):
    """``SELECT EXISTS (SELECT id FROM items OFFSET 4)``: true on one database holding 6
    rows; no shard holds more than 4, so "true on any shard" is false."""
    hx.load(hx.place([{"qty": i} for i in range(6)]))
    stmt = select(exists(select(I.id).offset(4)))
    assert run_oracle(hx, stmt)[1] == [(("bool", True),)]
    check_or_refused(hx, stmt)


def test_exists_over_a_grouped_subquery_with_having(hx):
    """``SELECT EXISTS (SELECT grp FROM items GROUP BY grp HAVING count(*) > 2)``: grp 1
    has 3 rows, one per shard."""
    hx.load(hx.place([{"grp": 1}, {"grp": 1}, {"grp": 1}, {"grp": 2}, {"grp": 3}]))
    stmt = select(exists(select(I.grp).group_by(I.grp).having(func.count() > 2)))
    assert run_oracle(hx, stmt)[1] == [(("bool", True),)]
    check_or_refused(hx, stmt)


# ---------------------------------------------------------------------------
# Subqueries the colocation check must see
# ---------------------------------------------------------------------------


def test_group_by_an_uncorrelated_scalar_subquery(hx):
    """``SELECT count(*) ... GROUP BY qty > (SELECT avg(qty) FROM items)``: each shard
    would compare with its own average."""
    # global avg 172.7: one row above it; per shard (avg 2, 15, 1000): 3 and 20 are "above"
    hx.load(hx.place([{"qty": q} for q in (1, 2, 3, 10, 20, 1000)], shards=[0, 0, 0, 1, 1, 2]))
    i2 = aliased(HItem)
    above = I.qty > select(func.avg(i2.qty)).scalar_subquery()
    stmt = select(func.count()).select_from(I).group_by(above).order_by(func.count())
    check_or_refused(hx, stmt)


def test_correlated_and_reference_subqueries_are_exact(hx):
    """Scalar subqueries correlated on the shard key, EXISTS / NOT EXISTS / IN over a
    reference table, and an uncorrelated subquery over a sharded table (refused)."""
    items = base_items(hx, 30)
    lines = [{"item_id": r["id"], "no": j, "qty": (r["id"] * j) % 7, "name": f"l{j}"}
             for r in items for j in range(r["id"] % 3)]
    refs = [{"cc": "de", "region": "eu"}, {"cc": "fr", "region": "eu"}, {"cc": "jp", "region": "asia"}]
    hx.load(items, lines, refs)
    n_lines = select(func.count()).where(L.item_id == I.id).scalar_subquery()
    check(hx, select(I.id, n_lines.label("n")).order_by(n_lines.desc(), I.id).limit(12).offset(3))
    eu = select(R.cc).where(R.region == "eu")
    check(hx, select(I.id, I.cc).where(I.cc.in_(eu)).order_by(I.id))
    check(hx, select(I.id).where(~exists(select(R.cc).where(R.cc == I.cc))).order_by(I.id.desc()))
    region = select(R.region).where(R.cc == I.cc).scalar_subquery()
    check(hx, select(region.label("region"), func.count()).select_from(I).group_by(region)
          .order_by(region.nulls_first()))
    check(hx, select(I.id).where(exists(select(L.no).where(L.item_id == I.id, L.qty > 3)))
          .order_by(I.id))
    i2 = aliased(HItem)
    assert check_or_refused(hx, select(I.id).where(I.qty > select(func.avg(i2.qty)).scalar_subquery())
                            .order_by(I.id)) is not None


# ---------------------------------------------------------------------------
# Result types that convert values
# ---------------------------------------------------------------------------


def test_sum_and_avg_of_numeric_returned_as_float(hx):
    """Numeric(asdecimal=False): PostgreSQL sums/averages exactly in numeric and the
    driver converts the one result to float; partial floats added in Python round
    differently (0.1 + 0.2 != 0.3)."""
    hx.load(hx.place([{"grp": 1, "famt": 0.1}, {"grp": 1, "famt": 0.2}, {"grp": 2, "famt": 0.7},
                      {"grp": 2, "famt": 0.1}, {"grp": 2, "famt": 0.2}, {"grp": 1, "famt": 1.1}]))
    check_or_refused(hx, select(func.sum(I.famt), func.avg(I.famt)))
    check_or_refused(hx, select(I.grp, func.sum(I.famt), func.avg(I.famt)).group_by(I.grp)
                     .order_by(I.grp))


def test_order_by_a_type_decorator_follows_the_database_order(hx):
    """A TypeDecorator stores 1/2/3 and returns 'low'/'medium'/'high': the database
    sorts by the stored integer; a merge of the returned labels would sort
    alphabetically (high < low < medium)."""
    prios = ["low", "high", "medium", "medium", "low", "high", "high", "medium", "low"]
    hx.load(hx.place([{"prio": p} for p in prios]))
    check_or_refused(hx, select(I.id, I.prio).order_by(I.prio, I.id))
    check_or_refused(hx, select(func.min(I.prio), func.max(I.prio)))


def test_order_by_a_non_native_enum_of_an_int_enum(hx):
    """``Enum(IntEnum, native_enum=False)`` stores the member names as varchar: the
    database sorts LARGE < MEDIUM < SMALL; the members compare as ints in Python
    (SMALL < MEDIUM < LARGE)."""
    sizes = [Size.SMALL, Size.LARGE, Size.MEDIUM, Size.LARGE, Size.SMALL, Size.MEDIUM]
    hx.load(hx.place([{"size": v} for v in sizes]))
    check_or_refused(hx, select(I.id, I.size).order_by(I.size, I.id))


def test_order_by_a_column_declared_with_a_collation(hx):
    """``String(collation="und-x-icu")`` on the column: the database sorts a < B < c;
    code point order is B < a < c.  That is an explicit non-C collation (README):
    exact or refused."""
    hx.load(hx.place([{"label": v} for v in ("c", "a", "B", "b", "A", "C")]))
    check_or_refused(hx, select(I.id, I.label).order_by(I.label, I.id))
    check_or_refused(hx, select(func.min(I.label), func.max(I.label)))


def test_order_by_char_n_ignores_trailing_blanks(hx):
    """char(3) compares without its trailing blanks: 'a' < 'a\\t'.  The driver returns the
    blank-padded strings ('a  ', 'a\\t '), whose Python order is the reverse."""
    hx.load(hx.place([{"code": "a"}, {"code": "a\t"}, {"code": "b"}], shards=[1, 0, 2]))
    check_or_refused(hx, select(I.id, I.code).order_by(I.code, I.id))
    check_or_refused(hx, select(func.min(I.code), func.max(I.code)))


def test_order_by_time_with_time_zone(hx):
    """timetz: equal instants in different zones are different values, ordered by zone
    (PostgreSQL's timetz_cmp); '13:00+01' < '12:00+00' < '11:00-01'."""
    tz = lambda h: dt.timezone(dt.timedelta(hours=h))  # noqa: E731
    vals = [dt.time(11, 0, tzinfo=tz(-1)), dt.time(12, 0, tzinfo=tz(0)), dt.time(13, 0, tzinfo=tz(1)),
            dt.time(9, 30, tzinfo=tz(0))]
    hx.load(hx.place([{"tt": v} for v in vals], shards=[0, 1, 2, 1]))
    check_or_refused(hx, select(I.id, I.tt).order_by(I.tt, I.id))


def test_user_defined_aggregate(hx):
    """``CREATE AGGREGATE hx_total(int)``: one row over all rows on one database; each
    shard returning its own row would give three."""
    ddl = ("CREATE OR REPLACE AGGREGATE hx_total(int) "
           "(sfunc = int4pl, stype = int4, initcond = '0')")
    for eng in [hx.cluster.primary(s) for s in hx.cluster.shard_names] + [hx.oracle]:
        with eng.begin() as c:
            c.execute(text(ddl))
    hx.load(hx.place([{"qty": q} for q in range(1, 7)]))
    check_or_refused(hx, select(func.hx_total(I.qty)))


def test_having_compares_a_date_aggregate_with_a_string(hx):
    """``HAVING max(d) > '2024-01-07'``: the database casts the string to a date; the
    merge must do the same or refuse, not crash with a Python TypeError."""
    hx.load(hx.place([{"grp": i % 2, "d": dt.date(2024, 1, 1 + i)} for i in range(8)]))
    check_or_refused(hx, select(I.grp, func.max(I.d)).group_by(I.grp)
                     .having(func.max(I.d) > "2024-01-07").order_by(I.grp))


# ---------------------------------------------------------------------------
# Ordinary constructs that must be exact (broad coverage)
# ---------------------------------------------------------------------------


def test_order_by_nulls_expressions_labels_and_joined_columns(hx):
    items = base_items(hx)
    lines = [{"item_id": r["id"], "no": j, "qty": (r["id"] + j) % 5 if j else None, "name": r["name"]}
             for r in items for j in range(r["id"] % 3)]
    hx.load(items, lines)
    for terms in [(I.qty.desc().nulls_first(),), (I.qty.nulls_first(),), (I.qty.desc().nulls_last(),),
                  (I.name.desc(), I.qty.nulls_last()), (I.flag.desc(), I.d.nulls_first()),
                  (I.u.desc(),), (I.ts.desc(),), (I.big,), (I.amt.desc().nulls_last(),)]:
        check(hx, select(I.id, I.qty, I.name).order_by(*terms, I.id).limit(11).offset(4))
    expr = (func.coalesce(I.qty, 0) * 3 - I.id % 5).label("score")
    check(hx, select(I.id, expr).order_by(expr.desc(), I.id).limit(9))
    check(hx, select(I.id).order_by(func.lower(I.name).nulls_first(), I.id.desc()).limit(13))
    check(hx, select(I.id, I.name, L.name, L.no).join(L, L.item_id == I.id)
          .order_by(L.qty.desc().nulls_first(), L.name, I.id, L.no).limit(10).offset(1))
    check(hx, select(I.id).join(L, L.item_id == I.id).order_by(L.qty.nulls_first(), I.id, L.no).limit(0))
    check(hx, select(I.id).order_by(I.id).offset(1000))
    check(hx, select(I.id, literal("x").label("k"), literal(7)).order_by(I.id.desc()).limit(3))
    check(hx, select(I.name, I.qty).distinct().order_by(I.name.nulls_first(), I.qty.desc()).limit(8).offset(2))
    check(hx, select(func.lower(I.name)).distinct().order_by(func.lower(I.name).desc()))


def test_aggregates_and_groups_over_many_types(hx):
    items = base_items(hx)
    hx.load(items)
    check(hx, select(func.count(), func.count(I.qty), func.sum(I.qty), func.avg(I.qty), func.sum(I.big),
                     func.avg(I.big), func.min(I.name), func.max(I.name), func.min(I.ts), func.max(I.d),
                     func.sum(I.amt), func.avg(I.amt), func.min(I.amt)))
    check(hx, select(func.sum(I.qty), func.avg(I.amt), func.count(I.qty)).where(I.qty > 10**6))
    check(hx, select(func.count()).select_from(I).where(I.qty > 10**6).limit(0))
    check(hx, select(func.count()).select_from(I).offset(1))
    day = func.date_trunc("day", I.ts)
    check(hx, select(day.label("day"), func.count(), func.sum(I.amt)).group_by(day)
          .order_by(day.desc()).limit(5))
    low = func.lower(I.name)
    check(hx, select(low, func.count(), func.min(I.id)).group_by(low).order_by(low.nulls_first()))
    co = func.coalesce(I.grp, -1)
    check(hx, select(co, func.max(I.amt)).group_by(co).having(func.min(I.qty) < 0)
          .order_by(func.max(I.amt).desc().nulls_last(), co))
    bucket = case((I.qty < 0, "neg"), (I.qty == 0, "zero"), else_="pos")
    check(hx, select(bucket, func.count(I.qty), func.avg(I.qty)).group_by(bucket).order_by(bucket))
    check(hx, select(I.grp, I.flag, func.count()).group_by(I.grp, I.flag)
          .having(or_(func.count() > 3, func.sum(I.qty) < 0))
          .order_by(I.grp.nulls_first(), I.flag.nulls_first()))
    check(hx, select(I.grp, func.count()).group_by(I.grp)
          .having(not_(func.max(I.d) > dt.date(2024, 1, 15))).order_by(func.count().desc(), I.grp))
    check(hx, select(I.cc, func.count(), func.sum(I.amt)).group_by(I.cc)
          .order_by(I.cc.desc().nulls_last()).limit(2).offset(1))
    check(hx, select(func.count()).select_from(I).group_by(I.grp), ordered=False)


def test_unmergeable_constructs_are_refused(hx):
    hx.load(base_items(hx, 12))
    for stmt in [
        select(func.count(I.qty.distinct())),
        select(func.bool_and(I.flag)),
        select(func.array_agg(I.qty)),
        select(func.count(I.qty.distinct()).filter(I.qty > 0)),
        select(I.id, func.row_number().over(order_by=I.id)),
        select(func.sum(I.qty) * 2),
        select(I.grp, func.count()).group_by(I.grp).having(func.count(I.qty.distinct()) > 1),
    ]:
        assert check_or_refused(hx, stmt, ordered=False) is not None, str(stmt)


def test_orm_entities_eager_loads_and_legacy_query(hx):
    items = base_items(hx, 30)
    lines = [{"item_id": r["id"], "no": j, "qty": j, "name": f"n{j}"}
             for r in items for j in range(r["id"] % 4)]
    hx.load(items, lines)

    def snap(objs: Sequence[HItem]) -> list[tuple[Any, ...]]:
        return [(o.id, o.qty, tuple((ln.no, ln.qty) for ln in o.lines)) for o in objs]

    q = select(HItem).order_by(HItem.qty.desc().nulls_last(), HItem.id).limit(7).offset(3)
    with Session(hx.oracle) as s:
        want_sel = snap(s.scalars(q.options(selectinload(HItem.lines))).all())
        want_join = snap(s.scalars(q.options(joinedload(HItem.lines))).unique().all())
        want_count = s.query(HItem).filter(HItem.qty > 0).count()
        want_distinct = s.query(HItem.grp).distinct().order_by(HItem.grp.nulls_first()).all()
        want_group = s.query(HItem.grp, func.count()).group_by(HItem.grp).order_by(HItem.grp).all()
        want_many = snap(s.scalars(select(HItem).join(HItem.lines).where(HLine.no == 2)
                                   .order_by(HItem.id.desc()).limit(4)).all())
    with hx.Session() as s:
        assert snap(s.scalars(q.options(selectinload(HItem.lines))).all()) == want_sel
        assert snap(s.scalars(q.options(joinedload(HItem.lines))).unique().all()) == want_join
        assert s.query(HItem).filter(HItem.qty > 0).count() == want_count
        assert s.query(HItem.grp).distinct().order_by(HItem.grp.nulls_first()).all() == want_distinct
        assert s.query(HItem.grp, func.count()).group_by(HItem.grp).order_by(HItem.grp).all() == want_group
        assert snap(s.scalars(select(HItem).join(HItem.lines).where(HLine.no == 2)
                              .order_by(HItem.id.desc()).limit(4)).all()) == want_many


# ---------------------------------------------------------------------------
# Property: random data, random ordered pages and grouped aggregates
# ---------------------------------------------------------------------------

row_st = st.fixed_dictionaries({
    "grp": st.one_of(st.none(), st.integers(0, 3)),
    "qty": st.one_of(st.none(), st.integers(-3, 3), st.integers(-2**31, 2**31 - 1)),
    "name": st.one_of(st.none(), st.sampled_from(["", "a", "A", "b", "\u00e9", "\u00e9a", "Z"])),
    "amt": st.one_of(st.none(), st.decimals(min_value=-1000, max_value=1000, places=2,
                                            allow_nan=False)),
    "flag": st.one_of(st.none(), st.booleans()),
})


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(row_st, min_size=0, max_size=14),
       shards=st.lists(st.integers(0, 2), min_size=14, max_size=14),
       key=st.sampled_from(["grp", "name", "flag"]),
       desc=st.booleans(), nulls=st.sampled_from([None, "first", "last"]),
       limit=st.one_of(st.none(), st.integers(0, 6)), offset=st.integers(0, 5),
       threshold=st.integers(0, 3))
def test_property_pages_and_groups(hx, rows, shards, key, desc, nulls, limit, offset, threshold):
    hx.load(hx.place(rows, shards[: len(rows)]))
    col = getattr(I, key)
    term = col.desc() if desc else col.asc()
    if nulls == "first":
        term = term.nulls_first()
    elif nulls == "last":
        term = term.nulls_last()
    page = select(I.id, col, I.amt).order_by(term, I.amt.desc(), I.id).offset(offset)
    if limit is not None:
        page = page.limit(limit)
    check(hx, page)
    grouped = (select(col, func.count(), func.sum(I.amt), func.avg(I.amt), func.avg(I.qty),
                      func.sum(I.qty), func.min(I.amt))
               .group_by(col).having(func.count(I.qty) >= threshold).order_by(term).offset(offset))
    if limit is not None:
        grouped = grouped.limit(limit)
    check(hx, grouped)
    check(hx, select(func.count(), func.sum(I.qty), func.avg(I.amt), func.max(I.name)))
