"""How a process follows the catalog's map while the catalog
server is stopped and started again.

Against real servers: two shards (a replica each) and a catalog on a server of its
own, which the tests stop (``pg_ctl stop -m fast`` / ``-m immediate``) while
processes route by the map they have:

- an ORM flush whose UPDATE matches no row (the row was deleted meanwhile: an ordinary
  ``StaleDataError``, the object never moved) asked the catalog whether the object
  had moved, and with the catalog down raised ``ShardUnavailable`` naming the catalog
  instead of the ``StaleDataError`` the application handles;
- ``cluster.health()`` (and the status built from it) said nothing of a catalog the
  process had lost: a process routing by a map it could not follow any more looked
  healthy, with no way to tell but its logs;
- a process built with ``follow_map=False`` does not reload its map after a refused
  write, but its ``NotOwned`` said "the map is being reloaded from the catalog": an
  application retrying the transaction itself (not through ``run_transaction``) was
  refused at every attempt, told each time that the map was being reloaded.  The error
  now says that the map stays as it is and what reloads it.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import BigInteger, Integer, create_engine, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps
from shardkit._status import collect, render

pytestmark = pytest.mark.integration

BUCKETS = 64
CATALOG_DB = "shardkit_catalog"
# The dev servers trust 127.0.0.1: this password is never checked, only looked for.
PW = "Cat5b-s3cret-19"
# The follower's back-off grows to 5 s, plus a connection attempt and a busy machine.
PICKUP_BOUND = 15.0


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


GROUPS = {"groups": {"accounts": {"strategy": "hash", "tables": {"accounts": "id"}}}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1, bucket_count=BUCKETS)
    catdev = shardkit_module_cluster_factory(shards=1, replicas=0)
    catnode = catdev.shards[0].primary
    catdev.create_catalog(CATALOG_DB)
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    w = SimpleNamespace(dev=dev, catnode=catnode)
    w.admin = shardkit.Cluster.from_config(_config(w), follow_map=False)
    rebalance.init(w.admin)
    yield w
    w.admin.dispose()


@pytest.fixture
def spawn(world):
    made = []

    def make(**kw):
        c = shardkit.Cluster.from_config(_config(world), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.dispose()


@pytest.fixture
def catalog_down(world):
    """``catalog_down(mode)`` stops the catalog's server; it is started again after the test."""
    def stop(mode: str = "fast") -> None:
        world.catnode.stop(mode)

    yield stop
    world.catnode.start()


def _url(w) -> str:
    return f"postgresql+psycopg://shardkit:{PW}@127.0.0.1:{w.catnode.port}/{CATALOG_DB}"


def _config(w) -> dict:
    return {**w.dev.config_dict(), **GROUPS, "catalog": {"url": _url(w)}}


def _sessions(cluster, **kw):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, **{"consistency": "strong", **kw})


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def _primary_dsn(w, shard: str) -> str:
    return next(s for s in w.dev.shards if s.name == shard).primary.dsn


# -- 1. an ordinary StaleDataError while the catalog is down ----------------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stale_data_error_stays_one_while_the_catalog_is_down(world, spawn, catalog_down, mode):
    """The object never moved: its row was deleted by another process.  On one database
    (and with the catalog up) that is SQLAlchemy's StaleDataError, which applications
    catch for optimistic concurrency; shardkit's check whether the object moved asked the
    catalog and, with the catalog down, replaced it with ShardUnavailable."""
    w = world
    app = spawn()
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    key = 7_000_000 + (0 if mode == "fast" else 1)
    shard = app.shard_for("accounts", key)
    Session = _sessions(app)
    with Session() as s:
        s.add(Account(id=key, balance=1))
        s.commit()
    catalog_down(mode)
    with Session() as s:
        obj = s.get(Account, key)
        with psycopg.connect(_primary_dsn(w, shard), autocommit=True) as c:
            c.execute("DELETE FROM accounts WHERE id = %s", (key,))
        obj.balance = 2
        with pytest.raises(StaleDataError) as ei:
            s.flush()
        s.rollback()
    text = "\n".join([str(ei.value), *getattr(ei.value, "__notes__", [])])
    assert PW not in text
    # The map it routes by still works: a write to a key the map gives s0 or s1 lands.
    with Session() as s:
        s.add(Account(id=key, balance=3))
        s.commit()
    with psycopg.connect(_primary_dsn(w, shard)) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (key,)).fetchone() == (3,)


# -- 2. health() and status of a process that lost its catalog -----------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_health_and_status_say_the_catalog_is_out(world, spawn, catalog_down, mode):
    w = world
    app = spawn()
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    version = app.map_version
    h = app.health()
    assert h.catalog is not None and h.catalog["error"] is None, h.catalog
    assert h.catalog["map_version"] == version and h.catalog["following"] is True
    catalog_down(mode)
    _wait(lambda: app.health().catalog["error"] is not None, 10, "health() to say the catalog is out")
    h = app.health()
    assert h.ready  # the shards are fine: routing goes on by the map it has
    assert h.catalog["following"] is False and h.catalog["map_version"] == version
    assert "catalog" in h.catalog["error"] and str(w.catnode.port) in h.catalog["error"], h.catalog
    data = collect(app)
    shown = render(data)
    assert data["catalog_error"] and "catalog" in shown and "unreachable" in shown, shown
    for out in (repr(h.as_dict()), repr(data), shown):
        assert PW not in out
    w.catnode.start()
    _wait(lambda: app.health().catalog["following"], PICKUP_BOUND, "health() to see the catalog back")
    assert app.health().catalog["error"] is None and collect(app)["catalog_error"] is None


# -- 3. a refused write reloads the map of a process that does not follow it -----------------

def _move(w, key: int, target: str) -> None:
    w.admin.refresh_map()
    live = w.admin.config.bucket_map
    new = list(live)
    new[shardkit.bucket_for(key, BUCKETS)] = target
    rebalance.Mover(w.admin, grace=0.1, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new), f"test: the bucket of {key} to {target}"))
    w.admin.refresh_map()


@pytest.mark.parametrize("write", ["insert", "update"])
def test_refusal_says_what_reloads_the_map_of_a_process_that_does_not_follow_it(world, spawn, write):
    w = world
    w.admin.refresh_map()
    live = w.admin.config.bucket_map
    base = 8_000_000 if write == "insert" else 8_100_000
    key = next(k for k in range(base, base + 1000) if live[shardkit.bucket_for(k, BUCKETS)] == "s0")
    with _sessions(w.admin)() as s:
        s.add(Account(id=key, balance=1))
        s.commit()
    other = next(k for k in range(key + 1, key + 100_000)
                 if shardkit.bucket_for(k, BUCKETS) == shardkit.bucket_for(key, BUCKETS))
    app = spawn(follow_map=False)
    _move(w, key, "s1")
    Session = _sessions(app)

    def attempt() -> None:
        # The application's own retry: a new transaction, as the error says.
        with Session() as s:
            if write == "insert":
                s.add(Account(id=other, balance=2))
            else:
                s.execute(update(Account).where(Account.id == key).values(balance=2))
            s.commit()

    for _ in range(2):  # retried as told, by the map it has: refused again
        with pytest.raises(shardkit.NotOwned) as ei:
            attempt()
        said = str(ei.value)
        assert "retry the transaction" in said and "being reloaded" not in said, said
        assert "follow_map=False" in said and "cluster.refresh_map()" in said, said
    assert app.map_version < w.admin.map_version
    app.refresh_map()  # what the error says
    attempt()  # on the new owner
    done = other if write == "insert" else key
    with psycopg.connect(_primary_dsn(w, "s1")) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (done,)).fetchone() == (2,)
    with psycopg.connect(_primary_dsn(w, "s0")) as c:
        assert c.execute("SELECT count(*) FROM accounts WHERE id = %s", (done,)).fetchone() == (0,)


def test_refusal_of_a_following_process_says_the_map_is_being_reloaded(world, spawn):
    w = world
    w.admin.refresh_map()
    live = w.admin.config.bucket_map
    key = next(k for k in range(8_200_000, 8_201_000) if live[shardkit.bucket_for(k, BUCKETS)] == "s0")
    app = spawn()
    _wait(app._follower.connected.is_set, 10, "the follower's first connection")
    app._follower.stop()  # (it would pick the move up before the write)
    _move(w, key, "s1")
    with _sessions(app)() as s:
        s.add(Account(id=key, balance=1))
        with pytest.raises(shardkit.NotOwned) as ei:
            s.commit()
    assert "the map is being reloaded from the catalog" in str(ei.value), str(ei.value)
