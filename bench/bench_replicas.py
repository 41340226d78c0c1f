"""Replica routing: read throughput, read-your-writes hit rate, reaction to lag.

    python bench/bench_replicas.py            # starts a 1-shard, 2-replica local cluster

1. Routed replica reads (shardkit.ShardedSession, eventual consistency, routed to
   the replica) vs a plain SQLAlchemy Session bound directly to that replica's engine, interleaved
   rounds (contenders take turns every 50 reads), median ratio.  The plain engine is measured twice: with SQLAlchemy's
   default (BEGIN ... ROLLBACK around each session) and in autocommit, which is
   how shardkit's replica engines run.  Each reads by select(...).where(id == k), and
   (shardkit and the autocommit Session) by session.get() too.
2. Read-your-writes: a session commits a row and immediately reads it back;
   share of those reads a healthy replica served (the rest went to the primary).
   A "pin to the primary for 2 s after a write" rule serves 0% of them from replicas.
3. Reaction to lag: a writer runs, one replica is delayed with
   recovery_min_apply_delay; an independent 10 ms probe records when its true lag
   passed max_lag_seconds, and we report how long after that the router still
   sent it reads (target: <= poll interval + 100 ms).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import psycopg
from sqlalchemy import BigInteger, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.devcluster import DevCluster


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(50))


def cluster_for(dev: DevCluster, **replicas: Any) -> shardkit.Cluster:
    cfg = {**dev.config_dict(), "groups": {"items": {"tables": {"bench_items": "id"}}},
           "replicas": replicas}
    c = shardkit.Cluster.from_config(cfg)
    c.start_monitor()
    return c


def bench_throughput(dev: DevCluster, ops: int, rounds: int) -> None:
    # shardkit routes to the one replica the plain sessions read directly: the same
    # server process on both sides, so the ratio is the routing's cost alone (with
    # two replicas, alternating servers costs cache misses on a 2-core machine).
    r0 = dev.shards[0].replicas[0]
    cfg = {**dev.config_dict(), "groups": {"items": {"tables": {"bench_items": "id"}}},
           "replicas": {"consistency": "eventual"}}
    cfg["shards"][0]["replicas"] = [r0.url]
    cluster = shardkit.Cluster.from_config(cfg)
    cluster.start_monitor()
    SK = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    plain_default = sessionmaker(bind=create_engine(r0.url))
    plain_auto = sessionmaker(bind=create_engine(r0.url, isolation_level="AUTOCOMMIT"))
    raw = psycopg.connect(r0.dsn, autocommit=True)
    keys = [(k * 7919) % 10_000 for k in range(ops)]

    def run(maker: Any, chunk: list[int]) -> float:
        t = time.perf_counter()
        for k in chunk:
            with maker() as s:
                s.execute(select(Item).where(Item.id == k)).scalar_one()
        return time.perf_counter() - t

    def run_get(maker: Any, chunk: list[int]) -> float:
        t = time.perf_counter()
        for k in chunk:
            with maker() as s:
                s.get(Item, k)
        return time.perf_counter() - t

    def run_raw(chunk: list[int]) -> float:
        t = time.perf_counter()
        for k in chunk:
            raw.execute("SELECT id, v FROM bench_items WHERE id = %s", (k,)).fetchone()
        return time.perf_counter() - t

    contenders = {"plain (default)": lambda c: run(plain_default, c),
                  "plain (autocommit)": lambda c: run(plain_auto, c),
                  "shardkit": lambda c: run(SK, c), "psycopg": run_raw,
                  "plain (autocommit), session.get": lambda c: run_get(plain_auto, c),
                  "shardkit, session.get": lambda c: run_get(SK, c)}
    for fn in contenders.values():
        fn(keys[:200])
    rates: dict[str, list[float]] = {n: [] for n in contenders}
    ratios: dict[str, list[float]] = {n: [] for n in contenders}
    rng = random.Random(7)
    for _ in range(rounds):
        # Contenders take turns every 50 reads, so drift hits all of them alike,
        # in a shuffled order per chunk: the first reads after a switch of
        # connection (another server process) run slower, and a fixed order
        # would always charge that to the same contender.
        spent = {n: 0.0 for n in contenders}
        for i in range(0, len(keys), 50):
            order = list(contenders)
            rng.shuffle(order)
            for n in order:
                spent[n] += contenders[n](keys[i:i + 50])
        r = {n: ops / spent[n] for n in contenders}
        for n in contenders:
            rates[n].append(r[n])
            ratios[n].append(r[n] / r["plain (default)"])
    # Every shardkit read must have gone to the replica for the comparison to hold:
    # checked after the timed rounds (a listener on an engine slows every later
    # execution on it, even once removed), the primary's engine must see none.
    served = {"primary": 0, "replica": 0}
    listeners = [(cluster.primary("s0"), "primary"), (cluster.engine("s0", "replica", 0), "replica")]

    def counter(role: str) -> Any:
        def count(*_a: Any) -> None:
            served[role] += 1
        return count

    hooks = [(eng, counter(role)) for eng, role in listeners]
    for eng, fn in hooks:
        event.listen(eng, "before_cursor_execute", fn)
    contenders["shardkit"](keys[:200])
    contenders["shardkit, session.get"](keys[200:400])
    for eng, fn in hooks:
        event.remove(eng, "before_cursor_execute", fn)
    if served != {"primary": 0, "replica": len(keys[:400])}:
        raise SystemExit(f"shardkit's reads were not all served by the replica: {served}")
    print(f"\nshardkit's reads served by the replica (checked): {served['replica']} of {len(keys[:400])}")
    print("\n### 1. Replica reads by key (1 shard, eventual consistency, one replica): a select, "
          "and session.get\n")
    print("| contender | reads/s (median) | ratio to plain (default) |")
    print("|---|---:|---:|")
    for n in contenders:
        print(f"| {n} | {statistics.median(rates[n]):,.0f} | {statistics.median(ratios[n]):.3f} |")
    auto = [a / b for a, b in zip(rates["shardkit"], rates["plain (autocommit)"])]
    print(f"\nshardkit / plain (autocommit): {statistics.median(auto):.3f}")
    gets = [a / b for a, b in zip(rates["shardkit, session.get"], rates["plain (autocommit), session.get"])]
    print(f"shardkit / plain (autocommit), session.get: {statistics.median(gets):.3f}")
    raw.close()
    cluster.dispose()


def bench_read_your_writes(dev: DevCluster, pairs: int) -> None:
    print("\n### 2. Read-your-writes with a healthy replica\n")
    print("| wait_for_token | post-write reads served by a replica | stale reads |")
    print("|---:|---:|---:|")
    for wait in (0.0, 0.02, 0.05):
        cluster = cluster_for(dev, wait_for_token=wait)
        served: dict[str, int] = {"primary": 0, "replica": 0}
        for i in range(-1, cluster.replica_count("s0")):
            eng = cluster.primary("s0") if i < 0 else cluster.engine("s0", "replica", i)
            role = "primary" if i < 0 else "replica"

            def count(conn: Any, cursor: Any, statement: str, *a: Any, role: str = role) -> None:
                if statement.lstrip().upper().startswith("SELECT BENCH_ITEMS"):
                    served[role] += 1
            event.listen(eng, "before_cursor_execute", count)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        stale = 0
        base = 1_000_000 + int(wait * 1e6) * 10
        with Session() as s:
            for i in range(pairs):
                s.add(Item(id=base + i, v="w"))
                s.commit()
                got = s.execute(select(Item).where(Item.id == base + i)).scalar_one_or_none()
                stale += got is None
                s.expunge_all()
        share = served["replica"] / max(1, served["replica"] + served["primary"])
        print(f"| {wait * 1000:.0f} ms | {share:.1%} ({served['replica']}/{pairs}) | {stale} |")
        cluster.dispose()


def bench_lag_reaction(dev: DevCluster, trials: int) -> None:
    print("\n### 3. From a replica falling behind to its last routed read\n")
    limit = 1.0
    results = []
    for trial in range(trials):
        cluster = cluster_for(dev, max_lag_seconds=limit, consistency="eventual")
        interval = cluster.replica_settings.poll_interval
        r0 = dev.shards[0].replicas[0]
        routed_r0: list[float] = []
        eng = cluster.engine("s0", "replica", 0)
        event.listen(eng, "before_cursor_execute",
                     lambda *a: routed_r0.append(time.monotonic()))
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        stop = threading.Event()
        behind_at: list[float] = []

        def writer() -> None:
            i = 2_000_000 + trial * 100_000
            with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
                while not stop.is_set():
                    c.execute("INSERT INTO bench_items VALUES (%s, 'w')", (i,))
                    i += 1
                    time.sleep(0.005)

        def probe() -> None:
            # Ground truth, independent of the router: the replica's own replay age
            # while the primary is ahead of it.
            with psycopg.connect(r0.dsn, autocommit=True) as c, \
                    psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as p:
                while not stop.is_set() and not behind_at:
                    plsn = p.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                    behind, age = c.execute(
                        "SELECT pg_last_wal_replay_lsn() < %s::pg_lsn, "
                        "extract(epoch FROM now() - pg_last_xact_replay_timestamp())",
                        (plsn,)).fetchone()
                    if behind and float(age) > limit:
                        behind_at.append(time.monotonic())
                    time.sleep(0.01)

        threads = [threading.Thread(target=writer), threading.Thread(target=probe)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        r0.set_apply_delay(3.0)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            with Session() as s:
                s.execute(select(Item).where(Item.id == 1)).all()
        stop.set()
        for t in threads:
            t.join()
        r0.set_apply_delay(0)
        r0.wait_caught_up()
        cluster.dispose()
        if not behind_at:
            print(f"trial {trial}: the probe never saw the replica pass the limit")
            continue
        last = max((t for t in routed_r0), default=behind_at[0])
        results.append((last - behind_at[0]) * 1000)
    if results:
        print(f"poll interval {interval * 1000:.0f} ms, max_lag_seconds {limit:g}; "
              f"{len(results)} trials")
        print(f"last routed read after the replica passed the limit: median "
              f"{statistics.median(results):.0f} ms, max {max(results):.0f} ms "
              f"(negative: the router stopped before the probe saw it)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="shardkit-bench-")
    os.chmod(d, 0o755)
    dev = DevCluster.up(os.path.join(d, "c"), shards=1, replicas=2)
    try:
        eng = create_engine(dev.shards[0].primary.url)
        Base.metadata.create_all(eng)
        with eng.begin() as c:
            c.execute(Item.__table__.insert(), [{"id": k, "v": f"v{k}"} for k in range(10_000)])
        eng.dispose()
        for r in dev.shards[0].replicas:
            r.wait_caught_up()
        print(f"Python {sys.version.split()[0]}, 1 shard, 2 streaming replicas, local loopback")
        bench_throughput(dev, args.ops, args.rounds)
        bench_read_your_writes(dev, args.pairs)
        bench_lag_reaction(dev, args.trials)
    finally:
        dev.down()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
