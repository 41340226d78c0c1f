"""SQLAlchemy 2.0/2.1 ORM features a modern codebase uses, through a ``ShardedSession`` on a
3-shard cluster, compared with a plain ``Session`` on ONE database (``smo_oracle``) holding
the same rows, and rows placed where their key belongs (read from each shard's primary).

Covered: write-only (``WriteOnlyMapped``) and dynamic (``DynamicMapped``) collections within
a group and across groups; ``MappedAsDataclass`` models whose key comes from a
``default_factory`` or an ``insert_default``; window functions an ORM entity loads by itself
(a ``column_property()``, a ``query_expression()`` default, ``with_expression()``), which each
shard computed over its own rows only (silently wrong before); ``Bundle`` in an aggregate
query; the advice of the ORM bulk ``INSERT ... RETURNING`` refusal.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from own_tables import keys_per_shard, one_database
from sqlalchemy import BigInteger, ForeignKey, Integer, Text, func, insert, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    Bundle,
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    MappedAsDataclass,
    Session,
    WriteOnlyMapped,
    aliased,
    column_property,
    defer,
    joinedload,
    load_only,
    mapped_column,
    query_expression,
    relationship,
    sessionmaker,
    with_expression,
)

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "smo_tenants"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)
    score: Mapped[int] = mapped_column(Integer, default=0)
    expr: Mapped[int | None] = query_expression()
    # colocated children (keyed by the tenant's id)
    tasks: WriteOnlyMapped[Task] = relationship(order_by="Task.id", cascade="all, delete-orphan",
                                                passive_deletes=True)
    # another group's rows (keyed by their own id), related by a plain column
    events: WriteOnlyMapped[Event] = relationship(
        primaryjoin="Tenant.id == foreign(Event.tenant_id)", order_by="Event.id")
    devents: DynamicMapped[Event] = relationship(
        primaryjoin="Tenant.id == foreign(Event.tenant_id)", order_by="Event.id", overlaps="events")


class Task(Base):
    __tablename__ = "smo_tasks"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("smo_tenants.id", ondelete="CASCADE"),
                                           primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(Text)
    tenant: Mapped[TenantW] = relationship("TenantW", viewonly=True)


class Event(Base):
    __tablename__ = "smo_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(Text)


_t = Tenant.__table__


class TenantW(Base):
    """The tenants table, with window functions among what the entity loads."""
    __table__ = _t
    total = column_property(func.count().over())                          # over every row
    by_key = column_property(func.sum(_t.c.score).over(partition_by=_t.c.id))  # one key's rows
    ranked = query_expression(default_expr=func.row_number().over(order_by=_t.c.id))


class DBase(MappedAsDataclass, DeclarativeBase):
    metadata = Base.metadata


class Org(DBase):
    __tablename__ = "smo_orgs"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, init=False, default_factory=uuid.uuid4)
    name: Mapped[str] = mapped_column(Text)
    members: Mapped[list[OrgMember]] = relationship(default_factory=list, back_populates="org")


class OrgMember(DBase):
    __tablename__ = "smo_org_members"
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("smo_orgs.id"), primary_key=True, init=False)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    org: Mapped[Org | None] = relationship(default=None, back_populates="members")


class Doc(DBase):
    __tablename__ = "smo_docs"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, init=False, insert_default=uuid.uuid4)
    body: Mapped[str] = mapped_column(Text)


GROUPS = {"groups": {
    "t": {"strategy": "hash", "tables": {"smo_tenants": "id", "smo_tasks": "tenant_id"}},
    "e": {"strategy": "hash", "tables": {"smo_events": "id"}},
    "o": {"strategy": "hash", "tables": {"smo_orgs": "id", "smo_org_members": "org_id"}},
    "d": {"strategy": "hash", "tables": {"smo_docs": "id"}},
}}
TABLES = "smo_tasks, smo_tenants, smo_events, smo_org_members, smo_orgs, smo_docs"


class Env:
    def __init__(self, cluster: shardkit.Cluster, oracle: Any) -> None:
        self.cluster = cluster
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        self.oracle = oracle
        by_shard = keys_per_shard(cluster, "smo_tenants", 3)
        self.tenants = sorted(k for ks in by_shard.values() for k in ks)

    def reset(self) -> None:
        for eng in [self.cluster.primary(s) for s in self.cluster.shard_names] + [self.oracle]:
            with eng.begin() as c:
                c.execute(text(f"TRUNCATE {TABLES}"))
        for mk in (self.O, self.Session):
            with mk() as s:
                for i, t in enumerate(self.tenants):
                    s.add(Tenant(id=t, name=f"t{i % 4}", score=i % 3))
                s.flush()
                for t in self.tenants:
                    ten = s.get(Tenant, t)
                    for j in range(3):
                        ten.tasks.add(Task(id=j + 1, title=f"x{t}.{j}"))
                        ten.events.add(Event(id=t * 10 + j, kind=f"k{j}"))
                s.commit()

    def O(self) -> Session:  # noqa: N802 - the oracle's session
        return Session(self.oracle)

    def placed(self, sql: str) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).connect() as c:
                out[s] = sorted(tuple(r) for r in c.execute(text(sql)))
        return out

    def all_placed_by(self, table: str, sql: str) -> bool:
        """Every row ``sql`` reads on a shard has its key (first column) owned by that shard."""
        return all(self.cluster.shard_for(table, r[0]) == s
                   for s, rows in self.placed(sql).items() for r in rows)


@pytest.fixture(scope="module")
def env_(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.drop_all(cluster.primary(s))
        Base.metadata.create_all(cluster.primary(s))
    oracle = one_database(dev, "smo_oracle", Base.metadata)
    env = Env(cluster, oracle)
    yield env
    oracle.dispose()
    cluster.dispose()


@pytest.fixture
def env(env_: Env) -> Env:
    env_.reset()
    return env_


def both(env: Env, fn: Callable[[Session], Any]) -> Any:
    """``fn`` on the one database and on the cluster: the same answer."""
    with env.O() as s:
        want = fn(s)
    with env.Session() as s:
        got = fn(s)
    assert got == want, f"\nsharded:      {got!r}\none database: {want!r}"
    return want


def refused(env: Env, fn: Callable[[Session], Any], construct: str) -> shardkit.ScatterRefused:
    with env.O() as s:
        fn(s)   # runs on one database
    with env.Session() as s, pytest.raises(shardkit.ScatterRefused) as e:
        fn(s)
    assert e.value.construct == construct, e.value
    return e.value


# ---------------------------------------------------------------------------
# Window functions an entity loads by itself
# ---------------------------------------------------------------------------


def test_a_window_column_property_is_refused_across_shards_and_exact_on_one(env):
    """``column_property(func.count().over())`` is the number of rows the query reads: each
    shard counted its own (4, 3, 2 instead of 9 for every row)."""
    e = refused(env, lambda s: [(t.id, t.total) for t in s.scalars(select(TenantW).order_by(TenantW.id))],
                "window function")
    assert "count(*) OVER ()" in str(e) and "defer()" in str(e)
    # the Query API, an aliased entity, a key IN (...) of two shards: the same
    A = aliased(TenantW)
    two = [env.tenants[0], env.tenants[-1]]
    assert env.cluster.shard_for("smo_tenants", two[0]) != env.cluster.shard_for("smo_tenants", two[1])
    refused(env, lambda s: [t.total for t in s.query(TenantW).order_by(TenantW.id)], "window function")
    refused(env, lambda s: [t.total for t in s.scalars(select(A).order_by(A.id))], "window function")
    refused(env, lambda s: [t.total for t in s.scalars(select(TenantW).where(TenantW.id.in_(two)))],
            "window function")
    # a joined eager load of such an entity, in the ORM's own derived table (LIMIT)
    refused(env, lambda s: [t.tenant.total for t in s.scalars(
        select(Task).options(joinedload(Task.tenant)).order_by(Task.tenant_id, Task.id).limit(4))],
        "window function")
    # on one shard, exact: by key, by get(), inside scope(shard=...)
    k = env.tenants[1]
    both(env, lambda s: [(t.id, t.total, t.by_key, t.ranked)
                         for t in s.scalars(select(TenantW).where(TenantW.id == k))])
    both(env, lambda s: s.get(TenantW, k).total)
    with env.Session() as s, shardkit.scope(shard=env.cluster.shard_names[0]):
        ts = s.scalars(select(TenantW)).all()
        assert {t.total for t in ts} == {len(ts)}
    # without the window columns, merged as usual; selected explicitly, the merge refuses
    both(env, lambda s: [(t.id, t.name) for t in s.scalars(
        select(TenantW).options(load_only(TenantW.id, TenantW.name)).order_by(TenantW.id))])
    refused(env, lambda s: s.execute(select(TenantW.id, TenantW.total)).all(), "window function")


def test_a_query_expression_default_window_is_refused_across_shards(env):
    # row_number() OVER (ORDER BY id): each shard numbered its own rows from 1
    refused(env, lambda s: [(t.id, t.ranked) for t in s.scalars(
        select(TenantW).options(defer(TenantW.total), defer(TenantW.by_key)).order_by(TenantW.id))],
        "window function")


def test_with_expression_windows_are_refused_across_shards_unless_partitioned_by_the_key(env):
    refused(env, lambda s: [(t.id, t.expr) for t in s.scalars(
        select(Tenant).options(with_expression(Tenant.expr, func.count().over())).order_by(Tenant.id))],
        "window function")
    refused(env, lambda s: [(t.id, t.expr) for t in s.scalars(
        select(Tenant).options(with_expression(Tenant.expr, func.row_number().over(order_by=Tenant.id)))
        .order_by(Tenant.id).limit(3))], "window function")
    # partitioned by the shard key, each partition is on one shard: exact, merged
    both(env, lambda s: [(t.id, t.expr) for t in s.scalars(
        select(Tenant).options(with_expression(Tenant.expr, func.sum(Tenant.score).over(partition_by=Tenant.id)))
        .order_by(Tenant.id))])
    both(env, lambda s: [(t.id, t.by_key) for t in s.scalars(
        select(TenantW).options(load_only(TenantW.id, TenantW.by_key)).order_by(TenantW.id))])
    # with_expression of plain expressions, ordered by them, paged
    e = (Tenant.score * 1000 + Tenant.id).label("e")
    both(env, lambda s: [(t.id, t.expr) for t in s.scalars(
        select(Tenant).options(with_expression(Tenant.expr, e)).order_by(e.desc()).limit(4))])
    # by key, exact
    k = env.tenants[2]
    both(env, lambda s: [(t.id, t.expr) for t in s.scalars(
        select(Tenant).where(Tenant.id == k).options(with_expression(Tenant.expr, func.count().over())))])


def test_explain_refuses_an_entity_window_as_execution_does(env):
    with pytest.raises(shardkit.ScatterRefused) as e:
        env.cluster.explain(select(TenantW))
    assert e.value.construct == "window function"
    # a window the statement selects itself is still described as the merge's refusal
    assert env.cluster.explain(select(Tenant.id, func.count().over())).merge.startswith("refused")


# ---------------------------------------------------------------------------
# Bundle, bulk INSERT ... RETURNING
# ---------------------------------------------------------------------------


def test_bundles_merge_and_a_bundle_in_an_aggregate_query_is_refused_by_name(env):
    b = Bundle("b", Tenant.id, Tenant.name)
    both(env, lambda s: [tuple(r.b) for r in s.execute(select(b).order_by(Tenant.name, Tenant.id))])
    both(env, lambda s: [tuple(r.b) for r in s.execute(select(b).order_by(Tenant.id.desc()).limit(3))])
    g = Bundle("g", Tenant.name, func.count().label("n"))
    e = refused(env, lambda s: s.execute(select(g).group_by(Tenant.name)).all(), "Bundle with aggregates")
    assert "'g'" in str(e)
    refused(env, lambda s: s.execute(select(Bundle("n", Tenant.name), func.count())
                                     .group_by(Tenant.name)).all(), "Bundle with aggregates")
    # what it says to do
    both(env, lambda s: sorted(tuple(r) for r in s.execute(
        select(Tenant.name, func.count()).group_by(Tenant.name))))


def test_orm_bulk_insert_returning_points_to_the_core_form(env):
    rows = [{"id": k, "name": f"n{k}", "score": 0} for k in (1001, 1000, 1002)]
    with env.Session() as s, pytest.raises(shardkit.RoutingError, match=r"insert\(Model.__table__\)"):
        s.scalars(insert(Tenant).returning(Tenant, sort_by_parameter_order=True), rows)


@pytest.mark.parametrize("columns", [("id",), ("id", "name"), ("id", "name", "score")])
def test_upsert_returning_in_parameter_order_with_runs_of_one_and_of_several_rows(env, columns):
    """An upsert with ``returning(..., sort_by_parameter_order=True)`` runs each run of
    consecutive rows of one shard as a statement there: a run of one row as a single
    INSERT, a longer one as an executemany, whose RETURNING SQLAlchemy extends with a
    sentinel column it sorts by.  The runs' rows were read by the first run's result: a
    column too many, or one (or every one) too few."""
    by_shard = keys_per_shard(env.cluster, "smo_tenants", 20)
    fresh = {sh: [k for k in ks if k not in env.tenants][:4] for sh, ks in by_shard.items()}
    a, b, c = fresh.values()
    for first in ([a[0]], [a[0], a[1]]):
        keys = first + [b[0], c[0], c[1], c[2], a[2], env.tenants[0], b[1], b[2]]
        rows = [{"id": k, "name": f"n{k}", "score": 1} for k in keys]
        cols = [_t.c[n] for n in columns]

        def work(s: Session) -> Any:
            st = postgresql.insert(_t)
            st = st.on_conflict_do_update(index_elements=["id"], set_={"name": st.excluded.name})
            out = [tuple(r) for r in s.execute(st.returning(*cols, sort_by_parameter_order=True), rows)]
            s.rollback()
            return out
        got = both(env, work)
        assert [r[:2] for r in got] == [(r["id"], r["name"])[:len(columns)] for r in rows]
        assert {len(r) for r in got} == {len(columns)}


# ---------------------------------------------------------------------------
# Write-only and dynamic collections
# ---------------------------------------------------------------------------


def test_write_only_collections_within_a_group(env):
    t0, t1, t2 = env.tenants[0], env.tenants[3], env.tenants[6]

    def work(s: Session) -> Any:
        a = s.get(Tenant, t0)
        a.tasks.remove(s.scalars(a.tasks.select().where(Task.id == 2)).one())
        a.tasks.add(Task(id=9, title="added"))
        b = s.get(Tenant, t1)
        s.execute(b.tasks.insert(), [{"id": 10, "title": "i"}, {"id": 11, "title": "j"}])
        r1 = s.execute(b.tasks.update().values(title="u").where(Task.id > 2)).rowcount
        r2 = s.execute(s.get(Tenant, t2).tasks.delete().where(Task.id == 1)).rowcount
        s.commit()
        return r1, r2, [[(x.id, x.title) for x in s.scalars(s.get(Tenant, t).tasks.select())]
                        for t in env.tenants]
    both(env, work)
    assert env.all_placed_by("smo_tenants", "SELECT tenant_id FROM smo_tasks")


def test_write_only_and_dynamic_collections_across_groups(env):
    t0 = env.tenants[1]

    def work(s: Session) -> Any:
        t = s.get(Tenant, t0)
        t.events.add(Event(id=7001, kind="w"))
        s.execute(t.events.insert(), [{"id": 7002 + i, "kind": "i"} for i in range(6)])
        t.devents.append(Event(id=7100, kind="d"))
        t.events.remove(s.get(Event, t0 * 10))
        s.flush()
        out = ([e.id for e in s.scalars(t.events.select().order_by(None).order_by(Event.id.desc()).limit(4))],
               t.devents.count(), [e.id for e in t.devents.filter(Event.kind == "i")], t.devents[1:3])
        s.commit()
        return out[:3] + ([e.id for e in out[3]],)
    both(env, work)
    assert env.all_placed_by("smo_events", "SELECT id FROM smo_events")
    # an UPDATE/DELETE of another group's rows by the parent's column alone has no shard key
    with env.Session() as s:
        t = s.get(Tenant, t0)
        with pytest.raises(shardkit.CrossShardWriteError, match="shardkit_all_shards"):
            s.execute(t.events.delete())
    both(env, lambda s: (s.execute(s.get(Tenant, t0).events.update().values(kind="z"),
                                   execution_options={"shardkit_all_shards": True}).rowcount,
                         s.scalars(select(Event.id).where(Event.kind == "z").order_by(Event.id)).all()))


# ---------------------------------------------------------------------------
# MappedAsDataclass
# ---------------------------------------------------------------------------


def test_dataclass_keys_from_a_default_factory_or_an_insert_default_are_placed_by_them(env):
    with env.Session() as s:
        orgs = [Org(name=f"o{i}", members=[OrgMember(id=1), OrgMember(id=2)]) for i in range(12)]
        s.add_all(orgs)
        s.add_all(Doc(body=f"d{i}") for i in range(12))
        s.commit()
        ids = {o.id for o in orgs}
        assert {o.id for o in s.scalars(select(Org))} == ids
        assert sorted(m.org_id for m in s.scalars(select(OrgMember))) == sorted(list(ids) * 2)
    assert env.all_placed_by("smo_orgs", "SELECT id FROM smo_orgs")
    assert env.all_placed_by("smo_orgs", "SELECT org_id FROM smo_org_members")
    assert env.all_placed_by("smo_docs", "SELECT id FROM smo_docs")
    assert all(env.placed("SELECT id FROM smo_docs").values())
