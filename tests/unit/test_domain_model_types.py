"""Model columns of a PostgreSQL DOMAIN type (``postgresql.DOMAIN(name, data_type)``) as shard
keys, where shardkit decides by the column's SQLAlchemy type without a server: the checks of
``Cluster.from_config(..., metadata=)`` and the router's reading of a key in its column's type.

A domain's values are its base type's (PostgreSQL stores, compares and returns them as those;
a driver reads them as those), so each decision is the base type's, through domains over
domains and TypeDecorators around a domain: a key the base type would have refused is refused
(citext, numeric under a hash group, a bound the column never holds), a key it accepts is
accepted, and a key value is brought to the base type's Python value before it is hashed or
compared, as it is for a column of the base type.
"""

from __future__ import annotations

import decimal
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import CITEXT, DOMAIN

from shardkit import Cluster, ConfigurationError, ShardKeyError

# (SQLAlchemy 2.1's own deprecation warning for its DOMAIN type in a comparison)
pytestmark = pytest.mark.filterwarnings("ignore:Type object .*DOMAIN.* operator_classes")

URL = "postgresql+psycopg://app@db{}.example:5432/app"
SHARDS = [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}]

HASH = {"strategy": "hash"}
INT_RANGES = {"strategy": "range", "ranges": [{"from": 0, "to": 100, "shard": "s0"},
                                             {"from": 100, "shard": "s1"}]}


class AroundDomain(sa.TypeDecorator):
    """A TypeDecorator whose implementation is a domain over citext."""
    impl = DOMAIN("ci_wrapped", CITEXT())
    cache_ok = True


def cluster(type_, group, bucket_count=16):
    md = sa.MetaData()
    sa.Table("t", md, sa.Column("k", type_, primary_key=True))
    cfg = {"bucket_count": bucket_count, "shards": SHARDS, "groups": {"g": {"tables": {"t": "k"}, **group}}}
    return Cluster.from_config(cfg, metadata=md), md.tables["t"]


def refused(type_, group) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as ei:
        cluster(type_, group)
    return ei.value


@pytest.mark.parametrize("type_, shown", [
    (DOMAIN("ci_name", CITEXT()), "ci_name (a domain over citext)"),
    (DOMAIN("ci_outer", DOMAIN("ci_inner", CITEXT())), "ci_outer (a domain over citext)"),
    (AroundDomain(), "ci_wrapped (a domain over citext)"),
])
@pytest.mark.parametrize("group", [HASH, {"strategy": "list", "values": {"s0": ["a"], "s1": ["b"]}}])
def test_a_domain_over_citext_is_refused_as_citext_is(type_, shown, group):
    e = refused(type_, group)
    assert e.field == "groups.g.tables.t"
    assert f"t.k is {shown}, which compares without case" in str(e) and "lower(" in str(e)


@pytest.mark.parametrize("type_, shown", [
    (DOMAIN("amount", sa.Numeric(10, 2)), "amount (a domain over NUMERIC(10, 2))"),
    (DOMAIN("deep_amount", DOMAIN("amount", sa.Numeric(10, 2))), "deep_amount (a domain over NUMERIC(10, 2))"),
    (DOMAIN("day", sa.Date()), "day (a domain over DATE)"),
    (DOMAIN("flag", sa.Boolean()), "flag (a domain over BOOLEAN)"),
])
def test_a_hash_key_of_a_domain_over_an_unhashable_type_is_refused(type_, shown):
    e = refused(type_, HASH)
    assert e.field == "groups.g.tables.t"
    assert f"t.k is {shown}, which the hash strategy cannot place" in str(e)


def test_a_range_bound_the_domain_s_base_type_never_holds_is_refused():
    e = refused(DOMAIN("handle", sa.Text()), INT_RANGES)
    assert e.field == "groups.g.ranges" and "which is handle (a domain over TEXT)" in str(e)
    e = refused(DOMAIN("tenant_id", sa.BigInteger()),
                {"strategy": "list", "values": {"s0": ["1"], "s1": ["2"]}, "default": "s0"})
    assert e.field.startswith("groups.g.values.") and "tenant_id (a domain over BIGINT)" in str(e)
    e = refused(DOMAIN("ref", sa.Uuid()), {"strategy": "list", "values": {
        "s0": ["0000000A-0000-0000-0000-000000000001"]}, "default": "s1"})
    assert "write it as '0000000a-0000-0000-0000-000000000001'" in str(e)


@pytest.mark.parametrize("type_", [
    DOMAIN("tenant_id", sa.BigInteger()), DOMAIN("deep_id", DOMAIN("tenant_id", sa.BigInteger())),
    DOMAIN("handle", sa.Text()), DOMAIN("code", sa.String(20)), DOMAIN("padded", sa.CHAR(6)),
    DOMAIN("ref", sa.Uuid()), DOMAIN("blob", sa.LargeBinary()),
])
def test_a_hash_key_of_a_domain_over_a_hashable_type_is_accepted(type_):
    c, _ = cluster(type_, HASH)
    c.dispose()


def same_shards(type_, base, group, keys, bucket_count=16):
    """Each key routes as it does for a column of the base type, by table name, by Table
    and in a statement."""
    c, t = cluster(type_, group, bucket_count)
    b, bt = cluster(base, group, bucket_count)
    try:
        for key in keys:
            want = b.shard_for(bt, key)
            assert c.shard_for("t", key) == want, key
            assert c.shard_for(t, key) == want, key
            assert list(c.explain(sa.select(t).where(t.c.k == key)).shards) == [want], key
    finally:
        c.dispose()
        b.dispose()


def test_keys_of_a_domain_over_uuid_route_as_uuid_keys_in_either_form():
    keys = [uuid.UUID(int=i * 7919 + 1) for i in range(24)]
    same_shards(DOMAIN("deep_ref", DOMAIN("ref", sa.Uuid())), sa.Uuid(), HASH,
                keys + [str(k) for k in keys])
    c, t = cluster(DOMAIN("ref", sa.Uuid()), HASH)
    try:
        for k in keys:
            assert c.shard_for(t, str(k)) == c.shard_for(t, k)
        with pytest.raises(ShardKeyError, match="not a valid UUID"):
            c.shard_for(t, "nope")
    finally:
        c.dispose()


def test_a_key_of_another_type_than_the_domain_s_base_type_is_refused():
    for type_, wrong in ((DOMAIN("tenant_id", sa.BigInteger()), "5"),
                         (DOMAIN("deep_id", DOMAIN("tenant_id", sa.Integer())), "5"),
                         (DOMAIN("handle", sa.Text()), 5)):
        c, t = cluster(type_, HASH)
        try:
            for where in ("t", t):
                with pytest.raises(ShardKeyError, match="pass an? (int|str)"):
                    c.shard_for(where, wrong)
        finally:
            c.dispose()


def test_a_domain_over_char_n_is_read_without_its_trailing_blanks():
    c, t = cluster(DOMAIN("padded", sa.CHAR(6)), HASH, bucket_count=64)
    try:
        for i in range(24):
            assert c.bucket_for(t, f"p{i}    ") == c.bucket_for(t, f"p{i}")
    finally:
        c.dispose()
    same_shards(DOMAIN("padded", sa.CHAR(6)), sa.CHAR(6), HASH, [f"p{i}  " for i in range(24)])


def test_a_numeric_domain_range_key_is_placed_by_the_value_stored():
    """99.995 in a NUMERIC(10, 2) is stored as 100.00: the shard of the keys from 100."""
    amount = DOMAIN("amount", sa.Numeric(10, 2))
    same_shards(DOMAIN("deep_amount", amount), sa.Numeric(10, 2), INT_RANGES,
                [decimal.Decimal("99.995"), decimal.Decimal("99.994"), 99.995, decimal.Decimal("-0.001")])
    c, t = cluster(amount, INT_RANGES)
    try:
        assert c.shard_for(t, decimal.Decimal("99.995")) == "s1"
        assert c.shard_for("t", decimal.Decimal("99.994")) == "s0"
    finally:
        c.dispose()
