"""The README's ```python examples, run as written against a real cluster.

Each example is read from README.md (found by a line it contains, so an edited
example is what runs) and executed with only the names that stand for the
user's own filled in: the models (``User``, ``Order``, ``Entry``), the database
URLs (a database of this module's own on the shared 2-shard x 1-replica test
cluster), ``tenant_id``, and the placeholders ``...`` / ``{...}``.  What the
comments next to the code say is then checked against what the servers saw:

* the opening example: the write reaches only user 42's shard, ``session.get``
  is one query there, the lazy load of ``user.orders`` stays there;
* ``shardkit.scope(shard=...)`` / ``scope(key=...)``: where the statements
  inside the blocks ran;
* "ask where something goes": the literal results in the comments, and the
  ``explain()`` route against where the statement then actually ran (each
  shard receiving only its own ``IN`` values);
* ``shardkit.run_transaction``: a process with a stale map (a real bucket move
  of account 42 since it loaded the map) commits the README's ``transfer``
  through the retry on ``NotOwned``;
* the pytest-plugin example: the fixtures give what the comments say.

A README ```python block that no test here runs fails
``test_every_python_example_is_run``.
"""

from __future__ import annotations

import ast
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from sqlalchemy import BigInteger, ForeignKey, Integer, String, event, make_url, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit import _rebalance_plan as rp
from shardkit import rebalance
from shardkit.devcluster import DevCluster

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


# -- the README's examples ------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    line: int        # README line of the block's first code line
    code: str

    def where(self, offset: int) -> str:
        return f"README.md:{self.line + offset - 1}"


def python_examples() -> list[Example]:
    out: list[Example] = []
    lines = README.read_text(encoding="utf-8").splitlines()
    start: int | None = None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = i + 1
        elif start is not None and line.strip() == "```":
            out.append(Example(start, "\n".join(lines[start - 1:i - 1])))
            start = None
    return out


# The line that identifies each example (the test that runs it says what it checks).
MARKERS = {
    "opening": "Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)",
    "scope": "with shardkit.scope(shard=",
    "ask": "cluster.explain(",
    "run_transaction": "shardkit.run_transaction(",
    "plugin": "def test_something(shardkit_cluster_factory):",
    "env_py": "run_migrations(context, target_metadata=Base.metadata",
}


def example(name: str) -> Example:
    found = [e for e in python_examples() if MARKERS[name] in e.code]
    assert len(found) == 1, f"README.md has {len(found)} ```python blocks containing {MARKERS[name]!r}, not 1"
    return found[0]


def test_every_python_example_is_run():
    unrun = [f"README.md:{e.line}: {e.code.splitlines()[0]!r}" for e in python_examples()
             if not any(m in e.code for m in MARKERS.values())]
    assert unrun == [], "README ```python examples no test in this file runs:\n  " + "\n  ".join(unrun)


def _marked(code: str, mark: str = "_mark") -> ast.Module:
    """``code`` parsed, with ``_mark(lineno)`` after every simple statement (in every body)."""
    tree = ast.parse(code)

    def walk(body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            for name in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, name, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    setattr(stmt, name, walk(inner))
            out.append(stmt)
            if not isinstance(stmt, (ast.With, ast.For, ast.While, ast.If, ast.Try,
                                     ast.FunctionDef, ast.ClassDef)):
                out.append(ast.Expr(ast.Call(ast.Name(mark, ast.Load()),
                                             [ast.Constant(stmt.lineno)], [])))
        return out

    tree.body = walk(tree.body)
    return ast.fix_missing_locations(tree)


def _is_ellipsis(stmt: ast.stmt) -> bool:
    """``...`` as a statement: the README's "your code here"."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis


def _comment(code: str, lineno: int) -> str:
    line = code.splitlines()[lineno - 1]
    return line.split("#", 1)[1].strip() if "#" in line else ""


# -- what the servers saw ------------------------------------------------------------------------


@dataclass
class Seen:
    shard: str
    node: str
    sql: str
    params: Any


@dataclass
class Recorder:
    """Every statement a shardkit node engine sends, with its shard and node."""

    db: str
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> None:
        info = getattr(conn.engine, "info", None)
        if not isinstance(info, dict) or "shard" not in info:
            return  # not a node engine (the catalog's, ...)
        if conn.engine.url.database != self.db:
            return  # another test's cluster in this process
        with self.lock:
            self.seen.append(Seen(info["shard"], info["node"], statement, parameters))

    def take(self) -> list[Seen]:
        with self.lock:
            out, self.seen = self.seen, []
        return out


@pytest.fixture
def recorder(world) -> Iterator[Recorder]:
    rec = Recorder(world.db)
    event.listen(Engine, "before_cursor_execute", rec)
    try:
        yield rec
    finally:
        event.remove(Engine, "before_cursor_execute", rec)


def touching(seen: list[Seen], table: str) -> list[Seen]:
    return [s for s in seen if re.search(rf"\b{table}\b", s.sql)]


# -- the user's models and databases ------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    orders: Mapped[list[Order]] = relationship(back_populates="user")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user: Mapped[User] = relationship(back_populates="orders")


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(Integer)


GROUPS = {
    "users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}},
    "entries": {"strategy": "hash", "tables": {"entries": "account_id"}},
}


@dataclass
class World:
    dev: Any
    db: str                     # this module's database on every node
    shards: list[dict[str, Any]]    # the config's shards, pointed at it
    extra_dbs: list[str] = field(default_factory=list)

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"bucket_count": self.dev.bucket_count, "shards": self.shards, "groups": GROUPS, **extra}

    def rows(self, shard: str, sql: str, db: str | None = None) -> list[tuple[Any, ...]]:
        node = next(s for s in self.dev.shards if s.name == shard).primary
        with psycopg.connect(make_conninfo(node.dsn, dbname=db or self.db)) as conn:
            return conn.execute(sql).fetchall()

    def create_db(self, name: str, *, on_every_shard: bool = True) -> None:
        nodes = self.dev.shards if on_every_shard else self.dev.shards[:1]
        for shard in nodes:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {name}")
        self.extra_dbs.append(name)
        for shard in nodes:
            for replica in shard.replicas:
                replica.wait_caught_up()


def _pointed_at(url: str, db: str) -> str:
    return make_url(url).set(database=db).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def world(shardkit_dev_cluster) -> Iterator[World]:
    dev = shardkit_dev_cluster
    db = f"readme_{uuid.uuid4().hex[:10]}"
    shards = [{"name": s.name, "primary": _pointed_at(s.primary.url, db),
               "replicas": [_pointed_at(r.url, db) for r in s.replicas]} for s in dev.shards]
    w = World(dev, db, shards)
    try:
        w.create_db(db)
        for s in shards:
            engine = shardkit.Cluster.from_config(w.config()).primary(s["name"])
            try:
                Base.metadata.create_all(engine)
            finally:
                engine.dispose()
        for shard in dev.shards:
            for replica in shard.replicas:
                replica.wait_caught_up()
        yield w
    finally:
        for name in w.extra_dbs:
            for shard in dev.shards:
                with psycopg.connect(shard.primary.dsn, autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def clean(world) -> World:
    for s in world.shards:
        with psycopg.connect(make_conninfo(
                next(d for d in world.dev.shards if d.name == s["name"]).primary.dsn,
                dbname=world.db), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute("TRUNCATE users, orders, entries CASCADE")
    return world


# -- the opening example --------------------------------------------------------------------------


def test_opening_example(clean, recorder, tmp_path, monkeypatch):
    """README's first example: "goes to the shard that owns user 42", "one query, on that
    shard only", "lazy load stays on the same shard"."""
    ex = example("opening")
    # The user's shardkit.toml (this module's database, the README's users/orders group).
    clean.dev.write_config(tmp_path / "shardkit.toml", {"shards": clean.shards, "groups": GROUPS})
    monkeypatch.chdir(tmp_path)
    marks: dict[int, list[Seen]] = {}
    ns: dict[str, Any] = {"Base": Base, "User": User, "Order": Order,
                          "_mark": lambda lineno: marks.setdefault(lineno, recorder.take())}
    recorder.take()
    try:
        exec(compile(_marked(ex.code), str(README), "exec"), ns)
    finally:
        if isinstance(ns.get("cluster"), shardkit.Cluster):
            ns["cluster"].dispose()
    owner = ns["cluster"].shard_for(User, 42)
    other = next(s for s in ns["cluster"].shard_names if s != owner)
    everything = [s for seen in marks.values() for s in seen]
    problems = []

    # "goes to the shard that owns user 42" (written at the commit).
    inserts = [s for s in everything if s.sql.lstrip().upper().startswith("INSERT")]
    if not inserts or {s.node for s in inserts} != {f"{owner}/primary"}:
        problems.append(f"the INSERT ran on {sorted({s.node for s in inserts})}, not {owner}/primary")
    if clean.rows(owner, "SELECT id, name FROM users") != [(42, "Ada")] or \
            clean.rows(other, "SELECT id FROM users") != []:
        problems.append(f"user 42 is not on {owner} alone")

    def line_of(snippet: str) -> int:
        (n,) = [i for i, line in enumerate(ex.code.splitlines(), 1) if snippet in line]
        return n

    for snippet, table in (("session.get(User, 42)", "users"), ("user.orders", "orders")):
        n = line_of(snippet)
        queries = touching(marks.get(n, []), table)
        where = f"{ex.where(n)} ({_comment(ex.code, n)!r})"
        if len(queries) != 1:
            problems.append(f"{where}: {len(queries)} queries of {table}: {[q.sql for q in queries]}")
        if {q.shard for q in queries} - {owner}:
            problems.append(f"{where}: ran on {sorted({q.node for q in queries})}, not on {owner}")
    # Nothing at all reached the shard that does not own user 42.
    strays = [f"{s.node}: {s.sql[:60]}" for s in everything if s.shard != owner]
    if strays:
        problems.append(f"statements on {other}, which does not own user 42: {strays}")
    assert ns["orders"] == [], "user 42 has no orders"
    assert problems == [], "\n".join(problems)


# -- scopes -------------------------------------------------------------------------------------------


def test_scope_example(clean, recorder):
    """``with shardkit.scope(shard="s1"):  # everything inside runs on s1`` and
    ``with shardkit.scope(key=tenant_id):  # statements with no key of their own use this key``."""
    ex = example("scope")
    cluster = shardkit.Cluster.from_config(clean.config(), metadata=Base.metadata)
    try:
        names = cluster.shard_names
        keys = {s: next(k for k in range(1, 10_000) if cluster.shard_for(User, k) == s) for s in names}
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.add_all([User(id=k, name=f"on {sh}") for sh, k in keys.items()])
            s.commit()
        tree = ast.parse(ex.code)
        probed: list[tuple[int, str, set[str], set[str]]] = []

        def probe(lineno: int) -> None:
            sc = shardkit.current_scope()
            if sc.shard is not None:
                expected = {sc.shard}
                # "everything": also a statement whose own key another shard owns.
                foreign = next(k for sh, k in keys.items() if sh != sc.shard)
                statements = [select(User), select(User).where(User.id == foreign)]
            else:
                expected = {cluster.shard_for(User, sc.key)}
                statements = [select(User), select(User).order_by(User.id).limit(5)]
            recorder.take()
            with Session() as session:
                for stmt in statements:
                    session.execute(stmt).all()
            ran = {q.shard for q in touching(recorder.take(), "users")}
            probed.append((lineno, _comment(ex.code, lineno), expected, ran))

        replaced = 0
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and len(node.body) == 1 and _is_ellipsis(node.body[0]):
                node.body = [ast.Expr(ast.Call(ast.Name("probe", ast.Load()), [ast.Constant(node.lineno)], []))]
                replaced += 1
        assert replaced >= 2, f"{ex.where(1)}: expected `with shardkit.scope(...): ...` blocks"
        # tenant_id: the user's own; one that another shard than s1 owns tells the two apart.
        tenant_id = keys[names[0]]
        exec(compile(ast.fix_missing_locations(tree), str(README), "exec"),
             {"shardkit": shardkit, "tenant_id": tenant_id, "probe": probe})
        assert len(probed) == replaced
        wrong = [f"{ex.where(n)} ({comment!r}): ran on {sorted(ran)}, expected {sorted(exp)}"
                 for n, comment, exp, ran in probed if ran != exp]
        assert wrong == [], "\n".join(wrong)
    finally:
        cluster.dispose()


# -- asking where something goes ----------------------------------------------------------------------


def test_ask_where_example(clean, recorder):
    """The `shard_for`/`bucket_for` results in the comments, and the `explain()` route is where
    the statement then runs, each shard receiving only its own `IN` values."""
    ex = example("ask")
    cluster = shardkit.Cluster.from_config(clean.config(), metadata=Base.metadata)
    try:
        ns: dict[str, Any] = {"cluster": cluster, "User": User, "select": select, "shardkit": shardkit}
        tree = ast.parse(ex.code)
        wrong = []
        last_value: Any = None
        for stmt in tree.body:
            code = compile(ast.Module([stmt], []), str(README), "exec")
            if isinstance(stmt, ast.Expr):
                last_value = eval(compile(ast.Expression(stmt.value), str(README), "eval"), ns)
                comment = _comment(ex.code, stmt.lineno)
                if comment:
                    literal = comment.split()[0]
                    try:
                        said = ast.literal_eval(literal)
                    except (ValueError, SyntaxError):
                        continue    # a comment in words
                    if last_value != said:
                        wrong.append(f"{ex.where(stmt.lineno)}: gives {last_value!r}, the comment says {said!r}")
            else:
                exec(code, ns)
        assert wrong == [], "\n".join(wrong)
        route = ns["route"]
        shards, kind, role, reason, split = last_value
        assert (shards, kind, role, reason, split) == (route.shards, route.kind, route.role,
                                                      route.reason, route.split)
        assert isinstance(reason, str) and reason
        # README: "`route.role` is `replica` for a read that a new session sends to the
        # shards' replicas (every shard of the route has one ...)".
        assert role == ("replica" if all(cluster.replica_count(s) for s in shards) else "primary")
        # README: one shard (`direct`), several (`multi`) or all.
        assert kind == ("direct" if len(shards) == 1 else
                        "all" if len(shards) == len(cluster.shard_names) else "multi")
        # Run the explained statement: it reaches the shards explain() named, and each
        # receives only the IN values explain() split to it (those its shard owns).
        (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                   and isinstance(n.func, ast.Attribute) and n.func.attr == "explain"]
        stmt = eval(compile(ast.Expression(call.args[0]), str(README), "eval"), ns)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        recorder.take()
        with Session() as session:
            session.execute(stmt).all()
        seen = touching(recorder.take(), "users")
        assert {s.shard for s in seen} == set(shards), f"explain said {shards}, ran on {[s.node for s in seen]}"
        assert split is not None and set(split) == set(shards)
        for s in seen:
            received = {v for v in (s.params.values() if isinstance(s.params, dict) else s.params)}
            explained = {v for values in split[s.shard].values() for v in values}
            assert received == explained, f"{s.node} received {received}, explain() split {explained} to it"
            assert all(cluster.shard_for(User, v) == s.shard for v in received), (s.node, received)
    finally:
        cluster.dispose()


# -- run_transaction through a real bucket move -----------------------------------------------------


def test_run_transaction_example_retries_after_a_real_move(world, tmp_path):
    """README: ``shardkit.run_transaction(Session, transfer)   # commits; retried once on NotOwned``,
    run by a process whose map is stale: account 42's bucket moved after it loaded the map."""
    ex = example("run_transaction")
    db, catalog_db = f"readme_tx_{uuid.uuid4().hex[:8]}", f"readme_cat_{uuid.uuid4().hex[:8]}"
    world.create_db(db)
    world.create_db(catalog_db, on_every_shard=False)
    shards = [{**s, "primary": _pointed_at(s["primary"], db),
               "replicas": [_pointed_at(r, db) for r in s["replicas"]]} for s in world.shards]
    cfg = {**world.config(catalog={"url": _pointed_at(world.shards[0]["primary"], catalog_db)}),
           "shards": shards}
    admin = shardkit.Cluster.from_config(cfg, metadata=Base.metadata, follow_map=False)
    stale = None
    try:
        for s in admin.shard_names:
            Base.metadata.create_all(admin.primary(s))
        version = rebalance.init(admin)
        stale = shardkit.Cluster.from_config(cfg, metadata=Base.metadata, follow_map=False)
        assert stale.map_version == version
        old_owner = stale.shard_for(Entry, 42)
        new_owner = next(s for s in admin.shard_names if s != old_owner)
        # Move account 42's bucket (only it) to the other shard; `stale` does not hear of it.
        live = admin.catalog.current_map().bucket_map
        bucket = admin.bucket_for(Entry, 42)
        new_map = list(live)
        new_map[bucket] = new_owner
        plan = rp.plan_from_maps(live, new_map, "readme: move account 42")
        mover = rebalance.Mover(admin, grace=0, progress=lambda line: None)
        mover.run(mover.start(plan))
        admin.refresh_map()
        assert admin.shard_for(Entry, 42) == new_owner and stale.shard_for(Entry, 42) == old_owner

        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=stale)
        exec(compile(ex.code, str(README), "exec"),
             {"shardkit": shardkit, "Session": Session, "Entry": Entry})

        def entries(shard: str) -> list[tuple[Any, ...]]:
            return world.rows(shard, "SELECT account_id, amount FROM entries", db=db)

        assert entries(new_owner) == [(42, 10)], "the README's transfer did not commit on the new owner"
        assert entries(old_owner) == [], "the refused first attempt left a row on the old owner"
        assert stale.map_version > version, "run_transaction did not reload the map"
        assert stale.shard_for(Entry, 42) == new_owner
    finally:
        if stale is not None:
            stale.dispose()
        admin.dispose()


# -- the pytest plugin example ------------------------------------------------------------------


def test_plugin_example(shardkit_cluster_factory, shardkit_dev_cluster):
    """``dev = shardkit_cluster_factory(shards=3, replicas=1)   # a DevCluster ...``, a cluster
    built from its ``config_dict()``, and ``shardkit_dev_cluster  # one shared 2 x 1 cluster``."""
    ex = example("plugin")
    tree = ast.parse(ex.code)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    placeholders = 0
    for fn in functions:
        for node in ast.walk(fn):
            # {...} stands for the user's groups.
            if isinstance(node, ast.Dict):
                for i, v in enumerate(node.values):
                    if isinstance(v, ast.Set) and [getattr(e, "value", None) for e in v.elts] == [Ellipsis]:
                        node.values[i] = ast.Name("GROUPS", ast.Load())
                        placeholders += 1
        fn.body.append(ast.Return(ast.Call(ast.Name("locals", ast.Load()), [], [])))
    ns: dict[str, Any] = {"shardkit": shardkit, "GROUPS": GROUPS}
    exec(compile(ast.fix_missing_locations(tree), str(README), "exec"), ns)
    fixtures = {"shardkit_cluster_factory": shardkit_cluster_factory,
                "shardkit_dev_cluster": shardkit_dev_cluster}
    problems = []
    for fn in functions:
        args = [a.arg for a in fn.args.args]
        assert set(args) <= set(fixtures), f"{ex.where(fn.lineno)}: unknown fixture in {args}"
        out = ns[fn.name](*(fixtures[a] for a in args))
        comment = _comment(ex.code, fn.lineno)
        if "cluster" in out and isinstance(out["cluster"], shardkit.Cluster):
            cluster, dev = out["cluster"], out["dev"]
            try:
                (call,) = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
                           and getattr(n.func, "id", None) == "shardkit_cluster_factory"]
                asked = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                if not isinstance(dev, DevCluster):
                    problems.append(f"{ex.where(call.lineno)}: the factory gave a {type(dev).__name__}, "
                                    "not a DevCluster")
                if len(cluster.shard_names) != asked["shards"] or \
                        {cluster.replica_count(s) for s in cluster.shard_names} != {asked["replicas"]}:
                    problems.append(f"{ex.where(call.lineno)}: asked {asked}, the cluster has "
                                    f"{[(s, cluster.replica_count(s)) for s in cluster.shard_names]}")
                for s in cluster.shard_names:
                    for role, n in (("primary", 1), ("replica", cluster.replica_count(s))):
                        for i in range(n):
                            with cluster.engine(s, role, i).connect() as conn:
                                conn.execute(text("SELECT 1"))
            finally:
                cluster.dispose()
                if dev is not shardkit_dev_cluster:
                    dev.down(remove=True)  # the factory would at session end; free its servers now
        m = re.search(r"(\d+) x (\d+)", comment)
        if m:
            dev = fixtures[args[0]]
            shape = (len(dev.shards), {len(s.replicas) for s in dev.shards})
            if shape != (int(m.group(1)), {int(m.group(2))}):
                problems.append(f"{ex.where(fn.lineno)} ({comment!r}): {args[0]} has {shape[0]} shards "
                                f"with {shape[1]} replicas each")
    assert placeholders == 1, f"{ex.where(1)}: expected one `\"groups\": {{...}}` placeholder"
    assert problems == [], "\n".join(problems)


# -- env.py with the team's own autogenerate filter ---------------------------------------------

MYAPP_MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


sa.Table("gadgets", Base.metadata, sa.Column("id", sa.BigInteger, primary_key=True))
"""


def test_env_py_example_keeps_autogenerate_off_tables_the_models_do_not_describe(shardkit_dev_cluster, tmp_path):
    """The README's env.py: its include_object leaves spatial_ref_sys (an extension's table,
    on every shard) alone, which autogenerate proposes to drop without it."""
    import os
    import subprocess
    import sys

    from test_migrate_failures import World

    w = World(shardkit_dev_cluster, tmp_path / "w")
    try:
        w.rev("a1", None, "op.create_table('gadgets', sa.Column('id', sa.BigInteger, primary_key=True))",
              "op.drop_table('gadgets')")
        assert w.cli("migrate", "upgrade").returncode == 0
        for i in range(2):
            w.sql(i, "CREATE TABLE spatial_ref_sys (srid int PRIMARY KEY)")
        (tmp_path / "myapp").mkdir()
        (tmp_path / "myapp" / "__init__.py").write_text("")
        (tmp_path / "myapp" / "models.py").write_text(MYAPP_MODELS)
        env_py = w.ini.parent / "env.py"
        code = example("env_py").code

        def check() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "alembic", "-c", str(w.ini), "-x", f"config={w.cfg}",
                                   "check"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                  env={**os.environ, "PYTHONPATH": str(tmp_path)})
        env_py.write_text(code.replace(", include_object=include_object)", ")"))
        r = check()
        assert r.returncode != 0 and "remove_table" in r.stdout + r.stderr, r.stdout + r.stderr
        env_py.write_text(code)
        r = check()
        assert r.returncode == 0 and "No new upgrade operations detected" in r.stdout, r.stdout + r.stderr
    finally:
        w.close()
