"""Shard key values and types, read by a demanding user (no server): a list group keyed
on a date or timestamp column given a key of another date/time kind than its values
must be refused, not sent to the group's default shard (PostgreSQL stores it as the
column's type, whose value another shard may be listed for); and a shard key column
whose name PostgreSQL cut at 63 bytes is reported as such, not as dropped."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Column, Date, DateTime, Integer, Interval, MetaData, Numeric, String, Table
from sqlalchemy.dialects import postgresql

import shardkit
from shardkit._guard import table_shape
from shardkit._strategies import ListStrategy
from shardkit.errors import ConfigurationError, ShardKeyError

UTC = dt.timezone.utc
SHARDS = [{"name": n, "primary": f"postgresql+psycopg://u@127.0.0.1:1/{n}"} for n in ("s0", "s1")]


def _cluster(metadata: MetaData, groups: dict) -> shardkit.Cluster:
    return shardkit.Cluster.from_config({"bucket_count": 8, "shards": SHARDS, "groups": groups},
                                        metadata=metadata)


# -- list groups: a key of another date/time kind than the values ----------------------------


@pytest.mark.parametrize("key, values", [
    # an aware date-time for date values: its date depends on the server's TimeZone
    (dt.datetime(2024, 1, 2, 1, 0, tzinfo=UTC), [dt.date(2024, 1, 2)]),
    # a date for timestamp values: PostgreSQL stores 2024-01-02 00:00, listed for s1
    (dt.date(2024, 1, 2), [dt.datetime(2024, 1, 2)]),
    # a naive date-time for values with an offset, and the reverse
    (dt.datetime(2024, 1, 2), [dt.datetime(2024, 1, 2, tzinfo=UTC)]),
    (dt.datetime(2024, 1, 2, tzinfo=UTC), [dt.datetime(2024, 1, 2)]),
])
def test_list_key_of_another_date_kind_is_refused_not_defaulted(key, values):
    s = ListStrategy({v: "s1" for v in values}, default="s0")
    with pytest.raises(ShardKeyError, match="give the key as the column holds it"):
        s.shard_for_key(key)
    no_default = ListStrategy({v: "s1" for v in values})
    with pytest.raises(ShardKeyError):   # not NoShardForKey's "add it to the list"
        no_default.shard_for_key(key)


def test_list_key_of_the_values_kind_still_defaults():
    s = ListStrategy({dt.date(2024, 1, 2): "s1"}, default="s0")
    assert s.shard_for_key(dt.date(2024, 1, 3)) == "s0"
    assert s.shard_for_key(dt.date(2024, 1, 2)) == "s1"
    s = ListStrategy({dt.datetime(2024, 1, 2, tzinfo=UTC): "s1"}, default="s0")
    plus3 = dt.timezone(dt.timedelta(hours=3))
    assert s.shard_for_key(dt.datetime(2024, 1, 2, 4, tzinfo=plus3)) == "s0"
    assert s.shard_for_key(dt.datetime(2024, 1, 2, 3, tzinfo=plus3)) == "s1"   # the same instant
    # values of no date/time type: anything else goes to the default as before
    s = ListStrategy({"eu": "s1"}, default="s0")
    assert s.shard_for_key(dt.date(2024, 1, 2)) == "s0"
    assert s.shard_for_key("us") == "s0"


def test_composite_list_key_part_of_another_date_kind_is_refused():
    s = ListStrategy({("eu", dt.date(2024, 1, 2)): "s1"}, default="s0")
    assert s.shard_for_key(("eu", dt.date(2024, 1, 3))) == "s0"
    with pytest.raises(ShardKeyError):
        s.shard_for_key(("eu", dt.datetime(2024, 1, 2, 5, tzinfo=UTC)))


def test_date_keyed_list_group_through_the_cluster():
    md = MetaData()
    Table("ev", md, Column("id", Integer, primary_key=True), Column("d", Date))
    Table("tv", md, Column("id", Integer, primary_key=True), Column("t", DateTime))
    cluster = _cluster(md, {
        "evg": {"strategy": "list", "tables": {"ev": "d"}, "values": {"s1": [dt.date(2024, 1, 2)]},
                "default": "s0"},
        "tvg": {"strategy": "list", "tables": {"tv": "t"}, "values": {"s1": [dt.datetime(2024, 1, 2)]},
                "default": "s0"},
    })
    try:
        # A naive date-time is stored as its date: routed by it.
        assert cluster.shard_for("ev", dt.datetime(2024, 1, 2, 23, 0)) == "s1"
        with pytest.raises(ShardKeyError, match="UTC offset") as e:
            cluster.shard_for("ev", dt.datetime(2024, 1, 2, 1, 0, tzinfo=UTC))
        assert e.value.table == "ev"
        with pytest.raises(ShardKeyError, match="is a date,") as e:
            cluster.shard_for("tv", dt.date(2024, 1, 2))
        assert e.value.table == "tv"
    finally:
        cluster.dispose()


# -- a key column name PostgreSQL cut at 63 bytes ---------------------------------------------


class _Result:
    def __init__(self, rows):
        self._rows = rows

    def all(self):
        return self._rows

    def __iter__(self):
        return iter(self._rows)


class _Conn:
    """Answers table_shape's catalog query with a table of columns ``id`` and ``stored``."""

    def __init__(self, stored: str):
        self.stored = stored

    def execute(self, *_a, **_k):
        return _Result([("id", "int4", None, None, None, False),
                        (self.stored, "int4", None, None, None, False)])


@pytest.mark.parametrize("name", ["k" * 70, "ä" * 40])
def test_long_key_column_is_reported_as_cut_not_dropped(name):
    stored = name.encode()[:63].decode(errors="ignore")
    with pytest.raises(ConfigurationError) as e:
        table_shape(_Conn(stored), "lt", keys=[name])
    msg = str(e.value)
    assert "63" in msg and stored in msg
    assert "renamed or dropped" not in msg


def test_missing_key_column_still_says_so():
    with pytest.raises(ConfigurationError, match="renamed or dropped"):
        table_shape(_Conn("other"), "lt", keys=["k"])


def test_string_key_column_unaffected():
    md = MetaData()
    Table("names", md, Column("n", String, primary_key=True))
    cluster = _cluster(md, {"ng": {"strategy": "list", "tables": {"names": "n"},
                                   "values": {"s1": ["a"]}, "default": "s0"}})
    try:
        assert cluster.shard_for("names", "a") == "s1"
        assert cluster.shard_for("names", "b") == "s0"
        with pytest.raises(ShardKeyError):
            cluster.shard_for("names", 1)
    finally:
        cluster.dispose()


# -- hash groups on a column type the hash does not place -------------------------------------

@pytest.mark.parametrize("type_", [Interval(), postgresql.INTERVAL(), Numeric(10, 2), Date()],
                         ids=["Interval", "postgresql.INTERVAL", "Numeric", "Date"])
def test_hash_group_on_a_column_it_cannot_hash_is_refused_at_load(type_):
    md = MetaData()
    Table("hk", md, Column("id", Integer, primary_key=True), Column("k", type_))
    with pytest.raises(ConfigurationError, match="hk.k is .* which the hash strategy cannot place"):
        _cluster(md, {"g": {"strategy": "hash", "tables": {"hk": "k"}}})
