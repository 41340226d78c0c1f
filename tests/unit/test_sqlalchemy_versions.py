"""What differs between the SQLAlchemy versions pyproject.toml accepts (>= 2.0.58).

SQLAlchemy 2.0 wraps a column default that takes no arguments in a function of the
execution context and, for a callable without ``__name__`` (a ``functools.partial``, an
ID generator object with ``__call__``), keeps no ``__wrapped__`` to reach the original;
2.1 keeps it as ``_fn``.  A new object's shard key made by such a default must route on
both, as ``default=uuid.uuid4`` does.
"""

from __future__ import annotations

import functools
import itertools

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, inspect
from sqlalchemy.orm import registry

import shardkit
from shardkit._session import shard_of_instance
from shardkit.errors import ShardKeyError


class _IdGenerator:
    """An ID generator object, as a snowflake-style key maker is."""

    def __init__(self) -> None:
        self._next = itertools.count(1000)

    def __call__(self) -> int:
        return next(self._next)


def _cluster_and_class(default):
    metadata = MetaData()
    table = Table("users", metadata, Column("id", BigInteger, primary_key=True, default=default),
                  Column("name", String))

    class User:
        pass

    registry(metadata=metadata).map_imperatively(User, table)
    cluster = shardkit.Cluster.from_config({
        "shards": [{"name": "s0", "primary": "postgresql+psycopg://a@h0.invalid/d"},
                   {"name": "s1", "primary": "postgresql+psycopg://a@h1.invalid/d"}],
        "groups": {"users": {"tables": {"users": "id"}}}})
    return cluster, User


@pytest.mark.parametrize("default, key", [
    (functools.partial(int, "77"), 77),
    (_IdGenerator(), 1000),
    (lambda: 5, 5),
], ids=["partial", "callable-object", "lambda"])
def test_a_key_made_by_a_no_argument_default_routes_the_new_object(default, key):
    cluster, User = _cluster_and_class(default)
    user = User()
    shard = shard_of_instance(cluster, inspect(User), user)
    assert user.id == key
    assert shard == cluster.shard_for("users", key)


def test_a_default_that_takes_the_context_is_still_refused():
    cluster, User = _cluster_and_class(lambda ctx: 5)
    with pytest.raises(ShardKeyError, match="takes the execution context"):
        shard_of_instance(cluster, inspect(User), User())
