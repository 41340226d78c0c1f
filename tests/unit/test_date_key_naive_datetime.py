"""Range routing of a date key compared with a naive datetime, no server."""

import datetime as dt

import pytest
from sqlalchemy import Column, Date, Integer, TypeDecorator, literal, select
from sqlalchemy.orm import DeclarativeBase

from shardkit import Cluster


class FlexDate(TypeDecorator):
    """A date column that also takes ISO strings: its process_bind_param passes a datetime on."""
    impl = Date
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return dt.date.fromisoformat(value) if isinstance(value, str) else value


class Base(DeclarativeBase):
    pass


class Plain(Base):
    __tablename__ = "ld_plain"
    k = Column(Date, primary_key=True)
    v = Column(Integer)


class Flex(Base):
    __tablename__ = "ld_flex"
    k = Column(FlexDate, primary_key=True)
    v = Column(Integer)


@pytest.fixture(scope="module")
def cluster():
    return Cluster.from_config({
        "bucket_count": 8,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://u@{s}.invalid/db"} for s in ("s0", "s1", "s2")],
        "groups": {"g": {"strategy": "range", "tables": {"ld_plain": "k", "ld_flex": "k"}, "ranges": [
            {"to": dt.date(2024, 1, 1), "shard": "s0"},
            {"from": dt.date(2024, 1, 1), "to": dt.date(9999, 12, 31), "shard": "s1"},
            {"from": dt.date(9999, 12, 31), "shard": "s2"}]}},
    }, metadata=Base.metadata)


def test_decorated_date_key_below_a_literal_datetime_reaches_the_day_of_it(cluster):
    # literal(datetime) is sent as a timestamp: PostgreSQL compares k at its midnight, so
    # k < '2024-01-01 06:00' holds the row of 2024-01-01 (on s1). Before 38f3ade: every shard.
    r = cluster.explain(select(Flex).where(Flex.k < literal(dt.datetime(2024, 1, 1, 6))))
    assert set(r.shards) == {"s0", "s1"}
    r = cluster.explain(select(Plain).where(Plain.k < literal(dt.datetime(2024, 1, 1, 6))))
    assert set(r.shards) == {"s0", "s1"}


@pytest.mark.parametrize("model", [Plain, Flex])
def test_high_bound_on_the_last_python_date_is_not_narrowed(cluster, model):
    # k < '9999-12-31 06:00' (a timestamp) holds 9999-12-31, on s2.
    r = cluster.explain(select(model).where(model.k < literal(dt.datetime(9999, 12, 31, 6))))
    assert "s2" in r.shards
