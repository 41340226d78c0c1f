"""Primaries in autocommit (``engine_options={"isolation_level": "AUTOCOMMIT"}``) beyond
read-your-writes: each statement commits as it runs, so nothing before a failure can be
undone.  run_transaction must not run ``fn`` again once a statement of it committed (it
would apply it twice), and the reference-table copy error must not promise a roll back.
Data is checked on the shards directly."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import BigInteger, String, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from movers import guarded_cluster

pytestmark = pytest.mark.integration

BUCKETS = 64


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "acx_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")


class Event(Base):
    __tablename__ = "acx_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)  # a serial
    acct_id: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(40), default="")


class Country(Base):
    __tablename__ = "acx_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


GROUPS = {"groups": {"accts": {"tables": {"acx_accounts": "id", "acx_events": "acct_id"}}},
          "reference_tables": ["acx_countries"]}
KEYS = range(400)


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1, bucket_count=BUCKETS)
    cfg_path = tmp_path_factory.mktemp("autocommit_paths") / "shardkit.toml"
    cluster = guarded_cluster(dev, Base.metadata, GROUPS, cfg_path)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        s.add_all(Acct(id=k, name="a") for k in KEYS)
        s.commit()
    w = SimpleNamespace(dev=dev, cluster=cluster, cfg_path=cfg_path, used=set(), extra=[])
    yield w
    for c in w.extra:
        c.dispose()
    cluster.dispose()


def _autocommit_cluster(w, **kw):
    c = shardkit.Cluster.from_config(w.cfg_path, engine_options={"isolation_level": "AUTOCOMMIT"}, **kw)
    w.extra.append(c)
    return c


def _sessions(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def _q(w, shard: int, sql: str, args=()):
    with psycopg.connect(w.dev.shards[shard].primary.dsn) as c:
        return c.execute(sql, args).fetchall()


def _stale_then_move(w):
    """A process in autocommit that loaded the map and never follows it, then a bucket of
    s0 moved to s1: (stale cluster, keys of the moved bucket (the last two without rows),
    a key s0 still owns)."""
    stale = _autocommit_cluster(w, follow_map=False)
    w.cluster.refresh_map()
    live = w.cluster.config.bucket_map
    bucket = next(b for b in range(BUCKETS) if live[b] == "s0" and b not in w.used
                  and sum(shardkit.bucket_for(k, BUCKETS) == b for k in KEYS) >= 2)
    w.used.add(bucket)
    stale.shard_for(Acct, 0)   # the stale process has its map now
    new = list(live)
    new[bucket] = "s1"
    rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new), "test: autocommit"))
    w.cluster.refresh_map()
    moved = [k for k in KEYS if shardkit.bucket_for(k, BUCKETS) == bucket]
    # and keys of that bucket no row has yet
    moved += [k for k in range(1000, 100_000) if shardkit.bucket_for(k, BUCKETS) == bucket][:2]
    kept = next(k for k in KEYS if w.cluster.shard_for(Acct, k) == "s0")
    return stale, moved, kept


def test_run_transaction_does_not_repeat_a_write_autocommit_committed_before_the_refusal(world):
    w = world
    stale, moved, kept = _stale_then_move(w)
    calls = []

    def fn(s):
        calls.append(1)
        s.add(Event(acct_id=kept, note="once"))
        s.flush()                                  # committed on s0 as it ran
        s.add(Acct(id=moved[-1], name="new"))
        s.flush()                                  # refused: s0 gave the bucket away
        return "done"

    with pytest.raises(shardkit.NotOwned) as ei:
        shardkit.run_transaction(_sessions(stale), fn)
    assert len(calls) == 1
    assert _q(w, 0, "SELECT note FROM acx_events WHERE acct_id = %s", (kept,)) == [("once",)]
    assert "autocommit" in "\n".join(getattr(ei.value, "__notes__", []))


def test_run_transaction_does_not_repeat_an_update_that_changed_rows_before_the_refusal(world):
    w = world
    stale, moved, kept = _stale_then_move(w)

    def fn(s):
        # Both keys are s0's by the stale map: the kept row is updated (and committed),
        # the moved one is no longer there, which the ownership check then refuses.
        s.execute(update(Acct).where(Acct.id.in_([kept, moved[0]])).values(name=Acct.name + "+"))

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(_sessions(stale), fn)
    assert _q(w, 0, "SELECT name FROM acx_accounts WHERE id = %s", (kept,)) == [("a+",)]
    assert _q(w, 1, "SELECT name FROM acx_accounts WHERE id = %s", (moved[0],)) == [("a",)]


def test_run_transaction_retries_a_refused_first_write_in_autocommit_on_the_new_owner(world):
    w = world
    stale, moved, kept = _stale_then_move(w)
    calls = []

    def fn(s):
        calls.append(1)
        s.get(Acct, kept)                          # a read first: it commits nothing
        s.execute(update(Acct).where(Acct.id == moved[1]).values(name="moved+"))
        s.add(Event(acct_id=moved[1], note="after"))
        return "done"

    assert shardkit.run_transaction(_sessions(stale), fn) == "done"
    assert len(calls) == 2
    assert _q(w, 1, "SELECT name FROM acx_accounts WHERE id = %s", (moved[1],)) == [("moved+",)]
    assert _q(w, 1, "SELECT note FROM acx_events WHERE acct_id = %s", (moved[1],)) == [("after",)]
    assert _q(w, 0, "SELECT count(*) FROM acx_events WHERE acct_id = %s", (moved[1],)) == [(0,)]


def test_a_connection_the_application_put_in_autocommit_is_not_retried_after_writing(world):
    w = world
    stale_plain = shardkit.Cluster.from_config(w.cfg_path, follow_map=False)
    w.extra.append(stale_plain)
    stale_plain.shard_for(Acct, 0)
    _, moved, kept = _stale_then_move(w)           # moves a bucket stale_plain does not know of
    calls = []

    def fn(s):
        calls.append(1)
        s.connection(bind_arguments={"shard_id": "s0"},
                     execution_options={"isolation_level": "AUTOCOMMIT"})
        s.add(Event(acct_id=kept, note="conn-once"))
        s.flush()
        s.add(Acct(id=moved[-2], name="new"))
        s.flush()

    with pytest.raises(shardkit.NotOwned):
        shardkit.run_transaction(_sessions(stale_plain), fn)
    assert len(calls) == 1
    assert _q(w, 0, "SELECT note FROM acx_events WHERE note = 'conn-once'") == [("conn-once",)]


def test_a_reference_copy_that_fails_in_autocommit_says_the_other_copies_are_committed(world):
    w = world
    Session = _sessions(_autocommit_cluster(w))
    with psycopg.connect(w.dev.shards[1].primary.dsn, autocommit=True) as c:
        c.execute("ALTER TABLE acx_countries ADD CONSTRAINT acx_no_x CHECK (name <> 'X')")
    try:
        with Session() as s:
            s.add(Country(code="xx", name="X"))       # the ORM: written on s0, copied to s1
            with pytest.raises(Exception) as orm_error:
                s.commit()
        with Session() as s:
            with pytest.raises(Exception) as core_error:
                s.execute(insert(Country).values(code="xy", name="X"))
    finally:
        with psycopg.connect(w.dev.shards[1].primary.dsn, autocommit=True) as c:
            c.execute("ALTER TABLE acx_countries DROP CONSTRAINT acx_no_x")
    for ei, code in ((orm_error, "xx"), (core_error, "xy")):
        notes = "\n".join(getattr(ei.value, "__notes__", []))
        assert _q(w, 0, "SELECT name FROM acx_countries WHERE code = %s", (code,)) == [("X",)]
        assert _q(w, 1, "SELECT name FROM acx_countries WHERE code = %s", (code,)) == []
        assert "fails on every shard" not in notes
        assert "copies written on s0 are committed" in notes


def test_twophase_and_savepoints_are_refused_in_autocommit_before_writing(world):
    w = world
    cluster = _autocommit_cluster(w)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, twophase=True)() as s:
        s.add(Acct(id=300_000, name="tp"))
        with pytest.raises(Exception, match="two-phase transactions in autocommit"):
            s.commit()
    with _sessions(cluster)() as s:
        with pytest.raises(Exception, match="SAVEPOINT can only be used in transaction blocks"):
            with s.begin_nested():
                s.add(Acct(id=300_001, name="sp"))
    for i in (0, 1):
        assert _q(w, i, "SELECT count(*) FROM acx_accounts WHERE id >= 300000") == [(0,)]
    with _sessions(cluster)() as s:
        assert s.execute(select(Acct.name).where(Acct.id == 300_000)).first() is None
