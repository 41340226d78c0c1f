"""Probes of consistency tokens and run_transaction on a real cluster: the wait a
token past its primary's position costs a read (README: "no replica is ... waited for
beyond wait_for_token"), and a nested run_transaction's commit that a retry of the outer
function repeated.  One small cluster of the module's own (its replicas are made to lag).
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import BigInteger, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from own_tables import ShardEnv, cluster_with_tables
from replica_env import lagging

pytestmark = pytest.mark.integration

WAIT = 1.0


class TkBase(DeclarativeBase):
    pass


class Note(TkBase):
    __tablename__ = "tk7_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(100), default="")


CONFIG = {"groups": {"tk7": {"strategy": "hash", "tables": {"tk7_notes": "id"}}},
          "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "wait_for_token": WAIT}}


class Env(ShardEnv):
    model = Note

    def caught_up(self, shards=None):
        for s in shards or self.names:
            with self.autocommit(s) as c:
                c.execute(text("SELECT txid_current()"))
            for r in self.dev.shard(s).replicas:
                r.wait_caught_up()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    with cluster_with_tables(dev, CONFIG, TkBase.metadata) as cluster:
        cluster.start_monitor()
        e = Env(dev, cluster)
        e.caught_up()
        yield e


@pytest.fixture
def tk(env):
    env.reset("tk7_notes")
    return env


@pytest.mark.parametrize("position", ["FFFFFFFF/FFFFFFFF", "FF/0"])
def test_a_token_past_the_primary_makes_a_read_wait_wait_for_token_once(tk, position):
    """A token of another cluster (or from before a failover) names a position past the
    primary's: the read waited wait_for_token for the replicas, took the primary's position
    instead, and then waited wait_for_token again for a replica a moment behind that one:
    twice the bound the README gives."""
    s0 = tk.names[0]
    k = tk.keys_on(s0, 1)[0]
    with lagging(tk, shards=(s0,)):
        with tk.Session()() as s:
            s.add(Note(id=k, body="w"))
            s.commit()
        time.sleep(0.3)  # (the monitor sees the replica behind the commit)
        with tk.Session()(consistency_token=f"v1:{s0}={position}") as s:
            t0 = time.monotonic()
            assert s.get(Note, k).body == "w"
            took = time.monotonic() - t0
            assert shardkit._replicas.parse_token(s.consistency_token())[s0] < 2**40
    assert took < WAIT * 1.6, f"the read waited {took:.2f} s; wait_for_token is {WAIT} s"


def test_a_nested_run_transaction_is_not_committed_twice(tk):
    """A helper that commits through run_transaction inside fn, then a refused write of fn:
    the retry ran the helper again, its row committed twice."""
    s0, s1 = tk.names[0], tk.names[1]
    outer_keys = iter(tk.keys_on(s0, 3))
    inner_keys = iter(tk.keys_on(s1, 3))
    calls = []

    def inner(session):
        session.add(Note(id=next(inner_keys), body="inner"))

    def outer(session):
        calls.append(1)
        session.add(Note(id=next(outer_keys), body="outer"))
        shardkit.run_transaction(tk.Session(), inner)
        raise shardkit.NotOwned("simulated refusal of the outer write", shard=s0, bucket=1)

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(tk.Session(), outer, refresh_timeout=0.2)
    assert len(calls) == 1
    assert len(tk.ids(s1)) == 1 and tk.ids(s0) == set()
