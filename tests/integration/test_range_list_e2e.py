"""Range, list, composite and custom strategies end to end, as a demanding user runs them:
keys of the column's own type (a scaled NUMERIC, a uuid), routing checked against where
the rows are on each shard, and `shardkit rebalance apply` of a range split and a list
value with writers running and a process holding the old map."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, Numeric, String, Uuid, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit.verify import verify
from movers import rows_by_key

pytestmark = pytest.mark.integration

SPLIT_UUID = "80000000-0000-0000-0000-000000000000"


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "rl_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer, default=0)
    items = relationship("Item", back_populates="event")


class Item(Base):
    __tablename__ = "rl_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[int] = mapped_column(ForeignKey("rl_events.id"))
    event = relationship("Event", back_populates="items")


class Price(Base):
    """Range-sharded by a NUMERIC(12, 2): PostgreSQL stores a key rounded to cents."""
    __tablename__ = "rl_prices"
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), primary_key=True, autoincrement=False)


class Token(Base):
    """Range-sharded by a uuid, bounds written as PostgreSQL prints uuids."""
    __tablename__ = "rl_tokens"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    v: Mapped[int] = mapped_column(Integer, default=0)


class Store(Base):
    __tablename__ = "rl_stores"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(String(8))
    v: Mapped[int] = mapped_column(Integer, default=0)


class Legacy(Base):
    __tablename__ = "rl_legacy"
    code: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


def pick(key):
    """The custom strategy: even codes on s0, odd ones on s1."""
    return "s0" if key % 2 == 0 else "s1"


CONFIG_GROUPS = """
[groups.events]
strategy = "range"
tables = { rl_events = "id", rl_items = "event_id" }
ranges = [ { to = 1000, shard = "s0" }, { from = 1000, to = 2000, shard = "s1" }, { from = 2000, shard = "s2" } ]

[groups.prices]
strategy = "range"
tables = { rl_prices = "amount" }
ranges = [ { to = 100, shard = "s0" }, { from = 100, shard = "s1" } ]

[groups.tokens]
strategy = "range"
tables = { rl_tokens = "id" }
ranges = [ { to = "%s", shard = "s0" }, { from = "%s", shard = "s1" } ]

[groups.stores]
strategy = "list"
tables = { rl_stores = "region" }
values = { s0 = ["eu", "uk"], s1 = ["us"] }
default = "s2"

[groups.legacy]
strategy = "custom"
tables = { rl_legacy = "code" }
function = "test_range_list_e2e:pick"
""" % (SPLIT_UUID, SPLIT_UUID)


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    catalog = dev.create_catalog()
    lines = [f"bucket_count = {dev.config_dict()['bucket_count']}"]
    for s in dev.config_dict()["shards"]:
        lines += ["[[shards]]", f'name = "{s["name"]}"', f'primary = "{s["primary"]}"']
    lines += ["[catalog]", f'url = "{catalog}"', CONFIG_GROUPS]
    cfg = tmp_path_factory.mktemp("rangelist") / "shardkit.toml"
    cfg.write_text("\n".join(lines))
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    rebalance.init(cluster)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    yield dev, cluster, cfg, Session
    cluster.dispose()


def _where(dev, sql):
    """{shard: sorted rows of ``sql``}, read on each shard's primary directly."""
    out = {}
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn) as c:
            out[shard.name] = sorted(tuple(r) for r in c.execute(sql))
    return out


def _cli(cfg, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1]), str(Path(shardkit.__file__).parents[1])])}
    return subprocess.run([sys.executable, "-m", "shardkit.cli", "rebalance", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300, env=env)


# -- a NUMERIC(p, s) range key: routed by the value PostgreSQL stores -----------------------------


@pytest.mark.parametrize("given,stored", [
    (Decimal("99.995"), Decimal("100.00")),    # rounds up across the split at 100
    (Decimal("99.994"), Decimal("99.99")),
    (Decimal("-0.005"), Decimal("-0.01")),     # half away from zero, as PostgreSQL rounds
    (99.999, Decimal("100.00")),               # a float, rounded by PostgreSQL alike
])
def test_a_scaled_numeric_key_lives_where_its_stored_value_belongs(world, given, stored):
    """PostgreSQL rounds a NUMERIC(12, 2) key to cents as it stores it: 99.995 is stored
    as 100.00, which the range [100, +inf) places on s1.  The router placed the row by the
    value it was given, 99.995 < 100, on s0: with the guard, s0 refused the insert as
    NotOwned (a retry routes it there again); without one the row would sit on s0, where
    no read of 100.00 looks."""
    dev, cluster, cfg, Session = world
    owner = cluster.shard_for(Price, stored)
    with Session() as s:
        s.add(Price(amount=given))
        s.commit()
    assert cluster.shard_for(Price, given) == owner
    try:
        placed = _where(dev, "SELECT amount FROM rl_prices")
        assert {sh for sh, rows in placed.items() if (stored,) in rows} == {owner}
        with Session() as s:
            assert s.get(Price, stored) is not None
            assert s.execute(select(Price).where(Price.amount == stored)).scalar_one().amount == stored
            # A keyed write of the value as given reaches the row where it lives.
            assert s.execute(update(Price).where(Price.amount == stored).values(amount=stored)).rowcount == 1
            s.commit()
        assert verify(cluster).ok
    finally:
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
                c.execute("DELETE FROM rl_prices")


# -- a uuid range key -----------------------------------------------------------------------------


def test_a_uuid_range_group_routes_and_moves(world):
    """The config takes a range group on a uuid column (bounds as strings, TOML has no uuid
    type; README: slices of uuid columns compare by their text form), but every key was
    refused: the router reads a uuid column's key as uuid.UUID and compared it with str
    bounds (ShardKeyError "cannot be compared").  Keys route by their text form, as a list
    group's do and as the ownership guard computes in SQL; a split moves them."""
    dev, cluster, cfg, Session = world
    low = uuid.UUID("7fffffff-ffff-ffff-ffff-ffffffffffff")
    at = uuid.UUID(SPLIT_UUID)
    high = uuid.UUID("c0000000-0000-0000-0000-000000000001")
    keys = [uuid.UUID(int=1), low, at, high] + [uuid.UUID(int=random.Random(i).getrandbits(128)) for i in range(40)]
    assert cluster.shard_for(Token, low) == "s0" and cluster.shard_for(Token, at) == "s1"
    assert cluster.shard_for(Token, str(high)) == "s1"
    with Session() as s:
        s.add_all(Token(id=k) for k in keys)
        s.commit()
    placed = rows_by_key(dev.shards, "SELECT id FROM rl_tokens")
    assert sorted(placed) == sorted(keys)
    for k, where in placed.items():
        assert [w[0] for w in where] == [cluster.shard_for(Token, k)]
        assert where[0][0] == ("s0" if str(k) < SPLIT_UUID else "s1")
    with Session() as s:
        assert s.get(Token, at).id == at
        stmt = select(Token.id).where(Token.id.in_([low, str(at), None]))
        assert cluster.explain(stmt).shards == ("s0", "s1")
        assert sorted(s.execute(stmt).scalars()) == [low, at]
        assert s.execute(update(Token).where(Token.id == str(high)).values(v=7)).rowcount == 1
        s.commit()
    assert verify(cluster).ok
    # Split at a uuid and move the upper side: every row once, on its owner.
    cut = "c0000000-0000-0000-0000-000000000000"
    r = _cli(cfg, "apply", "--split", f"tokens:{cut}", "--to", "s2", "--grace", "0.1")
    assert r.returncode == 0, r.stderr
    cluster.refresh_map()
    assert cluster.shard_for(Token, high) == "s2"
    placed = rows_by_key(dev.shards, "SELECT id FROM rl_tokens")
    for k, where in placed.items():
        assert [w[0] for w in where] == [cluster.shard_for(Token, k)]
    assert placed[high][0][0] == "s2"
    with Session() as s:
        assert s.get(Token, high).v == 7
    assert verify(cluster).ok


# -- routing agrees with where rows are -----------------------------------------------------------


def test_range_list_and_custom_routing_agree_with_the_rows_on_each_shard(world):
    dev, cluster, cfg, Session = world
    ids = [-5, 0, 999, 1000, 1999, 2000, 10**12]
    with Session() as s:
        s.add_all(Event(id=i) for i in ids)
        s.add_all(Item(id=i, event_id=i) for i in ids)
        s.add_all(Store(id=-i, region=r) for i, r in enumerate(["eu", "uk", "us", "br", "xx"], 1))
        s.add_all(Legacy(code=i) for i in range(6))
        s.commit()
    try:
        assert _where(dev, "SELECT id FROM rl_events") == {
            "s0": [(-5,), (0,), (999,)], "s1": [(1000,), (1999,)], "s2": [(2000,), (10**12,)]}
        assert _where(dev, "SELECT region FROM rl_stores WHERE id < 0") == {
            "s0": [("eu",), ("uk",)], "s1": [("us",)], "s2": [("br",), ("xx",)]}
        assert _where(dev, "SELECT code FROM rl_legacy") == {"s0": [(0,), (2,), (4,)], "s1": [(1,), (3,), (5,)], "s2": []}
        cases = [
            (select(Event.id).where(Event.id.in_([0, None, 2000])), ("s0", "s2"), [0, 2000]),
            (select(Event.id).where(Event.id.in_([])), None, []),
            (select(Event.id).where(Event.id.between(999, 1000)), ("s0", "s1"), [999, 1000]),
            (select(Event.id).where(Event.id < 1000), ("s0",), [-5, 0, 999]),
            (select(Event.id).where(Event.id >= 2000), ("s2",), [2000, 10**12]),
            (select(Event.id).where(Event.id > 1999), ("s1", "s2"), [2000, 10**12]),
            (select(Event.id).where(Event.id < Decimal("999.5")), ("s0",), [-5, 0, 999]),
            (select(Store.region).where(Store.region.in_(["eu", "br", None]), Store.id < 0), ("s0", "s2"), ["br", "eu"]),
            (select(Store.region).where(Store.region == "zz"), ("s2",), []),
            (select(Legacy.code).where(Legacy.code.in_([1, 2, 3])), ("s0", "s1"), [1, 2, 3]),
            (select(Legacy.code).where(Legacy.code.between(1, 3)), ("s0", "s1", "s2"), [1, 2, 3]),
        ]
        for stmt, shards, rows in cases:
            route = cluster.explain(stmt)
            if shards is not None:
                assert route.shards == shards, stmt
            with Session() as s:
                assert sorted(s.execute(stmt).scalars()) == rows, stmt
        with Session() as s:
            assert [i.id for i in s.get(Event, 1999).items] == [1999]
        with pytest.raises(shardkit.ShardKeyError, match="pass an int"):
            cluster.explain(select(Event).where(Event.id == "5"))
    finally:
        for shard in dev.shards:
            with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
                c.execute("DELETE FROM rl_items; DELETE FROM rl_events; DELETE FROM rl_stores; DELETE FROM rl_legacy")


# -- rebalancing with writers and a stale process -------------------------------------------------


def test_split_and_value_move_with_writers_and_a_stale_process(world):
    dev, cluster, cfg, Session = world
    with Session() as s:
        s.add_all(Event(id=i) for i in range(900, 2100))
        s.add_all(Store(id=i, region=["eu", "us", "br", "jp"][i % 4]) for i in range(400))
        s.commit()
    stale = shardkit.Cluster.from_config(cfg, metadata=Base.metadata, follow_map=False)
    StaleSession = sessionmaker(class_=shardkit.ShardedSession, cluster=stale, consistency="strong")
    WRITERS = 3
    stop = threading.Event()
    errors: list[BaseException] = []
    values: dict[int, int] = {}
    stores: dict[int, str] = {}

    def writer(me):
        rnd = random.Random(me)
        nid = 10_000 + 100_000 * me
        try:
            while not stop.is_set():
                # Each key has one writer: the ledger's order is then the commit order (two
                # threads updating one key could record their values in the other order).
                k, val = rnd.randrange(1000 + me, 2000, WRITERS), rnd.randrange(10**6)
                shardkit.run_transaction(Session, lambda s: s.execute(
                    update(Event).where(Event.id == k).values(v=val)))
                values[k] = val
                nid += 1
                region = rnd.choice(["br", "eu", "jp"])
                shardkit.run_transaction(Session, lambda s: s.add(Store(id=nid, region=region)))
                stores[nid] = region
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    try:
        for args in (("--split", "events:1500", "--to", "s2"), ("--move-value", "stores:br", "--to", "s0")):
            r = _cli(cfg, "apply", *args, "--grace", "0.2")
            assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    cluster.refresh_map()
    events = rows_by_key(dev.shards, "SELECT id, v FROM rl_events")
    assert sorted(events) == list(range(900, 2100))
    for k, where in events.items():
        assert [w[0] for w in where] == [cluster.shard_for(Event, k)], k
        if k in values:
            assert where[0][1] == values[k]
    found = rows_by_key(dev.shards, "SELECT id, region FROM rl_stores")
    for k, where in found.items():
        assert [w[0] for w in where] == [cluster.shard_for(Store, where[0][1])], k
    assert set(stores) <= set(found)
    assert verify(cluster).ok
    # The process holding the old map: refused, never "done" on the old owner.
    for stmt in (update(Event).where(Event.id.between(1400, 1600)).values(v=-1),
                 update(Event).where(Event.id.in_([1450, 1550])).values(v=-1),
                 update(Event).where(Event.id == 1700).values(v=-1),
                 update(Store).where(Store.region == "br").values(v=-1)):
        with StaleSession() as s:
            with pytest.raises(shardkit.NotOwned):
                s.execute(stmt)
    seen = []

    def fn(s):
        seen.append(s.cluster.shard_for(Event, 1600))
        assert s.execute(update(Event).where(Event.id == 1600).values(v=-7)).rowcount == 1

    shardkit.run_transaction(StaleSession, fn)
    assert seen == ["s1", "s2"]
    assert rows_by_key(dev.shards, "SELECT id, v FROM rl_events WHERE id = 1600") == {1600: [("s2", -7)]}
    stale.dispose()
    # The custom strategy cannot move, and says why.
    r = _cli(cfg, "plan", "--split", "legacy:3", "--to", "s2")
    assert r.returncode == 2 and "custom strategy" in r.stderr and "cannot move" in r.stderr
