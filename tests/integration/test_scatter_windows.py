"""Window functions in cross-shard (key-less) SELECTs, compared with ONE plain database
holding every row (``own_tables.one_database``).

A window partitioned by the one-column shard key of a hash, range or list group has every
row of each partition on one shard, so each shard computes its partitions whole and the
merge (ORDER BY, LIMIT/OFFSET, DISTINCT) works on exact rows.  Any other window (no
PARTITION BY, another column, a composite key's column, the key of an outer join's
optional side, a custom strategy's key) or a window beside GROUP BY / aggregates is
refused with ``ScatterRefused`` naming the construct: never a different answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import cluster_with_tables, keys_per_shard, one_database, take_turns, truncate_everywhere
from sqlalchemy import BigInteger, ForeignKey, Integer, Text, desc, exists, func, insert, select, text, union_all
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, aliased, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "wn_accts"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region = mapped_column(Text)


class Ord(Base):
    __tablename__ = "wn_orders"
    acct_id = mapped_column(ForeignKey("wn_accts.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)
    name = mapped_column(Text)


class Pair(Base):
    __tablename__ = "wn_pairs"
    a = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    b = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


class Note(Base):
    __tablename__ = "wn_notes"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    qty = mapped_column(Integer)


CONFIG = {"groups": {
    "wn": {"strategy": "hash", "tables": {"wn_accts": "id", "wn_orders": "acct_id"}},
    "wnp": {"strategy": "hash", "tables": {"wn_pairs": ["a", "b"]}},
    "wnr": {"strategy": "range", "tables": {"wn_notes": "id"},
            "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]},
}}


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as cluster:
        oracle = one_database(sharded_dev, "wn_oracle", Base.metadata)
        truncate_everywhere(cluster, "wn_orders", "wn_accts", "wn_pairs", "wn_notes")
        ids = take_turns(keys_per_shard(cluster, "wn_accts", 5))
        accts = [{"id": k, "region": ["eu", "us", None][i % 3]} for i, k in enumerate(ids)]
        # Accounts with no orders, and orders of equal qty (ties) and NULL qty.
        orders = [{"acct_id": k, "no": n, "qty": None if (i + n) % 7 == 3 else (i * 5 + n * 3) % 6,
                   "name": f"o{i}-{n}"} for i, k in enumerate(ids) for n in range(i % 4)]
        pairs = [{"a": i % 4, "b": i, "qty": i % 5} for i in range(20)]
        notes = [{"id": i * 97, "qty": i % 3} for i in range(20)]
        # An aggregate of the application's own: shardkit asks the database what it is.
        agg = ("CREATE OR REPLACE AGGREGATE wn_total(int) (sfunc = int4pl, stype = int)")
        with oracle.begin() as c:
            c.execute(text(agg))
            for model, rows in ((Acct, accts), (Ord, orders), (Pair, pairs), (Note, notes)):
                c.execute(insert(model.__table__), rows)
        for sh in cluster.shard_names:
            with cluster.primary(sh).begin() as c:
                c.execute(text(agg))
        Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        with Sess() as s:
            for model, rows in ((Acct, accts), (Ord, orders), (Pair, pairs), (Note, notes)):
                s.execute(insert(model), rows)
            s.commit()
        try:
            yield Env(cluster, Sess, oracle)
        finally:
            for sh in cluster.shard_names:
                with cluster.primary(sh).begin() as c:
                    c.execute(text("DROP AGGREGATE IF EXISTS wn_total(int)"))
            oracle.dispose()


def _shapes(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple((type(v).__name__, v) for v in r) for r in rows]


def outcome(env: Env, stmt: Any, ordered: bool) -> str:
    with Session(env.oracle) as s:
        want = _shapes(s.execute(stmt).all())
    try:
        with env.Session() as s:
            got = _shapes(s.execute(stmt).all())
    except shardkit.ScatterRefused as e:
        assert e.construct, "ScatterRefused must name the construct"
        return f"refused: {e.construct}"
    same = got == want if ordered else Counter(got) == Counter(want)
    return "exact" if same else f"WRONG\n sharded:      {got}\n one database: {want}"


rn = func.row_number().over(partition_by=Ord.acct_id, order_by=(Ord.qty.desc().nulls_last(), Ord.no))
running = func.sum(Ord.qty).over(partition_by=Ord.acct_id, order_by=Ord.no)
a2 = aliased(Ord)

# name -> (statement, ordered)
EXACT: dict[str, tuple[Any, bool]] = {
    "row_number-per-account": (select(Ord.acct_id, Ord.no, rn.label("rn")), False),
    "ordered-and-paged": (select(Ord.acct_id, Ord.no, rn.label("rn"))
                          .order_by(Ord.name).limit(5).offset(3), True),
    "order-by-the-window": (select(Ord.name, rn.label("rn")).order_by(desc("rn"), Ord.name), True),
    "order-by-an-unselected-window": (select(Ord.name).order_by(rn, Ord.name).limit(7), True),
    "running-sum": (select(Ord.acct_id, Ord.no, running.label("s")).order_by(Ord.acct_id, Ord.no), True),
    "aggregates-over-whole-partition": (select(
        Ord.name, func.count().over(partition_by=Ord.acct_id).label("n"),
        func.avg(Ord.qty).over(partition_by=Ord.acct_id).label("a"),
        func.max(Ord.qty).over(partition_by=(Ord.acct_id, Ord.no)).label("m")), False),
    "lag-lead-rank": (select(
        Ord.name, func.lag(Ord.qty).over(partition_by=Ord.acct_id, order_by=Ord.no).label("prev"),
        func.lead(Ord.no, 1, -1).over(partition_by=Ord.acct_id, order_by=Ord.no).label("next"),
        func.rank().over(partition_by=Ord.acct_id, order_by=Ord.qty).label("r"),
        func.percent_rank().over(partition_by=Ord.acct_id, order_by=Ord.qty).label("pr")), False),
    "key-second-in-partition-by": (select(
        Ord.name, func.count().over(partition_by=(Ord.qty, Ord.acct_id)).label("n")), False),
    "distinct-window-values": (select(func.count().over(partition_by=Ord.acct_id).label("n"))
                               .distinct().order_by(desc("n")), True),
    "joined-on-the-key": (select(Acct.region, Ord.no, func.row_number().over(
        partition_by=Acct.id, order_by=Ord.no).label("rn")).join(Ord, Ord.acct_id == Acct.id), False),
    "filtered": (select(Ord.name, rn.label("rn")).where(Ord.qty > 1), False),
    "range-group": (select(Note.id, func.sum(Note.qty).over(partition_by=Note.id).label("s")), False),
    "entity-beside-window": (select(Ord.name, running.label("s")).order_by(Ord.name), True),
    "own-aggregate-as-window": (select(Ord.name, func.wn_total(Ord.qty).over(
        partition_by=Ord.acct_id, order_by=Ord.no).label("t")), False),
    "exists-with-window": (select(exists(select(rn).where(Ord.qty > 4))), True),
}

# name -> (statement, the construct refused)
REFUSED: dict[str, tuple[Any, str]] = {
    "no-partition": (select(Ord.name, func.row_number().over(order_by=Ord.name)), "window function"),
    "partition-by-other-column": (select(Ord.name, func.count().over(partition_by=Ord.qty)),
                                  "window function"),
    "partition-by-key-expression": (select(Ord.name, func.count().over(partition_by=Ord.acct_id % 2)),
                                    "window function"),
    "partition-by-composite-key-part": (select(Pair.b, func.count().over(partition_by=Pair.a)),
                                        "window function"),
    "partition-by-composite-key": (select(Pair.b, func.count().over(partition_by=(Pair.a, Pair.b))),
                                   "window function"),
    "optional-side-key": (select(Acct.id, func.count(Ord.no).over(partition_by=Ord.acct_id))
                          .outerjoin(Ord, Ord.acct_id == Acct.id), "window function"),
    "self-join-off-key": (select(Ord.name, func.count().over(partition_by=Ord.acct_id))
                          .join(a2, a2.qty == Ord.qty), "statement not colocated on the shard key"),
    "beside-group-by": (select(Ord.acct_id, func.count(), func.rank().over(
        partition_by=Ord.acct_id, order_by=func.count())).group_by(Ord.acct_id),
        "window function with aggregates"),
    "beside-aggregate": (select(func.count(), func.sum(func.count()).over(partition_by=Ord.acct_id))
                         .group_by(Ord.acct_id), "window function with aggregates"),
    "own-aggregate-not-as-window": (select(func.wn_total(Ord.qty)), "wn_total()"),
    "in-union-all-part": (union_all(select(Ord.name, rn), select(Ord.name, rn)), "window function"),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_window_partitioned_by_the_shard_key_is_exact(env, name):
    stmt, ordered = EXACT[name]
    assert outcome(env, stmt, ordered) == "exact"


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_windows_are_refused(env, name):
    stmt, construct = REFUSED[name]
    assert outcome(env, stmt, False) == f"refused: {construct}"


def test_refusal_says_what_to_partition_by(env):
    with env.Session() as s, pytest.raises(shardkit.ScatterRefused) as info:
        s.execute(select(Ord.name, func.count().over(partition_by=Ord.qty)))
    msg = str(info.value)
    assert "wn_orders.qty is not a shard key" in msg and "partition it by the one-column shard key" in msg


def test_explain_plans_the_window_query(env):
    stmt = select(Ord.name, rn.label("rn")).order_by(Ord.name).limit(3)
    route = env.cluster.explain(stmt)
    assert route.kind == "all" and set(route.shards) == set(env.cluster.shard_names)
    assert route.merge is not None and route.merge.startswith("ordered merge"), route.merge
    refused = env.cluster.explain(select(Ord.name, func.count().over(partition_by=Ord.qty)))
    assert refused.merge is not None and refused.merge.startswith("refused"), refused.merge
