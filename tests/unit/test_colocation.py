"""Statements that would give a different answer per shard than on one database are refused."""

import pytest
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import aliased, joinedload

import shardkit
from models import Country, Event, Order, User

@pytest.fixture()
def cluster(offline_cluster):
    return offline_cluster


u2 = aliased(User, name="u2")
o2 = aliased(Order, name="o2")
filtered = select(User.id, User.name).where(User.name != "x").subquery("f")

ALLOWED = {
    "one table": select(User).where(User.name == "a"),
    "join on the key": select(User.name, Order.amount).join(Order, Order.user_id == User.id),
    "aliases joined on the key": select(User.id, o2.id).join(o2, o2.user_id == User.id),
    "self-join on the key": select(User.id, u2.name).join(u2, u2.id == User.id),
    "outer join on the key": select(User.id, Order.id).outerjoin(Order, Order.user_id == User.id),
    "key equality in WHERE": select(User.id, Order.id).where(Order.user_id == User.id),
    "correlated EXISTS on the key": select(User).where(exists().where(Order.user_id == User.id)),
    "correlated scalar subquery": select(User.id, select(func.sum(Order.amount))
                                         .where(Order.user_id == User.id).scalar_subquery()),
    "reference table subquery": select(User).where(User.name.in_(select(Country.name))),
    "filtering derived table joined on the key": select(filtered.c.name, Order.id)
    .join(Order, Order.user_id == filtered.c.id),
    "joinedload": select(User).options(joinedload(User.orders)),
    # The ORM wraps this in a derived table when it compiles, per shard; the router sees the
    # entity query, whose rows (users) merge with the LIMIT applied after the merge.
    "joinedload with LIMIT": select(User).options(joinedload(User.orders)).limit(10),
    # Grouped by the shard key: each group is on one shard.
    "derived table grouped by the shard key": select(select(Order.user_id, func.count())
                                                     .group_by(Order.user_id).subquery().c.user_id),
    "update with a correlated subquery": update(User).values(
        name=select(func.max(Order.amount)).where(Order.user_id == User.id).scalar_subquery()),
}

REFUSED = {
    "join on another column": (select(User.id, Order.id).join(Order, Order.amount == User.id),
                               "not joined on the shard key"),
    "implicit cross join": (select(User.id, Order.id), "not joined on the shard key"),
    "uncorrelated scalar subquery": (select(User).where(User.id == select(func.max(User.id)).scalar_subquery()),
                                     "not correlated"),
    "IN subquery with LIMIT": (select(User).where(User.id.in_(select(Order.user_id).limit(5))),
                               "not correlated"),
    "correlated on another column": (select(User).where(exists().where(Order.amount == User.id)),
                                     "not correlated"),
    "join on the key OR something": (select(User.id, Order.id).join(
        Order, (Order.user_id == User.id) | (Order.amount == 1)), "not joined on the shard key"),
    "derived table with LIMIT": (select(select(User.id).limit(3).subquery().c.id), "has LIMIT"),
    "derived table with GROUP BY": (select(select(Order.amount, func.count()).group_by(Order.amount)
                                           .subquery().c.amount), "has GROUP BY"),
    "derived table with an aggregate": (select(select(func.max(User.id).label("m")).subquery().c.m),
                                        "aggregate"),
}


@pytest.mark.parametrize("stmt", list(ALLOWED.values()), ids=list(ALLOWED))
def test_colocated_statements_route(cluster, stmt):
    cluster.router.route(stmt, all_shards=True)


@pytest.mark.parametrize("stmt,why", list(REFUSED.values()), ids=list(REFUSED))
def test_statements_that_differ_per_shard_are_refused(cluster, stmt, why):
    with pytest.raises(shardkit.ScatterRefused, match=why) as ei:
        cluster.router.route(stmt)
    assert ei.value.construct == "statement not colocated on the shard key"
    assert "shardkit_shard" in str(ei.value)


def test_refused_even_when_the_outer_key_pins_one_shard(cluster):
    # The subquery would still see only that shard's users.
    stmt = select(User).where(User.id == 5, User.name == select(func.max(User.name)).scalar_subquery())
    with pytest.raises(shardkit.ScatterRefused):
        cluster.router.route(stmt)


def test_other_groups_are_the_routers_concern(cluster):
    # A join across groups is refused by the router unless keys pin one shard.
    stmt = select(User.id, Event.id).join(Event, Event.id == User.id).where(User.id == 1, Event.id == 1)
    route = cluster.router.route(stmt)
    assert len(route.shards) == 1


def test_grouped_derived_table_is_shard_local_only_for_disjoint_groups():
    """GROUP BY the key keeps each group on one shard for hash, range and list groups (the
    router passes them as ``local_groups``); a custom strategy's function shardkit cannot see
    into, and a key declared with a collation (a nondeterministic one groups keys of several
    shards), stay refused."""
    from sqlalchemy import Column, MetaData, String, Table

    from shardkit._colocation import colocation_problem

    def resolve(name):
        return {"orders": ("g", ("user_id",)), "users": ("g", ("id",)),
                "tags": ("g", ("code",))}.get(name)

    per = select(Order.user_id, func.count().label("n")).group_by(Order.user_id).subquery()
    stmt = select(func.max(per.c.n))
    assert colocation_problem(stmt, resolve, local_groups=frozenset({"g"})) is None
    assert "has GROUP BY" in colocation_problem(stmt, resolve)
    assert "has GROUP BY" in colocation_problem(stmt, resolve, local_groups=frozenset({"other"}))
    tags = Table("tags", MetaData(), Column("code", String(5, collation="und-x-icu-ci")), Column("v", String))
    by_tag = select(tags.c.code, func.count().label("n")).group_by(tags.c.code).subquery()
    assert "has GROUP BY" in colocation_problem(select(func.max(by_tag.c.n)), resolve,
                                                local_groups=frozenset({"g"}))
