"""Range and list groups across their life: keys of another type
than a list group's values, and a writer two map versions behind a range split.

One module-scoped dev cluster (3 shards, no replicas); each test makes its own world:
fresh databases of one name on every shard plus its own catalog.  Each docstring says
what must hold and what went wrong before.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, Date, MetaData, Numeric, Table, insert, select
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_split_range
from shardkit.verify import verify

from rebalance_world import CatalogWorld, databases_with_catalog

pytestmark = pytest.mark.integration

md = MetaData()
DAYS = Table("rl8_days", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
             Column("day", Date))
AMOUNTS = Table("rl8_amounts", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
                Column("amount", Numeric(10, 2)))
EVENTS = Table("rl8_events", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
               Column("k", BigInteger))

SCHEMA = """
CREATE TABLE rl8_days (id bigint PRIMARY KEY, day date);
CREATE TABLE rl8_amounts (id bigint PRIMARY KEY, amount numeric(10, 2));
CREATE TABLE rl8_events (id bigint PRIMARY KEY, k bigint);
"""

# TOML, not a dict: the date values are TOML dates (to_toml writes no dates).
GROUPS = """
[groups.days]
strategy = "list"
tables = { rl8_days = "day" }
values = { s0 = [2024-01-02] }
default = "s2"

[groups.amounts]
strategy = "list"
tables = { rl8_amounts = "amount" }
values = { s0 = [1], s1 = [2] }
default = "s2"

[groups.events]
strategy = "range"
tables = { rl8_events = "k" }
ranges = [ { to = 1000, shard = "s0" }, { from = 1000, shard = "s1" } ]
"""

_numbers = itertools.count()


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=16)


@pytest.fixture
def world(dev, tmp_path):
    db = f"rl8w{next(_numbers)}"
    path = databases_with_catalog(dev, db, SCHEMA, GROUPS, tmp_path / f"{db}.toml")
    w = CatalogWorld(dev, db, path, md)
    rebalance.init(w.cluster(follow_map=False))
    yield w
    w.close()


def _session(cluster: shardkit.Cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


# -- a list key of another type than the values -------------------------------------------------


@pytest.mark.parametrize("table, key, stored, owner", [
    # A date column parses '2024-01-02' as the date the group lists on s0.
    (DAYS, "2024-01-02", dt.date(2024, 1, 2), "s0"),
    # A numeric column parses '1' (and '1.001', rounded to 1.00) as the value listed on s0.
    (AMOUNTS, "1", Decimal("1.00"), "s0"),
    (AMOUNTS, "1.001", Decimal("1.00"), "s0"),
])
def test_a_string_key_of_a_list_group_of_numbers_or_dates_is_refused_not_defaulted(
        world, table, key, stored, owner):
    """A list group's key given as a string, on a column of numbers or dates: the column
    parses it as its own type, a value the group may list for another shard.  The router
    looked the string up among the values, found nothing and sent the row to the default:
    the date group (not guarded: its values are no integers or strings) stored the row on
    s2, where no read by the date looks (verify: misplaced), and the numeric group's guard
    refused it with a NotOwned saying the map had changed, which a retry cannot cure.  The
    key is refused (ShardKeyError, saying to give it as the column holds it), for writes
    and reads alike, while the column's own type still routes to its owner."""
    cluster = world.cluster(follow_map=False)
    Session = _session(cluster)
    column = table.c[list(table.c.keys())[1]]
    with pytest.raises(shardkit.ShardKeyError, match="give the key as the column holds it"):
        cluster.shard_for(table, key)
    with Session() as s:
        with pytest.raises(shardkit.ShardKeyError, match="give the key as the column holds it"):
            s.execute(insert(table).values(id=1, **{column.name: key}))
    with Session() as s:
        with pytest.raises(shardkit.ShardKeyError):
            s.execute(select(table).where(column == key))
    assert all(rows == [] for rows in world.rows(table.name).values())
    # The value as the column holds it goes to its owner, found by a read.
    assert cluster.shard_for(table, stored) == owner
    with Session() as s:
        s.execute(insert(table).values(id=2, **{column.name: stored}))
        s.commit()
    with Session() as s:
        assert s.execute(select(table.c.id).where(column == stored)).scalars().all() == [2]
    assert world.rows(table.name)[owner] == [(2, stored)]
    report = verify(cluster)
    assert report.ok, report.render()


# -- a writer two map versions behind a split ---------------------------------------------------


def test_a_writer_two_versions_behind_a_split_is_retried_on_the_new_owner(world):
    """A process holding the map of before a split (version 1) writes a key of the side
    that moves, at the cut-over: the source has given the new slice up, the catalog has
    published the split (version 2) but not yet the switch (version 3).  The shard's
    refusal names the new slice, which version 1 does not know, so run_transaction waited
    for a map newer than 1, got version 2 (which still gives the slice to the refusing
    shard), ran the function again by it, was refused again and raised NotOwned: an
    acknowledged-or-refused writer lost its write although the move only needed a moment
    more.  It waits (within refresh_timeout) for a map that gives the refused slice to
    another shard, and writes there once."""
    mover_cluster = world.cluster(follow_map=False)
    stale = world.cluster(follow_map=False)   # map version 1, for as long as nothing refreshes it
    assert stale.map_version == 1
    Session = _session(stale)
    outcome: dict[str, Any] = {}
    versions: list[int | None] = []

    def write() -> None:
        def fn(s):
            versions.append(s.cluster.map_version)
            s.execute(insert(EVENTS).values(id=7, k=1600))
        try:
            shardkit.run_transaction(Session, fn, refresh_timeout=20.0)
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome["error"] = e

    mover = rebalance.Mover(mover_cluster, grace=0, progress=lambda line: None)
    publish = mover.catalog.publish_map
    fired = []

    def publish_late(conn, bucket_map, reason, **kw):
        # The switch of the slice: the shards have switched (s1 refuses the slice's writes),
        # the catalog has not published it yet.  The stale writer writes now.
        if "slice(s) of events" in reason and not fired:
            fired.append(True)
            t = threading.Thread(target=write)
            t.start()
            deadline = time.monotonic() + 10
            while len(versions) < 2 and t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)   # the writer is waiting for a newer map, or has failed
            outcome["thread"] = t
        return publish(conn, bucket_map, reason, **kw)

    mover.catalog.publish_map = publish_late
    mover.apply(plan_split_range(mover_cluster.config.slices, "events", 1500, "s2"))
    outcome["thread"].join(30)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome.get("ok")
    assert versions[0] == 1 and versions[-1] == 3, versions
    assert world.rows("rl8_events") == {"s0": [], "s1": [], "s2": [(7, 1600)]}
    report = verify(mover_cluster)
    assert report.ok, report.render()
