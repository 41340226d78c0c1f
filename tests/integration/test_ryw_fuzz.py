"""Read-your-writes under a seeded random driver, against real streaming replicas that lag.

Each sequence writes (ORM flush, Core update/insert/delete, keyed or key-less, bulk
methods, text() on a named shard, an upsert, a reference table, a primary connection in
autocommit, ``run_transaction``) to one shard or several, inside or outside a savepoint,
and ends the transaction (commit, rollback, close, a savepoint's rollback); then reads of
many shapes (get, select by key, key-less scatter rows / count / sum / GROUP BY, exists,
lazy load, selectinload, joinedload, refresh, Query.count, populate_existing, scope(...),
expire_all, yield_per streams, reference rows) run in the same session, in a session given
its token, in older sessions holding older tokens, in a strong session and in sessions
with no token.  A model of every committed state of each shard says what each read may
show: a read under read-your-writes shows, for each shard, a state at least as new as the
session's last commit there (or the token's), its own transaction's writes exactly; a
strong read the latest state; a read with no token anything, but it must not fail.

Reads forced to primaries (strong, role="primary") show the latest state; a read under a
lag limit (max_lag_seconds, max_lag_bytes=0) shows every commit older than the limit (plus
LAG_SLACK); a read forced to a replica shows the session's writes or is refused; and within
one transaction no read shows an older state of a shard than an earlier read did
(every session, token or not).

Every replica lags: r0 applies each commit 2 s late, r1 0.4 s late, so replicas serve
reads whose tokens they have passed while lacking later writes of other sessions.  A
second Cluster over the same servers (its own monitor, wait_for_token = 0.5, random
policy) makes a third of the sessions: tokens pass between the two as between processes.

One 2-shard x 2-replica cluster serves the module.  RYW_FUZZ_SEED / RYW_FUZZ_SEQUENCES
override the seed and the number of sequences (default 25, times
``SHARDKIT_FUZZ_SCALE``: tests/fuzz_size.py), to hunt further.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
from sqlalchemy import BigInteger, ForeignKey, Integer, String, delete, exists, func, insert, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, selectinload, sessionmaker
from sqlalchemy.orm import exc as orm_exc

import shardkit
from shardkit._replicas import parse_token
from replica_env import ReplicaEnv, record_statements, replica_cluster, replica_env
from waiting import wait_replicas_usable

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RYW_FUZZ_SEED", 20241208))
SEQUENCES = fuzz_size("RYW_FUZZ_SEQUENCES", 25)
DELAYS = (2.0, 0.4)   # r0, r1 of each shard
# What a lag limit may be exceeded by: the monitor samples every 0.1 s, and its threads share
# two cores with the driver.
LAG_SLACK = 0.7
# Shapes whose observations are the database's rows, not objects the identity map kept.
FRESH = frozenset({
    "select_key", "scatter_rows", "scatter_entries", "group_counts", "exists", "count_key", "query_count",
    "yield_per_cols", "stmt_max_lag", "stmt_max_lag_bytes0", "role_primary_key", "populate_existing",
    "query_populate_existing", "joinedload_scatter", "joinedload_key", "scope_shard", "scope_max_lag",
    "strong_get", "primary_scope_selectin", "refresh", "strong_scope_lazy", "expire_all", "new_transaction",
    "in_savepoint", "for_update_then_key"})


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "rzf_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    n: Mapped[int] = mapped_column(Integer)
    entries: Mapped[list[Entry]] = relationship(lazy="select", order_by="Entry.id",
                                                cascade="all, delete-orphan", back_populates="account")


class Entry(Base):
    __tablename__ = "rzf_entries"
    account_id: Mapped[int] = mapped_column(ForeignKey("rzf_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(50))
    account: Mapped[Account] = relationship(back_populates="entries")


class Color(Base):
    __tablename__ = "rzf_colors"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


CONFIG = {"groups": {"rzf": {"tables": {"rzf_accounts": "id", "rzf_entries": "account_id"}}},
          "reference_tables": ["rzf_colors"]}
SHARDS = ("s0", "s1")
COLORS = (1, 2, 3)
ALL = {"shardkit_all_shards": True}


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata, CONFIG,
                           "rzf_accounts", "rzf_", replicas=2)


# -- the model ---------------------------------------------------------------------------


@dataclass
class State:
    """One shard's rows: accounts {id: (name, n)}, entries {(account, id): note}, its copy
    of the reference table {id: name}.  Never changed once committed (copied to change)."""
    acc: dict[int, tuple[str, int]]
    ent: dict[tuple[int, int], str]
    ref: dict[int, str]

    def copy(self) -> State:
        return State(dict(self.acc), dict(self.ent), dict(self.ref))


@dataclass
class Model:
    shard_of: dict[int, str]
    seq: int = 0
    times: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])   # (seq, committed by)
    cur: dict[str, State] = field(default_factory=dict)
    hist: dict[str, list[tuple[int, State]]] = field(default_factory=dict)

    def commit(self, work: dict[str, State], shards: set[str]) -> int:
        self.seq += 1
        self.times.append((self.seq, time.monotonic()))
        for sh in shards:
            if work[sh] != self.cur[sh]:
                self.cur[sh] = work[sh].copy()
                self.hist[sh].append((self.seq, self.cur[sh]))
        return self.seq

    def states(self, sh: str, floor: int) -> list[State]:
        """The states of ``sh`` a read at least as new as commit ``floor`` may show."""
        h = self.hist[sh]
        i = max(j for j, (seq, _) in enumerate(h) if seq <= floor)
        return [st for _, st in h[i:]]

    def committed_by(self, t: float) -> int:
        """The last commit known to have ended by monotonic time ``t``."""
        return max(seq for seq, at in self.times if at <= t)

    def work(self) -> dict[str, State]:
        return {sh: st.copy() for sh, st in self.cur.items()}

    def keys(self, sh: str | None = None) -> list[int]:
        return sorted(k for k, s in self.shard_of.items() if sh is None or s == sh)


# -- projections: what a read shows of a state -------------------------------------------


def p_acc(k):
    return lambda st: st.acc.get(k)


def p_ents(k):
    return lambda st: tuple(sorted((e, note) for (a, e), note in st.ent.items() if a == k))


def p_acc_rows(st):
    return frozenset((k, *v) for k, v in st.acc.items())


def p_ent_rows(st):
    return frozenset((a, e, note) for (a, e), note in st.ent.items())


def p_ent_count(st):
    return len(st.ent)


def p_n_sum(st):
    return sum(n for _, n in st.acc.values())


def p_ref(st):
    return frozenset(st.ref.items())


def p_exists(k, e):
    return lambda st: (k, e) in st.ent


def p_count_of(k):
    return lambda st: sum(1 for a, _ in st.ent if a == k)


def p_groups(st):
    return frozenset(Counter(a for a, _ in st.ent).items())


def p_joined(st):
    return frozenset((k, name, n, p_ents(k)(st)) for k, (name, n) in st.acc.items())


# -- readers --------------------------------------------------------------------------------


@dataclass
class Reader:
    """A session and what its reads may show: ``floors`` (shard -> commit seq) under
    read-your-writes, ``exact`` for strong reads, neither for a read with no guarantee."""
    name: str
    session: Any
    floors: dict[str, int] | None
    exact: bool = False
    written: set[str] = field(default_factory=set)     # this transaction's, read exactly
    work: dict[str, State] | None = None
    # Monotonic reads: the transaction these bounds are of, and per shard the index (in the
    # model's history) of the oldest state its reads so far may have shown.
    txn: Any = None
    oldest: dict[str, int] = field(default_factory=dict)


class Fuzz:
    def __init__(self, env: ReplicaEnv, model: Model, rng: random.Random) -> None:
        self.env, self.model, self.rng = env, model, rng
        self.failures: list[str] = []
        self.reads: Counter[str] = Counter()          # shape -> reads checked
        self.unchecked: Counter[str] = Counter()      # shape -> reads with no guarantee (ran)
        self.on_replica: Counter[str] = Counter()     # shape -> checked reads a replica served
        self.sequences: Counter[str] = Counter()
        self.mono_checked = 0
        self.factories = [env.Session, env.Session]
        self.trace: list[str] = []
        self.stamp = 0
        self.next_entry = 1000

    def new_stamp(self) -> str:
        self.stamp += 1
        return f"v{self.stamp}"

    # -- checking ------------------------------------------------------------------------

    def acceptable(self, r: Reader, sh: str, exact: bool, since: int | None) -> list[State]:
        if r.work is not None and sh in r.written:
            return [r.work[sh]]
        if exact:
            return [self.model.cur[sh]]
        return self.model.states(sh, max((r.floors or {}).get(sh, 0), since or 0))

    def check(self, r: Reader, shape: str, fn: Any, mode: Any = None) -> None:
        """Run the read ``fn(session)``, which returns observations: (shard, projection,
        value), or ("sum", projection, value) over every shard.  ``mode``: "exact" (a read
        forced to primaries: the latest state, whatever the session's consistency), or
        ("lag", seconds) (a lag limit: at least every commit that ended that long ago,
        plus LAG_SLACK for the monitor's sampling)."""
        n0 = len(self.env.served)
        since = None
        if isinstance(mode, tuple):
            since = self.model.committed_by(time.monotonic() - mode[1] - LAG_SLACK)
        try:
            obs = fn(r.session)
        except Exception as e:  # noqa: BLE001 - no read may fail
            self.failures.append(f"{shape} by {r.name} raised {type(e).__name__}: {e}\n  trace: "
                                 + " | ".join(self.trace[-6:]))
            raise
        nodes = self.env.nodes_since(n0)
        if mode == "forced":
            # A read forced to a replica under read-your-writes serves the session's writes or
            # is refused (no replica has them); with nothing to wait for it is never refused.
            if obs == [("refused", None, None)]:
                if not r.floors and not r.session.twophase:
                    self.failures.append(f"{shape} by {r.name} refused with no token to wait for; nodes {nodes}")
                self.unchecked[shape + "_refused"] += 1
                return
            if r.exact:
                self.unchecked[shape] += 1   # (strong does not override a forced replica)
                return
        if shape in FRESH:
            self.monotonic(r, shape, obs, nodes)
        exact = r.exact or mode == "exact"
        if r.floors is None and not exact and since is None:
            self.unchecked[shape] += 1
            return
        self.reads[shape] += 1
        if any("/r" in n for n in nodes):
            self.on_replica[shape] += 1
        for sh, proj, value in obs:
            if sh == "sum":
                ok: set[Any] = {0}
                for s in SHARDS:
                    ok = {a + proj(st) for a in ok for st in self.acceptable(r, s, exact, since)}
                if value not in ok:
                    self.fail(r, shape, sh, value, sorted(ok), nodes)
            elif sh == "any":   # reference rows: any one shard's copy
                ok_any = {proj(st) for s in SHARDS for st in self.acceptable(r, s, exact, since)}
                if value not in ok_any:
                    self.fail(r, shape, sh, value, list(ok_any), nodes)
            else:
                allowed = [proj(st) for st in self.acceptable(r, sh, exact, since)]
                if value not in allowed:
                    self.fail(r, shape, sh, value, allowed, nodes)

    def monotonic(self, r: Reader, shape: str, obs: list[Any], nodes: list[str]) -> None:
        """Within a transaction no read shows an older state of a shard than an earlier
        read did (README: a transaction reads each shard from one node, then its primary),
        whatever the session's consistency.  For reads that show the database's rows (not
        objects the identity map kept)."""
        txn = r.session.get_transaction()
        if txn is not r.txn:
            r.txn, r.oldest = txn, {}
        for sh, proj, value in obs:
            if sh not in SHARDS or (r.work is not None and sh in r.written):
                continue
            hist = self.model.hist[sh]
            low = r.oldest.get(sh, 0)
            i = next((i for i in range(low, len(hist)) if proj(hist[i][1]) == value), None)
            if i is not None:
                r.oldest[sh] = i
                self.mono_checked += 1
                continue
            older = [hist[j][0] for j in range(low) if proj(hist[j][1]) == value]
            self.failures.append(
                f"OLDER {shape} by {r.name} on {sh}: got {value!r}, the state of commits {older[-3:]} "
                f"only, older than commit {hist[low][0]} an earlier read of the transaction showed; "
                f"nodes {nodes}\n  trace: " + " | ".join(self.trace[-6:]))

    def fail(self, r: Reader, shape: str, sh: str, value: Any, allowed: Any, nodes: list[str]) -> None:
        self.failures.append(
            f"STALE {shape} by {r.name} on {sh}: got {value!r}, allowed {allowed[-3:]!r} "
            f"(floors {r.floors}, exact {r.exact}, written {r.written}); nodes {nodes}; "
            f"health {[(h['node'], h['lag_seconds'], h['lag_bytes']) for h in self.env.cluster.health().nodes]}; "
            f"model seq {self.model.seq}\n  trace: " + " | ".join(self.trace[-6:]))

    # -- read shapes --------------------------------------------------------------------------

    def read_shapes(self, mid_transaction: bool) -> list[tuple[str, Any, Any]]:
        """(shape, fn(session) -> observations, mode: see check); ``mid_transaction``: only the shapes that
        show the database's rows whatever the identity map holds."""
        m, rng = self.model, self.rng
        k = rng.choice(m.keys())
        sk = m.shard_of[k]
        keys = m.keys()
        e = rng.choice([e for (a, e) in m.cur[sk].ent if a == k] or [1])

        def select_key(s):
            row = s.execute(select(Account.name, Account.n).where(Account.id == k)).one_or_none()
            return [(sk, p_acc(k), None if row is None else tuple(row))]

        def scatter_rows(s):
            rows = s.execute(select(Account.id, Account.name, Account.n).where(Account.id.in_(keys))).all()
            return [(sh, p_acc_rows, frozenset(tuple(x) for x in rows if m.shard_of[x[0]] == sh))
                    for sh in SHARDS]

        def scatter_entries(s):
            rows = s.execute(select(Entry.account_id, Entry.id, Entry.note).order_by(Entry.id)).all()
            return [(sh, p_ent_rows, frozenset(tuple(x) for x in rows if m.shard_of[x[0]] == sh))
                    for sh in SHARDS]

        def count_all(s):
            return [("sum", p_ent_count, s.scalar(select(func.count()).select_from(Entry)))]

        def sum_n(s):
            return [("sum", p_n_sum, s.scalar(select(func.sum(Account.n))) or 0)]

        def group_counts(s):
            rows = s.execute(select(Entry.account_id, func.count()).group_by(Entry.account_id)).all()
            return [(sh, p_groups, frozenset((a, c) for a, c in rows if m.shard_of[a] == sh)) for sh in SHARDS]

        def exists_key(s):
            return [(sk, p_exists(k, e), s.scalar(select(exists().where(Entry.account_id == k, Entry.id == e))))]

        def count_key(s):
            return [(sk, p_count_of(k), s.scalar(select(func.count()).where(Entry.account_id == k)))]

        def query_count(s):
            return [(sk, p_count_of(k), s.query(Entry).filter_by(account_id=k).count())]

        def query_count_all(s):
            return [("sum", lambda st: len(st.acc), s.query(Account).count())]

        def ref_rows(s):
            return [("any", p_ref, frozenset(tuple(x) for x in s.execute(select(Color.id, Color.name))))]

        def yield_cols(s):
            rows = list(s.execute(select(Account.id, Account.name, Account.n).where(Account.id.in_(keys))
                                  .execution_options(yield_per=2)))
            return [(sh, p_acc_rows, frozenset(tuple(x) for x in rows if m.shard_of[x[0]] == sh))
                    for sh in SHARDS]

        stmt_lag_s = rng.choice([0.3, 30.0])

        def stmt_lag_bytes(s):
            rows = s.execute(select(Account.id, Account.name, Account.n).where(Account.id.in_(keys))
                             .execution_options(shardkit_max_lag_bytes=0)).all()
            return [(sh, p_acc_rows, frozenset(tuple(x) for x in rows if m.shard_of[x[0]] == sh))
                    for sh in SHARDS]

        def strong_count(s):
            return [("sum", p_ent_count, s.scalar(select(func.count()).select_from(Entry)
                                                  .execution_options(shardkit_consistency="strong")))]

        def primary_key_read(s):
            row = s.execute(select(Account.name, Account.n).where(Account.id == k)
                            .execution_options(shardkit_role="primary")).one_or_none()
            return [(sk, p_acc(k), None if row is None else tuple(row))]

        shapes = [("select_key", select_key), ("scatter_rows", scatter_rows),
                  ("scatter_entries", scatter_entries), ("count_all", count_all), ("sum_n", sum_n),
                  ("group_counts", group_counts), ("exists", exists_key), ("count_key", count_key),
                  ("query_count", query_count), ("query_count_all", query_count_all),
                  ("ref_rows", ref_rows), ("yield_per_cols", yield_cols)]
        shapes = [(name, fn, None) for name, fn in shapes] + [
            ("stmt_max_lag_bytes0", stmt_lag_bytes, ("lag", 0.0)), ("strong_count", strong_count, "exact"),
            ("role_primary_key", primary_key_read, "exact")]
        if mid_transaction:
            return shapes

        def acc_value(a):
            return None if a is None else (a.name, a.n)

        def get(s):
            return [(sk, p_acc(k), acc_value(s.get(Account, k)))]

        def select_entity(s):
            return [(sk, p_acc(k), acc_value(s.scalars(select(Account).where(Account.id == k)).one_or_none()))]

        def lazy(s):
            a = s.get(Account, k)
            if a is None:
                return [(sk, p_acc(k), None)]
            out = [(sk, p_acc(k), acc_value(a))]
            return [*out, (sk, p_ents(k), tuple((x.id, x.note) for x in a.entries))]

        def selectin(s):
            accs = s.scalars(select(Account).where(Account.id.in_(keys)).options(selectinload(Account.entries))).all()
            out = []
            for sh in SHARDS:
                mine = [a for a in accs if m.shard_of[a.id] == sh]
                out.append((sh, p_acc_rows, frozenset((a.id, a.name, a.n) for a in mine)))
                for a in mine:
                    out.append((sh, p_ents(a.id), tuple((x.id, x.note) for x in a.entries)))
            return out

        def joined(s):
            accs = s.scalars(select(Account).options(joinedload(Account.entries))
                             .execution_options(populate_existing=True)).unique().all()
            return [(sh, p_joined, frozenset((a.id, a.name, a.n, tuple((x.id, x.note) for x in a.entries))
                                             for a in accs if m.shard_of[a.id] == sh)) for sh in SHARDS]

        def joined_key(s):
            a = s.scalars(select(Account).where(Account.id == k).options(joinedload(Account.entries))
                          .execution_options(populate_existing=True)).unique().one_or_none()
            if a is None:
                return [(sk, p_acc(k), None)]
            return [(sk, p_acc(k), acc_value(a)), (sk, p_ents(k), tuple((x.id, x.note) for x in a.entries))]

        def refresh(s):
            a = s.get(Account, k)
            if a is None:
                return [(sk, p_acc(k), None)]
            try:
                s.refresh(a)
            except sa_exc.InvalidRequestError:
                return [(sk, p_acc(k), None)]
            return [(sk, p_acc(k), acc_value(a))]

        def populate(s):
            a = s.execute(select(Account).where(Account.id == k)
                          .execution_options(populate_existing=True)).scalar_one_or_none()
            return [(sk, p_acc(k), acc_value(a))]

        def query_populate(s):
            a = s.query(Account).populate_existing().filter(Account.id == k).one_or_none()
            return [(sk, p_acc(k), acc_value(a))]

        def after_expire_all(s):
            a = s.get(Account, k)
            s.expire_all()
            if a is None:
                return [(sk, p_acc(k), None)]
            try:
                return [(sk, p_acc(k), (a.name, a.n))]
            except orm_exc.ObjectDeletedError:
                return [(sk, p_acc(k), None)]

        def in_scope_key(s):
            with shardkit.scope(key=k):
                return [(sk, p_acc(k), acc_value(s.get(Account, k))),
                        (sk, p_count_of(k), s.scalar(select(func.count()).select_from(Entry)
                                                     .where(Entry.account_id == k)))]

        def in_scope_shard(s):
            with shardkit.scope(shard=sk):
                rows = s.execute(select(Account.id, Account.name, Account.n)).all()
            return [(sk, p_acc_rows, frozenset(tuple(x) for x in rows))]

        scope_lag = rng.choice([0.3, 1.0, 60.0])

        def in_scope_lag(s):
            with shardkit.scope(max_lag_seconds=scope_lag):
                return [(sk, p_acc(k), acc_value(s.get(Account, k, populate_existing=True)))]

        def stmt_lag(s):
            row = s.execute(select(Account.name, Account.n).where(Account.id == k)
                            .execution_options(shardkit_max_lag_seconds=stmt_lag_s)).one_or_none()
            return [(sk, p_acc(k), None if row is None else tuple(row))]

        def strong_get(s):
            a = s.get(Account, k, populate_existing=True,
                      execution_options={"shardkit_consistency": "strong"})
            return [(sk, p_acc(k), acc_value(a))]

        def strong_scope_lazy(s):
            s.expire_all()
            with shardkit.scope(consistency="strong"):
                a = s.get(Account, k)
                if a is None:
                    return [(sk, p_acc(k), None)]
                return [(sk, p_acc(k), acc_value(a)), (sk, p_ents(k), tuple((x.id, x.note) for x in a.entries))]

        def primary_scope_selectin(s):
            with shardkit.scope(role="primary"):
                accs = s.scalars(select(Account).options(selectinload(Account.entries))
                                 .execution_options(populate_existing=True)).all()
                return [(sh, p_joined, frozenset((a.id, a.name, a.n, tuple((x.id, x.note) for x in a.entries))
                                                 for a in accs if m.shard_of[a.id] == sh)) for sh in SHARDS]

        def yield_entities(s):
            accs = list(s.scalars(select(Account).where(Account.id.in_(keys)).execution_options(yield_per=3)))
            return [(sh, p_acc_rows, frozenset((a.id, a.name, a.n) for a in accs if m.shard_of[a.id] == sh))
                    for sh in SHARDS]

        def query_yield(s):
            accs = list(s.query(Account).filter(Account.id.in_(keys)).yield_per(2))
            return [(sh, p_acc_rows, frozenset((a.id, a.name, a.n) for a in accs if m.shard_of[a.id] == sh))
                    for sh in SHARDS]

        def in_savepoint(s):
            with s.begin_nested():
                return select_key(s)

        def for_update(s):
            row = s.execute(select(Account.name, Account.n).where(Account.id == k).with_for_update()).one_or_none()
            out = [*select_key(s), (sk, p_acc(k), None if row is None else tuple(row))]
            s.rollback()   # (the lock would hold a later writer of this single-threaded driver)
            return out

        def forced_replica(s):
            try:
                row = s.execute(select(Account.name, Account.n).where(Account.id == k)
                                .execution_options(shardkit_role="replica")).one_or_none()
            except shardkit.ShardUnavailable:
                return [("refused", None, None)]
            except shardkit.RoutingError:
                if not s.twophase:
                    raise
                return [("refused", None, None)]   # (documented: a two-phase session reads primaries)
            return [(sk, p_acc(k), None if row is None else tuple(row))]

        def new_txn(s):
            s.commit()
            return select_key(s)

        return shapes + [
            ("scope_max_lag", in_scope_lag, ("lag", scope_lag)), ("stmt_max_lag", stmt_lag, ("lag", stmt_lag_s)),
            ("forced_replica", forced_replica, "forced"),
            ("strong_get", strong_get, "exact"), ("strong_scope_lazy", strong_scope_lazy, "exact"),
            ("primary_scope_selectin", primary_scope_selectin, "exact")] + [(name, fn, None) for name, fn in [
            ("get", get), ("select_entity", select_entity), ("lazy_load", lazy), ("selectinload", selectin),
            ("joinedload_scatter", joined), ("joinedload_key", joined_key), ("refresh", refresh),
            ("populate_existing", populate), ("query_populate_existing", query_populate),
            ("expire_all", after_expire_all), ("scope_key", in_scope_key), ("scope_shard", in_scope_shard),
            ("in_savepoint", in_savepoint), ("for_update_then_key", for_update),
            ("yield_per_entities", yield_entities), ("query_yield_per", query_yield), ("new_transaction", new_txn)]]

    def read_some(self, r: Reader, count: int, mid_transaction: bool = False) -> None:
        shapes = self.read_shapes(mid_transaction)
        for shape, fn, mode in self.rng.sample(shapes, min(count, len(shapes))):
            self.trace.append(f"read {shape} by {r.name}")
            self.check(r, shape, fn, mode)

    # -- writes: each applies itself to ``work`` and returns the shards it wrote ----------------

    def write_op(self, s: Any, work: dict[str, State]) -> tuple[str, set[str]]:
        m, rng = self.model, self.rng
        k = rng.choice(m.keys())
        sk = m.shard_of[k]
        st = work[sk]
        v = self.new_stamp()
        op = rng.choice(["orm_update", "orm_add_entry", "orm_append_entry", "orm_delete_entry",
                         "orm_delete_account", "core_insert_account", "core_update_key", "core_update_in",
                         "core_update_keyless", "core_insert_entries", "core_delete_key",
                         "core_delete_keyless", "bulk_update_mappings", "bulk_insert_mappings",
                         "bulk_save_objects", "orm_bulk_update", "text_update", "ref_update",
                         "ref_orm_update", "upsert", "connection_for_shard", "merge", "insert_returning",
                         "query_update", "query_delete"])
        wrote: set[str] = set()
        if op == "orm_update":
            a = s.get(Account, k)
            if a is not None:
                n = rng.randrange(100)
                a.name, a.n = v, n
                s.flush()
                if k in st.acc:
                    st.acc[k] = (v, n)
                wrote = {sk}
        elif op in ("orm_add_entry", "orm_append_entry"):
            if k in st.acc:
                self.next_entry += 1
                e = self.next_entry
                if op == "orm_add_entry":
                    s.add(Entry(account_id=k, id=e, note=v))
                else:
                    a = s.get(Account, k)
                    if a is None:
                        return op + " (skipped)", set()
                    a.entries.append(Entry(id=e, note=v))
                s.flush()
                st.ent[(k, e)] = v
                wrote = {sk}
        elif op == "orm_delete_entry":
            mine = [e for (a, e) in st.ent if a == k]
            if mine:
                e = rng.choice(mine)
                obj = s.get(Entry, (k, e))
                if obj is not None:
                    s.delete(obj)
                    s.flush()
                    del st.ent[(k, e)]
                    wrote = {sk}
        elif op == "orm_delete_account":
            a = s.get(Account, k)
            if a is not None and k in st.acc:
                s.delete(a)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", sa_exc.SAWarning)
                    s.flush()
                del st.acc[k]
                for key in [x for x in st.ent if x[0] == k]:
                    del st.ent[key]
                wrote = {sk}
        elif op == "core_insert_account":
            if k not in st.acc:
                s.execute(insert(Account).values(id=k, name=v, n=1))
                st.acc[k] = (v, 1)
                wrote = {sk}
        elif op == "core_update_key":
            s.execute(update(Account).where(Account.id == k).values(name=v, n=Account.n + 1))
            if k in st.acc:
                st.acc[k] = (v, st.acc[k][1] + 1)
            wrote = {sk}
        elif op == "core_update_in":
            ks = rng.sample(m.keys(), 3)
            s.execute(update(Account).where(Account.id.in_(ks)).values(n=Account.n + 2))
            for x in ks:
                w = work[m.shard_of[x]]
                if x in w.acc:
                    w.acc[x] = (w.acc[x][0], w.acc[x][1] + 2)
            wrote = {m.shard_of[x] for x in ks}
        elif op == "core_update_keyless":
            r = rng.randrange(5)
            s.execute(update(Account).where(Account.n % 5 == r).values(name=v), execution_options=ALL)
            for sh in SHARDS:
                for x, (_, n) in list(work[sh].acc.items()):
                    if n % 5 == r:
                        work[sh].acc[x] = (v, n)
            wrote = set(SHARDS)
        elif op == "core_insert_entries":
            rows = []
            for x in rng.sample(m.keys(), 3):
                if x in work[m.shard_of[x]].acc:
                    self.next_entry += 1
                    rows.append({"account_id": x, "id": self.next_entry, "note": v})
            if rows:
                s.execute(insert(Entry), rows)
                for row in rows:
                    work[m.shard_of[row["account_id"]]].ent[(row["account_id"], row["id"])] = v
                wrote = {m.shard_of[row["account_id"]] for row in rows}
        elif op == "core_delete_key":
            mine = [e for (a, e) in st.ent if a == k]
            e = rng.choice(mine) if mine else 1
            s.execute(delete(Entry).where(Entry.account_id == k, Entry.id == e))
            st.ent.pop((k, e), None)
            wrote = {sk}
        elif op == "core_delete_keyless":
            notes = sorted({note for sh in SHARDS for note in work[sh].ent.values()})
            note = rng.choice(notes) if notes else "none"
            s.execute(delete(Entry).where(Entry.note == note), execution_options=ALL)
            for sh in SHARDS:
                for key in [x for x, nn in work[sh].ent.items() if nn == note]:
                    del work[sh].ent[key]
            wrote = set(SHARDS)
        elif op == "bulk_update_mappings":
            ks = [x for x in rng.sample(m.keys(), 3) if x in work[m.shard_of[x]].acc]
            if ks:
                s.bulk_update_mappings(Account, [{"id": x, "name": v} for x in ks])
                for x in ks:
                    w = work[m.shard_of[x]]
                    w.acc[x] = (v, w.acc[x][1])
                wrote = {m.shard_of[x] for x in ks}
        elif op in ("bulk_insert_mappings", "bulk_save_objects"):
            rows = []
            for x in rng.sample(m.keys(), 2):
                if x in work[m.shard_of[x]].acc:
                    self.next_entry += 1
                    rows.append({"account_id": x, "id": self.next_entry, "note": v})
            if rows:
                if op == "bulk_insert_mappings":
                    s.bulk_insert_mappings(Entry, rows)
                else:
                    s.bulk_save_objects([Entry(**row) for row in rows])
                for row in rows:
                    work[m.shard_of[row["account_id"]]].ent[(row["account_id"], row["id"])] = v
                wrote = {m.shard_of[row["account_id"]] for row in rows}
        elif op == "orm_bulk_update":
            ks = [x for x in rng.sample(m.keys(), 3) if x in work[m.shard_of[x]].acc]
            if ks:
                n = rng.randrange(100)
                s.execute(update(Account), [{"id": x, "n": n} for x in ks])
                for x in ks:
                    w = work[m.shard_of[x]]
                    w.acc[x] = (w.acc[x][0], n)
                wrote = {m.shard_of[x] for x in ks}
        elif op == "text_update":
            s.execute(text("UPDATE rzf_accounts SET name = :v WHERE id = :k"), {"v": v, "k": k},
                      bind_arguments={"shard_id": sk})
            if k in st.acc:
                st.acc[k] = (v, st.acc[k][1])
            wrote = {sk}
        elif op == "connection_for_shard":
            s.connection_for_shard(sk).execute(text("UPDATE rzf_accounts SET n = n + 3 WHERE id = :k"), {"k": k})
            if k in st.acc:
                st.acc[k] = (st.acc[k][0], st.acc[k][1] + 3)
            wrote = {sk}
        elif op == "ref_update":
            c = rng.choice(COLORS)
            s.execute(update(Color).where(Color.id == c).values(name=v))
            for sh in SHARDS:
                work[sh].ref[c] = v
            wrote = set(SHARDS)
        elif op == "ref_orm_update":
            c = rng.choice(COLORS)
            obj = s.get(Color, c)
            obj.name = v
            s.flush()
            for sh in SHARDS:
                work[sh].ref[c] = v
            wrote = set(SHARDS)
        elif op == "upsert":
            s.execute(pg_insert(Account).values(id=k, name=v, n=7)
                      .on_conflict_do_update(index_elements=[Account.id], set_={"name": v}))
            st.acc[k] = (v, st.acc[k][1] if k in st.acc else 7)
            wrote = {sk}
        elif op == "merge":
            n = st.acc[k][1] if k in st.acc else 5
            s.merge(Account(id=k, name=v, n=n))
            s.flush()
            st.acc[k] = (v, n)
            wrote = {sk}
        elif op == "insert_returning":
            if k in st.acc:
                self.next_entry += 1
                got = s.execute(insert(Entry).values(account_id=k, id=self.next_entry, note=v)
                                .returning(Entry.id)).scalar_one()
                assert got == self.next_entry
                st.ent[(k, got)] = v
                wrote = {sk}
        elif op == "query_update":
            s.query(Account).filter(Account.id == k).update({"name": v})
            if k in st.acc:
                st.acc[k] = (v, st.acc[k][1])
            wrote = {sk}
        elif op == "query_delete":
            mine = [e for (a, e) in st.ent if a == k]
            e = rng.choice(mine) if mine else 1
            s.query(Entry).filter(Entry.account_id == k, Entry.id == e).delete()
            st.ent.pop((k, e), None)
            wrote = {sk}
        return f"{op}({k})", wrote

    # -- sequences ------------------------------------------------------------------------------

    def transaction(self, r: Reader) -> None:
        """1-4 writes (some in a savepoint), reads in the transaction, then its end: commit,
        rollback, close, or the end of a ``with session.begin():`` block."""
        s, rng = r.session, self.rng
        work = self.model.work()
        r.work, r.written = work, set()
        ops: list[str] = []
        end = "begin_block" if not s.in_transaction() and rng.random() < 0.2 else \
            rng.choices(["commit", "rollback", "close"], [7, 2, 1])[0]
        try:
            if end == "begin_block":
                with s.begin():
                    self.ops(r, work, ops)
            else:
                self.ops(r, work, ops)
        except (orm_exc.StaleDataError, sa_exc.IntegrityError) as e:
            # A row this session read from a replica was changed on the primary since: the
            # ORM's own conflict, not shardkit's (nothing of it commits).
            s.rollback()
            r.work, r.written = None, set()
            self.sequences["conflict"] += 1
            self.trace.append(f"{r.name}: {', '.join(ops)} -> conflict {type(e).__name__}")
            return
        self.trace.append(f"{r.name}: {', '.join(ops)} -> {end}")
        written = r.written
        r.work, r.written = None, set()
        if end in ("commit", "begin_block"):
            if end == "commit":
                s.commit()
            seq = self.model.commit(work, written)
            for sh in written:
                r.floors[sh] = seq
            token = parse_token(s.consistency_token())
            if not set(r.floors) <= set(token):
                self.failures.append(f"token {s.consistency_token()} of {r.name} lacks shards of its "
                                     f"writes {sorted(r.floors)}; trace: {self.trace[-1]}")
        elif end == "rollback":
            s.rollback()
        else:
            s.close()
        self.sequences[f"transaction/{end}"] += 1

    def ops(self, r: Reader, work: dict[str, State], ops: list[str]) -> None:
        s, rng = r.session, self.rng
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.2:
                before, written_before = {sh: st.copy() for sh, st in work.items()}, set(r.written)
                sp = s.begin_nested()
                op, wrote = self.write_op(s, work)
                r.written |= wrote
                if rng.random() < 0.5:
                    sp.rollback()
                    work.update(before)
                    r.written = written_before
                    ops.append(f"savepoint[{op}] rolled back")
                else:
                    sp.commit()
                    ops.append(f"savepoint[{op}] released")
            else:
                op, wrote = self.write_op(s, work)
                r.written |= wrote
                ops.append(op)
            if rng.random() < 0.3:
                self.trace.append(f"{r.name}: " + ", ".join(ops))
                self.read_some(r, 2, mid_transaction=True)

    def autocommitted(self, r: Reader) -> None:
        """Writes on a primary connection put in autocommit: each commits as it runs; the
        transaction then ends with a commit, a rollback or a close."""
        s, m, rng = r.session, self.model, self.rng
        sh = rng.choice(SHARDS)
        if s.in_transaction():
            s.rollback()   # (a connection the transaction holds keeps its isolation level)
        conn = s.connection(bind_arguments={"shard_id": sh}, execution_options={"isolation_level": "AUTOCOMMIT"})
        ops = []
        for _ in range(rng.randint(1, 2)):
            k = rng.choice(m.keys(sh))
            v = self.new_stamp()
            conn.execute(text("UPDATE rzf_accounts SET name = :v, n = n + 1 WHERE id = :k"), {"v": v, "k": k})
            work = m.work()
            if k in work[sh].acc:
                work[sh].acc[k] = (v, work[sh].acc[k][1] + 1)
            seq = m.commit(work, {sh})
            ops.append(f"autocommit update({k})")
        end = rng.choice(["commit", "rollback", "close"])
        getattr(s, end)()
        r.floors[sh] = seq
        self.trace.append(f"{r.name}: {', '.join(ops)} -> {end}")
        self.sequences[f"autocommit/{end}"] += 1

    def run_txn(self) -> dict[str, int]:
        """run_transaction with on_commit: the floors its token stands for."""
        work = self.model.work()
        written: set[str] = set()
        got: list[str] = []
        ops: list[str] = []

        def fn(s):
            for _ in range(self.rng.randint(1, 3)):
                op, wrote = self.write_op(s, work)
                written.update(wrote)
                ops.append(op)

        try:
            shardkit.run_transaction(self.rng.choice(self.factories), fn, retries=0, on_commit=got.append)
        except (orm_exc.StaleDataError, sa_exc.IntegrityError):
            self.sequences["conflict"] += 1
            self.trace.append(f"run_transaction: {', '.join(ops)} -> conflict")
            return {}
        seq = self.model.commit(work, written)
        self.trace.append(f"run_transaction: {', '.join(ops)} -> token {got[0]}")
        self.sequences["run_transaction"] += 1
        return {sh: seq for sh in written}


def test_read_your_writes_fuzz(env):
    rng = random.Random(SEED)
    m = Model({k: env.cluster.shard_for("rzf_accounts", k) for sh in SHARDS for k in
               [env.key(sh) for _ in range(4)]})
    with env.Session() as s:
        s.add_all(Account(id=k, name="init", n=0) for k in m.keys())
        s.add_all(Entry(account_id=k, id=e, note=f"init{e}") for k in m.keys() for e in (1, 2))
        s.add_all(Color(id=c, name="c") for c in COLORS)
        s.commit()
    env.caught_up()
    for sh in SHARDS:
        st = State({k: ("init", 0) for k in m.keys(sh)},
                   {(k, e): f"init{e}" for k in m.keys(sh) for e in (1, 2)}, {c: "c" for c in COLORS})
        m.cur[sh] = st
        m.hist[sh] = [(0, st)]
    fz = Fuzz(env, m, rng)
    # Another process's view of the same servers: its own monitor, waiting up to 0.5 s for a
    # replica to reach a token (wait_for_token), choosing replicas at random; tokens pass
    # between the two as between a web process and a worker.
    other = replica_cluster(env.dev, CONFIG, Base.metadata, wait_for_token=0.5, policy="random")
    record_statements(other, env.served)
    other.start_monitor()
    fz.factories.append(sessionmaker(class_=shardkit.ShardedSession, cluster=other))

    def Session(**kw):
        return rng.choice(fz.factories)(**kw)

    replicas = [r for sh in SHARDS for r in env.dev.shard(sh).replicas]
    started = time.monotonic()
    try:
        for r, delay in zip(replicas, DELAYS * len(SHARDS)):
            r.set_apply_delay(delay)
        wait_replicas_usable(env.cluster, every=True)
        wait_replicas_usable(other, every=True)
        keep = [Reader(f"kept{i}", Session(), {}) for i in range(3)]
        chain: Reader | None = None
        for i in range(SEQUENCES):
            kind = rng.choices(["transaction", "autocommit", "run_transaction", "pause"], [12, 2, 2, 1])[0]
            if kind == "pause":
                time.sleep(rng.choice([0.3, 0.6, 1.2]))
                fz.sequences["pause"] += 1
                continue
            if kind == "run_transaction":
                floors = fz.run_txn()
                token = fz.trace[-1].rpartition("token ")[2] if floors else ""
                writer = None
            else:
                pick = rng.random()
                if pick < 0.5:
                    writer = rng.choice(keep)
                elif pick < 0.65 and chain is not None:
                    writer = chain
                else:
                    kw = rng.choice([{}, {}, {"twophase": True}, {"expire_on_commit": False},
                                     {"autoflush": False}])
                    writer = Reader(f"new{i}{sorted(kw)}", Session(**kw), {})
                if kind == "autocommit" and writer.session.twophase:
                    kind = "transaction"   # (psycopg refuses a two-phase transaction in autocommit)
                (fz.transaction if kind == "transaction" else fz.autocommitted)(writer)
                floors, token = dict(writer.floors), writer.session.consistency_token()
            readers: list[Reader] = []
            if writer is not None:
                readers.append(writer)
            given = Reader(f"token{i}", Session(consistency_token=token), dict(floors))
            readers.append(given)
            late = Reader(f"required{i}", Session(), dict(floors))
            late.session.execute(select(Account.id).where(Account.id == rng.choice(m.keys())))  # pins a node
            late.session.require_token(token)
            readers.append(late)
            readers.append(rng.choice(keep))
            readers.append(Reader(f"strong{i}", Session(consistency="strong"), None, exact=True))
            readers.append(Reader(f"none{i}", Session(), None))
            readers.append(Reader(f"eventual{i}", Session(consistency="eventual",
                                                              consistency_token=token), None))
            if chain is not None and chain is not writer:
                readers.append(chain)
            for rd in readers:
                fz.read_some(rd, rng.randint(2, 5))
                if rd.name.startswith(("kept", "chain")):
                    # (or not: the next sequence's writes follow these reads in their transaction)
                    rng.choice([rd.session.rollback, rd.session.commit, lambda: None])()
                elif rd is not given:
                    rd.session.close()
            if rng.random() < 0.3:
                # The session given the token carries on: it writes later, and hands on its token.
                if chain is not None:
                    chain.session.close()
                chain, given.name = given, f"chain{i}"
            else:
                given.session.close()
        for rd in [*keep, *([chain] if chain else [])]:
            rd.session.close()
    finally:
        for r in replicas:
            r.set_apply_delay(0)
        other.dispose()
    elapsed = time.monotonic() - started
    summary = (f"{SEQUENCES} sequences in {elapsed:.1f} s: {dict(fz.sequences)}; reads checked "
               f"{sum(fz.reads.values())} (on a replica {sum(fz.on_replica.values())}), unchecked "
               f"{sum(fz.unchecked.values())}; monotonic checks {fz.mono_checked}; by shape: "
               + ", ".join(f"{k} {v}/{fz.on_replica[k]}r" for k, v in sorted(fz.reads.items())))
    print(summary)
    assert not fz.failures, summary + "\n" + "\n".join(fz.failures[:10])
