"""`shardkit rebalance abort MOVE --target-lost`, and removing its leftovers, against targets
that are lost in other ways than a clean refusal: a host that does not answer, a target rebuilt
without shardkit's SQL functions or without the tables; and a later move meeting a leftover row.

One 3-shard cluster for the module (no replicas, 64 buckets, the catalog on s0's server); each
test moves buckets of its own to s2, leaves the move at "copied" (the mover stops before its
catch-up, so s2 holds the copies) and puts s2 back as it found it.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import _sql as shardkit_sql, rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit.catalog import MOVER_LOCK_CLASS
from shardkit.errors import RebalanceError
from shardkit.verify import verify
from test_abort_target_lost import _cluster, _sql, make_world
from test_rebalance_crashes import BUCKETS, Account, Base, Note

pytestmark = pytest.mark.integration

PASSWORD = "tl-fresh-s3cret"


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    return make_world(shardkit_module_cluster_factory, tmp_path_factory, "target_lost_fresh")


@pytest.fixture
def s2_back(world):
    """s2 runs again after the test, whatever happened in it."""
    yield
    if not world.s2.is_running():
        world.s2.start()


def _buckets(world, cluster, shard: str, n: int) -> list[int]:
    out = [b for b, s in enumerate(cluster.config.bucket_map) if s == shard and b not in world.used][:n]
    world.used.update(out)
    return out


def _seed(world, cluster, buckets: list[int]) -> list[int]:
    """Three accounts (each with a note of the same id) in each of ``buckets``."""
    keys, k = [], world.next_key[0]
    for b in buckets:
        mine = []
        while len(mine) < 3:
            if shardkit.bucket_for(k, BUCKETS) == b:
                mine.append(k)
            k += 1
        keys += mine
    world.next_key[0] = k
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        s.add_all(Account(id=k, balance=1) for k in keys)
        s.add_all(Note(id=k, account_id=k, body="n") for k in keys)
        s.commit()
    return keys


def _plan(cluster, moves: dict[int, str]):
    new = list(cluster.config.bucket_map)
    for b, target in moves.items():
        new[b] = target
    return plan_from_maps(cluster.config.bucket_map, tuple(new), "test")


class _StopsAfterCopy(rebalance.Mover):
    def _catch_up(self, *args, **kwargs):
        raise RuntimeError("the mover stops after the copy")


def _copied(cluster, moves: dict[int, str]) -> int:
    """A running move whose batch is at "copied": its target holds the copies."""
    mover = _StopsAfterCopy(cluster, grace=0, progress=lambda line: None)
    move_id = mover.start(_plan(cluster, moves))
    with pytest.raises(RebalanceError):
        mover.run(move_id)
    assert rebalance.move_status(cluster, move_id)[0]["batches"][0]["step"] == "copied"
    return move_id


def _count(world, shard: str, table: str, keys: list[int]) -> int:
    return _sql(world, shard, f"SELECT count(*) FROM {table} WHERE id = ANY(%s)", (keys,))[0][0]


def test_target_lost_gives_up_on_a_target_that_does_not_answer(world, s2_back):
    """A lost target whose host is gone (or frozen) takes connections without answering: the
    abort waited for it as long as the socket stayed open (minutes for a real host, for ever
    for a frozen server), where every other connection to a node gives up after 3 s."""
    cluster = _cluster(world)
    b = _buckets(world, cluster, "s1", 1)
    _seed(world, cluster, b)
    move_id = _copied(cluster, {b[0]: "s2"})
    silent = socket.socket()  # accepts connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    s2 = world.dev.shard("s2").primary
    lost_cfg = world.cfg.parent / "s2_silent.toml"
    lost_cfg.write_text(world.cfg.read_text().replace(
        f'"postgresql+psycopg://shardkit@127.0.0.1:{s2.port}/',
        f'"postgresql+psycopg://shardkit:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/'))
    lost = shardkit.Cluster.from_config(lost_cfg, follow_map=False)
    assert lost.config.shard("s2").primary.password == PASSWORD
    out: dict = {}

    def run():
        try:
            out["result"] = rebalance.abort(lost, move_id, target_lost=True)
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e
    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        worker.join(20)
        hung = worker.is_alive()
    finally:
        silent.close()  # (resets the waiting connection: the abort goes on)
        worker.join(30)
        lost.dispose()
    try:
        assert not hung, "the abort waited for a target that does not answer"
        assert "error" not in out, out
        assert out["result"]["leftovers"] == [{"batch": 0, "shard": "s2", "buckets": b}], out
        with cluster.catalog.engine.connect() as c:
            detail = c.execute(text("SELECT detail FROM shardkit_catalog.journal WHERE move_id = :m "
                                    "AND step = :s"), {"m": move_id, "s": rebalance.LEFTOVERS}).scalar_one()
        assert detail["target_unreachable"] and PASSWORD not in json.dumps(detail), detail
        # s2 (which did answer all along) is cleaned by the abort on the aborted move.
        assert rebalance.abort(cluster, move_id)["removed_leftovers"] == [0]
        assert rebalance.move_status(cluster, move_id)[0]["leftovers"] == []
    finally:
        cluster.dispose()


def test_abort_onto_a_target_rebuilt_without_shardkits_functions(world, s2_back):
    """A target restored without the shardkit schema (its tables, with the copies, are there):
    the abort's deletes call shardkit.bucket() and failed (InvalidSchemaName), with or without
    --target-lost, and `rebalance init`, which would install it, is refused while the move runs:
    no way out."""
    cluster = _cluster(world)
    move_id = None
    try:
        b = _buckets(world, cluster, "s0", 1)
        keys = _seed(world, cluster, b)
        move_id = _copied(cluster, {b[0]: "s2"})
        assert _count(world, "s2", "accounts", keys) == len(keys)
        _sql(world, "s2", "DROP SCHEMA shardkit CASCADE")
        with pytest.raises(RebalanceError, match="is running"):
            rebalance.init(cluster)
        result = rebalance.abort(cluster, move_id, target_lost=True)  # s2 answers: the normal abort
        assert result["undone_batches"] == [0] and result["leftovers"] == [], result
        assert rebalance.move_status(cluster, move_id)[0]["state"] == "aborted"
        assert _count(world, "s2", "accounts", keys) == 0 and _count(world, "s2", "notes", keys) == 0
        assert _count(world, "s0", "accounts", keys) == len(keys)
        rebalance.init(cluster)  # the guard back on s2, its ownership from the map
        cluster.refresh_map()
        report = verify(cluster)
        assert report.ok, report.render()
    finally:
        if move_id is not None and rebalance.move_status(cluster, move_id)[0]["state"] == "running":
            # (failed above: s2 as the next tests need it)
            engine = create_engine(world.s2.url)
            with engine.begin() as c:
                shardkit_sql.install(c)
            engine.dispose()
            rebalance.abort(cluster, move_id)
            rebalance.init(cluster)
        cluster.dispose()


def test_leftovers_on_a_target_rebuilt_without_the_tables(world, s2_back):
    """The target came back as an empty database: it holds no leftovers, yet their removal
    was refused ("table accounts does not exist ... before installing the guard")."""
    cluster = _cluster(world)
    b = _buckets(world, cluster, "s0", 1)
    _seed(world, cluster, b)
    move_id = _copied(cluster, {b[0]: "s2"})
    world.s2.stop()
    assert rebalance.abort(cluster, move_id, target_lost=True)["leftovers"]
    world.s2.start()
    cluster.dispose()  # (its pooled connections to s2 died with it)
    _sql(world, "s2", "DROP TABLE notes; DROP TABLE accounts; DROP SCHEMA shardkit CASCADE")
    cluster = _cluster(world)
    try:
        assert rebalance.abort(cluster, move_id)["removed_leftovers"] == [0]
        assert rebalance.move_status(cluster, move_id)[0]["leftovers"] == []
    finally:
        engine = create_engine(world.s2.url)
        Base.metadata.create_all(engine)
        engine.dispose()
        rebalance.init(cluster)
        cluster.dispose()


def test_a_move_clashing_with_a_leftover_row_names_the_move_to_abort(world, s2_back):
    """A note whose copy s2 kept (bucket X, left by move 1) is given to an account of bucket Y
    on the source; moving Y to s2 meets the copy: the move is aborted saying the keys must be
    unique across shards, which they are; it is the leftover, which `abort 1` removes."""
    cluster = _cluster(world)
    try:
        x, y = _buckets(world, cluster, "s0", 2)
        keys = _seed(world, cluster, [x, y])
        move_id = _copied(cluster, {x: "s2"})
        world.s2.stop()
        rebalance.abort(cluster, move_id, target_lost=True)
        world.s2.start()
        cluster.dispose()
        cluster = _cluster(world)
        kx = next(k for k in keys if shardkit.bucket_for(k, BUCKETS) == x)
        ky = next(k for k in keys if shardkit.bucket_for(k, BUCKETS) == y)
        shardkit.run_transaction(sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), lambda s: s.execute(
            update(Note).where(Note.account_id == kx, Note.id == kx).values(account_id=ky)))
        with pytest.raises(RebalanceError) as clash:
            rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(_plan(cluster, {y: "s2"}))
        assert f"left by move {move_id}" in str(clash.value), clash.value
        assert f"shardkit rebalance abort {move_id}`" in str(clash.value), clash.value
        # As it says: remove the leftovers, and the move goes through.
        rebalance.abort(cluster, move_id)
        cluster.refresh_map()
        rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(_plan(cluster, {y: "s2"}))
        cluster.refresh_map()
        assert _sql(world, "s2", "SELECT account_id FROM notes WHERE id = %s", (kx,)) == [(ky,)]
        report = verify(cluster)
        assert report.ok, report.render()
    finally:
        cluster.dispose()


def test_abort_while_another_abort_runs_says_so(world):
    """Two operators aborting at once: the second was told a mover runs the move."""
    cluster = _cluster(world)
    try:
        b = _buckets(world, cluster, "s0", 1)
        _seed(world, cluster, b)
        move_id = _copied(cluster, {b[0]: "s2"})
        with cluster.catalog.engine.connect() as other:  # holds the lock as an abort does
            other.execute(text("SELECT pg_advisory_lock(:c, :m)"), {"c": MOVER_LOCK_CLASS, "m": move_id})
            with pytest.raises(RebalanceError, match="another `shardkit rebalance abort`"):
                rebalance.abort(cluster, move_id)
            other.execute(text("SELECT pg_advisory_unlock(:c, :m)"), {"c": MOVER_LOCK_CLASS, "m": move_id})
            other.commit()
        assert rebalance.abort(cluster, move_id)["undone_batches"] == [0]
    finally:
        cluster.dispose()
