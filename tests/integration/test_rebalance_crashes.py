"""Online rebalancing under adverse interleavings and crash points: nothing lost, duplicated or stranded.

The tests share one small cluster (3 shards, no replicas, 64 buckets) and each
gets databases of its own on it (one per shard's server and a catalog database
on s0's server, dropped when the test ends) so that a move left half-done by
one test cannot disturb another; a test that changes a server's settings
restores them.  Interleavings are made deterministic by running the
mover in-process with hooks between its steps (a writer committing "between
the copy and the catch-up" is exactly what a concurrent writer can do), and
crash points by making one commit fail (the databases end up as after a
SIGKILL at that point: what committed stays committed).

Each test asserts the correct behaviour at one such point.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import BigInteger, Integer, String, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._guard import GUARD_LOCK_CLASS
from shardkit._rebalance_plan import plan_from_maps
from shardkit.catalog import MOVER_LOCK_CLASS
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

BUCKETS = 64


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(String(40), default="")


SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, balance int NOT NULL DEFAULT 0);
-- colocated child with a foreign key
CREATE TABLE entries (id bigint PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts (id),
                      amount int NOT NULL DEFAULT 0);
-- colocated, no foreign key
CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint NOT NULL, body varchar(40) NOT NULL DEFAULT '',
                    created timestamptz NOT NULL DEFAULT now());
-- colocated, a second unique key (slot numbers per account)
CREATE TABLE slots (id bigint PRIMARY KEY, account_id bigint NOT NULL, seq int NOT NULL,
                    UNIQUE (account_id, seq));
-- two tables whose names (50 characters) differ only after the 47th
CREATE TABLE account_activity_rollups_by_month_for_reporting_1 (id bigint PRIMARY KEY, account_id bigint NOT NULL, v int NOT NULL);
CREATE TABLE account_activity_rollups_by_month_for_reporting_2 (id bigint PRIMARY KEY, account_id bigint NOT NULL, v int NOT NULL);
-- colocated, an identity primary key
CREATE TABLE tokens (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account_id bigint NOT NULL,
                     used boolean NOT NULL DEFAULT false);
"""

GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {
    "accounts": "id", "entries": "account_id", "notes": "account_id", "slots": "account_id",
    "tokens": "account_id",
    "account_activity_rollups_by_month_for_reporting_1": "account_id",
    "account_activity_rollups_by_month_for_reporting_2": "account_id"}}}}
LONG1, LONG2 = "account_activity_rollups_by_month_for_reporting_1", "account_activity_rollups_by_month_for_reporting_2"


def _noop(line: str) -> None:
    pass


@dataclass
class World:
    dev: object
    cfg_path: Path
    catalog_url: str
    dbname: str | None = None  # the test's database on every shard's server (None: the cluster's own)
    config: dict | None = None  # the config as a dict (shards and catalog in the test's databases)

    def cluster(self) -> shardkit.Cluster:
        return shardkit.Cluster.from_config(self.cfg_path, follow_map=False)

    def conn(self, shard: str) -> psycopg.Connection:
        node = next(s for s in self.dev.shards if s.name == shard).primary
        return psycopg.connect(node.dsn, autocommit=True, **({"dbname": self.dbname} if self.dbname else {}))

    def catalog(self) -> psycopg.Connection:
        return psycopg.connect(self.catalog_url.replace("postgresql+psycopg", "postgresql"), autocommit=True)

    def sql(self, shard: str, query: str, params=None):
        with self.conn(shard) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None


def _key(bucket: int, start: int = 1) -> int:
    """The smallest integer key >= start in ``bucket``."""
    k = start
    while shardkit.bucket_for(k, BUCKETS) != bucket:
        k += 1
    return k


def _in_db(url: str, dbname: str | None) -> str:
    return url if dbname is None else make_url(url).set(database=dbname).render_as_string(hide_password=False)


def _make_world(dev, tmp_path, dbname: str | None = None, template: World | None = None):
    """Schema, a catalog and the two maps in databases ``dbname`` (created on every shard's
    server; catalog ``<dbname>_catalog`` on s0's), or in the cluster's own when None.
    With ``template`` (a world made so), its databases copied: the same schema, catalog,
    maps and guards, without building them again."""
    if dbname is not None:
        for i, shard in enumerate(dev.shards):
            with psycopg.connect(shard.primary.dsn, dbname="postgres", autocommit=True) as c:
                c.execute(f"CREATE DATABASE {dbname}" + (f" TEMPLATE {template.dbname}" if template else ""))
                if template and i == 0:
                    c.execute(f"CREATE DATABASE {dbname}_catalog TEMPLATE {template.dbname}_catalog")
    catalog_url = dev.create_catalog("shardkit_catalog" if dbname is None else f"{dbname}_catalog")
    base = dev.config_dict()
    base["shards"] = [{**s, "primary": _in_db(s["primary"], dbname),
                       "replicas": [_in_db(r, dbname) for r in s["replicas"]]} for s in base["shards"]]
    if template is not None:
        config = {**base, **GROUPS, "catalog": {"url": catalog_url}}
        cfg_path = dev.write_config(tmp_path / "shardkit.toml", {**GROUPS, "catalog": {"url": catalog_url},
                                                                 "shards": base["shards"]})
        return World(dev, cfg_path, catalog_url, dbname, config)
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True, **({"dbname": dbname} if dbname else {})) as c:
            c.execute(SCHEMA)
    config = {**base, **GROUPS, "catalog": {"url": catalog_url}}
    two = {**config, "shards": config["shards"][:2]}
    c2 = shardkit.Cluster.from_config(two, follow_map=False)
    rebalance.init(c2)
    c2.dispose()
    cfg_path = dev.write_config(tmp_path / "shardkit.toml", {**GROUPS, "catalog": {"url": catalog_url},
                                                             "shards": base["shards"]})
    c3 = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    rebalance.init(c3)
    c3.dispose()
    return World(dev, cfg_path, catalog_url, dbname, config)


def _drop_world(w: World) -> None:
    """Drop the test's databases, ending whatever sessions a test left behind in them."""
    for i, shard in enumerate(w.dev.shards):
        with psycopg.connect(shard.primary.dsn, dbname="postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {w.dbname} WITH (FORCE)")
            if i == 0:
                c.execute(f"DROP DATABASE IF EXISTS {w.dbname}_catalog WITH (FORCE)")


_world_numbers = itertools.count()


@pytest.fixture(scope="module")
def servers(shardkit_module_cluster_factory):
    """The module's cluster: 3 shards, no replicas, 64 buckets (each test uses its own databases)."""
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=BUCKETS)


@pytest.fixture(scope="module")
def template(servers, tmp_path_factory):
    """The world every test starts from, built once; each test gets a copy of its databases."""
    w = _make_world(servers, tmp_path_factory.mktemp("template"), "rctemplate")
    try:
        yield w
    finally:
        _drop_world(w)


@pytest.fixture
def world(servers, template, tmp_path):
    """s0 and s1 own the buckets (the 2-shard config's map is version 1); s2 owns none."""
    w = _make_world(servers, tmp_path, f"rc{next(_world_numbers)}", template=template)
    try:
        yield w
    finally:
        _drop_world(w)


class HookedMover(rebalance.Mover):
    """A mover that calls ``hooks[name]()`` once at these points of a batch:

    ``waiting_for_writers`` (capture began; the writers of its buckets' stripes are
    waited for), ``after_copy`` (the copy committed, catch-up not begun),
    ``before_cut_over`` (catch-up done), ``before_verify`` (switched and published).
    """

    def __init__(self, cluster, hooks=None, **kw):
        kw.setdefault("grace", 0)
        kw.setdefault("progress", _noop)
        super().__init__(cluster, **kw)
        self.hooks = dict(hooks or {})

    def _fire(self, name: str) -> None:
        hook = self.hooks.pop(name, None)
        if hook is not None:
            hook()

    def _copy(self, *a, **kw):
        n = super()._copy(*a, **kw)
        self._fire("after_copy")
        return n

    def _cut_over(self, *a, **kw):
        self._fire("before_cut_over")
        return super()._cut_over(*a, **kw)

    def _wait_for_writers(self, *a, **kw):
        self._fire("waiting_for_writers")
        return super()._wait_for_writers(*a, **kw)

    def _verify(self, *a, **kw):
        self._fire("before_verify")
        return super()._verify(*a, **kw)


def _one_bucket_plan(cluster, bucket: int, target: str):
    live = cluster.config.bucket_map
    new = list(live)
    new[bucket] = target
    return plan_from_maps(live, tuple(new), f"test: bucket {bucket} to {target}")


def _buckets_of(cluster, shard: str) -> list[int]:
    return [b for b, s in enumerate(cluster.config.bucket_map) if s == shard]


def _sessionmaker(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


# -- 1. the catalog publish is a read-modify-write without a lock ---------------------------


def test_key_change_out_of_a_moving_bucket_reaches_the_target(world):
    cluster = world.cluster()
    b1, b2 = _buckets_of(cluster, "s0")[:2]
    a1, a2 = _key(b1), _key(b2)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0), (%s, 0)", (a1, a2))
    world.sql("s0", "INSERT INTO notes VALUES (1, %s, 'x')", (a1,))
    Session = _sessionmaker(cluster)

    def move_note():  # a writer re-assigns the note: both accounts are on s0, so shardkit allows it
        def fn(s):
            note = s.scalars(select(Note).where(Note.account_id == a1, Note.id == 1)).one()
            note.account_id = a2
        shardkit.run_transaction(Session, fn)

    mover = HookedMover(cluster, {"after_copy": move_note})
    error = None
    try:
        mover.apply(_one_bucket_plan(cluster, b1, "s2"))
    except RebalanceError as e:
        error = e
    try:
        on_s2 = world.sql("s2", "SELECT account_id FROM notes WHERE id = 1")
        cluster.refresh_map()
        with Session() as s:  # the application reads account a1's notes from its new owner
            ghost = s.scalars(select(Note.id).where(Note.account_id == a1)).all()
        assert error is None, f"move failed: {error}; s2 holds note 1 as {on_s2}; reading a1's notes: {ghost}"
        assert on_s2 == []
    finally:
        cluster.dispose()


def test_a_key_change_on_the_new_owner_does_not_wedge_the_move(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    b_t = _buckets_of(cluster, "s1")[0]
    a1, a_t = _key(b1), _key(b_t)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s1", "INSERT INTO accounts VALUES (%s, 0)", (a_t,))
    world.sql("s0", "INSERT INTO notes VALUES (1, %s, 'x')", (a1,))
    Session = _sessionmaker(cluster)

    def move_note():  # on the new owner, both accounts are on s1: shardkit allows it
        cluster.refresh_map()

        def fn(s):
            note = s.scalars(select(Note).where(Note.account_id == a1, Note.id == 1)).one()
            note.account_id = a_t
        shardkit.run_transaction(Session, fn)

    mover = HookedMover(cluster, {"before_verify": move_note})
    errors = []
    try:
        mover.apply(_one_bucket_plan(cluster, b1, "s1"))
    except RebalanceError as e:
        errors.append(str(e))
        move_id = max(m["move"] for m in rebalance.move_status(cluster))
        for attempt in (lambda: HookedMover(cluster).run(move_id), lambda: rebalance.abort(cluster, move_id)):
            try:
                attempt()
            except RebalanceError as e2:
                errors.append(str(e2))
    try:
        assert not errors, errors
    finally:
        cluster.dispose()


# -- 3. catch-up re-reads rows by primary key without their bucket ----------------------------


def test_catch_up_does_not_copy_rows_of_other_buckets(world):
    cluster = world.cluster()
    b1, b2 = _buckets_of(cluster, "s0")[:2]
    a1, a2 = _key(b1), _key(b2)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0), (%s, 0)", (a1, a2))
    world.sql("s0", "INSERT INTO notes VALUES (7, %s, 'first')", (a1,))

    def writer():
        # delete note 7 of a1 (moving bucket: logged), then a new note 7 for a2 (bucket not moving)
        world.sql("s0", "DELETE FROM notes WHERE id = 7")
        world.sql("s0", "INSERT INTO notes VALUES (7, %s, 'second')", (a2,))

    HookedMover(cluster, {"after_copy": writer}).apply(_one_bucket_plan(cluster, b1, "s2"))
    try:
        places = {s: world.sql(s, "SELECT account_id, body FROM notes WHERE id = 7") for s in ("s0", "s1", "s2")}
        report = verify(cluster)
        assert places == {"s0": [(a2, "second")], "s1": [], "s2": []}, places
        assert report.ok, report.render()
    finally:
        cluster.dispose()


# -- 4. catch-up upserts by primary key over the target's own rows -----------------------------


def test_catch_up_does_not_overwrite_a_row_the_target_owns(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    b_t = _buckets_of(cluster, "s1")[0]
    a1, a_t = _key(b1), _key(b_t)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s1", "INSERT INTO accounts VALUES (%s, 0)", (a_t,))
    world.sql("s1", "INSERT INTO notes VALUES (100, %s, 's1 owns this')", (a_t,))  # e.g. a per-shard sequence

    def writer():  # s0 hands out the same id for a note in the moving bucket, after the copy
        world.sql("s0", "INSERT INTO notes VALUES (100, %s, 'moving')", (a1,))

    error = None
    try:
        HookedMover(cluster, {"after_copy": writer}).apply(_one_bucket_plan(cluster, b1, "s1"))
    except RebalanceError as e:
        error = e
    try:
        on_s1 = world.sql("s1", "SELECT account_id, body FROM notes WHERE id = 100")
        assert (a_t, "s1 owns this") in on_s1, (
            f"s1's own note 100 was overwritten: s1 now holds {on_s1}; move error: {error}")
    finally:
        cluster.dispose()


# -- 5. a second unique key: upserts run before deletes --------------------------------------


def test_replacing_a_row_under_a_second_unique_key_does_not_block_the_move(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s0", "INSERT INTO slots VALUES (1, %s, 1)", (a1,))

    def writer():
        with world.conn("s0") as c, c.transaction():
            c.execute("DELETE FROM slots WHERE id = 1")
            c.execute("INSERT INTO slots VALUES (2, %s, 1)", (a1,))

    mover = HookedMover(cluster, {"after_copy": writer})
    plan = _one_bucket_plan(cluster, b1, "s2")
    errors = []
    try:
        mover.apply(plan)
    except RebalanceError as e:
        errors.append(str(e))
        move_id = max(m["move"] for m in rebalance.move_status(cluster))
        try:
            HookedMover(cluster).run(move_id)  # resume
        except RebalanceError as e2:
            errors.append(str(e2))
    try:
        assert not errors, errors
        assert world.sql("s2", "SELECT id, seq FROM slots") == [(2, 1)]
    finally:
        cluster.dispose()


# -- 5b. identity columns -------------------------------------------------------------------


def test_a_table_with_an_identity_key_can_be_moved_under_writes(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s0", "INSERT INTO tokens (account_id) VALUES (%s)", (a1,))

    def writer():
        world.sql("s0", "UPDATE tokens SET used = true WHERE account_id = %s", (a1,))

    error = None
    try:
        HookedMover(cluster, {"after_copy": writer}).apply(_one_bucket_plan(cluster, b1, "s2"))
    except RebalanceError as e:
        error = e
    try:
        assert error is None, str(error)
        assert world.sql("s2", "SELECT used FROM tokens WHERE account_id = %s", (a1,)) == [(True,)]
    finally:
        cluster.dispose()


# -- 5c. staging tables named after the table, truncated to 63 bytes ---------------------------------


def test_tables_with_long_similar_names_do_not_share_a_stage(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s0", f"INSERT INTO {LONG1} VALUES (1, %s, 0)", (a1,))
    world.sql("s0", f"INSERT INTO {LONG2} VALUES (2, %s, 0)", (a1,))

    def writer():
        world.sql("s0", f"UPDATE {LONG1} SET v = 10 WHERE id = 1")
        world.sql("s0", f"UPDATE {LONG2} SET v = 20 WHERE id = 2")

    error = None
    try:
        HookedMover(cluster, {"after_copy": writer}).apply(_one_bucket_plan(cluster, b1, "s2"))
    except RebalanceError as e:
        error = e
    try:
        second = world.sql("s2", f"SELECT id, v FROM {LONG2} ORDER BY id")
        assert error is None and second == [(2, 20)], f"{LONG2} on s2: {second}; move error: {error}"
    finally:
        cluster.dispose()


# -- 5d. verification compares text renderings that depend on each server's settings ---------------


def test_verify_does_not_depend_on_server_timezones(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (a1,))
    world.sql("s0", "INSERT INTO notes VALUES (1, %s, 'x')", (a1,))
    # The server is shared with the module's other tests: restore its setting (set by no
    # ALTER SYSTEM before) when done.
    assert world.sql("s2", "SELECT count(*) FROM pg_file_settings WHERE name = 'timezone' "
                           "AND sourcefile LIKE '%%postgresql.auto.conf'") == [(0,)]
    default_tz = world.sql("s2", "SHOW timezone")[0][0]
    try:
        _set_server_timezone(world, "s2", "'Asia/Tokyo'", "Asia/Tokyo")
        error = None
        try:
            HookedMover(cluster).apply(_one_bucket_plan(cluster, b1, "s2"))
        except RebalanceError as e:
            error = e
        assert error is None, str(error)
    finally:
        cluster.dispose()
        _set_server_timezone(world, "s2", "DEFAULT", default_tz)


def _set_server_timezone(world, shard: str, value: str, expect: str) -> None:
    """ALTER SYSTEM SET timezone = value, reload, and wait until new sessions see ``expect``."""
    world.sql(shard, f"ALTER SYSTEM SET timezone = {value}")
    world.sql(shard, "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while world.sql(shard, "SHOW timezone")[0][0] != expect:
        assert time.monotonic() < deadline, f"{shard}'s timezone is not {expect} 10 s after the reload"
        time.sleep(0.02)


# -- 6 and 7. abort after a crash inside the cut-over ----------------------------------------


def _crash_before_publish(cluster, bucket: int) -> int:
    """Move ``bucket`` to s2 with a mover that dies after the source gave the bucket up and
    before the catalog published; return the move's id."""
    mover = HookedMover(cluster)

    def crash(conn, *a, **kw):
        raise RuntimeError("simulated crash: the mover died before the catalog published")

    mover.catalog.publish_map = crash  # the cluster's catalog: undone below
    try:
        with pytest.raises(RebalanceError):
            mover.apply(_one_bucket_plan(cluster, bucket, "s2"))
    finally:
        del mover.catalog.publish_map
    return max(m["move"] for m in rebalance.move_status(cluster))


def _owned(world, shard: str, bucket: int) -> bool:
    return bool(world.sql(shard, "SELECT count(*) FROM shardkit.owned_buckets WHERE bucket = %s", (bucket,))[0][0])


def test_abort_after_a_crash_between_source_commit_and_publish_restores_writes(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    move_id = _crash_before_publish(cluster, b1)
    assert rebalance.move_status(cluster, move_id)[0]["batches"][0]["step"] == "copied"
    # The source has given the buckets up: in fact the batch has switched, so abort
    # refuses and says to resume, which publishes.
    with pytest.raises(RebalanceError, match="resume"):
        rebalance.abort(cluster, move_id)
    result = "refused"
    rebalance.Mover(cluster, grace=0, progress=_noop).run(move_id)
    fresh = world.cluster()
    try:
        error = None
        try:
            shardkit.run_transaction(_sessionmaker(fresh), lambda s: s.add(Account(id=_key(b1, a1 + 1), balance=1)),
                                     refresh_timeout=0.5)
        except shardkit.NotOwned as e:
            error = e
        report = verify(fresh)
        assert error is None, (
            f"after abort {result}, the map gives bucket {b1} to {fresh.config.bucket_map[b1]}; "
            f"s0 owns it: {_owned(world, 's0', b1)}, s2 owns it: {_owned(world, 's2', b1)}; the write failed: {error}")
        assert report.ok, report.render()
    finally:
        fresh.dispose()
        cluster.dispose()


def _crash_between_target_and_source_commit(world, cluster, bucket: int) -> None:
    """Move ``bucket`` from s0 to s2 with a mover whose cut-over fails at the source's commit
    (as if it were killed right before it), after the target's."""
    world.sql("s0", """
        CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS
        $$BEGIN RAISE EXCEPTION 'simulated crash before the source commit'; END$$;
        CREATE TRIGGER fail_once BEFORE DELETE ON shardkit.owned_buckets
        FOR EACH ROW EXECUTE FUNCTION public.fail_once();""")
    with pytest.raises(RebalanceError):
        HookedMover(cluster).apply(_one_bucket_plan(cluster, bucket, "s2"))
    world.sql("s0", "DROP TRIGGER fail_once ON shardkit.owned_buckets; DROP FUNCTION public.fail_once()")


def test_abort_after_a_crash_between_target_and_source_commit_restores_ownership(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    _crash_between_target_and_source_commit(world, cluster, b1)
    move_id = max(m["move"] for m in rebalance.move_status(cluster))
    rebalance.abort(cluster, move_id)
    try:
        s2_owns = _owned(world, "s2", b1)
        s2_moving = world.sql("s2", "SELECT count(*) FROM shardkit.moving_buckets WHERE bucket = %s", (b1,))[0][0]
        # The target accepts a write to a bucket the map gives s0 (what a stale map could send it).
        accepted = True
        try:
            world.sql("s2", "INSERT INTO accounts VALUES (%s, 9)", (a1,))
        except psycopg.Error:
            accepted = False
        report = verify(cluster)
        assert not s2_owns and not s2_moving and not accepted, (
            f"after abort s2 owns bucket {b1}: {s2_owns}, records its changes: {bool(s2_moving)}, "
            f"accepted a write to it: {accepted}")
        assert report.ok, report.render()
    finally:
        cluster.dispose()


# Checked and correct: resume after the same two crash points finishes the move with nothing lost.


def test_resume_after_a_crash_between_target_and_source_commit_carries_later_writes(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    _crash_between_target_and_source_commit(world, cluster, b1)
    world.sql("s0", "UPDATE accounts SET balance = 6 WHERE id = %s", (a1,))  # the map still says s0
    move_id = max(m["move"] for m in rebalance.move_status(cluster))
    HookedMover(cluster).run(move_id)
    try:
        assert world.sql("s2", "SELECT balance FROM accounts WHERE id = %s", (a1,)) == [(6,)]
        assert world.sql("s0", "SELECT count(*) FROM accounts WHERE id = %s", (a1,)) == [(0,)]
        assert verify(cluster).ok
    finally:
        cluster.dispose()


def test_resume_after_a_crash_before_the_publish_switches(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    move_id = _crash_before_publish(cluster, b1)
    HookedMover(cluster).run(move_id)
    try:
        cluster.refresh_map()
        assert cluster.config.bucket_map[b1] == "s2"
        assert world.sql("s2", "SELECT balance FROM accounts WHERE id = %s", (a1,)) == [(5,)]
        assert verify(cluster).ok
    finally:
        cluster.dispose()


# -- 8. bucket locks: deadlock (fixed in 18c4719), stalls and starvation ---------------------------


def _waiting_for_bucket_lock(world, shard: str) -> bool:
    rows = world.sql(shard, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                            "AND NOT granted AND mode = 'ExclusiveLock' "
                            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                     (GUARD_LOCK_CLASS,))
    return rows[0][0] > 0


def _two_bucket_plan(cluster, b_lo: int, b_hi: int):
    live = cluster.config.bucket_map
    return plan_from_maps(live, tuple("s2" if b in (b_lo, b_hi) else s for b, s in enumerate(live)),
                          "test: two buckets")


def test_cut_over_survives_a_writer_of_two_buckets_of_the_batch(world):
    """Was a deadlock at e05b2ae (the cut-over waited for one bucket lock while holding another and
    the mover got DeadlockDetected, which it did not retry); passes since 18c4719 (try-locks)."""
    cluster = world.cluster()
    b_lo, b_hi = sorted(_buckets_of(cluster, "s0")[:2])
    k_lo, k_hi = _key(b_lo), _key(b_hi)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0), (%s, 0)", (k_lo, k_hi))
    writer_errors: list[BaseException] = []
    started = threading.Event()

    def writer():
        try:
            with world.conn("s0") as c, c.transaction():
                c.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (k_hi,))  # holds b_hi
                started.set()
                time.sleep(0.3)
                c.execute("UPDATE accounts SET balance = 2 WHERE id = %s", (k_lo,))  # then wants b_lo
                time.sleep(0.3)
        except BaseException as e:  # noqa: BLE001
            writer_errors.append(e)

    t = threading.Thread(target=writer, daemon=True)

    def begin_writer():
        t.start()
        started.wait(5)

    error = None
    try:
        HookedMover(cluster, {"before_cut_over": begin_writer}).apply(_two_bucket_plan(cluster, b_lo, b_hi))
    except RebalanceError as e:
        error = e
    t.join(15)
    try:
        assert error is None and not writer_errors, (error, writer_errors)
        assert world.sql("s2", "SELECT balance FROM accounts WHERE id = %s", (k_lo,)) == [(2,)]
    finally:
        cluster.dispose()


def test_capture_does_not_stall_writers_behind_a_long_transaction(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    k1, k2 = _key(b1), _key(b1, _key(b1) + 1)  # two rows of one bucket
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0), (%s, 0)", (k1, k2))
    long_tx = world.conn("s0")
    long_tx.execute("BEGIN")
    long_tx.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (k1,))  # a 4 s transaction
    waiting = threading.Event()
    mover_thread = threading.Thread(
        target=lambda: HookedMover(cluster, {"waiting_for_writers": waiting.set}).apply(
            _one_bucket_plan(cluster, b1, "s2")), daemon=True)
    mover_thread.start()
    # The mover waits for the long transaction (by polling, or, were it to wait on the lock
    # itself, queued for it): the write below runs meanwhile.
    deadline = time.monotonic() + 5
    while not (waiting.is_set() or _waiting_for_bucket_lock(world, "s0")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    t0 = time.monotonic()
    threading.Timer(4.0, lambda: (long_tx.execute("COMMIT"), long_tx.close())).start()
    world.sql("s0", "UPDATE accounts SET balance = 3 WHERE id = %s", (k2,))  # another row of the bucket
    stalled = time.monotonic() - t0
    mover_thread.join(30)
    try:
        # was 1.0: a write stalled behind the long transaction waits for its commit (Timer: 4 s)
        assert stalled < 2.5, f"a write to another row of bucket {b1} waited {stalled:.1f}s"
    finally:
        cluster.dispose()


def test_capture_waits_for_an_upsert_that_checked_before_capture(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    k = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 0)", (k,))
    t1 = world.conn("s0")
    t1.execute("BEGIN")
    t1.execute("INSERT INTO notes VALUES (50, %s, 't1')", (k,))  # in progress: has an xid
    copied = threading.Event()
    w_errors: list[BaseException] = []

    def upsert():
        try:
            with world.conn("s0") as c:
                c.execute("BEGIN")
                # Its guard trigger runs now (not moving yet), then it waits for t1 with no xid of its own.
                c.execute("INSERT INTO notes VALUES (50, %s, 'w') ON CONFLICT (id) DO NOTHING", (k,))
                copied.wait(3)  # a transaction that goes on for a while
                c.execute("COMMIT")  # acknowledged
        except BaseException as e:  # noqa: BLE001
            w_errors.append(e)

    w = threading.Thread(target=upsert, daemon=True)
    w.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not world.sql(
            "s0", "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                  "AND query LIKE '%%ON CONFLICT%%' AND datname = current_database()")[0][0]:
        time.sleep(0.02)
    errors: list[BaseException] = []

    def run():
        try:
            HookedMover(cluster, {"after_copy": copied.set}).apply(_one_bucket_plan(cluster, b1, "s2"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    m = threading.Thread(target=run, daemon=True)
    m.start()
    while time.monotonic() < deadline + 5 and not world.sql(
            "s0", "SELECT count(*) FROM shardkit.moving_buckets WHERE bucket = %s", (b1,))[0][0]:
        time.sleep(0.01)
    time.sleep(0.3)  # capture has taken its snapshot
    t1.execute("ROLLBACK")
    t1.close()
    w.join(20)
    m.join(30)
    try:
        assert not w_errors, w_errors
        on_s2 = world.sql("s2", "SELECT body FROM notes WHERE id = 50")
        assert not errors and on_s2 == [("w",)], f"move: {errors}; note 50 on the new owner: {on_s2}"
    finally:
        cluster.dispose()


def test_cut_over_makes_progress_under_steady_writes(world):
    cluster = world.cluster()
    buckets = _buckets_of(cluster, "s0")[:8]
    keys = [_key(b) for b in buckets]
    world.sql("s0", "INSERT INTO accounts SELECT unnest(%s::bigint[]), 0", (keys,))
    stop = threading.Event()
    commits = [0]

    def writer(i: int):  # eight writers, one per bucket, 100 ms transactions back to back, staggered
        time.sleep(0.0125 * i)
        with world.conn("s0") as c:
            while not stop.is_set():
                try:
                    with c.transaction():
                        c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (keys[i],))
                        c.execute("SELECT pg_sleep(0.1)")
                except psycopg.Error as e:
                    assert e.sqlstate == "SK001", e  # the bucket has moved: s0 refuses, as it must
                    return
                commits[0] += 1

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    live = cluster.config.bucket_map
    plan = plan_from_maps(live, tuple("s2" if b in buckets else s for b, s in enumerate(live)), "test: 8 buckets")
    switched = threading.Event()
    mover = HookedMover(cluster, {"before_verify": switched.set})
    mover_thread = threading.Thread(target=lambda: mover.apply(plan), daemon=True)
    mover_thread.start()
    in_time = switched.wait(15)
    stop.set()
    for t in threads:
        t.join(10)
    mover_thread.join(30)
    try:
        assert in_time, f"no switch within 15 s while writers committed {commits[0]} short transactions"
    finally:
        cluster.dispose()


# -- 10. the mover's lock on the move is a session lock on an idle catalog connection ------------


def test_a_mover_whose_catalog_connection_dropped_cannot_switch_behind_an_abort(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    mover = HookedMover(cluster, step_delay=2.0)
    plan = _one_bucket_plan(cluster, b1, "s2")
    move_id = mover.start(plan)
    outcome: list[object] = []
    th = threading.Thread(target=lambda: outcome.append(_run(mover, move_id)), daemon=True)
    th.start()
    with world.catalog() as cat:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            steps = [r[0] for r in cat.execute("SELECT step FROM shardkit_catalog.journal WHERE move_id = %s",
                                               (move_id,))]
            if "copied" in steps:
                break
            time.sleep(0.02)
        # The catalog connection holding the mover's lock drops.
        cat.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid = %s AND objid = %s "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    (MOVER_LOCK_CLASS, move_id))
    refused = False
    try:
        rebalance.abort(cluster, move_id)
    except RebalanceError:
        refused = True
    if not refused:
        world.sql("s0", "UPDATE accounts SET balance = 6 WHERE id = %s", (a1,))  # acknowledged on the owner
    th.join(30)
    try:
        fresh = world.cluster()
        with _sessionmaker(fresh)() as s:
            balance = s.scalar(select(Account.balance).where(Account.id == a1))
        owner = fresh.config.bucket_map[b1]
        fresh.dispose()
        # Either abort is refused, or it wins and fences the running mover out: the
        # bucket stays with its source, whose acknowledged write is there, and the
        # mover stops instead of switching behind the abort's back.
        if not refused:
            assert "taken over" in str(outcome), outcome
            assert owner == "s0" and balance == 6, (owner, balance)
        report = verify(world.cluster())
        assert report.ok, report.render()
    finally:
        cluster.dispose()


def _run(mover, move_id):
    try:
        mover.run(move_id)
        return "done"
    except Exception as e:  # noqa: BLE001
        return repr(e)[:300]


# -- 11. foreign buckets can go back to an older state than the map ---------------------------------


def test_an_older_refresh_does_not_roll_back_foreign_buckets(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    a1 = _key(b1)
    world.sql("s0", "INSERT INTO accounts VALUES (%s, 5)", (a1,))
    app = world.cluster()
    Session = _sessionmaker(app)
    seen = {}

    def after_copy():
        seen["old"] = app.catalog.current_state()  # read by one thread (e.g. the follower) ...

    def before_verify():
        app.refresh_map()  # ... while another thread's refresh installs the switched state
        shardkit.run_transaction(Session, lambda s: s.add(Account(id=_key(b1, a1 + 1), balance=1)))
        real = app.catalog.current_state
        app.catalog.current_state = lambda *a, **k: seen["old"]
        app.refresh_map()  # the first thread finishes with what it read
        app.catalog.current_state = real
        with Session() as s:
            seen["count"] = s.scalar(select(func.count()).select_from(Account))
        seen["foreign"] = dict(app.foreign_buckets)
        seen["version"] = app.map_version

    HookedMover(cluster, {"after_copy": after_copy, "before_verify": before_verify}).apply(
        _one_bucket_plan(cluster, b1, "s2"))
    try:
        assert seen["count"] == 2, (
            f"a key-less count saw {seen['count']} accounts, not 2: map version {seen['version']} but "
            f"foreign buckets {seen['foreign']} (of the copy step)")
    finally:
        app.dispose()
        cluster.dispose()


# -- 12. passwords in the mover's and the follower's DSNs --------------------------------------------


def test_a_password_with_a_space_neither_leaks_nor_breaks_the_mover(world, tmp_path, caplog):
    secret = "pa ss-w0rd"  # the local servers trust local connections: any password works
    cfg = {"bucket_count": world.config["bucket_count"], "shards": [dict(s) for s in world.config["shards"]]}
    for s in cfg["shards"]:
        s["primary"] = make_url(s["primary"]).set(password=secret).render_as_string(hide_password=False)
    cat = make_url(world.catalog_url).set(password=secret).render_as_string(hide_password=False)
    cluster = shardkit.Cluster.from_config({**cfg, **GROUPS, "catalog": {"url": cat}}, follow_map=False)
    b1 = _buckets_of(cluster, "s0")[0]
    with cluster.primary("s0").connect() as c:  # the application connects fine with that password
        c.exec_driver_sql("SELECT 1")
    message = ""
    try:
        HookedMover(cluster).apply(_one_bucket_plan(cluster, b1, "s2"))
    except RebalanceError as e:
        message = str(e)
    with world.catalog() as c:
        journal = " ".join(str(r[0]) for r in c.execute("SELECT detail FROM shardkit_catalog.journal"))
    with caplog.at_level(logging.WARNING, logger="shardkit.catalog"):
        follower_cluster = shardkit.Cluster.from_config({**cfg, **GROUPS, "catalog": {"url": cat}})
        time.sleep(1.0)
        follower_cluster.dispose()
    try:
        leaks = [where for where, text in (("error", message), ("journal", journal), ("log", caplog.text))
                 if "pa ss" in text or "pa%20ss" in text]
        assert not leaks and not message, f"password in {leaks}; mover error: {message}"
    finally:
        cluster.dispose()


# -- 13. status never shows why a move stopped ----------------------------------------------------


def test_status_shows_why_a_move_stopped(world):
    cluster = world.cluster()
    b1 = _buckets_of(cluster, "s0")[0]
    mover = HookedMover(cluster)

    def crash(conn, *a, **kw):
        raise RuntimeError("simulated: the catalog went away")

    mover.catalog.publish_map = crash
    with pytest.raises(RebalanceError):
        mover.apply(_one_bucket_plan(cluster, b1, "s2"))
    try:
        status = rebalance.move_status(cluster)[-1]
        assert status["error"], status
    finally:
        cluster.dispose()


# -- 14. read-your-writes across a switch ---------------------------------------------------------


def test_read_your_writes_holds_across_a_switch(shardkit_module_cluster_factory, tmp_path):
    """A cluster of its own: a replica whose apply is delayed (the target's; two shards,
    not the module's three: the move's target need not be a new shard)."""
    w = _make_world(shardkit_module_cluster_factory(shards=2, replicas=1, bucket_count=BUCKETS), tmp_path)
    try:
        cluster = w.cluster()
        b1 = _buckets_of(cluster, "s0")[0]
        a1 = _key(b1)
        s1_replica = next(s for s in w.dev.shards if s.name == "s1").replicas[0]
        s1_replica.set_apply_delay(2.0)  # within the default max_lag_seconds (5)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)  # read_your_writes
        with Session() as s:
            s.add(Account(id=a1, balance=7))
            s.commit()
            token = s.consistency_token()
        HookedMover(cluster).apply(_one_bucket_plan(cluster, b1, "s1"))
        cluster.refresh_map()
        with Session(consistency_token=token) as s:
            seen = s.scalar(select(Account.balance).where(Account.id == a1))
        owner = cluster.shard_for("accounts", a1)
        on_primary = w.sql(owner, "SELECT balance FROM accounts WHERE id = %s", (a1,))
        assert seen == 7, (f"the session wrote balance 7 for account {a1}, then read {seen} after the move "
                           f"(owner {owner}, whose primary has {on_primary})")
        cluster.dispose()
    finally:
        w.dev.down(remove=True)
