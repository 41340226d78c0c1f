"""Planning and merging of cross-shard reads (shardkit._scatter), with no server.

The shards are simulated: each holds some rows, and runs the statement
``plan_scatter`` gives it (its columns, ORDER BY and LIMIT) with a small
reference evaluator written here from SQL's rules.  The merged rows must equal
the same evaluator run over all rows at once, as one database would.
Expected averages and quotients are PostgreSQL's own output (PostgreSQL 15,
``SELECT a::numeric / b::numeric`` and ``avg``).
"""

from __future__ import annotations

import decimal
import functools
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    and_,
    bindparam,
    distinct,
    func,
    intersect,
    literal,
    not_,
    nulls_first,
    or_,
    select,
    union,
    union_all,
)
from sqlalchemy import desc as sa_desc
from sqlalchemy.sql import elements, functions
from sqlalchemy.sql.elements import Label

from shardkit import ScatterRefused
from shardkit._scatter import _code, _reads_a_table, merge_rows, pg_avg, pg_numeric_div, plan_scatter

D = decimal.Decimal

md = MetaData()
t = Table(
    "t", md,
    Column("id", Integer, primary_key=True),
    Column("a", Integer),
    Column("b", String),
    Column("c", Numeric),
)
COLS = ("id", "a", "b", "c")


# ---------------------------------------------------------------------------
# A reference evaluator: what one PostgreSQL database returns for these shapes.
# ---------------------------------------------------------------------------

# Exact sums; no traps, so Infinity + -Infinity is NaN as in PostgreSQL.
_WIDE = decimal.Context(prec=100_000, traps=[])


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, D)) and v != v


def sql_cmp(v1: Any, v2: Any, desc: bool, nulls_first: bool) -> int:
    """-1/0/1: does v1 sort before v2 under ``ORDER BY x [DESC] NULLS FIRST|LAST``."""
    if v1 is None and v2 is None:
        return 0
    if v1 is None:
        return -1 if nulls_first else 1
    if v2 is None:
        return 1 if nulls_first else -1
    n1, n2 = _is_nan(v1), _is_nan(v2)   # NaN: equal to NaN, above every number
    if n1 or n2:
        c = 0 if n1 and n2 else 1 if n1 else -1
    elif v1 == v2:
        return 0
    else:
        c = -1 if v1 < v2 else 1
    return -c if desc else c


def row_sorted(rows: list[Any], keys: Sequence[tuple[Any, bool, bool]]) -> list[Any]:
    """``rows`` sorted by ``keys`` = [(function of a row, desc, nulls_first)], stably."""
    def cmp(r1: Any, r2: Any) -> int:
        for f, desc, nf in keys:
            c = sql_cmp(f(r1), f(r2), desc, nf)
            if c:
                return c
        return 0
    return sorted(rows, key=functools.cmp_to_key(cmp))


def order_spec(clause: Any) -> tuple[Any, bool, bool]:
    """(expression, desc, nulls_first) of an ORDER BY term, PostgreSQL's NULLS default applied."""
    desc, nf, e = False, None, clause
    while True:
        if isinstance(e, elements._label_reference):
            e = e.element
        elif isinstance(e, elements.UnaryExpression) and e.modifier is not None:
            name = e.modifier.__name__
            if name == "desc_op":
                desc = True
            elif name == "nulls_first_op":
                nf = True
            elif name == "nulls_last_op":
                nf = False
            e = e.element
        else:
            break
    return e, desc, desc if nf is None else nf


def value(expr: Any, row: dict[str, Any]) -> Any:
    if isinstance(expr, Label):
        return value(expr.element, row)
    if isinstance(expr, elements.BindParameter):
        return expr.effective_value
    if isinstance(expr, elements.ColumnClause):
        return row[expr.name]
    raise NotImplementedError(repr(expr))


def aggregate(expr: Any, rows: list[dict[str, Any]]) -> Any:
    """An aggregate (or a group key) over one group's rows."""
    if isinstance(expr, Label):
        return aggregate(expr.element, rows)
    if isinstance(expr, functions.FunctionElement):
        name = expr.name.lower()
        args = list(expr.clauses)
        if name == "count" and (not args or getattr(args[0], "name", None) == "*"):
            return len(rows)
        vals = [v for v in (value(args[0], r) for r in rows) if v is not None]
        if name == "count":
            return len(vals)
        if not vals:
            return None
        if name == "sum":
            return functools.reduce(_WIDE.add, vals) if isinstance(vals[0], D) else sum(vals)
        if name in ("min", "max"):
            ordered = sorted(vals, key=functools.cmp_to_key(lambda x, y: sql_cmp(x, y, False, False)))
            return ordered[0] if name == "min" else ordered[-1]
        if name == "avg":
            # The division itself is checked against PostgreSQL's digits in test_pg_avg and
            # test_pg_numeric_div.
            total = functools.reduce(_WIDE.add, vals) if isinstance(vals[0], D) else sum(vals)
            return pg_avg(total, len(vals))
        raise NotImplementedError(name)
    return value(expr, rows[0])


def run_one_database(stmt: Any, rows: list[dict[str, Any]], *, having: Any = None) -> list[tuple[Any, ...]]:
    """What one database returns for ``stmt`` over ``rows``.

    ``having`` is the HAVING clause as a Python predicate over the group's rows
    (SQL's: only groups for which it is true are kept).
    """
    columns = list(stmt.selected_columns)
    order = [order_spec(c) for c in stmt._order_by_clauses]
    groups_by = list(stmt._group_by_clauses)
    is_agg = bool(groups_by) or any(
        isinstance(c.element if isinstance(c, Label) else c, functions.FunctionElement) for c in columns)
    if not is_agg:
        result = plain_rows(stmt, columns, order, rows)
    else:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(value(g, r) for g in groups_by), []).append(r)
        if not groups_by:
            groups = {(): rows}
        kept = [g for g in groups.values() if having is None or having(g)]
        kept = row_sorted(kept, [(functools.partial(aggregate, e), d, nf) for e, d, nf in order])
        result = [tuple(aggregate(c, g) for c in columns) for g in kept]
    offset = stmt._offset or 0
    limit = stmt._limit
    return result[offset: None if limit is None else offset + limit]


def plain_rows(stmt: Any, columns: list[Any], order: list[Any],
               rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """A non-aggregate SELECT over ``rows``: sorted, projected, DISTINCT applied."""
    out = row_sorted(rows, [(functools.partial(value, e), d, nf) for e, d, nf in order])
    result = [tuple(value(c, r) for c in columns) for r in out]
    if stmt._distinct:
        result = list(dict.fromkeys(result))
    return result


def run_shards(stmt: Any, parts: Sequence[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    """Plan ``stmt``, run the shard statement on each part, merge."""
    shard_stmt, plan = plan_scatter(stmt)
    streams = []
    for rows in parts:
        streams.append(run_on_shard(shard_stmt, plan, rows))
    return list(merge_rows(plan, streams))


def run_on_shard(shard_stmt: Any, plan: Any, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The rows one shard returns for the shard statement (as PostgreSQL would)."""
    columns = list(shard_stmt.selected_columns)
    if plan.kind in ("concat", "ordered"):
        assert not shard_stmt._group_by_clauses and not shard_stmt._having_criteria
        order = [order_spec(c) for c in shard_stmt._order_by_clauses]
        result = plain_rows(shard_stmt, columns, order, rows)
        assert not shard_stmt._offset, "the offset applies after the merge, not on the shards"
        limit = shard_stmt._limit
        return result if limit is None else result[:limit]
    # aggregate / group plans: no HAVING, ORDER BY, LIMIT or OFFSET on the shards
    assert not shard_stmt._having_criteria and not shard_stmt._order_by_clauses
    assert shard_stmt._limit is None and not shard_stmt._offset
    groups_by = list(shard_stmt._group_by_clauses)
    if not groups_by:
        return [tuple(aggregate(c, rows) for c in columns)]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(value(g, r) for g in groups_by), []).append(r)
    out = [tuple(aggregate(c, g) for c in columns) for g in groups.values()]
    random.Random(len(out)).shuffle(out)   # a shard returns its groups in no particular order
    return out


def split(rows: list[dict[str, Any]], n: int, seed: int) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    parts: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for r in rows:
        parts[rng.randrange(n)].append(r)
    return parts


def rows_from(values: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(COLS, (i, *v))) for i, v in enumerate(values)]


# ---------------------------------------------------------------------------
# The reference evaluator itself (so a bug there cannot hide one in the code under test)
# ---------------------------------------------------------------------------


def test_reference_sort_follows_postgresql_rules():
    vals = [3, None, 1, 2]
    key = lambda v: v  # noqa: E731
    assert row_sorted(vals, [(key, False, False)]) == [1, 2, 3, None]      # ASC (NULLS LAST)
    assert row_sorted(vals, [(key, True, True)]) == [None, 3, 2, 1]        # DESC (NULLS FIRST)
    assert row_sorted(vals, [(key, False, True)]) == [None, 1, 2, 3]
    assert row_sorted(vals, [(key, True, False)]) == [3, 2, 1, None]
    assert order_spec(t.c.a.desc())[1:] == (True, True)
    assert order_spec(t.c.a)[1:] == (False, False)
    assert order_spec(nulls_first(t.c.a.asc()))[1:] == (False, True)


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------


def test_ordered_plan_asks_each_shard_for_limit_plus_offset_rows():
    stmt = select(t.c.id, t.c.b).order_by(t.c.a.desc(), t.c.id).limit(5).offset(7)
    shard_stmt, plan = plan_scatter(stmt)
    assert plan.kind == "ordered"
    assert (plan.limit, plan.offset, plan.visible) == (5, 7, 2)
    assert shard_stmt._limit == 12 and not shard_stmt._offset
    # the sort keys travel as extra trailing columns
    assert len(shard_stmt.selected_columns) == 4
    assert list(shard_stmt.selected_columns.keys())[:2] == ["id", "b"]


def test_offset_without_limit_is_not_sent_to_the_shards():
    shard_stmt, plan = plan_scatter(select(t.c.id).order_by(t.c.id).offset(3))
    assert shard_stmt._limit is None and not shard_stmt._offset
    assert (plan.limit, plan.offset) == (None, 3)


def test_unordered_plan_concatenates():
    shard_stmt, plan = plan_scatter(select(t.c.id, t.c.a).limit(4))
    assert plan.kind == "concat" and shard_stmt._limit == 4
    parts = [[(1, 1), (2, 2)], [(3, 3), (4, 4), (5, 5)], []]
    got = list(merge_rows(plan, parts))
    assert len(got) == 4 and set(got) <= {r for p in parts for r in p}


def test_core_table_in_the_select_list_keeps_all_its_columns():
    stmt = select(t).order_by(t.c.a.desc(), t.c.id)
    rows = rows_from([(i % 3, "x", D(i)) for i in range(9)])
    assert run_shards(stmt, split(rows, 3, 1)) == run_one_database(stmt, rows)
    assert plan_scatter(stmt)[1].visible == len(COLS)


def test_aggregate_plan_keeps_the_callers_column_names_first():
    stmt = select(func.count().label("n"), t.c.b, func.avg(t.c.a), func.max(t.c.a), func.max(t.c.c)) \
        .group_by(t.c.b).having(func.sum(t.c.a) > 3).order_by(func.min(t.c.a))
    shard_stmt, plan = plan_scatter(stmt)
    assert plan.kind == "group" and plan.n_outputs == 5
    assert list(shard_stmt.selected_columns.keys())[:5] == list(stmt.selected_columns.keys())
    assert not shard_stmt._having_criteria and not shard_stmt._order_by_clauses


# ---------------------------------------------------------------------------
# k-way merge: order, NULLS FIRST/LAST, several columns
# ---------------------------------------------------------------------------

SMALL = rows_from([
    (None, "b", D("1.5")), (2, None, D("-1")), (2, "a", None), (None, None, D("0")),
    (1, "B", D("1.50")), (3, "a", D("2")), (1, "\u00e9", None), (2, "", D("10")),
])


@pytest.mark.parametrize("order,expected_ids", [
    ((t.c.a, t.c.id), [4, 6, 1, 2, 7, 5, 0, 3]),
    ((t.c.a.desc(), t.c.id), [0, 3, 5, 1, 2, 7, 4, 6]),
    ((t.c.a.nulls_first(), t.c.id.desc()), [3, 0, 6, 4, 7, 2, 1, 5]),
    ((t.c.a.desc().nulls_last(), t.c.id), [5, 1, 2, 7, 4, 6, 0, 3]),
    ((t.c.b, t.c.id), [7, 4, 2, 5, 0, 6, 1, 3]),             # code point order: '' < 'B' < 'a' < 'b' < 'é'
    ((t.c.b.desc().nulls_last(), t.c.a.nulls_first(), t.c.id), [6, 0, 2, 5, 4, 7, 3, 1]),
    ((t.c.c.desc(), t.c.id.desc()), [6, 2, 7, 5, 4, 0, 3, 1]),  # 1.5 = 1.50: the tie goes to id
])
def test_merge_order_matches_hand_computed_postgresql_order(order, expected_ids):
    stmt = select(t.c.id).order_by(*order)
    assert [r[0] for r in run_one_database(stmt, SMALL)] == expected_ids   # the reference agrees
    for seed in range(6):
        for n in (1, 2, 3, 8):
            assert [r[0] for r in run_shards(stmt, split(SMALL, n, seed))] == expected_ids


def test_merge_with_label_order_terms():
    lab = t.c.a.label("x")
    stmt = select(t.c.id, lab).order_by(lab.desc().nulls_last(), t.c.id)
    assert [r[0] for r in run_shards(stmt, split(SMALL, 3, 0))] == [5, 1, 2, 7, 4, 6, 0, 3]


def _show(v: Any) -> Any:
    return "NaN" if _is_nan(v) else None if v is None else float(v)


@pytest.mark.parametrize("kind", [D, float])
def test_nan_sorts_above_every_number(kind):
    """PostgreSQL orders numeric and float NaN after +Infinity, and takes NaN = NaN.

    Expected values are PostgreSQL's for these rows (numeric and double precision alike).
    """
    nan, inf = kind("NaN"), kind("Infinity")
    rows = rows_from([(None, None, v) for v in (nan, kind(1), None, inf, nan, kind(-5), -inf)])
    for n, seed in ((2, 0), (3, 4), (7, 1)):
        parts = split(rows, n, seed)
        got = [r[0] for r in run_shards(select(t.c.id).order_by(t.c.c, t.c.id), parts)]
        assert got == [6, 5, 1, 3, 0, 4, 2]
        got = [r[0] for r in run_shards(select(t.c.id).order_by(t.c.c.desc(), t.c.id), parts)]
        assert got == [2, 0, 4, 3, 1, 5, 6]
        got = run_shards(select(func.max(t.c.c), func.min(t.c.c), func.count(t.c.c)), parts)
        assert [tuple(_show(v) for v in r) for r in got] == [("NaN", -math.inf, 6.0)]
        got = run_shards(select(t.c.c, func.count()).group_by(t.c.c).order_by(t.c.c), parts)
        assert [(_show(v), c) for v, c in got] == [
            (-math.inf, 1), (-5.0, 1), (1.0, 1), (math.inf, 1), ("NaN", 2), (None, 1)]
        got = run_shards(select(t.c.c).distinct().order_by(t.c.c.desc()), parts)
        assert [_show(v) for (v,) in got] == [None, "NaN", math.inf, 1.0, -5.0, -math.inf]
        got = run_shards(select(t.c.c, func.count()).group_by(t.c.c).having(func.max(t.c.c) > 10 ** 9)
                         .order_by(t.c.c), parts)
        assert [(_show(v), c) for v, c in got] == [(math.inf, 1), ("NaN", 2)]


# ---------------------------------------------------------------------------
# Property: merging per-shard sorted lists equals sorting the concatenation
# ---------------------------------------------------------------------------

values_a = st.one_of(st.none(), st.integers(-3, 3))
values_b = st.one_of(st.none(), st.text(alphabet="aAbZ \u00e9\u65e5", max_size=2))
values_c = st.one_of(st.none(), st.integers(-50, 50).map(lambda n: D(n).scaleb(-1)))
table_rows = st.lists(st.tuples(values_a, values_b, values_c), max_size=40).map(rows_from)
terms = st.lists(st.tuples(st.sampled_from(("a", "b", "c")), st.booleans(),
                           st.sampled_from((None, "first", "last"))),
                 min_size=1, max_size=3, unique_by=lambda x: x[0])


def _clause(name: str, desc: bool, nulls: str | None) -> Any:
    c = t.c[name].desc() if desc else t.c[name].asc()
    return c.nulls_first() if nulls == "first" else c.nulls_last() if nulls == "last" else c


@settings(max_examples=300, deadline=None)
@given(rows=table_rows, terms=terms, id_desc=st.booleans(), n=st.integers(1, 6), seed=st.integers(0, 99),
       limit=st.one_of(st.none(), st.integers(0, 45)), offset=st.integers(0, 45),
       selected=st.sampled_from([("id",), ("id", "b"), ("c", "a", "id")]))
def test_property_ordered_merge_equals_sorting_everything(rows, terms, id_desc, n, seed, limit, offset,
                                                          selected):
    order = [_clause(*x) for x in terms] + [t.c.id.desc() if id_desc else t.c.id]   # total order
    stmt = select(*(t.c[c] for c in selected)).order_by(*order)
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    assert run_shards(stmt, split(rows, n, seed)) == run_one_database(stmt, rows)


@settings(max_examples=200, deadline=None)
@given(rows=table_rows, terms=terms, n=st.integers(1, 6), seed=st.integers(0, 99))
def test_property_merge_with_ties_orders_the_sort_columns(rows, terms, n, seed):
    """Without a unique tiebreaker only the sort columns' sequence is determined."""
    stmt = select(t.c.id, t.c.a, t.c.b, t.c.c).order_by(*(_clause(*x) for x in terms))
    got = run_shards(stmt, split(rows, n, seed))
    want = run_one_database(stmt, rows)
    idx = [COLS.index(x[0]) for x in terms]
    assert [tuple(r[i] for i in idx) for r in got] == [tuple(r[i] for i in idx) for r in want]
    assert sorted(got, key=lambda r: r[0]) == sorted(want, key=lambda r: r[0])


@settings(max_examples=150, deadline=None)
@given(rows=table_rows, n=st.integers(1, 6), seed=st.integers(0, 99),
       limit=st.one_of(st.none(), st.integers(0, 10)), offset=st.integers(0, 10), desc=st.booleans())
def test_property_distinct_equals_one_database(rows, n, seed, limit, offset, desc):
    stmt = select(t.c.b, t.c.a).distinct().order_by(_clause("b", desc, None), t.c.a.nulls_first())
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    assert run_shards(stmt, split(rows, n, seed)) == run_one_database(stmt, rows)


# ---------------------------------------------------------------------------
# LIMIT / OFFSET after the merge
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 7, 19, 20, 25])
@pytest.mark.parametrize("limit", [None, 0, 1, 3, 20, 50])
def test_pages(limit, offset):
    rows = rows_from([(i % 4 if i % 5 else None, str(i % 3), None) for i in range(20)])
    stmt = select(t.c.id, t.c.a).order_by(t.c.a.desc(), t.c.id)
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    want = run_one_database(stmt, rows)
    assert len(want) == max(0, min(20 - offset, 20 if limit is None else limit))
    for n in (1, 2, 5):
        assert run_shards(stmt, split(rows, n, offset)) == want


# ---------------------------------------------------------------------------
# Aggregates
# ---------------------------------------------------------------------------


def test_aggregate_partials_combine():
    stmt = select(func.count(), func.count(t.c.a), func.sum(t.c.a), func.min(t.c.b), func.max(t.c.b),
                  func.avg(t.c.a), func.sum(t.c.c), func.max(t.c.c))
    rows = rows_from([(1, "b", D("0.10")), (None, None, None), (2, "a", D("0.2")), (2, "c", D("-7")),
                      (None, "", None)])
    want = [(5, 3, 5, "", "c", D("1.6666666666666667"), D("-6.70"), D("0.2"))]
    assert run_one_database(stmt, rows) == want
    for parts in (split(rows, 3, 0), [rows, [], []], [[], [], rows[:1], rows[1:]], [[r] for r in rows]):
        got = run_shards(stmt, parts)
        assert got == want and str(got[0][6]) == "-6.70"


def test_aggregates_over_no_rows():
    stmt = select(func.count(), func.count(t.c.a), func.sum(t.c.a), func.min(t.c.b), func.avg(t.c.c))
    want = [(0, 0, None, None, None)]
    assert run_shards(stmt, [[], [], []]) == want
    # no stream at all (every shard failed in a partial read) still gives one row
    _, plan = plan_scatter(stmt)
    assert list(merge_rows(plan, [])) == want


def test_numeric_sums_are_exact_beyond_28_digits():
    big = [D("12345678901234567890.123456789012"), D("98765432109876543210.987654321098"),
           D("-0.000000000001"), D("11111111111111111111111111111")]
    rows = rows_from([(None, None, v) for v in big])
    stmt = select(func.sum(t.c.c), func.avg(t.c.c))
    for parts in ([[r] for r in rows], [rows[:2], rows[2:]], [rows[::2], rows[1::2]]):
        total, mean = run_shards(stmt, parts)[0]
        # PostgreSQL: SELECT sum(x), avg(x) over these four values
        assert str(total) == "11111111222222222122222222212.111111110109"
        assert str(mean) == "2777777805555555530555555553.027777777527"


@pytest.mark.parametrize("a,b,expected", [
    # (a, b, SELECT a::numeric / b::numeric) on PostgreSQL 15
    ("1", "2", "0.50000000000000000000"),
    ("2", "3", "0.66666666666666666667"),
    ("10", "3", "3.3333333333333333"),
    ("-10", "3", "-3.3333333333333333"),
    ("1", "7", "0.14285714285714285714"),
    ("12345.6", "7", "1763.6571428571428571"),
    ("0.00012", "9", "0.000013333333333333333333"),
    ("0", "5", "0.00000000000000000000"),
    ("0.00", "4", "0.00000000000000000000"),
    ("99999999", "3", "33333333.000000000000"),
    ("1.000000000000000000005", "3", "0.333333333333333333335"),
    ("123456789012345678901234567890.123", "11", "11223344455667788991021324353.648"),
    ("5", "8", "0.62500000000000000000"),
    ("-1", "6", "-0.16666666666666666667"),
    ("7.5", "2", "3.7500000000000000"),
    ("0.5", "1", "0.50000000000000000000"),
    ("10000", "10000", "1.00000000000000000000"),
    ("9999", "10000", "0.99990000000000000000"),
    ("1E-20", "3", "0.0000000000000000000033333333333333333333"),
])
def test_pg_numeric_div(a, b, expected):
    # as_tuple: the digits and the exponent (the scale), not just the value
    assert pg_numeric_div(D(a), D(b)).as_tuple() == D(expected).as_tuple()


@pytest.mark.parametrize("total,count,expected", [
    # SELECT avg(x) FROM unnest(...) on PostgreSQL 15
    (3, 2, "1.5000000000000000"),                           # avg(int4) of 1, 2
    (5, 3, "1.6666666666666667"),                           # 1, 2, 2
    (1, 2, "0.50000000000000000000"),                       # -3, 4
    (4294967295, 3, "1431655765.00000000"),                 # 2147483647, 2147483647, 1
    (D("0.55"), 3, "0.18333333333333333333"),               # numeric 0.10, 0.20, 0.25
    (D("NaN"), 4, "NaN"),
    (D("Infinity"), 2, "Infinity"),
    (D("-Infinity"), 2, "-Infinity"),
])
def test_pg_avg(total, count, expected):
    assert pg_avg(total, count).as_tuple() == D(expected).as_tuple()


def test_numeric_infinities_and_nan_sum_like_postgresql():
    """sum over {1, Infinity, -Infinity} is NaN; over {1, Infinity} is Infinity."""
    stmt = select(func.sum(t.c.c), func.avg(t.c.c))
    rows = rows_from([(None, None, D(1)), (None, None, D("Infinity")), (None, None, D("-Infinity"))])
    got = run_shards(stmt, [[r] for r in rows])[0]
    assert [str(v) for v in got] == ["NaN", "NaN"]
    got = run_shards(stmt, [[rows[0]], [rows[1]]])[0]
    assert [str(v) for v in got] == ["Infinity", "Infinity"]


# ---------------------------------------------------------------------------
# GROUP BY, HAVING
# ---------------------------------------------------------------------------

GROUPED_ROWS = rows_from([
    (1, "x", D("1")), (None, "x", D("2")), (5, "y", None), (None, "z", D("3")), (2, "y", D("4")),
    (None, "z", None), (3, None, D("5")), (None, None, D("6")), (4, "x", D("7")),
])   # per b: x: a = 1, NULL, 4;  y: 5, 2;  z: NULL, NULL;  NULL: 3, NULL


@pytest.mark.parametrize("having,python,expected_bs", [
    (func.max(t.c.a) > 3, lambda g: _max_a(g) is not None and _max_a(g) > 3, ["x", "y"]),
    # NOT (NULL) is NULL: the all-NULL group is not kept either way
    (not_(func.max(t.c.a) > 3), lambda g: _max_a(g) is not None and not _max_a(g) > 3, [None]),
    (or_(func.max(t.c.a) > 3, func.count() > 1), lambda g: True, ["x", "y", "z", None]),
    (and_(func.max(t.c.a) >= 3, func.count(t.c.a) < 2),
     lambda g: _max_a(g) is not None and _max_a(g) >= 3 and sum(r["a"] is not None for r in g) < 2, [None]),
    (and_(func.count() == 3, func.sum(t.c.c) != 9), lambda g: len(g) == 3 and sum(
        r["c"] for r in g if r["c"] is not None) != 9, ["x"]),
    (func.max(t.c.a) != literal(None, Integer), lambda g: False, []),          # x != NULL is NULL
    (func.min(t.c.a) <= bindparam("p", 2), lambda g: (_min_a(g) or 99) <= 2, ["x", "y"]),
    (t.c.b > "x", lambda g: g[0]["b"] is not None and g[0]["b"] > "x", ["y", "z"]),
    (func.avg(t.c.a) >= D("3.5"), lambda g: _avg_a(g) is not None and _avg_a(g) >= D("3.5"), ["y"]),
])
def test_having_is_evaluated_after_the_merge_with_sql_null_logic(having, python, expected_bs):
    stmt = select(t.c.b, func.count(), func.max(t.c.a)).group_by(t.c.b).having(having) \
        .order_by(t.c.b.nulls_last())
    want = run_one_database(stmt, GROUPED_ROWS, having=python)
    assert [r[0] for r in want] == expected_bs
    for seed in range(5):
        for n in (1, 3, 9):
            assert run_shards(stmt, split(GROUPED_ROWS, n, seed)) == want


def _max_a(g: list[dict[str, Any]]) -> Any:
    vals = [r["a"] for r in g if r["a"] is not None]
    return max(vals) if vals else None


def _avg_a(g: list[dict[str, Any]]) -> Any:
    vals = [r["a"] for r in g if r["a"] is not None]
    return D(sum(vals)) / len(vals) if vals else None


def _min_a(g: list[dict[str, Any]]) -> Any:
    vals = [r["a"] for r in g if r["a"] is not None]
    return min(vals) if vals else None


def test_group_order_limit_offset_after_the_merge():
    stmt = select(t.c.b, func.sum(t.c.c).label("s")).group_by(t.c.b) \
        .order_by(func.count().desc(), t.c.b.nulls_first()).limit(2).offset(1)
    want = run_one_database(stmt, GROUPED_ROWS)
    # counts: x 3, y 2, z 2, NULL 2 -> x, NULL, y, z
    assert want == [(None, D("11")), ("y", D("4"))]
    for seed in range(5):
        assert run_shards(stmt, split(GROUPED_ROWS, 4, seed)) == want


@settings(max_examples=200, deadline=None)
@given(rows=table_rows, n=st.integers(1, 6), seed=st.integers(0, 99), key=st.sampled_from(("a", "b")),
       agg=st.sampled_from(("a", "c")), threshold=st.one_of(st.none(), st.integers(0, 4)),
       desc=st.booleans(), limit=st.one_of(st.none(), st.integers(0, 5)), offset=st.integers(0, 3))
def test_property_grouped_merge_equals_one_database(rows, n, seed, key, agg, threshold, desc, limit, offset):
    k, a = t.c[key], t.c[agg]
    stmt = select(k, func.count(), func.count(a), func.sum(a), func.min(a), func.max(a), func.avg(a)) \
        .group_by(k).order_by(k.desc() if desc else k)
    having = None
    if threshold is not None:
        stmt = stmt.having(func.count() > threshold)
        having = lambda g: len(g) > threshold  # noqa: E731
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    assert run_shards(stmt, split(rows, n, seed)) == run_one_database(stmt, rows, having=having)


# ---------------------------------------------------------------------------
# DISTINCT
# ---------------------------------------------------------------------------


def test_distinct_removes_duplicates_across_shards():
    rows = rows_from([(i % 3, "ab"[i % 2], None) for i in range(12)])
    stmt = select(t.c.a, t.c.b).distinct().order_by(t.c.b.desc(), t.c.a).limit(4).offset(1)
    want = run_one_database(stmt, rows)
    assert want == [(1, "b"), (2, "b"), (0, "a"), (1, "a")]
    assert run_shards(stmt, split(rows, 4, 3)) == want


def test_column_level_distinct_is_a_select_distinct():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stmt in (select(distinct(t.c.a)).order_by(t.c.a), select(t.c.a.distinct())):
            _, plan = plan_scatter(stmt)
            assert plan.distinct
            got = run_shards_raw(stmt, [[(0,), (1,), (2,)], [(0,), (2,)], [(1,)]])
            assert sorted(got) == [(0,), (1,), (2,)]


def run_shards_raw(stmt: Any, streams: list[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    _, plan = plan_scatter(stmt)
    width = plan.visible + len(plan.sort_keys)
    return list(merge_rows(plan, [[r + r[:1] * (width - len(r)) for r in s] for s in streams]))


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------

REFUSED = [
    (select(func.count(distinct(t.c.a))), "count(DISTINCT)"),
    (select(func.sum(t.c.a.distinct())), "sum(DISTINCT)"),
    (select(t.c.b).group_by(t.c.b).having(func.count(distinct(t.c.a)) > 1), "count(DISTINCT)"),
    (select(t.c.id, func.row_number().over(order_by=t.c.id)), "window function"),
    (select(t.c.id, func.sum(t.c.a).over(partition_by=t.c.b)), "window function"),
    (select(t.c.id).order_by(func.rank().over(order_by=t.c.a)), "window function"),
    (select(func.sum(t.c.a) * 2), "expression over sum()"),
    (select(func.string_agg(t.c.b, ",")), "string_agg()"),
    (select(func.regr_count(t.c.a, t.c.id)), "regr_count()"),
    (select(func.percentile_cont(0.5).within_group(t.c.a)), "percentile_cont"),
    (intersect(select(t.c.id), select(t.c.id)), "compound select"),
    (select(t.c.id).order_by(t.c.id).fetch(2), "FETCH FIRST"),
    (select(t.c.id).order_by(t.c.id).limit(bindparam("n")), "non-literal LIMIT/OFFSET"),
    (select(t.c.b, func.count()).group_by(t.c.b).having(func.count().between(1, 3)), "HAVING expression"),
    (select(t.c.a.label("x")).order_by("nothing_of_that_name"), "ORDER BY by label name"),
    (select(t.c.a, func.count()).group_by(t.c.b), "ungrouped column"),
    (select(func.count(t.c.a)).distinct(), "DISTINCT with aggregates"),
    (select(t.c.b).distinct().order_by(t.c.a), "DISTINCT with ORDER BY not in select list"),
    (select(t.c.id).having(t.c.id > 1), "HAVING"),
]


@pytest.mark.parametrize("stmt,construct", REFUSED, ids=[c for _, c in REFUSED])
def test_unmergeable_constructs_are_refused(stmt, construct):
    with pytest.raises(ScatterRefused) as ei:
        plan_scatter(stmt)
    assert ei.value.construct == construct or (construct in (ei.value.construct or ""))
    assert ei.value.statement is stmt


def test_union_all_and_union_run_whole_on_each_shard_and_merge_as_one_select():
    a, b = select(t.c.id, t.c.b).where(t.c.a > 0), select(t.c.id, t.c.b).where(t.c.a < 0)
    shard_stmt, plan = plan_scatter(union_all(a, b).order_by(t.c.b.desc(), "id").limit(2).offset(3))
    assert (plan.kind, plan.limit, plan.offset, plan.distinct) == ("ordered", 2, 3, False)
    assert shard_stmt._limit == 5 and shard_stmt._offset_clause is None
    assert [(k.position, k.descending, k.nulls_first) for k in plan.sort_keys] == [
        (1, True, True), (0, False, False)]
    # each shard's rows in that order: b DESC NULLS FIRST, id
    streams = [[(4, None), (1, "b"), (1, "a")], [(2, "b"), (3, "a")]]
    assert list(merge_rows(plan, streams)) == [(1, "a"), (3, "a")]
    _, plan = plan_scatter(union(a, b))
    assert plan.distinct and plan.kind == "concat"
    assert sorted(merge_rows(plan, [[(1, "a"), (2, None)], [(1, "a"), (2, None), (3, "c")]])) == [
        (1, "a"), (2, None), (3, "c")]


def test_order_and_group_by_a_name_merge_by_what_it_names():
    """``order_by("x")`` / ``desc("x")`` / ``group_by("x")`` name the select list's label (or a
    column of the FROM), as SQLAlchemy renders them."""
    shard_stmt, plan = plan_scatter(select(t.c.id, t.c.a.label("x")).order_by(sa_desc("x"), "id"))
    assert [k.descending for k in plan.sort_keys] == [True, False]
    # each shard's rows carry the sort keys the merge added: x, then id
    assert [str(c) for c in list(shard_stmt.selected_columns)[2:]] == ["t.a", "t.id"]
    streams = [[(1, 5, 5, 1), (2, 3, 3, 2)], [(3, 4, 4, 3)]]
    assert list(merge_rows(plan, streams)) == [(1, 5), (3, 4), (2, 3)]
    _, plan = plan_scatter(select(t.c.b.label("g"), func.count().label("n")).group_by("g"))
    assert plan.group_positions, plan   # (merged by group: the integration tests compare the rows)


def test_mergeable_neighbours_of_refused_constructs_are_planned():
    for stmt in (
        select(func.count(t.c.a)),
        select(func.min(distinct(t.c.a)), func.max(t.c.a.distinct())),   # DISTINCT changes nothing there
        select(t.c.b).distinct().order_by(t.c.b.desc()),
        select(t.c.b.label("x")).distinct().order_by(t.c.b),
        select(func.abs(t.c.a), func.count()).group_by(func.abs(t.c.a)).order_by(func.abs(t.c.a)),
    ):
        plan_scatter(stmt)


def test_exists_merges_as_any_shard():
    from sqlalchemy import column, exists, table

    t = table("t", column("id"), column("name"))
    stmt, plan = plan_scatter(select(exists().where(t.c.name == "x"), exists().where(t.c.id == 1)))
    assert plan.kind == "any"
    assert list(merge_rows(plan, [[(False, False)], [(True, False)], [(False, False)]])) == [(True, False)]
    assert list(merge_rows(plan, [[(False, False)], [(False, False)]])) == [(False, False)]


def test_select_without_from_over_other_subqueries_is_refused():
    from sqlalchemy import column, table
    t = table("t", column("id"))
    with pytest.raises(ScatterRefused, match="without FROM"):
        plan_scatter(select(select(func.count()).select_from(t).scalar_subquery()))


def test_aggregate_inside_a_correlated_subquery_is_not_the_outer_querys():
    from sqlalchemy import column, table

    t = table("t", column("id"))
    u = table("u", column("t_id"))
    per_row = select(func.count()).where(u.c.t_id == t.c.id).scalar_subquery()
    stmt, plan = plan_scatter(select(t.c.id, per_row.label("n")).order_by(t.c.id))
    assert plan.kind == "ordered"
    with pytest.raises(ScatterRefused, match="expression over count"):
        plan_scatter(select(t.c.id, (func.count() + per_row).label("n")).group_by(t.c.id))


def test_joins_that_may_repeat_an_entity():
    # joinedload + LIMIT across shards is refused only over joins that can repeat the entity.
    from models import Order, User
    from sqlalchemy import select

    from shardkit._session import _may_repeat_entities

    assert not _may_repeat_entities(select(User))
    assert not _may_repeat_entities(select(Order).join(Order.user))        # many-to-one
    assert _may_repeat_entities(select(User).join(User.orders))            # one-to-many
    assert _may_repeat_entities(select(User).join(Order, Order.user_id == User.id))
    assert _may_repeat_entities(select(User, Order).where(Order.user_id == User.id))


@pytest.mark.parametrize("sql, reads", [
    ("(SELECT pg_sleep(30.5))::text IS NOT NULL", False),
    ("(SELECT true FROM pg_sleep(CASE WHEN current_setting('port') = '1' THEN 5 ELSE 0 END))", False),
    ("select 1 from (values (1)) v", False),
    ("(SELECT 1 FROM f(1) g WHERE g.x IN (1, 2)), 5", False),
    ("select 1 from s.f(2)", False),
    ("(select substring(x from 2))", False),
    ("kind <> 'select 1 from t'", False),
    ("EXISTS (SELECT 1 FROM hx_lines l WHERE l.qty = 1)", True),
    ("SELECT 1 FROM generate_series(1, 3) g, orders o", True),
    ("qty > (SELECT avg(qty) FROM public.items)", True),
    ('(select x from "Odd"."T")', True),
    ("select 1 from (select 2 from orders) q", True),
    ("SELECT 1 FROM a JOIN b ON true", True),
    ("(SELECT 1 FROM f(1) JOIN orders ON true)", True),
    ("SELECT 1 FROM (VALUES (1)) v, orders", True),
    ("select 1 from f(2", True),
])
def test_sql_text_subquery_reading_a_table_is_told_from_one_reading_none(sql, reads):
    """A cross-shard read refuses SQL text with a subquery that may read a table (each
    shard would read only its own rows), not one that reads none (a pg_sleep)."""
    assert _reads_a_table(_code(sql)) is reads
