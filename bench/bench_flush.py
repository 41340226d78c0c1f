"""ORM writes of many objects across shards in one flush: shardkit vs plain Sessions,
horizontal_shard and raw psycopg.

Side by side in one run on the same local cluster; in each round every contender
writes the same number of rows (keys spread over the shards, so neighbours in the
order added are on different shards), in a shuffled order; medians over rounds:

    python bench/bench_flush.py                  # starts a 2-shard local cluster
    python bench/bench_flush.py --rows 4000 --rounds 15 --shards 3

insert: add_all() of new objects and commit(), timed together.
update: the objects just inserted, loaded and changed (not timed), then commit().

* plain      - one sqlalchemy Session per shard, each bound to its shard's engine and
               given only that shard's objects (the application does the routing: the
               floor)
* shardkit   - one shardkit.ShardedSession for all the objects
* hs-keyed   - sqlalchemy.ext.horizontal_shard with a shard_chooser that computes the
               shard from the key, one session for all the objects
* psycopg    - raw psycopg, executemany() of the same INSERT / UPDATE per shard, one
               transaction per shard (the physical floor)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, String, event, select
from sqlalchemy.ext.horizontal_shard import ShardedSession as HSSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from _cluster import bench_shards, raw_primaries


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "bench_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


OPS = ("insert", "update")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="an existing cluster's shardkit.toml (default: start one)")
    ap.add_argument("--shards", type=int, default=2, help="shards of the cluster it starts")
    ap.add_argument("--rows", type=int, default=4000, help="rows per flush")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    with bench_shards(args.config, args.shards) as base:
        base["groups"] = {"bench": {"tables": {"bench_events": "id"}}}
        cluster = shardkit.Cluster.from_config(base)
        for s in cluster.shard_names:
            Base.metadata.drop_all(cluster.primary(s))
            Base.metadata.create_all(cluster.primary(s))
        shards = {s: cluster.primary(s) for s in cluster.shard_names}
        SK = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        HS = sessionmaker(class_=HSSession, shards=shards,
                          shard_chooser=lambda mapper, instance, clause=None: cluster.shard_for(Event, instance.id),
                          identity_chooser=lambda mapper, pk, **kw: list(shards),
                          execute_chooser=lambda context: list(shards))
        plain = {s: sessionmaker(bind=e) for s, e in shards.items()}
        raw = raw_primaries(cluster, autocommit=False)

        def by_shard(keys: list[int]) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
            for k in keys:
                out[cluster.shard_for(Event, k)].append(k)
            return out

        def write(session: Any, keys: list[int], op: str) -> float:
            """Seconds ``session`` takes to write ``keys`` (``op``) and commit."""
            if op == "insert":
                t0 = time.perf_counter()
                session.add_all(Event(id=k, name=f"event{k}") for k in keys)
            else:
                for e in session.scalars(select(Event).where(Event.id.in_(keys))):
                    e.name = f"changed{e.id}"
                t0 = time.perf_counter()
            session.commit()
            return time.perf_counter() - t0

        def one_session(maker: Callable[[], Any]) -> Callable[[list[int], str], float]:
            def run(keys: list[int], op: str) -> float:
                with maker() as session:
                    return write(session, keys, op)
            return run

        def plain_run(keys: list[int], op: str) -> float:
            spent = 0.0
            for s, own in by_shard(keys).items():
                with plain[s]() as session:
                    spent += write(session, own, op)
            return spent

        def raw_run(keys: list[int], op: str) -> float:
            split = by_shard(keys)
            t0 = time.perf_counter()
            for s, own in split.items():
                with raw[s].transaction(), raw[s].cursor() as cur:
                    if op == "insert":
                        cur.executemany("INSERT INTO bench_events (id, name) VALUES (%s, %s)",
                                        [(k, f"event{k}") for k in own])
                    else:
                        cur.executemany("UPDATE bench_events SET name = %s WHERE id = %s",
                                        [(f"changed{k}", k) for k in own])
            return time.perf_counter() - t0

        contenders: dict[str, Callable[[list[int], str], float]] = {
            "plain": plain_run,
            "shardkit": one_session(SK),
            "hs-keyed": one_session(HS),
            "psycopg": raw_run,
        }
        next_key = [0]

        def fresh_keys() -> list[int]:
            start = next_key[0]
            next_key[0] += args.rows
            return list(range(start, start + args.rows))

        # Statements sent per flush (counted outside the timed rounds: a listener slows
        # every later execution on its engine), and a warm-up of caches and pools.
        sent = [0]

        def count(conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
            if not statement.lstrip().upper().startswith("SELECT"):
                sent[0] += 1

        for engine in shards.values():
            event.listen(engine, "before_cursor_execute", count)
        statements: dict[tuple[str, str], int] = {}
        for n, fn in contenders.items():
            keys = fresh_keys()
            for op in OPS:
                sent[0] = 0
                fn(keys, op)
                statements[op, n] = sent[0]
        for engine in shards.values():
            event.remove(engine, "before_cursor_execute", count)

        print(f"{len(cluster.shard_names)} shards, {args.rows} rows per flush, {args.rounds} rounds, "
              f"Python {sys.version.split()[0]}")
        print()
        rates: dict[tuple[str, str], list[float]] = {(op, n): [] for op in OPS for n in contenders}
        ratios: dict[tuple[str, str], list[float]] = {(op, n): [] for op in OPS for n in contenders}
        rng = random.Random(7)
        for _ in range(args.rounds):
            order = list(contenders)
            rng.shuffle(order)
            keys = {n: fresh_keys() for n in order}
            for op in OPS:
                r = {}
                for n in order:
                    r[n] = args.rows / contenders[n](keys[n], op)
                for n in contenders:
                    rates[op, n].append(r[n])
                    ratios[op, n].append(r[n] / r["plain"])
        print("| operation | contender | rows/s (median) | ratio to plain (median of rounds) | statements per flush |")
        print("|---|---|---:|---:|---:|")
        for op in OPS:
            for n in contenders:
                shown = str(statements[op, n]) if n != "psycopg" else "(executemany per shard)"
                print(f"| {op} | {n} | {statistics.median(rates[op, n]):,.0f} | "
                      f"{statistics.median(ratios[op, n]):.3f} | {shown} |")
        for c in raw.values():
            c.close()
        cluster.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
