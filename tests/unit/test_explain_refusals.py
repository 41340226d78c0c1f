"""``cluster.explain()`` refuses the cross-shard reads execution refuses without asking the
database, with the same ``ScatterRefused`` (message and construct), instead of describing a
merge that never runs.  (No server: both refuse before connecting anywhere.)"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import select, union_all
from sqlalchemy.orm import sessionmaker

import shardkit

URL = "postgresql+psycopg://app@127.0.0.1:{}/app"
md = sa.MetaData()
users = sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True),
                 sa.Column("country", sa.Text))
countries = sa.Table("countries", md, sa.Column("code", sa.Text, primary_key=True))
CONFIG = {
    "bucket_count": 16,
    "shards": [{"name": "s0", "primary": URL.format(1)}, {"name": "s1", "primary": URL.format(2)}],
    "groups": {"users": {"tables": {"users": "id"}}},
    "reference_tables": ["countries"],
}


@pytest.fixture(scope="module")
def cluster():
    c = shardkit.Cluster.from_config(CONFIG, metadata=md, follow_map=False)
    yield c
    c.dispose()


def refusals(cluster, stmt):
    """(what explain() raised, what execution raised): both must be ScatterRefused."""
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with pytest.raises(shardkit.ScatterRefused) as ran:
            s.execute(stmt)
    try:
        route = cluster.explain(stmt)
    except shardkit.ScatterRefused as e:
        return e, ran.value
    pytest.fail(f"explain() said merge {route.merge!r}; execution refused: {ran.value}")


REFERENCE_ROWS = {
    "reference rows only, sharded table in a subquery":
        select(countries.c.code).where(countries.c.code.in_(select(users.c.country))),
    "outer join keeping reference rows":
        select(countries.c.code, users.c.id).select_from(
            countries.outerjoin(users, users.c.country == countries.c.code)),
    "UNION ALL part over reference rows":
        union_all(select(users.c.country), select(countries.c.code)),
}


@pytest.mark.parametrize("stmt", REFERENCE_ROWS.values(), ids=REFERENCE_ROWS.keys())
def test_explain_refuses_reference_rows_every_shard_would_return(cluster, stmt):
    explained, ran = refusals(cluster, stmt)
    assert explained.construct == ran.construct == "reference table rows across shards"
    assert str(explained) == str(ran)


PAGES = {
    "FOR UPDATE": select(users).order_by(users.c.id).limit(5).with_for_update(),
    "populate_existing": select(users).order_by(users.c.id).offset(3)
    .execution_options(populate_existing=True),
}


@pytest.mark.parametrize("effect", PAGES)
def test_explain_refuses_a_page_that_would_lock_or_refresh_other_rows(cluster, effect):
    explained, ran = refusals(cluster, PAGES[effect])
    assert explained.construct == ran.construct == f"{effect} with LIMIT"
    assert str(explained) == str(ran)
