"""ShardedSession's constructor: what it refuses, and what it sets, with no server."""

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import sessionmaker

import shardkit
from models import User, offline_cluster


@pytest.fixture(scope="module")
def cluster():
    return offline_cluster(["s0", "s1"])


def test_a_session_needs_a_cluster(cluster):
    for bad in (None, "shardkit.toml", cluster.config):
        with pytest.raises(ArgumentError, match="needs cluster=shardkit.Cluster.from_config"):
            shardkit.ShardedSession(cluster=bad)


@pytest.mark.parametrize("kwargs", [
    {"bind": "engine"},
    {"binds": {User: "engine"}},
], ids=lambda kw: next(iter(kw)))
def test_engines_given_to_the_session_are_refused(cluster, kwargs):
    engine = create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    kwargs = {k: (engine if v == "engine" else {User: engine}) for k, v in kwargs.items()}
    with pytest.raises(ArgumentError, match=f"takes its engines from the cluster; do not pass {next(iter(kwargs))}="):
        shardkit.ShardedSession(cluster=cluster, **kwargs)
    with pytest.raises(ArgumentError, match="do not pass"):
        sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, **kwargs)()


def test_horizontal_shard_arguments_are_refused_with_what_replaces_them(cluster):
    with pytest.raises(ArgumentError) as err:
        shardkit.ShardedSession(cluster=cluster, shards={}, query_chooser=lambda q: [])
    msg = str(err.value)
    assert "horizontal_shard's shards=, query_chooser=" in msg and "scope(shard=...)" in msg


def test_an_unknown_argument_fails_as_it_does_for_a_session(cluster):
    with pytest.raises(TypeError, match="no_such_option"):
        shardkit.ShardedSession(cluster=cluster, no_such_option=1)


def test_an_unknown_consistency_is_refused(cluster):
    with pytest.raises(ArgumentError, match="consistency must be one of eventual, read_your_writes, strong"):
        shardkit.ShardedSession(cluster=cluster, consistency="sometimes")


def test_what_the_constructor_is_given_is_the_sessions_own(cluster):
    plain = shardkit.ShardedSession(cluster=cluster)
    assert plain.consistency is None and plain.strict is False and plain.cluster is cluster
    s = shardkit.ShardedSession(cluster=cluster, consistency="strong", strict=True, autoflush=False)
    assert s.consistency == "strong" and s.strict is True and s.autoflush is False
    # Set on one session, not on the class: a later session has the defaults again.
    s.strict = False
    plain.strict = True
    assert shardkit.ShardedSession(cluster=cluster).strict is False
    assert shardkit.ShardedSession.strict is False and shardkit.ShardedSession.consistency is None
    # Each session has its own records of its transaction.
    a, b = shardkit.ShardedSession(cluster=cluster), shardkit.ShardedSession(cluster=cluster)
    a._sk_written.add("s0")
    a._sk_tokens["s0"] = 5
    assert b._sk_written == set() and b._sk_tokens == {}
