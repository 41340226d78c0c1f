"""Review of the day's changes: a two-phase (or plain) commit whose after_commit listener
raises, and INSERT statements inside ``scope(shard=...)`` whose rows cannot all go where
their keys belong, against a 2-shard cluster (no replicas) of this module's own; the
guard's TRUNCATE trigger on a partitioned table (worlds as in ``test_move_fidelity_hostile``
on a 2-shard, 8-bucket cluster)."""

from __future__ import annotations

import pytest
from test_move_fidelity_hostile import hash_group, make_world
from test_moves_types_fresh_eyes import _move_stopped_after_the_copy
from sqlalchemy import BigInteger, String, event, insert, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._guard import uninstall_guard
from shardkit._rebalance_plan import plan_drain
from shardkit.errors import RebalanceError
from shardkit.verify import verify

pytestmark = pytest.mark.integration


class RvBase(DeclarativeBase):
    pass


class Purse(RvBase):
    __tablename__ = "rv_purses"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")


GROUPS = {"groups": {"purses": {"strategy": "hash", "tables": {"rv_purses": "id"}}}}


class Env:
    def __init__(self, cluster):
        self.cluster = cluster
        self.names = list(cluster.shard_names)

    def Session(self, **kw):
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, **kw)

    def key_on(self, shard: str, start: int = 1) -> int:
        k = start
        while self.cluster.shard_for(Purse, k) != shard:
            k += 1
        return k

    def autocommit(self, shard: str):
        return self.cluster.primary(shard).connect().execution_options(isolation_level="AUTOCOMMIT")

    def rows(self, shard: str) -> dict[int, str]:
        with self.autocommit(shard) as c:
            return dict(c.execute(text("SELECT id, name FROM rv_purses")).all())

    def prepared(self, shard: str) -> list[str]:
        with self.autocommit(shard) as c:
            return list(c.execute(text("SELECT gid FROM pg_prepared_xacts")).scalars())


@pytest.fixture(scope="module")
def env(shardkit_cluster_factory):
    dev = shardkit_cluster_factory(shards=2, replicas=0)
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **GROUPS}, metadata=RvBase.metadata)
    for s in cluster.shard_names:
        RvBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def rv(env):
    for s in env.names:
        with env.autocommit(s) as c:
            for gid in c.execute(text("SELECT gid FROM pg_prepared_xacts")).scalars().all():
                c.execute(text(f"ROLLBACK PREPARED '{gid}'"))
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE rv_purses"))
    return env


@pytest.mark.parametrize("twophase", [True, False], ids=["twophase", "plain"])
def test_commit_whose_after_commit_listener_raises_gives_that_error(rv, twophase):
    """Every shard committed, then the application's after_commit listener raised.  A plain
    Session raises the listener's error.  shardkit took it for a failed shard commit: with
    twophase=True it tried to finish the commit again and raised "This session is in
    'committed' state"; without, a CommitError saying the last shard had failed and its
    writes should be re-applied (they are committed: re-applying them duplicates them)."""
    a, b = rv.key_on(rv.names[0]), rv.key_on(rv.names[1])
    s = rv.Session(twophase=twophase)()
    calls = []

    @event.listens_for(s, "after_commit")
    def hook(session):
        calls.append(1)
        raise RuntimeError("the application's hook failed")

    s.add_all([Purse(id=a, name="a"), Purse(id=b, name="b")])
    with pytest.raises(RuntimeError, match="the application's hook failed"):
        s.commit()
    s.close()
    assert calls == [1]
    assert rv.rows(rv.names[0]) == {a: "a"} and rv.rows(rv.names[1]) == {b: "b"}
    assert rv.prepared(rv.names[0]) == [] and rv.prepared(rv.names[1]) == []


def test_insert_inside_scope_shard_of_rows_of_several_shards_in_one_values_is_refused(rv):
    """Inside scope(shard=s0), an INSERT's rows go where their keys belong; a multi-row
    VALUES spanning shards (refused outside a scope: it cannot be split) fell back to s0,
    writing the s1 row on s0, where no read by its key finds it."""
    s0, s1 = rv.names
    k0, k1 = rv.key_on(s0), rv.key_on(s1)
    with rv.Session()() as s:
        with shardkit.scope(shard=s0):
            with pytest.raises(shardkit.CrossShardWriteError, match="spans shards"):
                s.execute(insert(Purse).values([{"id": k0, "name": "x"}, {"id": k1, "name": "y"}]))
        s.rollback()
    assert rv.rows(s0) == {} and rv.rows(s1) == {}


def test_upsert_inside_scope_shard_moving_its_key_to_another_shard_is_refused(rv):
    """ON CONFLICT DO UPDATE SET id = <a key of another shard> is refused outside a scope
    (the existing row would stay under a key its shard does not own); inside
    scope(shard=...) the refusal was swallowed and the upsert ran on the scope's shard."""
    s0, s1 = rv.names
    k0, k1 = rv.key_on(s0), rv.key_on(s1)
    with rv.Session()() as s:
        s.add(Purse(id=k0, name="old"))
        s.commit()
        with shardkit.scope(shard=s0):
            stmt = pg_insert(Purse).values(id=k0, name="new")
            stmt = stmt.on_conflict_do_update(index_elements=[Purse.id], set_={"id": k1})
            with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
                s.execute(stmt)
        s.rollback()
    assert rv.rows(s0) == {k0: "old"} and rv.rows(s1) == {}


# -- the guard's TRUNCATE trigger and partitions ------------------------------------------------

@pytest.fixture
def mkworld(shardkit_cluster_factory, tmp_path):
    dev = shardkit_cluster_factory(shards=2, replicas=0, bucket_count=8)
    made = []

    def make(schema, groups, **kw):
        made.append(make_world(dev, tmp_path, schema, groups, **kw))
        return made[-1]

    yield make
    for w in made:
        w.cluster.dispose()


PARTITIONED = (
    "CREATE TABLE boxes (id bigint PRIMARY KEY, tenant bigint NOT NULL, v text) PARTITION BY RANGE (id); "
    "CREATE TABLE boxes_low PARTITION OF boxes FOR VALUES FROM (0) TO (10); "
    "CREATE TABLE boxes_high PARTITION OF boxes FOR VALUES FROM (10) TO (1000)")


def test_truncate_of_a_partition_while_its_buckets_move_is_refused(mkworld):
    """TRUNCATE of the partitioned table was refused during a move, but the guard's TRUNCATE
    trigger (a statement trigger) was on the partitioned table only: PostgreSQL does not
    clone those to partitions, and TRUNCATE boxes_low fired nothing, so it emptied the
    source and the switch served the target's copies (the rows came back).  A partition
    added after the guard lacks the trigger: the guard is stale until rebalance init."""
    w = mkworld(PARTITIONED, hash_group({"boxes": "tenant"}))
    for i in range(20):
        w.on_owner("boxes", i, "INSERT INTO boxes VALUES (%s, %s, 'x')", (i, i))
    move_id = _move_stopped_after_the_copy(w)
    for part in ("boxes_low", "boxes_high"):
        with pytest.raises(Exception) as err:
            w.sql("s0", f"TRUNCATE {part}")
        assert "cannot be truncated while buckets move" in str(err.value), str(err.value)
    rebalance.Mover(w.cluster, grace=0).run(move_id)
    w.cluster.refresh_map()
    assert verify(w.cluster).ok and len(w.rows("s1", "boxes")) == 20
    # A partition created since the guard was installed: moves refuse until init.
    w.sql("s1", "CREATE TABLE boxes_more PARTITION OF boxes FOR VALUES FROM (1000) TO (2000)")
    with pytest.raises(RebalanceError, match="rebalance init"):
        rebalance.Mover(w.cluster, grace=0).apply(
            plan_drain(w.cluster.config.bucket_map, "s1", remaining=["s0"]))
    rebalance.init(w.cluster)
    count = "SELECT count(*) FROM pg_trigger WHERE tgname = 'shardkit_guard_truncate'"
    assert w.sql("s1", count)[0][0] == 4
    with w.cluster.primary("s1").begin() as c:
        uninstall_guard(c, w.cluster.config)
    assert w.sql("s1", count)[0][0] == 0
