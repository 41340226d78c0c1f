"""The ORM surface on a real 3-shard cluster: legacy Query, session life cycle, loaders, bulk and DML.

Every test checks what actually reached each shard (by querying the shards'
primaries directly, or by counting statements per shard) as well as what the
ORM returned.
"""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    column,
    delete,
    exists,
    func,
    insert,
    inspect,
    lambda_stmt,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    make_transient,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)

from sqlalchemy.dialects.postgresql import insert as pg_insert

import shardkit
from models import Customer, Order, User

pytestmark = pytest.mark.integration


# -- utilities ---------------------------------------------------------------------


def keys_on(cluster, shard, n, start=1, model=User):
    """The first ``n`` integer keys from ``start`` that ``shard`` owns."""
    out = []
    k = start
    while len(out) < n:
        if cluster.shard_for(model, k) == shard:
            out.append(k)
        k += 1
    return out


def ids_on(sharded, shard, sql):
    with sharded.cluster.primary(shard).connect() as c:
        return sorted(r[0] for r in c.execute(text(sql)))


def where_is(sharded, table, key_sql):
    """Shards whose primary holds a row matching ``key_sql`` in ``table``."""
    return [s for s in sharded.cluster.shard_names
            if sharded.count(s, f"SELECT count(*) FROM {table} WHERE {key_sql}")]


def token(obj):
    return inspect(obj).key[2]


def order_1_on_two_shards(sharded):
    """A user on s0 and one on s1, each with an order of id 1 (order ids are unique per
    shard only); returns the two user ids."""
    cluster = sharded.cluster
    ua, ub = keys_on(cluster, "s0", 1)[0], keys_on(cluster, "s1", 1)[0]
    with sharded.Session() as s:
        s.add_all([User(id=ua, name="a"), User(id=ub, name="b")])
        s.flush()
        s.add_all([Order(id=1, user_id=ua, amount=10), Order(id=1, user_id=ub, amount=20)])
        s.commit()
    return ua, ub


N_USERS = 30


def seed(sharded, orders_per_user=2):
    """Users 1..30, each with ``orders_per_user`` orders (id k*100+j, amount j+1)."""
    with sharded.Session() as s:
        for k in range(1, N_USERS + 1):
            u = User(id=k, name=f"u{k}")
            u.orders = [Order(id=k * 100 + j, amount=j + 1) for j in range(orders_per_user)]
            s.add(u)
        s.commit()
    sharded.reset_hits()
    # one key of each shard (in shard order) among the seeded users
    return [keys_on(sharded.cluster, sh, 1)[0] for sh in sharded.cluster.shard_names]


# A second mapping of the same tables, with the delete-orphan cascade applications use.
class _CascadeBase(DeclarativeBase):
    pass


class CUser(_CascadeBase):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    orders: Mapped[list[COrder]] = relationship(back_populates="user",
                                                cascade="all, delete-orphan")


class COrder(_CascadeBase):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(Integer, default=0)
    user: Mapped[CUser] = relationship(back_populates="orders")


# -- legacy Query API -----------------------------------------------------------------


def test_query_api_keyed_reads_and_counts(sharded):
    a, b, c = seed(sharded)
    cluster = sharded.cluster
    with sharded.Session() as s:
        u = s.query(User).filter_by(id=c).one()
        assert isinstance(u, User) and u.id == c and token(u) == cluster.shard_for(User, c)
        assert dict(sharded.hits) == {cluster.shard_for(User, c): 1}

        sharded.reset_hits()
        with pytest.warns(Warning):
            got = s.query(User).get(b + 0)
        assert got is not None and got.id == b
        assert dict(sharded.hits) == {cluster.shard_for(User, b): 1}

        same = keys_on(cluster, "s1", 3)
        sharded.reset_hits()
        rows = s.query(User).filter(User.id.in_(same)).all()
        assert sorted(r.id for r in rows) == same and all(isinstance(r, User) for r in rows)
        assert dict(sharded.hits) == {"s1": 1}

        sharded.reset_hits()
        assert s.query(User).count() == N_USERS
        assert s.query(Order).count() == 2 * N_USERS
        assert set(sharded.hits) == set(cluster.shard_names)
        assert s.query(User).filter(User.name.like("u1%")).count() == 11  # u1, u10..u19
        assert s.query(func.sum(Order.amount)).scalar() == N_USERS * 3
        assert s.query(User).filter(User.id.in_([a, b, c])).count() == 3
        assert s.query(User.id).order_by(User.id).offset(3).limit(2).all() == [(4,), (5,)]
        # Query.count() wraps the query in a subquery; its key still picks the shard.
        sharded.reset_hits()
        assert s.query(User).filter(User.id == same[0]).count() == 1
        assert s.query(User).filter(User.id.in_(same)).count() == 3
        assert s.query(User).filter(User.id == 10**9).count() == 0
        want = Counter({"s1": 2})
        want[cluster.shard_for(User, 10**9)] += 1
        assert sharded.hits == want


def test_query_api_across_shards_returns_entities(sharded):
    """``session.query(User)`` returns User objects, whatever shards the rows come from.

    A user expects ``query(User).filter(User.id.in_(...)).all()``, ``.first()``,
    ``.order_by().limit()`` and ``.one()`` to give ``User`` instances, as they do
    when every key sits on one shard.
    """
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        rows = s.query(User).filter(User.id.in_([a, b, c])).all()
        assert all(isinstance(r, User) for r in rows), [type(r).__name__ for r in rows]
        assert sorted(r.id for r in rows) == sorted([a, b, c])

        first = s.query(User).order_by(User.id).first()
        assert isinstance(first, User) and first.id == 1

        top = s.query(User).order_by(User.id.desc()).limit(3).all()
        assert [getattr(u, "id", None) for u in top] == [30, 29, 28]

        one = s.query(User).filter(User.name == f"u{c}").one()
        assert isinstance(one, User) and one.id == c


# -- session.get ------------------------------------------------------------------------


def test_session_get_routes_by_key_and_scatters_without_it(sharded):
    a, b, c = seed(sharded)
    cluster = sharded.cluster
    with sharded.Session() as s:
        u = s.get(User, c)
        assert u.name == f"u{c}" and token(u) == cluster.shard_for(User, c)
        assert dict(sharded.hits) == {cluster.shard_for(User, c): 1}
        sharded.reset_hits()
        assert s.get(User, c) is u and not sharded.hits          # identity map, no SQL

        sharded.reset_hits()
        assert s.get(User, 10**6) is None
        assert dict(sharded.hits) == {cluster.shard_for(User, 10**6): 1}
        with pytest.raises(NoResultFound):
            s.get_one(User, 10**6)

        # orders: the primary key (id) does not contain the shard key (user_id)
        sharded.reset_hits()
        o = s.get(Order, b * 100 + 1)
        assert o.user_id == b and token(o) == cluster.shard_for(User, b)
        assert set(sharded.hits) == set(cluster.shard_names)
        sharded.reset_hits()
        assert s.get(Order, b * 100 + 1) is o and not sharded.hits
        assert s.get(Order, 987654) is None

        with pytest.raises(shardkit.ShardKeyError, match="pass an int"):
            s.get(User, str(a))

    with sharded.Session() as s:
        s.add_all(Customer(region=r, id=i, name=f"c{r}{i}")
                  for i, r in enumerate(["eu", "uk", "us", "ca", "jp", "br"]))
        s.commit()
        sharded.reset_hits()
        cu = s.get(Customer, ("us", 2))
        assert cu.name == "cus2" and token(cu) == "s1" and dict(sharded.hits) == {"s1": 1}
        sharded.reset_hits()
        assert s.get(Customer, ("jp", 4)).name == "cjp4" and dict(sharded.hits) == {"s2": 1}
        sharded.reset_hits()
        assert s.get(Customer, ("eu", 99)) is None and dict(sharded.hits) == {"s0": 1}


def test_get_composite_key_as_dict(sharded):
    """``session.get(Customer, {"region": "jp", "id": 4})`` (SQLAlchemy's dict form of a
    composite identity) finds the row on the shard of its region, like the tuple form."""
    with sharded.Session() as s:
        s.add_all(Customer(region=r, id=i, name=f"c{r}{i}")
                  for i, r in enumerate(["eu", "uk", "us", "ca", "jp", "br"]))
        s.commit()
    with sharded.Session() as s:
        sharded.reset_hits()
        cu = s.get(Customer, {"region": "jp", "id": 4})
        assert cu is not None and cu.name == "cjp4"
        assert dict(sharded.hits) == {sharded.cluster.shard_for(Customer, "jp"): 1}


def test_get_of_primary_key_present_on_two_shards_is_a_clear_error(sharded):
    """Order ids are unique per user shard only: id 1 may exist on two shards.

    ``session.get(Order, 1)`` cannot pick one; a user expects a shardkit error
    saying the primary key is on several shards and how to name one
    (``identity_token=`` / ``shardkit_shard``), not SQLAlchemy's
    ``MultipleResultsFound``, which ``get()`` never raises on one database.
    """
    ua, ub = order_1_on_two_shards(sharded)
    with sharded.Session() as s:
        assert s.get(Order, 1, identity_token="s1").amount == 20
        with pytest.raises(shardkit.ShardkitError):
            s.get(Order, 1)


# -- merge, refresh, expire, delete, make_transient ---------------------------------------


def test_merge_refresh_expire_delete(sharded):
    a, b, c = seed(sharded, orders_per_user=0)
    cluster = sharded.cluster
    with sharded.Session() as s:
        u = s.get(User, c)
        s.expunge(u)
    u.name = "merged"
    with sharded.Session() as s:
        sharded.reset_hits()
        m = s.merge(u)
        assert token(m) == cluster.shard_for(User, c)
        s.commit()
    assert set(sharded.hits) == {cluster.shard_for(User, c)}
    assert where_is(sharded, "users", f"id = {c} AND name = 'merged'") == [cluster.shard_for(User, c)]

    new_key = keys_on(cluster, "s2", 1, start=1000)[0]
    existing = keys_on(cluster, "s1", 1)[0]
    with sharded.Session() as s:
        s.merge(User(id=new_key, name="new"))               # not in the database yet
        s.merge(User(id=existing, name="overwritten"))      # already there
        s.commit()
    assert where_is(sharded, "users", f"id = {new_key}") == ["s2"]
    assert where_is(sharded, "users", f"id = {existing}") == ["s1"]
    assert sharded.count("s1", f"SELECT count(*) FROM users WHERE id = {existing} AND name = 'overwritten'") == 1

    with sharded.Session() as s:
        u = s.get(User, b)
        with cluster.primary(cluster.shard_for(User, b)).begin() as conn:
            conn.execute(text(f"UPDATE users SET name = 'outside' WHERE id = {b}"))
        sharded.reset_hits()
        s.refresh(u)
        assert u.name == "outside" and dict(sharded.hits) == {cluster.shard_for(User, b): 1}
        with cluster.primary(cluster.shard_for(User, b)).begin() as conn:
            conn.execute(text(f"UPDATE users SET name = 'outside2' WHERE id = {b}"))
        s.expire(u)
        sharded.reset_hits()
        assert u.name == "outside2" and dict(sharded.hits) == {cluster.shard_for(User, b): 1}
        s.refresh(u, with_for_update=True)
        s.rollback()

        victim = s.get(User, a)
        s.delete(victim)
        sharded.reset_hits()
        s.commit()
        assert set(sharded.hits) == {cluster.shard_for(User, a)}
    assert where_is(sharded, "users", f"id = {a}") == []
    assert sum(sharded.count(n, "SELECT count(*) FROM users") for n in cluster.shard_names) == N_USERS


def test_expire_and_delete_of_order_whose_id_exists_on_two_shards(sharded):
    ua, ub = order_1_on_two_shards(sharded)
    with sharded.Session() as s:
        o = s.scalars(select(Order).where(Order.user_id == ub)).one()
        s.expire(o)
        assert o.amount == 20
        s.delete(o)
        s.commit()
    assert sharded.count("s0", "SELECT count(*) FROM orders WHERE id = 1") == 1
    assert sharded.count("s1", "SELECT count(*) FROM orders WHERE id = 1") == 0


def test_make_transient_copy_with_new_key_goes_to_the_new_keys_shard(sharded):
    """Copying a row the SQLAlchemy way (``make_transient``, set a new primary key,
    ``add``) inserts the copy on the shard that owns the new key.

    Inserted on the old object's shard, the copy would be a row the map places
    on another shard, invisible to keyed reads.
    """
    cluster = sharded.cluster
    src = keys_on(cluster, "s0", 1)[0]
    dst = keys_on(cluster, "s1", 1, start=5000)[0]
    with sharded.Session() as s:
        s.add(User(id=src, name="original"))
        s.commit()
    with sharded.Session() as s:
        u = s.get(User, src)
        s.expunge(u)
        make_transient(u)
        u.id = dst
        u.name = "copy"
        s.add(u)
        s.commit()
    assert where_is(sharded, "users", f"id = {dst}") == ["s1"]
    with sharded.Session() as s:
        assert s.get(User, dst) is not None


def test_object_readded_after_failed_flush_goes_to_its_new_keys_shard(sharded):
    """After a flush fails and the session rolls back, the pending object is transient
    again; fixing its key and adding it once more must insert it on the shard that
    owns the new key, not on the shard chosen for the failed attempt."""
    cluster = sharded.cluster
    taken = keys_on(cluster, "s0", 1)[0]
    fixed = keys_on(cluster, "s1", 1, start=5000)[0]
    with sharded.Session() as s:
        s.add(User(id=taken, name="first"))
        s.commit()
    with sharded.Session() as s:
        p = User(id=taken, name="second")
        s.add(p)
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        assert inspect(p).transient
        p.id = fixed
        s.add(p)
        s.commit()
    assert where_is(sharded, "users", f"id = {fixed}") == ["s1"]


# -- relationships ---------------------------------------------------------------------------


def test_selectin_subquery_lazy_and_many_to_one_loads_across_shards(sharded):
    a, b, c = seed(sharded)
    keys = [a, b, c]
    expected = {k: [k * 100, k * 100 + 1] for k in keys}
    for opt in (selectinload, subqueryload):
        with sharded.Session() as s:
            users = s.scalars(select(User).where(User.id.in_(keys)).options(opt(User.orders))).all()
            sharded.reset_hits()
            assert {u.id: sorted(o.id for o in u.orders) for u in users} == expected
            assert not sharded.hits  # loaded eagerly
            for u in users:
                assert all(token(o) == token(u) for o in u.orders)
        with sharded.Session() as s:
            users = s.scalars(select(User).options(opt(User.orders))).all()
            assert len(users) == N_USERS
            assert sum(len(u.orders) for u in users) == 2 * N_USERS
            assert all(o.user_id == u.id for u in users for o in u.orders)
    with sharded.Session() as s:
        users = s.scalars(select(User).where(User.id.in_(keys))).all()
        for u in users:
            sharded.reset_hits()
            assert sorted(o.id for o in u.orders) == expected[u.id]
            assert dict(sharded.hits) == {token(u): 1}
    with sharded.Session() as s:
        orders = s.scalars(select(Order).where(Order.amount == 1)).all()
        assert len(orders) == N_USERS
        for o in orders:
            sharded.reset_hits()
            assert o.user.id == o.user_id
            assert set(sharded.hits) <= {token(o)}
    with sharded.Session() as s:
        orders = s.scalars(select(Order).where(Order.amount == 2).options(selectinload(Order.user))).all()
        sharded.reset_hits()
        assert all(o.user.id == o.user_id for o in orders) and not sharded.hits
        assert sorted(u.id for u in s.scalars(select(User).where(User.orders.any(Order.id > 2900)))) == [29, 30]
        assert len(s.scalars(select(Order).where(Order.user.has(User.name == f"u{c}"))).all()) == 2


def test_subqueryload_runs_only_on_the_parents_shard(sharded):
    """Eager loads run on the shard of the objects they load for (README, routing rules).

    ``subqueryload`` of users on three shards should cost one statement for the
    users and one for their orders on each shard, not one per shard for each
    shard's orders.
    """
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        users = s.scalars(select(User).where(User.id.in_([a, b, c])).options(subqueryload(User.orders))).all()
        assert sum(len(u.orders) for u in users) == 6
    assert dict(sharded.hits) == {sh: 2 for sh in sharded.cluster.shard_names}


def test_joinedload_collection_across_shards(sharded):
    """``joinedload`` of a collection, with ``.unique()`` as SQLAlchemy requires, works
    when the parents sit on several shards (the README says joinedload works)."""
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        one = s.scalars(select(User).where(User.id == a).options(joinedload(User.orders))).unique().one()
        assert sorted(o.id for o in one.orders) == [a * 100, a * 100 + 1]
    with sharded.Session() as s:
        users = s.scalars(select(User).where(User.id.in_([a, b, c]))
                          .options(joinedload(User.orders))).unique().all()
        assert {u.id: len(u.orders) for u in users} == {a: 2, b: 2, c: 2}
    with sharded.Session() as s:
        users = s.scalars(select(User).options(joinedload(User.orders))).unique().all()
        assert len(users) == N_USERS and all(len(u.orders) == 2 for u in users)


def test_delete_orphan_and_cascade_delete_stay_on_the_parents_shard(sharded):
    cluster = sharded.cluster
    a, b, c = (keys_on(cluster, sh, 1)[0] for sh in cluster.shard_names)
    with sharded.Session() as s:
        for k in (a, b, c):
            s.add(CUser(id=k, name=f"u{k}", orders=[COrder(id=k * 10 + j, amount=j) for j in range(3)]))
        s.commit()
    assert [sharded.count(n, "SELECT count(*) FROM orders") for n in cluster.shard_names] == [3, 3, 3]
    with sharded.Session() as s:
        u = s.get(CUser, c)
        u.orders.pop(0)
        u.orders.append(COrder(id=999, amount=9))   # a new child follows its parent
        sharded.reset_hits()
        s.commit()
        assert set(sharded.hits) == {cluster.shard_for(User, c)}
        s.delete(s.get(CUser, b))
        sharded.reset_hits()
        s.commit()
        assert set(sharded.hits) == {cluster.shard_for(User, b)}
    assert ids_on(sharded, cluster.shard_for(User, c), "SELECT id FROM orders") == sorted(
        [c * 10 + 1, c * 10 + 2, 999])
    assert ids_on(sharded, cluster.shard_for(User, b), "SELECT id FROM orders") == []
    assert ids_on(sharded, cluster.shard_for(User, b), "SELECT id FROM users") == []
    assert ids_on(sharded, cluster.shard_for(User, a), "SELECT id FROM orders") == [a * 10, a * 10 + 1, a * 10 + 2]


def test_moving_a_child_to_a_parent_on_another_shard_is_refused(sharded):
    """Re-parenting a colocated child (``order.user = other_user``) changes its shard key
    to a key of another shard.  Like ``order.user_id = other``, it must be refused
    with ``CrossShardWriteError`` before anything is written.

    Otherwise the flush would run ``UPDATE orders SET user_id = <other>`` on the
    old shard; only a foreign key would stop it, and a schema without one would
    keep a misplaced order.
    """
    cluster = sharded.cluster
    a = keys_on(cluster, "s0", 1)[0]
    c = keys_on(cluster, "s2", 1)[0]
    with sharded.Session() as s:
        s.add_all([User(id=a, name="a", orders=[Order(id=1, amount=1)]), User(id=c, name="c")])
        s.commit()
    with sharded.Session() as s:
        o = s.get(User, a).orders[0]
        o.user_id = c
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    with sharded.Session() as s:
        o = s.get(User, a).orders[0]
        o.user = s.get(User, c)
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    assert ids_on(sharded, "s0", "SELECT user_id FROM orders") == [a]
    assert ids_on(sharded, "s2", "SELECT user_id FROM orders") == []


# -- bulk operations ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bulk_save_objects", "bulk_insert_mappings"])
def test_bulk_inserts_land_on_owners_or_are_refused_clearly(sharded, method):
    """``Session.bulk_save_objects`` / ``bulk_insert_mappings`` either write each row on
    the shard that owns it, or raise a shardkit error that says what to use
    instead, never SQLAlchemy's internal ``NotImplementedError`` for per-instance
    sharding, which names neither shardkit nor an alternative."""
    keys = list(range(1, 31))
    with sharded.Session() as s:
        try:
            if method == "bulk_save_objects":
                s.bulk_save_objects([User(id=k, name="bulk") for k in keys])
            else:
                s.bulk_insert_mappings(User, [{"id": k, "name": "bulk"} for k in keys])
            s.commit()
        except shardkit.ShardkitError:
            s.rollback()
            keys = []
    for name in sharded.cluster.shard_names:
        assert ids_on(sharded, name, "SELECT id FROM users") == sorted(
            k for k in keys if sharded.cluster.shard_for(User, k) == name)


@pytest.mark.parametrize("method", ["bulk_update_mappings", "orm_bulk_update_by_pk"])
def test_bulk_updates_by_primary_key(sharded, method):
    """Bulk UPDATE by primary key (``bulk_update_mappings`` or SQLAlchemy 2's
    ``session.execute(update(User), [{"id": ..., "name": ...}, ...])``) gives every
    row its key, so each row can go to its shard, as bulk INSERT does; failing
    that, a shardkit error that is true (not one claiming the WHERE clause has
    no shard key, though every row carries one)."""
    seed(sharded, orders_per_user=0)
    keys = [1, 2, 3, 6, 9, 16]
    rows = [{"id": k, "name": "bulk"} for k in keys]
    with sharded.Session() as s:
        try:
            if method == "bulk_update_mappings":
                s.bulk_update_mappings(User, rows)
            else:
                s.execute(update(User), rows)
            s.commit()
        except shardkit.ShardkitError as e:
            assert "no shard key" not in str(e), str(e)
            s.rollback()
            keys = []
    for name in sharded.cluster.shard_names:
        assert ids_on(sharded, name, "SELECT id FROM users WHERE name = 'bulk'") == sorted(
            k for k in keys if sharded.cluster.shard_for(User, k) == name)


def test_bulk_save_objects_updates_persistent_objects_on_their_shards(sharded):
    """Persistent objects given to ``bulk_save_objects`` are updated where they live; a
    bulk update row whose shard key is not the row's matches nothing on the shard it
    names and raises StaleDataError (as SQLAlchemy's bulk update does for a missing
    row), with nothing written."""
    from sqlalchemy.orm.exc import StaleDataError

    a, b, c = seed(sharded, orders_per_user=1)
    with sharded.Session() as s:
        users = [s.get(User, k) for k in (a, b, c)]
        for u in users:
            u.name = "saved"
        s.expunge_all()
        s.bulk_save_objects(users)
        s.commit()
    for k in (a, b, c):
        assert where_is(sharded, "users", f"id = {k} AND name = 'saved'") == [sharded.cluster.shard_for(User, k)]
    with sharded.Session() as s:
        with pytest.raises(StaleDataError, match="expected to update 1"):
            # order a*100 belongs to user a; user_id=b sends the row to b's shard
            s.bulk_update_mappings(Order, [{"id": a * 100, "user_id": b, "amount": 99}])
        s.rollback()
        with pytest.raises(shardkit.ShardKeyError, match="user_id"):
            s.execute(update(Order), [{"id": a * 100, "amount": 99}])
        s.rollback()
    assert sharded.count(sharded.cluster.shard_for(User, a),
                         f"SELECT count(*) FROM orders WHERE id = {a * 100} AND amount = 1") == 1


def test_orm_bulk_insert_split_and_returning_refused(sharded):
    with sharded.Session() as s:
        r = s.execute(insert(User), [{"id": k, "name": "b"} for k in range(1, 31)])
        assert r.rowcount == 30
        with pytest.raises(shardkit.RoutingError, match="add_all"):
            s.execute(insert(User).returning(User.id), [{"id": 100, "name": "x"}, {"id": 101, "name": "y"}])
        s.rollback()
        assert s.execute(insert(User).values(id=500, name="x").returning(User.id)).all() == [(500,)]
        # With ON CONFLICT DO NOTHING some rows may not be inserted: the count is unknown
        # (-1, as SQLAlchemy reports an executemany's), never the number of rows given.
        r = s.execute(pg_insert(User).on_conflict_do_nothing(), [{"id": k, "name": "c"} for k in (500, 600, 601)])
        assert r.rowcount == -1
        s.commit()
    assert where_is(sharded, "users", "id = 500") == [sharded.cluster.shard_for(User, 500)]
    assert sum(sharded.count(n, "SELECT count(*) FROM users") for n in sharded.cluster.shard_names) == 3


# -- UPDATE / DELETE statements ------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch", False])
def test_update_and_delete_statements_with_each_synchronize_session(sharded, sync):
    a, b, c = seed(sharded, orders_per_user=0)
    cluster = sharded.cluster
    opts = {"synchronize_session": sync}
    with sharded.Session() as s:
        users = {u.id: u for u in s.scalars(select(User)).all()}
        sharded.reset_hits()
        r = s.execute(update(User).where(User.id == c).values(name="one"), execution_options=opts)
        assert r.rowcount == 1 and dict(sharded.hits) == {cluster.shard_for(User, c): 1}
        if sync is not False:
            assert users[c].name == "one"
        sharded.reset_hits()
        r = s.execute(update(User).where(User.name.in_(["u7", "u8", "u9", "u10"])).values(name="many"),
                      execution_options={**opts, "shardkit_all_shards": True})
        assert r.rowcount == 4 and set(sharded.hits) == set(cluster.shard_names)
        if sync is not False:
            assert [users[k].name for k in (7, 8, 9, 10)] == ["many"] * 4
        r = s.execute(delete(User).where(User.id == b), execution_options=opts)
        assert r.rowcount == 1
        r = s.execute(delete(User).where(User.name == "many"),
                      execution_options={**opts, "shardkit_all_shards": True})
        assert r.rowcount == 4
        if sync is not False:
            assert users[b] not in s and users[7] not in s
        s.commit()
    assert where_is(sharded, "users", "name = 'one'") == [cluster.shard_for(User, c)]
    assert where_is(sharded, "users", f"id = {b} OR name = 'many'") == []
    assert sum(sharded.count(n, "SELECT count(*) FROM users") for n in cluster.shard_names) == N_USERS - 5


def test_update_and_delete_with_in_list_spanning_shards(sharded):
    """``update(User).where(User.id.in_(keys))`` with keys on several shards updates each
    owner's rows (the README: ``key IN (...)`` goes to the owning shards, each with
    its own values), for UPDATE and DELETE statements and the legacy
    ``query(...).filter(... in_ ...).delete()`` alike."""
    a, b, c = seed(sharded)
    cluster = sharded.cluster
    with sharded.Session() as s:
        same = keys_on(cluster, "s0", 3)
        r = s.execute(update(User).where(User.id.in_(same)).values(name="same-shard"))
        assert r.rowcount == 3
        r = s.execute(update(User).where(User.id.in_([a, b, c])).values(name="spread"))
        assert r.rowcount == 3
        r = s.execute(delete(Order).where(Order.user_id.in_([a, b, c]), Order.amount == 1))
        assert r.rowcount == 3
        assert s.query(Order).filter(Order.user_id.in_([a, b, c])).delete() == 3
        s.commit()
    for k in (a, b, c):
        assert where_is(sharded, "users", f"id = {k} AND name = 'spread'") == [cluster.shard_for(User, k)]
        assert where_is(sharded, "orders", f"user_id = {k}") == []


def test_update_and_delete_returning_across_shards(sharded):
    """``update(...).returning(...)`` / ``delete(...).returning(...)`` run on every shard
    (``shardkit_all_shards=True``) return the rows of every shard."""
    a, b, c = seed(sharded, orders_per_user=0)
    all_shards = {"shardkit_all_shards": True}
    with sharded.Session() as s:
        assert s.execute(update(User).where(User.id == c).values(name="r").returning(User.id, User.name)
                         ).all() == [(c, "r")]
        got = s.execute(update(User).where(User.name.in_([f"u{a}", f"u{b}"])).values(name="R")
                        .returning(User.id), execution_options=all_shards).scalars().all()
        assert sorted(got) == sorted([a, b])
        gone = s.execute(delete(User).where(User.name == "R").returning(User.id),
                         execution_options=all_shards).scalars().all()
        assert sorted(gone) == sorted([a, b])
        s.commit()
    assert where_is(sharded, "users", f"id IN ({a}, {b})") == []


def test_update_statement_that_moves_the_shard_key_is_refused(sharded):
    """``update(User).where(User.id == k).values(id=k2)`` with k2 owned by another shard
    would leave the row on k's shard under a key it does not own.  The README: a
    shard-key change that would move a row is refused before anything is written
    (``CrossShardWriteError``), for UPDATE statements as for objects in a flush."""
    cluster = sharded.cluster
    k = keys_on(cluster, "s0", 1)[0]
    k2 = keys_on(cluster, "s1", 1, start=5000)[0]
    with sharded.Session() as s:
        s.add(User(id=k, name="x"))
        s.commit()
        with pytest.raises(shardkit.CrossShardWriteError):
            s.execute(update(User).where(User.id == k).values(id=k2))
        s.rollback()
    assert where_is(sharded, "users", f"id = {k}") == ["s0"]
    assert where_is(sharded, "users", f"id = {k2}") == []


def test_with_for_update_reads_lock_on_the_owners(sharded):
    a, b, c = seed(sharded, orders_per_user=0)
    cluster = sharded.cluster
    with sharded.Session() as s:
        u = s.scalars(select(User).where(User.id == c).with_for_update()).one()
        assert u.id == c and dict(sharded.hits) == {cluster.shard_for(User, c): 1}
        sharded.reset_hits()
        assert s.get(User, a, with_for_update=True).id == a
        assert dict(sharded.hits) == {cluster.shard_for(User, a): 1}
        sharded.reset_hits()
        got = s.scalars(select(User).where(User.id.in_([a, b, c])).with_for_update()).all()
        assert sorted(u.id for u in got) == sorted([a, b, c])
        assert set(sharded.hits) == set(cluster.shard_names)
        assert len(s.scalars(select(User).with_for_update()).all()) == N_USERS
        # the locks are held on each owner's primary
        with cluster.primary(cluster.shard_for(User, b)).connect() as other:
            free = other.execute(text(
                f"SELECT id FROM users WHERE id IN ({a}, {b}) FOR UPDATE SKIP LOCKED")).all()
            other.rollback()
        assert free == []
        s.rollback()


# -- scalars, scalar, subqueries, exists -------------------------------------------------------


def test_scalars_scalar_and_correlated_filters(sharded):
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        assert s.scalar(select(User.name).where(User.id == c)) == f"u{c}"
        assert s.scalar(select(func.count()).select_from(User)) == N_USERS
        assert s.scalar(select(func.max(Order.id))) == N_USERS * 100 + 1
        assert s.scalar(select(func.count()).select_from(User).where(User.id.in_([a, b, c]))) == 3
        assert s.scalars(select(User).order_by(User.id)).first().id == 1
        assert s.scalars(select(User).where(User.name == f"u{c}")).one_or_none().id == c
        assert [u.id for u in s.scalars(select(User).where(User.id.in_(list(range(1, 10))))
                                        .order_by(User.id.desc()).limit(4))] == [9, 8, 7, 6]
        assert s.scalars(select(User).where(User.id.in_([]))).all() == []
        assert len(s.scalars(select(User).execution_options(yield_per=4)).all()) == N_USERS
        correlated = exists().where(Order.user_id == User.id, Order.id == c * 100 + 1)
        assert s.scalars(select(User.id).where(correlated)).all() == [c]
        with pytest.raises(shardkit.ScatterRefused) as ei:
            s.execute(select(User).where(User.id == select(func.max(User.id)).scalar_subquery())).all()
        assert ei.value.construct == "statement not colocated on the shard key"


def test_select_exists_without_the_key_is_exact(sharded):
    """``select(exists().where(User.name == n))`` is true when any shard has such a user.

    Run on every shard, each answers for itself: the answers are OR-ed into one
    row, not concatenated (where ``scalar()`` would return the first shard's
    False while the user lives on another shard, and the legacy
    ``query(q.exists()).scalar()`` would raise MultipleResultsFound).
    """
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        assert s.execute(select(exists().where(User.name == f"u{c}"))).all() == [(True,)]
        assert s.scalar(select(exists().where(User.name == f"u{c}"))) is True
        assert s.scalar(select(exists().where(User.name == "nobody"))) is False
        assert s.query(s.query(User).filter(User.name == f"u{c}").exists()).scalar() is True


def test_select_exists_with_the_key_inside(sharded):
    """``select(exists().where(User.id == k))`` is the usual "does user k exist" check.

    The key sits inside the EXISTS subquery; it decides the shard.
    """
    a, b, c = seed(sharded)
    with sharded.Session() as s:
        for k in (a, b, c):
            assert s.scalar(select(exists().where(User.id == k))) is True, k
        assert s.scalar(select(exists().where(User.id == 10**6))) is False


def test_correlated_scalar_subquery_with_count_per_row(sharded):
    """A per-row count correlated on the shard key (``SELECT id, (SELECT count(*) FROM
    orders WHERE orders.user_id = users.id)``) is computed on each row's own shard and
    is exact across shards (the README: subqueries correlated on the key are fine);
    the count aggregates the subquery's rows, not the outer query's."""
    seed(sharded)
    n_orders = select(func.count(Order.id)).where(Order.user_id == User.id).scalar_subquery()
    with sharded.Session() as s:
        rows = s.execute(select(User.id, n_orders.label("n")).order_by(User.id).limit(5)).all()
        assert rows == [(k, 2) for k in range(1, 6)]


# -- statement forms that name their tables indirectly ------------------------------------------


def test_lambda_statements_route_by_key(sharded):
    """``lambda_stmt`` (SQLAlchemy's cached statement form) must route like the statement
    it wraps, with the values of this call; sent to an arbitrary shard, keyed
    reads would miss rows, counts would be one shard's, and inserts would land
    on the wrong shard."""
    cluster = sharded.cluster
    seed(sharded, orders_per_user=0)

    def by_id(uid):
        return lambda_stmt(lambda: select(User).where(User.id == uid))

    def add(uid):
        return lambda_stmt(lambda: insert(User).values(id=uid, name="lam"))

    # two keys of each shard in a row: no round-robin phase can serve them all
    keys = [k for sh in cluster.shard_names for k in keys_on(cluster, sh, 2)]
    new = [k for sh in cluster.shard_names for k in keys_on(cluster, sh, 2, start=1000)]
    with sharded.Session() as s:
        found = {k: [u.id for u in s.scalars(by_id(k)).all()] for k in keys}
        assert found == {k: [k] for k in keys}
        assert s.scalar(lambda_stmt(lambda: select(func.count()).select_from(User))) == N_USERS
        for k in new:
            s.execute(add(k))
        s.commit()
    for name in cluster.shard_names:
        assert ids_on(sharded, name, "SELECT id FROM users WHERE name = 'lam'") == sorted(
            k for k in new if cluster.shard_for(User, k) == name)


def test_from_statement_and_textual_select_are_not_sent_to_an_arbitrary_shard(sharded):
    """``select(User).from_statement(text(...))`` and ``text(...).columns(...)`` name
    their tables only in SQL text, like ``text()``, which shardkit refuses with a
    RoutingError telling the user to name a shard; so are these, rather than
    running on one shard picked round robin and returning that shard's rows."""
    seed(sharded, orders_per_user=0)
    with sharded.Session() as s:
        with pytest.raises(shardkit.RoutingError):
            s.execute(text("SELECT id FROM users"))
        for stmt in (select(User).from_statement(text("SELECT * FROM users")),
                     text("SELECT id FROM users").columns(column("id"))):
            for _ in range(len(sharded.cluster.shard_names)):
                try:
                    rows = s.execute(stmt).all()
                except shardkit.RoutingError:
                    continue
                assert len(rows) == N_USERS


# -- transactions ---------------------------------------------------------------------------------


def test_rollback_then_reuse_of_the_session(sharded):
    cluster = sharded.cluster
    a = keys_on(cluster, "s0", 2)
    c = keys_on(cluster, "s2", 1)[0]
    with sharded.Session() as s:
        s.add(User(id=a[0], name="first"))
        s.commit()
        s.add(User(id=a[0], name="duplicate"))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        assert s.get(User, a[0]).name == "first"
        s.add_all([User(id=a[1], name="after"), User(id=c, name="after")])
        s.commit()
        s.execute(update(User).where(User.id == c).values(name="undone"))
        s.rollback()
        assert s.get(User, c).name == "after"
    assert ids_on(sharded, "s0", "SELECT id FROM users") == sorted(a)
    assert ids_on(sharded, "s2", "SELECT id FROM users") == [c]
    assert sharded.count("s2", "SELECT count(*) FROM users WHERE name = 'undone'") == 0


def test_savepoint_rollback_discards_flushed_objects(sharded):
    """Objects flushed inside ``begin_nested()`` are gone once the savepoint rolls back;
    the outer transaction's rows stay, on the shard already in the transaction
    and on a shard first touched inside the savepoint.  (The flush must write
    through the savepoint's connection, not the outermost transaction's.)"""
    cluster = sharded.cluster
    a = keys_on(cluster, "s0", 2)
    b = keys_on(cluster, "s1", 1)[0]
    with sharded.Session() as s:
        s.add(User(id=a[0], name="outer"))
        s.flush()
        sp = s.begin_nested()
        s.add_all([User(id=a[1], name="inner"), User(id=b, name="inner")])
        s.flush()
        sp.rollback()
        s.commit()
    assert ids_on(sharded, "s0", "SELECT id FROM users") == [a[0]]
    assert ids_on(sharded, "s1", "SELECT id FROM users") == []


def test_failed_savepoint_keeps_the_outer_transaction(sharded):
    """The documented SQLAlchemy pattern: an IntegrityError inside ``with
    session.begin_nested():`` rolls back to the savepoint and the outer
    transaction goes on and commits its other writes."""
    cluster = sharded.cluster
    a = keys_on(cluster, "s0", 3)
    with sharded.Session() as s:
        s.add(User(id=a[0], name="existing"))
        s.commit()
    with sharded.Session() as s:
        s.add(User(id=a[1], name="outer"))
        s.flush()
        with pytest.raises(IntegrityError):
            with s.begin_nested():
                s.add(User(id=a[0], name="duplicate"))
        s.add(User(id=a[2], name="after"))
        s.commit()
    assert ids_on(sharded, "s0", "SELECT id FROM users") == sorted(a)


def test_savepoint_around_statements_on_one_shard(sharded):
    cluster = sharded.cluster
    a = keys_on(cluster, "s0", 1)[0]
    with sharded.Session() as s:
        s.add(User(id=a, name="kept"))
        s.flush()
        sp = s.begin_nested()
        s.execute(update(User).where(User.id == a).values(name="changed"))
        sp.rollback()
        s.commit()
    assert sharded.count("s0", f"SELECT count(*) FROM users WHERE id = {a} AND name = 'kept'") == 1
