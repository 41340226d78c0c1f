"""The shard key columns whose key in ``table.c`` is not their database
name (``mapped_column("tenant_id", ...)`` under another attribute name, ``Column("member_id",
key="mid")``), which shardkit's config names by the database's name.  Each path that looks
such a column up is exercised here: the ORM's colocated joins and relationship loads, reads
by key and IN lists split by shard, the scatter's ORDER BY / GROUP BY / count(DISTINCT) on
the key, explain(), verify, many-to-many rows, and a move of buckets.

Defects covered (each test named so failed before its fix):

* A many-to-many row of a ``secondary=`` table keyed by ``Column("member_id", key="mid")``
  was written on the shard of the object whose collection changed, not on the one owning
  its key (the flush read the row's key by the column's name from a row keyed by
  ``.key``: no value, so the fallback), where no read by key finds it; rows of two shards
  in one flush were not refused.
* The colocation check found a table's key column by its key in ``.c`` before its name: a
  join on another column whose key is the key column's database name (``Column("legacy",
  key="tenant_id")``) passed for a join on the shard key, and ran shard by shard, silently
  missing the pairs on different shards.
"""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, Column, ForeignKey, Table, Text, func, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, foreign, joinedload, mapped_column, relationship,
                            selectinload, sessionmaker)

import shardkit
from shardkit.verify import verify

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "ck10_tenants"
    tid: Mapped[int] = mapped_column("tenant_id", BigInteger, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column("tenant_label", Text, default="")
    orders: Mapped[list[Order]] = relationship(back_populates="tenant", order_by="Order.oid")


class Order(Base):  # colocated: keyed by its tenant, under another attribute name
    __tablename__ = "ck10_orders"
    otid: Mapped[int] = mapped_column("tenant_id", BigInteger, ForeignKey("ck10_tenants.tenant_id"),
                                      primary_key=True)
    oid: Mapped[int] = mapped_column("order_id", BigInteger, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    tenant: Mapped[Tenant] = relationship(back_populates="orders")


tenant_tags = Table("ck10_tenant_tags", Base.metadata,  # tenants' group, keyed by tenant_id
                    Column("tenant_id", BigInteger, key="t", primary_key=True),
                    Column("tag_id", BigInteger, key="g", primary_key=True))


class Tag(Base):  # another group; its collection of tenants is written from its side only
    __tablename__ = "ck10_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenants = relationship(Tenant, secondary=tenant_tags, order_by=Tenant.tid,
                           primaryjoin=lambda: Tag.id == foreign(tenant_tags.c.g),
                           secondaryjoin=lambda: Tenant.tid == foreign(tenant_tags.c.t))


# The key column under another key, and another column under the key column's name.
items = Table("ck10_items", Base.metadata, Column("id", BigInteger, primary_key=True, autoincrement=False),
              Column("tenant_id", BigInteger, key="otid", nullable=False),
              Column("legacy", BigInteger, key="tenant_id"))

CONFIG = {"groups": {
    "ck10": {"tables": {"ck10_tenants": "tenant_id", "ck10_orders": "tenant_id",
                        "ck10_tenant_tags": "tenant_id", "ck10_items": "tenant_id"}},
    "ck10g": {"tables": {"ck10_tags": "id"}},
}}


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def Session(cluster):
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("TRUNCATE ck10_orders, ck10_tenants, ck10_tenant_tags, ck10_tags, ck10_items"))
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def on(cluster, model, n, shard, start=1):
    out, i = [], start
    while len(out) < n:
        if cluster.shard_for(model, i) == shard:
            out.append(i)
        i += 1
    return out


def rows(cluster, sql):
    out = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            out[s] = sorted(tuple(r) for r in c.execute(text(sql)))
    return out


def _seed(cluster, Session, per_shard=3):
    a, b = cluster.shard_names[:2]
    ts = on(cluster, Tenant, per_shard, a) + on(cluster, Tenant, per_shard, b)
    with Session() as s:
        for t in ts:
            s.add(Tenant(tid=t, label=f"t{t}", orders=[Order(oid=i, amount=t * 10 + i) for i in (1, 2)]))
        s.commit()
    return ts


def test_orm_reads_and_loads_by_a_key_keyed_apart_from_its_name(cluster, Session):
    ts = _seed(cluster, Session)
    owner = {t: cluster.shard_for(Tenant, t) for t in ts}
    assert rows(cluster, "SELECT tenant_id, order_id FROM ck10_orders") == {
        s: sorted((t, i) for t in ts if owner[t] == s for i in (1, 2)) for s in cluster.shard_names}
    with Session() as s:
        # by key, one shard; the colocated join and each loader of the relationship
        t0 = ts[0]
        assert cluster.explain(select(Order).where(Order.otid == t0)).shards == (owner[t0],)
        q = select(Tenant.tid, Order.oid).join(Order, Order.otid == Tenant.tid).where(Tenant.tid == t0)
        assert cluster.explain(q).shards == (owner[t0],)
        assert s.execute(q).all() == [(t0, 1), (t0, 2)]
        everywhere = select(Tenant.tid, func.sum(Order.amount)).join(Tenant.orders).group_by(Tenant.tid) \
            .order_by(Tenant.tid)
        r = cluster.explain(everywhere)
        assert r.is_scatter and not (r.merge or "").startswith("refused"), r.merge
        assert s.execute(everywhere).all() == [(t, t * 20 + 3) for t in sorted(ts)]
        assert [o.oid for o in s.get(Tenant, t0).orders] == [1, 2]  # lazy load
        got = s.execute(select(Tenant).options(selectinload(Tenant.orders)).order_by(Tenant.tid)).scalars().all()
        assert [(t.tid, [o.oid for o in t.orders]) for t in got] == [(t, [1, 2]) for t in sorted(ts)]
    with Session() as s:
        got = s.execute(select(Order).options(joinedload(Order.tenant)).order_by(Order.otid, Order.oid)) \
            .scalars().all()
        assert [(o.otid, o.oid, o.tenant.label) for o in got] == [
            (t, i, f"t{t}") for t in sorted(ts) for i in (1, 2)]
        # IN split by shard; ORDER BY, LIMIT, DISTINCT, count(DISTINCT) and GROUP BY on the key
        half = ts[:2] + ts[-2:]
        route = cluster.explain(select(Order).where(Order.otid.in_(half)))
        assert set(route.shards) == {owner[t] for t in half}
        assert sorted(s.execute(select(Order.otid).where(Order.otid.in_(half))).scalars()) == \
            sorted(half * 2)
        assert s.execute(select(Order.otid, Order.oid).order_by(Order.otid.desc(), Order.oid).limit(3)).all() \
            == [(sorted(ts)[-1], 1), (sorted(ts)[-1], 2), (sorted(ts)[-2], 1)]
        assert s.execute(select(Order.otid).distinct().order_by(Order.otid)).scalars().all() == sorted(ts)
        assert s.execute(select(func.count(Order.otid.distinct()))).scalar_one() == len(ts)
        grouped = select(Order.otid, func.count()).group_by(Order.otid).order_by(Order.otid).limit(4)
        assert cluster.explain(grouped).is_scatter
        assert s.execute(grouped).all() == [(t, 2) for t in sorted(ts)[:4]]
        sub = select(Order.otid, func.max(Order.amount).label("m")).group_by(Order.otid).subquery()
        q = select(Tenant.tid, sub.c.m).join(sub, sub.c.otid == Tenant.tid).order_by(Tenant.tid)
        assert s.execute(q).all() == [(t, t * 10 + 2) for t in sorted(ts)]


def test_verify_and_key_changes_of_a_key_keyed_apart_from_its_name(cluster, Session):
    ts = _seed(cluster, Session, 2)
    assert verify(cluster).ok
    other = next(t for t in ts if cluster.shard_for(Tenant, t) != cluster.shard_for(Tenant, ts[0]))
    with Session() as s:
        o = s.get(Order, (ts[0], 1))
        o.otid = other
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
    # rows written on the wrong shard behind shardkit's back are reported
    wrong = next(s for s in cluster.shard_names if s != cluster.shard_for(Tenant, ts[0]))
    with cluster.primary(wrong).begin() as c:
        c.execute(text("INSERT INTO ck10_tenants (tenant_id, tenant_label) VALUES (:t, 'x')"), {"t": ts[0]})
        c.execute(text("INSERT INTO ck10_orders (tenant_id, order_id, amount) VALUES (:t, 9, 0)"),
                  {"t": ts[0]})
    rep = verify(cluster)
    assert not rep.ok
    assert {t.table: sum(t.misplaced.values()) for t in rep.tables if t.misplaced} == {
        "ck10_tenants": 1, "ck10_orders": 1}


def test_a_many_to_many_row_keyed_apart_from_its_name_goes_to_its_keys_shard(cluster, Session):
    """tag.tenants.append(tenant): the secondary row is keyed by tenant_id (declared
    Column("tenant_id", key="t")), so it belongs on the tenant's shard, not on the tag's."""
    a, b = cluster.shard_names[:2]
    ta, tb = on(cluster, Tenant, 1, a)[0], on(cluster, Tenant, 1, b)[0]
    gb = on(cluster, Tag, 1, b)[0]
    with Session() as s:
        s.add_all([Tenant(tid=ta), Tenant(tid=tb), Tag(id=gb)])
        s.commit()
    with Session() as s:
        tag = s.get(Tag, gb)
        tag.tenants.append(s.get(Tenant, ta))
        s.commit()
    assert rows(cluster, "SELECT tenant_id, tag_id FROM ck10_tenant_tags") == {a: [(ta, gb)], b: []}
    with Session() as s:
        assert s.execute(select(tenant_tags).where(tenant_tags.c.t == ta)).all() == [(ta, gb)]
        tag = s.get(Tag, gb)
        assert [t.tid for t in tag.tenants] == [ta]
        other = s.get(Tenant, tb)
        tag.tenants.remove(tag.tenants[0])  # deleted where it is
        tag.tenants.append(other)
        with pytest.raises(shardkit.RoutingError, match=f"rows are on shards {a}, {b}"):
            s.flush()  # rows of two shards in one flush: refused, nothing written
    assert rows(cluster, "SELECT tenant_id, tag_id FROM ck10_tenant_tags") == {a: [(ta, gb)], b: []}


def test_a_join_on_a_column_keyed_as_the_key_columns_name_is_not_colocated(cluster, Session):
    """items.c.tenant_id is the column "legacy"; the shard key is items.c.otid ("tenant_id").
    A join on the former is not a join on the shard key: refused (it ran on each shard and
    missed the item whose legacy tenant is on another shard)."""
    a, b = cluster.shard_names[:2]
    ta, tb = on(cluster, Tenant, 1, a)[0], on(cluster, Tenant, 1, b)[0]
    with Session() as s:
        s.add_all([Tenant(tid=ta), Tenant(tid=tb)])
        s.execute(items.insert(), [{"id": 1, "otid": ta, "tenant_id": tb}])
        s.commit()
    assert rows(cluster, "SELECT id, tenant_id, legacy FROM ck10_items") == {a: [(1, ta, tb)], b: []}
    with Session() as s:
        wrong = select(Tenant.tid, items.c.id).join(items, items.c.tenant_id == Tenant.tid)
        with pytest.raises(shardkit.ScatterRefused, match="not joined on the shard key"):
            cluster.explain(wrong)
        with pytest.raises(shardkit.ScatterRefused, match="not joined on the shard key"):
            s.execute(wrong).all()
        right = select(Tenant.tid, items.c.id).join(items, items.c.otid == Tenant.tid)
        assert s.execute(right).all() == [(ta, 1)]
