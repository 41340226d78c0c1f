"""One transaction over several shards when a shard fails.

A two-phase session's explicit ``prepare()`` that fails on one shard (a deferred
constraint), the pool's reset of that shard's connection afterwards, and a commit that
fails after a shard whose only writes a rolled-back savepoint undid, against a real
3-shard cluster of this module's own (no replicas: none of this is about reads).
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import BigInteger, String, UniqueConstraint, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from own_tables import ShardEnv

import shardkit

pytestmark = pytest.mark.integration


class TxBase(DeclarativeBase):
    pass


class Code(TxBase):
    """A unique code checked only at COMMIT (or PREPARE): a deferred constraint."""
    __tablename__ = "t7b_codes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(40))
    __table_args__ = (UniqueConstraint("code", name="t7b_codes_code_key",
                                       deferrable=True, initially="DEFERRED"),)


GROUPS = {"groups": {"codes": {"strategy": "hash", "tables": {"t7b_codes": "id"}}}}


class Env(ShardEnv):
    model = Code


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    with Env.started(shardkit_module_cluster_factory(shards=3, replicas=0), GROUPS,
                     TxBase.metadata) as e:
        yield e


@pytest.fixture
def tx(env):
    env.reset("t7b_codes")
    return env


def _taken(tx, shard, key, code):
    """A committed row on ``shard`` holding ``code``: a later row with it violates the
    deferred constraint at that shard's COMMIT (or PREPARE) only."""
    with tx.Session()() as s:
        s.add(Code(id=key, code=code))
        s.commit()
    assert tx.ids(shard) == {key}


def _pool_errors(caplog):
    return [r for r in caplog.records
            if r.name.startswith("sqlalchemy.pool") and r.levelno >= logging.ERROR]


# -- two-phase: an explicit prepare() that fails on one shard ---------------------------------------


def test_twophase_prepare_failing_on_one_shard_raises_its_error_and_logs_nothing(tx, caplog):
    """SQLAlchemy's ``Session.prepare()`` (the first phase, for a twophase session) with a
    deferred unique violation on one shard raised ProgrammingError 'prepared transaction
    "_sa_..." does not exist' (psycopg takes the failed PREPARE as prepared, so the
    rollback sent ROLLBACK PREPARED): the violation was only in its context.  commit()
    gave the violation, but both logged an ERROR 'Exception during reset or similar'
    (rollback() cannot be used during a two-phase transaction) from the pool, which then
    discarded the connection."""
    s0, s1, s2 = tx.names
    first = tx.keys_on(s1, 1)[0]
    _taken(tx, s1, first, "taken")
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    start = first + 1
    for end in ("prepare", "commit") * 2:
        good0, good2 = tx.keys_on(s0, 1, start)[0], tx.keys_on(s2, 1, start)[0]
        bad = tx.keys_on(s1, 1, start)[0]
        start = max(good0, good2, bad) + 1
        with tx.Session(twophase=True)() as s:
            s.add_all([Code(id=good0, code=f"a{good0}"), Code(id=bad, code="taken"),
                       Code(id=good2, code=f"c{good2}")])
            s.flush()
            with pytest.raises(sa_exc.SQLAlchemyError) as info:
                getattr(s, end)()
            assert isinstance(info.value, sa_exc.IntegrityError), \
                f"{end}(): {type(info.value).__name__}: {info.value}"
            assert "t7b_codes_code_key" in str(info.value)
            s.rollback()
        assert {sh: tx.prepared(sh) for sh in tx.names} == {sh: [] for sh in tx.names}
        assert tx.ids(s0) == set() and tx.ids(s1) == {first} and tx.ids(s2) == set()
        assert _pool_errors(caplog) == [], f"{end}(): {[r.getMessage() for r in _pool_errors(caplog)]}"
    # The session's shards still serve a two-phase transaction.
    with tx.Session(twophase=True)() as s:
        s.add_all([Code(id=tx.keys_on(sh, 1, start)[0], code=f"ok-{sh}") for sh in tx.names])
        s.commit()
    assert all(len(tx.ids(sh)) == (2 if sh == s1 else 1) for sh in tx.names)


# -- a commit that fails after a shard whose writes a savepoint undid -----------------------------------


def test_commit_failing_after_a_shard_whose_only_writes_a_savepoint_undid_is_the_plain_error(tx):
    """README: "if it fails before any shard committed, the original error is raised, as
    from a plain Session"; begin_nested() is how to go on after an expected error.  A
    shard written only inside a savepoint that was rolled back has nothing to commit; its
    COMMIT coming before the failing shard's made commit() raise CommitError saying "the
    commit reached shard(s) s1 (their writes are committed)", committed=['s1'], though no
    write was committed anywhere (an ``except IntegrityError`` did not see the violation).
    SQLAlchemy commits the shards in no fixed order: several rounds."""
    s0, s1, _ = tx.names
    first = tx.keys_on(s0, 1)[0]
    _taken(tx, s0, first, "taken")
    start = first + 1
    for _ in range(6):
        bad, inside = tx.keys_on(s0, 1, start)[0], tx.keys_on(s1, 1, start)[0]
        start = max(bad, inside) + 1
        with tx.Session()() as s:
            s.add(Code(id=bad, code="taken"))  # violates at s0's COMMIT
            s.flush()
            with pytest.raises(LookupError):
                with s.begin_nested():
                    s.add(Code(id=inside, code=f"tentative{inside}"))
                    s.flush()
                    raise LookupError("undo the tentative write")
            assert s.get(Code, inside) is None  # (read inside the transaction: still fine)
            with pytest.raises(sa_exc.SQLAlchemyError) as info:
                s.commit()
            assert isinstance(info.value, sa_exc.IntegrityError), \
                f"{type(info.value).__name__}: {info.value}"
            s.rollback()
        assert tx.ids(s0) == {first} and tx.ids(s1) == set()


def test_commit_still_reports_a_shard_written_again_after_its_savepoint_rolled_back(tx):
    """The other side: a shard written inside a rolled-back savepoint and then again
    outside it has committed writes when its COMMIT comes before the failing one's:
    CommitError names it (never under-reported: its writes must not be applied twice)."""
    s0, s1, _ = tx.names
    first = tx.keys_on(s0, 1)[0]
    _taken(tx, s0, first, "taken")
    start = first + 1
    seen_partial = False
    for _ in range(8):
        bad = tx.keys_on(s0, 1, start)[0]
        inside, kept = tx.keys_on(s1, 2, start)
        start = max(bad, inside, kept) + 1
        with tx.Session()() as s:
            s.add(Code(id=bad, code="taken"))
            s.flush()
            sp = s.begin_nested()
            s.add(Code(id=inside, code=f"tentative{inside}"))
            s.flush()
            sp.rollback()
            s.add(Code(id=kept, code=f"kept{kept}"))
            with pytest.raises(sa_exc.SQLAlchemyError) as info:
                s.commit()
            s.rollback()
        if kept in tx.ids(s1):
            seen_partial = True
            err = info.value
            assert isinstance(err, shardkit.CommitError), f"{type(err).__name__}: {err}"
            assert err.committed == [s1] and err.failed == s0
            with tx.autocommit(s1) as c:
                c.execute(text("DELETE FROM t7b_codes"))
        else:
            assert isinstance(info.value, sa_exc.IntegrityError), f"{type(info.value).__name__}"
        assert tx.ids(s0) == {first} and tx.ids(s1) == set()
        if seen_partial:
            break
    assert seen_partial, "s1 never committed before s0 in 8 rounds"
