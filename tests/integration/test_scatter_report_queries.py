"""Analysts' report queries: cross-shard reads written with SQLAlchemy 2.x Core
and ORM, each compared with ONE plain database holding every row (``hx_oracle`` of
``test_scatter_exact``, whose ``hx`` fixture and ``check``/``check_or_refused``
helpers this module reuses): the same rows, with types and exact digits, or
``ScatterRefused`` naming the construct.

Defects found (each test below failed before the fix):

* ``HAVING`` on a group key of a type whose Python values do not order as PostgreSQL's
  (a ``TypeDecorator``, a non-native ``Enum``, text under a column's ICU collation)
  returned the wrong groups; ``ORDER BY`` the same key is refused.
* ``HAVING`` comparing a bigint (a group key, ``max(bigint)``) with a float compared
  exactly in Python; PostgreSQL compares in float8 (``2^62 + 44 > 2.0^62`` is false).
* ``ORDER BY`` / ``HAVING`` a group key with ``.collate("C")``, which the README tells a
  database under another collation to write, was refused as "neither an aggregate nor a
  group key" in a grouped query (one database answers it; a plain query merges it).
* ``percentile_cont(...) WITHIN GROUP (...)`` (and ``mode()``, hypothetical ``rank()``)
  was refused as an "expression over percentile_cont()", advising to select
  ``percentile_cont(...)`` itself, which is refused just the same.

The rest pins what an analyst writes (CTEs, derived tables, scalar subqueries, window
functions, FILTER, bool/string/array/json/ordered-set aggregates, ORDER BY aggregates with
LIMIT, HAVING on unselected aggregates, GROUP BY expressions, compounds, DISTINCT ON,
ROLLUP/CUBE/GROUPING SETS, avg of integers, empty sets, text min/max), in Core and ORM.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import (
    Integer,
    Numeric,
    SmallInteger,
    case,
    cast,
    desc,
    except_,
    exists,
    extract,
    func,
    intersect,
    literal,
    select,
    union,
    union_all,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from test_scatter import _distinct_on
from sqlalchemy.orm import Session
from test_scatter_exact import (  # noqa: F401 - hx is the fixture
    HItem,
    HLine,
    HRef,
    Size,
    base_items,
    check,
    check_or_refused,
    exact,
    hx,
)

import shardkit

pytestmark = pytest.mark.integration

I, L, R = HItem, HLine, HRef
D = decimal.Decimal


def load_report_data(hx) -> None:
    items = base_items(hx, 45)
    lines = [{"item_id": r["id"], "no": j, "qty": (r["id"] * 3 + j) % 7 - 2, "name": f"n{(r['id'] + j) % 5}"}
             for r in items for j in range(r["id"] % 4)]
    refs = [{"cc": "de", "region": "eu"}, {"cc": "fr", "region": "eu"}, {"cc": "us", "region": "am"}]
    hx.load(items, lines, refs)


@pytest.fixture
def report(hx):
    load_report_data(hx)
    return hx


# ---------------------------------------------------------------------------
# HAVING on group keys Python does not order as PostgreSQL does
# ---------------------------------------------------------------------------


def load_typed(hx) -> None:
    """Priority: low(1) < medium(2) < high(3) in the database, names in Python; Size (a
    non-native Enum) stored by name ('LARGE' < 'MEDIUM' < 'SMALL'); label under ICU
    ('a' < 'A' < 'B' < 'c', not code point order)."""
    rows = [("low", Size.SMALL, "a"), ("medium", Size.MEDIUM, "B"), ("high", Size.LARGE, "c"),
            ("high", Size.SMALL, "A")]
    hx.load(hx.place([{"prio": p, "size": z, "label": lab, "grp": i % 2}
                      for i, (p, z, lab) in enumerate(rows)]))


@pytest.mark.parametrize("stmt", [
    select(I.prio, func.count()).group_by(I.prio).having(I.prio > "low"),
    select(I.size, func.count()).group_by(I.size).having(I.size > Size.MEDIUM),
    select(I.label, func.count()).group_by(I.label).having(I.label > "a"),
    select(I.label, func.count()).group_by(I.label).having(I.label.collate("und-x-icu") > "a"),
], ids=["typedecorator", "enum-by-name", "icu-column", "icu-collate"])
def test_having_on_a_group_key_python_orders_otherwise(hx, stmt):
    """One database: prio > 1 keeps medium and high; the merge compared 'high' > 'low'
    (false) and dropped it. Exact or refused, as ORDER BY the same key is."""
    load_typed(hx)
    construct = check_or_refused(hx, stmt, ordered=False)
    assert construct is None or construct.startswith("HAVING"), construct


def test_having_compares_bigint_with_float_in_float(hx):
    """``max(big) > 4.611686018427388e18`` (2.0**62): PostgreSQL casts the bigint to
    float8, where 2^62 + 44 is 2^62: not greater. Python compares int and float exactly."""
    hx.load(base_items(hx))
    top = float(2**62)
    check(hx, select(I.grp, func.max(I.big)).group_by(I.grp).having(func.max(I.big) > top), ordered=False)
    check(hx, select(I.big, func.count()).group_by(I.big).having(I.big > top), ordered=False)
    check(hx, select(I.big, func.count()).group_by(I.big).having(I.big == top), ordered=False)
    check(hx, select(I.grp, func.sum(I.qty)).group_by(I.grp).having(func.sum(I.qty) > 2.5)
          .order_by(I.grp))


# ---------------------------------------------------------------------------
# .collate("C") on a group key in ORDER BY / HAVING
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stmt", [
    select(I.name, func.count()).group_by(I.name).order_by(I.name.collate("C").desc().nulls_last()),
    select(I.name, func.count()).group_by(I.name).having(I.name.collate("C") > "a")
    .order_by(I.name.collate("C")),
    select(I.grp, func.max(I.name).label("mx")).group_by(I.grp)
    .order_by(func.max(I.name).collate("C"), I.grp.nulls_first()),
    select(I.label, func.count()).group_by(I.label).order_by(I.label.collate("C")),
], ids=["order-key", "having-key", "order-aggregate", "icu-column-ordered-under-c"])
def test_group_key_under_collate_c(report, stmt):
    """The README: in a database whose collation is not C, add ``.collate("C")``; in a
    grouped query that was refused ("neither an aggregate nor a group key")."""
    check(report, stmt)


def test_within_group_aggregates_are_refused_naming_the_aggregate(report):
    for stmt, name in [
        (select(func.percentile_cont(0.5).within_group(I.qty)), "percentile_cont()"),
        (select(I.grp, func.percentile_disc(0.5).within_group(I.qty)).group_by(I.grp), "percentile_disc()"),
        (select(func.mode().within_group(I.grp)), "mode()"),
        (select(func.rank(5).within_group(I.qty)), "rank()"),
    ]:
        with report.Session() as s, pytest.raises(shardkit.ScatterRefused) as e:
            s.execute(stmt).all()
        assert e.value.construct == name
        assert "expression over" not in str(e.value)


# ---------------------------------------------------------------------------
# What an analyst writes: exact, or refused naming the construct
# ---------------------------------------------------------------------------


def pos_cte() -> Any:
    return select(I.id, I.grp, I.qty, I.amt).where(I.qty > 0).cte("pos")


per_item = select(L.item_id, func.count().label("n"), func.sum(L.qty).label("s")).group_by(L.item_id)
n_lines = select(func.count(L.no)).where(L.item_id == I.id).scalar_subquery()
day = func.date_trunc("day", I.ts)
dow = extract("dow", I.ts)
bucket = case((I.qty < 0, "neg"), (I.qty == 0, "zero"), else_="pos")
total = func.sum(I.qty).label("total")


def _with(make: Callable[[], Any], build: Callable[[Any], Any]) -> Callable[[], Any]:
    return lambda: build(make())


EXACT: dict[str, Callable[[], Any]] = {
    "cte-grouped-over": _with(pos_cte, lambda c: select(c.c.grp, func.count(), func.sum(c.c.amt), func.avg(c.c.qty))
                              .group_by(c.c.grp).order_by(c.c.grp.nulls_first())),
    "cte-joined-on-key": _with(pos_cte, lambda c: select(I.id, c.c.qty).join(c, c.c.id == I.id).order_by(I.id)),
    "cte-self-join-on-key": _with(pos_cte, lambda c: (lambda c2: select(c.c.id, c2.c.qty).join(c2, c2.c.id == c.c.id)
                                                      .order_by(c.c.id))(c.alias())),
    "cte-in-where": _with(pos_cte, lambda c: select(func.count()).select_from(I).where(I.id.in_(select(c.c.id)))),
    "cte-count": _with(pos_cte, lambda c: select(func.count()).select_from(c)),
    "cte-reference": _with(lambda: select(R.cc, R.region).cte(),
                           lambda c: select(c.c.region, func.count()).select_from(I).join(c, c.c.cc == I.cc)
                           .group_by(c.c.region).order_by(c.c.region)),
    "orm-entity-join-cte": _with(pos_cte, lambda c: select(HItem).join(c, c.c.id == HItem.id).order_by(HItem.id)),
    "scalar-correlated-select": lambda: select(I.id, n_lines.label("nl")).order_by(I.id),
    "scalar-correlated-where": lambda: select(I.id).where(n_lines >= 2).order_by(I.id),
    "aggregates-of-correlated": lambda: select(I.grp, func.sum(n_lines), func.avg(n_lines)).group_by(I.grp)
    .order_by(I.grp.nulls_first()),
    "scalar-reference": lambda: select(I.id, select(R.region).where(R.cc == I.cc).scalar_subquery().label("r"))
    .order_by(I.id),
    "scalar-reference-uncorrelated": lambda: select(I.id, select(func.count()).select_from(R).scalar_subquery()
                                                    .label("nr")).order_by(I.id),
    "filter": lambda: select(I.grp, func.count().filter(I.qty > 0), func.sum(I.amt).filter(I.flag),
                             func.avg(I.qty).filter(I.flag.is_(False)), func.min(I.name).filter(I.qty < 0))
    .group_by(I.grp).order_by(I.grp.nulls_first()),
    "filter-having": lambda: select(I.grp, func.count()).group_by(I.grp).having(func.count().filter(I.flag) > 2)
    .order_by(I.grp),
    "filter-order": lambda: select(I.grp, func.count()).group_by(I.grp)
    .order_by(func.count().filter(I.flag).desc(), I.grp.nulls_first()),
    "filters-differing-only-in-constant": lambda: select(I.grp, func.count().filter(I.qty > 0),
                                                         func.count().filter(I.qty > 5)).group_by(I.grp)
    .having(func.count().filter(I.qty > 5) >= 1).order_by(I.grp),
    "filter-empty": lambda: select(func.count().filter(I.qty > 10**6), func.sum(I.qty).filter(I.qty > 10**6),
                                   func.avg(I.amt).filter(I.qty > 10**6)),
    "coalesce-filter": lambda: select(I.grp, func.coalesce(func.sum(I.qty).filter(I.qty > 100), 0))
    .group_by(I.grp).order_by(I.grp),
    "count-order-label-limit": lambda: select(I.cc, func.count().label("n")).group_by(I.cc)
    .order_by(desc("n"), I.cc).limit(2),
    "count-order-aggregate-limit": lambda: select(I.cc, func.count()).group_by(I.cc)
    .order_by(func.count().desc(), I.cc.nulls_first()).limit(3),
    "having-unselected": lambda: select(I.grp).group_by(I.grp).having(func.sum(I.qty) > 0).order_by(I.grp),
    "having-unselected-avg-float": lambda: select(I.grp, func.count()).group_by(I.grp)
    .having(func.avg(I.amt) > 4.5).order_by(I.grp),
    "having-aggregate-vs-aggregate": lambda: select(I.grp, func.sum(I.qty)).group_by(I.grp)
    .having(func.sum(I.qty) > func.count()).order_by(I.grp),
    "order-label-desc-nulls-last": lambda: select(I.cc, total).group_by(I.cc).order_by(total.desc().nulls_last(), I.cc),
    "order-name-desc-nulls-last": lambda: select(I.cc, func.max(I.qty).label("mx")).group_by(I.cc)
    .order_by(desc("mx").nulls_last(), I.cc),
    "order-unselected-avg": lambda: select(I.grp, func.count()).group_by(I.grp)
    .order_by(func.avg(I.amt).desc().nulls_last(), I.grp),
    "group-date_trunc": lambda: select(day.label("d"), func.count()).group_by(day).order_by(day),
    "group-extract": lambda: select(dow.label("dow"), func.count(), func.avg(I.qty)).group_by(dow).order_by(dow),
    "group-case": lambda: select(bucket.label("b"), func.count(), func.sum(I.amt)).group_by(bucket).order_by(bucket),
    "group-to_char": _with(lambda: func.to_char(I.d, "YYYY-MM"),
                           lambda m: select(m.label("m"), func.count()).group_by(m).order_by(m)),
    "literal-without-from": lambda: select(literal(1).label("one"), literal("x")),
    "union": lambda: union(select(I.grp).where(I.qty > 0), select(I.grp).where(I.qty < 0)),
    "union-all-ordered": lambda: union_all(select(I.cc).where(I.qty > 0), select(L.name).where(L.qty < 0))
    .order_by("cc"),
    "avg-integers": lambda: select(func.avg(I.qty), func.avg(I.big), func.avg(I.grp),
                                   func.avg(cast(I.qty, SmallInteger)), func.avg(cast(I.qty, Numeric(10, 3))),
                                   func.avg(cast(I.qty, Numeric)), func.avg(cast(I.flag, Integer))),
    "avg-integers-grouped-join": lambda: select(I.cc, func.avg(I.qty), func.avg(I.big), func.avg(L.qty))
    .join(L, L.item_id == I.id).group_by(I.cc).order_by(I.cc),
    "avg-numeric-products": lambda: select(func.sum(I.amt * D("1.5")), func.avg(I.amt * I.amt),
                                           func.avg(extract("epoch", I.ts))),
    "empty-set": lambda: select(func.sum(I.qty), func.count(), func.count(I.qty), func.avg(I.qty),
                                func.min(I.name), func.max(I.amt)).where(I.qty > 10**6),
    "empty-set-grouped": lambda: select(I.grp, func.sum(I.qty), func.count()).where(I.qty > 10**6).group_by(I.grp),
    "empty-set-having": lambda: select(func.count()).select_from(I).having(func.count() > 100),
    "empty-set-coalesce": lambda: select(func.coalesce(func.sum(I.qty), 0), func.coalesce(func.max(I.name), "none"))
    .where(I.qty > 10**6),
    "min-max-text": lambda: select(func.min(I.name), func.max(I.name), func.min(I.name.collate("C")),
                                   func.max(I.name.collate("C"))),
    "min-max-text-grouped": lambda: select(I.grp, func.min(I.name), func.max(I.name)).group_by(I.grp)
    .order_by(I.grp.nulls_first()),
}

REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    "cte-aggregate": (_with(lambda: select(I.grp, func.sum(I.qty).label("s")).group_by(I.grp).cte(),
                            lambda c: select(c.c.grp, c.c.s)), "statement not colocated on the shard key"),
    "cte-aggregate-in-scalar": (_with(lambda: select(func.avg(I.qty).label("a")).cte(),
                                      lambda c: select(I.id).where(I.qty > select(c.c.a).scalar_subquery())),
                                "statement not colocated on the shard key"),
    "cte-recursive": (_with(lambda: select(I.id).where(I.id == 1).cte(recursive=True),
                            lambda c: select(func.count()).select_from(c.union_all(
                                select(L.item_id).join(c, c.c.id == L.no)))),
                      "statement not colocated on the shard key"),
    # (Grouped by the shard key, per_item is exact: test_scatter_local_groups.)
    "derived-aggregate": (_with(lambda: select(L.name, func.count().label("n")).group_by(L.name).subquery(),
                                lambda s: select(func.avg(s.c.n), func.max(s.c.n))),
                          "statement not colocated on the shard key"),
    "scalar-uncorrelated": (lambda: select(I.id).where(I.qty > select(func.avg(I.qty)).scalar_subquery()),
                            "statement not colocated on the shard key"),
    "scalar-correlated-off-key": (lambda: select(I.id, select(func.count(L.no)).where(L.qty == I.qty)
                                                 .scalar_subquery()), "statement not colocated on the shard key"),
    "filter-uncorrelated-subquery": (lambda: select(func.count().filter(
        I.qty > select(func.avg(I.qty)).scalar_subquery())), "statement not colocated on the shard key"),
    "window-rank": (lambda: select(I.id, func.rank().over(order_by=I.qty)), "window function"),
    "window-sum": (lambda: select(I.id, func.sum(I.qty).over(partition_by=I.grp)), "window function"),
    "window-in-order-by": (lambda: select(I.id).order_by(func.row_number().over(order_by=I.qty.desc())),
                           "window function"),
    "window-in-derived": (_with(lambda: select(I.id, func.row_number().over(order_by=I.qty).label("rn")).subquery(),
                                lambda s: select(s.c.id, s.c.rn)), "statement not colocated on the shard key"),
    "window-in-cte": (_with(lambda: select(I.id, func.row_number().over(order_by=I.qty).label("rn")).cte(),
                            lambda s: select(s.c.id).where(s.c.rn <= 3)), "statement not colocated on the shard key"),
    "bool_and": (lambda: select(func.bool_and(I.flag)), "bool_and()"),
    "bool_or": (lambda: select(I.grp, func.bool_or(I.flag)).group_by(I.grp), "bool_or()"),
    "every": (lambda: select(func.every(I.flag)), "every()"),
    "bool_or-in-having": (lambda: select(I.grp).group_by(I.grp).having(func.bool_or(I.flag)), "HAVING expression"),
    "string_agg": (lambda: select(func.string_agg(I.name, literal(","))), "string_agg()"),
    "string_agg-ordered": (lambda: select(func.string_agg(I.name, aggregate_order_by(literal(","), I.name))),
                           "string_agg()"),
    "array_agg": (lambda: select(func.array_agg(I.qty)), "array_agg()"),
    "json_agg": (lambda: select(I.grp, func.json_agg(I.qty)).group_by(I.grp), "json_agg()"),
    "intersect": (lambda: intersect(select(I.qty), select(L.qty)), "compound select INTERSECT"),
    "except": (lambda: except_(select(I.qty), select(L.qty)), "compound select EXCEPT"),
    "distinct-on": (lambda: _distinct_on(select(I.grp, I.id), I.grp).order_by(I.grp, I.id), "DISTINCT ON"),
    "rollup": (lambda: select(I.grp, func.count()).group_by(func.rollup(I.grp)), "GROUP BY ROLLUP"),
    "cube": (lambda: select(I.grp, I.flag, func.count()).group_by(func.cube(I.grp, I.flag)), "GROUP BY CUBE"),
    "grouping-sets": (lambda: select(I.grp, func.count()).group_by(func.grouping_sets(I.grp, I.flag)),
                      "GROUP BY GROUPING SETS"),
    "min-icu-column": (lambda: select(func.min(I.label)), "min() over text"),
    "max-collate-icu": (lambda: select(func.max(I.name.collate("en-x-icu"))), "max() over text"),
    "expression-over-count": (lambda: select(func.count() > 0).select_from(I), "expression over count()"),
    "exists-in-where-without-from": (lambda: select(literal(1)).where(exists(select(I.id).where(I.qty > 5))),
                                     "SELECT without FROM over subqueries"),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_report_query_is_exact(report, name):
    check(report, EXACT[name]())


@pytest.mark.parametrize("name", list(REFUSED))
def test_report_query_is_refused(report, name):
    make, construct = REFUSED[name]
    assert check_or_refused(report, make()) == construct


# ---------------------------------------------------------------------------
# ORM: legacy Query and 2.0 session calls
# ---------------------------------------------------------------------------


def _outcome(session: Any, fn: Callable[[Any], Any]) -> Any:
    v = fn(session)
    if isinstance(v, list):
        return [tuple(exact(x) for x in r) for r in v]
    if isinstance(v, tuple) or hasattr(v, "_mapping"):
        return tuple(exact(x) for x in v)
    return exact(v)


ORM: dict[str, Callable[[Any], Any]] = {
    "grouped-having-order-limit": lambda s: s.query(I.grp, func.count(I.id)).group_by(I.grp)
    .having(func.count(I.id) > 2).order_by(func.count(I.id).desc(), I.grp).limit(2).all(),
    "count": lambda s: s.query(I).filter(I.qty > 0).count(),
    "scalar-count": lambda s: s.query(func.count(I.id)).scalar(),
    "scalar-max": lambda s: s.query(func.max(I.amt)).filter(I.qty > 0).scalar(),
    "scalar-avg": lambda s: s.query(func.avg(I.qty)).scalar(),
    "scalars-sum": lambda s: s.scalars(select(func.sum(I.amt)).where(I.grp == 1)).one(),
    "order-by-label-name": lambda s: s.query(I.cc, func.sum(I.amt).label("t")).group_by(I.cc)
    .order_by(desc("t")).all(),
    "count-of-subquery": lambda s: s.query(func.count()).select_from(
        s.query(I.id).filter(I.qty > 0).subquery()).scalar(),
    "relationship-join-grouped": lambda s: s.query(I.grp, func.count(L.no), func.sum(L.qty)).join(I.lines)
    .group_by(I.grp).order_by(I.grp).all(),
    "outer-join-top-5": lambda s: s.query(I.id, func.count(L.no)).outerjoin(I.lines).group_by(I.id)
    .order_by(func.count(L.no).desc(), I.id).limit(5).all(),
    "first": lambda s: s.query(I.grp, func.count()).group_by(I.grp).order_by(I.grp).first(),
    "min-max-one": lambda s: s.query(func.min(I.ts), func.max(I.ts)).one(),
    "exists": lambda s: s.query(s.query(I).filter(I.qty > 5).exists()).scalar(),
    "with-entities": lambda s: s.query(I).filter(I.qty > 0).with_entities(func.sum(I.qty)).scalar(),
    "having-only": lambda s: s.query(I.cc).group_by(I.cc).having(func.count() > 5).order_by(I.cc).all(),
}


@pytest.mark.parametrize("name", list(ORM))
def test_orm_report_query(report, name):
    with Session(report.oracle) as s:
        want = _outcome(s, ORM[name])
    with report.Session() as s:
        assert _outcome(s, ORM[name]) == want
