"""While a move is in progress, cross-shard statements leave out rows a shard holds but does not own."""

import pytest
from sqlalchemy import select, union_all, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased

import shardkit
from shardkit._session import _without_foreign_rows
from models import Event, Order, User

@pytest.fixture()
def cluster(offline_cluster):
    return offline_cluster


def sql(stmt):
    return str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def test_no_move_no_change(cluster):
    stmt = select(User)
    route = cluster.router.route(stmt)
    assert _without_foreign_rows(cluster, "s1", stmt, route) is stmt


def test_filters_the_moving_table_on_the_shard_holding_copies(cluster):
    cluster.foreign_buckets = {"s2": frozenset({3, 1})}
    stmt = select(User.id).where(User.name == "x")
    route = cluster.router.route(stmt)
    assert _without_foreign_rows(cluster, "s0", stmt, route) is stmt
    out = sql(_without_foreign_rows(cluster, "s2", stmt, route))
    assert "users.id IS NULL OR shardkit.bucket(users.id, 16) != ALL (ARRAY[1, 3])" in out
    # An alias and a colocated join: filter the table as the statement names it.
    u = aliased(User, name="u")
    joined = select(u.id, Order.id).join(Order, Order.user_id == u.id)
    out = sql(_without_foreign_rows(cluster, "s2", joined, cluster.router.route(joined)))
    assert "u.id IS NULL OR shardkit.bucket(u.id, 16) != ALL (ARRAY[1, 3])" in out
    assert "orders.user_id IS NULL OR shardkit.bucket(orders.user_id, 16) != ALL (ARRAY[1, 3])" in out
    upd = update(User).values(name="y")
    out = sql(_without_foreign_rows(cluster, "s2", upd, cluster.router.route(upd, all_shards=True)))
    assert "shardkit.bucket(users.id, 16) != ALL (ARRAY[1, 3])" in out


def test_range_groups_do_not_move(cluster):
    cluster.foreign_buckets = {"s2": frozenset({1})}
    stmt = select(Event)
    assert _without_foreign_rows(cluster, "s2", stmt, cluster.router.route(stmt)) is stmt


def test_unfilterable_statement_is_refused_during_a_move(cluster):
    cluster.foreign_buckets = {"s2": frozenset({1})}
    cte = select(User.id).cte()
    stmt = select(cte.c.id)
    route = cluster.router.route(select(User.id))  # the route the session computes names users
    with pytest.raises(shardkit.ScatterRefused, match="move of buckets is in progress") as ei:
        _without_foreign_rows(cluster, "s2", stmt, route)
    assert ei.value.construct == "cross-shard statement during a move"
    assert _without_foreign_rows(cluster, "s0", stmt, route) is stmt
    # A derived table that selects the key is filtered by it, outside (an ORM entity's
    # subquery stays the entity's); one that does not is filtered inside.
    sub = select(User.id).subquery()
    sql = str(_without_foreign_rows(cluster, "s2", select(sub.c.id), route).compile())
    assert "shardkit.bucket(anon_1.id" in sql and sql.count("FROM (SELECT") == 1
    names = select(User.name).subquery()
    sql = str(_without_foreign_rows(cluster, "s2", select(names.c.name), route).compile())
    assert "shardkit.bucket(users.id" in sql and sql.index("shardkit.bucket") < sql.index(") AS anon_1")
    assert "anon_1.name" in sql and sql.count("FROM (SELECT") == 1
    u = union_all(select(User.id), select(User.id))
    with pytest.raises(shardkit.ScatterRefused):
        _without_foreign_rows(cluster, "s2", u, route)
