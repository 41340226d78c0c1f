"""A primary that hangs (its processes stopped: the host still accepts TCP, nothing
answers) makes new writes fail fast with ShardUnavailable once the monitor has not
heard from it for hung_after (twice its staleness limit), as reads already avoid such a
node; before, writes waited for it indefinitely.  A write that comes while the poll is
late but not yet that late waits for the answer: a primary that is only slow (or a
process too busy to read the answer) does not refuse writes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import resume, server_pids

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "hung_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(20))


def _write(Session, key: int, out: dict) -> None:
    try:
        with Session() as s:
            s.add(Note(id=key, body="x"))
            s.commit()
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = e


@pytest.fixture
def world(shardkit_module_cluster_factory):
    """(dev cluster, Cluster polling every 0.1 s, sessionmaker): 2 shards, no replicas."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    if not Path("/proc").is_dir():
        pytest.skip("needs a local cluster's processes")
    cfg = {**dev.config_dict(), "groups": {"notes": {"tables": {"hung_notes": "id"}}},
           "replicas": {"poll_interval": 0.1, "poll_timeout": 0.5}}
    cluster = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
    try:
        for s in cluster.shard_names:
            Base.metadata.create_all(cluster.primary(s))
        cluster.start_monitor()
        yield dev, cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    finally:
        cluster.dispose()


def test_writes_to_a_hung_primary_fail_fast_and_resume_when_it_answers(world):
    dev, cluster, Session = world
    owned: dict[str, list[int]] = {"s0": [], "s1": []}
    for k in range(1, 2000):
        owned[cluster.shard_for(Note, k)].append(k)
    keys = {s: iter(v) for s, v in owned.items()}
    first: dict = {}
    _write(Session, next(keys["s0"]), first)           # a pooled connection to s0 exists
    assert first == {"ok": True}
    hung_after = cluster.monitor().hung_after
    pids = server_pids(dev.shards[0].primary)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(hung_after + 0.5)
        out: dict = {}
        t = threading.Thread(target=_write, args=(Session, next(keys["s0"]), out), daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(timeout=5)
        assert not t.is_alive(), "a write to the hung primary is still waiting"
        assert isinstance(out.get("error"), shardkit.ShardUnavailable), out
        assert time.monotonic() - t0 < 2.5  # ms when failing fast; waiting for the poll's answer: hung_after (4 s)
        assert out["error"].shard == "s0" and "has not answered" in str(out["error"])
        other: dict = {}
        _write(Session, next(keys["s1"]), other)       # the other shard is not concerned
        assert other == {"ok": True}
    finally:
        resume(pids)
    deadline = time.monotonic() + 10
    while True:
        again: dict = {}
        _write(Session, next(keys["s0"]), again)
        if again.get("ok") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again == {"ok": True}, again


def test_a_write_while_the_poll_is_late_waits_for_the_answer(world):
    """Past stale_after without an answer, a write is not refused at once: it waits for
    the monitor's next answer (up to hung_after since the last one) and runs once the
    primary answers; one that stays silent is refused at hung_after, not later."""
    dev, cluster, Session = world
    mon = cluster.monitor()
    keys = iter([k for k in range(5000, 7000) if cluster.shard_for(Note, k) == "s0"])
    first: dict = {}
    _write(Session, next(keys), first)
    assert first == {"ok": True}
    pids = server_pids(dev.shards[0].primary)
    p = mon.shards["s0"].primary

    def stop_until_late() -> float:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        while p.heard_from(time.monotonic(), mon.stale_after):
            time.sleep(0.02)
        return p.checked_at

    def primary_health() -> tuple[dict, bool]:
        h = cluster.health()
        return [n for n in h.nodes if n["node"] == "s0/primary"][0], h.ready

    # Late, then it answers: the write waits and lands.
    try:
        stop_until_late()
        # As its writes, health() waits for it: up (ready), with the late poll as the error.
        node, ready = primary_health()
        assert node["up"] and ready, node
        assert "no answer to the health poll" in node["error"] and "writes wait" in node["error"], node
        out: dict = {}
        key = next(keys)
        t = threading.Thread(target=_write, args=(Session, key, out), daemon=True)
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not out, f"the write did not wait for the late poll: {out}"
    finally:
        resume(pids)
    t.join(timeout=10)
    assert out == {"ok": True}, out
    with Session(consistency="strong") as s:
        assert s.get(Note, key) is not None

    # Late, and it stays silent: refused at hung_after since its last answer.
    try:
        last = stop_until_late()
        out = {}
        t = threading.Thread(target=_write, args=(Session, next(keys), out), daemon=True)
        t.start()
        t.join(timeout=mon.hung_after + 5)
        ended = time.monotonic()
        assert not t.is_alive(), "a write to the hung primary is still waiting"
        assert isinstance(out.get("error"), shardkit.ShardUnavailable), out
        assert "has not answered" in str(out["error"])
        assert mon.hung_after <= ended - last < mon.hung_after + 3
        node, ready = primary_health()   # refused now: reported down, not ready
        assert not node["up"] and not ready, node
        assert "no answer to the health poll" in node["error"] and "writes wait" not in node["error"], node
    finally:
        resume(pids)
