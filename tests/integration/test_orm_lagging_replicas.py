"""ORM paths of ShardedSession on a cluster with lagging streaming replicas: reads the ORM
makes on its own (a flush's loads, reference rows, commits with a savepoint open) must
not return what a replica has not replayed yet where one database would show it.

One 2-shard x 1-replica cluster serves the module; tests that delay replicas restore them.
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, Column, ForeignKey, String, Table, select
from sqlalchemy.orm import DeclarativeBase, Mapped, foreign, mapped_column, relationship

import shardkit
from replica_env import lagging, on_primary, replica_env

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "orr_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    items: Mapped[list[Item]] = relationship(cascade="all, delete-orphan", order_by="Item.id",
                                             back_populates="owner")


class Item(Base):
    __tablename__ = "orr_items"
    owner_id: Mapped[int] = mapped_column(ForeignKey("orr_owners.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(50))
    owner: Mapped[Owner] = relationship(back_populates="items")


class Tag(Base):
    __tablename__ = "orr_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


# Sharded with the owners (by owner_id), without a foreign key to them, as sharded
# association tables often are: nothing but the ORM's flush removes an owner's rows.
owner_tags = Table(
    "orr_owner_tags", Base.metadata,
    Column("owner_id", BigInteger, primary_key=True),
    Column("tag_id", ForeignKey("orr_tags.id"), primary_key=True),
)
Owner.tags = relationship(Tag, secondary=owner_tags,
                          primaryjoin=Owner.id == foreign(owner_tags.c.owner_id),
                          secondaryjoin=Tag.id == foreign(owner_tags.c.tag_id), order_by=Tag.id)


class Color(Base):
    __tablename__ = "orr_colors"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


GROUPS = {"orr": {"tables": {"orr_owners": "id", "orr_items": "owner_id", "orr_owner_tags": "owner_id"}}}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata,
                           {"groups": GROUPS, "reference_tables": ["orr_colors", "orr_tags"]},
                           "orr_owners", "orr_")


# -- reference rows within one transaction ------------------------------------------------------


def test_reference_reads_of_one_transaction_never_go_back_in_time(env):
    """A reference row committed on every shard; s0's replica has replayed it, s1's is 30 s
    behind.  A transaction (of another session: no token) that reads the row four times
    saw it, then did not, then did again: reference reads took turns over the shards, so
    consecutive reads of one transaction asked replicas of different freshness.  On one
    database a later read never shows an older state than an earlier one; the README
    promises so within a transaction.  Now a transaction reads reference rows from one
    shard; the next transaction takes the next shard."""
    c = env.key("s0")
    with lagging(env, shards=("s1",)):
        with env.Session() as w:
            w.add(Color(id=c, name="red"))
            w.commit()
        env.caught_up(("s0",))
        shards_used = set()
        for _ in range(2):
            with env.Session() as s:
                seen = []
                for _ in range(4):
                    got, nodes = env.nodes(lambda: s.scalar(select(Color.name).where(Color.id == c)))
                    seen.append((got, nodes))
                    shards_used.update(n.split("/")[0] for n in nodes)
                found = [got is not None for got, _ in seen]
                assert found == sorted(found), seen           # never seen, then gone
                assert len({tuple(n) for _, n in seen}) == 1, seen   # one node
        assert shards_used == {"s0", "s1"}                   # the turns go on between transactions


# -- reads the ORM makes in order to write ---------------------------------------------------------


def test_delete_cascade_removes_rows_a_lagging_replica_has_not_replayed(env):
    """``session.delete(owner)`` with ``cascade="all, delete-orphan"`` loads owner.items to
    delete them.  That load read the transaction's replica (30 s behind), which missed an
    item another session had committed: the flush deleted the items it knew and then the
    owner, which the missed item still referenced (IntegrityError; without the foreign
    key the item would have been left behind).  On one database the delete succeeds."""
    k = env.key("s0")
    with env.Session() as s:
        s.add(Owner(id=k, name="o", items=[Item(id=1, note="a")]))
        s.commit()
    env.caught_up()
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.add(Item(owner_id=k, id=2, note="b"))
            w.commit()
        with env.Session() as s:
            owner, nodes = env.nodes(lambda: s.get(Owner, k))      # a replica: that is allowed
            assert nodes == ["s0/r0"], nodes
            _, nodes = env.nodes(lambda: s.delete(owner))
            s.commit()                                            # was: IntegrityError
            assert on_primary(nodes, "s0"), nodes
    assert env.primary_value("s0", f"SELECT count(*) FROM orr_items WHERE owner_id = {k}") == 0
    assert env.primary_value("s0", f"SELECT count(*) FROM orr_owners WHERE id = {k}") == 0


def test_flush_of_deleted_owner_removes_association_rows_a_lagging_replica_has_not_replayed(env):
    """Deleting an owner makes its flush load owner.tags (a many-to-many collection, not
    cascaded at delete()) to delete the association rows.  That load read the replica
    (30 s behind), which missed a tag another session had just added: the flush left that
    row behind, silently, and an owner created again with the same id inherited the tag.
    The flush's loads now read the primary, as its writes do."""
    k = env.key("s1")
    t1, t2 = env.key("s0"), env.key("s0")
    with env.Session() as s:
        s.add_all([Tag(id=t1, name="t1"), Tag(id=t2, name="t2")])
        s.flush()
        s.add(Owner(id=k, name="o", tags=[s.get(Tag, t1)]))
        s.commit()
    env.caught_up()
    with lagging(env, shards=("s1",)):
        with env.Session() as w:
            o = w.get(Owner, k)
            o.tags.append(w.get(Tag, t2))
            w.commit()
        with env.Session() as s:
            owner, nodes = env.nodes(lambda: s.get(Owner, k))
            assert nodes == ["s1/r0"], nodes
            s.delete(owner)
            _, nodes = env.nodes(s.commit)
        with env.Session() as s:
            s.add(Owner(id=k, name="again"))
            s.commit()
            assert [t.name for t in s.get(Owner, k).tags] == []     # was: ["t2"]
    assert env.primary_value("s1", f"SELECT count(*) FROM orr_owner_tags WHERE owner_id = {k}") == 0
    assert on_primary(nodes, "s1"), nodes


def test_merge_compares_the_given_object_with_the_row_on_the_primary(env):
    """``session.merge(Owner(id=k, name="A"))`` after another session renamed k from "A" to
    "B" (s0's replica 30 s behind): merge() loaded the row from the replica, found "A"
    there, saw no change and wrote nothing: the row silently stayed "B".  On one database
    merge() sees "B" and writes "A".  A row another session has just inserted, which the
    replica lacks, made merge() INSERT it again (IntegrityError)."""
    k, k2 = env.key("s0"), env.key("s0")
    with env.Session() as s:
        s.add(Owner(id=k, name="A"))
        s.commit()
    env.caught_up()
    with lagging(env, shards=("s0",)):
        with env.Session() as w:
            w.get(Owner, k).name = "B"
            w.add(Owner(id=k2, name="new"))
            w.commit()
        with env.Session() as s:
            s.merge(Owner(id=k2, name="merged"))
            s.commit()                                            # was: IntegrityError
        with env.Session() as s:
            s.merge(Owner(id=k, name="A"))
            s.commit()
    assert env.primary_value("s0", f"SELECT name FROM orr_owners WHERE id = {k}") == "A"    # was: "B"
    assert env.primary_value("s0", f"SELECT name FROM orr_owners WHERE id = {k2}") == "merged"


# -- run_transaction's token ------------------------------------------------------------------------


def test_run_transaction_hands_over_the_token_of_what_it_committed(env):
    """run_transaction commits and closes its session, so the caller had no way to get the
    consistency token of what it wrote: the next request's session could read a lagging
    replica without it.  on_commit receives the token after the commit; a session given it
    reads the row (from the primary while the replica lags)."""
    k, k2 = env.key("s1"), env.key("s1")
    tokens: list[str] = []
    with lagging(env, shards=("s1",)):
        got = shardkit.run_transaction(env.Session, lambda s: s.add(Owner(id=k, name="fresh")) or "done",
                                       on_commit=tokens.append)
        assert got == "done" and len(tokens) == 1 and tokens[0]
        with env.Session(consistency_token=tokens[0]) as s:
            owner, nodes = env.nodes(lambda: s.get(Owner, k))
            assert owner is not None and owner.name == "fresh"
            assert on_primary(nodes, "s1"), nodes
        with pytest.raises(ZeroDivisionError):   # the hook's error propagates; the commit stands
            shardkit.run_transaction(env.Session, lambda s: s.add(Owner(id=k2, name="x")),
                                     on_commit=lambda token: 1 / 0)
    assert env.primary_value("s1", f"SELECT count(*) FROM orr_owners WHERE id = {k2}") == 1
