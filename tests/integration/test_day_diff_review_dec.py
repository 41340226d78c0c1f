"""Fresh-eyes review of the day's changes (the key read's short path, session-wide options,
replica isolation, data-modifying WITH on a named shard), on a real cluster with a replica."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "ddr_parents"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    children: Mapped[list[Child]] = relationship(order_by="Child.id")


class Child(Base):
    __tablename__ = "ddr_children"
    parent_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("ddr_parents.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    cfg = {**dev.config_dict(),
           "groups": {"family": {"tables": {"ddr_parents": "id", "ddr_children": "parent_id"}}},
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    Base.metadata.create_all(cluster.primary("s0"))
    cluster.start_monitor()
    yield dev, cluster
    cluster.dispose()


@pytest.fixture
def fresh(env):
    dev, cluster = env
    with cluster.primary("s0").begin() as c:
        c.execute(text("SET LOCAL lock_timeout = '10s'"))
        c.execute(text("TRUNCATE ddr_children, ddr_parents"))
        c.execute(Parent.__table__.insert(), [{"id": k, "name": f"p{k}"} for k in (1, 2, 3)])
        c.execute(Child.__table__.insert(), [{"parent_id": 1, "id": 10}])
    for r in dev.shard("s0").replicas:
        r.wait_caught_up()
    deadline = time.monotonic() + 30
    while not cluster.selector.eligible("s0", max_lag_seconds=300.0, max_lag_bytes=2**62, min_lsn=None)[0]:
        assert time.monotonic() < deadline, "the health monitor never found the replica usable"
        time.sleep(0.05)
    return cluster


def _selectin_children_after_adding_one(s: Any) -> list[int]:
    result = s.execute(select(Parent).where(Parent.id == 1).options(selectinload(Parent.children)))
    # Added after the statement ran, before its rows (and the selectin load of their
    # children, which the ORM autoflushes before) are fetched.
    s.add(Child(parent_id=1, id=11))
    parent = result.scalar_one()
    return [c.id for c in parent.children]


@pytest.mark.parametrize("consistency", [None, "read_your_writes", "eventual"])
def test_selectinload_after_a_plain_read_autoflushes_as_a_session_does(fresh, consistency):
    """The short path's load options turn the ORM's autoflush off for the key read itself
    (nothing to flush then); the selectin load that follows when its rows are fetched is a
    statement of its own, which SQLAlchemy autoflushes before whatever the statement it
    loads for said.  shardkit read the top statement's autoflush=False for the selectin
    load too: no flush before routing it, so it went to the replica and missed the child
    the session holds (the ORM's own autoflush then wrote it on the primary)."""
    with Session(fresh.primary("s0")) as plain:
        expected = _selectin_children_after_adding_one(plain)
        plain.rollback()
    assert expected == [10, 11]
    with shardkit.ShardedSession(fresh, consistency=consistency) as s:
        s.execute(select(Parent).where(Parent.id == 2)).scalar_one()  # the replica's engine made
        assert _selectin_children_after_adding_one(s) == expected
        s.rollback()


def test_a_with_that_writes_a_reference_table_inside_a_shard_scope_is_refused(sharded):
    """Inside scope(shard=...) a write of a reference table goes to every shard (README: a
    reference table's writes reach every shard, "also inside scope(shard=...)").  The
    refusal of a data-modifying WITH advises naming the shard with scope(shard=...), where
    it now runs as a write: for a WITH that updates a reference table, that changed the
    scope shard's copy alone and the copies diverged, silently.  It is refused instead,
    and the refusal outside a scope says to run such a write as its own statement."""
    from models import Country
    from sqlalchemy import update

    from shardkit.errors import CrossShardWriteError

    cluster = sharded.cluster
    with shardkit.ShardedSession(cluster) as s:
        s.add(Country(code="fr", name="France"))
        s.commit()
    u = update(Country).values(name="changed").returning(Country.code).cte("u")
    with shardkit.ShardedSession(cluster) as s:
        with pytest.raises(CrossShardWriteError, match="as its own statement and use its rows \\(the only way to write a reference table"):
            s.execute(select(u.c.code))
    with shardkit.ShardedSession(cluster) as s, shardkit.scope(shard=cluster.shard_names[0]):
        with pytest.raises(CrossShardWriteError, match="UPDATE of countries in 'u'.*reference table countries"):
            s.execute(select(u.c.code))
        s.commit()
    copies = {n: sharded.count(n, "SELECT name FROM countries") for n in cluster.shard_names}
    assert copies == {n: "France" for n in cluster.shard_names}


def test_a_session_in_autocommit_is_not_told_its_replica_reads_ignore_it(env, fresh, caplog):
    """A session-wide isolation_level reaches every connection of the session (SQLAlchemy
    2.1); on a replica it is dropped, said once per node at WARNING.  AUTOCOMMIT, a common
    level for a read-only session, is what replica reads run in: the warning ("isolation_level
    AUTOCOMMIT is not applied on replica ...: replica reads run in autocommit") was wrong,
    and it used up the node's one warning for a level that is not applied there."""
    import logging

    from sqlalchemy import event

    dev, _ = env
    cfg = {**dev.config_dict(),
           "groups": {"family": {"tables": {"ddr_parents": "id", "ddr_children": "parent_id"}}}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)  # engines of its own
    on_replica: list[str] = []
    event.listen(cluster.engine("s0", "replica", 0), "before_cursor_execute",
                 lambda *a: on_replica.append(a[2]))
    read = select(Parent.name).where(Parent.id == 1).execution_options(shardkit_role="replica")
    try:
        with caplog.at_level(logging.WARNING, logger="shardkit.cluster"):
            with shardkit.ShardedSession(cluster, execution_options={"isolation_level": "AUTOCOMMIT"}) as s:
                assert s.execute(read).scalar_one() == "p1"
            assert on_replica
            assert [r.getMessage() for r in caplog.records if "isolation_level" in r.getMessage()] == []
            with shardkit.ShardedSession(cluster, execution_options={"isolation_level": "SERIALIZABLE"}) as s:
                assert s.execute(read).scalar_one() == "p1"
            said = [r.getMessage() for r in caplog.records if "isolation_level" in r.getMessage()]
            assert len(said) == 1 and said[0].startswith("isolation_level SERIALIZABLE is not applied on replica s0/r0")
    finally:
        cluster.dispose()
