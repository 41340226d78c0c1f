"""The session's short read path against its reference, the general path, on two shards:
states the equivalence test of test_plain_read_path.py (one shard) does not reach.  Each test runs the same reads
with the short path switched on and off (or checks what the general path alone does) and
wants the same outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import _session

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "srr_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Colour(Base):
    __tablename__ = "srr_colours"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


KEYS = range(1, 41)
TABLES = {"groups": {"items": {"tables": {"srr_items": "id"}}}, "reference_tables": ["srr_colours"]}


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **TABLES})
    try:
        for shard in cluster.shard_names:
            Base.metadata.create_all(cluster.primary(shard))
            with cluster.primary(shard).begin() as c:
                c.execute(Colour.__table__.insert(), [{"id": 1, "name": "red"}])
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add_all([Item(id=k, name=f"i{k}") for k in KEYS])
            s.commit()
    finally:
        cluster.dispose()
    for s in dev.shards:
        for r in s.replicas:
            r.wait_caught_up()
    return dev


def _cluster(dev: Any, replicas: dict[str, bool]) -> shardkit.Cluster:
    """A Cluster of ``dev``'s primaries, with each shard's replicas where ``replicas`` says so."""
    cfg = dev.config_dict()
    for s in cfg["shards"]:
        if not replicas.get(s["name"]):
            s["replicas"] = []
    return shardkit.Cluster.from_config({**cfg, **TABLES, "replicas": {"poll_interval": 0.1}})


def _probe_nodes(cluster: shardkit.Cluster) -> list[str]:
    """Record the node of every statement marked PROBE on ``cluster``'s engines."""
    ran: list[str] = []
    for shard in cluster.shard_names:
        engines = [cluster.primary(shard)] + [
            cluster.engine(shard, "replica", i) for i in range(cluster.replica_count(shard))]
        for eng in engines:
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k:
                         ran.append(node) if "PROBE" in st else None)
    return ran


@pytest.fixture
def short_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``short_path(False)`` switches the short path off (every read takes the general path)."""
    real = _session.ShardedSession._plain_read

    def switch(on: bool) -> None:
        monkeypatch.setattr(_session.ShardedSession, "_plain_read",
                            real if on else lambda self, statement, params: _session._GENERAL)
    yield switch


REFERENCE_PROBE = select(Colour.name).where(Colour.id == 1).prefix_with("/* PROBE */")


def test_reference_reads_take_turns_over_the_shards(dev, short_path):
    """A read of reference rows goes to any one shard, the shards taking turns.  The short
    path routed such a read, gave up on it (it is not a keyed read), and the general path
    routed it again: each read took two turns, so with two shards every reference read went
    to the same shard."""
    used: dict[bool, list[str]] = {}
    for on in (False, True):
        short_path(on)
        cluster = _cluster(dev, {})
        try:
            ran = _probe_nodes(cluster)
            Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
            for _ in range(4):
                with Session() as s:
                    assert s.execute(REFERENCE_PROBE).scalar_one() == "red"
            used[on] = ran
        finally:
            cluster.dispose()
    assert sorted(used[False]) == ["s0/primary", "s0/primary", "s1/primary", "s1/primary"], used
    assert used[True] == used[False]


def test_read_of_a_shard_without_replicas_does_not_start_the_monitor(dev, short_path):
    """In a cluster where only some shards have replicas, the general path reads a shard
    without replicas from its primary without asking the health monitor; the short path
    started the monitor (its threads, a connection to every node, and a wait for its first
    poll) to learn that the shard has no replica."""
    for on in (False, True):
        short_path(on)
        cluster = _cluster(dev, {"s0": True})
        try:
            ran = _probe_nodes(cluster)
            key = next(k for k in KEYS if cluster.shard_for("srr_items", k) == "s1")
            with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
                item = s.execute(select(Item).where(Item.id == key).prefix_with("/* PROBE */")).scalar_one()
                assert item.name == f"i{key}"
            assert ran == ["s1/primary"]
            assert cluster._monitor is None, f"short path {'on' if on else 'off'}: the monitor was started"
        finally:
            cluster.dispose()
