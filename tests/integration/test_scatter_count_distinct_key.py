"""count(DISTINCT shard key) across shards.

Cross-shard reads refused every ``count(DISTINCT x)``: per-shard distinct counts do
not add up in general.  When ``x`` is the one-column shard key of a hash, range or list
group, every key value lives on one shard (during a move too: shardkit leaves out the
rows a shard does not own), so the shards' distinct sets are disjoint and their counts
add up, per group of GROUP BY as well.  ``select(func.count(distinct(Order.tenant_id)))``
over orders hashed by tenant_id is a common report.

Every statement runs through a ``ShardedSession`` on this module's 3-shard cluster and
on ONE plain database (``dk_oracle``) holding the same rows (as in
``test_scatter_exact``); results must be equal.  Composite keys, expressions of
the key, the key of an outer join's optional side, ``sum``/``avg(DISTINCT ...)``, a
custom strategy's key and non-key columns stay refused.  Unit tests of the planning sit
at the end (no database).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    and_,
    cast,
    create_engine,
    distinct,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, aliased, mapped_column, sessionmaker

import shardkit
from shardkit._scatter import plan_scatter
from test_reads_during_moves import (  # noqa: F401 - world is the fixture
    BUCKETS,
    Member,
    Moving,
    PausingMover,
    Purchase,
    _move_plan,
    truth,
    world,
)

pytestmark = pytest.mark.integration

# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


class DkBase(DeclarativeBase):
    pass


class Order(DkBase):
    __tablename__ = "dk_orders"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(Integer)            # the shard key (nullable: legacy rows)
    region = mapped_column(Text)
    status = mapped_column(Text)
    amount = mapped_column(Integer)


class Line(DkBase):
    """Colocated with dk_orders (sharded by tenant_id)."""

    __tablename__ = "dk_lines"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(Integer)
    sku = mapped_column(Text)
    qty = mapped_column(Integer)


class Region(DkBase):
    """A reference table."""

    __tablename__ = "dk_regions"
    region = mapped_column(Text, primary_key=True)
    zone = mapped_column(Text)


class Store(DkBase):
    """A list group keyed by country."""

    __tablename__ = "dk_stores"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    country = mapped_column(String(2))
    kind = mapped_column(Text)


class Event(DkBase):
    """A range group keyed by day."""

    __tablename__ = "dk_events"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    day = mapped_column(Integer)
    kind = mapped_column(Text)


class Pair(DkBase):
    """A hash group with a composite key (a, b)."""

    __tablename__ = "dk_pairs"
    a = mapped_column(Integer, primary_key=True, autoincrement=False)
    b = mapped_column(Integer, primary_key=True, autoincrement=False)
    c = mapped_column(Text)


class Legacy(DkBase):
    """A custom strategy's group."""

    __tablename__ = "dk_legacy"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    k = mapped_column(Integer)
    v = mapped_column(Text)


def legacy_shard(k: int) -> str:
    return f"s{k % 3}"


GROUPS = {
    "groups": {
        "tenants": {"strategy": "hash", "tables": {"dk_orders": "tenant_id", "dk_lines": "tenant_id"}},
        "stores": {"strategy": "list", "tables": {"dk_stores": "country"},
                   "values": {"s0": ["de", "fr"], "s1": ["us"], "s2": ["jp", "br"]}},
        "days": {"strategy": "range", "tables": {"dk_events": "day"},
                 "ranges": [{"to": 10, "shard": "s0"}, {"from": 10, "to": 20, "shard": "s1"},
                            {"from": 20, "shard": "s2"}]},
        "pairs": {"tables": {"dk_pairs": ["a", "b"]}},
        "legacy": {"strategy": "custom", "tables": {"dk_legacy": "k"}, "function": legacy_shard},
    },
    "reference_tables": ["dk_regions"],
}
MODELS = (Order, Line, Region, Store, Event, Pair, Legacy)
TABLES = [m.__tablename__ for m in MODELS]
O, L, R, S, E, P, G = MODELS


# ---------------------------------------------------------------------------
# Fixture and comparison helpers
# ---------------------------------------------------------------------------


@dataclass
class Dk:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine

    def tenants_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for("dk_orders", k) == shard:
                out.append(k)
            k += 1
        return out

    def load(self, rows: dict[Any, Sequence[dict[str, Any]]],
             unrouted: dict[str, Sequence[dict[str, Any]]] | None = None) -> None:
        """Replace every row of every table, on the shards and in the oracle; ``unrouted``:
        rows of dk_orders written straight to a shard's primary (NULL keys, which shardkit
        would refuse to place), and to the oracle."""
        truncate_everywhere(self.cluster, *TABLES)
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
            for model, rs in rows.items():
                if rs:
                    c.execute(insert(model.__table__), list(rs))
            for rs in (unrouted or {}).values():
                c.execute(insert(Order.__table__), list(rs))
        with self.Session() as s:
            for model, rs in rows.items():
                if rs:
                    s.execute(insert(model), list(rs))
            s.commit()
        for shard, rs in (unrouted or {}).items():
            with self.cluster.primary(shard).begin() as c:
                c.execute(insert(Order.__table__), list(rs))


@pytest.fixture(scope="module")
def dk(shardkit_module_cluster_factory) -> Iterator[Dk]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=DkBase.metadata)
    assert cluster.shard_names == ("s0", "s1", "s2")
    for s in cluster.shard_names:
        DkBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS dk_oracle"))
        c.execute(text("CREATE DATABASE dk_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="dk_oracle"))
    DkBase.metadata.create_all(oracle)
    yield Dk(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    oracle.dispose()
    cluster.dispose()


def run_oracle(dk: Dk, stmt: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with Session(dk.oracle) as s:
        r = s.execute(stmt)
        return list(r.keys()), [tuple((type(v).__name__, v) for v in row) for row in r.all()]


def run_sharded(dk: Dk, stmt: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with dk.Session() as s:
        r = s.execute(stmt)
        return list(r.keys()), [tuple((type(v).__name__, v) for v in row) for row in r.all()]


def check(dk: Dk, stmt: Any, *, ordered: bool = False) -> list[tuple[Any, ...]]:
    """Same column names and rows (in order if ``ordered``) as the one database."""
    want_keys, want = run_oracle(dk, stmt)
    got_keys, got = run_sharded(dk, stmt)
    assert got_keys == want_keys, stmt
    msg = f"\n{stmt}\nsharded:      {got}\none database: {want}"
    if ordered:
        assert got == want, msg
    else:
        assert Counter(got) == Counter(want), msg
    return want


def refused(dk: Dk, stmt: Any) -> shardkit.ScatterRefused:
    with pytest.raises(shardkit.ScatterRefused) as e, dk.Session() as s:
        s.execute(stmt).all()
    return e.value


REGIONS = ["eu", "us", "ap", None]


def data(dk: Dk, shards: Sequence[str] = ("s0", "s1", "s2")) -> dict[Any, list[dict[str, Any]]]:
    """Tenants on ``shards`` (4 each), each with several orders and lines; stores, events,
    pairs and legacy rows with repeated keys; two regions in the reference table."""
    tenants = [t for sh in shards for t in dk.tenants_on(sh, 4)]
    orders, lines = [], []
    for i, t in enumerate(tenants):
        for j in range(1 + i % 4):
            n = len(orders)
            orders.append({"id": n + 1, "tenant_id": t, "region": REGIONS[(i + j) % 4],
                           "status": ["open", "paid"][n % 2], "amount": (n * 37) % 50})
        for j in range(i % 3):
            lines.append({"id": len(lines) + 1, "tenant_id": t, "sku": f"k{j}", "qty": j + i % 5})
    countries = ["de", "fr", "us", "jp", "br"]
    shard_of = {"de": "s0", "fr": "s0", "us": "s1", "jp": "s2", "br": "s2"}
    stores = [{"id": i + 1, "country": c, "kind": ["shop", "outlet"][i % 2]}
              for i, c in enumerate(c for c in countries * 3 if shard_of[c] in shards)]
    days = [d for d in (1, 3, 3, 9, 12, 12, 15, 19, 25, 25, 40) if
            ("s0" if d < 10 else "s1" if d < 20 else "s2") in shards]
    events = [{"id": i + 1, "day": d, "kind": ["a", "b", "c"][i % 3]} for i, d in enumerate(days)]
    pairs = [{"a": a, "b": b, "c": "x"} for a in range(1, 5) for b in range(1, 4)]
    legacy = [{"id": i + 1, "k": i % 5, "v": "v"} for i in range(12)]
    refs = [{"region": "eu", "zone": "emea"}, {"region": "us", "zone": "amer"}]
    return {O: orders, L: lines, R: refs, S: stores, E: events, P: pairs, G: legacy}


def _per_shard_sum_differs(dk: Dk, stmt: Any) -> None:
    """Adding per-shard counts of a NON-key column's distinct values must differ from one
    database's: the data set can tell a wrong merge from a right one."""
    total = 0
    for shard in dk.cluster.shard_names:
        with dk.Session() as s:
            total += s.scalar(stmt.execution_options(shardkit_shard=shard))
    with Session(dk.oracle) as s:
        assert total != s.scalar(stmt)


# ---------------------------------------------------------------------------
# Merged exactly
# ---------------------------------------------------------------------------


def test_count_distinct_hash_key_matches_one_database(dk):
    """``count(DISTINCT orders.tenant_id)``, however spelt, alone, grouped by other columns,
    with HAVING and ORDER BY on it, with FILTER, in coalesce, over an alias, joined to a
    colocated table on the key or to a reference table."""
    dk.load(data(dk))
    _per_shard_sum_differs(dk, select(func.count(distinct(O.region))))
    OA = aliased(Order)
    ot = Order.__table__
    n_tenants = check(dk, select(func.count(distinct(O.tenant_id))))[0][0][1]
    assert n_tenants == 12
    for stmt in [
        select(func.count(O.tenant_id.distinct()).label("tenants")),
        select(func.count(func.distinct(O.tenant_id))),
        select(func.count(distinct(ot.c.tenant_id))),
        select(func.count(distinct(OA.tenant_id))),
        select(func.count(distinct(O.tenant_id)).filter(O.status == "paid")),
        select(func.coalesce(func.count(distinct(O.tenant_id)), 0)),
        select(func.count(distinct(O.tenant_id)), func.count(), func.sum(O.amount)),
        select(func.count(distinct(O.tenant_id))).where(O.amount > 20),
        # grouped by other columns: per group, the shards' counts still add up
        select(O.region, func.count(distinct(O.tenant_id))).group_by(O.region),
        select(O.region, O.status, func.count(distinct(O.tenant_id)).label("n"))
        .group_by(O.region, O.status),
        select(O.region, func.count(distinct(O.tenant_id)))
        .group_by(O.region).having(func.count(distinct(O.tenant_id)) > 3),
        select(O.region).group_by(O.region).having(func.count(distinct(O.tenant_id)) >= 5),
        select(O.status, func.count()).group_by(O.status)
        .having(and_(func.count(distinct(O.tenant_id)) > 1, func.count() > 2)),
        # joined to a colocated table on the key (either side's key), or to a reference table
        select(func.count(distinct(O.tenant_id))).join(L, L.tenant_id == O.tenant_id),
        select(L.sku, func.count(distinct(L.tenant_id))).select_from(O)
        .join(L, L.tenant_id == O.tenant_id).group_by(L.sku),
        select(func.count(distinct(O.tenant_id))).outerjoin(L, L.tenant_id == O.tenant_id),
        select(R.zone, func.count(distinct(O.tenant_id))).join(R, R.region == O.region).group_by(R.zone),
        # a key IN list split per shard
        select(func.count(distinct(O.tenant_id))).where(O.tenant_id.in_(dk.tenants_on("s1", 3)
                                                                         + dk.tenants_on("s2", 2))),
    ]:
        check(dk, stmt)
    for stmt in [
        select(O.region, func.count(distinct(O.tenant_id)).label("n"))
        .group_by(O.region).order_by(func.count(distinct(O.tenant_id)).desc(), O.region),
        select(O.region, func.count(distinct(O.tenant_id)).label("n"))
        .group_by(O.region).order_by(O.region.nulls_first()).limit(2).offset(1),
    ]:
        check(dk, stmt, ordered=True)


def test_count_distinct_list_and_range_keys(dk):
    """A list group's key (text) and a range group's key (integer), alone and grouped."""
    dk.load(data(dk))
    _per_shard_sum_differs(dk, select(func.count(distinct(S.kind))))
    for stmt in [
        select(func.count(distinct(S.country))),
        select(S.kind, func.count(distinct(S.country))).group_by(S.kind),
        select(func.count(distinct(E.day))),
        select(E.kind, func.count(distinct(E.day))).group_by(E.kind)
        .having(func.count(distinct(E.day)) > 2),
        select(func.count(distinct(E.day))).where(E.day.between(2, 30)),
    ]:
        check(dk, stmt)


def test_null_keys_are_not_counted(dk):
    """Legacy rows with a NULL tenant_id (written outside shardkit, on two shards): one
    database does not count NULL; neither does any shard, so the sum is still exact, also
    for a group whose only keys are NULL (0)."""
    rows = data(dk)
    nulls = {sh: [{"id": 1000 + i * 10 + j, "tenant_id": None, "region": r, "status": "open",
                   "amount": 1} for j, r in enumerate(["eu", "legacy"])]
             for i, sh in enumerate(("s1", "s2"))}
    dk.load(rows, unrouted=nulls)
    with dk.Session() as s:
        assert s.scalar(select(func.count()).select_from(O).where(O.tenant_id.is_(None))) == 4
    assert check(dk, select(func.count(distinct(O.tenant_id))))[0][0][1] == 12
    got = check(dk, select(O.region, func.count(distinct(O.tenant_id)), func.count())
                .group_by(O.region))
    assert (("str", "legacy"), ("int", 0), ("int", 2)) in got
    check(dk, select(O.region).group_by(O.region).having(func.count(distinct(O.tenant_id)) == 0))


def test_empty_shards_and_no_rows(dk):
    """Shard s2 holds no rows (its count is 0, its groups none); then no shard holds any:
    count is 0 and GROUP BY returns no group, as on one database."""
    dk.load(data(dk, shards=("s0", "s1")))
    with dk.Session() as s:
        assert s.scalar(select(func.count()).select_from(O).execution_options(shardkit_shard="s2")) == 0
    stmts = [
        select(func.count(distinct(O.tenant_id))),
        select(O.region, func.count(distinct(O.tenant_id))).group_by(O.region),
        select(func.count(distinct(S.country))),
        select(E.kind, func.count(distinct(E.day))).group_by(E.kind),
        select(func.coalesce(func.count(distinct(O.tenant_id)).filter(O.amount > 10**6), 0)),
    ]
    for stmt in stmts:
        check(dk, stmt)
    dk.load({})
    for stmt in stmts:
        check(dk, stmt)
    assert check(dk, stmts[0]) == [(("int", 0),)]


# ---------------------------------------------------------------------------
# Still refused
# ---------------------------------------------------------------------------


def test_shapes_that_stay_refused(dk):
    """Whatever adding up the shards' distinct counts would get wrong is refused, naming
    count(DISTINCT) and saying why; sum/avg(DISTINCT key) stay refused."""
    dk.load(data(dk))
    LA = aliased(Line)
    sub = select(O.tenant_id, O.region).where(O.amount > 0).subquery()
    cases = {
        "non-key column": (select(func.count(distinct(O.region))), "not a shard key"),
        "expression of the key": (select(func.count(distinct(O.tenant_id % 7))), "expression"),
        "function of the key": (select(func.count(distinct(func.abs(O.tenant_id)))), "expression"),
        "cast of the key": (select(func.count(distinct(cast(O.tenant_id, Text)))), "expression"),
        "key as SQL text": (select(func.count(literal_column("DISTINCT dk_orders.tenant_id")))
                            .select_from(O), "expression or SQL text"),
        "part of a composite key": (select(func.count(distinct(P.a))), "composite shard key"),
        "custom strategy's key": (select(func.count(distinct(G.k))), "strategy"),
        "key on the optional side": (select(func.count(distinct(L.tenant_id))).select_from(O)
                                     .outerjoin(L, L.tenant_id == O.tenant_id), "outer join"),
        "key of a nested optional side": (
            select(func.count(distinct(LA.tenant_id))).select_from(O)
            .outerjoin(Line.__table__.join(LA, LA.tenant_id == L.tenant_id), L.tenant_id == O.tenant_id),
            "outer join"),
        "key of a subquery": (select(func.count(distinct(sub.c.tenant_id))), "subquery"),
    }
    for name, (stmt, why) in cases.items():
        e = refused(dk, stmt)
        assert e.construct == "count(DISTINCT)", (name, e.construct, e)
        assert why in str(e), (name, str(e))
        assert "select the distinct values" in str(e), str(e)
    # the one database: these differ from a sum of the shards' distinct counts
    _per_shard_sum_differs(dk, select(func.count(distinct(P.a))))
    _per_shard_sum_differs(dk, select(func.count(distinct(G.k % 2))))
    for agg, construct in ((func.sum, "sum(DISTINCT)"), (func.avg, "avg(DISTINCT)")):
        assert refused(dk, select(agg(distinct(O.tenant_id)))).construct == construct
    # not colocated: the router's own refusal comes first
    with pytest.raises((shardkit.ScatterRefused, shardkit.RoutingError)), dk.Session() as s:
        s.execute(select(func.count(distinct(O.tenant_id))).join(L, L.id == O.id)).all()


def test_explain_names_the_merge(dk):
    """``Cluster.explain`` says how the counts merge, or why they are refused."""
    route = dk.cluster.explain(select(O.region, func.count(distinct(O.tenant_id))).group_by(O.region))
    assert route.merge == "group-by merge on 1 key(s) of value, count(DISTINCT shard key)", route.merge
    route = dk.cluster.explain(select(func.count(distinct(O.region))))
    assert route.merge.startswith("refused: count(DISTINCT ...)"), route.merge


# ---------------------------------------------------------------------------
# During a move (hash buckets): rows copied to the target are left out there
# ---------------------------------------------------------------------------


def test_count_distinct_key_while_buckets_move(world):
    """At every pause of a bucket move (copied: both shards hold the moving rows; switched:
    the source keeps leftovers) the merged count equals the owners' rows' distinct keys."""
    w = world
    plan, buckets = _move_plan(w, "s0", "s1", 3)
    Session = w.sessions("strong")
    stmts = {
        "purchases": (select(func.count(distinct(Purchase.member_id))),
                      lambda t: len({v[0] for v in t["purchases"].values()})),
        "members joined": (select(func.count(distinct(Member.id))).join(
            Purchase, Purchase.member_id == Member.id),
            lambda t: len({v[0] for v in t["purchases"].values()} & set(t["members"]))),
        "filtered": (
            select(func.count(distinct(Purchase.member_id))).where(Purchase.amount % 2 == 0),
            lambda t: len({v[0] for v in t["purchases"].values() if v[1] % 2 == 0})),
    }
    problems: list[str] = []
    run = Moving(PausingMover(w.admin, {"copied", "switched"}), plan)
    seen = []
    try:
        while (step := run.next_step()) is not None:
            seen.append(step)
            problems += w.sync_app()
            t = truth(w)
            assert any(shardkit.bucket_for(v[0], BUCKETS) in buckets for v in t["purchases"].values())
            for name, (stmt, want) in stmts.items():
                with Session() as s:
                    got = s.scalar(stmt)
                if got != want(t):
                    problems.append(f"{step}: {name}: {got}, expected {want(t)}")
            run.resume()
    finally:
        run.finish()
    assert not run.errors, run.errors
    assert "copied" in seen and "switched" in seen, seen
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# Planning (no database)
# ---------------------------------------------------------------------------

PLACEMENT = {"dk_orders": ("tenants", ("tenant_id",)), "dk_lines": ("tenants", ("tenant_id",)),
             "dk_stores": ("stores", ("country",)), "dk_pairs": ("pairs", ("a", "b")),
             "dk_legacy": ("legacy", ("k",))}
DISJOINT = frozenset({"tenants", "stores", "pairs"})


def _plan(stmt: Any) -> Any:
    return plan_scatter(stmt, {}, PLACEMENT.get, DISJOINT)


def test_plan_sums_the_shards_counts_per_group():
    shard_stmt, plan = _plan(select(O.region, func.count(distinct(O.tenant_id)))
                             .group_by(O.region).having(func.count(distinct(O.tenant_id)) > 1))
    assert plan.kind == "group"
    # (HAVING's count(DISTINCT ...) is the selected one, merged once)
    assert [(o.kind, o.distinct_key) for o in plan.outputs] == [("value", False), ("count", True)]
    assert "count(DISTINCT dk_orders.tenant_id)" in str(shard_stmt)
    assert "HAVING" not in str(shard_stmt)


def test_plan_without_placement_refuses_as_before():
    """plan_scatter without the tables' placement cannot know a shard key: refused."""
    with pytest.raises(shardkit.ScatterRefused) as e:
        plan_scatter(select(func.count(distinct(O.tenant_id))))
    assert e.value.construct == "count(DISTINCT)"


def test_plan_refuses_other_groups_and_custom_strategies():
    for stmt, why in [
        (select(func.count(distinct(G.k))), "strategy is not hash, range or list"),
        (select(func.count(distinct(O.tenant_id))).join(S, S.id == O.id), "groups stores"),
        (select(func.count(distinct(P.b))), "composite"),
    ]:
        with pytest.raises(shardkit.ScatterRefused) as e:
            _plan(stmt)
        assert why in str(e.value), str(e.value)


def test_plan_names_the_key_collation():
    """A key declared under a collation: its nondeterminism is asked of the database, as
    for GROUP BY ('a' and 'A' are two keys for shardkit, one value for the database)."""
    md_table = Store.__table__.c.country.type
    try:
        Store.__table__.c.country.type = String(2, collation="ci")
        plan = _plan(select(func.count(distinct(Store.__table__.c.country))))[1]
    finally:
        Store.__table__.c.country.type = md_table
    assert ("ci", "count(DISTINCT)") in plan.collations
