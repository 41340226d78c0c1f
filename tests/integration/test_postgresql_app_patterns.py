"""Common PostgreSQL application patterns written as Core/ORM
statements through ShardedSession, against the real cluster, each compared with ONE plain
database holding every row (or refused clearly with nothing written):

* job queue: SELECT ... FOR UPDATE SKIP LOCKED LIMIT n by tenant from 4 threads (each job
  claimed once, on the primary); UPDATE ... WHERE id IN (SELECT ... SKIP LOCKED LIMIT n)
  RETURNING, keyed and key-less;
* DML in CTEs (WITH moved AS (DELETE ... RETURNING) INSERT ... SELECT), insert().from_select();
* expanding IN lists of keys, tuple_().in_() on a composite key, = ANY(array) in its spellings,
  IN (SELECT FROM VALUES), a VALUES list joined to the key;
* text() with and without a named shard, select().from_statement(text());
* LATERAL, DISTINCT ON (key), FETCH ... WITH TIES, ROLLUP/GROUPING SETS, percentile_cont,
  array_agg/string_agg/jsonb_agg, keyed and across shards.

Defect found (the first test failed before the fix): an aggregate that is not merged
(string_agg, percentile_cont, array_agg, jsonb_agg) in a query already grouped by the shard key
was refused with "add the shard key", which it has; the refusal now names the subquery form
that runs exactly (tested below).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import cluster_with_tables, keys_per_shard, one_database, truncate_everywhere
from sqlalchemy import (BigInteger, Integer, Text, any_, bindparam, column, delete, func, insert, literal,
                        select, text, true, tuple_, update, values)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "cp7_tenants"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


class Job(Base):
    __tablename__ = "cp7_jobs"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=False)
    state = mapped_column(Text)
    n = mapped_column(Integer)


class Archive(Base):
    __tablename__ = "cp7_archive"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=False)
    state = mapped_column(Text)
    n = mapped_column(Integer)


class Pair(Base):
    __tablename__ = "cp7_pairs"
    a = mapped_column(Integer, primary_key=True, autoincrement=False)
    b = mapped_column(Integer, primary_key=True, autoincrement=False)
    v = mapped_column(Text)


CONFIG = {"groups": {
    "cp7": {"strategy": "hash", "tables": {"cp7_tenants": "id", "cp7_jobs": "tenant_id", "cp7_archive": "tenant_id"}},
    "cp7p": {"strategy": "hash", "tables": {"cp7_pairs": ["a", "b"]}},
}}


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    tenants: list[int]


def rows_for(tenants):
    jobs = []
    jid = 1
    for i, t in enumerate(tenants):
        for j in range(8):
            jobs.append({"id": jid, "tenant_id": t, "state": "new" if j % 3 else "done", "n": (jid * 7) % 5})
            jid += 1
    return jobs


@pytest.fixture(scope="module")
def env(sharded_dev):
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as cluster:
        oracle = one_database(sharded_dev, "cp7_oracle", Base.metadata)
        tenants = [k for ks in keys_per_shard(cluster, "cp7_tenants", 2).values() for k in ks]
        Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        try:
            yield Env(cluster, Sess, oracle, tenants)
        finally:
            oracle.dispose()


def load(env):
    truncate_everywhere(env.cluster, "cp7_tenants", "cp7_jobs", "cp7_archive", "cp7_pairs")
    with env.oracle.begin() as c:
        c.execute(text("TRUNCATE cp7_tenants, cp7_jobs, cp7_archive, cp7_pairs"))
    ts = [{"id": t, "name": f"t{t}"} for t in env.tenants]
    jobs = rows_for(env.tenants)
    pairs = [{"a": a, "b": b, "v": f"{a}-{b}"} for a in range(1, 6) for b in range(1, 6)]
    with env.oracle.begin() as c:
        c.execute(insert(Tenant.__table__), ts)
        c.execute(insert(Job.__table__), jobs)
        c.execute(insert(Pair.__table__), pairs)
    with env.Session() as s:
        s.execute(insert(Tenant), ts)
        s.execute(insert(Job), jobs)
        s.execute(insert(Pair), pairs)
        s.commit()


def per_shard(env, sql):
    out = {}
    for s in env.cluster.shard_names:
        with env.cluster.primary(s).connect() as c:
            out[s] = sorted(tuple(r) for r in c.execute(text(sql)))
    return out


def outcome(env, fn):
    try:
        with Session(env.oracle) as s:
            want = fn(s)
            s.rollback()
    except Exception as e:
        return f"ORACLE FAILS {type(e).__name__}: {e}"[:300]
    try:
        with env.Session() as s:
            got = fn(s)
            s.rollback()
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:400]
    return "exact" if got == want else f"WRONG\n got  {got}\n want {want}"


def _shard_of(env: Env, t: int) -> str:
    return env.cluster.shard_for(Job, t)


def _snapshot(env: Env) -> dict[str, Any]:
    return {t: per_shard(env, f"SELECT * FROM {t}") for t in ("cp7_jobs", "cp7_archive", "cp7_pairs")}


def refused_nothing_written(env: Env, fn: Any, error: type, match: str) -> Exception:
    before = _snapshot(env)
    with env.Session() as s:
        with pytest.raises(error, match=match) as e:
            fn(s)
        s.rollback()
    assert _snapshot(env) == before
    return e.value


# ---------------------------------------------------------------------------
# A non-mergeable aggregate grouped by the shard key: each shard computes its groups whole
# (it was refused, naming the subquery form below; test_scatter_key_groups
# covers the merge itself)
# ---------------------------------------------------------------------------

AGGS = {
    "string_agg": func.string_agg(Job.state, aggregate_order_by(literal(","), Job.id)),
    "percentile_cont": func.percentile_cont(0.5).within_group(Job.n),
    "array_agg": func.array_agg(aggregate_order_by(Job.id, Job.id.desc())),
    "jsonb_agg": func.jsonb_agg(aggregate_order_by(Job.id, Job.id)),
}


@pytest.mark.parametrize("name", list(AGGS))
def test_aggregate_grouped_by_the_key_is_exact_as_is_the_subquery_form(env, name):
    load(env)
    agg = AGGS[name]
    stmt = select(Job.tenant_id, agg).group_by(Job.tenant_id)
    assert outcome(env, lambda s: sorted(s.execute(stmt).all(), key=repr)) == "exact"
    assert outcome(env, lambda s: s.execute(stmt.order_by(Job.tenant_id.desc()).limit(3)).all()) == "exact"
    # The subquery form (the old advice) stays exact, also ordered and limited.
    sq = select(Job.tenant_id, agg.label("a")).group_by(Job.tenant_id).subquery()
    assert outcome(env, lambda s: sorted(s.execute(select(sq.c.tenant_id, sq.c.a)).all(), key=repr)) == "exact"
    assert outcome(env, lambda s: s.execute(select(sq.c.tenant_id, sq.c.a).order_by(sq.c.tenant_id.desc())
                                            .limit(3)).all()) == "exact"
    # Not grouped by the key: the old advice stands.
    with env.Session() as s:
        with pytest.raises(shardkit.ScatterRefused, match="add the shard key or compute it"):
            s.execute(select(Job.state, agg).group_by(Job.state)).all()
    # By key, it reads one shard, as on one database.
    t = env.tenants[0]
    assert outcome(env, lambda s: s.execute(select(Job.tenant_id, agg).where(Job.tenant_id == t)
                                            .group_by(Job.tenant_id)).all()) == "exact"


# ---------------------------------------------------------------------------
# Job queue
# ---------------------------------------------------------------------------


def test_job_queue_skip_locked_claims_each_job_once_from_four_threads(env):
    load(env)
    t = env.tenants[0]
    owner = _shard_of(env, t)
    with env.Session() as s:
        s.execute(insert(Job), [{"id": 1000 + i, "tenant_id": t, "state": "new", "n": i} for i in range(40)])
        s.commit()
    want = per_shard(env, f"SELECT id FROM cp7_jobs WHERE tenant_id = {t} AND state = 'new'")[owner]
    # The default consistency reads replicas: FOR UPDATE must still lock the primary's rows.
    Default = sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster)
    claimed: list[int] = []
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            with Default() as s:
                barrier.wait()
                while True:
                    jobs = s.scalars(select(Job).where(Job.tenant_id == t, Job.state == "new").order_by(Job.id)
                                     .with_for_update(skip_locked=True).limit(5)).all()
                    if not jobs:
                        s.commit()
                        return
                    for j in jobs:
                        j.state = "claimed"
                    claimed.extend(j.id for j in jobs)
                    s.commit()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert sorted(claimed) == [r[0] for r in want]  # each once
    assert per_shard(env, f"SELECT count(*) FROM cp7_jobs WHERE tenant_id = {t} AND state = 'new'")[owner] == [(0,)]
    # Key-less: a page per shard would lock rows outside the merged page: refused.
    with env.Session() as s:
        with pytest.raises(shardkit.ScatterRefused, match="FOR UPDATE with LIMIT"):
            s.scalars(select(Job).where(Job.state == "claimed").order_by(Job.id)
                      .with_for_update(skip_locked=True).limit(5)).all()


def _claim_subquery(*where: Any) -> Any:
    return (select(Job.id).where(*where).order_by(Job.id).with_for_update(skip_locked=True).limit(5)
            .scalar_subquery())


def test_job_queue_update_of_a_locked_subquery_is_refused_or_runs_on_the_named_shard(env):
    load(env)
    t = env.tenants[0]
    new = [Job.state == "new"]
    refused = [
        update(Job).where(Job.id.in_(_claim_subquery(Job.tenant_id == t, *new))),              # key inside only
        update(Job).where(Job.tenant_id == t, Job.id.in_(_claim_subquery(Job.tenant_id == t, *new))),  # both
        update(Job).where(Job.id.in_(_claim_subquery(*new))),                                   # key-less
    ]
    for stmt in refused:
        stmt = stmt.values(state="run").returning(Job.id)
        refused_nothing_written(env, lambda s, stmt=stmt: s.execute(stmt), shardkit.ScatterRefused,
                                "not correlated with the outer query on the shard key")
        refused_nothing_written(env, lambda s, stmt=stmt: s.execute(
            stmt, execution_options={"shardkit_all_shards": True}), shardkit.ScatterRefused, "not correlated")
    with env.Session() as s, shardkit.scope(key=t):
        with pytest.raises(shardkit.ScatterRefused):
            s.execute(refused[0].values(state="run"))
    # Named, the shard runs it as one database does (ORM RETURNING of the entity too).
    stmt = refused[0].values(state="run").returning(Job)
    opts = {"shardkit_shard": _shard_of(env, t)}
    assert outcome(env, lambda s: sorted((j.id, j.state) for j in s.scalars(stmt, execution_options=opts))) \
        == "exact"


# ---------------------------------------------------------------------------
# DML in CTEs, INSERT ... SELECT
# ---------------------------------------------------------------------------

COLS = ["id", "tenant_id", "state", "n"]


def _move(where: Any) -> Any:
    moved = delete(Job).where(where).returning(Job.id, Job.tenant_id, Job.state, Job.n).cte("moved")
    return insert(Archive).from_select(COLS, select(moved.c.id, moved.c.tenant_id, moved.c.state, moved.c.n))


def _copy(where: Any) -> Any:
    return insert(Archive).from_select(COLS, select(Job.id, Job.tenant_id, Job.state, Job.n).where(where))


@pytest.mark.parametrize("opts", [{}, {"shardkit_all_shards": True}], ids=["plain", "all-shards"])
def test_dml_cte_and_insert_from_select_are_refused_with_nothing_written(env, opts):
    load(env)
    t = env.tenants[0]
    for where in (Job.tenant_id == t, Job.n == 1):
        refused_nothing_written(env, lambda s, w=where: s.execute(_move(w), execution_options=opts),
                                shardkit.CrossShardWriteError, "data-modifying WITH")
        refused_nothing_written(env, lambda s, w=where: s.execute(_copy(w), execution_options=opts),
                                shardkit.CrossShardWriteError, "INSERT ... SELECT")
    with env.Session() as s, shardkit.scope(key=t):
        with pytest.raises(shardkit.CrossShardWriteError, match="INSERT ... SELECT"):
            s.execute(_copy(Job.tenant_id == t))


def test_dml_cte_and_insert_from_select_on_the_named_shard_are_one_databases(env):
    load(env)
    t = env.tenants[0]
    opts = {"shardkit_shard": _shard_of(env, t)}

    def run(stmt: Any) -> Any:
        def f(s: Any) -> Any:
            rc = s.execute(stmt, execution_options=opts).rowcount
            return rc, sorted(s.execute(select(Archive.id, Archive.tenant_id), execution_options=opts).all()), \
                sorted(s.execute(select(Job.id).where(Job.tenant_id == t)).scalars().all())
        return f

    assert outcome(env, run(_move(Job.tenant_id == t))) == "exact"
    assert outcome(env, run(_copy(Job.tenant_id == t))) == "exact"


# ---------------------------------------------------------------------------
# Lists of keys in their PostgreSQL spellings
# ---------------------------------------------------------------------------


def _reads(env: Env) -> dict[str, Any]:
    t0, t1 = env.tenants[0], env.tenants[-1]
    vv = values(column("t", BigInteger), name="v").data([(t0,), (t1,)])

    def ids(stmt: Any, params: Any = None) -> Any:
        return lambda s: sorted(s.execute(stmt, params).scalars().all())

    return {
        "expanding": ids(select(Job.id).where(Job.tenant_id.in_(bindparam("ts", expanding=True))), {"ts": [t0, t1]}),
        "expanding-empty": ids(select(Job.id).where(Job.tenant_id.in_(bindparam("ts", expanding=True))), {"ts": []}),
        "tuple-in": ids(select(Pair.v).where(tuple_(Pair.a, Pair.b).in_([(1, 2), (3, 4), (5, 5)]))),
        "any-literal": ids(select(Job.id).where(Job.tenant_id == any_(literal([t0, t1])))),
        "any-array": ids(select(Job.id).where(Job.tenant_id == any_(pg.array([t0, t1])))),
        "any-bind": ids(select(Job.id).where(Job.tenant_id == any_(bindparam("arr", type_=pg.ARRAY(BigInteger)))),
                        {"arr": [t0, t1]}),
        "any-text": ids(select(Job.id).where(text("tenant_id = ANY(:arr)")), {"arr": [t0, t1]}),
        "in-values": ids(select(Job.id).where(Job.tenant_id.in_(select(vv.c.t)))),
        "join-values": ids(select(Job.id).join(vv, vv.c.t == Job.tenant_id)),
    }


def test_key_lists_in_their_spellings_read_what_one_database_reads(env):
    load(env)
    for name, fn in _reads(env).items():
        assert (name, outcome(env, fn)) == (name, "exact")


def test_key_lists_that_do_not_narrow_a_write_are_refused_with_nothing_written(env):
    load(env)
    t0, t1 = env.tenants[0], env.tenants[-1]
    vv = values(column("t", BigInteger), name="v").data([(t0,), (t1,)])
    for stmt in (update(Job).where(Job.tenant_id == any_(literal([t0, t1]))).values(n=7),
                 delete(Job).where(Job.tenant_id == any_(pg.array([t0, t1]))),
                 update(Job).where(Job.tenant_id.in_(select(vv.c.t))).values(n=5),
                 update(Pair).where(tuple_(Pair.a, Pair.b).in_([(1, 2), (3, 4)])).values(v="x")):
        refused_nothing_written(env, lambda s, stmt=stmt: s.execute(stmt), shardkit.CrossShardWriteError,
                                "no shard key in its WHERE clause")
    # An expanding list splits a write by owner, as on one database.
    stmt = update(Job).where(Job.tenant_id.in_(bindparam("ts", expanding=True))).values(n=99)
    assert outcome(env, lambda s: (s.execute(stmt, {"ts": [t0, t1]}).rowcount,
                                   sorted(s.execute(select(Job.id).where(Job.n == 99)).scalars().all()))) == "exact"


# ---------------------------------------------------------------------------
# SQL text
# ---------------------------------------------------------------------------


def test_text_and_from_statement_are_refused_unless_a_shard_is_named(env):
    load(env)
    t = env.tenants[0]
    sql = "SELECT * FROM cp7_jobs WHERE tenant_id = :t ORDER BY id"
    for fn in (lambda s: s.execute(text(sql), {"t": t}).all(),
               lambda s: s.scalars(select(Job).from_statement(text(sql)), {"t": t}).all(),
               lambda s: s.scalars(select(Job).from_statement(
                   text(sql).columns(Job.id, Job.tenant_id, Job.state, Job.n)), {"t": t}).all()):
        with env.Session() as s:
            with pytest.raises(shardkit.RoutingError, match="cannot route a textual SQL statement"):
                fn(s)
    opts = {"shardkit_shard": _shard_of(env, t)}
    assert outcome(env, lambda s: s.execute(text(sql), {"t": t}, execution_options=opts).all()) == "exact"
    assert outcome(env, lambda s: [j.id for j in s.scalars(
        select(Job).from_statement(text(sql)).execution_options(**opts), {"t": t})]) == "exact"


# ---------------------------------------------------------------------------
# LATERAL, DISTINCT ON, FETCH WITH TIES, ROLLUP, ordered-set and array aggregates
# ---------------------------------------------------------------------------

def _constructs(env: Env) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    t = env.tenants[0]
    J = Job
    top = select(J.id, J.n).where(J.tenant_id == Tenant.id).order_by(J.n.desc(), J.id).limit(2).lateral("top")
    off = select(J.id).where(J.n == Tenant.id % 5).limit(2).lateral("off")

    def rows(stmt: Any, ordered: bool = True) -> Any:
        return lambda s: (lambda r: r if ordered else sorted(r, key=repr))(s.execute(stmt).all())

    exact = {
        "distinct-on-keyed": rows(pg_distinct_on(select(J.tenant_id, J.id).where(J.tenant_id == t), J.tenant_id)
                                  .order_by(J.tenant_id, J.id.desc())),
        "fetch-ties-keyed": rows(select(J.id, J.n).where(J.tenant_id == t).order_by(J.n).fetch(2, with_ties=True)),
        "rollup-keyed": rows(select(J.state, J.n, func.count()).where(J.tenant_id == t)
                             .group_by(func.rollup(J.state, J.n)), False),
        "percentile-keyed": rows(select(func.percentile_cont(0.5).within_group(J.n)).where(J.tenant_id == t)),
        "jsonb-agg-keyed": rows(select(func.jsonb_agg(aggregate_order_by(J.id, J.id))).where(J.tenant_id == t)),
        "tablesample": rows(select(func.count()).select_from(J.__table__.tablesample(func.bernoulli(100)))),
    }
    refused = {
        "lateral-keyed": (select(Tenant.id, top.c.id).join(top, true()).where(Tenant.id == t), "LIMIT"),
        "lateral": (select(Tenant.id, top.c.id).join(top, true()), "LIMIT"),
        "lateral-off-key": (select(Tenant.id, off.c.id).join(off, true()), "not joined on the shard key"),
        "distinct-on-key": (pg_distinct_on(select(J.tenant_id, J.id), J.tenant_id)
                            .order_by(J.tenant_id, J.id.desc()), "DISTINCT ON"),
        "fetch": (select(J.id, J.n).order_by(J.n, J.id).fetch(4), "FETCH FIRST"),
        "fetch-ties": (select(J.id, J.n).order_by(J.n).fetch(2, with_ties=True), "FETCH FIRST"),
        "rollup-by-key": (select(J.tenant_id, func.count()).group_by(func.rollup(J.tenant_id)), "ROLLUP"),
        "grouping-sets": (select(J.state, func.count()).group_by(func.grouping_sets(J.state, J.n)), "GROUPING SETS"),
        "jsonb-agg": (select(func.jsonb_agg(J.id)), "jsonb_agg"),
        "json-agg": (select(func.json_agg(J.id)), "json_agg"),
        "jsonb-object-agg": (select(func.jsonb_object_agg(J.id, J.n)), "jsonb_object_agg"),
        "array-agg-filter": (select(func.array_agg(J.id).filter(J.n > 1)), "array_agg"),
    }
    return exact, refused


def pg_distinct_on(stmt: Any, col: Any) -> Any:
    if hasattr(pg, "distinct_on"):
        return stmt.ext(pg.distinct_on(col))
    return stmt.distinct(col)


def test_constructs_keyed_are_exact_and_across_shards_refused(env):
    load(env)
    exact, refused = _constructs(env)
    for name, fn in exact.items():
        assert (name, outcome(env, fn)) == (name, "exact")
    for name, (stmt, what) in refused.items():
        with env.Session() as s:
            with pytest.raises(shardkit.ScatterRefused, match=what) as e:
                s.execute(stmt).all()
            assert e.value.construct, name
