"""``cluster.explain()`` answers as execution does for these refusals and routes: a
reference table's INSERT/UPDATE that leaves a column to a value each shard would make is
refused by both (explain() routed it to every shard), an ORM bulk UPDATE by primary key
included (execution ran it).  No server: both decide before
connecting anywhere."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import sessionmaker

import shardkit

URL = "postgresql+psycopg://app@127.0.0.1:{}/app"
md = sa.MetaData()
users = sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True),
                 sa.Column("country", sa.Text), sa.Column("score", sa.Integer))
tags = sa.Table("tags", md, sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("name", sa.Text),
                sa.Column("created", sa.DateTime, server_default=func.now()),
                sa.Column("changed", sa.DateTime, onupdate=func.now()))
CONFIG = {
    "bucket_count": 16,
    "shards": [{"name": "s0", "primary": URL.format(1)}, {"name": "s1", "primary": URL.format(2)}],
    "groups": {"users": {"tables": {"users": "id"}}},
    "reference_tables": ["tags"],
}


@pytest.fixture(scope="module")
def cluster():
    c = shardkit.Cluster.from_config(CONFIG, metadata=md, follow_map=False)
    yield c
    c.dispose()


def both_refuse(cluster, error, stmt, params=None):
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with pytest.raises(error) as ran:
            s.execute(stmt, params)
    try:
        route = cluster.explain(stmt, params)
    except error as e:
        return e, ran.value
    pytest.fail(f"explain() said {route.shards} ({route.reason}); execution refused: {ran.value}")


WRITES = {
    "serial left out": (insert(tags).values(name="a"), None, "column id (a serial or identity)"),
    "server default now()": (insert(tags), {"id": 1, "name": "a"}, "column created's server default"),
    "executemany": (insert(tags), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                    "column created's server default"),
    "update onupdate": (update(tags).values(name="b"), None, "column changed's onupdate"),
}


@pytest.mark.parametrize("case", WRITES)
def test_explain_refuses_a_reference_write_each_shard_would_fill_in_differently(cluster, case):
    stmt, params, column = WRITES[case]
    explained, ran = both_refuse(cluster, shardkit.CrossShardWriteError, stmt, params)
    assert str(explained) == str(ran)
    assert column in str(explained)


def test_explain_still_routes_a_reference_write_that_gives_every_value(cluster):
    route = cluster.explain(insert(tags).values(id=1, name="a", created=func.now()))
    assert route.is_write and set(route.shards) == {"s0", "s1"}


def test_explain_and_execution_agree_on_text_forced_to_replicas(cluster):
    stmt = text("select 1").execution_options(shardkit_all_shards=True, shardkit_role="replica")
    explained, ran = both_refuse(cluster, shardkit.RoutingError, stmt)
    assert str(explained) == str(ran)
    named = cluster.explain(text("select 1").execution_options(shardkit_shard="s1", shardkit_role="replica"))
    assert named.shards == ("s1",) and not named.is_write


def test_explain_reads_a_wrapped_select_on_a_named_shard(cluster):
    inner = select(users).where(users.c.score > 1)
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __table__ = users

    route = cluster.explain(select(User).from_statement(inner).execution_options(shardkit_shard="s0"))
    assert route.shards == ("s0",) and not route.is_write


@pytest.mark.parametrize("group", [text("country"), sa.literal_column("1")])
def test_explain_refuses_group_by_text_as_execution(cluster, group):
    stmt = select(users.c.country.label("c"), func.count()).group_by(group)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with pytest.raises(shardkit.ScatterRefused) as ran:
            s.execute(stmt)
    assert cluster.explain(stmt).merge == f"refused: {ran.value}"


def test_explain_merges_a_group_by_that_names_a_label(cluster):
    """``group_by("c")`` names the select list's label c (README, cross-shard queries): the
    same merge as grouping by the column itself."""
    by_name = cluster.explain(select(users.c.country.label("c"), func.count()).group_by("c"))
    by_column = cluster.explain(select(users.c.country.label("c"), func.count()).group_by(users.c.country))
    assert by_name.merge == by_column.merge and by_name.merge.startswith("group-by merge"), by_name.merge


def test_orm_bulk_update_of_a_reference_table_leaving_its_onupdate_is_refused_as_explained(cluster):
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __table__ = tags

    stmt, rows = update(Tag), [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    explained, ran = both_refuse(cluster, shardkit.CrossShardWriteError, stmt, rows)
    assert str(explained) == str(ran)
    assert "column changed's onupdate" in str(ran)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with pytest.raises(shardkit.CrossShardWriteError):
            s.bulk_update_mappings(Tag, rows)
