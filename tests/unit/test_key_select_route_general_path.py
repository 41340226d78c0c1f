"""The router's shortcut for ``select(...).where(key == value)``: it must
answer as the general path does, and what it keeps must not grow with the tables an
application builds per read."""

import gc
import weakref

import pytest
from sqlalchemy import BigInteger, String, column, select, table
from sqlalchemy.exc import InvalidRequestError

from models import User
from test_key_select_route import counting_plans, general, make_cluster


def test_a_select_of_no_columns_is_refused_as_by_the_general_path():
    # select().where(User.id == k): the ORM refuses a SELECT of no columns; the
    # shortcut, which found every selected column (none) of the criterion's table,
    # answered with the users key's shard instead.
    c = make_cluster()
    ref = make_cluster()
    for k in range(30):
        c.router.route(select(User).where(User.id == k))
    for k in range(6):
        with pytest.raises(InvalidRequestError, match="no columns"):
            general(ref.router, select().where(User.id == k))
        with pytest.raises(InvalidRequestError, match="no columns"):
            c.router.route(select().where(User.id == k))


def test_tables_built_per_read_are_not_kept_by_the_router():
    # An application may build its table() objects per read (the router says so where
    # it learns key types): each one's entry kept the table (and with a Table, its
    # MetaData) alive for the router's lifetime.
    c = make_cluster()
    n = 3000
    refs = []
    for k in range(n):
        t = table("users", column("id", BigInteger), column("name", String))
        refs.append(weakref.ref(t))
        assert c.router.route(select(t).where(t.c.id == k)).shards == (c.shard_for(User, k),)
        del t
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {n} per-read tables are still referenced"
    # The entries of the tables that stay are kept again as before.
    for k in range(100):
        c.router.route(select(User).where(User.id == k))
    ref = make_cluster()
    with counting_plans(c.router) as plans:
        for k in range(100):
            assert c.router.route(select(User).where(User.id == k)) == general(
                ref.router, select(User).where(User.id == k))
    assert plans == []
