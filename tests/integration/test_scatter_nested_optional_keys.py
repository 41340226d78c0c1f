"""Subqueries grouped by an outer join's optional-side key, against a real cluster and one
plain database.

A subquery grouped by a column that carries the shard key of an outer join's optional side
*inside a nested subquery* (``SELECT ... FROM (SELECT o.customer_id AS ocid ... FROM
customers LEFT JOIN orders o ...) GROUP BY ocid``) was admitted as computed whole on each
shard: the customers without orders give ocid NULL on every shard, one group on one
database but one per shard, so counting the groups counted the NULL group once per shard.
The same key at the same level was refused already; now the nested one is too, and
grouping by the preserved side's key stays exact.  (The offline checks are in
tests/unit/test_shard_local_nested_subqueries.py.)
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from test_scatter_exact import check, check_or_refused
from test_scatter_local_groups import NOT_COLOCATED, Cust, Ord, lg  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def _inner():
    return (select(Cust.id.label("cid"), Ord.customer_id.label("ocid"), Ord.amount)
            .outerjoin(Ord, Ord.customer_id == Cust.id).subquery("inner"))


def test_group_by_nested_optional_side_key_is_refused_not_wrong(lg):  # noqa: F811
    inner = _inner()
    per = select(inner.c.ocid, func.count().label("n")).group_by(inner.c.ocid).subquery("per")
    stmt = select(func.count(), func.sum(per.c.n)).select_from(per)
    assert check_or_refused(lg, stmt) == NOT_COLOCATED


def test_distinct_nested_optional_side_key_is_refused_not_wrong(lg):  # noqa: F811
    inner = _inner()
    per = select(inner.c.ocid).distinct().subquery("per")
    assert check_or_refused(lg, select(func.count()).select_from(per)) == NOT_COLOCATED


def test_group_by_nested_preserved_side_key_stays_exact(lg):  # noqa: F811
    inner = _inner()
    per = (select(inner.c.cid, func.count(inner.c.ocid).label("n"), func.sum(inner.c.amount).label("s"))
           .group_by(inner.c.cid).subquery("per"))
    check(lg, select(func.count(), func.sum(per.c.n), func.max(per.c.s)).select_from(per))
