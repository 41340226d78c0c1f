"""The keyed SELECT's short path on shards without replicas
(_plain_read -> _primary_read, which skips Session.execute and get_bind and runs the
statement on the shard's primary with load options built in advance).

Each case runs twice, each time in a fresh session of a fresh cluster whose shards have
no replicas: once as it is, once with every short path closed (``_short_path_open``
returning False, so each read takes execute()'s general path).  The two outcomes must be
equal: the rows and objects (with their identity keys, identity token included), the
error (type and message), the shards the session counts as written, and the statements
each node ran.  Each case also says how many reads the short path must serve (calls of
``_primary_read``), so a case cannot quietly compare the general path with itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, Column, ForeignKey, Integer, String, Table, bindparam, event, func, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    attributes,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
    with_loader_criteria,
)

import shardkit
import shardkit._session as sk_session

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "kss_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20), default="")
    entries = relationship("Entry", back_populates="account", order_by="Entry.id")


class Entry(Base):
    """Composite primary key, sharded by its account."""
    __tablename__ = "kss_entries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("kss_accounts.id"), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)
    account = relationship("Account", back_populates="entries")


class Tag(Base):
    """A text shard key."""
    __tablename__ = "kss_tags"
    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    label: Mapped[str] = mapped_column(String(20), default="")


class Currency(Base):
    """A reference table (the same rows on every shard)."""
    __tablename__ = "kss_currencies"
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


# A Core table, not mapped.
events = Table("kss_events", Base.metadata,
               Column("k", BigInteger, primary_key=True, autoincrement=False),
               Column("what", String(20)))

CONFIG = {
    "groups": {
        "accounts": {"tables": {"kss_accounts": "id", "kss_entries": "account_id"}},
        "tags": {"tables": {"kss_tags": "code"}},
        "events": {"tables": {"kss_events": "k"}},
    },
    "reference_tables": ["kss_currencies"],
}
ACCOUNTS = range(1, 9)
TAGS = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]


@pytest.fixture(scope="module")
def dev(shardkit_dev_cluster):
    """The shared servers, with this module's tables made and filled once (every case
    rolls its session back)."""
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
            s.add_all([Account(id=i, name=f"a{i}", entries=[Entry(id=1, n=i), Entry(id=2, n=-i)])
                       for i in ACCOUNTS])
            s.add_all([Tag(code=c, label=c.upper()) for c in TAGS])
            s.execute(events.insert(), [{"k": k, "what": f"e{k}"} for k in ACCOUNTS])
            s.commit()
        for shard in cluster.shard_names:
            with cluster.primary(shard).begin() as c:
                c.execute(Currency.__table__.insert(), [{"code": "EUR", "name": "euro"},
                                                        {"code": "USD", "name": "dollar"}])
        yield shardkit_dev_cluster


def _no_replica_cluster(dev: Any, **replicas: Any) -> shardkit.Cluster:
    cfg = dev.config_dict()
    for sh in cfg["shards"]:
        sh["replicas"] = []
    extra = {"replicas": replicas} if replicas else {}
    return shardkit.Cluster.from_config({**cfg, **CONFIG, **extra}, metadata=Base.metadata)


def _watch(cluster: shardkit.Cluster) -> list[tuple[str, str]]:
    """(node, SQL) of every statement the cluster's primaries run from now on (the
    monitor's polls are not theirs)."""
    ran: list[tuple[str, str]] = []
    for shard in cluster.shard_names:
        eng = cluster.primary(shard)
        event.listen(eng, "after_cursor_execute",
                     lambda c, cur, st, *a, node=eng.info["node"], **k: ran.append((node, " ".join(st.split()))))
    return ran


def _shown(o: Any, depth: int = 0) -> Any:
    if isinstance(o, (list, tuple)) and not isinstance(o, Row):
        return [_shown(x, depth) for x in o]
    if isinstance(o, Row):
        return ("row", [_shown(x, depth) for x in o])
    state = getattr(o, "_sa_instance_state", None)
    if state is None:
        return o
    loaded = {}
    for k, v in sorted(state.dict.items()):
        if k.startswith("_"):
            continue
        if isinstance(v, list):
            v = [x._sa_instance_state.key if depth else _shown(x, depth + 1) for x in v]
        elif hasattr(v, "_sa_instance_state"):
            v = v._sa_instance_state.key
        loaded[k] = v
    return (type(o).__name__, state.key, state.expired, loaded)


def _outcome(cluster: shardkit.Cluster, fn: Callable[[Any], Any], **session_kw: Any) -> tuple[Any, ...]:
    ran = _watch(cluster)
    try:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)(**session_kw) as s:
            try:
                got = ("ok", _shown(fn(s)))
            except Exception as e:  # noqa: BLE001 - compared
                got = ("error", type(e).__name__, str(e))
            # (Sorted: a read of several shards runs on each in its own thread.)
            return got, sorted(s._sk_written), dict(s._sk_replica), s._sk_ref_shard, sorted(ran)
    finally:
        cluster.dispose()


def _key(s: Any, shard: str, table: Any = Account, keys: Any = ACCOUNTS) -> Any:
    return next(k for k in keys if s.cluster.shard_for(table, k) == shard)


def _one(k: Any) -> Any:
    return select(Account).where(Account.id == k)


# -- the cases ---------------------------------------------------------------------


def _second_read(s: Any) -> Any:
    a = s.execute(_one(1)).scalar_one()
    b = s.execute(_one(1)).scalar_one()
    c = s.get(Account, 1)
    return a, b is a, c is a


def _pending_same_key(s: Any) -> Any:
    s.add(Account(id=100, name="new"))
    return s.execute(_one(100)).scalars().all()


def _pending_other_key(s: Any) -> Any:
    s.add(Account(id=100, name="new"))
    got = s.execute(_one(1)).scalars().all()
    return got, s.execute(select(Account.name).where(Account.id == 100)).all()


def _modified(s: Any) -> Any:
    s.execute(_one(2)).scalar_one().name = "changed"
    return s.scalar(select(Account.name).where(Account.id == 2))


def _expired(s: Any) -> Any:
    a = s.execute(_one(3)).scalar_one()
    s.expire(a)
    b = s.execute(_one(3)).scalar_one()
    return b is a, b


def _expired_attribute(s: Any) -> Any:
    a = s.execute(_one(3)).scalar_one()
    s.expire(a, ["name"])
    return a.name, a


def _populate_existing(s: Any) -> Any:
    a = s.execute(_one(6)).scalar_one()
    attributes.set_committed_value(a, "name", "stale")
    kept = s.execute(_one(6)).scalar_one().name
    fresh = s.execute(_one(6).execution_options(populate_existing=True)).scalar_one().name
    a2 = s.execute(_one(6)).scalar_one()
    attributes.set_committed_value(a2, "name", "stale again")
    by_call = s.execute(_one(6), execution_options={"populate_existing": True}).scalar_one().name
    return kept, fresh, by_call


def _in_scope(**kw: Any) -> Callable[[Any], Any]:
    def run(s: Any) -> Any:
        k = kw.get("k", 1)
        args = {x: v for x, v in kw.items() if x != "k"}
        if args.get("shard") == "own":
            args["shard"] = s.cluster.shard_for(Account, k)
        elif args.get("shard") == "other":
            args["shard"] = next(x for x in s.cluster.shard_names if x != s.cluster.shard_for(Account, k))
        if args.get("key") == "other":
            args["key"] = _key(s, next(x for x in s.cluster.shard_names if x != s.cluster.shard_for(Account, k)))
        with shardkit.scope(**args):
            return s.execute(_one(k)).scalars().all()
    return run


def _with_listener(change: Callable[[Any, Any], None], probe: Callable[[Any], Any] | None = None
                   ) -> Callable[[Any], Any]:
    def run(s: Any) -> Any:
        def listener(state: Any) -> None:
            if state.is_select and not state.is_relationship_load:
                change(s, state)
        event.listen(s, "do_orm_execute", listener)
        try:
            return (probe or (lambda s: s.execute(_one(4)).scalars().all()))(s)
        finally:
            event.remove(s, "do_orm_execute", listener)
    return run


def _add_selectinload(s: Any, state: Any) -> None:
    state.statement = state.statement.options(selectinload(Account.entries))


def _populate(s: Any, state: Any) -> None:
    state.update_execution_options(populate_existing=True)


def _other_shards_key(s: Any, state: Any) -> None:
    # The statement's key replaced by one on the other shard (after routing).
    k = _key(s, next(x for x in s.cluster.shard_names if x != s.cluster.shard_for(Account, 4)))
    state.statement = select(Account).where(Account.id == k)


def _adds_object(s: Any, state: Any) -> None:
    # An object added by the listener (once): the ORM's autoflush, after the listeners,
    # flushes it before the statement runs.
    if not s.info.get("added"):
        s.info["added"] = True
        s.add(Account(id=200, name="from listener"))


def _listener_probe_adds(s: Any) -> Any:
    return s.execute(_one(4)).scalars().all(), s.execute(select(Account.name).where(Account.id == 200)).all()


def _savepoint(s: Any) -> Any:
    sp = s.begin_nested()
    inside = s.execute(_one(5)).scalars().all()
    sp.commit()
    after = s.execute(_one(5)).scalars().all()
    return inside, after


def _savepoint_rolled_back(s: Any) -> Any:
    a = s.execute(_one(5)).scalar_one()
    sp = s.begin_nested()
    a.name = "in savepoint"
    s.flush()
    sp.rollback()
    return s.execute(_one(5)).scalar_one(), a.name


def _after_commit(s: Any) -> Any:
    a = s.execute(_one(7)).scalar_one()
    s.commit()  # (nothing written: every object expired)
    expired = a._sa_instance_state.expired
    b = s.execute(_one(7)).scalar_one()
    return expired, b is a, b


def _autobegin_off(s: Any) -> Any:
    try:
        s.execute(_one(1)).scalars().all()
    except Exception as e:  # noqa: BLE001 - compared
        first = (type(e).__name__, str(e))
    with s.begin():
        return first, s.execute(_one(1)).scalars().all()


def _pending_no_autoflush(s: Any) -> Any:
    s.add(Account(id=100, name="new"))
    return s.execute(_one(100)).scalars().all(), s.execute(_one(1)).scalars().all()


def _missing_one(s: Any) -> Any:
    return s.execute(_one(99)).scalar_one()


def _for_update_then_read(s: Any) -> Any:
    a = s.execute(_one(2).with_for_update()).scalar_one()
    return a, s.execute(_one(2)).scalar_one() is a


# name: (the case, how many reads the short path serves)
CASES: dict[str, tuple[Callable[[Any], Any], int]] = {
    "entity": (lambda s: s.execute(_one(1)).scalars().all(), 1),
    "entity, other shard": (lambda s: s.execute(_one(_key(s, "s1"))).scalars().all(), 1),
    "columns": (lambda s: s.execute(select(Account.id, Account.name).where(Account.id == 2)).all(), 1),
    "entity and column": (lambda s: s.execute(select(Account, Account.name).where(Account.id == 2)).all(), 1),
    "scalar()": (lambda s: s.scalar(select(Account.name).where(Account.id == 3)), 1),
    "scalars()": (lambda s: s.scalars(_one(3)).all(), 1),
    "bound parameter, params dict": (lambda s: s.execute(select(Account).where(Account.id == bindparam("k")),
                                                        {"k": 1}).scalars().all(), 1),
    "empty params dict": (lambda s: s.execute(_one(1), {}).scalars().all(), 1),
    "IN one key": (lambda s: s.execute(select(Account).where(Account.id.in_([1]))).scalars().all(), 1),
    "IN two shards": (lambda s: sorted(s.execute(select(Account.id).where(
        Account.id.in_([_key(s, "s0"), _key(s, "s1")]))).scalars().all()), 0),
    "missing key": (lambda s: s.execute(_one(99)).scalars().all(), 1),
    "missing key, scalar_one()": (_missing_one, 1),
    "missing key, scalar()": (lambda s: s.scalar(select(Account.name).where(Account.id == 99)), 1),
    "second read in the session": (_second_read, 2),
    "pending object, its key": (_pending_same_key, 0),
    # (The second read: flushed already, nothing pending.)
    "pending object, another key": (_pending_other_key, 1),
    "modified object": (_modified, 1),
    "expired object then select": (_expired, 2),
    "expired attribute then access": (_expired_attribute, 1),
    "selectinload": (lambda s: s.execute(_one(4).options(selectinload(Account.entries))).scalars().all(), 1),
    "joinedload": (lambda s: s.execute(_one(4).options(joinedload(Account.entries))).unique().scalars().all(), 1),
    "lazy load after": (lambda s: s.execute(_one(4)).scalar_one().entries, 1),
    "many-to-one joinedload": (lambda s: s.execute(select(Entry).where(Entry.account_id == 4).options(
        joinedload(Entry.account))).scalars().all(), 1),
    "populate_existing": (_populate_existing, 3),
    "with_for_update": (lambda s: s.execute(_one(2).with_for_update()).scalars().all(), 0),
    "with_for_update then plain read": (_for_update_then_read, 1),
    "scope(shard=its own)": (_in_scope(shard="own"), 0),
    "scope(shard=another)": (_in_scope(shard="other"), 0),
    "scope(key=its own)": (_in_scope(key=1), 0),
    "scope(key=another shard's)": (_in_scope(key="other"), 0),
    "listener adds selectinload": (_with_listener(_add_selectinload), 1),
    "listener sets populate_existing": (_with_listener(_populate), 1),
    "listener swaps the key for another shard's": (_with_listener(_other_shards_key), 1),
    "listener adds an object": (_with_listener(_adds_object, _listener_probe_adds), 2),
    "Core table": (lambda s: s.execute(select(events).where(events.c.k == 5)).all(), 1),
    "Core table, columns": (lambda s: s.execute(select(events.c.what).where(events.c.k == 6)).scalars().all(), 1),
    "reference table": (lambda s: s.execute(select(Currency).where(Currency.code == "EUR")).scalars().all(), 0),
    "text key": (lambda s: s.execute(select(Tag).where(Tag.code == "gamma")).scalars().all(), 1),
    "text key, missing": (lambda s: s.execute(select(Tag).where(Tag.code == "nope")).scalars().all(), 1),
    "composite key": (lambda s: s.execute(select(Entry).where(
        Entry.account_id == 6, Entry.id == 1)).scalars().all(), 1),
    "child by shard key only": (lambda s: s.execute(select(Entry).where(Entry.account_id == 7)).scalars().all(), 1),
    "order_by and limit": (lambda s: s.execute(_one(1).order_by(Account.name).limit(1)).scalars().all(), 1),
    "count(*) of one key": (lambda s: s.scalar(select(func.count()).select_from(Account).where(Account.id == 1)), 1),
    "join on the key": (lambda s: s.execute(select(Account, Entry).join(Account.entries).where(
        Account.id == 4).order_by(Entry.id)).all(), 1),
    "with_loader_criteria": (lambda s: s.execute(_one(4).options(selectinload(Account.entries), with_loader_criteria(
        Entry, Entry.n > 0))).scalars().all(), 1),
    "no key (every shard)": (lambda s: sorted(s.execute(select(Entry.account_id).where(
        Entry.id == 2)).scalars().all()), 0),
    "after commit (expired)": (_after_commit, 2),
    "savepoint": (_savepoint, 1),
    "savepoint rolled back": (_savepoint_rolled_back, 2),
}


# Sessions made with keywords: name: (the case, the keywords, how many reads the short path serves)
SESSION_CASES: dict[str, tuple[Callable[[Any], Any], dict[str, Any], int]] = {
    "autobegin=False": (_autobegin_off, {"autobegin": False}, 2),
    "autoflush=False, pending object": (_pending_no_autoflush, {"autoflush": False}, 0),
    "expire_on_commit=False, after commit": (_after_commit, {"expire_on_commit": False}, 2),
    "consistency=strong": (CASES["entity"][0], {"consistency": "strong"}, 1),
}


@pytest.fixture
def short_reads(monkeypatch):
    """The statements _primary_read is given (the reads the short path serves)."""
    seen: list[str] = []
    real = sk_session.ShardedSession._primary_read

    def spy(self: Any, shard: str, statement: Any, *a: Any) -> Any:
        seen.append(str(statement))
        return real(self, shard, statement, *a)
    monkeypatch.setattr(sk_session.ShardedSession, "_primary_read", spy)
    return seen


def _both(dev: Any, fn: Callable[[Any], Any], short_reads: list[str], monkeypatch: Any,
          session_kw: Any = None, **replicas: Any) -> tuple[Any, Any, list[str]]:
    session_kw = session_kw or {}
    short = _outcome(_no_replica_cluster(dev, **replicas), fn, **session_kw)
    served = list(short_reads)
    with monkeypatch.context() as m:
        # Every short path closed: each read takes the general path.
        m.setattr(sk_session.ShardedSession, "_short_path_open", lambda self, *a: False)
        general = _outcome(_no_replica_cluster(dev, **replicas), fn, **session_kw)
    assert short_reads == served, "the general run took the short path"
    return short, general, served


@pytest.mark.parametrize("name", list(CASES))
def test_keyed_select_short_path_gives_what_the_general_path_gives(dev, short_reads, monkeypatch, name):
    fn, expected = CASES[name]
    short, general, served = _both(dev, fn, short_reads, monkeypatch)
    assert len(served) == expected, served
    assert short == general


@pytest.mark.parametrize("name", list(SESSION_CASES))
def test_keyed_select_short_path_in_sessions_made_otherwise(dev, short_reads, monkeypatch, name):
    fn, kw, expected = SESSION_CASES[name]
    short, general, served = _both(dev, fn, short_reads, monkeypatch, kw)
    assert len(served) == expected, served
    assert short == general


def test_primary_reported_down_refuses_both_paths_alike(dev, short_reads, monkeypatch):
    """With the health monitor running and a shard's primary reported down (a recent
    failed poll, made up here: the next real poll is 30 s away), a keyed read of that
    shard is refused with the same error by both paths, and a read of the other shard
    is served by both."""

    def down(s: Any) -> Any:
        cluster = s.cluster
        cluster.start_monitor()
        mon = cluster._monitor
        mon.wait_first_poll()
        p = mon.shards["s0"].primary
        assert p.up, p.error
        p.up, p.error, p.checked_at = False, "OperationalError: made up by the test", time.monotonic()
        out = []
        for k in (_key(s, "s0"), _key(s, "s1")):
            try:
                out.append(("ok", _shown(s.execute(_one(k)).scalars().all())))
            except Exception as e:  # noqa: BLE001 - compared
                out.append(("error", type(e).__name__, str(e)))
        try:
            out.append(("ok", _shown(s.get(Account, _key(s, "s0")))))
        except Exception as e:  # noqa: BLE001 - compared
            out.append(("error", type(e).__name__, str(e)))
        return out

    short, general, served = _both(dev, down, short_reads, monkeypatch, poll_interval=30)
    assert len(served) == 3, served
    got = short[0][1]
    assert got[0][:2] == ["error", "ShardUnavailable"] and "made up by the test" in got[0][2], got
    assert got[1][0] == "ok" and got[1][1], got
    assert got[2][:2] == ["error", "ShardUnavailable"], got
    assert short == general
