"""``cluster.explain()`` tells the truth: for a broad set of statements (ORM and Core), what
it says (the shards, the split ``IN`` values, a scatter and its merge, or the refusal and its
class) is what running the statement in a new session does, counted on every node of a real
3-shard cluster with replicas.  And explain() runs nothing: it neither touches a node nor takes
a turn of the shards that reads of reference rows take in turn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    bindparam,
    delete,
    distinct,
    event,
    func,
    insert,
    lambda_stmt,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import sessionmaker

import shardkit
from models import Country, Customer, Device, Event, Order, User

pytestmark = pytest.mark.integration

TABLES = ("users", "orders", "events", "customers", "countries", "devices")


class Recorder:
    """Every statement a node runs that names one of the models' tables: (shard, role, sql,
    parameters)."""

    def __init__(self, cluster: shardkit.Cluster) -> None:
        self.cluster = cluster
        self.seen: list[tuple[str, str, str, Any]] = []
        self.engines = [cluster.primary(s) for s in cluster.shard_names] + [
            cluster.engine(s, "replica", i)
            for s in cluster.shard_names for i in range(cluster.replica_count(s))]
        for eng in self.engines:
            event.listen(eng, "before_cursor_execute", self.grab)

    def grab(self, conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if any(t in statement for t in TABLES) and "pg_catalog" not in statement:
            info = conn.engine.info
            self.seen.append((info["shard"], info["role"], statement, parameters))

    def close(self) -> None:
        for eng in self.engines:
            event.remove(eng, "before_cursor_execute", self.grab)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, str, str, Any]]]:
        self.seen.clear()
        out: list[tuple[str, str, str, Any]] = []
        try:
            yield out
        finally:
            out.extend(self.seen)
            self.seen.clear()


@pytest.fixture(scope="module")
def kit(sharded_session_env):
    env = sharded_session_env
    cluster = env.cluster
    tables = ", ".join(TABLES)
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {tables} CASCADE"))
    with env.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in range(1, 31))
        s.add_all(Order(id=k, user_id=k % 30 + 1, amount=k) for k in range(1, 61))
        s.add_all(Event(id=k, payload=f"e{k}") for k in (5, 500, 999, 1000, 4000, 5000, 9000))
        s.add_all(Customer(region=r, id=i, name=r) for i, r in enumerate(("eu", "uk", "us", "ca", "jp")))
        s.add_all(Country(code=c, name=c) for c in ("fr", "de", "us"))
        s.commit()
    rec = Recorder(cluster)
    yield cluster, env.Session, rec
    rec.close()


def run(Session: sessionmaker, stmt: Any, params: Any = None, **eo: Any) -> Any:
    """Run ``stmt`` in a new session (rolled back); its rows, or the exception it raised."""
    with Session() as s:
        try:
            res = s.execute(stmt, params, execution_options=eo) if eo else s.execute(stmt, params)
            return res.all() if getattr(res, "returns_rows", True) else res.rowcount
        except (shardkit.ShardkitError, DBAPIError) as e:
            return e
        finally:
            s.rollback()


def explained(cluster: shardkit.Cluster, rec: Recorder, stmt: Any, params: Any = None,
              **kw: Any) -> Any:
    """explain()'s Route, or the exception it raised; it must run nothing."""
    with rec.recording() as ran:
        try:
            route = cluster.explain(stmt, params, **kw)
        except shardkit.ShardkitError as e:
            route = e
    assert ran == [], f"explain() ran statements: {ran}"
    return route


def check(cluster: shardkit.Cluster, Session: sessionmaker, rec: Recorder, stmt: Any,
          params: Any = None, *, all_shards: bool = False, scope: dict | None = None) -> Any:
    """explain(stmt) agrees with running stmt (both inside ``shardkit.scope(**scope)``): the
    same refusal (class and construct), or the same shards, the same split of IN values, a
    merge refused exactly when execution refuses it."""
    with shardkit.scope(**scope) if scope else contextlib.nullcontext():
        route = explained(cluster, rec, stmt, params, all_shards=all_shards)
        with rec.recording() as ran:
            out = run(Session, stmt, params, **({"shardkit_all_shards": True} if all_shards else {}))
    if isinstance(route, shardkit.Route) and (route.merge or "").startswith("refused: "):
        # explain() describes a merge shardkit does not do; execution refuses it so.
        assert isinstance(out, shardkit.ScatterRefused), f"explain: {route.merge}; execution: {out!r}"
        assert route.merge == f"refused: {out}"
        return route
    if isinstance(out, DBAPIError) and isinstance(route, shardkit.Route):
        # Ran, and the database refused it (a foreign key): where it ran is still the route's.
        assert ran and {shard for shard, *_ in ran} <= set(route.shards), (str(route), ran)
        return route
    if isinstance(route, Exception) or isinstance(out, Exception):
        assert type(route) is type(out), f"explain: {route!r}\nexecution: {out!r}"
        assert getattr(route, "construct", None) == getattr(out, "construct", None)
        return route
    shards = {shard for shard, *_ in ran}
    assert shards == set(route.shards), (str(route), ran)
    forced = (scope or {}).get("role") or _own_option(stmt, "shardkit_role")
    if forced == "replica" and not route.is_write and getattr(stmt, "_for_update_arg", None) is None:
        assert all(role == "replica" for _, role, *_ in ran), ran
    elif not (scope or {}).get("consistency"):
        assert all(role == "primary" for _, role, *_ in ran), ran  # the session reads "strong"
    if route.split:
        for shard, part in route.split.items():
            sent = [p for s, _, _, p in ran if s == shard]
            assert sent, shard
            for values in (part.values() if isinstance(part, dict) else [_flat(part)]):
                assert any(set(map(str, values)) <= set(map(str, _flat(p))) for p in sent), \
                    (shard, part, sent)
    return route


def _own_option(stmt: Any, name: str) -> Any:
    return (getattr(stmt, "_execution_options", None) or {}).get(name)


def _flat(params: Any) -> list[Any]:
    if isinstance(params, dict):
        return [x for v in params.values() for x in (v if isinstance(v, (list, tuple)) else [v])]
    if isinstance(params, (list, tuple)):
        return [x for p in params for x in _flat(p)]
    return [params]


# -- what explain() said, and what ran, differed ------------------------------------------


def test_a_lambda_statement_read_on_every_shard_is_merged_as_explain_says(kit):
    """A ``lambda_stmt`` routes and merges as the statement it builds (README); explain()
    said its merge was refused ("cannot merge StatementLambdaElement results")."""
    cluster, Session, rec = kit
    stmt = lambda_stmt(lambda: select(func.count(User.id)))
    route = check(cluster, Session, rec, stmt)
    assert not route.merge.startswith("refused"), route.merge
    assert run(Session, stmt) == [(30,)]


CASES = {
    "keyed read": lambda: select(User).where(User.id == 7),
    "keyed core read": lambda: select(User.__table__.c.name).where(User.__table__.c.id == 7),
    "IN across shards": lambda: select(User).where(User.id.in_([1, 2, 3, 4, 5, 6])),
    "IN expanding param": lambda: (select(User).where(User.id.in_(bindparam("ids", expanding=True))),
                                   {"ids": [1, 2, 3, 4, 5]}),
    "IN with NULL": lambda: select(User).where(User.id.in_([1, None, 9])),
    "BETWEEN range": lambda: select(Event).where(Event.id.between(10, 2000)),
    "range >=": lambda: select(Event.id).where(Event.id >= 5000).order_by(Event.id),
    "list IN": lambda: select(Customer).where(Customer.region.in_(["eu", "us", "zz"])),
    "list eq default": lambda: select(Customer).where(Customer.region == "jp"),
    "reference read": lambda: select(Country).order_by(Country.code),
    "keyless ORDER BY LIMIT": lambda: select(User).order_by(User.id.desc()).limit(4),
    "keyless GROUP BY": lambda: select(Order.user_id, func.sum(Order.amount)).group_by(Order.user_id),
    "keyless aggregates": lambda: select(func.count(), func.avg(Order.amount), func.max(Order.id)),
    "keyless DISTINCT": lambda: select(Order.amount).distinct().order_by(Order.amount),
    "count distinct": lambda: select(func.count(distinct(Order.amount))),
    "join colocated": lambda: select(User.name, Order.id).join(Order, Order.user_id == User.id)
    .where(User.id == 3),
    "join not colocated": lambda: select(User.id, Event.id).join(Event, Event.id == User.id),
    "exists keyless": lambda: select(select(User).where(User.name == "u3").exists()),
    "union all": lambda: union_all(select(User.id), select(Order.user_id)),
    "FOR UPDATE keyed": lambda: select(User).where(User.id == 4).with_for_update(),
    "FOR UPDATE keyless": lambda: select(User).with_for_update(),
    "FOR UPDATE LIMIT": lambda: select(User).order_by(User.id).limit(2).with_for_update(),
    "keyed update": lambda: update(User).where(User.id == 5).values(name="x"),
    "update IN": lambda: update(User).where(User.id.in_([1, 2, 3, 4])).values(name="x"),
    "keyless update": lambda: update(User).values(name="x"),
    "keyless delete": lambda: delete(Order).where(Order.amount > 1000),
    "update key move": lambda: update(User).where(User.id == 5).values(id=6),
    "reference update": lambda: update(Country).where(Country.code == "fr").values(name="F"),
    "insert rows": lambda: (insert(User), [{"id": k, "name": "n"} for k in range(100, 106)]),
    "core insert rows": lambda: (insert(User.__table__), [{"id": k, "name": "n"} for k in range(200, 206)]),
    "insert one": lambda: insert(User).values(id=300, name="n"),
    "insert select": lambda: insert(Event).from_select(["id", "payload"], select(Event.id + 1, Event.payload)),
    "from_statement": lambda: select(User).from_statement(select(User).where(User.id == 3)),
    "from_statement keyless": lambda: select(User).from_statement(select(User).order_by(User.id)),
    "lambda keyed": lambda: lambda_stmt(lambda: select(User).where(User.id == 8)),
    "lambda keyless": lambda: lambda_stmt(lambda: select(User.id).order_by(User.id).limit(3)),
    "params() IN": lambda: select(User).where(User.id.in_(bindparam("ids", expanding=True))).params(ids=[1, 2, 3]),
    "text": lambda: text("SELECT count(*) FROM users"),
    "devices keyless": lambda: select(func.count(Device.id)),
    "contradiction": lambda: select(User).where(User.id == 1, User.id == 2),
}


@pytest.mark.parametrize("case", CASES)
def test_explain_matches_execution(kit, case):
    cluster, Session, rec = kit
    built = CASES[case]()
    stmt, params = built if isinstance(built, tuple) else (built, None)
    check(cluster, Session, rec, stmt, params)


@pytest.mark.parametrize("case", ["keyless update", "keyless delete", "text", "keyless GROUP BY"])
def test_explain_all_shards_matches_execution(kit, case):
    cluster, Session, rec = kit
    built = CASES[case]()
    stmt, params = built if isinstance(built, tuple) else (built, None)
    check(cluster, Session, rec, stmt, params, all_shards=True)


SCOPED = {
    "keyless read, scope shard": (lambda: select(User.id).order_by(User.id), {"shard": "s1"}),
    "keyed read, scope shard": (lambda: select(User).where(User.id == 1), {"shard": "s2"}),
    "insert, scope shard": (lambda: insert(User).values(id=301, name="n"), {"shard": "s0"}),
    "reference write, scope shard": (lambda: update(Country).values(name="x"), {"shard": "s0"}),
    "keyless read, scope key": (lambda: select(Order.id).order_by(Order.id), {"key": 7}),
    "keyless update, scope key": (lambda: update(Order).values(amount=1), {"key": 7}),
    "keyless update, scope all_shards": (lambda: update(Order).values(amount=1), {"all_shards": True}),
    "keyless read, scope strict": (lambda: select(User.id), {"strict": True}),
    "keyed read, scope strict": (lambda: select(User.id).where(User.id == 3), {"strict": True}),
    "keyless read, scope replica": (lambda: select(func.count(User.id)), {"role": "replica"}),
    "keyed read, scope eventual": (lambda: select(User.id).where(User.id.in_([1, 2, 3])),
                                   {"consistency": "eventual"}),
    "reference read, scope key": (lambda: select(Country.code).order_by(Country.code), {"key": 1}),
}


@pytest.mark.parametrize("case", SCOPED)
def test_explain_inside_a_scope_matches_execution_there(kit, case):
    cluster, Session, rec = kit
    build, scope = SCOPED[case]
    check(cluster, Session, rec, build(), scope=scope)


OWN_OPTIONS = {
    "shardkit_shard": lambda: select(User.id).execution_options(shardkit_shard="s1"),
    "set_shard_id": lambda: select(User).options(set_shard_id("s2")),
    "shardkit_all_shards update": lambda: update(User).values(name="y")
    .execution_options(shardkit_all_shards=True),
    "shardkit_all_shards text": lambda: text("SELECT count(*) FROM orders")
    .execution_options(shardkit_all_shards=True),
    "shardkit_strict": lambda: select(User.id).execution_options(shardkit_strict=True),
    "shardkit_role replica": lambda: select(User.id).where(User.id.in_([4, 5, 6]))
    .execution_options(shardkit_role="replica"),
    "unknown shard": lambda: select(User.id).execution_options(shardkit_shard="nope"),
}


@pytest.mark.parametrize("case", OWN_OPTIONS)
def test_explain_follows_the_statements_own_execution_options(kit, case):
    cluster, Session, rec = kit
    check(cluster, Session, rec, OWN_OPTIONS[case]())


# -- generated: shapes x key predicates x verbs x options x scopes --------------------------

KEYS = st.integers(min_value=-3, max_value=40)
EVENT_IDS = st.sampled_from([0, 5, 999, 1000, 2500, 4999, 5000, 9000])
REGIONS = st.sampled_from(["eu", "uk", "us", "ca", "jp", "zz"])


@st.composite
def predicates(draw: Any) -> tuple[Any, Any]:
    """(model, a WHERE condition or None)."""
    model = draw(st.sampled_from([User, Order, Event, Customer, Country]))
    key, values = {User: (User.id, KEYS), Order: (Order.user_id, KEYS), Event: (Event.id, EVENT_IDS),
                   Customer: (Customer.region, REGIONS), Country: (Country.code, REGIONS)}[model]
    form = draw(st.sampled_from(["none", "eq", "in", "between", "gt", "or", "other"]))
    if form == "none":
        return model, None
    if form == "eq":
        return model, key == draw(values)
    if form == "in":
        return model, key.in_(draw(st.lists(values, min_size=1, max_size=6)))
    if form == "between":
        lo, hi = sorted(draw(st.lists(values, min_size=2, max_size=2)))
        return model, key.between(lo, hi)
    if form == "gt":
        return model, key > draw(values)
    if form == "or":
        return model, (key == draw(values)) | (key == draw(values))
    other = {User: User.name, Order: Order.amount, Event: Event.payload, Customer: Customer.name,
             Country: Country.name}[model]
    return model, other.is_not(None)


@st.composite
def statements(draw: Any) -> tuple[Any, dict | None, bool]:
    """(statement, scope, all_shards)."""
    model, where = draw(predicates())
    verb = draw(st.sampled_from(["select", "select", "select", "update", "delete"]))
    col = {User: User.id, Order: Order.amount, Event: Event.id, Customer: Customer.id,
           Country: Country.code}[model]
    if verb == "select":
        shape = draw(st.sampled_from(["entity", "ordered page", "count", "group", "distinct",
                                      "for update", "exists", "lambda"]))
        stmt = {"entity": lambda: select(model),
                "ordered page": lambda: select(col).order_by(col.desc()).limit(3).offset(1),
                "count": lambda: select(func.count(), func.min(col)).select_from(model),
                "group": lambda: select(col, func.count()).group_by(col).order_by(col),
                "distinct": lambda: select(col).distinct(),
                "for update": lambda: select(col).with_for_update(),
                "exists": lambda: select(col),
                "lambda": lambda: select(col)}[shape]()
        if where is not None:
            stmt = stmt.where(where)
        if shape == "exists":
            stmt = select(stmt.exists())
        if shape == "lambda":
            stmt = lambda_stmt(lambda: stmt)
    elif verb == "update":
        target = {User: User.name, Order: Order.amount, Event: Event.payload, Customer: Customer.name,
                  Country: Country.name}[model]
        stmt = update(model).values({target: target})
        stmt = stmt.where(where) if where is not None else stmt
    else:
        stmt = delete(model).where(where) if where is not None else delete(model)
    option = draw(st.sampled_from([None, None, "shardkit_shard", "shardkit_all_shards",
                                   "shardkit_strict", "shardkit_role"]))
    if option and not isinstance(stmt, lambdas_types()):
        stmt = stmt.execution_options(**{option: {"shardkit_shard": "s1", "shardkit_role": "replica"}
                                         .get(option, True)})
    scope = draw(st.sampled_from([None, None, {"shard": "s2"}, {"key": 11}, {"strict": True},
                                  {"all_shards": True}, {"role": "replica"}]))
    return stmt, scope, draw(st.booleans()) and verb != "select"


def lambdas_types() -> tuple[type, ...]:
    from sqlalchemy.sql.lambdas import StatementLambdaElement
    return (StatementLambdaElement,)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(case=statements())
def test_generated_statements_run_where_explain_says(kit, case):
    cluster, Session, rec = kit
    stmt, scope, all_shards = case
    check(cluster, Session, rec, stmt, scope=scope, all_shards=all_shards)


def test_explain_takes_no_turn_of_the_shards_reference_reads_take(kit):
    """Reads of reference rows take turns over the shards; explain() named the next turn's
    shard and took it, so the read that followed ran elsewhere (and every explain() moved
    the application's reads along)."""
    cluster, Session, rec = kit
    stmt = select(Country.name).where(Country.code == "fr")
    said = {explained(cluster, rec, stmt).shards for _ in range(4)}
    assert len(said) == 1
    with rec.recording() as ran:
        run(Session, stmt)
    assert {shard for shard, *_ in ran} == set(*said)
