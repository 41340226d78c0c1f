"""Routing and colocation of the ``key IN (SELECT key ...)`` semi-join.

Rows with equal keys live on one shard, so each shard answers ``key IN (SELECT ...)`` for its
own rows, as a condition. Not under NOT / IS FALSE or as a value: there a NULL the subquery
yields on another shard decides the answer (as it does for NOT IN, which stays refused).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, false, insert, not_, or_, select, text

import shardkit

pytestmark = pytest.mark.integration

md = MetaData()
users = Table("dra_users", md, Column("id", BigInteger, primary_key=True, autoincrement=False))
tags = Table("dra_tags", md, Column("id", Integer, primary_key=True, autoincrement=False),
             Column("user_id", BigInteger, nullable=True))
GROUPS = {"groups": {"dra": {"strategy": "hash", "tables": {"dra_users": "id", "dra_tags": "user_id"}}}}


@pytest.fixture(scope="module")
def cluster(shardkit_module_cluster_factory) -> Iterator[shardkit.Cluster]:
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    c = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=md)
    for s in c.shard_names:
        md.drop_all(c.primary(s))
        md.create_all(c.primary(s))
    for uid in range(1, 9):
        with c.primary(c.shard_for("dra_users", uid)).begin() as conn:
            conn.execute(insert(users).values(id=uid))
            if uid % 2:
                conn.execute(insert(tags).values(id=uid, user_id=uid))
    # A row without a key (as scope(shard=...) inserts it) on the first shard only.
    with c.primary(c.shard_names[0]).begin() as conn:
        conn.execute(insert(tags).values(id=100, user_id=None))
    yield c
    c.dispose()


def test_key_in_subquery_under_not_or_as_a_value_is_refused(cluster):
    """``NOT (id IN (SELECT user_id ...) OR ...)`` is empty on one database (the subquery
    holds a NULL); run on each shard, the shard whose subquery has no NULL returned its
    untagged users. ``(id IN (...)) IS false`` and ``id IN (...)`` as a column likewise."""
    sub = select(tags.c.user_id)
    # One database's answers, from the rows.
    stmts = [
        select(users.c.id).where(not_(or_(users.c.id.in_(sub), false()))),
        select(users.c.id).where(users.c.id.in_(sub).is_(false())),
        select(users.c.id, users.c.id.in_(sub)),
    ]
    with shardkit.ShardedSession(cluster=cluster) as s:
        for stmt in stmts:
            with pytest.raises(shardkit.ScatterRefused):
                s.execute(stmt).all()
        # As a condition it runs, exactly.
        assert sorted(s.scalars(select(users.c.id).where(users.c.id.in_(sub)))) == [1, 3, 5, 7]
        assert sorted(s.scalars(select(users.c.id).where(
            or_(users.c.id.in_(sub), users.c.id == 2)))) == [1, 2, 3, 5, 7]
        # And NOT IN's refusal stands.
        with pytest.raises(shardkit.ScatterRefused):
            s.execute(select(users.c.id).where(users.c.id.not_in(sub))).all()
