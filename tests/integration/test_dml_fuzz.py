"""A random statement fuzzer for WRITES: every ``update()``, ``delete()`` and ``insert()``
run through a ``ShardedSession`` either changes exactly what the same statement changes on
ONE unsharded database holding every row (``dz8_oracle``, on shard s0's server) — the same
``rowcount``, the same ``RETURNING`` rows (as multisets), the same session objects after
``synchronize_session``, and then the same full table contents, each row on the shard that
owns its key — or raises a shardkit error and changes nothing on any shard.

Groups (each with a colocated child table, for subqueries, ``EXISTS`` and ``UPDATE ...
FROM``): a hash group over a ``bigint`` key, a hash group over a ``text`` key (case,
trailing blanks, ``'5'``/``'05'``, non-ASCII), a range group over an ``integer`` key, and a
list group over ``text`` with a default shard.  Each holds rows on every shard, and rows
whose key is NULL (placed with ``scope(shard=...)``).

Statements (a seeded ``random.Random``: the same statements on every run): ORM and Core
``UPDATE``/``DELETE`` whose WHERE mixes key predicates (``=``, ``!=``, ``IN`` over several
shards, ``NOT IN``, ``BETWEEN``, ``<``/``>``, ``IS NULL``, values of another type:
``'5'``, ``5.0``, ``Decimal``, ``cast()``), bound parameters, other columns, ``AND``/``OR``/
``NOT``, subqueries (``key IN (SELECT ...)`` of the child, a scalar subquery, a CTE,
``EXISTS`` correlated on the key), ``UPDATE ... FROM`` the child; a SET of the key (to a key of
the same shard or another) and of other columns; ``RETURNING``; ``synchronize_session``;
``shardkit_all_shards=True`` now and then; Core executemany ``UPDATE``/``DELETE`` by key;
ORM bulk ``UPDATE`` by primary key; ``INSERT`` of one row, several rows in one ``VALUES``,
executemany (ORM and Core, with ``RETURNING`` and ``sort_by_parameter_order``), and
PostgreSQL ``ON CONFLICT DO NOTHING / DO UPDATE``.

``SHARDKIT_DML_FUZZ_STATEMENTS`` sets the number of statements (default 500, times
``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py; a thorough run: 3000), ``SHARDKIT_DML_FUZZ_SEED`` the seed (default 8).
"""

from __future__ import annotations

import decimal
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
from dml_fuzz_common import GenBase
from dml_oracle import (
    OracleEnv,
    Tally,
    oracle_env,
    preload,
    ran_more_than_once,
    result_problems,
    returned,
    rows_diff,
    run_both,
    session_view,
    sorted_rows,
)
from sqlalchemy import (
    BigInteger,
    Integer,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    any_,
    exists,
    func,
    insert,
    lambda_stmt,
    literal,
    not_,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

import shardkit

pytestmark = pytest.mark.integration

CI_OK = True    # whether the servers have ICU (a nondeterministic collation dz8_ci)
CI = "CREATE COLLATION IF NOT EXISTS dz8_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
STATEMENTS = fuzz_size("SHARDKIT_DML_FUZZ_STATEMENTS", 500)
SEED = int(os.environ.get("SHARDKIT_DML_FUZZ_SEED", "8"))
LOG = os.environ.get("SHARDKIT_DML_FUZZ_LOG")   # a file to append each statement's outcome to


class Base(DeclarativeBase):
    pass


def _pair(name: str, key_type: Any) -> tuple[Any, Any]:
    parent = type(f"P_{name}", (Base,), {
        "__tablename__": f"dz8_{name}",
        "rid": mapped_column(Integer, primary_key=True, autoincrement=False),
        "k": mapped_column(key_type),
        "v": mapped_column(Integer),
        "t": mapped_column(Text),
    })
    child = type(f"C_{name}", (Base,), {
        "__tablename__": f"dz8_{name}c",
        "rid": mapped_column(Integer, primary_key=True, autoincrement=False),
        "k": mapped_column(key_type),
        "w": mapped_column(Integer),
    })
    return parent, child


HP, HC = _pair("h", BigInteger)     # hash, bigint key
TP, TC = _pair("t", Text)           # hash, text key
RP, RC = _pair("r", Integer)        # range, integer key
LP, LC = _pair("l", Text)           # list, text key, default shard

CONFIG = {
    "groups": {
        "dzh": {"strategy": "hash", "tables": {"dz8_h": "k", "dz8_hc": "k"}},
        "dzt": {"strategy": "hash", "tables": {"dz8_t": "k", "dz8_tc": "k"}},
        "dzr": {"strategy": "range", "tables": {"dz8_r": "k", "dz8_rc": "k"},
                "ranges": [{"to": 0, "shard": "s0"},
                           {"from": 0, "to": 10, "shard": "s1"},
                           {"from": 10, "to": 20, "shard": "s2"},
                           {"from": 20, "to": 30, "shard": "s0"},
                           {"from": 30, "shard": "s1"}]},
        "dzl": {"strategy": "list", "tables": {"dz8_l": "k", "dz8_lc": "k"},
                "values": {"s0": ["eu", "uk"], "s1": ["us", "ca"]}, "default": "s2"},
    },
}


@dataclass(frozen=True)
class Grp:
    name: str
    parent: Any
    child: Any
    keys: tuple[Any, ...]        # keys rows hold
    extra: tuple[Any, ...]       # keys no row holds (yet)
    odd: tuple[Any, ...]         # values of other types compared with the key


GROUPS = [
    Grp("h", HP, HC, tuple(range(0, 16)) + (2**40, -7, 2**62),
        (100, 101, 102, 103, -1000),
        ("5", "05", " 7", 5.0, decimal.Decimal("3"), decimal.Decimal("3.5"), 2.5, "x")),
    Grp("t", TP, TC, ("a", "b", "c", "A", "a ", " a", "5", "05", "", "\u00df", "ss", "e\u0301",
                      "\u00e9", "o'k", "zz", "B"),
        ("new1", "new2", "Z", "b "),
        (5, "A", "a", "\u00e9")),
    Grp("r", RP, RC, (-5, -1, 0, 1, 5, 9, 10, 11, 19, 20, 25, 29, 30, 31, 100, -100),
        (2, 3, 12, 21, 40, -2),
        ("5", "15", "25", 9.5, 9.6, decimal.Decimal("19.5"), decimal.Decimal("10.2"), -0.4)),
    Grp("l", LP, LC, ("eu", "uk", "us", "ca", "br", "jp", "EU", "eu ", ""),
        ("fr", "de", "Us"),
        ("EU", "Eu", "eu")),
]


# ---------------------------------------------------------------------------
# The cluster and the one database
# ---------------------------------------------------------------------------


@dataclass
class Env(OracleEnv):
    next_rid: list[int] = field(default_factory=lambda: [10_000])


def _rows(g: Grp, rng: random.Random, start: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    parents, children = [], []
    rid = start
    for i, k in enumerate(g.keys):
        for _ in range(1 + i % 3):
            rid += 1
            parents.append({"rid": rid, "k": k, "v": rng.randrange(6), "t": rng.choice(["x", "y", None])})
        if i % 2 == 0:
            rid += 1
            children.append({"rid": rid, "k": k, "w": rng.randrange(6)})
    for j in range(3):
        rid += 1
        parents.append({"rid": rid, "k": None, "v": j, "t": "n"})
    return parents, children


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    with oracle_env(shardkit_module_cluster_factory, Env, CONFIG, Base.metadata, "dz8_oracle") as e:
        cluster, oracle = e.cluster, e.oracle
        global CI_OK
        try:
            for eng in [oracle, *(cluster.primary(s) for s in cluster.shard_names)]:
                with eng.begin() as c:
                    c.execute(text(CI))
        except sa_exc.DBAPIError:
            CI_OK = False   # (a server built without ICU)
        rng = random.Random(1)
        with oracle.begin() as c, e.Session() as s:
            for n, g in enumerate(GROUPS):
                parents, children = _rows(g, rng, 1000 * n)
                for model, rows in ((g.parent, parents), (g.child, children)):
                    c.execute(insert(model), rows)
                    s.execute(insert(model), [r for r in rows if r["k"] is not None])
                    for i, r in enumerate(r for r in rows if r["k"] is None):
                        with shardkit.scope(shard=cluster.shard_names[i % 3]):
                            s.execute(insert(model), [r])
            s.commit()
        for g in GROUPS:
            assert len({cluster.shard_for(g.parent, k) for k in g.keys}) == 3, g.name
        yield e


def contents(env: Env, table: Any, oracle_conn: Any = None) -> tuple[list[Any], list[Any], list[str]]:
    """(the oracle's rows, the shards' rows, rows on a shard that does not own their key)."""
    q = select(table).order_by(table.c.rid)
    if oracle_conn is None:
        with env.oracle.connect() as c:
            want = [tuple(r) for r in c.execute(q)]
    else:
        want = [tuple(r) for r in oracle_conn.execute(q)]
    got, misplaced = [], []
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            for r in c.execute(q):
                got.append(tuple(r))
                if r.k is not None and env.cluster.shard_for(table.name, r.k) != s:
                    misplaced.append(f"{table.name} {tuple(r)} on {s}")
    return sorted_rows(want), sorted_rows(got), misplaced


# ---------------------------------------------------------------------------
# Statements: built from a seeded generator, kept with a description
# ---------------------------------------------------------------------------


@dataclass
class Stmt:
    what: str
    group: Grp
    build: Any                     # fn(core: bool) -> statement, or the statement itself
    params: Any = None
    orm: bool = False
    returning: bool = False
    executemany: bool = False
    preload: list[int] = field(default_factory=list)   # rids loaded into the session first


class Gen(GenBase):
    # -- values ---------------------------------------------------------
    def keys(self, g: Grp, n: int | None = None) -> list[Any]:
        n = self.rng.randint(0, 5) if n is None else n
        return [self.key(g) if self.vrng.random() > 0.1 else None for _ in range(n)]

    # -- WHERE -----------------------------------------------------------
    def leaf(self, g: Grp, T: Any, params: dict[str, Any]) -> tuple[Any, str]:
        rng, k = self.rng, T.k
        C = g.child.__table__.c if isinstance(T, type(g.parent.__table__.c)) else g.child
        kind = rng.choice(["eq", "eq", "eq", "eq_bind", "ne", "in", "in", "in_bind", "notin", "between",
                           "lt", "gt", "isnull", "v", "v", "t", "in_child", "in_child_key",
                           "scalar_sub", "scalar_sub_max", "exists_child", "cte", "cast_eq",
                           "eq_literal_typed", "eq_odd", "le", "ge", "in_reused", "any", "tuple_in",
                           "not_distinct", "distinct", "between_sym", "double_not", "collate_c",
                           "collate_ci", "eq_none_bind", "key_plus", "eq_twice"])
        if kind == "eq":
            v = self.key(g)
            return k == v, f"k = {v!r}"
        if kind == "eq_odd":
            v = rng.choice(g.odd)
            return k == v, f"k = {v!r}"
        if kind == "eq_bind":
            v = self.key(g)
            return k == self.bind(params, v), f"k = :p {v!r}"
        if kind == "ne":
            v = self.key(g)
            return k != v, f"k != {v!r}"
        if kind == "in":
            vs = self.keys(g)
            return k.in_(vs), f"k IN {vs!r}"
        if kind == "in_bind":
            vs = [x for x in self.keys(g) if x is not None]
            return k.in_(self.bind(params, vs, expanding=True)), f"k IN :p {vs!r}"
        if kind == "notin":
            vs = [x for x in self.keys(g) if x is not None]
            return k.not_in(vs), f"k NOT IN {vs!r}"
        if kind == "between":
            a, b = self.key(g), self.key(g)
            return k.between(a, b), f"k BETWEEN {a!r} AND {b!r}"
        if kind in ("lt", "gt"):
            v = self.key(g)
            return (k < v if kind == "lt" else k > v), f"k {'<' if kind == 'lt' else '>'} {v!r}"
        if kind == "isnull":
            return k.is_(None), "k IS NULL"
        if kind == "v":
            n = rng.randrange(6)
            return (T.v == n if rng.random() < 0.5 else T.v < n), f"v ~ {n}"
        if kind == "t":
            return T.t == "x", "t = 'x'"
        if kind == "in_child":
            n = rng.randrange(6)
            return k.in_(select(C.k).where(C.w > n)), f"k IN (SELECT child.k WHERE w > {n})"
        if kind == "in_child_key":
            v = self.key(g)
            return k.in_(select(C.k).where(C.k == v)), f"k IN (SELECT child.k WHERE child.k = {v!r})"
        if kind == "scalar_sub":
            rid = rng.randrange(1000 * GROUPS.index(g), 1000 * GROUPS.index(g) + 60)
            return k == select(C.k).where(C.rid == rid).scalar_subquery(), f"k = (SELECT child.k WHERE rid={rid})"
        if kind == "scalar_sub_max":
            return k == select(func.max(C.k)).scalar_subquery(), "k = (SELECT max(child.k))"
        if kind == "exists_child":
            n = rng.randrange(6)
            return exists().where(C.k == k, C.w > n), f"EXISTS(child.k = k AND w > {n})"
        if kind == "cte":
            vs = self.keys(g, 3)
            cte = select(C.k).where(C.k.in_(vs) if rng.random() < 0.5 else C.w < 3).cte(f"ck{len(params)}")
            return k.in_(select(cte.c.k)), f"k IN (WITH cte child.k IN {vs!r} or w<3)"
        if kind == "cast_eq":
            v = self.key(g)
            return cast(k, Text) == str(v), f"CAST(k AS TEXT) = {str(v)!r}"
        if kind == "eq_literal_typed":
            v = self.key(g)
            return k == literal(v, k.type), f"k = literal({v!r}, key type)"
        if kind in ("le", "ge"):
            v = self.key(g)
            return (k <= v if kind == "le" else k >= v), f"k {'<=' if kind == 'le' else '>='} {v!r}"
        if kind == "in_reused":
            # One expanding parameter in two places: not to be split by shard.
            vs = [self.plain_key(g) for _ in range(3)]
            name = f"p{len(params)}"
            params[name] = vs
            other = T.t if isinstance(vs[0], str) else T.v
            fn = rng.choice([and_, or_])
            return fn(k.in_(bindparam(name, expanding=True)), other.in_(bindparam(name, expanding=True))), \
                f"{fn.__name__}(k IN :{name}, other IN :{name}) {vs!r}"
        if kind == "any":
            vs = [self.plain_key(g) for _ in range(2)]
            return k == any_(postgresql.array(vs)), f"k = ANY(ARRAY{vs!r})"
        if kind == "tuple_in":
            pairs = [(self.plain_key(g), rng.randrange(6)) for _ in range(2)]
            return tuple_(k, T.v).in_(pairs), f"(k, v) IN {pairs!r}"
        if kind == "not_distinct":
            v = self.key(g)
            return k.is_not_distinct_from(v), f"k IS NOT DISTINCT FROM {v!r}"
        if kind == "distinct":
            v = self.key(g)
            return k.is_distinct_from(v), f"k IS DISTINCT FROM {v!r}"
        if kind == "between_sym":
            a, b = self.key(g), self.key(g)
            return k.between(a, b, symmetric=True), f"k BETWEEN SYMMETRIC {a!r} AND {b!r}"
        if kind == "double_not":
            v = self.key(g)
            return not_(k != v), f"NOT (k != {v!r})"
        if kind == "collate_c" and isinstance(g.keys[0], str):
            v = self.key(g)
            return k.collate("C") == v, f"k COLLATE \"C\" = {v!r}"
        if kind == "collate_ci" and isinstance(g.keys[0], str) and CI_OK:
            v = self.key(g)
            return k.collate("dz8_ci") == v, f"k COLLATE dz8_ci = {v!r}"
        if kind == "eq_none_bind":
            return k == self.bind(params, None, type_=k.type), "k = :p None"
        if kind == "key_plus" and not isinstance(g.keys[0], str):
            v = self.key(g)
            return k + 0 == v, f"k + 0 = {v!r}"
        if kind == "eq_twice":
            a, b = self.key(g), self.key(g)
            return and_(k == a, k == b), f"k = {a!r} AND k = {b!r}"
        return self.leaf(g, T, params)

    # -- statements ------------------------------------------------------
    def _statement(self) -> Stmt:
        g = self.rng.choice(GROUPS)
        kind = self.rng.choice(["update", "update", "update", "delete", "delete", "insert", "insert",
                                "upsert", "em_update", "em_delete", "bulk_update", "update_from", "lambda", "query"])
        return getattr(self, "_" + kind)(g)

    def _stmt(self, what: str, g: Grp, stmt: Any, params: Any = None, orm: bool = False, returning: bool = False,
              executemany: bool = False, preload: list[int] | None = None, all_shards: bool = False) -> Stmt:
        return Stmt(what, g, stmt, params, orm, returning, executemany, preload or [])

    def _setvalues(self, g: Grp, T: Any) -> tuple[dict[str, Any], str]:
        r = self.rng.random()
        if r < 0.15:
            v = self.plain_key(g)
            return {"k": v, "v": T.v + 1}, f"SET k={v!r}, v=v+1"
        if r < 0.2:
            return {"k": T.k}, "SET k=k"
        if r < 0.25:
            v = self.plain_key(g)
            return {"k": bindparam("nk", value=v, type_=T.k.type)}, f"SET k=:nk {v!r}"
        return self._set_other(T, r)

    def _preload(self, g: Grp) -> list[int]:
        base = 1000 * GROUPS.index(g)
        return self.rng.sample(range(base + 1, base + 50), 6)

    def _lambda(self, g: Grp) -> Stmt:
        """``lambda_stmt()``: one code location, so one cached shape whose values are the
        closure's, tracked as bound parameters."""
        T = g.parent
        shape = self.rng.choice(["eq", "in", "eq_and_v"])
        verb = self.rng.choice(["update", "delete"])
        key, keys, n = self.key(g), [x for x in self.keys(g) if x is not None], self.rng.randrange(6)
        stmt = _lambda_dml(T, verb, shape, key, keys, n)
        all_shards = self.rng.random() < 0.2
        if all_shards:
            stmt = stmt.add_criteria(lambda s: s.execution_options(shardkit_all_shards=True))
        return Stmt(f"lambda_stmt {verb} {g.name} {shape} key={key!r} keys={keys!r} n={n}"
                    f"{' all_shards' if all_shards else ''}", g, stmt, None, True)

    def _query(self, g: Grp) -> Stmt:
        """The legacy ``Query.update()`` / ``Query.delete()``: a count."""
        params: dict[str, Any] = {}
        w, d = self.where(g, g.parent, 1, params)
        verb = self.rng.choice(["update", "delete"])
        sync = self.rng.choice([False, "fetch", "evaluate", "auto"])
        all_shards = self.rng.random() < 0.3

        def run(s: Session) -> int:
            q = s.query(g.parent).filter(w)
            if params:
                q = q.params(**params)
            if all_shards:
                q = q.execution_options(shardkit_all_shards=True)
            if verb == "update":
                return q.update({"v": g.parent.v + 3}, synchronize_session=sync)
            return q.delete(synchronize_session=sync)
        return Stmt(f"Query.{verb}() {g.name} WHERE {d} sync={sync}{' all_shards' if all_shards else ''}",
                    g, run, params or None, True, preload=self._preload(g))

    def _update_from(self, g: Grp) -> Stmt:
        orm = self.rng.random() < 0.5
        T = g.parent if orm else g.parent.__table__.c
        C = g.child if orm else g.child.__table__.c
        params: dict[str, Any] = {}
        w, d = self.where(g, T, 1, params)
        n = self.rng.randrange(6)
        if self.rng.random() < 0.5:
            stmt = update(g.parent if orm else g.parent.__table__).where(T.k == C.k, C.w > n, w).values(v=T.v + 7)
            d = f"UPDATE ... FROM child WHERE k = child.k AND w > {n} AND {d}"
        else:
            stmt = delete(g.parent if orm else g.parent.__table__).where(T.k == C.k, C.w > n, w)
            d = f"DELETE ... USING child WHERE k = child.k AND w > {n} AND {d}"
        stmt, od, _ = self._options(stmt, orm and self.rng.random() < 0.5)
        return Stmt(f"{'ORM' if orm else 'Core'} {g.name} {d}{od}", g, stmt, params or None, orm)

    def _new_row(self, g: Grp, rid: int) -> dict[str, Any]:
        r = self.rng.random()
        k = self.plain_key(g) if r < 0.9 else self.vrng.choice(g.odd) if r < 0.96 else None
        return {"rid": rid, "k": k, "v": self.vrng.randrange(90, 99), "t": "ins"}

    def _upsert(self, g: Grp) -> Stmt:
        rows = self._new_rows(g, existing=True)
        orm = self.rng.random() < 0.3
        table = g.parent.__table__
        ins = postgresql.insert(g.parent if orm else table)

        def set_key() -> tuple[Any, str]:
            nk = self.plain_key(g)
            return ins.on_conflict_do_update(index_elements=["rid"], set_={"k": nk, "v": 1}), f"DO UPDATE k={nk!r}"
        stmt, d = self._on_conflict(ins, set_key)
        ret = self.rng.random() < 0.4 and not orm
        many = self.rng.random() < 0.6
        if ret:
            stmt = stmt.returning(table.c.rid, table.c.k, table.c.v, sort_by_parameter_order=many and self.rng.random() < 0.5)
        if many:
            params = rows
        else:
            stmt = stmt.values(rows)
            params = None
        stmt, od, _ = self._options(stmt, False)
        return Stmt(f"{'ORM' if orm else 'Core'} UPSERT {g.name} {d} {'many' if many else 'values'} {rows!r}{od}"
                    f"{' RETURNING' if ret else ''}", g, stmt, params, orm, ret, executemany=many)

    def _em_update(self, g: Grp) -> Stmt:
        table = g.parent.__table__
        keys = [self.key(g) for _ in range(self.rng.randint(1, 4))]
        params = [{"bk": k, "nv": self.vrng.randrange(200, 210)} for k in keys]
        r = self.rng.random()
        if r < 0.15:
            for p in params:
                p["nk"] = self.plain_key(g) if self.vrng.random() < 0.8 else p["bk"]
            stmt = update(table).where(table.c.k == bindparam("bk")).values(k=bindparam("nk"), v=bindparam("nv"))
            d = "k = :bk SET k = :nk"
        elif r < 0.25:
            params[0]["bk"] = None
            stmt = update(table).where(table.c.k == bindparam("bk")).values(v=bindparam("nv"))
            d = "k = :bk (a None)"
        elif r < 0.6:
            stmt = update(table).where(table.c.k == bindparam("bk")).values(v=bindparam("nv"))
            d = "k = :bk"
        else:
            stmt = update(table).where(table.c.k == bindparam("bk"), table.c.v < 4).values(v=bindparam("nv"))
            d = "k = :bk AND v < 4"
        stmt, od, _ = self._options(stmt, False)
        return Stmt(f"Core executemany UPDATE {g.name} SET v=:nv WHERE {d} {params!r}{od}", g, stmt, params,
                    executemany=True)

    def _em_delete(self, g: Grp) -> Stmt:
        table = g.parent.__table__
        keys = [self.key(g) for _ in range(self.rng.randint(1, 4))]
        params = [{"bk": k, "bv": self.vrng.randrange(6)} for k in keys]
        stmt = delete(table).where(table.c.k == bindparam("bk"), table.c.v >= bindparam("bv"))
        stmt, od, _ = self._options(stmt, False)
        return Stmt(f"Core executemany DELETE {g.name} WHERE k = :bk AND v >= :bv {params!r}{od}", g, stmt,
                    params, executemany=True)

    def _bulk_update(self, g: Grp) -> Stmt:
        rows = []
        seen = set()
        for _ in range(self.rng.randint(1, 4)):
            row = self._existing_row(g)
            if row is None or row["rid"] in seen:
                continue
            seen.add(row["rid"])
            rows.append({**row, "v": self.vrng.randrange(300, 310)})
        if not rows:
            return self._update(g)
        stmt, od, _ = self._options(update(g.parent), True)
        return Stmt(f"ORM bulk UPDATE by pk {g.name} {rows!r}{od}", g, stmt, rows, True, executemany=True,
                    preload=[r["rid"] for r in rows])


def _lambda_dml(T: Any, verb: str, shape: str, key: Any, keys: list[Any], n: int) -> Any:
    if verb == "update":
        stmt = lambda_stmt(lambda: update(T).values(v=T.v + 11))
    else:
        stmt = lambda_stmt(lambda: delete(T))
    if shape == "eq":
        return stmt + (lambda s: s.where(T.k == key))
    if shape == "in":
        return stmt + (lambda s: s.where(T.k.in_(keys)))
    return stmt + (lambda s: s.where(T.k == key, T.v < n))


# ---------------------------------------------------------------------------
# Running one statement on both sides (dml_oracle)
# ---------------------------------------------------------------------------

def _run(s: Session, st: Stmt) -> tuple[Any, Any, Any]:
    P = st.group.parent
    preload(s, P, st.preload)
    if callable(st.build) and not hasattr(st.build, "_generate_cache_key"):
        return st.build(s), None, session_view(s, P, st.preload)
    rc, rows = returned(s.execute(st.build, st.params), st.returning)
    return rc, rows, session_view(s, P, st.preload)


def _run_one(env: Env, st: Stmt, tally: Tally) -> None:
    table = st.group.parent.__table__
    before_o, before_s, _ = contents(env, table)
    assert before_o == before_s, f"out of step before {st.what}"
    both = run_both(env, lambda so: _run(so, st), lambda ss: _run(ss, st))
    want_rows, after_s, misplaced = contents(env, table)
    if tally.judge_errors(st.what, both, "the shards" if after_s != before_s else ""):
        return
    problems = result_problems(both.want, both.got)
    if after_s != want_rows:
        problems.append(f"contents {rows_diff(want_rows, after_s)}")
    if misplaced:
        problems.append(f"misplaced rows {misplaced}")
    if not st.executemany:
        problems += ran_more_than_once(both.hits)
    tally.judged(st, problems, want_rows != before_o)


def _resync(env: Env) -> None:
    """After a mismatch, make the shards hold the oracle's rows again (each on its key's
    shard), so that one defect is reported once."""
    for g in GROUPS:
        table = g.parent.__table__
        with env.oracle.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(select(table))]
        for s in env.cluster.shard_names:
            with env.cluster.primary(s).begin() as c:
                c.execute(delete(table))
                mine = [r for r in rows if (r["k"] is not None and env.cluster.shard_for(table.name, r["k"]) == s)
                        or (r["k"] is None and r["rid"] % 3 == env.cluster.shard_names.index(s))]
                if mine:
                    c.execute(insert(table), mine)


def test_writes_change_what_one_database_changes(env):
    gen = Gen(env, random.Random(SEED))
    tally = Tally()
    tally.run(STATEMENTS, gen.statement, lambda st: _run_one(env, st, tally), lambda: _resync(env), LOG)
    report = tally.report(f"{tally.ran} statements: {tally.same} the same ({tally.changed} changing rows), "
                          f"{tally.both_failed} failed on both, "
                          f"{sum(tally.refused.values())} refused by shardkit, {len(tally.mismatches)} mismatches")
    print(report)
    assert tally.changed > STATEMENTS // 4, report   # (the statements do write)
    assert not tally.mismatches, report


# ---------------------------------------------------------------------------
# What the fuzzer found, minimised
# ---------------------------------------------------------------------------


def _keys_on_shards(env: Env, g: Grp) -> list[Any]:
    """One key of ``g`` owned by each shard."""
    by_shard: dict[str, Any] = {}
    for k in g.keys:
        by_shard.setdefault(env.cluster.shard_for(g.parent, k), k)
    return [by_shard[s] for s in env.cluster.shard_names]


@pytest.mark.parametrize("shape", ["plain", "sort_by_parameter_order", "on conflict",
                                   "on conflict, sort_by_parameter_order"])
def test_executemany_insert_returning_across_shards_has_the_rowcount_of_one_database(env, shape):
    """A Core ``INSERT ... RETURNING`` executemany whose rows go to several shards: on one
    database its result has a ``rowcount`` (-1, unknown, as SQLAlchemy reports an
    executemany INSERT ... RETURNING's); through shardkit the merged result had none, and
    reading ``result.rowcount`` raised ``AttributeError``.  Now it is the shards' counts
    summed (here each shard ran one row, whose count is known), or -1 if one is unknown."""
    table = HP.__table__
    ins = postgresql.insert(table).on_conflict_do_nothing(index_elements=["rid"]) if "conflict" in shape \
        else insert(table)
    stmt = ins.returning(table.c.rid, table.c.k, sort_by_parameter_order="sort" in shape)
    rows = [{"rid": 90_000 + i + 10 * len(shape), "k": k, "v": 1, "t": "rc"}
            for i, k in enumerate(_keys_on_shards(env, GROUPS[0]))]
    with Session(env.oracle) as so:
        want = so.execute(stmt, rows)
        want_rows, want_count = sorted(want.all()), want.rowcount
        so.rollback()
    with env.Session() as s:
        got = s.execute(stmt, rows)
        got_rows = sorted(got.all())
        assert got_rows == want_rows
        assert want_count == -1 and got.rowcount in (-1, len(got_rows)), got.rowcount
        # Two rows on one shard, one on each other: the count is known or -1, never wrong.
        more = [{**r, "rid": r["rid"] + 5} for r in [rows[0], *rows]]
        more[0]["rid"] += 1
        r2 = s.execute(stmt, more)
        assert r2.rowcount in (-1, len(r2.all()) == len(more) and len(more)), r2.rowcount
        s.rollback()
