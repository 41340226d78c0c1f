"""Shard-local subqueries below an outer join, COLLATE "C" group keys and stale-token
refusals: offline checks (no database).

* ``_colocation._shard_local``: a derived table grouped (or DISTINCT) by a column that
  carries the shard key of an outer join's optional side *inside a nested subquery* was
  admitted as computed whole on each shard.  Its NULL keys (customers without orders on
  every shard) form one group on one database but one per shard, merged as table rows:
  ``count(*)`` over it counted the NULL group once per shard.  The same key at the same
  level was already refused.
* ``_scatter._plan``'s ``term()``: a grouped query that selects and groups by
  ``name.collate("C")`` (what the README tells a non-C database to write) and orders or
  compares it in HAVING by that same expression was refused as "neither an aggregate nor
  a group key" (it merged before the change that let ``.collate("C")`` order a plain
  ``name`` group key: that change unwrapped the COLLATE before looking for the
  expression among the selected and grouped ones).
"""

import pytest

import shardkit
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from shardkit._colocation import colocation_problem
from shardkit._scatter import plan_scatter

md = MetaData()
customers = Table("customers", md, Column("id", Integer, primary_key=True), Column("name", String))
orders = Table("orders", md, Column("id", Integer, primary_key=True), Column("customer_id", Integer),
               Column("amount", Integer))
items = Table("items", md, Column("id", Integer, primary_key=True), Column("name", String),
              Column("grp", Integer))
LOCAL = frozenset({"g"})


def resolve(name):
    return {"orders": ("g", ("customer_id",)), "customers": ("g", ("id",))}.get(name)


def _left_joined(*cols):
    return select(*cols).select_from(
        customers.outerjoin(orders, orders.c.customer_id == customers.c.id)).subquery("inner")


def test_group_by_optional_side_key_of_a_nested_subquery_is_not_shard_local():
    inner = _left_joined(customers.c.id.label("cid"), orders.c.customer_id.label("ocid"), orders.c.amount)
    per = select(inner.c.ocid, func.count().label("n")).group_by(inner.c.ocid).subquery("per")
    problem = colocation_problem(select(func.count()).select_from(per), resolve, local_groups=LOCAL)
    assert problem is not None and "has GROUP BY" in problem


def test_distinct_on_optional_side_key_of_a_nested_subquery_is_not_shard_local():
    inner = _left_joined(orders.c.customer_id.label("ocid"), customers.c.name)
    per = select(inner.c.ocid).distinct().subquery("per")
    problem = colocation_problem(select(func.count()).select_from(per), resolve, local_groups=LOCAL)
    assert problem is not None and "has DISTINCT" in problem


def test_two_levels_down_the_optional_side_is_still_optional():
    inner = _left_joined(orders.c.customer_id.label("ocid"), orders.c.amount)
    middle = select(inner.c.ocid, inner.c.amount).where(inner.c.amount > 0).subquery("middle")
    per = select(middle.c.ocid, func.sum(middle.c.amount).label("s")).group_by(middle.c.ocid).subquery()
    problem = colocation_problem(select(func.max(per.c.s)), resolve, local_groups=LOCAL)
    assert problem is not None and "has GROUP BY" in problem


def test_group_by_the_preserved_side_key_of_a_nested_subquery_stays_shard_local():
    """Not over-refused: the preserved side's key is never NULL from the join."""
    inner = _left_joined(customers.c.id.label("cid"), orders.c.customer_id.label("ocid"), orders.c.amount)
    per = select(inner.c.cid, func.count(inner.c.ocid).label("n")).group_by(inner.c.cid).subquery("per")
    assert colocation_problem(select(func.avg(per.c.n)), resolve, local_groups=LOCAL) is None
    inner2 = select(orders.c.customer_id.label("k"), orders.c.amount).subquery("plain")
    per2 = select(inner2.c.k, func.sum(inner2.c.amount).label("s")).group_by(inner2.c.k).subquery()
    assert colocation_problem(select(func.max(per2.c.s)), resolve, local_groups=LOCAL) is None


C = items.c.name.collate("C")


@pytest.mark.parametrize("stmt", [
    select(C.label("n"), func.count()).group_by(C).order_by(C),
    select(C.label("n"), func.count()).group_by(C).having(C > "a"),
    select(C, func.count()).group_by(C).order_by(C.desc()),
    # (a plain key ordered under COLLATE "C" still merges)
    select(items.c.name, func.count()).group_by(items.c.name).order_by(C),
], ids=["select-group-order", "select-group-having", "unlabelled", "plain-key-ordered-collated"])
def test_group_key_written_collate_c_everywhere_merges(stmt):
    _, plan = plan_scatter(stmt)
    assert plan.kind == "group"


def test_stale_token_refusal_names_a_way_out_that_works(offline_cluster):
    """The refusal of a detached object keyed to a shard its shard key does not place it on
    told the user to ``inspect(obj).identity_token = None`` "first": done to the object
    add() refused, that changes nothing (its identity key keeps the shard), and add()
    refuses it again.  The message names the steps that re-key it."""
    from sqlalchemy import inspect
    from sqlalchemy.orm import make_transient, make_transient_to_detached

    from models import Order
    from shardkit.errors import RoutingError

    router = offline_cluster.router
    by_shard = {}
    for k in range(1, 200):
        by_shard.setdefault(router.shard_for("orders", k), k)
    (a, ka), (b, kb) = sorted(by_shard.items())[:2]
    o = Order(id=5, user_id=ka, amount=1)
    inspect(o).identity_token = a          # as after a load from a, then make_transient()
    o.user_id = kb
    make_transient_to_detached(o)
    with shardkit.ShardedSession(offline_cluster) as s:
        with pytest.raises(RoutingError) as e:
            s.add(o)
    message = str(e.value)
    # Done as the message said, in its order, the object is keyed to b.
    assert "make_transient(obj)" in message
    assert message.index("make_transient(obj)") < message.index("identity_token = None") \
        < message.index("make_transient_to_detached(obj)")
    inspect(o).identity_token = None       # alone, as the old message read: still refused
    with shardkit.ShardedSession(offline_cluster) as s:
        with pytest.raises(RoutingError):
            s.add(o)
    make_transient(o)
    inspect(o).identity_token = None
    make_transient_to_detached(o)
    with shardkit.ShardedSession(offline_cluster) as s:
        s.add(o)
        assert inspect(o).key[2] == b
