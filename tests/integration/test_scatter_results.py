"""The Result objects a cross-shard (key-less) read returns, used as a
demanding SQLAlchemy user uses one database's: every fetch method, the filtering views
(scalars, mappings, columns, unique), freeze(), early close and ``with``, ORM yield_per /
Query.yield_per, each compared with ONE plain database holding every row
(``own_tables.one_database``); ``missing_shards`` of a partial result kept by every view;
no cursor or transaction left open by ``first()`` and friends.

Defects covered (each failed before the fix):

* the merged result's metadata dropped the ORM's unique filters: ``unique()`` raised
  ``TypeError: unhashable type`` for objects of a ``MappedAsDataclass`` mapping (eq=True:
  no ``__hash__``) -- so did every legacy ``Query`` of them and every joinedload
  collection read through ``.unique()`` -- and for JSON/ARRAY values; and ``unique()`` with
  ``yield_per`` was not refused as one database refuses it;
* ``freeze()`` lost ``missing_shards`` (the frozen result, the results it makes,
  ``with_new_rows()`` of ``merge_frozen_result()``);
* ``freeze()`` of entities with a joined collection raised "The unique() method must be
  invoked" where one database freezes the rows (the caching recipe's reader calls unique()).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import cluster_with_tables, one_database
from sqlalchemy import BigInteger, ForeignKey, Integer, Text, func, insert, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    joinedload,
    mapped_column,
    relationship,
    sessionmaker,
)

import shardkit

pytestmark = pytest.mark.integration

N = 60


class Base(DeclarativeBase):
    pass


class P(Base):
    __tablename__ = "rs7_p"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    name = mapped_column(Text)
    tags = mapped_column(JSONB)
    kids = relationship("K", order_by="K.no")


class K(Base):
    __tablename__ = "rs7_k"
    p_id = mapped_column(ForeignKey("rs7_p.id"), primary_key=True)
    no = mapped_column(Integer, primary_key=True, autoincrement=False)


class DBase(MappedAsDataclass, DeclarativeBase):
    """The same tables mapped as dataclasses: eq=True makes the objects unhashable."""


class DP(DBase):
    __tablename__ = "rs7_p"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    kids: Mapped[list[DK]] = relationship(order_by="DK.no", default_factory=list)


class DK(DBase):
    __tablename__ = "rs7_k"
    p_id: Mapped[int] = mapped_column(ForeignKey("rs7_p.id"), primary_key=True)
    no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


GROUPS = {"groups": {"rs7": {"strategy": "hash", "tables": {"rs7_p": "id", "rs7_k": "p_id"}}}}
PROWS = [{"id": i, "grp": i % 4, "name": f"n{i % 9}", "tags": [i % 3, "t"]} for i in range(1, N + 1)]
KROWS = [{"p_id": i, "no": j} for i in range(1, N + 1) for j in range(i % 3)]


@dataclass
class Env:
    cluster: shardkit.Cluster
    oracle: Engine

    def Session(self, **kw: Any) -> Any:
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, **kw)()

    def one(self) -> Session:
        return Session(self.oracle)


@pytest.fixture(scope="module")
def env(sharded_dev) -> Iterator[Env]:
    oracle = one_database(sharded_dev, "rs7_oracle", Base.metadata)
    with cluster_with_tables(sharded_dev, GROUPS, Base.metadata) as cluster:
        with oracle.begin() as c:
            c.execute(insert(P), PROWS)
            c.execute(insert(K), KROWS)
        s = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)()
        s.execute(insert(P), PROWS)
        s.execute(insert(K), KROWS)
        s.commit()
        s.close()
        # A function failing on the first shard only: a partial result's missing shard.
        first = cluster.shard_names[0]
        for sh in cluster.shard_names:
            with cluster.primary(sh).begin() as c:
                body = "SELECT 1/0 = 1" if sh == first else "SELECT true"
                c.execute(text(f"CREATE OR REPLACE FUNCTION rs7_gate() RETURNS boolean "
                               f"LANGUAGE sql VOLATILE AS $$ {body} $$"))
        try:
            yield Env(cluster, oracle)
        finally:
            for sh in cluster.shard_names:
                with cluster.primary(sh).begin() as c:
                    c.execute(text("DROP FUNCTION IF EXISTS rs7_gate()"))
            oracle.dispose()


def checked_out(cluster: shardkit.Cluster) -> dict[str, int]:
    return {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st and st["checkedout"]}


def open_on_servers(cluster: shardkit.Cluster) -> dict[str, list[str]]:
    """Node -> other backends of its database that hold a transaction open (idle in
    transaction, or active) on every primary and replica."""
    out = {}
    for sh in cluster.shard_names:
        engines = [cluster.primary(sh)] + [cluster.engine(sh, "replica", i)
                                           for i in range(cluster.replica_count(sh))]
        for eng in engines:
            with eng.connect() as c:
                states = c.execute(text(
                    "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                    "AND (state LIKE 'idle in transaction%' OR xact_start IS NOT NULL)")).scalars().all()
            if states:
                out[eng.info["node"]] = states
    return out


def outcome(use: Any, result: Any) -> Any:
    """``use(result)``, or the type and message of the error it raises."""
    try:
        return use(result)
    except sa_exc.SQLAlchemyError as e:
        return type(e), str(e).split(" (Background")[0]


ORDERED = select(P.id, P.grp, P.name).order_by(P.id)
PT = P.__table__
CORE = select(PT.c.id, PT.c.grp, PT.c.name).order_by(PT.c.id)

# Each: (name, fn(result) -> comparable value).  Run on the cluster and on one database.
USES: list[tuple[str, Any]] = [
    ("all", lambda r: [tuple(x) for x in r.all()]),
    ("first", lambda r: tuple(r.first())),
    ("scalar", lambda r: r.scalar()),
    ("scalars-all", lambda r: r.scalars().all()),
    ("scalars-name", lambda r: r.scalars("name").all()),
    ("scalars-first", lambda r: r.scalars(1).first()),
    ("mappings-all", lambda r: [dict(m) for m in r.mappings().all()]),
    ("mappings-first", lambda r: dict(r.mappings().first())),
    ("mappings-columns", lambda r: [dict(m) for m in r.mappings().columns("name", "id").fetchmany(5)]),
    ("partitions", lambda r: [[tuple(x) for x in p] for p in r.partitions(7)]),
    ("yield_per-partitions", lambda r: [[tuple(x) for x in p] for p in r.yield_per(11).partitions()]),
    ("fetchmany-fetchone-fetchall", lambda r: (
        [tuple(x) for x in r.fetchmany(5)], tuple(r.fetchone()), [tuple(x) for x in r.fetchall()],
        r.fetchone(), r.fetchmany(3))),
    ("columns", lambda r: [tuple(x) for x in r.columns("name", 0).all()]),
    ("columns-scalars", lambda r: r.columns(1, "id").scalars().all()),
    ("unique", lambda r: r.columns("grp").unique().all()),
    ("scalars-unique", lambda r: r.scalars(2).unique().all()),
    ("unique-strategy", lambda r: [tuple(x) for x in r.unique(lambda row: row[1]).all()]),
    ("keys", lambda r: (list(r.keys()), r.all()[:2])),
    ("freeze", lambda r: (lambda f: ([tuple(x) for x in f().all()], f().scalars().all(),
                                     [dict(m) for m in f().mappings().fetchmany(3)]))(r.freeze())),
    ("columns-freeze", lambda r: (lambda f: ([tuple(x) for x in f().all()], f().scalars().first()))(
        r.columns("name", "grp").freeze())),
    ("freeze-pickled", lambda r: (lambda f: ([tuple(x) for x in f().all()], list(f().keys()),
                                             f().mappings().first()["name"]))(
        pickle.loads(pickle.dumps(r.freeze())))),
    ("iter-break-close", lambda r: (next(iter(r)), r.close(), r.closed)),
    ("with", lambda r: (lambda: [r.__enter__(), tuple(r.fetchone()), r.__exit__(None, None, None), r.closed][1:])()),
    ("closed-fetch", lambda r: (r.close(), pytest.raises(sa_exc.ResourceClosedError, r.fetchone).type)),
]


@pytest.mark.parametrize("form", ["orm", "core", "orm-yield_per", "core-stream", "hidden-sort", "hidden-yield_per"])
@pytest.mark.parametrize("name,use", USES, ids=[u[0] for u in USES])
def test_result_api_on_ordered_scatter_matches_one_database(env, name, use, form):
    stmt = ORDERED if form.startswith("orm") else CORE
    if form.startswith("hidden"):
        # Sort keys the select list does not have: each shard returns them as extra columns.
        stmt = select(P.id, P.grp, P.name).order_by((P.id % 7).desc(), P.name, P.id)
        if form == "hidden-yield_per":
            stmt = stmt.execution_options(yield_per=5)
    if form == "orm-yield_per":
        stmt = stmt.execution_options(yield_per=7)
    elif form == "core-stream":
        stmt = stmt.execution_options(stream_results=True, max_row_buffer=4)
    with env.one() as o:
        want = outcome(use, o.execute(stmt))
    with env.Session(consistency="strong") as s:
        got = outcome(use, s.execute(stmt))
    assert got == want
    assert checked_out(env.cluster) == {}


@pytest.mark.parametrize("use", ["one", "one_or_none", "scalar_one", "scalar_one_or_none",
                                 "scalars-one", "mappings-one"])
def test_one_family_matches_one_database(env, use):
    for where in (P.id == 5, P.id > 0, P.id < 0):
        stmt = select(P.id, P.name).where(where)
        outs = []
        for sess in (env.one(), env.Session(consistency="strong")):
            with sess as s:
                r = s.execute(stmt)
                try:
                    if use == "scalars-one":
                        v = r.scalars().one()
                    elif use == "mappings-one":
                        v = dict(r.mappings().one())
                    else:
                        v = getattr(r, use)()
                        v = tuple(v) if hasattr(v, "_mapping") else v
                    outs.append(v)
                except (sa_exc.NoResultFound, sa_exc.MultipleResultsFound) as e:
                    outs.append(type(e))
        assert outs[0] == outs[1], (use, where)


def test_orm_yield_per_and_query_yield_per_match_one_database(env):
    stmt = select(P).order_by(P.name.desc(), P.id).execution_options(yield_per=5)

    def read(s: Any) -> Any:
        ents = [(p.id, p.name) for p in s.scalars(stmt)]
        parts = [[p.id for p in part] for part in s.scalars(stmt).partitions()]
        q = [(p.id, p.grp) for p in s.query(P).order_by(P.grp, P.id.desc()).limit(17).yield_per(4)]
        q2 = [tuple(r) for r in s.query(P.id, P.name).order_by(P.id.desc()).offset(3).limit(9).yield_per(2)]
        first = s.query(P).order_by(P.id.desc()).yield_per(3).first().id
        return ents, parts, q, q2, first
    with env.one() as o:
        want = read(o)
    with env.Session(consistency="strong") as s:
        assert read(s) == want


def test_joinedload_collections_unique_matches_one_database(env):
    stmt = select(P).options(joinedload(P.kids)).order_by(P.id)

    def read(s: Any) -> Any:
        ps = s.scalars(stmt).unique().all()
        ex = s.execute(stmt).unique().scalars().all()
        page = s.execute(stmt.limit(5)).unique().all()
        try:
            s.execute(stmt).all()
            refused = None
        except sa_exc.InvalidRequestError as e:
            refused = type(e)
        return ([(p.id, [k.no for k in p.kids]) for p in ps], [p.id for p in ex],
                [(r[0].id, len(r[0].kids)) for r in page], refused)
    with env.one() as o:
        want = read(o)
    with env.Session(consistency="strong") as s:
        assert read(s) == want
    assert want[3] is sa_exc.InvalidRequestError


def partial(stmt: Any) -> Any:
    return stmt.where(func.rs7_gate()).execution_options(shardkit_partial_results=True)


VIEWS: list[tuple[str, Any]] = [
    ("result", lambda r: r),
    ("scalars", lambda r: r.scalars()),
    ("mappings", lambda r: r.mappings()),
    ("columns", lambda r: r.columns("name")),
    ("unique", lambda r: r.unique()),
    ("yield_per", lambda r: r.yield_per(3)),
    ("scalars-unique", lambda r: r.scalars().unique()),
    ("mappings-columns", lambda r: r.mappings().columns("id")),
    ("mappings-unique", lambda r: r.mappings().unique()),
    ("frozen-call", lambda r: r.freeze()()),
    ("frozen-call-scalars", lambda r: r.freeze()().scalars()),
    ("frozen", lambda r: r.freeze()),
    ("frozen-pickled-call", lambda r: pickle.loads(pickle.dumps(r.freeze()))()),
    ("frozen-with-new-rows", lambda r: r.freeze().with_new_rows([])),
]


@pytest.mark.parametrize("name,view", VIEWS, ids=[v[0] for v in VIEWS])
def test_missing_shards_survive_every_view(env, name, view):
    first = env.cluster.shard_names[0]
    with env.Session(consistency="strong") as s:
        r = s.execute(partial(select(P.id, P.name).order_by(P.id)))
        assert set(r.missing_shards) == {first}
        v = view(r)
        assert set(getattr(v, "missing_shards", {"<lost>": None})) == {first}, name
        s.rollback()
    assert checked_out(env.cluster) == {}


def test_missing_shards_of_orm_scalars_with_yield_per_and_unique(env):
    first = env.cluster.shard_names[0]
    with env.Session(consistency="strong") as s:
        r = s.scalars(partial(select(P).order_by(P.id)).execution_options(yield_per=4))
        assert set(r.missing_shards) == {first}
        ids = [p.id for p in r]
        u = s.scalars(partial(select(P).order_by(P.id))).unique()
        assert set(u.missing_shards) == {first} and [p.id for p in u] == ids
        assert ids == sorted(ids) and ids and all(env.cluster.shard_for(P, i) != first for i in ids)


@pytest.mark.parametrize("how", ["first", "scalar", "scalars-first", "one-of-limit", "one-raises",
                                 "orm-first", "unordered-first"])
def test_first_on_a_streamed_ordered_scatter_leaves_no_cursor_open(env, how):
    """On one database first() closes its server-side cursor at once; each shard's
    must be closed too (a cursor left open keeps its snapshot and sort on the server)."""
    stmt = select(P.id, P.name).order_by(P.name, P.id).execution_options(yield_per=3)
    with env.Session(consistency="strong") as s:
        conns = {sh: s.connection(bind_arguments={"shard_id": sh}) for sh in env.cluster.shard_names}
        if how == "orm-first":
            stmt = select(P).order_by(P.name, P.id).execution_options(yield_per=3)
        elif how == "unordered-first":
            stmt = select(P.id).execution_options(yield_per=3)
        r = s.execute(stmt if how != "one-of-limit" else stmt.limit(1))
        if how in ("first", "orm-first", "unordered-first"):
            r.first()
        elif how == "scalar":
            r.scalar()
        elif how == "scalars-first":
            r.scalars().first()
        elif how == "one-of-limit":
            r.one()
        else:
            with pytest.raises(sa_exc.MultipleResultsFound):
                r.one()
        cursors = {sh: c.exec_driver_sql("SELECT name FROM pg_cursors WHERE name <> ''").scalars().all()
                   for sh, c in conns.items()}
        assert cursors == {sh: [] for sh in conns}


@pytest.mark.parametrize("how", ["first", "close", "partitions-break"])
def test_streamed_replica_scatter_closed_early_returns_its_connections(env, how):
    """Read from the replicas (stream_results): closing early leaves no transaction open on
    them once the session ends, and every connection is back in its pool."""
    stmt = select(P.id).order_by(P.id).execution_options(stream_results=True, max_row_buffer=5,
                                                          shardkit_role="replica")
    with env.Session() as s:
        r = s.execute(stmt)
        if how == "first":
            assert r.first() == (1,)
        elif how == "close":
            r.fetchmany(2)
            r.close()
        else:
            for _ in r.partitions(2):
                break
            r.close()
        assert s.scalar(select(func.count()).select_from(P)) == N
    assert checked_out(env.cluster) == {}
    assert open_on_servers(env.cluster) == {}


def test_frozen_result_merged_into_another_session_matches_one_database(env):
    """The ORM caching recipe: freeze a read, later merge_frozen_result() it into a session."""
    from sqlalchemy.orm import loading

    stmt = select(P).order_by(P.grp.desc(), P.id).limit(9)

    def read(s: Any, s2: Any) -> Any:
        frozen = s.execute(stmt).freeze()
        again = loading.merge_frozen_result(s2, stmt, frozen, load=False)()
        return [(p.id, p.grp) for p in again.scalars()], [(p.id, p.grp) for p in frozen().scalars()]
    with env.one() as o, env.one() as o2:
        want = read(o, o2)
    with env.Session(consistency="strong") as s, env.Session(consistency="strong") as s2:
        assert read(s, s2) == want


def test_joinedload_collection_with_yield_per_refused_as_on_one_database(env):
    stmt = select(P).options(joinedload(P.kids)).order_by(P.id).execution_options(yield_per=5)
    outs = []
    for sess in (env.one(), env.Session(consistency="strong")):
        with sess as s:
            outs.append(outcome(lambda s: s.execute(stmt).unique().scalars().all(), s))
    assert outs[0] == outs[1]
    assert outs[0][0] is sa_exc.InvalidRequestError


def test_freeze_of_joined_collections_matches_one_database(env):
    """Caching a read of entities with a joined collection (the ORM caching recipe, done
    around session.execute()): one database freezes its rows and the frozen result's
    reader calls unique(); a cross-shard read must not refuse freeze() for want of it."""
    from sqlalchemy.orm import loading

    stmt = select(P).options(joinedload(P.kids)).where(P.id < 25).order_by(P.name, P.id)

    def read(s: Any, s2: Any) -> Any:
        frozen = s.execute(stmt).freeze()
        merged = loading.merge_frozen_result(s2, stmt, frozen, load=False)()
        return ([(p.id, [k.no for k in p.kids]) for p in frozen().unique().scalars()],
                [(p.id, [k.no for k in p.kids]) for p in merged.unique().scalars()],
                outcome(lambda r: r.unique().freeze()().scalars().all(), s.execute(stmt)) != (),
                # several entities: one database refuses freeze() before unique() too
                outcome(lambda r: r.freeze(), s.execute(select(P, P.name).options(joinedload(P.kids)))))
    with env.one() as o, env.one() as o2:
        want = read(o, o2)
    with env.Session(consistency="strong") as s, env.Session(consistency="strong") as s2:
        assert read(s, s2) == want
    assert want[3][0] is sa_exc.InvalidRequestError


@pytest.mark.parametrize("use", ["dataclass-scalars-unique", "dataclass-joined-unique", "dataclass-rows-unique",
                                 "json-unique", "json-scalars-unique", "yield_per-unique", "query-joined",
                                 "query-plain"])
def test_unique_of_unhashable_values_as_on_one_database(env, use):
    """unique() of unhashable values (objects of a dataclass mapping, which eq=True leaves
    without __hash__; JSONB lists): one database's ORM result knows how to unique them by
    each column's type and entity, and refuses unique() with yield_per."""
    def read(s: Any) -> Any:
        if use == "dataclass-scalars-unique":
            return [p.id for p in s.scalars(select(DP).order_by(DP.id)).unique().all()]
        if use == "dataclass-joined-unique":
            ps = s.scalars(select(DP).options(joinedload(DP.kids)).order_by(DP.name, DP.id)).unique().all()
            return [(p.id, [k.no for k in p.kids]) for p in ps]
        if use == "dataclass-rows-unique":
            return [(p.id, g) for p, g in s.execute(select(DP, DP.grp).order_by(DP.id)).unique().all()]
        if use == "json-unique":
            return [tuple(r) for r in s.execute(select(P.tags, P.grp).order_by(P.grp)).unique().all()]
        if use == "json-scalars-unique":
            return s.execute(select(P.tags).order_by(P.id)).scalars().unique().all()
        if use == "yield_per-unique":
            return s.execute(select(P.id, P.name).order_by(P.id).execution_options(yield_per=5)).unique().all()
        if use == "query-plain":  # (legacy Query uniques the entities it returns)
            return [p.id for p in s.query(DP).filter(DP.grp > 1).order_by(DP.name.desc(), DP.id)]
        return [(p.id, len(p.kids)) for p in s.query(DP).options(joinedload(DP.kids)).order_by(DP.id).limit(7)]
    outs = []
    for sess in (env.one, lambda: env.Session(consistency="strong")):
        with sess() as s:
            outs.append(outcome(read, s))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("model", ["plain", "dataclass"])
def test_unique_by_identity_keeps_rows_of_later_shards(env, model):
    """unique() tells ORM objects apart by identity.  A scatter without ORDER BY reads the
    shards one after the other; an object of a finished shard that the caller let go must
    not let an object of a later shard, given its id(), pass for a duplicate."""
    M = P if model == "plain" else DP
    stmt = select(M).options(joinedload(M.kids))
    with env.one() as o:
        want = sorted((p.id, [k.no for k in p.kids]) for p in o.scalars(stmt).unique())
    with env.Session(consistency="strong") as s:
        got = sorted((p.id, [k.no for k in p.kids]) for p in s.scalars(stmt).unique())
        # (and the same through legacy Query, which uniques the entities it returns)
        legacy = sorted((p.id, [k.no for k in p.kids]) for p in s.query(M).options(joinedload(M.kids)))
    assert got == want and legacy == want
    assert len(want) > 2 * len(env.cluster.shard_names)
