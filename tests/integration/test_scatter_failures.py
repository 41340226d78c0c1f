"""Cross-shard reads under failure, as an SRE sees them: a shard that fails (its statement
timeout, its backend killed, its server down) fails the read fast and names itself, the
other shards' queries do not run on for nothing, no connection or cursor is left behind,
and partial results say what is missing.

Cluster: 4 shards, no replicas (this module's own).  ``sf_gate(a, b, c, d)`` sleeps ``a``
seconds on s0, ``b`` on s1, ``c`` on s2, ``d`` on s3, so one shard can be made slow.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, MetaData, func, insert, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.errors import ScatterError, ShardUnavailable

pytestmark = pytest.mark.integration

N = 2000
SHARDS = ("s0", "s1", "s2", "s3")


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "sf_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer)


GROUPS = {"sf": {"strategy": "hash", "tables": {"sf_items": "id"}}}


def gate(**delays: float) -> Any:
    return func.sf_gate(*(float(delays.get(s, 0.0)) for s in SHARDS))


@dataclass
class Env:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker

    def make_cluster(self, dead: str | None = None, **pool: Any) -> shardkit.Cluster:
        """A Cluster of the module's servers (its pools new); ``dead``: that shard's URL
        points at a port nothing listens on (its server as if down)."""
        cfg = {**self.dev.config_dict(), "groups": GROUPS}
        if dead is not None:
            cfg["shards"] = [{**s, "primary": str(make_url(s["primary"]).set(port=free_port()))}
                             if s["name"] == dead else s for s in cfg["shards"]]
        if pool:
            cfg["pool"] = pool
        return shardkit.Cluster.from_config(cfg, metadata=Base.metadata)

    @contextmanager
    def statement_timeout(self, shard: str, value: str) -> Iterator[None]:
        """``statement_timeout`` of ``shard``'s database (for connections made in the block)."""
        with self.cluster.primary(shard).connect() as c:
            db = c.execute(text("SELECT current_database()")).scalar()
            c.execute(text(f"ALTER DATABASE {db} SET statement_timeout = '{value}'"))
            c.commit()
        try:
            yield
        finally:
            with self.cluster.primary(shard).connect() as c:
                c.execute(text(f"ALTER DATABASE {db} RESET statement_timeout"))
                c.commit()

    def running(self, marker: str) -> dict[str, int]:
        """Shard -> queries containing ``marker`` active on its server (not this one)."""
        out = {}
        for sh in SHARDS:
            with self.cluster.primary(sh).connect() as c:
                n = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                   "AND pid <> pg_backend_pid() AND query LIKE :m"),
                              {"m": f"%{marker}%"}).scalar()
            if n:
                out[sh] = n
        return out

    def cursors(self) -> dict[str, int]:
        """Shard -> backends (not this one) idle in a transaction (a cursor or transaction left open)."""
        out = {}
        for sh in SHARDS:
            with self.cluster.primary(sh).connect() as c:
                n = c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")).scalar()
            if n:
                out[sh] = n
        return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checked_out(cluster: shardkit.Cluster) -> dict[str, int]:
    return {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st and st["checkedout"]}


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory) -> Iterator[Env]:
    dev = shardkit_module_cluster_factory(shards=4, replicas=0)
    cfg = {**dev.config_dict(), "groups": GROUPS}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    assert cluster.shard_names == SHARDS
    for i, s in enumerate(SHARDS):
        Base.metadata.create_all(cluster.primary(s))
        with cluster.primary(s).begin() as c:
            c.execute(text(
                "CREATE FUNCTION sf_gate(a float8, b float8, c float8, d float8) RETURNS boolean "
                f"LANGUAGE sql STABLE AS $$SELECT pg_sleep({'abcd'[i]}) IS NOT NULL$$"))
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session() as s:
        s.execute(insert(Item), [{"id": i, "v": i % 7} for i in range(N)])
        s.commit()
    yield Env(dev, cluster, Session)
    cluster.dispose()



def _cursors(conn: Any) -> list[str]:
    return conn.exec_driver_sql("SELECT name FROM pg_cursors WHERE name <> ''").scalars().all()


def ids_off(env: Env, shard: str) -> list[int]:
    return [i for i in range(N) if env.cluster.shard_for(Item, i) != shard]


# ---------------------------------------------------------------------------
# A shard that fails fails the read at once; the others' queries stop
# ---------------------------------------------------------------------------


def test_a_shard_past_its_statement_timeout_fails_the_read_at_once_and_stops_the_others(env):
    """s0's statement timeout (300 ms) cancels its query; the others would run 30 s more.
    Without partial results the read has failed then, whatever they answer: the caller
    gets the ScatterError naming s0 and its cause at once (not when the slowest shard
    ends, or never, for a query blocked on a lock), the other shards' queries are not
    left running on their servers, and no connection stays checked out."""
    marker = "sf_gate(2.0, 30.0"
    with env.statement_timeout("s0", "300ms"):
        cluster = env.make_cluster()
        try:
            S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            with S() as s:
                t0 = time.monotonic()
                with pytest.raises(ScatterError) as ei:
                    s.execute(select(Item.id).where(gate(s0=2, s1=30, s2=30, s3=30))).all()
                took = time.monotonic() - t0
                assert env.running(marker) == {}
            assert took < 10, f"the read failed after {took:.1f} s: it waited for the other shards"
            err = ei.value
            # Only the shard that failed: the others were stopped, they did not fail.
            assert set(err.failures) == {"s0"} and err.shard == "s0"
            assert "statement timeout" in str(err) and "s0" in str(err)
            assert checked_out(cluster) == {}
            with S() as s:  # the pooled connections are fine
                assert s.scalar(select(func.count()).select_from(Item)) == N
        finally:
            cluster.dispose()


def test_a_shard_down_fails_the_read_before_the_others_run_it(env):
    """A shard whose server refuses connections: without partial results the read fails
    whatever the others answer, so it is not run on them first (a 30 s query here)."""
    marker = "sf_gate(30.0"
    cluster = env.make_cluster(dead="s3")
    try:
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with S() as s:
            t0 = time.monotonic()
            with pytest.raises(ScatterError) as ei:
                s.execute(select(Item.id).where(gate(s0=30, s1=30, s2=30))).all()
            took = time.monotonic() - t0
            assert env.running(marker) == {}
        assert took < 10, f"the read failed after {took:.1f} s: it ran on the other shards first"
        assert set(ei.value.failures) == {"s3"} and "s3" in str(ei.value)
        assert isinstance(ei.value.failures["s3"], ShardUnavailable)
        assert checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_concurrent_failing_scatters_on_pools_of_one_neither_hang_nor_leak(env):
    """8 threads, each scattering over the 4 shards through pools of one connection (no
    overflow), s0 failing by its statement timeout while the others would take 30 s: every
    read fails fast with s0 named, none hangs, and every connection goes back."""
    with env.statement_timeout("s0", "200ms"):
        cluster = env.make_cluster(size=1, max_overflow=0, timeout=20)
        try:
            S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    for _ in range(2):
                        with S() as s:
                            s.execute(select(Item.id).where(gate(s0=1, s1=30, s2=30, s3=30))).all()
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            threads = [threading.Thread(target=work, daemon=True) for _ in range(8)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, 60 - (time.monotonic() - t0)))
            assert not any(t.is_alive() for t in threads), "hang"
            assert len(errors) == 8 and all(
                isinstance(e, ScatterError) and set(e.failures) == {"s0"} for e in errors), errors
            assert time.monotonic() - t0 < 40
            assert wait_until(lambda: checked_out(cluster) == {}), checked_out(cluster)
            assert env.running("sf_gate(1.0, 30.0") == {}
        finally:
            cluster.dispose()


def test_partial_results_still_wait_for_every_shard_and_order_and_limit_hold(env):
    """With partial results the other shards' answers are the result: s0 fails (its
    statement timeout), the read waits for the rest, and ORDER BY/LIMIT hold over them."""
    with env.statement_timeout("s0", "200ms"):
        cluster = env.make_cluster()
        try:
            S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            stmt = (select(Item.id).where(gate(s0=1, s1=0.5)).order_by(Item.id.desc()).limit(7)
                    .execution_options(shardkit_partial_results=True))
            with S() as s:
                r = s.execute(stmt)
                assert r.all() == [(i,) for i in sorted(ids_off(env, "s0"), reverse=True)[:7]]
                assert set(r.missing_shards) == {"s0"}
            assert checked_out(cluster) == {}
        finally:
            cluster.dispose()


def test_missing_shards_on_scalars_and_mappings(env):
    """The README: with partial results, "the result's .missing_shards" says which shards
    failed.  session.scalars() (the 2.0 way to read entities), result.scalars() and
    .mappings() are the result too: without it there, an aggregate or a list of entities
    read that way cannot be told partial from whole."""
    with env.statement_timeout("s0", "200ms"):
        cluster = env.make_cluster()
        try:
            S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            stmt = select(Item).where(gate(s0=1)).execution_options(shardkit_partial_results=True)
            with S() as s:
                r = s.scalars(stmt)
                assert set(r.missing_shards) == {"s0"}
                assert sorted(x.id for x in r.all()) == ids_off(env, "s0")
                assert set(s.execute(stmt).scalars().missing_shards) == {"s0"}
                m = s.execute(select(func.count()).select_from(Item).where(gate(s0=1))
                              .execution_options(shardkit_partial_results=True)).mappings()
                assert set(m.missing_shards) == {"s0"}
                assert list(m.one().values()) == [len(ids_off(env, "s0"))]
                whole = s.scalars(select(Item.id))
                assert whole.missing_shards == {} and len(whole.all()) == N
        finally:
            cluster.dispose()


# ---------------------------------------------------------------------------
# A shard's backend killed mid-stream
# ---------------------------------------------------------------------------


def _terminate_idle_in_transaction(env: Env, shard: str) -> int:
    with env.cluster.primary(shard).connect() as c:
        return c.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND datname = current_database() AND state LIKE 'idle in transaction%'")).scalar()


@pytest.mark.parametrize("partial", [False, True])
def test_a_primary_backend_killed_mid_stream_names_the_shard_and_leaks_nothing(env, partial):
    """A streamed (yield_per) cross-shard scan whose s2 backend is terminated after rows
    were read: the error names s2 (partial results or not: past each shard's first batch a
    failure cannot be left out of rows already given), leaving the ``with`` closes the
    other shards' cursors, and the session ends with every connection back."""
    opts: dict[str, Any] = {"yield_per": 20}
    if partial:
        opts["shardkit_partial_results"] = True
    got = []
    with env.Session() as s:
        with pytest.raises(ShardUnavailable, match="shard s2: node s2/primary") as ei:
            with s.execute(select(Item.id).order_by(Item.id).execution_options(**opts)) as r:
                it = iter(r)
                got.extend(next(it) for _ in range(30))
                held = {sh: s.connection(bind_arguments={"shard_id": sh}) for sh in ("s0", "s1", "s3")}
                assert all(_cursors(c) for c in held.values())
                assert _terminate_idle_in_transaction(env, "s2") == 1
                got.extend(it)
        assert ei.value.shard == "s2"
        assert {sh: _cursors(c) for sh, c in held.items()} == {"s0": [], "s1": [], "s3": []}
        ids = [i for (i,) in got]
        assert ids == sorted(set(ids))  # in order, none twice
    assert checked_out(env.cluster) == {}
    with env.Session() as s:
        assert s.scalar(select(func.count()).select_from(Item)) == N



def test_ctrl_c_while_a_stream_waits_for_a_later_batch(env):
    """Ctrl-C while the caller waits for s1's third batch of a streamed scan (fetched in the
    caller's thread): KeyboardInterrupt reaches the caller at once, s1's query is cancelled
    on its server (not left running), and the session's end gives every connection back
    with no cursor left open."""
    s1_ids = [i for i in range(N) if env.cluster.shard_for(Item, i) == "s1"]
    slow = s1_ids[50]
    for sh in SHARDS:
        with env.cluster.primary(sh).begin() as c:
            c.execute(text("CREATE OR REPLACE FUNCTION sf_slow(k bigint, x bigint) RETURNS bigint "
                           "LANGUAGE sql VOLATILE AS "
                           "$$SELECT CASE WHEN k = x AND pg_sleep(30) IS NOT NULL THEN k ELSE k END$$"))
    main = threading.main_thread().ident

    def interrupt(*_a: Any) -> None:
        raise KeyboardInterrupt

    def when_fetching() -> None:
        for _ in range(600):
            if env.running("FETCH"):
                time.sleep(0.3)
                signal.pthread_kill(main, signal.SIGALRM)
                return
            time.sleep(0.05)

    old = signal.signal(signal.SIGALRM, interrupt)
    watcher = threading.Thread(target=when_fetching)
    s = env.Session()
    try:
        watcher.start()
        ids = []
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            for (i, _) in s.execute(select(Item.id, func.sf_slow(Item.id, slow)).order_by(Item.id)
                                    .execution_options(yield_per=20)):
                ids.append(i)
        assert time.monotonic() - t0 < 15
        assert ids == sorted(ids) and len(ids) < N
        watcher.join()
        assert env.running("FETCH") == {}
        s.close()
        assert checked_out(env.cluster) == {}
        assert env.cursors() == {}
    finally:
        signal.signal(signal.SIGALRM, old)
        watcher.join()
        s.close()
