"""Tests of writes from processes whose map is stale after a move: every write
either is refused (``NotOwned``, nothing written) or lands on the true owner; and a
process whose map is current is not refused.  Data is checked on the shards directly."""

from __future__ import annotations

import tomllib
import warnings
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, String, bindparam, case, delete, or_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_maps, plan_move_value, plan_split_range
from movers import guarded_cluster

pytestmark = pytest.mark.integration

BUCKETS = 64
ACCOUNTS = range(2000)
ORDERS = range(0, 4000)          # [.., 2000) -> s0, [2000, ..) -> s1
REGIONS = ["eu", "us", "jp", "br"]  # jp, br: the default (s1)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    note: Mapped[str] = mapped_column(String(40), default="")


class Order(Base):
    __tablename__ = "orders"
    order_no: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(Integer, default=0)


class Line(Base):
    __tablename__ = "order_lines"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_no: Mapped[int] = mapped_column(ForeignKey("orders.order_no"))
    qty: Mapped[int] = mapped_column(Integer, default=0)


class Store(Base):
    __tablename__ = "stores"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(40), default="")


GROUPS = {"groups": {
    "accounts": {"strategy": "hash", "tables": {"accounts": "id", "entries": "account_id"}},
    "orders": {"strategy": "range", "tables": {"orders": "order_no", "order_lines": "order_no"},
               "ranges": [{"to": 2000, "shard": "s0"}, {"from": 2000, "shard": "s1"}]},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["eu"], "s1": ["us"]}, "default": "s1"},
}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)
    cfg_path = tmp_path_factory.mktemp("stale_writes") / "shardkit.toml"
    cluster = guarded_cluster(dev, Base.metadata, GROUPS, cfg_path)
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        s.add_all(Account(id=i, balance=1000 + i) for i in ACCOUNTS)
        s.add_all(Order(order_no=k, amount=k) for k in ORDERS)
        s.add_all(Store(id=i, region=REGIONS[i % len(REGIONS)], name="orig") for i in range(200))
        s.commit()
        s.add_all(Entry(id=i, account_id=i, note="orig") for i in ACCOUNTS)
        s.add_all(Line(id=k, order_no=k, qty=k) for k in ORDERS)
        s.commit()
    w = SimpleNamespace(dev=dev, cluster=cluster, cfg_path=cfg_path, Session=Session,
                        used_buckets=set(), extra=[])
    yield w
    for c in w.extra:
        c.dispose()
    cluster.dispose()


# -- helpers ---------------------------------------------------------------------------

def _stale(w, n=1):
    """Processes that load the map now and never follow it."""
    out = [shardkit.Cluster.from_config(w.cfg_path, follow_map=False) for _ in range(n)]
    w.extra.extend(out)
    return out


def _offline(w):
    raw = tomllib.loads(w.cfg_path.read_text())
    raw["catalog"]["url"] = "postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1"
    c = shardkit.Cluster.from_config(raw, follow_map=False)
    w.extra.append(c)
    return c


def _sessions(cluster, **kw):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong", **kw)


def _q(w, shard: int, sql: str, args=()):
    with psycopg.connect(w.dev.shards[shard].primary.dsn) as c:
        return c.execute(sql, args).fetchall()


def _where(w, table: str, col: str, key):
    """{shard index: rows of ``table`` with ``col = key``} over both shards."""
    return {i: _q(w, i, f"SELECT * FROM {table} WHERE {col} = %s ORDER BY 1", (key,)) for i in (0, 1)}


def _balances(w, ids):
    """{id: (shard index, balance)} for every row of ``ids`` on either shard."""
    out = {}
    for i in (0, 1):
        for k, b in _q(w, i, "SELECT id, balance FROM accounts WHERE id = ANY(%s)", (list(ids),)):
            assert k not in out, f"account {k} on two shards"
            out[k] = (i, b)
    return out


def _move_hash_bucket(w, source="s0", target="s1"):
    """Move one bucket of ``source`` that no other test used to ``target``; its keys."""
    w.cluster.refresh_map()
    live = w.cluster.config.bucket_map
    bucket = next(b for b in range(BUCKETS) if live[b] == source and b not in w.used_buckets)
    w.used_buckets.add(bucket)
    keys = [k for k in ACCOUNTS if shardkit.bucket_for(k, BUCKETS) == bucket]
    return bucket, keys, live


def _apply_map(w, live, bucket, target):
    new = list(live)
    new[bucket] = target
    rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).apply(
        plan_from_maps(live, tuple(new), "test: stale writes"))
    w.cluster.refresh_map()


def _slices(w):
    w.cluster.refresh_map()
    return list(w.cluster.config.slices)


class _Stop(Exception):
    pass


class StopAfter(rebalance.Mover):
    """A mover that stops (as if killed) right after recording ``step``."""

    def __init__(self, cluster, step):
        super().__init__(cluster, grace=0, progress=lambda line: None)
        self.stop_step = step

    def _record(self, move_id, batch, step, detail=None):
        super()._record(move_id, batch, step, detail)
        if step == self.stop_step:
            raise _Stop(step)


# -- hash group: a bucket moved s0 -> s1 and cleaned up ----------------------------------

@pytest.fixture(scope="module")
def hashed(world):
    w = world
    bucket, keys, live = _move_hash_bucket(w)
    assert len(keys) >= 16
    other_s0 = next(k for k in ACCOUNTS if live[shardkit.bucket_for(k, BUCKETS)] == "s0"
                    and shardkit.bucket_for(k, BUCKETS) != bucket)
    other_s1 = next(k for k in ACCOUNTS if live[shardkit.bucket_for(k, BUCKETS)] == "s1")
    stale, held_cluster, *rt = _stale(w, 12)
    # Objects loaded before the move, by a stale process (one session per test: a
    # rollback would expire the others) and by a following one.
    held, held_del = (_sessions(held_cluster, expire_on_commit=False)() for _ in range(2))
    held_objs = {k: held.get(Account, k) for k in keys[10:12]}
    held_del_objs = {keys[12]: held_del.get(Account, keys[12])}
    held.commit()
    held_del.commit()
    live_held = w.Session(expire_on_commit=False)
    live_objs = {k: live_held.get(Account, k) for k in keys[13:15]}
    live_held.commit()
    assert {o._sa_instance_state.key[2] for o in (*held_objs.values(), *held_del_objs.values(),
                                                   *live_objs.values())} == {"s0"}
    _apply_map(w, live, bucket, "s1")
    assert _where(w, "accounts", "id", keys[0])[0] == []  # cleaned up on s0
    assert stale.shard_for("accounts", keys[0]) == "s0"
    assert w.cluster.shard_for("accounts", keys[0]) == "s1"
    yield SimpleNamespace(bucket=bucket, keys=keys, other_s0=other_s0, other_s1=other_s1,
                          stale=stale, rt=rt, held=held, held_objs=held_objs,
                          held_del=held_del, held_del_objs=held_del_objs,
                          live_held=live_held, live_objs=live_objs)
    held.close()
    held_del.close()
    live_held.close()


def _refused_statements(h):
    k, k2 = h.keys[0], h.keys[1]
    o0, o1 = h.other_s0, h.other_s1
    out = {}
    for mode in ("auto", "fetch", "evaluate", False):
        out[f"update-sync-{mode}"] = (lambda s, mode=mode: s.execute(
            update(Account).where(Account.id == k).values(balance=-1)
            .execution_options(synchronize_session=mode)))
        out[f"delete-sync-{mode}"] = (lambda s, mode=mode: s.execute(
            delete(Account).where(Account.id == k).execution_options(synchronize_session=mode)))
        out[f"query-update-{mode}"] = (lambda s, mode=mode: s.query(Account).filter(
            Account.id == k).update({"balance": -1}, synchronize_session=mode))
        out[f"query-delete-{mode}"] = (lambda s, mode=mode: s.query(Account).filter(
            Account.id == k).delete(synchronize_session=mode))
    out.update({
        "update-returning": lambda s: s.execute(
            update(Account).where(Account.id == k).values(balance=-1).returning(Account.id)).all(),
        "delete-returning": lambda s: s.execute(
            delete(Account).where(Account.id == k).returning(Account.id, Account.balance)).all(),
        "update-in-spanning-shards": lambda s: s.execute(
            update(Account).where(Account.id.in_([o1, k, o0, k2])).values(balance=-1)),
        "delete-in-spanning-shards": lambda s: s.execute(
            delete(Entry).where(Entry.account_id.in_([o1, k, o0]))),
        "delete-in-one-moved": lambda s: s.execute(delete(Entry).where(Entry.account_id.in_([k]))),
        "update-or": lambda s: s.execute(
            update(Account).where(or_(Account.id == k, Account.id == k2)).values(balance=-1)),
        "update-and-extra": lambda s: s.execute(
            update(Account).where(Account.id == k, Account.balance > 0).values(balance=-1)),
        "update-bindparam": lambda s: s.execute(
            update(Account).where(Account.id == bindparam("kk")).values(balance=-1), {"kk": k}),
        "child-update-by-parent-key": lambda s: s.execute(
            update(Entry).where(Entry.account_id == k).values(note="stale")),
        "child-query-delete": lambda s: s.query(Entry).filter(Entry.account_id == k).delete(),
        "insert-on-conflict-nothing": lambda s: s.execute(
            pg_insert(Account).values(id=k, balance=-1).on_conflict_do_nothing()),
        "insert-on-conflict-update": lambda s: s.execute(
            pg_insert(Account).values(id=k, balance=-1).on_conflict_do_update(
                index_elements=[Account.id], set_={"balance": -1})),
        "child-insert-on-conflict": lambda s: s.execute(
            pg_insert(Entry).values(id=10**7, account_id=k, note="stale").on_conflict_do_nothing()),
        "orm-merge": lambda s: (s.merge(Account(id=k, balance=-1)), s.flush()),
        "orm-add-upsert": lambda s: (s.add(Entry(id=10**7 + 1, account_id=k, note="stale")), s.flush()),
    })
    return out


REFUSED = list(_refused_statements(SimpleNamespace(keys=[0, 1], other_s0=0, other_s1=0)))


def _assert_untouched(w, h):
    k, k2 = h.keys[0], h.keys[1]
    got = _balances(w, [k, k2, h.other_s0, h.other_s1])
    assert got[k] == (1, 1000 + k) and got[k2] == (1, 1000 + k2)
    assert got[h.other_s0] == (0, 1000 + h.other_s0) and got[h.other_s1][1] == 1000 + h.other_s1
    for key in (k, h.other_s0, h.other_s1):
        rows = _where(w, "entries", "account_id", key)
        assert sum(len(r) for r in rows.values()) == 1
        assert [r[2] for rs in rows.values() for r in rs] == ["orig"]
    assert _q(w, 0, "SELECT count(*) FROM entries WHERE id >= 10000000")[0][0] == 0
    assert _q(w, 1, "SELECT count(*) FROM entries WHERE id >= 10000000")[0][0] == 0


@pytest.mark.parametrize("name", REFUSED)
def test_stale_hash_write_is_refused_and_nothing_is_written(world, hashed, name):
    fn = _refused_statements(hashed)[name]
    with _sessions(hashed.stale)() as s:
        with pytest.raises(shardkit.NotOwned) as ei:
            fn(s)
        assert ei.value.shard == "s0"
        s.rollback()
    _assert_untouched(world, hashed)


def test_stale_scope_key_keyless_update_is_refused(world, hashed):
    k = hashed.keys[0]
    with _sessions(hashed.stale)() as s, shardkit.scope(key=k, all_shards=True):
        with pytest.raises(shardkit.NotOwned):
            s.execute(update(Entry).where(Entry.note == "orig").values(note="scoped"))
        s.rollback()
    _assert_untouched(world, hashed)
    # Also key-less, on the owner's side with a current map: lands on s1 only.
    with world.Session() as s, shardkit.scope(key=k, all_shards=True):
        n = s.execute(update(Entry).where(Entry.note == "orig", Entry.id == k).values(note="scoped")).rowcount
        s.commit()
    assert n == 1
    assert [r[2] for r in _where(world, "entries", "id", k)[1]] == ["scoped"]
    with world.Session() as s:
        s.execute(update(Entry).where(Entry.account_id == k).values(note="orig"))
        s.commit()


def test_stale_keyless_all_shards_update_lands(world, hashed):
    """A process loaded before the move (no rows in flight then) runs a key-less write on
    every shard: the moved rows are updated where they live."""
    ks = hashed.keys[16:19]
    with world.Session() as s:
        s.execute(update(Account).where(Account.id.in_(ks)).values(balance=-555))
        s.commit()
    with _sessions(hashed.stale)() as s:
        n = s.execute(update(Account).where(Account.balance == -555).values(balance=-556),
                      execution_options={"shardkit_all_shards": True}).rowcount
        s.commit()
    assert n == 3
    assert _balances(world, ks) == {k: (1, -556) for k in ks}
    with world.Session() as s:
        for k in ks:
            s.execute(update(Account).where(Account.id == k).values(balance=1000 + k))
        s.commit()


def _rt_cases(h):
    """(key, fn) for run_transaction from a stale process; each sets the key's balance to 7."""
    ks = h.keys

    def get_modify_flush(s):
        obj = s.get(Account, ks[6])
        if obj is None:  # the stale map looks on s0: not there, so "create" it
            obj = Account(id=ks[6])
            s.add(obj)
        obj.balance = 7
        s.flush()

    return {
        "update-eq": (ks[2], lambda s: s.execute(
            update(Account).where(Account.id == ks[2]).values(balance=7))),
        "update-in-spanning": (ks[3], lambda s: s.execute(
            update(Account).where(Account.id.in_([ks[3], h.other_s1])).values(
                balance=case((Account.id == ks[3], 7), else_=Account.balance)))),
        "query-update-fetch": (ks[4], lambda s: s.query(Account).filter(Account.id == ks[4]).update(
            {"balance": 7}, synchronize_session="fetch")),
        "on-conflict-update": (ks[5], lambda s: s.execute(
            pg_insert(Account).values(id=ks[5], balance=7).on_conflict_do_update(
                index_elements=[Account.id], set_={"balance": 7}))),
        "get-modify-flush": (ks[6], get_modify_flush),
    }


RT = ["update-eq", "update-in-spanning", "query-update-fetch", "on-conflict-update"]


@pytest.mark.parametrize("name", RT)
def test_run_transaction_retries_on_the_true_owner(world, hashed, name):
    i = RT.index(name)
    cluster = hashed.rt[i]
    assert cluster.shard_for("accounts", hashed.keys[0]) == "s0"  # still stale
    key, fn = _rt_cases(hashed)[name]
    shardkit.run_transaction(_sessions(cluster), fn)
    assert _balances(world, [key])[key] == (1, 7)


def test_run_transaction_get_modify_flush(world, hashed):
    """A stale process loads the row (misses it on s0), creates it there: refused, retried."""
    cluster = hashed.rt[4]
    key, fn = _rt_cases(hashed)["get-modify-flush"]
    shardkit.run_transaction(_sessions(cluster), fn)
    assert _balances(world, [key])[key] == (1, 7)


@pytest.mark.parametrize("how", ["execute", "bulk_update_mappings"])
def test_stale_orm_bulk_update_by_pk_is_not_owned_and_retried(world, hashed, how):
    cluster = hashed.rt[5 if how == "execute" else 6]
    key = hashed.keys[7 if how == "execute" else 8]
    other = hashed.other_s0
    try:
        def fn(s):
            rows = [{"id": key, "balance": 8}, {"id": other, "balance": 1000 + other}]
            if how == "execute":
                s.execute(update(Account), rows)
            else:
                s.bulk_update_mappings(Account, rows)
        shardkit.run_transaction(_sessions(cluster), fn)
    finally:
        got = _balances(world, [key, other])
        assert got[other] == (0, 1000 + other)
    assert got[key] == (1, 8)


def test_stale_orm_bulk_update_by_pk_writes_nothing(world, hashed):
    """Whatever the error, nothing of the bulk update is written."""
    key, other = hashed.keys[9], hashed.other_s0
    with _sessions(hashed.stale)() as s:
        with pytest.raises(Exception):
            s.execute(update(Account), [{"id": other, "balance": -3}, {"id": key, "balance": -3}])
        s.rollback()
    assert _balances(world, [key, other]) == {key: (1, 1000 + key), other: (0, 1000 + other)}


def test_flush_update_of_object_loaded_before_move(world, hashed):
    key, obj = next(iter(hashed.held_objs.items()))
    obj.balance = 11
    try:
        hashed.held.commit()
    except shardkit.NotOwned:
        hashed.held.rollback()
        assert _balances(world, [key])[key] == (1, 1000 + key)
        return
    finally:
        if hashed.held.in_transaction():
            hashed.held.rollback()
    assert _balances(world, [key])[key] == (1, 11)


@pytest.mark.parametrize("who", ["stale", "live"])
def test_flush_delete_of_object_loaded_before_move_is_not_lost(world, hashed, who):
    session, objs = (hashed.held_del, hashed.held_del_objs) if who == "stale" else \
        (hashed.live_held, hashed.live_objs)
    key, obj = next(iter(objs.items()))
    session.delete(obj)
    raised = None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            session.commit()
        except Exception as e:  # noqa: BLE001
            raised = e
            session.rollback()
    left = _balances(world, [key])
    if isinstance(raised, shardkit.NotOwned):
        assert left == {key: (1, 1000 + key)}
    else:
        # Reported success: then the row must be gone from its true owner.
        assert raised is None and left == {}, (raised, left)


# -- hash group: a move stopped between steps ------------------------------------------

@pytest.fixture(scope="module")
def midmove(world):
    """Stale processes around a move stopped after the switch (source leftovers) and one
    loaded before the switch (it thinks the target holds foreign copies)."""
    w = world
    bucket, keys, live = _move_hash_bucket(w)
    k = keys[0]
    new = list(live)
    new[bucket] = "s1"
    plan = plan_from_maps(live, tuple(new), "test: stopped mid-way")
    before, = _stale(w)
    with pytest.raises(shardkit.RebalanceError):
        StopAfter(w.cluster, "copied").apply(plan)
    with w.cluster.catalog.engine.connect() as c:
        move_id = c.exec_driver_sql("SELECT max(id) FROM shardkit_catalog.moves").scalar()
    mid, = _stale(w)  # loaded while s1 holds copies it does not own yet
    assert mid.foreign_buckets.get("s1") and bucket in mid.foreign_buckets["s1"]
    with pytest.raises(shardkit.RebalanceError):
        StopAfter(w.cluster, "verified").run(move_id)
    w.cluster.refresh_map()
    assert w.cluster.shard_for("accounts", k) == "s1"
    rows = _where(w, "accounts", "id", k)
    assert len(rows[0]) == 1 and len(rows[1]) == 1  # switched, leftovers on s0
    # Switched, not cleaned: s0 still has the rows; the guard refuses the stale write.
    with _sessions(before)() as s:
        with pytest.raises(shardkit.NotOwned):
            s.execute(update(Account).where(Account.id == k).values(balance=-1))
        s.rollback()
    with _sessions(before)() as s:
        with pytest.raises(shardkit.NotOwned):
            s.execute(pg_insert(Account).values(id=k, balance=-1).on_conflict_do_nothing())
        s.rollback()
    # The live process: a keyed write lands on s1.
    with w.Session() as s:
        assert s.execute(update(Account).where(Account.id == keys[1]).values(balance=-2)).rowcount == 1
        s.commit()
    assert _q(w, 1, "SELECT balance FROM accounts WHERE id = %s", (keys[1],)) == [(-2,)]
    rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).run(move_id)
    w.cluster.refresh_map()
    assert _where(w, "accounts", "id", k)[0] == []
    with w.Session() as s:
        s.execute(update(Account).where(Account.id == keys[1]).values(balance=1000 + keys[1]))
        s.commit()
    return mid, bucket, keys


def test_moves_stopped_mid_way(world, midmove):
    mid, bucket, keys = midmove
    assert world.cluster.shard_for("accounts", keys[0]) == "s1"
    assert _balances(world, keys[:2]) == {k: (1, 1000 + k) for k in keys[:2]}


def test_keyed_write_from_process_loaded_mid_move_is_refused(world, midmove):
    w = world
    mid, bucket, keys = midmove
    assert mid.shard_for("accounts", keys[5]) == "s0"
    for stmt in (update(Account).where(Account.id == keys[5]).values(balance=-1),
                 delete(Entry).where(Entry.account_id.in_([keys[5], keys[6]]))):
        with _sessions(mid)() as s:
            with pytest.raises(shardkit.NotOwned):
                s.execute(stmt)
            s.rollback()
    assert _balances(w, keys[5:7]) == {k: (1, 1000 + k) for k in keys[5:7]}
    assert [len(_where(w, "entries", "account_id", k)[1]) for k in keys[5:7]] == [1, 1]


def test_keyless_write_from_process_loaded_mid_move(world, midmove):
    w = world
    mid, bucket, keys = midmove
    with w.Session() as s:
        s.execute(update(Account).where(Account.id.in_(keys[:4])).values(balance=-777))
        s.commit()
    try:
        raised = None
        try:
            with _sessions(mid)() as s:
                s.execute(update(Account).where(Account.balance == -777).values(balance=-778),
                          execution_options={"shardkit_all_shards": True})
                s.commit()
        except shardkit.NotOwned as e:
            raised = e
        got = _balances(w, keys[:4])
        if raised is None:
            assert {v for v in got.values()} == {(1, -778)}, got
        else:
            assert {v for v in got.values()} == {(1, -777)}, got
    finally:
        with w.Session() as s:
            for k in keys[:4]:
                s.execute(update(Account).where(Account.id == k).values(balance=1000 + k))
            s.commit()


# -- range group: split at 3000, keys >= 3000 moved s1 -> s0 -------------------------------

@pytest.fixture(scope="module")
def ranged(world):
    w = world
    stale, rt = _stale(w, 2)
    assert stale.shard_for("orders", 3500) == "s1"
    plan = plan_split_range(_slices(w), "orders", 3000, "s0")
    rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).apply(plan)
    w.cluster.refresh_map()
    assert w.cluster.shard_for("orders", 3500) == "s0" and w.cluster.shard_for("orders", 2500) == "s1"
    assert _q(w, 1, "SELECT count(*) FROM orders WHERE order_no >= 3000")[0][0] == 0
    return SimpleNamespace(stale=stale, rt=rt, plan=plan)


RANGE_REFUSED = {
    "between-across-split": lambda s: s.execute(
        update(Order).where(Order.order_no.between(2990, 3010)).values(amount=-1)),
    "eq-moved": lambda s: s.execute(update(Order).where(Order.order_no == 3500).values(amount=-1)),
    "ge-moved": lambda s: s.execute(delete(Line).where(Line.order_no >= 3990)),
    "lt-moved-side": lambda s: s.execute(
        update(Order).where(Order.order_no > 3100, Order.order_no < 3200).values(amount=-1)),
    "in-spanning": lambda s: s.execute(
        update(Order).where(Order.order_no.in_([10, 2500, 3500])).values(amount=-1)),
    "child-eq": lambda s: s.execute(update(Line).where(Line.order_no == 3600).values(qty=-1)),
    "orm-add": lambda s: (s.add(Order(order_no=4004, amount=-1)), s.flush()),
    "on-conflict": lambda s: s.execute(
        pg_insert(Order).values(order_no=3700, amount=-1).on_conflict_do_update(
            index_elements=[Order.order_no], set_={"amount": -1})),
}


def _orders_untouched(w):
    for i in (0, 1):
        assert _q(w, i, "SELECT count(*) FROM orders WHERE amount <> order_no")[0][0] == 0
        assert _q(w, i, "SELECT count(*) FROM order_lines WHERE qty <> order_no")[0][0] == 0
    n = sum(_q(w, i, "SELECT count(*) FROM orders")[0][0] for i in (0, 1))
    assert n == len(ORDERS)
    assert sum(_q(w, i, "SELECT count(*) FROM order_lines")[0][0] for i in (0, 1)) == len(ORDERS)


@pytest.mark.parametrize("name", list(RANGE_REFUSED))
def test_stale_range_write_after_split_and_move_is_refused(world, ranged, name):
    with _sessions(ranged.stale)() as s:
        with pytest.raises(shardkit.NotOwned):
            RANGE_REFUSED[name](s)
        s.rollback()
    _orders_untouched(world)


def test_range_run_transaction_and_current_map(world, ranged):
    w = world
    shardkit.run_transaction(_sessions(ranged.rt), lambda s: s.execute(
        update(Order).where(Order.order_no.between(2995, 3004)).values(amount=Order.amount + 1)))
    rows = {k: (i, a) for i in (0, 1) for k, a in _q(
        w, i, "SELECT order_no, amount FROM orders WHERE order_no BETWEEN 2990 AND 3010")}
    assert rows == {k: (1 if k < 3000 else 0, k + (1 if 2995 <= k <= 3004 else 0))
                    for k in range(2990, 3011)}
    # A current map is never refused, whatever the shape, rows or not.
    with w.Session() as s:
        assert s.execute(update(Order).where(Order.order_no.between(2995, 3004))
                         .values(amount=Order.amount - 1)).rowcount == 10
        assert s.execute(update(Order).where(Order.order_no == 10**6).values(amount=1)).rowcount == 0
        assert s.execute(delete(Line).where(Line.order_no.in_([10**6, 10**6 + 1, 5000]))).rowcount == 0
        assert s.execute(update(Order).where(Order.order_no >= 10**6).values(amount=1)).rowcount == 0
        assert s.execute(update(Line).where(Line.order_no.between(1990, 2010)).values(
            qty=Line.qty)).rowcount == 21
        s.commit()
    _orders_untouched(w)


def test_offline_process_range_group(world, ranged):
    """Catalog unreachable at start: routes by the file's ranges; refused on the moved side."""
    w = world
    off = _offline(w)
    assert off.map_version is None and off.shard_for("orders", 3500) == "s1"
    for stmt in (update(Order).where(Order.order_no == 3500).values(amount=-1),
                 delete(Line).where(Line.order_no.between(3400, 3410))):
        with _sessions(off)() as s:
            with pytest.raises(shardkit.NotOwned):
                s.execute(stmt)
            s.rollback()
    # Keys where the file's map is still right: fine.
    with _sessions(off)() as s:
        assert s.execute(update(Order).where(Order.order_no == 100).values(amount=100)).rowcount == 1
        s.commit()
    _orders_untouched(w)


# -- list group: "jp" carved out of the default (s1) and moved to s0 ------------------------

@pytest.fixture(scope="module")
def listed(world):
    w = world
    stale, = _stale(w)
    assert stale.shard_for("stores", "jp") == "s1"
    plan = plan_move_value(_slices(w), "stores", "jp", "s0")
    rebalance.Mover(w.cluster, grace=0, progress=lambda line: None).apply(plan)
    w.cluster.refresh_map()
    assert w.cluster.shard_for("stores", "jp") == "s0"
    return SimpleNamespace(stale=stale)


LIST_REFUSED = {
    "eq": lambda s: s.execute(update(Store).where(Store.region == "jp").values(name="stale")),
    "in-spanning": lambda s: s.execute(delete(Store).where(Store.region.in_(["eu", "jp", "br"]))),
    "eq-and-id": lambda s: s.execute(
        delete(Store).where(Store.region == "jp", Store.id == 2)),
    "query-update": lambda s: s.query(Store).filter(Store.region == "jp").update(
        {"name": "stale"}, synchronize_session="fetch"),
    "insert-on-conflict": lambda s: s.execute(
        pg_insert(Store).values(id=2, region="jp", name="stale").on_conflict_do_nothing()),
}


@pytest.mark.parametrize("name", list(LIST_REFUSED))
def test_stale_list_write_after_value_moved_is_refused(world, listed, name):
    with _sessions(listed.stale)() as s:
        with pytest.raises(shardkit.NotOwned):
            LIST_REFUSED[name](s)
        s.rollback()
    for i in (0, 1):
        assert _q(world, i, "SELECT count(*) FROM stores WHERE name <> 'orig'")[0][0] == 0
    assert sum(_q(world, i, "SELECT count(*) FROM stores")[0][0] for i in (0, 1)) == 200
    assert _q(world, 1, "SELECT count(*) FROM stores WHERE region = 'jp'")[0][0] == 0


def test_list_current_map_not_refused(world, listed):
    with world.Session() as s:
        assert s.execute(update(Store).where(Store.region == "br", Store.id == -1)
                         .values(name="x")).rowcount == 0
        assert s.execute(update(Store).where(Store.region.in_(["jp", "eu", "zz"]), Store.id < 0)
                         .values(name="x")).rowcount == 0
        assert s.execute(update(Store).where(Store.region == "jp").values(name=Store.name)).rowcount == 50
        s.commit()


# -- offline process, hash group --------------------------------------------------------

def test_offline_process_hash_group(world, hashed):
    w = world
    off = _offline(w)
    k = hashed.keys[0]
    assert off.map_version is None and off.shard_for("accounts", k) == "s0"
    for stmt in (update(Account).where(Account.id == k).values(balance=-1),
                 delete(Entry).where(Entry.account_id.in_([k, hashed.other_s1]))):
        with _sessions(off)() as s:
            with pytest.raises(shardkit.NotOwned):
                s.execute(stmt)
            s.rollback()
    _assert_untouched(w, hashed)
    # Where the file's map is right and rows match: no refusal.
    with _sessions(off)() as s:
        o1 = hashed.other_s1
        assert s.execute(update(Account).where(Account.id == o1).values(balance=1000 + o1)).rowcount == 1
        s.commit()
    # run_transaction cannot reload the map: it must fail (the refusal, or the catalog it
    # cannot reach to reload), never report success nor crash on its retry path.
    with pytest.raises((shardkit.NotOwned, shardkit.ShardUnavailable)):
        shardkit.run_transaction(_sessions(off), lambda s: s.execute(
            update(Account).where(Account.id == k).values(balance=-1)), refresh_timeout=0.5)
    _assert_untouched(w, hashed)


def test_current_map_hash_no_false_positives(world, hashed):
    w = world
    k = hashed.keys[0]
    with w.Session() as s:
        assert s.execute(update(Account).where(Account.id == 10**8).values(balance=1)).rowcount == 0
        assert s.execute(delete(Entry).where(Entry.account_id.in_([10**8, 10**8 + 1, 10**8 + 2]))).rowcount == 0
        assert s.execute(update(Account).where(Account.id.in_([k, hashed.other_s0, hashed.other_s1]))
                         .values(balance=Account.balance)).rowcount == 3
        assert s.execute(update(Account).where(Account.id == k).values(balance=Account.balance)
                         .returning(Account.id)).all() == [(k,)]
        assert s.query(Account).filter(Account.id == k).update(
            {"balance": Account.balance}, synchronize_session="fetch") == 1
        s.execute(update(Account), [{"id": k, "balance": 1000 + k}])
        s.execute(pg_insert(Account).values(id=k, balance=1000 + k).on_conflict_do_nothing())
        with shardkit.scope(key=k, all_shards=True):
            assert s.execute(update(Entry).where(Entry.id == -1).values(note="x")).rowcount == 0
        s.commit()
    _assert_untouched(w, hashed)
