"""Models whose shard key column is declared with SQLAlchemy's ``postgresql.DOMAIN`` type, on
real PostgreSQL: ``create_all`` on the shards creates the domains, rows inserted through a
``ShardedSession`` land on the shard ``cluster.shard_for`` names for the key in its base
type's Python value, and reads by the key find them there.

The router reads a key in its column's type (a uuid column's string form as the uuid, a
``NUMERIC(p, s)`` key as the value stored, rounded): for a domain column that is the base
type's rule, or a key given in another form than the stored value's would be placed by a
value the database does not store.  One module-scoped dev cluster (2 shards, no replicas).
"""

from __future__ import annotations

import decimal
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import DOMAIN
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = [pytest.mark.integration,
              # (SQLAlchemy 2.1's own deprecation warning for its DOMAIN type in a comparison)
              pytest.mark.filterwarnings("ignore:Type object .*DOMAIN.* operator_classes")]

REF = DOMAIN("dm_ref", sa.Uuid(), not_null=True)
TENANT = DOMAIN("dm_tenant", sa.BigInteger(), check="VALUE > 0")
AMOUNT = DOMAIN("dm_amount", sa.Numeric(10, 2))


class Base(DeclarativeBase):
    pass


class Device(Base):
    """Hash-sharded by a domain over uuid."""
    __tablename__ = "dm_devices"
    id: Mapped[uuid.UUID] = mapped_column(REF, primary_key=True)
    name: Mapped[str] = mapped_column(sa.Text)


class Account(Base):
    """Hash-sharded by a domain over bigint."""
    __tablename__ = "dm_accounts"
    id: Mapped[int] = mapped_column(TENANT, primary_key=True)


class Payment(Base):
    """Range-sharded by a domain over numeric(10, 2)."""
    __tablename__ = "dm_payments"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    amount: Mapped[decimal.Decimal] = mapped_column(AMOUNT)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=16)
    cfg = {**dev.config_dict(), "groups": {
        "devices": {"strategy": "hash", "tables": {"dm_devices": "id"}},
        "accounts": {"strategy": "hash", "tables": {"dm_accounts": "id"}},
        "payments": {"strategy": "range", "tables": {"dm_payments": "amount"},
                     "ranges": [{"from": -1000000, "to": 100, "shard": "s0"},
                                {"from": 100, "shard": "s1"}]},
    }}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    cluster.dispose()


def stored(cluster, table: str, column: str) -> dict[str, list]:
    out = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            out[s] = sorted(c.execute(sa.text(f"SELECT {column} FROM {table}")).scalars())
    return out


def test_create_all_made_the_domains(env):
    cluster, _ = env
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            got = dict(c.execute(sa.text(
                "SELECT t.typname, format_type(t.typbasetype, t.typtypmod) FROM pg_type t "
                "WHERE t.typtype = 'd' AND t.typname LIKE 'dm\\_%'")).all())
        assert got == {"dm_ref": "uuid", "dm_tenant": "bigint", "dm_amount": "numeric(10,2)"}


def test_uuid_domain_keys_given_as_strings_land_where_shard_for_says(env):
    cluster, Session = env
    keys = [uuid.UUID(int=i * 7919 + 1) for i in range(40)]
    want = {k: cluster.shard_for(Device, k) for k in keys}
    assert set(want.values()) == {"s0", "s1"}
    with Session() as s:
        # the string form, as an application reading ids from a URL would give them
        s.add_all(Device(id=str(k), name=f"d{i}") for i, k in enumerate(keys))
        s.commit()
    where = stored(cluster, "dm_devices", "id")
    for k in keys:
        assert k in where[want[k]], (k, want[k])
        assert cluster.shard_for("dm_devices", str(k)) == want[k]
    with Session() as s:
        for k in keys:
            assert s.get(Device, str(k)).id == k
            # (a str compared with the domain is sent as varchar, which PostgreSQL does not
            # compare with it: SQLAlchemy's doing, whatever the shard)
            assert s.scalars(sa.select(Device.name).where(Device.id == k)).one()


def test_bigint_domain_keys_land_where_shard_for_says(env):
    cluster, Session = env
    keys = list(range(1, 41))
    with Session() as s:
        s.add_all(Account(id=k) for k in keys)
        s.commit()
    where = stored(cluster, "dm_accounts", "id")
    assert all(where.values())
    for k in keys:
        assert k in where[cluster.shard_for(Account, k)]
    with Session() as s, pytest.raises(shardkit.ShardKeyError, match="pass an int"):
        s.get(Account, "7")   # a string would hash apart from the stored bigint


def test_numeric_domain_range_keys_land_by_the_value_stored(env):
    cluster, Session = env
    given = [decimal.Decimal("99.995"), decimal.Decimal("99.994"), decimal.Decimal("100.004"),
             decimal.Decimal("5")]
    with Session() as s:
        s.add_all(Payment(id=i, amount=a) for i, a in enumerate(given))
        s.commit()
    where = stored(cluster, "dm_payments", "amount")
    # 99.995 is stored as 100.00: a key of the shard from 100
    assert where == {"s0": [decimal.Decimal("5.00"), decimal.Decimal("99.99")],
                     "s1": [decimal.Decimal("100.00"), decimal.Decimal("100.00")]}
    for a in given:
        assert cluster.shard_for(Payment, a) == ("s1" if a >= decimal.Decimal("99.995") else "s0")
    with Session() as s:
        by_stored = sa.select(Payment.id).where(Payment.amount == decimal.Decimal("100.00"))
        assert list(cluster.explain(by_stored).shards) == ["s1"]
        assert sorted(s.scalars(by_stored).all()) == [0, 2]
