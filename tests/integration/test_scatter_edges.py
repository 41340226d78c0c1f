"""Edge cases for cross-shard (key-less) reads.

The promise under test (README, "Cross-shard reads" and "Guarantees and limits"): a
read without the shard key returns exactly what ONE database holding all rows would
return, or raises ``shardkit.ScatterRefused`` naming the construct; never a silently
different answer, never an unrelated crash.

The oracle is a copy of the same tables in schema ``edge_oracle`` on shard s0's
primary (``schema_translate_map``); every query runs there and through a
``ShardedSession``, and the results are compared value by value (type and exact
digits included).  The tables live on the session's 3 x 1 cluster
(``sharded_dev``) next to the shared test models, under their own names, and are
dropped at the end of the module.  This file complements
tests/integration/test_scatter.py: column types whose Python order differs from
PostgreSQL's, reference tables driving a cross-shard query, derived tables the
colocation check does not see, SQL spellings of ORDER BY / GROUP BY, the Result API,
and unreachable shards.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from own_tables import truncate_everywhere
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Integer,
    Interval,
    Numeric,
    String,
    Text,
    and_,
    case,
    exists,
    false,
    func,
    insert,
    inspect,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine
from sqlalchemy.exc import MultipleResultsFound, NoResultFound
from sqlalchemy.orm import DeclarativeBase, Session, joinedload, mapped_column, sessionmaker

import shardkit
from models import Order, User

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = dt.timezone.utc
ORACLE = "edge_oracle"


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


class EdgeBase(DeclarativeBase):
    pass


class Thing(EdgeBase):
    """A hash-sharded table with the column types whose merge is delicate."""

    __tablename__ = "edge_things"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    name = mapped_column(Text)
    flag = mapped_column(Boolean)
    r4 = mapped_column(REAL)
    f8 = mapped_column(Double)
    amt = mapped_column(Numeric(12, 2))
    d = mapped_column(Date)
    ts = mapped_column(DateTime(timezone=True))
    iv = mapped_column(Interval)
    mood = mapped_column(pg.ENUM("low", "medium", "high", name="edge_mood"))
    js = mapped_column(pg.JSONB)
    tags = mapped_column(pg.ARRAY(Text))
    cash = mapped_column(pg.MONEY)
    cc = mapped_column(String(2))


class Place(EdgeBase):
    """A reference table: a full copy on every shard."""

    __tablename__ = "edge_places"
    cc = mapped_column(String(2), primary_key=True)
    region = mapped_column(Text)


COLS = [c.key for c in Thing.__table__.columns]
GROUPS = {
    "groups": {"edge": {"strategy": "hash", "tables": {"edge_things": "id"}}},
    "reference_tables": ["edge_places"],
}
T = Thing
P = Place


# ---------------------------------------------------------------------------
# Fixture and comparison helpers
# ---------------------------------------------------------------------------


@dataclass
class Edge:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine

    def ids_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for("edge_things", k) == shard:
                out.append(k)
            k += 1
        return out

    def load(self, rows: Sequence[dict[str, Any]], places: Sequence[dict[str, Any]] = ()) -> None:
        """Replace every row of both tables, on the shards and in the oracle."""
        rows = [{c: r.get(c) for c in COLS} for r in rows]
        truncate_everywhere(self.cluster, "edge_things", "edge_places")
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {ORACLE}.edge_things, {ORACLE}.edge_places"))
            if rows:
                c.execute(insert(Thing.__table__), rows)
            if places:
                c.execute(insert(Place.__table__), list(places))
        with self.Session() as s:
            if rows:
                s.execute(insert(Thing), rows)
            if places:
                s.execute(insert(Place), list(places))
            s.commit()


@pytest.fixture(scope="module")
def edge(sharded_dev) -> Iterator[Edge]:
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), **GROUPS},
                                           metadata=EdgeBase.metadata)
    drop = "DROP TABLE IF EXISTS edge_things, edge_places; DROP TYPE IF EXISTS edge_mood"
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text(drop))
        EdgeBase.metadata.create_all(cluster.primary(s))
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
        c.execute(text(f"CREATE SCHEMA {ORACLE}"))
    oracle = cluster.primary("s0").execution_options(schema_translate_map={None: ORACLE})
    EdgeBase.metadata.create_all(oracle)
    e = Edge(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                                   consistency="strong"), oracle)
    yield e
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(drop))
    cluster.dispose()


def exact(v: Any) -> Any:
    """A value with its type and exact digits (1.50 != 1.5, 1 != 1.0 != True)."""
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (list, dict)):
        return (type(v).__name__, json.dumps(v, sort_keys=True, default=str))
    if hasattr(type(v), "__mapper__"):   # an ORM entity: each of its columns
        return (type(v).__name__,) + tuple(exact(getattr(v, a.key))
                                           for a in inspect(v).mapper.column_attrs)
    return (type(v).__name__, v)


def norm(rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(exact(v) for v in r) for r in rows]


def run_oracle(edge: Edge, stmt: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with Session(edge.oracle) as s:
        r = s.execute(stmt)
        return list(r.keys()), norm(r.all())


def run_sharded(edge: Edge, stmt: Any, **opts: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with edge.Session() as s:
        r = s.execute(stmt, execution_options=opts)
        return list(r.keys()), norm(r.all())


def check(edge: Edge, stmt: Any, *, ordered: bool = True, **opts: Any) -> list[tuple[Any, ...]]:
    """Same column names and rows (in order if ``ordered``) as the one database."""
    want_keys, want = run_oracle(edge, stmt)
    got_keys, got = run_sharded(edge, stmt, **opts)
    assert got_keys == want_keys
    if ordered:
        assert got == want
    else:
        assert Counter(got) == Counter(want)
    return want


def check_or_refused(edge: Edge, stmt: Any, *, ordered: bool = True) -> str | None:
    """The one database's answer, or ScatterRefused naming a construct; nothing else.

    Returns the refused construct (None when the query ran and matched)."""
    try:
        run_sharded(edge, stmt)
    except shardkit.ScatterRefused as e:
        assert e.construct, "ScatterRefused must name the construct"
        return e.construct
    check(edge, stmt, ordered=ordered)
    return None


def one_per_shard(edge: Edge, values: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``values[i]`` placed on shard ``s{i % 3}``, with ids that hash there."""
    ids = {s: iter(edge.ids_on(s, len(values))) for s in edge.cluster.shard_names}
    names = edge.cluster.shard_names
    return [{"id": next(ids[names[i % len(names)]]), **v} for i, v in enumerate(values)]


# ---------------------------------------------------------------------------
# Sort keys and min/max whose PostgreSQL order is not Python's
# ---------------------------------------------------------------------------


def test_order_by_enum_follows_the_declared_order(edge):
    """A PostgreSQL enum sorts in declaration order (low < medium < high), not
    alphabetically; a merged ORDER BY on it, and a grouped ORDER BY on it, must keep
    that order (or be refused)."""
    moods = ["low", "high", "medium", "medium", "low", "high", "high", "medium", "low"]
    edge.load(one_per_shard(edge, [{"mood": m, "grp": i} for i, m in enumerate(moods)]))
    check_or_refused(edge, select(T.id, T.mood).order_by(T.mood, T.id))
    check_or_refused(edge, select(T.mood, func.count()).group_by(T.mood).order_by(T.mood.desc()))


def test_min_max_of_enum_follow_the_declared_order(edge):
    """min/max of an enum compare by declaration order: min is 'low', max is 'high'."""
    edge.load(one_per_shard(edge, [{"mood": "low"}, {"mood": "high"}, {"mood": "medium"}]))
    check_or_refused(edge, select(func.min(T.mood), func.max(T.mood)))


def test_interval_order_and_max_use_postgresql_interval_comparison(edge):
    """PostgreSQL compares intervals with 30-day months: '1 year' (360 days) is less
    than '362 days'.  ORDER BY and max() across shards must agree with that."""
    edge.load(one_per_shard(edge, [{"grp": 1}, {"grp": 2}, {"grp": 3}]))
    for sql in ("UPDATE {s}edge_things SET iv = interval '1 year' WHERE grp = 1",
                "UPDATE {s}edge_things SET iv = interval '362 days' WHERE grp = 2",
                "UPDATE {s}edge_things SET iv = interval '2 mons' WHERE grp = 3"):
        for shard in edge.cluster.shard_names:
            with edge.cluster.primary(shard).begin() as c:
                c.execute(text(sql.format(s="")))
        with edge.oracle.begin() as c:
            c.execute(text(sql.format(s=ORACLE + ".")))
    check_or_refused(edge, select(func.max(T.iv), func.min(T.iv)))
    check_or_refused(edge, select(T.grp, T.iv).order_by(T.iv.desc(), T.grp))


def test_money_sum_and_order(edge):
    """``money`` reaches Python as text ('$10.00'); sum/min/max/ORDER BY across shards
    must still give PostgreSQL's money arithmetic and numeric order."""
    edge.load(one_per_shard(edge, [{"cash": D("10.00")}, {"cash": D("9.00")}, {"cash": D("100.50")}]))
    check_or_refused(edge, select(func.sum(T.cash)))
    check_or_refused(edge, select(func.min(T.cash), func.max(T.cash)))
    check_or_refused(edge, select(T.id, T.cash).order_by(T.cash))


def test_avg_and_sum_of_interval(edge):
    """avg(interval) is a valid aggregate: the merged answer is PostgreSQL's, or a refusal."""
    days = [1, 2, 4, 7, 11, 30]
    edge.load(one_per_shard(edge, [{"iv": dt.timedelta(days=d, hours=d)} for d in days]))
    check_or_refused(edge, select(func.sum(T.iv)))
    check_or_refused(edge, select(func.avg(T.iv)))


def test_sum_and_avg_of_real_match_one_database(edge):
    """sum(real) is computed in real (float4) and avg(real) in double precision over the
    float4 values; merged results must carry the same digits as one database's."""
    edge.load(one_per_shard(edge, [{"r4": 0.1}, {"r4": 0.2}]))
    check_or_refused(edge, select(func.sum(T.r4)))
    check_or_refused(edge, select(func.avg(T.r4)))


def test_order_by_explicit_collation(edge):
    """ORDER BY name COLLATE "und-x-icu" (stated in the statement itself) sorts 'a' < 'B' < 'c';
    a merge by code point ('B' < 'a') would interleave the shards' sorted rows wrongly."""
    edge.load(one_per_shard(edge, [{"name": n} for n in ["a", "B", "c", "D", "e", "F"]]))
    check_or_refused(edge, select(T.name).order_by(T.name.collate("und-x-icu")))


def test_order_by_jsonb(edge):
    """jsonb has a total order in PostgreSQL (object > array > boolean > number > string);
    ORDER BY a jsonb column across shards is exact or refused, never a Python TypeError."""
    edge.load(one_per_shard(edge, [{"js": v} for v in ({"a": 1}, [1, 2], 3, "x", {"b": 0}, [0])]))
    check_or_refused(edge, select(T.id, T.js).order_by(T.js, T.id))


def test_group_by_and_distinct_over_arrays_and_jsonb(edge):
    """GROUP BY / DISTINCT on array and jsonb columns: the merge must de-duplicate them
    (equal arrays on two shards are one group), or refuse; not fail with
    ``TypeError: unhashable type``."""
    tags = [["a"], ["a", "b"], [], ["a"], ["a", "b"], ["c"]]
    edge.load(one_per_shard(edge, [{"tags": t, "js": {"k": i % 2}} for i, t in enumerate(tags)]))
    check_or_refused(edge, select(T.tags, func.count()).group_by(T.tags).order_by(T.tags))
    check_or_refused(edge, select(T.js).distinct(), ordered=False)


def test_types_whose_python_order_matches(edge):
    """boolean, date, timestamptz, real and double sort keys, min/max of dates, text and
    timestamps: the types where the merge in Python must agree with PostgreSQL."""
    vals = []
    for i in range(18):
        vals.append({
            "grp": i % 4, "name": [None, "", "a", "b b", "\u00e9", "Z"][i % 6],
            "flag": [True, False, None][i % 3], "r4": [0.5, -1.25, None, 3.0][i % 4],
            "f8": [math.inf, -0.0, 0.0, 2.5, None, -math.inf][i % 6],
            "d": [dt.date(2024, 2, 29), None, dt.date(1999, 12, 31)][i % 3],
            "ts": [dt.datetime(2024, 1, 1, tzinfo=UTC), None,
                   dt.datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)][(i // 2) % 3],
        })
    edge.load(one_per_shard(edge, vals))
    check(edge, select(T.id, T.flag, T.d).order_by(T.flag.desc().nulls_last(), T.d.nulls_first(), T.id))
    check(edge, select(T.id, T.r4, T.f8).order_by(T.r4.desc(), T.f8, T.id.desc()).limit(9).offset(2))
    check(edge, select(T.name, T.ts).order_by(T.ts.desc().nulls_last(), T.name.nulls_first(), T.id))
    check(edge, select(func.min(T.d), func.max(T.d), func.min(T.ts), func.max(T.ts),
                       func.min(T.name), func.max(T.name), func.min(T.f8), func.max(T.r4)))
    check(edge, select(T.flag, func.count(), func.count(T.d), func.max(T.f8)).group_by(T.flag)
          .order_by(T.flag.nulls_first()))


# ---------------------------------------------------------------------------
# Aggregates the planner must recognise
# ---------------------------------------------------------------------------


def test_aggregate_strings_is_one_aggregate_over_all_rows(edge):
    """``func.aggregate_strings`` (SQLAlchemy's portable string_agg) aggregates every row
    into one value: one row like one database, or refused like string_agg; never one
    row per shard."""
    edge.load(one_per_shard(edge, [{"name": n, "grp": i % 2} for i, n in enumerate("abcdef")]))
    stmt = select(func.aggregate_strings(T.name, ","))
    _, want = run_oracle(edge, stmt)
    try:
        _, got = run_sharded(edge, stmt)
    except shardkit.ScatterRefused as e:
        assert e.construct
        return
    # the order inside the string is not determined: compare the parts
    assert len(got) == len(want) == 1
    assert sorted(got[0][0][1].split(",")) == sorted(want[0][0][1].split(",")) == list("abcdef")


def test_aggregate_filter_and_coalesce_are_exact_or_refused(edge):
    """FILTER (WHERE ...), coalesce(sum(x), 0) and sum(CASE ...) are everyday spellings."""
    edge.load(one_per_shard(edge, [{"grp": i % 3, "amt": D(i) / 4 if i % 4 else None}
                                   for i in range(12)]))
    check_or_refused(edge, select(func.count().filter(T.grp == 1), func.sum(T.amt).filter(T.grp > 0)))
    check_or_refused(edge, select(func.coalesce(func.sum(T.amt), 0)).where(T.grp == 7))
    check(edge, select(func.sum(case((T.grp == 1, 1), else_=0)), func.count(case((T.amt > 1, T.id)))))
    check(edge, select(T.grp, func.sum(case((T.amt.is_(None), 1), else_=0))).group_by(T.grp)
          .order_by(T.grp))


def test_zero_rows_all_null_shards_and_empty_shards(edge):
    """count(*) vs count(col) with NULLs, sum over no row is NULL, count over no row is 0,
    min/max on every-shard-empty tables are NULL; a shard whose values are all NULL
    contributes nothing but its count(*)."""
    s0, s1 = edge.ids_on("s0", 3), edge.ids_on("s1", 3)
    edge.load([{"id": k, "amt": None, "d": None} for k in s0]
              + [{"id": k, "amt": D("1.10") * i, "d": dt.date(2020, 1, i + 1)} for i, k in enumerate(s1)])
    aggs = (func.count(), func.count(T.amt), func.sum(T.amt), func.avg(T.amt), func.min(T.d),
            func.max(T.amt))
    check(edge, select(*aggs))
    check(edge, select(*aggs).where(T.id.in_(s0)))
    check(edge, select(*aggs).where(false()))
    check(edge, select(T.grp, *aggs).group_by(T.grp).where(T.amt.is_(None)), ordered=False)
    edge.load([])
    with edge.Session() as s:
        assert s.scalar(select(func.max(T.d))) is None
        assert s.scalar(select(func.count(T.id))) == 0
        assert s.scalar(select(func.sum(T.amt))) is None
        assert s.execute(select(func.count(), func.avg(T.amt))).one() == (0, None)
        assert s.scalars(select(T).order_by(T.id).limit(3)).all() == []
        assert s.execute(select(T.grp, func.count()).group_by(T.grp)).all() == []


def test_group_by_expressions_having_and_order_on_aggregates_not_selected(edge):
    """GROUP BY two expressions, HAVING and ORDER BY on aggregates absent from the select
    list, then LIMIT/OFFSET on the merged groups."""
    rows = [{"grp": i % 5, "name": "aAbB"[i % 4], "amt": D(i * 7 % 11) / 8,
             "d": dt.date(2024, 1, 1) + dt.timedelta(days=i % 9)} for i in range(40)]
    edge.load(one_per_shard(edge, rows))
    low, parity = func.lower(T.name), T.grp % 2
    base = (select(low, parity, func.sum(T.amt), func.count())
            .group_by(low, parity)
            .having(and_(func.max(T.d) >= dt.date(2024, 1, 5), func.min(T.amt) < D("1.5"))))
    check(edge, base.order_by(func.avg(T.amt).desc(), low, parity))
    check(edge, base.order_by(func.max(T.d), func.sum(T.amt).desc(), low, parity).limit(2).offset(1))
    check(edge, select(func.count()).select_from(T).group_by(T.grp, T.name)
          .having(func.count() > 1).order_by(func.count(), func.min(T.id)))


def test_having_compares_a_timestamp_aggregate_with_a_date(edge):
    """HAVING max(ts) > DATE '2024-01-02': PostgreSQL casts the date; the merged HAVING
    must compare the same way (or refuse), not raise a Python TypeError."""
    rows = [{"grp": i % 3, "ts": dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(hours=7 * i)}
            for i in range(12)]
    edge.load(one_per_shard(edge, rows))
    check_or_refused(edge, select(T.grp, func.max(T.ts)).group_by(T.grp)
                     .having(func.max(T.ts) > dt.date(2024, 1, 2)).order_by(T.grp))


def test_group_by_rollup(edge):
    """GROUP BY ROLLUP(...) is exact (subtotals of merged groups) or refused naming it;
    not a shard error."""
    edge.load(one_per_shard(edge, [{"grp": i % 3, "amt": D(i)} for i in range(9)]))
    check_or_refused(edge, select(func.count(), func.sum(T.amt)).select_from(T)
                     .group_by(func.rollup(T.grp)), ordered=False)


# ---------------------------------------------------------------------------
# ORDER BY / select-list spellings
# ---------------------------------------------------------------------------


def test_order_by_output_position(edge):
    """``ORDER BY 1, 2`` (the output columns by position) is ordinary SQL; the merge must
    follow those columns, or refuse."""
    edge.load(one_per_shard(edge, [{"name": "bacab"[i % 5], "grp": i} for i in range(15)]))
    check_or_refused(edge, select(T.name, T.grp).order_by(literal_column("1"), literal_column("2")))


def test_order_by_text_clause(edge):
    """``order_by(text("name"))`` is SQLAlchemy's documented textual ORDER BY: exact, or a
    ScatterRefused naming the construct (not a bare NotImplementedError)."""
    edge.load(one_per_shard(edge, [{"name": "bacab"[i % 5], "grp": i} for i in range(15)]))
    check_or_refused(edge, select(T.id, T.name).order_by(text("name"), T.id))


def test_select_star_returns_every_column(edge):
    """``select(literal_column("*")).select_from(table)`` returns every column of the
    table, as one database does; not just the first."""
    edge.load(one_per_shard(edge, [{"grp": i, "name": f"n{i}"} for i in range(6)]))
    t = Thing.__table__
    check_or_refused(edge, select(literal_column("*")).select_from(t).where(t.c.grp < 3), ordered=False)
    check_or_refused(edge, select(literal_column("*")).select_from(t).order_by(t.c.id))


# ---------------------------------------------------------------------------
# Subqueries, CTEs and reference tables
# ---------------------------------------------------------------------------


PLACES = [{"cc": "de", "region": "eu"}, {"cc": "fr", "region": "eu"},
          {"cc": "us", "region": "am"}, {"cc": "jp", "region": "as"}]


def load_places(edge: Edge) -> None:
    """Things in de (on every shard), fr (one shard), us (one shard); none in jp."""
    vals = [{"cc": c, "amt": D(i)} for i, c in enumerate(["de", "de", "de", "fr", "de", "us", "de"])]
    edge.load(one_per_shard(edge, vals), PLACES)


def test_subqueries_ctes_and_reference_joins_that_are_exact(edge):
    load_places(edge)
    sub = select(T.id, T.amt, T.cc).where(T.amt > 0).subquery()
    check(edge, select(func.count(), func.sum(sub.c.amt)).select_from(sub))
    cte = select(T.id, T.cc, T.amt).where(T.cc != "us").cte("c")
    check(edge, select(cte.c.cc, func.count(), func.max(cte.c.amt)).group_by(cte.c.cc).order_by(cte.c.cc))
    check(edge, select(P.region, func.count(T.id), func.sum(T.amt)).join(P, P.cc == T.cc)
          .group_by(P.region).order_by(P.region))
    check(edge, select(T.id, P.region).outerjoin(P, P.cc == T.cc).order_by(P.region, T.id.desc()))
    # Rows of a reference table preserved by an outer join would come from every shard;
    # shardkit refuses it even where grouping would happen to merge them exactly.
    check_or_refused(edge, select(P.cc, func.count(T.id)).outerjoin(T, T.cc == P.cc)
                     .group_by(P.cc).order_by(P.cc))


def test_reference_table_left_joined_to_a_sharded_table(edge):
    """FROM places LEFT JOIN things: a place without things gives one (cc, NULL) row in one
    database; every shard holding a copy of places must not add its own."""
    load_places(edge)
    check_or_refused(edge, select(P.cc, T.id).outerjoin(T, T.cc == P.cc).order_by(P.cc, T.id))


def test_reference_rows_filtered_by_exists_over_a_sharded_table(edge):
    """``places WHERE [NOT] EXISTS (things of that place)`` and ``cc IN (SELECT cc FROM
    things)``: each place at most once, decided over all shards' things."""
    load_places(edge)
    has = exists().where(T.cc == P.cc)
    check_or_refused(edge, select(P.cc).where(has).order_by(P.cc))
    check_or_refused(edge, select(P.cc).where(~has).order_by(P.cc))
    check_or_refused(edge, select(P.cc).where(P.cc.in_(select(T.cc))).order_by(P.cc))


def test_reference_rows_with_a_per_row_count_over_a_sharded_table(edge):
    """``SELECT cc, (SELECT count(*) FROM things WHERE things.cc = places.cc) FROM places``:
    one row per place with the count over all shards."""
    load_places(edge)
    n = select(func.count(T.id)).where(T.cc == P.cc).scalar_subquery()
    check_or_refused(edge, select(P.cc, n.label("n")).order_by(P.cc))


def test_aliased_derived_table_with_distinct_limit_or_aggregate(edge):
    """A derived table with DISTINCT / LIMIT / an aggregate is refused (README); wrapping it
    in ``.alias()`` (an alias of the subquery, as legacy Query builds) changes nothing."""
    load_places(edge)
    check_or_refused(edge, select(func.count()).select_from(select(T.cc).distinct().subquery().alias()))
    check_or_refused(edge, select(func.count()).select_from(
        select(T.id).order_by(T.id).limit(2).subquery().alias()))
    s = select(func.sum(T.amt).label("total")).subquery().alias("x")
    check_or_refused(edge, select(s.c.total))


def test_derived_table_with_a_statistical_aggregate(edge):
    """``SELECT c FROM (SELECT corr(f8, grp) AS c FROM things)``: one row, over all rows."""
    edge.load(one_per_shard(edge, [{"f8": float(i * i % 7), "grp": i} for i in range(12)]))
    sub = select(func.corr(T.f8, T.grp).label("c"), func.regr_count(T.f8, T.grp).label("n")).subquery()
    check_or_refused(edge, select(sub.c.c, sub.c.n))


def test_not_exists_without_from_is_exact_or_refused(edge):
    """SELECT NOT EXISTS (...): true only if no shard has such a row."""
    edge.load(one_per_shard(edge, [{"grp": 1}, {"grp": 2}, {"grp": 2}]))
    check_or_refused(edge, select(~exists().where(T.grp == 1)))
    check_or_refused(edge, select(~exists().where(T.grp == 9)))


# ---------------------------------------------------------------------------
# Ties with LIMIT / OFFSET, DISTINCT with LIMIT: properties
# ---------------------------------------------------------------------------

tie_rows = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3)),
                              st.sampled_from([None, "a", "b", "B"])), max_size=24)


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=tie_rows, desc=st.booleans(), nulls=st.sampled_from([None, "first", "last"]),
       limit=st.one_of(st.none(), st.integers(0, 8)), offset=st.integers(0, 8),
       distinct=st.booleans())
def test_property_ties_with_limit_offset(edge, rows, desc, nulls, limit, offset, distinct):
    """ORDER BY a non-unique key with LIMIT/OFFSET: PostgreSQL may return any rows of a
    tie, so the sort-key sequence must equal one database's, and each row must be a
    real row (or distinct row) of the table, returned at most once."""
    edge.load(one_per_shard(edge, [{"grp": g, "name": n} for g, n in rows]))
    key = T.grp.desc() if desc else T.grp.asc()
    key = key.nulls_first() if nulls == "first" else key.nulls_last() if nulls == "last" else key
    stmt = select(T.grp, T.name) if distinct else select(T.grp, T.name, T.id)
    if distinct:
        stmt = stmt.distinct()
    stmt = stmt.order_by(key)
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    _, want = run_oracle(edge, stmt)
    _, got = run_sharded(edge, stmt)
    assert [r[0] for r in got] == [r[0] for r in want]
    _, universe = run_oracle(edge, stmt.limit(None).offset(None))
    assert len(set(got)) == len(got)
    assert set(got) <= set(universe)


def test_distinct_with_limit_and_no_order(edge):
    """DISTINCT ... LIMIT n without ORDER BY: n distinct values that exist (any n)."""
    edge.load(one_per_shard(edge, [{"grp": i % 4, "name": "xy"[i % 2]} for i in range(30)]))
    _, universe = run_oracle(edge, select(T.grp, T.name).distinct())
    for limit, offset in ((3, 0), (2, 2), (10, 0), (4, 4)):
        _, got = run_sharded(edge, select(T.grp, T.name).distinct().limit(limit).offset(offset))
        assert len(got) == max(0, min(limit, len(universe) - offset))
        assert len(set(got)) == len(got) and set(got) <= set(universe)


# ---------------------------------------------------------------------------
# ORM and the Result API (the shared test models)
# ---------------------------------------------------------------------------


def seed_users(sharded, n: int = 24) -> None:
    with sharded.Session() as s:
        for k in range(1, n + 1):
            s.add(User(id=k, name="abcd"[k % 4], orders=[Order(id=k * 10 + j, amount=j % 3)
                                                          for j in range(1 + k % 3)]))
        s.commit()


def test_legacy_query_count_of_distinct_limit_and_group_by(sharded):
    """``Query.count()`` wraps the query in a derived table: the counts are one database's
    (distinct amounts, at most ``limit`` rows, number of groups), or a refusal."""
    seed_users(sharded)
    with sharded.Session() as s:
        amounts = {o.amount for o in s.scalars(select(Order))}
        n_orders = s.scalar(select(func.count()).select_from(Order))
        cases = {"distinct": (s.query(Order.amount).distinct(), len(amounts)),
                 "limit": (s.query(Order).order_by(Order.id).limit(2), 2),
                 "group by": (s.query(Order.amount).group_by(Order.amount), len(amounts)),
                 "plain": (s.query(Order), n_orders)}
        got, want = {}, {}
        for name, (q, expected) in cases.items():
            try:
                got[name] = want[name] = q.count()
            except shardkit.ScatterRefused as e:
                assert e.construct
                got[name] = want[name] = "refused"
            else:
                want[name] = expected
        assert got == want
        assert got["plain"] == n_orders


def test_orm_entities_ordered_by_a_non_unique_key_with_limit_offset(sharded):
    seed_users(sharded)
    names = sorted("abcd"[k % 4] for k in range(1, 25))
    with sharded.Session() as s:
        users = s.scalars(select(User).order_by(User.name.desc()).limit(7).offset(5)).all()
        assert [u.name for u in users] == sorted(names, reverse=True)[5:12]
        assert len({u.id for u in users}) == 7
        legacy = s.query(User).order_by(User.name, User.id.desc()).offset(3).limit(4).all()
        want = sorted(range(1, 25), key=lambda k: ("abcd"[k % 4], -k))[3:7]
        assert [u.id for u in legacy] == want
        # a collection joinedload with LIMIT: LIMIT counts users, not joined rows
        eager = s.scalars(select(User).options(joinedload(User.orders)).order_by(User.id.desc())
                          .limit(3).offset(1)).unique().all()
        assert [(u.id, len(u.orders)) for u in eager] == [(k, 1 + k % 3) for k in (23, 22, 21)]
        # ORDER BY a subquery correlated on the shard key (each user's order count)
        n = select(func.count(Order.id)).where(Order.user_id == User.id).scalar_subquery()
        rows = s.execute(select(User.id, n.label("n")).order_by(n.desc(), User.id).limit(5)).all()
        assert rows == sorted(((k, 1 + k % 3) for k in range(1, 25)), key=lambda r: (-r[1], r[0]))[:5]


def test_result_api_forms(sharded):
    """first(), one(), scalars(), mappings(), partitions(), yield_per and stream_results on
    merged results give what one database's Result gives."""
    seed_users(sharded)
    by_id = sorted(range(1, 25))
    q = select(User.id, User.name).order_by(User.id.desc())
    with sharded.Session() as s:
        assert s.execute(q).first() == (24, "a")
        assert s.execute(q.limit(1).offset(3)).one() == (21, "b")
        assert s.scalars(select(User.id).order_by(User.id).limit(5)).all() == by_id[:5]
        assert s.scalars(select(User).order_by(User.id).offset(20)).first().id == 21
        assert [dict(m) for m in s.execute(q.limit(2)).mappings()] == [
            {"id": 24, "name": "a"}, {"id": 23, "name": "d"}]
        parts = [[r.id for r in p] for p in s.execute(select(User.id).order_by(User.id)).partitions(10)]
        assert parts == [by_id[:10], by_id[10:20], by_id[20:]]
        r = s.execute(select(User).order_by(User.name, User.id).execution_options(yield_per=4))
        ids = [u.id for u in r.scalars()]
        assert ids == sorted(by_id, key=lambda k: ("abcd"[k % 4], k))
        r = s.execute(select(User.id).order_by(User.id.desc()), execution_options={"stream_results": True})
        assert r.fetchmany(3) == [(24,), (23,), (22,)]
        assert r.first() == (21,)
        with pytest.raises(MultipleResultsFound):   # rows of several shards: one() sees them all
            s.execute(select(User.id).where(User.name == "a")).one()
        with pytest.raises(MultipleResultsFound):
            s.scalars(select(User).where(User.id > 22)).one_or_none()
        with pytest.raises(NoResultFound):
            s.execute(select(User.id).where(User.name == "zz")).scalar_one()
        # the session stays usable after a partly consumed streamed scatter
        assert s.scalar(select(func.count()).select_from(User)) == 24
        assert s.scalar(select(func.max(Order.amount))) == 2
        total = s.execute(select(func.count(Order.id), func.sum(Order.amount))).one()
        assert total == (sum(1 + k % 3 for k in by_id),
                         sum(j % 3 for k in by_id for j in range(1 + k % 3)))


# ---------------------------------------------------------------------------
# Shards that cannot be reached: shardkit_timeout, shardkit_partial_results
# ---------------------------------------------------------------------------


@pytest.fixture
def with_dead_shard(edge, sharded_dev):
    """A cluster of the 3 real shards plus ``s9``, whose primary does not accept
    connections (``refused``) or accepts TCP and never answers (``hung``)."""
    made: list[Any] = []

    def make(kind: str) -> shardkit.Cluster:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if kind == "hung":
            sock.listen(16)
        else:
            sock.close()
        cfg = sharded_dev.config_dict()
        cfg["shards"] = cfg["shards"] + [{
            "name": "s9", "primary": f"postgresql+psycopg://shardkit@127.0.0.1:{port}/shardkit",
            "replicas": []}]
        cluster = shardkit.Cluster.from_config({**cfg, **GROUPS}, metadata=EdgeBase.metadata)
        made.append((cluster, sock))
        return cluster

    edge.load(one_per_shard(edge, [{"grp": i} for i in range(9)]))
    yield make
    for cluster, sock in made:
        cluster.dispose()
        sock.close()


def test_partial_results_when_a_shard_refuses_connections(edge, with_dead_shard):
    """With ``shardkit_partial_results=True`` a shard that cannot be reached is reported in
    ``missing_shards`` and the other shards' rows are returned (README)."""
    cluster = with_dead_shard("refused")
    Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    _, want = run_oracle(edge, select(T.grp).order_by(T.grp))
    with Sess() as s:
        r = s.execute(select(T.grp).order_by(T.grp),
                      execution_options={"shardkit_partial_results": True, "shardkit_timeout": 2.0})
        assert norm(r.all()) == want
        assert set(r.missing_shards) == {"s9"}
    with Sess() as s, pytest.raises(shardkit.ShardkitError) as ei:
        s.execute(select(func.count()).select_from(T)).all()
    assert "s9" in str(ei.value)


def test_a_shard_that_never_answers_the_connection_is_given_up_after_the_connect_timeout(edge, with_dead_shard):
    """``shardkit_timeout`` bounds the query on each shard; a server that accepts the TCP
    connection and never answers is given up on after the engines' connect timeout
    (3 s by default), and with partial results the others' rows come back."""
    cluster = with_dead_shard("hung")
    Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    _, want = run_oracle(edge, select(func.count()).select_from(T))
    t0 = time.monotonic()
    with Sess() as s:
        try:
            r = s.execute(select(func.count()).select_from(T),
                          execution_options={"shardkit_partial_results": True, "shardkit_timeout": 0.5})
            got, missing = norm(r.all()), set(r.missing_shards)
        except shardkit.ShardkitError as e:
            got, missing = f"{type(e).__name__}: {e}", set()
    elapsed = time.monotonic() - t0
    assert (got, missing) == (want, {"s9"})
    assert elapsed < 5.9, f"took {elapsed:.1f} s with a 3 s connect timeout"  # was 5.0; two connect attempts: >= 6 s
