"""ORM writes and object state through ShardedSession, against what a
plain SQLAlchemy Session on one database does.

* Inside ``scope(shard=...)`` "rows are still written where their key belongs" (README):
  an UPDATE whose SET gives the shard key another shard's value left the row on the
  scope's shard under a key no read by key finds there; it is refused, as outside a scope.
* Inside ``scope(key=...)`` a key-less UPDATE runs on the scope key's shard; one that sets
  the key to a value of that same shard was refused as if it ran on every shard.
* A stale shard-key column overwritten in the flush by a many-to-one relationship to a
  parent on the object's own shard (the relationship's value is the one written) was
  refused as a move to the column's shard.
* ``SELECT ... FOR UPDATE`` of a reference row locked the copy of whichever shard the
  transaction's turn gave it: two sessions "locking" one row did not exclude each other.

Rows are checked on every shard's primary."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, inspect, select, text, update
from sqlalchemy.exc import OperationalError

import shardkit
from models import Country, Order, User

pytestmark = pytest.mark.integration


def keys_on(cluster, shard, n, start=1):
    out, k = [], start
    while len(out) < n:
        if cluster.shard_for(User, k) == shard:
            out.append(k)
        k += 1
    return out


def orders(env):
    """{shard: sorted (id, user_id) of its orders}."""
    out = {}
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            out[s] = sorted(tuple(r) for r in c.execute(text("SELECT id, user_id FROM orders")))
    return out


@pytest.fixture
def two(sharded):
    """Users a1, a2 on the first shard, b1 on the second; order 10 of a1."""
    s0, s1, s2 = sharded.cluster.shard_names
    a1, a2 = keys_on(sharded.cluster, s0, 2)
    b1, = keys_on(sharded.cluster, s1, 1)
    with sharded.Session() as s:
        s.add_all([User(id=a1, name="a1"), User(id=a2, name="a2"), User(id=b1, name="b1"),
                   Order(id=10, user_id=a1, amount=1)])
        s.commit()
    return s0, s1, s2, a1, a2, b1


# -- scope(shard=...): an UPDATE setting the shard key --------------------------------------


def test_update_inside_scope_shard_setting_another_shards_key_is_refused(sharded, two):
    s0, s1, s2, a1, a2, b1 = two
    with sharded.Session() as s:
        with shardkit.scope(shard=s0):
            with pytest.raises(shardkit.CrossShardWriteError, match="shard key"):
                s.execute(update(Order).where(Order.id == 10).values(user_id=b1))
            s.rollback()
            with pytest.raises(shardkit.CrossShardWriteError, match="shard key"):
                s.query(Order).filter(Order.id == 10).update({Order.user_id: b1})
            s.rollback()
            # An executemany: every set runs on the scope's shard.
            t = Order.__table__
            stmt = update(t).where(t.c.id == bindparam("oid")).values(user_id=bindparam("uid"))
            with pytest.raises(shardkit.CrossShardWriteError, match="shard key"):
                s.execute(stmt, [{"oid": 10, "uid": a2}, {"oid": 10, "uid": b1}])
            s.rollback()
    assert orders(sharded) == {s0: [(10, a1)], s1: [], s2: []}


def test_update_inside_scope_shard_keeping_the_key_on_that_shard_runs(sharded, two):
    s0, s1, s2, a1, a2, b1 = two
    with sharded.Session() as s:
        with shardkit.scope(shard=s0):
            s.execute(update(Order).where(Order.id == 10).values(user_id=a2))
            t = Order.__table__
            s.execute(update(t).where(t.c.id == bindparam("oid")).values(user_id=bindparam("uid")),
                      [{"oid": 10, "uid": a1}])
            s.execute(update(Order).where(Order.id == 10).values(amount=5))
        s.commit()
    assert orders(sharded) == {s0: [(10, a1)], s1: [], s2: []}


# -- scope(key=...): a key-less UPDATE setting the shard key ----------------------------------


def test_keyless_update_inside_scope_key_setting_a_key_of_that_shard_runs(sharded, two):
    """Plain SQLAlchemy updates the row; inside scope(key=a1) the statement runs on a1's
    shard only, where a2 belongs too."""
    s0, s1, s2, a1, a2, b1 = two
    with sharded.Session() as s:
        with shardkit.scope(key=a1):
            assert s.execute(update(Order).where(Order.id == 10).values(user_id=a2)).rowcount == 1
        s.commit()
    assert orders(sharded) == {s0: [(10, a2)], s1: [], s2: []}


def test_keyless_update_inside_scope_key_setting_another_shards_key_names_the_scope_shard(sharded, two):
    s0, s1, s2, a1, a2, b1 = two
    with sharded.Session() as s:
        with shardkit.scope(key=a1):
            with pytest.raises(shardkit.CrossShardWriteError) as ei:
                s.execute(update(Order).where(Order.id == 10).values(user_id=b1))
        s.rollback()
    assert f"owned by shard {s1}, on rows of {s0};" in str(ei.value)
    assert orders(sharded) == {s0: [(10, a1)], s1: [], s2: []}


# -- a stale key column and a many-to-one relationship ---------------------------------------


def test_stale_key_column_overwritten_by_a_parent_on_the_same_shard_is_written(sharded, two):
    """order.user_id = b1 then order.user = a2's user: SQLAlchemy's flush writes the
    relationship's key (a2), which stays on the order's shard: not a move."""
    s0, s1, s2, a1, a2, b1 = two
    with sharded.Session() as s:
        o = s.scalars(select(Order).where(Order.user_id == a1)).one()
        u2 = s.get(User, a2)
        o.user_id = b1
        o.user = u2
        s.commit()
    assert orders(sharded) == {s0: [(10, a2)], s1: [], s2: []}
    # The other way round still moves it (the relationship's key is another shard's).
    with sharded.Session() as s:
        o = s.scalars(select(Order).where(Order.user_id == a2)).one()
        ub = s.get(User, b1)
        o.user_id = a1
        o.user = ub
        with pytest.raises(shardkit.CrossShardWriteError, match=f"from shard {s0} to {s1}"):
            s.flush()
        s.rollback()
    assert orders(sharded) == {s0: [(10, a2)], s1: [], s2: []}


# -- FOR UPDATE of a reference row -----------------------------------------------------------


def test_reference_row_locked_for_update_excludes_another_session(sharded):
    """On one database a second SELECT ... FOR UPDATE NOWAIT of a locked row fails; the
    two sessions' transactions read reference rows from different shards in turn."""
    with sharded.Session() as s:
        s.add(Country(code="fr", name="France"))
        s.commit()
    first = sharded.cluster.shard_names[0]
    for nowait_stmt in (select(Country).where(Country.code == "fr").with_for_update(nowait=True),
                        select(Country).with_for_update(nowait=True)):
        a, b = sharded.Session(), sharded.Session()
        try:
            ca = a.scalars(select(Country).where(Country.code == "fr").with_for_update()).one()
            assert inspect(ca).key[2] == first
            with pytest.raises(OperationalError, match="lock"):
                b.scalars(nowait_stmt).all()
        finally:
            a.close()
            b.close()
    # A later plain read of the locking transaction reads the same copy.
    with sharded.Session() as s:
        c = s.scalars(select(Country).with_for_update()).one()
        assert s.scalars(select(Country).where(Country.code == "fr")).one() is c


# -- writers of one reference row lock its copies in one order ------------------------------


def test_reference_row_writers_lock_copies_in_one_order(sharded):
    """A session holding the first shard's copy of a reference row (FOR UPDATE, or a
    statement writing every copy, which runs in the shards' order) and another flushing its
    change of the object it read from the LAST shard: the flush wrote its own shard's copy
    first, then waited for the first shard's, while the statement waited for the last
    shard's copy: a deadlock across two databases that neither server detects (without a
    lock_timeout both would wait forever).  The flush now writes the first shard's copy
    first, as the statement does: one waits for the other, and both commit."""
    import threading
    import time

    first, *_, last = sharded.cluster.shard_names
    with sharded.Session() as s:
        s.add(Country(code="de", name="Germany"))
        s.commit()
    a, b = sharded.Session(), sharded.Session()
    errors: list[BaseException] = []
    try:
        for sess in (a, b):
            for sh in sharded.cluster.shard_names:
                sess.connection(bind_arguments={"shard_id": sh}).exec_driver_sql(
                    "SET LOCAL lock_timeout = '4s'")
        b.scalars(select(Country).where(Country.code == "de").with_for_update()).one()
        ca = a.scalars(select(Country).where(Country.code == "de")
                       .execution_options(shardkit_shard=last)).one()
        assert inspect(ca).key[2] == last
        ca.name = "by a"

        def flush_a() -> None:
            try:
                a.commit()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        t = threading.Thread(target=flush_a)
        t.start()
        time.sleep(0.5)   # a's flush is waiting for the first shard's copy
        try:
            b.execute(update(Country).where(Country.code == "de").values(name="by b"))
            b.commit()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        t.join(20)
        assert not t.is_alive()
    finally:
        a.close()
        b.close()
    assert not errors, errors
    for sh in sharded.cluster.shard_names:
        with sharded.cluster.primary(sh).connect() as c:
            assert c.execute(text("SELECT name FROM countries WHERE code = 'de'")).scalar() == "by a", sh


@pytest.mark.parametrize("how", ["refresh", "get"])
def test_reference_object_locked_where_it_was_read_excludes_another_session(sharded, how):
    """refresh(obj, with_for_update=True) of a reference object the session read from
    another shard than the first locked that shard's copy: another session's FOR UPDATE
    (the first shard's copy) did not wait for it.  (get(..., with_for_update=True) reads
    the first shard's copy, as an object of its own: a reference row is an object per
    shard it was read from.)"""
    first, *_, last = sharded.cluster.shard_names
    with sharded.Session() as s:
        s.add(Country(code="it", name="Italy"))
        s.commit()
    a, b = sharded.Session(), sharded.Session()
    try:
        ca = a.scalars(select(Country).where(Country.code == "it")
                       .execution_options(shardkit_shard=last)).one()
        assert inspect(ca).key[2] == last
        if how == "refresh":
            a.refresh(ca, with_for_update=True)
        else:
            assert a.get(Country, "it", with_for_update=True).name == "Italy"
        with pytest.raises(OperationalError, match="lock"):
            b.scalars(select(Country).where(Country.code == "it").with_for_update(nowait=True)).all()
    finally:
        a.close()
        b.close()
