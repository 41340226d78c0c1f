"""A key-less read over a subquery or CTE that groups (or is DISTINCT) by the shard key.

Every group of ``GROUP BY customer_id`` holds rows of one key value, which a hash, range or
list group places on one shard: each shard computes the subquery whole for its keys, and
the outer query merges as if the subquery were a table.  Each query below is compared with
ONE plain database holding every row (``check``/``check_or_refused`` of
``test_scatter_exact``): the same rows, with types and exact digits.

Before: every such query was refused ("the derived table ... has GROUP BY, which each shard
would apply to its own rows only").  Still refused, with that message: a subquery grouped
by anything that does not include the shard key of every group it reads (a non-key column
of a colocated child, the key of an outer join's optional side, ROLLUP of the key), an
aggregate without GROUP BY, a window function, LIMIT, DISTINCT without the key.
"""

from __future__ import annotations

import decimal
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    Text,
    create_engine,
    distinct,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, mapped_column, sessionmaker
from test_scatter import _distinct_on
from test_scatter_exact import (
    GROUPS,
    HBase,
    HItem,
    HLine,
    Hx,
    base_items,
    check,
    check_or_refused,
    exact,
)

import shardkit

pytestmark = pytest.mark.integration

D = decimal.Decimal
I, L = HItem, HLine
NOT_COLOCATED = "statement not colocated on the shard key"


class LBase(DeclarativeBase):
    pass


class Cust(LBase):
    """hash group ``lgc``, key id."""
    __tablename__ = "lg_customers"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tier = mapped_column(Integer)
    name = mapped_column(Text)


class Ord(LBase):
    """hash group ``lgc``, key customer_id (colocated with customers)."""
    __tablename__ = "lg_orders"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    customer_id = mapped_column(BigInteger)
    status = mapped_column(Integer)
    amount = mapped_column(Numeric(10, 2))


class Ev(LBase):
    """range group ``lge``, key tenant."""
    __tablename__ = "lg_events"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant = mapped_column(Integer)
    kind = mapped_column(Integer)
    v = mapped_column(Integer)


class Sale(LBase):
    """list group ``lgs``, key region."""
    __tablename__ = "lg_sales"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region = mapped_column(Text)
    store = mapped_column(Integer)
    amt = mapped_column(Integer)


class Store(LBase):
    """list group ``lgs``, key region (colocated with sales)."""
    __tablename__ = "lg_stores"
    region = mapped_column(Text)
    store = mapped_column(Integer)
    size = mapped_column(Integer)
    __table_args__ = (PrimaryKeyConstraint("region", "store"),)


class Ref(LBase):
    __tablename__ = "lg_ref"
    status = mapped_column(Integer, primary_key=True, autoincrement=False)
    label = mapped_column(Text)


CONFIG = {
    "groups": {
        **GROUPS["groups"],
        "lgc": {"strategy": "hash", "tables": {"lg_customers": "id", "lg_orders": "customer_id"}},
        "lge": {"strategy": "range", "tables": {"lg_events": "tenant"},
                "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "to": 200, "shard": "s1"},
                           {"from": 200, "shard": "s2"}]},
        "lgs": {"strategy": "list", "tables": {"lg_sales": "region", "lg_stores": "region"},
                "values": {"s0": ["eu", "uk"], "s1": ["us", "ca"]}, "default": "s2"},
    },
    "reference_tables": [*GROUPS["reference_tables"], "lg_ref"],
}


def _rows() -> dict[Any, list[dict[str, Any]]]:
    custs = [{"id": i, "tier": None if i % 7 == 3 else i % 3, "name": f"c{i % 5}"} for i in range(1, 41)]
    orders, oid = [], itertools.count(1)
    for c in custs:
        for j in range((c["id"] * 5) % 7):   # 0..6 orders (some customers have none)
            orders.append({"id": next(oid), "customer_id": c["id"], "status": (c["id"] + j) % 3,
                           "amount": None if (c["id"] + j) % 9 == 4 else D((c["id"] * 37 + j * 11) % 500) / 8})
    events, eid = [], itertools.count(1)
    for t in (*range(5, 300, 13), 99, 100, 199, 200):
        for j in range((t * 3) % 5 + 1):
            events.append({"id": next(eid), "tenant": t, "kind": (t + j) % 4, "v": None if j == 2 else (t * j) % 17})
    stores = [{"region": r, "store": s, "size": (len(r) * 7 + s) % 4}
              for r in ("eu", "uk", "us", "ca", "br", "jp") for s in range(1, 4)]
    sales = [{"id": i, "region": st["region"], "store": st["store"], "amt": (i * 29) % 41 - 9}
             for i, st in zip(range(1, 10**6), [x for x in stores for _ in range((x["store"] + x["size"]) % 4)])]
    refs = [{"status": s, "label": f"st{s}"} for s in range(3)]
    return {Cust: custs, Ord: orders, Ev: events, Sale: sales, Store: stores, Ref: refs}


@pytest.fixture(scope="module")
def lg(shardkit_module_cluster_factory) -> Iterator[Hx]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG})
    for s in cluster.shard_names:
        HBase.metadata.create_all(cluster.primary(s))
        LBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS lg_oracle"))
        c.execute(text("CREATE DATABASE lg_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="lg_oracle"))
    HBase.metadata.create_all(oracle)
    LBase.metadata.create_all(oracle)
    hx = Hx(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    # hx_items / hx_lines (hash group hx): the analytics report queries' data shape.
    items = base_items(hx, 45)
    lines = [{"item_id": r["id"], "no": j, "qty": (r["id"] * 3 + j) % 7 - 2, "name": f"n{(r['id'] + j) % 5}"}
             for r in items for j in range(r["id"] % 4)]
    hx.load(items, lines)
    rows = _rows()
    truncate_everywhere(cluster, *(m.__tablename__ for m in rows))
    with oracle.begin() as c:
        for m, rs in rows.items():
            c.execute(insert(m), rs)
    with hx.Session() as s:
        for m, rs in rows.items():
            s.execute(insert(m), rs)
        s.commit()
    # Every shard holds rows of every group, so a per-shard answer would differ.
    with hx.Session() as s:
        for m in (Ord, Ev, Sale):
            for shard in cluster.shard_names:
                assert s.execute(select(func.count()).select_from(m).execution_options(
                    shardkit_shard=shard)).scalar() > 0, (m, shard)
    yield hx
    oracle.dispose()
    cluster.dispose()


def refused(lg: Hx, stmt: Any) -> shardkit.ScatterRefused:
    with lg.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(stmt).all()
    return ei.value


# ---------------------------------------------------------------------------
# Hash: grouped by the key, in FROM (subquery and CTE), joined back, in WHERE
# ---------------------------------------------------------------------------

per = select(Ord.customer_id, func.count().label("n"), func.sum(Ord.amount).label("total")) \
    .group_by(Ord.customer_id)

EXACT_HASH = {
    "avg-max-of-counts": lambda: (lambda p: select(func.avg(p.c.n), func.max(p.c.n), func.min(p.c.n),
                                                   func.sum(p.c.total), func.avg(p.c.total)))(per.subquery()),
    "histogram": lambda: (lambda p: select(p.c.n, func.count()).group_by(p.c.n).order_by(p.c.n))(per.subquery()),
    "histogram-having-limit": lambda: (lambda p: select(p.c.n, func.count().label("k")).group_by(p.c.n)
                                       .having(func.count() > 1).order_by(func.count().desc(), p.c.n)
                                       .limit(3))(per.subquery()),
    "cte": lambda: (lambda c: select(func.avg(c.c.n), func.count()).where(c.c.n > 1))(per.cte("per")),
    "ordered-page": lambda: (lambda p: select(p.c.customer_id, p.c.n, p.c.total)
                             .order_by(p.c.total.desc().nulls_last(), p.c.customer_id)
                             .limit(7).offset(2))(per.subquery()),
    "having-inside": lambda: (lambda p: select(func.count(), func.sum(p.c.n)))(
        per.having(func.count() >= 3).subquery()),
    "joined-back-on-key": lambda: (lambda p: select(Cust.id, Cust.name, p.c.n)
                                   .join(p, p.c.customer_id == Cust.id).order_by(Cust.id))(per.subquery()),
    "outer-joined-back": lambda: (lambda p: select(Cust.tier, func.count(), func.sum(func.coalesce(p.c.n, 0)))
                                  .outerjoin(p, p.c.customer_id == Cust.id).group_by(Cust.tier)
                                  .order_by(Cust.tier.nulls_first()))(per.subquery()),
    "parent-key-with-child": lambda: (lambda p: select(func.max(p.c.n), func.count()))(
        select(Cust.id, func.count(Ord.id).label("n")).join(Ord, Ord.customer_id == Cust.id)
        .group_by(Cust.id).subquery()),
    "parent-key-outer-child": lambda: (lambda p: select(p.c.n, func.count()).group_by(p.c.n).order_by(p.c.n))(
        select(Cust.id, func.count(Ord.id).label("n")).outerjoin(Ord, Ord.customer_id == Cust.id)
        .group_by(Cust.id).subquery()),
    "key-and-other-columns": lambda: (lambda p: select(p.c.status, func.count(), func.avg(p.c.n))
                                      .group_by(p.c.status).order_by(p.c.status))(
        select(Ord.customer_id, Ord.status, func.count().label("n"))
        .group_by(Ord.status, Ord.customer_id).subquery()),
    "nested": lambda: (lambda p2: select(func.max(p2.c.top), func.sum(p2.c.top)))(
        (lambda p: select(p.c.customer_id, func.max(p.c.n).label("top")).group_by(p.c.customer_id).subquery())(
            select(Ord.customer_id, Ord.status, func.count().label("n"))
            .group_by(Ord.customer_id, Ord.status).subquery())),
    "reference-joined-inside": lambda: (lambda p: select(p.c.label, func.sum(p.c.n)).group_by(p.c.label)
                                        .order_by(p.c.label))(
        select(Ord.customer_id, Ref.label, func.count().label("n")).join(Ref, Ref.status == Ord.status)
        .group_by(Ord.customer_id, Ref.label).subquery()),
    "count-distinct-key-joined": lambda: (lambda p: select(func.count(distinct(Cust.id)))
                                          .join(p, p.c.customer_id == Cust.id).where(p.c.n > 2))(per.subquery()),
    "distinct-on-key": lambda: (lambda p: select(func.count(), func.sum(p.c.amount)))(
        _distinct_on(select(Ord.customer_id, Ord.amount), Ord.customer_id)
        .order_by(Ord.customer_id, Ord.amount.desc().nulls_last(), Ord.id).subquery()),
    "distinct-with-key": lambda: (lambda p: select(p.c.status, func.count()).group_by(p.c.status)
                                  .order_by(p.c.status))(
        select(Ord.customer_id, Ord.status).distinct().subquery()),
    "in-where-having": lambda: select(Cust.id).where(Cust.id.in_(
        select(Ord.customer_id).group_by(Ord.customer_id).having(func.count() > 3))).order_by(Cust.id),
    "in-where-over-grouped": lambda: (lambda p: select(Cust.id, Cust.name).where(
        Cust.id.in_(select(p.c.customer_id).where(p.c.n > 3))).order_by(Cust.id))(per.subquery()),
    "entity-columns-joined": lambda: (lambda p: select(Cust.__table__).join(p, p.c.customer_id == Cust.id)
                                      .where(p.c.n >= 4).order_by(Cust.id))(per.subquery()),
    # The analytics report queries' example over hx_lines (item_id: the shard key of group hx).
    "hx-per-item": lambda: (lambda s: select(func.avg(s.c.n), func.max(s.c.n), func.sum(s.c.s)))(
        select(L.item_id, func.count().label("n"), func.sum(L.qty).label("s")).group_by(L.item_id).subquery()),
    "hx-per-item-histogram": lambda: (lambda s: select(s.c.n, func.count()).group_by(s.c.n).order_by(s.c.n))(
        select(L.item_id, func.count().label("n")).group_by(L.item_id).subquery()),
    "hx-items-with-lines": lambda: (lambda s: select(I.grp, func.count(), func.sum(s.c.q)).join(s, s.c.id == I.id)
                                    .group_by(I.grp).order_by(I.grp.nulls_first()))(
        select(I.id, func.sum(L.qty).label("q")).join(L, L.item_id == I.id).group_by(I.id).subquery()),
}


@pytest.mark.parametrize("name", list(EXACT_HASH))
def test_subquery_grouped_by_the_hash_key_is_exact(lg, name):
    assert check_or_refused(lg, EXACT_HASH[name]()) is None


def test_analysts_examples(lg):
    """The two queries of the request, and the semi-join of customers with > 3 orders."""
    from sqlalchemy.orm import Session

    p = select(Ord.customer_id, func.count().label("n")).group_by(Ord.customer_id).subquery()
    want = check(lg, select(func.avg(p.c.n), func.max(p.c.n)))
    assert want[0][1] == ("int", 6)
    hist = check(lg, select(p.c.n, func.count()).group_by(p.c.n).order_by(p.c.n))
    assert len(hist) > 3
    many = select(Cust).where(Cust.id.in_(
        select(Ord.customer_id).group_by(Ord.customer_id).having(func.count() > 3))).order_by(Cust.id)
    with lg.Session() as s, Session(lg.oracle) as o:
        got = [(c.id, c.name) for c in s.scalars(many)]
        assert got == [(c.id, c.name) for c in o.scalars(many)] and got
        # ORM entities joined to the grouped subquery.
        joined = select(Cust).join(p, p.c.customer_id == Cust.id).where(p.c.n >= 4).order_by(Cust.id)
        got = [(c.id, c.tier) for c in s.scalars(joined)]
        assert got == [(c.id, c.tier) for c in o.scalars(joined)] and got


def test_query_count_of_a_query_grouped_by_the_key(lg):
    """``Query.count()`` counts its query as a subquery: grouped by the key, it is exact."""
    from sqlalchemy.orm import Session

    for build in (lambda s: s.query(Ord.customer_id).group_by(Ord.customer_id),
                  lambda s: s.query(Ord.customer_id, Ord.status).distinct(),
                  lambda s: s.query(Cust).join(Ord, Ord.customer_id == Cust.id).distinct()):
        with lg.Session() as s, Session(lg.oracle) as o:
            assert build(s).count() == build(o).count() > 0


def test_explain_says_the_subquery_is_computed_whole(lg):
    p = select(Ord.customer_id, func.count().label("n")).group_by(Ord.customer_id).subquery("per")
    route = lg.cluster.explain(select(func.avg(p.c.n)))
    assert route.is_scatter
    assert "'per' groups (or is DISTINCT) by the shard key: each shard computes it whole" in route.merge
    assert "aggregate merge of avg" in route.merge
    bad = select(Ord.status, func.count().label("n")).group_by(Ord.status).subquery("bad")
    with pytest.raises(shardkit.ScatterRefused, match="has GROUP BY"):
        lg.cluster.explain(select(func.avg(bad.c.n)))


# ---------------------------------------------------------------------------
# Range and list groups
# ---------------------------------------------------------------------------

per_tenant = select(Ev.tenant, func.count().label("n"), func.sum(Ev.v).label("sv")).group_by(Ev.tenant)
per_region = select(Sale.region, func.count().label("n"), func.sum(Sale.amt).label("s")).group_by(Sale.region)

EXACT_RANGE_LIST = {
    "range-avg-max": lambda: (lambda p: select(func.avg(p.c.n), func.max(p.c.n), func.avg(p.c.sv)))(
        per_tenant.subquery()),
    "range-histogram": lambda: (lambda p: select(p.c.n, func.count(), func.sum(p.c.sv)).group_by(p.c.n)
                                .order_by(p.c.n))(per_tenant.subquery()),
    "range-cte-per-kind": lambda: (lambda c: select(c.c.kind, func.count(), func.max(c.c.n)).group_by(c.c.kind)
                                   .order_by(c.c.kind))(
        select(Ev.tenant, Ev.kind, func.count().label("n")).group_by(Ev.tenant, Ev.kind).cte("tk")),
    "range-distinct-on": lambda: (lambda p: select(func.sum(p.c.v), func.count()))(
        _distinct_on(select(Ev.tenant, Ev.v), Ev.tenant).order_by(Ev.tenant, Ev.id.desc()).subquery()),
    "list-avg-max": lambda: (lambda p: select(func.avg(p.c.n), func.max(p.c.s), func.min(p.c.s)))(
        per_region.subquery()),
    "list-ordered": lambda: (lambda p: select(p.c.n, p.c.s).order_by(p.c.s.desc(), p.c.n))(per_region.subquery()),
    "list-colocated-join": lambda: (lambda p: select(p.c.size, func.count(), func.sum(p.c.s)).group_by(p.c.size)
                                    .order_by(p.c.size))(
        select(Store.region, Store.size, func.sum(Sale.amt).label("s"))
        .join(Sale, (Sale.region == Store.region) & (Sale.store == Store.store))
        .group_by(Store.region, Store.size).subquery()),
    "list-in-where": lambda: (lambda p: select(Store.store, Store.size).where(Store.region.in_(
        select(p.c.region).where(p.c.n > 3))).order_by(Store.store, Store.size))(per_region.subquery()),
}


@pytest.mark.parametrize("name", list(EXACT_RANGE_LIST))
def test_subquery_grouped_by_a_range_or_list_key_is_exact(lg, name):
    assert check_or_refused(lg, EXACT_RANGE_LIST[name](), ordered=not name.endswith("in-where")) is None


# ---------------------------------------------------------------------------
# Still refused, with the message as before
# ---------------------------------------------------------------------------

REFUSED = {
    "group-by-non-key": (lambda: (lambda p: select(func.avg(p.c.n)))(
        select(Ord.status, func.count().label("n")).group_by(Ord.status).subquery()), "has GROUP BY"),
    "group-by-non-key-of-colocated-child": (lambda: (lambda p: select(func.max(p.c.n)))(
        select(Ord.status, func.count().label("n")).join(Cust, Cust.id == Ord.customer_id)
        .group_by(Ord.status).subquery()), "has GROUP BY"),
    "group-by-parent-non-key-with-child": (lambda: (lambda p: select(func.max(p.c.n)))(
        select(Cust.tier, func.count(Ord.id).label("n")).join(Ord, Ord.customer_id == Cust.id)
        .group_by(Cust.tier).subquery()), "has GROUP BY"),
    "group-by-key-of-optional-side": (lambda: (lambda p: select(p.c.n, func.count()).group_by(p.c.n))(
        select(Ord.customer_id, func.count().label("n")).select_from(Cust)
        .outerjoin(Ord, Ord.customer_id == Cust.id).group_by(Ord.customer_id).subquery()), "has GROUP BY"),
    "group-by-expression-of-key": (lambda: (lambda p: select(func.max(p.c.n)))(
        select((Ord.customer_id % 2).label("k"), func.count().label("n")).group_by(Ord.customer_id % 2)
        .subquery()), "has GROUP BY"),
    "rollup-of-key": (lambda: (lambda p: select(func.sum(p.c.n)))(
        select(Ord.customer_id, func.count().label("n")).group_by(func.rollup(Ord.customer_id)).subquery()),
        "has GROUP BY"),
    "ungrouped-aggregate": (lambda: (lambda p: select(p.c.n))(
        select(func.count().label("n")).select_from(Ord).subquery()), "computes an aggregate"),
    "window-in-grouped": (lambda: (lambda p: select(func.max(p.c.r)))(
        select(Ord.customer_id, func.rank().over(order_by=func.count()).label("r"))
        .group_by(Ord.customer_id).subquery()), "computes an aggregate or window function"),
    "limit-in-grouped": (lambda: (lambda p: select(func.sum(p.c.n)))(per.limit(5).subquery()), "has LIMIT"),
    "distinct-without-key": (lambda: select(func.count()).select_from(
        select(Ord.status).distinct().subquery()), "has DISTINCT"),
    "range-group-by-non-key": (lambda: (lambda p: select(func.max(p.c.n)))(
        select(Ev.kind, func.count().label("n")).group_by(Ev.kind).subquery()), "has GROUP BY"),
    "list-group-by-non-key": (lambda: (lambda p: select(func.max(p.c.n)))(
        select(Sale.store, func.count().label("n")).group_by(Sale.store).subquery()), "has GROUP BY"),
    "uncorrelated-scalar-over-grouped": (lambda: select(Cust.id).where(
        Cust.tier < select(func.max(per.subquery().c.n)).scalar_subquery()), "not correlated"),
    "cross-join-grouped-without-key": (lambda: (lambda p: select(Cust.id, p.c.n))(
        select(func.count().label("n")).select_from(Ord).group_by(Ord.customer_id).subquery()),
        "not joined on the shard key"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_subqueries_not_grouped_by_the_key_stay_refused(lg, name):
    make, message = REFUSED[name]
    e = refused(lg, make())
    assert e.construct == NOT_COLOCATED, str(e)
    assert message in str(e), str(e)
    assert check_or_refused(lg, make()) == NOT_COLOCATED


def test_grouped_reference_subquery_alone_is_reference_rows(lg):
    """A reference table grouped alone is on every shard: read on one shard, as before (the
    shard-local rule is for sharded tables only)."""
    p = select(Ref.label, func.count().label("n")).group_by(Ref.label).subquery()
    with lg.Session() as s:
        rows = s.execute(select(p.c.label, p.c.n).order_by(p.c.label)).all()
    assert [tuple(exact(v) for v in r) for r in rows] == [(("str", f"st{i}"), ("int", 1)) for i in range(3)]
