"""Sharded and reference tables in a schema other than ``public``, configured by their
qualified names as SQLAlchemy's ``Table.fullname`` writes them (``"archive.users"``), one of
them in a schema and under a name that need quoting (``"Arc-hive"."Events"``, key column
``"Tenant"``), next to a table of ``public`` with the same short name (``users``) that no
one configured.  Status, verify, the ownership guard, online moves (copy, catch-up, reads
during the move, clean-up, abort) and the ORM must all act on the configured tables, and
never on their ``public`` namesake.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own on both servers plus a catalog database.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, MetaData, Table, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from test_migrate_failures import World as MigrateWorld

import shardkit
from shardkit import migrate, rebalance
from shardkit._rebalance_plan import plan_drain
from shardkit._status import collect
from shardkit.devcluster import to_toml
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

DDL = """
CREATE SCHEMA archive;
CREATE SCHEMA "Arc-hive";
CREATE TABLE users (id bigint PRIMARY KEY, name text);
CREATE TABLE archive.users (id bigint PRIMARY KEY, name text);
CREATE TABLE archive.orders (id bigint PRIMARY KEY,
                             user_id bigint NOT NULL REFERENCES archive.users (id), note text);
CREATE TABLE "Arc-hive"."Events" (id bigint PRIMARY KEY, "Tenant" bigint NOT NULL);
CREATE TABLE archive.countries (code text PRIMARY KEY, name text);
"""

GROUPS = {"u": {"strategy": "hash", "tables": {"archive.users": "id", "archive.orders": "user_id"}},
          "e": {"strategy": "hash", "tables": {"Arc-hive.Events": "Tenant"}}}
REFERENCE = ["archive.countries"]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = {"schema": "archive"}
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": "archive"}
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("archive.users.id"))
    note: Mapped[str | None] = mapped_column(Text)


class Country(Base):
    __tablename__ = "countries"
    __table_args__ = {"schema": "archive"}
    code: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)


core = MetaData()
events = Table("Events", core, Column("id", BigInteger, primary_key=True),
               Column("Tenant", BigInteger, nullable=False), schema="Arc-hive")

_numbers = itertools.count()


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


class World:
    """A database of its own on each shard (made with ``ddl``), a catalog, and a Cluster of
    them configured with ``groups`` and ``reference``; ``init``: run ``rebalance init``."""

    def __init__(self, dev: Any, tmp_path: Path, *, ddl: str = DDL, groups: Any = None,
                 reference: Any = None, init: bool = True) -> None:
        self.dev = dev
        self.db = f"sch{os.getpid()}_{next(_numbers)}"
        for shard in dev.shards:
            with shard.primary.connect(dbname="postgres", autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.db}")
            with shard.primary.connect(dbname=self.db, autocommit=True) as c:
                c.execute(ddl)
        cfg = dev.config_dict()
        for s in cfg["shards"]:
            s["primary"] = s["primary"].rsplit("/", 1)[0] + "/" + self.db
        cfg.update({"groups": GROUPS if groups is None else groups,
                    "reference_tables": REFERENCE if reference is None else list(reference),
                    "catalog": {"url": dev.create_catalog(f"{self.db}_catalog")}})
        self.cfg_path = tmp_path / f"{self.db}.toml"
        self.cfg_path.write_text(to_toml(cfg), encoding="utf-8")
        self.cluster = shardkit.Cluster.from_config(self.cfg_path, follow_map=False)
        if init:
            rebalance.init(self.cluster)
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster,
                                    consistency="strong")

    def conn(self, shard: str) -> psycopg.Connection:
        return self.dev.shard(shard).primary.connect(dbname=self.db, autocommit=True)

    def sql(self, shard: str, query: str, params: Any = None) -> list[tuple] | None:
        with self.conn(shard) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def ids(self, shard: str, table: str) -> list[int]:
        return sorted(r[0] for r in self.sql(shard, f"SELECT id FROM {table}"))

    def fill(self, n: int = 40) -> None:
        with self.Session() as s:
            s.add(Country(code="fr", name="France"))
            s.flush()
            s.add_all(User(id=i, name=f"u{i}") for i in range(n))
            s.flush()
            s.add_all(Order(id=1000 + i, user_id=i, note=f"o{i}") for i in range(n))
            s.execute(events.insert(), [{"id": i, "Tenant": i} for i in range(n)])
            s.commit()
        for shard in ("s0", "s1"):  # the namesake in public: the same keys, on both shards
            self.sql(shard, "INSERT INTO public.users SELECT g, 'public' FROM generate_series(0, %s) g",
                     (n - 1,))


@pytest.fixture
def world(dev, tmp_path):
    made: list[World] = []

    def make(**kw: Any) -> World:
        w = World(dev, tmp_path, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cluster.dispose()


def test_status_estimates_the_rows_of_schema_tables(world):
    """`shardkit status` found `archive.users` as a table named "archive.users" (quote_ident
    of the whole name) and reported it on every shard as "no such table"."""
    w = world(init=False)
    w.fill()
    for shard in ("s0", "s1"):
        w.sql(shard, "ANALYZE")
    out = collect(w.cluster)
    for sh in out["shards"]:
        assert sh["rows_estimate_unknown"] == {}, sh
    total = {t: sum(sh["rows_estimate"][t] for sh in out["shards"]) for t in out["shards"][0]["rows_estimate"]}
    assert total == {"archive.users": 40, "archive.orders": 40, "Arc-hive.Events": 40,
                     "archive.countries": 2}


def test_verify_checks_schema_tables(world):
    """`shardkit verify` reported every table in a schema as missing and checked none of its
    rows: a row on the wrong shard went unnoticed behind "missing: archive.users on s0"."""
    w = world(init=False)
    w.fill()
    rep = verify(w.cluster)
    assert rep.missing_tables == [] and rep.ok, rep.render()
    rows = {}
    for t in rep.tables:
        rows[t.table] = rows.get(t.table, 0) + t.rows
    assert rows == {"archive.users": 40, "archive.orders": 40, "Arc-hive.Events": 40}
    owner = w.cluster.shard_for(User, 5)
    other = "s1" if owner == "s0" else "s0"
    w.sql(other, "INSERT INTO archive.users VALUES (5, 'copy')")
    w.sql(other, """INSERT INTO "Arc-hive"."Events" VALUES (5000, 5)""")
    rep = verify(w.cluster)
    bad = {(t.table, t.shard): (sum(t.misplaced.values()), t.duplicates) for t in rep.tables if t.misplaced}
    assert bad == {("archive.users", other): (1, 1), ("Arc-hive.Events", other): (1, 0)}, rep.render()


def test_rebalance_init_guards_the_schema_tables_not_their_public_namesake(world):
    """`rebalance init` looked the guarded tables up by quote_ident('archive.users'), found
    nothing, logged "does not exist on this shard yet" and guarded none of them: a process
    with a stale map could write rows of buckets a shard does not own."""
    w = world()
    w.fill()
    k = next(i for i in range(100, 200) if w.cluster.shard_for(User, i) == "s1")
    assert w.cluster.shard_for(events, k) == "s1"
    with pytest.raises(psycopg.Error, match="not owned by this shard") as e:
        w.sql("s0", "INSERT INTO archive.users VALUES (%s, 'stale map')", (k,))
    assert e.value.sqlstate == "SK001"
    with pytest.raises(psycopg.Error, match="of table Arc-hive.Events is not owned") as e:
        w.sql("s0", """INSERT INTO "Arc-hive"."Events" VALUES (%s, %s)""", (10_000, k))
    assert e.value.sqlstate == "SK001"
    # The namesake in public is nobody's: no guard trigger on it.
    assert w.sql("s0", "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass") == [(0,)]
    assert w.sql("s0", "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'archive.users'::regclass "
                       "AND tgname LIKE 'shardkit_guard%%'") == [(2,)]


def test_a_move_carries_schema_tables_with_writes_during_it(world):
    """Drain s0 onto s1 with writes to the moving rows during the move (caught up from the
    guard's change log) and a cross-shard read in the middle of it, which must see each row
    once although the target already holds the copies."""
    w = world()
    w.fill()
    on_s0 = [i for i in range(40) if w.cluster.shard_for(User, i) == "s0"]
    assert on_s0
    seen: dict[str, Any] = {}

    def during(line: str) -> None:
        if ": copied " not in line or seen:
            return
        k = on_s0[0]
        w.sql("s0", "UPDATE archive.users SET name = 'renamed' WHERE id = %s", (k,))
        w.sql("s0", "INSERT INTO archive.orders VALUES (%s, %s, 'late')", (5000 + k, k))
        w.sql("s0", """INSERT INTO "Arc-hive"."Events" VALUES (%s, %s)""", (5000 + k, k))
        w.cluster.refresh_map()
        with w.Session() as s:
            seen["users"] = s.scalar(select(func.count()).select_from(User))
            seen["events"] = s.scalar(select(func.count()).select_from(events))

    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    rebalance.Mover(w.cluster, grace=0, progress=during).apply(plan)
    assert seen == {"users": 40, "events": 41}
    for table in ("archive.users", "archive.orders", '"Arc-hive"."Events"'):
        assert w.ids("s0", table) == [], table
    assert w.ids("s1", "archive.users") == list(range(40))
    assert w.ids("s1", "archive.orders") == sorted([1000 + i for i in range(40)] + [5000 + on_s0[0]])
    assert w.ids("s1", '"Arc-hive"."Events"') == sorted([*range(40), 5000 + on_s0[0]])
    assert w.sql("s1", "SELECT name FROM archive.users WHERE id = %s", (on_s0[0],)) == [("renamed",)]
    # The namesake in public was neither copied nor cleaned up.
    for shard in ("s0", "s1"):
        assert w.ids(shard, "public.users") == list(range(40)), shard
    assert verify(w.cluster).ok


def test_an_abort_removes_the_copies_of_schema_tables(world):
    """An aborted move deletes what it copied to the target, from the configured tables."""
    w = world()
    w.fill()
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")

    class Stop(Exception):
        pass

    def stop(line: str) -> None:
        if ": copied " in line:
            raise Stop

    mover = rebalance.Mover(w.cluster, grace=0, progress=stop)
    move_id = mover.start(plan)
    with pytest.raises(RebalanceError, match="Stop"):
        mover.run(move_id)
    assert w.ids("s1", "archive.users") == list(range(40))  # the copies are there
    rebalance.abort(w.cluster, move_id)
    w.cluster.refresh_map()
    for table in ("archive.users", "archive.orders", '"Arc-hive"."Events"'):
        assert sorted(w.ids("s0", table) + w.ids("s1", table)) == (
            list(range(40)) if "orders" not in table else [1000 + i for i in range(40)]), table
    assert verify(w.cluster).ok


def test_migrate_check_reports_drift_in_the_schema_of_configured_tables(dev, tmp_path):
    """`shardkit migrate check` compared the shards' public schema only: a column added by
    hand to `archive.things` on one shard was "no drift"."""
    w = MigrateWorld(dev, tmp_path, groups={"g": {"strategy": "hash", "tables": {"archive.things": "id"}}})
    try:
        w.rev("a1", None, "op.execute('CREATE SCHEMA archive')\n"
                          "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True), "
                          "schema='archive')")
        assert w.cli("migrate", "upgrade").returncode == 0
        assert migrate.check(w.cluster, alembic_ini=w.ini).ok
        w.sql(1, "ALTER TABLE archive.things ADD COLUMN extra integer")
        w.sql(0, "CREATE INDEX things_id ON archive.things (id)")
        report = migrate.check(w.cluster, alembic_ini=w.ini)
        assert not report.ok, report.as_dict()
        assert [d.split(",")[0] for d in report.schema_differences] == [
            "s1: archive.things columns differ from s0", "s1: archive.things indexes differ from s0"]
    finally:
        w.close()


ARCHIVE_MODELS = """
import sqlalchemy as sa
metadata = sa.MetaData()
things = sa.Table("things", metadata, sa.Column("id", sa.BigInteger, primary_key=True),
                  sa.Column("note", sa.Text), schema="archive")
"""


def test_autogenerate_compares_the_models_tables_in_their_schema(dev, tmp_path):
    """Alembic compares the default schema only unless told otherwise: a model in `archive`
    was always "a new table" to `alembic check` and `revision --autogenerate` (a revision
    that creates it again), and a column added to the model went unseen."""
    models = tmp_path / "models_pkg"
    models.mkdir()
    (models / "archive_models.py").write_text(ARCHIVE_MODELS)
    w = MigrateWorld(dev, tmp_path / "w", groups={"g": {"strategy": "hash", "tables": {"archive.things": "id"}}})
    try:
        w.ini.write_text(w.ini.read_text().replace("# shardkit_metadata = myapp.models:Base.metadata",
                                                   "shardkit_metadata = archive_models:metadata"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(models), os.environ.get("PYTHONPATH", "")])}

        def alembic(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "alembic", "-c", str(w.ini), "-x", f"config={w.cfg}",
                                   *args], capture_output=True, text=True, timeout=120, env=env)

        w.rev("a1", None, "op.execute('CREATE SCHEMA archive')\n"
                          "op.create_table('things', sa.Column('id', sa.BigInteger, primary_key=True), "
                          "sa.Column('note', sa.Text), schema='archive')")
        assert alembic("upgrade", "head").returncode == 0
        r = alembic("check")
        assert r.returncode == 0 and "No new upgrade operations detected" in r.stdout, r.stdout + r.stderr
        (models / "archive_models.py").write_text(ARCHIVE_MODELS.replace(
            'sa.Column("note", sa.Text)', 'sa.Column("note", sa.Text), sa.Column("size", sa.Integer)'))
        r = alembic("revision", "--autogenerate", "-m", "size")
        assert r.returncode == 0, r.stderr
        body = next(w.versions.glob("*size.py")).read_text()
        assert "op.add_column('things', sa.Column('size', sa.Integer(), nullable=True), schema='archive')" \
            in body, body
        assert "create_table" not in body and "drop_table" not in body, body
    finally:
        w.close()
