"""run_transaction's promise "never run fn again once a commit has happened", for commits
of other sessions inside fn (a nested run_transaction), and functions it cannot run (a
generator or async function, whose body a call does not run): no server."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import sessionmaker

import shardkit
from models import offline_cluster


@pytest.fixture(scope="module")
def Session():
    cluster = offline_cluster(["s0", "s1"])
    yield sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    cluster.dispose()


def refused():
    return shardkit.NotOwned("simulated refusal of fn's own write", shard="s0", bucket=1)


def test_a_nested_run_transaction_that_committed_is_not_run_again(Session):
    """fn calls a helper that uses run_transaction (its own session, committed), then a
    write of fn is refused: running fn again commits the helper's work a second time (a row
    written twice on a real cluster: tests/integration/test_token_waits_and_nested_commits.py)."""
    calls = []

    def inner(session):
        calls.append("inner")

    def outer(session):
        calls.append("outer")
        shardkit.run_transaction(Session, inner)
        raise refused()

    with pytest.raises(shardkit.NotOwned) as err:
        shardkit.run_transaction(Session, outer, refresh_timeout=0.1)
    assert calls == ["outer", "inner"]
    assert "committed" in "".join(getattr(err.value, "__notes__", []))


def test_another_sessions_commit_inside_fn_counts_as_a_commit(Session):
    calls = []

    def fn(session):
        calls.append(1)
        with Session() as audit:
            audit.commit()
        raise refused()

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(Session, fn, refresh_timeout=0.1)
    assert len(calls) == 1


def test_a_nested_run_transaction_still_retries_its_own_function(Session):
    """Commits before the inner run_transaction started (the outer function's) do not stop
    the inner one from retrying its own function, which committed nothing."""
    inner_calls = []

    def inner(session):
        inner_calls.append(1)
        if len(inner_calls) == 1:
            raise refused()
        return "inner done"

    def outer(session):
        with Session() as other:
            other.commit()
        return shardkit.run_transaction(Session, inner, refresh_timeout=0.1)

    assert shardkit.run_transaction(Session, outer) == "inner done"
    assert len(inner_calls) == 2


def test_retry_without_commits_elsewhere_still_happens(Session):
    calls = []

    def fn(session):
        calls.append(1)
        if len(calls) == 1:
            raise refused()
        return "done"

    assert shardkit.run_transaction(Session, fn, refresh_timeout=0.1) == "done"
    assert len(calls) == 2


def _gen(session):
    session.info["ran"] = True
    yield 1


async def _co(session):
    session.info["ran"] = True


async def _agen(session):
    yield 1


@pytest.mark.parametrize("fn", [_gen, _co, _agen, lambda s: _co(s)],
                         ids=["generator", "async", "async-generator", "lambda-returning-coroutine"])
def test_a_function_whose_call_runs_nothing_is_refused(Session, fn, recwarn):
    """Calling a generator or async function runs none of its body: run_transaction used to
    commit the empty transaction and return the generator or coroutine, the writes never
    made (and a coroutine never awaited)."""
    commits = []

    class Counting(Session.class_):
        def commit(self):
            commits.append(1)
            super().commit()

    factory = sessionmaker(class_=Counting, cluster=Session.kw["cluster"])
    with pytest.raises(TypeError, match="run_transaction"):
        shardkit.run_transaction(factory, fn)
    assert commits == []
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_function_returning_a_generator_it_made_is_still_run(Session):
    """fn's body ran; what it returns is its own affair (not over-refused)."""
    assert list(shardkit.run_transaction(Session, lambda s: (i for i in range(3)))) == [0, 1, 2]
