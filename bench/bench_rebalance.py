"""Online bucket moves: throughput, the write pause, and the latency of other writes.

    python bench/bench_rebalance.py                    # 2M rows on s0, half of them move to s1
    python bench/bench_rebalance.py --rows 200000      # a quicker run

On a 2-shard local cluster (primaries only; the catalog is a database on s0's
server), every bucket starts on s0.  Side by side in one run:

1. raw     - the floor: the moving rows, already in a table of their own, piped
             with psycopg from ``COPY ... TO STDOUT (FORMAT binary)`` on s0 to
             ``COPY ... FROM STDIN`` on s1.
2. quiet   - ``shardkit rebalance`` moving half of the buckets (the same number of
             rows) from s0 to s1 with no other load, like the raw pipe: its copy
             step alone, and end to end (capture, copy, catch-up, cut-over,
             verification, clean-up); then the same buckets back to s0.
   move    - the same move again while writers run, by ``shardkit rebalance apply``
             in its own process (``--mover thread`` runs it in the writers'
             process instead, where its COPY loop competes with them for the GIL).
3. pause   - writer threads updating keys of the moving buckets through
             ``shardkit.run_transaction``; the longest time one write took during
             the move (paused at the cut-over, refused by the old owner, retried).
4. latency - p50/p99 write latency of keys that do not move, with the same writers
             running (both groups, after the same VACUUM): for 6 s before the move
             starts (the baseline; its first second left out) and from the move's
             start to its end.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import threading
import time
from typing import Any

import psycopg
from sqlalchemy import BigInteger, Integer, String, create_engine, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.devcluster import DevCluster


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "bench_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(64))


GROUPS = {"groups": {"accounts": {"tables": {"bench_accounts": "id"}}}}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Writers:
    """Threads each updating one random key at a time from their key set, timing each write."""

    def __init__(self, Session: Any, keys: list[int], threads: int) -> None:
        self.Session, self.keys = Session, keys
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.started: list[float] = []  # wall-clock start of each write, for the per-step breakdown
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            k = rnd.choice(self.keys)
            t = time.perf_counter()
            try:
                shardkit.run_transaction(self.Session, lambda s, k=k: s.execute(
                    update(Account).where(Account.id == k).values(balance=Account.balance + 1)))
            except Exception as e:  # noqa: BLE001 - reported at the end
                self.errors.append(e)
                return
            with self.lock:
                self.latencies.append(time.perf_counter() - t)
                self.started.append(time.time() - (time.perf_counter() - t))
            time.sleep(0.002)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows on s0 (half of them move)")
    ap.add_argument("--batch-buckets", type=int, default=256)
    ap.add_argument("--writers", type=int, default=2, help="threads writing moving keys, and as many others")
    ap.add_argument("--duty", type=float, default=1.0,
                    help="the mover's duty cycle in the move under writers (rebalance apply --duty)")
    ap.add_argument("--mover", choices=["process", "thread"], default="process",
                    help="run the move under writers as a CLI process (default) or in a thread")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="shardkit-bench-") as d:
        import os
        os.chmod(d, 0o755)
        dev = DevCluster.up(f"{d}/c", shards=2, replicas=0)
        try:
            return run(dev, args)
        finally:
            dev.down()


def run(dev: DevCluster, args: argparse.Namespace) -> int:
    s0, s1 = dev.shards[0].primary, dev.shards[1].primary
    catalog = dev.create_catalog()
    cfg = {**dev.config_dict(), **GROUPS, "catalog": {"url": catalog}}
    one = {**cfg, "shards": cfg["shards"][:1]}
    for node in (s0, s1):
        eng = create_engine(node.url)
        Base.metadata.create_all(eng)
        eng.dispose()

    # Load s0 (all buckets) with COPY; the raw baseline's table gets the rows that will move.
    n = args.rows
    moving = set(range(512))
    all_rows, moving_rows = io.StringIO(), io.StringIO()
    for i in range(n):
        line = f"{i}\t{i % 1000}\tnote-{i:012d}-abcdefghijklmnopqrstuvwxyz\n"
        all_rows.write(line)
        if shardkit.bucket_for(i, 1024) in moving:
            moving_rows.write(line)
    with psycopg.connect(s0.dsn) as c:
        with c.cursor().copy("COPY bench_accounts FROM STDIN") as cp:
            cp.write(all_rows.getvalue())
        c.execute("CREATE TABLE raw_src (LIKE bench_accounts INCLUDING ALL)")
        with c.cursor().copy("COPY raw_src FROM STDIN") as cp:
            cp.write(moving_rows.getvalue())
        c.execute("ANALYZE bench_accounts")
    with psycopg.connect(s1.dsn) as c:
        c.execute("CREATE TABLE raw_dst (LIKE bench_accounts INCLUDING ALL)")
    n_moving = moving_rows.getvalue().count("\n")
    del all_rows, moving_rows

    # 1. raw COPY pipe, the floor: the median of three.
    raw_times = []
    for _ in range(3):
        with psycopg.connect(s1.dsn, autocommit=True) as dst:
            dst.execute("TRUNCATE raw_dst")
        t = time.perf_counter()
        with psycopg.connect(s0.dsn) as src, psycopg.connect(s1.dsn) as dst:
            with src.cursor().copy("COPY raw_src TO STDOUT (FORMAT binary)") as out, \
                    dst.cursor().copy("COPY raw_dst FROM STDIN (FORMAT binary)") as inp:
                for data in out:
                    inp.write(data)
        raw_times.append(time.perf_counter() - t)
    raw_s = sorted(raw_times)[1]
    with psycopg.connect(s1.dsn, autocommit=True) as dst:
        dst.execute("DROP TABLE raw_dst")

    # The catalog starts with the 1-shard map: every bucket on s0.
    c1 = shardkit.Cluster.from_config(one, follow_map=False)
    rebalance.init(c1)
    c1.dispose()
    cluster = shardkit.Cluster.from_config(cfg)
    rebalance.init(cluster)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    moving_keys = [k for k in range(0, n, 97) if shardkit.bucket_for(k, 1024) in moving][:2000]
    other_keys = [k for k in range(0, n, 89) if shardkit.bucket_for(k, 1024) not in moving][:2000]

    live = cluster.config.bucket_map
    new_map = tuple("s1" if b in moving else s for b, s in enumerate(live))
    plan = plan_from_maps(live, new_map, "bench: half of the buckets to s1")

    # 2. the same move with nothing else running (as the raw pipe ran), there and back.
    quiet = []
    for p in (plan, plan_from_maps(new_map, live, "bench: the same buckets back to s0")):
        t = time.perf_counter()
        quiet_id = rebalance.Mover(cluster, grace=0.5, progress=lambda line: None).apply(
            p, max_buckets=args.batch_buckets)
        quiet.append((time.perf_counter() - t, _copy_seconds(cluster, quiet_id), _to_switch(cluster, quiet_id)))
    cluster.refresh_map()
    # What autovacuum would do between moves: the next move starts without dead rows.
    for node in (s0, s1):
        with psycopg.connect(node.dsn, autocommit=True) as c:
            c.execute("VACUUM ANALYZE bench_accounts")

    lines: list[str] = []
    mover = rebalance.Mover(cluster, grace=0.5, duty=args.duty, progress=lines.append)
    with Writers(Session, moving_keys, args.writers) as mw, Writers(Session, other_keys, args.writers) as ow:
        # 4. The baseline: these writers, these tables, no move (the first second left out).
        writers_from = time.time()
        time.sleep(6)
        move_from = time.time()
        t = time.perf_counter()
        if args.mover == "thread":
            move_id = mover.apply(plan, max_buckets=args.batch_buckets)
        else:
            move_id = _apply_in_process(dev, catalog, plan, args.batch_buckets, args.duty, lines)
        move_s = time.perf_counter() - t
        move_to = time.time()
        time.sleep(1)
    errors = mw.errors + ow.errors
    baseline = [lat for at, lat in zip(ow.started, ow.latencies) if writers_from + 1 <= at < move_from]
    during = [lat for at, lat in zip(ow.started, ow.latencies) if move_from <= at < move_to]
    moving_during = [lat for at, lat in zip(mw.started, mw.latencies) if move_from <= at < move_to]
    copy_s = _copy_seconds(cluster, move_id)

    print(f"{n:,} rows on s0; {n_moving:,} rows in {len(moving)} buckets move to s1; "
          f"batches of {args.batch_buckets} buckets; {args.writers}+{args.writers} writer threads; "
          f"under writers: mover in a {args.mover}, duty {args.duty}; "
          f"Python {sys.version.split()[0]}\n")
    print("| measure | value | ratio |")
    print("|---|---:|---:|")
    print(f"| raw COPY pipe, {n_moving:,} rows (median of 3) | {n_moving / raw_s:,.0f} rows/s ({raw_s:.2f} s; "
          f"runs {', '.join(f'{x:.2f}' for x in raw_times)}) | 1.00 |")
    for label, (q_move, q_copy, q_switch) in zip(("s0 -> s1", "back to s0"), quiet):
        print(f"| quiet move {label}, copy step only | {n_moving / q_copy:,.0f} rows/s ({q_copy:.2f} s) | "
              f"{raw_s / q_copy:.2f} |")
        print(f"| quiet move {label}, start to switch (capture, copy, catch-up, cut-over) | "
              f"{n_moving / q_switch:,.0f} rows/s ({q_switch:.2f} s) | {raw_s / q_switch:.2f} |")
        print(f"| quiet move {label}, end to end | {n_moving / q_move:,.0f} rows/s ({q_move:.2f} s) | "
              f"{raw_s / q_move:.2f} |")
    print(f"| move under writers, copy step only | {n_moving / copy_s:,.0f} rows/s ({copy_s:.2f} s) | "
          f"{raw_s / copy_s:.2f} |")
    w_switch = _to_switch(cluster, move_id)
    print(f"| move under writers, start to switch | {n_moving / w_switch:,.0f} rows/s ({w_switch:.2f} s) | "
          f"{raw_s / w_switch:.2f} |")
    print(f"| move under writers, end to end (copy, catch-up, switch, verify, clean-up) | "
          f"{n_moving / move_s:,.0f} rows/s ({move_s:.2f} s) | {raw_s / move_s:.2f} |")
    print(f"| longest cut-over pause (mover's measure) | {_longest_pause(cluster, move_id) * 1000:.0f} ms | |")
    print(f"| longest write of a moving key during the move (writers' measure) | "
          f"{max(moving_during) * 1000:.0f} ms | |")
    print(f"| writes of non-moving keys, p50 / p99, same writers before the move ({len(baseline)} writes) | "
          f"{pct(baseline, 50) * 1000:.2f} / {pct(baseline, 99) * 1000:.2f} ms | |")
    print(f"| writes of non-moving keys, p50 / p99, during the move ({len(during)} writes) | "
          f"{pct(during, 50) * 1000:.2f} / {pct(during, 99) * 1000:.2f} ms | "
          f"p99 {pct(during, 99) / pct(baseline, 99):.2f}x |")
    print("\np99 of writes of non-moving keys by the step the mover was in (vs the baseline p99):")
    for step, lo, hi in _step_windows(cluster, move_id):
        in_step = [lat for at, lat in zip(ow.started, ow.latencies) if lo <= at < hi]
        if in_step:
            print(f"  {step:<28} {len(in_step):>6} writes  p99 {pct(in_step, 99) * 1000:6.2f} ms "
                  f"({pct(in_step, 99) / pct(baseline, 99):.2f}x)")
    print(f"\nwrites during the move: {len(moving_during)} to moving keys, {len(during)} to others; "
          f"errors: {len(errors)}")
    for line in lines:
        print("  " + line)
    cluster.dispose()
    return 1 if errors else 0


def _apply_in_process(dev: DevCluster, catalog: str, plan: Any, batch_buckets: int, duty: float,
                      lines: list[str]) -> int:
    """Run the move as an operator does: `shardkit rebalance apply --plan FILE`."""
    import json
    import os
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        cfg_path, plan_path = os.path.join(d, "shardkit.toml"), os.path.join(d, "plan.json")
        dev.write_config(cfg_path, {**GROUPS, "catalog": {"url": catalog}})
        with open(plan_path, "w", encoding="utf-8") as f:
            json.dump(plan.as_dict(), f)
        r = subprocess.run([sys.executable, "-m", "shardkit.cli", "rebalance", "apply", "--config", cfg_path,
                            "--plan", plan_path, "--batch-buckets", str(batch_buckets), "--grace", "0.5",
                            "--duty", str(duty)],
                           capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"rebalance apply failed: {r.stderr}")
    lines.extend(r.stdout.splitlines())
    return int(next(line.split()[1].rstrip(":") for line in r.stdout.splitlines() if line.startswith("move ")))


def _longest_pause(cluster: Any, move_id: int) -> float:
    from sqlalchemy import text

    with cluster.catalog.engine.connect() as c:
        return float(c.execute(text(
            "SELECT (detail->>'longest_pause_s')::float FROM shardkit_catalog.journal "
            "WHERE move_id = :m AND step = 'done'"), {"m": move_id}).scalar())


def _step_windows(cluster: Any, move_id: int) -> list[tuple[str, float, float]]:
    """(what the mover was doing, from, to) in wall-clock seconds, from the journal."""
    from sqlalchemy import text

    with cluster.catalog.engine.connect() as c:
        rows = c.execute(text("SELECT step, extract(epoch FROM at) FROM shardkit_catalog.journal "
                              "WHERE move_id = :m ORDER BY id"), {"m": move_id}).all()
    doing = {"planned": "capture", "capturing": "copy", "copied": "catch-up and switch",
             "switched": "grace, then verification", "verified": "clean-up"}
    return [(doing.get(a[0], a[0]), float(a[1]), float(b[1])) for a, b in zip(rows, rows[1:])
            if a[0] in doing]


def _to_switch(cluster: Any, move_id: int) -> float:
    """Seconds from the move's start to its (last) switch: when the new owner serves the rows."""
    from sqlalchemy import text

    with cluster.catalog.engine.connect() as c:
        return float(c.execute(text(
            "SELECT extract(epoch FROM max(at) FILTER (WHERE step = 'switched') - "
            "min(at) FILTER (WHERE step = 'planned')) FROM shardkit_catalog.journal "
            "WHERE move_id = :m"), {"m": move_id}).scalar())


def _copy_seconds(cluster: Any, move_id: int) -> float:
    from sqlalchemy import text

    with cluster.catalog.engine.connect() as c:
        return float(c.execute(text(
            "SELECT sum((detail->>'seconds')::float) FROM shardkit_catalog.journal "
            "WHERE move_id = :m AND step = 'copied'"), {"m": move_id}).scalar())


if __name__ == "__main__":
    sys.exit(main())
