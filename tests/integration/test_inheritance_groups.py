"""Joined-table inheritance whose tables are placed by different groups.

A subclass's object is one row in each table of its class hierarchy, written by
one flush on one shard; when the tables belong to groups that place the same key
on different shards, some of those rows would land where the router never looks
for them.  Such a mapping is refused, naming the tables and their groups.
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from own_tables import cluster_with_tables

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Employee(Base):
    __tablename__ = "inh_employees"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    """Its own table in another group than its base's."""
    __tablename__ = "inh_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("inh_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20), default="")
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    """Its own table in its base's group: colocated, fine."""
    __tablename__ = "inh_managers"
    id: Mapped[int] = mapped_column(ForeignKey("inh_employees.id"), primary_key=True)
    reports: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


GROUPS = {"groups": {
    "staff": {"tables": {"inh_employees": "id", "inh_managers": "id"}},
    "eng": {"strategy": "range", "tables": {"inh_engineers": "id"},
            "ranges": [{"to": 10**9, "shard": "s0"}, {"from": 10**9, "shard": "s1"}]},
}}


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        yield cluster


def _rows(cluster, table: str) -> dict[str, list[int]]:
    out = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as conn:
            out[s] = sorted(conn.exec_driver_sql(f"SELECT id FROM {table}").scalars())
    return out


def test_a_subclass_in_another_group_than_its_base_is_refused_before_writing(cluster):
    # A key the two groups place apart: the base's hash says s1, the subclass's range s0.
    key = next(k for k in range(1, 10**6) if cluster.shard_for(Employee, k) == "s1")
    assert cluster.shard_for(Engineer, key) == "s0"
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add(Engineer(id=key, language="sql"))
        with pytest.raises(shardkit.RoutingError) as info:
            s.flush()
    message = str(info.value)
    assert "Engineer" in message and "inh_engineers" in message and "inh_employees" in message
    assert "eng" in message and "staff" in message
    assert _rows(cluster, "inh_employees") == {"s0": [], "s1": []}
    assert _rows(cluster, "inh_engineers") == {"s0": [], "s1": []}
    with Session() as s:
        with pytest.raises(shardkit.RoutingError, match="Engineer is stored in tables placed by different groups"):
            s.execute(select(Engineer).where(Engineer.id == key)).all()
        with pytest.raises(shardkit.RoutingError, match="Engineer is stored in tables placed by different groups"):
            s.get(Engineer, key)


def test_a_subclass_in_its_bases_group_is_written_and_read_on_one_shard(cluster):
    key = next(k for k in range(1, 10**6) if cluster.shard_for(Employee, k) == "s1")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add(Manager(id=key, reports=3))
        s.commit()
    assert _rows(cluster, "inh_employees")["s1"] == [key] and _rows(cluster, "inh_managers")["s1"] == [key]
    with Session() as s:
        assert s.get(Manager, key).reports == 3
        assert [e.id for e in s.scalars(select(Employee).where(Employee.id == key))] == [key]
