"""Tables, columns and schemas named as SQL makes hard: reserved words, mixed case, blanks,
dashes, dots, quotes, non-ASCII, 60+ characters, and a schema namesake of a public table,
through routing, scatter reads, `rebalance init`, a move, verify, status and migrate check.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own (test_schema_tables's World)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, MetaData, Table, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from test_schema_tables import World as SchemaWorld

from shardkit import rebalance
from shardkit._rebalance_plan import plan_drain
from shardkit._status import collect
from shardkit.errors import CrossShardWriteError, RebalanceError, ScatterRefused
from shardkit.verify import verify

pytestmark = pytest.mark.integration

LONG = "x" * 58


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def world(dev, tmp_path):
    made: list[SchemaWorld] = []

    def make(ddl: str, groups: dict[str, Any], reference: list[str] = (), init: bool = False) -> SchemaWorld:
        w = SchemaWorld(dev, tmp_path, ddl=ddl, groups=groups, reference=list(reference), init=init)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


AWKWARD_DDL = f"""
CREATE SCHEMA "Sales Team";
CREATE TABLE "order" (id bigint PRIMARY KEY, "user" bigint NOT NULL, "select" text);
CREATE TABLE "Sales Team"."order" (id bigint PRIMARY KEY, "user" bigint NOT NULL, "select" text);
CREATE TABLE "OrderItems" (id bigint PRIMARY KEY, "UserId" bigint NOT NULL, note text);
CREATE TABLE "order-items" (id bigint PRIMARY KEY, "group" bigint NOT NULL, "it's" text);
CREATE TABLE "commandes_été" (id bigint PRIMARY KEY, "clé" text NOT NULL);
CREATE TABLE {LONG}_one (id bigint PRIMARY KEY, k bigint NOT NULL);
CREATE TABLE {LONG}_two (id bigint PRIMARY KEY, k bigint NOT NULL);
CREATE TABLE "group" (code text PRIMARY KEY, "desc" text);
"""

AWKWARD_GROUPS = {
    "g": {"strategy": "hash", "tables": {"order": "user", "OrderItems": "UserId", "order-items": "group",
                                          f"{LONG}_one": "k", f"{LONG}_two": "k"}},
    "s": {"strategy": "hash", "tables": {"Sales Team.order": "user"}},
    "c": {"strategy": "hash", "tables": {"commandes_été": "clé"}},
}

md = MetaData()
t_order = Table("order", md, Column("id", BigInteger, primary_key=True), Column("user", BigInteger),
                Column("select", Text))
t_sales = Table("order", md, Column("id", BigInteger, primary_key=True), Column("user", BigInteger),
                Column("select", Text), schema="Sales Team")
t_items = Table("OrderItems", md, Column("id", BigInteger, primary_key=True), Column("UserId", BigInteger),
                Column("note", Text))
t_dash = Table("order-items", md, Column("id", BigInteger, primary_key=True), Column("group", BigInteger),
               Column("it's", Text))
t_fr = Table("commandes_été", md, Column("id", BigInteger, primary_key=True), Column("clé", Text))
t_one = Table(f"{LONG}_one", md, Column("id", BigInteger, primary_key=True), Column("k", BigInteger))
t_two = Table(f"{LONG}_two", md, Column("id", BigInteger, primary_key=True), Column("k", BigInteger))
t_group = Table("group", md, Column("code", Text, primary_key=True), Column("desc", Text))

N = 30


class B(DeclarativeBase):
    pass


class Order(B):
    """``order`` mapped with attributes named apart from its reserved-word columns."""

    __tablename__ = "order"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    owner: Mapped[int] = mapped_column("user", BigInteger)
    sel: Mapped[str] = mapped_column("select", Text, nullable=True)


def _fill(w: SchemaWorld) -> None:
    with w.Session() as s:
        s.execute(t_group.insert(), [{"code": "a", "desc": "A"}])
        s.execute(t_order.insert(), [{"id": i, "user": i, "select": f"o{i}"} for i in range(N)])
        s.execute(t_sales.insert(), [{"id": i, "user": i, "select": f"s{i}"} for i in range(N)])
        s.execute(t_items.insert(), [{"id": 100 + i, "UserId": i, "note": "n"} for i in range(N)])
        s.execute(t_dash.insert(), [{"id": 200 + i, "group": i, "it's": "x"} for i in range(N)])
        s.execute(t_fr.insert(), [{"id": i, "clé": f"k{i}"} for i in range(N)])
        s.execute(t_one.insert(), [{"id": i, "k": i} for i in range(N)])
        s.execute(t_two.insert(), [{"id": i, "k": i} for i in range(N)])
        s.commit()


def _world(world):
    return world(AWKWARD_DDL, AWKWARD_GROUPS, reference=["group"])


def test_quoted_names_route_move_and_verify(world):
    """Reserved words, mixed case, blanks, dashes, quotes, non-ASCII and 60+ character names
    (their guard functions derived apart), and a schema namesake of a public table: the
    guard, reads, a drain of s0, verify and status act on each table and move every row."""
    w = _world(world)
    rebalance.init(w.cluster)
    _fill(w)
    tables = [t_order, t_sales, t_items, t_dash, t_fr, t_one, t_two]
    with w.Session() as s:
        for t in tables:
            assert s.scalar(select(func.count()).select_from(t)) == N, t
        assert s.execute(select(t_order.c.select).where(t_order.c.user == 5)).scalar() == "o5"
        assert s.execute(select(t_sales.c.select).where(t_sales.c.user == 5)).scalar() == "s5"
        assert s.get(Order, 7).sel == "o7"
        assert [o.id for o in s.scalars(select(Order).where(Order.owner.in_([3, 4])).order_by(Order.id))] == [3, 4]
        rows = s.execute(select(t_order.c.user, func.count()).group_by(t_order.c.user)
                         .order_by(t_order.c.user)).all()
        assert len(rows) == N
    rep = verify(w.cluster)
    assert rep.ok and not rep.missing_tables, rep.render()
    for shard in ("s0", "s1"):
        w.sql(shard, "ANALYZE")
    out = collect(w.cluster)
    for sh in out["shards"]:
        assert sh["rows_estimate_unknown"] == {}, sh
    w.cluster.refresh_map()
    rebalance.Mover(w.cluster, grace=0).apply(plan_drain(w.cluster.config.bucket_map, "s0"))
    for name in ('"order"', '"Sales Team"."order"', '"OrderItems"', '"order-items"', '"commandes_été"',
                 f"{LONG}_one", f"{LONG}_two"):
        assert w.sql("s0", f"SELECT count(*) FROM {name}") == [(0,)], name
        assert w.sql("s1", f"SELECT count(*) FROM {name}") == [(N,)], name
    rep = verify(w.cluster)
    assert rep.ok, rep.render()
    fns = w.sql("s1", "SELECT tgrelid::regclass::text, tgfoid::regproc::text FROM pg_trigger "
                      "WHERE tgname = 'shardkit_guard' ORDER BY 1")
    assert len(fns) == 7 and len({f for _, f in fns}) == 7, fns



NAMESAKE_DDL = """
CREATE SCHEMA "Sales Team";
CREATE TABLE "order" (id bigint PRIMARY KEY, "user" bigint NOT NULL, "select" text);
CREATE TABLE "Sales Team"."order" (id bigint PRIMARY KEY, "user" bigint NOT NULL, "select" text);
"""


def test_a_reference_table_of_a_schema_is_no_instance_of_its_sharded_namesake(world):
    """``"Sales Team".order`` is a reference table, ``order`` (public) is sharded: the
    colocation check and the scatter took the reference table for the sharded one by its
    short name.  A LEFT JOIN keeping the reference rows ran on both shards and counted each
    of them twice (60 where one database has 30; refused without the namesake), and an
    inner join of the two on another column was refused as 'not joined on the shard key'."""
    w = world(NAMESAKE_DDL, {"g": {"strategy": "hash", "tables": {"order": "user"}}},
              reference=["Sales Team.order"])
    rebalance.init(w.cluster)
    with w.Session() as s:
        s.execute(t_sales.insert(), [{"id": i, "user": i if i % 2 else 1000 + i, "select": f"r{i}"}
                                     for i in range(N)])
        s.execute(t_order.insert(), [{"id": i, "user": i, "select": f"o{i}"} for i in range(N)])
        s.commit()
    with w.Session() as s:
        with pytest.raises(ScatterRefused, match="outer join keeps rows of reference tables"):
            s.scalar(select(func.count()).select_from(
                t_sales.outerjoin(t_order, t_order.c.user == t_sales.c.user)))
        s.rollback()
        assert s.scalar(select(func.count()).select_from(
            t_order.join(t_sales, t_sales.c.id == t_order.c.id))) == N
        rows = s.execute(select(t_order.c.id, t_sales.c.select)
                         .join(t_sales, t_sales.c.id == t_order.c.id).order_by(t_order.c.id)).all()
        assert rows == [(i, f"r{i}") for i in range(N)]


keyed = Table("order", MetaData(), Column("id", BigInteger, primary_key=True),
              Column("user", BigInteger, key="owner"), Column("select", Text, key="sel"))


def test_core_columns_keyed_apart_from_their_reserved_names_route_by_their_key(world):
    """``Column("user", key="owner")`` (a reserved word kept out of Python): SQLAlchemy
    takes an INSERT's and an UPDATE's values by the column's key.  shardkit read them by
    name: the inserts were refused for a missing key, and an UPDATE moving the key to
    another shard's bucket was not refused; without the guard the row stayed on a shard
    that does not own its new key."""
    from sqlalchemy import update
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    w = world(NAMESAKE_DDL, {"g": {"strategy": "hash", "tables": {"order": "user"}}})  # no guard
    with w.Session() as s:
        s.execute(keyed.insert(), [{"id": i, "owner": i, "sel": "a"} for i in range(10)])
        s.execute(keyed.insert().values(id=100, owner=3))
        s.execute(keyed.insert().values([{"id": 101, "owner": 3}, {"id": 102, "owner": 3}]))
        s.execute(pg_insert(keyed).values(id=103, owner=3).on_conflict_do_update(
            index_elements=["id"], set_={"sel": "b"}))
        s.commit()
    with w.Session() as s:
        k = 3
        other = next(i for i in range(100) if w.cluster.shard_for("order", i) != w.cluster.shard_for("order", k))
        with pytest.raises(CrossShardWriteError, match="sets its shard key"):
            s.execute(keyed.update().where(keyed.c.owner == k).values(owner=other))
        s.rollback()
        with pytest.raises(CrossShardWriteError, match="sets its shard key"):
            s.execute(keyed.update().where(keyed.c.owner == k), {"owner": other})
        s.rollback()
        with pytest.raises(CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
            s.execute(pg_insert(keyed).values(id=100, owner=k).on_conflict_do_update(
                index_elements=["id"], set_={"owner": other}))
        s.rollback()
        assert s.execute(update(keyed).where(keyed.c.owner == k).values(sel="c")).rowcount == 5
        s.commit()
    rep = verify(w.cluster)
    assert rep.ok, rep.render()
    assert sum(t.rows for t in rep.tables) == 14


BRACES_DDL = """
CREATE TABLE "br{ace}" (id bigint PRIMARY KEY, "k{0}" bigint NOT NULL, v text);
CREATE TABLE "tag{s}" (id bigint PRIMARY KEY, "k{0}" text NOT NULL);
"""
braces = Table("br{ace}", MetaData(), Column("id", BigInteger, primary_key=True),
               Column("k{0}", BigInteger), Column("v", Text))
tags = Table("tag{s}", MetaData(), Column("id", BigInteger, primary_key=True), Column("k{0}", Text))


@pytest.mark.parametrize("then", ["finish", "abort"])
def test_a_key_column_named_with_braces_moves_and_aborts(world, then):
    """A shard key column named ``k{0}``: the mover spliced SQL holding the name into
    psycopg's sql.SQL() templates, whose format() read the braces ('cannot switch from
    automatic field numbering to manual'): the move stopped after it had started, and its
    abort failed the same way, so it could neither finish nor be undone."""
    w = world(BRACES_DDL, {"g": {"strategy": "hash", "tables": {"br{ace}": "k{0}", "tag{s}": "k{0}"}}})
    rebalance.init(w.cluster)
    with w.Session() as s:
        s.execute(braces.insert(), [{"id": i, "k{0}": i, "v": "x"} for i in range(N)])
        s.execute(tags.insert(), [{"id": i, "k{0}": f"t{i}"} for i in range(N)])
        s.commit()
    on_s0 = [i for i in range(N) if w.cluster.shard_for(braces, i) == "s0"]
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")

    class Stop(Exception):
        pass

    def during(line: str) -> None:
        if ": copied " in line:
            w.sql("s0", 'UPDATE "br{ace}" SET v = \'late\' WHERE "k{0}" = %s', (on_s0[0],))
            if then == "abort":
                raise Stop

    mover = rebalance.Mover(w.cluster, grace=0, progress=during)
    if then == "finish":
        mover.apply(plan)
        assert w.ids("s0", '"br{ace}"') == [] and w.ids("s0", '"tag{s}"') == []
        assert w.ids("s1", '"br{ace}"') == list(range(N)) and w.ids("s1", '"tag{s}"') == list(range(N))
        assert w.sql("s1", 'SELECT v FROM "br{ace}" WHERE id = %s', (on_s0[0],)) == [("late",)]
    else:
        move_id = mover.start(plan)
        with pytest.raises(RebalanceError, match="Stop"):
            mover.run(move_id)
        rebalance.abort(w.cluster, move_id)
        w.cluster.refresh_map()
        assert sorted(w.ids("s0", '"br{ace}"') + w.ids("s1", '"br{ace}"')) == list(range(N))
        assert w.ids("s0", '"br{ace}"') == on_s0
    rep = verify(w.cluster)
    assert rep.ok, rep.render()
