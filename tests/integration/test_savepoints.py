"""Transaction semantics of a ShardedSession against a real 2-shard x 1-replica cluster:
savepoints over several shards, where a transaction reads a shard after a savepoint on it
was rolled back, what consistency tokens say after rollbacks, sessions ended in the middle
of a savepoint, and SQLAlchemy's "join an external transaction" recipe for tests (refused).
What was committed is checked on each shard's primary.
"""

from __future__ import annotations

import gc

import pytest
from sqlalchemy import BigInteger, String, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from replica_env import ReplicaEnv, lagging, on_primary, on_replica, replica_env

pytestmark = pytest.mark.integration


class SpBase(DeclarativeBase):
    pass


class Purse(SpBase):
    __tablename__ = "spd7_purses"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


GROUPS = {"purses": {"tables": {"spd7_purses": "id"}}}


class Env(ReplicaEnv):
    def rows(self, shard: str) -> dict[int, str]:
        with self.dev.shard(shard).primary.connect() as c:
            return dict(c.execute("SELECT id, name FROM spd7_purses").fetchall())

    def seed(self, shard: str, name: str = "seed") -> int:
        k = self.key(shard)
        with self.cluster.primary(shard).begin() as c:
            c.execute(text("INSERT INTO spd7_purses (id, name) VALUES (:k, :n)"), {"k": k, "n": name})
        return k

    def checked_out(self) -> int:
        return sum((st or {}).get("checkedout", 0) for st in self.cluster.pool_stats().values())


@pytest.fixture(scope="module")
def sp(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, SpBase.metadata, {"groups": GROUPS},
                           "spd7_purses", "spd7_", env_class=Env)


@pytest.fixture(autouse=True)
def _no_connections_left(sp):
    yield
    gc.collect()
    assert sp.checked_out() == 0


def test_savepoint_on_another_shard_rolled_back_keeps_the_first_and_reads_the_second_on_its_primary(sp):
    """The transaction wrote s0 and read s1 from its (lagging) replica; a savepoint writes
    s1 and is rolled back.  s1's writes are undone, s0's kept; the transaction's later reads
    of s1 (by key and across shards) see neither the savepoint's row nor the replica's older
    one, but the primary's; the commit's token names s0 only."""
    b = sp.seed("s1", "v0")
    sp.caught_up()
    a = sp.key("s0")
    with lagging(sp, ("s1",)):
        with sp.cluster.primary("s1").begin() as c:   # another writer: only s1's primary has it
            c.execute(text("UPDATE spd7_purses SET name = 'v1' WHERE id = :k"), {"k": b})
        with sp.Session() as s:
            s.add(Purse(id=a, name="outer"))
            s.flush()
            name, nodes = sp.nodes(lambda: s.execute(select(Purse.name).where(Purse.id == b)).scalar_one())
            assert (name, on_replica(nodes, "s1")) == ("v0", True), nodes
            with s.begin_nested() as nested:
                s.execute(update(Purse).where(Purse.id == b).values(name="in savepoint"))
                s.add(Purse(id=sp.key("s1"), name="in savepoint"))
                s.flush()
                nested.rollback()
            name, nodes = sp.nodes(lambda: s.execute(select(Purse.name).where(Purse.id == b)).scalar_one())
            assert (name, on_primary(nodes, "s1")) == ("v1", True), nodes
            everything = dict(s.execute(select(Purse.id, Purse.name)).all())
            assert everything[a] == "outer" and everything[b] == "v1" and "in savepoint" not in everything.values()
            s.commit()
            token = s.consistency_token()
    assert sp.rows("s0")[a] == "outer"
    assert sp.rows("s1") == {b: "v1"}
    assert token.startswith("v1:s0=") and "s1=" not in token, token


def test_nested_savepoints_and_one_begun_before_any_shard(sp):
    """A savepoint begun before the transaction touched any shard, one inside it, and a
    third inside that: rolling back the middle one undoes its writes on both shards (and
    the third's), releasing the first keeps its own; a `with begin_nested():` that raises
    rolls back only itself."""
    a, a2, b, b2 = sp.key("s0"), sp.key("s0"), sp.key("s1"), sp.key("s1")
    with sp.Session() as s:
        first = s.begin_nested()
        s.add(Purse(id=a, name="first"))
        s.flush()
        middle = s.begin_nested()
        s.add(Purse(id=b, name="middle"))
        s.execute(update(Purse).where(Purse.id == a).values(name="middle"))
        s.flush()
        s.begin_nested()
        s.add(Purse(id=a2, name="third"))
        s.flush()
        middle.rollback()   # (and the third, still open)
        assert s.execute(select(Purse.id, Purse.name).where(Purse.id.in_([a, a2, b]))).all() == [(a, "first")]
        first.commit()
        with pytest.raises(ZeroDivisionError):
            with s.begin_nested():
                s.add(Purse(id=b2, name="raised"))
                s.flush()
                1 / 0
        s.commit()
        token = s.consistency_token()
    assert sp.rows("s0").get(a) == "first" and a2 not in sp.rows("s0")
    assert b not in sp.rows("s1") and b2 not in sp.rows("s1")
    assert "s1=" not in token and "s0=" in token, token


def test_released_savepoint_then_outer_rollback_commits_nothing_and_leaves_the_token(sp):
    """A savepoint released (its writes on both shards), raw writes through the session's
    connection and text() on a named shard, then the outer transaction rolls back: nothing
    on either primary, and the session's consistency token is what it was."""
    a, b, b2 = sp.key("s0"), sp.key("s1"), sp.key("s1")
    with sp.Session() as s:
        s.add(Purse(id=sp.key("s0"), name="before"))
        s.commit()
        before = s.consistency_token()
        with s.begin_nested():
            s.add_all([Purse(id=a, name="released"), Purse(id=b, name="released")])
        s.connection(bind_arguments={"shard_id": "s1"}).execute(
            text("INSERT INTO spd7_purses (id, name) VALUES (:k, 'raw')"), {"k": b2})
        s.execute(text("UPDATE spd7_purses SET name = 'text' WHERE id = :k"), {"k": a},
                  bind_arguments={"shard_id": "s0"})
        s.rollback()
        assert s.consistency_token() == before
        s.commit()   # nothing written: nothing changes
        assert s.consistency_token() == before
    assert a not in sp.rows("s0")
    assert b not in sp.rows("s1") and b2 not in sp.rows("s1")


def test_integrity_error_inside_a_savepoint_with_writes_pending_on_another_shard(sp):
    """A savepoint's flush writes s0 and fails on s1 (duplicate key): the savepoint is
    rolled back on both, the outer transaction goes on and commits its own write only."""
    taken = sp.seed("s1", "taken")
    outer, a = sp.key("s0"), sp.key("s0")
    with sp.Session() as s:
        s.add(Purse(id=outer, name="outer"))
        s.flush()
        with pytest.raises(sa_exc.IntegrityError):
            with s.begin_nested():
                s.add_all([Purse(id=a, name="new"), Purse(id=taken, name="duplicate")])
        names, nodes = sp.nodes(lambda: dict(s.execute(
            select(Purse.id, Purse.name).where(Purse.id.in_([outer, a, taken]))).all()))
        assert names == {outer: "outer", taken: "taken"}
        assert on_primary(nodes), nodes
        s.commit()
        assert "s1=" not in s.consistency_token()
    assert sp.rows("s0").get(outer) == "outer" and a not in sp.rows("s0")
    assert sp.rows("s1")[taken] == "taken"


@pytest.mark.parametrize("end", ["close", "reset", "invalidate"])
def test_session_ended_inside_a_savepoint_commits_nothing_and_is_usable(sp, end):
    if end == "reset" and not hasattr(shardkit.ShardedSession, "reset"):
        pytest.skip("Session.reset() is SQLAlchemy 2.0.22's")
    a, b = sp.key("s0"), sp.key("s1")
    s = sp.Session()
    try:
        s.add(Purse(id=a, name="outer"))
        s.flush()
        s.begin_nested()
        s.add(Purse(id=b, name="inner"))
        s.flush()
        getattr(s, end)()
        assert s.consistency_token() == "v1:"
        assert a not in sp.rows("s0") and b not in sp.rows("s1")
        s.add(Purse(id=b, name="again"))
        s.commit()
        assert s.consistency_token().startswith("v1:s1=")
    finally:
        s.close()
    assert sp.rows("s1")[b] == "again"


@pytest.mark.parametrize("mode", ["create_savepoint", "rollback_only"])
def test_joining_an_external_transaction_is_refused(sp, mode):
    """SQLAlchemy's recipe for tests (the session joins a connection's outer transaction,
    which the test rolls back) cannot hold for a session of several shards that reads
    replicas.  bind= a Connection is refused, saying so; a node's Connection joined by
    bind_arguments={"bind": ...} made commit() record the writes for read-your-writes while
    the outer transaction kept them (and the next transaction used connections of its own):
    now the commit is refused and nothing is committed."""
    a, b = sp.key("s0"), sp.key("s1")
    outer = sp.cluster.primary("s0").connect()
    try:
        trans = outer.begin()
        with pytest.raises(sa_exc.ArgumentError, match="cannot join an external transaction"):
            sp.Session(bind=outer, join_transaction_mode=mode)
        with sp.Session(join_transaction_mode=mode) as s:
            s.connection(bind_arguments={"bind": outer})
            s.add_all([Purse(id=a, name="external"), Purse(id=b, name="external")])
            s.flush()
            with pytest.raises(sa_exc.InvalidRequestError, match="s0/primary .*cannot join an external "
                                                                 "transaction"):
                s.commit()
            s.rollback()
            assert s.consistency_token() == "v1:"
        if trans.is_active:  # (rollback_only: the session's rollback() rolled it back)
            trans.rollback()
    finally:
        outer.close()
    assert a not in sp.rows("s0") and b not in sp.rows("s1")
