"""Tests of error paths: no error may leak a pooled connection or leave a
session (or the cluster) unusable, and the data must be what was committed.

After each scenario: every node's pool shows ``checkedout == 0`` once the session is
closed, a new session reads and writes normally, and the servers (queried directly,
not through shardkit) hold exactly the committed rows.  One 2-shard x 1-replica
cluster of its own serves the module; tests that stop or kill a node restore it.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, sessionmaker

import shardkit
from replica_env import replayed

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "ep_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    notes: Mapped[list[Note]] = relationship(lazy="select", order_by="Note.id")


class Note(Base):
    __tablename__ = "ep_notes"
    acct_id: Mapped[int] = mapped_column(ForeignKey("ep_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50))


GROUPS = {"accts": {"tables": {"ep_accounts": "id", "ep_notes": "acct_id"}}}
SEED_PER_SHARD = 60


class Env:
    def __init__(self, dev: Any, cluster: shardkit.Cluster) -> None:
        self.dev = dev
        self.cluster = cluster
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        self.Strong = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster,
                                   consistency="strong")
        by_shard: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
        for k in range(1, 50_000):
            by_shard[cluster.shard_for("ep_accounts", k)].append(k)
        self._keys = {s: iter(v) for s, v in by_shard.items()}

    def key(self, shard: str) -> int:
        return next(self._keys[shard])

    def rows(self, shard: str) -> dict[int, str]:
        """ep_accounts on the shard's primary, read directly (psycopg, not shardkit)."""
        with self.dev.shard(shard).primary.connect() as c:
            return dict(c.execute("SELECT id, name FROM ep_accounts").fetchall())

    def all_rows(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for s in self.cluster.shard_names:
            out.update(self.rows(s))
        return out

    baseline: dict[str, int] = {}

    def checked_out(self) -> dict[str, int]:
        """Connections checked out beyond those at the start of the test (so that one
        test's leak, kept alive by pytest's record of its failure, fails only that test)."""
        now = {node: (st or {}).get("checkedout", 0) for node, st in self.cluster.pool_stats().items()}
        return {node: n - self.baseline.get(node, 0) for node, n in now.items()
                if n - self.baseline.get(node, 0)}

    def assert_clean(self, expected: dict[int, str] | None = None) -> None:
        """No connection checked out; a new session reads and writes; data as committed."""
        assert self.checked_out() == {}, f"connections still checked out: {self.checked_out()}"
        if expected is not None:
            assert self.all_rows() == expected
        ks = {s: self.key(s) for s in self.cluster.shard_names}
        with self.Strong() as s:
            s.add_all(Acct(id=k, name=f"probe-{k}") for k in ks.values())
            s.commit()
        with self.Strong() as s:
            got = dict(s.execute(select(Acct.id, Acct.name).where(Acct.id.in_(list(ks.values())))).all())
            assert got == {k: f"probe-{k}" for k in ks.values()}
            assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(self.all_rows())
        with self.Strong() as s:
            s.execute(Acct.__table__.delete().where(Acct.id.in_(list(ks.values()))))
            s.commit()
        assert self.checked_out() == {}, f"connections checked out after a normal session: {self.checked_out()}"


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cfg = {**dev.config_dict(), "groups": GROUPS,
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 2.0}}
    cluster = shardkit.Cluster.from_config(cfg)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    cluster.start_monitor()
    e = Env(dev, cluster)
    with e.Strong() as s:
        for shard in cluster.shard_names:
            for _ in range(SEED_PER_SHARD):
                k = e.key(shard)
                s.add(Acct(id=k, name=f"seed-{k}"))
                s.add(Note(acct_id=k, id=1, body="n1"))
                s.add(Note(acct_id=k, id=2, body="n2"))
        s.commit()
    for sh in dev.shards:
        for r in sh.replicas:
            r.wait_caught_up()
    yield e
    cluster.dispose()


@pytest.fixture(autouse=True)
def _restore(env):
    gc.collect()
    env.baseline = {}
    env.baseline = env.checked_out()
    yield
    restarted = set()
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
            restarted.add(node.name)
    for sh in env.dev.shards:
        # (the settling pause only after a restart here: a test that restarts a primary
        # itself waits for it with the pause)
        _wait_primary_up(env, sh.name, settle=sh.primary.name in restarted)
    for sh in env.dev.shards:
        for r in sh.replicas:
            r.wait_streaming()
    # The next test reads counts and rows with no token of this one's writes (the probe
    # rows assert_clean adds and deletes): on replicas that have replayed them.
    replayed(env.dev)


def _active_sleeps(env: Env) -> int:
    n = 0
    for sh in env.dev.shards:
        with sh.primary.connect() as c:
            n += c.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                           "AND pid <> pg_backend_pid() AND state = 'active'").fetchone()[0]
    return n


# -- scatter errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
@pytest.mark.parametrize("yield_per", [None, 3])
def test_scatter_refused_after_shards_ran(env, consistency, yield_per):
    """Refusals decided while merging (shards already ran): inner joinedload with LIMIT,
    and a HAVING comparison Python cannot make."""
    before = env.all_rows()
    opts = {"yield_per": yield_per} if yield_per else {}
    with env.Session(consistency=consistency) as s:
        if not yield_per:  # SQLAlchemy itself refuses yield_per with a joined collection
            with pytest.raises(shardkit.ScatterRefused):
                s.execute(select(Acct).options(joinedload(Acct.notes, innerjoin=True))
                          .order_by(Acct.id).limit(5), execution_options=opts).unique().all()
        with pytest.raises(shardkit.ScatterRefused):
            s.execute(select(Acct.name, func.count()).group_by(Acct.name)
                      .having(func.max(Acct.name) > 5), execution_options=opts).all()
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    env.assert_clean(before)


def test_scatter_refused_leaves_pool_and_session_clean(env):
    before = env.all_rows()
    with env.Strong() as s:
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
        with pytest.raises(shardkit.ScatterRefused):
            s.execute(select(Acct).options(joinedload(Acct.notes, innerjoin=True))
                      .order_by(Acct.id).limit(5)).unique().all()
        # The session stays usable after the refusal.
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    env.assert_clean(before)


def test_a_statement_sqlalchemy_refuses_raises_its_own_error_not_a_shard_failure(env):
    """yield_per with a joined collection load is refused by SQLAlchemy itself, on every
    shard alike: the caller gets SQLAlchemy's InvalidRequestError (as on one database), not
    a ScatterError saying shards failed; nothing leaks."""
    before = env.all_rows()
    with env.Strong() as s:
        with pytest.raises(sa_exc.InvalidRequestError, match="yield_per") as ei:
            s.execute(select(Acct).options(joinedload(Acct.notes))
                      .execution_options(yield_per=10)).unique().all()
        assert not isinstance(ei.value, shardkit.ScatterError)
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    env.assert_clean(before)


def test_scatter_timeout_releases_connections_and_cancels_the_slow_shard(env):
    before = env.all_rows()
    slow_port = env.dev.shard("s1").primary.port
    cond = text(f"(SELECT true FROM pg_sleep(CASE WHEN current_setting('port')::int = {slow_port} "
                "THEN 5 ELSE 0 END))")
    t0 = time.monotonic()
    with env.Strong() as s:
        with pytest.raises(shardkit.ShardkitError):
            s.execute(select(Acct.id).where(cond).order_by(Acct.id),
                      execution_options={"shardkit_timeout": 0.7}).all()
        assert time.monotonic() - t0 < 3.0
        s.rollback()
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    # The slow shard's query was cancelled, not left running on the server.
    deadline = time.monotonic() + 2.0
    while _active_sleeps(env) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _active_sleeps(env) == 0
    env.assert_clean(before)


@pytest.mark.parametrize("consistency", ["eventual", "strong"])
def test_repeated_scatter_timeouts_leave_no_stray_cancel_or_running_query(env, consistency):
    """Timed-out scatters, one after the other, with the slow shard's sleep on whichever
    node serves it; every later statement on the same pools must run normally (a late
    cancel must not hit the next query on a reused connection)."""
    before = env.all_rows()
    ports = [n.port for n in env.dev.shard("s1").nodes]
    cond = text("(SELECT true FROM pg_sleep(CASE WHEN current_setting('port')::int IN "
                f"({', '.join(map(str, ports))}) THEN 0.6 ELSE 0 END))")
    # The 50 ms race is the point (the cancel lands as the query ends); a stalled waiter on a
    # loaded machine may see the query end first: at least one of six must time out.
    timed_out = 0
    for _ in range(6):
        with env.Session(consistency=consistency) as s:
            try:
                s.execute(select(Acct.id).where(cond),
                          execution_options={"shardkit_timeout": 0.55}).all()
            except shardkit.ShardkitError:
                timed_out += 1
        assert env.checked_out() == {}, env.checked_out()
        for _ in range(5):
            with env.Session(consistency=consistency) as s:
                assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    assert timed_out >= 1, "no scatter timed out: the late-cancel path was never exercised"
    env.assert_clean(before)


def test_streamed_scatter_timeout_then_close(env):
    before = env.all_rows()
    ports = [n.port for n in env.dev.shard("s1").nodes]
    cond = text("(SELECT true FROM pg_sleep(CASE WHEN current_setting('port')::int IN "
                f"({', '.join(map(str, ports))}) THEN 5 ELSE 0 END))")
    s = env.Session()
    t0 = time.monotonic()
    with pytest.raises(shardkit.ShardkitError):
        it = s.execute(select(Acct.id).where(cond).order_by(Acct.id),
                       execution_options={"shardkit_timeout": 0.7, "yield_per": 5}).scalars()
        list(it)
    assert time.monotonic() - t0 < 3.0
    s.close()
    assert env.checked_out() == {}, env.checked_out()
    env.assert_clean(before)


def test_partial_results_timeout_then_same_session_keeps_working(env):
    """A scatter with shardkit_partial_results=True whose slow shard times out returns
    the other shard's rows and raises nothing; the session must stay usable: no error
    was surfaced, so the caller has no reason to roll back."""
    before = env.all_rows()
    slow_port = env.dev.shard("s1").primary.port
    cond = text(f"(SELECT true FROM pg_sleep(CASE WHEN current_setting('port')::int = {slow_port} "
                "THEN 5 ELSE 0 END))")
    with env.Strong() as s:
        r = s.execute(select(Acct.id).where(cond).order_by(Acct.id),
                      execution_options={"shardkit_timeout": 0.7, "shardkit_partial_results": True})
        assert [row[0] for row in r.all()] == sorted(env.rows("s0"))
        assert set(r.missing_shards) == {"s1"}
        k = sorted(env.rows("s1"))[0]
        assert s.execute(select(Acct.name).where(Acct.id == k)).scalar_one() == before[k]
    env.assert_clean(before)


def test_partial_results_with_a_primary_stopped(env):
    before = env.all_rows()
    env.dev.shard("s1").primary.stop()
    with env.Strong() as s:
        r = s.execute(select(Acct.id).order_by(Acct.id),
                      execution_options={"shardkit_partial_results": True, "shardkit_timeout": 5.0})
        got = [row[0] for row in r.all()]
        assert set(r.missing_shards) == {"s1"}
        assert got == sorted(env.rows("s0"))
    assert env.checked_out() == {}, env.checked_out()
    env.dev.shard("s1").primary.start()
    _wait_primary_up(env, "s1")
    env.assert_clean(before)


def test_partial_results_primary_stopped_inside_a_transaction_then_close(env):
    """The session's transaction already reads s1's primary (and s0's); s1's primary
    stops; a scatter with partial results reports s1 missing.  Ending the session must
    return every connection (close() may raise for the dead one, as SQLAlchemy does).
    Repeated because the order in which SQLAlchemy closes a session's connections varies
    (a set): the leak shows when the dead s1 connection is closed before s0's."""
    before = env.all_rows()
    k1 = sorted(env.rows("s1"))[0]
    sessions = []  # kept alive: a connection left checked out is not returned by GC
    for _ in range(5):
        s = env.Strong()
        sessions.append(s)
        assert s.execute(select(Acct.name).where(Acct.id == k1)).scalar_one() == before[k1]
        env.dev.shard("s1").primary.stop()
        _wait_primary_down(env, "s1")
        r = s.execute(select(Acct.id).order_by(Acct.id),
                      execution_options={"shardkit_partial_results": True, "shardkit_timeout": 5.0})
        assert [row[0] for row in r.all()] == sorted(env.rows("s0"))
        assert set(r.missing_shards) == {"s1"}
        try:
            s.close()
        except (shardkit.ShardUnavailable, sa_exc.DBAPIError):
            pass  # ROLLBACK on the dead connection: plain SQLAlchemy raises here too
        env.dev.shard("s1").primary.start()
        _wait_primary_up(env, "s1")
    assert env.checked_out() == {}, f"left checked out after close(): {env.checked_out()}"
    # The session object is reusable.
    assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    s.close()
    env.assert_clean(before)


# -- streams abandoned ------------------------------------------------------------------------


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
def test_scatter_yield_per_abandoned_half_way(env, consistency):
    before = env.all_rows()
    s = env.Session(consistency=consistency)
    it = s.execute(select(Acct).order_by(Acct.id).execution_options(yield_per=5)).scalars()
    taken = [next(it).id for _ in range(12)]
    assert taken == sorted(before)[:12]
    s.close()
    assert env.checked_out() == {}, f"after close of an abandoned stream: {env.checked_out()}"
    # The closed session is reusable.
    assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    s.close()
    env.assert_clean(before)


def test_single_shard_yield_per_abandoned_then_rollback(env):
    before = env.all_rows()
    ids = sorted(env.rows("s0"))
    s = env.Session()
    it = s.execute(select(Acct).where(Acct.id.in_(ids)).order_by(Acct.id),
                   execution_options={"yield_per": 4, "shardkit_shard": "s0"}).scalars()
    assert [next(it).id for _ in range(6)] == ids[:6]
    s.rollback()
    assert s.execute(select(Acct.name).where(Acct.id == ids[0])).scalar_one() == before[ids[0]]
    s.close()
    env.assert_clean(before)


# -- replicas ---------------------------------------------------------------------------------


def test_replica_killed_read_is_retried_and_pool_clean(env):
    before = env.all_rows()
    k = sorted(env.rows("s0"))[0]
    with env.Session(consistency="eventual") as s:
        assert s.execute(select(Acct.name).where(Acct.id == k)).scalar_one() == before[k]
    env.dev.shard("s0").replicas[0].kill()
    with env.Session(consistency="eventual") as s:
        assert s.execute(select(Acct.name).where(Acct.id == k)).scalar_one() == before[k]
        assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    assert env.checked_out() == {}, env.checked_out()
    env.dev.shard("s0").replicas[0].start()
    env.assert_clean(before)


def test_replica_killed_under_an_abandoned_stream_then_close(env):
    before = env.all_rows()
    ids = sorted(env.rows("s0"))
    s = env.Session(consistency="eventual")
    it = s.execute(select(Acct).where(Acct.id.in_(ids)).order_by(Acct.id),
                   execution_options={"yield_per": 2, "shardkit_shard": "s0"}).scalars()
    assert next(it).id == ids[0]
    env.dev.shard("s0").replicas[0].kill()
    try:
        for _ in range(len(ids)):
            next(it)
    except (shardkit.ShardUnavailable, sa_exc.DBAPIError, StopIteration):
        pass
    s.close()
    assert env.checked_out() == {}, f"after close: {env.checked_out()}"
    env.dev.shard("s0").replicas[0].start()
    env.assert_clean(before)


# -- write errors -----------------------------------------------------------------------------


def test_integrity_error_on_one_shard_of_a_multi_shard_flush(env):
    before = env.all_rows()
    dup = sorted(env.rows("s1"))[0]
    new0, new1 = env.key("s0"), env.key("s1")
    s = env.Session()
    s.add(Acct(id=new0, name="new0"))
    s.add(Acct(id=new1, name="new1"))
    s.add(Acct(id=dup, name="dup"))
    with pytest.raises(sa_exc.IntegrityError):
        s.flush()
    s.rollback()
    assert env.all_rows() == before        # nothing of the failed flush is on any server
    s.add(Acct(id=new0, name="again"))
    s.commit()
    s.close()
    env.assert_clean({**before, new0: "again"})
    with env.Strong() as s2:
        s2.execute(Acct.__table__.delete().where(Acct.id == new0))
        s2.commit()


def test_shard_unavailable_on_commit_primary_stopped_after_flush(env):
    """README: a primary that is down makes writes fail with ShardUnavailable naming the
    shard.  Stopped between flush and commit, inside the usual `with Session() as s:`
    block, that is the error the caller must get (plain SQLAlchemy: the COMMIT meets the
    dead connection, invalidates it, and the session then closes quietly); the pool is
    clean afterwards and nothing was committed on s1."""
    before = env.all_rows()
    k1 = env.key("s1")
    with pytest.raises(shardkit.ShardUnavailable) as ei:
        with env.Session() as s:
            s.add(Acct(id=k1, name="lost"))
            s.flush()
            env.dev.shard("s1").primary.stop()
            _wait_primary_down(env, "s1")
            s.commit()
    assert ei.value.shard == "s1"
    assert env.checked_out() == {}, f"after a failed commit: {env.checked_out()}"
    env.dev.shard("s1").primary.start()
    _wait_primary_up(env, "s1")
    assert k1 not in env.rows("s1")
    env.assert_clean(before)


def _wait_primary_up(env: Env, shard: str, settle: bool = True) -> None:
    deadline = time.monotonic() + 10.0
    first = True
    while time.monotonic() < deadline:
        nodes = {n["node"]: n for n in env.cluster.health().nodes}
        if nodes[f"{shard}/primary"]["up"]:
            if settle or not first:
                time.sleep(2 * env.cluster.replica_settings.poll_interval)
            return
        first = False
        time.sleep(0.05)
    raise AssertionError(f"the monitor never saw {shard}/primary up again")


def _wait_primary_down(env: Env, shard: str) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        nodes = {n["node"]: n for n in env.cluster.health().nodes}
        if not nodes[f"{shard}/primary"]["up"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the monitor never saw {shard}/primary down")


# -- run_transaction --------------------------------------------------------------------------


def test_run_transaction_callable_raises_nothing_written_nothing_leaked(env):
    before = env.all_rows()
    k0, k1 = env.key("s0"), env.key("s1")
    calls = []

    def fn(session):
        calls.append(1)
        session.add_all([Acct(id=k0, name="x"), Acct(id=k1, name="y")])
        session.flush()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        shardkit.run_transaction(env.Session, fn)
    assert calls == [1]
    env.assert_clean(before)


def test_run_transaction_integrity_error_in_commit_is_not_retried_and_leaks_nothing(env):
    before = env.all_rows()
    dup = sorted(env.rows("s0"))[0]
    calls = []

    def fn(session):
        calls.append(1)
        session.add(Acct(id=dup, name="dup"))

    with pytest.raises(sa_exc.IntegrityError):
        shardkit.run_transaction(env.Session, fn)
    assert calls == [1]
    env.assert_clean(before)


# -- sessions after close; the cluster as a context manager -----------------------------------


def test_session_used_after_close_after_an_error(env):
    before = env.all_rows()
    s = env.Session()
    with pytest.raises(sa_exc.DBAPIError):
        s.execute(text("SELECT 1/0"), bind_arguments={"shard_id": "s0"})
    s.close()
    assert s.execute(select(func.count()).select_from(Acct)).scalar_one() == len(before)
    k = env.key("s1")
    s.add(Acct(id=k, name="after-close"))
    s.commit()
    s.close()
    s.close()  # idempotent
    env.assert_clean({**before, k: "after-close"})
    with env.Strong() as s2:
        s2.execute(Acct.__table__.delete().where(Acct.id == k))
        s2.commit()


def test_with_cluster_after_errors_closes_every_server_connection(env):
    app = "ep_with_cluster"
    cfg = {**env.dev.config_dict(), "groups": GROUPS}
    c2 = shardkit.Cluster.from_config(
        cfg, engine_options={"connect_args": {"application_name": app}})
    Sess = sessionmaker(class_=shardkit.ShardedSession, cluster=c2)
    with pytest.raises(RuntimeError):
        with c2:
            s = Sess()
            it = s.execute(select(Acct).order_by(Acct.id).execution_options(yield_per=3)).scalars()
            next(it)
            with pytest.raises(shardkit.ScatterRefused):
                s.execute(select(Acct).options(joinedload(Acct.notes, innerjoin=True))
                          .order_by(Acct.id).limit(2)).unique().all()
            s.close()
            raise RuntimeError("app error")
    deadline = time.monotonic() + 3.0
    while True:
        left = {}
        for node in env.dev.nodes:
            with node.connect() as c:
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                              (app,)).fetchone()[0]
            if n:
                left[node.name] = n
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == {}, f"server connections left open after `with cluster:` exited: {left}"
    env.assert_clean()
