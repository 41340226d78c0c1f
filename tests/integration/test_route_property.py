"""Property: a statement routed by the shard-key predicates of its WHERE clause returns what
ONE database holding every row returns.

Routing to too FEW shards silently drops rows, the worst defect a router can have.  Here
hypothesis builds random WHERE clauses over a group's shard key (``==``, ``!=``, ``IN``
with duplicates, NULLs and empty lists, ``NOT IN``, ``BETWEEN`` with reversed bounds and
``SYMMETRIC``, ``<``/``<=``/``>``/``>=`` written either way round, ``IS [NOT] NULL``,
``bindparam`` values given at execution, the key compared with another column, with
``literal_column()`` and with a function, ``tuple_(a, b).in_()`` for a composite key, and
predicates on other columns, plain or as SQL text holding an ``OR``), combined with
``and_``/``or_``/``not_`` up to three levels deep, and runs each through a
``ShardedSession`` and on ONE plain database (``rp_oracle``, on shard s0's server) that
holds the same rows:

* ``select(Model).where(...)`` (ORM) and ``select(table).where(...)`` (Core): the same rows;
* ``select(count(*)).where(...)``: the same count;
* ``update()`` and ``delete()`` (ORM and Core, ``shardkit_all_shards=True`` so that a
  key-less one runs too) inside a transaction rolled back: the same ``rowcount``.

Groups (rows on every shard, rows whose key is NULL placed with ``scope(shard=...)``):
a hash group (``bigint`` key, values up to the int64 limits), a range group over an
``integer`` key with open ends, a range group over a ``date`` key, a list group over
``text`` with a default (values listed and not), and a composite hash key
(``bigint``, ``text``).

Runs with ``derandomize=True`` (the same examples every run, no example database);
``SHARDKIT_ROUTE_PROPERTY_EXAMPLES`` sets the number of examples per group (default 30;
a thorough run: 400).
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Integer,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.orm import DeclarativeBase, Session, aliased, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SHARDKIT_ROUTE_PROPERTY_EXAMPLES", "30"))


# ---------------------------------------------------------------------------
# Schema and configuration
# ---------------------------------------------------------------------------


class PBase(DeclarativeBase):
    pass


class HashRow(PBase):
    """hash group ``rph``: key ``k`` (bigint)."""
    __tablename__ = "rp_hash"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    k = mapped_column(BigInteger)
    k2 = mapped_column(BigInteger)
    v = mapped_column(Integer)


class RangeRow(PBase):
    """range group ``rpr``: key ``k`` (integer), open at both ends."""
    __tablename__ = "rp_range"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    k = mapped_column(Integer)
    k2 = mapped_column(Integer)
    v = mapped_column(Integer)


class DateRow(PBase):
    """range group ``rpd``: key ``k`` (date), open at both ends."""
    __tablename__ = "rp_date"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    k = mapped_column(Date)
    k2 = mapped_column(Date)
    v = mapped_column(Integer)


class ListRow(PBase):
    """list group ``rpl``: key ``k`` (text), a default shard for values not listed."""
    __tablename__ = "rp_list"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    k = mapped_column(Text)
    k2 = mapped_column(Text)
    v = mapped_column(Integer)


class CompRow(PBase):
    """hash group ``rpc``: composite key ``(a, b)`` (bigint, text)."""
    __tablename__ = "rp_comp"
    rid = mapped_column(Integer, primary_key=True, autoincrement=False)
    a = mapped_column(BigInteger)
    b = mapped_column(Text)
    a2 = mapped_column(BigInteger)
    v = mapped_column(Integer)


D0, D1, D2 = dt.date(2000, 1, 1), dt.date(2024, 1, 1), dt.date(2024, 7, 1)
CONFIG = {
    "groups": {
        "rph": {"strategy": "hash", "tables": {"rp_hash": "k"}},
        "rpr": {"strategy": "range", "tables": {"rp_range": "k"},
                "ranges": [{"to": -100, "shard": "s0"},
                           {"from": -100, "to": 0, "shard": "s1"},
                           {"from": 0, "to": 100, "shard": "s2"},
                           {"from": 100, "to": 1000, "shard": "s0"},
                           {"from": 1000, "shard": "s1"}]},
        "rpd": {"strategy": "range", "tables": {"rp_date": "k"},
                "ranges": [{"to": D0, "shard": "s2"},
                           {"from": D0, "to": D1, "shard": "s0"},
                           {"from": D1, "to": D2, "shard": "s1"},
                           {"from": D2, "shard": "s2"}]},
        "rpl": {"strategy": "list", "tables": {"rp_list": "k"},
                "values": {"s0": ["eu", "uk"], "s1": ["us", "ca"]}, "default": "s2"},
        "rpc": {"strategy": "hash", "tables": {"rp_comp": ["a", "b"]}},
    },
}

I64 = 2**63 - 1
I32 = 2**31 - 1
# Per group: the key values rows hold (and predicates compare with), boundaries first.
POOLS: dict[str, list[Any]] = {
    "hash": [0, 1, -1, 2, 3, 5, 7, 11, 42, 99, 1000, I32, -I32 - 1, I32 + 1, 10**12,
             I64, -I64 - 1, I64 - 1, -I64],
    "range": [-2**31, -1001, -101, -100, -99, -1, 0, 1, 50, 99, 100, 101, 999, 1000, 1001,
              I32, -I32 + 5],
    "date": [dt.date(1, 1, 1), dt.date(1999, 12, 31), D0, dt.date(2000, 1, 2),
             dt.date(2012, 6, 15), dt.date(2023, 12, 31), D1, dt.date(2024, 1, 2),
             dt.date(2024, 6, 30), D2, dt.date(2024, 7, 2), dt.date(9999, 12, 31)],
    "list": ["eu", "uk", "us", "ca", "br", "jp", "", "EU", "eu ", " eu", "\u00fc", "o'k"],
}
# Values predicates may compare with that no row holds (ints past int32 on an integer
# column: PostgreSQL compares them as bigint or numeric).
EXTRA: dict[str, list[Any]] = {
    "hash": [4, 6, -2, 123456789, I64 - 2],
    "range": [-102, 2, 98, 102, 998, 1002, 2**31, -2**31 - 1, 2**40, I64, -I64 - 1],
    "date": [dt.date(1998, 5, 5), dt.date(2023, 1, 1), dt.date(2024, 3, 3), dt.date(2030, 1, 1)],
    "list": ["fr", "de", "U", "e", "ue"],
}
# Bounds that are not integers, for an integer key compared with a value of its own type
# (a bindparam typed by the key column, given at execution; literal(v, Integer)):
# SQLAlchemy sends them cast to the column's type (``%(p)s::INTEGER``), which PostgreSQL
# rounds (99.5 -> 100).
FRACTIONS: dict[str, list[Any]] = {
    "hash": [decimal.Decimal("2.5"), 6.5, -0.5],
    "range": [decimal.Decimal("99.5"), decimal.Decimal("-100.5"), decimal.Decimal("0.5"),
              decimal.Decimal("999.5"), 99.5, 100.4, -100.6, 0.4, -0.5, 999.7, 1000.5],
    # Naive datetimes for a date key: compared as a literal, SQLAlchemy sends one as a
    # timestamp (the date is compared at its midnight); typed by the column, as ::DATE.
    "date": [dt.datetime(2023, 12, 31, 12), dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 1, 6),
             dt.datetime(2024, 6, 30, 23, 59), dt.datetime(1999, 12, 31, 18), dt.datetime(2000, 1, 1, 0, 0, 1)],
}
COMP_A = [0, 1, 2, -1, I64, -I64 - 1]
COMP_B = ["x", "y", "", "X", "x "]


@dataclass(frozen=True)
class Group:
    name: str          # key of POOLS, or "comp"
    model: Any


GROUPS = {g.name: g for g in (Group("hash", HashRow), Group("range", RangeRow),
                              Group("date", DateRow), Group("list", ListRow),
                              Group("comp", CompRow))}


# ---------------------------------------------------------------------------
# Fixture: the cluster and the one database, the same rows in both
# ---------------------------------------------------------------------------


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


def _rows() -> dict[Any, list[dict[str, Any]]]:
    """Rows for each table: every pool value once or twice (with ``k2`` equal to the key
    now and then, NULL now and then), and rows whose key (or part of it) is NULL."""
    out: dict[Any, list[dict[str, Any]]] = {}
    rid = 0
    for name in ("hash", "range", "date", "list"):
        pool = POOLS[name]
        rows = []
        for i, k in enumerate(pool):
            for j in range(1 + i % 2):
                rid += 1
                k2 = k if (i + j) % 3 == 0 else None if (i + j) % 3 == 1 else pool[(i * 7 + 3) % len(pool)]
                rows.append({"rid": rid, "k": k, "k2": k2, "v": None if (i + j) % 5 == 4 else (i * 3 + j) % 7})
        for j in range(3):  # NULL keys
            rid += 1
            rows.append({"rid": rid, "k": None, "k2": pool[j], "v": j})
        out[GROUPS[name].model] = rows
    rows = []
    for i, a in enumerate([*COMP_A, None]):
        for j, b in enumerate([*COMP_B, None]):
            if (i + j) % 3 == 2:
                continue
            rid += 1
            rows.append({"rid": rid, "a": a, "b": b, "a2": a if (i + j) % 2 else COMP_A[j % len(COMP_A)],
                         "v": None if (i * j) % 5 == 4 else (i + j) % 7})
    out[CompRow] = rows
    return out


def _keyless(model: Any, row: dict[str, Any]) -> bool:
    return row["a"] is None or row["b"] is None if model is CompRow else row["k"] is None


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=PBase.metadata)
    assert cluster.shard_names == ("s0", "s1", "s2")
    for s in cluster.shard_names:
        PBase.metadata.drop_all(cluster.primary(s))
        PBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS rp_oracle"))
        c.execute(text("CREATE DATABASE rp_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="rp_oracle"))
    PBase.metadata.create_all(oracle)
    e = Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    rows = _rows()
    with oracle.begin() as c:
        for m, rs in rows.items():
            c.execute(insert(m), rs)
    with e.Session() as s:
        for m, rs in rows.items():
            s.execute(insert(m), [r for r in rs if not _keyless(m, r)])
            # Rows without a key: one on each shard (verify reports them; reads see them).
            for i, r in enumerate(r for r in rs if _keyless(m, r)):
                with shardkit.scope(shard=cluster.shard_names[i % 3]):
                    s.execute(insert(m), [r])
        s.commit()
    # Every shard holds rows of every table, keyed and not: a route to too few shards
    # loses rows.
    with e.Session() as s:
        for m in rows:
            for shard in cluster.shard_names:
                n = s.execute(select(func.count()).select_from(m).execution_options(
                    shardkit_shard=shard)).scalar()
                assert n > 3, (m.__tablename__, shard, n)
        assert s.execute(select(func.count()).select_from(HashRow)).scalar() == len(rows[HashRow])
    yield e
    oracle.dispose()
    cluster.dispose()


# ---------------------------------------------------------------------------
# Predicates: plain data (hypothesis shrinks and prints it), built into SQL
# ---------------------------------------------------------------------------

CMP = ["lt", "le", "gt", "ge"]
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}


def _sql_literal(v: Any) -> str:
    if isinstance(v, dt.date):
        return f"DATE '{v.isoformat()}'"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return str(v)


def _leaves(name: str) -> st.SearchStrategy[tuple[Any, ...]]:
    if name == "comp":
        return _comp_leaves()
    vals = st.sampled_from(POOLS[name] + EXTRA[name])
    maybe = st.one_of(st.none(), vals)
    lists = st.lists(maybe, max_size=4)
    bounds = st.one_of(vals, st.sampled_from(FRACTIONS[name])) if name in FRACTIONS else vals
    return st.one_of(
        st.tuples(st.just("cmp_bind"), st.sampled_from(CMP), bounds),
        st.tuples(st.just("cmp_rev"), st.sampled_from(CMP), bounds),
        st.tuples(st.just("between_bind"), bounds, bounds),
        st.tuples(st.just("eq"), vals),
        st.tuples(st.just("eq_rev"), vals),
        st.tuples(st.just("ne"), vals),
        st.tuples(st.just("in"), lists),
        st.tuples(st.just("notin"), st.lists(vals, max_size=3)),
        st.tuples(st.just("between"), maybe, maybe),
        st.tuples(st.just("between_sym"), vals, vals),
        st.tuples(st.just("cmp"), st.sampled_from(CMP), bounds),
        st.tuples(st.just("cmp_bind"), st.sampled_from(CMP), maybe),
        st.tuples(st.just("isnull")),
        st.tuples(st.just("notnull")),
        st.tuples(st.just("eq_bind"), maybe),
        st.tuples(st.just("in_bind"), lists),
        st.tuples(st.just("eq_col")),
        st.tuples(st.just("cmp_col"), st.sampled_from(CMP)),
        st.tuples(st.just("eq_litcol"), vals),
        st.tuples(st.just("eq_func"), vals),
        st.tuples(st.just("func_key"), vals),
        *_other_leaves(),
    )


def _other_leaves() -> list[st.SearchStrategy[tuple[Any, ...]]]:
    small = st.integers(-1, 7)
    return [
        st.tuples(st.just("v"), st.sampled_from(["eq", "ne", *CMP]), small),
        st.tuples(st.just("v_null")),
        st.tuples(st.just("text_or"), small, small),   # "v = a OR v = b", unparenthesized
        st.tuples(st.just("text"), small),             # "v > a"
        st.tuples(st.just("const"), st.booleans()),
    ]


def _comp_leaves() -> st.SearchStrategy[tuple[Any, ...]]:
    part = st.sampled_from(["a", "b"])
    a_vals = st.sampled_from(COMP_A + [3, 4])
    b_vals = st.sampled_from(COMP_B + ["z"])
    pair = st.tuples(a_vals, b_vals)
    maybe_pair = st.tuples(st.one_of(st.none(), a_vals), st.one_of(st.none(), b_vals))
    return st.one_of(
        st.tuples(st.just("full"), a_vals, b_vals),
        st.tuples(st.just("full_bind"), st.one_of(st.none(), a_vals), b_vals),
        st.tuples(st.just("ceq"), st.just("a"), a_vals),
        st.tuples(st.just("ceq"), st.just("b"), b_vals),
        st.tuples(st.just("cne"), st.just("a"), a_vals),
        st.tuples(st.just("cne"), st.just("b"), b_vals),
        st.tuples(st.just("cin"), st.just("a"), st.lists(st.one_of(st.none(), a_vals), max_size=3)),
        st.tuples(st.just("cin"), st.just("b"), st.lists(st.one_of(st.none(), b_vals), max_size=3)),
        st.tuples(st.just("tin"), st.lists(maybe_pair, max_size=3)),
        st.tuples(st.just("teq"), pair),
        st.tuples(st.just("ccmp"), st.sampled_from(CMP), a_vals),
        st.tuples(st.just("cnull"), part),
        st.tuples(st.just("a_col")),
        *_other_leaves(),
    )


def predicates(name: str, depth: int = 3) -> st.SearchStrategy[Any]:
    leaf = _leaves(name)
    if depth == 0:
        return leaf
    sub = predicates(name, depth - 1)
    return st.one_of(
        leaf,
        st.tuples(st.just("and"), st.lists(sub, min_size=1, max_size=3)),
        st.tuples(st.just("or"), st.lists(sub, min_size=1, max_size=3)),
        st.tuples(st.just("not"), sub),
    )


class Builder:
    """Builds a predicate (plain data) into SQL over ``cols`` (a model's attributes or its
    table's columns); values given at execution go into ``params``."""

    def __init__(self, cols: Any) -> None:
        self.c = cols
        self.params: dict[str, Any] = {}

    def _bind(self, value: Any, **kw: Any) -> Any:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return bindparam(name, **kw)

    def build(self, p: tuple[Any, ...]) -> Any:
        kind, args = p[0], p[1:]
        if kind == "and":
            return and_(*(self.build(x) for x in args[0]))
        if kind == "or":
            return or_(*(self.build(x) for x in args[0]))
        if kind == "not":
            inner = self.build(args[0])
            if isinstance(inner, TextClause):  # (SQLAlchemy negates no text(): as a column)
                inner = literal_column(inner.text, Boolean)
            return not_(inner)
        return getattr(self, "_" + kind)(*args)

    # single-column keys
    def _eq(self, v: Any) -> Any: return self.c.k == v
    def _eq_rev(self, v: Any) -> Any: return literal(v, self.c.k.type) == self.c.k
    def _ne(self, v: Any) -> Any: return self.c.k != v
    def _in(self, vs: list[Any]) -> Any: return self.c.k.in_(vs)
    def _notin(self, vs: list[Any]) -> Any: return self.c.k.not_in(vs)
    def _between(self, lo: Any, hi: Any) -> Any: return self.c.k.between(lo, hi)
    def _between_sym(self, lo: Any, hi: Any) -> Any: return self.c.k.between(lo, hi, symmetric=True)
    def _cmp(self, op: str, v: Any) -> Any: return _OPS[op](self.c.k, v)
    def _cmp_rev(self, op: str, v: Any) -> Any: return _OPS[op](literal(v, self.c.k.type), self.c.k)
    def _cmp_bind(self, op: str, v: Any) -> Any: return _OPS[op](self.c.k, self._bind(v, type_=self.c.k.type))
    def _between_bind(self, lo: Any, hi: Any) -> Any:
        return self.c.k.between(self._bind(lo, type_=self.c.k.type), self._bind(hi, type_=self.c.k.type))
    def _isnull(self) -> Any: return self.c.k.is_(None)
    def _notnull(self) -> Any: return self.c.k.is_not(None)
    def _eq_bind(self, v: Any) -> Any: return self.c.k == self._bind(v, type_=self.c.k.type)
    def _in_bind(self, vs: list[Any]) -> Any: return self.c.k.in_(self._bind(vs, expanding=True))
    def _eq_col(self) -> Any: return self.c.k == self.c.k2
    def _cmp_col(self, op: str) -> Any: return _OPS[op](self.c.k, self.c.k2)
    def _eq_litcol(self, v: Any) -> Any: return self.c.k == literal_column(_sql_literal(v))
    def _eq_func(self, v: Any) -> Any: return self.c.k == func.coalesce(literal(v, self.c.k.type), self.c.k2)
    def _func_key(self, v: Any) -> Any: return func.coalesce(self.c.k, self.c.k2) == v

    # a composite key (a, b)
    def _full(self, a: Any, b: Any) -> Any: return and_(self.c.a == a, self.c.b == b)
    def _full_bind(self, a: Any, b: Any) -> Any:
        return and_(self.c.b == b, self.c.a == self._bind(a, type_=self.c.a.type))
    def _ceq(self, part: str, v: Any) -> Any: return getattr(self.c, part) == v
    def _cne(self, part: str, v: Any) -> Any: return getattr(self.c, part) != v
    def _cin(self, part: str, vs: list[Any]) -> Any: return getattr(self.c, part).in_(vs)
    def _tin(self, pairs: list[Any]) -> Any: return tuple_(self.c.a, self.c.b).in_(pairs)
    def _teq(self, pair: Any) -> Any: return tuple_(self.c.a, self.c.b) == tuple_(*pair)
    def _ccmp(self, op: str, v: Any) -> Any: return _OPS[op](self.c.a, v)
    def _cnull(self, part: str) -> Any: return getattr(self.c, part).is_(None)
    def _a_col(self) -> Any: return self.c.a == self.c.a2

    # other columns
    def _v(self, op: str, n: int) -> Any:
        return {"eq": lambda: self.c.v == n, "ne": lambda: self.c.v != n}.get(op, lambda: _OPS[op](self.c.v, n))()
    def _v_null(self) -> Any: return self.c.v.is_(None)
    def _text_or(self, a: int, b: int) -> Any: return text(f"v = {a} OR v = {b}")
    def _text(self, a: int) -> Any: return text(f"v > {a}")
    def _const(self, b: bool) -> Any: return true() if b else false()


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


def _where(model: Any, pred: Any, *, core: bool = False) -> tuple[Any, dict[str, Any]]:
    b = Builder(model.__table__.c if core else model)
    return b.build(pred), b.params


def _key_cols(model: Any) -> list[str]:
    return ["a", "b"] if model is CompRow else ["k"]


@dataclass
class Case:
    what: str
    stmt: Any
    params: dict[str, Any]
    result: str = "rows"         # rows (a multiset), scalar, rowcount, orm (objects)
    may_refuse: bool = False     # ScatterRefused is an answer too (never fewer rows)


def _cases(model: Any, pred: Any, variant: str) -> list[Case]:
    """The statements compared for ``pred``: the four basic ones, and one ``variant``."""
    table = model.__table__
    orm_w, orm_p = _where(model, pred)
    core_w, core_p = _where(model, pred, core=True)
    cases = [
        Case("orm select", select(model).where(orm_w), orm_p, "orm"),
        Case("core select", select(table).where(core_w), core_p),
        Case("count", select(func.count()).select_from(table).where(core_w), core_p, "scalar"),
        Case("orm update", update(model).where(orm_w).values(v=model.v + 100)
             .execution_options(synchronize_session=False), orm_p, "rowcount"),
        Case("core delete", delete(table).where(core_w), core_p, "rowcount"),
    ]
    if variant == "exists":
        cases.append(Case(variant, select(exists().where(core_w)), core_p, "scalar"))
    elif variant == "not exists":
        cases.append(Case(variant, select(not_(exists().where(core_w)).label("none")), core_p,
                          may_refuse=True))
    elif variant == "derived count":
        # Query.count()'s shape: the derived table's WHERE decides.
        cases.append(Case(variant, select(func.count()).select_from(
            select(model).where(orm_w).subquery()), orm_p, "scalar"))
    elif variant == "params()":
        # Values set on the statement, none at execution.
        cases.append(Case(variant, select(table).where(core_w).params(**core_p), {}))
    elif variant == "aliased":
        a = aliased(model)
        w, p = _where(a, pred)
        cases.append(Case(variant, select(a).where(w), p, "orm"))
    elif variant == "self-join on key":
        # The predicate on the joined alias: its key equals the selected rows'.
        a = aliased(model)
        w, p = _where(a, pred)
        on = and_(*(getattr(a, c) == getattr(model, c) for c in _key_cols(model)))
        cases.append(Case(variant, select(model.rid, a.rid).join(a, on).where(w), p, may_refuse=True))
    elif variant == "key in subquery":
        cols = [getattr(table.c, c) for c in _key_cols(model)]
        outer = cols[0] if len(cols) == 1 else tuple_(*cols)
        cases.append(Case(variant, select(table.c.rid).where(outer.in_(select(*cols).where(core_w))),
                          core_p, may_refuse=True))
    elif variant == "legacy query":
        cases.append(Case(variant, lambda s: s.query(model).filter(orm_w).params(**orm_p).all(), {}, "orm"))
        cases.append(Case(variant + " count",
                          lambda s: s.query(model).filter(orm_w).params(**orm_p).count(), {}, "scalar"))
    elif variant == "scalar subquery key":
        # key = (SELECT max(key) FROM ... WHERE pred): no value to route by.
        k = getattr(table.c, _key_cols(model)[0])
        sub = select(func.max(k)).where(core_w).scalar_subquery()
        cases.append(Case(variant, select(table.c.rid).where(k == sub), core_p, may_refuse=True))
    return cases


VARIANTS = ["exists", "not exists", "derived count", "params()", "aliased", "self-join on key",
            "key in subquery", "legacy query", "scalar subquery key"]


def _outcome(session: Session, case: Case, stmt: Any) -> Any:
    if callable(stmt):
        out = stmt(session)
        return sorted(tuple(getattr(o, c.key) for c in o.__table__.columns) for o in out) \
            if isinstance(out, list) else out
    params = case.params or None
    if case.result == "rowcount":
        try:
            return session.execute(stmt, params).rowcount
        finally:
            session.rollback()
    r = session.execute(stmt, params)
    if case.result == "scalar":
        return r.scalar_one()
    if case.result == "orm":
        return sorted(tuple(getattr(o, c.key) for c in o.__table__.columns) for o in r.scalars())
    return sorted(tuple(r))


def _tell(what: str, *, stat: bool = False) -> None:
    """A note (or an event in the statistics) when hypothesis runs the check."""
    if currently_in_test_context():
        (event if stat else note)(what)


def _key(row: tuple[Any, ...]) -> Any:
    return tuple((v is None, v) for v in row)


def _sharded(case: Case) -> Any:
    stmt = case.stmt
    if case.result == "rowcount":
        stmt = stmt.execution_options(shardkit_all_shards=True)
    return stmt


def check(env: Env, group: str, pred: Any, variant: str = "exists") -> None:
    model = GROUPS[group].model
    for case in _cases(model, pred, variant):
        what = case.what
        with Session(env.oracle) as s:
            try:
                want = _outcome(s, case, case.stmt)
            except DBAPIError as e:
                # A value the column's type cannot take (2**31 for an integer, sent as
                # ::INTEGER): the sharded statement must fail too, not answer.
                errors = (DBAPIError, shardkit.ShardKeyError, shardkit.ScatterError) + (
                    (shardkit.ScatterRefused,) if case.may_refuse else ())
                with env.Session() as s2, pytest.raises(errors):
                    _outcome(s2, case, _sharded(case))
                _tell(f"{what}: both refuse ({type(e.orig).__name__})")
                continue
        route = None
        if not callable(case.stmt) and case.result != "rowcount":
            try:
                route = env.cluster.explain(case.stmt, case.params or None)
            except shardkit.ScatterRefused:
                pass
        with env.Session() as s:
            try:
                got = _outcome(s, case, _sharded(case))
            except shardkit.ScatterRefused as e:
                if not case.may_refuse:
                    raise
                assert e.construct
                _tell(f"{what}: refused", stat=True)
                continue
        if what == "orm select":
            _tell(f"route {route.kind}, {'some' if want else 'no'} rows", stat=True)
        if isinstance(want, list):
            if Counter(got) != Counter(want):
                missing = Counter(want) - Counter(got)
                extra = Counter(got) - Counter(want)
                pytest.fail(f"{what} of {model.__tablename__} where {pred!r} {case.params}:\n"
                            f"route: {route}\nmissing: {sorted(missing, key=_key)}\n"
                            f"extra: {sorted(extra, key=_key)}", pytrace=False)
        else:
            assert got == want, (f"{what} of {model.__tablename__} where {pred!r} {case.params}: "
                                 f"sharded {got}, one database {want}; route: {route}")


@pytest.mark.parametrize("group", list(GROUPS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_routed_statements_return_what_one_database_returns(env, group, data):
    pred = data.draw(predicates(group), label="where")
    variant = data.draw(st.sampled_from(VARIANTS), label="variant")
    check(env, group, pred, variant)


# ---------------------------------------------------------------------------
# What the property found, minimised
# ---------------------------------------------------------------------------


def test_integer_key_between_values_typed_by_the_column_rounds_as_postgresql_does(env):
    """``k BETWEEN :lo AND :hi`` with bindparams typed by the key column, given
    ``Decimal("99.5")`` at execution: SQLAlchemy sends ``%(lo)s::INTEGER``, which PostgreSQL
    rounds to 100, so one database returns the row whose key is 100 (range [100, 1000), on
    s0).  The router compared 99.5 with the ranges and sent the read to s2 alone: the row
    was silently missing (also from the count, the UPDATE's and the DELETE's rowcount)."""
    half = decimal.Decimal("99.5")
    check(env, "range", ("between_bind", half, half), "exists")
    with env.Session() as s:
        got = s.scalars(select(RangeRow.k).where(RangeRow.k.between(
            bindparam("lo", type_=Integer), bindparam("hi", type_=Integer))), {"lo": half, "hi": half}).all()
    assert got == [100]


def test_integer_key_compared_with_an_untyped_bindparam_given_a_float(env):
    """``k BETWEEN 0 AND :hi`` (the bindparam takes the column's type) with ``hi=99.5``:
    PostgreSQL compares with 100 (a float8 cast to integer rounds half to even), and so must
    the route; ``k BETWEEN 100 AND literal(999.5, Integer)`` likewise holds 1000 (range
    [1000, ...), on s1), not only s0's [100, 1000)."""
    check(env, "range", ("between_bind", 50, 99.5), "derived count")
    with env.Session() as s:
        assert 100 in s.scalars(select(RangeRow.k).where(RangeRow.k.between(0, bindparam("hi"))),
                                {"hi": 99.5}).all()
        assert 1000 in s.scalars(select(RangeRow.k).where(
            RangeRow.k.between(100, literal(999.5, Integer)))).all()
        assert 1000 in s.scalars(select(RangeRow.k).where(
            RangeRow.k.between(100, bindparam("hi"))).params(hi=decimal.Decimal("999.5"))).all()


@pytest.mark.parametrize("op", CMP)
@pytest.mark.parametrize("when", [dt.datetime(2024, 1, 1, 6), dt.datetime(2023, 12, 31, 12), dt.datetime(2024, 1, 1)])
def test_date_key_compared_with_a_naive_datetime_routes_as_postgresql_compares(env, op, when):
    """A date key compared with a naive datetime: as a literal, SQLAlchemy sends it as a
    timestamp (``k < '2024-01-01 06:00'::TIMESTAMP`` holds the key 2024-01-01, at its
    midnight); typed by the column (a bindparam beside the key), as ``::DATE`` (the same
    comparison leaves it out).  The route must hold the shards of both readings (the range
    [2024-01-01, 2024-07-01) starts at the key in question); it was refused
    (ShardKeyError: a datetime cannot be compared with the date bounds)."""
    check(env, "date", ("cmp", op, when), "exists")
    check(env, "date", ("cmp_bind", op, when), "exists")
    check(env, "date", ("between_bind", when, dt.datetime(2024, 6, 30, 23)), "exists")
    check(env, "date", ("eq", when), "exists")
