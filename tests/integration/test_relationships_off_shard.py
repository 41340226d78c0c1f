"""Relationships whose related rows may not be on the object's shard, checked against
one database holding every row: many-to-many through a reference table or a table of the
group joined off the key, and a primaryjoin that ORs two columns; declared on a base
class and loaded for it and a subclass."""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, Table, select
from sqlalchemy.orm import (DeclarativeBase, Mapped, foreign, immediateload, joinedload,
                            mapped_column, relationship, selectinload, sessionmaker, subqueryload)

import shardkit
from own_tables import cluster_with_tables
from shardkit import ScatterRefused

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


featured = Table("relgr_featured", Base.metadata,  # a reference table
                 Column("user_id", BigInteger, primary_key=True),
                 Column("listing_id", BigInteger, primary_key=True))
watch = Table("relgr_watch", Base.metadata,  # the users' group, keyed by user_id
              Column("user_id", BigInteger, primary_key=True),
              Column("listing_id", BigInteger, primary_key=True))


class User(Base):
    __tablename__ = "relgr_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(default="user")
    __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "user"}
    featured = relationship("Listing", secondary=featured, viewonly=True, order_by="Listing.id",
                            primaryjoin=lambda: User.id == foreign(featured.c.user_id),
                            secondaryjoin=lambda: Listing.id == foreign(featured.c.listing_id))
    watched = relationship("Listing", secondary=watch, viewonly=True, order_by="Listing.id",
                           primaryjoin=lambda: User.id == foreign(watch.c.user_id),
                           secondaryjoin=lambda: Listing.id == foreign(watch.c.listing_id))
    involved = relationship("Listing", primaryjoin="or_(User.id == foreign(Listing.user_id), "
                            "User.id == foreign(Listing.buyer_id))", viewonly=True,
                            order_by="Listing.id")


class Vip(User):  # joined inheritance, same group
    __tablename__ = "relgr_vips"
    id: Mapped[int] = mapped_column(ForeignKey("relgr_users.id"), primary_key=True)
    __mapper_args__ = {"polymorphic_identity": "vip"}


class Listing(Base):  # the users' group, keyed by its seller
    __tablename__ = "relgr_listings"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    buyer_id: Mapped[int] = mapped_column(BigInteger)


GROUPS = {"groups": {
    "users": {"tables": {"relgr_users": "id", "relgr_vips": "id", "relgr_listings": "user_id",
                         "relgr_watch": "user_id"}},
}, "reference_tables": ["relgr_featured"]}
N = 12


def _others(u):
    return [(u + 1) % N, (u + 2) % N]


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as session:
            for u in range(N):
                session.add(Vip(id=u) if u % 2 else User(id=u))
                for j in range(3):
                    session.add(Listing(id=u * 10 + j, user_id=u, buyer_id=(u + 5) % N))
            session.flush()
            for u in range(N):
                rows = [{"user_id": u, "listing_id": o * 10} for o in _others(u)]
                session.execute(featured.insert(), rows)
                session.execute(watch.insert(), rows)
            session.commit()
        assert len({cluster.shard_for(User, u) for u in range(N)}) == 2
        yield cluster


@pytest.fixture
def Session(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _featured(u):
    return sorted(o * 10 for o in _others(u))


def _involved(u):
    return sorted([u * 10 + j for j in range(3)]
                  + [b * 10 + j for b in range(N) for j in range(3) if (b + 5) % N == u])


def test_many_to_many_through_a_reference_table_reads_every_shard(cluster, Session):
    # The pairs table's user_id/listing_id share names with the key columns of the users
    # (id) and listings (user_id): that did not make the listings colocated with the user.
    assert any(cluster.shard_for(Listing, o * 10) != cluster.shard_for(User, u)
               for u in range(N) for o in _others(u))
    with Session() as s:
        for u in range(N):  # users and Vips (a relationship declared on the base)
            assert [x.id for x in s.get(User, u).featured] == _featured(u)
    for opt in (immediateload, selectinload):
        with Session() as s:
            if opt is selectinload and not User.featured.property._get_strategy((("lazy", "selectin"),)).omit_join:
                # SQLAlchemy 2.0 joins the users back in (2.1 reads the pairs alone): off the key.
                with pytest.raises(ScatterRefused, match="not joined on the shard key"):
                    s.scalars(select(User).options(opt(User.featured))).all()
                continue
            users = s.scalars(select(User).options(opt(User.featured))).all()
            assert {x.id: [y.id for y in x.featured] for x in users} == {u: _featured(u) for u in range(N)}
    for opt in (joinedload, subqueryload):
        with Session() as s:
            with pytest.raises(ScatterRefused, match=r"User\.featured.*selectinload\(\)"):
                s.execute(select(User).options(opt(User.featured))).unique().all()


def test_many_to_many_through_the_group_off_the_key_is_refused_not_partial(Session):
    with Session() as s:
        for u in (0, 1):
            user = s.get(User, u)
            with pytest.raises(ScatterRefused, match="not joined on the shard key"):
                user.watched
        with pytest.raises(ScatterRefused, match=r"User\.watched"):
            s.execute(select(User).options(joinedload(User.watched))).unique().all()


def test_a_primaryjoin_that_ors_two_columns_reads_every_shard(Session):
    with Session() as s:
        for u in range(N):
            assert [x.id for x in s.get(User, u).involved] == _involved(u)
        with pytest.raises(ScatterRefused, match=r"User\.involved") as info:
            s.execute(select(User).options(joinedload(User.involved))).unique().all()
        # The advice must be one that works: selectinload() joins the users back in
        # for such a join (SQLAlchemy cannot read it by the parents' keys alone) and is
        # refused as well; lazy loads read every shard.
        assert "load it lazily" in str(info.value) and "with selectinload()" not in str(info.value)
        with pytest.raises(ScatterRefused):
            s.execute(select(User).options(selectinload(User.involved))).all()
