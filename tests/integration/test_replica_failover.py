"""Tests of replica routing: failover inside transactions, replicas killed under a
streamed result, tampered tokens, bad per-query lag limits, threads, a killed primary,
passwords in URL query strings, and a replica that gets promoted.

One 2-shard x 2-replica cluster of its own serves the module.  Tests that delay, stop
or kill a node restore it; the promotion test is last (a promoted replica cannot rejoin).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String, Text, cast, event, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from waiting import health_by_node, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "Hq7zQueryPw4711"


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "hf_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    notes: Mapped[list[Note]] = relationship(lazy="select", order_by="Note.id")


class Note(Base):
    __tablename__ = "hf_notes"
    acct_id: Mapped[int] = mapped_column(ForeignKey("hf_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50))


GROUPS = {"accts": {"tables": {"hf_accounts": "id", "hf_notes": "acct_id"}}}


@dataclass
class Env:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker
    served: list[tuple[float, str, str]]
    keys: dict[str, Any]

    def key(self, shard: str) -> int:
        return next(self.keys[shard])

    def replica(self, shard: str, i: int) -> Any:
        return self.dev.shard(shard).replicas[i]

    def nodes_since(self, n0: int) -> list[str]:
        return [node for _, node, st in self.served[n0:] if "hf_" in st]

    def caught_up(self, shards: tuple[str, ...] = ("s0", "s1")) -> None:
        for s in shards:
            with self.dev.shard(s).primary.connect() as c:
                c.execute("SELECT txid_current()")
        for s in shards:
            for r in self.dev.shard(s).replicas:
                if r.is_running():
                    r.wait_caught_up()

    def primary_value(self, k: int) -> Any:
        shard = self.cluster.shard_for("hf_accounts", k)
        with self.dev.shard(shard).primary.connect() as c:
            row = c.execute("SELECT name FROM hf_accounts WHERE id = %s", (k,)).fetchone()
        return row and row[0]


def _instrument(cluster: shardkit.Cluster, served: list) -> None:
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k:
                         served.append((time.monotonic(), node, st)))


def _make_cluster(dev: Any, **replicas: Any) -> shardkit.Cluster:
    cfg = {**dev.config_dict(), "groups": GROUPS,
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 3.0,
                        **replicas}}
    return shardkit.Cluster.from_config(cfg)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=2)
    cluster = _make_cluster(dev)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    served: list[tuple[float, str, str]] = []
    _instrument(cluster, served)
    cluster.start_monitor()
    by_shard: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
    for k in range(1, 20_000):
        by_shard[cluster.shard_for("hf_accounts", k)].append(k)
    e = Env(dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served,
            {s: iter(v) for s, v in by_shard.items()})
    e.caught_up()
    yield e
    cluster.dispose()


@pytest.fixture(autouse=True)
def _restore(env):
    yield
    for node in env.dev.nodes:
        if not node.is_running():
            node.start()
    for s in env.dev.shards:
        for r in s.replicas:
            with r.connect() as c:
                if not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    continue  # promoted by the last test: it cannot stream again
            r.wait_streaming()


def _seed(env: Env, rows: dict[int, str]) -> None:
    with env.Session() as s:
        s.add_all(Acct(id=k, name=v) for k, v in rows.items())
        s.commit()
    env.caught_up()


# -- 1. failover inside a transaction must not go back in time --------------------------------


def test_replica_dies_inside_transaction_read_never_older_than_earlier_read(env):
    """Within one transaction a read saw 'v2' on replica A; A dies; replica B is alive
    but has only replayed 'v1'.  The next read of the same transaction must not return
    'v1' (README: a later read never sees an older state than an earlier one; the spec:
    a failed replica read is retried on another replica only outside a transaction).
    Either the primary serves it or the read fails."""
    k = env.key("s0")
    _seed(env, {k: "v1"})
    stmt = select(Acct.name).where(Acct.id == k)
    s = env.Session(consistency="eventual")
    try:
        s.begin()
        n0 = len(env.served)
        assert s.execute(stmt).scalar() == "v1"
        first = env.nodes_since(n0)
        assert len(first) == 1 and first[0].startswith("s0/r"), first
        a_idx = int(first[0][-1])
        a, b = env.replica("s0", a_idx), env.replica("s0", 1 - a_idx)
        b.set_apply_delay(60)
        try:
            with env.dev.shard("s0").primary.connect() as c:
                c.execute("UPDATE hf_accounts SET name = 'v2' WHERE id = %s", (k,))
            a.wait_caught_up()
            n0 = len(env.served)
            assert s.execute(stmt).scalar() == "v2"        # same replica, newer data
            assert env.nodes_since(n0) == [a.name]
            with b.connect() as c:                          # B really is behind
                assert c.execute("SELECT name FROM hf_accounts WHERE id = %s",
                                 (k,)).fetchone()[0] == "v1"
            a.kill()
            try:
                value = s.execute(stmt).scalar()
            except (shardkit.ShardkitError, sa_exc.DBAPIError):
                value = None  # refusing is acceptable; going back in time is not
            assert value != "v1", (
                "after its replica died, the transaction's read went back in time "
                f"(served by {env.nodes_since(n0)})")
        finally:
            b.set_apply_delay(0)
    finally:
        s.close()
        a.start()
        a.wait_streaming()
        env.caught_up(("s0",))


# -- 2. a replica SIGKILLed under a streamed (yield_per) result --------------------------------


def test_replica_sigkilled_mid_yield_per_is_shard_unavailable_never_a_short_result(env):
    """Stream 3000 rows with yield_per(100) from a replica and SIGKILL it after the first
    batch: the iteration must fail with ShardUnavailable naming the shard and node (never
    end early with a silently short result), the replica must not get later reads, and the
    same session's next read of that shard is served correctly by another node."""
    base = 1_000_000
    ks = [k for k in range(base, base + 12_000) if env.cluster.shard_for("hf_accounts", k) == "s1"][:3000]
    with env.Session() as s:
        s.add_all(Acct(id=k, name=f"n{k}") for k in ks)
        s.commit()
    env.caught_up(("s1",))
    stmt = (select(Acct.id).where(Acct.id.in_(ks)).order_by(Acct.id)
            .execution_options(yield_per=100))
    s = env.Session(consistency="eventual")
    victim = None
    got: list[int] = []
    error: BaseException | None = None
    try:
        n0 = len(env.served)
        result = s.execute(stmt).scalars()
        nodes = env.nodes_since(n0)
        assert nodes and nodes[0].startswith("s1/r"), nodes
        victim = env.replica("s1", int(nodes[0][-1]))
        try:
            for i, kid in enumerate(result):
                got.append(kid)
                if i == 150:
                    victim.kill()
        except Exception as e:  # noqa: BLE001
            error = e
        assert error is not None, f"stream ended without error after {len(got)} of {len(ks)} rows"
        assert isinstance(error, shardkit.ShardUnavailable), repr(error)
        assert error.shard == "s1" and victim.name in str(error), str(error)
        assert got == ks[:len(got)]
        n1 = len(env.served)
        assert s.execute(select(Acct.name).where(Acct.id == ks[-1])).scalar() == f"n{ks[-1]}"
        assert victim.name not in env.nodes_since(n1)
        h = health_by_node(env.cluster)[victim.name]
        assert h["banned_for_s"] > 0 or h["up"] is False, h
    finally:
        s.close()
        if victim is not None and not victim.is_running():
            victim.start()
            victim.wait_streaming()


# -- 3. tampered tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "v1:s0=0x10/0",                       # Python int() syntax, not an LSN
    "v1:s0=1_0/0",
    "v1:s0=-1/0",                          # a negative position
    "v1:s0=0/1FFFFFFFF",                   # low half wider than 32 bits
    "v1:s0=1FFFFFFFF/0",                   # high half wider than 32 bits (> 64-bit LSN)
    "v1:s0=0/5,s0=0/1",                    # the same shard twice
])
def test_tampered_consistency_tokens_are_refused_clearly(env, bad):
    """A token from a cookie or a job's arguments that was edited is not an LSN list that
    format_token could ever have produced: it must be refused with ShardkitError, not
    parsed into some other position (which silently changes where reads go)."""
    with pytest.raises(shardkit.ShardkitError, match="token"):
        env.Session(consistency_token=bad)


# -- 4. bad per-query / per-scope lag limits ---------------------------------------------------


def test_bad_lag_limits_per_statement_and_scope_are_clear_errors(env):
    """A lag limit given as a string or negative number is refused with an ArgumentError /
    ValueError / ShardkitError (as unknown roles are, and as the config file refuses them),
    never a TypeError from deep in replica selection nor silently routed."""
    k = env.key("s0")
    _seed(env, {k: "lag"})
    stmt = select(Acct.name).where(Acct.id == k)
    clear = (sa_exc.ArgumentError, ValueError, shardkit.ShardkitError)
    problems = []
    for opts in ({"shardkit_max_lag_seconds": "5"}, {"shardkit_max_lag_bytes": "1024"},
                 {"shardkit_max_lag_seconds": -1}, {"shardkit_max_lag_bytes": -1}):
        with env.Session() as s:
            try:
                s.execute(stmt, execution_options=opts).scalar()
                problems.append(f"{opts}: accepted")
            except clear:
                pass
            except Exception as e:  # noqa: BLE001
                problems.append(f"{opts}: {type(e).__name__}: {e}")
    for kw in ({"max_lag_seconds": "5"}, {"max_lag_bytes": -5}):
        try:
            with shardkit.scope(**kw), env.Session() as s:
                s.execute(stmt).scalar()
            problems.append(f"scope{kw}: accepted")
        except clear:
            pass
        except Exception as e:  # noqa: BLE001
            problems.append(f"scope{kw}: {type(e).__name__}: {e}")
    assert not problems, problems


# -- 5. explicit transaction that reads, then writes, then lazy loads ---------------------------


def test_explicit_transaction_reads_replica_until_it_writes_then_lazy_loads_see_the_write(env):
    k0, k1 = env.key("s0"), env.key("s1")
    _seed(env, {k0: "a", k1: "b"})
    with env.Session(consistency="eventual") as s, s.begin():
        n0 = len(env.served)
        a = s.get(Acct, k0)
        assert env.nodes_since(n0)[0].startswith("s0/r")
        assert list(a.notes) == []
        assert all(n.startswith("s0/r") for n in env.nodes_since(n0)), env.nodes_since(n0)
        a.notes.append(Note(id=1, body="fresh"))
        a.name = "a2"
        s.flush()
        s.expire(a)
        n1 = len(env.served)
        assert a.name == "a2" and [n.body for n in a.notes] == ["fresh"]
        assert s.execute(select(Acct.name).where(Acct.id == k1)).scalar() == "b"
        nodes = env.nodes_since(n1)
        assert [n for n in nodes if n.startswith("s0/")] and \
            all(n == "s0/primary" for n in nodes if n.startswith("s0/")), nodes
        assert [n for n in nodes if n.startswith("s1/")] == [nodes[-1]] and nodes[-1].startswith("s1/r"), nodes
        # savepoint rolled back: the shard stays pinned to its primary
        with s.begin_nested() as sp:
            s.get(Acct, k0).name = "a3"
            s.flush()
            sp.rollback()
        n2 = len(env.served)
        s.expire_all()
        assert s.get(Acct, k0).name == "a2"
        assert env.nodes_since(n2) == ["s0/primary"]
    assert env.primary_value(k0) == "a2"


# -- 6. threads, one session each: read-your-writes with tokens ---------------------------------


def test_threads_each_with_a_session_always_read_their_own_writes(env):
    """Eight threads, each its own sessions on its own rows: write, commit, read back in the
    same session and in a fresh session given the token.  Never a stale value; the waits
    for tokens send many of those reads to replicas."""
    cluster = _make_cluster(env.dev, wait_for_token=2.0)
    served: list[tuple[float, str, str]] = []
    _instrument(cluster, served)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    keys = [env.key("s0" if i % 2 else "s1") for i in range(8)]
    _seed(env, {k: "0" for k in keys})
    stale: list[tuple[int, str, Any]] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(1, 13):
                with Session() as s:
                    s.get(Acct, k).name = str(i)
                    s.commit()
                    got = s.execute(select(Acct.name).where(Acct.id == k)).scalar()
                    if got != str(i):
                        stale.append((k, str(i), got))
                    token = s.consistency_token()
                with Session(consistency_token=token) as s2:
                    got = s2.execute(select(Acct.name).where(Acct.id == k)).scalar()
                    if got != str(i):
                        stale.append((k, str(i), got))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert not stale, stale[:5]
        assert all(env.primary_value(k) == "12" for k in keys)
        reads = [node for _, node, st in served if "hf_" in st and st.lstrip().upper().startswith("SELECT")]
        assert any("/r" in n for n in reads), "no read reached a replica: the test proves nothing"
    finally:
        cluster.dispose()


# -- 7. primary SIGKILLed: writes fail fast naming it, replicas still serve ----------------------


def test_primary_sigkilled_writes_fail_naming_shard_while_replica_reads_and_other_shard_go_on(env):
    k0, k1 = env.key("s0"), env.key("s1")
    _seed(env, {k0: "p0", k1: "p1"})
    primary = env.dev.shard("s1").primary
    with env.Session() as s:  # warm pooled connections to the primary
        s.get(Acct, k1).name = "p1"
        s.commit()
    primary.kill()
    try:
        wait_for(lambda: health_by_node(env.cluster)["s1/primary"]["up"] is False, 5, "s1/primary seen down")
        h = env.cluster.health()
        assert h.ready is False
        with env.Session() as s:
            s.get(Acct, k1).name = "lost"
            with pytest.raises(shardkit.ShardUnavailable) as ei:
                s.commit()
        assert ei.value.shard == "s1" and "s1" in str(ei.value)
        with env.Session() as s, pytest.raises(shardkit.ShardUnavailable) as ei:
            s.execute(text("UPDATE hf_accounts SET name = 'x' WHERE id = :k")
                      .bindparams(k=k1).execution_options(shardkit_shard="s1"))
        assert ei.value.shard == "s1"
        n0 = len(env.served)
        with env.Session() as s:
            assert s.execute(select(Acct.name).where(Acct.id == k1)).scalar() == "p1"
            s.get(Acct, k0).name = "p0b"
            s.commit()
        nodes = env.nodes_since(n0)
        assert [n for n in nodes if n.startswith("s1/")] and \
            all(n.startswith("s1/r") for n in nodes if n.startswith("s1/")), nodes
        assert env.primary_value(k0) == "p0b"
    finally:
        primary.start()
        wait_for(lambda: health_by_node(env.cluster)["s1/primary"]["up"], 10, "s1/primary back")
        # Pooled connections died with the server: drop them so later tests start clean
        # (what the first write after a restart meets is the next test's subject).
        env.cluster.primary("s1").dispose()
    assert env.primary_value(k1) == "p1"


def test_first_write_after_primary_restart_succeeds_once_health_says_ready(env):
    """The primary restarts (a crash, a minor upgrade): once the monitor has seen it down
    and up again and health().ready is true, a write must succeed.  Without pre_ping the
    pool still holds connections to the old server process; the monitor knows the node
    was down, so they must not be handed to the next write."""
    k = env.key("s0")
    _seed(env, {k: "r0"})
    primary = env.dev.shard("s0").primary
    with env.Session() as s:               # leaves warm connections in the primary's pool
        s.get(Acct, k).name = "r1"
        s.commit()
    primary.stop()
    wait_for(lambda: health_by_node(env.cluster)["s0/primary"]["up"] is False, 5, "s0/primary seen down")
    primary.start()
    wait_for(lambda: health_by_node(env.cluster)["s0/primary"]["up"] and env.cluster.health().ready,
              10, "s0/primary seen up and the cluster ready")
    try:
        with env.Session() as s:
            s.get(Acct, k).name = "r2"
            s.commit()
        assert env.primary_value(k) == "r2"
    finally:
        env.cluster.primary("s0").dispose()


# -- 7a. health(): pool use, lag and bans as they happen -----------------------------------------


def test_health_reports_pool_use_of_an_open_stream_lag_and_ban_reason(env):
    k = env.key("s1")
    _seed(env, {k: "h"})
    with env.Session(consistency="eventual") as s:
        n0 = len(env.served)
        res = s.execute(select(Acct.id).where(Acct.id == k).execution_options(yield_per=1))
        node = env.nodes_since(n0)[0]
        assert node.startswith("s1/r")
        h = health_by_node(env.cluster)[node]
        assert h["role"] == "replica" and h["up"] is True and h["pool"]["checkedout"] >= 1, h
        assert res.scalars().all() == [k]
    s.close()
    assert health_by_node(env.cluster)[node]["pool"]["checkedout"] == 0
    r = env.replica("s1", int(node[-1]))
    r.set_apply_delay(30)
    try:
        with env.Session() as s:
            s.get(Acct, k).name = "h2"
            s.commit()
        wait_for(lambda: (health_by_node(env.cluster)[node]["lag_bytes"] or 0) > 0, 5, f"{node} lag seen")
        with env.Session(consistency="eventual") as s:
            n0 = len(env.served)
            assert s.execute(select(Acct.name).where(Acct.id == k)
                             .execution_options(shardkit_max_lag_bytes=0)).scalar() == "h2"
            assert node not in env.nodes_since(n0), env.nodes_since(n0)
    finally:
        r.set_apply_delay(0)
        env.caught_up(("s1",))
    env.cluster.selector.monitor.ban("s1", int(node[-1]), "test ban", seconds=30)
    try:
        h = health_by_node(env.cluster)[node]
        assert h["banned_for_s"] > 20 and h["ban_reason"] == "test ban", h
        with env.Session(consistency="eventual") as s:
            n0 = len(env.served)
            for _ in range(4):
                s.execute(select(Acct.name).where(Acct.id == k)).scalar()
                s.commit()
            assert node not in env.nodes_since(n0)
    finally:
        env.cluster.selector.monitor.ban("s1", int(node[-1]), "unban", seconds=0)
    assert health_by_node(env.cluster)[node]["ban_reason"] is None


# -- 7b. locking reads forced to a replica ------------------------------------------------------


def test_locking_reads_forced_to_replica_still_run_on_primary_and_pin_the_shard(env):
    """FOR UPDATE / FOR SHARE cannot run on a hot standby; forcing them to a replica (option
    or scope) must not send them there, and the rest of the transaction stays on the primary
    even for reads forced to replicas; after commit, reads go back to replicas."""
    k = env.key("s1")
    _seed(env, {k: "lock"})
    base = select(Acct.name).where(Acct.id == k)
    for lock in (base.with_for_update(), base.with_for_update(read=True),
                 base.with_for_update(skip_locked=True)):
        with env.Session(consistency="eventual") as s:
            n0 = len(env.served)
            assert s.execute(lock.execution_options(shardkit_role="replica")).scalar() == "lock"
            with shardkit.scope(role="replica"):
                assert s.execute(base).scalar() == "lock"
                assert s.get(Acct, k).name == "lock"
            assert set(env.nodes_since(n0)) == {"s1/primary"}, env.nodes_since(n0)
            s.commit()
            n1 = len(env.served)
            assert s.execute(base).scalar() == "lock"
            assert env.nodes_since(n1)[0].startswith("s1/r"), env.nodes_since(n1)


# -- 7c. a forced-replica read cancelled by a recovery conflict --------------------------------


def test_forced_replica_read_cancelled_by_recovery_conflict_never_runs_on_primary(env):
    """shardkit_role='replica' (e.g. a heavy report kept off the primary) is cancelled by
    its replica because WAL replay conflicts with it.  Both replicas of the shard are
    healthy: the read may be retried on a replica or fail with ShardUnavailable, but a
    read forced to replicas must never run on the primary."""
    k = env.key("s0")
    _seed(env, {k: "conflict"})
    reps = env.dev.shard("s0").replicas
    slow = (select(Acct.name, func.length(cast(func.pg_sleep(1.5), Text))).where(Acct.id == k)
            .execution_options(shardkit_role="replica"))

    def set_delay(value: str) -> None:
        for r in reps:
            with r.connect() as c:
                c.execute(f"ALTER SYSTEM SET max_standby_streaming_delay = {value}")
                c.execute("SELECT pg_reload_conf()")

    result: dict[str, Any] = {}

    def read() -> None:
        try:
            with env.Session(consistency="eventual") as s:
                result["rows"] = [tuple(r) for r in s.execute(slow).all()]
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    set_delay("0")
    n0 = len(env.served)
    try:
        def applied() -> bool:
            for r in reps:
                with r.connect() as c:
                    if c.execute("SHOW max_standby_streaming_delay").fetchone()[0] != "0":
                        return False
            return True

        wait_for(applied, 5, "max_standby_streaming_delay = 0")
        t = threading.Thread(target=read, daemon=True)
        t.start()

        def running() -> bool:
            for r in reps:
                with r.connect() as c:
                    if c.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                 "AND query LIKE '%pg_sleep%hf_accounts%'").fetchone()[0]:
                        return True
            return False

        wait_for(running, 10, "the read to run on a replica")
        with env.dev.shard("s0").primary.connect(autocommit=False) as c:
            c.execute("LOCK TABLE hf_accounts IN ACCESS EXCLUSIVE MODE")
            c.commit()
        t.join(20)
        assert not t.is_alive()
    finally:
        set_delay("DEFAULT")
    nodes = [n for _, n, st in env.served[n0:] if "pg_sleep" in st]
    assert "s0/primary" not in nodes, f"a read forced to replicas ran on the primary: {nodes}"
    if "error" in result:
        assert isinstance(result["error"], shardkit.ShardUnavailable), repr(result["error"])[:300]
    else:
        assert result["rows"] == [("conflict", 0)]


# -- 8. passwords carried in the URL's query string ---------------------------------------------


def test_password_in_url_query_never_shown(env, caplog):
    """libpq (and so a SQLAlchemy URL) also takes the password as ?password=...; the mask
    knows it.  Engines, health, errors and logs must not show it either."""
    caplog.set_level(logging.DEBUG)
    cfg = env.dev.config_dict()
    dead = "postgresql+psycopg://shardkit@127.0.0.1:9/shardkit"
    for sh in cfg["shards"]:
        sh["primary"] += f"?password={PASSWORD}"
        sh["replicas"] = [u + f"?password={PASSWORD}" for u in sh["replicas"]] + [dead + f"?password={PASSWORD}"]
    cluster = shardkit.Cluster.from_config({**cfg, "groups": GROUPS,
                                            "replicas": {"poll_interval": 0.1, "ban_seconds": 1.0}})
    texts: list[str] = []
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        k = env.key("s0")
        _seed(env, {k: "pw"})
        for _ in range(3):
            with Session(consistency="eventual") as s:
                assert s.execute(select(Acct.name).where(Acct.id == k)).scalar() == "pw"
        wait_for(lambda: health_by_node(cluster)["s0/r2"]["up"] is False and health_by_node(cluster)["s0/r2"]["error"],
                  5, "the dead replica to be seen down")
        texts.append(repr(cluster.health().as_dict()))
        with pytest.raises(shardkit.ShardUnavailable) as ei:
            with cluster.engine("s0", "replica", 2).connect() as c:
                c.exec_driver_sql("SELECT 1")
        texts += [str(ei.value), repr(ei.value)]
        texts += [repr(cluster), repr(cluster.config), str(cluster.config.shards)]
        for i in range(3):
            texts.append(repr(cluster.engine("s0", "replica", i)))
        texts.append(repr(cluster.primary("s0")))
    finally:
        cluster.dispose()
    texts.append(caplog.text)
    leaks = [t[:300] for t in texts if PASSWORD in t]
    assert not leaks, leaks


# -- 9. a replica promoted under us (last: it cannot rejoin) ------------------------------------


def test_promoted_replica_gets_no_more_reads(env):
    """s1/r1 is promoted (a failover tool did it, or an operator by mistake): it no longer
    follows the primary, so it must get no reads, whatever the mode, and health shows it
    out of recovery; s1/r0 and the primary keep serving fresh data."""
    k = env.key("s1")
    _seed(env, {k: "before"})
    r1 = env.replica("s1", 1)
    with r1.connect() as c:
        c.execute("SELECT pg_promote(true, 30)")
    wait_for(lambda: health_by_node(env.cluster)["s1/r1"]["in_recovery"] is False, 5, "r1 seen promoted")
    with env.Session() as s:
        s.get(Acct, k).name = "after"
        s.commit()
    env.replica("s1", 0).wait_caught_up()
    n0 = len(env.served)
    for consistency in ("eventual", "read_your_writes"):
        for _ in range(6):
            with env.Session(consistency=consistency) as s:
                assert s.execute(select(Acct.name).where(Acct.id == k)).scalar() == "after"
    with env.Session() as s:
        for _ in range(4):
            assert s.execute(select(Acct.name).where(Acct.id == k)
                             .execution_options(shardkit_role="replica")).scalar() == "after"
    nodes = env.nodes_since(n0)
    assert "s1/r1" not in nodes and "s1/r0" in nodes, nodes
