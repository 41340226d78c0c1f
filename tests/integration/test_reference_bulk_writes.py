"""Reference-table writes by the ORM's other paths (bulk INSERT/UPDATE statements, the
legacy bulk methods, server-generated values, server-side versions, post_update rows,
merge(), make_transient()) and their interplay with the flush that copies reference
rows as it writes them.  Every shard's copy must end identical (read through each
shard's primary), or the write be refused with nothing written."""

from __future__ import annotations

import pytest
from reference_env import ReferenceEnv
from sqlalchemy import FetchedValue, ForeignKey, Integer, String, event, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient, mapped_column, relationship

import shardkit
from shardkit import RoutingError

pytestmark = pytest.mark.integration


class RbBase(DeclarativeBase):
    pass


class RbPlan(RbBase):
    __tablename__ = "rb_plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    made: Mapped[str] = mapped_column(String(40), server_default=text("'srv'"))
    features: Mapped[list[RbFeature]] = relationship(back_populates="plan", cascade="all, delete-orphan",
                                                     passive_deletes=True)


class RbFeature(RbBase):
    __tablename__ = "rb_features"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    plan_id: Mapped[int] = mapped_column(ForeignKey("rb_plans.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(40))
    plan: Mapped[RbPlan] = relationship(back_populates="features")


class RbStamped(RbBase):
    """eager_defaults, a server default and a trigger-maintained column and version."""
    __tablename__ = "rb_stamped"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    made: Mapped[str] = mapped_column(String(40), server_default=text("'srv'"))
    edits: Mapped[int] = mapped_column(Integer, server_default=text("0"), server_onupdate=FetchedValue())
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"), server_onupdate=FetchedValue())
    __mapper_args__ = {"eager_defaults": True, "version_id_col": version, "version_id_generator": False}


class RbNode(RbBase):
    """Mutually dependent rows (post_update); a trigger counts each row's UPDATEs."""
    __tablename__ = "rb_nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    edits: Mapped[int] = mapped_column(Integer, server_default=text("0"), server_onupdate=FetchedValue())
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("rb_nodes.id", use_alter=True))
    partner: Mapped[RbNode | None] = relationship(remote_side=[id], post_update=True)


class RbPlace(RbBase):
    __tablename__ = "rb_places"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(40))
    edits: Mapped[int] = mapped_column(Integer, server_default=text("0"), server_onupdate=FetchedValue())
    __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "place"}


class RbCity(RbPlace):
    __tablename__ = "rb_cities"
    id: Mapped[int] = mapped_column(ForeignKey("rb_places.id"), primary_key=True)
    mayor: Mapped[str] = mapped_column(String(40))
    __mapper_args__ = {"polymorphic_identity": "city"}


class RbTown(RbPlace):  # single-table
    __mapper_args__ = {"polymorphic_identity": "town"}


class RbTenant(RbBase):
    __tablename__ = "rb_tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("rb_plans.id"))
    feature_id: Mapped[int | None] = mapped_column(ForeignKey("rb_features.id", ondelete="SET NULL"))


REFS = ["rb_plans", "rb_features", "rb_stamped", "rb_nodes", "rb_places", "rb_cities"]
CONFIG = {"reference_tables": REFS,
          "groups": {"tenants": {"strategy": "hash", "tables": {"rb_tenants": "id"}}}}

TRIGGER = """
CREATE OR REPLACE FUNCTION rb_stamped_edit() RETURNS trigger AS $$
BEGIN NEW.edits := OLD.edits + 1; NEW.version := OLD.version + 1; RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER rb_stamped_edit BEFORE UPDATE ON rb_stamped FOR EACH ROW EXECUTE FUNCTION rb_stamped_edit();
CREATE OR REPLACE FUNCTION rb_nodes_edit() RETURNS trigger AS $$
BEGIN NEW.edits := OLD.edits + 1; RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER rb_nodes_edit BEFORE UPDATE ON rb_nodes FOR EACH ROW EXECUTE FUNCTION rb_nodes_edit();
CREATE TRIGGER rb_places_edit BEFORE UPDATE ON rb_places FOR EACH ROW EXECUTE FUNCTION rb_nodes_edit();
"""


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **CONFIG}, metadata=RbBase.metadata)
    for s in cluster.shard_names:
        RbBase.metadata.create_all(cluster.primary(s))
        with cluster.primary(s).begin() as c:
            c.execute(text(TRIGGER))
    try:
        yield ReferenceEnv(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def rb(env):
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE rb_tenants, " + ", ".join(REFS) + " CASCADE"))
            c.execute(text("INSERT INTO rb_plans (id, name) VALUES (1, 'free'), (2, 'pro')"))
            c.execute(text("INSERT INTO rb_features VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 2, 'c')"))
    return env


PLANS = "SELECT id, name, made FROM rb_plans ORDER BY id"
FEATURES = "SELECT id, plan_id, name FROM rb_features ORDER BY id"
STAMPED = "SELECT id, name, made, edits, version FROM rb_stamped ORDER BY id"
NODES = "SELECT id, name, partner_id, edits FROM rb_nodes ORDER BY id"
PLACES = "SELECT id, kind, name, edits FROM rb_places ORDER BY id"
CITIES = "SELECT id, mayor FROM rb_cities ORDER BY id"
TENANTS = "SELECT id, plan_id, feature_id FROM rb_tenants ORDER BY id"


def _tenants_on(env):
    return [next(k for k in range(1, 1000) if env.cluster.shard_for(RbTenant, k) == s) for s in env.names]


def test_bulk_insert_and_update_statements_write_every_copy_once(rb):
    with rb.Session() as s:
        r = s.execute(insert(RbPlan), [{"id": 3, "name": "x"}, {"id": 4, "name": "y", "made": "m"}])
        assert r.rowcount == 2
        r = s.execute(update(RbPlan), [{"id": 1, "name": "free2"}, {"id": 3, "name": "x2"}])
        assert r.rowcount == 2
        s.commit()
    rb.same(PLANS, [(1, "free2", "srv"), (2, "pro", "srv"), (3, "x2", "srv"), (4, "y", "m")])


def test_legacy_bulk_methods_write_every_copy(rb):
    with rb.Session() as s:
        s.bulk_insert_mappings(RbPlan, [{"id": 5, "name": "five"}])
        s.bulk_update_mappings(RbPlan, [{"id": 5, "name": "FIVE"}, {"id": 2, "name": "PRO"}])
        loaded = s.get(RbPlan, 1)
        loaded.name = "FREE"
        s.bulk_save_objects([RbPlan(id=6, name="six"), loaded, RbFeature(id=4, plan_id=6, name="d")])
        s.commit()
    rb.same(PLANS, [(1, "FREE", "srv"), (2, "PRO", "srv"), (5, "FIVE", "srv"), (6, "six", "srv")])
    rb.same(FEATURES, [(1, 1, "a"), (2, 2, "b"), (3, 2, "c"), (4, 6, "d")])


def test_bulk_writes_of_inheriting_reference_classes_are_refused_with_nothing_written(rb):
    with rb.Session() as s:
        s.add(RbCity(id=1, name="Ys", mayor="G"))
        s.add(RbTown(id=2, name="Is"))
        s.commit()
    for call in (
            lambda s: s.execute(insert(RbCity), [{"id": 3, "name": "c", "mayor": "m"}]),
            lambda s: s.execute(insert(RbTown), [{"id": 3, "name": "t"}]),
            lambda s: s.execute(update(RbCity), [{"id": 1, "mayor": "H"}]),
            lambda s: s.execute(update(RbTown), [{"id": 2, "name": "J"}]),
            lambda s: s.bulk_insert_mappings(RbCity, [{"id": 3, "name": "c", "mayor": "m"}]),
            lambda s: s.bulk_update_mappings(RbCity, [{"id": 1, "mayor": "H"}]),
            lambda s: s.bulk_save_objects([RbCity(id=3, name="c", mayor="m")]),
            lambda s: s.bulk_save_objects([RbTown(id=3, name="t")]),
    ):
        with rb.Session() as s:
            with pytest.raises(RoutingError, match="inheritance"):
                call(s)
            s.commit()
    rb.same(PLACES, [(1, "city", "Ys", 0), (2, "town", "Is", 0)])
    rb.same(CITIES, [(1, "G")])


def test_joined_subclass_change_copies_only_the_tables_the_flush_wrote(rb):
    """A change of a joined subclass's own column updates its table alone; the copies
    were given every table of the class, and the base table's UPDATE trigger fired on
    the copies alone (refused as a different copy)."""
    with rb.Session() as s:
        s.add(RbCity(id=1, name="Ys", mayor="G"))
        s.commit()
    with rb.Session() as s:
        s.get(RbCity, 1).mayor = "H"
        s.commit()
    rb.same(PLACES, [(1, "city", "Ys", 0)])
    rb.same(CITIES, [(1, "H")])
    with rb.Session() as s:
        city = s.get(RbCity, 1)
        city.name, city.mayor = "Is", "K"
        s.commit()
    rb.same(PLACES, [(1, "city", "Is", 1)])
    rb.same(CITIES, [(1, "K")])


def test_server_generated_values_and_server_side_version(rb):
    with rb.Session() as s:
        obj = RbStamped(id=1, name="a")
        s.add(obj)
        s.flush()
        assert (obj.made, obj.edits, obj.version) == ("srv", 0, 1)
        obj.name = "b"
        s.flush()
        assert (obj.edits, obj.version) == (1, 2)
        s.commit()
    rb.same(STAMPED, [(1, "b", "srv", 1, 2)])
    with rb.Session() as s:
        s.execute(update(RbStamped), [{"id": 1, "name": "c", "version": 2}])
        s.bulk_update_mappings(RbStamped, [{"id": 1, "name": "d", "version": 3}])
        s.commit()
    rb.same(STAMPED, [(1, "d", "srv", 3, 4)])
    with rb.Session() as s:
        for shard in rb.names:
            obj = s.scalars(select(RbStamped).execution_options(shardkit_shard=shard)).one()
        obj.name = "e"
        s.commit()
    rb.same(STAMPED, [(1, "e", "srv", 4, 5)])


def test_post_update_rows_reach_every_copy(rb):
    with rb.Session() as s:
        a, b = RbNode(id=1, name="a"), RbNode(id=2, name="b")
        a.partner, b.partner = b, a
        s.add_all([a, b])
        s.commit()
    rb.same(NODES, [(1, "a", 2, 1), (2, "b", 1, 1)])
    with rb.Session() as s:
        a, b = s.get(RbNode, 1), s.get(RbNode, 2)
        c = RbNode(id=3, name="c", partner=a)
        a.partner = c
        s.add(c)
        b.partner = None
        s.flush()
        s.delete(b)
        s.commit()
    rb.same(NODES, [(1, "a", 3, 2), (3, "c", 1, 1)])


def test_one_flush_inserting_updating_and_deleting_related_reference_and_sharded_rows(rb):
    t1, t2, t3 = _tenants_on(rb)
    with rb.Session() as s:
        s.add_all([RbTenant(id=t1, plan_id=1, feature_id=3), RbTenant(id=t2, plan_id=1, feature_id=1)])
        s.commit()
    with rb.Session() as s:
        pro = s.get(RbPlan, 2)
        gold = RbPlan(id=7, name="gold")
        s.add(gold)
        moved = s.get(RbFeature, 2)
        moved.plan = gold
        gold.features.append(RbFeature(id=8, name="g"))
        s.delete(pro)  # feature 3 deleted by the database (passive_deletes)
        s.get(RbPlan, 1).name = "free2"
        s.add(RbTenant(id=t3, plan_id=7, feature_id=8))
        s.get(RbTenant, t2).plan_id = 7
        s.commit()
    rb.same(PLANS, [(1, "free2", "srv"), (7, "gold", "srv")])
    rb.same(FEATURES, [(1, 1, "a"), (2, 7, "b"), (8, 7, "g")])
    with rb.Session() as s:
        assert sorted(s.execute(select(RbTenant.id, RbTenant.plan_id, RbTenant.feature_id))) == \
            sorted([(t1, 1, None), (t2, 7, 1), (t3, 7, 8)])


def test_merge_of_an_existing_row_and_make_transient_re_add(rb):
    with rb.Session() as s:
        merged = s.merge(RbPlan(id=2, name="pro2", made="srv"))
        assert merged.name == "pro2"
        s.commit()
    rb.same(PLANS, [(1, "free", "srv"), (2, "pro2", "srv")])
    with rb.Session() as s:
        plan = s.get(RbPlan, 1)
        s.delete(plan)
        s.flush()
        make_transient(plan)
        plan.name = "again"
        s.add(plan)
        s.commit()
    rb.same(PLANS, [(1, "again", "srv"), (2, "pro2", "srv")])
    with rb.Session() as s:
        plan = s.get(RbPlan, 2)
        s.expunge(plan)
        make_transient(plan)
        plan.id = 9
        s.add(plan)
        s.commit()
    rb.same(PLANS, [(1, "again", "srv"), (2, "pro2", "srv"), (9, "pro2", "srv")])


def test_statements_per_shard_for_a_flush_of_100_new_reference_rows(rb):
    counts = {n: 0 for n in rb.names}
    listeners = []
    for n in rb.names:
        engine = rb.cluster.primary(n)

        def count(conn, cursor, statement, parameters, context, executemany, n=n):
            counts[n] += 1
        event.listen(engine, "before_cursor_execute", count)
        listeners.append((engine, count))
    try:
        with rb.Session() as s:
            s.add_all([RbPlan(id=100 + i, name=f"p{i}", made="m") for i in range(100)])
            s.flush()
            flushed = dict(counts)
            s.commit()
    finally:
        for engine, fn in listeners:
            event.remove(engine, "before_cursor_execute", fn)
    # The first shard: the INSERT (one batch) and a SELECT of each row to copy; each other
    # shard: one upsert per row.
    home, *others = rb.names
    assert flushed[home] <= 102 and all(flushed[n] == 100 for n in others), flushed
    rb.same("SELECT count(*) FROM rb_plans", [(102,)])


def test_mutually_dependent_rows_deleted_in_one_flush(rb):
    """The flush sets each row's reference to NULL (a post_update UPDATE, which no mapper
    event tells of) before it deletes the rows: the copies were deleted at once, while
    the other copy still referenced them (the NULLs were copied at the end of the flush):
    a foreign-key error on the second shard."""
    with rb.Session() as s:
        a, b = RbNode(id=1, name="a"), RbNode(id=2, name="b")
        a.partner, b.partner = b, a
        s.add_all([a, b, RbNode(id=3, name="c")])
        s.commit()
    with rb.Session() as s:
        a, b = s.get(RbNode, 1), s.get(RbNode, 2)
        s.delete(a)
        s.delete(b)
        s.commit()
    rb.same(NODES, [(3, "c", None, 0)])


def test_a_new_row_with_a_post_update_relationship_is_not_copied_twice(rb):
    """A new row of a class with a post_update relationship that the flush did not
    post-update was upserted again at the end of the flush: the copy's UPDATE trigger
    fired there alone (the copy refused as different)."""
    with rb.Session() as s:
        s.add(RbNode(id=1, name="a"))
        s.commit()
    rb.same(NODES, [(1, "a", None, 0)])
    with rb.Session() as s:
        a = s.get(RbNode, 1)
        s.add(RbNode(id=2, name="b", partner=a))
        s.commit()
    rb.same(NODES, [(1, "a", None, 0), (2, "b", 1, 1)])
