"""The router's shortcut for ``select(...).where(column == value)``.

Such a statement is routed by an entry kept per key column instead of the plan
looked up by SQLAlchemy's cache key.  Every answer must be the general path's
answer, and every statement the shortcut cannot read alone must take the
general path.
"""

import uuid
from decimal import Decimal
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import bindparam, column, func, select, table
from sqlalchemy.orm import aliased, selectinload

import shardkit._routing as routing
from shardkit.errors import RoutingError
from models import Country, Customer, Device, Event, Order, User, offline_cluster
from shardkit import ScatterRefused, ShardKeyError

SHARDS = ["s0", "s1", "s2"]


def make_cluster():
    return offline_cluster(SHARDS)


@contextmanager
def counting_plans(router):
    """Count the router's plan lookups (the general path) inside the block."""
    calls = []
    orig = router._plan_for

    def spy(statement):
        calls.append(statement)
        return orig(statement)

    router._plan_for = spy
    try:
        yield calls
    finally:
        del router._plan_for


def general(router, statement):
    """The general path's answer (or error) for ``statement``, with no shortcut."""
    saved = routing._column_equals_value
    routing._column_equals_value = lambda s: None
    try:
        return router.route(statement)
    except ScatterRefused as e:
        return type(e)
    finally:
        routing._column_equals_value = saved


def answer(router, statement):
    try:
        return router.route(statement)
    except ScatterRefused as e:
        return type(e)


light_users = table("users", column("id"), column("name"))

SHORTCUT = {
    "entity": lambda k: select(User).where(User.id == k),
    "columns": lambda k: select(User.name, User.id).where(User.id == k),
    "table columns": lambda k: select(User.__table__.c.name).where(User.__table__.c.id == k),
    "filter_by": lambda k: select(User).filter_by(id=k),
    "colocated child": lambda k: select(Order).where(Order.user_id == k),
    "range group": lambda k: select(Event).where(Event.id == k * 97),
    "list group": lambda k: select(Customer).where(Customer.region == ["eu", "us", "zz"][k % 3]),
    "uuid key": lambda k: select(Device).where(Device.id == uuid.UUID(int=k * 7919)),
    "lightweight table": lambda k: select(light_users).where(light_users.c.id == k),
}


@pytest.mark.parametrize("name", sorted(SHORTCUT))
def test_shortcut_answers_as_the_general_path_without_a_plan_lookup(name):
    build = SHORTCUT[name]
    c = make_cluster()
    ref = make_cluster()
    with counting_plans(c.router) as first:
        for k in range(120):
            c.router.route(build(k))
    # The first statement of the shape for each shard is planned, then kept per column.
    assert 1 <= len(first) <= len(SHARDS)
    with counting_plans(c.router) as plans:
        for k in range(120):
            got = c.router.route(build(k))
            want = general(ref.router, build(k))
            assert got == want, (name, k)
            assert got.router is c.router
    assert plans == [], f"{name}: {len(plans)} statement(s) took the general path"


def test_a_route_is_the_one_kept_for_its_shard():
    c = make_cluster()
    seen = {}
    for k in range(100):
        r = c.router.route(select(User).where(User.id == k))
        assert r.shards == (c.shard_for(User, k),)
        assert seen.setdefault(r.shards[0], r) is r
    assert len(seen) == 3


OTHER = {
    "second table in the columns": lambda k: select(User, Event).where(User.id == k),
    "reference table in the columns": lambda k: select(User, Country).where(User.id == k),
    "column of another table": lambda k: select(User.name, Event.payload).where(User.id == k),
    "criterion on a table not selected": lambda k: select(Event).where(User.id == k),
    "second criterion": lambda k: select(User).where(User.id == k).where(Event.id == 5),
    "second criterion, same table": lambda k: select(User).where(User.id == k, User.name == "x"),
    "join": lambda k: select(User).join(Order).where(User.id == k),
    "select_from": lambda k: select(User.id).select_from(Event).where(User.id == k),
    "aliased": lambda k: select(aliased(User)).where(User.id == k),
    "aggregate": lambda k: select(func.count()).select_from(User).where(User.id == k),
    "scalar subquery column": lambda k: select(
        User.id, select(Event.id).where(Event.id == 1).scalar_subquery()).where(User.id == k),
    "limit": lambda k: select(User).where(User.id == k).limit(1),
    "order_by": lambda k: select(User).where(User.id == k).order_by(User.name),
    "for update": lambda k: select(User).where(User.id == k).with_for_update(),
    "loader option": lambda k: select(User).options(selectinload(User.orders)).where(User.id == k),
    "execution option": lambda k: select(User).where(User.id == k).execution_options(x=1),
    "IN": lambda k: select(User).where(User.id.in_([k, k + 1])),
    "not a key column": lambda k: select(User).where(User.name == str(k)),
    "reference table": lambda k: select(Country).where(Country.code == "f" + str(k % 10)),
    "callable value": lambda k: select(User).where(User.id == bindparam("p", callable_=lambda: k)),
    "no value": lambda k: select(User).where(User.id == bindparam("p")),
    "NULL": lambda k: select(User).where(User.id == None),  # noqa: E711
}


@pytest.mark.parametrize("name", sorted(OTHER))
def test_other_statements_take_the_general_path(name):
    build = OTHER[name]
    c = make_cluster()
    ref = make_cluster()
    for k in (0, 1):
        # (The shortcut's entry for the column exists: a plain keyed select made it.)
        c.router.route(select(User).where(User.id == k))
        c.router.route(select(Event).where(Event.id == k))
    with counting_plans(c.router) as plans:
        for k in range(12):
            got = answer(c.router, build(k))
            assert got == general(ref.router, build(k)), (name, k)
    assert len(plans) >= 12, f"{name}: took the shortcut"


def test_a_select_of_two_groups_is_refused_although_its_criterion_is_keyed():
    # Without the check of the selected columns, the shortcut would send this to
    # the owner of the users key, reading the events of that shard alone.
    c = make_cluster()
    c.router.route(select(User).where(User.id == 7))
    with pytest.raises(ScatterRefused):
        c.router.route(select(User, Event).where(User.id == 7))


def test_a_new_router_starts_without_entries():
    c = make_cluster()
    c.router.route(select(User).where(User.id == 7))
    assert c.router._key_columns
    assert routing.Router(c.config, like=c.router)._key_columns == {}


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_shortcut_routes_every_int_key_to_its_owner(k):
    c = _shared()
    with counting_plans(c.router) as plans:
        r = c.router.route(select(User).where(User.id == k))
    assert plans == []
    assert r.shards == (c.shard_for(User, k),) and r.kind == "direct" and r.keys == "one"


_SHARED = []


def _shared():
    if not _SHARED:
        c = make_cluster()
        for k in range(100):  # a route kept for every shard
            c.router.route(select(User).where(User.id == k))
        _SHARED.append(c)
    return _SHARED[0]


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, "7", 7.0, Decimal(7)])
def test_a_bad_key_through_the_shortcut_gets_the_general_paths_error(bad):
    # The shortcut hashes ints itself; anything it does not take (outside int64, a
    # bool, another type) must reach the strategy and fail as the general path does.
    c = _shared()
    with pytest.raises(ShardKeyError) as got:
        c.router.route(select(User).where(User.id == bad))
    with pytest.raises(ShardKeyError) as want:
        general(make_cluster().router, select(User).where(User.id == bad))
    assert str(got.value) == str(want.value)
    assert got.value.table == want.value.table and "users" in got.value.table


# select(Model).where(Model.key == v), once routed, is found again by the statement's
# column and entity objects (Router._entity_entries), without working out its shape.
ENTITY_SHAPES = ["entity", "filter_by", "colocated child", "range group", "list group", "uuid key"]


@contextmanager
def no_shape_analysis():
    """Inside, route() may not work out a statement's shape (_column_equals_value)."""
    saved = routing._column_equals_value

    def refuse(criterion):
        raise AssertionError("the shape was worked out again")
    routing._column_equals_value = refuse
    try:
        yield
    finally:
        routing._column_equals_value = saved


@pytest.mark.parametrize("name", ENTITY_SHAPES)
def test_an_entity_select_once_routed_is_found_by_its_objects(name):
    build = SHORTCUT[name]
    c = make_cluster()
    ref = make_cluster()
    for k in range(60):
        c.router.route(build(k))
    with no_shape_analysis(), counting_plans(c.router) as plans:
        for k in range(120):
            got = c.router.route(build(k))
            assert got == general(ref.router, build(k)), (name, k)
            assert got.router is c.router
    assert plans == []


@pytest.mark.parametrize("name", sorted(OTHER) + ["columns", "table columns", "lightweight table"])
def test_other_statements_are_not_found_by_their_objects(name):
    build = OTHER.get(name) or SHORTCUT[name]
    c = make_cluster()
    for k in range(12):
        for shape in ENTITY_SHAPES:
            c.router.route(SHORTCUT[shape](k))
        answer(c.router, build(k))
    with no_shape_analysis():
        for k in range(12):
            try:
                answer(c.router, build(k))
            except AssertionError:
                continue  # analysed (or planned): not answered from the entity entries
            # Answered without the shape: only a statement the shortcut does not take at all.
            assert routing._key_criterion(build(k)) is None, (name, k)


def test_a_statement_with_parameters_of_its_own_is_not_found_by_its_objects():
    c = _shared()
    with no_shape_analysis():
        assert c.router.route(select(User).where(User.id == 5)).shards == (c.shard_for(User, 5),)
    stmt = select(User).where(User.id == 5).params(id_1=6)
    if "_params" not in stmt.__dict__:
        # (SQLAlchemy 2.0 matches .params() names with its parameters' keys, which for an
        # anonymous one is not its compiled name: the copy holds 5 and runs with it.)
        assert stmt.compile().construct_params() == {"id_1": 5}
        assert c.router.route(stmt).shards == (c.shard_for(User, 5),)
        return
    # (SQLAlchemy 2.1 runs it with id = 6, the compiled name's value: refused by both
    # paths, not routed by the 5 it was built with.)
    for router in (c.router, make_cluster().router):
        with pytest.raises(RoutingError, match="id_1"):
            router.route(stmt)


def test_entity_entries_go_with_the_router_and_its_entries():
    c = make_cluster()
    for k in range(100):  # a route kept for every shard
        c.router.route(select(User).where(User.id == k))
    assert c.router._entity_entries
    c.router._key_columns.clear()
    c.router._entity_entries.clear()
    with pytest.raises(AssertionError, match="worked out again"), no_shape_analysis():
        c.router.route(select(User).where(User.id == 8))
    assert routing.Router(c.config, like=c.router)._entity_entries == {}


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_an_entity_select_sends_every_int_key_to_its_owner_from_its_entry(k):
    with no_shape_analysis():
        r = _shared().router.route(select(User).where(User.id == k))
    assert r.shards == (_shared().shard_for(User, k),) and r.keys == "one"
