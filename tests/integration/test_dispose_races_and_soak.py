"""One Cluster shared by the threads of a web application: sessions in flight while the
cluster is disposed (a config reload, a shutdown that does not wait for every request),
cross-shard reads racing that dispose(), and a burst of sessions whose transactions hold
every connection of a pool when their cross-shard reads first ask the database what they
need to know.  A short soak (writes by key, reads by key with tokens, key-less reads,
scopes, health(), pool_stats(), a bucket move and dispose() cycles) then checks the
invariants: no unexpected error, every acknowledged write once on its owner, no connection
left checked out, no thread left after the last dispose()."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter

import psycopg
import pytest
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from replica_env import replayed
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit._scope import NO_SCOPE

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "soak_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(40))


class Note(Base):
    __tablename__ = "soak_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    item_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(String(40))


GROUPS = {"groups": {"items": {"tables": {Item.__tablename__: "id", Note.__tablename__: "item_id"}}}}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE TABLE {Item.__tablename__} (id bigint PRIMARY KEY, v varchar(40))")
            c.execute(f"CREATE TABLE {Note.__tablename__} (id bigint PRIMARY KEY, item_id bigint, "
                      "body varchar(40))")
    return dev


def _truncate(dev) -> None:
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("SET lock_timeout = '10s'")
            c.execute(f"TRUNCATE {Item.__tablename__}, {Note.__tablename__}")


def _checked_out(cluster) -> dict[str, int]:
    return {node: st["checkedout"] for node, st in cluster.pool_stats().items() if st and st["checkedout"]}


def _new_shardkit_threads(before: set[threading.Thread], timeout: float = 5.0) -> list[str]:
    """shardkit's threads started since ``before`` (other modules' clusters may run in this
    process) that are still alive after up to ``timeout`` seconds."""
    def left() -> list[str]:
        return sorted(t.name for t in threading.enumerate()
                      if t not in before and t.name.startswith("shardkit-"))
    deadline = time.monotonic() + timeout
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    return left()


def test_dispose_while_a_session_is_in_a_transaction_keeps_its_connection(dev):
    """README: the cluster can be used again after dispose(), and a connection in use is
    released from the pool, not closed under its session.  A session whose transaction has
    updated a row when another thread disposes the cluster must go on in that transaction:
    its next statement on that shard used a connection of a new engine, a second transaction
    on the same primary, which did not see the session's own update and waited forever (here
    lock_timeout) on the row lock the session itself holds."""
    _truncate(dev)
    cluster = shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS},
        engine_options={"connect_args": {"options": "-c lock_timeout=3000"}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    try:
        with Session() as s:
            s.add(Item(id=1, v="before"))
            s.commit()
        with Session() as s:
            item = s.get(Item, 1)
            item.v = "mine"
            s.flush()                              # the row is locked by this transaction
            threading.Thread(target=cluster.dispose).start()   # another thread, as in an app
            time.sleep(0.3)
            assert s.execute(select(Item.v).where(Item.id == 1)).scalar_one() == "mine"
            s.execute(text(f"UPDATE {Item.__tablename__} SET v = 'again' WHERE id = 1")
                      .execution_options(shardkit_shard=cluster.shard_for(Item, 1)))
            s.rollback()
        with Session() as s:
            assert s.execute(select(Item.v).where(Item.id == 1)).scalar_one() == "before"
        assert _checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_cross_shard_read_when_dispose_runs_as_it_starts_its_shards_threads(dev, monkeypatch):
    """A key-less read has checked out its shards' connections and takes the cluster's scatter
    threads when another thread disposes the cluster.  It failed with "RuntimeError: cannot
    schedule new futures after shutdown" (after its first shard's query had started on the
    session's connection), or, its threads asking the new engines for connections, with
    SQLAlchemy's "This session is provisioning a new connection; concurrent operations are
    not permitted"; the cluster is to be used again after dispose(), so the read runs."""
    _truncate(dev)
    before = set(threading.enumerate())
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    try:
        with Session() as s:
            s.add_all([Item(id=i, v=f"v{i}") for i in range(20)])
            s.commit()
        replayed(dev)  # (the "eventual" count below reads the replicas)
        real = cluster.scatter_executor
        raced = []

        def executor_then_dispose():
            pool = real()
            if not raced:  # once: another thread's dispose() just after the read found it
                raced.append(pool)
                cluster.dispose()
            return pool

        monkeypatch.setattr(cluster, "scatter_executor", executor_then_dispose)
        for consistency in ("strong", "eventual"):
            raced.clear()
            with Session(consistency=consistency) as s:
                assert s.scalar(select(func.count()).select_from(Item)) == 20
                assert raced
        assert _checked_out(cluster) == {}
    finally:
        cluster.dispose()
    assert _new_shardkit_threads(before) == []


def test_a_late_cancel_of_a_timed_out_scatter_does_not_cancel_the_next_statement(dev, monkeypatch):
    """A cross-shard read past its shardkit_timeout cancels the slow shard's query from a
    thread of its own (the cancel request is a connection to the server, slow on a busy
    one).  The query ended by itself meanwhile, the read returned, and the connection went
    back to the pool with the cancel still on its way: it then cancelled whatever ran there
    next, another request's statement ("canceling statement due to user request")."""
    _truncate(dev)
    slow = "s1"
    for shard in dev.shards:
        # 0.7 s (was 0.5) vs the 0.3 s timeout: the read must time out even on a loaded machine
        body = "SELECT pg_sleep(0.7) IS NOT NULL" if shard.name == slow else "SELECT true"
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE OR REPLACE FUNCTION soak_gate() RETURNS boolean LANGUAGE sql "
                      f"AS $${body}$$")
    cluster = shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS, "pool": {"size": 1, "max_overflow": 0}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    real = shardkit._scatter.send_cancel

    def busy_server_cancel(dbapi_connection, timeout):
        def later():
            time.sleep(0.7)              # slow to be served: arrives ~1.0 s, after the query ended (0.7 s)
            real(dbapi_connection, timeout).join()
        thread = threading.Thread(target=later, name="shardkit-cancel", daemon=True)
        thread.start()
        return thread

    monkeypatch.setattr(shardkit._session, "send_cancel", busy_server_cancel)
    try:
        with Session() as s:
            s.add(next(Item(id=i, v="x") for i in itertools.count() if cluster.shard_for(Item, i) == slow))
            s.commit()
        with Session() as s, pytest.raises(shardkit.ScatterError, match=r"s1: no answer within 0\.3 s"):
            s.execute(select(Item.id).where(func.soak_gate()),
                      execution_options={"shardkit_timeout": 0.3}).all()
        # The next request on that shard's (one) connection.
        with Session() as s:
            assert s.execute(text("SELECT pg_sleep(0.8) IS NOT NULL").execution_options(  # spans the late cancel
                shardkit_shard=slow)).scalar_one()
        assert _checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_first_cross_shard_reads_of_a_burst_of_write_transactions_on_a_full_pool(dev):
    """Each cross-shard read first asks the database (once per cluster) about what it
    merges: whether a function is an aggregate, the database's collation.  It asked on a
    connection of its own: a burst of sessions whose transactions hold every connection of a
    shard's pool (each wrote there, then lists rows) all waited for one more until the pool's
    timeout, and every read failed with TimeoutError (a pool of one: every such read)."""
    _truncate(dev)
    n = 3
    cluster = shardkit.Cluster.from_config(
        {**dev.config_dict(), **GROUPS, "pool": {"size": n, "max_overflow": 0, "timeout": 3}})
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    answers: list[list[str]] = []

    def request(me: int) -> None:
        try:
            with Session() as s:
                s.add_all([Item(id=100 * me + k, v=f"{me}-{k}") for k in range(6)])
                s.flush()                          # holds a connection to every primary
                assert len({cluster.shard_for(Item, 100 * me + k) for k in range(6)}) == 2
                barrier.wait(timeout=10)
                rows = s.execute(select(func.upper(Item.v)).where(Item.id >= 100 * me,
                                                                   Item.id < 100 * me + 100)
                                 .order_by(Item.v)).scalars().all()
                answers.append(rows)
                s.commit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
        assert sorted(answers) == sorted([[f"{me}-{k}" for k in range(6)] for me in range(n)])
        assert _checked_out(cluster) == {}
    finally:
        cluster.dispose()


def test_soak_one_cluster_many_threads_with_a_move_and_dispose_cycles(dev, tmp_path):
    """12 threads for 12 s: writes by key (run_transaction), reads of their own writes by key
    with the token, key-less reads (merged counts, ordered pages), explicit shard and key
    scopes, health() and pool_stats(); a mover moves buckets, and the cluster is disposed every
    0.1 s (the application goes on using it, as the README says it may).  Only NotOwned-free
    results are expected (run_transaction retries); a key-less read racing dispose() failed
    with "RuntimeError: cannot schedule new futures after shutdown" (or SQLAlchemy's "session
    is provisioning a new connection" when its shards' threads asked the new engines)."""
    _truncate(dev)
    before = set(threading.enumerate())
    cfg_path = tmp_path / "shardkit.toml"
    catalog = dev.create_catalog("soak_catalog")
    dev.write_config(cfg_path, {**GROUPS, "catalog": {"url": catalog}})
    admin = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    rebalance.init(admin)
    cluster = shardkit.Cluster.from_config(cfg_path, metadata=Base.metadata)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    acked: dict[int, str] = {}
    lock = threading.Lock()
    ids = itertools.count(1)
    errors: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    stop = threading.Event()

    def worker(me: int) -> None:
        rnd = random.Random(me)
        mine: list[int] = []
        token = None
        while not stop.is_set():
            op = rnd.choice(["write", "write", "read_own", "keyless", "page", "shard_scope", "key_scope",
                             "health", "stats"])
            try:
                assert shardkit.current_scope() is NO_SCOPE, "a scope leaked into the thread"
                if op == "write":
                    i = next(ids)

                    def fn(s, i=i):
                        s.add(Item(id=i, v=f"v{i}"))
                        s.add(Note(id=i, item_id=i, body="n"))
                    tokens: list[str] = []
                    shardkit.run_transaction(Session, fn, retries=3, on_commit=tokens.append)
                    token = tokens[0]
                    with lock:
                        acked[i] = f"v{i}"
                    mine.append(i)
                elif op == "read_own" and mine:
                    i = rnd.choice(mine)
                    with Session(consistency_token=token) as s:
                        assert s.get(Item, mine[-1]) is not None, f"own write {mine[-1]} not read back"
                        s.get(Item, i)
                elif op == "keyless":
                    with Session() as s:
                        s.scalar(select(func.count()).select_from(Item))
                elif op == "page":
                    with Session() as s:
                        s.scalars(select(Item.id).order_by(Item.id.desc()).limit(5)).all()
                elif op == "shard_scope":
                    with Session() as s, shardkit.scope(shard=rnd.choice(cluster.shard_names)):
                        s.scalars(select(Item).limit(3)).all()
                elif op == "key_scope" and mine:
                    i = rnd.choice(mine)
                    with Session() as s, shardkit.scope(key=i, role="primary"):
                        assert s.scalars(select(Note.id).where(Note.item_id == i)).all() == [i]
                elif op == "health":
                    cluster.health()
                elif op == "stats":
                    cluster.pool_stats()
                ops[op] += 1
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                errors[f"{op}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"] += 1

    def mover() -> None:
        m = rebalance.Mover(admin, grace=0.1, progress=lambda line: None)
        rnd = random.Random(7)
        while not stop.is_set():
            try:
                admin.refresh_map()
                live = admin.config.bucket_map
                b = rnd.randrange(len(live))
                new = list(live)
                new[b] = next(s for s in admin.shard_names if s != live[b])
                m.apply(plan_from_maps(live, tuple(new), "test: soak"))
                ops["move"] += 1
            except Exception as e:  # noqa: BLE001
                errors[f"move: {type(e).__name__}: {str(e).splitlines()[0][:200]}"] += 1
            stop.wait(0.3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    threads.append(threading.Thread(target=mover))
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 12
        while time.monotonic() < end:
            time.sleep(0.1)
            cluster.dispose()
            ops["dispose"] += 1
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert ops["write"] > 50 and ops["keyless"] > 20 and ops["move"] >= 1, ops
        assert _checked_out(cluster) == {}
        # Every acknowledged write once, on the shard the catalog's map gives its key.
        cluster.refresh_map()
        where: dict[int, list[tuple[str, str]]] = {}
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn) as c:
                for i, v in c.execute(f"SELECT id, v FROM {Item.__tablename__}"):
                    where.setdefault(i, []).append((shard.name, v))
        wrong = {i: where.get(i) for i, v in acked.items()
                 if where.get(i) != [(cluster.shard_for(Item, i), v)]}
        assert not wrong, dict(list(wrong.items())[:10])
        bad_logs = [r.getMessage() for r in records
                    if r.levelno >= logging.ERROR or "changed size during iteration" in r.getMessage()]
        assert not bad_logs, bad_logs[:5]
    finally:
        stop.set()
        logging.getLogger().removeHandler(handler)
        cluster.dispose()
        admin.dispose()
    assert _new_shardkit_threads(before) == []
