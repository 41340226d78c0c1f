"""A primary that hangs (its processes stopped: the host still accepts TCP, nothing
answers) makes new writes fail fast with ShardUnavailable once the monitor has not
heard from it for its staleness limit, as reads already avoid such a node; before,
writes waited for it indefinitely."""

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
from waiting import server_pids

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


def test_writes_to_a_hung_primary_fail_fast_and_resume_when_it_answers(shardkit_module_cluster_factory):
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
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        owned: dict[str, list[int]] = {"s0": [], "s1": []}
        for k in range(1, 2000):
            owned[cluster.shard_for(Note, k)].append(k)
        keys = {s: iter(v) for s, v in owned.items()}
        first: dict = {}
        _write(Session, next(keys["s0"]), first)           # a pooled connection to s0 exists
        assert first == {"ok": True}
        stale_after = cluster.monitor().stale_after
        pids = server_pids(dev.shards[0].primary)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(stale_after + 0.5)
            out: dict = {}
            t = threading.Thread(target=_write, args=(Session, next(keys["s0"]), out), daemon=True)
            t0 = time.monotonic()
            t.start()
            t.join(timeout=5)
            assert not t.is_alive(), "a write to the hung primary is still waiting"
            assert isinstance(out.get("error"), shardkit.ShardUnavailable), out
            assert time.monotonic() - t0 < 2
            assert out["error"].shard == "s0" and "has not answered" in str(out["error"])
            other: dict = {}
            _write(Session, next(keys["s1"]), other)       # the other shard is not concerned
            assert other == {"ok": True}
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while True:
            again: dict = {}
            _write(Session, next(keys["s0"]), again)
            if again.get("ok") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again == {"ok": True}, again
    finally:
        cluster.dispose()
