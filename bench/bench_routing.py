"""Routed single-key reads: shardkit vs a plain Session, horizontal_shard and raw psycopg.

Side by side in one run on the same local cluster; within each round the contenders
take turns every 50 operations; medians over rounds:

    python bench/bench_routing.py                 # starts a 2-shard local cluster
    python bench/bench_routing.py --ops 3000 --rounds 7

Every contender reads the same keys; each operation opens a session, reads one
row by primary key and closes the session (what one web request does).

* plain      - sqlalchemy Session bound directly to the owning shard's engine (the floor;
               create_engine() of its URL, as an application without shardkit makes it)
* shardkit   - shardkit.ShardedSession
* hs-naive   - sqlalchemy.ext.horizontal_shard with choosers that return every shard
* hs-keyed   - horizontal_shard with choosers in the style of SQLAlchemy's sharding
               example (inspect the WHERE clause for the key; compute the shard): one
               statement per operation, checked
* psycopg    - raw psycopg, one open connection per shard, the same SQL (physical floor)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, String, create_engine, event, select
from sqlalchemy.ext.horizontal_shard import ShardedSession as HSSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnElement

import shardkit
from _cluster import bench_shards, raw_primaries


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


def hs_keyed_choosers(cluster: shardkit.Cluster) -> dict[str, Any]:
    """Choosers written the way SQLAlchemy's examples/sharding does it."""

    def shard_chooser(mapper, instance, clause=None):
        return cluster.shard_for(User, instance.id)

    def identity_chooser(mapper, primary_key, *, lazy_loaded_from, **kw):
        if lazy_loaded_from:
            return [lazy_loaded_from.identity_token]
        return [cluster.shard_for(User, primary_key[0])]

    def execute_chooser(context):
        ids = [cluster.shard_for(User, value) for value in _key_values(context)]
        return ids or list(cluster.shard_names)

    def _key_values(context):
        """``id = value`` comparisons of the WHERE clause, the value from the bound
        parameter or, for a get() (whose value comes with the execution), its parameters.
        (The example's own visitor collects bind values in a visit_bindparam hook; on
        SQLAlchemy 2.x traverse() visits a comparison before its operands, so it found
        nothing and every statement went to every shard.)"""
        params = context.parameters or {}
        values = []
        for criterion in getattr(context.statement, "_where_criteria", ()):
            for node in visitors.iterate(criterion):
                if (isinstance(node, BinaryExpression) and node.operator is operators.eq
                        and isinstance(node.left, ColumnElement)
                        and node.left.shares_lineage(User.__table__.c.id)
                        and isinstance(node.right, BindParameter)):
                    value = node.right.effective_value
                    if value is None and isinstance(params, dict):
                        value = params.get(node.right.key)
                    if value is not None:
                        values.append(value)
        return values

    return dict(shard_chooser=shard_chooser, identity_chooser=identity_chooser,
                execute_chooser=execute_chooser)


def hs_naive_choosers(cluster: shardkit.Cluster) -> dict[str, Any]:
    shards = list(cluster.shard_names)
    return dict(
        shard_chooser=lambda mapper, instance, clause=None: cluster.shard_for(User, instance.id),
        identity_chooser=lambda mapper, pk, **kw: shards,
        execute_chooser=lambda ctx: shards,
    )


def timed(fn: Callable[[int], None], keys: list[int]) -> float:
    start = time.perf_counter()
    for k in keys:
        fn(k)
    return len(keys) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="an existing cluster's shardkit.toml (default: start one)")
    ap.add_argument("--ops", type=int, default=2000, help="operations per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=10000)
    args = ap.parse_args()

    with bench_shards(args.config, 2) as base:
        base["groups"] = {"bench": {"tables": {"bench_users": "id"}}}
        cluster = shardkit.Cluster.from_config(base)
        for s in cluster.shard_names:
            Base.metadata.drop_all(cluster.primary(s))
            Base.metadata.create_all(cluster.primary(s))
        SK = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with SK() as s:
            s.execute(shardkit_insert(), [{"id": k, "name": f"user{k}"} for k in range(args.rows)])
            s.commit()
        keys = [(k * 7919) % args.rows for k in range(args.ops)]
        owner = {k: cluster.shard_for(User, k) for k in set(keys)}
        # The engines an application without shardkit makes (create_engine() of the same
        # URLs, SQLAlchemy's defaults), not the cluster's: those pass each transaction's
        # end through shardkit's dialect wrappers, which the floor must not pay.
        shards = {s: create_engine(cluster.primary(s).url) for s in cluster.shard_names}
        plain = {s: sessionmaker(bind=shards[s]) for s in cluster.shard_names}
        hs_naive = sessionmaker(class_=HSSession, shards=shards, **hs_naive_choosers(cluster))
        hs_keyed = sessionmaker(class_=HSSession, shards=shards, **hs_keyed_choosers(cluster))
        raw = raw_primaries(cluster, autocommit=True)

        def get_with(maker: Callable[[int], Session]) -> Callable[[int], None]:
            def op(k: int) -> None:
                with maker(k) as s:
                    s.get(User, k)
            return op

        def select_with(maker: Callable[[int], Session]) -> Callable[[int], None]:
            def op(k: int) -> None:
                with maker(k) as s:
                    s.execute(select(User).where(User.id == k)).scalar_one()
            return op

        def raw_op(k: int) -> None:
            raw[owner[k]].execute("SELECT id, name FROM bench_users WHERE id = %s", (k,)).fetchone()

        contenders: dict[str, dict[str, Callable[[int], None]]] = {
            "session.get": {
                "plain": get_with(lambda k: plain[owner[k]]()),
                "shardkit": get_with(lambda k: SK()),
                "hs-keyed": get_with(lambda k: hs_keyed()),
                "hs-naive": get_with(lambda k: hs_naive()),
                "psycopg": raw_op,
            },
            "select by key": {
                "plain": select_with(lambda k: plain[owner[k]]()),
                "shardkit": select_with(lambda k: SK()),
                "hs-keyed": select_with(lambda k: hs_keyed()),
                "hs-naive": select_with(lambda k: hs_naive()),
                "psycopg": raw_op,
            },
        }
        # warm up caches and pools
        for fns in contenders.values():
            for fn in fns.values():
                timed(fn, keys[:200])
        print(f"{len(cluster.shard_names)} shards, {args.rows} rows, {args.ops} ops x "
              f"{args.rounds} rounds, Python {sys.version.split()[0]}")
        print()
        print("| operation | contender | ops/s (median) | ratio to plain (median of rounds) |")
        print("|---|---|---:|---:|")
        for opname, fns in contenders.items():
            rates: dict[str, list[float]] = {n: [] for n in fns}
            ratios: dict[str, list[float]] = {n: [] for n in fns}
            rng = random.Random(7)
            for _ in range(args.rounds):
                # Interleave contenders in chunks of 50 operations within each round,
                # so drift (autovacuum, CPU frequency, the other core's load) hits
                # all of them alike, in a shuffled order per chunk: the first reads
                # after a switch of connection (another server process) run slower,
                # and a fixed order would always charge that to the same contender.
                spent = {n: 0.0 for n in fns}
                for i in range(0, len(keys), 50):
                    chunk = keys[i:i + 50]
                    order = list(fns)
                    rng.shuffle(order)
                    for n in order:
                        spent[n] += len(chunk) / timed(fns[n], chunk)
                r = {n: len(keys) / spent[n] for n in fns}
                for n in fns:
                    rates[n].append(r[n])
                    ratios[n].append(r[n] / r["plain"])
            for n in fns:
                print(f"| {opname} | {n} | {statistics.median(rates[n]):,.0f} | "
                      f"{statistics.median(ratios[n]):.3f} |")
        # Statements sent per operation, per contender: the keyed contenders must send one
        # (to the owning shard), or the comparison is not what it claims to be.  Counted
        # after the timed rounds: a listener slows every later execution on its engine.
        sent = [0]
        failed: list[str] = []

        def count(*_a: Any) -> None:
            sent[0] += 1

        engines = [*shards.values(), *(cluster.primary(s) for s in cluster.shard_names)]
        for engine in engines:
            event.listen(engine, "before_cursor_execute", count)
        for opname, fns in contenders.items():
            for n, fn in fns.items():
                if n == "psycopg":
                    continue
                sent[0] = 0
                timed(fn, keys[:200])
                per_op = sent[0] / len(keys[:200])
                print(f"{opname} / {n}: {per_op:g} statements per operation")
                if n in ("plain", "shardkit", "hs-keyed") and per_op != 1:
                    failed.append(f"{opname} / {n} sent {per_op:g} statements per operation, not 1")
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
        if failed:
            raise SystemExit("; ".join(failed) + ": the ratios above do not compare like with like")
        for c in raw.values():
            c.close()
        for engine in shards.values():
            engine.dispose()
        cluster.dispose()
    return 0


def shardkit_insert() -> Any:
    from sqlalchemy import insert
    return insert(User)


if __name__ == "__main__":
    sys.exit(main())
