"""Read-your-writes tokens as untrusted input that outlives the cluster it was made on.

A consistency token travels in cookies and job payloads: it may come from another
cluster with the same shard names, from before a failover or a restore (a primary whose
WAL positions are lower), or be damaged on the way.  One small cluster serves the module.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, event, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._replicas import format_lsn, parse_lsn, parse_token

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "tkr_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    # wait_for_token: a corrected token asks for the primary's position when it was checked,
    # which the caught-up replica still has to replay (a background record written since
    # the test's own): 0.2 s was not always enough on a loaded machine.
    cluster = shardkit.Cluster.from_config({
        **dev.config_dict(), "groups": {"items": {"tables": {"tkr_items": "id"}}},
        "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "wait_for_token": 1.0}})
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    served: list[tuple[str, str]] = []
    for s in cluster.shard_names:
        for eng in (cluster.primary(s), cluster.engine(s, "replica", 0)):
            event.listen(eng, "after_cursor_execute",
                         lambda c, cur, st, *a, node=eng.info["node"], **k: served.append((node, st)))
    cluster.start_monitor()
    keys = {s: iter([k for k in range(1, 5000) if cluster.shard_for("tkr_items", k) == s])
            for s in cluster.shard_names}
    yield dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served, keys
    cluster.dispose()


def _caught_up(dev: Any, shard: str) -> None:
    with dev.shard(shard).primary.connect() as c:
        c.execute("SELECT txid_current()")
    dev.shard(shard).replicas[0].wait_caught_up()


def _primary_lsn(dev: Any, shard: str) -> int:
    with dev.shard(shard).primary.connect() as c:
        return parse_lsn(c.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def _read(served: list, s: Any, k: int) -> tuple[str, list[str]]:
    n0 = len(served)
    name = s.execute(select(Item.name).where(Item.id == k)).scalar_one()
    return name, [node for node, st in served[n0:] if "tkr_items" in st]


def _seed(env: Any, shard: str, name: str) -> int:
    dev, _, Session, _, keys = env
    k = next(keys[shard])
    with Session() as s:
        s.add(Item(id=k, name=name))
        s.commit()
    _caught_up(dev, shard)
    return k


@pytest.mark.parametrize("foreign", [
    "v1:s0=FFFF/0",                # another cluster's (same shard names), far ahead of this one
    "v1:s0=FFFFFFFF/FFFFFFFF",     # the highest position there is
])
def test_token_past_the_primary_is_corrected_not_passed_on(env, foreign):
    """A token whose position for a shard is past that shard's primary (a token of another
    cluster with the same shard names, or made before a failover or restore to a server
    with lower WAL positions) can never be reached by any replica: every read of that shard
    went to the primary after waiting wait_for_token, for the session's whole life, and its
    consistency_token() handed the same position on (a cookie kept it forever).  The
    position is checked against the primary once and replaced by the primary's own."""
    dev, cluster, Session, served, _ = env
    k = _seed(env, "s0", "seed")
    with Session(consistency_token=foreign) as s:
        name, nodes = _read(served, s, k)
        assert name == "seed" and nodes == ["s0/r0"], nodes
        s.commit()
        name, nodes = _read(served, s, k)
        assert nodes == ["s0/r0"], nodes
        passed_on = s.consistency_token()
    position = parse_token(passed_on)["s0"]
    assert position <= _primary_lsn(dev, "s0"), (passed_on, format_lsn(_primary_lsn(dev, "s0")))
    with Session(consistency_token=passed_on) as s2:
        assert _read(served, s2, k) == ("seed", ["s0/r0"])
    assert all(h["ban_reason"] is None for h in cluster.health().as_dict()["nodes"]), cluster.health()


def test_corrected_token_still_sees_the_write_while_the_replica_lags(env):
    """The correction never loses the user's write: the session's own position and a
    foreign one are merged in a cookie; the replica lags 30 s; the read still sees the
    write (on the primary), the position handed on still covers it, and the lagging
    replica is not banned for being behind a position it could never reach."""
    dev, cluster, Session, served, _ = env
    k = _seed(env, "s0", "old")
    replica = dev.shard("s0").replicas[0]
    replica.set_apply_delay(30)
    try:
        with Session() as s:
            s.execute(update(Item).where(Item.id == k).values(name="new"))
            s.commit()
            mine = s.consistency_token()
        with Session(consistency_token=mine) as s2:
            s2.require_token("v1:s0=FFFF/0,s1=0/1")
            name, nodes = _read(served, s2, k)
            assert (name, nodes) == ("new", ["s0/primary"])
            passed_on = s2.consistency_token()
        assert parse_token(mine)["s0"] <= parse_token(passed_on)["s0"] <= _primary_lsn(dev, "s0"), passed_on
        with Session(consistency_token=passed_on) as s3:
            assert _read(served, s3, k) == ("new", ["s0/primary"])
        health = {h["node"]: h for h in cluster.health().as_dict()["nodes"]}
        assert health["s0/r0"]["ban_reason"] is None, health["s0/r0"]
    finally:
        replica.set_apply_delay(0)
        _caught_up(dev, "s0")
    deadline = time.monotonic() + 10
    while True:  # once replayed, the replica serves the passed-on token again
        with Session(consistency_token=passed_on) as s4:
            got = _read(served, s4, k)
        if got == ("new", ["s0/r0"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got == ("new", ["s0/r0"])


@pytest.mark.parametrize("bad", [
    b"v1:s0=0/1",                  # bytes from a raw header or a queue
    123,
    ["v1:s0=0/1"],
    "v1:s0=0/1, s1=0/2",           # a space after the comma: " s1" is no shard's name
    "v1:s\u0661=0/1",              # a non-ASCII digit
    "v1:" + "s" * 64 + "=0/1",     # longer than a shard name can be
])
def test_tokens_no_configuration_could_have_written_are_refused_clearly(env, bad):
    """What reaches require_token from a cookie or a payload is refused with ShardkitError
    naming the token: bytes or a number raised TypeError / AttributeError from str methods,
    and a part whose shard name no configuration accepts (a space after a comma, a
    non-ASCII character, over 63 characters) was silently ignored as "a shard this cluster
    does not have", dropping that shard's read-your-writes."""
    _, _, Session, _, _ = env
    with pytest.raises(shardkit.ShardkitError, match="token"):
        Session(consistency_token=bad)
    with Session() as s, pytest.raises(shardkit.ShardkitError, match="token"):
        s.require_token(bad)
