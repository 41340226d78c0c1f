"""Cross-shard reads consumed in unusual ways, fuzzed against one database.

The promise (README, "Cross-shard reads", streaming with ``yield_per``/``stream_results``):
however the caller reads a ``ShardedSession`` result (``all()``, ``fetchmany(n)`` loops,
``partitions(n)``, ``first()``, ``scalars().first()``, ``one_or_none()``, iteration left
early), streamed or not, it gets what one database holding every row gives; and a result
abandoned early (``break``, ``first()``, ``close()``, ``session.close()`` with rows left,
an exception of the caller's mid-iteration) leaves no connection checked out and no server
backend of the test's ``application_name`` idle in a transaction or active once the session
has closed; the session's next statement reads correct rows.

``test_random_consumption_matches_one_database`` draws statements from the query fuzzer's
grammar (``test_query_fuzz.Gen``, same rows, on the session's 3-shard cluster
with a replica per shard and on one database ``scf_oracle``) and for each, at random: a
consumption mode (``MODES``: also reading on after ``commit()``/``rollback()``/``close()``
or ``result.close()``, compared with what one database does then; a second read in between;
the same statement streamed twice at once), execution options (none, ``yield_per=N``,
``stream_results``, ``max_row_buffer``), consistency (primaries or replicas), a no-op write
before the read (its shard then read in the session's transaction), and how the session
ends.  Seed ``SCATTERCONSUME_SEED``, number of cases ``SCATTERCONSUME_N`` (default 125,
times ``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py).  Seeds 1-6 x 1500 cases found no disagreement.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from fuzz_size import fuzz_size
from own_tables import cluster_with_tables, one_database
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from test_query_fuzz import (
    GROUPS,
    Customer,
    Gen,
    Order,
    QBase,
    Region,
    describe,
    make_rows,
    norm,
)

import shardkit

pytestmark = pytest.mark.integration

APP = "scatter-consume"
SEED = int(os.environ.get("SCATTERCONSUME_SEED", "20261209"))
N = fuzz_size("SCATTERCONSUME_N", 125)
MODES = ["all", "fetchmany", "partitions", "scalars_first", "first", "one_or_none", "iter_break",
         "raise_mid", "close_result", "session_close", "iter_all", "interleave", "two_streams",
         "fetchone", "mappings_fetchmany", "partitions_default", "with_result", "commit_mid",
         "rollback_mid", "after_commit", "after_rollback", "after_close", "freeze", "unique_scalars",
         "session_scalar", "after_result_close", "fetchmany_default", "scalars_partitions"]
SYMMETRIC = {"after_commit", "after_rollback", "after_close", "after_result_close"}


class Boom(Exception):
    """The caller's own error, raised mid-iteration."""


def _named(url: str) -> str:
    return make_url(url).update_query_dict({"application_name": APP}).render_as_string(hide_password=False)


class Env:
    def __init__(self, dev: Any, cluster: shardkit.Cluster, oracle: Any) -> None:
        self.dev = dev
        self.cluster = cluster
        self.oracle = oracle
        self.watch = {f"{s.name}/{'primary' if i < 0 else f'r{i}'}":
                      psycopg.connect((s.primary if i < 0 else s.replicas[i]).dsn, autocommit=True)
                      for s in dev.shards for i in range(-1, len(s.replicas))}

    def Session(self, consistency: str = "strong") -> Session:
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, consistency=consistency)()

    def busy_backends(self) -> dict[str, list[tuple[str, str]]]:
        """The test's backends (by node) that are in a transaction or running a query."""
        out = {}
        for node, c in self.watch.items():
            rows = c.execute("SELECT state, left(query, 80) FROM pg_stat_activity WHERE application_name = %s"
                             " AND state <> 'idle'", (APP,)).fetchall()
            if rows:
                out[node] = rows
        return out

    def leaks(self, wait: float = 2.0) -> str:
        """'' once no connection is checked out and no backend busy (waiting ``wait`` s
        for cancelled queries to end), else what is left."""
        deadline = time.monotonic() + wait
        while True:
            out = {n: st["checkedout"] for n, st in self.cluster.pool_stats().items() if st and st["checkedout"]}
            busy = self.busy_backends()
            if not out and not busy:
                return ""
            if time.monotonic() > deadline:
                return f"checked out {out}; busy backends {busy}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def env(sharded_dev):
    cfg = sharded_dev.config_dict()
    for s in cfg["shards"]:
        s["primary"] = _named(s["primary"])
        s["replicas"] = [_named(r) for r in s["replicas"]]
    customers, orders, regions = make_rows()
    oracle = one_database(sharded_dev, "scf_oracle", QBase.metadata)
    with oracle.begin() as c:
        c.execute(insert(Customer), customers)
        c.execute(insert(Order), orders)
        c.execute(insert(Region), regions)
    with cluster_with_tables(sharded_dev, {"shards": cfg["shards"], **GROUPS}, QBase.metadata) as cluster:
        e = Env(sharded_dev, cluster, oracle)
        with e.Session() as s:
            s.execute(insert(Customer), customers)
            s.execute(insert(Order), orders)
            s.execute(insert(Region), regions)
            s.commit()
        # the replicas hold every row before a read goes there
        deadline = time.monotonic() + 30
        for s in sharded_dev.shards:
            want = e.watch[f"{s.name}/primary"].execute("SELECT count(*) FROM qf_orders").fetchone()
            for i in range(len(s.replicas)):
                while e.watch[f"{s.name}/r{i}"].execute("SELECT count(*) FROM qf_orders").fetchone() != want:
                    assert time.monotonic() < deadline, "replicas did not catch up"
                    time.sleep(0.1)
        e.customer_ids = [r["id"] for r in customers]
        try:
            yield e
        finally:
            for c in e.watch.values():
                c.close()
            oracle.dispose()


def _opts(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["none", "none", "yield_per", "yield_per", "stream", "stream_buf"])
    if kind == "yield_per":
        return {"yield_per": rng.choice([1, 2, 3, 5, 17, 100])}
    if kind == "stream":
        return {"stream_results": True}
    if kind == "stream_buf":
        return {"stream_results": True, "max_row_buffer": rng.choice([1, 2, 5, 50])}
    return {}


def consume(s: Session, stmt: Any, opts: dict[str, Any], mode: str, k: int) -> Any:
    """Run ``stmt`` and read it as ``mode`` says; return what was read, normalised:
    ('rows', rows) or ('one', row-or-None), or ('raised', exception type name)."""
    try:
        if mode == "session_scalar":
            v = s.scalar(stmt, execution_options=opts)
            return "one", None if v is None else norm([(v,)])[0]
        r = s.execute(stmt, execution_options=opts) if opts else s.execute(stmt)
        if mode == "fetchmany_default":
            got = []
            while chunk := r.fetchmany():
                got += chunk
            return "rows", norm(got)
        if mode == "scalars_partitions":
            got = []
            for p in r.scalars().partitions(k):
                got += [(v,) for v in p]
            return "rows", norm(got)
        if mode == "all":
            return "rows", norm(r.all())
        if mode == "iter_all":
            return "rows", norm(list(r))
        if mode == "fetchmany":
            got = []
            while True:
                chunk = r.fetchmany(k)
                if not chunk:
                    break
                assert len(chunk) <= k
                got += chunk
            return "rows", norm(got)
        if mode == "partitions":
            got = []
            for p in r.partitions(k):
                assert 0 < len(p) <= k
                got += p
            return "rows", norm(got)
        if mode == "fetchone":
            got = []
            while (row := r.fetchone()) is not None:
                got.append(row)
            return "rows", norm(got)
        if mode == "mappings_fetchmany":
            m, got = r.mappings(), []
            while chunk := m.fetchmany(k):
                got += [tuple(x.values()) for x in chunk]
            return "rows", norm(got)
        if mode == "partitions_default":
            got = []
            for p in (r.partitions() if "yield_per" in opts else r.partitions(k)):
                got += p
            return "rows", norm(got)
        if mode == "with_result":
            got = []
            with r:
                for row in r:
                    got.append(row)
                    if len(got) >= k:
                        break
            return "prefix", norm(got)
        if mode == "interleave":
            # part of it, a whole other read in the same session, then the rest
            got = list(r.fetchmany(k))
            other = norm(s.execute(FOLLOW_UP).all())
            assert other == FOLLOW_WANT[0], "the read in between"
            got += r.all()
            return "rows", norm(got)
        if mode == "two_streams":
            r2 = s.execute(stmt, execution_options=opts) if opts else s.execute(stmt)
            a, b = [], []
            while True:
                x, y = r.fetchmany(k), r2.fetchmany(k)
                a += x
                b += y
                if not x and not y:
                    break
            assert Counter(norm(a)) == Counter(norm(b)), "the same statement twice at once"
            return "rows", norm(a)
        if mode in SYMMETRIC:
            # read on after the session's transaction ended: compared with one database's
            got = list(r.fetchmany(k))
            {"after_commit": s.commit, "after_rollback": s.rollback, "after_close": s.close,
             "after_result_close": r.close}[mode]()
            try:
                got += r.all()
            except Exception as e:  # noqa: BLE001
                return "raised_after", type(e).__name__
            return "rows", norm(got)
        if mode == "freeze":
            frozen = r.freeze()
            once = norm(frozen().all())
            assert norm(frozen().all()) == once, "a frozen result replays the same rows"
            return "rows", once
        if mode == "unique_scalars":
            return "rows", norm([(v,) for v in r.scalars().unique().all()])
        if mode in ("commit_mid", "rollback_mid"):
            got = norm(r.fetchmany(k))
            s.commit() if mode == "commit_mid" else s.rollback()
            return "prefix", got
        if mode == "first":
            row = r.first()
            return "one", None if row is None else norm([row])[0]
        if mode == "scalars_first":
            v = r.scalars().first()
            return "one", None if v is None else norm([(v,)])[0]
        if mode == "one_or_none":
            row = r.one_or_none()
            return "one", None if row is None else norm([row])[0]
        if mode == "iter_break":
            got = []
            for row in r:
                got.append(row)
                if len(got) >= k:
                    break
            return "prefix", norm(got)
        if mode == "raise_mid":
            got = []
            try:
                for row in r:
                    got.append(row)
                    if len(got) >= k:
                        raise Boom()
            except Boom:
                pass
            return "prefix", norm(got)
        if mode == "close_result":
            got = norm(r.fetchmany(k))
            r.close()
            return "prefix", got
        if mode == "session_close":
            got = norm(r.fetchmany(k))
            s.close()
            return "prefix", got
    except DBAPIError:
        raise
    except shardkit.ShardkitError:
        raise
    except Exception as e:  # noqa: BLE001 - MultipleResultsFound and the like, compared
        return "raised", type(e).__name__
    raise AssertionError(mode)


def expected(full: list[tuple[Any, ...]], mode: str, k: int, ordered: bool) -> Any:
    """What one database's ``full`` rows say ``mode`` returns, or None when the shard result
    is checked against ``full`` as a sub-multiset (an unordered prefix)."""
    if mode in ("all", "iter_all", "fetchmany", "partitions", "fetchone", "mappings_fetchmany",
                "partitions_default", "interleave", "two_streams", "freeze", "fetchmany_default"):
        return "rows", full
    if mode == "scalars_partitions":
        return "rows", [r[:1] for r in full]
    if mode in ("first", "scalars_first", "session_scalar"):
        if not full:
            return "one", None
        row = full[0] if mode == "first" else full[0][:1]
        if mode != "first" and row == (("NoneType", None),):  # scalars().first() of a NULL: None, as of no row
            row = None
        return ("one", row) if ordered else None
    if mode == "one_or_none":
        if len(full) > 1:
            return "raised", "MultipleResultsFound"
        return "one", full[0] if full else None
    return ("prefix", full[:k]) if ordered else None


def _within(got: Any, full: list[tuple[Any, ...]], mode: str) -> bool:
    """An unordered read's rows are among one database's."""
    kind, v = got
    if kind == "one":
        if v is None:  # no row, or (scalars().first()) a NULL first column
            return not full or (mode != "first" and (("NoneType", None),) in [r[:1] for r in full])
        return v in [r[:len(v)] for r in full]
    if kind == "prefix":
        return not Counter(v) - Counter(full)
    return False


FOLLOW_WANT: list[Any] = []
FOLLOW_UP = select(Customer.id, Customer.name, func.count(Order.id)).join(Order, isouter=True) \
    .group_by(Customer.id, Customer.name).order_by(Customer.id)


def test_random_consumption_matches_one_database(env, capsys):
    rng = random.Random(SEED)
    gen = Gen(random.Random(SEED + 1), env.customer_ids)
    with Session(env.oracle) as s:
        follow_want = norm(s.execute(FOLLOW_UP).all())
    FOLLOW_WANT[:] = [follow_want]
    problems: list[str] = []
    tally: Counter = Counter()
    cases = 0
    started = time.monotonic()
    while cases < N:
        case_ = gen.statement()
        if case_.stmt is None:
            continue
        try:
            with Session(env.oracle) as s:
                full = norm(s.execute(case_.stmt).all())
        except Exception:  # noqa: BLE001 - invalid SQL from the grammar
            continue
        mode = rng.choice(MODES)
        if mode == "one_or_none" and len(full) > 1 and rng.random() < 0.7:
            mode = "first"
        opts = _opts(rng)
        k = rng.choice([1, 1, 2, 3, 7, 40])
        consistency = rng.choice(["strong", "read_your_writes"])
        # a session that wrote (a row lock, no change) reads that shard in its transaction
        pre_write = rng.choice(env.customer_ids) if rng.random() < 0.3 else None
        end = rng.choice(["close", "close", "commit", "rollback"])
        cases += 1
        what = (f"mode={mode} k={k} opts={opts} consistency={consistency} pre_write={pre_write} "
                f"end={end}\n  {describe(case_)[:600]}")
        s = env.Session(consistency)
        try:
            try:
                if pre_write is not None:
                    s.execute(update(Customer).where(Customer.id == pre_write).values(name=Customer.name))
                got = consume(s, case_.stmt, opts, mode, k)
            except shardkit.ScatterRefused:
                tally["refused"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - a crash is a finding
                problems.append(f"CRASH {type(e).__name__}: {str(e)[:300]}\n  {what}")
                continue
            tally[mode] += 1
            if mode in SYMMETRIC or mode == "unique_scalars":
                with Session(env.oracle) as os_:
                    want = consume(os_, case_.stmt, opts, mode, k)
                if want[0] in ("raised", "raised_after") and got == want:
                    tally[f"{mode} raised alike"] += 1
                elif mode in SYMMETRIC and (want[0] == "rows" or got[0] == "rows"):
                    # rows where one database refuses to read on are fine if they are right
                    want = ("rows", full)
                # else unique() as one database's (NaNs, distinct objects, stay apart there too)
            else:
                want = expected(full, mode, k, case_.ordered)
            if want is None:
                ok = _within(got, full, mode)
            elif want[0] == "rows" and not case_.ordered and got[0] == "rows":
                ok = got[0] == "rows" and Counter(got[1]) == Counter(want[1])
            else:
                ok = got == want
            if not ok:
                problems.append(f"MISMATCH {what}\n  got  {str(got)[:400]}\n  want {str(want)[:400]}")
            if mode != "session_close":
                try:
                    again = norm(s.execute(FOLLOW_UP).all())
                except Exception as e:  # noqa: BLE001
                    problems.append(f"NEXT STATEMENT {type(e).__name__}: {str(e)[:300]}\n  after {what}")
                else:
                    if again != follow_want:
                        problems.append(f"NEXT STATEMENT wrong rows after {what}")
            if end == "commit":
                s.commit()
            elif end == "rollback":
                s.rollback()
        except Exception as e:  # noqa: BLE001
            problems.append(f"END {end} {type(e).__name__}: {str(e)[:300]}\n  after {what}")
        finally:
            s.close()
            leak = env.leaks()
            if leak:
                problems.append(f"LEAK {leak}\n  after {what}")
                env.cluster.dispose(close=True)
        if len(problems) >= 6:
            break
    with capsys.disabled():
        print(f"\nscatter consume fuzz: seed {SEED}, {cases} cases in {time.monotonic() - started:.1f}s: {dict(tally)}")
    assert not problems, f"{len(problems)} problems:\n" + "\n\n".join(problems)

