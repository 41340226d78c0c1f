"""Multi-shard commits and run_transaction.

A primary's connection lost between two shards' COMMITs, ``with Session.begin():``
(the SQLAlchemy 2.0 idiom) around a multi-shard or two-phase commit,
``run_transaction``'s retry after a commit, a two-phase PREPARE that fails (a deferred
constraint, prepared transactions disabled) and a savepoint a shard joins inside,
against a real 3-shard cluster (one replica per shard) of this module's own (one test
restarts a primary).
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, String, UniqueConstraint, event, inspect, text
from sqlalchemy import exc as sa_exc
from own_tables import ShardEnv
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit._replicas import parse_token

pytestmark = pytest.mark.integration


class TdBase(DeclarativeBase):
    pass


class Stub(TdBase):
    """A unique code checked only at COMMIT (or PREPARE): a deferred constraint."""
    __tablename__ = "td_stubs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(20))
    __table_args__ = (UniqueConstraint("code", name="td_stubs_code_key",
                                       deferrable=True, initially="DEFERRED"),)


class Ledger(TdBase):
    __tablename__ = "td_ledger"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")


GROUPS = {"groups": {"ledger": {"strategy": "hash", "tables": {"td_ledger": "id", "td_stubs": "id"}}}}


class Env(ShardEnv):
    model = Ledger

    def kill(self, shard: str, pid: int) -> None:
        with self.autocommit(shard) as c:
            c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    with Env.started(shardkit_module_cluster_factory(shards=3, replicas=1), GROUPS,
                     TdBase.metadata) as e:
        yield e


@pytest.fixture
def td(env):
    env.reset("td_ledger", "td_stubs")
    return env


def _on_first(td, event_name, action):
    """Call ``action(first_shard)`` when the first primary's ``event_name`` (``commit`` or
    ``commit_twophase``) fires; returns a remover."""
    seen: list[str] = []

    def hook(conn, *args):
        seen.append(conn.engine.info["shard"])
        if len(seen) == 1:
            action(seen[0])

    for s in td.names:
        event.listen(td.cluster.primary(s), event_name, hook)

    def remove():
        for s in td.names:
            event.remove(td.cluster.primary(s), event_name, hook)
    return remove


def _pids(s, shards):
    return {sh: s.connection(bind_arguments={"shard_id": sh}).exec_driver_sql(
        "SELECT pg_backend_pid()").scalar() for sh in shards}


def _kill_other_at_first_commit(td, s, shards):
    """Write one row on each of ``shards`` (two), and arrange for the other shard's
    server connection to be killed when the first shard's COMMIT is sent."""
    pids = _pids(s, shards)
    killed: list[str] = []

    def kill_other(first):
        other = next(sh for sh in shards if sh != first)
        td.kill(other, pids[other])
        killed.append(other)
    return _on_first(td, "commit", kill_other), killed


# -- a primary's connection lost between two shards' COMMITs --------------------------------------


def test_connection_lost_between_two_shards_commits_raises_commit_error(td):
    """README: "If a commit fails on one shard after another has committed, commit()
    raises CommitError naming the shards that committed ... and the session keeps reading
    its own writes there".  The second shard's server dies between the two COMMITs (its
    connection is gone, so SQLAlchemy invalidates it): the first shard's row is durable,
    yet commit() raised the bare OperationalError, as if nothing had been committed, and
    the session's token did not name the committed shard."""
    s0, s1 = td.names[0], td.names[1]
    a, b = td.keys_on(s0, 1)[0], td.keys_on(s1, 1)[0]
    s = td.Session()()
    s.add_all([Ledger(id=a, name="a"), Ledger(id=b, name="b")])
    s.flush()
    remove, killed = _kill_other_at_first_commit(td, s, [s0, s1])
    try:
        with pytest.raises(sa_exc.SQLAlchemyError) as info:
            s.commit()
    finally:
        remove()
    lost = killed[0]
    first = s0 if lost == s1 else s1
    on = {s0: a, s1: b}
    assert td.ids(first) == {on[first]} and td.ids(lost) == set()
    err = info.value
    assert isinstance(err, shardkit.CommitError), f"{type(err).__name__}: {err}"
    assert err.committed == [first] and err.failed == lost and err.not_committed == [lost]
    assert first in parse_token(s.consistency_token()), s.consistency_token()
    s.rollback()
    s.close()


# -- with Session.begin(): the commit of the context manager ------------------------------------


def test_session_begin_block_reports_a_partial_commit_as_commit_error(td):
    """``with Session.begin() as s:`` commits through the transaction's own commit(), not
    Session.commit(): shardkit's handling of a commit that failed on one shard after
    another committed did not run, and the block raised the bare driver error."""
    s0, s1 = td.names[0], td.names[1]
    a, b = td.keys_on(s0, 1)[0], td.keys_on(s1, 1)[0]
    remove = None
    try:
        with pytest.raises(sa_exc.SQLAlchemyError) as info:
            with td.Session().begin() as s:
                s.add_all([Ledger(id=a, name="a"), Ledger(id=b, name="b")])
                s.flush()
                remove, killed = _kill_other_at_first_commit(td, s, [s0, s1])
    finally:
        if remove is not None:
            remove()
    lost = killed[0]
    first = s0 if lost == s1 else s1
    err = info.value
    assert isinstance(err, shardkit.CommitError), f"{type(err).__name__}: {err}"
    assert err.committed == [first] and err.failed == lost


def test_session_begin_block_finishes_a_twophase_commit(td):
    """README: with twophase=True, once every shard has prepared "if a shard's COMMIT
    PREPARED then fails (its connection dropped), commit() commits it on a new connection
    and returns".  In ``with Session.begin():`` the block raised the connection error
    instead and left that shard's transaction prepared (holding its locks, found only in
    pg_prepared_xacts): one shard had the write, the other not."""
    s0, s1 = td.names[0], td.names[1]
    a, b = td.keys_on(s0, 1)[0], td.keys_on(s1, 1)[0]
    remove = None
    try:
        with td.Session(twophase=True).begin() as s:
            objs = [Ledger(id=a, name="a"), Ledger(id=b, name="b")]
            s.add_all(objs)
            s.flush()
            pids = _pids(s, [s0, s1])
            remove = _on_first(td, "commit_twophase", lambda first: td.kill(
                s1 if first == s0 else s0, pids[s1 if first == s0 else s0]))
    finally:
        if remove is not None:
            remove()
    assert td.prepared(s0) == [] and td.prepared(s1) == []
    assert td.ids(s0) == {a} and td.ids(s1) == {b}
    assert all(inspect(o).detached for o in objs)


# -- run_transaction: no retry once the commit has happened ----------------------------------------


def test_run_transaction_does_not_run_fn_again_when_on_commit_raises_not_owned(td):
    """README: run_transaction retries a write a shard refused (NotOwned, nothing written);
    its docstring: on_commit's error "propagates; the commit stands".  An on_commit that
    raises NotOwned (it uses another session, whose write a shard refused) made
    run_transaction run fn again after fn's writes had committed: written twice."""
    keys = iter(td.keys_on(td.names[0], 3))
    calls = []

    def fn(session):
        calls.append(1)
        session.add(Ledger(id=next(keys), name="once"))

    def on_commit(token):
        raise shardkit.NotOwned("simulated refusal in on_commit", shard=td.names[1], bucket=1)

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(td.Session(), fn, on_commit=on_commit, refresh_timeout=0.5)
    assert len(calls) == 1, f"fn ran {len(calls)} times; rows now {sorted(td.ids(td.names[0]))}"
    assert len(td.ids(td.names[0])) == 1


def test_run_transaction_does_not_run_fn_again_after_fn_committed(td):
    """fn commits part of its work itself (a batch), then a shard refuses a later write:
    running fn again repeats what was committed.  run_transaction must raise instead."""
    keys = iter(td.keys_on(td.names[0], 4))
    calls = []

    def fn(session):
        calls.append(1)
        session.add(Ledger(id=next(keys), name="batch1"))
        session.commit()
        raise shardkit.NotOwned("simulated refusal of the second batch", shard=td.names[1], bucket=1)

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(td.Session(), fn, refresh_timeout=0.5)
    assert len(calls) == 1, f"fn ran {len(calls)} times; rows now {sorted(td.ids(td.names[0]))}"
    assert len(td.ids(td.names[0])) == 1


# -- two-phase: a PREPARE that fails -----------------------------------------------------------------


def test_twophase_prepare_failing_on_one_shard_gives_its_error_and_leaves_nothing_prepared(td):
    """A deferred unique violation makes one shard's PREPARE TRANSACTION fail, after other
    shards may have prepared.  psycopg then believes that shard's transaction prepared and
    SQLAlchemy's rollback sends ROLLBACK PREPARED for it, which fails ("prepared transaction
    ... does not exist"): that error hid the violation, and it stopped the rollback of the
    shards that had prepared, whose transactions stayed in pg_prepared_xacts holding their
    locks.  (SQLAlchemy commits the shards in no fixed order: several rounds.)"""
    s0, s1, s2 = td.names
    start = 1
    for _ in range(8):
        goods = [td.keys_on(s0, 1, start)[0], td.keys_on(s2, 1, start)[0]]
        bads = td.keys_on(s1, 2, start)
        start = max(*goods, *bads) + 1
        with td.Session(twophase=True)() as s:
            s.add_all(Stub(id=k, code=f"ok{k}") for k in goods)
            s.add_all(Stub(id=k, code=f"dup{start}") for k in bads)
            s.flush()
            with pytest.raises(sa_exc.SQLAlchemyError) as info:
                s.commit()
            assert isinstance(info.value, sa_exc.IntegrityError), f"{type(info.value).__name__}: {info.value}"
            assert "td_stubs_code_key" in str(info.value)
        assert {sh: td.prepared(sh) for sh in td.names} == {sh: [] for sh in td.names}
        with td.autocommit(s0) as c:
            assert c.execute(text("SELECT count(*) FROM td_stubs")).scalar() == 0


def test_twophase_without_prepared_transactions_says_so(td):
    """README: twophase=True "needs max_prepared_transactions > 0 on the primaries".  On a
    primary where it is 0 the commit raised 'prepared transaction "_sa_..." does not
    exist' (SQLAlchemy's ROLLBACK PREPARED after the failed PREPARE), which hides the
    setting to change; it must be PostgreSQL's "prepared transactions are disabled"."""
    s0, s1 = td.names[0], td.names[1]
    node = td.dev.shard(s1).primary
    with td.autocommit(s1) as c:
        c.execute(text("ALTER SYSTEM SET max_prepared_transactions = 0"))
    td.cluster.primary(s1).dispose()
    node.stop()
    node.start()
    try:
        with td.Session(twophase=True)() as s:
            s.add_all([Ledger(id=td.keys_on(s0, 1)[0]), Ledger(id=td.keys_on(s1, 1)[0])])
            with pytest.raises(sa_exc.SQLAlchemyError) as info:
                s.commit()
        assert isinstance(info.value, sa_exc.NotSupportedError), f"{type(info.value).__name__}: {info.value}"
        assert "max_prepared_transactions" in str(info.value)
        assert td.ids(s0) == set() and td.ids(s1) == set() and td.prepared(s0) == []
    finally:
        with td.autocommit(s1) as c:
            c.execute(text("ALTER SYSTEM RESET max_prepared_transactions"))
        td.cluster.primary(s1).dispose()
        node.stop()
        node.start()


# -- a savepoint a shard joins inside ----------------------------------------------------------------


def test_savepoint_a_shard_joins_inside_rolls_back_only_the_savepoint(td):
    """The transaction has written to one shard when begin_nested() starts; another shard
    joins inside the savepoint.  Rolling the savepoint back undoes both shards' writes made
    inside it, keeps the first shard's earlier write and lets the other shard write again."""
    s0, s1 = td.names[0], td.names[1]
    a, a2 = td.keys_on(s0, 2)
    b, b2 = td.keys_on(s1, 2)
    with td.Session()() as s:
        s.add(Ledger(id=a, name="before"))
        s.flush()
        with pytest.raises(RuntimeError):
            with s.begin_nested():
                s.add_all([Ledger(id=a2, name="inside"), Ledger(id=b, name="inside")])
                s.flush()
                raise RuntimeError("undo the savepoint")
        assert s.get(Ledger, b) is None and s.get(Ledger, a2) is None
        s.add(Ledger(id=b2, name="after"))
        s.commit()
    assert td.ids(s0) == {a} and td.ids(s1) == {b2}

