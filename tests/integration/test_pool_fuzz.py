"""A seeded random driver of one Cluster's pools under failures: for 15 s
(``SHARDKIT_POOL_FUZZ_SECONDS``, or times ``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py),
12 threads run keyed reads and writes, cross-shard reads (some past a short
``shardkit_timeout``), streamed reads
abandoned half-way (closed, or dropped for the garbage collector), sessions never closed,
exceptions raised inside ``with Session() as s:``, statements a ``statement_timeout`` ends,
while another thread ends the replicas' server connections (``pg_terminate_backend``).
Small pools (a per-node cap of 3) make scatters and sessions queue for connections.

Then the invariants of README "Pools" and "Metrics": every pool back to 0 checked out once
every session is closed (or collected); no node ever held more server connections than its
cap (``pg_stat_activity`` by ``application_name``, sampled throughout); a checkout that
could not get a connection raised ``TimeoutError`` naming the node within the pool's
timeout (no scatter deadlocked); ``shardkit_queries_total`` and
``shardkit_query_errors_total`` agree, per node, with the statements the engines ran and
failed; the checked-out gauge is 0 at the end; no unexpected exception type."""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter

import psycopg
import pytest
from fuzz_size import fuzz_seconds
from sqlalchemy import BigInteger, String, event, func, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.errors import ScatterError, ShardUnavailable

prometheus_client = pytest.importorskip("prometheus_client")
import shardkit.metrics  # noqa: E402

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("SHARDKIT_POOL_FUZZ_SEED", "20261208"))
APP = "sk_poolfuzz"
CAP = 3
POOL_TIMEOUT = 2.0
SECONDS = fuzz_seconds("SHARDKIT_POOL_FUZZ_SECONDS", 15.0)   # how long the workers run


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "poolfuzz_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(40))


GROUPS = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}}}
N_ROWS = 300


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cfg = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, follow_map=False)
    try:
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE TABLE {Item.__tablename__} (id bigint PRIMARY KEY, v varchar(40))")
                rows = [(i, f"v{i}") for i in range(N_ROWS) if cfg.shard_for(Item, i) == shard.name]
                with c.cursor() as cur:
                    cur.executemany(f"INSERT INTO {Item.__tablename__} VALUES (%s, %s)", rows)
        for shard in dev.shards:
            for r in shard.replicas:
                r.wait_caught_up()
    finally:
        cfg.dispose()
    return dev


def _server_connections(dev) -> dict[str, int]:
    """node -> this module's cluster's backends on it (the monitor's have their own name)."""
    out = {}
    for shard in dev.shards:
        for name, node in [("primary", shard.primary), *((f"r{i}", r) for i, r in enumerate(shard.replicas))]:
            try:
                with psycopg.connect(node.dsn, autocommit=True, connect_timeout=3) as c:
                    n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                  (APP,)).fetchone()[0]
            except psycopg.Error:
                continue
            out[f"{shard.name}/{name}"] = n
    return out


def _terminate_replica_backends(dev) -> int:
    n = 0
    for shard in dev.shards:
        for r in shard.replicas:
            with psycopg.connect(r.dsn, autocommit=True, connect_timeout=3) as c:
                n += c.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s) t", (APP,)).fetchone()[0]
    return n


def _samples(registry, name: str) -> dict[str, float]:
    out = {}
    for fam in registry.collect():
        for s in fam.samples:
            if s.name == name:
                out[s.labels["node"]] = s.value
    return out


# Failures a worker may meet by design: a pool timeout, a replica whose backend was ended,
# a scatter past its shardkit_timeout or failed on a shard, a statement_timeout, the
# exception a test raised inside its session.
class Planted(Exception):
    pass


EXPECTED = (sa_exc.TimeoutError, ShardUnavailable, ScatterError, sa_exc.OperationalError,
            sa_exc.DBAPIError, Planted)


def test_pools_under_a_random_concurrent_workload_with_failures(dev):
    cluster = shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS,
         "pool": {"size": 2, "max_overflow": 5, "max_connections": CAP, "timeout": POOL_TIMEOUT},
         "replicas": {"poll_interval": 0.2, "ban_seconds": 0.5}},
        engine_options={"connect_args": {"application_name": APP}}, follow_map=False)
    registry = prometheus_client.CollectorRegistry()
    metrics = shardkit.metrics.instrument(cluster, registry)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)

    # What the engines ran, per node, counted independently of shardkit.metrics.
    ran: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    count_lock = threading.Lock()

    def count(eng) -> None:
        node = eng.info["node"]

        def after(*a, **k):
            with count_lock:
                ran[node] += 1

        def err(ctx):
            if not ctx.is_pre_ping:
                with count_lock:
                    failed[node] += 1
        event.listen(eng, "after_cursor_execute", after)
        event.listen(eng, "handle_error", err, insert=True)

    for s in cluster.shard_names:
        count(cluster.primary(s))
        for i in range(cluster.replica_count(s)):
            count(cluster.engine(s, "replica", i))
    cluster.start_monitor()

    stop = threading.Event()
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    unexpected: list[str] = []
    slow_timeouts: list[str] = []
    peaks: Counter[str] = Counter()
    kills = [0]
    lock = threading.Lock()

    def note_error(op: str, e: BaseException, took: float) -> None:
        with lock:
            errors[f"{op}: {type(e).__name__}"] += 1
            if not isinstance(e, EXPECTED):
                unexpected.append(f"{op}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if isinstance(e, sa_exc.TimeoutError):
                if not getattr(e, "shardkit_node", None):
                    unexpected.append(f"{op}: pool timeout without the node: {e}")
                # One checkout per node at most waits POOL_TIMEOUT; a session may wait on
                # each of its nodes in turn (4 nodes), plus the work itself.
                if took > 4 * POOL_TIMEOUT + 5:
                    slow_timeouts.append(f"{op}: TimeoutError after {took:.1f}s")

    def worker(me: int) -> None:
        rnd = random.Random(SEED * 100 + me)
        while not stop.is_set():
            op = rnd.choice(["get", "get", "write", "write", "scatter", "scatter_timeout", "page",
                             "stream_close", "stream_drop", "dropped_session", "raise_inside",
                             "statement_timeout", "multi_shard_tx"])
            t0 = time.monotonic()
            try:
                if op == "get":
                    with Session() as s:
                        s.get(Item, rnd.randrange(N_ROWS))
                elif op == "write":
                    with Session() as s:
                        s.execute(update(Item).where(Item.id == rnd.randrange(N_ROWS)).values(v=f"w{me}"))
                        s.commit()
                elif op == "scatter":
                    with Session() as s:
                        s.scalar(select(func.count()).select_from(Item))
                elif op == "scatter_timeout":
                    with Session() as s:
                        s.execute(select(Item.id, func.pg_sleep(0.3)).where(Item.id < 2)
                                  .execution_options(shardkit_timeout=0.1)).all()
                elif op == "page":
                    with Session() as s:
                        s.scalars(select(Item.id).order_by(Item.id.desc()).limit(7)).all()
                elif op == "stream_close":
                    s = Session()
                    res = s.scalars(select(Item).order_by(Item.id).execution_options(yield_per=5))
                    for _ in range(rnd.randrange(1, 12)):
                        next(res, None)
                    res.close()
                    s.close()
                elif op == "stream_drop":
                    s = Session()
                    res = s.scalars(select(Item).execution_options(yield_per=5))
                    next(res, None)
                    del res, s
                    gc.collect()
                elif op == "dropped_session":
                    s = Session()
                    s.get(Item, rnd.randrange(N_ROWS))
                    s.execute(update(Item).where(Item.id == rnd.randrange(N_ROWS)).values(v="d"))
                    del s
                    gc.collect()   # (a Session's cycles wait for the collector: its connections too)
                elif op == "raise_inside":
                    with Session() as s:
                        s.get(Item, rnd.randrange(N_ROWS))
                        s.scalars(select(Item.id).limit(3)).all()
                        s.execute(update(Item).where(Item.id == rnd.randrange(N_ROWS)).values(v="r"))
                        raise Planted("planted")
                elif op == "statement_timeout":
                    k = rnd.randrange(N_ROWS)
                    on = {"shardkit_shard": cluster.shard_for(Item, k), "shardkit_role": "primary"}
                    with Session() as s:
                        s.execute(text("SET LOCAL statement_timeout = 50").execution_options(**on))
                        s.execute(text("SELECT pg_sleep(0.5)").execution_options(**on))
                elif op == "multi_shard_tx":
                    with Session() as s:
                        for k in rnd.sample(range(N_ROWS), 4):
                            s.execute(update(Item).where(Item.id == k).values(v=f"m{me}"))
                        s.scalars(select(Item.id).order_by(Item.id).limit(3)).all()
                        s.commit()
                with lock:
                    ops[op] += 1
            except BaseException as e:  # noqa: BLE001 - tallied, asserted below
                note_error(op, e, time.monotonic() - t0)

    def chaos() -> None:
        rnd = random.Random(SEED)
        while not stop.wait(rnd.uniform(0.3, 0.8)):
            try:
                kills[0] += _terminate_replica_backends(dev)
            except psycopg.Error:
                pass

    def sampler() -> None:
        while not stop.wait(0.1):
            for node, n in _server_connections(dev).items():
                with lock:
                    peaks[node] = max(peaks[node], n)

    threads = [threading.Thread(target=worker, args=(i,), name=f"poolfuzz-{i}") for i in range(12)]
    threads += [threading.Thread(target=chaos), threading.Thread(target=sampler)]
    try:
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(60)
        stuck = [t for t in threads if t.is_alive()]
        frames = sys._current_frames()
        assert not stuck, "workers stuck (a deadlock of the pools?):\n" + "\n".join(
            f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident])[-12:]) for t in stuck if t.ident in frames)
        gc.collect()
        # (A loaded machine: a cancelled scatter's thread may take a while to give its
        # connection back; one never given back still fails below.)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(st["checkedout"] for st in cluster.pool_stats().values()):
            time.sleep(0.1)
            gc.collect()
        print("ops", dict(ops), "errors", dict(errors), "kills", kills[0], "peaks", dict(peaks))

        assert not unexpected, unexpected[:10]
        assert not slow_timeouts, slow_timeouts[:5]
        frames = sys._current_frames()
        assert {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st["checkedout"]} == {}, (
            "connections still checked out; threads alive:\n" + "\n".join(
                f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident])[-8:])
                for t in threading.enumerate() if t.ident in frames and t is not threading.current_thread()))
        assert all(v == 0 for v in _samples(registry, "shardkit_pool_checked_out").values())
        over = {n: p for n, p in peaks.items() if p > CAP}
        assert not over, f"server connections above max_connections={CAP}: {over}"
        # (a floor that shows the workload ran: a loaded host, with pool timeouts of 2 s, runs few)
        assert kills[0] > 0 and sum(ops.values()) > 30, (kills, ops)
        # The metrics agree with what the engines ran and failed, per node.
        queries = _samples(registry, "shardkit_queries_total")
        errs = _samples(registry, "shardkit_query_errors_total")
        assert {n: int(v) for n, v in queries.items() if v} == {n: v for n, v in ran.items() if v}
        assert {n: int(v) for n, v in errs.items() if v} == {n: v for n, v in failed.items() if v}
    finally:
        stop.set()
        metrics.close()
        cluster.dispose()


def test_a_node_url_with_a_secret_in_its_query_has_one_engine_and_keeps_its_cap(dev):
    """A node URL with ``?sslpassword=`` (or ``?password=``: secrets are moved out of the URL
    into the driver's connect arguments) got a new engine, a new pool, at every
    ``cluster.engine()``: the loop moving the secrets reused the name of the node's key, so the
    engine was kept under the secret's name.  Each session then had a pool of its own:
    ``max_connections`` capped nothing, pool_stats() showed one pool of many, and the pools
    the process made were never disposed."""
    cfg = dev.config_dict()
    cfg["shards"] = [{**sh, "primary": sh["primary"] + "?sslpassword=unused"} for sh in cfg["shards"]]
    cluster = shardkit.Cluster.from_config(
        {**cfg, **GROUPS, "pool": {"max_connections": 1, "timeout": 0.5}}, follow_map=False)
    try:
        assert cluster.engine("s0") is cluster.engine("s0")
        with cluster.primary("s0").connect() as held:
            held.execute(text("SELECT 1"))
            assert cluster.pool_stats()["s0/primary"]["checkedout"] == 1
            with pytest.raises(sa_exc.TimeoutError, match="node s0/primary"):
                cluster.primary("s0").connect()
    finally:
        cluster.dispose()


def test_a_dropped_session_whose_replica_read_was_retried_gives_its_connections_back(dev):
    """The warning "read on s0/r0 failed, retrying elsewhere: ..." was given the exception
    itself as its argument: a log record kept by a handler (pytest's capture, a
    MemoryHandler, an error reporter's buffer) kept the exception, its traceback, the frames
    and the session in them, and so the connections of a session the application dropped
    without closing it (it is garbage collected otherwise): checked out for good."""
    cluster = shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS, "replicas": {"ban_seconds": 0.2}},
        engine_options={"connect_args": {"application_name": APP + "_drop"}}, follow_map=False)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("shardkit.session")
    logger.addHandler(handler)
    try:
        key = next(i for i in range(N_ROWS) if cluster.shard_for(Item, i) == "s0")
        with Session() as s:
            assert s.get(Item, key) is not None   # a pooled connection to s0/r0
        replica = dev.shard("s0").replicas[0]
        with psycopg.connect(replica.dsn, autocommit=True) as c:
            assert c.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE application_name = %s", (APP + "_drop",)).fetchone()[0] >= 1
        s = Session()
        assert s.get(Item, key) is not None       # retried elsewhere
        assert any("retrying elsewhere" in r.getMessage() for r in kept)
        del s
        gc.collect()
        assert {n: st["checkedout"] for n, st in cluster.pool_stats().items() if st["checkedout"]} == {}
    finally:
        logger.removeHandler(handler)
        cluster.dispose()
