"""Reference-table writes attacked through the ORM: self-referential tables, foreign
keys with ON DELETE / ON UPDATE actions between reference tables, primary key changes
cascading to reference children.  Every shard's copy must end identical (read through
each shard's primary), or the write be refused with nothing written."""

from __future__ import annotations

import datetime

import pytest
from reference_env import ReferenceEnv
from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, TypeDecorator, delete, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit

pytestmark = pytest.mark.integration


class RwBase(DeclarativeBase):
    pass


class RwRegion(RwBase):
    """Self-referential, no action: a child must go before its parent."""
    __tablename__ = "rw_regions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("rw_regions.id"))
    parent: Mapped[RwRegion | None] = relationship(remote_side=[id], back_populates="children")
    children: Mapped[list[RwRegion]] = relationship(back_populates="parent")


class RwArea(RwBase):
    """Self-referential with ON DELETE CASCADE, left to the database."""
    __tablename__ = "rw_areas"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("rw_areas.id", ondelete="CASCADE"))


class RwPlan(RwBase):
    __tablename__ = "rw_plans"
    code: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    features: Mapped[list[RwFeature]] = relationship(back_populates="plan", passive_updates=True,
                                                     passive_deletes=True)


class RwFeature(RwBase):
    """Child of a reference table: ON UPDATE CASCADE, ON DELETE CASCADE."""
    __tablename__ = "rw_features"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_code: Mapped[str] = mapped_column(
        ForeignKey("rw_plans.code", onupdate="CASCADE", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(40))
    plan: Mapped[RwPlan] = relationship(back_populates="features")


class RwLimit(RwBase):
    """Child of a feature, ON DELETE CASCADE (a grandchild of the plan)."""
    __tablename__ = "rw_limits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("rw_features.id", ondelete="CASCADE"))
    n: Mapped[int] = mapped_column(Integer)


class RwTag(RwBase):
    """Child of a plan, ON UPDATE CASCADE, ON DELETE SET NULL."""
    __tablename__ = "rw_tags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_code: Mapped[str | None] = mapped_column(
        ForeignKey("rw_plans.code", onupdate="CASCADE", ondelete="SET NULL"))


class RwKind(RwBase):
    """Single-table inheritance, a server default and a server-side version."""
    __tablename__ = "rw_kinds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(40))
    made: Mapped[str] = mapped_column(String(40), server_default=text("'srv'"))
    __mapper_args__ = {"polymorphic_on": type, "polymorphic_identity": "kind"}


class RwSubKind(RwKind):
    __mapper_args__ = {"polymorphic_identity": "sub"}


class RwTenant(RwBase):
    """Sharded, referencing a reference row."""
    __tablename__ = "rw_tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    plan_code: Mapped[str | None] = mapped_column(ForeignKey("rw_plans.code"))


class Opaque:
    """A value class without equality of its own (compared by identity)."""

    def __init__(self, text_: str) -> None:
        self.text = text_


class OpaqueText(TypeDecorator):
    impl = String(40)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.text

    def process_result_value(self, value, dialect):
        return None if value is None else Opaque(value)


class RwStamped(RwBase):
    """A reference table whose trigger keeps updated_at (each shard's transaction its own now())."""
    __tablename__ = "rw_stamped"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))


class RwMeasure(RwBase):
    """Values two reads of one row never give as equal: NaN, and objects equal by identity."""
    __tablename__ = "rw_measures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    x: Mapped[float] = mapped_column(Float)
    label: Mapped[Opaque] = mapped_column(OpaqueText)


REFS = ["rw_stamped", "rw_measures", "rw_kinds", "rw_regions", "rw_areas", "rw_plans", "rw_features", "rw_limits", "rw_tags"]
CONFIG = {"reference_tables": REFS,
          "groups": {"tenants": {"strategy": "hash", "tables": {"rw_tenants": "id"}}}}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=RwBase.metadata)
    for s in cluster.shard_names:
        RwBase.metadata.create_all(cluster.primary(s))
    try:
        yield ReferenceEnv(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def rw(env):
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE rw_tenants, " + ", ".join(REFS) + " CASCADE"))
            c.execute(text("INSERT INTO rw_plans VALUES ('free', 'Free'), ('pro', 'Pro')"))
            c.execute(text("INSERT INTO rw_features VALUES (1, 'free', 'a'), (2, 'pro', 'b'), (3, 'pro', 'c')"))
            c.execute(text("INSERT INTO rw_limits VALUES (1, 2, 10), (2, 3, 20)"))
            c.execute(text("INSERT INTO rw_tags VALUES (1, 'pro'), (2, 'free')"))
    return env


REGIONS = "SELECT id, name, parent_id FROM rw_regions ORDER BY id"
AREAS = "SELECT id, name, parent_id FROM rw_areas ORDER BY id"
PLANS = "SELECT code, name FROM rw_plans ORDER BY code"
FEATURES = "SELECT id, plan_code, name FROM rw_features ORDER BY id"
LIMITS = "SELECT id, feature_id, n FROM rw_limits ORDER BY id"
TAGS = "SELECT id, plan_code FROM rw_tags ORDER BY id"


def _tree(s, n):
    """Regions 1..n, each one's parent id // 2 (1 is the root), inserted in one flush."""
    nodes = {1: RwRegion(id=1, name="r1")}
    for i in range(2, n + 1):
        nodes[i] = RwRegion(id=i, name=f"r{i}", parent=nodes[i // 2])
    s.add_all(nodes.values())
    return nodes


def _tenant_on(env, shard):
    return next(k for k in range(1, 1000) if env.cluster.shard_for(RwTenant, k) == shard)


def test_subtree_of_a_self_referential_table_deleted_in_one_flush_goes_on_every_copy(rw):
    """The flush deletes a region's children before it (SQLAlchemy orders the rows of a
    self-referential table); the copies were deleted after the flush in the session's
    order, a parent before its children: a foreign-key error on the second shard."""
    with rw.Session() as s:
        _tree(s, 15)
        s.commit()
    rw.same(REGIONS, [(i, f"r{i}", i // 2 or None) for i in range(1, 16)])
    with rw.Session() as s:
        nodes = {i: s.get(RwRegion, i) for i in (2, 4, 5, 8, 9, 10, 11)}
        for i in (2, 8, 4, 9, 5, 10, 11):
            s.delete(nodes[i])
        s.commit()
    rw.same(REGIONS, [(i, f"r{i}", i // 2 or None) for i in (1, 3, 6, 7, 12, 13, 14, 15)])


def test_children_moved_to_another_parent_and_the_old_parent_deleted_in_one_flush(rw):
    """The flush moves the children (UPDATE) before it deletes their old parent; the
    copies deleted the parent first, while their children still pointed at it."""
    with rw.Session() as s:
        _tree(s, 7)
        s.commit()
    with rw.Session() as s:
        two, three = s.get(RwRegion, 2), s.get(RwRegion, 3)
        for c in list(two.children):
            c.parent = three
        s.delete(two)
        s.commit()
    rw.same(REGIONS, [(1, "r1", None), (3, "r3", 1), (4, "r4", 3), (5, "r5", 3), (6, "r6", 3),
                      (7, "r7", 3)])


def test_primary_key_change_cascades_alike_on_every_copy(rw):
    """A plan's code changed through the ORM (passive_updates: the database's ON UPDATE
    CASCADE moves its features and tags).  The copies were given the new row by a DELETE
    of the old key and an INSERT: the DELETE cascaded there (the plan's features, and
    their limits, gone; its tags' plan set to NULL), committed as such."""
    with rw.Session() as s:
        s.get(RwPlan, "pro").code = "gold"
        s.commit()
    rw.same(PLANS, [("free", "Free"), ("gold", "Pro")])
    rw.same(FEATURES, [(1, "free", "a"), (2, "gold", "b"), (3, "gold", "c")])
    rw.same(LIMITS, [(1, 2, 10), (2, 3, 20)])
    rw.same(TAGS, [(1, "gold"), (2, "free")])


def test_child_moved_and_parent_deleted_in_one_flush_keeps_the_childs_children(rw):
    """Feature 2 moved to another plan, its plan deleted (ON DELETE CASCADE takes feature
    3 and its limit), in one flush: the copies deleted the plan first, which cascaded to
    feature 2 and its limit too; the feature came back with the copy of its row, its
    limit did not."""
    with rw.Session() as s:
        f, p = s.get(RwFeature, 2), s.get(RwPlan, "pro")
        f.plan_code = "free"
        s.delete(p)
        s.commit()
    rw.same(FEATURES, [(1, "free", "a"), (2, "free", "b")])
    rw.same(LIMITS, [(1, 2, 10)])
    rw.same(TAGS, [(1, None), (2, "free")])


def test_self_referential_on_delete_cascade_and_single_table_inheritance_and_merge(rw):
    """(Were right before: the database's cascade does the same on each copy; a
    single-table subclass is one table; merge() of a new object inserts it.)"""
    with rw.Session() as s:
        s.add(RwArea(id=1, name="a"))
        s.flush()
        s.add_all([RwArea(id=2, name="b", parent_id=1), RwArea(id=3, name="c", parent_id=1)])
        s.flush()
        s.add(RwArea(id=4, name="d", parent_id=2))
        s.add_all([RwKind(id=1, name="k"), RwSubKind(id=2, name="s")])
        s.merge(RwKind(id=5, name="m"))
        s.merge(RwPlan(code="pro", name="Pro2"))
        s.commit()
    with rw.Session() as s:
        s.delete(s.get(RwArea, 2))
        s.get(RwSubKind, 2).name = "t"
        s.delete(s.get(RwKind, 1))
        s.commit()
    rw.same(AREAS, [(1, "a", None), (3, "c", 1)])
    rw.same("SELECT * FROM rw_kinds ORDER BY id", [(2, "sub", "t", "srv"), (5, "kind", "m", "srv")])
    rw.same(PLANS, [("free", "Free"), ("pro", "Pro2")])


@pytest.fixture
def bumping(rw):
    """rw_areas with a trigger that appends '+' to the name of each row written."""
    for sh in rw.names:
        with rw.cluster.primary(sh).begin() as c:
            c.execute(text("""CREATE OR REPLACE FUNCTION rw_bump() RETURNS trigger AS $$
                BEGIN NEW.name := NEW.name || '+'; RETURN NEW; END $$ LANGUAGE plpgsql"""))
            c.execute(text("CREATE TRIGGER rw_bump BEFORE INSERT OR UPDATE ON rw_areas "
                           "FOR EACH ROW EXECUTE FUNCTION rw_bump()"))
    try:
        yield rw
    finally:
        for sh in rw.names:
            with rw.cluster.primary(sh).begin() as c:
                c.execute(text("DROP TRIGGER IF EXISTS rw_bump ON rw_areas"))


def test_a_trigger_that_changes_the_copied_row_again_is_refused(bumping):
    """The flush writes the row on the first shard (the trigger: 'a+') and copied what it
    read back to the others, where the trigger ran again ('a++'): committed, different.
    Now refused, nothing committed; a statement, run on every shard, is the same on each."""
    rw = bumping
    for change in ("insert", "update"):
        with rw.Session() as s:
            if change == "insert":
                s.add(RwArea(id=1, name="a"))
            else:
                s.get(RwArea, 9).name = "z"
            with pytest.raises(shardkit.CrossShardWriteError,
                               match=r"rw_areas: .* on shard s1 \(column name differs\): a trigger"):
                s.commit()
            s.rollback()
        rw.same(AREAS, [] if change == "insert" else [(9, "y+", None)])
        if change == "insert":
            with rw.Session() as s:
                s.execute(insert(RwArea).values(id=9, name="y"))
                s.commit()
            rw.same(AREAS, [(9, "y+", None)])


def test_deleting_a_reference_row_a_sharded_row_references_names_the_shard(rw):
    """A tenant on one shard refers to the plan: the DELETE fails there.  On another shard
    than the first, the copy's note names it; on the first shard, where the flush (or a
    statement) writes first, the error did not say where it failed."""
    for shard, plan in ((rw.names[-1], "pro"), (rw.names[0], "free")):
        with rw.Session() as s:
            s.add(RwTenant(id=_tenant_on(rw, shard), plan_code=plan))
            s.commit()
        with rw.Session() as s:
            s.execute(delete(RwTag))
            s.delete(s.get(RwPlan, plan))
            with pytest.raises(IntegrityError) as ei:
                s.commit()
            assert "rw_tenants_plan_code_fkey" in str(ei.value)
            assert any(f"(on shard {shard}" in n for n in ei.value.__notes__), ei.value.__notes__
        with rw.Session() as s:
            with pytest.raises(IntegrityError) as ei:
                s.execute(delete(RwPlan).where(RwPlan.code == plan))
            assert any(f"(on shard {shard}" in n for n in ei.value.__notes__), ei.value.__notes__
        rw.same(PLANS, [("free", "Free"), ("pro", "Pro")])
        rw.same(TAGS, [(1, "pro"), (2, "free")])
        rw.same(FEATURES, [(1, "free", "a"), (2, "pro", "b"), (3, "pro", "c")])


def test_copies_of_values_equal_to_nothing_are_not_taken_for_different_copies(env, rw):
    """Each copy is compared with the first shard's row: NaN (unequal to itself) and a value
    class equal only by identity must not fail the flush as a copy a trigger changed."""
    nan = float("nan")
    with env.Session() as s:
        s.add(RwMeasure(id=1, x=nan, label=Opaque("a")))
        s.commit()
    with env.Session() as s:
        m = s.get(RwMeasure, 1)
        m.label = Opaque("b")
        m.x = nan
        s.commit()
    env.same("SELECT id, x::text, label FROM rw_measures", [(1, "NaN", "b")])


def test_a_trigger_that_stamps_a_time_on_each_copy_is_let_be(rw):
    """updated_at kept by a BEFORE trigger (now()) differs between the shards' copies, each
    shard's transaction having its own time, as a value written as SQL does: the flush is not
    refused for it, and the columns the application wrote are the same everywhere."""
    for sh in rw.names:
        with rw.cluster.primary(sh).begin() as c:
            c.execute(text("""CREATE OR REPLACE FUNCTION rw_stamp() RETURNS trigger AS $$
                BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$ LANGUAGE plpgsql"""))
            c.execute(text("CREATE TRIGGER rw_stamp BEFORE INSERT OR UPDATE ON rw_stamped "
                           "FOR EACH ROW EXECUTE FUNCTION rw_stamp()"))
    try:
        with rw.Session() as s:
            s.add(RwStamped(id=1, name="a"))
            s.commit()
        with rw.Session() as s:
            s.get(RwStamped, 1).name = "b"
            s.commit()
        rw.same("SELECT id, name, updated_at IS NOT NULL FROM rw_stamped", [(1, "b", True)])
        stamps = rw.copies("SELECT updated_at FROM rw_stamped")
        assert len({tuple(v) for v in stamps.values()}) > 1, stamps  # (the copies' own times)
    finally:
        for sh in rw.names:
            with rw.cluster.primary(sh).begin() as c:
                c.execute(text("DROP TRIGGER IF EXISTS rw_stamp ON rw_stamped"))
