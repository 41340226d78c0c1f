"""The nodes' pools and the cluster's lifecycle: what engine_options do
to the per-node cap and to the replicas' autocommit, dispose() then reuse with a catalog,
and dispose() in a forked worker.  On the shared local cluster (its own table and
catalog database; no node is stopped or delayed)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import cli
from shardkit.catalog import Catalog
from shardkit.devcluster import to_toml

pytestmark = pytest.mark.integration

CATALOG_DB = "pools_options_catalog"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pools_options_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


def config(dev, **extra):
    return {**dev.config_dict(), "groups": {"items": {"tables": {Item.__tablename__: "id"}}}, **extra}


def wait_for(check, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, config(shardkit_dev_cluster), Base.metadata):
        yield shardkit_dev_cluster


def test_engine_options_pool_size_cannot_lift_the_node_cap(dev):
    """max_connections caps this process's connections to each node; a pool_size or
    max_overflow passed in engine_options (for every node) must not lift it."""
    cluster = shardkit.Cluster.from_config(
        config(dev, pool={"max_connections": 2, "timeout": 0.3}),
        engine_options={"pool_size": 10, "max_overflow": 5})
    held = []
    try:
        eng = cluster.primary("s0")
        assert eng.pool.size() + eng.pool._max_overflow <= 2, eng.pool.status()
        held = [eng.connect() for _ in range(2)]
        with pytest.raises(sa_exc.TimeoutError) as err:
            held.append(eng.connect())
        assert str(err.value).startswith("node s0/primary: ")
        assert cluster.pool_stats()["s0/primary"]["checkedout"] == 2
    finally:
        for c in held:
            c.close()
        cluster.dispose()


@pytest.mark.parametrize("how", ["isolation_level", "execution_options"])
def test_engine_options_isolation_level_leaves_replica_reads_in_autocommit(dev, how):
    """An isolation level for every node's engine (SERIALIZABLE for the primaries' writes, a
    common choice) must not reach the replicas: a standby refuses SERIALIZABLE, and the
    replicas' reads run in autocommit by design."""
    opts = ({"isolation_level": "SERIALIZABLE"} if how == "isolation_level"
            else {"execution_options": {"isolation_level": "SERIALIZABLE"}})
    cluster = shardkit.Cluster.from_config(
        config(dev, replicas={"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                              "when_no_replica": "raise"}),
        engine_options=opts)
    try:
        with cluster.primary("s0").connect() as c:
            assert c.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
        replica = cluster.engine("s0", "replica", 0)
        with replica.connect() as c:
            assert c.execute(text("SELECT pg_is_in_recovery()")).scalar() is True
            assert c.connection.driver_connection.autocommit is True
        ran = []
        key = 4242 if how == "isolation_level" else 4343
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.add(Item(id=key, v="serial"))
            s.commit()
        shard = cluster.shard_for(Item, key)
        replica = cluster.engine(shard, "replica", 0)
        event.listen(replica, "before_cursor_execute", lambda *a: ran.append(a[2]))
        with Session() as s:
            wait_for(lambda: s.execute(select(Item.v).where(Item.id == key)).scalar() == "serial",
                     "the row on the replica")
        assert ran, "the read did not reach the replica"
    finally:
        cluster.dispose()


def test_dispose_then_reuse_follows_the_catalogs_map_again(dev):
    """dispose() stops the map follower; a cluster used again afterwards (its engines,
    monitor and scatter threads come back) must follow the catalog's map again, or it
    routes by a map that no longer is the truth (reads of moved keys miss their rows)."""
    url = dev.create_catalog(CATALOG_DB)
    cat = Catalog(url)
    cluster = None
    try:
        cat.ensure_schema()

        def publish(bucket_map):
            with cat.engine.begin() as c:
                return cat.publish_map(c, bucket_map, "test: pool options")

        cluster = shardkit.Cluster.from_config(config(dev, catalog={"url": url}))
        file_map = cluster.file_config.bucket_map
        version = publish(file_map)
        wait_for(lambda: cluster.map_version == version, "the first map")
        key = 7
        home = cluster.shard_for(Item, key)
        with cluster.primary(home).connect() as c:
            c.execute(text("SELECT 1"))
        cluster.dispose()

        with cluster.primary(home).connect() as c:   # used again
            c.execute(text("SELECT 1"))
        moved = list(file_map)
        other = next(s for s in cluster.shard_names if s != home)
        moved[cluster.bucket_for(Item, key)] = other
        version = publish(moved)
        wait_for(lambda: cluster.map_version == version, f"map version {version} after dispose() and reuse")
        assert cluster.shard_for(Item, key) == other
    finally:
        if cluster is not None:
            cluster.dispose()
        cat.dispose()


# A pre-forking server may fork while threads run (as this process has some):
# Python 3.12+ warns of it, as test_process_lifecycle.py lets it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_dispose_close_false_in_a_forked_worker_leaves_the_parents_connections(dev):
    """A pre-forking server forks workers from a process that used the cluster: the worker
    must drop the inherited pools without closing them (closing sends the server a
    Terminate on the parent's sockets: the parent's next statement fails with
    'node ... is unreachable').  dispose(close=False) does that, as SQLAlchemy's
    Engine.dispose(close=False) does, and the worker then works on its own connections.
    (No map follower in the parent: its periodic reads of the catalog may open a second
    pooled connection, and the pool then hands out either.)"""
    url = dev.create_catalog(CATALOG_DB)
    cluster = shardkit.Cluster.from_config(config(dev, catalog={"url": url}), follow_map=False)
    try:
        pids = {}
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                pids[s] = c.execute(text("SELECT pg_backend_pid()")).scalar()
        with cluster.catalog.engine.connect() as c:
            catalog_pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: never returns into pytest
            code = 1
            try:
                os.close(r)
                cluster.dispose(close=False)
                with cluster.primary("s0").connect() as c:
                    mine = c.execute(text("SELECT pg_backend_pid()")).scalar()
                code = 0 if mine != pids["s0"] else 3
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                os.write(w, repr(e).encode()[:500])
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(child, 0)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        assert os.waitstatus_to_exitcode(status) == 0, said
        for s in cluster.shard_names:   # the parent's pooled connections are intact
            with cluster.primary(s).connect() as c:
                assert c.execute(text("SELECT pg_backend_pid()")).scalar() == pids[s]
        with cluster.catalog.engine.connect() as c:
            assert c.execute(text("SELECT pg_backend_pid()")).scalar() == catalog_pid
    finally:
        cluster.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_says_which_map_its_bucket_counts_come_from(dev, tmp_path, capsys, caplog):
    """After a move the catalog's map is the truth: status counts its buckets and says its
    version.  With the catalog unreachable, the counts are the config file's map's (stale
    after a move): --json must say so, and why, not pass them off as the live ones."""
    url = dev.create_catalog(CATALOG_DB)
    cat = Catalog(url)
    try:
        cat.ensure_schema()
        file_map = shardkit.load_config(config(dev)).bucket_map
        moved = ["s1" if s == "s0" and b % 2 else s for b, s in enumerate(file_map)]
        with cat.engine.begin() as c:
            version = cat.publish_map(c, moved, "test: pool options status")
    finally:
        cat.dispose()
    expected = Counter(moved)

    def status(catalog_url):
        path = tmp_path / "status.toml"
        path.write_text(to_toml(config(dev, catalog={"url": catalog_url})))
        rc = cli.main(["status", "--config", str(path), "--json"])
        out = capsys.readouterr().out
        return rc, json.loads(out), out

    rc, data, _ = status(url)
    assert rc == 0, data
    assert data["map_version"] == version and data["catalog_error"] is None
    assert {s["shard"]: s["buckets"] for s in data["shards"]} == expected

    down = f"postgresql+psycopg://shardkit:Pools-Secret-9x@127.0.0.1:{free_port()}/{CATALOG_DB}"
    rc, data, out = status(down)
    assert rc == 0 and data["ready"] is True
    assert data["map_version"] is None
    assert data["catalog_error"] and "catalog" in data["catalog_error"], data["catalog_error"]
    assert {s["shard"]: s["buckets"] for s in data["shards"]} == Counter(file_map)
    assert "Pools-Secret-9x" not in out + caplog.text
