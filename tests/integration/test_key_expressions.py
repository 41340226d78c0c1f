"""The shard key inside expressions: statements the router narrows by a key comparison
must return what ONE database holding the same rows returns (or be refused, saying
why), and writes must land where their key belongs.

Each read runs through a ``ShardedSession`` and through a plain ``Session`` on one
extra database (on the first shard's server) holding the same rows."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from own_tables import cluster_with_tables, statements_per_shard
from sqlalchemy import BigInteger, MetaData, String, create_engine, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.expression import Grouping

import shardkit
from shardkit.errors import CrossShardWriteError, ScatterRefused, ShardKeyError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class KUser(Base):
    __tablename__ = "kx_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))


class KOrder(Base):
    __tablename__ = "kx_orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)


class KShop(Base):
    __tablename__ = "kx_shops"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(String(8))


USERS = [{"id": i, "name": f"n{i}"} for i in range(1, 13)]
ORDERS = [{"id": 100 + i, "user_id": u, "amount": i} for i, u in enumerate(range(1, 13))]


class Env:
    def __init__(self, cluster: shardkit.Cluster, oracle: Any) -> None:
        self.cluster = cluster
        self.oracle = oracle
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

    def reset(self) -> None:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).begin() as c:
                c.execute(text(f"TRUNCATE {tables}"))
                for t, rows, key in ((KUser.__table__, USERS, "id"), (KOrder.__table__, ORDERS, "user_id")):
                    mine = [r for r in rows if self.cluster.shard_for(t.name, r[key]) == s]
                    if mine:
                        c.execute(insert(t), mine)
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {tables}"))
            c.execute(insert(KUser.__table__), USERS)
            c.execute(insert(KOrder.__table__), ORDERS)

    def owner(self, key: int) -> str:
        return self.cluster.shard_for("kx_users", key)

    def keys_on_two_shards(self) -> tuple[int, int]:
        """Two user ids whose rows are on different shards."""
        a = USERS[0]["id"]
        b = next(r["id"] for r in USERS if self.owner(r["id"]) != self.owner(a))
        return a, b

    def same_or_refused(self, fn: Callable[[Session], Any]) -> Any:
        """``fn`` gives through the cluster what it gives on one database, or the cluster
        refuses it (ScatterRefused), never another answer."""
        with Session(self.oracle) as s:
            want = fn(s)
        with self.Session() as s:
            try:
                got = fn(s)
            except ScatterRefused as e:
                return e
        assert got == want, f"\nsharded:      {got!r}\none database: {want!r}"
        return got


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    names = [s.name for s in sharded_dev.shards]
    config = {"groups": {
        "users": {"tables": {"kx_users": "id", "kx_orders": "user_id"}},
        "shops": {"strategy": "list", "tables": {"kx_shops": "region"},
                  "values": {names[0]: ["eu"], names[1]: ["us"]}, "default": names[2]},
    }}
    admin_url = make_url(sharded_dev.shards[0].primary.url)
    db = f"kx_oracle_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {db}"))
    oracle = create_engine(admin_url.set(database=db))
    try:
        Base.metadata.create_all(oracle)
        with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
            e = Env(cluster, oracle)
            e.reset()
            yield e
    finally:
        oracle.dispose()
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        admin.dispose()


# ---------------------------------------------------------------------------
# A derived table pinned by its key does not pin the rest of the statement
# ---------------------------------------------------------------------------


def test_a_key_pinned_subquery_does_not_hide_other_sharded_rows_of_the_outer_query(env):
    """SELECT ... FROM (SELECT ... WHERE key = 1) AS anon, kx_orders: the orders are on
    every shard; routed by the subquery's key, only one shard's orders came back."""
    a, _ = env.keys_on_two_shards()

    def cross_join(s: Session) -> Any:
        sq = select(KUser).where(KUser.id == a).subquery()
        return sorted(s.execute(select(sq.c.id, KOrder.id).select_from(sq)).all())

    def uncorrelated_count(s: Session) -> Any:
        sq = select(KUser).where(KUser.id == a).subquery()
        total = select(func.count(KOrder.id)).scalar_subquery()
        return s.execute(select(sq.c.id, total).select_from(sq)).all()

    for fn in (cross_join, uncorrelated_count):
        env.same_or_refused(fn)


def test_a_key_pinned_subquery_with_limit_still_runs_on_its_shard(env):
    """What the one-shard exemption is for: SELECT count(*) FROM (SELECT ... WHERE key = :k
    LIMIT n) (Query.count() of a limited query) is exact on the key's shard."""
    a, _ = env.keys_on_two_shards()

    def limited_count(s: Session) -> Any:
        sq = select(KUser).where(KUser.id == a).limit(3).subquery()
        return s.execute(select(func.count()).select_from(sq)).scalar_one()

    assert not isinstance(env.same_or_refused(limited_count), ScatterRefused)
    route = env.cluster.explain(select(func.count()).select_from(
        select(KUser).where(KUser.id == a).limit(3).subquery()))
    assert route.shards == (env.owner(a),)


# ---------------------------------------------------------------------------
# text() fragments ANDed with the key: SQLAlchemy does not parenthesize them
# ---------------------------------------------------------------------------


def test_a_text_fragment_with_an_or_beside_the_key_reads_what_one_database_reads(env):
    """where(key == a, text("name = 'nB' OR ...")) renders as ``id = a AND name = 'nB' OR ...``:
    the OR applies to the whole WHERE, so rows of other shards match."""
    a, b = env.keys_on_two_shards()
    frag = f"kx_users.name = 'n{b}' OR kx_users.name = 'n{b}'"

    def read(s: Session) -> Any:
        return sorted(s.scalars(select(KUser.id).where(KUser.id == a, text(frag))).all())

    with Session(env.oracle) as s:
        assert read(s) == [b]  # (the row of the other shard is part of the answer)
    env.same_or_refused(read)


def test_a_text_fragment_with_an_or_beside_the_key_does_not_narrow_a_write(env):
    a, b = env.keys_on_two_shards()
    frag = f"kx_users.name = 'n{b}' OR kx_users.name = 'n{b}'"
    stmt = update(KUser).where(KUser.id == a, text(frag)).values(name="changed")
    try:
        with env.Session() as s, statements_per_shard(env.cluster) as hits:
            with pytest.raises(CrossShardWriteError) as err:
                s.execute(stmt)
            s.rollback()
        assert "text()" in str(err.value) and "Grouping" in str(err.value)
        assert not hits  # refused before any shard ran it
        # Parenthesized, the fragment only narrows: the key decides the shard.
        with env.Session() as s:
            n = s.execute(update(KUser).where(KUser.id == a, Grouping(text(frag))).values(
                name="changed")).rowcount
            s.commit()
        assert n == 0
        assert env.cluster.explain(select(KUser).where(KUser.id == a, Grouping(text(frag)))).shards \
            == (env.owner(a),)
        # Text without an OR cannot reach past the AND: the key still decides.
        for harmless in ("kx_users.name IS NOT NULL", "kx_users.name <> 'order'"):
            assert env.cluster.explain(select(KUser).where(KUser.id == a, text(harmless))).shards \
                == (env.owner(a),), harmless
    finally:
        env.reset()


# ---------------------------------------------------------------------------
# INSERT of a key given as a SQL expression
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("region", [func.lower("EU"), text("'eu'")], ids=["function", "text"])
def test_an_insert_whose_list_key_is_a_sql_expression_is_refused_not_sent_to_the_default(env, region):
    """The database computes 'eu' (shard 0's value); the router cannot, and a list key it
    could not match went to the default shard, where no read by 'eu' looks."""
    def write_then_read(s: Session) -> Any:
        s.execute(insert(KShop).values(id=1, region=region))
        return s.scalars(select(KShop.id).where(KShop.region == "eu")).all()

    try:
        with Session(env.oracle) as s:
            assert write_then_read(s) == [1]
            s.rollback()
        with env.Session() as s:
            try:
                got = write_then_read(s)
            except ShardKeyError as e:
                got = e
            s.rollback()
        assert isinstance(got, ShardKeyError), f"sharded read back {got!r}, one database [1]"
        assert "SQL expression" in str(got) and "kx_shops" in str(got) and "region" in str(got)
    finally:
        env.reset()
