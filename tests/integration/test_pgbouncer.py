"""shardkit behind real PgBouncers in transaction pooling mode (the README's "Behind PgBouncer").

One PgBouncer per node (``pool_mode = transaction``, ``default_pool_size = 2``, so
the many client connections of shardkit's pools really share two server connections),
with PgBouncer's defaults otherwise (no ``ignore_startup_parameters``), and
``prepare_threshold: None`` in the engines' ``connect_args`` as the README says.  Everything
below runs through those PgBouncers; the test data is checked directly on the servers.

Needs the ``pgbouncer`` program (Debian: ``apt-get install pgbouncer``); skipped without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import BigInteger, Integer, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._replicas import HealthMonitor
from shardkit._rebalance_plan import plan_from_maps
from shardkit.devcluster import to_toml
from models import Base, Order, User, groups_config
from pgbouncer_util import PGBOUNCER, PgBouncer

if PGBOUNCER is None:
    pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer); these tests run "
                "shardkit behind a real PgBouncer", allow_module_level=True)

pytestmark = pytest.mark.integration

POOL_SIZE = 2
NO_PREPARE = {"connect_args": {"prepare_threshold": None}}
# What PgBouncer itself SETs on a server connection to match its client (PgBouncer
# 1.18 tracks these): not state an application left behind.
POOLER_TRACKED = ["client_encoding", "datestyle", "timezone", "standard_conforming_strings",
                  "application_name"]
# Session state a server connection can carry from one client to the next.
STATE_SQL = """
SELECT pg_backend_pid(),
       coalesce((SELECT array_agg(name || '=' || setting ORDER BY name) FROM pg_settings
                 WHERE source = 'session' AND lower(name) <> ALL(%(tracked)s)), '{}'),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_prepared_statements WHERE name <> ''),
       -- (the unnamed portal is this query's own)
       (SELECT count(*) FROM pg_cursors WHERE name <> ''),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
"""


def _config(dev, bouncers: dict[str, PgBouncer], **extra) -> dict:
    return {
        "bucket_count": dev.bucket_count,
        "shards": [{"name": s.name, "primary": bouncers[s.primary.name].url,
                    "replicas": [bouncers[r.name].url for r in s.replicas]} for s in dev.shards],
        **groups_config([s.name for s in dev.shards]),
        "replicas": {"poll_interval": 0.1},
        **extra,
    }


def _start_bouncers(dev, **kw) -> dict[str, PgBouncer]:
    started: dict[str, PgBouncer] = {}
    try:
        for shard in dev.shards:
            for node in shard.nodes:
                started[node.name] = PgBouncer(node.port, name=node.name, **kw).start()
    except BaseException:
        for b in started.values():
            b.remove()
        raise
    return started


def _watch(cluster: shardkit.Cluster) -> list[tuple[str, str]]:
    """(node, statement) of every statement run through the cluster's engines, in order."""
    served: list[tuple[str, str]] = []
    for s in cluster.shard_names:
        for i in range(-1, cluster.replica_count(s)):
            eng = cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
            event.listen(eng, "before_cursor_execute",
                         lambda conn, cur, statement, *a, node=eng.info["node"]: served.append((node, statement)))
    return served


def _nodes_reading(served: list[tuple[str, str]], table: str) -> list[str]:
    return [node for node, statement in served if f"FROM {table}" in statement]


@pytest.fixture(scope="module")
def bounced(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    names = [s.name for s in dev.shards]
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    # query_wait_timeout: a client waiting this long for a server connection gets an error
    # (a deadlock fails the test in seconds, not in PgBouncer's default 120 s).
    bouncers = _start_bouncers(dev, pool_size=POOL_SIZE,
                               settings={"query_wait_timeout": 10})
    cluster = None
    try:
        cfg = _config(dev, bouncers)
        cfg_path = tmp_path_factory.mktemp("pgbouncer") / "shardkit.toml"
        cfg_path.write_text(to_toml(cfg))
        cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata, engine_options=NO_PREPARE)
        served = _watch(cluster)
        cluster.start_monitor()
        yield SimpleNamespace(dev=dev, names=names, bouncers=bouncers, cfg=cfg, cfg_path=cfg_path,
                              cluster=cluster, served=served,
                              Session=sessionmaker(class_=shardkit.ShardedSession, cluster=cluster))
    finally:
        if cluster is not None:
            cluster.dispose()
        for b in bouncers.values():
            b.remove()


@pytest.fixture
def env(bounced):
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    for shard in bounced.dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("SET lock_timeout = '10s'")
            c.execute(f"TRUNCATE {tables} CASCADE")
    for shard in bounced.dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()
    bounced.served.clear()
    return bounced


def _direct_ids(env, shard: str, table: str = "users") -> set[int]:
    with psycopg.connect(env.dev.shard(shard).primary.dsn) as c:
        return {r[0] for r in c.execute(f"SELECT id FROM {table}")}


def _server_states(bouncer: PgBouncer) -> list[tuple]:
    """Session state of every server connection behind ``bouncer``: as many clients as
    the pool has server connections, each inside a transaction (so each holds its own)."""
    conns = [bouncer.connect(autocommit=False) for _ in range(POOL_SIZE)]
    try:
        rows = [c.execute(STATE_SQL, {"tracked": POOLER_TRACKED}).fetchone() for c in conns]
    finally:
        for c in conns:
            c.close()
    assert len({r[0] for r in rows}) == POOL_SIZE, rows  # every server connection was seen
    assert bouncer.server_connections() <= POOL_SIZE
    return [r[1:] for r in rows]


def _assert_no_leftover_state(env) -> None:
    clean = ([], 0, 0, 0, 0, 0)
    states = {name: _server_states(b) for name, b in env.bouncers.items()}
    assert all(s == clean for ss in states.values() for s in ss), states


def _wait_until(check, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _run_threads(n: int, fn) -> list[str]:
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001 - collected and asserted on
            errors.append(f"thread {i}: {type(e).__name__}: {str(e)[:300]}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return errors


# -- the leak check itself ------------------------------------------------------------------------


def test_leak_check_sees_a_session_setting_left_on_a_server_connection(env):
    """The check the other tests rely on finds a plain SET that outlives its transaction."""
    b = env.bouncers[env.dev.shards[0].primary.name]
    with b.connect(autocommit=False) as c:
        c.execute("SET work_mem = '7MB'")  # session-level, committed: stays on that server
        c.commit()
    try:
        states = _server_states(b)
        assert sum("work_mem=7168" in s[0] for s in states) == 1, states
    finally:
        b.admin("RECONNECT")  # replaces those server connections once released
    _wait_until(lambda: all(s[0] == [] for s in _server_states(b)), "the reconnected servers")


# -- writes, routed reads, sharing of server connections -----------------------------------------


def test_concurrent_orm_writes_and_routed_reads_share_two_server_connections(env):
    per_thread = 12

    def work(i: int) -> None:
        ids = range(i * 1000, i * 1000 + per_thread)
        for k in ids:
            with env.Session() as s:
                s.add(User(id=k, name=f"u{k}"))
                s.add(Order(id=k, user_id=k, amount=k % 7))
                s.commit()
                token = s.consistency_token()
            with env.Session(consistency_token=token) as s:  # another session, as another request
                u = s.get(User, k)
                assert u is not None and u.name == f"u{k}" and [o.id for o in u.orders] == [k]

    errors = _run_threads(16, work)
    assert not errors, errors[:5]
    expected = {i * 1000 + j for i in range(16) for j in range(per_thread)}
    got = {}
    for shard in env.names:
        got[shard] = _direct_ids(env, shard)
        assert got[shard] == {k for k in expected if env.cluster.shard_for("users", k) == shard}
        assert _direct_ids(env, shard, "orders") == got[shard]
    assert all(got.values())  # both shards took writes
    # Many client connections, two server connections: they really were shared.
    for shard in env.dev.shards:
        b = env.bouncers[shard.primary.name]
        clients = [c for c in b.show("CLIENTS") if c["database"] == "shardkit"]
        assert len(clients) > POOL_SIZE and b.server_connections() <= POOL_SIZE
    _assert_no_leftover_state(env)


# -- replicas: the monitor, lag, read-your-writes ------------------------------------------------


def test_health_monitor_measures_nodes_and_lag_through_pgbouncer(env):
    cluster, dev = env.cluster, env.dev
    health = cluster.health()
    assert health.ready, health.nodes
    for n in health.nodes:
        assert n["up"] and n["error"] is None, n
        assert n["in_recovery"] is (n["role"] == "replica"), n
    replica = dev.shards[0].replicas[0]
    key = next(k for k in range(10**6) if cluster.shard_for("users", k) == dev.shards[0].name)

    def lagging():
        n = next(n for n in cluster.health().nodes if n["node"] == f"{replica.shard}/r0")
        return n if n["up"] and (n["lag_bytes"] or 0) > 0 else None

    replica.set_apply_delay(2.0)
    try:
        with env.Session() as s:
            s.add(User(id=key, name="delayed"))
            s.commit()
            token = s.consistency_token()
        seen = _wait_until(lagging, "the monitor to see the delayed replica's byte lag", 5)
        assert seen["lag_seconds"] is not None
        env.served.clear()
        # The token's holder reads its write (the replica has not replayed it: the primary)...
        with env.Session(consistency_token=token) as s:
            assert s.get(User, key).name == "delayed"
        assert _nodes_reading(env.served, "users") == [f"{replica.shard}/primary"]
        env.served.clear()
        # ... an eventual read goes to the replica, which has not.
        with env.Session(consistency="eventual") as s:
            assert s.get(User, key) is None
        assert _nodes_reading(env.served, "users") == [f"{replica.shard}/r0"]
    finally:
        replica.set_apply_delay(0)
    replica.wait_caught_up()
    _wait_until(lambda: lagging() is None, "the lag to go back to zero", 5)
    env.served.clear()
    with env.Session(consistency_token=token) as s:
        assert s.get(User, key).name == "delayed"
    assert _nodes_reading(env.served, "users") == [f"{replica.shard}/r0"]  # caught up: the token lets the replica serve


def test_status_json_through_pgbouncer(env):
    with env.Session() as s:
        s.add_all([User(id=k, name="s") for k in range(40)])
        s.commit()
    r = subprocess.run([sys.executable, "-m", "shardkit.cli", "status", "--config", str(env.cfg_path),
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["ready"] is True
    nodes = [n for s in data["shards"] for n in s["nodes"]]
    assert len(nodes) == 4
    for n in nodes:
        assert n["up"] and n["error"] is None and n["connections"] >= 1, n
        if n["role"] == "replica":
            assert n["lag_bytes"] is not None, n
    assert all(s["rows_estimate"] is not None for s in data["shards"])


# -- cross-shard reads ---------------------------------------------------------------------------


def _seed(env, n: int = 300) -> None:
    with env.Session() as s:
        s.add_all([User(id=k, name=f"u{k:04d}") for k in range(n)])
        s.add_all([Order(id=k, user_id=k, amount=k % 10) for k in range(n)])
        s.commit()
    for shard in env.dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()


def _scatter_reads(Session, i: int) -> None:
    with Session() as s:
        ids = s.execute(select(User.id).order_by(User.id.desc()).limit(5).offset(i)).scalars().all()
        assert ids == list(range(299 - i, 294 - i, -1))
        assert s.execute(select(func.count(), func.sum(Order.amount))).one() == (300, 1350)
        streamed = [u.id for u in s.execute(
            select(User).order_by(User.id).execution_options(yield_per=7)).scalars()]
        assert streamed == list(range(300))
    with Session() as s:
        # A stream left after a few rows: its cursor and transaction must go with the session.
        part = s.execute(select(User).order_by(User.id).execution_options(yield_per=5)).scalars()
        assert [next(part).id for _ in range(3)] == [0, 1, 2]


def test_concurrent_scatter_and_streamed_scatter(env):
    """Ordered, aggregated and streamed (``yield_per``: server-side cursors, which need a
    transaction) cross-shard reads from 12 threads over two server connections per node:
    on the replicas (autocommit, and a READ COMMITTED transaction for each stream), then
    once on the primaries (the session's transaction; concurrent scatters there are
    test_concurrent_scatters_in_transactions_do_not_deadlock_pgbouncer's subject)."""
    _seed(env)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster, consistency="eventual")
    errors = _run_threads(12, lambda i: [_scatter_reads(Session, i) for _ in range(4)])
    assert not errors, errors[:5]
    assert Counter(_nodes_reading(env.served, "users")).keys() == {f"{s}/r0" for s in env.names}
    env.served.clear()
    _scatter_reads(sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster, consistency="strong"), 3)
    assert Counter(_nodes_reading(env.served, "users")).keys() == {f"{s}/primary" for s in env.names}
    _assert_no_leftover_state(env)


@pytest.mark.parametrize("consistency", ["eventual", "strong"])
def test_scatter_timeout_cancels_and_leaves_no_setting_behind(env, consistency):
    _seed(env, 20)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster, consistency=consistency)
    with Session() as s:
        with pytest.raises(shardkit.ScatterError) as ei:
            s.execute(select(User.id, func.pg_sleep(3)).where(User.id < 2)
                      .execution_options(shardkit_timeout=0.3)).all()
    assert set(ei.value.failures) == set(env.names)
    assert all("no answer within 0.3 s" in str(e) for e in ei.value.failures.values()), ei.value.failures

    # The cancel reached the servers: no pg_sleep is left running on any node.
    def sleeping() -> bool:
        n = 0
        for shard in env.dev.shards:
            for node in shard.nodes:
                with psycopg.connect(node.dsn, autocommit=True) as c:
                    n += c.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep%%' "
                                   "AND state = 'active' AND pid <> pg_backend_pid()").fetchone()[0]
        return n == 0

    _wait_until(sleeping, "the cancelled queries to stop", 2.5)
    # Other clients of the same PgBouncers: no statement_timeout, no stray cancel.
    for b in env.bouncers.values():
        with b.connect() as c:
            assert c.execute("SHOW statement_timeout").fetchone()[0] == "0"

    def quick(i: int) -> None:
        for _ in range(10):
            with env.Session(consistency=consistency) as s:
                assert s.execute(select(func.count(User.id))).scalar_one() == 20

    assert not _run_threads(8, quick)
    _assert_no_leftover_state(env)


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
def test_scatter_timeout_holds_while_pgbouncer_queues_the_query(env, consistency):
    """``shardkit_timeout`` bounds a shard whose query waits in PgBouncer's queue for a server.

    PgBouncer (1.18, and later versions as of 2025, pgbouncer/pgbouncer#1222) drops the
    cancel request of a client that has no server connection yet, so cancelling does not
    end the wait: shardkit shuts that connection's socket down and never uses it again.
    On the primary (the session's transaction) and on a replica (autocommit: the session's
    next read there starts on a fresh connection).
    """
    _seed(env, 20)
    shard = env.dev.shards[0]
    strong = consistency == "strong"
    node = shard.primary if strong else shard.replicas[0]
    engine = env.cluster.primary(shard.name) if strong else env.cluster.engine(shard.name, "replica", 0)
    b = env.bouncers[node.name]
    with engine.connect() as c:
        # A pooled connection, and the engine's first-connect queries done: it is the
        # query whose wait is bounded, not the connecting (before the timeout starts).
        c.exec_driver_sql("SELECT 1")
    holders = [b.connect(autocommit=False) for _ in range(POOL_SIZE)]
    for c in holders:
        c.execute("SELECT 1")  # each holds a server connection: the pool is full
    released = threading.Event()

    def release() -> None:
        released.set()
        for c in holders:
            c.close()

    # Before the fixture's query_wait_timeout (10 s), which would end the wait too.
    timer = threading.Timer(6.0, release)
    timer.start()
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=env.cluster, consistency=consistency)
    env.served.clear()
    try:
        with Session() as s:
            with pytest.raises(shardkit.ScatterError) as ei:
                s.execute(select(User.id).execution_options(shardkit_timeout=0.5)).all()
            returned_before_release = not released.is_set()
            release()
            if not strong:
                # The replica's connection was let go: the session reads on.
                assert s.execute(select(func.count(User.id))).scalar_one() == 20
    finally:
        timer.cancel()
        release()
    assert set(ei.value.failures) == {shard.name}, ei.value.failures
    assert "no answer within 0.5 s (the cancel did not stop it: its connection was closed)" in str(
        ei.value.failures[shard.name]), ei.value.failures
    assert returned_before_release, (
        "the scatter waited for PgBouncer to hand out a server connection (6 s) instead of "
        "giving up after shardkit_timeout=0.5")
    assert f"{shard.name}/{'primary' if strong else 'r0'}" in _nodes_reading(env.served, "users")
    # No connection leaked: none checked out of the pool, no client left in PgBouncer's queue.
    assert engine.pool.checkedout() == 0

    def queue_empty() -> bool:
        return all(p["cl_waiting"] == 0 for p in b.show("POOLS") if p["database"] == "shardkit")

    _wait_until(queue_empty, "PgBouncer's queue to empty", 5)

    # The shut-down connection is never handed out again.
    def quick(i: int) -> None:
        for _ in range(10):
            with Session() as s:
                assert s.execute(select(func.count(User.id))).scalar_one() == 20

    assert not _run_threads(6, quick)
    _assert_no_leftover_state(env)


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
def test_connection_shut_down_past_the_timeout_goes_alone(env, consistency):
    """When shardkit shuts down the socket of a query PgBouncer keeps queued past
    ``shardkit_timeout``, only that connection goes: the node is fine, so its other pooled
    connections stay (the pool is not emptied as after a lost server), the statement
    counts as one error of the node (as a cancelled statement does), and a replica is not
    banned."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from shardkit import metrics

    _seed(env, 20)
    shard = env.dev.shards[0]
    strong = consistency == "strong"
    node = shard.primary if strong else shard.replicas[0]
    node_name = f"{shard.name}/{'primary' if strong else 'r0'}"
    b = env.bouncers[node.name]
    registry = prometheus_client.CollectorRegistry()
    cluster = shardkit.Cluster.from_config(env.cfg, metadata=Base.metadata, engine_options=NO_PREPARE)
    holders: list[psycopg.Connection] = []
    try:
        metrics.instrument(cluster, registry)
        cluster.start_monitor()
        engine = cluster.primary(shard.name) if strong else cluster.engine(shard.name, "replica", 0)

        def pooled(n: int) -> list:
            """The DBAPI connections of ``n`` connections checked out of the node's pool at once."""
            conns = [engine.connect() for _ in range(n)]
            try:
                for c in conns:
                    c.exec_driver_sql("SELECT 1")
                    c.rollback()  # (each transaction would hold one of PgBouncer's two servers)
                return [c.connection.dbapi_connection for c in conns]
            finally:
                for c in conns:
                    c.close()

        before = pooled(3)
        holders += [b.connect(autocommit=False) for _ in range(POOL_SIZE)]
        for c in holders:
            c.execute("SELECT 1")  # each holds a server connection: the pool is full
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency=consistency)
        with Session() as s:
            with pytest.raises(shardkit.ScatterError) as ei:
                s.execute(select(User.id).execution_options(shardkit_timeout=0.5)).all()
        for c in holders:
            c.close()
        assert set(ei.value.failures) == {shard.name}, ei.value.failures
        assert "its connection was closed" in str(ei.value.failures[shard.name])
        assert engine.pool.checkedout() == 0
        after = pooled(3)
        kept = [c for c in after if any(c is o for o in before)]
        # The one connection shut down was replaced; the node's two others stayed.
        assert len(kept) == 2, (before, after)
        assert all(not c.closed for c in kept)

        def errors(node: str) -> float:
            return registry.get_sample_value(
                "shardkit_query_errors_total", {"shard": node.split("/")[0], "node": node,
                                                "role": "primary" if strong else "replica"}) or 0.0

        assert errors(node_name) == 1.0
        assert errors(f"{env.names[1]}/{'primary' if strong else 'r0'}") == 0.0
        r0 = next(n for n in cluster.health().nodes if n["node"] == f"{shard.name}/r0")
        assert r0["banned_for_s"] == 0 and r0["ban_reason"] is None, r0
    finally:
        for c in holders:
            c.close()
        cluster.dispose()


class _AccountsBase(DeclarativeBase):
    pass


class Account(_AccountsBase):
    __tablename__ = "pgb_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


def test_run_transaction_retries_a_refused_write_through_pgbouncer(env):
    """The ownership guard's refusal (SQLSTATE SK001, raised under transaction-level advisory
    locks) comes back through PgBouncer as NotOwned, and run_transaction retries on the new
    owner.  The catalog and the mover connect directly, as they must (LISTEN/NOTIFY and
    session advisory locks need a session of their own)."""
    dev = env.dev
    groups = {"groups": {"pgb_accounts": {"strategy": "hash", "tables": {"pgb_accounts": "id"}}}}
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        _AccountsBase.metadata.create_all(eng)
        eng.dispose()
    catalog_url = dev.create_catalog("pgb_catalog")
    direct = shardkit.Cluster.from_config({**dev.config_dict(), **groups, "catalog": {"url": catalog_url}},
                                          follow_map=False)
    pooled_cfg = {**env.cfg, "groups": groups["groups"], "reference_tables": [],
                  "catalog": {"url": catalog_url}}
    stale = None
    try:
        rebalance.init(direct)
        stale = shardkit.Cluster.from_config(pooled_cfg, engine_options=NO_PREPARE, follow_map=False)
        live = direct.config.bucket_map
        s0, s1 = env.names
        bucket = next(b for b, s in enumerate(live) if s == s0)
        new_map = list(live)
        new_map[bucket] = s1
        rebalance.Mover(direct, grace=0, progress=lambda line: None).apply(
            plan_from_maps(live, tuple(new_map), "test: one bucket"))
        key = next(k for k in range(10**6) if shardkit.bucket_for(k, dev.bucket_count) == bucket)
        assert stale.shard_for("pgb_accounts", key) == s0  # this process has not heard of the move
        calls = []

        def fn(s):
            calls.append(s.cluster.shard_for("pgb_accounts", key))
            s.add(Account(id=key, balance=7))

        shardkit.run_transaction(sessionmaker(class_=shardkit.ShardedSession, cluster=stale), fn)
        assert calls == [s0, s1]
        assert _direct_ids(env, s1, "pgb_accounts") == {key}
        assert _direct_ids(env, s0, "pgb_accounts") == set()
    finally:
        if stale is not None:
            stale.dispose()
        direct.dispose()
    _assert_no_leftover_state(env)


# -- the README's requirement, and the monitor's -----------------------------------------------------------------


def test_without_prepare_threshold_none_statements_fail(env):
    """The README's first requirement: PgBouncer 1.18 in transaction mode does not carry
    psycopg's prepared statements (made after 5 runs of a statement on one connection)
    from one server connection to another, so without ``prepare_threshold: None``
    statements fail.  Autocommit statements show it (replica reads; the monitor's polls
    are never prepared);
    psycopg forgets its prepared statements at each rollback, so sessions on the
    primaries mostly do not reach the threshold."""
    _seed(env, 50)
    cluster = shardkit.Cluster.from_config(env.cfg, metadata=Base.metadata)  # no engine_options
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="eventual")
    failures: list[str] = []
    try:
        def work(i: int) -> None:
            for k in range(30):
                if failures:
                    return
                try:
                    with Session() as s:
                        s.get(User, (i * 30 + k) % 50)
                except Exception as e:  # noqa: BLE001 - the point of the test
                    failures.append(str(e))

        _run_threads(6, work)
    finally:
        cluster.dispose()
    assert failures and "prepared statement" in failures[0], failures[:1]


def test_the_config_file_can_turn_prepared_statements_off(env):
    """``[pool] prepared_statements = false`` is the config file's way to the same
    ``prepare_threshold: None`` (for the ``shardkit`` commands, which take no
    engine_options): the workload that fails above runs clean."""
    _seed(env, 50)
    cluster = shardkit.Cluster.from_config(
        _config(env.dev, env.bouncers, pool={"prepared_statements": False}), metadata=Base.metadata)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="eventual")
    failures: list[str] = []
    reads = 0
    lock = threading.Lock()  # `reads += 1` from 6 threads is a read-modify-write: exact count below
    try:
        def work(i: int) -> None:
            nonlocal reads
            for k in range(30):
                try:
                    with Session() as s:
                        assert s.get(User, (i * 30 + k) % 50) is not None
                    with lock:
                        reads += 1
                except Exception as e:  # noqa: BLE001 - the point of the test
                    failures.append(str(e))

        _run_threads(6, work)
    finally:
        cluster.dispose()
    assert not failures, failures[:1]
    assert reads == 180


def test_monitor_keeps_its_statement_timeout_without_ignore_startup_parameters(env):
    """The health monitor needs no PgBouncer setting: it sets its polls' statement timeout in
    the poll itself (one simple-protocol round trip, ``SET LOCAL``), not as a startup
    ``options`` parameter, which PgBouncer refuses ("unsupported startup parameter: options")
    unless ``ignore_startup_parameters = options`` makes it drop the option, and the
    timeout with it.  The fixture's PgBouncers have no such setting."""
    assert all("ignore_startup_parameters" not in b.settings for b in env.bouncers.values())
    cluster = shardkit.Cluster.from_config(
        _config(env.dev, env.bouncers, replicas={"poll_interval": 0.1, "poll_timeout": 0.5}),
        metadata=Base.metadata, engine_options=NO_PREPARE)
    try:
        health = cluster.health()
        assert health.ready, health.nodes
        assert all(n["up"] and n["error"] is None for n in health.nodes), health.nodes
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add(User(id=1, name="x"))
            s.commit()
        # A poll that would hang: the statement timeout (poll_timeout) ends it, on the
        # server, and the node is reported down with the server's reason.
        mon = cluster.monitor()
        mon.primary_poll_sql = f"{HealthMonitor.primary_poll_sql} FROM pg_sleep(30)"
        mon.replica_poll_sql = f"{HealthMonitor.replica_poll_sql} FROM pg_sleep(30)"

        def all_timed_out():
            nodes = cluster.health().nodes
            return all(not n["up"] and "statement timeout" in (n["error"] or "") for n in nodes) and nodes

        _wait_until(all_timed_out, "every node's poll to hit its statement timeout", 10)
        del mon.primary_poll_sql, mon.replica_poll_sql
        _wait_until(lambda: cluster.health().ready and all(n["up"] for n in cluster.health().nodes),
                    "the nodes to be up again", 10)
    finally:
        cluster.dispose()
    # The timeout was the poll's own: no setting is left on PgBouncer's server connections.
    # (Only settings: test_without_prepare_threshold_none_statements_fail leaves prepared
    # statements behind, on purpose.)
    states = {name: _server_states(b) for name, b in env.bouncers.items()}
    assert all(st[0] == [] for ss in states.values() for st in ss), states

