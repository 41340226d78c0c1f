"""One reference row, several objects in one session (one per shard it was read from).

Objects of different shards never share an identity-map entry, so a reference row read
through rows of two shards (or in two transactions, whose reference reads take turns
between the shards) is two objects.  A change written through one of them reached
every shard's copy, but the other kept the old values, and its own change later wrote
them back: ``a.population += 1; flush; b.population += 1; flush`` gave +1, not +2 (a
lost update a plain Session cannot have).  Now a flush that writes a reference row
expires the session's other objects of that row, and a flush that would change one
column of one row through two objects is refused before anything is written.
"""

from __future__ import annotations

import pytest
from reference_env import ReferenceEnv
from sqlalchemy import BigInteger, ForeignKey, Integer, String, event, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship
from sqlalchemy.orm import exc as orm_exc

import shardkit

pytestmark = pytest.mark.integration


class RoBase(DeclarativeBase):
    pass


class RoCountry(RoBase):
    __tablename__ = "ro_countries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    population: Mapped[int] = mapped_column(Integer)


class RoTenant(RoBase):
    __tablename__ = "ro_tenants"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    score: Mapped[int] = mapped_column(Integer, default=0)
    country_id: Mapped[int | None] = mapped_column(ForeignKey("ro_countries.id"))
    country: Mapped[RoCountry | None] = relationship()


CONFIG = {
    "groups": {"tenants": {"strategy": "hash", "tables": {"ro_tenants": "id"}}},
    "reference_tables": ["ro_countries"],
}


class Env(ReferenceEnv):
    def __init__(self, dev, cluster):
        super().__init__(dev, cluster)
        self.tenants = self.keys_on_shards(RoTenant)  # one tenant on each of the first two shards

    def two_objects(self, s):
        """Country 1 as two objects of the session: one read through a tenant of each shard."""
        ts = s.scalars(select(RoTenant).options(joinedload(RoTenant.country))
                       .where(RoTenant.id.in_(self.tenants)).order_by(RoTenant.id)).all()
        a, b = (t.country for t in ts)
        assert a is not b and a.id == b.id == 1
        return a, b


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=RoBase.metadata)
    for s in cluster.shard_names:
        RoBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def ro(env):
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE ro_tenants, ro_countries CASCADE"))
            c.execute(text("INSERT INTO ro_countries VALUES (1, 'Atlantis', 5)"))
    with env.Session() as s:
        for k in env.tenants:
            s.add(RoTenant(id=k, country_id=1))
        s.commit()
    return env


COUNTRY = "SELECT id, name, population FROM ro_countries ORDER BY id"


def test_increments_through_two_objects_in_two_flushes_both_count(ro):
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        a.population += 1
        s.flush()
        b.population += 1
        s.flush()
        assert a.population == b.population == 7
        s.commit()
    assert ro.copies(COUNTRY) == {n: [(1, "Atlantis", 7)] for n in ro.names}


def test_same_column_through_two_objects_in_one_flush_is_refused(ro):
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        a.population += 1
        b.population += 1
        with pytest.raises(shardkit.RoutingError, match=r"population.*session\.get"):
            s.flush()
        s.rollback()
    assert ro.copies(COUNTRY) == {n: [(1, "Atlantis", 5)] for n in ro.names}


def test_different_columns_through_two_objects_both_kept(ro):
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        a.name = "Lemuria"
        b.population = 9
        s.flush()
        assert (a.name, a.population) == (b.name, b.population) == ("Lemuria", 9)
        s.commit()
    assert ro.copies(COUNTRY) == {n: [(1, "Lemuria", 9)] for n in ro.names}


def test_delete_through_one_then_change_through_the_other_is_an_error(ro):
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        for t in s.scalars(select(RoTenant)):
            t.country = None
        s.delete(a)
        s.flush()
        with pytest.raises(orm_exc.ObjectDeletedError):
            b.population += 1
        s.rollback()
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        for t in s.scalars(select(RoTenant)):
            t.country = None
        s.delete(a)
        s.flush()
        b.population = 11  # a blind write (no load first): its flush needs the row
        with pytest.raises(orm_exc.ObjectDeletedError):
            s.flush()
        s.rollback()
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        for t in s.scalars(select(RoTenant)):
            t.country = None
        s.delete(a)
        s.commit()
        with pytest.raises(orm_exc.ObjectDeletedError):
            b.population += 1
    assert ro.copies(COUNTRY) == {n: [] for n in ro.names}  # not written back


def test_change_through_one_and_delete_through_the_other_in_one_flush_is_refused(ro):
    with ro.Session() as s:
        a, b = ro.two_objects(s)
        for t in s.scalars(select(RoTenant)):
            t.country = None
        s.flush()
        a.population = 8
        s.delete(b)
        with pytest.raises(shardkit.CrossShardWriteError, match=r"deleted through.*session\.get"):
            s.flush()
        s.rollback()
    assert ro.copies(COUNTRY) == {n: [(1, "Atlantis", 5)] for n in ro.names}


def test_reference_row_read_in_two_transactions_is_two_objects_and_both_increments_count(ro):
    """Reference reads take turns between the shards from one transaction to the next:
    the row read again is another object (the first one kept by the application, with
    its values: expire_on_commit=False)."""
    with ro.Session(expire_on_commit=False) as s:
        held = []
        for _ in ro.names:
            held.append(s.scalars(select(RoCountry).where(RoCountry.id == 1)).one())
            s.commit()
        assert {inspect(o).identity_token for o in held} == set(ro.names)
        for o in held:
            o.population += 1
            s.flush()
        s.commit()
    assert ro.copies(COUNTRY) == {n: [(1, "Atlantis", 5 + len(ro.names))] for n in ro.names}


def test_a_flush_writing_no_reference_row_leaves_the_objects_loaded(ro):
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    with ro.Session() as s:
        a, b = ro.two_objects(s)
        t = s.get(RoTenant, ro.tenants[0])
        t.score = 3
        engines = [ro.cluster.primary(n) for n in ro.names]
        for e in engines:
            event.listen(e, "before_cursor_execute", count)
        try:
            s.flush()
        finally:
            for e in engines:
                event.remove(e, "before_cursor_execute", count)
        assert [st.split()[0] for st in statements] == ["UPDATE"]
        assert not inspect(a).expired_attributes and not inspect(b).expired_attributes
        # A change of the row through one object expires the other, not itself.
        a.name = "Mu"
        s.flush()
        assert not inspect(a).expired_attributes and "name" in inspect(b).expired_attributes
        assert b.name == "Mu"
        s.commit()
