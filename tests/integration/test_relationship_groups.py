"""Relationships whose rows are not on the object's shard: to a table of another group,
or within a group but joined on a column other than the shard key (a person's
referrer).  Their lazy loads read the related rows where they live (by key, or from
every shard); a joined or subquery eager load, which would relate each shard's rows
only, is refused and names selectinload(); a relationship joined on the key still
loads from the object's shard alone."""

from __future__ import annotations


import pytest
from sqlalchemy import BigInteger, inspect, select
from sqlalchemy.orm import (DeclarativeBase, Mapped, immediateload, joinedload, mapped_column,
                            relationship, selectinload, sessionmaker, subqueryload)

import shardkit
from own_tables import cluster_with_tables, statements_per_shard
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "relg_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    gadgets = relationship("Gadget", primaryjoin="Owner.id == foreign(Gadget.owner_id)",
                           viewonly=True, order_by="Gadget.id")
    purchases = relationship("Purchase", primaryjoin="Owner.id == foreign(Purchase.owner_id)",
                             viewonly=True, order_by="Purchase.id")


class Gadget(Base):  # another group: keyed by its own id
    __tablename__ = "relg_gadgets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger)
    owner = relationship("Owner", primaryjoin="foreign(Gadget.owner_id) == Owner.id", viewonly=True)
    # A claim the map contradicts (another group): refused where it is used.
    claimed_owner = relationship("Owner", primaryjoin="foreign(Gadget.owner_id) == Owner.id",
                                 viewonly=True, info={"shardkit_colocated": True})


class Purchase(Base):  # colocated with the owners on owner_id
    __tablename__ = "relg_purchases"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger)


class Person(Base):  # the owners' group, but a referrer is joined on referrer_id
    __tablename__ = "relg_people"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    referrer_id: Mapped[int | None] = mapped_column(BigInteger)
    referrer = relationship("Person", primaryjoin="foreign(Person.referrer_id) == Person.id",
                            remote_side="Person.id", viewonly=True)
    referred = relationship("Person", primaryjoin="Person.id == foreign(Person.referrer_id)",
                            viewonly=True, order_by="Person.id")


class Eager(Base):  # loads another group's rows in its own statement, by default
    __tablename__ = "relg_eager"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    gadgets = relationship("Gadget", primaryjoin="Eager.id == foreign(Gadget.owner_id)",
                           viewonly=True, lazy="joined")


class Project(Base):  # a tenant's project, keyed by tenant_id; tasks name it by its own id
    __tablename__ = "relg_projects"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)


class Task(Base):
    __tablename__ = "relg_tasks"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    project_id: Mapped[int] = mapped_column(BigInteger)
    # The join is on the surrogate id: nothing shows the project is in the task's tenant...
    project = relationship("Project", primaryjoin="foreign(Task.project_id) == Project.id",
                           viewonly=True)
    # ...unless the application says it keeps them together.
    own_project = relationship("Project", primaryjoin="foreign(Task.project_id) == Project.id",
                               viewonly=True, info={"shardkit_colocated": True})


GROUPS = {"groups": {
    "owners": {"tables": {"relg_owners": "id", "relg_purchases": "owner_id", "relg_people": "id",
                          "relg_eager": "id"}},
    "gadgets": {"tables": {"relg_gadgets": "id"}},
    "tenants": {"tables": {"relg_projects": "tenant_id", "relg_tasks": "tenant_id"}},
}}
N = 12


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as session:
            for o in range(N):
                session.add(Owner(id=o))
                session.add(Eager(id=o))
                for j in range(4):
                    session.add(Gadget(id=o * 10 + j, owner_id=o))
                    session.add(Purchase(id=o * 10 + j, owner_id=o))
            for i in range(N):  # i refers i + 1 (the last refers nobody)
                session.add(Person(id=i, referrer_id=i + 1 if i + 1 < N else None))
            for t in range(N):  # tenant t: project 100 + t, tasks 1000 + 10 t + j
                session.add(Project(id=100 + t, tenant_id=t))
                for j in range(2):
                    session.add(Task(id=1000 + 10 * t + j, tenant_id=t, project_id=100 + t))
            session.commit()
        # Each owner's gadgets are on more than one shard: a load from one shard misses some.
        assert any(len({cluster.shard_for(Gadget, o * 10 + j) for j in range(4)}) > 1 for o in range(N))
        assert any(cluster.shard_for(Person, i) != cluster.shard_for(Person, i + 1) for i in range(N - 1))
        yield cluster


@pytest.fixture
def Session(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def test_lazy_loads_of_another_groups_rows_read_them_where_they_are(cluster, Session):
    with Session() as s:
        for o in range(N):
            owner = s.get(Owner, o)
            assert [g.id for g in owner.gadgets] == [o * 10 + j for j in range(4)]
            for g in owner.gadgets:
                assert inspect(g).identity_token == cluster.shard_for(Gadget, g.id)
    with Session() as s:
        for o in range(N):
            for j in range(4):
                g = s.get(Gadget, o * 10 + j)
                assert g.owner is not None and g.owner.id == o
                assert inspect(g.owner).identity_token == cluster.shard_for(Owner, o)


def test_lazy_loads_within_a_group_not_joined_on_the_key(Session):
    with Session() as s:
        for i in range(N):
            p = s.get(Person, i)
            assert (p.referrer.id if p.referrer else None) == (i + 1 if i + 1 < N else None)
            assert [r.id for r in p.referred] == ([i - 1] if i else [])


def test_immediate_and_selectin_loads_are_exact(Session):
    for opt in (immediateload, selectinload):
        with Session() as s:
            owners = s.scalars(select(Owner).options(opt(Owner.gadgets))).all()
            assert sorted(len(o.gadgets) for o in owners) == [4] * N
        with Session() as s:
            people = s.scalars(select(Person).options(opt(Person.referrer))).all()
            assert sum(p.referrer is None for p in people) == 1


@pytest.mark.parametrize("opt", [joinedload, subqueryload])
def test_joined_and_subquery_eager_loads_that_would_miss_rows_are_refused(Session, opt):
    with Session() as s:
        for stmt in (select(Owner).options(opt(Owner.gadgets)),
                     select(Owner).where(Owner.id == 3).options(opt(Owner.gadgets)),
                     select(Gadget).options(opt(Gadget.owner)),
                     select(Person).options(opt(Person.referrer))):
            with pytest.raises(ScatterRefused, match=r"selectinload\(\)"):
                s.execute(stmt).unique().all()
    with Session() as s:  # joined on the key: allowed and exact
        owners = s.scalars(select(Owner).options(opt(Owner.purchases))).unique().all()
        assert sorted(len(o.purchases) for o in owners) == [4] * N


def test_a_default_joined_load_of_another_group_is_refused(Session):
    with Session() as s:
        with pytest.raises(ScatterRefused, match=r"Eager\.gadgets"):
            s.scalars(select(Eager)).unique().all()
        with pytest.raises(ScatterRefused, match=r"Eager\.gadgets"):
            s.get(Eager, 1)
        # Its other columns alone load as usual.
        assert s.scalar(select(Eager.id).where(Eager.id == 1)) == 1


def test_a_relationship_joined_on_the_key_still_loads_from_the_objects_shard(cluster, Session):
    with statements_per_shard(cluster) as hits:
        with Session() as s:
            owner = s.get(Owner, 5)
            hits.clear()
            assert len(owner.purchases) == 4
            assert dict(hits) == {cluster.shard_for(Owner, 5): 1}
            hits.clear()
            assert len(owner.gadgets) == 4
            assert set(hits) == set(cluster.shard_names)  # another group's: every shard


def test_a_relationship_the_application_keeps_colocated_can_say_so(cluster, Session):
    with Session() as s:
        tasks = s.scalars(select(Task).where(Task.tenant_id == 3)).all()
        with statements_per_shard(cluster) as hits:
            assert tasks[0].project.id == 103 and set(hits) == set(cluster.shard_names)
            s.expunge(tasks[0].project)
            hits.clear()
            assert tasks[1].own_project.id == 103  # the task's shard only
            assert dict(hits) == {cluster.shard_for(Task, 3): 1}
    with Session() as s:
        got = s.scalars(select(Task).options(joinedload(Task.own_project))).unique().all()
        assert sorted((t.id, t.own_project.id) for t in got) == sorted(
            (1000 + 10 * t + j, 100 + t) for t in range(N) for j in range(2))
        with pytest.raises(ScatterRefused, match=r"Task\.project reads"):
            s.scalars(select(Task).options(joinedload(Task.project))).unique().all()


def test_the_claim_is_refused_for_tables_of_different_groups(Session):
    with Session() as s:
        g = s.get(Gadget, 31)
        with pytest.raises(shardkit.RoutingError, match=r"Gadget\.claimed_owner has info shardkit_colocated"):
            g.claimed_owner
