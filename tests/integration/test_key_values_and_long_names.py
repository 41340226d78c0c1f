"""Shard key values and types end to end, on real servers: a date-keyed list group with a
default given a date-time with a UTC offset (PostgreSQL stores its date, listed for
another shard than the default), and a shard key column whose name PostgreSQL cut at
63 bytes, as the ownership guard's install and verify report it."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Column, Date, DateTime, Integer, MetaData, Table, insert, select, text

import shardkit
from own_tables import cluster_with_tables
from shardkit.errors import ConfigurationError, ShardKeyError
from shardkit.verify import verify

LONG = "k" * 70


def test_aware_datetime_for_a_date_list_key_is_refused_not_misplaced(sharded_dev):
    s0, s1 = (s.name for s in sharded_dev.shards[:2])
    md = MetaData()
    ev = Table("kv_ev", md, Column("id", Integer, primary_key=True), Column("d", Date))
    config = {"groups": {"kv_evg": {"strategy": "list", "tables": {"kv_ev": "d"},
                                      "values": {s1: [dt.date(2024, 1, 2)]}, "default": s0}}}
    with cluster_with_tables(sharded_dev, config, md) as cluster:
        with shardkit.ShardedSession(cluster=cluster) as session:
            with pytest.raises(ShardKeyError, match="UTC offset"):
                session.execute(insert(ev), {"id": 1, "d": dt.datetime(2024, 1, 2, 1, tzinfo=dt.timezone.utc)})
            session.rollback()
            # The date itself, and a naive date-time (stored as its date), go to s1.
            session.execute(insert(ev), [{"id": 2, "d": dt.date(2024, 1, 2)},
                                         {"id": 3, "d": dt.datetime(2024, 1, 2, 23, 0)}])
            session.commit()
            assert session.execute(select(ev.c.id).where(ev.c.d == dt.date(2024, 1, 2))
                                   .order_by(ev.c.id)).scalars().all() == [2, 3]
        with cluster.primary(s1).connect() as c:
            assert c.execute(text("SELECT count(*) FROM kv_ev")).scalar_one() == 2
        assert verify(cluster).ok


def test_key_column_cut_at_63_bytes_is_named_so(sharded_dev):
    md = MetaData()
    Table("kv_long", md, Column("id", Integer, primary_key=True), Column(LONG, Integer))
    config = {"groups": {"kv_lg": {"tables": {"kv_long": LONG}}}}
    with cluster_with_tables(sharded_dev, config, md) as cluster:
        # Routing by the long name works (PostgreSQL cuts it in queries too) ...
        with shardkit.ShardedSession(cluster=cluster) as session:
            session.execute(insert(md.tables["kv_long"]), [{"id": i, LONG: i} for i in range(4)])
            session.commit()
        # ... but the catalog holds the cut name: say so, not "renamed or dropped".
        with pytest.raises(ConfigurationError) as e:
            verify(cluster)
        assert "63-byte" in str(e.value) and "k" * 63 + " " in str(e.value) + " "
        assert "dropped" not in str(e.value)


def test_verify_names_a_list_groups_refusal_not_a_custom_function(sharded_dev):
    """A list group listing naive date-times for a timestamptz column (a mistake of the
    config): verify reads the rows as aware date-times, which the group refuses; it
    reports them as such, not as a custom function's error."""
    s0, s1 = (s.name for s in sharded_dev.shards[:2])
    md = MetaData()
    Table("kv_tz", md, Column("id", Integer, primary_key=True), Column("at", DateTime(timezone=True)))
    config = {"groups": {"kv_tzg": {"strategy": "list", "tables": {"kv_tz": "at"},
                                      "values": {s1: [dt.datetime(2024, 1, 2)]}, "default": s0}}}
    with cluster_with_tables(sharded_dev, {}, md) as tables:
        with tables.primary(s0).begin() as c:
            c.execute(text("INSERT INTO kv_tz VALUES (1, '2024-01-03 00:00+00'), "
                           "(2, '2024-01-04 00:00+00')"))
        # (Without the models, as `shardkit verify --config` runs: with them, the cluster
        # refuses the config's naive values for this column.)
        cluster = shardkit.Cluster.from_config({**sharded_dev.config_dict(), **config})
        try:
            rep = verify(cluster)
        finally:
            cluster.dispose()
        assert not rep.ok
        out = rep.render()
        # (Both rows counted together: the reason, not each key.)
        assert "2 whose key the group's list strategy refuses: list key ... is a date-time with" in out, out
        assert "custom function" not in out, out
