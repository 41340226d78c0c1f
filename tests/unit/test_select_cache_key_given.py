"""The router gives ``select(Model).where(Model.key == value)`` the SQLAlchemy cache key of
the first statement of that form, with the statement's own bind parameter
(``_give_cache_key``), so that executing it does not traverse it again.  The key given
must be the key SQLAlchemy works out for the statement, for every statement the router
gives one to; a statement derived from it must not inherit it."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    and_,
    bindparam,
    cast,
    literal,
    not_,
    select,
    type_coerce,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import aliased, selectinload
from sqlalchemy.sql.cache_key import HasCacheKey
from sqlalchemy.sql.elements import _anonymous_label
from sqlalchemy.sql.selectable import LABEL_STYLE_TABLENAME_PLUS_COL, LABEL_STYLE_NONE

from models import Customer, Device, Event, Order, User, offline_cluster
from shardkit import ShardkitError


def _fresh(statement):
    """The cache key SQLAlchemy works out for ``statement`` (not a memo of one)."""
    return HasCacheKey._generate_cache_key(statement)


def _given(statement):
    """Whether the router gave ``statement`` its cache key (SQLAlchemy's own memo of one is
    not the router's function)."""
    memo = statement.__dict__.get("_generate_cache_key")
    return memo is not None and memo.__qualname__.startswith("_give_cache_key.")


def _assert_true_key(build):
    """Route the statement ``build()`` makes, then compare its cache key with the one
    SQLAlchemy works out for a twin never routed nor compiled (SQLAlchemy's ORM changes
    the compile options of the first statement it compiles of a form, after working out
    its key: a statement that was compiled no longer traverses to the key it had)."""
    statement, twin = build(), build()
    try:
        want = _fresh(twin)
    except sa_exc.ArgumentError:  # (not a statement SQLAlchemy can run)
        return statement
    try:
        _cluster().router.route(statement)
    except (ShardkitError, sa_exc.ArgumentError):  # (refused, or SQLAlchemy's own refusal)
        pass
    got = statement._generate_cache_key()
    if want is None:
        assert got is None
        return statement
    assert got.key == want.key
    assert tuple(got[2:]) == tuple(want[2:])
    # The statement's own parameters, in the order of the twin's.
    assert [id(b) for b in got.bindparams] == [id(b) for b in _fresh(statement).bindparams]
    assert [(b.key == w.key or type(b.key) is type(w.key) is _anonymous_label, b.value)
            for b, w in zip(got.bindparams, want.bindparams)] == [(True, w.value) for w in want.bindparams]
    return statement


KEYS = {
    User: lambda k: User.id == k,
    Order: lambda k: Order.user_id == k,
    Event: lambda k: Event.id == k * 97,
    Customer: lambda k: Customer.region == ["eu", "us", "zz"][k % 3],
    Device: lambda k: Device.id == uuid.UUID(int=k * 7919 + 1),
}


@pytest.mark.parametrize("entity", list(KEYS), ids=lambda e: e.__name__)
def test_a_keyed_select_gets_its_true_cache_key(entity):
    seen = set()
    for k in range(80):
        shard = _cluster().shard_for(entity, KEYS[entity](k).right.value)
        stmt = _assert_true_key(lambda: select(entity).where(KEYS[entity](k)))
        # (The first statement of the form on each shard may take the general path, which
        # works out its key: the route is kept per shard.)
        assert _given(stmt) or shard not in seen, "no cache key given: the shortcut is off"
        seen.add(shard)


def test_the_first_statements_of_a_form_make_it(cluster=None):
    c = offline_cluster(["s0", "s1", "s2"])
    stmts = [select(Event).where(Event.id == k) for k in range(6)]
    for stmt in stmts:
        c.router.route(stmt)
    assert _given(stmts[-1])
    # (SQLAlchemy's memo of the first statements' key, worked out for the plan.)
    twin = select(Event).where(Event.id == 5)
    assert stmts[-1]._generate_cache_key().key == _fresh(twin).key


def test_filter_by_is_the_same_form():
    stmt = _assert_true_key(lambda: select(User).filter_by(id=3))
    assert _given(stmt)


DERIVED = {
    "where": lambda s: s.where(User.name == "x"),
    "limit": lambda s: s.limit(1),
    "options": lambda s: s.options(selectinload(User.orders)),
    "label style": lambda s: s.set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL),
    "order_by": lambda s: s.order_by(User.name),
    "for update": lambda s: s.with_for_update(),
    "execution options": lambda s: s.execution_options(x=1),
}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_a_statement_derived_from_one_given_a_key_works_its_own_out(name):
    stmt = _assert_true_key(lambda: select(User).where(User.id == 5))
    assert _given(stmt)
    derived = DERIVED[name](stmt)
    assert not _given(derived)
    twin = DERIVED[name](select(User).where(User.id == 5))
    assert derived._generate_cache_key().key == _fresh(twin).key
    assert [b.value for b in derived._generate_cache_key().bindparams] == \
        [b.value for b in _fresh(twin).bindparams]


# What may be done to a keyed select: each either keeps its form or must not be given the
# form's key.  (Applied in any order and number by the property test below.)
CHANGES = [
    lambda s, k: s,
    lambda s, k: s.where(User.name == "x"),
    lambda s, k: s.limit(k % 3 + 1),
    lambda s, k: s.offset(1),
    lambda s, k: s.order_by(User.id),
    lambda s, k: s.distinct(),
    lambda s, k: s.set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL),
    lambda s, k: s.set_label_style(LABEL_STYLE_NONE),
    lambda s, k: s.prefix_with("/*p*/"),
    lambda s, k: s.suffix_with("/*s*/"),
    lambda s, k: s.with_statement_hint("h"),
    lambda s, k: s.execution_options(y=2),
    lambda s, k: s.options(selectinload(User.orders)),
    lambda s, k: s.with_for_update(),
    lambda s, k: s.add_columns(User.name),
    lambda s, k: s.with_only_columns(User.id),
    lambda s, k: s.params(x=1) if hasattr(s, "params") else s,
    lambda s, k: s.correlate(None),
    lambda s, k: s.group_by(User.id),
    lambda s, k: s.having(User.id > 0).group_by(User.id),
]
WHERES = [
    lambda k: User.id == k,
    lambda k: User.id == str(k),
    lambda k: User.id == bindparam("named", k),
    lambda k: User.id == bindparam(None, k, literal_execute=True),
    lambda k: User.id == literal(k),
    lambda k: User.id == literal(k, BigInteger),
    lambda k: User.id == literal(k, Integer),
    lambda k: User.id == type_coerce(k, BigInteger),
    lambda k: User.id == cast(k, BigInteger),
    lambda k: not_(User.id != k),
    lambda k: User.id.op("=")(k),
    lambda k: and_(User.id == k),
    lambda k: User.id.__eq__(k),
    lambda k: User.__table__.c.id == k,
    lambda k: User.name == str(k),
    lambda k: type_coerce(User.id, String) == str(k),
]
ENTITIES = [
    lambda: select(User),
    lambda: select(User.id, User.name),
    lambda: select(User.__table__),
    lambda: select(aliased(User)),
    lambda: select(User, User),
]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(ENTITIES) - 1), st.integers(0, len(WHERES) - 1),
       st.lists(st.integers(0, len(CHANGES) - 1), max_size=3), st.integers(-5, 10**6),
       st.booleans())
def test_every_statement_given_a_key_is_given_its_true_one(entity, where, changes, k, change_first):
    def build():
        stmt = ENTITIES[entity]()
        if change_first:
            for i in changes:
                stmt = CHANGES[i](stmt, k)
            return stmt.where(WHERES[where](k))
        stmt = stmt.where(WHERES[where](k))
        for i in changes:
            stmt = CHANGES[i](stmt, k)
        return stmt
    _assert_true_key(build)


_SHARED = []


def _cluster():
    if not _SHARED:
        c = offline_cluster(["s0", "s1", "s2"])
        for entity, key in KEYS.items():  # every form's entry, and its key, made
            for k in range(4):
                c.router.route(select(entity).where(key(k)))
        _SHARED.append(c)
    return _SHARED[0]
