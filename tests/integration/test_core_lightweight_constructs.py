"""Core statements written against lightweight constructs -- ``table()``/``column()``
(with and without types), a ``Table`` in a schema other than ``public`` and its
``table(..., schema=...)`` twin, aliases, CTEs, subqueries, ``literal_column`` and
``text().columns()`` -- for a sharded table, a colocated child and a reference table, each
compared with ONE plain database that runs the same statement (the oracle): the answers
are the same, and afterwards every shard's primary holds exactly what it should (a sharded
row on its owner only, a reference row on every shard), read directly.  A construct
shardkit does not support is refused with a ShardkitError or ArgumentError, never an
AttributeError/KeyError/TypeError, never a wrong answer.  On the shared local cluster,
its own tables.

Defects found (each test below failed before its fix):

* ``text(...).columns(...)`` read as a derived table or CTE was routed as a read of no
  tables, to any one shard: that shard's rows only, silently; now refused like text().
* ``Cluster(metadata=)`` checked a configured key column by its key in ``table.c``: a
  ``Column("item_key", key="ik")`` configured by its database name (which routing, the
  guard and moves use) was refused; its key type was not learnt either (a key given as a
  string was hashed as a string), nor its ``onupdate=`` seen.
* the router kept every ``table()`` and alias an UPDATE was written against, for good.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from own_tables import cluster_with_tables, keys_per_shard
from sqlalchemy import (BigInteger, Column, Integer, MetaData, Table, Text, bindparam, column, delete, func,
                        insert, literal_column, select, table, text, update)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

SCHEMA = "cl10app"
md = MetaData()


def _tables(prefix: str, schema: str | None) -> tuple[Table, Table, Table]:
    u = Table(f"{prefix}users", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
              Column("name", Text), Column("score", Integer), schema=schema)
    o = Table(f"{prefix}orders", md, Column("user_id", BigInteger, primary_key=True, autoincrement=False),
              Column("id", Integer, primary_key=True, autoincrement=False), Column("amount", Integer),
              schema=schema)
    c = Table(f"{prefix}countries", md, Column("code", Text, primary_key=True), Column("name", Text),
              schema=schema)
    return u, o, c


PUBLIC = _tables("cl10_", None)
IN_SCHEMA = _tables("cl10s_", SCHEMA)

CONFIG = {
    "groups": {
        "cl10": {"tables": {"cl10_users": "id", "cl10_orders": "user_id"}},
        "cl10s": {"tables": {f"{SCHEMA}.cl10s_users": "id", f"{SCHEMA}.cl10s_orders": "user_id"}},
    },
    "reference_tables": ["cl10_countries", f"{SCHEMA}.cl10s_countries"],
}


def _lite(t: Table, typed: bool) -> Any:
    return table(t.name, *(column(c.name, c.type) if typed else column(c.name) for c in t.c),
                 schema=t.schema)


# The forms a statement's tables are written in: (users, orders, countries).
FORMS: dict[str, tuple[Any, Any, Any]] = {
    "Table": PUBLIC,
    "typed": tuple(_lite(t, True) for t in PUBLIC),  # type: ignore[dict-item]
    "untyped": tuple(_lite(t, False) for t in PUBLIC),  # type: ignore[dict-item]
    "explicit public": tuple(table(t.name, *(column(c.name) for c in t.c), schema="public")
                             for t in PUBLIC),  # type: ignore[dict-item]
    "schema-Table": IN_SCHEMA,
    "schema-typed": tuple(_lite(t, True) for t in IN_SCHEMA),  # type: ignore[dict-item]
    "schema-untyped": tuple(_lite(t, False) for t in IN_SCHEMA),  # type: ignore[dict-item]
}


def _create_schema(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    users: list[int]    # keys of users, in turn from each shard
    new: list[int]      # keys of no row yet, in turn from each shard


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    # cluster_with_tables creates the tables on each shard; their schema comes first.
    probe = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(), **CONFIG}, metadata=md,
                                         follow_map=False)
    try:
        for s in probe.shard_names:
            _create_schema(probe.primary(s))
    finally:
        probe.dispose()
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, md) as cluster:
        oracle = _oracle(shardkit_dev_cluster)
        per = keys_per_shard(cluster, "cl10_users", 6)
        assert per == keys_per_shard(cluster, f"{SCHEMA}.cl10s_users", 6)  # both hashed alike
        turns = [k for ks in zip(*per.values()) for k in ks]
        n = len(per)
        try:
            yield Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                                            consistency="strong"),
                      oracle, turns[:4 * n], turns[4 * n:])
        finally:
            oracle.dispose()


def _oracle(dev: Any) -> Engine:
    url = sa.make_url(dev.shards[0].primary.url)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS cl10_oracle"))
        c.execute(text("CREATE DATABASE cl10_oracle"))
    admin.dispose()
    engine = sa.create_engine(url.set(database="cl10_oracle"))
    _create_schema(engine)
    md.create_all(engine)
    return engine


def _load(env: Env, tables: tuple[Table, Table, Table]) -> None:
    u, o, c = tables
    users = [{"id": k, "name": f"u{k}", "score": k % 4} for k in env.users]
    orders = [{"user_id": k, "id": j, "amount": k * 10 + j} for k in env.users for j in (1, 2)]
    countries = [{"code": "fr", "name": "France"}, {"code": "de", "name": "Germany"},
                 {"code": "u3", "name": "Three"}]
    names = ", ".join(t.fullname for ts in (PUBLIC, IN_SCHEMA) for t in ts)
    for eng in [env.oracle] + [env.cluster.primary(s) for s in env.cluster.shard_names]:
        with eng.begin() as conn:
            conn.execute(text(f"TRUNCATE {names}"))
            conn.execute(insert(c), countries)
            if eng is env.oracle:
                conn.execute(insert(u), users)
                conn.execute(insert(o), orders)
    with env.Session() as s:
        s.execute(insert(u), users)
        s.execute(insert(o), orders)
        s.commit()


def _check_contents(env: Env, tables: tuple[Table, Table, Table]) -> None:
    """Each shard's primary holds exactly what it should, the oracle's rows in all."""
    u, o, c = tables
    cl = env.cluster
    for t, key in ((u, "id"), (o, "user_id"), (c, None)):
        cols = ", ".join(col.name for col in t.c)
        order = f"SELECT {cols} FROM {t.fullname} ORDER BY {cols}"
        with env.oracle.connect() as conn:
            want = [tuple(r) for r in conn.execute(text(order))]
        got: dict[str, list[tuple[Any, ...]]] = {}
        for s in cl.shard_names:
            with cl.primary(s).connect() as conn:
                got[s] = [tuple(r) for r in conn.execute(text(order))]
        if key is None:
            assert all(rows == want for rows in got.values()), (t.fullname, got, want)
            continue
        idx = [col.name for col in t.c].index(key)
        for s, rows in got.items():
            wrong = [r for r in rows if cl.shard_for(t.fullname, r[idx]) != s]
            assert not wrong, f"{t.fullname}: rows on {s} that another shard owns: {wrong}"
        assert sorted(r for rows in got.values() for r in rows) == want, t.fullname


REFUSED = (shardkit.ShardkitError, sa.exc.ArgumentError)


def _same(env: Env, form: str, fn: Callable[..., Any]) -> Exception | None:
    """Run ``fn(session, users, orders, countries, env)`` through shardkit (the statement
    written in ``form``) and on the oracle: the same answer, and each shard holds what it
    should; or shardkit refuses clearly (returned), and then nothing is written."""
    physical = IN_SCHEMA if form.startswith("schema") else PUBLIC
    _load(env, physical)
    tables = FORMS[form]
    refused = None
    try:
        with env.Session() as s:
            got = fn(s, *tables, env)
            s.commit()
    except REFUSED as e:
        refused = e
    with Session(env.oracle) as s:
        want = fn(s, *tables, env)
        if refused is None:
            s.commit()
    if refused is None:
        assert _norm(got) == _norm(want)
    _check_contents(env, physical)
    return refused


def _norm(v: Any) -> Any:
    if isinstance(v, sa.engine.CursorResult) or isinstance(v, sa.engine.Result):
        raise AssertionError("read the result inside the operation")
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, sa.Row):
        return tuple(_norm(x) for x in v)
    if isinstance(v, Decimal):
        return round(v, 6)
    return v


def _rows(result: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in result]


def _urow(k: int, name: str | None = None) -> dict[str, Any]:
    return {"id": k, "name": name or f"n{k}", "score": k % 5}


# -- writes -----------------------------------------------------------------------------

WRITES: dict[str, Callable[..., Any]] = {
    "insert one": lambda s, U, O, C, e: s.execute(insert(U).values(**_urow(e.new[0]))).rowcount,
    "insert executemany": lambda s, U, O, C, e: s.execute(insert(U), [_urow(k) for k in e.new[:6]]).rowcount,
    "insert multi-values": lambda s, U, O, C, e: s.execute(
        insert(U).values([_urow(k) for k in e.new[:6]])).rowcount,
    "insert positional multi-values": lambda s, U, O, C, e: s.execute(
        insert(U).values([(k, f"p{k}", 1) for k in e.new[:4]])).rowcount,
    "insert multi-values one shard": lambda s, U, O, C, e: s.execute(
        insert(U).values([_urow(k) for k in e.new[::len(e.cluster.shard_names)]])).rowcount,
    "insert multi-values one shard RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        insert(U).values([_urow(k) for k in e.new[1::len(e.cluster.shard_names)]]).returning(U.c.id)))),
    "insert bindparam": lambda s, U, O, C, e: s.execute(
        insert(U).values(id=bindparam("k"), name="b", score=2), {"k": e.new[1]}).rowcount,
    "insert RETURNING": lambda s, U, O, C, e: _rows(s.execute(
        insert(U).values(**_urow(e.new[0])).returning(U.c.id, U.c.name))),
    "insert executemany RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        insert(U).returning(U.c.id, U.c.score), [_urow(k) for k in e.new[:6]]))),
    "insert multi-values RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        insert(U).values([_urow(k) for k in e.new[:6]]).returning(U.c.id, U.c.name)))),
    "insert child executemany": lambda s, U, O, C, e: s.execute(
        insert(O), [{"user_id": k, "id": 9, "amount": 1} for k in e.users[:6]]).rowcount,
    "insert child RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        insert(O).values([{"user_id": k, "id": 8, "amount": 2} for k in e.users[:4]])
        .returning(O.c.user_id, O.c.amount)))),
    "insert reference one": lambda s, U, O, C, e: s.execute(insert(C).values(code="it", name="Italy")).rowcount,
    "insert reference executemany": lambda s, U, O, C, e: s.execute(
        insert(C), [{"code": "it", "name": "Italy"}, {"code": "es", "name": "Spain"}]).rowcount,
    "insert reference multi-values RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        insert(C).values([{"code": "it", "name": "Italy"}, {"code": "es", "name": "Spain"}])
        .returning(C.c.code)))),
    "update by key": lambda s, U, O, C, e: s.execute(
        update(U).where(U.c.id == e.users[0]).values(score=U.c.score + 10)).rowcount,
    "update by IN RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        update(U).where(U.c.id.in_(e.users[:5])).values(name="in").returning(U.c.id, U.c.name)))),
    "update child by key": lambda s, U, O, C, e: s.execute(
        update(O).where(O.c.user_id == e.users[1], O.c.id == 2).values(amount=O.c.amount * 2)).rowcount,
    "update all shards": lambda s, U, O, C, e: s.execute(
        update(U).where(U.c.score > 1).values(score=0),
        execution_options={"shardkit_all_shards": True}).rowcount,
    "update reference": lambda s, U, O, C, e: s.execute(
        update(C).where(C.c.code == "fr").values(name="France!")).rowcount,
    "update reference RETURNING": lambda s, U, O, C, e: _rows(s.execute(
        update(C).where(C.c.code == "de").values(name="DE").returning(C.c.code, C.c.name))),
    "delete by key": lambda s, U, O, C, e: s.execute(delete(O).where(O.c.user_id == e.users[2])).rowcount,
    "delete by IN RETURNING": lambda s, U, O, C, e: sorted(_rows(s.execute(
        delete(U).where(U.c.id.in_(e.users[:4])).returning(U.c.id)))),
    "delete all shards": lambda s, U, O, C, e: s.execute(
        delete(O).where(O.c.amount > 50), execution_options={"shardkit_all_shards": True}).rowcount,
    "delete reference": lambda s, U, O, C, e: s.execute(delete(C).where(C.c.code == "de")).rowcount,
    "upsert one": lambda s, U, O, C, e: _upsert(s, U, [_urow(e.users[0], "up"), ]),
    "upsert executemany": lambda s, U, O, C, e: _upsert(
        s, U, [_urow(k, "up") for k in e.users[:3] + e.new[:3]]),
    "upsert multi-values RETURNING": lambda s, U, O, C, e: _upsert(
        s, U, [_urow(k, "up") for k in e.users[:3] + e.new[:3]], multi=True),
    "upsert do nothing": lambda s, U, O, C, e: s.execute(
        pg.insert(U).values([_urow(k) for k in e.users[:2] + e.new[:2]])
        .on_conflict_do_nothing(index_elements=["id"])).rowcount,
    "upsert reference": lambda s, U, O, C, e: _upsert_ref(s, C),
    "update aliased": lambda s, U, O, C, e: s.execute(
        update(a := U.alias("ua")).where(a.c.id == e.users[3]).values(name="al")).rowcount,
    "delete aliased": lambda s, U, O, C, e: s.execute(
        delete(a := O.alias("oa")).where(a.c.user_id == e.users[3])).rowcount,
    "update reference aliased": lambda s, U, O, C, e: s.execute(
        update(a := C.alias("ca")).where(a.c.code == "fr").values(name="F")).rowcount,
}


def _upsert(s: Any, U: Any, rows: list[dict[str, Any]], multi: bool = False) -> Any:
    ins = pg.insert(U)
    stmt = ins.on_conflict_do_update(index_elements=[U.c.id], set_={
        "name": ins.excluded.name, "score": U.c.score + ins.excluded.score})
    if multi:
        return sorted(_rows(s.execute(stmt.values(rows).returning(U.c.id, U.c.name, U.c.score))))
    if len(rows) == 1:
        return s.execute(stmt.values(**rows[0])).rowcount
    s.execute(stmt, rows)
    return None


def _upsert_ref(s: Any, C: Any) -> Any:
    ins = pg.insert(C).values([{"code": "fr", "name": "Fr"}, {"code": "it", "name": "It"}])
    return sorted(_rows(s.execute(ins.on_conflict_do_update(
        index_elements=["code"], set_={"name": ins.excluded.name}).returning(C.c.code, C.c.name))))


# -- reads ------------------------------------------------------------------------------

READS: dict[str, Callable[..., Any]] = {
    "select by key": lambda s, U, O, C, e: _rows(s.execute(select(U).where(U.c.id == e.users[0]))),
    "select by IN": lambda s, U, O, C, e: sorted(_rows(s.execute(select(U).where(U.c.id.in_(e.users[:5]))))),
    "select by expanding IN": lambda s, U, O, C, e: sorted(_rows(s.execute(
        select(U.c.id, U.c.name).where(U.c.id.in_(bindparam("ks", expanding=True))), {"ks": e.users[:5]}))),
    "scatter ORDER BY LIMIT": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id, U.c.score).order_by(U.c.score.desc(), U.c.id).limit(5))),
    "scatter ORDER BY LIMIT OFFSET": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.name).order_by(U.c.name).limit(4).offset(3))),
    "scatter aggregates": lambda s, U, O, C, e: _rows(s.execute(
        select(func.count(), func.sum(U.c.score), func.min(U.c.id), func.max(U.c.name), func.avg(U.c.score)))),
    "scatter count distinct": lambda s, U, O, C, e: s.execute(select(func.count(U.c.score.distinct()))).scalar(),
    "scatter count distinct key": lambda s, U, O, C, e: s.execute(select(func.count(U.c.id.distinct()))).scalar(),
    "scatter GROUP BY": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.score, func.count(), func.sum(U.c.id)).group_by(U.c.score).order_by(U.c.score))),
    "scatter GROUP BY HAVING": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.score, func.count().label("n")).group_by(U.c.score).having(func.count() > 2)
        .order_by(U.c.score))),
    "child GROUP BY key": lambda s, U, O, C, e: _rows(s.execute(
        select(O.c.user_id, func.sum(O.c.amount)).group_by(O.c.user_id).order_by(O.c.user_id))),
    "join by key": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.name, O.c.amount).join_from(U, O, U.c.id == O.c.user_id)
        .where(U.c.id == e.users[1]).order_by(O.c.id))),
    "join scatter ORDER BY": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id, O.c.id, O.c.amount).join_from(U, O, U.c.id == O.c.user_id)
        .order_by(O.c.amount.desc(), U.c.id, O.c.id).limit(7))),
    "join GROUP BY": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id, U.c.name, func.sum(O.c.amount)).join_from(U, O, U.c.id == O.c.user_id)
        .group_by(U.c.id, U.c.name).order_by(U.c.id))),
    "join aggregate": lambda s, U, O, C, e: _rows(s.execute(
        select(func.count(), func.sum(O.c.amount)).select_from(U).join(O, U.c.id == O.c.user_id))),
    "join reference": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id, C.c.name).join_from(U, C, U.c.name == C.c.code).order_by(U.c.id))),
    "reference read": lambda s, U, O, C, e: _rows(s.execute(select(C).order_by(C.c.code))),
    "alias by key": lambda s, U, O, C, e: _rows(s.execute(
        select(a := U.alias("ua")).where(a.c.id == e.users[2]))),
    "alias join scatter": lambda s, U, O, C, e: _rows(s.execute(
        select((a := U.alias("ua")).c.id, (b := O.alias("ob")).c.amount)
        .join_from(a, b, a.c.id == b.c.user_id).order_by(b.c.amount).limit(5))),
    "self join of aliases by key": lambda s, U, O, C, e: _rows(s.execute(
        select((a := O.alias("o1")).c.id, (b := O.alias("o2")).c.id)
        .join_from(a, b, (a.c.user_id == b.c.user_id) & (a.c.id < b.c.id))
        .where(a.c.user_id == e.users[0]))),
    "CTE scatter": lambda s, U, O, C, e: _rows(s.execute(
        select((c := select(U.c.id, U.c.score).where(U.c.score > 1).cte("hi")).c.id).order_by(c.c.id))),
    "CTE by key": lambda s, U, O, C, e: _rows(s.execute(
        select((c := select(O).where(O.c.user_id == e.users[3]).cte("mine")).c.amount).order_by(c.c.amount))),
    "CTE aggregate": lambda s, U, O, C, e: _rows(s.execute(
        select(func.count(), func.sum(select(U.c.score).cte("sc").c.score)))),
    "subquery GROUP BY key": lambda s, U, O, C, e: _rows(s.execute(
        select((q := select(O.c.user_id, func.sum(O.c.amount).label("t")).group_by(O.c.user_id)
                .subquery()).c.user_id, q.c.t).order_by(q.c.t.desc()).limit(3))),
    "subquery by key": lambda s, U, O, C, e: _rows(s.execute(
        select(select(U).where(U.c.id == e.users[4]).subquery()))),
    "literal_column": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id, literal_column("score") + 1).where(U.c.id == e.users[5]))),
    "literal_column key": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.id).where(literal_column("id") == e.users[5]))),
    "exists by key": lambda s, U, O, C, e: s.execute(
        select(sa.exists().where(O.c.user_id == e.users[0]))).scalar(),
    "scalar subquery by key": lambda s, U, O, C, e: _rows(s.execute(
        select(U.c.name, select(func.count()).where(O.c.user_id == U.c.id).scalar_subquery())
        .where(U.c.id == e.users[0]))),
}


# What shardkit refuses whatever the form (documented), by operation.
REFUSES: dict[str, tuple[type[Exception], str]] = {
    "insert multi-values": (shardkit.CrossShardWriteError, "spans shards"),
    "insert positional multi-values": (shardkit.CrossShardWriteError, "spans shards"),
    "insert multi-values RETURNING": (shardkit.CrossShardWriteError, "spans shards"),
    "upsert multi-values RETURNING": (shardkit.CrossShardWriteError, "spans shards"),
    "upsert do nothing": (shardkit.CrossShardWriteError, "spans shards"),
    "insert child RETURNING": (shardkit.CrossShardWriteError, "spans shards"),
    "scatter count distinct": (shardkit.ScatterRefused, "count(DISTINCT ...) across shards"),
}


def _check(env: Env, form: str, name: str, fn: Callable[..., Any]) -> None:
    refused = _same(env, form, fn)
    if name in REFUSES:
        kind, match = REFUSES[name]
        assert isinstance(refused, kind) and match in str(refused), f"{form}: {refused!r}"
    else:
        assert refused is None, f"{form}: refused: {refused!r}"


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(WRITES))
def test_writes_in_each_form_match_one_database(env, form, name):
    _check(env, form, name, WRITES[name])


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(READS))
def test_reads_in_each_form_match_one_database(env, form, name):
    _check(env, form, name, READS[name])


# -- SQL text with columns --------------------------------------------------------------

def _text_users(U: Any) -> Any:
    name = U.fullname if isinstance(U, Table) else (f"{U.schema}.{U.name}" if U.schema else U.name)
    return text(f"SELECT id, name FROM {name} WHERE id = ANY(:ks) ORDER BY id").columns(
        column("id", BigInteger), column("name", Text))


@pytest.mark.parametrize("form", ["Table", "untyped", "schema-typed"])
def test_text_columns_is_refused_unless_a_shard_or_every_shard_is_named(env, form):
    U = FORMS[form][0]
    _load(env, IN_SCHEMA if form.startswith("schema") else PUBLIC)
    stmt = _text_users(U)
    ks = env.users[:4]
    with env.Session() as s:
        with pytest.raises(shardkit.ShardkitError):
            s.execute(stmt, {"ks": ks}).all()
    with env.Session() as s:
        on = env.cluster.shard_for(U.fullname if isinstance(U, Table) else env.cluster.router._given_table_route(
            U).table, ks[0])
        mine = [k for k in ks if env.cluster.shard_for("cl10_users", k) == on]
        got = s.execute(stmt, {"ks": ks}, execution_options={"shardkit_shard": on}).all()
        assert [tuple(r) for r in got] == [(k, f"u{k}") for k in sorted(mine)]
        got = s.execute(stmt, {"ks": ks}, execution_options={"shardkit_all_shards": True}).all()
        assert sorted(tuple(r) for r in got) == [(k, f"u{k}") for k in sorted(ks)]



@pytest.mark.parametrize("how", ["subquery", "cte", "nested"])
def test_text_columns_as_a_derived_table_is_refused_like_text(env, how):
    """A text().columns() read as a derived table or CTE reads tables shardkit cannot see,
    as text() does: refused like text(), not sent to any one shard as a read of no tables
    (which returned that shard's rows only: half of them, silently)."""
    _load(env, PUBLIC)
    stmt = _text_users(PUBLIC[0])
    ks = env.users[:4]
    if how == "subquery":
        q = select((t := stmt.subquery("t")).c.id, t.c.name).order_by(t.c.id)
    elif how == "cte":
        q = select((t := stmt.cte("t")).c.id, t.c.name).order_by(t.c.id)
    else:
        q = select((t := select(stmt.subquery("i")).subquery("t")).c.id, t.c.name).order_by(t.c.id)
    with env.Session() as s:
        with pytest.raises(shardkit.RoutingError, match="cannot route a textual SQL statement"):
            s.execute(q, {"ks": ks}).all()
        with pytest.raises(shardkit.RoutingError, match="cannot route a textual SQL statement"):
            env.cluster.explain(q, {"ks": ks})
        on = env.cluster.shard_for("cl10_users", ks[0])
        got = s.execute(q, {"ks": ks}, execution_options={"shardkit_shard": on}).all()
        assert [tuple(r) for r in got] == [(k, f"u{k}") for k in sorted(ks)
                                           if env.cluster.shard_for("cl10_users", k) == on]


# -- a Table whose columns' keys are not their names ------------------------------------

items = Table("cl10k_items", md, Column("item_key", BigInteger, key="ik", primary_key=True, autoincrement=False),
              Column("val", Text, key="v"))
CONFIG["groups"]["cl10k"] = {"tables": {"cl10k_items": "item_key"}}  # type: ignore[index]
items_lite = table("cl10k_items", column("item_key"), column("val"))


def _items_where(env: Env) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            out[s] = [tuple(r) for r in c.execute(text("SELECT item_key, val FROM cl10k_items ORDER BY 1"))]
    return out


def test_a_table_whose_column_keys_are_not_names_routes_in_either_spelling(env):
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("TRUNCATE cl10k_items"))
    ks = env.users
    with env.Session() as s:
        s.execute(insert(items).values(ik=ks[0], v="a"))
        s.execute(insert(items), [{"ik": k, "v": "b"} for k in ks[1:3]])
        s.execute(insert(items_lite).values(item_key=ks[3], val="c"))
        s.execute(insert(items_lite), [{"item_key": k, "val": "d"} for k in ks[4:6]])
        ins = pg.insert(items)
        s.execute(ins.values(ik=ks[0], v="e").on_conflict_do_update(index_elements=[items.c.ik],
                                                                       set_={"v": ins.excluded.v}))
        s.execute(update(items).where(items.c.ik == ks[1]).values(v="f"))
        s.execute(update(items_lite).where(items_lite.c.item_key == ks[2]).values(val="g"))
        s.commit()
        assert s.execute(select(items.c.v).where(items.c.ik == ks[0])).scalar_one() == "e"
        assert s.execute(select(items_lite.c.val).where(items_lite.c.item_key == ks[3])).scalar_one() == "c"
        assert s.execute(select(func.count()).select_from(items)).scalar_one() == 6
    want = {0: "e", 1: "f", 2: "g", 3: "c", 4: "d", 5: "d"}
    for shard, rows in _items_where(env).items():
        assert rows == sorted((ks[i], v) for i, v in want.items()
                              if env.cluster.shard_for("cl10k_items", ks[i]) == shard)


def test_a_key_given_as_a_string_is_read_in_the_keyed_column_type(env):
    """The cluster learns the key column's type from the MetaData by its name (a Column
    whose key is not its name was missed: a string key was hashed as a string, on
    another shard than the number the database stores, where no read by key finds it)."""
    k = env.users[0]
    for where in ("cl10k_items", items):
        assert env.cluster.shard_for(where, k) == env.cluster.shard_for("cl10_users", k)
        with pytest.raises(shardkit.ShardKeyError, match="integer shard key got '1'"):
            env.cluster.shard_for(where, "1")
    with pytest.raises(shardkit.ShardKeyError, match="integer shard key got '1'"):
        env.cluster.explain(insert(items).values(ik="1", v="x"))
    with pytest.raises(shardkit.ShardKeyError, match="integer shard key got '1'"):
        env.cluster.explain(select(items).where(items.c.ik == "1"))


def test_a_key_column_is_configured_by_its_database_name():
    """Cluster(metadata=) checked a configured key column by its key in table.c: a
    Column("item_key", key="ik") configured as "item_key" (as the routing, the guard's
    triggers and the moves need) was refused; configured as "ik", it says so."""
    shards = [{"name": "s0", "primary": "postgresql+psycopg://app@127.0.0.1:1/app"}]
    c = shardkit.Cluster.from_config({"shards": shards, "groups": {"g": {"tables": {"cl10k_items": "item_key"}}}},
                                     metadata=md, follow_map=False)
    c.dispose()
    with pytest.raises(shardkit.ConfigurationError, match="that is the key of its column 'item_key'"):
        shardkit.Cluster.from_config({"shards": shards, "groups": {"g": {"tables": {"cl10k_items": "ik"}}}},
                                     metadata=md, follow_map=False)


def test_updates_through_table_clauses_and_aliases_are_not_kept_alive_by_the_router(env):
    """The router kept, per table object, whether its key column has an onupdate=: every
    table() or alias an application builds per UPDATE stayed in memory for good."""
    router = env.cluster.router
    before = len(router._key_onupdates)
    for i in range(50):
        t = table("cl10_users", column("id"), column("name"))
        a = PUBLIC[0].alias()
        env.cluster.explain(update(t).where(t.c.id == env.users[0]).values(name="x"))
        env.cluster.explain(update(a).where(a.c.id == env.users[0]).values(name="x"))
    assert len(router._key_onupdates) <= before + 1


def test_an_onupdate_of_a_key_column_keyed_apart_from_its_name_is_seen():
    """An UPDATE that leaves a key column with an onupdate= unset is refused (each row
    would get a new key where it is); the column was looked for by its key in table.c,
    so a Column("tenant", key="t", onupdate=...) was missed."""
    md2 = MetaData()
    t = Table("cl10k_moving", md2, Column("id", BigInteger, primary_key=True),
              Column("tenant", BigInteger, key="tn", onupdate=lambda: 7), Column("v", Text))
    shards = [{"name": "s0", "primary": "postgresql+psycopg://app@127.0.0.1:1/app"},
              {"name": "s1", "primary": "postgresql+psycopg://app@127.0.0.1:2/app"}]
    c = shardkit.Cluster.from_config({"shards": shards, "groups": {"g": {"tables": {"cl10k_moving": "tenant"}}}},
                                     metadata=md2, follow_map=False)
    try:
        with pytest.raises(shardkit.CrossShardWriteError, match="leaves shard key column tenant to its onupdate"):
            c.explain(update(t).where(t.c.tn == 1).values(v="x"))
        assert c.explain(update(t).where(t.c.tn == 1).values(v="x", tn=1)).shards == (c.shard_for(t, 1),)
    finally:
        c.dispose()
