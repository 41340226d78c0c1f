"""Arguments of shardkit's public API of the wrong type or out of range are refused where
they are given, saying what to give: never read by their truthiness, never silently
dropped, never failing late (at a NotOwned during a move, after a commit) with an
obscure error.  On the shared local cluster, its own tables."""

from __future__ import annotations

import math

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, func, select
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import RoutingError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "api_args_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"notes": {"tables": {Note.__tablename__: "id"}}}}


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        m = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
        with m() as s:
            s.add_all([Note(id=k, v=f"v{k}") for k in range(6)])
            s.commit()
        yield c, m


def _count(m):
    with m() as s:
        return s.execute(select(func.count()).select_from(Note)).scalar_one()


# -- a shard named by a falsy or unhashable value -------------------------------------

@pytest.mark.parametrize("name", [0, "", False, ["s0"]], ids=repr)
def test_a_bad_shardkit_shard_is_refused_not_read_on_every_shard(env, name):
    # (0 or "" was dropped as no shard named: the read ran on every shard.)
    c, m = env
    with m() as s:
        with pytest.raises(RoutingError, match="unknown shard"):
            s.execute(select(Note), execution_options={"shardkit_shard": name}).all()
        with pytest.raises(RoutingError, match="unknown shard"):
            s.execute(select(Note).execution_options(shardkit_shard=name)).all()


@pytest.mark.parametrize("name", [0, ""], ids=repr)
def test_a_falsy_shardkit_shard_is_refused_by_get(env, name):
    c, m = env
    with m() as s:
        with pytest.raises(RoutingError, match="unknown shard"):
            s.get(Note, 3, execution_options={"shardkit_shard": name})


def test_an_unhashable_shard_is_a_routing_error(env):
    c, m = env
    with m() as s:
        with pytest.raises(RoutingError, match="unknown shard"):
            s.connection_for_shard(["s0"])


@pytest.mark.parametrize("name", [0, ["s0"], b"s0"], ids=repr)
def test_scope_refuses_a_shard_that_is_not_a_name(env, name):
    with pytest.raises(ValueError, match="shard must be a shard's name"):
        with shardkit.scope(shard=name):
            pass


# -- run_transaction ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"retries": "3"}, {"retries": None}, {"retries": -1}, {"retries": True}, {"retries": 2.5},
    {"refresh_timeout": "5"}, {"refresh_timeout": math.nan}, {"refresh_timeout": -1},
    {"refresh_timeout": math.inf}, {"refresh_timeout": None},
], ids=repr)
def test_run_transaction_checks_its_numbers_before_running_anything(env, kw):
    # (They were read only at a NotOwned, during a move: a TypeError then, or with a NaN
    # a map refresh polling for ever.)
    c, m = env
    ran = []
    with pytest.raises(ValueError, match=next(iter(kw))):
        shardkit.run_transaction(m, ran.append, **kw)
    assert ran == []


@pytest.mark.parametrize("on_commit", [True, "log", 1], ids=repr)
def test_a_bad_on_commit_is_refused_before_the_commit(env, on_commit):
    # (It was called after the commit: the row stayed, and the caller got a TypeError.)
    c, m = env
    before = _count(m)
    with pytest.raises(TypeError, match="on_commit"):
        shardkit.run_transaction(m, lambda s: s.add(Note(id=1000, v="x")), on_commit=on_commit)
    assert _count(m) == before


def test_run_transaction_says_which_argument_is_not_callable(env):
    c, m = env
    with pytest.raises(TypeError, match="fn must be callable"):
        shardkit.run_transaction(m, None)
    with pytest.raises(TypeError, match="session_factory must be callable"):
        shardkit.run_transaction(None, lambda s: None)


# -- Cluster methods ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"timeout": "1"}, {"timeout": -1}, {"timeout": math.nan}, {"timeout": math.inf}, {"timeout": None},
    {"newer_than": "3"}, {"newer_than": 2.0}, {"newer_than": True},
], ids=repr)
def test_refresh_map_checks_its_arguments_with_or_without_a_catalog(env, kw):
    c, m = env
    assert c.catalog is None
    with pytest.raises(ValueError, match=f"refresh_map\\({next(iter(kw))}="):
        c.refresh_map(**kw)


@pytest.mark.parametrize("index", ["0", 0.5, True, None], ids=repr)
@pytest.mark.parametrize("what", ["engine", "node_url"])
def test_a_node_index_that_is_not_an_int_is_refused(env, what, index):
    c, m = env
    with pytest.raises(ValueError, match="index must be an int"):
        getattr(c, what)(c.shard_names[0], "replica", index)


@pytest.mark.parametrize("what", ["engine", "node_url"])
def test_a_primary_has_index_0_only(env, what):
    # (engine(shard, "primary", 3) made a second engine, another pool, for the primary.)
    c, m = env
    shard = c.shard_names[0]
    with pytest.raises(RoutingError, match="one primary"):
        getattr(c, what)(shard, "primary", 3)
    assert (shard, "primary", 3) not in c._engines
    assert c.engine(shard, "primary", 0) is c.primary(shard)


@pytest.mark.parametrize("close", ["false", 0, None], ids=repr)
def test_dispose_close_takes_true_or_false(env, close):
    c, m = env
    with pytest.raises(ValueError, match="close"):
        c.dispose(close=close)


def test_follow_map_takes_true_or_false(shardkit_dev_cluster):
    with pytest.raises(ValueError, match="follow_map must be True or False"):
        shardkit.Cluster.from_config(shardkit_dev_cluster.config_dict(), follow_map="false")


@pytest.mark.parametrize("statement", [f"UPDATE {Note.__tablename__} SET v = 'x'", None], ids=repr)
def test_explain_refuses_what_execute_refuses(env, statement):
    # (A string was explained as a read of no tables, on any shard's replica.)
    c, m = env
    with pytest.raises(ArgumentError):
        c.explain(statement)
    with m() as s:
        with pytest.raises(ArgumentError):
            s.execute(statement)
