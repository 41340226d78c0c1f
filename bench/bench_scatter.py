"""Cross-shard reads: parallel fan-out, top-N merge, and memory of a streamed scan.

    python bench/bench_scatter.py            # starts a 4-shard local cluster (primaries only)

1. A query costing each shard about 50 ms (pg_sleep in an InitPlan plus a real
   count): shardkit vs sqlalchemy.ext.horizontal_shard (which runs shards one
   after the other) vs the slowest single shard queried directly.
2. Top-10 by a column across 4 shards of 250k rows each: shardkit (exact merge)
   vs one shard queried directly (the floor) vs horizontal_shard (serial, and
   it returns 40 unmerged rows, so its answer would need a merge on top).
3. Peak RSS growth of a full scan of 1M rows with yield_per, run in a fresh
   process so the number is not hidden by earlier allocations.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from sqlalchemy import BigInteger, Integer, create_engine, func, literal, select
from sqlalchemy.ext.horizontal_shard import ShardedSession as HSSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.devcluster import DevCluster


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_rows"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    score: Mapped[int] = mapped_column(Integer)
    grp: Mapped[int] = mapped_column(Integer)


def config(dev_cfg: dict[str, Any]) -> dict[str, Any]:
    return {**dev_cfg, "groups": {"rows": {"tables": {"bench_rows": "id"}}}}


def load(cluster: shardkit.Cluster, n: int) -> None:
    import psycopg

    per: dict[str, io.StringIO] = {s: io.StringIO() for s in cluster.shard_names}
    for i in range(n):
        per[cluster.shard_for("bench_rows", i)].write(f"{i}\t{(i * 2654435761) % 1_000_003}\t{i % 100}\n")
    for s in cluster.shard_names:
        eng = cluster.primary(s)
        Base.metadata.drop_all(eng)
        Base.metadata.create_all(eng)
        u = cluster.config.shard(s).primary
        with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                             password=u.password) as c:
            with c.cursor().copy("COPY bench_rows (id, score, grp) FROM STDIN") as cp:
                cp.write(per[s].getvalue())
            c.execute("CREATE INDEX ON bench_rows (score)")
            c.execute("ANALYZE bench_rows")


def timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--scan-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scan_child:
        return scan_child(args.scan_child)

    d = tempfile.mkdtemp(prefix="shardkit-bench-")
    os.chmod(d, 0o755)
    dev = DevCluster.up(os.path.join(d, "c"), shards=4, replicas=0)
    try:
        cfg = config(dev.config_dict())
        cluster = shardkit.Cluster.from_config(cfg)
        t = time.perf_counter()
        load(cluster, args.rows)
        print(f"loaded {args.rows:,} rows into 4 shards in {time.perf_counter() - t:.1f} s")
        SK = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        shards = {s: cluster.primary(s) for s in cluster.shard_names}
        names = list(cluster.shard_names)
        HS = sessionmaker(class_=HSSession, shards=shards,
                          shard_chooser=lambda m, i, clause=None: cluster.shard_for(Row, i.id),
                          identity_chooser=lambda m, pk, **kw: names,
                          execute_chooser=lambda ctx: names)
        direct = {s: sessionmaker(bind=e) for s, e in shards.items()}

        # Mostly waiting (pg_sleep in an InitPlan) with a small indexed count: the
        # fan-out itself is measured, not the 2-core machine's CPU.
        sleep_50ms = select(literal(1000)).select_from(func.pg_sleep(0.05)).scalar_subquery()
        slow = select(func.count(Row.id)).where(Row.id < 20_000, Row.grp < sleep_50ms)
        # A real aggregate over every row: CPU-bound, so 4 shards share 2 cores.
        heavy = select(Row.grp, func.count(), func.avg(Row.score)).group_by(Row.grp)

        print("\n### 1. Fan-out: 4 shards, median of "
              f"{args.repeat}\n")
        print("| query | slowest single shard, direct | shardkit (parallel) | ratio | "
              "horizontal_shard (serial) | ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, q in (("~50 ms per shard (pg_sleep + indexed count)", slow),
                         ("GROUP BY over all rows (CPU-bound)", heavy)):
            per_shard = {}
            for name, mk in direct.items():
                def one(mk: Any = mk, q: Any = q) -> None:
                    with mk() as s:
                        s.execute(q).all()
                one()
                per_shard[name] = timed(one, args.repeat)

            def sk(q: Any = q) -> None:
                with SK() as s:
                    s.execute(q).all()

            def hs(q: Any = q) -> None:
                with HS() as s:
                    s.execute(q).all()
            sk(), hs()
            t_sk = timed(sk, args.repeat)
            t_hs = timed(hs, args.repeat)
            slowest = max(per_shard.values())
            print(f"| {label} | {slowest * 1000:.1f} ms | {t_sk * 1000:.1f} ms | "
                  f"{t_sk / slowest:.2f} | {t_hs * 1000:.1f} ms | {t_hs / slowest:.2f} |")

        top = select(Row).order_by(Row.score.desc(), Row.id).limit(10)

        def sk_top() -> list[Any]:
            with SK() as s:
                return [r.id for r in s.scalars(top).all()]

        def hs_top() -> None:
            with HS() as s:
                s.scalars(top).all()

        def one_top() -> None:
            with direct["s0"]() as s:
                s.scalars(top).all()

        with create_engine(dev.shards[0].primary.url).connect() as _:
            pass
        sk_top(), hs_top(), one_top()
        t1 = timed(one_top, args.repeat * 3)
        t2 = timed(sk_top, args.repeat * 3)
        t3 = timed(hs_top, args.repeat * 3)
        print(f"\n### 2. Top-10 by score across 4 shards of {args.rows // 4:,} rows (median of "
              f"{args.repeat * 3})\n")
        print("| contender | time | ratio to one shard |")
        print("|---|---:|---:|")
        print(f"| one shard, direct (floor) | {t1 * 1000:.2f} ms | 1.00 |")
        print(f"| shardkit (exact merge) | {t2 * 1000:.2f} ms | {t2 / t1:.2f} |")
        print(f"| horizontal_shard (40 unmerged rows) | {t3 * 1000:.2f} ms | {t3 / t1:.2f} |")
        cluster.dispose()

        cfg_path = os.path.join(d, "bench.toml")
        dev.write_config(cfg_path, {"groups": cfg["groups"]})
        out = subprocess.run([sys.executable, __file__, "--scan-child", cfg_path],
                             capture_output=True, text=True, check=True)
        print("\n### 3. Full scan of all rows with yield_per(2000), fresh process\n")
        print(out.stdout.strip())
    finally:
        dev.down()
        shutil.rmtree(d, ignore_errors=True)
    return 0


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def scan_child(cfg_path: str) -> int:
    cluster = shardkit.Cluster.from_config(cfg_path)
    SK = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    # Warm up: import, connect, compile.
    with SK() as s:
        s.execute(select(Row.id).where(Row.id == 1)).all()
        list(s.execute(select(Row.id, Row.score).limit(1).execution_options(yield_per=2000)))
    # ru_maxrss survives exec (it would report the parent's peak); VmHWM is this
    # process's own high-water mark, reset here so only the scan counts.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_mb("VmRSS")
    t = time.perf_counter()
    n = 0
    total = 0
    with SK() as s:
        for row in s.execute(select(Row.id, Row.score).execution_options(yield_per=2000)):
            n += 1
            total += row[1]
    dt = time.perf_counter() - t
    peak = status_mb("VmHWM")
    print(f"rows scanned: {n:,} in {dt:.1f} s ({n / dt:,.0f} rows/s); RSS before the scan "
          f"{base:.0f} MB; peak during it {peak:.0f} MB; growth {peak - base:.1f} MB")
    cluster.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
