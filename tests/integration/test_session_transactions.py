"""Probes of ShardedSession's session and transaction semantics.

Each test asserts what SQLAlchemy's own Session does on one database, or what
the README promises, against a real 3-shard cluster (one replica per shard) of
this module's own, with tables of this module's own.
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    make_transient_to_detached,
    mapped_column,
    relationship,
    scoped_session,
    sessionmaker,
    with_loader_criteria,
)

import shardkit

pytestmark = pytest.mark.integration


class TxBase(DeclarativeBase):
    pass


class Account(TxBase):
    __tablename__ = "tx_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")
    balance: Mapped[int] = mapped_column(Integer, default=0)
    notes: Mapped[list[Note]] = relationship(back_populates="account", lazy="select")


class Note(TxBase):
    __tablename__ = "tx_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("tx_accounts.id"))
    body: Mapped[str] = mapped_column(String(100), default="")
    account: Mapped[Account] = relationship(back_populates="notes")


class Ticket(TxBase):
    """A table whose unique code is checked only at COMMIT (a deferred constraint)."""

    __tablename__ = "tx_tickets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(20))
    __table_args__ = (UniqueConstraint("code", name="tx_tickets_code_key",
                                       deferrable=True, initially="DEFERRED"),)


class Plan(TxBase):
    """A reference table (copied to every shard)."""

    __tablename__ = "tx_plans"
    code: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), default="")


GROUPS = {
    "groups": {
        "accounts": {"strategy": "hash",
                     "tables": {"tx_accounts": "id", "tx_notes": "account_id", "tx_tickets": "id"}},
    },
    "reference_tables": ["tx_plans"],
}


class Env:
    def __init__(self, dev, cluster):
        self.dev = dev
        self.cluster = cluster
        self.names = list(cluster.shard_names)

    def Session(self, **kw):
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, **kw)

    def keys_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        out = []
        k = start
        while len(out) < n:
            if self.cluster.shard_for(Account, k) == shard:
                out.append(k)
            k += 1
        return out

    def rows(self, shard: str, sql: str) -> list:
        with self.cluster.primary(shard).connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]

    def ids(self, shard: str, table: str = "tx_accounts") -> set[int]:
        return {r[0] for r in self.rows(shard, f"SELECT id FROM {table}")}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=1)
    cfg = {**dev.config_dict(), **GROUPS}
    cluster = shardkit.Cluster.from_config(cfg, metadata=TxBase.metadata)
    for s in cluster.shard_names:
        TxBase.metadata.create_all(cluster.primary(s))
    try:
        yield Env(dev, cluster)
    finally:
        cluster.dispose()


@pytest.fixture
def tx(env):
    tables = ", ".join(t.name for t in TxBase.metadata.sorted_tables)
    for s in env.names:
        with env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {tables} CASCADE"))
    return env


# -- savepoints, rollback ---------------------------------------------------------------


def test_savepoint_rollback_across_two_shards_undoes_both(tx):
    a, b = tx.keys_on(tx.names[0], 2), tx.keys_on(tx.names[1], 2)
    Session = tx.Session()
    with Session() as s:
        s.add_all([Account(id=a[0], name="keep-a"), Account(id=b[0], name="keep-b")])
        s.flush()
        sp = s.begin_nested()
        s.add_all([Account(id=a[1], name="drop-a"), Account(id=b[1], name="drop-b")])
        kept_a = s.get(Account, a[0])
        kept_a.name = "changed-in-savepoint"
        s.flush()
        sp.rollback()
        # As on one database: the rolled-back objects are gone, the modified one expired
        # back to its pre-savepoint state.
        assert s.get(Account, a[1]) is None and s.get(Account, b[1]) is None
        assert kept_a.name == "keep-a"
        s.commit()
    assert tx.ids(tx.names[0]) == {a[0]}
    assert tx.ids(tx.names[1]) == {b[0]}


def test_savepoint_reference_rows_rolled_back_on_every_shard(tx):
    Session = tx.Session()
    with Session() as s:
        s.add(Plan(code="basic", name="Basic"))
        s.flush()
        with s.begin_nested() as sp:
            s.add(Plan(code="pro", name="Pro"))
            s.flush()
            sp.rollback()
        s.commit()
    for name in tx.names:
        assert tx.rows(name, "SELECT code FROM tx_plans ORDER BY code") == [("basic",)], name


def test_rollback_after_failed_flush_leaves_nothing_and_session_reusable(tx):
    a, b = tx.keys_on(tx.names[0], 1), tx.keys_on(tx.names[1], 1)
    Session = tx.Session()
    with Session() as s:
        s.add(Account(id=b[0], name="existing"))
        s.commit()
        token = s.consistency_token()  # (read back below: a replica may not have replayed it)
    with Session(consistency_token=token) as s:
        s.add(Account(id=a[0], name="new-a"))
        s.add(Account(id=b[0], name="dup-b"))     # primary key violation on shard 1
        with pytest.raises(sa_exc.IntegrityError):
            s.flush()
        with pytest.raises(sa_exc.PendingRollbackError):
            s.execute(select(Account).where(Account.id == a[0])).all()
        s.rollback()
        assert not s.in_transaction()
        assert s.get(Account, b[0]).name == "existing"
        s.add(Account(id=a[0], name="retry-a"))
        s.commit()
    assert tx.rows(tx.names[0], "SELECT id, name FROM tx_accounts") == [(a[0], "retry-a")]


def test_close_mid_transaction_rolls_back_every_shard_and_returns_connections(tx):
    a, b = tx.keys_on(tx.names[0], 1), tx.keys_on(tx.names[1], 1)
    Session = tx.Session()
    s = Session()
    s.add_all([Account(id=a[0]), Account(id=b[0])])
    s.flush()
    s.close()
    assert tx.ids(tx.names[0]) == set() and tx.ids(tx.names[1]) == set()
    stats = tx.cluster.pool_stats()
    assert all(v is None or v["checkedout"] == 0 for v in stats.values()), stats
    # The closed session is usable again (a new transaction).
    s.add(Account(id=a[0], name="after-close"))
    s.commit()
    s.close()
    assert tx.ids(tx.names[0]) == {a[0]}


# -- two-phase commit ---------------------------------------------------------------------


def test_twophase_commit_writes_both_shards(tx):
    a, b = tx.keys_on(tx.names[0], 1), tx.keys_on(tx.names[1], 1)
    Session = tx.Session(twophase=True)
    with Session() as s:
        s.add_all([Account(id=a[0], name="a"), Account(id=b[0], name="b")])
        s.commit()
    assert tx.ids(tx.names[0]) == {a[0]} and tx.ids(tx.names[1]) == {b[0]}


def test_twophase_commit_after_replica_reads(tx):
    """A twophase session that also read (from replicas, the default) must still commit."""
    a, b = tx.keys_on(tx.names[0], 1), tx.keys_on(tx.names[1], 1)
    Session = tx.Session(twophase=True, consistency="eventual")
    with Session() as s:
        # reads of every shard first (replicas), then writes
        assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 0
        s.add_all([Account(id=a[0], name="a"), Account(id=b[0], name="b")])
        s.commit()
    assert tx.ids(tx.names[0]) == {a[0]} and tx.ids(tx.names[1]) == {b[0]}


def test_twophase_deferred_violation_on_one_shard_commits_nothing(tx):
    a, b = tx.keys_on(tx.names[0], 1), tx.keys_on(tx.names[1], 2)
    Session = tx.Session(twophase=True)
    with Session() as s:
        s.add(Ticket(id=a[0], code="ok"))
        s.add_all([Ticket(id=b[0], code="dup"), Ticket(id=b[1], code="dup")])
        s.flush()   # the deferred constraint does not fire yet
        # (Which error: psycopg then fails to roll back the shard whose PREPARE failed,
        # with plain SQLAlchemy too; the outcome is what matters.)
        with pytest.raises(sa_exc.SQLAlchemyError):
            s.commit()
    assert tx.ids(tx.names[0], "tx_tickets") == set()
    assert tx.ids(tx.names[1], "tx_tickets") == set()
    # no prepared transaction left behind on any shard
    for name in tx.names:
        assert tx.rows(name, "SELECT count(*) FROM pg_prepared_xacts")[0][0] == 0, name


# -- a commit that fails on one shard after another committed ------------------------------


def _partial_commit(tx, Session, ok_shards, bad_shard, attempts=12):
    """Commit a session that writes a row on each of ``ok_shards`` and a deferred unique
    violation on ``bad_shard``, until one of the good shards committed before the bad one
    failed (the order is SQLAlchemy's, not fixed).  Returns (session, committed ids)."""
    start = 1
    for _ in range(attempts):
        goods = {sh: tx.keys_on(sh, 1, start)[0] for sh in ok_shards}
        bads = tx.keys_on(bad_shard, 2, start)
        start = max(*goods.values(), *bads) + 1
        s = Session()
        s.add_all(Ticket(id=k, code=f"ok{k}") for k in goods.values())
        s.add_all([Ticket(id=bads[0], code=f"dup{start}"), Ticket(id=bads[1], code=f"dup{start}")])
        s.flush()
        with pytest.raises((sa_exc.IntegrityError, shardkit.CommitError)) as info:
            s.commit()
        committed = {sh: k for sh, k in goods.items() if k in tx.ids(sh, "tx_tickets")}
        if committed:
            # A commit that reached some shards says which, and which it did not.
            err = info.value
            assert isinstance(err, shardkit.CommitError), err
            assert set(err.committed) == set(committed) and err.failed == bad_shard
            assert isinstance(err.cause, sa_exc.IntegrityError)
            assert set(err.not_committed) == {bad_shard, *(set(ok_shards) - set(committed))}
            return s, committed
        # Nothing committed: the original error, as a plain Session raises it.
        assert isinstance(info.value, sa_exc.IntegrityError), info.value
        s.close()
    pytest.skip("no good shard committed before the bad one in %d attempts" % attempts)


def test_partially_committed_shard_is_still_read_your_writes(tx):
    """README: "after a session commits writes to a shard, it remembers that shard's WAL
    position; its later reads use only replicas that have replayed it".  When a multi-shard
    commit fails on one shard after another has committed, the committed shard's rows are
    durable: the session's next read of them must not come from a replica that has not
    replayed them (the session would see its own committed write vanish)."""
    ok_shards = [tx.names[0], tx.names[2]]
    bad = tx.names[1]
    replicas = [tx.dev.shard(sh).replicas[0] for sh in ok_shards]
    tx.cluster.start_monitor()
    for r in replicas:
        r.set_apply_delay(3)
    try:
        s, committed = _partial_commit(tx, tx.Session(), ok_shards, bad)
        try:
            s.rollback()
            token = s.consistency_token()
            for sh, k in committed.items():
                assert s.get(Ticket, k) is not None, (
                    f"row {k} committed on {sh} is invisible to the session that committed it "
                    f"(token {token!r} does not name {sh})")
        finally:
            s.close()
        # Without the token the replicas, 3 s behind, do not have the rows yet: the
        # reads above could have come back empty.
        with tx.Session(consistency="eventual")() as other:
            assert [other.get(Ticket, k) for k in committed.values()] == [None] * len(committed)
    finally:
        for r in replicas:
            r.set_apply_delay(0)


# -- identity map: get, merge, detached objects -------------------------------------------------


def _seed(tx, *keys, name="seed"):
    """Commit the rows and wait for the replicas to replay them: the tests read them
    back in new sessions, which (with no token) may read a replica."""
    with tx.Session()() as s:
        s.add_all(Account(id=k, name=f"{name}{k}") for k in keys)
        s.commit()
    for shard in tx.dev.shards:
        for replica in shard.replicas:
            replica.wait_caught_up()


def test_transient_to_detached_object_is_the_identity_of_its_row(tx):
    """make_transient_to_detached() + add(): on one database, session.get() of that key
    returns the very object added (one object per row in a session)."""
    a = tx.keys_on(tx.names[1], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        u = Account(id=a, name=f"seed{a}", balance=0)
        make_transient_to_detached(u)
        s.add(u)
        got = s.get(Account, a)
        assert got is u
        assert s.execute(select(Account).where(Account.id == a)).scalar_one() is u


def test_transient_to_detached_object_updates_its_row(tx):
    a = tx.keys_on(tx.names[1], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        u = Account(id=a)
        make_transient_to_detached(u)
        s.add(u)
        u.name = "renamed"
        s.commit()
    assert tx.rows(tx.names[1], f"SELECT name FROM tx_accounts WHERE id = {a}") == [("renamed",)]


def test_merge_updates_existing_row_on_its_shard_and_keeps_one_identity(tx):
    a = tx.keys_on(tx.names[2], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        merged = s.merge(Account(id=a, name="merged", balance=5))
        assert merged is s.get(Account, a)
        s.commit()
    for sh in tx.names:
        want = [(a, "merged", 5)] if sh == tx.names[2] else []
        assert tx.rows(sh, "SELECT id, name, balance FROM tx_accounts") == want, sh


def test_merge_naming_another_shard_than_its_key_is_refused_before_anything_is_written(tx):
    """merge(obj, options=[set_shard_id(s)]) for an object whose key lives elsewhere looked
    for its row on s, found none, and INSERTed it where its key puts it, over its own row
    (UniqueViolation at the flush). Refused, saying why; naming its own shard works."""
    from sqlalchemy.ext.horizontal_shard import set_shard_id

    a = tx.keys_on(tx.names[2], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        with pytest.raises(shardkit.errors.RoutingError, match=f"puts it on {tx.names[2]}.*set_shard_id"):
            s.merge(Account(id=a, name="m", balance=1), options=[set_shard_id(tx.names[0])])
        assert not s.new and not s.dirty
        merged = s.merge(Account(id=a, name="m", balance=1), options=[set_shard_id(tx.names[2])])
        assert merged is s.get(Account, a)
        s.commit()
    assert tx.rows(tx.names[2], f"SELECT name, balance FROM tx_accounts WHERE id = {a}") == [("m", 1)]


def test_merge_load_false_of_detached_object(tx):
    a = tx.keys_on(tx.names[0], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s1:
        u = s1.get(Account, a)
        s1.expunge(u)
    with tx.Session()() as s2:
        m = s2.merge(u, load=False)
        assert s2.get(Account, a) is m
        # the merged object is clean: touching it then committing writes only that change
        m.balance = 7
        s2.commit()
    assert tx.rows(tx.names[0], f"SELECT name, balance FROM tx_accounts WHERE id = {a}") == [(f"seed{a}", 7)]


def test_get_with_identity_token_is_the_same_object(tx):
    a = tx.keys_on(tx.names[1], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        u = s.get(Account, a)
        assert s.get(Account, a, identity_token=tx.names[1]) is u
        assert s.get(Account, a, identity_token=tx.names[0]) is None


def test_expunge_and_readd_then_commit(tx):
    a = tx.keys_on(tx.names[2], 1)[0]
    _seed(tx, a)
    with tx.Session()() as s:
        u = s.get(Account, a)
        s.expunge(u)
        assert s.get(Account, a) is not u
        s.expunge_all()
        s.add(u)
        u.balance = 11
        s.commit()
    assert tx.rows(tx.names[2], f"SELECT balance FROM tx_accounts WHERE id = {a}") == [(11,)]


def test_populate_existing_and_refresh_and_expire_all_reload_from_each_shard(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[1], 1)[0]
    _seed(tx, a, b)
    with tx.Session(consistency="strong")() as s:
        ua, ub = s.get(Account, a), s.get(Account, b)
        for sh, k in ((tx.names[0], a), (tx.names[1], b)):
            with tx.cluster.primary(sh).begin() as c:
                c.execute(text(f"UPDATE tx_accounts SET balance = 1 WHERE id = {k}"))
        # plain reads keep the identity map's values
        s.execute(select(Account)).scalars().all()
        assert (ua.balance, ub.balance) == (0, 0)
        # populate_existing across shards refreshes both
        got = s.execute(select(Account).execution_options(populate_existing=True)).scalars().all()
        assert {id(o) for o in got} == {id(ua), id(ub)}
        assert (ua.balance, ub.balance) == (1, 1)
        for sh, k in ((tx.names[0], a), (tx.names[1], b)):
            with tx.cluster.primary(sh).begin() as c:
                c.execute(text(f"UPDATE tx_accounts SET balance = 2 WHERE id = {k}"))
        s.refresh(ua)
        assert ua.balance == 2 and ub.balance == 1
        s.expire_all()
        assert (ua.balance, ub.balance) == (2, 2)
        assert s.get(Account, a, populate_existing=True) is ua


# -- connections, binds, autoflush ------------------------------------------------------------------


def _port(conn) -> int:
    return conn.execute(text("SELECT inet_server_port()")).scalar_one()


def _primary_port(tx, shard) -> int:
    return tx.dev.shard(shard).primary.port


def test_connection_and_get_bind_by_shard_and_scope(tx):
    s1 = tx.names[1]
    with tx.Session()() as s:
        conn = s.connection(bind_arguments={"shard_id": s1})
        assert _port(conn) == _primary_port(tx, s1)
        assert s.connection(bind_arguments={"shard_id": s1}) is conn   # one per transaction
        assert s.get_bind(shard_id=s1) is tx.cluster.primary(s1)
        with shardkit.scope(shard=tx.names[2]):
            assert _port(s.connection()) == _primary_port(tx, tx.names[2])
            assert s.get_bind() is tx.cluster.primary(tx.names[2])
        with pytest.raises(shardkit.RoutingError):
            s.connection()       # no shard to choose
        with pytest.raises(shardkit.RoutingError):
            s.connection(bind_arguments={"shard_id": "nope"})
        a = tx.keys_on(tx.names[0], 1)[0]
        assert s.get_bind(Account, instance=Account(id=a)) is tx.cluster.primary(tx.names[0])


def test_textual_statement_with_bind_arguments_runs_in_the_session_transaction(tx):
    s1 = tx.names[1]
    a = tx.keys_on(s1, 1)[0]
    with tx.Session()() as s:
        s.execute(text("INSERT INTO tx_accounts (id, name, balance) VALUES (:i, 'raw', 0)"),
                  {"i": a}, bind_arguments={"shard_id": s1})
        # visible inside the transaction (same connection), read through the ORM
        assert s.get(Account, a).name == "raw"
        s.rollback()
    assert tx.ids(s1) == set()


def test_no_autoflush_and_autoflush_reads(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[1], 1)[0]
    with tx.Session()() as s:
        with s.no_autoflush:
            s.add(Account(id=a, name="pending"))
            assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 0
            assert s.execute(select(Account).where(Account.id == a)).first() is None
        # autoflush now: reads of the pending row's shard and of every shard see it
        assert s.execute(select(Account.name).where(Account.id == a)).scalar_one() == "pending"
        s.add(Account(id=b, name="pending-b"))
        assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 2
        s.rollback()
    assert tx.ids(tx.names[0]) == set() and tx.ids(tx.names[1]) == set()


def test_autoflush_false_session(tx):
    a = tx.keys_on(tx.names[0], 1)[0]
    with tx.Session(autoflush=False)() as s:
        s.add(Account(id=a, name="pending"))
        assert s.execute(select(Account).where(Account.id == a)).first() is None
        assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 0
        s.commit()
    assert tx.ids(tx.names[0]) == {a}


# -- session API surface -------------------------------------------------------------------------


def test_session_events_fire(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[1], 1)[0]
    Session = tx.Session()
    seen = Counter()
    s = Session()
    event.listen(s, "after_commit", lambda sess: seen.update(["after_commit"]))
    event.listen(s, "after_rollback", lambda sess: seen.update(["after_rollback"]))
    event.listen(s, "after_begin", lambda sess, trans, conn: seen.update(["after_begin"]))
    event.listen(s, "before_commit", lambda sess: seen.update(["before_commit"]))
    event.listen(s, "after_flush", lambda sess, ctx: seen.update(["after_flush"]))
    try:
        s.add_all([Account(id=a), Account(id=b)])
        s.commit()
        assert seen["before_commit"] == 1 and seen["after_commit"] == 1
        assert seen["after_flush"] == 1
        # SQLAlchemy: after_begin once per connection a transaction begins (2 primaries)
        assert seen["after_begin"] == 2
        s.add(Account(id=a))
        with pytest.raises(sa_exc.IntegrityError):
            s.flush()
        s.rollback()
        assert seen["after_rollback"] >= 1
    finally:
        s.close()


def test_do_orm_execute_fires_per_shard_with_the_callers_context(tx):
    """README: do_orm_execute runs once for a one-shard execute(), and once per shard for a
    cross-shard one (each shard's statement is executed in its own right), with the
    caller's contextvars."""
    _seed(tx, *tx.keys_on(tx.names[0], 2), *tx.keys_on(tx.names[1], 2))
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    with tx.Session()() as s:
        calls = []
        event.listen(s, "do_orm_execute", lambda st: calls.append(marker.get()))
        tok = marker.set("request-1")
        try:
            s.execute(select(Account).where(Account.id == 1)).all()
            assert calls == ["request-1"]
            calls.clear()
            s.execute(select(Account).order_by(Account.id)).scalars().all()
            assert calls == ["request-1"] * len(tx.names)
        finally:
            marker.reset(tok)


_tenant_hidden: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant_hidden", default=None)


def test_do_orm_execute_criteria_from_context_apply_to_cross_shard_reads(tx):
    """The documented SQLAlchemy recipe: a do_orm_execute hook adds with_loader_criteria
    from request state held in a contextvar (soft delete, multi-tenancy).  A cross-shard
    read must be filtered like a single-shard one."""
    keys = tx.keys_on(tx.names[0], 2) + tx.keys_on(tx.names[1], 2)
    with tx.Session()() as s:
        s.add_all(Account(id=k, name="hidden" if i % 2 else "shown") for i, k in enumerate(keys))
        s.commit()
        token = s.consistency_token()  # (the reads below see these rows: a replica may lag)

    def hook(state):
        hidden = _tenant_hidden.get()
        if state.is_select and hidden is not None:
            state.statement = state.statement.options(
                with_loader_criteria(Account, Account.name != hidden, include_aliases=True))

    with tx.Session()(consistency_token=token) as s:
        event.listen(s, "do_orm_execute", hook)
        tok = _tenant_hidden.set("hidden")
        try:
            one = s.execute(select(Account).where(Account.id == keys[1])).scalars().all()
            assert one == []
            names = s.execute(select(Account.name).order_by(Account.id)).scalars().all()
            assert names == ["shown", "shown"]
        finally:
            _tenant_hidden.reset(tok)


def test_session_begin_context_manager_info_in_transaction(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[2], 1)[0]
    Session = tx.Session()
    with Session.begin() as s:
        s.info["request"] = "r1"
        s.add_all([Account(id=a), Account(id=b)])
        assert s.in_transaction()
    assert tx.ids(tx.names[0]) == {a} and tx.ids(tx.names[2]) == {b}
    with pytest.raises(RuntimeError):
        with Session.begin() as s:
            s.add(Account(id=a + 100000))
            s.flush()
            raise RuntimeError("boom")
    assert tx.ids(tx.names[0]) == {a} and tx.ids(tx.names[2]) == {b}
    with Session() as s:
        assert not s.in_transaction()
        s.get(Account, a)
        assert s.in_transaction()
        with s.begin_nested():
            assert s.in_nested_transaction()
        assert s.info == {}


def test_direct_construction_and_scoped_session(tx):
    a = tx.keys_on(tx.names[1], 1)[0]
    s = shardkit.ShardedSession(cluster=tx.cluster, expire_on_commit=False)
    try:
        u = Account(id=a, name="direct")
        s.add(u)
        s.commit()
        assert u.name == "direct"          # not expired
    finally:
        s.close()
    assert u.name == "direct"              # detached, still loaded
    # (Other sessions than the writer: they read the primary, not a replica maybe behind it.)
    reg = scoped_session(tx.Session(consistency="strong"))
    try:
        assert reg() is reg()
        assert reg.get(Account, a).name == "direct"
        got = {}
        t = threading.Thread(target=lambda: got.update(s=reg(), u=reg.get(Account, a)))
        t.start(); t.join()
        assert got["s"] is not reg() and got["u"].name == "direct"
        got["s"].close()
    finally:
        reg.remove()


def test_expire_on_commit_false_objects_usable_after_commit_on_two_shards(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[1], 1)[0]
    with tx.Session(expire_on_commit=False)() as s:
        ua, ub = Account(id=a, name="a"), Account(id=b, name="b")
        ua.notes.append(Note(id=1, body="n"))
        s.add_all([ua, ub])
        s.commit()
        assert not s.in_transaction()
        assert ua.name == "a" and ub.name == "b" and ua.notes[0].body == "n"
        ua.balance = 3
        s.commit()
    assert tx.rows(tx.names[0], "SELECT balance FROM tx_accounts") == [(3,)]
    assert tx.rows(tx.names[0], "SELECT account_id FROM tx_notes") == [(a,)]


# -- read-your-writes across savepoints and threads (replicas made to lag) -----------------------


@pytest.fixture
def lagging(tx):
    """Every replica applies commits 2 s late (the monitor still finds them fresh enough)."""
    tx.cluster.start_monitor()
    replicas = [tx.dev.shard(sh).replicas[0] for sh in tx.names]
    for r in replicas:
        r.set_apply_delay(2)
    try:
        yield tx
    finally:
        for r in replicas:
            r.set_apply_delay(0)


def test_lagging_replicas(lagging):
    """Several probes that need lagging replicas, in one test to pay for the delay once."""
    tx = lagging
    Session = tx.Session()
    # 1. commit() with a savepoint still open commits everything: read-your-writes holds.
    a = tx.keys_on(tx.names[0], 1)[0]
    with Session() as s:
        s.begin_nested()
        s.add(Account(id=a, name="in-savepoint"))
        s.commit()
        assert not s.in_transaction()
        assert tx.names[0] in s.consistency_token()
        s.expunge_all()
        assert s.get(Account, a) is not None

    # 2. Many threads, one sessionmaker, one Cluster: each session reads its own
    #    writes, and its token names only the shards it wrote.
    errors: list[str] = []
    barrier = threading.Barrier(9)

    def worker(i: int) -> None:
        shard = tx.names[i % 3]
        k = tx.keys_on(shard, 1, 10_000 + 1000 * i)[0]
        with Session() as s:
            barrier.wait()
            s.add(Account(id=k, name=f"t{i}"))
            s.commit()
            tok = s.consistency_token()
            others = [n for n in tx.names if n != shard and f"{n}=" in tok]
            if f"{shard}=" not in tok or others:
                errors.append(f"thread {i} wrote {shard}, token {tok}")
            for _ in range(3):
                s.expunge_all()
                got = s.get(Account, k)
                if got is None or got.name != f"t{i}":
                    errors.append(f"thread {i}: own write {k} on {shard} not visible")
                s.execute(select(func.count()).select_from(Account)).scalar_one()
                s.commit()

    with ThreadPoolExecutor(9) as pool:
        list(pool.map(worker, range(9)))
    assert errors == []

    # 3. A token handed to another session makes that session see the write.
    b = tx.keys_on(tx.names[1], 1, 50_000)[0]
    with Session() as s:
        s.add(Account(id=b, name="handed"))
        s.commit()
        token = s.consistency_token()
    with Session(consistency_token=token) as s2:
        assert s2.get(Account, b) is not None
    # ... and a session without it does not (the replica is 2 s behind): the probe works.
    with Session() as s3:
        assert s3.get(Account, b) is None


# -- scopes ------------------------------------------------------------------------------------


def test_scopes_nest_restore_and_follow_copied_contexts(tx):
    s0, s1, s2 = tx.names
    Session = tx.Session()
    with Session() as s:
        def port_now():
            return _port(s.connection())
        with shardkit.scope(shard=s1):
            assert port_now() == _primary_port(tx, s1)
            with shardkit.scope(shard=s2, role="primary"):
                assert shardkit.current_scope().shard == s2
            assert shardkit.current_scope() == shardkit.current_scope().__class__(shard=s1)
            with pytest.raises(ZeroDivisionError):
                with shardkit.scope(shard=s0):
                    1 / 0
            assert shardkit.current_scope().shard == s1
            # a copied context carries the scope into a thread; a plain thread does not
            ctx = contextvars.copy_context()
            seen = {}
            t = threading.Thread(target=lambda: seen.update(
                copied=ctx.run(lambda: shardkit.current_scope().shard)))
            t.start(); t.join()
            t = threading.Thread(target=lambda: seen.update(plain=shardkit.current_scope().shard))
            t.start(); t.join()
            assert seen == {"copied": s1, "plain": None}
        assert shardkit.current_scope().shard is None


def test_scope_key_routes_keyless_writes_of_two_sessions(tx):
    a = tx.keys_on(tx.names[2], 1)[0]
    _seed(tx, a)
    Session = tx.Session()
    with shardkit.scope(key=a):
        with Session() as s1, Session() as s2:
            s1.execute(update(Account).values(balance=Account.balance + 1))
            s1.commit()
            s2.execute(update(Account).values(balance=Account.balance + 1))
            s2.commit()
    assert tx.rows(tx.names[2], "SELECT balance FROM tx_accounts") == [(2,)]


# -- run_transaction -------------------------------------------------------------------------------


def test_run_transaction_retries_on_notowned_with_a_fresh_session(tx):
    a, b = tx.keys_on(tx.names[0], 1)[0], tx.keys_on(tx.names[1], 1)[0]
    sessions = []

    def fn(session):
        sessions.append(session)
        session.add(Account(id=a, name=f"try{len(sessions)}"))
        session.flush()
        if len(sessions) == 1:
            raise shardkit.NotOwned("simulated", shard=tx.names[1], bucket=1)
        session.add(Account(id=b, name="b"))
        return "done"

    assert shardkit.run_transaction(tx.Session(), fn) == "done"
    assert len(sessions) == 2 and sessions[0] is not sessions[1]
    assert tx.rows(tx.names[0], "SELECT name FROM tx_accounts") == [("try2",)]
    assert tx.ids(tx.names[1]) == {b}


def test_run_transaction_does_not_retry_other_errors(tx):
    calls = []

    def fn(session):
        calls.append(1)
        raise sa_exc.OperationalError("COMMIT", {}, Exception("connection lost during commit"))

    with pytest.raises(sa_exc.OperationalError):
        shardkit.run_transaction(tx.Session(), fn)
    assert calls == [1]


# -- a shard's connection lost between flush and commit ----------------------------------------------


def test_connection_lost_before_commit_then_rollback_and_reuse(tx):
    s0, s1 = tx.names[0], tx.names[1]
    a, b = tx.keys_on(s0, 1)[0], tx.keys_on(s1, 1)[0]
    Session = tx.Session()
    with Session() as s:
        s.add_all([Account(id=a, name="a"), Account(id=b, name="b")])
        s.flush()
        pid = s.connection(bind_arguments={"shard_id": s1}).execute(
            text("SELECT pg_backend_pid()")).scalar_one()
        with tx.cluster.primary(s1).connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa_exc.SQLAlchemyError):
            s.commit()
        s.rollback()
        assert b not in tx.ids(s1)
        # the session works again, on a fresh connection to s1
        s.add(Account(id=b, name="b2"))
        s.commit()
    assert tx.rows(s1, "SELECT name FROM tx_accounts") == [("b2",)]
    stats = tx.cluster.pool_stats()
    assert all(v is None or v["checkedout"] == 0 for v in stats.values()), stats


# -- a failed statement on one shard, then commit --------------------------------------------------------


def test_commit_after_failed_cross_shard_read_is_all_or_nothing(tx):
    """A cross-shard read fails on one shard (division by zero on that shard's rows) inside
    a transaction that wrote to two shards; the caller catches the ScatterError and commits.
    The failure aborted the transaction on that shard only, whose COMMIT then silently
    rolls back.  On one database the whole transaction would go (atomically); here commit()
    returns normally with one shard's writes kept and the other's discarded, and nobody is
    told.  (shardkit's own partial-results path rolls back everything for this reason.)"""
    s0, s1 = tx.names[0], tx.names[1]
    a, b = tx.keys_on(s0, 1)[0], tx.keys_on(s1, 1)[0]
    committed_ok = True
    with tx.Session()() as s:
        s.add_all([Account(id=a, name="a", balance=1), Account(id=b, name="b", balance=0)])
        s.flush()
        with pytest.raises(shardkit.ScatterError):
            s.execute(select(Account.id).where(100 / Account.balance > 0)).all()
        try:
            s.commit()
        except sa_exc.SQLAlchemyError:
            committed_ok = False
    on0, on1 = a in tx.ids(s0), b in tx.ids(s1)
    assert on0 == on1, (
        f"commit() {'returned normally' if committed_ok else 'raised'} but kept the write on "
        f"{s0 if on0 else s1} and silently discarded the one on {s1 if on0 else s0}")


def test_cross_shard_reads_and_deletes_inside_savepoint(tx):
    keys = tx.keys_on(tx.names[0], 2) + tx.keys_on(tx.names[1], 2)
    _seed(tx, *keys)
    with tx.Session()() as s:
        objs = s.execute(select(Account).order_by(Account.id)).scalars().all()
        assert len(objs) == 4
        sp = s.begin_nested()
        for o in objs[:3]:
            s.delete(o)
        assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 1
        s.execute(update(Account).values(balance=9).execution_options(shardkit_all_shards=True))
        sp.rollback()
        assert s.execute(select(func.count()).select_from(Account)).scalar_one() == 4
        assert all(o in s and o.balance == 0 for o in objs)
        s.delete(objs[0])
        s.commit()
    assert sum(len(tx.ids(sh)) for sh in tx.names) == 3


def test_failed_statement_on_one_shard_makes_commit_refuse_everything(tx):
    """A statement that fails on one shard (caught by the caller) aborts that shard's
    transaction: commit() raises CommitError naming it and commits nothing anywhere;
    after rollback() the session works again."""
    s0, s1 = tx.names[0], tx.names[1]
    a, b = tx.keys_on(s0, 1)[0], tx.keys_on(s1, 1)[0]
    with tx.Session()() as s:
        s.add_all([Account(id=a, name="a"), Account(id=b, name="b")])
        s.flush()
        with pytest.raises(sa_exc.DataError):
            s.execute(text("SELECT 1 / 0"), bind_arguments={"shard_id": s1})
        with pytest.raises(shardkit.CommitError) as info:
            s.commit()
        assert info.value.committed == [] and info.value.failed == s1
        assert s1 in str(info.value) and "rollback()" in str(info.value)
        s.rollback()
        assert a not in tx.ids(s0) and b not in tx.ids(s1)
        s.add(Account(id=a, name="again"))
        s.commit()
    assert a in tx.ids(s0)


def test_failed_statement_inside_a_savepoint_does_not_block_commit(tx):
    """The documented way to go on after an error: run it in begin_nested()."""
    s0, s1 = tx.names[0], tx.names[1]
    a, b = tx.keys_on(s0, 1)[0], tx.keys_on(s1, 1)[0]
    with tx.Session()() as s:
        s.add_all([Account(id=a, name="a"), Account(id=b, name="b")])
        s.flush()
        with pytest.raises(sa_exc.DataError):
            with s.begin_nested():
                s.execute(text("SELECT 1 / 0"), bind_arguments={"shard_id": s1})
        s.commit()
    assert a in tx.ids(s0) and b in tx.ids(s1)


def test_twophase_session_refuses_reads_forced_to_replicas(tx):
    Session = tx.Session(twophase=True, consistency="eventual")
    with Session() as s:
        with pytest.raises(shardkit.RoutingError, match="twophase"):
            s.execute(select(Account).where(Account.id == 1),
                      execution_options={"shardkit_role": "replica"}).all()
