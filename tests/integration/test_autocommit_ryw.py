"""Read-your-writes for writes a primary commits on its own (isolation_level AUTOCOMMIT).

In autocommit each statement commits as it runs: the session's transaction may end with
a rollback or a close, never a COMMIT, and still have written.  Reads that follow (in
the session, or through its token) must see those rows.  One shard whose replica applies
every commit seconds late serves the module.
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, String, event, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from waiting import wait_replicas_usable

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "acr_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=1, replicas=1)
    config = {**dev.config_dict(), "groups": {"notes": {"tables": {"acr_notes": "id"}}},
              "replicas": {"poll_interval": 0.1, "max_lag_seconds": 300.0, "wait_for_token": 0.0}}
    plain = shardkit.Cluster.from_config(config)
    Base.metadata.create_all(plain.primary("s0"))
    cluster = shardkit.Cluster.from_config(config, engine_options={"isolation_level": "AUTOCOMMIT"})
    served: list[str] = []
    for eng in (cluster.primary("s0"), cluster.engine("s0", "replica", 0)):
        event.listen(eng, "after_cursor_execute",
                     lambda c, cur, st, *a, node=eng.info["node"], **k: served.append(node)
                     if "acr_notes" in st and st.lstrip().upper().startswith("SELECT") else None)
    cluster.start_monitor()
    plain.start_monitor()
    replica = dev.shard("s0").replicas[0]
    replica.set_apply_delay(30)
    wait_replicas_usable(cluster)   # else every read goes to the primary
    wait_replicas_usable(plain)
    try:
        yield (cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster), served,
               sessionmaker(class_=shardkit.ShardedSession, cluster=plain))
    finally:
        replica.set_apply_delay(0)
        cluster.dispose()
        plain.dispose()


@pytest.mark.parametrize("end", ["close", "rollback"])
def test_an_autocommitted_flush_ended_without_commit_is_read_back(env, end):
    cluster, Session, served, _ = env
    k = 10 if end == "close" else 11
    s = Session()
    s.add(Note(id=k, body="written"))
    s.flush()                      # committed by the server as it ran
    getattr(s, end)()
    token = s.consistency_token()
    n0 = len(served)
    assert s.execute(select(Note.body).where(Note.id == k)).scalar_one_or_none() == "written"
    assert served[n0:] == ["s0/primary"]
    s.close()
    with Session(consistency_token=token) as other:
        n0 = len(served)
        assert other.execute(select(Note.body).where(Note.id == k)).scalar_one_or_none() == "written"
        assert served[n0:] == ["s0/primary"]


def test_an_autocommitted_update_then_close_is_read_back(env):
    cluster, Session, served, _ = env
    with Session() as s:
        s.add(Note(id=20, body="old"))
        s.commit()
    s = Session()
    s.execute(update(Note).where(Note.id == 20).values(body="new"))
    s.close()
    assert s.execute(select(Note.body).where(Note.id == 20)).scalar_one() == "new"
    s.close()


def test_a_connection_put_in_autocommit_by_the_application_counts_too(env):
    _, _, _, Plain = env
    s = Plain()
    s.connection(bind_arguments={"shard_id": "s0"}, execution_options={"isolation_level": "AUTOCOMMIT"})
    s.execute(update(Note).where(Note.id == 20).values(body="newer"))
    s.rollback()                   # nothing to roll back: the UPDATE committed
    with Plain() as fresh:
        assert s.consistency_token() != fresh.consistency_token()
    assert s.execute(select(Note.body).where(Note.id == 20)).scalar_one() == "newer"
    s.close()


def test_a_rolled_back_transaction_leaves_no_position(env):
    _, _, _, Plain = env
    s = Plain()
    s.execute(update(Note).where(Note.id == 20).values(body="never"))
    s.rollback()
    with Plain() as fresh:
        assert s.consistency_token() == fresh.consistency_token()   # no position
    s.close()
