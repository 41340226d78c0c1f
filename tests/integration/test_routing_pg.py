"""Routing against a real 3-shard cluster: rows land where shard_for says, reads touch only owners."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import selectinload

import shardkit
from models import Country, Customer, Device, Event, Order, User

pytestmark = pytest.mark.integration


def test_10k_rows_land_where_shard_for_says(sharded):
    cluster = sharded.cluster
    rng = random.Random(7)
    keys = list({rng.randint(-(2**63), 2**63 - 1) for _ in range(10_000)} | {0, -1, 2**63 - 1, -(2**63)})[:10_000]
    with sharded.Session() as s:
        for i in range(0, len(keys), 1000):
            s.add_all(User(id=k, name=f"u{k}") for k in keys[i:i + 1000])
            s.flush()
        s.commit()
    expected = {name: set() for name in cluster.shard_names}
    for k in keys:
        expected[cluster.shard_for(User, k)].add(k)
    total = 0
    for name in cluster.shard_names:
        with cluster.primary(name).connect() as c:
            got = {r[0] for r in c.execute(text("SELECT id FROM users"))}
        assert got == expected[name], name
        total += len(got)
        assert len(got) > 2000  # 1024 buckets spread 10k keys evenly enough
    assert total == 10_000


def test_sql_hash_function_agrees_on_placement(sharded):
    """The SQL twin installed on each shard says every stored row belongs there."""
    from shardkit import _sql

    cluster = sharded.cluster
    with sharded.Session() as s:
        s.add_all(User(id=k, name="x") for k in range(-500, 500))
        s.commit()
    for i, name in enumerate(cluster.shard_names):
        with cluster.primary(name).begin() as c:
            _sql.install(c)
            buckets = {b for b, o in enumerate(cluster.config.bucket_map) if o == name}
            rows = c.execute(text(
                f"SELECT shardkit.bucket(id, {cluster.config.bucket_count}) FROM users")).scalars().all()
            assert rows and set(rows) <= buckets


def test_reads_by_key_hit_only_the_owner(sharded):
    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in range(300))
        s.commit()
    for k in range(0, 300, 7):
        owner = sharded.cluster.shard_for(User, k)
        with sharded.Session() as s:
            sharded.reset_hits()
            assert s.get(User, k).name == f"u{k}"
            assert dict(sharded.hits) == {owner: 1}
            sharded.reset_hits()
            s.expunge_all()
            u = s.execute(select(User).where(User.id == k)).scalar_one()
            assert u.id == k and dict(sharded.hits) == {owner: 1}
            sharded.reset_hits()
            s.execute(update(User).where(User.id == k).values(name="z"))
            s.execute(delete(Order).where(Order.user_id == k))
            assert dict(sharded.hits) == {owner: 2}
            s.rollback()


def test_in_list_split_by_owner(sharded):
    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in range(100))
        s.commit()
    keys = list(range(0, 100, 3))
    owners = {sharded.cluster.shard_for(User, k) for k in keys}
    captured = []
    from sqlalchemy import event

    def grab(conn, cursor, statement, parameters, context, executemany):
        captured.append((conn.engine.info["shard"], parameters))

    for name in sharded.cluster.shard_names:
        event.listen(sharded.cluster.primary(name), "before_cursor_execute", grab)
    try:
        # Twice: the second run executes a cached compilation, which must still
        # get each shard's own values.
        for _ in range(2):
            with sharded.Session() as s:
                got = s.scalars(select(User).where(User.id.in_(keys))).all()
    finally:
        for name in sharded.cluster.shard_names:
            event.remove(sharded.cluster.primary(name), "before_cursor_execute", grab)
    assert sorted(u.id for u in got) == keys
    assert {shard for shard, _ in captured} == owners
    for shard, params in captured:
        # each shard got only its own keys
        sent = [v for v in params.values()]
        assert sent and all(sharded.cluster.shard_for(User, v) == shard for v in sent)


def test_update_and_delete_in_list_split_by_owner(sharded):
    from sqlalchemy import delete, event, update

    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in range(60))
        s.commit()
    keys = list(range(0, 60, 4))
    captured = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith(("UPDATE", "DELETE")):
            captured.append((conn.engine.info["shard"], parameters))

    for name in sharded.cluster.shard_names:
        event.listen(sharded.cluster.primary(name), "before_cursor_execute", grab)
    try:
        for _ in range(2):  # the second run executes cached compilations
            with sharded.Session() as s:
                assert s.execute(update(User).where(User.id.in_(keys)).values(name="x")).rowcount == len(keys)
                s.rollback()
        with sharded.Session() as s:
            assert s.execute(delete(User).where(User.id.in_(keys))).rowcount == len(keys)
            s.commit()
    finally:
        for name in sharded.cluster.shard_names:
            event.remove(sharded.cluster.primary(name), "before_cursor_execute", grab)
    assert len(captured) == 3 * len({sharded.cluster.shard_for(User, k) for k in keys})
    for shard, params in captured:
        sent = [v for k, v in params.items() if k.startswith("id")]
        assert sent and all(sharded.cluster.shard_for(User, v) == shard for v in sent), (shard, sent)


def test_bulk_insert_split_by_owner(sharded):
    rows = [{"id": k, "name": f"b{k}"} for k in range(500)]
    with sharded.Session() as s:
        r = s.execute(insert(User), rows)
        assert r.rowcount == 500
        s.commit()
    for name in sharded.cluster.shard_names:
        with sharded.cluster.primary(name).connect() as c:
            ids = [r[0] for r in c.execute(text("SELECT id FROM users"))]
        assert ids and all(sharded.cluster.shard_for(User, i) == name for i in ids)
    assert sum(sharded.count(n, "SELECT count(*) FROM users") for n in sharded.cluster.shard_names) == 500


def test_range_and_list_routing(sharded):
    with sharded.Session() as s:
        s.add_all(Event(id=i, payload="p") for i in (1, 999, 1000, 4999, 5000, 10**9))
        s.add_all(Customer(region=r, id=i, name="c") for i, r in enumerate(["eu", "uk", "us", "ca", "jp", "br"]))
        s.commit()
    assert sharded.count("s0", "SELECT count(*) FROM events") == 2
    assert sharded.count("s1", "SELECT count(*) FROM events") == 2
    assert sharded.count("s2", "SELECT count(*) FROM events") == 2
    assert sharded.count("s0", "SELECT count(*) FROM customers") == 2
    assert sharded.count("s1", "SELECT count(*) FROM customers") == 2
    assert sharded.count("s2", "SELECT count(*) FROM customers") == 2  # the default shard
    with sharded.Session() as s:
        sharded.reset_hits()
        got = s.scalars(select(Event).where(Event.id.between(1000, 4999))).all()
        assert sorted(e.id for e in got) == [1000, 4999] and dict(sharded.hits) == {"s1": 1}
        sharded.reset_hits()
        got = s.scalars(select(Customer).where(Customer.region == "us")).all()
        assert [c.region for c in got] == ["us"] and dict(sharded.hits) == {"s1": 1}


def test_colocated_children_follow_parent_and_join_on_one_shard(sharded):
    with sharded.Session() as s:
        for k in range(50):
            u = User(id=k, name=f"u{k}")
            u.orders = [Order(id=k * 100 + j, amount=j) for j in range(3)]  # user_id filled by the flush
            s.add(u)
        s.commit()
    for name in sharded.cluster.shard_names:
        with sharded.cluster.primary(name).connect() as c:
            orphans = c.execute(text(
                "SELECT count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL"
            )).scalar_one()
            assert orphans == 0
    with sharded.Session() as s:
        for k in (3, 17, 42):
            sharded.reset_hits()
            rows = s.execute(
                select(User.name, func.sum(Order.amount)).join(Order, Order.user_id == User.id)
                .where(User.id == k).group_by(User.name)
            ).all()
            assert rows == [(f"u{k}", 3)]
            assert dict(sharded.hits) == {sharded.cluster.shard_for(User, k): 1}
        # lazy loads stay on the parent's shard
        u = s.get(User, 42)
        sharded.reset_hits()
        assert sorted(o.id for o in u.orders) == [4200, 4201, 4202]
        assert dict(sharded.hits) == {sharded.cluster.shard_for(User, 42): 1}
        # eager loads too
        s.expunge_all()
        sharded.reset_hits()
        u = s.scalars(select(User).where(User.id == 17).options(selectinload(User.orders))).one()
        assert len(u.orders) == 3
        assert set(sharded.hits) == {sharded.cluster.shard_for(User, 17)}


def test_reference_tables_written_everywhere_read_anywhere(sharded):
    with sharded.Session() as s:
        s.add_all([Country(code="fr", name="France"), Country(code="de", name="Germany")])
        s.commit()
    for name in sharded.cluster.shard_names:
        assert sharded.count(name, "SELECT count(*) FROM countries") == 2
    with sharded.Session() as s:
        fr = s.get(Country, "fr")
        fr.name = "République française"
        s.delete(s.get(Country, "de"))
        s.commit()
    for name in sharded.cluster.shard_names:
        with sharded.cluster.primary(name).connect() as c:
            assert c.execute(text("SELECT code, name FROM countries")).all() == [
                ("fr", "République française")]
    with sharded.Session() as s:
        s.execute(insert(Country).values(code="it", name="Italy"))
        s.execute(update(Country).where(Country.code == "it").values(name="Italia"))
        s.commit()
        sharded.reset_hits()
        assert s.scalars(select(Country.name).where(Country.code == "it")).one() == "Italia"
        assert sum(sharded.hits.values()) == 1
    for name in sharded.cluster.shard_names:
        assert sharded.count(name, "SELECT count(*) FROM countries WHERE name = 'Italia'") == 1


def test_identity_map_separates_shards(sharded):
    """The same primary key on two shards gives two distinct objects."""
    cluster = sharded.cluster
    a, b = cluster.shard_names[:2]
    with sharded.Session() as s:
        # Orders are sharded by user_id, so order id 1 can exist on two shards.
        ua = next(k for k in range(100) if cluster.shard_for(User, k) == a)
        ub = next(k for k in range(100) if cluster.shard_for(User, k) == b)
        s.add_all([User(id=ua, name="a"), User(id=ub, name="b")])
        s.flush()
        s.add_all([Order(id=1, user_id=ua, amount=10), Order(id=1, user_id=ub, amount=20)])
        s.commit()
    with sharded.Session() as s:
        orders = s.scalars(select(Order).where(Order.id == 1)).all()
        assert sorted(o.amount for o in orders) == [10, 20]
        assert len({id(o) for o in orders}) == 2
        tokens = {shardkit_token(o) for o in orders}
        assert tokens == {a, b}


def shardkit_token(obj):
    from sqlalchemy import inspect
    return inspect(obj).key[2]


def test_shard_key_change_to_other_shard_refused(sharded):
    cluster = sharded.cluster
    with sharded.Session() as s:
        s.add(User(id=1, name="one"))
        s.commit()
        u = s.get(User, 1)
        other = next(k for k in range(2, 100) if cluster.shard_for(User, k) != cluster.shard_for(User, 1))
        u.id = other
        with pytest.raises(shardkit.CrossShardWriteError, match="would move it"):
            s.flush()
        s.rollback()
    # nothing changed on any shard
    assert sum(sharded.count(n, "SELECT count(*) FROM users WHERE id = 1") for n in cluster.shard_names) == 1
    assert sum(sharded.count(n, f"SELECT count(*) FROM users WHERE id = {other}") for n in cluster.shard_names) == 0


def test_explicit_shard_and_scope(sharded):
    cluster = sharded.cluster
    with sharded.Session() as s:
        s.add_all(User(id=k, name="x") for k in range(60))
        s.commit()
    with sharded.Session() as s:
        for name in cluster.shard_names:
            n = s.execute(select(func.count()).select_from(User).execution_options(shardkit_shard=name)).scalar_one()
            assert n == sharded.count(name, "SELECT count(*) FROM users")
            assert s.execute(text("SELECT count(*) FROM users"),
                             execution_options={"shardkit_shard": name}).scalar_one() == n
        with shardkit.scope(shard="s1"):
            sharded.reset_hits()
            s.scalars(select(User)).all()
            assert dict(sharded.hits) == {"s1": 1}
        with shardkit.scope(key=5):
            sharded.reset_hits()
            s.scalars(select(Order).where(Order.amount > 0)).all()
            assert dict(sharded.hits) == {cluster.shard_for(User, 5): 1}
        with pytest.raises(shardkit.RoutingError, match="unknown shard 'nope'"):
            s.execute(select(User).execution_options(shardkit_shard="nope"))


def test_keyless_write_needs_all_shards(sharded):
    with sharded.Session() as s:
        s.add_all(User(id=k, name="x") for k in range(30))
        s.commit()
        with pytest.raises(shardkit.CrossShardWriteError):
            s.execute(update(User).values(name="y"))
        r = s.execute(update(User).values(name="y"), execution_options={"shardkit_all_shards": True})
        assert r.rowcount == 30
        s.commit()
    assert sum(sharded.count(n, "SELECT count(*) FROM users WHERE name = 'y'")
               for n in sharded.cluster.shard_names) == 30


def test_uuid_keys(sharded):
    import uuid
    ids = [uuid.UUID(int=i * 7919) for i in range(60)]
    with sharded.Session() as s:
        s.add_all(Device(id=i, label="d") for i in ids)
        s.commit()
    for name in sharded.cluster.shard_names:
        with sharded.cluster.primary(name).connect() as c:
            got = [r[0] for r in c.execute(text("SELECT id FROM devices"))]
            assert all(sharded.cluster.shard_for(Device, g) == name for g in got)
    with sharded.Session() as s:
        assert s.get(Device, ids[5]).id == ids[5]
        assert s.execute(select(Device).where(Device.id == str(ids[6]))).scalar_one().id == ids[6]


def test_scatter_read_without_key_merges_or_refuses(sharded):
    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"n{k % 7}") for k in range(40))
        s.commit()
        assert len(s.scalars(select(User).where(User.name == "n1")).all()) == 6
        top = s.scalars(select(User).order_by(User.id.desc()).limit(5)).all()
        assert [u.id for u in top] == [39, 38, 37, 36, 35]
        with pytest.raises(shardkit.ScatterRefused) as ei:
            s.execute(select(func.count(User.name.distinct()))).all()
        assert ei.value.construct == "count(DISTINCT)"


def test_sessions_that_wrote_and_read_are_freed_at_close(sharded):
    # Nothing the session keeps after a commit, a routed read and a scatter
    # (tokens, held connections, identity map) may point back at it: a closed
    # session goes at once, not at the next cyclic garbage collection.
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        s = sharded.Session()
        s.add_all([User(id=k, name=f"u{k}") for k in range(20)])
        s.commit()
        assert s.get(User, 3).name == "u3"
        assert len(s.scalars(select(User)).all()) == 20
        ref = weakref.ref(s)
        s.close()
        del s
        assert ref() is None
    finally:
        gc.enable()
