"""The legacy Query API and ORM conveniences, against one database holding the same rows.

Every check runs the same code through a ``ShardedSession`` on this module's own
3-shard cluster and through a plain ``Session`` on ONE database (``qa_oracle``, on
shard s0's server) holding the same rows, and compares what comes back: row counts
of writes, ``RETURNING`` rows and objects, and the errors the database raises.

Complements test_orm_surface.py, test_orm_loaders.py and test_scatter*.py:
writes to reference tables through ``Query.update()``/``Query.delete()`` and
statements (their result is one copy's, not one per shard), and statements that
every shard refuses alike (the database's own error, not a shard failure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration


class QBase(DeclarativeBase):
    pass


class Country(QBase):
    """Reference table: a full copy on every shard."""

    __tablename__ = "qa_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class User(QBase):
    __tablename__ = "qa_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)
    score: Mapped[int] = mapped_column(Integer)
    country_code: Mapped[str | None] = mapped_column(ForeignKey("qa_countries.code"))
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")


class Order(QBase):
    __tablename__ = "qa_orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("qa_users.id"))
    amount: Mapped[int] = mapped_column(Integer)
    user: Mapped[User] = relationship(back_populates="orders")


GROUPS = {"groups": {"qa": {"strategy": "hash", "tables": {"qa_users": "id", "qa_orders": "user_id"}}},
          "reference_tables": ["qa_countries"]}
KEY_OF = {"qa_users": "id", "qa_orders": "user_id"}
USERS = list(range(1, 25))


def build_rows() -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {
        "qa_countries": [{"code": c, "name": n} for c, n in
                         (("de", "Germany"), ("fr", "France"), ("us", "USA"), ("jp", "Japan"))],
        "qa_users": [], "qa_orders": []}
    for i, u in enumerate(USERS):
        rows["qa_users"].append({"id": u, "name": "abcd"[i % 4], "score": (i * 7) % 5,
                                 "country_code": [None, "de", "fr", "us"][i % 4]})
        for j in range(i % 4):
            rows["qa_orders"].append({"id": u * 10 + j, "user_id": u, "amount": (i * 3 + j * 5) % 7})
    return rows


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    rows: dict[str, list[dict[str, Any]]]

    def reset(self) -> None:
        tables = ", ".join(t.name for t in QBase.metadata.sorted_tables)
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).begin() as c:
                c.execute(text("SET LOCAL lock_timeout = '10s'"))
                c.execute(text(f"TRUNCATE {tables}"))
                for t in QBase.metadata.sorted_tables:
                    rs = self.rows[t.name]
                    if t.name in KEY_OF:
                        rs = [r for r in rs if self.cluster.shard_for(t.name, r[KEY_OF[t.name]]) == s]
                    if rs:
                        c.execute(insert(t), rs)
        with self.oracle.begin() as c:
            c.execute(text(f"TRUNCATE {tables}"))
            for t in QBase.metadata.sorted_tables:
                c.execute(insert(t), self.rows[t.name])

    def both(self, fn: Callable[[Session], Any]) -> Any:
        """``fn(session)`` on the one database and on the cluster, each rolled back: equal
        outcomes (values, or the same exception class)."""
        def run(s: Session) -> Any:
            try:
                return fn(s)
            except sa_exc.SQLAlchemyError as e:
                return ("error", type(e))
            finally:
                s.rollback()
        with Session(self.oracle) as s:
            want = run(s)
        with self.Session() as s:
            got = run(s)
        assert got == want, f"\nsharded:      {got!r}\none database: {want!r}"
        return want


@pytest.fixture(scope="module")
def qa(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=QBase.metadata)
    for s in cluster.shard_names:
        QBase.metadata.drop_all(cluster.primary(s))
        QBase.metadata.create_all(cluster.primary(s))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS qa_oracle"))
        c.execute(text("CREATE DATABASE qa_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="qa_oracle"))
    QBase.metadata.create_all(oracle)
    env = Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle, build_rows())
    env.reset()
    yield env
    oracle.dispose()
    cluster.dispose()


def countries(s: Session) -> list[tuple[str, str]]:
    s.flush()
    return sorted((c.code, c.name) for c in s.scalars(select(Country)))


# ---------------------------------------------------------------------------
# Writes to reference tables: one copy's result
# ---------------------------------------------------------------------------


def test_query_update_and_delete_of_reference_rows_count_each_row_once(qa):
    """``Query.update()``/``.delete()`` return the number of rows matched; on a reference
    table every shard's copy matches, and the count is still that of one database (an
    application's ``if q.update(...) == 0: insert`` or ``assert n == 1`` relies on it)."""
    for sync in ("auto", "fetch", False):
        qa.both(lambda s: (s.query(Country).filter(Country.code.in_(["de", "fr"]))
                           .update({"name": "x"}, synchronize_session=sync), countries(s)))
        qa.both(lambda s: (s.query(Country).filter(Country.code == "jp")
                           .delete(synchronize_session=sync), countries(s)))
    qa.both(lambda s: (s.query(Country).filter(Country.code == "zz").update({"name": "x"}), countries(s)))
    qa.both(lambda s: (s.execute(update(Country).where(Country.code != "us").values(name="U")).rowcount,
                       countries(s)))
    qa.both(lambda s: (s.execute(delete(Country.__table__).where(Country.code == "jp")).rowcount,
                       countries(s)))
    # Insert reports what SQLAlchemy reports for it; the ORM bulk form the number of rows.
    qa.both(lambda s: (s.execute(insert(Country.__table__).values(code="it", name="Italy")).rowcount,
                       countries(s)))
    with qa.Session() as s:
        r = s.execute(insert(Country), [{"code": "it", "name": "Italy"}, {"code": "es", "name": "Spain"}])
        assert r.rowcount == 2
        s.rollback()


def test_returning_from_a_reference_table_gives_each_row_once(qa):
    """UPDATE/DELETE/INSERT ... RETURNING of a reference table returns each row once, and
    RETURNING(Model) gives the objects the session's own reads return."""
    qa.both(lambda s: (sorted(s.execute(update(Country).where(Country.code != "us").values(name="U")
                                        .returning(Country.code, Country.name)).all()), countries(s)))
    qa.both(lambda s: (s.execute(delete(Country).where(Country.code == "jp")
                                 .returning(Country.code)).all(), countries(s)))
    qa.both(lambda s: (s.execute(insert(Country).values(code="it", name="Italy")
                                 .returning(Country.code)).all(), countries(s)))

    def same_objects(s: Session) -> Any:
        de = s.get(Country, "de")
        got = s.scalars(update(Country).where(Country.code.in_(["de", "fr"])).values(name="N")
                        .returning(Country)).all()
        fr = s.scalars(select(Country).where(Country.code == "fr")).one()
        return (sorted(c.code for c in got), [c is de for c in got if c.code == "de"],
                [c is fr for c in got if c.code == "fr"], de.name, fr.name)
    qa.both(same_objects)


# ---------------------------------------------------------------------------
# A statement every shard refuses: the database's own error
# ---------------------------------------------------------------------------


def test_a_statement_every_shard_refuses_raises_the_databases_error(qa):
    """A key-less read that PostgreSQL refuses (on every shard alike) raises what one
    database raises: the caller's ``except ProgrammingError`` / ``NotSupportedError``
    handles it, not a ScatterError (a ShardUnavailable) saying three shards failed."""
    cases = [
        # session.get() of a primary key without the shard key, locked, with a joined load
        # of a many-to-one: PostgreSQL cannot lock the nullable side of the outer join.
        (lambda s: s.get(Order, 31, with_for_update=True, options=[joinedload(Order.user)]),
         sa_exc.NotSupportedError),
        (lambda s: s.query(User.id).filter(User.id == True).all(), sa_exc.ProgrammingError),  # noqa: E712
        (lambda s: s.execute(select(User.id).where(text("no_such_column = 1"))).all(),
         sa_exc.ProgrammingError),
        (lambda s: s.query(func.count()).select_from(User).filter(User.name.op("~")("(")).scalar(),
         sa_exc.DataError),
    ]
    for fn, error in cases:
        with Session(qa.oracle) as s, pytest.raises(error):
            fn(s)
        with qa.Session() as s:
            with pytest.raises(error) as ei:
                fn(s)
            assert not isinstance(ei.value, shardkit.ScatterError), ei.value
            s.rollback()
            # the session goes on after the rollback, as on one database
            assert s.query(User).count() == len(USERS)


# ---------------------------------------------------------------------------
# Refusals name what works instead
# ---------------------------------------------------------------------------


def test_an_entity_beside_aggregates_is_refused_naming_what_works(qa):
    """``query(User, func.count(Order.id)).outerjoin(User.orders).group_by(User.id)`` (a
    common ORM idiom) is refused across shards; the error names the entity and the query
    that works: its columns grouped, then the objects by key."""
    def idiom(s: Session) -> Any:
        return (s.query(User, func.count(Order.id)).outerjoin(User.orders).group_by(User.id)
                .order_by(User.id).all())
    with qa.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
        idiom(s)
    assert ei.value.construct == "entity with GROUP BY"
    assert "User" in str(ei.value) and "select its columns" in str(ei.value)

    # What it says works, and gives one database's answer.
    def columns_then_objects(s: Session) -> Any:
        rows = (s.query(User.id, func.count(Order.id)).outerjoin(User.orders).group_by(User.id)
                .order_by(User.id).all())
        users = {u.id: u for u in s.scalars(select(User).where(User.id.in_([r[0] for r in rows])))}
        return [(users[i].id, users[i].name, n) for i, n in rows]
    with Session(qa.oracle) as s:
        want = [(u.id, u.name, n) for u, n in idiom(s)]
    with qa.Session() as s:
        assert columns_then_objects(s) == want


def test_query_count_of_a_distinct_or_limited_query_says_what_works(qa):
    """``query.distinct().count()``, ``query.group_by(...).count()`` and
    ``query.limit(n).count()`` count the query as a subquery, which each shard would
    compute over its own rows: refused, but the error named SQLAlchemy's placeholder
    ("Anonymous alias of anon_1"), which the user never wrote, and said nothing of
    count().  It now names a subquery and what counts across shards."""
    for build in (lambda s: s.query(User.name).distinct(),
                  lambda s: s.query(User.score).group_by(User.score),
                  lambda s: s.query(User).order_by(User.id).limit(5)):
        with qa.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
            build(s).count()
        msg = str(ei.value)
        assert "Anonymous" not in msg and "a subquery" in msg, msg
        assert "Query.count()" in msg and "len(query.all())" in msg, msg
        with qa.Session() as s, Session(qa.oracle) as o:
            assert len(build(s).all()) == build(o).count()
    # A refusal of another shape does not mention count().
    with qa.Session() as s, pytest.raises(shardkit.ScatterRefused) as ei:
        s.execute(select(User.id).select_from(select(User).limit(3).subquery()))
    assert "Query.count()" not in str(ei.value)


def test_key_in_a_subquery_of_the_groups_key_runs_on_every_shard_exactly(qa):
    """``User.id IN (SELECT orders.user_id ...)``, the semi-join of "users who have such
    orders", was refused as a subquery not correlated on the key.  Rows with equal keys live
    on one shard, so each shard answers the IN for its own users exactly: it now runs, and
    gives one database's rows.  A LIMIT in the subquery, a column that is not the key on
    either side, or NOT IN (NULLs decide it across all rows) are still refused."""
    from sqlalchemy import exists
    from sqlalchemy.orm import aliased

    o2 = aliased(Order)

    def ids(stmt):
        return lambda s: sorted(s.scalars(stmt).all())

    works = [
        select(User.id).where(User.id.in_(select(Order.user_id).where(Order.amount > 3))),
        select(User.id).where(User.id.in_(
            select(Order.user_id).group_by(Order.user_id).having(func.count() > 1))),
        select(User.id).where(User.score > 1, User.id.in_(select(Order.user_id).distinct())),
        select(User.id).where(User.id.in_(select(Order.user_id).where(
            Order.amount > select(func.min(o2.amount)).where(o2.user_id == Order.user_id).scalar_subquery()))),
    ]
    for stmt in works:
        got = qa.both(ids(stmt))
        assert got and not (isinstance(got, tuple) and got[0] == "error"), got
    got = qa.both(lambda s: sorted(u.id for u in s.query(User).filter(
        User.id.in_(s.query(Order.user_id).filter(Order.amount == 0))).all()))
    assert got
    refused = [
        select(User.id).where(User.id.in_(select(Order.user_id).order_by(Order.user_id).limit(2))),
        select(User.id).where(User.id.in_(select(Order.amount))),
        select(User.id).where(User.score.in_(select(Order.user_id))),
        select(User.id).where(User.id.not_in(select(Order.user_id))),
        select(User.id).where(~exists().where(Order.amount > 5), User.id.in_(select(Order.id))),
    ]
    for stmt in refused:
        with qa.Session() as s, pytest.raises(shardkit.ScatterRefused):
            s.execute(stmt).all()
