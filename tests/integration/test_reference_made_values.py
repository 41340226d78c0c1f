"""Reference tables (copied to every shard): values made per write.

A reference table's Core INSERT/UPDATE runs on every shard; a value made at each run
(a serial or identity id, a ``now()`` server default, a Python default such as
``uuid.uuid4``) would then differ between the copies, silently.  The ORM's flush
writes one shard and copies the row, so its copies agree.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, Uuid, func, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class RtBase(DeclarativeBase):
    pass


class RtPlan(RtBase):
    """A reference table whose id is a serial and whose timestamp the server makes."""

    __tablename__ = "rt_plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(20), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RtTag(RtBase):
    """A reference table whose key a Python default makes."""

    __tablename__ = "rt_tags"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(20))


class RtTenant(RtBase):
    __tablename__ = "rt_tenants"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("rt_plans.id"))


CONFIG = {
    "groups": {"tenants": {"strategy": "hash", "tables": {"rt_tenants": "id"}}},
    "reference_tables": ["rt_plans", "rt_tags"],
}


class Env:
    def __init__(self, dev, cluster):
        self.dev = dev
        self.cluster = cluster
        self.names = list(cluster.shard_names)
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

    def rows(self, shard: str, sql: str) -> list:
        with self.cluster.primary(shard).connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]

    def copies(self, sql: str) -> dict[str, list]:
        return {s: self.rows(s, sql) for s in self.names}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=RtBase.metadata)
    for s in cluster.shard_names:
        RtBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def rt(env):
    tables = ", ".join(t.name for t in RtBase.metadata.sorted_tables)
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return env


def _same_everywhere(copies: dict[str, list]) -> bool:
    first = next(iter(copies.values()))
    return all(v == first for v in copies.values())


def test_orm_added_reference_row_is_the_same_row_on_every_shard(rt):
    with rt.Session() as s:
        s.add(RtPlan(code="basic"))
        s.commit()
    copies = rt.copies("SELECT id, code, created_at FROM rt_plans")
    assert _same_everywhere(copies), copies


def test_core_insert_leaving_a_server_now_default_is_refused_not_diverged(rt):
    with rt.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match=r"created_at.*now\(\).*session\.add"):
            s.execute(insert(RtPlan).values(id=1, code="pro"))
    assert rt.copies("SELECT count(*) FROM rt_plans") == {n: [(0,)] for n in rt.names}


def test_core_insert_leaving_a_serial_id_is_refused(rt):
    """The ORM's flush makes the id on one shard and copies it (the other shards'
    sequences stay behind), so a Core INSERT making ids on every shard collided with
    the copies (UniqueViolation on the other shards), or would give each copy its own id."""
    with rt.Session() as s:
        s.add(RtPlan(code="a"))
        s.commit()
    with rt.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match=r"column id \(a serial or identity\)"):
            s.execute(insert(RtPlan).values(code="b", created_at=datetime(2020, 1, 1)))


def test_core_and_orm_bulk_insert_leaving_a_python_default_key_are_refused(rt):
    """default=uuid.uuid4 ran once per shard: each copy got another primary key."""
    with rt.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match=r"column id's default"):
            s.execute(insert(RtTag).values(name="x"))
    with rt.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match=r"column id's default"):
            s.execute(insert(RtTag), [{"name": "a"}, {"name": "b"}])
    assert rt.copies("SELECT count(*) FROM rt_tags") == {n: [(0,)] for n in rt.names}


def test_reference_insert_giving_every_made_value_runs_on_every_shard_alike(rt):
    when = datetime(2024, 5, 1, tzinfo=__import__("datetime").timezone.utc)
    with rt.Session() as s:
        s.execute(insert(RtPlan).values(id=7, code="x", created_at=when))
        s.execute(insert(RtTag), [{"id": uuid.UUID(int=1), "name": "a"}])
        s.execute(insert(RtPlan), [{"id": 8, "code": "y", "created_at": when}])
        s.commit()
    copies = rt.copies("SELECT id, code, created_at FROM rt_plans ORDER BY id")
    assert _same_everywhere(copies) and len(copies[rt.names[0]]) == 2, copies
    assert _same_everywhere(rt.copies("SELECT id, name FROM rt_tags"))


def test_a_write_one_shards_copy_refuses_names_that_shard_and_writes_nothing(rt):
    """Shard 1's copy has diverged (a row with code 'dup' only there): the ORM's copy
    and a Core INSERT fail there; the error says which shard and what to do."""
    with rt.cluster.primary(rt.names[1]).begin() as c:
        c.execute(text("INSERT INTO rt_plans (id, code) VALUES (100, 'dup')"))
    with rt.Session() as s:
        s.add(RtPlan(id=5, code="dup"))
        with pytest.raises(Exception) as ei:
            s.commit()
    assert "rt_plans_code_key" in str(ei.value)
    notes = " ".join(getattr(ei.value, "__notes__", []))
    assert f"on shard {rt.names[1]}" in notes and "migrate check" in notes, notes
    with rt.Session() as s:
        with pytest.raises(Exception) as ei:
            s.execute(insert(RtPlan).values(id=6, code="dup", created_at=datetime(2020, 1, 1)))
    notes = " ".join(getattr(ei.value, "__notes__", []))
    assert f"on shard {rt.names[1]}" in notes and f"after {rt.names[0]}" in notes, notes
    assert rt.copies("SELECT id FROM rt_plans ORDER BY id") == {
        rt.names[0]: [], rt.names[1]: [(100,)]}
