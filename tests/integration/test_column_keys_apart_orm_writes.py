"""Key columns keyed apart from their names (``Column(name, key=...)``) in the ORM and move
paths, and `rebalance status` after an undo mark and a cut-over that stopped.  Defects covered
(each test failed before its fix):

* ``Cluster(metadata=)`` now accepts a key column declared ``Column("item_key", key="ik")``
  (configured by its database name), but the ORM and move paths still looked it up by name
  in ``table.c``: ``session.add()`` of such a model failed with KeyError (so did get(),
  bulk UPDATE by primary key, a cross-shard read or write during a move); the check of an
  ORM key change in a flush skipped the column silently.
* ``rebalance status``: an abort that journaled "undoing" and stopped before touching the
  shards, then a resume killed inside the batch's cut-over, showed the batch as being undone
  (its rows "may be gone") and not as a cut-over that may have switched.
"""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables, keys_per_shard
from sqlalchemy import BigInteger, Column, MetaData, Table, Text, select, update
from sqlalchemy.orm import DeclarativeBase, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

md = MetaData()
keyed = Table("rv10_items", md, Column("item_key", BigInteger, key="ik", primary_key=True, autoincrement=False),
              Column("val", Text, key="v"))
notes = Table("rv10_notes", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
              Column("tenant_id", BigInteger, key="tid", nullable=False), Column("body", Text))
CONFIG = {"groups": {"rv10": {"tables": {"rv10_items": "item_key"}},
                     "rv10n": {"tables": {"rv10_notes": "tenant_id"}}}}


class Base(DeclarativeBase):
    metadata = md


class Item(Base):
    __table__ = keyed


class Note(Base):
    __table__ = notes


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, md) as cluster:
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def test_orm_on_a_key_column_keyed_apart_from_its_name(env):
    cluster, Session = env
    per = keys_per_shard(cluster, "rv10_items", 2)
    ks = [k for v in per.values() for k in v]
    with Session() as s:
        s.add_all([Item(ik=k, v="a") for k in ks])
        s.commit()
    with Session() as s:
        assert s.get(Item, ks[0]).v == "a"
        assert s.execute(select(Item).where(Item.ik == ks[1])).scalar_one().v == "a"
        s.execute(update(Item), [{"ik": k, "v": "b"} for k in ks])
        s.commit()
    with Session() as s:
        assert sorted(s.execute(select(Item.ik, Item.v)).all()) == sorted((k, "b") for k in ks)
        o = s.get(Item, ks[2])
        o.v = "c"
        s.commit()
        s.refresh(o)
        assert o.v == "c"
        s.delete(o)
        s.commit()
    from sqlalchemy import delete, insert
    with Session() as s:
        s.execute(delete(Item).where(Item.ik.in_(ks)))
        s.execute(insert(Item), [{"ik": k, "v": "d"} for k in ks])
        s.commit()
        s.bulk_update_mappings(Item, [{"ik": k, "v": "e"} for k in ks])
        s.commit()
        assert sorted(s.execute(select(Item.ik, Item.v)).all()) == sorted((k, "e") for k in ks)
    for shard in cluster.shard_names:  # each row on its owner only
        with cluster.primary(shard).connect() as c:
            got = sorted(r[0] for r in c.exec_driver_sql("SELECT item_key FROM rv10_items"))
        assert got == sorted(k for k in ks if cluster.shard_for("rv10_items", k) == shard)


def test_a_key_change_of_a_key_column_keyed_apart_from_its_name_is_refused(env):
    """An ORM change of the shard key to another shard's value is refused (the UPDATE runs
    where the row is); the check looked for the key column by its name in table.c and,
    not finding Column("tenant_id", key="tid") there, let the row keep a key it does not own."""
    cluster, Session = env
    per = keys_per_shard(cluster, "rv10_notes", 1)
    here, there = (v[0] for v in list(per.values())[:2])
    with Session() as s:
        s.add(Note(id=1, tid=here, body="x"))
        s.commit()
    with Session() as s:
        n = s.get(Note, 1, identity_token=cluster.shard_for("rv10_notes", here))
        n.tid = there
        with pytest.raises((shardkit.CrossShardWriteError, shardkit.ShardKeyError)):
            s.commit()
    with Session() as s:
        assert s.execute(select(Note.tid).where(Note.tid == here)).scalar_one() == here


def test_a_moving_key_column_keyed_apart_from_its_name_is_filtered():
    """While buckets move, a cross-shard statement is restricted to the buckets each shard
    owns, by its key column looked up by name in table.c: KeyError for a Column("item_key",
    key="ik"), which Cluster(metadata=) now accepts."""
    from sqlalchemy import delete

    from shardkit._session import _without_foreign_rows
    shards = [{"name": "s0", "primary": "postgresql+psycopg://app@127.0.0.1:1/app"},
              {"name": "s1", "primary": "postgresql+psycopg://app@127.0.0.1:2/app"}]
    c = shardkit.Cluster.from_config({"shards": shards, "groups": CONFIG["groups"]}, metadata=md, follow_map=False)
    try:
        c.router.foreign_buckets = {"s0": frozenset({3})}
        for stmt in (select(keyed), select(keyed.alias()), delete(keyed)):
            out = _without_foreign_rows(c, "s0", stmt, c.explain(stmt, all_shards=True))
            assert "shardkit.bucket(rv10_items_1.item_key" in str(out) or \
                "shardkit.bucket(rv10_items.item_key" in str(out)
    finally:
        c.dispose()


# -- rebalance status: an abort's "undoing" mark, then a resume killed inside its cut-over ----

from test_rebalance_status_after_kills import (  # noqa: E402 (its world: 3 shards, a catalog)
    ROWS_PER_BUCKET, Stop, _kill_when_held, _status, _stopped_after_copy, clean, world)

_ = (clean, world)  # fixtures


def test_status_after_an_undo_mark_then_a_cut_over_that_stopped(clean, tmp_path, capsys, monkeypatch):
    """An abort that stopped after journaling 'undoing' and before it touched the shards (the
    source still owns and captures the batch), then a resume killed inside the batch's cut-over
    (the source gave the buckets up): the last thing begun on the batch is the cut-over.  status
    said an abort began to undo it (its copies "may be gone", not counted as copied), and did not
    say that it may have switched (abort is refused then)."""
    from shardkit import rebalance
    from shardkit.catalog import Catalog

    world = clean
    move_id, _buckets = _stopped_after_copy(world)
    record = Catalog.record

    def stops_after_undoing(conn, m, batch, step, detail=None):
        record(conn, m, batch, step, detail)
        if step == rebalance._UNDOING:
            conn.commit()
            raise Stop("the abort died here")

    monkeypatch.setattr(Catalog, "record", staticmethod(stops_after_undoing))
    cluster = world.cluster()
    try:
        with pytest.raises(Stop):
            rebalance.abort(cluster, move_id)
    finally:
        cluster.dispose()
    monkeypatch.setattr(Catalog, "record", staticmethod(record))
    move, text = _status(world, move_id, capsys)
    assert move["batches"][0]["undoing"] is True, move  # (as it should: the abort may have undone it)
    _kill_when_held(world, tmp_path, "Catalog.publish_map", "before", move_id,
                    "resume", str(move_id), "--grace", "0")
    move, text = _status(world, move_id, capsys)
    [batch] = move["batches"]
    assert batch["step"] == "copied" and batch["cutting_over"] is True and batch["undoing"] is False, move
    assert move["rows_copied"] == ROWS_PER_BUCKET and move["rows_undoing"] == 0, move
    assert "a cut-over began and stopped: it may have switched" in text, text
    assert "began to undo" not in text, text
