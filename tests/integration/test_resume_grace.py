"""A resumed batch keeps the grace periods its stopped mover began: the copy commits no
sooner than --grace after capture began, by the journal's clock, even when the mover was
killed right after it began capturing (a resume used to copy at once)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import BigInteger, Integer, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from movers import guarded_cluster, journal_steps, kill_mover_after
from shardkit import rebalance
from shardkit.verify import verify

pytestmark = pytest.mark.integration

GRACE = 3.0
# The mover times the grace on its monotonic clock; the journal's stamps come from the
# catalog server's wall clock, which the host's time synchronisation may step by a few
# milliseconds meanwhile (a CI run once saw 2.9988 s).  A resume that skips the wait
# copies about 1.6 s after the kill, far outside this slack.
CLOCK_SLACK = 0.05


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "grace_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer)


def _journal_at(cluster, move_id: int, step: str):
    with cluster.catalog.engine.connect() as c:
        return c.execute(text(
            "SELECT at FROM shardkit_catalog.journal WHERE move_id = :m AND step = :s "
            "ORDER BY id DESC LIMIT 1"), {"m": move_id, "s": step}).scalar_one()


def test_a_mover_killed_while_capturing_resumes_after_what_is_left_of_the_grace(
        shardkit_module_cluster_factory, tmp_path):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=16)
    cfg = tmp_path / "shardkit.toml"
    cluster = guarded_cluster(dev, Base.metadata, {"groups": {"g": {"tables": {"grace_items": "id"}}}},
                              cfg, follow_map=False)
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        with Session() as s:
            s.add_all(Item(id=i, v=i) for i in range(200))
            s.commit()
        move_id = kill_mover_after(cluster, cfg, "capturing", "--drain", "s1")
        assert journal_steps(cluster, move_id)[-1] == "capturing"

        r = subprocess.run([sys.executable, "-m", "shardkit.cli", "rebalance", "resume", str(move_id),
                            "--config", str(cfg), "--grace", str(GRACE)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        capturing, copied = _journal_at(cluster, move_id, "capturing"), _journal_at(cluster, move_id, "copied")
        # The killed mover began capturing; the resumed one waited for the rest of the
        # grace before its copy committed (a resume that skipped the wait copies within a
        # second or so of the kill).
        assert (copied - capturing).total_seconds() >= GRACE - CLOCK_SLACK, (capturing, copied)
        assert rebalance.move_status(cluster, move_id)[0]["state"] == "done"
        cluster.refresh_map()
        assert set(cluster.config.bucket_map) == {"s0"}
        assert verify(cluster).ok
    finally:
        cluster.dispose()
