"""A grammar-based random query fuzzer for cross-shard reads.

The promise (README, "Cross-shard reads: parallel, merged exactly"): any SELECT through a
``ShardedSession`` returns exactly what one unsharded database holding every row returns
(same rows, same order where ORDER BY decides it, same types and digits), or raises a
shardkit error naming what it cannot do.  A silent difference is a bug.

``test_random_selects_match_one_database`` builds a few hundred random statements from a
small grammar (projections of columns, expressions and aggregates; WHERE with key
predicates, OR/NOT, IS NULL, IN/EXISTS/scalar subqueries; inner/left joins of colocated
and reference tables; GROUP BY/HAVING; DISTINCT and DISTINCT ON; ORDER BY with
directions, NULLS FIRST/LAST, expressions and labels; LIMIT/OFFSET; subqueries and CTEs
in FROM; UNION/UNION ALL; ORM entity queries and legacy ``Query``) with a fixed seed, and
runs each on this module's 3-shard cluster and on one plain database (``qf_oracle``)
holding the same rows.  Results are compared value by value with their types (1.50 !=
1.5, 1 != 1.0), in order when ORDER BY is total (a primary-key tiebreak is always added)
and as multisets otherwise; floats (double precision sums/averages only) with a relative
tolerance.  ``QUERYFUZZ_SEED`` / ``QUERYFUZZ_N`` change the seed / number of statements
(default 300, times ``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py) for a longer local hunt.

The plain tests below the fuzzer are the minimised cases it found.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    Numeric,
    Text,
    and_,
    bindparam,
    literal,
    tuple_,
    case,
    cast,
    create_engine,
    desc,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    not_,
    or_,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by, array

try:  # SQLAlchemy 2.1
    from sqlalchemy.dialects.postgresql import distinct_on
except ImportError:  # 2.0: select().distinct(expr)
    distinct_on = None
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import functions
from sqlalchemy.sql.elements import Label
from sqlalchemy.orm import (
    DeclarativeBase,
    Session,
    aliased,
    join as orm_join,
    mapped_column,
    relationship,
    selectinload,
    joinedload,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = dt.timezone.utc


# ---------------------------------------------------------------------------
# Schema: customers and their orders (one hash group), regions (reference)
# ---------------------------------------------------------------------------


class QBase(DeclarativeBase):
    pass


class Customer(QBase):
    __tablename__ = "qf_customers"
    id = mapped_column(Integer, primary_key=True, autoincrement=False)
    name = mapped_column(Text)
    city = mapped_column(Text)
    region = mapped_column(Text)
    score = mapped_column(Numeric(8, 2))
    signup = mapped_column(DateTime(timezone=True))
    vip = mapped_column(Boolean)
    tier = mapped_column(Integer)
    weight = mapped_column(Float)
    orders = relationship("Order", back_populates="customer", order_by="Order.id")


class Order(QBase):
    __tablename__ = "qf_orders"
    customer_id = mapped_column(ForeignKey("qf_customers.id"), primary_key=True)
    id = mapped_column(Integer, primary_key=True, autoincrement=False)
    amount = mapped_column(Numeric(10, 2))
    qty = mapped_column(Integer)
    status = mapped_column(Text)
    placed = mapped_column(DateTime(timezone=True))
    paid = mapped_column(Boolean)
    customer = relationship(Customer, back_populates="orders")


class Region(QBase):
    __tablename__ = "qf_regions"
    code = mapped_column(Text, primary_key=True)
    label = mapped_column(Text)
    rank = mapped_column(Integer)


C, O, R = Customer, Order, Region
GROUPS = {
    "groups": {"qf": {"strategy": "hash",
                      "tables": {"qf_customers": "id", "qf_orders": "customer_id"}}},
    "reference_tables": ["qf_regions"],
}

NAMES = [None, "", "ana", "Ana", "ANA", "bob", "Bob", "\u00e9lodie", "\u00c9lodie", "zo\u00eb",
         "Zo\u00eb", "o'hara", "a b", "\u00c5sa", "mar\u00eda", "Z"]
CITIES = [None, "Z\u00fcrich", "zurich", "Paris", "paris", "S\u00e3o Paulo", "Oslo", "\u00d6rebro", ""]
REGIONS = [None, "eu", "us", "ap", "xx", "EU"]
STATUSES = [None, "new", "paid", "shipped", "cancelled", "New", "r\u00e9gl\u00e9"]


def make_rows(seed: int = 8) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    ids = rng.sample(range(-40, 400), 64)
    customers, orders = [], []
    base = dt.datetime(2024, 1, 1, tzinfo=UTC)
    for n, cid in enumerate(ids):
        customers.append({
            "id": cid,
            "name": rng.choice(NAMES),
            "city": rng.choice(CITIES),
            "region": rng.choice(REGIONS),
            "score": None if rng.random() < 0.15 else D(rng.randint(-5000, 9999)) / 100,
            "signup": None if rng.random() < 0.1 else base + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 400)),
            "vip": rng.choice([None, True, False, False]),
            "tier": None if rng.random() < 0.2 else rng.randint(0, 4),
            "weight": None if rng.random() < 0.15 else rng.choice([rng.randint(-40, 40) / 8,
                                                                    rng.randint(0, 100) / 10, 1e-3]),
        })
        for k in range(rng.choice([0, 0, 1, 2, 3, 5])):
            orders.append({
                "customer_id": cid,
                "id": 1000 + len(orders) * 7 % 1000 + len(orders),
                "amount": None if rng.random() < 0.1 else D(rng.randint(0, 50000)) / 100,
                "qty": None if rng.random() < 0.15 else rng.randint(-2, 9),
                "status": rng.choice(STATUSES),
                "placed": None if rng.random() < 0.1 else base + dt.timedelta(hours=rng.randint(0, 24 * 300)),
                "paid": rng.choice([None, True, False]),
            })
    # NaN sorts above every number and equals itself in PostgreSQL (groups, DISTINCT)
    for n, row in enumerate(customers[5:11]):
        row["weight" if n % 2 else "score"] = float("nan") if n % 2 else D("NaN")
    regions = [{"code": "eu", "label": "Europe", "rank": 1}, {"code": "us", "label": "Americas", "rank": 2},
               {"code": "ap", "label": "Asia-Pac\u00edfic", "rank": 3}, {"code": "af", "label": None, "rank": None}]
    return customers, orders, regions


# ---------------------------------------------------------------------------
# Fixture, running and comparing
# ---------------------------------------------------------------------------


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    customers: list[dict[str, Any]]
    orders: list[dict[str, Any]]


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=QBase.metadata)
    for s in cluster.shard_names:
        QBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS qf_oracle"))
        c.execute(text("CREATE DATABASE qf_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="qf_oracle"))
    QBase.metadata.create_all(oracle)
    customers, orders, regions = make_rows()
    with oracle.begin() as c:
        c.execute(insert(Customer), customers)
        c.execute(insert(Order), orders)
        c.execute(insert(Region), regions)
    Session_ = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session_() as s:
        s.execute(insert(Customer), customers)
        s.execute(insert(Order), orders)
        s.execute(insert(Region), regions)
        s.commit()
    # every shard holds customers and orders, or the fuzz tests little
    for sh in cluster.shard_names:
        with cluster.primary(sh).connect() as c:
            assert c.execute(text("SELECT count(*) FROM qf_customers")).scalar_one() >= 10
            assert c.execute(text("SELECT count(*) FROM qf_orders")).scalar_one() >= 10
    yield Env(cluster, Session_, oracle, customers, orders)
    oracle.dispose()
    cluster.dispose()


def exact(v: Any) -> Any:
    """A value with its type and exact digits (1.50 != 1.5, 1 != 1.0 != True); floats
    rounded to 12 significant digits (their last bits depend on the order of addition)."""
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else float(f"{v:.12g}"))
    if isinstance(v, (dt.time, dt.datetime)):
        return (type(v).__name__, v.isoformat())
    if isinstance(v, QBase):
        return (type(v).__name__,) + tuple(exact(getattr(v, a.key)) for a in inspect(v).mapper.column_attrs)
    if isinstance(v, list):
        return ("list",) + tuple(exact(x) for x in v)
    return (type(v).__name__, v)


def norm(rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [tuple(exact(v) for v in r) for r in rows]


@dataclass
class Case:
    """A generated statement and how to run and compare it."""
    kind: str
    stmt: Any = None
    ordered: bool = False
    # for ORM legacy-Query cases: a function of a Session returning rows
    run: Callable[[Session], Sequence[Any]] | None = None
    sql: str = ""


def run_case(session: Session, case_: Case) -> tuple[list[str], list[tuple[Any, ...]]]:
    if case_.run is not None:
        out = case_.run(session)
        return [], norm(out)
    r = session.execute(case_.stmt)
    keys = list(r.keys())
    return keys, norm(r.all())


def describe(case_: Case) -> str:
    if case_.stmt is None:
        return case_.sql
    try:
        from sqlalchemy.dialects import postgresql
        return str(case_.stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    except Exception:  # noqa: BLE001 - best effort for the report
        return str(case_.stmt)


@dataclass
class Tally:
    ran: int = 0
    refused: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    kinds_refused: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)


def compare(env: Env, case_: Case, tally: Tally) -> None:
    tally.kinds[case_.kind] += 1
    try:
        with Session(env.oracle) as s:
            want_keys, want = run_case(s, case_)
    except DBAPIError as e:
        tally.invalid[type(e.orig).__name__] += 1
        if os.environ.get("QUERYFUZZ_SHOW_INVALID"):
            print("INVALID", str(e.orig).splitlines()[0], "\n ", describe(case_)[:300])
        return
    except Exception as e:  # noqa: BLE001 - SQLAlchemy refusing what the grammar built
        tally.invalid[f"{type(e).__name__}: {str(e)[:80]}"] += 1
        return
    try:
        with env.Session() as s:
            got_keys, got = run_case(s, case_)
    except shardkit.ShardkitError as e:
        name = getattr(e, "construct", None) or type(e).__name__
        tally.refused[f"{type(e).__name__}: {name}"] += 1
        tally.kinds_refused[case_.kind] += 1
        return
    except Exception as e:  # noqa: BLE001 - a crash is a finding too
        tally.mismatches.append(f"[{case_.kind}] CRASH {type(e).__name__}: {e}\n  {describe(case_)}")
        return
    tally.ran += 1
    same = got == want if case_.ordered else Counter(got) == Counter(want)
    if got_keys != want_keys:
        same = False
    if not same:
        tally.mismatches.append(
            f"[{case_.kind}] ordered={case_.ordered}\n  {describe(case_)}\n"
            f"  keys sharded={got_keys} one db={want_keys}\n"
            f"  sharded ({len(got)}): {str(got)[:600]}\n  one db  ({len(want)}): {str(want)[:600]}")


# ---------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------

INT, NUM, FLT, TXT, TS, BOOL = "int", "num", "float", "text", "ts", "bool"


@dataclass
class Src:
    """The FROM of a generated query: the tables (aliases) and what identifies a row."""
    froms: Any                      # the selectable for select_from
    cols: list[tuple[Any, str]]     # usable (expression, type) pairs
    pk: list[Any]                   # tiebreak making a row order total
    c: Any = None                   # the customers alias, if any
    o: Any = None                   # the orders alias, if any (None-able side of a left join too)
    r: Any = None
    keys: list[Any] = field(default_factory=list)   # shard key columns usable in WHERE
    o_optional: bool = False


class Gen:
    def __init__(self, rng: random.Random, customer_ids: list[int]) -> None:
        self.rng = rng
        self.ids = customer_ids
        self.n = 0

    # -- small helpers -----------------------------------------------------------------
    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.rng.choice(list(seq))

    def key_value(self) -> int:
        return self.pick(self.ids) if self.chance(0.85) else self.rng.randint(-50, 450)

    def label(self) -> str:
        self.n += 1
        return f"x{self.n}"

    # -- sources -------------------------------------------------------------------------
    def customer_cols(self, c: Any) -> list[tuple[Any, str]]:
        return [(c.id, INT), (c.name, TXT), (c.city, TXT), (c.region, TXT), (c.score, NUM),
                (c.signup, TS), (c.vip, BOOL), (c.tier, INT), (c.weight, FLT)]

    def order_cols(self, o: Any) -> list[tuple[Any, str]]:
        return [(o.customer_id, INT), (o.id, INT), (o.amount, NUM), (o.qty, INT), (o.status, TXT),
                (o.placed, TS), (o.paid, BOOL)]

    def source(self, allow_odd: bool = True) -> Src:
        c, o, r = aliased(Customer, name="c"), aliased(Order, name="o"), aliased(Region, name="r")
        shape = self.rng.choices(
            ["c", "o", "co", "c_lo", "cr", "c_lr", "cor", "odd"],
            weights=[5, 3, 4, 2, 2, 2, 2, 1 if allow_odd else 0])[0]
        if shape == "c":
            return Src(c, self.customer_cols(c), [c.id], c=c, keys=[c.id])
        if shape == "o":
            return Src(o, self.order_cols(o), [o.customer_id, o.id], o=o, keys=[o.customer_id])
        if shape in ("co", "c_lo"):
            outer = shape == "c_lo"
            j = orm_join(c, o, o.customer_id == c.id, isouter=outer)
            return Src(j, self.customer_cols(c) + self.order_cols(o), [c.id, o.id], c=c, o=o,
                       keys=[c.id] + ([] if outer else [o.customer_id]), o_optional=outer)
        if shape in ("cr", "c_lr"):
            j = orm_join(c, r, r.code == c.region, isouter=shape == "c_lr")
            return Src(j, self.customer_cols(c) + [(r.label, TXT), (r.rank, INT)], [c.id], c=c, r=r,
                       keys=[c.id])
        if shape == "cor":
            j = orm_join(orm_join(c, o, o.customer_id == c.id), r, r.code == c.region, isouter=True)
            return Src(j, self.customer_cols(c) + self.order_cols(o) + [(r.label, TXT), (r.rank, INT)],
                       [c.id, o.id], c=c, o=o, r=r, keys=[c.id, o.customer_id])
        # joins the merge cannot do exactly: not on the key, or a reference row preserved
        odd = self.pick(["not_key", "ref_outer", "self"])
        if odd == "not_key":
            j = orm_join(c, o, o.id % 50 == c.id)
            return Src(j, self.customer_cols(c) + self.order_cols(o), [c.id, o.customer_id, o.id], c=c, o=o,
                       keys=[c.id])
        if odd == "ref_outer":
            j = orm_join(r, c, r.code == c.region, isouter=True)
            return Src(j, [(r.code, TXT), (r.label, TXT), (r.rank, INT)] + self.customer_cols(c),
                       [r.code, c.id], c=c, r=r, keys=[])
        c2 = aliased(Customer, name="c2")
        j = orm_join(c, c2, c2.tier == c.tier)
        return Src(j, self.customer_cols(c) + [(c2.id, INT), (c2.name, TXT)], [c.id, c2.id], c=c,
                   keys=[c.id])

    # -- expressions ------------------------------------------------------------------
    def expr(self, src: Src) -> tuple[Any, str]:
        """A column or a row-level expression over ``src``."""
        col, t = self.pick(src.cols)
        if self.chance(0.6):
            return col, t
        if t == INT:
            return self.pick([(func.coalesce(col, -1), INT), (col * 2 + 1, INT), (col % 3, INT),
                              (func.abs(col), INT), (cast(col, Numeric(10, 1)), NUM)])
        if t == NUM:
            return self.pick([(col * 2, NUM), (func.round(col, 0), NUM), (func.abs(col), NUM),
                              (func.coalesce(col, 0), NUM),
                              (case((col > 10, "big"), (col.is_(None), "none"), else_="small"), TXT)])
        if t == FLT:
            return self.pick([(col * 2, FLT), (func.coalesce(col, 0.5), FLT)])
        if t == TXT:
            return self.pick([(func.lower(col), TXT), (func.upper(col), TXT), (func.length(col), INT),
                              (func.coalesce(col, "?"), TXT), (col + "!", TXT), (func.substr(col, 1, 2), TXT)])
        if t == TS:
            return self.pick([(func.date_trunc("month", col), TS), (col + dt.timedelta(days=1), TS)])
        return self.pick([(not_(col), BOOL), (func.coalesce(col, False), BOOL), (col.is_(True), BOOL)])

    def aggregate(self, src: Src) -> tuple[Any, str]:
        col, t = self.expr(src)
        roll = self.rng.random()
        if roll < 0.15:
            agg, at = func.count(), INT
        elif roll < 0.25:
            agg, at = func.count(col), INT
        elif roll < 0.40 and t in (INT, NUM, FLT):
            agg, at = func.sum(col), NUM if t != FLT else FLT
        elif roll < 0.52 and t in (INT, NUM, FLT):
            agg, at = func.avg(col), NUM if t != FLT else FLT
        elif roll < 0.70 and t != BOOL:
            agg, at = (func.min(col) if self.chance(0.5) else func.max(col)), t
        elif roll < 0.78:
            agg, at = func.count(col.distinct()), INT
        elif roll < 0.85 and t == BOOL:
            agg, at = (func.bool_and(col) if self.chance(0.5) else func.bool_or(col)), BOOL
        elif roll < 0.92 and t == TXT:
            agg, at = func.string_agg(col, aggregate_order_by(literal_column("','"), col)), TXT
        elif roll < 0.96 and src.c is not None:
            agg, at = func.coalesce(func.sum(src.c.id), 0), NUM
        else:
            agg, at = func.count() * 2, INT
        if self.chance(0.1) and isinstance(agg, functions.FunctionElement) and not isinstance(
                agg, functions.coalesce):
            agg = agg.filter(self.nonkey_pred(src))
        return agg, at

    def const_for(self, t: str) -> Any:
        if t == INT:
            return self.rng.randint(-3, 8)
        if t == NUM:
            return D(self.rng.randint(-2000, 9000)) / 100
        if t == FLT:
            return self.rng.randint(-20, 20) / 4
        if t == TXT:
            return self.pick(["ana", "Ana", "b", "\u00e9lodie", "m", "Z", "paid", "eu", ""])
        if t == TS:
            return dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(days=self.rng.randint(0, 400))
        return self.pick([True, False])

    def compare_pred(self, e: Any, t: str) -> Any:
        if t == BOOL:
            return self.pick([e.is_(True), e.is_(False), e.is_(None), e == self.const_for(t)])
        op = self.pick(["<", "<=", ">", ">=", "=", "!=", "null", "notnull"])
        v = self.const_for(t)
        return {"<": lambda: e < v, "<=": lambda: e <= v, ">": lambda: e > v, ">=": lambda: e >= v,
                "=": lambda: e == v, "!=": lambda: e != v, "null": lambda: e.is_(None),
                "notnull": lambda: e.is_not(None)}[op]()

    def key_pred(self, src: Src) -> Any:
        k = self.pick(src.keys)
        form = self.rng.choices(["eq", "in", "between", "range", "or_nonkey", "not", "isnull",
                                 "subq_scalar", "in_subq", "in_null", "bind", "sym", "not_or", "any",
                                 "in_empty"],
                                weights=[5, 5, 3, 2, 3, 2, 1, 1, 2, 1, 2, 1, 1, 1, 1])[0]
        if form == "eq":
            return k == self.key_value()
        if form == "bind":
            # a value given as a bound parameter with a default (routes by it)
            return k == bindparam(self.label(), self.key_value(), type_=Integer)
        if form == "sym":
            a, b = self.rng.randint(-50, 400), self.rng.randint(-50, 400)
            return k.between(a, b, symmetric=True)
        if form == "not_or":
            return not_(or_(k == self.key_value(), self.nonkey_pred(src)))
        if form == "any":
            return k == func.any(array([self.key_value() for _ in range(3)]))
        if form == "in_empty":
            return k.in_([])
        if form == "in":
            return k.in_([self.key_value() for _ in range(self.rng.randint(1, 5))])
        if form == "in_null":
            return k.in_([self.key_value(), None])
        if form == "between":
            a = self.rng.randint(-50, 400)
            return k.between(a, a + self.rng.randint(0, 120))
        if form == "range":
            return self.pick([k < self.key_value(), k >= self.key_value()])
        if form == "or_nonkey":
            return or_(k == self.key_value(), self.nonkey_pred(src))
        if form == "not":
            return not_(k.in_([self.key_value(), self.key_value()]))
        if form == "isnull":
            return self.pick([k.is_(None), k.is_not(None)])
        o2 = aliased(Order, name="o2")
        if form == "subq_scalar":
            return k == select(func.max(o2.customer_id)).where(o2.qty > self.rng.randint(0, 8)).scalar_subquery()
        return k.in_(select(o2.customer_id).where(o2.qty > self.rng.randint(0, 8)))

    def nonkey_pred(self, src: Src) -> Any:
        roll = self.rng.random()
        if roll < 0.12 and src.c is not None:
            o2 = aliased(Order, name="o3")
            e = exists(select(o2.id).where(o2.customer_id == src.c.id, o2.qty > self.rng.randint(-1, 8)))
            return e if self.chance(0.6) else ~e
        if roll < 0.20 and src.c is not None:
            r2 = aliased(Region, name="r2")
            return src.c.region.in_(select(r2.code).where(r2.rank <= self.rng.randint(1, 3)))
        if roll < 0.25 and src.c is not None:
            r2 = aliased(Region, name="r3")
            return src.c.tier < select(func.max(r2.rank)).scalar_subquery()
        if roll < 0.30 and src.c is not None:
            return self.pick([src.c.name.like("a%"), src.c.name.ilike("%A%"), src.c.city.ilike("%z%")])
        if roll < 0.33 and src.c is not None:
            o2 = aliased(Order, name="o4")
            return self.pick([
                exists(select(o2.id).where(o2.qty > self.rng.randint(5, 9))),
                src.c.tier.in_(select(o2.qty).where(o2.paid.is_(True))),
                src.c.id.not_in(select(o2.customer_id).where(o2.qty > 3)),
                src.c.tier == select(func.max(o2.qty)).where(o2.customer_id == src.c.id).scalar_subquery(),
                src.c.tier < select(func.count()).where(o2.qty == src.c.tier).scalar_subquery(),
            ])
        if roll < 0.35 and src.c is not None:
            return tuple_(src.c.tier, src.c.vip).in_([(1, True), (2, False), (0, None)])
        e, t = self.expr(src)
        return self.compare_pred(e, t)

    def where(self, src: Src) -> Any | None:
        preds = []
        for _ in range(self.rng.choices([0, 1, 2, 3], weights=[3, 4, 3, 1])[0]):
            preds.append(self.key_pred(src) if src.keys and self.chance(0.45) else self.nonkey_pred(src))
        if not preds:
            return None
        if len(preds) > 1 and self.chance(0.3):
            return or_(*preds)
        if self.chance(0.1):
            return not_(and_(*preds))
        return and_(*preds)

    def order_term(self, e: Any, force_nulls: bool = False) -> Any:
        term = e.desc() if self.chance(0.5) else e.asc()
        n = self.rng.random()
        if n < 0.3 or force_nulls:
            term = term.nulls_first() if self.chance(0.5) else term.nulls_last()
        return term

    def page(self, stmt: Any) -> Any:
        if self.chance(0.05):
            return stmt.limit(bindparam(self.label(), self.rng.randint(0, 12))).offset(
                bindparam(self.label(), self.rng.randint(0, 5)))
        if self.chance(0.35):
            stmt = stmt.limit(self.rng.randint(0, 12))
        if self.chance(0.25):
            stmt = stmt.offset(self.rng.randint(0, 8))
        return stmt

    # -- statement kinds ---------------------------------------------------------------
    def extra_column(self, src: Src) -> Any:
        o2 = aliased(Order, name="o5")
        choices = [literal("k"), literal(7)]
        if src.c is not None:
            choices += [select(func.count()).where(o2.customer_id == src.c.id).scalar_subquery(),
                        select(func.max(o2.amount)).where(o2.customer_id == src.c.id, o2.paid.is_(True))
                        .scalar_subquery(),
                        func.row_number().over(partition_by=src.c.id, order_by=src.pk),  # total within a partition
                        func.sum(src.c.score).over(partition_by=src.c.tier)]
        if src.o is not None and not src.o_optional:
            choices += [func.rank().over(partition_by=src.o.customer_id, order_by=(src.o.amount, src.o.id)),
                        func.count().over(partition_by=src.o.customer_id)]
        return self.pick(choices).label(self.label())

    def rows(self) -> Case:
        src = self.source()
        picked = [self.expr(src) for _ in range(self.rng.randint(1, 4))]
        if self.chance(0.15):
            picked.append((self.extra_column(src), INT))
        cols = []
        for e, _t in picked:
            cols.append(e.label(self.label()) if self.chance(0.4) else e)
        stmt = select(*cols).select_from(src.froms)
        w = self.where(src)
        if w is not None:
            stmt = stmt.where(w)
        if self.chance(0.2):
            # DISTINCT: order by every selected column (PostgreSQL asks for them in the list)
            stmt = stmt.distinct()
            if self.chance(0.7):
                stmt = stmt.order_by(*[self.order_term(c) for c in cols])
                return Case("rows-distinct", self.page(stmt), ordered=True)
            return Case("rows-distinct", stmt)
        if self.chance(0.75):
            terms = [self.order_term(self.expr(src)[0]) for _ in range(self.rng.randint(0, 2))]
            if cols and self.chance(0.2) and hasattr(cols[0], "name") and cols[0].name.startswith("x"):
                terms.insert(0, desc(cols[0].name) if self.chance(0.5) else cols[0].name)
            if self.chance(0.03):
                terms.insert(0, literal_column("1"))
            terms += [self.order_term(p) for p in src.pk]
            return Case("rows", self.page(stmt.order_by(*terms)), ordered=True)
        return Case("rows", stmt)

    def aggregates(self) -> Case:
        src = self.source()
        aggs = [self.aggregate(src)[0] for _ in range(self.rng.randint(1, 4))]
        stmt = select(*[a.label(self.label()) if self.chance(0.3) else a for a in aggs]).select_from(src.froms)
        w = self.where(src)
        if w is not None:
            stmt = stmt.where(w)
        if self.chance(0.1):
            stmt = stmt.offset(self.rng.randint(0, 1))
        return Case("aggregate", stmt, ordered=True)

    def grouped(self) -> Case:
        src = self.source()
        keys = []
        if src.keys and self.chance(0.4):
            keys.append((src.keys[0], INT))
        for _ in range(self.rng.randint(0 if keys else 1, 2)):
            keys.append(self.expr(src))
        gexprs = [e for e, _ in keys]
        aggs = [self.aggregate(src) for _ in range(self.rng.randint(1, 3))]
        labelled_g = [e.label(self.label()) if self.chance(0.3) else e for e in gexprs]
        labelled_a = [a.label(self.label()) if self.chance(0.3) else a for a, _ in aggs]
        stmt = select(*labelled_g, *labelled_a).select_from(src.froms).group_by(*gexprs)
        w = self.where(src)
        if w is not None:
            stmt = stmt.where(w)
        if self.chance(0.4):
            hs = []
            for _ in range(self.rng.randint(1, 2)):
                a, t = self.aggregate(src) if self.chance(0.5) else self.pick(aggs)
                if t == TXT and self.chance(0.5):
                    t, a = INT, func.count()
                if t in (INT, NUM) and self.chance(0.25):
                    v = self.const_for(t)
                    hs.append(self.pick([a.between(v, v + 3), a.in_([v, self.const_for(t)]),
                                         a.is_distinct_from(v), a + 1 > v]))
                else:
                    hs.append(self.compare_pred(a, t))
            h = or_(*hs) if self.chance(0.3) else and_(*hs)
            stmt = stmt.having(not_(h) if self.chance(0.1) else h)
        if self.chance(0.8):
            terms = []
            if self.chance(0.4):
                terms.append(self.order_term(self.pick(aggs)[0]))
            elif self.chance(0.15):
                terms.append(self.order_term(self.aggregate(src)[0]))
            named = [c.name for c in labelled_a if isinstance(c, Label)]
            if named and self.chance(0.3):
                n = self.pick(named)
                terms.insert(0, desc(n) if self.chance(0.5) else n)
            terms += [self.order_term(g) for g in gexprs]
            return Case("grouped", self.page(stmt.order_by(*terms)), ordered=True)
        return Case("grouped", stmt)

    def distinct_on(self) -> Case:
        src = self.source(allow_odd=False)
        on = src.keys[0] if src.keys and self.chance(0.4) else self.expr(src)[0]
        cols = [self.expr(src)[0] for _ in range(self.rng.randint(1, 3))]
        stmt = select(on.label("on_"), *cols, *src.pk).select_from(src.froms)
        stmt = stmt.ext(distinct_on(on)) if distinct_on is not None else stmt.distinct(on)
        w = self.where(src)
        if w is not None:
            stmt = stmt.where(w)
        stmt = stmt.order_by(on, *[self.order_term(p) for p in src.pk])
        return Case("distinct-on", self.page(stmt), ordered=True)

    def derived(self) -> Case:
        """A subquery or CTE in FROM: rows, or grouped by the key."""
        src = self.source(allow_odd=False)
        grouped_by_key = src.keys and self.chance(0.5)
        if grouped_by_key:
            k = src.keys[0]
            aggs = [self.aggregate(src)[0] for _ in range(self.rng.randint(1, 3))]
            inner = select(k.label("k"), *[a.label(f"a{i}") for i, a in enumerate(aggs)]).select_from(src.froms)
            inner = inner.group_by(k)
        elif self.chance(0.15):
            e = self.expr(src)[0]
            inner = select(e.label("k"), func.count().label("a0")).select_from(src.froms).group_by(e)
        else:
            cols = [self.expr(src)[0] for _ in range(self.rng.randint(1, 3))]
            inner = select(*[p.label(f"p{i}") for i, p in enumerate(src.pk)],
                           *[c.label(f"a{i}") for i, c in enumerate(cols)]).select_from(src.froms)
            if self.chance(0.1):
                inner = inner.order_by(*src.pk).limit(self.rng.randint(1, 20))
        w = self.where(src)
        if w is not None:
            inner = inner.where(w)
        sq = inner.cte(self.label()) if self.chance(0.4) else inner.subquery(self.label())
        outs = list(sq.c)
        if self.chance(0.5):
            aggs = []
            for _ in range(self.rng.randint(1, 3)):
                col = self.pick(outs)
                aggs.append(self.pick([func.count(), func.count(col), func.max(col), func.min(col),
                                       func.sum(col) if col.type._type_affinity in (Integer, Numeric, Float) else func.count(col)]))
            if self.chance(0.4):
                g = self.pick(outs)
                stmt = select(g, *aggs).group_by(g).order_by(self.order_term(g))
            else:
                stmt = select(*aggs)
            return Case("derived-agg", stmt, ordered=True)
        stmt = select(*outs)
        if self.chance(0.4):
            c = self.pick(outs)
            stmt = stmt.where(c.is_not(None))
        stmt = stmt.order_by(*[self.order_term(c, force_nulls=True) for c in outs])
        return Case("derived-rows", self.page(stmt), ordered=True)

    def compound(self) -> Case:
        c, o = aliased(Customer, name="c"), aliased(Order, name="o")
        parts = []
        for _ in range(self.rng.randint(2, 3)):
            if self.chance(0.5):
                src = Src(c, self.customer_cols(c), [c.id], c=c, keys=[c.id])
                part = select(c.id.label("i"), func.lower(c.name).label("t"), c.score.label("n"))
            else:
                src = Src(o, self.order_cols(o), [o.customer_id, o.id], o=o, keys=[o.customer_id])
                part = select(o.customer_id.label("i"), o.status.label("t"), o.amount.label("n"))
            w = self.where(src)
            if w is not None:
                part = part.where(w)
            parts.append(part)
        all_ = self.chance(0.5)
        stmt = (union_all if all_ else union)(*parts)
        kind = "union-all" if all_ else "union"
        if self.chance(0.7):
            stmt = stmt.order_by(*[self.order_term(stmt.selected_columns[n], force_nulls=True)
                                   for n in self.rng.sample(["i", "t", "n"], 3)])
            return Case(kind, self.page(stmt), ordered=True)
        return Case(kind, stmt)

    def exists_top(self) -> Case:
        src = self.source(allow_odd=False)
        inner = select(src.pk[0]).select_from(src.froms)
        w = self.where(src)
        if w is not None:
            inner = inner.where(w)
        return Case("exists", select(exists(inner)), ordered=True)

    def orm(self) -> Case:
        src = Src(Customer, self.customer_cols(Customer), [Customer.id], c=Customer, keys=[Customer.id])
        w = self.where(src)
        form = self.pick(["select", "select_join", "query", "count", "query_cols", "joined", "first",
                          "count_distinct", "count_join"])
        terms = [self.order_term(self.expr(src)[0]) for _ in range(self.rng.randint(0, 2))] + [Customer.id.desc()]
        if form == "select":
            stmt = select(Customer)
            if w is not None:
                stmt = stmt.where(w)
            stmt = self.page(stmt.order_by(*terms))
            if self.chance(0.3):
                stmt = stmt.options(selectinload(Customer.orders))
            return Case("orm-select", stmt, ordered=True)
        if form == "select_join":
            stmt = select(Customer, Order).join(Customer.orders)
            if w is not None:
                stmt = stmt.where(w)
            stmt = self.page(stmt.order_by(*terms, Order.id))
            return Case("orm-select-join", stmt, ordered=True)
        lim = self.rng.randint(1, 10) if self.chance(0.4) else None
        col = self.pick([Order.customer_id, Order.status, Order.qty])  # chosen here: run() runs twice

        def run(s: Session) -> Sequence[Any]:
            q = s.query(Customer)
            if w is not None:
                q = q.filter(w)
            if form == "count":
                return [(q.count(),)]
            if form == "count_join":
                return [(q.join(Customer.orders).filter(Order.qty > 2).count(),)]
            if form == "count_distinct":
                return [(s.query(col).filter(Order.amount > 100).distinct().count(),)]
            if form == "first":
                return [(q.order_by(*terms).first(),)]
            if form == "joined":
                got = q.options(joinedload(Customer.orders)).order_by(*terms).limit(lim or 5).all()
                return [(x, tuple(o.id for o in x.orders)) for x in got]
            if form == "query_cols":
                q2 = s.query(Customer.tier, func.count(Customer.id), func.max(Customer.score))
                if w is not None:
                    q2 = q2.filter(w)
                return q2.group_by(Customer.tier).order_by(Customer.tier.nulls_first()).all()
            q = q.order_by(*terms)
            if lim is not None:
                q = q.limit(lim)
            return [(x,) for x in q.all()]

        sql = f"legacy Query {form} where={w} order={terms} limit={lim}"
        return Case(f"orm-{form}", None, ordered=True, run=run, sql=sql)

    def statement(self) -> Case:
        make = self.rng.choices(
            [self.rows, self.aggregates, self.grouped, self.distinct_on, self.derived, self.compound,
             self.exists_top, self.orm],
            weights=[6, 3, 5, 0.5, 3, 2, 1, 2])[0]
        return make()


FUZZ_SEED = int(os.environ.get("QUERYFUZZ_SEED", "20241208"))
FUZZ_N = fuzz_size("QUERYFUZZ_N", 300)


def test_random_selects_match_one_database(env, capsys):
    gen = Gen(random.Random(FUZZ_SEED), [r["id"] for r in env.customers])
    tally = Tally()
    for _ in range(FUZZ_N):
        compare(env, gen.statement(), tally)
    with capsys.disabled():
        print(f"\nquery fuzz: seed {FUZZ_SEED}, {FUZZ_N} statements, {tally.ran} compared, "
              f"{sum(tally.refused.values())} refused, {sum(tally.invalid.values())} invalid SQL")
        print(f"  kinds: {dict(tally.kinds)}")
        print(f"  refused by kind: {dict(tally.kinds_refused)}")
        for reason, n in tally.refused.most_common():
            print(f"  refused {n:4d}: {reason}")
        for reason, n in tally.invalid.most_common():
            print(f"  invalid {n:4d}: {reason}")
    assert not tally.mismatches, f"{len(tally.mismatches)} mismatches:\n" + "\n\n".join(tally.mismatches[:8])
    # a generator that is mostly refused tests little
    assert tally.ran >= 0.6 * FUZZ_N, (tally.ran, tally.refused)


# ---------------------------------------------------------------------------
# Minimised cases from the fuzzer
# ---------------------------------------------------------------------------


def check(env: Env, stmt: Any, ordered: bool = True) -> list[tuple[Any, ...]]:
    """Same keys and rows (in order if ``ordered``) as the one database."""
    with Session(env.oracle) as s:
        want_keys, want = run_case(s, Case("check", stmt))
    with env.Session() as s:
        got_keys, got = run_case(s, Case("check", stmt))
    assert got_keys == want_keys
    if ordered:
        assert got == want
    else:
        assert Counter(got) == Counter(want)
    return want


def test_having_and_order_by_over_functions_of_two_entities(env):
    """A case from the fuzzer: a grouped read whose HAVING/ORDER BY term is a function of one
    entity (``max(Customer.score)``) while the select list holds a function of another
    (``lower(Order.status)``) crashed with ``AttributeError: __visit_name__``: SQLAlchemy's
    ``compare()`` of the two visits the ORM entities they were built from, and raises when
    they differ.  The merge must match terms by their SQL, and return the one database's
    groups."""
    low = func.lower(Order.status)
    base = select(low, func.max(Customer.score), func.count()).join(Order, Order.customer_id == Customer.id)
    assert check(env, base.group_by(low).order_by(func.max(Customer.score).desc().nulls_last(), low))
    assert check(env, base.group_by(low).having(func.max(Customer.score) > 50).order_by(low))
    c, o = aliased(Customer, name="c"), aliased(Order, name="o")
    low_o = func.lower(o.status)
    assert check(env, select(c.vip, low_o, func.max(func.length(c.name)))
                 .select_from(orm_join(c, o, o.customer_id == c.id, isouter=True))
                 .group_by(c.vip, low_o).having(func.max(func.length(c.name)) >= 3)
                 .order_by(func.max(func.length(c.name)).desc(), c.vip, low_o.nulls_first()))
    # a function of the same column through two entities is two columns: not merged as one
    assert check(env, select(func.lower(c.name), func.count()).select_from(c).join(Customer, Customer.id == c.id)
                 .group_by(func.lower(c.name)).order_by(func.lower(c.name).nulls_first()))


def test_joinedload_page_ordered_by_a_column_holding_nan(env):
    """A case from the fuzzer: ``query(Customer).options(joinedload(Customer.orders))
    .order_by(Customer.weight.desc().nulls_last(), Customer.id.desc()).limit(5)`` returned
    ONE customer where one database returns five.  Each shard's rows carry the sort value as
    an added column, and the ORM folds a parent's joined rows by the whole row: a NaN (a new
    float object in each row, unequal to itself) kept each of the first customer's five
    order rows apart, and the merged LIMIT 5 counted them as five parents."""

    def page(s: Session, stmt_style: bool, order: Sequence[Any]) -> list[tuple[Any, ...]]:
        if stmt_style:
            got = s.scalars(select(Customer).options(joinedload(Customer.orders))
                            .order_by(*order).limit(5).offset(1)).unique().all()
        else:
            got = s.query(Customer).options(joinedload(Customer.orders)).order_by(*order).limit(5).all()
        return [(x.id, repr(x.weight), repr(x.score), tuple(o.id for o in x.orders)) for x in got]

    orders = [[Customer.weight.desc().nulls_last(), Customer.id.desc()],
              [func.abs(Customer.score).desc().nulls_last(), Customer.id.desc()]]
    for order in orders:
        for stmt_style in (False, True):
            with Session(env.oracle) as s:
                want = page(s, stmt_style, order)
            with env.Session() as s:
                got = page(s, stmt_style, order)
            assert len(want) == 5
            assert got == want, (order, stmt_style)
    with Session(env.oracle) as s:
        first = page(s, False, orders[0])[0]
    assert first[1] == "nan" and len(first[3]) >= 2, "the page must start with a NaN parent of several children"
