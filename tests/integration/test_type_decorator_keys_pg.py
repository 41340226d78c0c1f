"""Keys of ``TypeDecorator`` columns on real shards: a row is written to the shard that
owns the value the column stores, and found again by that value."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import String, Uuid, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

import shardkit

pytestmark = pytest.mark.integration

SHARDS = ["s0", "s1", "s2"]


class Email(TypeDecorator):
    """Stores addresses in lower case."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.lower()


class GUID(TypeDecorator):
    impl = Uuid
    cache_ok = True


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "fe_members"
    email: Mapped[str] = mapped_column(Email(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(40), default="")


class Gadget(Base):
    __tablename__ = "fe_gadgets"
    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)


@pytest.fixture(scope="module")
def kit(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    assert tuple(s.name for s in dev.shards) == tuple(SHARDS)
    cfg = {**dev.config_dict(), "groups": {
        "members": {"strategy": "hash", "tables": {"fe_members": "email"}},
        "gadgets": {"strategy": "hash", "tables": {"fe_gadgets": "id"}}}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    for s in SHARDS:
        Base.metadata.drop_all(cluster.primary(s))
        Base.metadata.create_all(cluster.primary(s))
    yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    for s in SHARDS:
        Base.metadata.drop_all(cluster.primary(s))
    cluster.dispose()


def placed(cluster, table: str, col: str) -> dict[str, list]:
    out = {}
    for s in SHARDS:
        with cluster.primary(s).connect() as c:
            out[s] = [r[0] for r in c.execute(text(f"SELECT {col} FROM {table}"))]
    return out


def owner(cluster, group: str, stored) -> str:
    (g,) = [g for g in cluster.config.groups if g.name == group]
    return g.strategy.shard_for_key(stored)


def test_rows_of_type_decorator_keys_sit_on_the_owner_of_the_stored_value_and_are_found(kit):
    cluster, Session = kit
    emails = [f"User{i}@Example.ORG" for i in range(12)]
    uuids = [uuid.UUID(int=i * 7919 + 1) for i in range(12)]
    with Session() as s:
        s.add_all(Member(email=e) for e in emails)
        s.execute(insert(Gadget), [{"id": str(u)} for u in uuids])
        s.commit()
    for s_, stored in placed(cluster, "fe_members", "email").items():
        assert all(owner(cluster, "members", e) == s_ for e in stored), (s_, stored)
    for s_, stored in placed(cluster, "fe_gadgets", "id").items():
        assert all(owner(cluster, "gadgets", u) == s_ for u in stored), (s_, stored)
    with Session() as s:
        assert [e for e in emails if s.get(Member, e.lower()) is None] == []
        assert sorted(s.scalars(select(Member.email).where(Member.email.in_(emails)))) == \
            sorted(e.lower() for e in emails)
        assert [u for u in uuids if s.scalar(select(Gadget.id).where(Gadget.id == str(u))) != u] == []
