"""shardkit's errors survive pickling (a worker process sending one back, Celery, a
ProcessPoolExecutor) and copy.copy() with their message and attributes, also those whose
__init__ takes other arguments than the message."""

from __future__ import annotations

import copy
import pickle

import psycopg
import pytest
from sqlalchemy import Integer, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardkit import errors as E


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "pickled_things"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


def cases():
    orm_statement = select(Thing).where(Thing.id == 5)
    return {
        "ShardkitError": E.ShardkitError("boom"),
        "ConfigurationError": E.ConfigurationError("shards[1].name", "duplicate shard name 's0'", "rename it"),
        "RoutingError": E.RoutingError("no route", table="things", statement=text("SELECT 1")),
        "ShardKeyError": E.ShardKeyError("no key", table="things", key=(1, "a")),
        "NoShardForKey": E.NoShardForKey("gap", table="things", key=7),
        "CrossShardWriteError": E.CrossShardWriteError("moves", table="things", statement=orm_statement),
        "ScatterRefused": E.ScatterRefused("strict", construct="count(DISTINCT)", table="things"),
        "NotOwned": E.NotOwned("moved", shard="s1", bucket=12, table="things", map_version=4),
        "RebalanceError": E.RebalanceError("stopped", move_id=3, step="copy"),
        "CommitError": E.CommitError("partial", committed=["s0"], failed="s1", not_committed=["s2"],
                                     cause=RuntimeError("lost"), prepared={"s3": "tx1"}),
        "ShardUnavailable": E.ShardUnavailable("down", shard="s0", node="s0/primary",
                                               cause=psycopg.OperationalError("connection refused")),
        "ScatterError": E.ScatterError({"s0": TimeoutError("slow"), "s1": RuntimeError("x")}, note="two failed"),
        "DevClusterError": E.DevClusterError("initdb failed", node="s0/r0"),
    }


def test_every_error_class_has_a_case():
    classes = {c.__name__ for c in vars(E).values()
               if isinstance(c, type) and issubclass(c, E.ShardkitError)}
    assert classes == set(cases())


@pytest.mark.parametrize("name", sorted(cases()))
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_an_error_survives_pickling_and_copying(name, how):
    error = cases()[name]
    again = {"pickle": lambda e: pickle.loads(pickle.dumps(e)), "copy": copy.copy,
             "deepcopy": copy.deepcopy}[how](error)
    assert type(again) is type(error)
    assert str(again) == str(error) and again.args == error.args
    assert set(vars(again)) == set(vars(error))
    for attr, value in vars(error).items():
        got = getattr(again, attr)
        if attr == "statement" and value is not None and how == "pickle" and name == "CrossShardWriteError":
            assert got == str(value)  # an ORM statement cannot be pickled: its text goes
        elif isinstance(value, BaseException):
            assert type(got) is type(value) and str(got) == str(value)
        elif isinstance(value, dict) and any(isinstance(v, BaseException) for v in value.values()):
            assert {k: (type(v), str(v)) for k, v in got.items()} == {k: (type(v), str(v)) for k, v in value.items()}
        elif attr == "statement" and value is not None:
            assert str(got) == str(value)
        else:
            assert got == value, attr
