"""UNION ALL / UNION of SELECTs that read tables of different groups, against one database.

Each query runs on the session's 3 x 1 cluster (``sharded_dev``) through a
``ShardedSession`` and on ONE database holding the same rows (schema ``ugfe_oracle`` on
shard s0's primary, via ``schema_translate_map``); results are compared with their
types, or the query must be refused with ``ScatterRefused`` naming the construct.
The groups: hash (items, with colocated notes), another hash (orders), range (events),
list (stores), and a reference table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (BigInteger, ForeignKey, Integer, Text, bindparam, column, exists, insert, select,
                        text, union, union_all)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker

import shardkit
from test_scatter_compound import check, refused, run

pytestmark = pytest.mark.integration

ORACLE = "ugfe_oracle"


class UBase(DeclarativeBase):
    pass


class Row:
    """The columns the items, orders and events share (their UNIONs line them up)."""

    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)


class Item(Row, UBase):
    __tablename__ = "ugfe_items"


class Note(UBase):
    """Colocated with ugfe_items (sharded by item_id)."""

    __tablename__ = "ugfe_notes"
    item_id = mapped_column(ForeignKey("ugfe_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


class Order(Row, UBase):
    __tablename__ = "ugfe_orders"


class Event(Row, UBase):
    __tablename__ = "ugfe_events"


class Store(UBase):
    __tablename__ = "ugfe_stores"
    region = mapped_column(Text, primary_key=True)
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)


class Ref(UBase):
    __tablename__ = "ugfe_ref"
    code = mapped_column(Integer, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


I, N, O, E, S, R = Item, Note, Order, Event, Store, Ref
MODELS = (I, N, O, E, S, R)
TABLES = ", ".join(m.__tablename__ for m in reversed(MODELS))


def groups(shards: list[str]) -> dict[str, Any]:
    s0, s1, s2 = shards
    return {
        "groups": {
            "ugi": {"strategy": "hash", "tables": {"ugfe_items": "id", "ugfe_notes": "item_id"}},
            "ugo": {"strategy": "hash", "tables": {"ugfe_orders": "id"}},
            "uge": {"strategy": "range", "tables": {"ugfe_events": "id"},
                    "ranges": [{"to": 100, "shard": s0}, {"from": 100, "to": 200, "shard": s1},
                               {"from": 200, "shard": s2}]},
            "ugs": {"strategy": "list", "tables": {"ugfe_stores": "region"},
                    "values": {s0: ["eu"], s1: ["us"]}, "default": s2},
        },
        "reference_tables": ["ugfe_ref"],
    }


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


def _rows() -> dict[Any, list[dict[str, Any]]]:
    names = [None, "a", "b", "zz"]
    return {
        I: [{"id": k, "qty": None if k % 7 == 0 else k % 5, "name": names[k % 4]} for k in range(1, 31)],
        N: [{"item_id": k, "no": n, "name": names[(k + n) % 4]} for k in range(1, 31, 3) for n in (1, 2)],
        O: [{"id": k, "qty": None if k % 6 == 0 else k % 4, "name": names[k % 3]} for k in range(1, 25)],
        E: [{"id": k, "qty": k % 3, "name": names[k % 4]} for k in (*range(90, 110), *range(195, 215))],
        S: [{"region": r, "id": k, "qty": k % 4, "name": names[k % 4]}
            for r in ("eu", "us", "ca", "br") for k in range(1, 5)],
        R: [{"code": k, "name": f"r{k}"} for k in range(0, 5)],
    }


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    names = [s.name for s in sharded_dev.shards]
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), **groups(names)},
                                           metadata=UBase.metadata)
    drop = f"DROP TABLE IF EXISTS {TABLES}"
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text(drop))
        UBase.metadata.create_all(cluster.primary(s))
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
        c.execute(text(f"CREATE SCHEMA {ORACLE}"))
    oracle = cluster.primary("s0").execution_options(schema_translate_map={None: ORACLE})
    UBase.metadata.create_all(oracle)
    data = _rows()
    with oracle.begin() as c:
        for model in MODELS:
            c.execute(insert(model.__table__), data[model])
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        for model in MODELS:
            s.execute(insert(model), data[model])
        s.commit()
    for model, key in ((I, "id"), (O, "id"), (E, "id"), (S, "region")):
        assert len({cluster.shard_for(model, r[key]) for r in data[model]}) == 3, model
    yield Env(cluster, Session, oracle)
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(drop))
    cluster.dispose()


def test_parts_of_hash_range_and_list_groups_with_reference_tables_and_parameters(env):
    """Parts of four groups, joined with a reference table, filtered by subqueries into it
    and by correlated subqueries of their own group; a part that joins two groups, pinned to
    one shard by keys given only at execution (or with ``Statement.params()``)."""
    items = select(I.id, I.name, I.qty).join(R, R.code == I.qty).where(R.name != "r3")
    events = select(E.id, E.name, E.qty).where(E.qty.in_(select(R.code).where(R.code < 2)))
    stores = select(S.id, S.region, S.qty).where(S.region != "us")
    noted = select(I.id, I.name, I.qty).where(exists(select(N.no).where(N.item_id == I.id, N.no == 2)))
    for u in (union_all(items, events, stores, noted), union(items, events, stores, noted)):
        check(env, u, ordered=False)
        check(env, u.order_by("name", "qty", "id").limit(9).offset(4))
    # A part joining items and orders (different groups), pinned by keys on one shard.
    k = next(k for k in range(1, 25) if env.cluster.shard_for(I, k) == env.cluster.shard_for(O, k))
    pinned = select(I.id, O.name, O.qty).join(O, O.qty == I.qty).where(
        I.id == bindparam("k"), O.id == bindparam("k"))
    u = union_all(pinned, select(E.id, E.name, E.qty).where(E.id > bindparam("lo")))
    want = check(env, u.order_by("id", "name"), {"k": k, "lo": 200})
    assert want and want[0][0] == ("int", k)
    check(env, u.order_by("id", "name").params(k=k, lo=200))
    route = env.cluster.explain(u, {"k": k, "lo": 200})
    assert route.kind == "all" and "ugfe_events" in route.tables, route
    # Strict mode refuses it as a scatter.
    with env.Session(strict=True) as s, pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(u, {"k": k, "lo": 200}).all()
    assert ei.value.construct == "scatter in strict mode"


def _rows_in(env: Env, stmt: Any, key: Any) -> list[Any]:
    with env.Session() as s, shardkit.scope(key=key):
        return sorted(map(tuple, s.execute(stmt).all()), key=repr)


def test_scope_key_runs_a_union_of_groups_on_the_keys_shard(env):
    """Inside ``scope(key=...)`` a statement with no key of its own runs on the key's shard:
    a UNION of two key-less parts returns what the parts return there, one after the other
    (before: it ran on every shard, returning rows of every shard)."""
    k = next(k for k in range(1, 25) if env.cluster.shard_for(I, k) == env.cluster.shard_for(O, k))
    a, b = select(I.id, I.name), select(O.id, O.name)
    parts = sorted(_rows_in(env, a, k) + _rows_in(env, b, k), key=repr)
    assert 0 < len(parts) < 30 + 24  # the key's shard only
    assert _rows_in(env, union_all(a, b), k) == parts
    # Groups where the key lives on different shards: no one shard is the key's.
    other = next(k for k in range(1, 25) if env.cluster.shard_for(I, k) != env.cluster.shard_for(E, k))
    with env.Session() as s, shardkit.scope(key=other), pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(union_all(a, select(E.id, E.name))).all()
    assert "scope" in str(ei.value) and "ugfe_events" in str(ei.value)


def test_a_compound_whose_parts_have_keys_is_routed_by_them_inside_a_scope(env):
    """Inside ``scope(key=...)`` a statement with keys of its own is routed by them: a
    UNION whose every part names its key returns those rows wherever they live (it ran on
    the scope key's shard alone, losing the others); one that mixes keyed and key-less
    parts has no one right shard and is refused."""
    k = next(k for k in range(1, 25) if env.cluster.shard_for(I, k) == "s0")
    elsewhere = [x for x in range(1, 25) if env.cluster.shard_for(I, x) != "s0"][:2]
    keyed = union_all(select(I.id, I.name).where(I.id == elsewhere[0]),
                      select(I.id, I.name).where(I.id.in_(elsewhere[1:])))
    want = sorted(map(tuple, run(env, keyed, sharded=False)[1]), key=repr)
    assert len(want) == 2
    got = sorted(map(tuple, run(env, keyed, sharded=True)[1]), key=repr)
    with env.Session() as s, shardkit.scope(key=k):
        from test_scatter_compound import exact
        got_in_scope = sorted((tuple(exact(v) for v in row) for row in s.execute(keyed).all()), key=repr)
    assert got == got_in_scope == want
    mixed = union_all(select(I.id, I.name).where(I.id == elsewhere[0]), select(O.id, O.name))
    with env.Session() as s, shardkit.scope(key=k), pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(mixed).all()
    assert "scope" in str(ei.value) and ei.value.construct


def test_all_shards_option_and_scope_merge_a_compound_as_without_them(env):
    """``shardkit_all_shards=True`` (or ``scope(all_shards=True)``, which only permits key-less
    writes) on a UNION: before, it ran as a textual statement, its rows concatenated as the
    shards returned them (UNION not de-duplicated, ORDER BY and LIMIT per shard) and strict
    mode not applied."""
    stmts = [union(select(I.name), select(O.name)).order_by("name"),
             union_all(select(I.id, I.name), select(N.item_id, N.name)).order_by("id", "name").limit(5),
             union_all(select(E.id, E.name), select(S.id, S.name)).order_by("name", "id").limit(4).offset(3)]
    for stmt in stmts:
        check(env, stmt.execution_options(shardkit_all_shards=True))
        want = run(env, stmt, sharded=False)
        with shardkit.scope(all_shards=True):
            assert run(env, stmt, sharded=True) == want
    with env.Session(strict=True) as s, pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(stmts[0].execution_options(shardkit_all_shards=True)).all()
    assert ei.value.construct == "scatter in strict mode"
    # A part shardkit cannot read is refused as in a UNION of one group's SELECTs (before:
    # a RoutingError for the part, pointing to shardkit_all_shards=True).
    textual = text("SELECT 1").columns(column("id", Integer))
    for stmt in (union_all(select(I.id), select(O.id), textual), union_all(select(I.id), textual)):
        assert "TextualSelect" in refused(env, stmt).construct
