"""Session semantics an experienced SQLAlchemy user relies on, on a real 3-shard cluster:
what the identity map holds after bulk updates and merges, and bulk writes that must
not land on a row of another shard.

Every test checks both what the session's objects say and what each shard's primary holds.
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, bindparam, inspect, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient_to_detached, mapped_column
from sqlalchemy.orm.exc import StaleDataError

import shardkit
from models import Country, Order, User

pytestmark = pytest.mark.integration


class _VersionedBase(DeclarativeBase):
    pass


class VOrder(_VersionedBase):
    """The orders table mapped with optimistic concurrency: ``amount`` is the version id."""
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"version_id_col": amount}


def keys_on(cluster, shard, n, start=1):
    out = []
    k = start
    while len(out) < n:
        if cluster.shard_for(User, k) == shard:
            out.append(k)
        k += 1
    return out


def rows(sharded, shard, sql):
    with sharded.cluster.primary(shard).connect() as c:
        return [tuple(r) for r in c.execute(text(sql))]


def token(obj):
    return inspect(obj).key[2]


def users_on_each_shard(sharded):
    """One user per shard (in shard order), each named u<id>."""
    ks = [keys_on(sharded.cluster, s, 1)[0] for s in sharded.cluster.shard_names]
    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in ks)
        s.commit()
    return ks


def order_ids_on_two_shards(sharded):
    """User a on s0 with orders 1 and 2, user b on s1 with order 2 (order ids are unique
    per shard only); returns (a, b)."""
    a, b = keys_on(sharded.cluster, "s0", 1)[0], keys_on(sharded.cluster, "s1", 1)[0]
    with sharded.Session() as s:
        s.add_all([User(id=a, name="a"), User(id=b, name="b")])
        s.flush()
        s.add_all([Order(id=1, user_id=a, amount=10), Order(id=2, user_id=a, amount=10),
                   Order(id=2, user_id=b, amount=20)])
        s.commit()
    return a, b


# -- ORM bulk UPDATE by primary key keeps the identity map in step ---------------------------


def test_orm_bulk_update_by_primary_key_synchronizes_objects_of_every_shard(sharded):
    """``session.execute(update(User), rows)``: SQLAlchemy 2 updates the matching objects
    the session holds (synchronize_session 'auto' is 'evaluate' for a bulk UPDATE by
    primary key), so a read of the object after it sees the new value, as the database
    does.  Each row's object is the one of its own shard."""
    ks = users_on_each_shard(sharded)
    with sharded.Session() as s:
        users = [s.get(User, k) for k in ks]
        s.execute(update(User), [{"id": k, "name": f"bulk{k}"} for k in ks])
        assert [u.name for u in users] == [f"bulk{k}" for k in ks]
        # no stale value comes back either: the flush has nothing to write
        assert not s.dirty
        s.commit()
    for sh, k in zip(sharded.cluster.shard_names, ks):
        assert rows(sharded, sh, "SELECT id, name FROM users") == [(k, f"bulk{k}")]
    with sharded.Session() as s:
        users = [s.get(User, k) for k in ks]
        s.execute(update(User), [{"id": k, "name": "quiet"} for k in ks],
                  execution_options={"synchronize_session": False})
        assert [u.name for u in users] == [f"bulk{k}" for k in ks]  # as SQLAlchemy: left as is
        s.rollback()


def test_orm_bulk_update_synchronizes_only_the_rows_own_shard(sharded):
    """Order 2 exists on s0 (user a) and s1 (user b): a bulk row for user b's order 2 updates
    s1's object, not the equal-keyed object of s0 that the session also holds."""
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        oa = s.scalars(select(Order).where(Order.user_id == a, Order.id == 2)).one()
        ob = s.scalars(select(Order).where(Order.user_id == b, Order.id == 2)).one()
        assert (token(oa), token(ob)) == ("s0", "s1")
        s.execute(update(Order), [{"id": 2, "user_id": b, "amount": 99}])
        assert (oa.amount, ob.amount) == (10, 99)
        s.commit()
    assert rows(sharded, "s0", "SELECT id, amount FROM orders ORDER BY id") == [(1, 10), (2, 10)]
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 99)]


def test_orm_bulk_update_of_reference_rows_synchronizes_the_sessions_copy(sharded):
    with sharded.Session() as s:
        s.add(Country(code="fr", name="France"))
        s.commit()
    with sharded.Session() as s:
        fr = s.get(Country, "fr")
        s.execute(update(Country), [{"code": "fr", "name": "République française"}])
        assert fr.name == "République française"
        s.commit()
    for sh in sharded.cluster.shard_names:
        assert rows(sharded, sh, "SELECT name FROM countries") == [("République française",)]


def test_orm_bulk_update_with_a_where_clause_is_refused_clearly(sharded):
    """SQLAlchemy's bulk UPDATE by primary key with extra WHERE criteria runs on one
    connection; a ShardedSession cannot, so it says so, with what works instead, rather than
    SQLAlchemy's NotImplementedError about per-instance sharding (also when the WHERE names
    the key, or the caller passes a shard or shardkit_all_shards as the error told it)."""
    ks = users_on_each_shard(sharded)
    stmt = update(User).where(User.name.like("u%"))
    bulk = [{"id": k, "name": "zz"} for k in ks]
    for opts in ({"synchronize_session": False},
                 {"synchronize_session": False, "shardkit_all_shards": True},
                 {"synchronize_session": False, "shardkit_shard": "s0"}):
        with sharded.Session() as s:
            with pytest.raises(shardkit.RoutingError, match="core_only"):
                s.execute(stmt, bulk, execution_options=opts)
    with sharded.Session() as s:
        with pytest.raises(shardkit.RoutingError, match="core_only"):
            s.execute(update(User).where(User.id.in_(ks)), bulk,
                      execution_options={"synchronize_session": False})
        # what the message offers works: Core executemany, split by each row's key
        s.execute(update(User).where(User.id == bindparam("uid")).values(name=bindparam("nn")),
                  [{"uid": k, "nn": f"core{k}"} for k in ks],
                  execution_options={"dml_strategy": "core_only"})
        s.commit()
    for sh, k in zip(sharded.cluster.shard_names, ks):
        assert rows(sharded, sh, "SELECT id, name FROM users") == [(k, f"core{k}")]


@pytest.mark.parametrize("how", ["execute", "bulk_update_mappings"])
def test_orm_bulk_update_checks_and_advances_the_version_id(sharded, how):
    """A mapper with ``version_id_col``: SQLAlchemy's bulk UPDATE by primary key matches the
    version each row gives (StaleDataError if the row has moved on) and sets the next one.
    A stale row overwrote the newer one and put its version back (a lost update), and a
    fresh one left the version where it was."""
    a, b = order_ids_on_two_shards(sharded)  # s1's order 2 has amount (version) 20

    def bulk(s, rows):
        if how == "execute":
            s.execute(update(VOrder), rows)
        else:
            s.bulk_update_mappings(VOrder, rows)

    with sharded.Session() as s:
        with pytest.raises(StaleDataError, match="version id"):
            bulk(s, [{"id": 2, "user_id": b, "amount": 19}])
        s.rollback()
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 20)]
    with sharded.Session() as s:
        held = s.scalars(select(VOrder).where(VOrder.user_id == b, VOrder.id == 2)).one()
        bulk(s, [{"id": 2, "user_id": b, "amount": 20}])
        if how == "execute":
            assert held.amount == 21  # the session's object has the row's new version
        s.commit()
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 21)]
    assert rows(sharded, "s0", "SELECT id, amount FROM orders ORDER BY id") == [(1, 10), (2, 10)]


def test_bulk_save_objects_of_a_stale_versioned_object_raises(sharded):
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        o = s.scalars(select(VOrder).where(VOrder.user_id == b, VOrder.id == 2)).one()
        s.expunge(o)
    with sharded.Session() as s:  # another writer moves the row on to version 21
        s.execute(update(VOrder), [{"id": 2, "user_id": b, "amount": 20}])
        s.commit()
    with sharded.Session() as s:
        with pytest.raises(StaleDataError):
            s.bulk_save_objects([o])
        s.rollback()
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 21)]


# -- bulk_save_objects must not write a moved key onto another shard's row -------------------


def test_bulk_save_objects_refuses_a_shard_key_moved_to_another_shard(sharded):
    """A flush refuses to change an object's shard key to another shard's (README); a
    bulk_save_objects of the same object sent its UPDATE to the new key's shard by primary
    key, where an order with the same id (ids are unique per shard only) belongs to another
    user: that row was overwritten and the object's own row left unchanged."""
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        o = s.scalars(select(Order).where(Order.user_id == a, Order.id == 2)).one()
        o.user_id = b
        o.amount = 11
        s.expunge(o)
        with pytest.raises(shardkit.CrossShardWriteError, match="s0 to s1"):
            s.bulk_save_objects([o])
        s.commit()
    assert rows(sharded, "s0", "SELECT id, user_id, amount FROM orders ORDER BY id") == [
        (1, a, 10), (2, a, 10)]
    assert rows(sharded, "s1", "SELECT id, user_id, amount FROM orders") == [(2, b, 20)]
    # Equal primary keys, each key unchanged: each object's row is updated on its shard.
    with sharded.Session() as s:
        both = s.scalars(select(Order).where(Order.id == 2)).all()
        for o in both:
            o.amount += 1
        s.expunge_all()
        s.bulk_save_objects(both)
        s.commit()
    assert rows(sharded, "s0", "SELECT id, amount FROM orders ORDER BY id") == [(1, 10), (2, 11)]
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 21)]


# -- merge() keeps one object per row ----------------------------------------------------------


@pytest.mark.parametrize("held", [False, True], ids=["fresh", "row-held"])
def test_merge_load_false_of_transient_to_detached_object_is_the_rows_identity(sharded, held):
    """``make_transient_to_detached(obj)`` then ``merge(obj, load=False)`` (the caching
    recipe): on one database the merged object is the row's identity in the session, the
    one session.get() and queries return, and is the object already held if there is one.
    The merged copy carried no shard in its identity key, so the session held a second
    object for the same row."""
    ks = users_on_each_shard(sharded)
    b = ks[1]
    with sharded.Session() as s:
        existing = s.get(User, b) if held else None
        u = User(id=b, name=f"u{b}")
        make_transient_to_detached(u)
        m = s.merge(u, load=False)
        assert token(m) == "s1"
        if held:
            assert m is existing
        assert s.get(User, b) is m
        assert s.scalars(select(User).where(User.id == b)).one() is m
        m.name = "merged"
        s.commit()
    assert rows(sharded, "s1", "SELECT id, name FROM users") == [(b, "merged")]


def test_merge_load_false_of_transient_to_detached_child_finds_its_shard(sharded):
    """The same for a row whose primary key does not contain the shard key (order 2 is on
    two shards): its shard key says which row it is."""
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        o = Order(id=2, user_id=b, amount=20)
        make_transient_to_detached(o)
        m = s.merge(o, load=False)
        assert token(m) == "s1"
        got = s.scalars(select(Order).where(Order.user_id == b, Order.id == 2)).one()
        assert got is m
        m.amount = 21
        s.commit()
    assert rows(sharded, "s1", "SELECT id, amount FROM orders") == [(2, 21)]
    assert rows(sharded, "s0", "SELECT id, amount FROM orders ORDER BY id") == [(1, 10), (2, 10)]



# -- get() of a primary key that exists on several shards ------------------------------------


def test_get_of_a_key_on_two_shards_names_the_fix_also_through_legacy_query(sharded):
    """Order ids are unique per shard only: get(Order, 2) cannot know which row is meant.
    Session.get(), get_one() and the legacy Query.get() say so and name the way out,
    rather than SQLAlchemy's bare MultipleResultsFound; naming the shard finds the row."""
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        for call in (lambda: s.get(Order, 2), lambda: s.get_one(Order, 2),
                     lambda: s.query(Order).get(2)):
            with pytest.raises(shardkit.RoutingError, match="more than one shard") as ei:
                call()
            assert "Order with primary key 2" in str(ei.value) and "identity_token" in str(ei.value)
        assert s.get(Order, 2, identity_token="s1").user_id == b
        assert s.query(Order).set_shard("s0").get(2).user_id == a
        with shardkit.scope(shard="s1"):
            assert s.query(Order).get(2).user_id == b
        assert s.query(Order).get(1).user_id == a   # on one shard only: found


def test_get_of_a_key_the_session_holds_from_two_shards_is_refused(sharded):
    """A primary key unique per shard only, whose rows of two shards the session holds
    (read by a query): get() cannot know which is meant, as when it loads them; it gave
    the first shard's object.  Naming the shard gives that shard's."""
    a, b = order_ids_on_two_shards(sharded)
    with sharded.Session() as s:
        assert len(s.scalars(select(Order).where(Order.id == 2)).all()) == 2
        with pytest.raises(shardkit.RoutingError, match="more than one shard"):
            s.get(Order, 2)
        assert s.get(Order, 2, identity_token="s1").user_id == b
        with shardkit.scope(shard="s0"):
            assert s.get(Order, 2).user_id == a
        assert s.get(Order, 1).user_id == a
