"""Probes of ORM writes through relationships on a sharded cluster.

Each test asserts what SQLAlchemy's own Session does on one database (or what the
README promises), against a real 3-shard cluster of this module's own, with
tables of this module's own: colocated parents and children (with and without a
backref), many-to-many through a colocated association table, an adjacency list,
sharded rows pointing at reference rows (and a list group keyed by a column that
is a foreign key to a reference table), ORM-enabled UPDATE/DELETE with every
``synchronize_session``, version counters, server defaults, post_update, merge,
expunge / make_transient, and failed flushes.
"""

from __future__ import annotations

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    Table,
    and_,
    delete,
    inspect as sa_inspect,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    foreign,
    make_transient,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.orm import exc as orm_exc

import shardkit

pytestmark = pytest.mark.integration


class WBase(DeclarativeBase):
    pass


# -- a colocated parent / child group ------------------------------------------------


class OwParent(WBase):
    __tablename__ = "ow_parents"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    favorite_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("ow_children.id", use_alter=True, name="ow_parents_fav_fk"))
    children: Mapped[list[OwChild]] = relationship(
        back_populates="parent", cascade="all, delete-orphan",
        foreign_keys="OwChild.parent_id", order_by="OwChild.id")
    # One-directional: no backref on OwNote.
    notes: Mapped[list[OwNote]] = relationship(cascade="all, delete-orphan", order_by="OwNote.id")
    # ON DELETE CASCADE in the database, not loaded by the ORM.
    passives: Mapped[list[OwPassive]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True)
    favorite: Mapped[OwChild | None] = relationship(
        foreign_keys=[favorite_id], post_update=True)
    # One-directional, no FK constraint in the database, no delete-orphan.
    tags: Mapped[list[OwTag]] = relationship(
        primaryjoin=lambda: OwParent.id == foreign(OwTag.parent_id), order_by="OwTag.id")
    __mapper_args__ = {"version_id_col": version}


class OwChild(WBase):
    __tablename__ = "ow_children"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("ow_parents.id"))
    name: Mapped[str] = mapped_column(String(50), default="")
    color_code: Mapped[str | None] = mapped_column(ForeignKey("ow_colors.code"))
    parent: Mapped[OwParent] = relationship(back_populates="children", foreign_keys=[parent_id])
    color: Mapped[OwColor | None] = relationship()


class OwNote(WBase):
    __tablename__ = "ow_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("ow_parents.id"))
    body: Mapped[str] = mapped_column(String(50), default="")


class OwPassive(WBase):
    __tablename__ = "ow_passives"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("ow_parents.id", ondelete="CASCADE"))


class OwLoose(WBase):
    """A colocated child with no foreign key constraint in the database (only in the ORM)."""

    __tablename__ = "ow_loose"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(String(50), default="")
    parent: Mapped[OwParent] = relationship(
        primaryjoin=lambda: foreign(OwLoose.parent_id) == OwParent.id)


class OwTag(WBase):
    """A colocated child reached only through ``OwParent.tags``; no FK constraint."""

    __tablename__ = "ow_tags"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    body: Mapped[str] = mapped_column(String(50), default="")


# -- many-to-many through a colocated association table ------------------------------

ow_doc_labels = Table(
    "ow_doc_labels", WBase.metadata,
    Column("owner_id", BigInteger, primary_key=True),
    Column("doc_id", BigInteger, primary_key=True),
    Column("label_id", BigInteger, primary_key=True),
    ForeignKeyConstraint(["owner_id", "doc_id"], ["ow_docs.owner_id", "ow_docs.id"]),
    ForeignKeyConstraint(["owner_id", "label_id"], ["ow_labels.owner_id", "ow_labels.id"]),
)


class OwDoc(WBase):
    __tablename__ = "ow_docs"
    owner_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(50), default="")
    labels: Mapped[list[OwLabel]] = relationship(
        secondary=ow_doc_labels,
        primaryjoin=lambda: and_(OwDoc.owner_id == ow_doc_labels.c.owner_id,
                                 OwDoc.id == ow_doc_labels.c.doc_id),
        secondaryjoin=lambda: and_(OwLabel.owner_id == ow_doc_labels.c.owner_id,
                                   OwLabel.id == ow_doc_labels.c.label_id),
        order_by=lambda: OwLabel.id)


class OwLabel(WBase):
    __tablename__ = "ow_labels"
    owner_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")


class OwMembership(WBase):
    """An association object between a doc and a label of the same owner."""

    __tablename__ = "ow_memberships"
    owner_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    role: Mapped[str] = mapped_column(String(20), default="")
    __table_args__ = (
        ForeignKeyConstraint(["owner_id", "doc_id"], ["ow_docs.owner_id", "ow_docs.id"]),
        ForeignKeyConstraint(["owner_id", "label_id"], ["ow_labels.owner_id", "ow_labels.id"]),
    )
    doc: Mapped[OwDoc] = relationship(back_populates="memberships", overlaps="label")
    label: Mapped[OwLabel] = relationship(overlaps="doc,memberships")


OwDoc.memberships = relationship(OwMembership, back_populates="doc", cascade="all, delete-orphan",
                                 overlaps="label")


class OwSerialRoot(WBase):
    """A hash-sharded table whose shard key is its own SERIAL primary key."""

    __tablename__ = "ow_serial_roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20), default="")


# -- an adjacency list inside one shard ------------------------------------------------


class OwNode(WBase):
    __tablename__ = "ow_nodes"
    tree_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(50), default="")
    __table_args__ = (ForeignKeyConstraint(["tree_id", "parent_id"],
                                           ["ow_nodes.tree_id", "ow_nodes.id"]),)
    children: Mapped[list[OwNode]] = relationship(
        back_populates="parent", cascade="all, delete-orphan", order_by="OwNode.id")
    parent: Mapped[OwNode | None] = relationship(
        back_populates="children", remote_side=[tree_id, id])


# -- reference tables, and a list group keyed by a foreign key to one -----------------


class OwColor(WBase):
    __tablename__ = "ow_colors"
    code: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="")


class OwRegion(WBase):
    __tablename__ = "ow_regions"
    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="")
    shops: Mapped[list[OwShop]] = relationship(back_populates="region_obj")


class OwShop(WBase):
    __tablename__ = "ow_shops"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(ForeignKey("ow_regions.code"))
    name: Mapped[str] = mapped_column(String(50), default="")
    region_obj: Mapped[OwRegion] = relationship(back_populates="shops")


# -- each shard's own sequence, server defaults ----------------------------------------


class OwTicket(WBase):
    __tablename__ = "ow_tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # SERIAL: each shard's own sequence
    owner_id: Mapped[int] = mapped_column(BigInteger)
    counter: Mapped[int] = mapped_column(Integer, server_default=text("7"))
    label: Mapped[str] = mapped_column(String(50), server_default=text("'fresh'"))
    __mapper_args__ = {"eager_defaults": True}


def groups(names: list[str]) -> dict:
    return {
        "groups": {
            "owners": {"strategy": "hash", "tables": {
                "ow_parents": "id", "ow_children": "parent_id", "ow_notes": "parent_id",
                "ow_passives": "parent_id", "ow_loose": "parent_id", "ow_tags": "parent_id",
                "ow_docs": "owner_id", "ow_labels": "owner_id", "ow_doc_labels": "owner_id",
                "ow_tickets": "owner_id", "ow_memberships": "owner_id"}},
            "serials": {"strategy": "hash", "tables": {"ow_serial_roots": "id"}},
            "trees": {"strategy": "hash", "tables": {"ow_nodes": "tree_id"}},
            "shops": {"strategy": "list", "tables": {"ow_shops": "region"},
                      "values": {names[0]: ["eu"], names[1]: ["us"]}, "default": names[2]},
        },
        "reference_tables": ["ow_colors", "ow_regions"],
    }


class Env:
    def __init__(self, dev, cluster):
        self.dev = dev
        self.cluster = cluster
        self.names = list(cluster.shard_names)
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)

    def keys_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for(OwParent, k) == shard:
                out.append(k)
            k += 1
        return out

    def rows(self, shard: str, sql: str) -> list:
        with self.cluster.primary(shard).connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]

    def where(self, table: str, id_: int, col: str = "id") -> list[str]:
        """The shards holding a row of ``table`` with ``col = id_``."""
        return [s for s in self.names if self.rows(s, f"SELECT 1 FROM {table} WHERE {col} = {id_!r}")]


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cfg = {**dev.config_dict(), **groups([s.name for s in dev.shards])}
    cluster = shardkit.Cluster.from_config(cfg, metadata=WBase.metadata)
    for s in cluster.shard_names:
        WBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def w(env):
    tables = ", ".join(t.name for t in WBase.metadata.sorted_tables)
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return env


def _seed_parents(w: Env, *keys: int) -> None:
    with w.Session() as s:
        s.add_all([OwParent(id=k, name=f"p{k}") for k in keys])
        s.commit()


# -- colocated children through collections ---------------------------------------------


def test_append_to_backref_collection_follows_parent(w):
    k = w.keys_on(w.names[1], 1)[0]
    _seed_parents(w, k)
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.children.append(OwChild(id=501, name="a"))
        s.add(OwParent(id=w.keys_on(w.names[2], 1)[0], children=[OwChild(id=502)]))
        s.commit()
    assert w.where("ow_children", 501) == [w.names[1]]
    assert w.where("ow_children", 502) == [w.names[2]]
    assert w.rows(w.names[1], "SELECT parent_id FROM ow_children WHERE id = 501") == [(k,)]


def test_append_to_one_directional_collection_follows_parent(w):
    """``parent.notes.append(Note(...))`` with no backref: on one database the flush fills
    notes.parent_id from the parent.  The note's only parent relationship is the
    parent's collection; it must be written on the parent's shard."""
    k = w.keys_on(w.names[1], 1)[0]
    _seed_parents(w, k)
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.notes.append(OwNote(id=601, body="n"))
        s.commit()
    assert w.where("ow_notes", 601) == [w.names[1]]
    with w.Session() as s:
        new = OwParent(id=w.keys_on(w.names[2], 1)[0], notes=[OwNote(id=602)])
        s.add(new)
        s.commit()
    assert w.where("ow_notes", 602) == [w.names[2]]


def test_reparent_through_backref_to_other_shard_is_refused_before_writing(w):
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k0, children=[OwChild(id=701, name="c")]))
        s.add(OwParent(id=k1))
        s.commit()
    with w.Session() as s:
        p0, p1 = s.get(OwParent, k0), s.get(OwParent, k1)
        c = p0.children[0]
        p1.children.append(c)
        p1.name = "touched"
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    assert w.rows(w.names[0], "SELECT parent_id FROM ow_children WHERE id = 701") == [(k0,)]
    assert w.where("ow_children", 701) == [w.names[0]]
    assert w.rows(w.names[1], f"SELECT name FROM ow_parents WHERE id = {k1}") == [("",)]


def test_reparent_through_one_directional_collection_to_other_shard_is_refused(w):
    """``p1.notes.append(n)`` (n is p0's) with no backref: the flush would UPDATE
    the note on p0's shard, setting its shard key to p1's (another shard's) key: the row
    would be left on the wrong shard.  The README promises CrossShardWriteError for a
    flush that changes an object's parent relationship to another shard's."""
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k0, notes=[OwNote(id=801, body="n")]))
        s.add(OwParent(id=k1))
        s.commit()
    with w.Session() as s:
        p0, p1 = s.get(OwParent, k0), s.get(OwParent, k1)
        n = p0.notes[0]
        p1.notes.append(n)
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    assert w.rows(w.names[0], "SELECT parent_id FROM ow_notes WHERE id = 801") == [(k0,)]
    assert w.where("ow_notes", 801) == [w.names[0]]


def test_reparent_to_parent_on_same_shard_works(w):
    a, b = w.keys_on(w.names[2], 2)
    with w.Session() as s:
        s.add(OwParent(id=a, children=[OwChild(id=901)], notes=[OwNote(id=902)]))
        s.add(OwParent(id=b))
        s.commit()
    with w.Session() as s:
        pa, pb = s.get(OwParent, a), s.get(OwParent, b)
        pb.children.append(pa.children[0])
        pb.notes.append(pa.notes[0])
        s.commit()
        assert [c.id for c in pb.children] == [901]
        assert pa.children == []
    assert w.rows(w.names[2], "SELECT parent_id FROM ow_children WHERE id = 901") == [(b,)]
    assert w.rows(w.names[2], "SELECT parent_id FROM ow_notes WHERE id = 902") == [(b,)]


def test_new_child_with_stale_key_and_new_parent_goes_where_flush_writes_it(w):
    """A copy made the SQLAlchemy way: ``make_transient(child)``, a new id, a new parent
    on another shard.  The flush writes parent_id = new parent's key (the relationship
    wins over the stale column value), so the row must be on the new parent's shard.
    (OwLoose has no FK constraint: a misplaced row would go unnoticed.)"""
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    _seed_parents(w, k0, k1)
    with w.Session() as s:
        s.add(OwLoose(id=1001, parent_id=k0, body="orig"))
        s.commit()
    with w.Session() as s:
        obj = s.scalars(select(OwLoose).where(OwLoose.parent_id == k0)).one()
        p1 = s.get(OwParent, k1)
        s.expunge(obj)
        make_transient(obj)
        obj.id = 1002
        obj.parent = p1
        s.add(obj)
        s.commit()
    assert sorted(w.rows(w.names[1], "SELECT id, parent_id FROM ow_loose")) == [(1002, k1)]
    assert w.rows(w.names[0], "SELECT id, parent_id FROM ow_loose") == [(1001, k0)]


def test_delete_orphan_and_cascade_delete_on_their_shard(w):
    k = w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k, children=[OwChild(id=1101), OwChild(id=1102)],
                       notes=[OwNote(id=1103)]))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.children.remove(p.children[0])
        s.commit()
    assert w.rows(w.names[1], "SELECT id FROM ow_children") == [(1102,)]
    with w.Session() as s:
        s.delete(s.get(OwParent, k))
        s.commit()
    for t in ("ow_parents", "ow_children", "ow_notes"):
        assert all(w.rows(sh, f"SELECT count(*) FROM {t}") == [(0,)] for sh in w.names), t


def test_passive_deletes_rely_on_on_delete_cascade(w):
    k = w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k, passives=[OwPassive(id=1201), OwPassive(id=1202)]))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k)
        s.delete(p)
        s.commit()
    assert w.rows(w.names[2], "SELECT count(*) FROM ow_passives") == [(0,)]
    assert w.rows(w.names[2], "SELECT count(*) FROM ow_parents") == [(0,)]


# -- many-to-many through a colocated association table ------------------------------


def test_many_to_many_secondary_writes_on_owner_shard(w):
    """``doc.labels.append(label)``: the association row is written by the unit of work
    (not through a mapped object); it must go to the owner's shard."""
    k = w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        d = OwDoc(owner_id=k, id=1, title="d")
        d.labels = [OwLabel(owner_id=k, id=10, name="x"), OwLabel(owner_id=k, id=11, name="y")]
        s.add(d)
        s.commit()
    assert sorted(w.rows(w.names[1], "SELECT owner_id, doc_id, label_id FROM ow_doc_labels")) == \
        [(k, 1, 10), (k, 1, 11)]
    with w.Session() as s:
        d = s.get(OwDoc, (k, 1))
        assert [lb.id for lb in d.labels] == [10, 11]
        d.labels.remove(d.labels[0])
        s.commit()
    assert w.rows(w.names[1], "SELECT label_id FROM ow_doc_labels") == [(11,)]


def test_many_to_many_secondary_across_shards_in_one_flush(w):
    """Two owners on two shards, each with its own doc and labels, in one flush: SQLAlchemy
    writes a secondary table's rows on one connection, so the flush is refused clearly
    (README) with nothing written; flushing each shard's changes on their own works."""
    k0, k2 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        for k in (k0, k2):
            s.add(OwDoc(owner_id=k, id=1, labels=[OwLabel(owner_id=k, id=20)]))
        with pytest.raises(shardkit.RoutingError, match="one shard per flush"):
            s.commit()
    for name in (w.names[0], w.names[2]):
        assert w.rows(name, "SELECT count(*) FROM ow_doc_labels") == [(0,)]
        assert w.rows(name, "SELECT count(*) FROM ow_docs") == [(0,)]
    with w.Session() as s:
        for k in (k0, k2):
            s.add(OwDoc(owner_id=k, id=1, labels=[OwLabel(owner_id=k, id=20)]))
            s.flush()
        s.commit()
    assert w.rows(w.names[0], "SELECT owner_id, label_id FROM ow_doc_labels") == [(k0, 20)]
    assert w.rows(w.names[2], "SELECT owner_id, label_id FROM ow_doc_labels") == [(k2, 20)]


# -- an adjacency list -------------------------------------------------------------------


def test_adjacency_list_children_follow_root(w):
    t = w.keys_on(w.names[2], 1)[0]
    assert w.cluster.shard_for("ow_nodes", t) == w.cluster.shard_for(OwParent, t)
    with w.Session() as s:
        root = OwNode(tree_id=t, id=1, name="root")
        mid = OwNode(id=2, name="mid")          # tree_id comes from the parent
        root.children.append(mid)
        mid.children.append(OwNode(id=3, name="leaf"))
        s.add(root)
        s.commit()
    assert sorted(w.rows(w.names[2], "SELECT tree_id, id, parent_id FROM ow_nodes")) == \
        [(t, 1, None), (t, 2, 1), (t, 3, 2)]
    with w.Session() as s:
        root = s.get(OwNode, (t, 1))
        assert [n.id for n in root.children[0].children] == [3]
        s.delete(root)
        s.commit()
    assert w.rows(w.names[2], "SELECT count(*) FROM ow_nodes") == [(0,)]


# -- sharded rows and reference rows -----------------------------------------------------


def test_new_reference_row_and_sharded_row_pointing_at_it_in_one_flush(w):
    """A new reference row and, in the same flush, a sharded row on another shard with a
    foreign key to it: the README says reference writes reach every shard in the
    session's transaction; on one database this flush works."""
    home = w.names[0]
    k = w.keys_on(w.names[1], 1)[0]
    _seed_parents(w, k)
    assert home != w.names[1]
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.children.append(OwChild(id=1301, color=OwColor(code="teal", name="Teal")))
        s.commit()
    assert w.rows(w.names[1], "SELECT color_code FROM ow_children WHERE id = 1301") == [("teal",)]
    for sh in w.names:
        assert w.rows(sh, "SELECT name FROM ow_colors") == [("Teal",)]


def test_change_reference_row_through_many_to_one(w):
    k1, k2 = w.keys_on(w.names[1], 1)[0], w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        s.add(OwColor(code="red", name="Red"))
        s.commit()
    with w.Session() as s:
        s.add(OwParent(id=k1, children=[OwChild(id=1401, color_code="red")]))
        s.add(OwParent(id=k2, children=[OwChild(id=1402, color_code="red")]))
        s.commit()
    with w.Session() as s:
        c = s.get(OwParent, k1).children[0]
        c.color.name = "Crimson"
        s.commit()
    for sh in w.names:
        assert w.rows(sh, "SELECT name FROM ow_colors WHERE code = 'red'") == [("Crimson",)]
    with w.Session() as s:
        assert s.get(OwParent, k2).children[0].color.name == "Crimson"


def _regions(w):
    with w.Session() as s:
        s.add_all([OwRegion(code=c, name=c.upper()) for c in ("eu", "us", "zz")])
        s.commit()


def test_list_keyed_child_placed_by_its_key_not_by_where_the_reference_parent_was_read(w):
    """OwShop is sharded by ``region``, a foreign key to the reference table ow_regions.
    ``OwShop(region_obj=region)`` leaves ``region`` to the flush, which copies
    region.code into it; the shop must be written on the shard that owns that code
    (eu -> s0, us -> s1, other -> s2), not on whichever shard the reference row
    happened to be read from."""
    _regions(w)
    expected = {"eu": w.names[0], "us": w.names[1], "zz": w.names[2]}
    with w.Session() as s:
        for i, code in enumerate(("eu", "us", "zz")):
            s.add(OwShop(id=100 + i, name=code, region_obj=s.get(OwRegion, code)))
        s.commit()
    for i, code in enumerate(("eu", "us", "zz")):
        assert w.where("ow_shops", 100 + i) == [expected[code]], code


def test_list_keyed_child_appended_to_reference_collection(w):
    """The same through the reference row's collection: ``region.shops.append(shop)``."""
    _regions(w)
    expected = {"eu": w.names[0], "us": w.names[1], "zz": w.names[2]}
    with w.Session() as s:
        regions = [s.get(OwRegion, code) for code in ("eu", "us", "zz")]
        for i, r in enumerate(regions):
            r.shops.append(OwShop(id=200 + i, name=r.code))
        s.commit()
    for i, code in enumerate(("eu", "us", "zz")):
        assert w.where("ow_shops", 200 + i) == [expected[code]], code


def test_list_keyed_child_reassigned_to_reference_row_of_another_shard_is_refused(w):
    """Moving a shop from region us (s1) to eu (s0) through the relationship changes its
    shard: CrossShardWriteError before anything is written, whichever shard the
    region rows were read from."""
    _regions(w)
    with w.Session() as s:
        s.add(OwShop(id=300, region="us", name="x"))
        s.commit()
    outcomes = []
    for _ in range(3):                         # reference reads rotate over the shards
        with w.Session() as s:
            shop = s.get(OwShop, 300, identity_token=w.names[1])
            region = s.get(OwRegion, "eu")
            read_from = inspect_token(region)
            shop.region_obj = region
            try:
                s.flush()
                outcomes.append((read_from, "flushed"))
            except shardkit.CrossShardWriteError:
                outcomes.append((read_from, "refused"))
            s.rollback()
    assert [o[1] for o in outcomes] == ["refused"] * 3, outcomes
    assert w.where("ow_shops", 300) == [w.names[1]]
    assert w.rows(w.names[1], "SELECT region FROM ow_shops") == [("us",)]


def test_list_keyed_child_reassigned_to_reference_row_of_same_shard_works(w):
    """Regions zz and yy both belong to the default shard: moving a shop between them is
    an ordinary update, whichever shard the region rows were read from."""
    with w.Session() as s:
        s.add_all([OwRegion(code="zz"), OwRegion(code="yy")])
        s.commit()
    with w.Session() as s:
        s.add(OwShop(id=400, region="zz"))
        s.commit()
    outcomes = []
    for target in ("yy", "zz", "yy"):          # reference reads rotate over the shards
        with w.Session() as s:
            shop = s.get(OwShop, 400, identity_token=w.names[2])
            region = s.get(OwRegion, target)
            shop.region_obj = region
            try:
                s.commit()
                outcomes.append((inspect_token(region), "written"))
            except shardkit.CrossShardWriteError:
                outcomes.append((inspect_token(region), "refused"))
    assert [o[1] for o in outcomes] == ["written"] * 3, outcomes
    assert w.rows(w.names[2], "SELECT region FROM ow_shops") == [("yy",)]


# -- ORM-enabled UPDATE / DELETE and the identity map -----------------------------------


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch", False])
def test_orm_update_across_shards_synchronizes_identity_map(w, sync):
    keys = [w.keys_on(sh, 1)[0] for sh in w.names]
    _seed_parents(w, *keys)
    with w.Session() as s:
        objs = [s.get(OwParent, k) for k in keys]
        s.execute(update(OwParent).where(OwParent.name != "none").values(name="renamed"),
                  execution_options={"synchronize_session": sync, "shardkit_all_shards": True})
        if sync is False:
            assert [o.name for o in objs] == [f"p{k}" for k in keys]
        else:
            assert "name" in objs[0].__dict__
            assert [o.name for o in objs] == ["renamed"] * 3
        # With the key: one shard.
        s.execute(update(OwParent).where(OwParent.id == keys[1]).values(name="one"),
                  execution_options={"synchronize_session": sync})
        if sync is not False:
            assert [o.name for o in objs] == ["renamed", "one", "renamed"]
        s.commit()
    for k, sh in zip(keys, w.names):
        assert w.rows(sh, f"SELECT name FROM ow_parents WHERE id = {k}") == \
            [("one" if k == keys[1] else "renamed",)]


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
def test_orm_delete_across_shards_synchronizes_identity_map(w, sync):
    keys = [w.keys_on(sh, 2)[1] for sh in w.names]
    _seed_parents(w, *keys)
    with w.Session() as s:
        objs = [s.get(OwParent, k) for k in keys]
        s.execute(delete(OwParent).where(OwParent.id != keys[0]),
                  execution_options={"synchronize_session": sync, "shardkit_all_shards": True})
        assert [o in s for o in objs] == [True, False, False]
        s.commit()
    assert sum(w.rows(sh, "SELECT count(*) FROM ow_parents")[0][0] for sh in w.names) == 1


def test_orm_update_of_equal_primary_keys_on_two_shards_touches_each_shards_object(w):
    """Serial ids: each shard's sequence starts at 1, so the two tickets share id 1.  An
    UPDATE keyed by one owner changes that shard's object only."""
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        t0, t1 = OwTicket(owner_id=k0), OwTicket(owner_id=k1)
        s.add_all([t0, t1])
        s.flush()
        assert (t0.id, t1.id) == (1, 1)
        assert t0.__dict__["counter"] == 7 and t1.__dict__["label"] == "fresh"   # eager_defaults
        for sync in ("evaluate", "fetch"):
            s.execute(update(OwTicket).where(OwTicket.owner_id == k1)
                      .values(counter=OwTicket.counter + 1),
                      execution_options={"synchronize_session": sync})
        assert (t0.counter, t1.counter) == (7, 9)
        t0.label, t1.label = "a", "b"
        s.commit()
    assert w.rows(w.names[0], "SELECT id, counter, label FROM ow_tickets") == [(1, 7, "a")]
    assert w.rows(w.names[1], "SELECT id, counter, label FROM ow_tickets") == [(1, 9, "b")]


# -- version counters --------------------------------------------------------------------


def test_version_id_stale_update_and_delete_raise_stale_data_error(w):
    k = w.keys_on(w.names[2], 1)[0]
    _seed_parents(w, k)
    with w.Session() as a, w.Session() as b:
        pa, pb = a.get(OwParent, k), b.get(OwParent, k)
        assert pa.version == pb.version == 1
        pa.name = "first"
        a.commit()
        pb.name = "second"
        with pytest.raises(orm_exc.StaleDataError):
            b.flush()
        b.rollback()
        pb = b.get(OwParent, k)
        assert pb.version == 2
        a.get(OwParent, k).name = "third"
        a.commit()
        b.delete(pb)
        with pytest.raises(orm_exc.StaleDataError):
            b.flush()
        b.rollback()
    assert w.rows(w.names[2], f"SELECT name, version FROM ow_parents WHERE id = {k}") == [("third", 3)]


# -- post_update ---------------------------------------------------------------------------


def test_post_update_cycle_written_on_the_parents_shard(w):
    k = w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        c = OwChild(id=1601)
        p = OwParent(id=k, children=[c, OwChild(id=1602)], favorite=c)
        s.add(p)
        s.commit()
        p.favorite = p.children[1]
        s.commit()
        assert p.version >= 2
    assert w.rows(w.names[2], f"SELECT favorite_id FROM ow_parents WHERE id = {k}") == [(1602,)]
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.favorite = None
        s.delete(p)
        s.commit()
    assert w.rows(w.names[2], "SELECT count(*) FROM ow_children") == [(0,)]


# -- merge, expunge, make_transient ---------------------------------------------------


def test_merge_graph_with_children(w):
    k = w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        m = s.merge(OwParent(id=k, name="m", version=1,
                             children=[OwChild(id=1701, name="a")]))
        s.commit()
        assert inspect_token(m) == w.names[1]
    with w.Session() as s:
        m = s.merge(OwParent(id=k, name="m2", version=1,
                             children=[OwChild(id=1701, name="a2", parent_id=k),
                                       OwChild(id=1702, name="b")]))
        s.commit()
        assert [c.name for c in m.children] == ["a2", "b"]
    assert sorted(w.rows(w.names[1], "SELECT id, parent_id, name FROM ow_children")) == \
        [(1701, k, "a2"), (1702, k, "b")]
    assert w.rows(w.names[1], f"SELECT name FROM ow_parents WHERE id = {k}") == [("m2",)]


def inspect_token(obj):
    from sqlalchemy import inspect
    return inspect(obj).identity_token


def test_expunge_graph_then_add_back(w):
    k = w.keys_on(w.names[0], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k, children=[OwChild(id=1801)]))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k)
        c = p.children[0]
        s.expunge(p)                       # cascades to the children
        assert c not in s
    p.name = "back"
    c.name = "back-c"
    p.children.append(OwChild(id=1802))
    with w.Session() as s2:
        s2.add(p)
        s2.commit()
    assert sorted(w.rows(w.names[0], "SELECT id, name FROM ow_children")) == [(1801, "back-c"), (1802, "")]


def test_make_transient_parent_with_new_key_on_other_shard_and_new_children(w):
    k0, k2 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k0, name="orig"))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k0)
        s.expunge(p)
        make_transient(p)
        p.id = k2
        p.version = None
        p.children.append(OwChild(id=1901))
        s.add(p)
        s.commit()
    assert w.where("ow_parents", k2) == [w.names[2]]
    assert w.where("ow_children", 1901) == [w.names[2]]
    assert w.where("ow_parents", k0) == [w.names[0]]


# -- flush ordering and failures -----------------------------------------------------------


def test_flush_across_shards_with_fk_dependencies_added_children_first(w):
    keys = [w.keys_on(sh, 1)[0] for sh in w.names]
    with w.Session() as s:
        parents = [OwParent(id=k) for k in keys]
        kids = []
        for i, p in enumerate(parents):
            c = OwChild(id=2000 + i)
            c.parent = p
            kids.append(c)
        s.add_all(kids)                     # children first; parents by cascade
        s.commit()
    for i, sh in enumerate(w.names):
        assert w.rows(sh, "SELECT id, parent_id FROM ow_children") == [(2000 + i, keys[i])]


def test_integrity_error_on_one_shard_rolls_back_the_whole_flush(w):
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k1, children=[OwChild(id=2101)]))
        s.commit()
    with w.Session() as s:
        s.add(OwParent(id=k0, children=[OwChild(id=2102)]))
        p1 = s.get(OwParent, k1)
        p1.name = "changed"
        s.add(OwChild(id=2101, parent_id=k1))      # duplicate primary key on shard 1
        with pytest.raises(sa_exc.IntegrityError):
            s.flush()
        s.rollback()
        assert p1.name == ""
        s.add(OwParent(id=w.keys_on(w.names[2], 1)[0], children=[OwChild(id=2103)]))
        s.commit()
    assert w.rows(w.names[0], "SELECT count(*) FROM ow_parents") == [(0,)]
    assert w.rows(w.names[0], "SELECT count(*) FROM ow_children") == [(0,)]
    assert w.rows(w.names[1], "SELECT id FROM ow_children") == [(2101,)]
    assert w.where("ow_children", 2103) == [w.names[2]]


# -- more: silent misplacement, NULL keys, merge, reference copies -------------------------


def test_reparent_through_one_directional_collection_without_fk_is_not_silently_misplaced(w):
    """As above, for a child table without a FK constraint: if the flush is not refused,
    the row stays on shard 0 with shard 1's key (``verify`` would call it misplaced,
    and reads by its key would never find it)."""
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    _seed_parents(w, k0, k1)
    with w.Session() as s:
        s.add(OwTag(id=2201, parent_id=k0))
        s.commit()
    with w.Session() as s:
        p0, p1 = s.get(OwParent, k0), s.get(OwParent, k1)
        tag = p0.tags[0]
        p1.tags.append(tag)
        try:
            s.commit()
        except shardkit.CrossShardWriteError:
            s.rollback()
    assert w.rows(w.names[0], "SELECT id, parent_id FROM ow_tags") == [(2201, k0)]
    with w.Session() as s:
        assert [t.id for t in s.get(OwParent, k1).tags] == []
        assert [t.id for t in s.get(OwParent, k0).tags] == [2201]


def test_removing_child_from_collection_does_not_write_a_null_shard_key(w):
    """``parent.tags.remove(tag)`` (save-update cascade only) makes the flush set the
    tag's parent_id -- its shard key -- to NULL.  The README: a NULL key is refused with
    ShardKeyError wherever a key is read, updates included; such a row would belong to
    no shard."""
    k = w.keys_on(w.names[2], 1)[0]
    _seed_parents(w, k)
    with w.Session() as s:
        s.add(OwTag(id=2301, parent_id=k))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k)
        p.tags.remove(p.tags[0])
        with pytest.raises(shardkit.ShardKeyError):
            s.flush()
        s.rollback()
    assert w.rows(w.names[2], "SELECT id, parent_id FROM ow_tags") == [(2301, k)]


def test_setting_shard_key_to_null_directly_is_refused(w):
    k = w.keys_on(w.names[2], 1)[0]
    _seed_parents(w, k)
    with w.Session() as s:
        s.add(OwTag(id=2401, parent_id=k))
        s.commit()
    with w.Session() as s:
        t = s.scalars(select(OwTag).where(OwTag.parent_id == k)).one()
        t.parent_id = None
        with pytest.raises(shardkit.ShardKeyError):
            s.flush()
        s.rollback()
    assert w.rows(w.names[2], "SELECT id, parent_id FROM ow_tags") == [(2401, k)]


def test_merge_of_child_with_parent_on_other_shard_is_refused(w):
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k0, children=[OwChild(id=2501)]))
        s.add(OwParent(id=k1))
        s.commit()
    with w.Session() as s:
        s.merge(OwChild(id=2501, parent_id=k1, name="moved"))
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    assert w.where("ow_children", 2501) == [w.names[0]]


def test_merge_load_false_of_detached_graph_then_write(w):
    k = w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k, children=[OwChild(id=2601), OwChild(id=2602)]))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k)
        _ = p.children
    with w.Session() as s:
        m = s.merge(p, load=False)
        assert sa_inspect(m).key[2] == w.names[1]
        assert sa_inspect(m.children[0]).key[2] == w.names[1]
        m.children[1].name = "changed"
        s.commit()
    assert w.rows(w.names[1], "SELECT name FROM ow_children WHERE id = 2602") == [("changed",)]


def test_self_referential_move_to_tree_on_other_shard_is_refused(w):
    t0, t1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwNode(tree_id=t0, id=1, children=[OwNode(id=2)]))
        s.add(OwNode(tree_id=t1, id=1))
        s.commit()
    with w.Session() as s:
        leaf = s.get(OwNode, (t0, 2))
        leaf.parent = s.get(OwNode, (t1, 1))
        with pytest.raises(shardkit.CrossShardWriteError):
            s.flush()
        s.rollback()
    assert sorted(w.rows(w.names[0], "SELECT tree_id, id, parent_id FROM ow_nodes")) == \
        [(t0, 1, None), (t0, 2, 1)]
    assert w.rows(w.names[1], "SELECT tree_id, id FROM ow_nodes") == [(t1, 1)]


@pytest.mark.parametrize("sync", ["evaluate", "fetch"])
def test_orm_update_of_reference_row_syncs_every_shards_copy(w, sync):
    """A reference row read through rows of two shards is two objects (README); an ORM
    UPDATE of it runs on every shard, and each copy in the identity map shows it."""
    k1, k2 = w.keys_on(w.names[1], 1)[0], w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        s.add(OwColor(code="blue", name="Blue"))
        s.commit()
    with w.Session() as s:
        s.add(OwParent(id=k1, children=[OwChild(id=2701, color_code="blue")]))
        s.add(OwParent(id=k2, children=[OwChild(id=2702, color_code="blue")]))
        s.commit()
    with w.Session() as s:
        c1 = s.get(OwParent, k1).children[0].color
        c2 = s.get(OwParent, k2).children[0].color
        assert c1 is not c2
        s.execute(update(OwColor).where(OwColor.code == "blue").values(name="Navy"),
                  execution_options={"synchronize_session": sync})
        assert (c1.name, c2.name) == ("Navy", "Navy")
        s.commit()
    for sh in w.names:
        assert w.rows(sh, "SELECT name FROM ow_colors") == [("Navy",)]


def test_orm_update_and_delete_with_key_in_list_sync_fetch(w):
    keys = [w.keys_on(sh, 1)[0] for sh in w.names]
    _seed_parents(w, *keys)
    with w.Session() as s:
        objs = [s.get(OwParent, k) for k in keys]
        s.execute(update(OwParent).where(OwParent.id.in_(keys)).values(name="in"),
                  execution_options={"synchronize_session": "fetch"})
        assert [o.name for o in objs] == ["in"] * 3
        s.execute(delete(OwParent).where(OwParent.id.in_(keys[1:])),
                  execution_options={"synchronize_session": "fetch"})
        assert [o in s for o in objs] == [True, False, False]
        s.commit()
    assert sum(w.rows(sh, "SELECT count(*) FROM ow_parents")[0][0] for sh in w.names) == 1


@pytest.mark.parametrize("sync", ["evaluate", "fetch"])
def test_orm_delete_of_equal_primary_keys_keyed_by_one_shard(w, sync):
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        t0, t1 = OwTicket(owner_id=k0), OwTicket(owner_id=k1)
        s.add_all([t0, t1])
        s.commit()
        assert (t0.id, t1.id) == (1, 1)
        s.execute(delete(OwTicket).where(OwTicket.owner_id == k1),
                  execution_options={"synchronize_session": sync})
        assert (t0 in s, t1 in s) == (True, False)
        t0.label = "kept"
        s.commit()
    assert w.rows(w.names[0], "SELECT id, label FROM ow_tickets") == [(1, "kept")]
    assert w.rows(w.names[1], "SELECT count(*) FROM ow_tickets") == [(0,)]


def test_association_object_written_on_owner_shard(w):
    """The association-object pattern.  (OwDoc also has the ``secondary=`` relationship
    ``labels`` to OwLabel: a flush holding a doc and a label runs its many-to-many
    step even though no association row changes.)"""
    k = w.keys_on(w.names[2], 1)[0]
    with w.Session() as s:
        d = OwDoc(owner_id=k, id=1)
        lb = OwLabel(owner_id=k, id=30)
        d.memberships.append(OwMembership(label=lb, role="r"))   # owner_id from the doc
        s.add(d)
        s.commit()
    assert w.rows(w.names[2], "SELECT owner_id, doc_id, label_id, role FROM ow_memberships") == \
        [(k, 1, 30, "r")]
    with w.Session() as s:
        d = s.get(OwDoc, (k, 1))
        d.memberships.clear()
        s.commit()
    assert w.rows(w.names[2], "SELECT count(*) FROM ow_memberships") == [(0,)]


def test_serial_shard_key_is_refused_clearly_before_writing(w):
    """A hash key the database generates cannot be routed before the INSERT: the flush
    must refuse it (ShardKeyError), not write it to some shard."""
    with w.Session() as s:
        s.add(OwSerialRoot(name="x"))
        with pytest.raises(shardkit.ShardKeyError):
            s.flush()
        s.rollback()
    assert all(w.rows(sh, "SELECT count(*) FROM ow_serial_roots") == [(0,)] for sh in w.names)


def test_savepoint_rollback_of_relationship_writes(w):
    k0, k1 = w.keys_on(w.names[0], 1)[0], w.keys_on(w.names[1], 1)[0]
    with w.Session() as s:
        s.add(OwParent(id=k0, children=[OwChild(id=2801)]))
        s.commit()
    with w.Session() as s:
        p = s.get(OwParent, k0)
        p.children.append(OwChild(id=2802))
        s.flush()
        nested = s.begin_nested()
        p.children.append(OwChild(id=2803))
        s.add(OwParent(id=k1, children=[OwChild(id=2804)]))
        s.flush()
        nested.rollback()
        assert sorted(c.id for c in p.children) == [2801, 2802]
        s.commit()
    assert sorted(w.rows(w.names[0], "SELECT id FROM ow_children")) == [(2801,), (2802,)]
    assert w.rows(w.names[1], "SELECT count(*) FROM ow_children") == [(0,)]


def test_object_with_an_untouched_many_to_many_relationship_can_be_written(w):
    """OwDoc has a ``secondary=`` relationship; inserting, changing and deleting docs
    that never touch it must work (the unit of work still visits the relationship)."""
    k = w.keys_on(w.names[0], 1)[0]
    with w.Session() as s:
        s.add(OwDoc(owner_id=k, id=5, title="plain"))
        s.commit()
    with w.Session() as s:
        d = s.get(OwDoc, (k, 5))
        d.title = "changed"
        s.commit()
        s.delete(d)
        s.commit()
    assert w.rows(w.names[0], "SELECT count(*) FROM ow_docs") == [(0,)]
