"""One reference row as several objects of one session (one per shard it was read
from), attacked as an SQLAlchemy user would: versioned rows, primary key changes,
collections, inheritance, composite keys, failed flushes.  (See
test_reference_objects.py for the rule itself.)"""

from __future__ import annotations

import warnings

import pytest
from reference_env import ReferenceEnv
from sqlalchemy import BigInteger, ForeignKey, Integer, String, event, inspect, select, text
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.orm import exc as orm_exc

import shardkit

pytestmark = pytest.mark.integration


class HoBase(DeclarativeBase):
    pass


class HoRegion(HoBase):
    __tablename__ = "ho_regions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class HoCountry(HoBase):
    __tablename__ = "ho_countries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    population: Mapped[int] = mapped_column(Integer)
    region_id: Mapped[int | None] = mapped_column(ForeignKey("ho_regions.id"))
    region: Mapped[HoRegion | None] = relationship()
    tenants: Mapped[list[HoTenant]] = relationship(back_populates="country")


class HoTenant(HoBase):
    __tablename__ = "ho_tenants"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    score: Mapped[int] = mapped_column(Integer, default=0)
    country_id: Mapped[int | None] = mapped_column(ForeignKey("ho_countries.id"))
    country: Mapped[HoCountry | None] = relationship(back_populates="tenants")


class HoVersioned(HoBase):
    __tablename__ = "ho_versioned"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    population: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__ = {"version_id_col": version}


class HoPair(HoBase):
    __tablename__ = "ho_pairs"
    a: Mapped[int] = mapped_column(Integer, primary_key=True)
    b: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(40))
    n: Mapped[int] = mapped_column(Integer)


class HoPlace(HoBase):
    __tablename__ = "ho_places"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(40))
    __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "place"}


class HoCity(HoPlace):
    __tablename__ = "ho_cities"
    id: Mapped[int] = mapped_column(ForeignKey("ho_places.id"), primary_key=True)
    mayor: Mapped[str] = mapped_column(String(40))
    __mapper_args__ = {"polymorphic_identity": "city"}


class HoTown(HoPlace):  # single-table
    __mapper_args__ = {"polymorphic_identity": "town"}


CONFIG = {
    "groups": {"tenants": {"strategy": "hash", "tables": {"ho_tenants": "id"}}},
    "reference_tables": ["ho_regions", "ho_countries", "ho_versioned", "ho_pairs", "ho_places",
                         "ho_cities"],
}


class Env(ReferenceEnv):
    def __init__(self, dev, cluster):
        super().__init__(dev, cluster)
        self.tenants = self.keys_on_shards(HoTenant)

    def two(self, s, cls, *where):
        """The row as two objects of session ``s``: read from the first two shards."""
        objs = [s.scalars(select(cls).where(*where).options(set_shard_id(n))).one() for n in self.names[:2]]
        assert objs[0] is not objs[1]
        assert [inspect(o).identity_token for o in objs] == self.names[:2]
        return objs


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=HoBase.metadata)
    for s in cluster.shard_names:
        HoBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def ho(env):
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE ho_tenants, ho_countries, ho_regions, ho_versioned, ho_pairs, "
                           "ho_cities, ho_places CASCADE"))
            c.execute(text("INSERT INTO ho_regions VALUES (1, 'North'), (2, 'South')"))
            c.execute(text("INSERT INTO ho_countries VALUES (1, 'Atlantis', 5, 1)"))
            c.execute(text("INSERT INTO ho_versioned VALUES (1, 'Atlantis', 5, 1)"))
            c.execute(text("INSERT INTO ho_pairs VALUES (1, 2, 'x', 5)"))
            c.execute(text("INSERT INTO ho_places VALUES (1, 'city', 'Ys'), (2, 'town', 'Is')"))
            c.execute(text("INSERT INTO ho_cities VALUES (1, 'Gradlon')"))
    with env.Session() as s:
        for k in env.tenants:
            s.add(HoTenant(id=k, country_id=1))
        s.commit()
    return env


COUNTRY = "SELECT id, name, population, region_id FROM ho_countries ORDER BY id"
VERSIONED = "SELECT id, name, population, version FROM ho_versioned ORDER BY id"



def test_versioned_row_changed_through_two_objects_is_refused_before_anything_is_written(ho):
    """Two objects of a row of a class with a version_id_col, changing different columns:
    each UPDATE checks the version the object was loaded with, so the second one matched
    no row (a bare StaleDataError, the flush and both changes rolled back).  Refused before
    the flush writes, the session keeps both changes: drop one, and the other is written."""
    with ho.Session() as s:
        a, b = ho.two(s, HoVersioned, HoVersioned.id == 1)
        a.name = "Mu"
        b.population = 9
        with pytest.raises(shardkit.CrossShardWriteError, match=r"version_id_col version.*session\.get"):
            s.flush()
        with pytest.raises(shardkit.CrossShardWriteError, match=r"version_id_col version"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (SQLAlchemy 2.1)
            s.flush(objects=[a])  # b's change would be written later under a's new version
        s.expire(b)
        s.flush()
        assert (b.name, b.population, b.version) == ("Mu", 5, 2)
        b.population += 1  # one after the other: each flush reads the version written
        s.flush()
        a.population += 1
        s.flush()
        s.commit()
    ho.same(VERSIONED, [(1, "Mu", 7, 4)])


def test_primary_key_changed_through_one_object_and_a_column_through_the_other_is_refused(ho):
    """The second UPDATE (by the old key, or the first one by the old key after the
    second changed it: the order is the unit of work's) matched no row: a StaleDataError
    for one order, both written for the other."""
    with ho.Session() as s:
        for t in s.scalars(select(HoTenant)):
            t.country_id = None
        s.flush()
        for first in (0, 1):
            objs = ho.two(s, HoCountry, HoCountry.id == 1)
            objs[first].id = 7
            objs[1 - first].name = "Mu"
            with pytest.raises(shardkit.CrossShardWriteError, match=r"primary key \(id\).*session\.get"):
                s.flush()
            s.expire_all()
        objs = ho.two(s, HoCountry, HoCountry.id == 1)
        objs[0].id = 7
        s.flush()
        with pytest.raises(orm_exc.ObjectDeletedError):
            objs[1].name  # noqa: B018 (the old key's other object)
        s.commit()
    ho.same(COUNTRY, [(7, "Atlantis", 5, 1)])


def test_a_collection_change_on_a_reference_object_neither_copies_nor_expires_the_row(ho):
    """country.tenants.append(t) writes the tenant's row, not the country's: no copy of the
    country to every shard, and its other objects keep their values."""
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    with ho.Session() as s:
        a, b = ho.two(s, HoCountry, HoCountry.id == 1)
        s.add(HoTenant(id=ho.tenants[0] + 1000, score=1))
        s.flush()
        t = s.get(HoTenant, ho.tenants[0] + 1000)
        a.tenants  # noqa: B018 (loaded)
        engines = [ho.cluster.primary(n) for n in ho.names]
        for e in engines:
            event.listen(e, "before_cursor_execute", count)
        try:
            a.tenants.append(t)
            s.flush()
        finally:
            for e in engines:
                event.remove(e, "before_cursor_execute", count)
        assert [st.split()[:2] for st in statements] == [["UPDATE", "ho_tenants"]]
        assert not inspect(a).expired_attributes and not inspect(b).expired_attributes
        s.commit()
    with ho.Session() as s:
        assert s.get(HoTenant, ho.tenants[0] + 1000).country_id == 1


PLACES = "SELECT p.id, kind, name, mayor FROM ho_places p LEFT JOIN ho_cities USING (id) ORDER BY p.id"


def test_joined_inheritance_reference_rows_reach_every_copy(ho):
    """A joined subclass's object is a row in its base class's table and one in its own:
    both are copied (before, only the subclass's table: a change of a base column stayed
    on the first shard, and a new object failed the others' foreign key)."""
    with ho.Session() as s:
        a, b = ho.two(s, HoPlace, HoPlace.id == 1)
        assert isinstance(a, HoCity)
        a.name = "Ker-Is"  # ho_places
        s.flush()
        assert "name" in inspect(b).expired_attributes
        b.mayor = "Dahut"  # ho_cities
        s.flush()
        assert (a.name, a.mayor) == ("Ker-Is", "Dahut")
        s.commit()
    ho.same(PLACES, [(1, "city", "Ker-Is", "Dahut"), (2, "town", "Is", None)])
    with ho.Session() as s:
        s.add(HoCity(id=3, name="Lyonesse", mayor="Tristan"))
        s.commit()
    with ho.Session() as s:
        c = s.get(HoPlace, 3)
        c.name, c.mayor = "Lyonnesse", "Mark"
        s.commit()
    ho.same(PLACES, [(1, "city", "Ker-Is", "Dahut"), (2, "town", "Is", None), (3, "city", "Lyonnesse", "Mark")])
    with ho.Session() as s:
        s.delete(s.get(HoPlace, 1))
        s.commit()
    ho.same(PLACES, [(2, "town", "Is", None), (3, "city", "Lyonnesse", "Mark")])


def test_related_reference_rows_deleted_in_one_flush_are_copied_in_foreign_key_order(ho):
    """The flush deletes a country before its region (the unit of work's order); its
    copies on the other shards were deleted in the order of session.delete() calls: the
    region first, refused by the country's foreign key there."""
    with ho.Session() as s:
        s.add(HoRegion(id=5, name="East"))
        s.add(HoCountry(id=5, name="Hy-Brasil", population=1, region_id=5))
        s.commit()
    with ho.Session() as s:
        region, country = s.get(HoRegion, 5), s.get(HoCountry, 5)
        s.delete(region)
        s.delete(country)
        s.commit()
    ho.same(COUNTRY, [(1, "Atlantis", 5, 1)])
    ho.same("SELECT id FROM ho_regions ORDER BY id", [(1,), (2,)])
