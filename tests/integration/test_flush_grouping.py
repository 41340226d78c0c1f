"""One flush of many objects whose keys alternate between shards writes them shard by
shard: one INSERT, UPDATE or DELETE per table and shard (the unit of work batches
consecutive rows for one connection), each shard's new rows in the order they were
added; an object whose shard cannot be told still fails the flush with nothing written."""

from __future__ import annotations

import random
import uuid

import pytest
from own_tables import alternating_keys, cluster_with_tables, keys_per_shard, statements_counted, take_turns
from sqlalchemy import BigInteger, ForeignKey, Identity, MetaData, String, Uuid, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit.errors import ShardKeyError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Event(Base):
    __tablename__ = "fg_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # Made by each shard's sequence at the INSERT: the order the shard received its rows.
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), nullable=False)
    v: Mapped[str] = mapped_column(String(20))


class Doc(Base):
    __tablename__ = "fg_docs"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    pages: Mapped[list[Page]] = relationship(back_populates="doc")
    notes: Mapped[list[Note]] = relationship()   # one way: a note knows no parent until the flush


class Page(Base):
    __tablename__ = "fg_pages"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    doc_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("fg_docs.id"), primary_key=True)
    doc: Mapped[Doc] = relationship(back_populates="pages")


class Note(Base):
    __tablename__ = "fg_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    doc_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("fg_docs.id"), primary_key=True)


@pytest.fixture(scope="module")
def env(sharded_dev):
    config = {"groups": {"events": {"tables": {"fg_events": "id"}},
                         "docs": {"tables": {"fg_docs": "id", "fg_pages": "doc_id", "fg_notes": "doc_id"}}}}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        # (strong: a test's reads in a new session, after another committed, must see
        # those writes; a replica a moment behind would not have them yet.)
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _written(cluster, verb="INSERT INTO"):
    """Count the ``verb`` statements each shard's primary runs inside the block, by
    (shard, table)."""
    words = len(verb.split())
    return statements_counted(cluster, lambda sql: sql.split()[words] if sql.lstrip().upper().startswith(verb)
                              else None)


def test_alternating_keys_are_inserted_one_statement_per_shard_in_their_order(env):
    cluster, Session = env
    by_shard = keys_per_shard(cluster, "fg_events", 100)
    for i, own in enumerate(by_shard.values()):
        random.Random(i).shuffle(own)  # not in key order: the order added is what counts
    # Keys taken round robin from the shards: every neighbour is on another shard.
    keys = take_turns(by_shard)
    with _written(cluster) as hits:
        with Session() as s:
            s.add_all(Event(id=k, v=f"v{k}") for k in keys)
            s.commit()
    assert hits == {(name, "fg_events"): 1 for name in cluster.shard_names}
    for name, own in by_shard.items():
        with cluster.primary(name).connect() as c:
            rows = c.execute(text("SELECT id FROM fg_events ORDER BY seq")).scalars().all()
        # Every row on its owner, received in the order the application added them.
        assert rows == own
    with Session() as s:
        assert s.get(Event, keys[7]).v == f"v{keys[7]}"


def test_children_follow_their_parents_key_made_by_a_default(env):
    cluster, Session = env
    with _written(cluster) as hits:
        with Session() as s:
            docs = [Doc(pages=[Page(id=1), Page(id=2)], notes=[Note(id=1)]) for _ in range(60)]
            s.add_all(docs)
            s.commit()
            ids = [d.id for d in docs]
    owners = {d: cluster.shard_for("fg_docs", d) for d in ids}
    used = set(owners.values())
    assert len(used) == len(cluster.shard_names)
    # (Notes are placed by the key the flush copies from the parent it inserted first.)
    assert hits == {(name, t): 1 for name in used for t in ("fg_docs", "fg_pages", "fg_notes")}
    for d, owner in owners.items():
        with cluster.primary(owner).connect() as c:
            assert c.execute(text("SELECT count(*) FROM fg_pages WHERE doc_id = :d"), {"d": d}).scalar() == 2
            assert c.execute(text("SELECT count(*) FROM fg_notes WHERE doc_id = :d"), {"d": d}).scalar() == 1


def test_an_object_without_a_shard_still_fails_the_flush_with_nothing_written(env):
    cluster, Session = env
    keys = alternating_keys(cluster, "fg_events", 1000)[1][-30:]
    with Session() as s:
        s.add_all(Event(id=k, v="x") for k in keys)
        s.add(Event(v="no key"))
        with pytest.raises(ShardKeyError, match="has no value for shard key fg_events.id"):
            s.commit()
    for name in cluster.shard_names:
        with cluster.primary(name).connect() as c:
            assert c.execute(text("SELECT count(*) FROM fg_events WHERE id = ANY(:k)"),
                             {"k": keys}).scalar() == 0


def test_changed_and_deleted_objects_of_every_shard_are_written_one_statement_per_shard(env):
    cluster, Session = env
    keys = alternating_keys(cluster, "fg_events", 2000)[1][-300:]
    with Session() as s:
        s.add_all(Event(id=k, v="new") for k in keys)
        s.commit()
    with _written(cluster, "UPDATE") as hits:
        with Session() as s:
            for e in s.scalars(select(Event).where(Event.id.in_(keys))):
                e.v = f"changed{e.id}"
            s.commit()
    assert hits == {(name, "fg_events"): 1 for name in cluster.shard_names}
    with Session() as s:
        assert dict(s.execute(select(Event.id, Event.v).where(Event.id.in_(keys))).all()) == {
            k: f"changed{k}" for k in keys}
    with _written(cluster, "DELETE FROM") as hits:
        with Session() as s:
            for e in s.scalars(select(Event).where(Event.id.in_(keys[::2]))):
                s.delete(e)
            s.commit()
    assert hits == {(name, "fg_events"): 1 for name in cluster.shard_names}
    with Session() as s:
        assert sorted(s.scalars(select(Event.id).where(Event.id.in_(keys)))) == sorted(keys[1::2])
