"""An application written for SQLAlchemy's ``horizontal_shard`` extension, moved to
shardkit: the ways it names a shard (``set_shard_id``, ``Query.set_shard``,
``bind_arguments={"shard_id": ...}``, ``identity_token``) mean what they meant there,
``merge()`` finds a row by the object's own shard key, and what shardkit does not take
(the extension's choosers, ``shards=``, ``bind_shard()``, a ``shard_id`` execution
option, which neither reads) is refused saying what to use instead."""
from __future__ import annotations


import pytest
from own_tables import cluster_with_tables, truncate_everywhere
from own_tables import nodes_used as own_nodes_used
from sqlalchemy import BigInteger, ForeignKey, MetaData, String, inspect, select, text, update
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Country(Base):
    __tablename__ = "hs_countries"
    code: Mapped[str] = mapped_column(String(4), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Tag(Base):
    __tablename__ = "hs_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str] = mapped_column(String(40))


class Customer(Base):
    __tablename__ = "hs_customers"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    tag_id: Mapped[int | None] = mapped_column(BigInteger)
    country_code: Mapped[str | None] = mapped_column(String(4))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")
    tag: Mapped[Tag | None] = relationship(primaryjoin="foreign(Customer.tag_id) == Tag.id")
    country: Mapped[Country | None] = relationship(primaryjoin="foreign(Customer.country_code) == Country.code")


class Order(Base):
    __tablename__ = "hs_orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("hs_customers.id"))
    note: Mapped[str] = mapped_column(String(40), default="")
    customer: Mapped[Customer] = relationship(back_populates="orders")


@pytest.fixture(scope="module")
def env(sharded_dev):
    config = {"groups": {"cust": {"tables": {"hs_customers": "id", "hs_orders": "customer_id"}},
                         "tags": {"tables": {"hs_tags": "id"}}},
              "reference_tables": ["hs_countries"]}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def cluster(env):
    truncate_everywhere(env, "hs_orders", "hs_customers", "hs_tags", "hs_countries")
    return env


def nodes_used(cluster):
    """The nodes (``s1/primary``, ``s1/r0``) that ran statements on this module's tables."""
    return own_nodes_used(cluster, lambda sql: "hs_" in sql)


def key_on(cluster, shard, table="hs_customers"):
    return next(k for k in range(1, 10_000) if cluster.shard_for(table, k) == shard)


def _on(cluster, shard, sql):
    with cluster.primary(shard).connect() as c:
        return c.execute(text(sql)).all()


# Every way horizontal_shard (and shardkit) lets a caller name the shard of a get().
NAMED_GET = {
    "Query.set_shard": lambda s, k: s.query(Customer).set_shard("s1").get(k),
    "set_shard_id option": lambda s, k: s.get(Customer, k, options=[set_shard_id("s1")]),
    "_sa_shard_id": lambda s, k: s.get(Customer, k, execution_options={"_sa_shard_id": "s1"}),
    "shardkit_shard": lambda s, k: s.get(Customer, k, execution_options={"shardkit_shard": "s1"}),
    "bind_arguments": lambda s, k: s.get(Customer, k, bind_arguments={"shard_id": "s1"}),
    "identity_token": lambda s, k: s.get(Customer, k, identity_token="s1"),
}


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning")
@pytest.mark.parametrize("named_get", NAMED_GET.values(), ids=NAMED_GET.keys())
def test_a_get_naming_a_shard_reads_that_shard_even_when_the_key_names_another(cluster, named_get):
    # Read from the primaries: the copy below is written to s1 directly, without a token a
    # replica read would wait for (which shard is read is the point here, not which node).
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    k = key_on(cluster, "s0")
    with Session() as s:
        s.add(Customer(id=k, name="owner's row"))
        s.commit()
    # The copy an old horizontal_shard placement left on s1 (its chooser put the row there).
    with cluster.primary("s1").begin() as c:
        c.execute(text("INSERT INTO hs_customers (id, name) VALUES (:k, 'copy on s1')"), {"k": k})
    with Session() as s:
        with nodes_used(cluster) as served:
            obj = named_get(s, k)
        assert obj is not None and obj.name == "copy on s1"
        assert inspect(obj).identity_token == "s1"
        assert served and {n.split("/")[0] for n in served} == {"s1"}
        # The owner's object, loaded too, is another identity; naming s1 again finds s1's.
        owner = s.get(Customer, k)
        assert owner.name == "owner's row" and inspect(owner).identity_token == "s0"
        assert named_get(s, k) is obj


def test_merge_finds_the_row_by_the_objects_own_shard_key(cluster):
    """Order's primary key (id) is unique only per shard: merge() of an Order loads the
    row of that id on the shard its customer_id names, where its flush writes it."""
    # Read from the primaries: each merge() loads rows an earlier session committed (which
    # shard is read is the point, not which node).
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    k0, k1 = key_on(cluster, "s0"), key_on(cluster, "s1")
    with Session() as s:
        s.add_all([Customer(id=k0, name="a", orders=[Order(id=1, note="a1"), Order(id=2, note="a2")]),
                   Customer(id=k1, name="b", orders=[Order(id=1, note="b1")])])
        s.commit()
    with Session() as s:
        # id 1 is on s0 and s1; the object's key says s1.
        merged = s.merge(Order(id=1, customer_id=k1, note="b1 merged"))
        assert inspect(merged).identity_token == "s1" and merged.customer_id == k1
        s.commit()
    with Session() as s:
        # id 2 is only on s0, another customer's: by primary key, the merge would move that
        # row to s1, which the flush refuses (as before).
        s.merge(Order(id=2, customer_id=k1, note="b2"))
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
    # A detached Order from a session that kept no shard in its identity (a plain Session).
    with PlainSession(cluster.primary("s1")) as plain:
        detached = plain.get(Order, 1)
        plain.expunge(detached)
    assert inspect(detached).key[2] is None
    detached.note = "b1 detached"
    with Session() as s:
        assert inspect(s.merge(detached)).identity_token == "s1"
        s.commit()
    assert sorted(_on(cluster, "s0", "SELECT id, note FROM hs_orders")) == [(1, "a1"), (2, "a2")]
    assert _on(cluster, "s1", "SELECT id, note FROM hs_orders") == [(1, "b1 detached")]


@pytest.mark.parametrize("kwargs", [
    {"shards": {"s0": None}},
    {"shard_chooser": lambda *a, **k: "s0"},
    {"identity_chooser": lambda *a, **k: ["s0"]},
    {"execute_chooser": lambda ctx: ["s0"]},
], ids=lambda kw: next(iter(kw)))
def test_horizontal_shard_constructor_arguments_are_refused_saying_what_replaces_them(cluster, kwargs):
    with pytest.raises(ArgumentError) as err:
        shardkit.ShardedSession(cluster=cluster, **kwargs)
    msg = str(err.value)
    name = next(iter(kwargs))
    assert f"{name}=" in msg and "horizontal_shard" in msg and "cluster" in msg


def test_bind_shard_is_refused_saying_the_cluster_has_the_engines(cluster):
    with shardkit.ShardedSession(cluster=cluster) as s:
        with pytest.raises(ArgumentError) as err:
            s.bind_shard("s0", cluster.primary("s0"))
        assert "bind_shard" in str(err.value) and "cluster" in str(err.value)



SHARD_ID_OPTION = {
    "select": lambda s, k: s.scalars(select(Customer).execution_options(shard_id="s1")).all(),
    "keyed update": lambda s, k: s.execute(
        update(Customer).where(Customer.id == k).values(name="x").execution_options(shard_id="s1")),
    "key-less update": lambda s, k: s.execute(
        update(Customer).values(name="x"), execution_options={"shard_id": "s1"}),
    "get": lambda s, k: s.get(Customer, k, execution_options={"shard_id": "s1"}),
}


@pytest.mark.parametrize("run", SHARD_ID_OPTION.values(), ids=SHARD_ID_OPTION.keys())
def test_a_shard_id_execution_option_is_refused_not_ignored(cluster, run):
    """``execution_options(shard_id=...)`` is read by neither horizontal_shard nor shardkit;
    left unread, the statement would run where its key (or every shard) says."""
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    k = key_on(cluster, "s0")
    with Session() as s:
        s.add(Customer(id=k, name="a"))
        s.commit()
    with Session() as s, nodes_used(cluster) as served:
        with pytest.raises(ArgumentError) as err:
            run(s, k)
        assert "shard_id=" in str(err.value) and "shardkit_shard" in str(err.value)
        assert "bind_arguments={'shard_id'" in str(err.value)
        assert served == []
    assert _on(cluster, "s0", "SELECT name FROM hs_customers") == [("a",)]
