"""The ownership guard's locks: a transaction writing rows of many buckets must not
fill PostgreSQL's shared lock table (max_locks_per_transaction x max_connections
entries in all, 6,400 with the defaults), which every other session also needs."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import pytest

from shardkit._guard import GUARD_LOCK_CLASS, GUARD_LOCK_STRIPES
from movers import guarded_cluster

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Ledger(Base):
    __tablename__ = "gl_ledger"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(Integer, default=0)


def test_a_write_of_every_bucket_holds_one_guard_lock_per_stripe(shardkit_module_cluster_factory, tmp_path):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=1024)
    cluster = guarded_cluster(dev, Base.metadata,
                              {"groups": {"ledger": {"strategy": "hash", "tables": {"gl_ledger": "id"}}}},
                              tmp_path / "shardkit.toml", follow_map=False)
    try:
        keys = [k for k in range(20_000) if cluster.shard_for("gl_ledger", k) == "s0"]
        buckets = {cluster.bucket_for("gl_ledger", k) for k in keys}
        assert len(buckets) == 512  # every bucket s0 owns
        with cluster.primary("s0").begin() as conn:
            conn.execute(insert(Ledger), [{"id": k, "amount": 1} for k in keys])
            conn.execute(text("UPDATE gl_ledger SET amount = amount + 1"))
            held = conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
                "AND pid = pg_backend_pid()"), {"c": GUARD_LOCK_CLASS}).scalar_one()
        # One per bucket written was 512 here (1,024 a shard can own, up to 1,048,576
        # buckets a cluster can have): a handful of such transactions at once made
        # every session of the server fail with "out of shared memory".
        assert held <= GUARD_LOCK_STRIPES, held
        with cluster.primary("s0").connect() as conn:
            assert conn.execute(text("SELECT sum(amount) FROM gl_ledger")).scalar_one() == 2 * len(keys)
    finally:
        cluster.dispose()
