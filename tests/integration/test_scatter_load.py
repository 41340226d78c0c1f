"""Cross-shard (scatter) reads under load and failure.

What is checked: bursts of concurrent scatters on tiny pools give the exact answer of
one database and leave no connection checked out; abandoned, failed and timed-out
scatters give their connections back and leave sessions and pooled connections usable;
read-your-writes holds for scatters; a shard that fails is named; partial results say
what is missing; the Result API on scatter results behaves as on one database.

Cluster: 3 shards x 1 replica (module-scoped, this module's own).  The oracle is a
database ``hk_oracle`` on shard s0's primary server holding the same rows.
``hk_gate(a, b, c)`` sleeps ``a`` seconds on s0, ``b`` on s1, ``c`` on s2 (and not at
all on the oracle), so a statement can be made slow on one shard only.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from own_tables import truncate_everywhere
from sqlalchemy import BigInteger, Integer, Text, create_engine, func, insert, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

N_ROWS = 600
JOIN = 60.0   # seconds any worker thread may take before the test calls it a hang


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "hk_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp: Mapped[int | None] = mapped_column(Integer)
    qty: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(Text)


class Note(Base):
    """Written by the read-your-writes tests (the Item rows stay fixed)."""

    __tablename__ = "hk_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int | None] = mapped_column(Integer)


GROUPS = {"hk": {"strategy": "hash", "tables": {"hk_items": "id", "hk_notes": "id"}}}
I = Item


def gate(s0: float = 0.0, s1: float = 0.0, s2: float = 0.0) -> Any:
    return func.hk_gate(float(s0), float(s1), float(s2))


@dataclass
class Env:
    dev: Any
    cluster: shardkit.Cluster          # default pools, replicas
    Session: sessionmaker
    oracle: Engine
    rows: list[dict[str, Any]]

    def oracle_rows(self, stmt: Any) -> list[tuple[Any, ...]]:
        with self.oracle.connect() as c:
            return [tuple(r) for r in c.execute(stmt)]

    def make_cluster(self, *, replicas: bool = True, pool: dict[str, Any] | None = None,
                     warm: bool = True, **replica_settings: Any) -> shardkit.Cluster:
        """A Cluster over the module's servers; ``warm``: its monitor started already (the
        concurrent start of a cold one is its own test)."""
        cfg = {**self.dev.config_dict(), "groups": GROUPS,
               "replicas": {"poll_interval": 0.1, **replica_settings}}
        if not replicas:
            cfg["shards"] = [{**s, "replicas": []} for s in cfg["shards"]]
        if pool:
            cfg["pool"] = pool
        cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
        if warm and replicas:
            cluster.start_monitor()
        return cluster

    def ids_on(self, shard: str, n: int, start: int = 10**12) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for(Note, k) == shard:
                out.append(k)
            k += 1
        return out

    def clear_notes(self) -> None:
        truncate_everywhere(self.cluster, "hk_notes")
        for shard in self.dev.shards:
            for r in shard.replicas:
                r.wait_caught_up()


def checked_out(cluster: shardkit.Cluster) -> dict[str, int]:
    """Nodes with connections checked out of their pool (should be none after the work)."""
    out = {}
    for node, st in cluster.pool_stats().items():
        if st and st.get("checkedout", 0):
            out[node] = st["checkedout"]
    return out


def wait_checked_in(cluster: shardkit.Cluster, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        busy = checked_out(cluster)
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.05)


def run_threads(fn, n: int, timeout: float = JOIN) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(k: int) -> None:
        try:
            fn(k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} of {n} threads still running after {timeout:g} s (hang)"
    return errors


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=1)
    cfg = {**dev.config_dict(), "groups": GROUPS, "replicas": {"poll_interval": 0.1}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    assert cluster.shard_names == ("s0", "s1", "s2")
    for i, s in enumerate(cluster.shard_names):
        Base.metadata.create_all(cluster.primary(s))
        arg = "abc"[i]
        with cluster.primary(s).begin() as c:
            c.execute(text(
                "CREATE FUNCTION hk_gate(a float8, b float8, c float8) RETURNS boolean "
                f"LANGUAGE sql STABLE AS $$SELECT pg_sleep({arg}) IS NOT NULL$$"))
    admin_url = make_url(dev.shards[0].primary.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text("CREATE DATABASE hk_oracle"))
    admin.dispose()
    oracle = create_engine(admin_url.set(database="hk_oracle"))
    Base.metadata.create_all(oracle)
    with oracle.begin() as c:
        c.execute(text("CREATE FUNCTION hk_gate(a float8, b float8, c float8) RETURNS boolean "
                       "LANGUAGE sql STABLE AS $$SELECT true$$"))

    rng = random.Random(7)
    ids = rng.sample(range(-10**9, 10**9), N_ROWS)
    names = [None, "", "a", "b", "B", "zz", "\u00e9"]
    rows = [{"id": k, "grp": None if rng.random() < 0.1 else rng.randint(0, 6),
             "qty": None if rng.random() < 0.15 else rng.randint(-50, 50),
             "name": rng.choice(names)} for k in ids]
    with oracle.begin() as c:
        c.execute(insert(Item.__table__), rows)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session() as s:
        s.execute(insert(Item), rows)
        s.commit()
    for shard in dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()
    cluster.start_monitor()
    per_shard = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            per_shard[s] = c.execute(text("SELECT count(*) FROM hk_items")).scalar_one()
    assert all(n > 100 for n in per_shard.values()), per_shard
    yield Env(dev, cluster, Session, oracle, rows)
    cluster.dispose()
    oracle.dispose()


# Queries with a deterministic answer (ORDER BY ends on the primary key).
QUERIES = {
    "order limit": select(I.id, I.qty, I.name).order_by(I.qty.desc().nulls_last(), I.id).limit(17),
    "order limit offset": select(I.id, I.grp).order_by(I.grp, I.id.desc()).limit(9).offset(31),
    "aggregates": select(func.count(), func.count(I.qty), func.sum(I.qty), func.min(I.qty),
                         func.max(I.name), func.avg(I.qty)),
    "group by having": select(I.grp, func.count(), func.sum(I.qty), func.avg(I.qty))
    .group_by(I.grp).having(func.count() > 5).order_by(I.grp.nulls_first()),
    "distinct": select(I.name).distinct().order_by(I.name.nulls_first()),
    "filtered order": select(I.id).where(I.qty > 10).order_by(I.id.desc()).limit(40),
}


def tuples(result: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in result]


# ---------------------------------------------------------------------------
# Correct answers under load, on tiny pools
# ---------------------------------------------------------------------------


def test_burst_of_scatters_on_tiny_pools_is_exact_and_leaks_nothing(env):
    """30 threads x 6 scatters each, pool size 2 / overflow 0 per node: every answer equals
    the oracle's, nothing hangs, no checkout times out, every connection comes back."""
    want = {k: env.oracle_rows(q) for k, q in QUERIES.items()}
    cluster = env.make_cluster(pool={"size": 2, "max_overflow": 0, "timeout": 30})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    wrong: list[str] = []
    names = list(QUERIES)

    def work(k: int) -> None:
        for i in range(6):
            name = names[(k + i) % len(names)]
            with Session() as s:
                got = tuples(s.execute(QUERIES[name]))
            if got != want[name]:
                wrong.append(name)

    try:
        errors = run_threads(work, 30)
        assert not errors, errors[:3]
        assert not wrong, Counter(wrong)
        assert wait_checked_in(cluster) == {}
        for node, st in cluster.pool_stats().items():
            assert st["size"] == 2 and st["overflow"] <= 0, (node, st)
    finally:
        cluster.dispose()


def test_burst_of_streamed_scatters_in_transactions_with_writes(env):
    """Concurrent sessions each write a row to one shard (flushed, not committed) and then
    run streamed (yield_per) scatters: each sees its own write and nobody else's."""
    env.clear_notes()
    cluster = env.make_cluster(pool={"size": 3, "max_overflow": 0, "timeout": 30})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    want_items = env.oracle_rows(select(I.id, I.qty).order_by(I.qty.nulls_first(), I.id).limit(25))
    bad: list[Any] = []

    def work(k: int) -> None:
        for i in range(3):
            key = 10**12 + k * 100 + i
            with Session() as s:
                s.add(Note(id=key, v=k))
                s.flush()
                got = tuples(s.execute(select(Note.id).order_by(Note.id), execution_options={"yield_per": 2}))
                if got != [(key,)]:
                    bad.append(("notes", k, got))
                items = tuples(s.execute(select(I.id, I.qty).order_by(I.qty.nulls_first(), I.id).limit(25),
                                         execution_options={"yield_per": 4}))
                if items != want_items:
                    bad.append(("items", k))
                s.rollback()

    try:
        errors = run_threads(work, 12)
        assert not errors, errors[:3]
        assert not bad, bad[:3]
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()


# ---------------------------------------------------------------------------
# Streams abandoned half-way, exceptions inside the loop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "gc", "session close"])
def test_abandoned_streamed_scatter_returns_its_connections(env, how):
    cluster = env.make_cluster(pool={"size": 1, "max_overflow": 0, "timeout": 5})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    stmt = select(I.id, I.name).order_by(I.id)
    try:
        s = Session()
        r = s.execute(stmt, execution_options={"yield_per": 5})
        first = [tuple(next(r)) for _ in range(3)]
        assert first == env.oracle_rows(stmt)[:3]
        assert checked_out(cluster), "a streaming scatter holds connections while it runs"
        if how == "close":
            r.close()
            s.close()
        elif how == "gc":
            del r, s
            gc.collect()
        else:
            s.close()
            del r
        assert wait_checked_in(cluster) == {}
        # pools of size 1: every node's only connection must be usable by the next session
        with Session() as s2:
            assert tuples(s2.execute(stmt.limit(4), execution_options={"yield_per": 2})) == \
                env.oracle_rows(stmt.limit(4))
        with Session() as s2:
            assert tuples(s2.execute(select(func.count()).select_from(I))) == [(N_ROWS,)]
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()


def test_exception_inside_the_loop_leaves_the_session_usable(env):
    cluster = env.make_cluster(pool={"size": 1, "max_overflow": 0, "timeout": 5})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    stmt = select(I.id, I.qty).order_by(I.qty.desc().nulls_last(), I.id)
    want = env.oracle_rows(stmt)
    try:
        for opts in ({}, {"yield_per": 3}):
            with Session() as s:
                with pytest.raises(ZeroDivisionError):
                    for n, row in enumerate(s.execute(stmt, execution_options=opts)):
                        if n == 7:
                            1 / 0
                # same session, same (size 1) pools: the next scatters work and are exact
                assert tuples(s.execute(stmt, execution_options=opts)) == want
                assert tuples(s.execute(QUERIES["aggregates"], execution_options=opts)) == \
                    env.oracle_rows(QUERIES["aggregates"])
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()


@pytest.mark.xfail(strict=True, reason="as documented (README, cross-shard reads): a streamed replica "
                   "read takes a second connection of that replica's pool, so one session on a "
                   "size-1 pool times out against itself")
def test_one_session_plain_then_streamed_scatter_needs_one_connection_per_node(env):
    """README: a session holds one connection per shard.  A plain scatter then a streamed
    (yield_per) scatter in one session, on pools of one connection, must not wait on itself."""
    # (a pool timeout of 1 s: the documented behaviour waits it out in full)
    cluster = env.make_cluster(pool={"size": 1, "max_overflow": 0, "timeout": 1},
                               consistency="eventual")
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    stmt = select(I.id).order_by(I.id).limit(5)
    try:
        with Session() as s:
            assert tuples(s.execute(stmt)) == env.oracle_rows(stmt)
            assert tuples(s.execute(stmt, execution_options={"yield_per": 2})) == env.oracle_rows(stmt)
    finally:
        cluster.dispose()


def test_concurrent_first_reads_on_a_fresh_cluster(env, monkeypatch):
    """The first replica reads of a new Cluster start its monitor; 16 threads doing their
    first scatter at once must all get answers.  The selector's construction is slowed
    down (as a busy machine may) to make the scheduling that exposes a race certain."""
    import shardkit._replicas as replicas

    real_init = replicas.ReplicaSelector.__init__

    def slow_init(self, *a: Any, **kw: Any) -> None:
        time.sleep(0.3)
        real_init(self, *a, **kw)

    monkeypatch.setattr(replicas.ReplicaSelector, "__init__", slow_init)
    want = env.oracle_rows(QUERIES["order limit"])
    cluster = env.make_cluster(consistency="eventual", warm=False)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    go = threading.Barrier(16, timeout=JOIN)
    wrong: list[Any] = []

    def work(k: int) -> None:
        with Session() as s:
            go.wait()
            if tuples(s.execute(QUERIES["order limit"])) != want:
                wrong.append(k)

    try:
        errors = run_threads(work, 16)
        assert not errors, [f"{type(e).__name__}: {e}"[:200] for e in errors[:3]]
        assert not wrong
    finally:
        cluster.dispose()


# ---------------------------------------------------------------------------
# Result API on scatter results
# ---------------------------------------------------------------------------


def test_result_api_on_scatter_results(env):
    stmt = select(I.id, I.grp).order_by(I.grp.desc().nulls_last(), I.id)
    want = env.oracle_rows(stmt)
    with env.Session() as s:
        r = s.execute(stmt)
        assert [tuple(x) for x in r.fetchmany(7)] == want[:7]
        assert [tuple(x) for x in r.fetchmany(5)] == want[7:12]
        assert tuple(r.fetchone()) == want[12]
        assert [tuple(x) for x in r.fetchall()] == want[13:]
        assert r.fetchmany(3) == []
        parts = list(s.execute(stmt).partitions(50))
        assert [len(p) for p in parts] == [50] * (N_ROWS // 50) + ([N_ROWS % 50] if N_ROWS % 50 else [])
        assert [tuple(x) for p in parts for x in p] == want
        assert s.execute(stmt).scalars().first() == want[0][0]
        assert s.execute(stmt, execution_options={"yield_per": 4}).scalars().first() == want[0][0]
        assert s.scalars(select(I).order_by(I.id.desc())).first().id == max(x["id"] for x in env.rows)
        assert s.execute(select(func.count()).select_from(I)).scalar_one() == N_ROWS
    assert wait_checked_in(env.cluster) == {}


def test_partitions_without_size_follow_yield_per_like_one_database(env):
    stmt = select(I.id).order_by(I.id)
    with sessionmaker(bind=env.oracle)() as o:
        want = [len(p) for p in o.execute(stmt, execution_options={"yield_per": 50}).partitions()]
    assert want[0] == 50
    with env.Session() as s:
        got = [len(p) for p in s.execute(stmt, execution_options={"yield_per": 50}).partitions()]
    assert got == want


# ---------------------------------------------------------------------------
# Read-your-writes
# ---------------------------------------------------------------------------


def test_scatter_in_a_transaction_sees_its_own_flushed_and_pending_writes(env):
    env.clear_notes()
    k0, k2 = env.ids_on("s0", 1)[0], env.ids_on("s2", 1)[0]
    with env.Session() as s:
        s.add(Note(id=k0, v=1))
        s.flush()
        assert tuples(s.execute(select(Note.id, Note.v).order_by(Note.id))) == [(k0, 1)]
        s.add(Note(id=k2, v=2))   # pending: autoflush
        assert tuples(s.execute(select(func.count(), func.sum(Note.v)).select_from(Note))) == [(2, 3)]
        s.commit()
        # right after the commit (replicas maybe a moment behind): still seen
        assert tuples(s.execute(select(Note.id).order_by(Note.id))) == sorted([(k0,), (k2,)])


def test_scatter_autoflushes_pending_objects_without_replicas(env):
    env.clear_notes()
    cluster = env.make_cluster(replicas=False)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    k0, k1 = env.ids_on("s0", 1)[0], env.ids_on("s1", 1)[0]
    try:
        with Session() as s:
            s.add_all([Note(id=k0, v=5), Note(id=k1, v=6)])
            # one database (a plain Session) autoflushes before this query
            got = tuples(s.execute(select(func.count(), func.sum(Note.v)).select_from(Note)))
            assert got == [(2, 11)]
    finally:
        cluster.dispose()


def test_scatter_after_commit_reads_own_writes_while_replicas_lag(env):
    env.clear_notes()
    reps = [r for sh in env.dev.shards for r in sh.replicas]
    keys = [env.ids_on(s, 1, start=2 * 10**12)[0] for s in env.cluster.shard_names]
    for r in reps:
        r.set_apply_delay(3)
    try:
        time.sleep(0.5)
        with env.Session() as s:
            s.add(Note(id=keys[1], v=7))
            s.commit()
            assert tuples(s.execute(select(Note.id, Note.v).order_by(Note.id))) == [(keys[1], 7)]
            assert tuples(s.execute(select(Note.id), execution_options={"yield_per": 1})) == [(keys[1],)]
            token = s.consistency_token()
        with env.Session(consistency_token=token) as s:
            assert s.execute(select(func.count()).select_from(Note)).scalar_one() == 1
        # ...and without the token the lagging replicas serve the scatter without the row:
        # the replicas really lag and take these reads, so the checks above could fail.
        with env.Session(consistency="eventual") as s:
            assert s.execute(select(func.count()).select_from(Note)).scalar_one() == 0
    finally:
        for r in reps:
            r.set_apply_delay(0)
        for r in reps:
            r.wait_caught_up()


# ---------------------------------------------------------------------------
# Timeouts: the cancelled query must not poison anything
# ---------------------------------------------------------------------------


def test_timeout_names_the_shard_and_poisons_no_pooled_connection(env):
    cluster = env.make_cluster(pool={"size": 1, "max_overflow": 0, "timeout": 5})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    stmt = select(func.count(), func.sum(I.qty)).where(gate(s2=20))
    want = env.oracle_rows(select(func.count(), func.sum(I.qty)))
    opts = {"shardkit_timeout": 0.2}
    try:
        for consistency in ("strong", "eventual"):
            t0 = time.monotonic()
            with Session(consistency=consistency) as s:
                with pytest.raises(shardkit.ScatterError) as ei:
                    s.execute(stmt, execution_options=opts).all()
                assert time.monotonic() - t0 < 5
                assert set(ei.value.failures) == {"s2"} and "s2" in str(ei.value)
                s.rollback()
                # the same session, the same (size 1) pools: the next scatter is whole and exact
                assert tuples(s.execute(select(func.count(), func.sum(I.qty)))) == want
            # a new session gets the pooled connections the cancelled query ran on (with
            # a timeout too, but one a loaded machine's ungated query cannot run into)
            for _ in range(3):
                with Session(consistency=consistency) as s:
                    assert tuples(s.execute(select(func.count(), func.sum(I.qty)).where(gate()),
                                            execution_options={"shardkit_timeout": 5})) == want
        assert wait_checked_in(cluster) == {}
        with cluster.primary("s2").connect() as c:
            assert c.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE '%hk_gate%' AND pid <> pg_backend_pid()")).scalar_one() == 0
    finally:
        cluster.dispose()


def test_timeouts_under_concurrency_leave_pools_clean(env):
    """16 threads alternate scatters that time out on s1 with ones that must succeed."""
    cluster = env.make_cluster(pool={"size": 2, "max_overflow": 0, "timeout": 30})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    want = env.oracle_rows(QUERIES["order limit"])
    bad: list[Any] = []

    def work(k: int) -> None:
        for i in range(4):
            with Session() as s:
                if (k + i) % 2:
                    try:
                        s.execute(select(I.id).where(gate(s1=10)),
                                  execution_options={"shardkit_timeout": 0.3}).all()
                        bad.append("no timeout")
                    except shardkit.ScatterError as e:
                        if set(e.failures) != {"s1"}:
                            bad.append(("failures", set(e.failures)))
                else:
                    got = tuples(s.execute(QUERIES["order limit"].where(gate()),
                                           execution_options={"shardkit_timeout": 20}))
                    if got != want:
                        bad.append("wrong answer")

    try:
        errors = run_threads(work, 16)
        assert not errors, errors[:3]
        assert not bad, bad[:5]
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()


def test_timeout_holds_while_the_scatter_threads_are_busy(env):
    """Other scatters keep the cluster's scatter threads busy (12 for 3 shards); a scatter
    with shardkit_timeout=0.3 whose s2 query would take 8 s must still give up quickly.
    The deadline counts from the call: shards whose queries were still queued then have
    not answered either, and are named too (README)."""
    cluster = env.make_cluster(pool={"size": 10, "max_overflow": 0, "timeout": 30})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    started = threading.Barrier(5, timeout=JOIN)
    elapsed: list[float] = []
    outcome: list[Any] = []

    def work(k: int) -> None:
        with Session(consistency="strong") as s:
            started.wait()
            if k < 4:
                s.execute(select(func.count()).select_from(I).where(gate(2, 2, 2))).all()
                return
            time.sleep(0.3)   # the four slow scatters occupy every scatter thread
            t0 = time.monotonic()
            try:
                s.execute(select(func.count()).select_from(I).where(gate(s2=8)),
                          execution_options={"shardkit_timeout": 0.3}).all()
                outcome.append("answered")
            except shardkit.ScatterError as e:
                outcome.append(set(e.failures))
            elapsed.append(time.monotonic() - t0)

    try:
        errors = run_threads(work, 5)
        assert not errors, errors[:3]
        # the busy threads free up within ~2 s; the 8 s query must not be waited for
        # 5.0 (was 2.0) on a loaded machine: waiting for the 8 s query takes over 8 s
        assert len(outcome) == 1 and "s2" in outcome[0] and elapsed[0] < 5.0, (outcome, elapsed)
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
def test_partial_streamed_scatter_then_the_same_session_reads_that_shard_again(env, consistency):
    """A streamed scatter with partial results loses s2 to a timeout; the same session's
    next streamed scatter (s2 included) must work and be whole (README: the failed
    shard's connection starts afresh)."""
    stmt = select(I.id, I.qty).order_by(I.id).limit(50)
    want = env.oracle_rows(stmt)
    opts = {"yield_per": 5, "shardkit_timeout": 0.2, "shardkit_partial_results": True}
    with env.Session(consistency=consistency) as s:
        r = s.execute(stmt.where(gate(s2=20)), execution_options=opts)
        got = tuples(r)
        assert set(r.missing_shards) == {"s2"}
        assert r.missing_shards["s2"].shard == "s2"
        assert len(got) == 50 and got != want
        assert tuples(s.execute(stmt, execution_options={"yield_per": 5})) == want
        assert tuples(s.execute(stmt)) == want
    assert wait_checked_in(env.cluster) == {}


# ---------------------------------------------------------------------------
# Dying nodes
# ---------------------------------------------------------------------------


def test_replica_killed_during_a_burst_of_scatters_costs_no_failed_read(env):
    cluster = env.make_cluster(pool={"size": 4, "max_overflow": 0, "timeout": 30},
                               consistency="eventual", ban_seconds=30)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    cluster.start_monitor()
    want = {k: env.oracle_rows(q) for k, q in QUERIES.items()}
    names = list(QUERIES)
    stop = threading.Event()
    wrong: list[Any] = []
    served = Counter()
    victim = env.dev.shards[1].replicas[0]

    def work(k: int) -> None:
        i = 0
        while not stop.is_set():
            name = names[(k + i) % len(names)]
            with Session() as s:
                got = tuples(s.execute(QUERIES[name]))
            if got != want[name]:
                wrong.append(name)
            served["ok"] += 1
            i += 1

    killer_done = threading.Event()

    def killer() -> None:
        time.sleep(0.8)
        victim.kill()
        time.sleep(1.5)
        stop.set()
        killer_done.set()

    kt = threading.Thread(target=killer, daemon=True)
    kt.start()
    try:
        errors = run_threads(work, 8)
        kt.join(JOIN)
        assert killer_done.is_set()
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors[:3]]
        assert not wrong, Counter(wrong)
        assert served["ok"] > 50
        health = {n["node"]: n for n in cluster.health().nodes}
        assert health["s1/r0"]["up"] is False, health["s1/r0"]
        assert wait_checked_in(cluster) == {}
    finally:
        cluster.dispose()
        victim.start()
        victim.wait_caught_up()


def test_partial_results_with_a_stopped_primary_and_no_replicas(env):
    cluster = env.make_cluster(replicas=False, pool={"size": 2, "max_overflow": 0, "timeout": 10})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with cluster.primary("s1").connect() as c:
        s1_ids = list(c.execute(text("SELECT id FROM hk_items")).scalars())
    others = [r["id"] for r in env.rows if r["id"] not in set(s1_ids)]
    stmt = select(I.id, I.qty).order_by(I.qty.nulls_first(), I.id).limit(30)
    agg = select(func.count(), func.sum(I.qty), func.avg(I.qty))
    want_rows = env.oracle_rows(select(I.id, I.qty).where(I.id.in_(others))
                                .order_by(I.qty.nulls_first(), I.id).limit(30))
    want_agg = env.oracle_rows(select(func.count(), func.sum(I.qty), func.avg(I.qty))
                               .where(I.id.in_(others)))
    primary = env.dev.shards[1].primary
    primary.stop(mode="immediate")
    try:
        opts = {"shardkit_partial_results": True, "shardkit_timeout": 5}
        with Session() as s:
            for q, want in ((stmt, want_rows), (agg, want_agg)):
                for extra in ({}, {"yield_per": 3}):
                    t0 = time.monotonic()
                    r = s.execute(q, execution_options={**opts, **extra})
                    assert tuples(r) == want
                    assert set(r.missing_shards) == {"s1"}
                    assert isinstance(r.missing_shards["s1"], shardkit.ShardUnavailable)
                    assert r.missing_shards["s1"].shard == "s1"
                    assert time.monotonic() - t0 < 8
            # without partial results: an error naming the shard, and the session goes on
            with pytest.raises(shardkit.ScatterError) as ei:
                s.execute(agg).all()
            assert set(ei.value.failures) == {"s1"} and "s1" in str(ei.value)
            s.rollback()
            assert s.execute(select(I.id).where(I.id == others[0])).scalar_one() == others[0]
        assert wait_checked_in(cluster) == {}
    finally:
        primary.start()
    try:
        with Session() as s:
            assert tuples(s.execute(agg)) == env.oracle_rows(agg)
    finally:
        cluster.dispose()
