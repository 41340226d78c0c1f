"""``cluster.explain()`` against execution, over the random statements of the two
statement fuzzers: the SELECTs of ``test_query_fuzz`` (joins, subqueries, CTEs, GROUP
BY/HAVING, DISTINCT ON, UNION, pages) and the writes of ``test_dml_fuzz``
(UPDATE/DELETE with mixed key predicates, INSERT, upserts, executemany, ``lambda_stmt``).

Each statement is explained, then run in a new session (rolled back) on a 3-shard cluster
with one streaming replica per shard, counting the statements each node runs
(``before_cursor_execute`` on every node's engine).  They must agree: the same shards; the
same role on each (a read explained ``replica`` may run on the primary when no replica
is fresh enough; the fuzzer counts those); a refusal iff a refusal, of the same class (explain() does not foresee the
refusals that ask a database: those are allowed); and, for a read on several shards, a
merge that is the statement's kind (group-by, aggregate, ordered, concatenation, UNION).
``EXPLAINFUZZ_SEED`` / ``EXPLAINFUZZ_N`` change the seed / number of statements
(default 150, times ``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py).

The plain tests below the fuzzer are the minimised disagreements it found.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
import test_dml_fuzz as dz
import test_query_fuzz as qf
from own_tables import NodeStatements
from replica_env import replayed, replica_cluster
from sqlalchemy import insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import sessionmaker
from sqlalchemy.sql import lambdas, selectable

import shardkit

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("EXPLAINFUZZ_SEED", "8"))
N = fuzz_size("EXPLAINFUZZ_N", 150)

# Refusals execution makes after asking a database (explain() documents it cannot foresee
# them): an aggregate it does not know, text under a non-C collation, a nondeterministic one.
ASKS_DATABASE = ("over a nondeterministic collation", "text under the database's collation")


@dataclass
class Kit:
    dev: Any
    qc: shardkit.Cluster          # the query fuzzer's tables
    dc: shardkit.Cluster          # the write fuzzer's tables
    QSession: sessionmaker
    DSession: sessionmaker
    rec: NodeStatements
    customers: list[dict[str, Any]]
    drows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def kit(shardkit_module_cluster_factory) -> Iterator[Kit]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=1)
    qc = replica_cluster(dev, qf.GROUPS, qf.QBase.metadata)
    dc = replica_cluster(dev, dz.CONFIG, dz.Base.metadata)
    for s in qc.shard_names:
        qf.QBase.metadata.create_all(qc.primary(s))
        dz.Base.metadata.create_all(dc.primary(s))
        with dc.primary(s).begin() as c:
            try:
                with c.begin_nested():
                    c.exec_driver_sql(dz.CI)
            except sa_exc.DBAPIError:
                dz.CI_OK = False
    QS = sessionmaker(class_=shardkit.ShardedSession, cluster=qc)
    DS = sessionmaker(class_=shardkit.ShardedSession, cluster=dc)
    customers, orders, regions = qf.make_rows()
    with QS() as s:
        s.execute(insert(qf.Customer), customers)
        s.execute(insert(qf.Order), orders)
        s.execute(insert(qf.Region), regions)
        s.commit()
    rng = random.Random(1)
    drows: dict[str, list[dict[str, Any]]] = {}
    with DS() as s:
        for n, g in enumerate(dz.GROUPS):
            parents, children = dz._rows(g, rng, 1000 * n)
            drows[g.name] = parents
            for model, rows in ((g.parent, parents), (g.child, children)):
                s.execute(insert(model), [r for r in rows if r["k"] is not None])
                for i, r in enumerate(r for r in rows if r["k"] is None):
                    with shardkit.scope(shard=dc.shard_names[i % 3]):
                        s.execute(insert(model), [r])
        s.commit()
    qc.start_monitor()
    dc.start_monitor()
    replayed(dev)
    rec = NodeStatements([qc, dc], ("qf_", "dz8_"))
    yield Kit(dev, qc, dc, QS, DS, rec, customers, drows)
    rec.close()
    qc.dispose()
    dc.dispose()


# ---------------------------------------------------------------------------
# explain() and execution, side by side
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    route: Any                   # the Route, or the exception explain() raised
    error: BaseException | None  # what execution raised
    ran: list[tuple[str, str, str]]


def explain_and_run(cluster: shardkit.Cluster, Session: sessionmaker, rec: NodeStatements, stmt: Any,
                    params: Any = None) -> Outcome:
    rec.take()
    try:
        route: Any = cluster.explain(stmt, params)
    except Exception as e:  # noqa: BLE001 - compared with execution's
        route = e
    assert rec.take() == [], "explain() ran statements"
    error = None
    with Session() as s:
        try:
            r = s.execute(stmt, params)
            if getattr(r, "returns_rows", True):
                r.all()
        except Exception as e:  # noqa: BLE001 - compared with explain()'s
            error = e
        finally:
            s.rollback()
    return Outcome(route, error, rec.take())


def _inner(stmt: Any) -> Any:
    if isinstance(stmt, (lambdas.StatementLambdaElement, lambdas.NullLambdaStatement)):
        return stmt._resolved
    return stmt


def merge_problem(stmt: Any, merge: str) -> str | None:
    """Whether ``merge`` (a scatter read's) is the kind of merge ``stmt`` needs."""
    stmt = _inner(stmt)
    if isinstance(stmt, selectable.CompoundSelect):
        return None if "SELECTs" in merge else "a UNION merged otherwise"
    if not isinstance(stmt, selectable.Select):
        return None
    if merge.startswith("EXISTS"):
        return None
    if stmt._group_by_clauses:
        ok = merge.startswith(("group-by merge", "grouped by the shard key"))
        return None if ok else "GROUP BY merged otherwise"
    if merge.startswith(("group-by merge", "grouped by the shard key")):
        return "a merge by groups for a statement without GROUP BY"
    if merge.startswith("aggregate merge"):
        return None
    if stmt._order_by_clauses and not merge.startswith("ordered merge"):
        return "ORDER BY not merged in order"
    if not stmt._order_by_clauses and merge.startswith("ordered merge"):
        return "an ordered merge without ORDER BY"
    return None


def disagreement(o: Outcome, stmt: Any) -> str | None:
    """What explain() said that execution did not do (None: they agree)."""
    route, error, ran = o.route, o.error, o.ran
    if isinstance(route, Exception):
        if error is None:
            return f"explain refused ({type(route).__name__}: {route}), execution ran on {sorted(set(ran))}"
        if type(route) is not type(error):
            return f"explain raised {type(route).__name__}: {route}; execution {type(error).__name__}: {error}"
        if getattr(route, "construct", None) != getattr(error, "construct", None):
            return f"constructs differ: {route.construct!r} / {error.construct!r}"
        return None
    merge = route.merge or ""
    if merge.startswith("refused: "):
        if not isinstance(error, shardkit.ScatterRefused):
            return f"explain: {merge}; execution: {error!r} on {sorted({s for s, *_ in ran})}"
        return None
    shards = {s for s, *_ in ran}
    if error is not None:
        if isinstance(error, shardkit.ScatterRefused) and error.construct in ASKS_DATABASE \
                or isinstance(error, shardkit.ScatterRefused) and str(error.construct).endswith("()"):
            return None   # refusals that ask the database: explain() documents it cannot foresee them
        if isinstance(error, (sa_exc.DBAPIError, sa_exc.StatementError)) and not isinstance(
                error, shardkit.ShardkitError):
            # The database (or SQLAlchemy's compiler) refused it where it ran.
            return None if shards <= set(route.shards) else f"ran on {sorted(shards)}, explain {route}"
        return f"explain: {route}; execution raised {type(error).__name__}: {error}"
    if not route.tables and not ran:
        return None   # (no table: the recorder sees nothing; any shard answers)
    if shards != set(route.shards):
        return f"shards: explain {sorted(route.shards)} ({route.reason}); ran on {sorted(shards)}"
    roles = {r for _, r, _ in ran}
    if roles != {route.role} and not (route.role == "replica" and roles == {"primary"}):
        # (A read explained "replica" that ran on the primary: no replica was fresh enough
        # then, which explain() cannot foresee (README, explain); counted by Tally.)
        return f"role: explain {route.role}; ran on {sorted(roles)} ({route})"
    if route.is_scatter and not route.is_write:
        problem = merge_problem(stmt, merge)
        if problem:
            return f"merge: {problem}: {merge}"
    return None


@dataclass
class Tally:
    n: int = 0
    ran: int = 0
    refused: Counter = field(default_factory=Counter)
    scatter: int = 0
    replica: int = 0
    fell_back: int = 0            # reads explained "replica" that ran on a primary
    problems: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)

    def count(self, o: Outcome, what: str, stmt: Any, kind: str) -> None:
        self.n += 1
        self.kinds[kind] += 1
        if o.error is not None:
            self.refused[type(o.error).__name__] += 1
        else:
            self.ran += 1
            if isinstance(o.route, shardkit.Route) and o.route.is_scatter:
                self.scatter += 1
            if any(r == "replica" for _, r, _ in o.ran):
                self.replica += 1
            elif isinstance(o.route, shardkit.Route) and o.route.role == "replica" and o.ran:
                self.fell_back += 1
        problem = disagreement(o, stmt)
        if problem:
            self.problems.append(f"[{kind}] {problem}\n  {what[:400]}")


class DmlGen(dz.Gen):
    """The write fuzzer's generator, with its existing rows taken from what this module
    inserted (it has no one database to ask)."""

    def __init__(self, kit: Kit, rng: random.Random) -> None:
        super().__init__(type("E", (), {"next_rid": [50_000], "oracle": None})(), rng)
        self.kit = kit

    def _existing_row(self, g: Any) -> dict[str, Any] | None:
        rows = [r for r in self.kit.drows[g.name] if r["k"] is not None]
        r = self.vrng.choice(rows)
        return {"rid": r["rid"], "k": r["k"]}


def test_random_statements_run_where_explain_says(kit, capsys):
    rng = random.Random(SEED)
    qgen = qf.Gen(random.Random(rng.random()), [r["id"] for r in kit.customers])
    dgen = DmlGen(kit, random.Random(rng.random()))
    tally = Tally()
    while tally.n < N:
        if rng.random() < 0.55:
            case = qgen.statement()
            if case.stmt is None:
                continue   # (a legacy Query run by a function: nothing to explain)
            o = explain_and_run(kit.qc, kit.QSession, kit.rec, case.stmt)
            tally.count(o, qf.describe(case), case.stmt, case.kind)
        else:
            st = dgen.statement()
            if callable(st.build) and not hasattr(st.build, "_generate_cache_key"):
                continue   # (Query.update(): run by a function)
            o = explain_and_run(kit.dc, kit.DSession, kit.rec, st.build, st.params)
            tally.count(o, st.what, st.build, st.what.split(" ")[0] + " " + st.what.split(" ")[1])
    with capsys.disabled():
        print(f"\nexplain fuzz: seed {SEED}, {tally.n} statements, {tally.ran} ran "
              f"({tally.scatter} on several shards, {tally.replica} on replicas, "
              f"{tally.fell_back} explained as replica reads ran on a primary), refused {dict(tally.refused)}")
    problems = sorted(tally.problems, key=lambda p: "] role:" in p)
    assert not problems, f"{len(problems)} disagreements:\n" + "\n\n".join(problems[:40])
    assert tally.ran >= N // 2 and tally.scatter >= N // 10 and tally.replica >= N // 10, tally
    # (Healthy replicas: a fresh enough one serves nearly every read explained as a replica's.)
    assert tally.fell_back <= tally.replica // 4, tally


# ---------------------------------------------------------------------------
# Minimised disagreements
# ---------------------------------------------------------------------------


def test_an_orm_bulk_update_by_primary_key_is_explained_on_its_rows_shards(kit):
    """``update(Model)`` with a list of rows (ORM bulk UPDATE by primary key) runs each row
    on its shard key's shard; explain() routed the bare statement instead and refused it
    ("no shard key in its WHERE clause", or "sets its shard key ... on rows of s0, s1, s2")."""
    g = dz.GROUPS[0]
    by_shard: dict[str, dict[str, Any]] = {}
    for r in kit.drows[g.name]:
        if r["k"] is not None:
            by_shard.setdefault(kit.dc.shard_for(g.parent, r["k"]), r)
    rows = [{"rid": r["rid"], "k": r["k"], "v": 300} for r in list(by_shard.values())[:2]]
    o = explain_and_run(kit.dc, kit.DSession, kit.rec, update(g.parent), rows)
    assert o.error is None, o.error
    assert isinstance(o.route, shardkit.Route), o.route
    assert set(o.route.shards) == {s for s, *_ in o.ran} == set(list(by_shard)[:2])
    assert o.route.is_write and o.route.role == "primary"
    # refused alike: a row without its shard key, and rows with a WHERE clause
    for stmt, bad in ((update(g.parent), [{"rid": rows[0]["rid"], "v": 1}]),
                      (update(g.parent).where(g.parent.v > 0), rows)):
        o = explain_and_run(kit.dc, kit.DSession, kit.rec, stmt, bad)
        assert type(o.route) is type(o.error) and isinstance(o.error, shardkit.ShardkitError), o
        assert o.ran == []


def test_a_plain_read_that_a_replica_serves_is_explained_as_a_replica_read(kit):
    """A new session's plain read (default consistency read_your_writes) runs on a replica
    when one is fresh enough: explain() said role 'primary' for every read."""
    cid = kit.customers[0]["id"]
    o = explain_and_run(kit.qc, kit.QSession, kit.rec, select(qf.Customer).where(qf.Customer.id == cid))
    assert o.error is None and {r for _, r, _ in o.ran} == {"replica"}
    assert o.route.role == "replica"


@pytest.mark.parametrize("how, role", [
    ("for update", "primary"),
    ("shardkit_role=primary", "primary"),
    ("strong", "primary"),
    ("strong, shardkit_role=replica", "replica"),
    ("scope(role=primary)", "primary"),
    ("scope(consistency=strong)", "primary"),
    ("scope(role=replica) and strong", "primary"),
    ("eventual", "replica"),
])
def test_the_role_explained_for_a_read_is_where_it_runs(kit, how, role):
    cid = kit.customers[1]["id"]
    stmt = select(qf.Customer).where(qf.Customer.id == cid)
    sc: dict = {}
    if how == "for update":
        stmt = stmt.with_for_update()
    elif how == "shardkit_role=primary":
        stmt = stmt.execution_options(shardkit_role="primary")
    elif how == "strong":
        stmt = stmt.execution_options(shardkit_consistency="strong")
    elif how == "strong, shardkit_role=replica":
        stmt = stmt.execution_options(shardkit_consistency="strong", shardkit_role="replica")
    elif how == "scope(role=primary)":
        sc = {"role": "primary"}
    elif how == "scope(consistency=strong)":
        sc = {"consistency": "strong"}
    elif how == "scope(role=replica) and strong":
        sc = {"role": "replica"}
        stmt = stmt.execution_options(shardkit_consistency="strong")
    elif how == "eventual":
        stmt = stmt.execution_options(shardkit_consistency="eventual")
    with shardkit.scope(**sc):
        o = explain_and_run(kit.qc, kit.QSession, kit.rec, stmt)
    assert o.error is None and o.route.role == role, o
    assert {r for _, r, _ in o.ran} == {role}, o


def test_an_orm_bulk_insert_returning_is_refused_by_explain_as_by_execution(kit):
    """``insert(Model).returning(...)`` given rows as parameters is refused before it runs
    (RoutingError); explain() said it would run on the rows' shards."""
    g = dz.GROUPS[0]
    stmt = insert(g.parent).returning(g.parent.rid)
    o = explain_and_run(kit.dc, kit.DSession, kit.rec, stmt, [{"rid": 90_001, "k": 3, "v": 1, "t": "x"}])
    assert isinstance(o.error, shardkit.RoutingError) and type(o.route) is type(o.error), o
    assert o.ran == []
