"""A reference table's INSERT through a lightweight ``table()`` (a ``TableClause``, no
``Table``): routed to every shard like one through a ``Table``, not an AttributeError.

shardkit checks such a write for a column each shard would fill in on its own (a serial,
a server default calling a function); a ``TableClause`` has no ``autoincrement_column``
and its columns no ``identity``, and it declares no defaults at all: nothing to refuse.
(mypy reports it: ``"TableClause" has no attribute "autoincrement_column"``.)  No server:
explain() decides before connecting, and execution fails at the check, before it
connects, when the check is broken."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import column, insert, table
from sqlalchemy.orm import sessionmaker

import shardkit

URL = "postgresql+psycopg://app@127.0.0.1:{}/app"
md = sa.MetaData()
users = sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True))
countries = sa.Table("countries", md, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("code", sa.Text))
CONFIG = {
    "bucket_count": 16,
    "shards": [{"name": "s0", "primary": URL.format(1)}, {"name": "s1", "primary": URL.format(2)}],
    "groups": {"users": {"tables": {"users": "id"}}},
    "reference_tables": ["countries"],
}
lite = table("countries", column("id"), column("code"))


@pytest.fixture(scope="module")
def cluster():
    c = shardkit.Cluster.from_config(CONFIG, metadata=md, follow_map=False)
    yield c
    c.dispose()


@pytest.mark.parametrize("params", [None, {"code": "fr"}, [{"code": "fr"}, {"code": "de"}]],
                         ids=["values", "params", "executemany"])
def test_explain_routes_a_lightweight_reference_insert_to_every_shard(cluster, params):
    stmt = insert(lite).values(code="fr") if params is None else insert(lite)
    route = cluster.explain(stmt, params)
    assert route.is_write and set(route.shards) == {"s0", "s1"}


def test_execution_of_a_lightweight_reference_insert_gets_past_the_check(cluster):
    # Past the check, the INSERT goes to the shards, which do not answer here.
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with pytest.raises((shardkit.ShardUnavailable, sa.exc.OperationalError)):
            s.execute(insert(lite).values(code="fr"))


def test_the_same_insert_through_the_table_is_still_refused(cluster):
    # The Table declares id a serial: each shard would number the row on its own.
    with pytest.raises(shardkit.CrossShardWriteError, match=r"column id \(a serial or identity\)"):
        cluster.explain(insert(countries).values(code="fr"))
