"""The merge of whole groups, attacked: a cross-shard read GROUPED BY the one-column
shard key of a hash group, with an aggregate the merge cannot combine from partials
(string_agg, array_agg, count(DISTINCT x) ...), runs whole on each shard and the merge
concatenates the groups.  Every query here is either exact (compared with ONE plain
database holding every row) or refused with ScatterRefused: never silently different.

Attacks: the key beside other GROUP BY columns, expressions of the key, a column named like
the key on a reference table / another group's table / an alias, outer joins, DISTINCT,
HAVING on a parameter, ORDER BY an aggregate with LIMIT + OFFSET, FILTER, window functions
over the groups, ROLLUP / GROUPING SETS / CUBE, NULL keys on two shards, a key under a
nondeterministic (case-insensitive) collation, and explain().
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import (
    BigInteger,
    Engine,
    Integer,
    Text,
    bindparam,
    cast,
    create_engine,
    distinct,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, aliased, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class HBase(DeclarativeBase):
    pass


class Tenant(HBase):
    __tablename__ = "hkg_tenants"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name = mapped_column(Text)


class Job(HBase):
    __tablename__ = "hkg_jobs"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=False)
    name = mapped_column(Text)
    n = mapped_column(Integer)


class Ref(HBase):
    """A reference table (a copy on every shard) with a column named like the key."""
    __tablename__ = "hkg_ref"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=False)


class Item(HBase):
    """Another hash group's table, with a non-key column named like the first group's key."""
    __tablename__ = "hkg_items"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id = mapped_column(BigInteger, nullable=False)
    tenant_id = mapped_column(BigInteger, nullable=False)
    v = mapped_column(Text)


class Word(HBase):
    """Keyed by text under a case-insensitive (nondeterministic) collation: 'Ab' and 'ab'
    are one value for the database, two keys (maybe on two shards) for the placement."""
    __tablename__ = "hkg_words"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    word = mapped_column(Text(collation="hkg_ci"), nullable=False)
    v = mapped_column(Text)


class Note(HBase):
    """Keyed by a nullable column."""
    __tablename__ = "hkg_notes"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id = mapped_column(BigInteger, nullable=True)
    body = mapped_column(Text)


GROUPS = {
    "reference_tables": ["hkg_ref"],
    "groups": {
        "hkg": {"strategy": "hash", "tables": {"hkg_tenants": "id", "hkg_jobs": "tenant_id"}},
        "hki": {"strategy": "hash", "tables": {"hkg_items": "owner_id"}},
        "hkn": {"strategy": "hash", "tables": {"hkg_notes": "tenant_id"}},
        "hkw": {"strategy": "hash", "tables": {"hkg_words": "word"}},
    },
}
TABLES = ("hkg_tenants", "hkg_jobs", "hkg_ref", "hkg_items", "hkg_notes", "hkg_words")
CI = "CREATE COLLATION IF NOT EXISTS hkg_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"


@dataclass
class Env:
    cluster: shardkit.Cluster
    Session: sessionmaker
    oracle: Engine
    icu: bool


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=HBase.metadata)
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("DROP DATABASE IF EXISTS hkg_oracle"))
        c.execute(text("CREATE DATABASE hkg_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="hkg_oracle"))
    with oracle.connect() as c:
        icu = bool(c.execute(text("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")).scalar())
    for eng in [cluster.primary(s) for s in cluster.shard_names] + [oracle]:
        with eng.begin() as c:
            # (Without ICU, a deterministic stand-in: the collation test is skipped.)
            c.execute(text(CI if icu else 'CREATE COLLATION IF NOT EXISTS hkg_ci FROM "C"'))
        HBase.metadata.create_all(eng)
    e = Env(cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), oracle, icu)
    load(e)
    yield e
    oracle.dispose()
    cluster.dispose()


NAMES = ["a", "b", "a", None, "c", "b", "dd"]
WORDS = [w for base in ("ab", "cd", "ef", "gh", "ij", "kl") for w in (base, base.upper(), base.title())]


def load(e: Env) -> None:
    truncate_everywhere(e.cluster, *TABLES)
    ids = itertools.count(1)
    rows = {
        Tenant: [{"id": t, "name": f"t{t}"} for t in range(1, 16)],
        Job: [{"id": next(ids), "tenant_id": t, "name": NAMES[(t + j) % len(NAMES)],
               "n": None if (t * j) % 7 == 3 else (t * 5 + j * 3) % 11}
              for t in range(1, 16) for j in range(t % 6)],
        # Ref.tenant_id does not follow the jobs' key: its groups span shards.
        Ref: [{"id": i, "tenant_id": i % 3} for i in range(0, 11)],
        Item: [{"id": i, "owner_id": i % 7, "tenant_id": i % 5 + 1, "v": f"v{i % 3}"} for i in range(1, 30)],
        Word: [{"id": i, "word": w, "v": f"v{i}"} for i, w in enumerate(WORDS, start=1)],
        Note: [{"id": i, "tenant_id": t, "body": f"b{i % 4}"} for i, t in enumerate(range(1, 10), start=1)],
    }
    with e.oracle.begin() as c:
        c.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
        for model, r in rows.items():
            c.execute(insert(model), r)
    with e.Session() as s:
        for model, r in rows.items():
            s.execute(insert(model), r)
        s.commit()
    assert len({e.cluster.shard_for("hkg_jobs", t) for t in range(1, 16)}) == 3


def exact(v: Any) -> Any:
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, Decimal):
        return ("Decimal", str(v))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(exact(x) for x in v))
    return (type(v).__name__, repr(v))


def rows(bind: Any, stmt: Any, params: Any, **kw: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with (Session(bind) if isinstance(bind, Engine) else bind()) as s:
        r = s.execute(stmt, params)
        return list(r.keys()), [tuple(exact(v) for v in row) for row in r.all()]


def same(e: Env, stmt: Any, params: Any = None, *, ordered: bool) -> list[Any]:
    want_keys, want = rows(e.oracle, stmt, params)
    got_keys, got = rows(e.Session, stmt, params)
    assert got_keys == want_keys
    msg = f"\nsharded:      {got}\none database: {want}"
    if ordered:
        assert got == want, msg
    else:
        assert Counter(got) == Counter(want), msg
    return want


def refused(e: Env, stmt: Any, params: Any = None) -> shardkit.ScatterRefused:
    with e.Session() as s:
        with pytest.raises(shardkit.ScatterRefused) as exc:
            s.execute(stmt, params).all()
    return exc.value


K = Job.tenant_id
SAGG = func.string_agg(Job.name, aggregate_order_by(literal(","), Job.id))
J1, J2 = aliased(Job), aliased(Job)
SAGG2 = func.string_agg(J2.name, aggregate_order_by(literal(","), J2.id))

EXACT = {
    "key and another column": (select(K, Job.n, SAGG).group_by(K, Job.n), None, False),
    "another column first, then key": (select(Job.name, K, func.array_agg(aggregate_order_by(Job.id, Job.id)))
                                       .group_by(Job.name, K), None, False),
    "key as a tuple with another": (select(K, Job.n, SAGG).group_by(tuple_(Job.n, K)), None, False),
    "self join on the key, grouped by the alias": (
        select(J2.tenant_id, SAGG2).select_from(J1).join(J2, J1.tenant_id == J2.tenant_id)
        .where(J1.n > 3).group_by(J2.tenant_id), None, False),
    "reference table joined, grouped by the key": (
        select(K, func.string_agg(cast(Ref.id, Text), aggregate_order_by(literal(","), Ref.id, Job.id)))
        .join(Ref, Ref.tenant_id == Job.n % 3).group_by(K), None, False),
    "key and the reference column": (
        select(K, Ref.tenant_id, SAGG).join(Ref, Ref.id == Job.n).group_by(Ref.tenant_id, K), None, False),
    "outer join, key on the preserved side": (
        select(Tenant.id, SAGG).select_from(Tenant).outerjoin(Job, Job.tenant_id == Tenant.id)
        .group_by(Tenant.id), None, False),
    "having on a parameter": (select(K, SAGG).group_by(K).having(func.count() > bindparam("m")), {"m": 2}, False),
    "having string_agg like a parameter": (
        select(K, SAGG).group_by(K).having(SAGG.like(bindparam("p"))), {"p": "%b%"}, False),
    "filter aggregates": (
        select(K, func.string_agg(Job.name, aggregate_order_by(literal(","), Job.id)).filter(Job.n > 3),
               func.count(distinct(Job.name)).filter(Job.n < 8), func.count().filter(Job.n > 1))
        .group_by(K), None, False),
    "having on a filter aggregate": (
        select(K, SAGG).group_by(K).having(func.count(distinct(Job.name)).filter(Job.n > 2) >= 2), None, False),
    "order by aggregates, limit, offset": (
        select(K, SAGG.label("s")).group_by(K).order_by(func.count().desc(), SAGG, K).limit(4).offset(3),
        None, True),
    "order by count distinct, page past the first shard's share": (
        select(K, func.count(distinct(Job.name)).label("c")).group_by(K)
        .order_by(func.count(distinct(Job.name)), K.desc()).limit(5).offset(6), None, True),
    "distinct, key not selected, ordered page": (
        select(func.count(distinct(Job.name)).label("c"), func.count().label("k")).group_by(K).distinct()
        .order_by(func.count().desc(), func.count(distinct(Job.name))).limit(3).offset(1), None, True),
    "distinct string_agg, key not selected": (
        select(func.string_agg(distinct(Job.name), ",").label("s")).group_by(K).distinct(), None, False),
    "key is not null, having over a nullable key": (
        select(Note.tenant_id, func.string_agg(Note.body, ",")).group_by(Note.tenant_id)
        .having(Note.tenant_id > 0), None, False),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact(env, name):
    stmt, params, ordered = EXACT[name]
    same(env, stmt, params, ordered=ordered)


REFUSED = {
    # An expression of the key is not the key (lower(a) = lower(A) on two shards).
    "key + 0": select((K + 0).label("k"), SAGG).group_by(K + 0),
    "cast of the key": select(cast(K, Text).label("k"), SAGG).group_by(cast(K, Text)),
    "key modulo": select((K % 3).label("k"), SAGG).group_by(K % 3),
    "lower of a text key": select(func.lower(Tenant.name), func.string_agg(Tenant.name, ","))
    .group_by(func.lower(Tenant.name)),
    # Columns named like the key on other tables.
    "reference column named like the key": select(Ref.tenant_id, SAGG).join(Ref, Ref.id == Job.n)
    .group_by(Ref.tenant_id),
    "other group's column named like the key": select(Item.tenant_id, func.string_agg(Item.v, ","))
    .group_by(Item.tenant_id),
    "two groups joined on a non-key": select(K, SAGG).join(Item, Item.tenant_id == Job.tenant_id).group_by(K),
    "self join on a non-key": select(J2.tenant_id, SAGG2).select_from(J1).join(J2, J1.n == J2.n)
    .group_by(J2.tenant_id),
    "self join on a non-key, grouped by the other alias": select(J1.tenant_id, SAGG2).select_from(J1)
    .join(J2, J1.n == J2.n).group_by(J1.tenant_id),
    # Outer joins.
    "key on the optional side": select(Job.tenant_id, SAGG).select_from(Tenant)
    .outerjoin(Job, Job.tenant_id == Tenant.id).group_by(Job.tenant_id),
    "full join": select(Tenant.id, SAGG).select_from(Tenant)
    .join(Job, Job.tenant_id == Tenant.id, full=True).group_by(Tenant.id),
    # Windows over the groups span shards.
    "rank over count": select(K, SAGG, func.rank().over(order_by=func.count())).group_by(K),
    "rank over string_agg": select(K, SAGG, func.rank().over(order_by=SAGG)).group_by(K),
    "window in order by": select(K, SAGG).group_by(K).order_by(func.rank().over(order_by=func.count())),
    "sum of count over all groups": select(K, SAGG, func.sum(func.count()).over()).group_by(K),
    "window partitioned by the key over groups": select(K, SAGG, func.count().over(partition_by=K)).group_by(K),
    # Grouping sets: ROLLUP's grand total spans shards.
    "rollup of the key": select(K, SAGG).group_by(func.rollup(K)),
    "key and rollup of another": select(K, Job.n, SAGG).group_by(K, func.rollup(Job.n)),
    "cube": select(K, Job.n, SAGG).group_by(func.cube(K, Job.n)),
    "grouping sets": select(K, SAGG).group_by(func.grouping_sets(K, tuple_())),
    "grouping sets with the key in every set": select(K, Job.n, SAGG)
    .group_by(func.grouping_sets(tuple_(K, Job.n), tuple_(K))),
    # NULL keys (written by SQL outside shardkit).
    "nullable key, having count": select(Note.tenant_id, func.string_agg(Note.body, ","))
    .group_by(Note.tenant_id).having(func.count() > 1),
    "nullable key, where or": select(Note.tenant_id, func.string_agg(Note.body, ","))
    .where(or_(Note.tenant_id > 3, Note.body == "b1")).group_by(Note.tenant_id),
    "nullable key, is distinct from": select(Note.tenant_id, func.string_agg(Note.body, ","))
    .where(Note.tenant_id.is_distinct_from(3)).group_by(Note.tenant_id),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused(env, name):
    err = refused(env, REFUSED[name])
    assert str(err)


@pytest.fixture
def null_keys(env):
    """Rows with a NULL key on two shards, written by SQL outside shardkit (and in the
    one database)."""
    try:
        for i, s in enumerate(env.cluster.shard_names[:2]):
            for eng in (env.cluster.primary(s), env.oracle):
                with eng.begin() as c:
                    c.execute(text("INSERT INTO hkg_notes VALUES (:id, NULL, :b)"), {"id": 100 + i, "b": f"n{i}"})
        yield
    finally:
        for eng in [env.cluster.primary(s) for s in env.cluster.shard_names] + [env.oracle]:
            with eng.begin() as c:
                c.execute(text("DELETE FROM hkg_notes WHERE tenant_id IS NULL"))


def test_null_keys_on_two_shards(env, null_keys):
    body = func.string_agg(Note.body, aggregate_order_by(literal(","), Note.id))
    stmt = select(Note.tenant_id, body).group_by(Note.tenant_id).having(func.count() > 1)
    assert rows(env.oracle, stmt, None)[1] == [(("NoneType", "None"), ("str", "'n0,n1'"))]
    err = refused(env, stmt)
    assert err.construct == "GROUP BY a nullable shard key"
    with env.Session() as s:
        with pytest.raises(shardkit.ScatterRefused, match="NULL"):
            s.query(Note.tenant_id, body).group_by(Note.tenant_id).having(func.count() > 1).all()
    # Excluding NULL: exact.
    same(env, select(Note.tenant_id, body).where(Note.tenant_id != None).group_by(Note.tenant_id)  # noqa: E711
         .having(func.count() >= 1), ordered=False)
    same(env, select(Note.tenant_id, body).group_by(Note.tenant_id).having(Note.tenant_id.in_([1, 2, 5])),
         ordered=False)


def test_explain_describes_the_merge_of_whole_groups(env):
    stmt = select(K, SAGG).group_by(K).having(func.count() > 1).order_by(K).limit(3).offset(2)
    merge = env.cluster.explain(stmt).merge
    assert "grouped by the shard key hkg_jobs.tenant_id" in merge, merge
    assert "each shard computes its groups whole" in merge and "ordered merge" in merge, merge
    assert "limit 3" in merge.lower() or "3" in merge, merge
    assert env.cluster.explain(select((K + 0).label("k"), SAGG).group_by(K + 0)).merge.startswith("refused")


def test_key_under_a_nondeterministic_collation(env):
    """'ab', 'AB' and 'Ab' are one group for the database; the placement hashes three
    strings, so at least one such group is on two shards: grouped by the key, the merge of
    whole groups would return one group per shard.  Refused, as the group-by merge is."""
    if not env.icu:
        pytest.skip("the server is built without ICU: no nondeterministic collation to test")
    placed = {w.lower(): set() for w in WORDS}
    for w in WORDS:
        placed[w.lower()].add(env.cluster.shard_for("hkg_words", w))
    assert any(len(s) > 1 for s in placed.values()), "a group spans shards"
    agg = func.string_agg(Word.v, aggregate_order_by(literal(","), Word.id))
    for stmt in (select(func.count(), agg).group_by(Word.word),
                 select(agg.label("s")).group_by(Word.word).order_by("s").limit(2),
                 select(func.count(distinct(Word.v))).group_by(Word.word)):
        assert len(rows(env.oracle, stmt, None)[1]) <= 6
        err = refused(env, stmt)
        assert "collation" in str(err), str(err)
    # The group-by merge refuses it too (the behaviour this matches).
    refused(env, select(func.count()).select_from(Word).group_by(Word.word))


SUBQUERIES = {
    "scalar subquery over another group in the select list": select(
        K, SAGG, select(func.count(Item.id)).scalar_subquery().label("c")).group_by(K),
    "scalar subquery over another group in HAVING": select(K, SAGG).group_by(K)
    .having(func.count() > select(func.count(Item.id)).where(Item.tenant_id == 1).scalar_subquery() - 4),
    "IN over another group's table": select(K, SAGG).where(Job.id.in_(select(Item.id).where(Item.v == "v1")))
    .group_by(K),
}


@pytest.mark.parametrize("name", list(SUBQUERIES))
def test_subqueries_over_other_shards_rows(env, name):
    """A subquery over another group's table reads each shard's own rows: refused, or exact."""
    stmt = SUBQUERIES[name]
    try:
        same(env, stmt, ordered=False)
    except shardkit.ScatterRefused:
        pass
