"""A shard key on a ``TIMESTAMP(p)`` column with p < 6: PostgreSQL stores the key rounded
to p fractional digits, so the row belongs where the stored value does (a month's last
second plus 0.7 s in a ``timestamp(0)`` is the next month's first second).  On the shared
local cluster, its own tables."""

from __future__ import annotations

import datetime
import random

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, select, text
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._routing import _timestamp_coercer

pytestmark = pytest.mark.integration

SPLIT = datetime.datetime(2026, 2, 1)
UTC = datetime.timezone.utc
NOON = datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "tsp_readings"
    at: Mapped[datetime.datetime] = mapped_column(TIMESTAMP(precision=0), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class Stamp(Base):
    """Range-sharded by a timestamptz(3), split at an instant given with an offset."""
    __tablename__ = "tsp_stamps"
    at: Mapped[datetime.datetime] = mapped_column(TIMESTAMP(timezone=True, precision=3), primary_key=True)


CONFIG = {"groups": {
    "readings": {"strategy": "range", "tables": {"tsp_readings": "at"},
                 "ranges": [{"to": SPLIT, "shard": "s0"}, {"from": SPLIT, "shard": "s1"}]},
    "stamps": {"strategy": "range", "tables": {"tsp_stamps": "at"},
               "ranges": [{"to": NOON, "shard": "s0"}, {"from": NOON, "shard": "s1"}]},
}}


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        yield c


def test_the_key_is_rounded_as_postgresql_stores_it(cluster):
    rng = random.Random(5)
    values = []
    for precision in (0, 1, 3, 5):
        unit = 10 ** (6 - precision)
        for base in (datetime.datetime(2026, 1, 31, 23, 59, 59), datetime.datetime(1999, 12, 31, 23, 59, 59),
                     datetime.datetime(1970, 1, 1), datetime.datetime(2000, 1, 1)):
            # Exact halves (rounded away from 2000-01-01), and either side of them.
            for us in (unit // 2, unit // 2 - 1, unit // 2 + 1, unit - 1, 1, rng.randrange(1_000_000)):
                values.append((precision, base.replace(microsecond=us % 1_000_000)))
    with cluster.primary("s0").connect() as conn:
        for precision, v in values:
            stored = conn.execute(text(f"SELECT CAST(:v AS timestamp({precision}))"), {"v": v}).scalar()
            assert _timestamp_coercer(precision)(v) == stored, (precision, v)
            aware = v.replace(tzinfo=UTC)
            stored = conn.execute(text(f"SELECT CAST(:v AS timestamptz({precision}))"), {"v": aware}).scalar()
            assert _timestamp_coercer(precision)(aware) == stored, (precision, aware)


def test_a_row_lands_where_its_stored_key_belongs(cluster):
    late = SPLIT - datetime.timedelta(microseconds=300_000)  # stored as SPLIT: s1's
    early = SPLIT - datetime.timedelta(microseconds=600_000)  # stored as SPLIT - 1 s: s0's
    assert cluster.shard_for(Reading, late) == "s1"
    assert cluster.shard_for(Reading, early) == "s0"
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add_all([Reading(at=late, n=1), Reading(at=early, n=2)])
        s.commit()
    for shard, want in (("s0", [(SPLIT - datetime.timedelta(seconds=1), 2)]), ("s1", [(SPLIT, 1)])):
        with cluster.primary(shard).connect() as conn:
            assert [tuple(r) for r in conn.execute(text("SELECT at, n FROM tsp_readings"))] == want
    with Session() as s:
        assert s.get(Reading, SPLIT).n == 1
        stored = [SPLIT, SPLIT - datetime.timedelta(seconds=1)]
        assert sorted(s.scalars(select(Reading.n).where(Reading.at.in_(stored)))) == [1, 2]
        # As on one database: the column's stored value is not equal to the unrounded one.
        assert s.scalars(select(Reading.n).where(Reading.at == late)).all() == []


def test_a_timestamptz_key_is_found_by_its_stored_value(cluster):
    def before(us):
        return NOON - datetime.timedelta(microseconds=us)
    # Stored as NOON (s1's): 1 us and exactly half a millisecond before it.
    assert cluster.shard_for(Stamp, before(1)) == cluster.shard_for(Stamp, before(500)) == "s1"
    keys = [before(1), before(501), before(123_457)]  # stored: NOON, 11:59:59.999, 11:59:59.877
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add_all([Stamp(at=k) for k in keys])
        s.commit()
    found = 0
    for shard in cluster.shard_names:
        with cluster.primary(shard).connect() as conn:
            for (at,) in conn.execute(text("SELECT at FROM tsp_stamps")):
                assert cluster.shard_for(Stamp, at) == shard, at
                assert (at >= NOON) == (shard == "s1"), at
                found += 1
    assert found == 3
    with Session() as s:
        assert s.get(Stamp, NOON) is not None
        assert sorted(s.scalars(select(Stamp.at).where(Stamp.at.in_([NOON, before(1_000)])))) == [before(1_000), NOON]
