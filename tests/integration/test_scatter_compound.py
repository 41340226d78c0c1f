"""Cross-shard UNION ALL / UNION, and coalesce() over a merged aggregate, against one database.

Every statement runs twice: through a ``ShardedSession`` on this module's own 3-shard
cluster, and on ONE plain database (``cp_oracle``, on shard s0's server) holding the
same rows.  Results are compared value by value with their types (1 != 1.0 != True,
1.50 != 1.5), in order where ORDER BY determines it, as multisets otherwise.  What
cannot be merged exactly must raise ``ScatterRefused`` naming the construct.
"""

from __future__ import annotations

import decimal
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    Numeric,
    Text,
    bindparam,
    create_engine,
    except_,
    func,
    insert,
    inspect,
    intersect,
    intersect_all,
    literal,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, aliased, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

D = decimal.Decimal


class CBase(DeclarativeBase):
    pass


class CItem(CBase):
    __tablename__ = "cp_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    name = mapped_column(Text)
    amt = mapped_column(Numeric(12, 2))


class CLine(CBase):
    """Colocated with cp_items (sharded by item_id)."""

    __tablename__ = "cp_lines"
    item_id = mapped_column(ForeignKey("cp_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)


class CRef(CBase):
    __tablename__ = "cp_ref"
    code = mapped_column(Integer, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


class COrder(CBase):
    """Another group (cpo): not colocated with cp_items."""

    __tablename__ = "cp_orders"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)


I, L, R, O = CItem, CLine, CRef, COrder
ITEM_COLS = [c.key for c in CItem.__table__.columns]
GROUPS = {
    "groups": {"cp": {"strategy": "hash", "tables": {"cp_items": "id", "cp_lines": "item_id"}},
               "cpo": {"strategy": "hash", "tables": {"cp_orders": "id"}}},
    "reference_tables": ["cp_ref"],
}


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    dev: Any

    def ids_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for("cp_items", k) == shard:
                out.append(k)
            k += 1
        return out

    def place(self, values: Sequence[dict[str, Any]], shards: Sequence[int],
              start: int = 1) -> list[dict[str, Any]]:
        """Row ``values[i]`` on shard ``s{shards[i]}`` (ids from ``start``)."""
        ids = {s: iter(self.ids_on(f"s{s}", list(shards).count(s), start)) for s in set(shards)}
        return [{c: None for c in ITEM_COLS} | {"id": next(ids[s]), **v} for s, v in zip(shards, values)]

    def load(self, items: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]] = (),
             refs: Sequence[dict[str, Any]] = ()) -> None:
        truncate_everywhere(self.cluster, "cp_items", "cp_lines", "cp_ref")
        with self.oracle.begin() as c:
            c.execute(text("TRUNCATE cp_items, cp_lines, cp_ref"))
            for model, rows in ((I, items), (L, lines), (R, refs)):
                if rows:
                    c.execute(insert(model.__table__), list(rows))
        with self.Session() as s:
            for model, rows in ((I, items), (L, lines), (R, refs)):
                if rows:
                    s.execute(insert(model), list(rows))
            s.commit()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=CBase.metadata)
    assert cluster.shard_names == ("s0", "s1", "s2")
    for s in cluster.shard_names:
        CBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS cp_oracle"))
        c.execute(text("CREATE DATABASE cp_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="cp_oracle"))
    CBase.metadata.create_all(oracle)
    yield Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle, dev)
    oracle.dispose()
    cluster.dispose()


def exact(v: Any) -> Any:
    if isinstance(v, D):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, CBase):
        return (type(v).__name__,) + tuple(exact(getattr(v, a.key)) for a in inspect(v).mapper.column_attrs)
    return (type(v).__name__, v)


def run(env: Env, stmt: Any, params: Any = None, *, sharded: bool) -> tuple[list[Any], list[Any]]:
    with (env.Session() if sharded else Session(env.oracle)) as s:
        r = s.execute(stmt, params)
        return list(r.keys()), [tuple(exact(v) for v in row) for row in r.all()]


def check(env: Env, stmt: Any, params: Any = None, *, ordered: bool = True) -> list[Any]:
    """Same column names and rows (in order if ``ordered``) as the one database."""
    want_keys, want = run(env, stmt, params, sharded=False)
    got_keys, got = run(env, stmt, params, sharded=True)
    assert got_keys == want_keys
    if ordered:
        assert got == want, f"\nsharded:      {got}\none database: {want}"
    else:
        assert Counter(got) == Counter(want), f"\nsharded:      {got}\none database: {want}"
    return want


def refused(env: Env, stmt: Any) -> shardkit.ScatterRefused:
    with Session(env.oracle) as s:   # a valid query for one database
        s.execute(stmt).all()
    with env.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(stmt).all()
    assert ei.value.construct
    return ei.value


def items(env: Env, empty_shard: int | None = 2) -> list[dict[str, Any]]:
    """Rows on every shard but ``empty_shard``, NULLs in every column, values repeated
    across shards (grp, qty, name)."""
    names = [None, "a", "B", "b", "", "zz"]
    values, where = [], []
    shards = [s for s in range(3) if s != empty_shard]
    for i in range(24):
        values.append({"grp": None if i % 5 == 3 else i % 3,
                       "qty": None if i % 7 == 2 else (i * 5) % 9 - 4,
                       "name": names[i % len(names)],
                       "amt": None if i % 6 == 1 else D(i * 37 % 50) / 4})
        where.append(shards[i % len(shards)])
    return env.place(values, where)


def lines_for(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"item_id": r["id"], "no": n, "qty": None if (r["id"] + n) % 4 == 0 else (r["id"] * n) % 7,
             "name": ["x", None, "a"][n % 3]} for r in rows[::2] for n in (1, 2)]


# ---------------------------------------------------------------------------
# UNION ALL
# ---------------------------------------------------------------------------


def test_union_all_concatenates_every_shards_rows(env):
    rows = items(env)
    env.load(rows, lines_for(rows))
    a = select(I.id, I.name).where(I.qty > 0)
    b = select(I.id, I.name).where(I.grp == 1)     # overlaps a: duplicates kept
    assert len(check(env, union_all(a, b), ordered=False)) > 8
    # parts over both colocated tables, three parts, nested UNION ALL
    c = select(L.item_id, L.name).where(L.qty.is_not(None))
    check(env, union_all(a, b, c), ordered=False)
    check(env, union_all(a, union_all(b, c)), ordered=False)
    # a part that matches no row, and a compound that matches none
    check(env, union_all(a, select(I.id, I.name).where(I.id < 0)), ordered=False)
    assert check(env, union_all(select(I.id).where(I.id < 0), select(L.item_id).where(L.no > 9))) == []


def test_union_all_order_by_nulls_limit_offset(env):
    rows = items(env)
    env.load(rows, lines_for(rows))
    a = select(I.id, I.name, I.qty).where(I.grp.is_not(None))
    b = select(L.item_id, L.name, L.qty)
    u = union_all(a, b)
    names = u.selected_columns
    orders = [
        (I.name, I.qty, I.id),
        (I.name.desc(), I.qty.desc(), I.id),
        (I.name.nulls_first(), I.qty.desc().nulls_last(), I.id.desc()),
        (I.qty.desc().nulls_last(), I.name.asc().nulls_first(), I.id),
        ("qty", "name", "id"),                            # by result column name
        (names.name.desc(), names.id, names.qty),          # the compound's own columns
        (I.qty, I.name, I.id),
    ]
    pages = [(None, None), (5, None), (5, 3), (None, 4), (100, 0), (0, 0), (3, 40)]
    for order in orders:
        for limit, offset in pages:
            stmt = u.order_by(*order)
            if limit is not None:
                stmt = stmt.limit(limit)
            if offset is not None:
                stmt = stmt.offset(offset)
            check(env, stmt)


def test_union_all_ordered_by_a_label_of_the_first_part(env):
    rows = items(env)
    env.load(rows)
    label = func.coalesce(I.name, "?").label("shown")
    u = union_all(select(I.id, label).where(I.qty > 0),
                  select(I.id, I.name).where(I.qty <= 0))
    check(env, u.order_by(label.desc(), I.id).limit(7).offset(2))
    check(env, u.order_by("shown", "id"))


def test_union_all_with_one_shard_holding_every_row_and_all_shards_empty(env):
    rows = items(env, empty_shard=None)
    env.load([r for r in rows if env.cluster.shard_for("cp_items", r["id"]) == "s1"])
    u = union_all(select(I.id, I.qty).where(I.qty > 0), select(I.id, I.qty).where(I.qty < 2))
    check(env, u.order_by(I.qty.desc(), I.id).limit(4))
    env.load([])
    assert check(env, u.order_by(I.qty, I.id).limit(4)) == []
    assert check(env, u) == []


def test_orm_entities_in_a_union_all_return_rows_as_on_one_database(env):
    rows = items(env)
    env.load(rows)
    u = union_all(select(I).where(I.qty > 0), select(I).where(I.name == "a"))
    check(env, u, ordered=False)
    check(env, u.order_by(I.amt.desc().nulls_first(), I.id).limit(6).offset(1))
    # Entities from the compound: aliased(Model, compound.subquery()) is a derived table
    # each shard would compute: refused, naming the UNION.
    entity = aliased(I, u.subquery())
    e = refused(env, select(entity).order_by(entity.id))
    assert "UNION" in str(e)
    # select(Model).from_statement(compound): refused (its rows are entities, which the
    # merge cannot order by).
    assert refused(env, select(I).from_statement(u)).construct == "FromStatement"


# ---------------------------------------------------------------------------
# UNION (distinct)
# ---------------------------------------------------------------------------


def test_union_removes_duplicates_across_shards(env):
    rows = items(env, empty_shard=None)
    env.load(rows, lines_for(rows))
    # grp/name values repeat on every shard; NULLs are one value for UNION
    a = select(I.grp, I.name).where(I.qty > -3)
    b = select(L.qty, L.name)
    got = check(env, union(a, b), ordered=False)
    assert len(got) == len(set(got))
    check(env, union(a, b).order_by(I.name.desc().nulls_last(), I.grp.nulls_first()))
    for limit, offset in ((3, None), (4, 2), (None, 5), (50, 1)):
        stmt = union(a, b).order_by(I.grp.desc(), I.name)
        stmt = stmt.limit(limit) if limit is not None else stmt
        check(env, stmt.offset(offset) if offset is not None else stmt)
    # a DISTINCT part, and a UNION ALL inside a UNION: all de-duplicated
    check(env, union(a.distinct(), union_all(b, select(I.grp, I.name))), ordered=False)
    check(env, union(select(I.amt), select(I.amt)).order_by(I.amt.nulls_first()))


def test_union_of_json_values_is_refused(env):
    env.load(items(env))
    j = func.to_jsonb(I.name, type_=JSONB)
    e = refused(env, union(select(j), select(j)))
    assert "UNION" in e.construct


def test_union_of_selects_from_different_groups(env):
    """Each part reads its own group's tables: every shard answers every part over its
    own rows, as for parts of one group (before, routing refused it as a join)."""
    rows = items(env)
    env.load(rows)
    orders = [{"id": k, "qty": None if k % 6 == 0 else k % 5 - 2, "name": [None, "a", "zz", "b"][k % 4]}
              for k in range(1, 31)]
    truncate_everywhere(env.cluster, "cp_orders")
    with env.oracle.begin() as c:
        c.execute(text("TRUNCATE cp_orders"))
        c.execute(insert(O), orders)
    with env.Session() as s:
        s.execute(insert(O), orders)
        s.commit()
    assert len({env.cluster.shard_for("cp_orders", o["id"]) for o in orders}) == 3
    a = select(I.id, I.name, I.qty).where(I.qty > -3)
    b = select(O.id, O.name, O.qty)
    check(env, union_all(a, b), ordered=False)
    check(env, union(a, b), ordered=False)
    for limit, offset in [(None, None), (7, 3), (100, 0), (4, 45)]:
        check(env, union_all(a, b).order_by("name", "qty", "id").limit(limit).offset(offset))
        check(env, union(a, b).order_by(a.selected_columns.qty.desc().nulls_last(), "id", "name")
              .limit(limit).offset(offset))
    check(env, union(select(I.name), select(O.name)).order_by("name"))
    check(env, union_all(select(I.id, I.name).where(I.id == rows[0]["id"]),
                         select(O.id, O.name).where(O.id == 7)), ordered=False)
    with env.Session() as s:
        route = env.cluster.explain(union_all(a, b))
        assert route.kind == "all" and "groups cp, cpo" in route.reason, route
    # Still refused: a part that joins the groups on no key, a part that aggregates.
    assert "not colocated" in str(refused(env, union_all(select(I.id), select(O.id).join(I, I.id == O.qty))))
    refused(env, union_all(select(func.count()).select_from(I), select(func.count()).select_from(O)))


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_compounds_that_cannot_be_merged_exactly_are_refused(env):
    rows = items(env)
    env.load(rows, lines_for(rows), [{"code": i, "name": f"r{i}"} for i in range(3)])
    a, b = select(I.id).where(I.qty > 0), select(I.id).where(I.grp == 1)
    cases = {
        "compound select INTERSECT": intersect(a, b),
        "compound select INTERSECT ALL": intersect_all(a, b),
        "compound select EXCEPT": except_(a, b),
        "UNION inside UNION ALL": union_all(a, union(a, b)),
        "UNION ALL part with aggregates": union_all(a, select(func.max(I.id))),
        "UNION part with aggregates": union(select(I.grp).group_by(I.grp), select(I.qty)),
        "UNION ALL part with LIMIT": union_all(a, b.order_by(I.id).limit(2)),
        "UNION ALL part with DISTINCT": union_all(a, select(I.grp).distinct()),
        "UNION ALL part without FROM": union_all(a, select(literal(7, BigInteger))),
        "nested UNION ALL with LIMIT": union_all(a, union_all(a, b).limit(3)),
        "window function": union_all(a, select(func.row_number().over(order_by=I.id))),
        "reference table rows across shards": union_all(a, select(R.code)),
    }
    for construct, stmt in cases.items():
        e = refused(env, stmt)
        assert e.construct == construct, (construct, e.construct, str(e))
    e = refused(env, union_all(a, select(R.code)))
    assert "part 2 of its UNION ALL" in str(e)
    # an aggregate of the application's in a part (looked up in pg_proc)
    ddl = ("CREATE OR REPLACE AGGREGATE cp_total(integer) (SFUNC = int4pl, STYPE = integer)")
    for engine in (env.oracle, *(env.cluster.primary(n) for n in env.cluster.shard_names)):
        with engine.begin() as c:
            c.execute(text(ddl))
    e = refused(env, union_all(select(func.cp_total(I.qty)), select(func.cp_total(L.qty))))
    assert e.construct == "cp_total()"
    # ORDER BY an expression, or a name that is not a result column: one database refuses
    # them too (with an error of its own)
    for stmt in (union_all(a, b).order_by(I.id * 2),
                 union_all(select(I.id, I.name.label("n")), select(I.id, I.name)).order_by(I.name)):
        with env.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
            s.execute(stmt)
        assert ei.value.construct == "ORDER BY of UNION ALL not on a result column"


def test_explain_describes_the_compound_merge(env):
    u = union(select(I.id, I.name), select(L.item_id, L.name)).order_by(I.name.desc(), I.id).limit(5)
    merge = env.cluster.explain(u).merge
    assert merge.startswith("UNION of 2 SELECTs, run whole on each shard; ordered merge on "
                            "name DESC NULLS FIRST, id ASC NULLS LAST, de-duplicated"), merge
    assert env.cluster.explain(intersect(select(I.id), select(L.item_id))).merge.startswith(
        "refused: INTERSECT")


def test_a_compound_with_a_parameter_given_at_execution(env):
    env.load(items(env))
    u = union_all(select(I.id, I.qty).where(I.qty > bindparam("lo")),
                  select(I.id, I.qty).where(I.name == bindparam("nm")))
    check(env, u.order_by(I.qty, I.id).limit(5), {"lo": 1, "nm": "b"})



# ---------------------------------------------------------------------------
# coalesce(<aggregate>, <constant>)
# ---------------------------------------------------------------------------


def test_coalesce_of_a_merged_aggregate(env):
    rows = items(env)          # s2 empty
    # a group whose amounts are all NULL, on two shards
    rows += env.place([{"grp": 9, "amt": None, "qty": None}, {"grp": 9, "amt": None, "qty": 3}], [0, 1],
                      start=1000)
    env.load(rows)
    aggs = (func.coalesce(func.sum(I.amt), 0), func.coalesce(func.sum(I.qty), 0),
            func.coalesce(func.max(I.name), ""), func.coalesce(func.min(I.amt), -1),
            func.coalesce(func.avg(I.amt), 0), func.coalesce(func.count(I.amt), 0),
            func.coalesce(func.sum(I.amt).filter(I.qty > 0), D("0.5")),
            func.coalesce(func.max(I.qty), None, 7))
    check(env, select(*aggs))
    check(env, select(*aggs).where(I.grp == 9))            # every aggregate NULL
    check(env, select(*aggs).where(I.id < 0))              # no row at all
    total = func.coalesce(func.sum(I.amt), 0)
    grouped = select(I.grp, total.label("total"), func.coalesce(func.avg(I.qty), -1).label("avg_qty"),
                     func.count()).group_by(I.grp)
    check(env, grouped, ordered=False)
    check(env, grouped.order_by(total.label("total").desc(), I.grp.nulls_first()))
    check(env, grouped.having(total > 2).order_by(I.grp).limit(2).offset(1))
    # a fallback given at execution
    fallback = select(I.grp, func.coalesce(func.sum(I.qty), bindparam("d", type_=Integer))).group_by(I.grp)
    check(env, fallback.order_by(I.grp), {"d": -5})


def test_coalesce_that_changes_the_aggregates_type_or_is_not_constant_is_refused(env):
    env.load(items(env))
    # sum(integer) is bigint, coalesce with 0.5 numeric: one database returns numeric
    e = refused(env, select(func.coalesce(func.sum(I.qty), D("0.5"))))
    assert e.construct == "coalesce() changing the aggregate's type"
    e = refused(env, select(I.grp, func.coalesce(func.max(I.qty), I.grp)).group_by(I.grp))
    assert e.construct == "expression over max()"
    e = refused(env, select(func.coalesce(func.sum(I.qty), func.max(I.id))))
    assert e.construct.startswith("expression over ")
    e = refused(env, select(func.coalesce(func.sum(I.qty), 0) + 1))
    assert e.construct == "expression over sum()"
    merge = env.cluster.explain(select(I.grp, func.coalesce(func.sum(I.amt), 0)).group_by(I.grp)).merge
    assert merge.startswith("group-by merge on 1 key(s) of value, coalesce(sum)"), merge


def test_compound_ordered_by_text_under_a_linguistic_collation(env):
    """A database ordering text by ICU's root locale: the merge's code-point order would
    mix it up, so ORDER BY text of a compound is refused; with COLLATE "C" it is exact."""
    cfg = {**env.dev.config_dict(), **GROUPS}
    for shard in cfg["shards"]:
        with env.dev.shard(shard["name"]).primary.connect() as c:
            c.execute("DROP DATABASE IF EXISTS cp_icu")
            c.execute("CREATE DATABASE cp_icu LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C' "
                      "TEMPLATE template0")
        shard["primary"] = shard["primary"].rsplit("/", 1)[0] + "/cp_icu"
    cluster = shardkit.Cluster.from_config(cfg, metadata=CBase.metadata)
    try:
        for name in cluster.shard_names:
            CBase.metadata.create_all(cluster.primary(name))
        icu = Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), env.oracle,
                  env.dev)
        rows = env.place([{"name": n, "qty": i} for i, n in enumerate(["b", "B", "a", "A", "é", "e", "Z"])],
                         [i % 3 for i in range(7)])
        env.load(rows)   # the oracle (C collation) and env's shards
        icu.load(rows)
        u = union_all(select(I.id, I.name).where(I.qty > 2), select(I.id, I.name).where(I.qty <= 2))
        for stmt in (u.order_by(I.name, I.id), u.order_by("name").limit(3), union(
                select(I.name), select(I.name)).order_by(I.name.desc())):
            with icu.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
                s.execute(stmt).all()
            assert ei.value.construct == "text under the database's collation"
        c_order = union_all(select(I.id, I.name.collate("C").label("name")).where(I.qty > 2),
                            select(I.id, I.name.collate("C")).where(I.qty <= 2))
        check(icu, c_order.order_by("name", "id").limit(5))
        check(icu, u, ordered=False)   # no ordering: nothing compared
    finally:
        cluster.dispose()
