"""What an operator sees in the logs (Python logging at INFO or DEBUG, shipped to a log
system) while replicas go down, start down, lag and come back.

One 1-shard x 1-replica cluster of its own serves the module; each test that stops or
delays the replica restores it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, select
from sqlalchemy.orm import sessionmaker

import shardkit
from waiting import health_by_node, wait_for

pytestmark = pytest.mark.integration

md = MetaData()
items = Table("lgr_items", md, Column("id", BigInteger, primary_key=True), Column("v", String(20)))
GROUPS = {"g": {"tables": {"lgr_items": "id"}}}
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=1, replicas=1)


def _cluster(dev: Any, **replicas: Any) -> shardkit.Cluster:
    cfg = {**dev.config_dict(), "groups": GROUPS,
           "replicas": {"poll_interval": 0.1, "ban_seconds": 1.0, **replicas}}
    return shardkit.Cluster.from_config(cfg, metadata=md)


def _polls(cluster: shardkit.Cluster, node: str, n: int) -> None:
    """Wait until the monitor has polled ``node`` ``n`` more times."""
    mon = cluster.monitor(wait=False)
    state = mon.shards[node.split("/")[0]]
    target = next(x for x in (state.primary, *state.replicas) if x.name == node)
    for _ in range(n):
        before = target.checked_at
        wait_for(lambda: target.checked_at != before, 10, f"a poll of {node}")


def _records(caplog: Any, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def _documented_loggers() -> set[str]:
    text = README.read_text()
    named = set(re.findall(r"`(shardkit(?:\.[a-z_]+)+)`", text))
    # The parent of them all (where `shardkit migrate` listens for a shard's warnings).
    if "shardkit logs through Python's `logging`, under `shardkit`" in text:
        named.add("shardkit")
    return named


def test_a_replica_down_when_the_process_starts_is_logged(dev, caplog):
    """A replica (or primary) that is down when the process starts gets no reads from the
    start: the operator must see it in the log once, as for one that goes down later, and
    its coming up (a recovery, not a problem: INFO) once."""
    caplog.set_level(logging.INFO, logger="shardkit")
    r0 = dev.shard("s0").replicas[0]
    r0.stop()
    cluster = _cluster(dev)
    try:
        cluster.start_monitor()
        _polls(cluster, "s0/r0", 5)
        down = _records(caplog, "s0/r0 is down")
        assert len(down) == 1, [r.getMessage() for r in caplog.records]
        assert down[0].levelno == logging.WARNING and down[0].name == "shardkit.replicas"
        r0.start()
        wait_for(lambda: health_by_node(cluster)["s0/r0"]["up"], 15, "s0/r0 up")
        _polls(cluster, "s0/r0", 3)
        up = _records(caplog, "s0/r0 is up")
        assert len(up) == 1 and up[0].levelno == logging.INFO, [(r.levelname, r.getMessage()) for r in up]
    finally:
        r0.start()
        cluster.dispose()


def test_a_replica_dropped_for_lag_and_readmitted_is_logged_once_each(dev, caplog):
    """A replica past max_lag_seconds gets no reads: that, and its readmission, are events
    an operator must see, logged once each (not once per poll or per read)."""
    caplog.set_level(logging.INFO, logger="shardkit")
    r0 = dev.shard("s0").replicas[0]
    primary = dev.shard("s0").primary
    cluster = _cluster(dev, max_lag_seconds=1.0)
    try:
        cluster.start_monitor()
        r0.set_apply_delay(30)

        def lagging() -> bool:
            with primary.connect() as c:
                c.execute("SELECT txid_current()")
            lag = health_by_node(cluster)["s0/r0"]["lag_seconds"]
            return lag is not None and lag > 1.5

        wait_for(lagging, 20, "s0/r0 to lag past 1.5 s")
        _polls(cluster, "s0/r0", 5)
        over = _records(caplog, "s0/r0 is ")
        over = [r for r in over if "lag" in r.getMessage()]
        assert len(over) == 1 and over[0].levelno == logging.WARNING, \
            [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
        assert "max_lag_seconds" in over[0].getMessage()
        r0.set_apply_delay(0)
        with primary.connect() as c:
            c.execute("SELECT txid_current()")
        r0.wait_caught_up()
        wait_for(lambda: health_by_node(cluster)["s0/r0"]["lag_seconds"] == 0, 15, "s0/r0 caught up")
        _polls(cluster, "s0/r0", 3)
        back = _records(caplog, "s0/r0 is within the lag limits again")
        assert len(back) == 1 and back[0].levelno == logging.INFO
        assert len([r for r in _records(caplog, "s0/r0 is ") if "lag" in r.getMessage()]) == 2
    finally:
        r0.set_apply_delay(0)
        cluster.dispose()


def test_a_replica_outage_under_reads_logs_a_few_records_under_documented_loggers(dev, caplog):
    """With shardkit's loggers at DEBUG, reads at a steady rate while the replica is down and
    after it is back: a handful of records in all (not some per statement), each from a
    logger the README documents, none with a traceback.  SQLAlchemy's own pool records
    stay under "sqlalchemy.pool", where SQLAlchemy documents them."""
    caplog.set_level(logging.DEBUG, logger="shardkit")
    r0 = dev.shard("s0").replicas[0]
    cluster = _cluster(dev)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    try:
        md.drop_all(cluster.primary("s0"))
        md.create_all(cluster.primary("s0"))
        with Session() as s:
            s.execute(items.insert().values(id=7, v="x"))
            s.commit()
        r0.wait_caught_up()

        def reads(n: int) -> None:
            for _ in range(n):
                with Session(consistency="eventual") as s:
                    assert s.execute(select(items.c.v).where(items.c.id == 7)).scalar() == "x"

        reads(5)
        caplog.clear()
        r0.stop()
        reads(40)
        wait_for(lambda: not health_by_node(cluster)["s0/r0"]["up"], 10, "s0/r0 down")
        reads(40)
        r0.start()
        wait_for(lambda: health_by_node(cluster)["s0/r0"]["up"], 15, "s0/r0 up")
        r0.wait_caught_up()
        wait_for(lambda: health_by_node(cluster)["s0/r0"]["lag_bytes"] == 0, 10, "s0/r0 caught up")
        reads(40)
        mine = [r for r in caplog.records if not r.name.startswith(("shardkit.devcluster", "shardkit.testing"))]
        texts = [(r.name, r.levelname, r.getMessage()[:100]) for r in mine]
        assert {r.name for r in mine} <= _documented_loggers(), texts
        assert len(mine) <= 10, texts
        assert not [r for r in mine if r.exc_info], texts
        assert len(_records(caplog, "s0/r0 is down")) == 1, texts
        assert len(_records(caplog, "s0/r0 is up")) == 1, texts
    finally:
        r0.start()
        md.drop_all(cluster.primary("s0"))
        cluster.dispose()


def test_the_readme_documents_every_logger_shardkit_logs_to():
    """An operator routes and filters by logger name: each one shardkit uses is named in
    the README, with what it logs."""
    pkg = Path(shardkit.__file__).resolve().parent
    used = set()
    for f in pkg.rglob("*.py"):
        used |= set(re.findall(r'getLogger\("(shardkit[a-z_.]*)"\)', f.read_text()))
    assert used, "no loggers found"
    assert used <= _documented_loggers(), sorted(used - _documented_loggers())
