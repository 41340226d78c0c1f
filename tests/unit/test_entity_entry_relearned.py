"""A ``select(Model).where(Model.key == value)`` is routed by the entry its column and
entity objects find (Router._entity_entries).  SQLAlchemy makes an entity's objects
anew once the mappers are configured (the first query configures them): statements
built before and after hold different objects.  The entry learnt from a statement
built before must not leave every later statement on the slower path, which looks the
entry up by the statement's shape (Router._column_equals_value's) each time."""

from __future__ import annotations

from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

import shardkit._routing as routing
from shardkit import Cluster


def _late_model():
    class Base(DeclarativeBase):
        pass

    class Late(Base):
        __tablename__ = "late_things"
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
        name: Mapped[str] = mapped_column(String(20))

    cluster = Cluster.from_config({
        "bucket_count": 64,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://u@{s}.invalid/db"} for s in ("s0", "s1")],
        "groups": {"things": {"tables": {"late_things": "id"}}},
    }, metadata=Base.metadata)
    return Late, cluster


def test_a_select_built_after_the_mappers_are_configured_takes_the_entity_entry(monkeypatch):
    Late, cluster = _late_model()
    router = cluster.router
    shapes = []
    real = routing._column_equals_value
    monkeypatch.setattr(routing, "_column_equals_value", lambda c: (shapes.append(1), real(c))[1])
    # Built before the mappers are configured (routing the first configures them), with
    # keys on both shards: the entry then has each shard's route.
    early = [select(Late).where(Late.id == k) for k in range(20)]
    try:
        for stmt, k in zip(early, range(20)):
            assert router.route(stmt).shards == (cluster.shard_for(Late, k),)
        assert {cluster.shard_for(Late, k) for k in range(20)} == {"s0", "s1"}
        configure_mappers()
        late = [select(Late).where(Late.id == k) for k in range(20, 40)]
        assert late[0]._raw_columns[0] is not early[0]._raw_columns[0], \
            "SQLAlchemy no longer makes the entity's objects anew: this test checks nothing"
        shapes.clear()
        for stmt, k in zip(late, range(20, 40)):
            assert router.route(stmt).shards == (cluster.shard_for(Late, k),)
        # The first statement built after looks its entry up by its shape, once; the
        # others find it by their objects (before: every one of them by its shape).
        assert len(shapes) == 1
    finally:
        Late.registry.dispose()  # its own registry (clear_mappers() would dispose every model's)
