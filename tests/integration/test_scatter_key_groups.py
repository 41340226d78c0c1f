"""A cross-shard read GROUPED BY the one-column shard key of a hash group, with an
aggregate the merge cannot combine from per-shard partials (``string_agg``, ``array_agg``,
``jsonb_agg``, ``percentile_cont ... WITHIN GROUP``, ``mode()``, ``count(DISTINCT x)`` of a
non-key column, an expression over aggregates, a ``CREATE AGGREGATE`` of the
application's). Every group is whole on one shard, so each shard computes it as one
database does and the merge concatenates the groups (then ORDER BY / LIMIT / OFFSET).
Each query is compared with ONE plain database holding every row (as
``test_scatter_exact`` does, whose ``run_oracle``/``run_sharded`` this module
reuses with its own tables).

Before the change each of these was refused with ``ScatterRefused``; still refused: the
key of a custom-strategy group, GROUP BY a non-key column, the key of an outer join's
optional side, and a nullable key column whose NULL-key rows (written by SQL outside
shardkit) may be on several shards, which would make one NULL group per shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Engine,
    Integer,
    Text,
    create_engine,
    desc,
    distinct,
    func,
    insert,
    literal,
    nulls_first,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker
from test_scatter_exact import run_oracle, run_sharded

import shardkit

pytestmark = pytest.mark.integration


class KBase(DeclarativeBase):
    pass


class Tenant(KBase):
    __tablename__ = "kg_tenants"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


class Job(KBase):
    __tablename__ = "kg_jobs"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=False)
    name = mapped_column(Text)
    state = mapped_column(Text)
    n = mapped_column(Integer)


class Note(KBase):
    """Keyed by a nullable column (shardkit refuses NULL keys; SQL outside it may write one)."""
    __tablename__ = "kg_notes"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=True)
    body = mapped_column(Text)


class Custom(KBase):
    __tablename__ = "kg_custom"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    k = mapped_column(BigInteger, nullable=False)
    v = mapped_column(Text)


def custom_shard(key):
    """A custom strategy (one shard per key, which shardkit cannot know)."""
    return f"s{key % 3}"


GROUPS = {"groups": {
    "kg": {"strategy": "hash", "tables": {"kg_tenants": "id", "kg_jobs": "tenant_id"}},
    "kgn": {"strategy": "hash", "tables": {"kg_notes": "tenant_id"}},
    "kgc": {"strategy": "custom", "tables": {"kg_custom": "k"}, "function": custom_shard},
}}
TABLES = ("kg_tenants", "kg_jobs", "kg_notes", "kg_custom")
AGG_DDL = "CREATE OR REPLACE AGGREGATE kg_total(int) (sfunc = int4pl, stype = int4, initcond = '0')"


@dataclass
class Kg:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine


@pytest.fixture(scope="module")
def kg(shardkit_module_cluster_factory) -> Iterator[Kg]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=KBase.metadata)
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS kg_oracle"))
        c.execute(text("CREATE DATABASE kg_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="kg_oracle"))
    for eng in [cluster.primary(s) for s in cluster.shard_names] + [oracle]:
        KBase.metadata.create_all(eng)
        with eng.begin() as c:
            c.execute(text(AGG_DDL))
    env = Kg(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle)
    load(env)
    yield env
    oracle.dispose()
    cluster.dispose()


NAMES = ["a", "b", "a", None, "c", "b", "dd"]


def load(env: Kg) -> None:
    truncate_everywhere(env.cluster, *TABLES)
    tenants = [{"id": t, "name": f"t{t}"} for t in range(1, 16)]
    ids = itertools.count(1)
    jobs = [{"id": next(ids), "tenant_id": t, "name": NAMES[(t + j) % len(NAMES)],
             "state": "new" if (t + j) % 3 else "done", "n": None if (t * j) % 7 == 3 else (t * 5 + j * 3) % 11}
            for t in range(1, 16) for j in range(t % 6)]
    notes = [{"id": i, "tenant_id": t, "body": f"b{i % 4}"} for i, t in enumerate(range(1, 10), start=1)]
    customs = [{"id": i, "k": i % 5, "v": f"v{i % 3}"} for i in range(1, 20)]
    with env.oracle.begin() as c:
        c.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
        for model, rows in ((Tenant, tenants), (Job, jobs), (Note, notes), (Custom, customs)):
            c.execute(insert(model), rows)
    with env.Session() as s:
        for model, rows in ((Tenant, tenants), (Job, jobs), (Note, notes), (Custom, customs)):
            s.execute(insert(model), rows)
        s.commit()
    shards = {env.cluster.shard_for("kg_jobs", t) for t in range(1, 16)}
    assert len(shards) == 3, "every shard holds groups"


def same(env: Kg, stmt: Any, *, ordered: bool) -> list[Any]:
    want_keys, want = run_oracle(env, stmt)
    got_keys, got = run_sharded(env, stmt)
    assert got_keys == want_keys
    if not ordered:
        want, got = sorted(want, key=repr), sorted(got, key=repr)
    assert got == want, f"\nsharded:      {got}\none database: {want}"
    return want


STRING_AGG = func.string_agg(Job.name, aggregate_order_by(literal(","), Job.id.desc()))
K = Job.tenant_id

UNORDERED = {
    "string_agg ordered inside": select(K, STRING_AGG).group_by(K),
    "array_agg": select(K, func.array_agg(aggregate_order_by(Job.n, Job.id))).group_by(K),
    "jsonb_agg": select(K, func.jsonb_agg(aggregate_order_by(Job.name, Job.id))).group_by(K),
    "percentile_cont": select(K, func.percentile_cont(0.5).within_group(Job.n)).group_by(K),
    "mode": select(K, func.mode().within_group(Job.name)).group_by(K),
    "count distinct non-key": select(K, func.count(distinct(Job.name)), func.sum(Job.n)).group_by(K),
    "beside mergeable, key not selected": select(func.count(), STRING_AGG.label("s")).group_by(K),
    "expression over aggregates": select(K, func.sum(Job.n) * 2 + func.count()).group_by(K),
    "user aggregate": select(K, func.kg_total(Job.n)).group_by(K),
    "having on count": select(K, STRING_AGG).group_by(K).having(func.count() > 2),
    "having on string_agg": select(K, STRING_AGG).group_by(K).having(STRING_AGG.like("%a%")),
    "having on count distinct": select(K, func.array_agg(aggregate_order_by(Job.id, Job.id)))
    .group_by(K).having(func.count(distinct(Job.name)) >= 2),
    "grouped by key and state": select(K, Job.state, STRING_AGG).group_by(K, Job.state),
    "joined on the key": select(Tenant.id, Tenant.name, STRING_AGG).join(Job, Job.tenant_id == Tenant.id)
    .group_by(Tenant.id),
    "where": select(K, STRING_AGG).where(Job.state == "new").group_by(K),
    "distinct, key not selected": select(func.count(distinct(Job.name)).label("c")).group_by(K).distinct(),
    "distinct, key selected": select(K, func.count(distinct(Job.name))).group_by(K).distinct(),
}

ORDERED = {
    "order by key, limit, offset": select(K, STRING_AGG).group_by(K).order_by(K.desc()).limit(4).offset(3),
    "order by string_agg, limit": select(K, STRING_AGG.label("s")).group_by(K)
    .order_by(STRING_AGG.desc(), K).limit(5),
    "order by unselected aggregate": select(K, func.percentile_cont(0.5).within_group(Job.n).label("p"))
    .group_by(K).order_by(func.count(distinct(Job.name)).desc().nulls_last(), K).limit(4).offset(2),
    "order by label, offset only": select(K, func.mode().within_group(Job.name).label("m")).group_by(K)
    .order_by(nulls_first(desc("m")), K).offset(5),
    "having, order, page": select(K, STRING_AGG).group_by(K).having(func.count() > 1)
    .order_by(K).limit(3).offset(1),
    "distinct ordered, key not selected": select(func.count(distinct(Job.name)).label("c")).group_by(K)
    .distinct().order_by(desc("c")).limit(2),
}


@pytest.mark.parametrize("name", list(UNORDERED))
def test_grouped_by_the_key_is_exact(kg, name):
    stmt = UNORDERED[name]
    same(kg, stmt, ordered=False)
    assert "grouped by the shard key kg_" in kg.cluster.explain(stmt).merge


@pytest.mark.parametrize("name", list(ORDERED))
def test_grouped_by_the_key_ordered_and_paged_is_exact(kg, name):
    same(kg, ORDERED[name], ordered=True)


def test_mergeable_aggregates_keep_the_group_by_merge(kg):
    stmt = select(K, func.count(), func.sum(Job.n)).group_by(K)
    same(kg, stmt, ordered=False)
    assert kg.cluster.explain(stmt).merge.startswith("group-by merge")


def test_orm_string_agg_grouped_by_the_key(kg):
    with kg.Session() as s:
        got = sorted(s.query(Job.tenant_id, func.string_agg(Job.name, ",")).group_by(Job.tenant_id).all())
    want = sorted(tuple(r) for r in run_oracle(kg, select(K, func.string_agg(Job.name, ",")).group_by(K))[1])
    # (string_agg without ORDER BY: the order inside each string is the database's own)
    assert [r[0] for r in got] == [r[0][1] for r in want]


REFUSED = {
    "custom strategy key": (select(Custom.k, func.string_agg(Custom.v, ",")).group_by(Custom.k), "string_agg()"),
    "non-key column": (select(Job.state, STRING_AGG).group_by(Job.state), "string_agg()"),
    "count distinct, non-key group": (select(Job.state, func.count(distinct(Job.name))).group_by(Job.state),
                                      "count(DISTINCT)"),
    "custom key, count distinct": (select(Custom.k, func.count(distinct(Custom.v))).group_by(Custom.k),
                                   "count(DISTINCT)"),
    "key on the optional side": (select(Job.tenant_id, STRING_AGG).select_from(Tenant)
                                 .outerjoin(Job, Job.tenant_id == Tenant.id).group_by(Job.tenant_id),
                                 "string_agg()"),
    "nullable key": (select(Note.tenant_id, func.string_agg(Note.body, ",")).group_by(Note.tenant_id),
                     "GROUP BY a nullable shard key"),
    "window beside the groups": (select(K, STRING_AGG, func.rank().over(order_by=func.count())).group_by(K),
                                 "window function"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_still_refused(kg, name):
    stmt, construct = REFUSED[name]
    with kg.Session() as s:
        with pytest.raises(shardkit.ScatterRefused) as e:
            s.execute(stmt).all()
    assert e.value.construct == construct, str(e.value)


def test_null_keys_on_several_shards(kg):
    """Rows with a NULL key written by SQL outside shardkit, on two shards: one database
    makes one NULL group; grouped by the nullable key the read is refused, and with
    ``key IS NOT NULL`` (or a comparison) it is exact."""
    body = func.string_agg(Note.body, aggregate_order_by(literal(","), Note.id))
    try:
        for i, s in enumerate(kg.cluster.shard_names[:2]):
            for eng in (kg.cluster.primary(s), kg.oracle):
                with eng.begin() as c:
                    c.execute(text("INSERT INTO kg_notes VALUES (:id, NULL, :b)"), {"id": 100 + i, "b": f"null{i}"})
        stmt = select(Note.tenant_id, body).group_by(Note.tenant_id)
        assert len([r for r in run_oracle(kg, stmt)[1] if r[0] == ("NoneType", None)]) == 1
        with kg.Session() as s:
            with pytest.raises(shardkit.ScatterRefused, match="NULL") as e:
                s.execute(stmt).all()
        assert e.value.construct == "GROUP BY a nullable shard key"
        same(kg, select(Note.tenant_id, body).where(Note.tenant_id.is_not(None)).group_by(Note.tenant_id),
             ordered=False)
        same(kg, select(Note.tenant_id, body).where(Note.tenant_id > 2).group_by(Note.tenant_id)
             .order_by(Note.tenant_id).limit(3), ordered=True)
    finally:
        for eng in [kg.cluster.primary(s) for s in kg.cluster.shard_names] + [kg.oracle]:
            with eng.begin() as c:
                c.execute(text("DELETE FROM kg_notes WHERE tenant_id IS NULL"))


def test_entity_beside_string_agg_grouped_by_its_primary_key(kg):
    """``select(Tenant, string_agg(...))`` grouped by Tenant.id (the key and primary key):
    the entities and their groups' strings, as on one database."""
    stmt = select(Tenant, STRING_AGG).join(Job, Job.tenant_id == Tenant.id).group_by(Tenant.id)
    with kg.Session() as s:
        got = sorted((t.id, t.name, v) for t, v in s.execute(stmt).all())
    with Session(kg.oracle) as s:
        want = sorted((t.id, t.name, v) for t, v in s.execute(stmt).all())
    assert got == want and len(want) > 5
