"""ORM writes of many-to-many collections whose related rows are not on the object's
shard (another group's, or through a reference table), compared with what one database
holding every row would have after the same flush: the rows of a ``secondary=`` table
must land on the shard owning their key, or, for a reference table, on every shard."""
from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, Column, Table, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, foreign, mapped_column, relationship,
                            sessionmaker)

import shardkit
from own_tables import cluster_with_tables

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


owner_tags = Table("casc_owner_tags", Base.metadata,  # owners' group, keyed by owner_id
                   Column("owner_id", BigInteger, primary_key=True),
                   Column("tag_id", BigInteger, primary_key=True))
ref_pairs = Table("casc_ref_pairs", Base.metadata,  # a reference table
                  Column("owner_id", BigInteger, primary_key=True),
                  Column("tag_id", BigInteger, primary_key=True))


class Member(Base):
    __tablename__ = "casc_members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tags = relationship("Tag", secondary=owner_tags, back_populates="owners", order_by="Tag.id",
                        primaryjoin=lambda: Member.id == foreign(owner_tags.c.owner_id),
                        secondaryjoin=lambda: Tag.id == foreign(owner_tags.c.tag_id))


class Reader(Base):
    __tablename__ = "casc_readers"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ref_tags = relationship("Tag", secondary=ref_pairs, order_by="Tag.id",
                            primaryjoin=lambda: Reader.id == foreign(ref_pairs.c.owner_id),
                            secondaryjoin=lambda: Tag.id == foreign(ref_pairs.c.tag_id))


class Tag(Base):  # another group
    __tablename__ = "casc_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owners = relationship("Member", secondary=owner_tags, back_populates="tags", order_by="Member.id",
                          primaryjoin=lambda: Tag.id == foreign(owner_tags.c.tag_id),
                          secondaryjoin=lambda: Member.id == foreign(owner_tags.c.owner_id))


member_labels = Table("casc_member_labels", Base.metadata,  # owners' group, keyed by member_id
                      Column("member_id", BigInteger, primary_key=True),
                      Column("label_id", BigInteger, primary_key=True))


class Label(Base):  # another group; its collection of members is written from its side only
    __tablename__ = "casc_labels"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    members = relationship("Member", secondary=member_labels, order_by="Member.id",
                           primaryjoin=lambda: Label.id == foreign(member_labels.c.label_id),
                           secondaryjoin=lambda: Member.id == foreign(member_labels.c.member_id))


GROUPS = {"groups": {
    "owners": {"tables": {"casc_members": "id", "casc_readers": "id", "casc_owner_tags": "owner_id",
                          "casc_member_labels": "member_id"}},
    "tags": {"tables": {"casc_tags": "id", "casc_labels": "id"}},
}, "reference_tables": ["casc_ref_pairs"]}


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, GROUPS, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def Session(cluster):
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            for t in reversed(Base.metadata.sorted_tables):
                c.execute(t.delete())
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def rows(cluster, sql):
    out = {}
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            out[s] = sorted(tuple(r) for r in c.execute(text(sql)))
    return out


def on(cluster, model, n, shard, start=0):
    out = []
    i = start
    while len(out) < n:
        if cluster.shard_for(model, i) == shard:
            out.append(i)
        i += 1
    return out


def test_a_one_way_collection_writes_its_rows_on_the_shard_owning_their_key(cluster, Session):
    """label.members.append(member): the secondary row is keyed by member_id, so it
    belongs on the member's shard, not on the label's (where it was written: a row on a
    shard that does not own its key, missed by every read routed by member_id)."""
    a, b = cluster.shard_names
    ma, mb = on(cluster, Member, 1, a)[0], on(cluster, Member, 1, b)[0]
    lb = on(cluster, Label, 1, b)[0]
    with Session() as s:
        s.add_all([Member(id=ma), Member(id=mb), Label(id=lb)])
        s.commit()
    with Session() as s:
        label = s.get(Label, lb)
        label.members.append(s.get(Member, ma))
        s.commit()
    assert rows(cluster, "SELECT member_id, label_id FROM casc_member_labels") == {
        a: [(ma, lb)], b: []}
    with Session() as s:
        assert s.execute(select(member_labels).where(member_labels.c.member_id == ma)).all() == [(ma, lb)]
        label = s.get(Label, lb)
        assert [m.id for m in label.members] == [ma]
        other = s.get(Member, mb)
        label.members.remove(label.members[0])  # deleted where it is
        label.members.append(other)
        with pytest.raises(shardkit.RoutingError, match=f"rows are on shards {a}, {b}"):
            s.flush()  # rows of two shards in one flush: refused, nothing written
    assert rows(cluster, "SELECT member_id, label_id FROM casc_member_labels") == {
        a: [(ma, lb)], b: []}
    with Session() as s:
        label = s.get(Label, lb)
        other = s.get(Member, mb)
        label.members.remove(label.members[0])
        s.flush()
        label.members.append(other)
        s.commit()
    assert rows(cluster, "SELECT member_id, label_id FROM casc_member_labels") == {
        a: [], b: [(mb, lb)]}


def test_a_backref_collection_of_another_shard_does_not_refuse_the_flush(cluster, Session):
    """tag.owners.append(member) with a backref: both objects' collections change, on
    two shards, but every row is the member's: written there (it was written on the
    tag's shard)."""
    a, b = cluster.shard_names
    ma = on(cluster, Member, 1, a)[0]
    tb = on(cluster, Tag, 1, b)[0]
    with Session() as s:
        s.add_all([Member(id=ma), Tag(id=tb)])
        s.commit()
    with Session() as s:
        tag = s.get(Tag, tb)
        tag.owners.append(s.get(Member, ma))
        s.commit()
    assert rows(cluster, "SELECT owner_id, tag_id FROM casc_owner_tags") == {a: [(ma, tb)], b: []}
    with Session() as s:
        s.delete(s.get(Tag, tb))  # its rows go with it, on the member's shard
        s.commit()
    assert rows(cluster, "SELECT owner_id, tag_id FROM casc_owner_tags") == {a: [], b: []}


def test_a_reference_secondary_tables_rows_reach_every_shard(cluster, Session):
    """member.ref_tags.append(tag) through a reference table: the row must be on every
    shard (reads of a reference table use any one); it was written on one only, and
    removing or deleting left the other shards' copies."""
    a, b = cluster.shard_names
    ma, mb = on(cluster, Reader, 1, a)[0], on(cluster, Reader, 1, b)[0]
    t1, t2 = sorted([on(cluster, Tag, 1, a)[0], on(cluster, Tag, 1, b)[0]])
    with Session() as s:
        s.add_all([Reader(id=ma), Reader(id=mb), Tag(id=t1), Tag(id=t2)])
        s.commit()
    with Session() as s:  # collections of objects on both shards, in one flush
        m1, m2 = s.get(Reader, ma), s.get(Reader, mb)
        m1.ref_tags.extend([s.get(Tag, t1), s.get(Tag, t2)])
        m2.ref_tags.append(s.get(Tag, t1))
        s.commit()
    want = sorted([(ma, t1), (ma, t2), (mb, t1)])
    assert rows(cluster, "SELECT owner_id, tag_id FROM casc_ref_pairs") == {a: want, b: want}
    with Session() as s:
        m1 = s.get(Reader, ma)
        assert [t.id for t in m1.ref_tags] == [t1, t2]
        m1.ref_tags.remove(m1.ref_tags[0])
        s.delete(s.get(Reader, mb))
        s.commit()
    assert rows(cluster, "SELECT owner_id, tag_id FROM casc_ref_pairs") == {
        a: [(ma, t2)], b: [(ma, t2)]}


def test_reading_another_groups_rows_through_pairs_kept_with_the_parent_is_refused(cluster, Session):
    """README: such a collection joins the other group's rows to the pairs on each shard,
    which would miss the rows held elsewhere: refused, not partial.  Through a reference
    table of pairs (every shard has every pair) it is exact."""
    shard_of = {s: on(cluster, Tag, 3, s) for s in cluster.shard_names}
    tag_ids = sorted(t for ids in shard_of.values() for t in ids)
    with Session() as s:
        s.add_all([Tag(id=t) for t in tag_ids])
        s.add(Member(id=1))
        reader = Reader(id=1)
        s.add(reader)
        s.flush()
        reader.ref_tags.extend(s.get(Tag, t) for t in tag_ids)
        s.commit()
        with cluster.primary(cluster.shard_for(Member, 1)).begin() as c:
            c.execute(owner_tags.insert(), [{"owner_id": 1, "tag_id": t} for t in tag_ids])
    with Session() as s:
        assert [t.id for t in s.get(Reader, 1).ref_tags] == tag_ids
        member = s.get(Member, 1)
        with pytest.raises(shardkit.ScatterRefused):
            member.tags
