"""Cross-shard (key-less) SELECTs of the constructs an analyst reaches for
(CTEs, compounds, window functions, DISTINCT ON, FETCH ... WITH TIES, ORDER BY forms,
LIMIT 0 / OFFSET past the end, scalar and EXISTS subqueries, FILTER, empty tables,
bool/string/array/ordered-set aggregates, ROLLUP/CUBE/GROUPING SETS, GROUP BY
expressions, HAVING on unselected aggregates, selectinload + unique()), each compared
with ONE plain database holding every row (``own_tables.one_database``): the same rows,
or ``ScatterRefused`` naming the construct. Never a silently different answer.

Defects found (each test of the first three sections failed before the fix):

* a ``postgresql.INTERVAL`` column (reflection's and autogenerate's type) is not a
  ``sqltypes.Interval``: ORDER BY, min/max, HAVING, GROUP BY, DISTINCT and UNION over it
  were merged in Python (a year: 365 days to psycopg, 360 to PostgreSQL);
* LIMIT/OFFSET given as bound parameters used the parameter's default, not the value
  given at execution (``execute(stmt, {"n": 5})``, ``.params(n=5)``, ``Query.params``);
* a type given per dialect (``with_variant(..., "postgresql")``: an ICU collation,
  citext) was judged by its generic type: ordered or grouped in Python.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import cluster_with_tables, keys_per_shard, one_database, take_turns, truncate_everywhere
from test_scatter import _distinct_on
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    Numeric,
    Text,
    bindparam,
    desc,
    except_,
    exists,
    func,
    insert,
    intersect,
    literal,
    literal_column,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship, selectinload, sessionmaker

import shardkit
from shardkit._scatter import plan_scatter

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = dt.timezone.utc


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sc7_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    amt = mapped_column(Numeric(10, 2))
    name = mapped_column(Text)
    flag = mapped_column(Boolean)
    ts = mapped_column(DateTime(timezone=True))
    iv = mapped_column(postgresql.INTERVAL)
    # A portable model's text column, under an ICU collation on PostgreSQL
    label = mapped_column(Text().with_variant(Text(collation="und-x-icu"), "postgresql"))
    lines = relationship("Line", order_by="Line.no")


class Line(Base):
    __tablename__ = "sc7_lines"
    item_id = mapped_column(ForeignKey("sc7_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


class Empty(Base):
    __tablename__ = "sc7_empty"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


CONFIG = {"groups": {"sc7": {"strategy": "hash", "tables": {
    "sc7_items": "id", "sc7_lines": "item_id", "sc7_empty": "id"}}}}

I, L, E = Item, Line, Empty


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


def _rows(cluster: shardkit.Cluster) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """6 items on each shard, taken in turn; NULLs in every column; intervals that Python
    (a year as 365 days) and PostgreSQL (360) order differently."""
    ids = take_turns(keys_per_shard(cluster, "sc7_items", 6))
    names = [None, "b", "A", "a", "Zed", "", "b", "c"]
    ivs = [dt.timedelta(days=361), "1 year", None, dt.timedelta(days=365), "1 mon", dt.timedelta(days=2)]
    labels = ["a", "B", "A", "b", None]
    items, lines = [], []
    for i, k in enumerate(ids):
        items.append({"id": k, "grp": None if i % 7 == 3 else i % 3, "qty": None if i % 5 == 2 else (i * 7) % 11 - 4,
                      "amt": None if i % 6 == 1 else D((i * 1237) % 9999) / 100, "name": names[i % 8],
                      "flag": None if i % 4 == 1 else bool(i % 3),
                      "ts": dt.datetime(2024, 1 + i % 3, 1 + i % 5, i % 24, tzinfo=UTC),
                      "iv": ivs[i % 6], "label": labels[i % 5]})
        lines.extend({"item_id": k, "no": no, "qty": (i + no) % 4} for no in range(i % 3))
    return items, lines


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as cluster:
        oracle = one_database(sharded_dev, "sc7_oracle", Base.metadata)
        items, lines = _rows(cluster)
        truncate_everywhere(cluster, "sc7_lines", "sc7_items", "sc7_empty")
        with oracle.begin() as c:
            c.execute(insert(Item.__table__), items)
            c.execute(insert(Line.__table__), lines)
        # Reads from the primaries: these tests are about the merge, not replication lag.
        Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        with Sess() as s:
            s.execute(insert(Item), items)
            s.execute(insert(Line), lines)
            s.commit()
        try:
            yield Env(cluster, Sess, oracle)
        finally:
            oracle.dispose()


def exact(v: Any) -> Any:
    """A value with its type and exact digits (1.50 != 1.5, 1 != 1.0 != True)."""
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, Base):
        return (type(v).__name__, v.id if isinstance(v, Item) else (v.item_id, v.no))
    if isinstance(v, (list, tuple)):
        return tuple(exact(x) for x in v)
    return (type(v).__name__, v)


def run(session: Any, stmt: Any, params: Any = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    r = session.execute(stmt, params)
    return list(r.keys()), [tuple(exact(x) for x in row) for row in r.all()]


def outcome(env: Env, stmt: Any, ordered: bool = True, params: Any = None) -> str:
    """"exact", "refused: <construct>", or what differs."""
    with Session(env.oracle) as s:
        want = run(s, stmt, params)
    try:
        with env.Session() as s:
            got = run(s, stmt, params)
    except shardkit.ScatterRefused as e:
        assert e.construct, "ScatterRefused must name the construct"
        return f"refused: {e.construct}"
    if got[0] != want[0]:
        return f"WRONG names {got[0]} != {want[0]}"
    same = got[1] == want[1] if ordered else Counter(got[1]) == Counter(want[1])
    return "exact" if same else f"WRONG\n sharded:      {got[1]}\n one database: {want[1]}"


def check(env: Env, stmt: Any, params: Any = None, *, ordered: bool = True) -> None:
    assert outcome(env, stmt, ordered, params) == "exact"


def refused(env: Env, stmt: Any, params: Any = None) -> str:
    result = outcome(env, stmt, False, params)
    assert result.startswith("refused: "), result
    return result[len("refused: "):]


# ---------------------------------------------------------------------------
# Defect: a postgresql.INTERVAL column (what reflection and Alembic's autogenerate give)
# is not sqltypes.Interval, so the merge ordered, compared and grouped its values in
# Python, where psycopg reads '1 year' as 365 days and PostgreSQL compares it as 360.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stmt, construct", [
    (select(I.id, I.iv).order_by(I.iv, I.id), "ORDER BY over interval"),
    (select(func.min(I.iv), func.max(I.iv)), "min() over interval"),
    (select(I.grp, func.max(I.iv)).group_by(I.grp).having(func.max(I.iv) > dt.timedelta(days=362)),
     "max() over interval"),
    (select(I.iv, func.count()).group_by(I.iv), "GROUP BY over interval"),
    (select(I.iv).distinct(), "DISTINCT over interval"),
    (union(select(I.iv), select(I.iv).where(I.qty > 0)), "UNION over interval"),
], ids=["order", "min-max", "having", "group", "distinct", "union"])
def test_postgresql_interval_column_is_refused_as_interval_is(env, stmt, construct):
    """One database: max('361 days', '1 year') is 361 days (a year is 360 days to it); the
    merge said 365 days, and grouped '1 year' with '365 days'."""
    assert refused(env, stmt) == construct


# ---------------------------------------------------------------------------
# Defect: LIMIT/OFFSET given as a bound parameter took the parameter's default, not the
# value given at execution (execute(stmt, {"n": 5}), Query.params(n=5)), which the
# database uses: 3 rows instead of 5, an offset of 1 instead of 4. One given only at
# execution was refused as "non-literal".
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stmt, params", [
    (select(I.id).order_by(I.id).limit(bindparam("n", 3)), {"n": 5}),
    (select(I.id).order_by(I.id).limit(bindparam("n")), {"n": 5}),
    (select(I.id).order_by(I.id).limit(bindparam("n", 3)), {"n": None}),
    (select(I.id).order_by(I.id).offset(bindparam("o", 1)), {"o": 4}),
    (select(I.id).order_by(I.id).limit(bindparam("n", 2)).offset(bindparam("o", 1)), {"n": 3, "o": 5}),
    (select(I.id).order_by(I.id).limit(bindparam("n", 3)).params(n=4), None),
    (select(I.grp, func.count()).group_by(I.grp).order_by(I.grp.nulls_first()).limit(bindparam("n", 1)),
     {"n": 3}),
    (select(func.count()).select_from(I).offset(bindparam("o", 0)), {"o": 1}),
    (union_all(select(I.id), select(L.item_id)).order_by("id").limit(bindparam("n", 1)), {"n": 4}),
], ids=["limit", "limit-only-at-execution", "limit-null", "offset", "both", "statement-params",
        "grouped", "aggregate", "union-all"])
def test_limit_and_offset_bound_at_execution(env, stmt, params):
    check(env, stmt, params)


def test_orm_query_limit_bound_at_execution(env):
    def ids(s: Any) -> list[int]:
        return [i.id for i in s.query(I).order_by(I.id).limit(bindparam("n", 2)).offset(bindparam("o", 0))
                .params(n=4, o=3).all()]
    with Session(env.oracle) as s:
        want = ids(s)
    with env.Session() as s:
        assert ids(s) == want


# ---------------------------------------------------------------------------
# Defect: a type given per dialect (Text().with_variant(Text(collation=...), "postgresql"),
# String().with_variant(CITEXT(), "postgresql"), as a portable model declares it) was
# judged by its generic type: text under an ICU collation ordered by code point.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stmt, construct", [
    (select(I.label, I.id).order_by(I.label, I.id), "ORDER BY over text"),
    (select(I.label, func.count()).group_by(I.label).order_by(I.label), "ORDER BY over text"),
    (select(func.min(I.label), func.max(I.label)), "min() over text"),
], ids=["order", "group-order", "min-max"])
def test_collation_given_as_a_postgresql_variant(env, stmt, construct):
    assert refused(env, stmt) == construct


def test_citext_given_as_a_postgresql_variant_is_not_grouped_in_python():
    """('Ada' and 'ada' are one citext value: grouped, DISTINCT or UNIONed in Python they were
    two.) Planning alone, without the citext extension."""
    from sqlalchemy import Column, MetaData, String, Table

    t = Table("sc7_members", MetaData(), Column("id", Integer, primary_key=True),
              Column("email", String().with_variant(postgresql.CITEXT(), "postgresql")))
    for stmt, construct in [(select(t.c.email).distinct(), "DISTINCT over citext"),
                            (select(t.c.email, func.count()).group_by(t.c.email), "GROUP BY over citext"),
                            (select(t.c.id).order_by(t.c.email), "ORDER BY over citext")]:
        with pytest.raises(shardkit.ScatterRefused) as e:
            plan_scatter(stmt)
        assert e.value.construct == construct


# ---------------------------------------------------------------------------
# The constructs probed: exact, or refused naming the construct
# ---------------------------------------------------------------------------


def _cte() -> Any:
    return select(I.id, I.grp, I.qty).where(I.qty > 0).cte("pos")


def _numbers() -> Any:
    rec = select(literal(1).label("n")).cte("nums", recursive=True)
    return rec.union_all(select(rec.c.n + 1).where(rec.c.n < 40))


def _countdown() -> Any:
    rec = select(I.id, I.qty).where(I.qty > 0).cte("down", recursive=True)
    return rec.union_all(select(rec.c.id, rec.c.qty - 1).where(rec.c.qty > 1))


def _twice(build: Any) -> Any:
    c = _cte()
    return build(c, c.alias("a"), c.alias("b"))


n_lines = select(func.count(L.no)).where(L.item_id == I.id).scalar_subquery()
day = func.date_trunc("day", I.ts)

EXACT: dict[str, tuple[Any, bool]] = {
    "cte-twice-joined-on-key": (_twice(lambda c, a, b: select(a.c.id, b.c.qty).join(b, b.c.id == a.c.id)
                                       .order_by(a.c.id)), True),
    "cte-twice-in": (_twice(lambda c, a, b: select(c.c.id).where(c.c.id.in_(select(c.c.id).where(c.c.grp == 1)))
                            .order_by(c.c.id)), True),
    "cte-recursive-numbers-joined-on-key": ((lambda r: select(I.id, r.c.n).join(r, r.c.n == I.id)
                                             .order_by(I.id))(_numbers()), True),
    "union": (union(select(I.grp).where(I.qty > 0), select(I.grp).where(I.qty < 0)), False),
    "union-all": (union_all(select(I.grp).where(I.qty > 0), select(L.qty).where(L.no > 0)), False),
    "union-order-limit": (union(select(I.qty), select(L.qty)).order_by("qty").limit(3), True),
    "order-label": (select(I.id, (I.qty * 2).label("q2")).order_by(desc("q2"), I.id), True),
    "order-expression": (select(I.id).order_by((I.qty % 3).nulls_first(), I.id.desc()), True),
    "order-unselected": (select(I.id).order_by(I.amt.desc().nulls_last(), I.id).limit(5), True),
    "limit-0": (select(I.id).order_by(I.id).limit(0), True),
    "limit-0-aggregate": (select(func.count()).select_from(I).limit(0), True),
    "limit-0-grouped": (select(I.grp, func.count()).group_by(I.grp).limit(0), True),
    "offset-past-end": (select(I.id).order_by(I.id).offset(100), True),
    "offset-past-end-grouped": (select(I.grp, func.count()).group_by(I.grp).order_by(I.grp).offset(10), True),
    "offset-past-end-aggregate": (select(func.count()).select_from(I).offset(1), True),
    "scalar-correlated": (select(I.id, n_lines.label("n")).order_by(I.id), True),
    "exists-correlated": (select(I.id).where(exists().where(L.item_id == I.id)).order_by(I.id), True),
    "not-exists-correlated": (select(I.id).where(~exists().where(L.item_id == I.id)).order_by(I.id), True),
    "filter": (select(I.grp, func.count().filter(I.qty > 0), func.sum(I.amt).filter(I.flag)).group_by(I.grp),
               False),
    "count-empty": (select(func.count()).select_from(E), True),
    "aggregates-empty": (select(func.count(), func.count(E.qty), func.sum(E.qty), func.avg(E.qty),
                                func.max(E.qty)), True),
    "grouped-empty": (select(E.qty, func.count()).group_by(E.qty), True),
    "min-max-collate-c": (select(func.min(I.name.collate("C")), func.max(I.name.collate("C"))), True),
    "order-by-min-collate-c": (select(I.grp, func.min(I.name)).group_by(I.grp)
                               .order_by(func.min(I.name).collate("C"), I.grp), True),
    "group-date_trunc": (select(day.label("d"), func.count()).group_by(day).order_by(day), True),
    "having-unselected-sum": (select(I.grp).group_by(I.grp).having(func.sum(I.qty) > 0).order_by(I.grp), True),
    "having-unselected-max": (select(I.grp, func.count()).group_by(I.grp).having(func.max(I.amt) > 50), False),
    # (partitioned by the shard key: each partition on one shard; test_scatter_windows)
    "sum-over-partition-by-key": (select(I.id, func.sum(I.qty).over(partition_by=I.id)), False),
}

NOT_COLOCATED = "statement not colocated on the shard key"
REFUSED: dict[str, tuple[Any, str]] = {
    "cte-twice-joined-off-key": (_twice(lambda c, a, b: select(a.c.id, b.c.id).join(b, b.c.grp == a.c.grp)),
                                 NOT_COLOCATED),
    "cte-twice-scalar": (_twice(lambda c, a, b: select(c.c.id).where(
        c.c.qty > select(func.avg(c.c.qty)).scalar_subquery())), NOT_COLOCATED),
    "cte-recursive-over-rows": ((lambda r: select(r.c.id, r.c.qty))(_countdown()), NOT_COLOCATED),
    "intersect": (intersect(select(I.qty), select(L.qty)), "compound select INTERSECT"),
    "except": (except_(select(I.qty), select(L.qty)), "compound select EXCEPT"),
    "union-as-subquery": (select(func.count()).select_from(union(select(I.qty), select(L.qty)).subquery()),
                          NOT_COLOCATED),
    "union-in": (select(I.id).where(I.qty.in_(union(select(L.qty), select(L.no)))), NOT_COLOCATED),
    "row_number": (select(I.id, func.row_number().over(order_by=I.id)), "window function"),
    "distinct-on": (_distinct_on(select(I.grp, I.id), I.grp).order_by(I.grp, I.id), "DISTINCT ON"),
    "fetch-with-ties": (select(I.id, I.qty).order_by(I.qty).fetch(3, with_ties=True), "FETCH FIRST"),
    "order-by-position-text": (select(I.id, I.qty).order_by(text("2"), text("1")), "ORDER BY text"),
    "order-by-position-literal": (select(I.id, I.qty).order_by(literal_column("2")), "ORDER BY text"),
    "scalar-uncorrelated": (select(I.id, select(func.max(L.qty)).scalar_subquery().label("m")), NOT_COLOCATED),
    "not-exists-off-key": (select(I.id).where(~exists().where(L.qty == I.qty)), NOT_COLOCATED),
    "exists-uncorrelated": (select(I.id).where(exists().where(L.qty > 2)), NOT_COLOCATED),
    "bool_and": (select(func.bool_and(I.flag)), "bool_and()"),
    "bool_or": (select(I.grp, func.bool_or(I.flag)).group_by(I.grp), "bool_or()"),
    "string_agg": (select(func.string_agg(I.name, ",")), "string_agg()"),
    "string_agg-ordered": (select(func.string_agg(I.name, aggregate_order_by(literal(","), I.name))),
                           "string_agg()"),
    "array_agg": (select(func.array_agg(I.qty)), "array_agg()"),
    "array_agg-ordered": (select(func.array_agg(aggregate_order_by(I.qty, I.qty))), "array_agg()"),
    "percentile_cont": (select(func.percentile_cont(0.5).within_group(I.qty)), "percentile_cont()"),
    "mode": (select(func.mode().within_group(I.grp)), "mode()"),
    "rollup": (select(I.grp, func.count()).group_by(func.rollup(I.grp)), "GROUP BY ROLLUP"),
    "cube": (select(I.grp, I.flag, func.count()).group_by(func.cube(I.grp, I.flag)), "GROUP BY CUBE"),
    "grouping-sets": (select(I.grp, func.count()).group_by(func.grouping_sets(I.grp, I.flag)),
                      "GROUP BY GROUPING SETS"),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_construct_is_exact(env, name):
    stmt, ordered = EXACT[name]
    check(env, stmt, ordered=ordered)


@pytest.mark.parametrize("name", list(REFUSED))
def test_construct_is_refused(env, name):
    stmt, construct = REFUSED[name]
    assert refused(env, stmt) == construct


def test_orm_selectinload_and_unique(env):
    def snap(objs: Any) -> list[Any]:
        return [(o.id, o.qty, [(ln.no, ln.qty) for ln in o.lines]) for o in objs]

    cases = [
        lambda s: snap(s.scalars(select(I).options(selectinload(I.lines)).order_by(I.id)).unique().all()),
        lambda s: snap(s.scalars(select(I).options(selectinload(I.lines)).where(I.qty > 0)
                                 .order_by(I.qty.desc(), I.id).limit(4)).unique().all()),
        lambda s: [(r[0].id, len(r[0].lines)) for r in s.execute(
            select(I).options(selectinload(I.lines)).order_by(I.id).offset(3)).unique().all()],
        lambda s: snap(s.query(I).options(selectinload(I.lines)).filter(I.flag).order_by(I.id).all()),
        lambda s: [i.id for i in s.query(I).order_by(I.id)[2:5]],
        lambda s: s.query(E).count(),
    ]
    for fn in cases:
        with Session(env.oracle) as s:
            want = fn(s)
        with env.Session() as s:
            assert fn(s) == want
