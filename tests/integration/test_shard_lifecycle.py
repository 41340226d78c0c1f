"""A shard's life in a cluster with a catalog, across changes of the config file: a shard
added (and a process still running the file without it, as in a rolling deploy), a shard
drained and removed from the file, `rebalance init` run again with the application
running."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import inproc_cli
import psycopg
import pytest
from sqlalchemy import BigInteger, Integer, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration

N = 300


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "lc_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer, default=0)


GROUPS = {"groups": {"items": {"strategy": "hash", "tables": {"lc_items": "id"}}}}


class World:
    def __init__(self, dev, tmp) -> None:
        self.dev = dev
        self.catalog = dev.create_catalog()
        self.tmp = tmp

    def config(self, name: str, shards: list[str]):
        cfg = self.dev.config_dict()
        cfg["shards"] = [s for s in cfg["shards"] if s["name"] in shards]
        path = self.tmp / f"{name}.toml"
        path.write_text(to_toml({**cfg, **GROUPS, "catalog": {"url": self.catalog}}))
        return path

    def cli(self, *args: str, ok: bool = True, proc: bool = False) -> subprocess.CompletedProcess:
        """The command in this process (``inproc_cli``); ``proc``: as ``python -m shardkit.cli``
        (a mover running beside the application's process, as in a deploy)."""
        r = inproc_cli.shardkit(args, proc=proc, timeout=120)
        if ok:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def rows(self) -> dict[int, list[str]]:
        """id -> the shards holding it, read on every server (also one the file left out)."""
        out: dict[int, list[str]] = {}
        for shard in self.dev.shards:
            with psycopg.connect(shard.primary.dsn) as c:
                for (i,) in c.execute("SELECT id FROM lc_items"):
                    out.setdefault(i, []).append(shard.name)
        return out


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=64)
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    w = World(dev, tmp_path_factory.mktemp("lifecycle"))
    w.two = w.config("two", ["s0", "s1"])
    w.three = w.config("three", ["s0", "s1", "s2"])
    w.cli("rebalance", "init", "--config", str(w.two))
    return w


def _sessions(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Writer:
    """A thread inserting rows through run_transaction; keeps the ids acknowledged and the
    errors seen."""

    def __init__(self, Session, first: int) -> None:
        self.Session, self.next = Session, first
        self.acked: list[int] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            i, self.next = self.next, self.next + 1
            try:
                shardkit.run_transaction(self.Session, lambda s, i=i: s.add(Item(id=i)))
                self.acked.append(i)
            except shardkit.ShardkitError as e:
                self.errors.append(e)
            time.sleep(0.005)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def _says_why(err: BaseException, shard: str) -> None:
    text = str(err)
    assert shard in text and "config file" in text and "restart" in text, text


def test_a_process_on_the_old_config_refuses_rather_than_misreads_after_a_shard_is_added(world):
    """Rolling deploy gone wrong: a shard is added (config, schema, `rebalance init`,
    `apply --add`) while a process still runs the file without it.  Its map can no
    longer follow the catalog's; before, it went on routing by its old map: a moved row
    read as missing, a count across shards short of the rows on the new shard, only a log
    line saying anything.  Now its sessions refuse every statement with an error naming
    the shard and the fix; nothing acknowledged is lost."""
    w = world
    old = shardkit.Cluster.from_config(w.two)
    try:
        Session = _sessions(old)
        with Session() as s:
            s.add_all(Item(id=i) for i in range(N))
            s.commit()
        w.cli("rebalance", "init", "--config", str(w.three))
        with Writer(Session, 10_000) as writer:
            _wait(lambda: len(writer.acked) > 10, 10, "the writer's first commits")
            w.cli("rebalance", "apply", "--add", "s2", "--config", str(w.three), "--grace", "0.2", proc=True)
            _wait(lambda: writer.errors, 10, "the writer to be refused")
        new = shardkit.Cluster.from_config(w.three, follow_map=False)
        moved = next(i for i in range(N) if new.shard_for("lc_items", i) == "s2")
        new.dispose()
        with Session() as s:
            with pytest.raises(shardkit.RoutingError) as got:
                s.get(Item, moved)
            _says_why(got.value, "s2")
            with pytest.raises(shardkit.RoutingError) as counted:
                s.scalar(select(func.count()).select_from(Item))
            _says_why(counted.value, "s2")
        with pytest.raises(shardkit.RoutingError):
            old.shard_for("lc_items", moved)
        for e in writer.errors:
            assert isinstance(e, shardkit.RoutingError), repr(e)
            _says_why(e, "s2")
        rows = w.rows()
        assert all(len(rows.get(i, [])) == 1 for i in [*range(N), *writer.acked])
    finally:
        old.dispose()
    # Started on the old file after the move: the same, from its first statement.
    late = shardkit.Cluster.from_config(w.two)
    try:
        with _sessions(late)() as s, pytest.raises(shardkit.RoutingError) as got:
            s.get(Item, moved)
        _says_why(got.value, "s2")
    finally:
        late.dispose()


def test_the_new_config_deployed_before_the_drain_finished_refuses_then_follows(world):
    """The file without s2 reaches a process while the catalog's map still places buckets
    there (deployed before `apply --drain s2` finished).  It refuses (before: it routed by
    the file's even split over two shards, reading half the keys on the wrong shard); once
    the drain has emptied s2, the catalog's map fits its file and it works, unrestarted."""
    w = world
    with psycopg.connect(w.dev.shard("s2").primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM lc_items").fetchone()[0] > 0
    # The commands that need the catalog's map say what to do first.
    r = w.cli("rebalance", "init", "--config", str(w.two), ok=False)
    assert r.returncode == 2 and "s2" in r.stderr and "--drain" in r.stderr, r.stderr
    app = shardkit.Cluster.from_config(w.two)
    try:
        Session = _sessions(app)
        with Session() as s, pytest.raises(shardkit.RoutingError) as got:
            s.scalar(select(func.count()).select_from(Item))
        _says_why(got.value, "s2")
        w.cli("rebalance", "apply", "--drain", "s2", "--config", str(w.three), "--grace", "0.2", proc=True)
        _wait(lambda: app._map_misfit is None, 10, "the drained map")
        total = len(w.rows())
        with Session() as s:
            assert s.scalar(select(func.count()).select_from(Item)) == total
            assert all(s.get(Item, i) is not None for i in range(0, N, 7))
        for args in (["rebalance", "init"], ["verify"], ["status"]):
            w.cli(*args, "--config", str(w.two))
    finally:
        app.dispose()



def test_init_run_again_does_not_stall_the_application_behind_a_long_reader(world):
    """`rebalance init` is run again after every change of the shards (README), with the
    application running.  Each time it dropped and re-created the guard's triggers on every
    table of every shard: DROP TRIGGER waits for an ACCESS EXCLUSIVE lock, so behind one
    long read (a report, a session idle in its transaction) it waited, and every read and
    write of that table on that shard queued behind it until the reader ended.  An
    unchanged guard is now left as it is: init takes no table lock and finishes."""
    w = world
    app = shardkit.Cluster.from_config(w.two)
    s0 = w.dev.shard("s0").primary.dsn
    triggers = "SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgname LIKE 'shardkit_guard%'"
    with psycopg.connect(s0) as c:
        before = c.execute(triggers).fetchone()[0]
    reader = psycopg.connect(s0)
    try:
        reader.execute("SELECT count(*) FROM lc_items").fetchone()  # its transaction stays open
        with Writer(_sessions(app), 20_000) as writer:
            _wait(lambda: len(writer.acked) > 5, 10, "the writer's first commits")
            proc = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "rebalance", "init", "--config",
                                     str(w.two)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 60
                while proc.poll() is None:
                    waiting = reader.execute(
                        "SELECT pid, wait_event FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND pid <> pg_backend_pid() AND datname = current_database()").fetchall()
                    assert not waiting, f"init waits for the reader's lock, others queue behind it: {waiting}"
                    assert time.monotonic() < deadline, "init did not finish"
                    time.sleep(0.05)
            finally:
                reader.close()  # (a failure: let everyone go)
                out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, (out, err)
            acked = len(writer.acked)
            _wait(lambda: len(writer.acked) > acked + 5, 10, "the writer to go on")
        assert not writer.errors, writer.errors[:3]
        rows = w.rows()
        assert all(len(rows.get(i, [])) == 1 for i in writer.acked)
    finally:
        reader.close()
        app.dispose()
    with psycopg.connect(s0) as c:
        assert c.execute(triggers).fetchone()[0] == before  # the same triggers, kept
    w.cli("verify", "--config", str(w.two))
