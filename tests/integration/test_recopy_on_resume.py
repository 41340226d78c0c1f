"""A batch resumed at "copied" with a config that moves a table its copy did not copy.

The first mover runs with a config that does not list ``orders`` (a sharded table the
operator forgot): it copies the batch's ``accounts`` rows and stops after the "copied"
journal step.  The operator adds ``orders`` to the config and guards it (``rebalance
init`` is refused while the move runs, so as a migration's ``op.install_shardkit_guard()``
does: the guard's triggers, the shard's ownership kept), then resumes with the new
config: the mover copies the whole batch again (rebalance.Mover._run_batch).

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes
databases of its own (test_move_fidelity's world).  Moves run with ``grace=0``.
"""

from __future__ import annotations

import itertools
import logging
import tomllib
from typing import Any

import pytest
from sqlalchemy import text
from test_move_fidelity import World, hash_group, make_world

import shardkit
from shardkit import rebalance
from shardkit._guard import install_guard
from shardkit._rebalance_plan import plan_drain
from shardkit.devcluster import to_toml
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

SCHEMA = ("CREATE TABLE accounts (id bigint PRIMARY KEY, tenant bigint NOT NULL, name text);"
          "CREATE TABLE orders (id bigint PRIMARY KEY, tenant bigint NOT NULL, note text)")
N = 40
_ids = itertools.count(500)  # new accounts' ids (their orders': 1000 more)


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.fixture
def world(dev, tmp_path):
    made: list[Any] = []

    def make() -> World:
        w = make_world(dev, tmp_path, SCHEMA, hash_group({"accounts": "tenant"}))
        made.append(w.cluster)
        return w

    yield make
    for c in made:
        c.dispose()


class _Stop(Exception):
    pass


def _seed(w: World) -> tuple[dict[str, dict[int, str]], list[int]]:
    """N accounts and N orders (order 1000+i of tenant i), each on its tenant's owner.
    Returns the model of every row (table -> id -> row as text) and the moving tenants."""
    model: dict[str, dict[int, str]] = {"accounts": {}, "orders": {}}
    for i in range(N):
        shard = w.owner("accounts", i)
        w.sql(shard, "INSERT INTO accounts VALUES (%s, %s, %s)", (i, i, f"n{i}"))
        w.sql(shard, "INSERT INTO orders VALUES (%s, %s, %s)", (1000 + i, i, f"o{i}"))
        model["accounts"][i] = f"({i},{i},n{i})"
        model["orders"][1000 + i] = f"({1000 + i},{i},o{i})"
    moving = [i for i in range(N) if w.owner("accounts", i) == "s0"]
    assert len(moving) >= 6, moving
    return model, moving


def _copy_then_stop(w: World) -> int:
    """Drain s0 with the config that moves accounts only; stop right after "copied"."""
    w.cluster.refresh_map()
    plan = plan_drain(w.cluster.config.bucket_map, "s0")
    assert len(plan.moves) >= 1
    mover = rebalance.Mover(w.cluster, grace=0)

    def stop(*args: Any, **kw: Any) -> int:  # catch-up follows the "copied" record
        raise _Stop("stopped after the copy")

    mover._catch_up = stop  # type: ignore[method-assign]
    move_id = mover.start(plan)
    with pytest.raises(RebalanceError):
        mover.run(move_id)
    (status,) = rebalance.move_status(w.cluster, move_id)
    assert status["state"] == "running"
    assert [b["step"] for b in status["batches"]] == ["copied"] * len(status["batches"])
    return move_id


def _config_with_orders(w: World, tmp_path) -> shardkit.Cluster:
    cfg = tomllib.loads(w.cfg_path.read_text(encoding="utf-8"))
    cfg["groups"] = hash_group({"accounts": "tenant", "orders": "tenant"})
    path = tmp_path / f"{w.db}_with_orders.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return shardkit.Cluster.from_config(path, follow_map=False)


def _guard(cluster: shardkit.Cluster) -> None:
    """What op.install_shardkit_guard() does on a guarded shard: the triggers of every
    table the config guards, the shard's ownership kept."""
    for shard in cluster.shard_names:
        with cluster.primary(shard).begin() as c:
            install_guard(c, cluster.config, None)


def _write(w: World, model: dict[str, dict[int, str]], shard: str, tag: str,
           upd: int, new: int, gone: int) -> None:
    """On ``shard``: update tenant ``upd``'s account and order, insert a new account and
    order for tenant ``new``, delete tenant ``gone``'s account and order."""
    w.sql(shard, "UPDATE accounts SET name = %s WHERE tenant = %s", (tag, upd))
    w.sql(shard, "UPDATE orders SET note = %s WHERE tenant = %s", (tag, upd))
    model["accounts"][upd] = f"({upd},{upd},{tag})"
    model["orders"][1000 + upd] = f"({1000 + upd},{upd},{tag})"
    aid = next(_ids)
    oid = 1000 + aid
    w.sql(shard, "INSERT INTO accounts VALUES (%s, %s, %s)", (aid, new, tag))
    w.sql(shard, "INSERT INTO orders VALUES (%s, %s, %s)", (oid, new, tag))
    model["accounts"][aid] = f"({aid},{new},{tag})"
    model["orders"][oid] = f"({oid},{new},{tag})"
    w.sql(shard, "DELETE FROM accounts WHERE tenant = %s", (gone,))
    w.sql(shard, "DELETE FROM orders WHERE tenant = %s", (gone,))
    model["accounts"] = {k: v for k, v in model["accounts"].items() if not v.startswith(f"({k},{gone},")}
    model["orders"] = {k: v for k, v in model["orders"].items() if not v.startswith(f"({k},{gone},")}


def _copied_records(w: World, move_id: int) -> list[tuple[int, dict[str, Any]]]:
    with w.cluster.catalog.engine.connect() as c:
        return [(b, d) for b, d in c.execute(text(
            "SELECT batch, detail FROM shardkit_catalog.journal WHERE move_id = :m AND step = 'copied' "
            "ORDER BY id"), {"m": move_id})]


def test_resume_copies_a_table_added_after_the_copy_exactly_once(world, tmp_path, caplog):
    w = world()
    model, moving = _seed(w)
    move_id = _copy_then_stop(w)
    first = _copied_records(w, move_id)
    assert [d["tables"] for _, d in first] == [["accounts"]] * len(first)
    assert not w.sql("s1", "SELECT 1 FROM orders WHERE tenant = ANY(%s)", (moving,)), \
        "the first copy copied orders, which its config did not move"

    # Writes between the copy and the resume (the source still owns the buckets): accounts
    # is guarded (captured), orders not yet.
    _write(w, model, "s0", "before_guard", upd=moving[0], new=moving[1], gone=moving[2])
    # `rebalance init` would guard orders, but it is refused while the move runs.
    with pytest.raises(RebalanceError, match="is running"):
        rebalance.init(w.cluster)
    c2 = _config_with_orders(w, tmp_path)
    try:
        _guard(c2)
        # ... and after orders is guarded.
        _write(w, model, "s0", "after_guard", upd=moving[3], new=moving[4], gone=moving[5])

        # Writes while the resumed mover runs, right after its copy (captured, caught up).
        during: list[bool] = []

        def progress(line: str) -> None:
            if ": copied " in line and not during:
                during.append(True)
                w.sql("s0", "UPDATE orders SET note = 'during' WHERE tenant = %s", (moving[1],))
                w.sql("s0", "UPDATE accounts SET name = 'during' WHERE tenant = %s", (moving[1],))
                for table, m in (("accounts", model["accounts"]), ("orders", model["orders"])):
                    for k, v in list(m.items()):
                        if v.startswith(f"({k},{moving[1]},"):
                            m[k] = f"({k},{moving[1]},during)"

        with caplog.at_level(logging.WARNING, logger="shardkit"):
            rebalance.Mover(c2, grace=0, progress=progress).run(move_id)
        assert during
        assert "copying the batch again" in caplog.text

        (status,) = rebalance.move_status(c2, move_id)
        assert status["state"] == "done"
        for table in ("accounts", "orders"):
            assert not w.rows("s0", table), f"{table} rows left on the source"
            got = w.rows("s1", table)
            assert len(got) == len(set(got))
            assert got == sorted(model[table].values()), table
        assert verify(c2).ok

        records = _copied_records(w, move_id)
        batches = {b for b, _ in records}
        assert len(records) == 2 * len(batches), records
        latest: dict[int, int] = {}
        for b, d in records:
            latest[b] = d["rows"]
        assert [sorted(d["tables"]) for _, d in records[len(batches):]] == \
            [["accounts", "orders"]] * len(batches)
        # The recopy copied every row of the moving buckets of both tables.
        moved = sum(1 for t in model for v in model[t].values()
                    if int(v.strip("()").split(",")[1]) in moving)
        assert sum(latest.values()) == moved
        assert status["rows_copied"] == sum(latest.values()), \
            (status["rows_copied"], records)
    finally:
        c2.dispose()


def test_resume_with_the_added_table_unguarded_refuses_before_copying_it(world, tmp_path):
    """Resumed with a config that moves orders but without its guard: the recopy would
    not capture the writes to orders made while it runs (lost once the source's rows are
    deleted).  The resume must refuse, as a move starting without the guard does."""
    w = world()
    model, moving = _seed(w)
    move_id = _copy_then_stop(w)
    c2 = _config_with_orders(w, tmp_path)
    try:
        writes: list[bool] = []

        def progress(line: str) -> None:
            if ": copied " in line and not writes:
                writes.append(True)
                w.sql("s0", "UPDATE orders SET note = 'during' WHERE tenant = %s", (moving[0],))
                model["orders"][1000 + moving[0]] = f"({1000 + moving[0]},{moving[0]},during)"

        with pytest.raises(RebalanceError, match="no ownership guard"):
            rebalance.Mover(c2, grace=0, progress=progress).run(move_id)
        assert not writes, "the batch was copied again without orders' guard"
        # Once guarded, the resume finishes the move.
        _guard(c2)
        rebalance.Mover(c2, grace=0, progress=progress).run(move_id)
        assert writes
        for table in ("accounts", "orders"):
            assert not w.rows("s0", table)
            assert w.rows("s1", table) == sorted(model[table].values()), table
        assert verify(c2).ok
    finally:
        c2.dispose()
