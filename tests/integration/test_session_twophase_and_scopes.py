"""Probes of ShardedSession's transactions and routing scopes.

A two-phase commit whose COMMIT PREPARED fails on a shard after every shard has
prepared, a commit whose after_commit listener raises, and INSERT statements inside
``scope(shard=...)``, against a real
2-shard cluster (no replicas) of this module's own: the two-phase tests stop and
start a primary.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import BigInteger, String, event, insert, inspect, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from own_tables import ShardEnv
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit

pytestmark = pytest.mark.integration


class FeBase(DeclarativeBase):
    pass


class Wallet(FeBase):
    __tablename__ = "fe_wallets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")


class Memo(FeBase):
    """A row whose shard key may be left out (it then goes where a scope says)."""
    __tablename__ = "fe_memos"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


GROUPS = {"groups": {"wallets": {"strategy": "hash", "tables": {"fe_wallets": "id", "fe_memos": "owner"}}}}


class Env(ShardEnv):
    model = Wallet

    def rows(self, shard: str) -> dict[int, str]:
        with self.autocommit(shard) as c:
            return dict(c.execute(text("SELECT id, name FROM fe_wallets")).all())


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    with Env.started(shardkit_module_cluster_factory(shards=2, replicas=0), GROUPS,
                     FeBase.metadata) as e:
        yield e


@pytest.fixture
def fe(env):
    env.reset("fe_wallets")
    return env


def _on_first_commit_prepared(fe, action):
    """Call ``action(shard_committing_first, other_shard)`` when the first shard's COMMIT
    PREPARED is about to be sent (every shard has prepared by then); returns a remover."""
    seen: list[str] = []

    def hook(conn, xid, is_prepared):
        shard = conn.engine.info["shard"]
        seen.append(shard)
        if len(seen) == 1:
            action(shard, next(s for s in fe.names if s != shard))

    for s in fe.names:
        event.listen(fe.cluster.primary(s), "commit_twophase", hook)

    def remove():
        for s in fe.names:
            event.remove(fe.cluster.primary(s), "commit_twophase", hook)
    return remove


def test_twophase_commit_whose_connection_drops_after_prepare_is_finished(fe):
    """Every shard prepared, then one shard's connection dies before its COMMIT PREPARED:
    the transaction's outcome is commit.  Plain SQLAlchemy raises the connection error
    and leaves that shard's transaction prepared (holding its row locks until someone
    finds it in pg_prepared_xacts); a later rollback() even rolls back a shard not yet
    reached, so the shards disagree.  shardkit finishes the commit on a new connection."""
    a, b = fe.keys_on(fe.names[0], 1)[0], fe.keys_on(fe.names[1], 1)[0]
    s = fe.Session(twophase=True)()
    objs = [Wallet(id=a, name="a"), Wallet(id=b, name="b")]
    s.add_all(objs)
    s.flush()
    pids = {sh: s.connection(bind_arguments={"shard_id": sh}).exec_driver_sql(
        "SELECT pg_backend_pid()").scalar() for sh in fe.names}

    def kill_other(first, other):
        with fe.autocommit(other) as c:
            c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pids[other]})

    remove = _on_first_commit_prepared(fe, kill_other)
    try:
        s.commit()
    finally:
        remove()
    assert fe.ids(fe.names[0]) == {a} and fe.ids(fe.names[1]) == {b}
    assert fe.prepared(fe.names[0]) == [] and fe.prepared(fe.names[1]) == []
    # The session's commit is complete: its objects are persistent, it goes on.
    assert all(inspect(o).persistent for o in objs)
    assert s.get(Wallet, b).name == "b"
    s.add(Wallet(id=fe.keys_on(fe.names[1], 2)[1], name="more"))
    s.commit()
    s.close()
    assert len(fe.ids(fe.names[1])) == 2
    stats = fe.cluster.pool_stats()
    assert all(v is None or v["checkedout"] == 0 for v in stats.values()), stats


def test_twophase_commit_with_a_shard_down_after_prepare_names_its_prepared_transaction(fe):
    """The other shard's primary goes down between PREPARE and COMMIT PREPARED: the
    error says which shard committed and gives the id of the transaction still prepared
    on the other (a prepared transaction survives the restart), so an operator can
    commit it; rollback() then lets the session go on."""
    a, b = fe.keys_on(fe.names[0], 1)[0], fe.keys_on(fe.names[1], 1)[0]
    s = fe.Session(twophase=True)()
    s.add_all([Wallet(id=a, name="a"), Wallet(id=b, name="b")])
    s.flush()
    stopped: list[str] = []

    def stop_other(first, other):
        fe.dev.shard(other).primary.stop(mode="immediate")
        stopped.append(other)

    remove = _on_first_commit_prepared(fe, stop_other)
    try:
        with pytest.raises(shardkit.CommitError) as info:
            s.commit()
    finally:
        remove()
        for sh in stopped:
            fe.dev.shard(sh).primary.start()
    down = stopped[0]
    first = next(sh for sh in fe.names if sh != down)
    err = info.value
    assert err.committed == [first] and err.failed == down and err.not_committed == [down]
    gids = re.findall(r"shard \S+ as '(_sa_[0-9a-f]+)'", str(err))
    assert gids and gids == fe.prepared(down), (str(err), fe.prepared(down))
    assert err.prepared == {down: gids[0]}
    assert "COMMIT PREPARED" in str(err) and "rollback()" in str(err)
    s.rollback()
    s.close()
    # What the message says to do completes the transaction.
    with fe.autocommit(down) as c:
        c.execute(text(f"COMMIT PREPARED '{gids[0]}'"))
    # (a's shard may be either: SQLAlchemy commits the shards in no fixed order)
    assert fe.ids(fe.names[0]) == {a} and fe.ids(fe.names[1]) == {b}
    with fe.Session(twophase=True)() as s2:
        s2.add(Wallet(id=fe.keys_on(down, 2)[1]))
        s2.commit()
    assert len(fe.ids(down)) == 2


@pytest.mark.parametrize("how", ["values", "orm_bulk", "core_executemany"])
def test_insert_inside_scope_shard_writes_rows_where_their_key_belongs(fe, how):
    """Inside scope(shard=s0), the ORM's flush writes an object on the shard its key
    belongs to.  An INSERT statement of a row whose key another shard owns used to be
    written on s0: a row that no read by its key ever finds (and, with a catalog, one
    the ownership guard refuses)."""
    s0, s1 = fe.names
    flushed, stated = fe.keys_on(s1, 3)[0], fe.keys_on(s1, 3)[1:]
    with fe.Session()() as s:
        with shardkit.scope(shard=s0):
            s.add(Wallet(id=flushed, name="flushed"))
            s.flush()
            if how == "values":
                for k in stated:
                    s.execute(insert(Wallet).values(id=k, name="stated"))
            elif how == "orm_bulk":
                s.execute(insert(Wallet), [{"id": k, "name": "stated"} for k in stated])
            else:
                s.execute(insert(Wallet.__table__), [{"id": k, "name": "stated"} for k in stated])
        s.commit()
    assert fe.ids(s0) == set()
    assert fe.ids(s1) == {flushed, *stated}
    with fe.Session()() as s:
        assert s.execute(select(Wallet.name).where(Wallet.id == stated[0])).scalar_one() == "stated"


# -- after_commit listeners, and INSERTs in scope(shard=...) that cannot go where their keys belong

@pytest.mark.parametrize("twophase", [True, False], ids=["twophase", "plain"])
def test_commit_whose_after_commit_listener_raises_gives_that_error(fe, twophase):
    """Every shard committed, then the application's after_commit listener raised.  A plain
    Session raises the listener's error.  shardkit took it for a failed shard commit: with
    twophase=True it tried to finish the commit again and raised "This session is in
    'committed' state"; without, a CommitError saying the last shard had failed and its
    writes should be re-applied (they are committed: re-applying them duplicates them)."""
    a, b = fe.keys_on(fe.names[0], 1)[0], fe.keys_on(fe.names[1], 1)[0]
    s = fe.Session(twophase=twophase)()
    calls = []

    @event.listens_for(s, "after_commit")
    def hook(session):
        calls.append(1)
        raise RuntimeError("the application's hook failed")

    s.add_all([Wallet(id=a, name="a"), Wallet(id=b, name="b")])
    with pytest.raises(RuntimeError, match="the application's hook failed"):
        s.commit()
    s.close()
    assert calls == [1]
    assert fe.rows(fe.names[0]) == {a: "a"} and fe.rows(fe.names[1]) == {b: "b"}
    assert fe.prepared(fe.names[0]) == [] and fe.prepared(fe.names[1]) == []


def test_insert_inside_scope_shard_of_rows_of_several_shards_in_one_values_is_refused(fe):
    """Inside scope(shard=s0), an INSERT's rows go where their keys belong; a multi-row
    VALUES spanning shards (refused outside a scope: it cannot be split) fell back to s0,
    writing the s1 row on s0, where no read by its key finds it."""
    s0, s1 = fe.names
    k0, k1 = fe.keys_on(s0, 1)[0], fe.keys_on(s1, 1)[0]
    with fe.Session()() as s:
        with shardkit.scope(shard=s0):
            with pytest.raises(shardkit.CrossShardWriteError, match="spans shards"):
                s.execute(insert(Wallet).values([{"id": k0, "name": "x"}, {"id": k1, "name": "y"}]))
        s.rollback()
    assert fe.rows(s0) == {} and fe.rows(s1) == {}


def test_upsert_inside_scope_shard_moving_its_key_to_another_shard_is_refused(fe):
    """ON CONFLICT DO UPDATE SET id = <a key of another shard> is refused outside a scope
    (the existing row would stay under a key its shard does not own); inside
    scope(shard=...) the refusal was swallowed and the upsert ran on the scope's shard."""
    s0, s1 = fe.names
    k0, k1 = fe.keys_on(s0, 1)[0], fe.keys_on(s1, 1)[0]
    with fe.Session()() as s:
        s.add(Wallet(id=k0, name="old"))
        s.commit()
        with shardkit.scope(shard=s0):
            stmt = pg_insert(Wallet).values(id=k0, name="new")
            stmt = stmt.on_conflict_do_update(index_elements=[Wallet.id], set_={"id": k1})
            with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
                s.execute(stmt)
        s.rollback()
    assert fe.rows(s0) == {k0: "old"} and fe.rows(s1) == {}


def test_executemany_inside_scope_shard_puts_keyed_rows_where_they_belong(fe):
    """Inside scope(shard=s0), an executemany whose rows mostly carry their key but one
    does not: the keyless row goes to s0, as the scope says, and each keyed row to its
    key's shard.  The keyless row used to send the whole batch to s0, the s1 row with it,
    where no read by its key finds it."""
    s0, s1 = fe.names
    k0, k1 = fe.keys_on(s0, 1)[0], fe.keys_on(s1, 1)[0]
    rows = [{"id": 1, "owner": k1}, {"id": 2, "owner": None}, {"id": 3, "owner": k0}]
    try:
        with fe.Session()() as s:
            with shardkit.scope(shard=s0):
                s.execute(insert(Memo.__table__), rows)
                s.execute(insert(Memo), [{"id": 4, "owner": k1}, {"id": 5}])  # the ORM's bulk insert
                # Split by shard, {"id": 7} would come first on s0 and decide its columns
                # (SQLAlchemy takes them from the first row): k0 would be dropped.
                with pytest.raises(shardkit.CrossShardWriteError, match="give different columns"):
                    s.execute(insert(Memo.__table__),
                              [{"id": 6, "owner": k1}, {"id": 7}, {"id": 8, "owner": k0}])
                # A key that names no column is ignored, as SQLAlchemy ignores it.
                s.execute(insert(Memo.__table__),
                          [{"id": 9, "owner": k1, "note": "x"}, {"id": 10, "owner": k0}])
            s.commit()
        memos = {}
        for shard in fe.names:
            with fe.autocommit(shard) as c:
                memos[shard] = dict(c.execute(text("SELECT id, owner FROM fe_memos")).all())
        assert memos == {s0: {2: None, 3: k0, 5: None, 10: k0}, s1: {1: k1, 4: k1, 9: k1}}
    finally:
        for shard in fe.names:
            with fe.autocommit(shard) as c:
                c.execute(text("TRUNCATE fe_memos"))
