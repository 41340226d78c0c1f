"""Cross-shard UNION ALL / UNION that looked mergeable and were not.

Each query runs on the session's 3 x 1 cluster (``sharded_dev``) through a
``ShardedSession`` and on ONE database holding the same rows (schema ``scfe_oracle`` on
shard s0's primary, via ``schema_translate_map``); results are compared with their
types, or the query must be refused with ``ScatterRefused`` naming the construct.

* A compound nested in a compound (``a UNION ALL (b UNION ALL c)``): SQLAlchemy wraps it
  in a grouping, which the colocation check skipped: a nested part's uncorrelated
  subquery ran on each shard over that shard's rows only, and ``IN (a UNION ALL (b UNION
  ALL c))`` failed with an AttributeError.
* ``UNION``, ``DISTINCT`` and ``GROUP BY`` over text under a nondeterministic collation
  (case-insensitive ICU): one database holds 'a' and 'A' as one value, the merge kept both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    Text,
    func,
    insert,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

import shardkit
from test_scatter_compound import check, refused

pytestmark = pytest.mark.integration

ORACLE = "scfe_oracle"


class SBase(DeclarativeBase):
    pass


class Item(SBase):
    __tablename__ = "scfe_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    qty = mapped_column(Integer)
    name = mapped_column(Text)
    ci = mapped_column(String(20, collation="scfe_ci"))


class Line(SBase):
    """Colocated with scfe_items (sharded by item_id)."""

    __tablename__ = "scfe_lines"
    item_id = mapped_column(ForeignKey("scfe_items.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


I, L = Item, Line
TABLES = "scfe_lines, scfe_items"
GROUPS = {
    "groups": {"scfe": {"strategy": "hash", "tables": {"scfe_items": "id", "scfe_lines": "item_id"}}},
}


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine

    def place(self, values: Sequence[dict[str, Any]], shards: Sequence[int] | None = None
              ) -> list[dict[str, Any]]:
        """Rows ``values[i]`` on shard ``s{shards[i]}`` (default ``i % 3``), in id order."""
        names = self.cluster.shard_names
        where = [i % len(names) for i in range(len(values))] if shards is None else list(shards)
        out, k = [], 1
        pending = list(zip(where, values))
        while pending:
            shard = self.cluster.shard_for("scfe_items", k)
            for j, (s, v) in enumerate(pending):
                if names[s] == shard:
                    out.append({"id": k, **v})
                    del pending[j]
                    break
            k += 1
        return out

    def load(self, items: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]] = ()) -> None:
        cols = [c.key for c in Item.__table__.columns]
        items = [{c: r.get(c) for c in cols} for r in items]
        data = ((Item, items), (Line, list(lines)))
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).begin() as c:
                c.execute(text("SET LOCAL lock_timeout = '10s'"))
                c.execute(text(f"TRUNCATE {TABLES}"))
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(f'{ORACLE}.{t}' for t in TABLES.split(', '))}"))
            for model, rows in data:
                if rows:
                    c.execute(insert(model.__table__), rows)
        with self.Session() as s:
            for model, rows in data:
                if rows:
                    s.execute(insert(model), rows)
            s.commit()


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), **GROUPS},
                                           metadata=SBase.metadata)
    drop = f"DROP TABLE IF EXISTS {TABLES}"
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text(drop))
            c.execute(text("DROP COLLATION IF EXISTS scfe_ci"))
            c.execute(text("CREATE COLLATION scfe_ci (provider = icu, locale = 'und-u-ks-level2', "
                           "deterministic = false)"))
        SBase.metadata.create_all(cluster.primary(s))
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
        c.execute(text(f"CREATE SCHEMA {ORACLE}"))
    oracle = cluster.primary("s0").execution_options(schema_translate_map={None: ORACLE})
    SBase.metadata.create_all(oracle)
    yield Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                                    consistency="strong"), oracle)
    with cluster.primary("s0").begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {ORACLE} CASCADE"))
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(drop))
            c.execute(text("DROP COLLATION IF EXISTS scfe_ci"))
    cluster.dispose()


def test_a_nested_compound_is_checked_for_colocation_like_its_outer_parts(env):
    """Before: the nested part's ``qty = (SELECT max(qty) ...)`` was computed per shard, so
    every shard's own maximum matched, and more rows came back than one database returns."""
    rows = env.place([{"grp": i % 2, "qty": i} for i in range(9)])
    env.load(rows, [{"item_id": r["id"], "no": 1, "qty": r["qty"] % 4} for r in rows])
    a = select(I.id).where(I.qty > 6)
    top = select(I.id).where(I.qty == select(func.max(I.qty)).scalar_subquery())
    flat = refused(env, union_all(a, top))
    for stmt in (union_all(a, union_all(a, top)), union(a, union_all(top, a)),
                 union_all(union_all(a, top), a).order_by(I.id).limit(2)):
        assert refused(env, stmt).construct == flat.construct == \
            "statement not colocated on the shard key"
    with pytest.raises(shardkit.ScatterRefused):
        env.cluster.explain(union_all(a, union_all(a, top)))
    # nested parts correlated on the key, or without subqueries: merged as before
    check(env, union_all(a, union_all(a, select(I.id).where(I.grp == 1))), ordered=False)


def test_in_over_a_nested_compound(env):
    """Before: AttributeError ('SelectStatementGrouping' object has no attribute
    'get_final_froms') while routing, whatever the statement's shard key."""
    rows = env.place([{"grp": i % 3, "qty": i} for i in range(12)])
    env.load(rows, [{"item_id": r["id"], "no": n, "qty": (r["id"] + n) % 5 - 2}
                    for r in rows for n in (1, 2)])
    inner = union_all(select(L.item_id).where(L.item_id == I.id, L.qty > 1),
                      union_all(select(L.item_id).where(L.item_id == I.id, L.qty < -1),
                                select(L.item_id).where(L.item_id == I.id, L.no == 9)))
    check(env, select(I.id, I.qty).where(I.id.in_(inner)).order_by(I.id))
    check(env, select(I.id).where(I.id == rows[0]["id"], I.id.in_(inner)))
    # not correlated on the key: refused, as the same subquery without the nesting is
    loose = union_all(select(L.item_id).where(L.qty > 1),
                      union_all(select(L.item_id).where(L.qty < -1), select(L.item_id).where(L.no == 9)))
    assert refused(env, select(I.id).where(I.id.in_(loose))).construct == \
        "statement not colocated on the shard key"


def test_union_distinct_and_group_by_under_a_nondeterministic_collation_are_refused(env):
    """``scfe_items.ci`` is text under a case-insensitive ICU collation: one database's
    UNION/DISTINCT/GROUP BY see 'a' and 'A' as one value; the merge compared them in Python
    (before: 5 rows for one database's 3)."""
    env.load(env.place([{"ci": n, "name": n, "qty": i}
                        for i, n in enumerate(["a", "A", "b", "B", "a", "c"])]))
    with Session(env.oracle) as o:
        assert len(o.execute(union(select(I.ci), select(I.ci))).all()) == 3
    cases = {
        "UNION over a nondeterministic collation": union(select(I.ci), select(I.ci).where(I.qty > 2)),
        "DISTINCT over a nondeterministic collation": select(I.ci).distinct(),
        "GROUP BY over a nondeterministic collation": select(I.ci, func.count()).group_by(I.ci),
    }
    for construct, stmt in cases.items():
        assert refused(env, stmt).construct == construct
    # a collation given with .collate(), and the same under a deterministic collation or C
    assert refused(env, union(select(I.name.collate("scfe_ci")), select(I.name))).construct == \
        "UNION over a nondeterministic collation"
    check(env, union(select(I.name.collate("und-x-icu")), select(I.name)), ordered=False)
    check(env, select(I.ci.collate("C"), func.count()).group_by(I.ci.collate("C")), ordered=False)
