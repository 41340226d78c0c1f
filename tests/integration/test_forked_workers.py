"""A long-lived server process: gunicorn with ``--preload`` (the Cluster made, and maybe
used, in the master, which then forks its workers; again each time a worker is recycled)
or ``multiprocessing`` with fork.  The child has none of the parent's threads (health
monitor, map follower, scatter workers), and the parent's pooled connections are not its
own.  On the shared local cluster (its own table and catalog database; no node is
stopped)."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit.catalog import Catalog

# The forks here happen while threads run, on purpose (the monitor's, the follower's):
# Python 3.12+ warns of any fork in a multi-threaded process.
pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")]

CATALOG_DB = "forked_workers_catalog"
CHILD_LIMIT = 20  # seconds a child may take before it is taken for hung (SIGALRM kills it)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "forked_workers_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


def config(dev, **extra):
    return {**dev.config_dict(), "groups": {"items": {"tables": {Item.__tablename__: "id"}}}, **extra}


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, config(shardkit_dev_cluster), Base.metadata):
        yield shardkit_dev_cluster


def in_child(fn):
    """Run ``fn()`` in a forked child (as a pre-forking server's worker); assert it returned.
    A child that hangs is killed after CHILD_LIMIT s and reported as hung."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns into pytest
        code = 1
        try:
            os.close(r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(CHILD_LIMIT)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(w, traceback.format_exc().encode()[-3000:])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != -signal.SIGALRM, f"the forked child hung (killed after {CHILD_LIMIT} s)"
    assert code == 0, said


def test_forked_worker_writes_after_the_parent_started_the_monitor(dev):
    """The master started the health monitor (a readiness check at start-up, or a replica
    read while warming up) and forked.  The monitor's threads do not exist in the worker,
    yet the monitor object says it runs: once its last samples are older than stale_after,
    every write of the worker was refused forever as 'primary ... has not answered the
    health poll (hung, not refusing connections)', with the primaries fine."""
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        stale_after = cluster.monitor().stale_after
        assert cluster.health().ready
        # (Primaries: the parent reads a row its forked worker wrote, with no token of it.)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

        def worker():
            time.sleep(stale_after + 0.5)  # what the parent's monitor saw is old now
            with Session() as s:
                s.merge(Item(id=11, v="worker"))
                s.commit()
            assert cluster.health().ready, cluster.health().nodes

        in_child(worker)
        with Session() as s:
            assert s.get(Item, 11).v == "worker"
    finally:
        cluster.dispose()


def test_forked_worker_reads_across_shards_on_its_own_connections(dev):
    """The master ran a cross-shard read (its scatter threads started) and forked.  In the
    worker the executor's threads are gone but it believes it has idle ones: a cross-shard
    read waited forever.  And the worker must not use the parent's pooled connections
    (one socket, two processes), even if it did not call dispose(close=False)."""
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        with Session() as s:
            s.merge(Item(id=21, v="parent"))
            s.commit()
            assert "parent" in s.scalars(select(Item.v)).all()  # on every shard
        parent_pids = {}
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                parent_pids[s] = c.execute(text("SELECT pg_backend_pid()")).scalar()

        def worker():
            with Session() as s:
                assert "parent" in s.scalars(select(Item.v)).all()
            for s in cluster.shard_names:
                with cluster.primary(s).connect() as c:
                    assert c.execute(text("SELECT pg_backend_pid()")).scalar() != parent_pids[s], \
                        f"the worker used the parent's pooled connection to {s}"

        in_child(worker)
        for s in cluster.shard_names:   # the parent's connections are intact, still pooled
            with cluster.primary(s).connect() as c:
                assert c.execute(text("SELECT pg_backend_pid()")).scalar() == parent_pids[s]
    finally:
        cluster.dispose()


def test_forked_worker_follows_the_catalogs_map(dev):
    """The master only created the Cluster (module level, as the README's example does):
    with a [catalog] that already started the map follower and read the catalog.  The
    worker has no follower thread, and none started again: it routed by the map of the
    fork for ever (reads of moved keys miss their rows)."""
    url = dev.create_catalog(CATALOG_DB)
    cat = Catalog(url)
    cluster = None
    try:
        cat.ensure_schema()

        def publish():
            with cat.engine.begin() as c:
                return cat.publish_map(c, cluster.file_config.bucket_map, "test: forked workers")

        cluster = shardkit.Cluster.from_config(config(dev, catalog={"url": url}))
        version = publish()
        deadline = time.monotonic() + 10
        while cluster.map_version != version and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.map_version == version
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

        def worker():
            with Session() as s:
                s.scalars(select(Item).where(Item.id == 1)).all()
            child_cat = Catalog(url)
            try:
                with child_cat.engine.begin() as c:
                    newer = child_cat.publish_map(c, cluster.file_config.bucket_map, "test: from the worker")
            finally:
                child_cat.dispose()
            deadline = time.monotonic() + 10
            while cluster.map_version != newer and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cluster.map_version == newer, (
                f"the worker still routes by map version {cluster.map_version}, not {newer}")

        in_child(worker)
    finally:
        if cluster is not None:
            cluster.dispose()
        cat.dispose()


def test_fork_while_the_follower_installs_a_map_leaves_the_worker_working(dev):
    """The master's map follower holds the cluster's map lock while it installs a map (a
    move publishes one per step); a fork at that moment copies the lock held, by a thread
    the worker does not have.  The worker did as told (dispose(close=False)), and its first
    map reload (run_transaction after a refused write, its own follower) waited forever."""
    url = dev.create_catalog(CATALOG_DB)
    cat = Catalog(url)
    cluster = None
    try:
        cat.ensure_schema()
        cluster = shardkit.Cluster.from_config(config(dev, catalog={"url": url}), follow_map=False)
        holding, release = threading.Event(), threading.Event()

        def installing():   # as MapFollower._refresh -> Cluster._set_state
            with cluster._map_lock:
                holding.set()
                release.wait(30)

        t = threading.Thread(target=installing)
        t.start()
        try:
            assert holding.wait(10)

            def worker():
                cluster.dispose(close=False)
                with cat.engine.begin() as c:
                    version = cat.publish_map(c, cluster.file_config.bucket_map, "test: worker")
                assert cluster.refresh_map() == version

            cat.engine.dispose()  # (the child makes its own connection)
            in_child(worker)
        finally:
            release.set()
            t.join()
    finally:
        if cluster is not None:
            cluster.dispose()
        cat.dispose()
