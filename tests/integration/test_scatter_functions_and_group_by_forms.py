"""Cross-shard reads compared with one database: functions, subqueries and GROUP BY forms.

Reuses the one-database harness of ``test_scatter_exact`` (``hx``: a 3-shard
cluster and ``hx_oracle``, one plain database holding the same rows): each statement
runs on both and the results are compared with types and exact digits, or the
statement must be refused with ``ScatterRefused`` naming the construct.

Covered here:

* subqueries and aggregates *inside a function call* (``coalesce(sum(x), 0)`` in a
  derived table, ``coalesce((SELECT max(...) FROM sharded), 0)`` per row, ``sum(CASE
  WHEN x IN (SELECT ...) ...)``): SQLAlchemy's ``FunctionElement`` is also a
  ``FromClause``, and the colocation walk must still look inside it;
* ``GROUP BY`` spelt as SQL text, an output position or a label name;
* constants beside aggregates (``SELECT 'x', count(*) FROM t``).
"""

from __future__ import annotations

import decimal

import pytest
from sqlalchemy import (
    Numeric,
    String,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    null,
    select,
    text,
)
from test_scatter_exact import (  # noqa: F401 - hx is the fixture
    HItem,
    HLine,
    HRef,
    check,
    check_or_refused,
    hx,
)

import shardkit

pytestmark = pytest.mark.integration

I, L, R = HItem, HLine, HRef
D = decimal.Decimal


def load_split(hx) -> None:
    """Items of qty 5 on s0 only; lines of qty 5 only under items on s1; items on
    every shard. One database: item qty 5 matches a line qty 5; no shard sees both."""
    items = hx.place([{"qty": 5, "grp": 1, "amt": D("1.50")}, {"qty": 7, "grp": 1, "amt": D("2.25")},
                      {"qty": 9, "grp": 2, "amt": D("3.00")}, {"qty": 5, "grp": 2, "amt": D("0.75")}],
                     shards=[0, 1, 2, 0])
    by_shard = {hx.cluster.shard_for("hx_items", it["id"]): it["id"] for it in items}
    lines = [{"item_id": by_shard["s1"], "no": 1, "qty": 5, "name": "x"},
             {"item_id": by_shard["s1"], "no": 2, "qty": 40, "name": "y"},
             {"item_id": by_shard["s2"], "no": 1, "qty": 9, "name": "z"}]
    hx.load(items, lines, [{"cc": "de", "region": "eu"}])


# ---------------------------------------------------------------------------
# Subqueries and aggregates inside function calls
# ---------------------------------------------------------------------------


def test_derived_table_with_an_aggregate_inside_a_function(hx):
    """``SELECT t FROM (SELECT coalesce(sum(qty), 0) AS t FROM items)``: one row over all
    rows in one database; each shard would return its own sum."""
    load_split(hx)
    sub = select(func.coalesce(func.sum(I.qty), 0).label("t")).subquery()
    check_or_refused(hx, select(sub.c.t))
    sub = select(I.id, func.coalesce(func.lag(I.qty).over(order_by=I.id), 0).label("prev")).subquery()
    check_or_refused(hx, select(sub.c.id, sub.c.prev).order_by(sub.c.id))


def test_uncorrelated_subquery_inside_a_function_in_the_select_list(hx):
    """``SELECT id, coalesce((SELECT max(qty) FROM lines), 0)``: the max over all lines in
    one database, not over each shard's."""
    load_split(hx)
    m = select(func.max(L.qty)).scalar_subquery()
    check_or_refused(hx, select(I.id, func.coalesce(m, 0).label("m")).order_by(I.id))


def test_non_colocated_in_subquery_inside_an_aggregate(hx):
    """``sum(CASE WHEN qty IN (SELECT qty FROM lines) THEN 1 ELSE 0 END)``: the IN is
    decided over all lines in one database."""
    load_split(hx)
    hit = case((I.qty.in_(select(L.qty)), 1), else_=0)
    check_or_refused(hx, select(func.sum(hit)))
    check_or_refused(hx, select(I.id).where(func.coalesce(I.qty.in_(select(L.qty)), False))
                     .order_by(I.id))


# ---------------------------------------------------------------------------
# GROUP BY spelt as SQL text, an output position or a label name
# ---------------------------------------------------------------------------


def _exact_or_refused_naming(hx, stmt, word: str) -> None:
    """Exact, or refused naming ``word`` in the construct: not a bare error, and not a
    refusal saying that a grouped column is not grouped."""
    try:
        construct = check_or_refused(hx, stmt, ordered=False)
    except NotImplementedError as e:   # (what SQLAlchemy raises for .label() on text)
        raise AssertionError(f"bare NotImplementedError for {stmt}") from e
    assert construct is None or word in construct, construct


def test_group_by_sql_text(hx):
    load_split(hx)
    _exact_or_refused_naming(hx, select(I.grp, func.count()).group_by(text("hx_items.grp")), "GROUP BY")
    _exact_or_refused_naming(hx, select(I.grp, func.sum(I.amt)).group_by(text("1")), "GROUP BY")


def test_group_by_output_position(hx):
    """``GROUP BY 1`` (literal_column("1")) groups by the first output column."""
    load_split(hx)
    _exact_or_refused_naming(hx, select(I.grp, func.count()).group_by(literal_column("1")), "GROUP BY")


def test_group_by_label_name(hx):
    """``group_by("g")`` names the select list's label g, as ``order_by("g")`` does."""
    load_split(hx)
    _exact_or_refused_naming(hx, select(I.grp.label("g"), func.count()).group_by("g"), "GROUP BY")


# ---------------------------------------------------------------------------
# Constants beside aggregates
# ---------------------------------------------------------------------------


def test_constants_beside_aggregates(hx):
    """``SELECT 'items' AS kind, count(*), sum(amt) FROM items`` is valid SQL (a constant
    is neither grouped nor aggregated); the merge must not call the constant an ungrouped
    column."""
    load_split(hx)
    check(hx, select(literal("items").label("kind"), func.count(), func.sum(I.amt)).select_from(I))
    check(hx, select(I.grp, literal(1).label("one"), null().label("nothing"),
                     cast(literal("2.50"), Numeric(5, 2)).label("rate"), func.sum(I.qty))
          .group_by(I.grp).order_by(I.grp))
    check(hx, select(bindparam("tag", type_=String).label("tag"), func.max(I.qty)).select_from(I),
          {"tag": "run-1"})


def test_a_column_of_a_table_beside_aggregates_is_still_refused(hx):
    """(What PostgreSQL refuses: a column neither grouped nor aggregated.)"""
    load_split(hx)
    with pytest.raises(shardkit.ScatterRefused) as e:
        with hx.Session() as s:
            s.execute(select(I.qty, func.count()).group_by(I.grp)).all()
    assert e.value.construct == "ungrouped column"
