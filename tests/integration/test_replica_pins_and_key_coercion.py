"""Replica read pinning, the monitor's pool renewal and lag estimate, key coercion and
upsert routing, on a real 2-shard x
2-replica PostgreSQL cluster of this module's own.

Where a statement ran is taken from engine events; placement is checked on the servers.
Each test restores what it changes (apply delays, bans).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, bindparam, column, event, insert, select, table, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._replicas import NodeHealth

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "hr_acct"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")


class Tag(Base):
    __tablename__ = "hr_tag"
    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    note: Mapped[str] = mapped_column(String(40), default="")


GROUPS = {
    "acct": {"strategy": "hash", "tables": {"hr_acct": "id"}},
    "tag": {"strategy": "hash", "tables": {"hr_tag": "code"}},
}


def _config(dev: Any, **extra: Any) -> dict[str, Any]:
    return {**dev.config_dict(), "groups": GROUPS,
            "replicas": {"poll_interval": 0.05, "max_lag_seconds": 300.0, "ban_seconds": 3.0},
            **extra}


@dataclass
class Env:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker
    served: list[tuple[str, str]]

    def nodes_since(self, n0: int) -> list[str]:
        return [node for node, st in self.served[n0:] if "hr_" in st]

    def key_on(self, model: Any, shard: str, start: int = 1) -> int:
        return next(k for k in range(start, 100_000) if self.cluster.shard_for(model, k) == shard)

    def rows(self, shard: str, sql: str) -> list[tuple[Any, ...]]:
        with self.dev.shard(shard).primary.connect() as c:
            return [tuple(r) for r in c.execute(sql).fetchall()]

    def caught_up(self) -> None:
        for s in self.dev.shards:
            with s.primary.connect() as c:
                c.execute("SELECT txid_current()")
            for r in s.replicas:
                r.wait_caught_up()


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=2)
    cluster = shardkit.Cluster.from_config(_config(dev), metadata=Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    served: list[tuple[str, str]] = []
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k: served.append((node, st)))
    cluster.start_monitor()
    e = Env(dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served)
    e.caught_up()
    yield e
    cluster.dispose()


@pytest.fixture
def kit(env):
    for s in env.dev.shards:
        with s.primary.connect() as c:
            c.execute("TRUNCATE hr_acct, hr_tag")
    yield env
    mon = env.cluster.selector.monitor
    for state in mon.shards.values():
        for r in state.replicas:
            r.banned_until = 0.0
    for s in env.dev.shards:
        for r in s.replicas:
            if not r.is_running():
                r.start()
            r.set_apply_delay(0)
    env.caught_up()


# -- 1. replica read pinning ------------------------------------------------------------------


def test_forced_replica_read_repins_later_default_reads_onto_a_staler_replica(kit):
    """README: once the transaction's replica becomes unusable, the shard's reads go to the
    primary for the rest of the transaction; "only a read forced with
    shardkit_role='replica' reads a replica after that, accepting its staleness".  A
    forced-replica read moves the pin to the other (staler) replica, and the next plain
    read is served there: it returns an older value than the transaction already saw."""
    k = kit.key_on(Acct, "s0")
    with kit.Session() as s:
        s.add(Acct(id=k, name="v1"))
        s.commit()
    kit.caught_up()
    stmt = select(Acct.name).where(Acct.id == k)
    s = kit.Session(consistency="eventual")
    try:
        s.begin()
        n0 = len(kit.served)
        assert s.execute(stmt).scalar() == "v1"
        first = kit.nodes_since(n0)
        assert len(first) == 1 and first[0].startswith("s0/r"), first
        a_idx = int(first[0][-1])
        a, b = kit.dev.shard("s0").replicas[a_idx], kit.dev.shard("s0").replicas[1 - a_idx]
        b.set_apply_delay(60)
        with kit.dev.shard("s0").primary.connect() as c:
            c.execute("UPDATE hr_acct SET name = 'v2' WHERE id = %s", (k,))
        a.wait_caught_up()
        assert s.execute(stmt).scalar() == "v2"          # the pinned replica, newer data
        # The transaction's replica becomes unusable (banned, as after a failed read).
        kit.cluster.selector.monitor.ban("s0", a_idx, "test ban", seconds=60)
        forced = s.execute(stmt, execution_options={"shardkit_role": "replica"}).scalar()
        assert forced == "v1"                             # accepted staleness, from b
        n0 = len(kit.served)
        value = s.execute(stmt).scalar()
        assert value == "v2", (
            f"a plain read after a forced-replica read went back in time: {value!r} from "
            f"{kit.nodes_since(n0)} (the transaction had already read 'v2')")
    finally:
        s.close()


# -- 2. the monitor's pool renewal --------------------------------------------------------------


def test_failed_monitor_poll_renews_pool_of_a_node_that_never_restarted(kit):
    """The monitor replaces a node's pool when it sees it "back up" after any failed
    poll, even when the server never restarted (same pg_postmaster_start_time()).
    Connections in use stay open but leave the pool's count, so the process then holds
    more connections to the node than `max_connections` allows (README: it caps the
    connections of the node's pool in this process)."""
    app = "hr-capped-app"
    cfg = _config(kit.dev, pool={"size": 1, "max_overflow": 0, "max_connections": 1, "timeout": 1})
    cl = shardkit.Cluster.from_config(cfg, engine_options={"connect_args": {"application_name": app}})
    primary = kit.dev.shard("s0").primary
    try:
        cl.start_monitor()
        eng = cl.primary("s0")
        held = eng.connect()
        held.exec_driver_sql("SELECT 1")
        pool_before = eng.pool
        with primary.connect() as c:   # the monitor's connection drops (the server stays up)
            start0 = c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'shardkit-monitor'")
        deadline = time.monotonic() + 3
        while eng.pool is pool_before and time.monotonic() < deadline:
            time.sleep(0.02)
        second = None
        try:
            second = eng.connect()
            second.exec_driver_sql("SELECT 1")
        except sa_exc.TimeoutError:
            pass  # the cap held
        with primary.connect() as c:
            assert c.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == start0
            n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                          (app,)).fetchone()[0]
        held.close()
        if second is not None:
            second.close()
        assert n <= 1, (f"{n} connections of this process to s0/primary with max_connections = 1: "
                        "the pool was replaced although the server never restarted")
    finally:
        cl.dispose()


# -- 3. the lag estimator's history --------------------------------------------------------------


def test_primary_position_history_is_read_while_the_primary_thread_trims_it(kit):
    """_ShardState.history is appended and trimmed by the primary's poll thread while every
    replica's poll thread runs _update_lag -> last_seen_at_or_before() without a lock:
    bisect picks an index, the list is trimmed, the index is gone (IndexError).  In the
    monitor that error is caught by the poll loop, which marks a healthy replica down
    (and then renews its pool).  Driven here on a shard state of its own, with the
    monitor's own _update_lag."""
    mon = kit.cluster.selector.monitor
    live = mon.shards["s0"]
    primary = NodeHealth("s0", "s0/primary", "primary", 0)
    replicas = [NodeHealth("s0", f"s0/r{i}", "replica", i) for i in range(2)]
    for r in replicas:
        r.up, r.replay_timestamp_age = True, 1.0
    state = type(live)(primary, replicas, (1.0, 1.0))
    errors: list[BaseException] = []
    stop = threading.Event()

    def primary_thread() -> None:
        lsn = 1 << 24
        while not stop.is_set():
            lsn += 1
            primary.wal_lsn = lsn
            state.note_primary_position(time.monotonic(), lsn)
            for r in replicas:
                r.wal_lsn = lsn - 1   # a caught-up replica a moment behind

    def replica_thread() -> None:
        while not stop.is_set():
            try:
                mon._update_lag(state)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=primary_thread)] + [threading.Thread(target=replica_thread)
                                                              for _ in range(2)]
    try:
        for t in threads:
            t.start()
        stop.wait(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    assert not errors, f"_update_lag raised while the history was trimmed: {errors[0]!r}"


def test_restarted_delayed_replica_reports_zero_lag_seconds(kit):
    """After a replica restarts, pg_last_xact_replay_timestamp() is NULL until it replays a
    commit; with a byte gap the estimator takes min(age or 0, since) = 0 s, although the
    history says when the primary was last at the replica's position.  A replica missing
    a commit for seconds then passes a 1 s lag limit and serves the stale read."""
    sh = kit.dev.shard("s0")
    r1 = sh.replicas[1]
    k = kit.key_on(Acct, "s0")
    with sh.primary.connect() as c:
        c.execute("CHECKPOINT")
    r1.wait_caught_up()
    with r1.connect() as c:
        c.execute("CHECKPOINT")        # restartpoint: a restart replays from here
    r1.set_apply_delay(60)
    with sh.primary.connect() as c:
        c.execute("INSERT INTO hr_acct (id, name) VALUES (%s, 'new')", (k,))
    written = time.monotonic()
    r1.stop()
    r1.start()
    mon = kit.cluster.selector.monitor
    node = mon.shards["s0"].replicas[1]
    deadline = time.monotonic() + 10
    while not (node.up and node.lag_bytes) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(0.0, written + 2.5 - time.monotonic()))
    with r1.connect() as c:
        assert c.execute("SELECT count(*) FROM hr_acct WHERE id = %s", (k,)).fetchone()[0] == 0
        age = c.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0]
    mon.ban("s0", 0, "test ban: leave only r1", seconds=60)
    stmt = select(Acct.name).where(Acct.id == k)
    served = None
    try:
        with kit.Session(consistency="eventual") as s:
            n0 = len(kit.served)
            value = s.execute(stmt, execution_options={"shardkit_role": "replica",
                                                       "shardkit_max_lag_seconds": 1}).scalar()
            served = kit.nodes_since(n0)
    except shardkit.ShardUnavailable:
        return  # no replica within 1 s: right
    assert False, (f"a read limited to 1 s of lag was served by {served} (value {value!r}), "
                   f"which has missed a commit for {time.monotonic() - written:.1f} s; the monitor "
                   f"reports lag_seconds={node.lag_seconds}, lag_bytes={node.lag_bytes} "
                   f"(replay timestamp {age})")


# -- 4. key coercion --------------------------------------------------------------------------


def test_text_key_given_as_int_is_written_where_its_text_is_not_found(kit):
    """A String shard-key column given an int (Tag(code=5)): PostgreSQL stores '5', but the
    router hashes the int 5, so the row lands on a shard that reads by '5' never visit.
    The commit reads keys "in their column's type" for uuid and int columns only; a text
    key given as int must be refused (as an int column given '5' is) or hashed as text."""
    router = kit.cluster.router
    # an int whose int hash (what an int-keyed table of the same strategy gets) and text
    # hash differ
    n = next(i for i in range(1, 1000) if router.shard_for(Acct, i) != router.shard_for(Tag, str(i)))
    owner = kit.cluster.shard_for(Tag, str(n))
    try:
        with kit.Session() as s:
            s.add(Tag(code=n, note="int"))   # type: ignore[arg-type]
            s.commit()
    except shardkit.ShardKeyError:
        return  # refused: fine
    placed = {sh: [r[0] for r in kit.rows(sh, "SELECT code FROM hr_tag")] for sh in ("s0", "s1")}
    assert placed[owner] == [str(n)], (
        f"tag {str(n)!r} (owned by {owner}) was stored as {placed}; "
        f"session.get(Tag, {str(n)!r}) will not find it")


def test_router_keeps_every_insert_table_object_alive(kit):
    """Router._table_coercers caches key coercers per Table object, unbounded and by strong
    reference: every lightweight table() an insert is routed for stays alive for the life
    of the cluster (a select over the same table() does not), so an application that
    builds table() per request grows without limit.  (Routed with explain(): executing
    also puts the statement in SQLAlchemy's bounded compiled cache.)"""
    k = kit.key_on(Acct, "s1")
    refs = []
    for kind in ("select", "insert"):
        t = table("hr_acct", column("id"), column("name"))
        refs.append(weakref.ref(t))
        stmt = (select(t).where(t.c.id == k) if kind == "select"
                else insert(t).values(id=k, name="light"))
        assert kit.cluster.explain(stmt).shards == ("s1",)
        del t, stmt
    gc.collect()
    alive = {kind: ref() is not None for kind, ref in zip(("select", "insert"), refs)}
    assert alive == {"select": False, "insert": False}, (
        f"table() objects still referenced after routing: {alive} (Router._table_coercers)")


# -- 5. upserts that move the shard key ------------------------------------------------------------


def test_upsert_moving_the_key_through_a_named_bind_parameter_is_not_refused(kit):
    """"An upsert that moves the shard key is refused": the SET value is read from the
    bind parameter's default (_bound(v, _EMPTY)), not from the call's parameters that
    SQLAlchemy executes with, so ON CONFLICT DO UPDATE SET id = :nid with nid owned by
    another shard runs and leaves the row on s0 under a key s1 owns."""
    k0, k1 = kit.key_on(Acct, "s0"), kit.key_on(Acct, "s1")
    with kit.Session() as s:
        s.add(Acct(id=k0, name="orig"))
        s.commit()
    stmt = pg_insert(Acct.__table__).values(id=bindparam("iid"), name="up")
    stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"id": bindparam("nid", value=k0)})
    with kit.Session() as s:
        try:
            s.execute(stmt, {"iid": k0, "nid": k1})
            s.commit()
        except shardkit.CrossShardWriteError:
            s.rollback()
    on_s0 = [r[0] for r in kit.rows("s0", "SELECT id FROM hr_acct")]
    assert k1 not in on_s0, (f"upsert moved acct {k0} to key {k1} (owned by s1) but the row "
                             "stayed on s0")


def test_orm_upsert_with_parameters_loses_its_on_conflict_clause(kit):
    """An ORM-enabled upsert executed with parameters goes through _orm_bulk_insert, which
    rebuilds the statement as table.insert(): ON CONFLICT is dropped and the upsert fails
    as a plain INSERT (UniqueViolation).  The commit routes and key-checks ORM upserts
    (_refuse_upsert_key_move), which then never run as upserts.  (Older than the commit.)"""
    k = kit.key_on(Acct, "s1")
    with kit.Session() as s:
        s.add(Acct(id=k, name="orig"))
        s.commit()
    # SQLAlchemy's documented ORM bulk upsert ("ORM Bulk Insert with ON CONFLICT").
    stmt = pg_insert(Acct)
    stmt = stmt.on_conflict_do_update(index_elements=[Acct.id], set_={"name": stmt.excluded.name})
    with kit.Session() as s:
        s.execute(stmt, [{"id": k, "name": "upserted"}])
        s.commit()
    assert kit.rows("s1", "SELECT name FROM hr_acct") == [("upserted",)]


# -- 6. scope(key=) -----------------------------------------------------------------------------


def test_explicit_all_shards_write_inside_scope_key_runs_on_one_shard(kit):
    """README: execution_options(shardkit_all_shards=True) is "for a deliberate key-less write
    ... on every shard".  Inside scope(key=...) the rewritten _route_statement narrows it
    to the scope key's shard anyway (a textual statement with the same option still runs
    everywhere): rows on the other shard are silently left unchanged."""
    k0, k1 = kit.key_on(Acct, "s0"), kit.key_on(Acct, "s1")
    with kit.Session() as s:
        s.add_all([Acct(id=k0, name="old"), Acct(id=k1, name="old")])
        s.commit()
    with kit.Session() as s, shardkit.scope(key=k0):
        s.execute(update(Acct).where(Acct.name == "old").values(name="new"),
                  execution_options={"shardkit_all_shards": True})
        s.commit()
    names = {sh: [r[0] for r in kit.rows(sh, "SELECT name FROM hr_acct")] for sh in ("s0", "s1")}
    assert names == {"s0": ["new"], "s1": ["new"]}, (
        f"a key-less UPDATE with shardkit_all_shards=True inside scope(key=...) left {names}")
