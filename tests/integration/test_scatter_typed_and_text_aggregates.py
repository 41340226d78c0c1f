"""Cross-shard reads compared with one database: typed aggregates and SQL text.

Reuses the one-database harness of ``test_scatter_exact`` (``hx``: a 3-shard
cluster and ``hx_oracle``, one plain database holding the same rows).  Each statement
returns what the one database returns, or is refused with ``ScatterRefused`` naming the
construct.  Covered here:

* an aggregate given its own result type (``func.sum(x, type_=Float)``): SQLAlchemy
  converts each shard's partial before the merge adds them (or, for ``avg``, the type
  is lost on the partials);
* aggregates and subqueries written as SQL text (``select(text("count(*)"))``,
  ``where(text("EXISTS (SELECT ...)"))``), which the merge and the colocation check
  cannot read.
"""

from __future__ import annotations


import pytest
from sqlalchemy import Float, func, literal_column, select, text
from test_scatter_functions_and_group_by_forms import load_split
from test_scatter_exact import (  # noqa: F401 - hx is the fixture
    HItem,
    HLine,
    base_items,
    check,
    check_or_refused,
    hx,
    run_oracle,
    run_sharded,
)

pytestmark = pytest.mark.integration

I, L = HItem, HLine


def _differs(hx, stmt) -> None:
    """The data set must make a per-shard answer differ from one database's, or the
    check tests nothing."""
    import shardkit
    try:
        got = run_sharded(hx, stmt.execution_options(shardkit_shard="s0"))[1]
    except shardkit.ScatterRefused:
        return
    assert got != run_oracle(hx, stmt)[1]


# ---------------------------------------------------------------------------
# Aggregates declared with their own result type
# ---------------------------------------------------------------------------


def test_sum_and_avg_declared_as_float_are_exact_or_refused(hx):
    """``sum(amt, type_=Float)`` over numeric: one database adds the numerics exactly and
    SQLAlchemy converts the total to float once (47.44); converting each shard's sum to
    float and adding the floats gives 47.440000000000005.  ``avg(qty, type_=Float)`` is
    a float on one database; rebuilt from sum and count it came back a Decimal."""
    hx.load(base_items(hx))
    check_or_refused(hx, select(I.grp, func.sum(I.amt, type_=Float)).group_by(I.grp), ordered=False)
    check_or_refused(hx, select(func.avg(I.qty, type_=Float), func.avg(I.amt, type_=Float)))
    check_or_refused(hx, select(I.grp).group_by(I.grp)
                     .order_by(func.avg(I.amt, type_=Float), I.grp))


def test_aggregates_without_a_declared_type_and_float_arguments_still_merge(hx):
    """The neighbours of the refusal: the plain aggregates, a Float over float values, and
    min/max declared as Float (a conversion that keeps the order) are merged exactly."""
    hx.load(base_items(hx))
    assert check_or_refused(hx, select(I.grp, func.sum(I.amt), func.avg(I.amt), func.avg(I.qty),
                                       func.max(I.amt, type_=Float), func.min(I.amt, type_=Float))
                            .group_by(I.grp), ordered=False) is None


# ---------------------------------------------------------------------------
# Aggregates and subqueries in SQL text
# ---------------------------------------------------------------------------


def test_an_aggregate_written_as_sql_text_in_the_select_list(hx):
    """``select(text("count(*)")).select_from(items)``: one row on one database; each
    shard returned its own count, side by side (three rows)."""
    hx.load(base_items(hx))
    for col in (text("count(*)"), literal_column("max(qty)"), literal_column("SUM (qty)").label("s"),
                func.coalesce(literal_column("min(qty)"), 0)):
        stmt = select(col).select_from(I)
        assert check_or_refused(hx, stmt, ordered=False) is not None, stmt


def test_a_window_function_written_as_sql_text_is_refused(hx):
    """``row_number() OVER (...)`` in SQL text numbers each shard's rows from 1."""
    hx.load(base_items(hx))
    stmt = select(I.id, literal_column("row_number() OVER (ORDER BY hx_items.id)").label("n")) \
        .order_by(I.id)
    assert check_or_refused(hx, stmt) is not None


def test_sql_text_without_aggregates_still_merges(hx):
    """Plain SQL text (a column, arithmetic, a function that is not an aggregate) is each
    row's own value: merged as before."""
    hx.load(base_items(hx))
    assert check_or_refused(hx, select(I.id, literal_column("hx_items.qty * 2").label("q"),
                                       literal_column("lower(hx_items.name)").label("l"))
                            .order_by(I.id)) is None
    assert check_or_refused(hx, select(I.id).where(text("hx_items.qty > 0 AND (hx_items.grp = 1 "
                                                        "OR hx_items.grp = 2)")).order_by(I.id)) is None


def test_a_subquery_written_as_sql_text(hx):
    """``WHERE EXISTS (SELECT 1 FROM lines l WHERE l.qty = items.qty)`` in SQL text: the
    lines of qty 5 are on s1, the items of qty 5 on s0; one database returns those items,
    each shard alone finds no line for them."""
    load_split(hx)
    for stmt in (
        select(I.id).where(text("EXISTS (SELECT 1 FROM hx_lines l WHERE l.qty = hx_items.qty)")),
        select(I.id).where(text("hx_items.qty IN (select qty FROM hx_lines)")),
        select(I.id, literal_column("(SELECT max(qty) FROM hx_lines)").label("m")),
        select(func.count()).select_from(I).where(text("qty < (SELECT max(qty) FROM hx_lines)")),
    ):
        _differs(hx, stmt)
        assert check_or_refused(hx, stmt, ordered=False) is not None, stmt


def test_sql_text_in_from_is_routed_like_a_textual_statement(hx):
    """``select(literal_column("id")).select_from(text("hx_items"))`` names no table shardkit
    can see: it was sent to one shard as a read of no tables, and returned that shard's
    third of the rows.  It must be refused as ``text("SELECT id FROM hx_items")`` is (a
    RoutingError asking for a shard), or return every row."""
    hx.load(base_items(hx))
    import shardkit
    for stmt in (select(literal_column("id")).select_from(text("hx_items")),
                 select(literal_column("t.m")).select_from(
                     text("(SELECT max(qty) AS m FROM hx_items) AS t"))):
        try:
            check(hx, stmt, ordered=False)
        except shardkit.RoutingError as e:
            assert "textual" in str(e) and "shardkit_shard" in str(e), e
    # Named, it runs there.
    with hx.Session() as s:
        n = len(s.execute(select(literal_column("id")).select_from(text("hx_items"))
                          .execution_options(shardkit_shard="s1")).all())
        assert 0 < n < 45
