"""Routing decisions for statements and keys, with no server."""

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import bindparam, delete, insert, or_, select, text, update

from models import Country, Customer, Device, Event, Order, User, groups_config, offline_cluster
from shardkit import (
    Cluster,
    CrossShardWriteError,
    NoShardForKey,
    RoutingError,
    ScatterRefused,
    ShardKeyError,
)

SHARDS = ["s0", "s1", "s2"]


@pytest.fixture(scope="module")
def cluster():
    return offline_cluster(SHARDS)


def test_eq_key_routes_to_owner(cluster):
    for k in range(200):
        r = cluster.explain(select(User).where(User.id == k))
        assert r.shards == (cluster.shard_for(User, k),) and r.kind == "direct"


def test_reversed_operands_and_and(cluster):
    r = cluster.explain(select(User).where(User.name == "x", 7 == User.id))
    assert r.shards == (cluster.shard_for("users", 7),)


def test_colocated_join_routes_by_either_key(cluster):
    stmt = select(User, Order).join(Order, Order.user_id == User.id).where(Order.user_id == 9)
    assert cluster.explain(stmt).shards == (cluster.shard_for("orders", 9),)


def test_in_list_is_split_by_owner(cluster):
    keys = list(range(40))
    r = cluster.explain(select(User).where(User.id.in_(keys)))
    owners = {cluster.shard_for(User, k) for k in keys}
    assert set(r.shards) == owners and len(owners) == 3
    (bindkey,) = {k for per in r.split.values() for k in per}
    got = sorted(v for s in r.shards for v in r.split[s][bindkey])
    assert got == keys
    for s in r.shards:
        assert all(cluster.shard_for(User, v) == s for v in r.split[s][bindkey])


def test_or_of_keys_unions_and_or_with_non_key_scatters(cluster):
    r = cluster.explain(select(User).where(or_(User.id == 1, User.id == 2)))
    assert set(r.shards) == {cluster.shard_for(User, 1), cluster.shard_for(User, 2)}
    r = cluster.explain(select(User).where(or_(User.id == 1, User.name == "x")))
    assert r.kind == "all"


def test_contradiction_goes_to_one_shard(cluster):
    a, b = 0, next(k for k in range(1, 100) if cluster.shard_for(User, k) != cluster.shard_for(User, 0))
    r = cluster.explain(select(User).where(User.id == a, User.id == b))
    assert len(r.shards) == 1


def test_range_strategy_between_and_comparisons(cluster):
    assert cluster.explain(select(Event).where(Event.id == 5)).shards == ("s0",)
    assert cluster.explain(select(Event).where(Event.id == 1000)).shards == ("s1",)
    assert cluster.explain(select(Event).where(Event.id.between(10, 999))).shards == ("s0",)
    assert cluster.explain(select(Event).where(Event.id.between(10, 1000))).shards == ("s0", "s1")
    assert cluster.explain(select(Event).where(Event.id < 1000)).shards == ("s0",)
    assert cluster.explain(select(Event).where(Event.id >= 1000, Event.id < 5000)).shards == ("s1",)
    assert cluster.explain(select(Event).where(Event.id > 4999)).shards == ("s1", "s2")
    assert cluster.explain(select(Event).where(Event.id >= 5000)).shards == ("s2",)


def test_list_strategy_and_default(cluster):
    assert cluster.shard_for(Customer, "eu") == "s0"
    assert cluster.shard_for(Customer, "ca") == "s1"
    assert cluster.shard_for(Customer, "jp") == "s2"
    r = cluster.explain(select(Customer).where(Customer.region.in_(["uk", "us"])))
    assert r.shards == ("s0", "s1")


def test_uuid_string_and_uuid_route_alike(cluster):
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    a = cluster.explain(select(Device).where(Device.id == u)).shards
    b = cluster.explain(select(Device).where(Device.id == str(u))).shards
    assert a == b == (cluster.shard_for(Device, u),)


def test_int_key_given_as_string_is_refused(cluster):
    with pytest.raises(ShardKeyError, match="integer shard key"):
        cluster.explain(select(User).where(User.id == "5"))


def test_keyless_read_scatters_keyless_write_refused(cluster):
    assert cluster.explain(select(User).where(User.name == "x")).kind == "all"
    with pytest.raises(CrossShardWriteError, match="shardkit_all_shards"):
        cluster.explain(update(User).values(name="y"))
    with pytest.raises(CrossShardWriteError):
        cluster.explain(delete(User).where(User.name == "x"))
    r = cluster.explain(delete(User).where(User.name == "x"), all_shards=True)
    assert r.kind == "all" and r.is_write and r.role == "primary"


def test_keyed_update_delete(cluster):
    assert cluster.explain(update(User).where(User.id == 3).values(name="z")).shards == (
        cluster.shard_for(User, 3),)
    assert cluster.explain(delete(Order).where(Order.user_id == 3)).shards == (
        cluster.shard_for(User, 3),)


def _keys_on(cluster, shard, n, start=1):
    return [k for k in range(start, start + 10_000) if cluster.shard_for(User, k) == shard][:n]


def test_update_that_moves_the_shard_key_is_refused(cluster):
    (a,), (b,) = _keys_on(cluster, "s0", 1), _keys_on(cluster, "s1", 1)
    (a2,) = _keys_on(cluster, "s0", 1, start=a + 1)
    # to a key of the same shard: allowed; to another shard's key: refused
    assert cluster.explain(update(User).where(User.id == a).values(id=a2)).shards == ("s0",)
    with pytest.raises(CrossShardWriteError, match="owned by shard s1"):
        cluster.explain(update(User).where(User.id == a).values(id=b))
    with pytest.raises(CrossShardWriteError, match="owned by shard s1"):
        cluster.explain(update(User).where(User.id == a), {"id": b})
    with pytest.raises(CrossShardWriteError, match="cannot evaluate"):
        cluster.explain(update(User).where(User.id == a).values(id=User.id + 1))
    # the cached route of a key = value plan checks the SET as well
    stmt = update(User).where(User.id == bindparam("k")).values(id=bindparam("new"))
    assert cluster.explain(stmt, {"k": a, "new": a2}).shards == ("s0",)
    with pytest.raises(CrossShardWriteError):
        cluster.explain(stmt, {"k": a, "new": b})
    # a child's key column, and an UPDATE of every shard
    with pytest.raises(CrossShardWriteError):
        cluster.explain(update(Order).where(Order.user_id == a).values(user_id=b))
    with pytest.raises(CrossShardWriteError):
        cluster.explain(update(User).values(id=b), all_shards=True)


def test_exists_routes_by_the_key_inside_it(cluster):
    from sqlalchemy import exists

    for k in range(20):
        r = cluster.explain(select(exists().where(User.id == k)))
        assert r.shards == (cluster.shard_for(User, k),)
    r = cluster.explain(select(exists().where(User.name == "x")))
    assert r.kind == "all" and r.merge.startswith("EXISTS")


def test_lambda_and_from_statement_route_like_what_they_wrap(cluster):
    from sqlalchemy import column, lambda_stmt

    def by_id(uid):
        return lambda_stmt(lambda: select(User).where(User.id == uid))

    for k in range(20):  # one lambda, its closure value changes
        assert cluster.explain(by_id(k)).shards == (cluster.shard_for(User, k),)
    assert cluster.explain(select(User).from_statement(select(User).where(User.id == 5))).shards == (
        cluster.shard_for(User, 5),)
    for stmt in (select(User).from_statement(text("SELECT * FROM users")),
                 text("SELECT id FROM users").columns(column("id"))):
        with pytest.raises(RoutingError, match="textual"):
            cluster.explain(stmt)


def test_reference_tables(cluster):
    r = cluster.explain(select(Country))
    assert r.kind == "direct"
    assert cluster.explain(insert(Country).values(code="fr", name="France")).kind == "all"
    assert cluster.explain(update(Country).values(name="x")).kind == "all"
    # a join of a sharded table with a reference table routes by the sharded key
    r = cluster.explain(select(User, Country).where(User.id == 4))
    assert r.shards == (cluster.shard_for(User, 4),)
    with pytest.raises(RoutingError, match="reference table"):
        cluster.shard_for(Country, "fr")


def test_non_colocated_join_refused(cluster):
    with pytest.raises(ScatterRefused, match="not colocated"):
        cluster.explain(select(User, Event).where(User.id == Event.id))


def test_union_of_selects_from_different_groups_runs_on_every_shard(cluster):
    """Each part of a UNION reads its own tables, so the parts need not be colocated: every
    shard answers every part over its own rows.  A part that joins groups must still be
    pinned to one shard by its keys."""
    from sqlalchemy import union, union_all

    both = union_all(select(User.id).where(User.id == 7), select(Event.id).where(Event.id == 6000))
    r = cluster.explain(both)
    assert (r.kind, r.shards) == ("all", tuple(SHARDS)) and "groups events, users" in r.reason
    assert cluster.explain(union(select(User.name), select(Event.payload))).kind == "all"
    with pytest.raises(ScatterRefused, match="not colocated"):
        cluster.explain(union_all(select(User.id), select(Event.id).join(User, User.id == Event.id)))
    pinned = select(Event.id).join(User, User.id == Event.id).where(User.id == 7, Event.id == 7)
    assert cluster.shard_for("users", 7) == cluster.shard_for("events", 7) == "s0"
    assert cluster.explain(union_all(select(User.id), pinned)).kind == "all"


def test_insert_routing(cluster):
    r = cluster.explain(insert(User).values(id=11, name="a"))
    assert r.shards == (cluster.shard_for(User, 11),)
    rows = [{"id": k, "name": "n"} for k in range(30)]
    r = cluster.explain(insert(User), rows)
    assert sum(len(v) for v in r.split.values()) == 30
    for s, part in r.split.items():
        assert all(cluster.shard_for(User, p["id"]) == s for p in part)
    with pytest.raises(ShardKeyError, match="no value for shard key"):
        cluster.explain(insert(User).values(name="a"))


def test_textual_sql_refused_without_a_shard(cluster):
    with pytest.raises(RoutingError, match="textual SQL"):
        cluster.explain(text("select 1"))


def test_unknown_table(cluster):
    from sqlalchemy import Column, Integer, MetaData, Table
    t = Table("widgets", MetaData(), Column("id", Integer, primary_key=True))
    with pytest.raises(RoutingError, match="not in the shard map"):
        cluster.explain(select(t))


def test_range_gap_raises_no_shard():
    cfg = {
        "shards": [{"name": "a", "primary": "postgresql://u@h/db"}],
        "groups": {"ev": {"strategy": "range", "tables": {"events": "id"},
                          "ranges": [{"to": 10, "shard": "a"}, {"from": 20, "shard": "a"}]}},
    }
    c = Cluster.from_config(cfg)
    with pytest.raises(NoShardForKey, match="no range holds key 15"):
        c.shard_for("events", 15)


def test_composite_key_routes_only_when_complete():
    cfg = {
        "bucket_count": 32,
        "shards": [{"name": s, "primary": "postgresql://u@h/db"} for s in SHARDS],
        "groups": {"m": {"tables": {"metrics": ["tenant", "series"]}}},
    }
    from sqlalchemy import Column, Integer, MetaData, String, Table
    t = Table("metrics", MetaData(), Column("tenant", Integer), Column("series", String),
              Column("v", Integer))
    c = Cluster.from_config(cfg)
    r = c.explain(select(t).where(t.c.tenant == 1, t.c.series == "cpu"))
    assert r.shards == (c.shard_for("metrics", (1, "cpu")),)
    assert c.explain(select(t).where(t.c.tenant == 1)).kind == "all"
    with pytest.raises(ShardKeyError, match="composite"):
        c.shard_for("metrics", 1)


def test_plan_cache_uses_current_values(cluster):
    # Same statement shape, different values: the cached plan must read the new values.
    seen = set()
    for k in range(50):
        r = cluster.explain(select(User).where(User.id == k))
        assert r.shards == (cluster.shard_for(User, k),)
        seen.add(r.shards)
    assert len(seen) == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=30))
def test_in_split_partitions_values_exactly(keys):
    cfg = {
        "bucket_count": 64,
        "shards": [{"name": s, "primary": "postgresql://u@h/db"} for s in SHARDS],
        **groups_config(SHARDS),
    }
    c = _cached(cfg)
    r = c.explain(select(User).where(User.id.in_(keys)))
    if len(r.shards) == 1:
        assert r.shards == (c.shard_for(User, keys[0]),)
        return
    (bindkey,) = {k for per in r.split.values() for k in per}
    got = [v for s in r.shards for v in r.split[s][bindkey]]
    assert sorted(got) == sorted(keys)


_CACHE = {}


def _cached(cfg):
    if "c" not in _CACHE:
        _CACHE["c"] = Cluster.from_config(cfg)
    return _CACHE["c"]


def test_single_key_routes_are_kept_per_shard_and_read_new_values():
    # A `key = :value` statement shape keeps one Route per shard: the same
    # object comes back for keys on one shard, and each answer matches the
    # owner of the value in hand (also when it comes from the parameters).
    c = Cluster.from_config({
        "bucket_count": 64,
        "shards": [{"name": s, "primary": "postgresql://u@h/db"} for s in SHARDS],
        **groups_config(SHARDS),
    })
    fresh = Cluster.from_config({
        "bucket_count": 64,
        "shards": [{"name": s, "primary": "postgresql://u@h/db"} for s in SHARDS],
        **groups_config(SHARDS),
    })
    first = {}
    for k in range(60):
        r = c.explain(select(User).where(User.id == k))
        assert r == fresh.router.route(select(User).where(User.id == k))
        assert r.shards == (c.shard_for(User, k),)
        assert first.setdefault(r.shards[0], r) is r
    assert len(first) == 3
    stmt = select(User).where(User.id == bindparam("k"))
    for k in range(60):
        assert c.router.route(stmt, {"k": k}).shards == (c.shard_for(User, k),)
    # Other predicates on the side keep the shortcut; a second key predicate,
    # an IN list or a missing value do not take it.
    assert c.explain(select(User).where(User.id == 5, User.name == "x")).shards == \
        (c.shard_for(User, 5),)
    assert c.explain(select(User).where(User.id == None)).kind == "all"  # noqa: E711
    # Range and list groups, and a key no shard owns, answer the same each time.
    for _ in range(2):
        assert c.explain(select(Event).where(Event.id == 4999)).shards == ("s1",)
        assert c.explain(select(Customer).where(Customer.region == "zz")).shards == ("s2",)
        assert c.explain(update(User).where(User.id == 3).values(name="n")).is_write


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                          st.none()), min_size=1, max_size=20))
def test_single_key_route_matches_the_owner(keys):
    cfg = {
        "bucket_count": 64,
        "shards": [{"name": s, "primary": "postgresql://u@h/db"} for s in SHARDS],
        **groups_config(SHARDS),
    }
    c = _cached(cfg)
    for k in keys:
        r = c.router.route(select(User).where(User.id == bindparam("k")), {"k": k})
        if k is None:
            assert r.kind == "all"
        else:
            assert r.shards == (c.shard_for(User, k),) and r.kind == "direct"


def test_closed_session_is_freed_without_the_garbage_collector(cluster):
    # A reference cycle in the session would keep every closed session (and
    # its identity map) alive until a cyclic collection.
    import gc
    import weakref

    from sqlalchemy.orm import sessionmaker

    from shardkit import ShardedSession

    maker = sessionmaker(class_=ShardedSession, cluster=cluster)
    gc.disable()
    try:
        s = maker()
        s.add(User(id=1, name="a"))
        s.expunge_all()
        ref = weakref.ref(s)
        s.close()
        del s
        assert ref() is None
    finally:
        gc.enable()


def test_route_says_how_keys_chose_the_shards(cluster):
    # "one": all rows in one bucket (a stale map's zero-row write is then checked only
    # when it matched nothing); "many": always checked; "": not chosen by the map.
    assert cluster.explain(update(User).where(User.id == 5).values(name="x")).keys == "one"
    assert cluster.explain(update(User).where(User.id == 5).values(name="y")).keys == "one"  # cached
    assert cluster.explain(delete(User).where(User.id.in_([1, 2, 3]))).keys == "many"
    assert cluster.explain(delete(User).where(User.id.in_([1]))).keys == "many"
    assert cluster.explain(insert(User).values(id=1, name="x")).keys == ""
    assert cluster.explain(delete(User), all_shards=True).keys == ""


def test_count_of_a_keyed_query_routes_by_the_key_inside_it(cluster):
    # Query.count() and select(func.count()).select_from(subquery): the derived table's
    # WHERE decides, as every row comes from it.
    from sqlalchemy import func
    from sqlalchemy.orm import Query

    for k in range(20):
        owner = (cluster.shard_for(User, k),)
        inner = select(User).where(User.id == k).subquery()
        assert cluster.explain(select(func.count()).select_from(inner)).shards == owner
        q = Query(User).filter(User.id == k)
        stmt = select(func.count()).select_from(q.subquery())  # what Query.count() runs
        r = cluster.explain(stmt)
        assert r.shards == owner and r.kind == "direct"
        two = select(func.count()).select_from(select(inner.c.id).subquery())
        assert cluster.explain(two).shards == owner
    r = cluster.explain(select(func.count()).select_from(select(User).where(User.name == "x").subquery()))
    assert r.kind == "all"
    assert cluster.explain(select(func.count()).select_from(select(User).subquery())).kind == "all"


def test_count_of_a_limited_keyed_query_runs_on_its_one_shard(cluster):
    # Query(User).filter(User.id == k).limit(3).count(): a derived table with LIMIT is exact
    # on the one shard its own key names, and refused when it would need several.
    from sqlalchemy import func

    import shardkit

    for k in range(10):
        inner = select(User).where(User.id == k).limit(3).subquery()
        r = cluster.explain(select(func.count()).select_from(inner))
        assert r.shards == (cluster.shard_for(User, k),) and r.kind == "direct"
    a = 0
    b = next(k for k in range(1, 100) if cluster.shard_for(User, k) != cluster.shard_for(User, a))
    with pytest.raises(shardkit.ScatterRefused, match="LIMIT") as ei:
        cluster.explain(select(func.count()).select_from(
            select(User).where(User.id.in_([a, b])).limit(3).subquery()))
    assert ei.value.construct == "statement not colocated on the shard key"
    with pytest.raises(shardkit.ScatterRefused, match="LIMIT"):
        cluster.explain(select(func.count()).select_from(select(User).limit(3).subquery()))
    # A problem inside the derived table itself is refused even on one shard.
    top = select(func.max(User.id)).scalar_subquery()
    with pytest.raises(shardkit.ScatterRefused):
        cluster.explain(select(func.count()).select_from(
            select(User).where(User.id == 1, User.id == top).subquery()))


# Router.data_modifying_with: asked of every read sent to a named shard.
def test_data_modifying_with_finds_the_write_in_mapped_and_unmapped_tables_once_per_shape(monkeypatch):
    from sqlalchemy import Column, Integer, MetaData, Table, delete, insert, select

    import shardkit._routing as routing
    from models import User, offline_cluster

    router = offline_cluster(["s0", "s1"]).router
    local = Table("dmw_local", MetaData(), Column("id", Integer, primary_key=True), Column("x", Integer))
    walks = []
    walk = routing._dml_cte
    monkeypatch.setattr(routing, "_dml_cte", lambda st: walks.append(st) or walk(st))

    def gone(k):
        cte = delete(local).where(local.c.x == k).returning(local.c.id).cte("gone")
        return select(cte.c.id)
    shapes = {
        "unmapped read": (lambda k: select(local).where(local.c.x == k), None),
        "unmapped delete": (gone, "DELETE of dmw_local in 'gone'"),
        "mapped insert": (lambda k: select(insert(User).values(id=k, name="n").returning(User.id)
                                            .cte("added").c.id), "INSERT of users in 'added'"),
        "mapped read": (lambda k: select(User).where(User.name == str(k)), None),
    }
    for name, (build, want) in shapes.items():
        walks.clear()
        for k in range(5):
            assert router.data_modifying_with(build(k)) == want, (name, k)
        assert len(walks) <= 1, f"{name}: looked through {len(walks)} times"
