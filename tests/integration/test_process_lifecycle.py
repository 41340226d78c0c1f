"""A Cluster over a process's life, as a production web app uses it: engines held across
dispose(), a worker forked while another thread works out a model's loading rules, and
the health monitor starting in a new worker (its replicas answer before their primary).

The fork and dispose tests use the shared local cluster (their own table; no node is
stopped or delayed); the monitor test starts a 1-shard cluster of its own (it delays its
replica's replay)."""

from __future__ import annotations

import threading

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._replicas import HealthMonitor
from test_forked_workers import in_child  # (a forked child, killed if it hangs)
from waiting import wait_for

# The forks here happen while threads run, on purpose (a pre-forking server's case).
pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "lifecycle5b_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(40))


GROUPS = {"groups": {"items": {"tables": {Item.__tablename__: "id"}}}}


def config(dev, **extra):
    return {**dev.config_dict(), **GROUPS, **extra}


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata):
        yield shardkit_dev_cluster


def backend_pid(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_fork_while_a_thread_works_out_a_models_loading_rules_leaves_the_worker_working(dev):
    """An application thread's first query of a model has the router work out whether its
    rows can be loaded shard by shard, under a lock; the main thread forks meanwhile
    (multiprocessing from a threaded app).  The lock is held in the child by a thread it
    does not have: the worker's first query of that model waited forever."""
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        holding, release = threading.Event(), threading.Event()

        def checking():   # as Router.mapper_problem, working out Item's rules
            with cluster.router._problems_lock:
                holding.set()
                release.wait(30)

        t = threading.Thread(target=checking)
        t.start()
        try:
            assert holding.wait(10)

            def worker():
                with Session() as s:
                    assert s.scalars(select(Item).where(Item.id == 1)).all() == []

            in_child(worker)
        finally:
            release.set()
            t.join()
    finally:
        cluster.dispose()


def test_dispose_closes_the_pool_of_an_engine_held_since_an_earlier_dispose(dev):
    """An application keeps a node's engine (``eng = cluster.primary("s0")`` for its raw
    SQL, as Alembic's env.py or a repository does) and calls cluster.dispose() now and
    then (a config reload, test set-up).  The engine pools connections again through the
    application's reference; the next dispose() left them open: it closed only the pools
    of engines used through the cluster since."""
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        shard = cluster.shard_names[0]
        eng = cluster.primary(shard)
        cluster.dispose()
        pid = backend_pid(eng)  # pooled again, through the application's reference
        cluster.dispose()

        def gone() -> bool:
            with dev.shard(shard).primary.connect() as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0
        wait_for(gone, 10, f"backend {pid}, pooled before dispose(), to end")
    finally:
        cluster.dispose()


def test_forked_worker_does_not_share_the_parents_connections_of_an_engine_held_across_dispose(dev):
    """The same held engine in a pre-forking server's master: it pooled a connection
    after an earlier dispose() and the master forked.  The fork hook let go of the pools
    of the cluster's engines only, so the worker's cluster.primary(shard) gave back that
    engine with the master's pooled connection: one socket, two processes."""
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        shard = cluster.shard_names[0]
        eng = cluster.primary(shard)
        cluster.dispose()
        parent_pid = backend_pid(eng)

        def worker():
            assert backend_pid(cluster.primary(shard)) != parent_pid, \
                "the worker used the parent's pooled connection"
            assert backend_pid(eng) != parent_pid, "the worker used the parent's pooled connection"

        in_child(worker)
        assert backend_pid(eng) == parent_pid  # the parent's connection is intact, still pooled
    finally:
        cluster.dispose()


# -- the monitor starting in a new worker: its own 1-shard cluster ----------------------------


@pytest.fixture(scope="module")
def lagging_dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    cluster = shardkit.Cluster.from_config(config(dev))
    try:
        Base.metadata.create_all(cluster.primary("s0"))
    finally:
        cluster.dispose()
    dev.shard("s0").replicas[0].wait_caught_up()
    return dev


def test_a_replica_polled_before_its_primary_is_not_taken_for_caught_up(lagging_dev, monkeypatch):
    """A new worker (or a cluster used again after dispose()) starts its health monitor;
    a thread reads while another waits for the first polls (or a scrape started it
    without waiting).  The replica answered its first poll before the primary did: with
    no primary position to compare, its lag was taken as 0 bytes and 0 s, and it got
    reads although it is an hour behind (here: recovery_min_apply_delay)."""
    dev = lagging_dev
    primary, r0 = dev.shard("s0").primary, dev.shard("s0").replicas[0]
    gate = threading.Event()
    poll = HealthMonitor._poll

    def primary_answers_late(self, conn, node):
        # (Only this test's cluster: the monitors of others in the process poll on.)
        if node.role == "primary" and self.cluster is cluster:
            gate.wait(30)
        return poll(self, conn, node)

    monkeypatch.setattr(HealthMonitor, "_poll", primary_answers_late)
    r0.set_apply_delay(3600)
    cluster = None
    try:
        with primary.connect() as c:
            c.execute(f"INSERT INTO {Item.__tablename__} VALUES (1, 'written before the worker started')")
        cluster = shardkit.Cluster.from_config(config(dev, replicas={"consistency": "eventual"}))
        mon = cluster.monitor(wait=False)
        replica = mon.shards["s0"].replicas[0]
        wait_for(lambda: replica.checked_at and replica.up, 10, "the replica's first poll")
        assert not mon.shards["s0"].primary.checked_at  # (the primary has not answered yet)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            assert s.execute(select(Item.v).where(Item.id == 1)).scalar() is not None, \
                (replica.lag_bytes, replica.lag_seconds)
        assert (replica.lag_bytes, replica.lag_seconds) == (None, None)
    finally:
        gate.set()
        if cluster is not None:
            cluster.dispose()
        r0.set_apply_delay(0)
    r0.wait_caught_up()
