"""Cross-shard reads that looked mergeable and were not: each query runs on the sharded
cluster and on one database holding the same rows, and must return exactly that
database's answer or raise ``ScatterRefused`` naming the construct.

The tables live on the session's 3 x 1 cluster (``sharded_dev``) under their own
names; the one database is a copy of them in schema ``fe_oracle`` on shard s0's
primary (``schema_translate_map``).  Results are compared with types and exact
digits (1.50 != 1.5, 1 != 1.0 != True).
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    Interval,
    Numeric,
    Text,
    Time,
    distinct,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import CITEXT
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

import shardkit
# The one-database comparison (duck-typed: an object with .oracle and .Session).
from test_scatter_edges import check, check_or_refused, run_oracle

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = dt.timezone.utc
ORACLE = "fe_oracle"


class FeBase(DeclarativeBase):
    pass


class Item(FeBase):
    __tablename__ = "fe_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    f8 = mapped_column(Double)
    amt = mapped_column(Numeric(12, 2))
    name = mapped_column(Text)
    flag = mapped_column(Boolean)
    d = mapped_column(Date)
    ts = mapped_column(DateTime(timezone=True))
    iv = mapped_column(Interval)
    tt = mapped_column(Time(timezone=True))
    ci = mapped_column(CITEXT)
    cc = mapped_column(Text)


class Line(FeBase):
    """Colocated with fe_items (sharded by item_id)."""

    __tablename__ = "fe_lines"
    item_id = mapped_column(ForeignKey("fe_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


class Ref(FeBase):
    """A reference table: a full copy on every shard."""

    __tablename__ = "fe_ref"
    cc = mapped_column(Text, primary_key=True)
    region = mapped_column(Text)


I, L, R = Item, Line, Ref
TABLES = "fe_lines, fe_items, fe_ref"
GROUPS = {
    "groups": {"fe": {"strategy": "hash", "tables": {"fe_items": "id", "fe_lines": "item_id"}}},
    "reference_tables": ["fe_ref"],
}


@dataclass
class Fe:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine

    def ids_on(self, shard: str, n: int) -> list[int]:
        out, k = [], 1
        while len(out) < n:
            if self.cluster.shard_for("fe_items", k) == shard:
                out.append(k)
            k += 1
        return out

    def place(self, values: Sequence[dict[str, Any]], shards: Sequence[int] | None = None
              ) -> list[dict[str, Any]]:
        """Rows ``values[i]`` on shard ``s{shards[i]}`` (default ``i % 3``)."""
        names = self.cluster.shard_names
        where = [i % len(names) for i in range(len(values))] if shards is None else list(shards)
        ids = {s: iter(self.ids_on(names[s], where.count(s))) for s in set(where)}
        return [{"id": next(ids[s]), **v} for s, v in zip(where, values)]

    def load(self, items: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]] = (),
             refs: Sequence[dict[str, Any]] = ()) -> None:
        """Replace every row of every table, on the shards and in the one database."""
        cols = [c.key for c in Item.__table__.columns]
        items = [{c: r.get(c) for c in cols} for r in items]
        data = ((Item, items), (Line, list(lines)), (Ref, list(refs)))
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).begin() as c:
                c.execute(text("SET LOCAL lock_timeout = '10s'"))
                c.execute(text(f"TRUNCATE {TABLES}"))
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(f'{ORACLE}.{t}' for t in TABLES.split(', '))}"))
            for model, rows in data:
                if rows:
                    c.execute(insert(model.__table__), rows)
        with self.Session() as s:
            for model, rows in data:
                if rows:
                    s.execute(insert(model), rows)
            s.commit()


@pytest.fixture(scope="module")
def fe(sharded_dev) -> Iterator[Fe]:
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), **GROUPS},
                                           metadata=FeBase.metadata)
    drop = f"DROP TABLE IF EXISTS {TABLES}"
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text(drop))
            c.execute(text("CREATE EXTENSION IF NOT EXISTS citext"))
        FeBase.metadata.create_all(cluster.primary(s))
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
        c.execute(text(f"CREATE SCHEMA {ORACLE}"))
    oracle = cluster.primary("s0").execution_options(schema_translate_map={None: ORACLE})
    FeBase.metadata.create_all(oracle)
    f = Fe(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                                 consistency="strong"), oracle)
    yield f
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(drop))
            c.execute(text("DROP EXTENSION IF EXISTS citext"))
    cluster.dispose()


def refused(fe: Fe, stmt: Any) -> str:
    """The construct ``stmt`` is refused with; the test fails if it runs."""
    construct = check_or_refused(fe, stmt, ordered=bool(stmt._order_by_clauses))
    assert construct is not None, f"one database's answer, but it cannot be merged: {stmt}"
    return construct


# ---------------------------------------------------------------------------
# Aggregates over DISTINCT values, however spelled
# ---------------------------------------------------------------------------


def test_aggregate_of_distinct_spelled_as_a_function_or_text_is_refused(fe):
    """``func.count(func.distinct(x))`` renders ``count(distinct(x))``, which PostgreSQL reads
    as ``count(DISTINCT x)``; so does ``func.count(literal_column("DISTINCT x"))``.  Adding
    the shards' distinct counts counts a value once per shard holding it (12 for 4 groups)."""
    fe.load(fe.place([{"grp": i % 4, "qty": i % 3} for i in range(24)]))
    t = Item.__table__
    for stmt in [
        select(func.count(func.distinct(I.grp))),
        select(func.sum(func.distinct(I.grp))),
        select(func.avg(func.distinct(I.qty))),
        select(func.count(literal_column("DISTINCT fe_items.grp"))).select_from(t),
        select(func.count(text("distinct(fe_items.grp)"))).select_from(t),
        select(I.qty, func.count(func.distinct(I.grp))).group_by(I.qty),
        select(I.qty).group_by(I.qty).having(func.count(func.distinct(I.grp)) > 3),
    ]:
        assert "DISTINCT" in refused(fe, stmt)
    # every shard holds the 4 groups: one database counts 4, the shards' counts add up to 12
    assert run_oracle(fe, select(func.count(func.distinct(I.grp))))[1] == [(("int", 4),)]
    # min/max over DISTINCT values are what they are over all values: still merged.
    check(fe, select(func.min(func.distinct(I.grp)), func.max(func.distinct(I.qty))))


# ---------------------------------------------------------------------------
# Types whose values Python compares for equality otherwise than PostgreSQL
# ---------------------------------------------------------------------------


def load_intervals(fe: Fe) -> None:
    """interval '1 year' on s0 (PostgreSQL: equal to 360 days; psycopg reads 365 days),
    '360 days' on s1 and s2, '3 days' on s2."""
    fe.load(fe.place([{"grp": 1, "d": dt.date(2024, 1, 31)},
                      {"grp": 1, "iv": dt.timedelta(days=360), "d": dt.date(2024, 2, 1)},
                      {"grp": 2, "iv": dt.timedelta(days=360), "d": dt.date(2024, 2, 1)},
                      {"grp": 2, "iv": dt.timedelta(days=3), "d": dt.date(2024, 3, 1)}],
                     shards=[0, 1, 2, 2]))
    for eng, table in [(fe.cluster.primary(s), "fe_items") for s in fe.cluster.shard_names] + \
            [(fe.oracle, f"{ORACLE}.fe_items")]:
        with eng.begin() as c:
            c.execute(text(f"UPDATE {table} SET iv = interval '1 year' WHERE iv IS NULL"))


def test_group_by_and_distinct_over_interval_are_refused(fe):
    """GROUP BY / DISTINCT over an interval column: '1 year' = '360 days' in PostgreSQL (one
    group of 3), two groups in Python (365 != 360 days)."""
    load_intervals(fe)
    assert run_oracle(fe, select(I.iv, func.count()).group_by(I.iv).order_by(I.iv))[1] == [
        (("timedelta", dt.timedelta(days=3)), ("int", 1)),
        (("timedelta", dt.timedelta(days=360)), ("int", 3))]
    assert refused(fe, select(I.iv, func.count()).group_by(I.iv)) == "GROUP BY over interval"
    assert refused(fe, select(func.count()).select_from(I).group_by(I.iv)) == "GROUP BY over interval"
    assert refused(fe, select(I.iv).distinct()) == "DISTINCT over interval"


def test_intervals_of_expressions_without_a_type_are_refused(fe):
    """``func.age(...)`` has no SQLAlchemy type, so the type checks cannot see an interval:
    age('2025-01-31', d) is '1 year' for d = 2024-01-31 and '11 mons 30 days' for
    2024-02-01, equal in PostgreSQL (360 days), 365 and 360 days in Python.  Ordering,
    min/max, sum/avg and grouping on them gave other answers than one database's."""
    load_intervals(fe)
    age = func.age(dt.date(2025, 1, 31), I.d)
    for stmt in [
        # a tie for PostgreSQL, decided by id; 360 < 365 days for Python whatever the ids
        select(I.id).order_by(age, I.id),
        select(I.id).order_by(age, I.id.desc()),
        select(I.id, age).order_by(age.desc(), I.id.desc()).limit(2),
        select(func.max(age)),
        select(func.min(age), func.max(age)).group_by(I.grp),
        select(func.sum(age)),
        select(func.avg(age)),
        select(age, func.count()).group_by(age),
        select(I.grp).group_by(I.grp).having(func.max(age) >= dt.timedelta(days=365)),
        select(func.age(I.d)).distinct(),
        select(I.grp, func.count()).group_by(I.grp).order_by(func.max(func.justify_interval(I.iv))),
    ]:
        assert "interval" in refused(fe, stmt)
    # one database: two groups, '1 year' and '11 mons 30 days' in one (Python: three)
    assert sorted(r[-1] for r in run_oracle(fe, select(age, func.count()).group_by(age))[1]) == [
        ("int", 1), ("int", 3)]
    # Untyped expressions whose values Python compares as PostgreSQL does still merge.
    check(fe, select(I.id, func.date_part("day", age)).order_by(func.date_part("day", age), I.id))
    check(fe, select(func.max(func.to_char(I.d, "YYYY-MM-DD")), func.min(func.length(I.cc))))


def test_group_by_and_distinct_over_time_with_time_zone_are_refused(fe):
    """timetz 12:00+00 and 13:00+01 are different values in PostgreSQL (two groups) and the
    same instant, so equal, in Python."""
    tz = lambda h: dt.timezone(dt.timedelta(hours=h))  # noqa: E731
    fe.load(fe.place([{"tt": dt.time(12, tzinfo=tz(0))}, {"tt": dt.time(13, tzinfo=tz(1))},
                      {"tt": dt.time(11, tzinfo=tz(-1))}]))
    assert len(run_oracle(fe, select(I.tt).distinct())[1]) == 3
    assert refused(fe, select(I.tt, func.count()).group_by(I.tt)).startswith("GROUP BY over time")
    assert refused(fe, select(I.tt).distinct()).startswith("DISTINCT over time")


def test_citext_is_compared_without_case(fe):
    """citext compares case-insensitively ('a' = 'A' < 'B'), Python by code point: ORDER BY,
    min/max, GROUP BY and DISTINCT over it are refused (even where the database's collation is
    C, which the collation check allows)."""
    fe.load(fe.place([{"ci": v} for v in ("a", "B", "b", "A", "c", "C")]))
    for stmt, construct in [
        (select(func.min(I.ci), func.max(I.ci)), "min() over citext"),
        (select(I.id, I.ci).order_by(I.ci, I.id), "ORDER BY over citext"),
        (select(I.ci, func.count()).group_by(I.ci), "GROUP BY over citext"),
        (select(I.ci).distinct(), "DISTINCT over citext"),
    ]:
        assert refused(fe, stmt) == construct
    assert len(run_oracle(fe, select(I.ci).distinct())[1]) == 3


# ---------------------------------------------------------------------------
# Statement shapes
# ---------------------------------------------------------------------------


def test_aggregate_only_in_order_by_makes_one_row(fe):
    """``SELECT 1 FROM items ORDER BY count(*)`` is an aggregate query: one row on one
    database, one per shard side by side."""
    fe.load(fe.place([{"qty": i} for i in range(6)]))
    assert len(run_oracle(fe, select(literal(1)).select_from(I).order_by(func.count()))[1]) == 1
    assert refused(fe, select(literal(1)).select_from(I).order_by(func.count())) == \
        "aggregate in ORDER BY without GROUP BY"
    assert refused(fe, select(literal("x")).select_from(I).order_by(func.max(I.qty).desc())) == \
        "aggregate in ORDER BY without GROUP BY"


def test_aggregates_with_filter_merge_exactly(fe):
    """``agg(...) FILTER (WHERE ...)`` merges as ``agg`` over the rows the filter keeps
    (it was refused as an expression over an aggregate)."""
    rows = [{"grp": None if i % 7 == 3 else i % 3, "qty": None if i % 5 == 2 else i * 7 % 11 - 5,
             "amt": None if i % 4 == 1 else D(i * 53 % 97) / 8, "flag": None if i % 6 == 0 else i % 2 == 0,
             "f8": i / 3, "d": dt.date(2024, 1, 1) + dt.timedelta(days=i)} for i in range(30)]
    fe.load(fe.place(rows))
    check(fe, select(func.count().filter(I.qty > 0), func.count(I.amt).filter(I.flag),
                     func.sum(I.amt).filter(I.grp == 1), func.avg(I.qty).filter(I.flag.is_(True)),
                     func.min(I.d).filter(I.qty < 0), func.max(I.f8).filter(I.grp > 0),
                     func.avg(I.amt).filter(I.qty > 0, I.flag)))
    check(fe, select(func.count().filter(I.qty > 100), func.sum(I.qty).filter(I.qty > 100),
                     func.avg(I.amt).filter(I.qty > 100).label("none")))
    check(fe, select(I.grp, func.count().filter(I.qty > 0).label("pos"), func.avg(I.amt).filter(I.flag))
          .group_by(I.grp).having(func.count().filter(I.qty > 0) >= 2)
          .order_by(func.sum(I.qty).filter(I.flag).desc().nulls_last(), I.grp.nulls_first()))
    assert refused(fe, select(func.count(distinct(I.grp)).filter(I.qty > 0))) == "count(DISTINCT)"
    assert refused(fe, select(func.string_agg(I.cc, ",").filter(I.qty > 0))) == "string_agg()"


def test_group_by_a_row_value_grouping_sets_and_order_by_a_row_value(fe):
    """``GROUP BY (a, b)`` groups by a and b; GROUPING SETS and ORDER BY (a, b) are refused
    naming them (they failed on every shard with a syntax or compile error)."""
    fe.load(fe.place([{"grp": i % 3, "flag": i % 2 == 0, "qty": i} for i in range(18)]))
    check(fe, select(func.count(), func.sum(I.qty)).select_from(I).group_by(tuple_(I.grp, I.flag)),
          ordered=False)
    check(fe, select(I.grp, I.flag, func.count()).group_by(tuple_(I.grp, I.flag))
          .order_by(I.grp, I.flag.desc()))
    assert refused(fe, select(func.count()).select_from(I)
                   .group_by(func.grouping_sets(I.grp, I.flag))) == "GROUP BY GROUPING SETS"
    assert refused(fe, select(I.id).order_by(tuple_(I.grp, I.id))) == "ORDER BY a row value"
