"""The session's short path for the most common read (a SELECT with no options, outside
any scope, routed by its key to one shard) chooses the same node as the general path,
in every session state that decides a read's node.

Each case runs twice in fresh sessions set up alike: once as it is, once with the
short path switched off; both must run the probe on the same node.  Where the short
path should serve the read, the test also checks that it did (otherwise the
comparison would only compare the general path with itself).  A second, two-shard
cluster covers what one shard cannot show: reads that take turns over the shards, and
shards with and without replicas in one cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, event, select, text
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import _session
from shardkit._replicas import format_token, replay_target
from shardkit._routing import Route

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "prp_things"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Colour(Base):
    __tablename__ = "prp_colours"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


KEYS = range(1, 41)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=2)
    cfg = {**dev.config_dict(),
           "groups": {"things": {"tables": {"prp_things": "id"}}},
           "reference_tables": ["prp_colours"],
           # least_outstanding: the same replica for the same pool state, so the two runs
           # of a case can be compared (round_robin would alternate between them; ties
           # between idle replicas take turns too: _run starts each run at the same turn).
           "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "ban_seconds": 30.0,
                        "policy": "least_outstanding"}}
    cluster = shardkit.Cluster.from_config(cfg)
    Base.metadata.create_all(cluster.primary("s0"))
    with cluster.primary("s0").begin() as c:
        c.execute(Thing.__table__.insert(), [{"id": k, "name": f"t{k}"} for k in KEYS])
        c.execute(Colour.__table__.insert(), [{"id": 1, "name": "red"}])
    for r in dev.shard("s0").replicas:
        r.wait_caught_up()
    served: list[str] = []
    for i in range(-1, cluster.replica_count("s0")):
        eng = cluster.primary("s0") if i < 0 else cluster.engine("s0", "replica", i)
        event.listen(eng, "after_cursor_execute",
                     lambda c, cur, st, *a, node=eng.info["node"], **k:
                     served.append(node) if "PROBE" in st else None)
    cluster.start_monitor()
    yield cluster, served
    cluster.dispose()


PROBE = select(Thing.name).where(Thing.id == 7).prefix_with("/* PROBE */")


def _run(env: Any, setup: Callable[[Any], Any], probe: Callable[[Any], Any], short: bool,
         monkeypatch: pytest.MonkeyPatch, **session_kw: Any) -> tuple[str, bool]:
    """(the node that ran the probe, whether the short path served it)."""
    cluster, served = env
    took: list[bool] = []
    plain_read = _session.ShardedSession._plain_read

    def spy(self: Any, statement: Any, params: Any) -> Any:
        if not short:
            return _session._GENERAL
        out = plain_read(self, statement, params)
        if "PROBE" in str(statement):
            took.append(out is not _session._GENERAL and not isinstance(out, Route))
        return out

    cluster.selector.monitor.shards["s0"].rr = 0
    with monkeypatch.context() as m:
        m.setattr(_session.ShardedSession, "_plain_read", spy)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session(**session_kw) as s:
            setup(s)
            n0 = len(served)
            assert probe(s) == "t7"
            nodes = served[n0:]
            s.rollback()
    assert len(nodes) == 1, nodes
    return nodes[0], any(took)


def _nothing(s: Any) -> None:
    pass


def _probe(s: Any) -> Any:
    return s.execute(PROBE).scalar_one()


def _write(s: Any) -> None:
    s.get(Thing, 3).name = "changed"
    s.flush()


def _pending(s: Any) -> None:
    s.add(Thing(id=1000, name="new"))


def _modified(s: Any) -> None:
    s.get(Thing, 3).name = "changed, not flushed"


def _read_first(s: Any) -> None:
    s.execute(select(Thing).where(Thing.id == 5)).scalar_one()


def _read_primary_first(s: Any) -> None:
    s.execute(select(Thing).where(Thing.id == 5).execution_options(shardkit_role="primary")).scalar_one()


def _token_ahead(s: Any) -> None:
    # A position past the primary's is read as the primary's own: the two runs agree only
    # if the replicas have replayed it both times, so first let them replay what earlier
    # cases' rolled-back writes left (under load that can take a while).
    _replicas_caught_up(s.cluster)
    s.require_token(format_token({"s0": 2**62}))


def _replicas_caught_up(cluster: Any, timeout: float = 30.0) -> None:
    """Until the monitor has seen every replica of s0 replay the primary's position now."""
    with cluster.primary("s0").connect() as c:
        # (the position a clamped token is given, and what replaying it means)
        target = replay_target(int(c.execute(text("SELECT pg_current_wal_insert_lsn() - '0/0'")).scalar()))
    deadline = time.monotonic() + timeout
    for node in cluster.selector.monitor.shards["s0"].replicas:
        while node.wal_lsn is None or node.wal_lsn < target:
            assert time.monotonic() < deadline, f"{node} did not replay {target}"
            time.sleep(0.02)


def _nested(s: Any) -> None:
    s.begin_nested()


def _ban(*indexes: int) -> Callable[[Any], None]:
    def setup(s: Any) -> None:
        for i in indexes:
            s.cluster.selector.monitor.ban("s0", i, "test", seconds=30)
    return setup


CASES: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any], dict[str, Any], bool]] = {
    # name: (setup, probe, session keywords, whether the short path should serve it)
    "fresh session": (_nothing, _probe, {}, True),
    "eventual": (_nothing, _probe, {"consistency": "eventual"}, True),
    "read earlier in the transaction (pinned replica)": (_read_first, _probe, {}, True),
    "one replica banned": (_ban(0), _probe, {}, True),
    "IN list on one shard": (
        _nothing, lambda s: s.execute(select(Thing.name).where(Thing.id.in_([7]))
                                      .prefix_with("/* PROBE */")).scalar_one(), {}, True),
    "every replica banned": (_ban(0, 1), _probe, {}, False),
    "wrote in the transaction": (_write, _probe, {}, False),
    "pending object to autoflush": (_pending, _probe, {}, False),
    "modified object to autoflush": (_modified, _probe, {}, False),
    "read the primary earlier": (_read_primary_first, _probe, {}, False),
    "token no replica has reached": (_token_ahead, _probe, {}, False),
    "strong consistency": (_nothing, _probe, {"consistency": "strong"}, False),
    "two-phase session": (_nothing, _probe, {"twophase": True}, False),
    "savepoint": (_nested, _probe, {}, False),
    "FOR UPDATE": (_nothing, lambda s: s.execute(PROBE.with_for_update()).scalar_one(), {}, False),
    "scope role primary": (
        _nothing, lambda s: _in_scope(s, role="primary"), {}, False),
    "scope eventual": (
        _nothing, lambda s: _in_scope(s, consistency="eventual"), {}, False),
    "execution option": (
        _nothing, lambda s: s.execute(PROBE, execution_options={"shardkit_role": "replica"}).scalar_one(),
        {}, False),
    "set_shard_id option": (
        _nothing, lambda s: s.execute(PROBE.options(set_shard_id("s0"))).scalar_one(), {}, False),
}


def _in_scope(s: Any, **kw: Any) -> Any:
    with shardkit.scope(**kw):
        return _probe(s)


@pytest.mark.parametrize("case", list(CASES))
def test_short_path_chooses_the_general_paths_node(env, case, monkeypatch):
    setup, probe, kw, expect_short = CASES[case]
    try:
        node, took = _run(env, setup, probe, True, monkeypatch, **kw)
        general, _ = _run(env, setup, probe, False, monkeypatch, **kw)
    finally:
        for r in env[0].selector.monitor.shards["s0"].replicas:
            r.banned_until = 0.0
    assert node == general
    assert took is expect_short


def test_short_path_reads_the_replicas_and_retries_a_dead_one(env, monkeypatch):
    """The short path's reads go to a replica (not silently to the primary), and a replica
    that fails under it is retried elsewhere like the general path's."""
    cluster, served = env
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    state = cluster.selector.monitor.shards["s0"]
    state.rr = 0   # (idle replicas take turns: the next read would go to the other)
    with Session() as s:
        n0 = len(served)
        assert _probe(s) == "t7"
        assert served[n0:] in (["s0/r0"], ["s0/r1"])
        first = int(served[n0][-1])
    failing = cluster.engine("s0", "replica", first)

    def refuse(*a: Any, **k: Any) -> None:
        raise shardkit.ShardUnavailable(f"s0/r{first} went away", shard="s0")

    with monkeypatch.context() as m:
        m.setattr(failing.pool, "connect", refuse)
        try:
            for _ in range(2):   # whichever replica its turn would choose
                with Session() as s:
                    n0 = len(served)
                    assert _probe(s) == "t7"
                    assert served[n0:] == [f"s0/r{1 - first}"]
            assert state.replicas[first].banned_until > time.monotonic()
        finally:
            state.replicas[first].banned_until = 0.0


def test_short_path_without_replicas_reads_the_primary_with_the_shards_identity(env, monkeypatch):
    """In a cluster without replicas the short path reads the owning primary, and the
    objects it loads carry their shard in their identity, as the general path's do."""
    from sqlalchemy import inspect

    cluster, _ = env
    primary = cluster.config.shard("s0").primary.render_as_string(hide_password=False)
    solo = shardkit.Cluster.from_config({
        "bucket_count": cluster.config.bucket_count, "shards": [{"name": "s0", "primary": primary}],
        "groups": {"things": {"tables": {"prp_things": "id"}}}})
    ran: list[str] = []
    event.listen(solo.primary("s0"), "after_cursor_execute",
                 lambda c, cur, st, *a, **k: ran.append(st) if "prp_things" in st else None)
    took: list[bool] = []
    plain_read = _session.ShardedSession._plain_read

    def spy(self: Any, statement: Any, params: Any) -> Any:
        out = plain_read(self, statement, params)
        took.append(out is not _session._GENERAL and not isinstance(out, Route))
        return out

    monkeypatch.setattr(_session.ShardedSession, "_plain_read", spy)
    try:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=solo)() as s:
            obj = s.execute(select(Thing).where(Thing.id == 7)).scalar_one()
            assert obj.name == "t7" and inspect(obj).identity_token == "s0"
            assert s.get(Thing, 7, identity_token="s0") is obj
        assert took == [True] and len(ran) == 1
    finally:
        solo.dispose()


# -- two shards, one replica each ---------------------------------------------------

TABLES = {"groups": {"things": {"tables": {"prp_things": "id"}}}, "reference_tables": ["prp_colours"]}


@pytest.fixture(scope="module")
def two_shards(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **TABLES})
    try:
        for shard in cluster.shard_names:
            Base.metadata.create_all(cluster.primary(shard))
            with cluster.primary(shard).begin() as c:
                c.execute(Colour.__table__.insert(), [{"id": 1, "name": "red"}])
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add_all([Thing(id=k, name=f"t{k}") for k in KEYS])
            s.commit()
    finally:
        cluster.dispose()
    for s in dev.shards:
        for r in s.replicas:
            r.wait_caught_up()
    return dev


def _two_shard_cluster(dev: Any, replicas: dict[str, bool]) -> shardkit.Cluster:
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


def test_reference_reads_take_turns_over_the_shards(two_shards, short_path):
    """A read of reference rows goes to any one shard, the shards taking turns.  The short
    path routed such a read, gave up on it (it is not a keyed read), and the general path
    routed it again: each read took two turns, so with two shards every reference read went
    to the same shard."""
    used: dict[bool, list[str]] = {}
    for on in (False, True):
        short_path(on)
        cluster = _two_shard_cluster(two_shards, {})
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


def test_read_of_a_shard_without_replicas_does_not_start_the_monitor(two_shards, short_path):
    """In a cluster where only some shards have replicas, the general path reads a shard
    without replicas from its primary without asking the health monitor; the short path
    started the monitor (its threads, a connection to every node, and a wait for its first
    poll) to learn that the shard has no replica."""
    for on in (False, True):
        short_path(on)
        cluster = _two_shard_cluster(two_shards, {"s0": True})
        try:
            ran = _probe_nodes(cluster)
            key = next(k for k in KEYS if cluster.shard_for("prp_things", k) == "s1")
            with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
                item = s.execute(select(Thing).where(Thing.id == key).prefix_with("/* PROBE */")).scalar_one()
                assert item.name == f"t{key}"
            assert ran == ["s1/primary"]
            assert cluster._monitor is None, f"short path {'on' if on else 'off'}: the monitor was started"
        finally:
            cluster.dispose()
