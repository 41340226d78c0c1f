"""Moves (hash buckets, a range split, a list value) while application threads use the
write and read paths the other move suites do not: Core executemany inserts, upserts (ON
CONFLICT DO UPDATE, single and executemany, ORM bulk), UPDATE ... WHERE key IN (...)
across shards, ORM bulk UPDATE by primary key, bulk_insert/update_mappings, DELETE ...
RETURNING, SELECT ... FOR UPDATE then update, key-less updates in scope(key=...),
colocated child inserts, reference-table writes, key-less scatter reads and replica reads
under read_your_writes.  Every acknowledged write is checked against a ledger on the
servers themselves: present once, on its owner, nothing left on the old owner; verify is
clean; scatter reads equal the ledger at quiescent points.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import inproc_cli
import psycopg
import pytest
from sqlalchemy import BigInteger, ForeignKey, Integer, String, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit._rebalance_plan import plan_add_shards, plan_from_maps, plan_move_value, plan_split_range
from shardkit.verify import verify
from movers import WriterThreads, kill_mover_after, rows_by_key
from replica_env import replayed

pytestmark = pytest.mark.integration

N_ACCOUNTS = 1200
TICKETS = range(100_000, 101_600)     # [100000, +inf) -> s1 at first
REGIONS = ["eu", "uk", "us", "br"]    # br: the default (s1)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "mx_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)
    tag: Mapped[str] = mapped_column(String(40), default="")
    notes: Mapped[list[Note]] = relationship(back_populates="account", lazy="select")


class Note(Base):
    __tablename__ = "mx_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("mx_accounts.id"))
    body: Mapped[str] = mapped_column(String(40), default="")
    account: Mapped[Account] = relationship(back_populates="notes")


class Country(Base):
    __tablename__ = "mx_countries"
    code: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Ticket(Base):
    __tablename__ = "mx_tickets"
    no: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(Integer, default=0)


class Shop(Base):
    __tablename__ = "mx_shops"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    region: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(40), default="")


GROUPS = {
    "groups": {
        "accounts": {"strategy": "hash", "tables": {"mx_accounts": "id", "mx_notes": "account_id"}},
        "tickets": {"strategy": "range", "tables": {"mx_tickets": "no"},
                    "ranges": [{"to": 100_000, "shard": "s0"}, {"from": 100_000, "shard": "s1"}]},
        "shops": {"strategy": "list", "tables": {"mx_shops": "region"},
                  "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"},
    },
    "reference_tables": ["mx_countries"],
}


def resume(cfg_path: Any, move_id: int) -> None:
    """`shardkit rebalance resume MOVE` run in this process (tests/inproc_cli.py: without a
    process's ~0.6 s of imports; the killed mover had a process of its own), which must succeed."""
    r = inproc_cli.run(["rebalance", "resume", str(move_id), "--config", str(cfg_path), "--grace", "0.2"])
    assert r.returncode == 0, r.stderr


def _tag(k: int) -> str:
    return f"t{k}"


class World:
    def __init__(self, dev: Any, cluster: Any, cfg_path: Any, Session: Any, Strong: Any) -> None:
        self.dev, self.cluster, self.cfg_path, self.Session, self.Strong = dev, cluster, cfg_path, Session, Strong
        self.replica_reads = 0
        # Ledgers of what acknowledged commits left (None: deleted); shared across tests.
        self.accounts: dict[int, int | None] = {k: 0 for k in range(N_ACCOUNTS)}
        self.notes: dict[int, int] = {}            # note id -> account id
        self.countries: dict[str, str] = {}
        self.tickets: dict[int, int | None] = {k: 0 for k in TICKETS}
        self.shops: dict[int, tuple[str, str] | None] = {}
        self.lock = threading.Lock()


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=1)
    catalog_url = dev.create_catalog()
    for shard in dev.shards:
        eng = create_engine(shard.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    two = dev.config_dict()
    two["shards"] = two["shards"][:2]
    first = shardkit.Cluster.from_config({**two, **GROUPS, "catalog": {"url": catalog_url}}, follow_map=False)
    rebalance.init(first)  # the catalog's first map: s0 and s1 only
    first.dispose()
    cfg_path = tmp_path_factory.mktemp("mixed") / "shardkit.toml"
    dev.write_config(cfg_path, {**GROUPS, "catalog": {"url": catalog_url},
                                "replicas": {"consistency": "read_your_writes", "wait_for_token": 0.0}})
    admin = shardkit.Cluster.from_config(cfg_path, follow_map=False)
    rebalance.init(admin)  # the guard on s2 too (not while a process follows: see the last test)
    admin.dispose()
    cluster = shardkit.Cluster.from_config(cfg_path, metadata=Base.metadata)
    assert set(cluster.config.bucket_map) == {"s0", "s1"}
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)           # read_your_writes
    Strong = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    w = World(dev, cluster, cfg_path, Session, Strong)

    def count(*a: Any) -> None:
        w.replica_reads += 1
    for s in cluster.shard_names:
        for i in range(cluster.replica_count(s)):
            event.listen(cluster.engine(s, "replica", i), "before_cursor_execute", count)
    with Strong() as s:
        s.execute(insert(Account), [{"id": k, "balance": 0, "tag": _tag(k)} for k in range(N_ACCOUNTS)])
        s.execute(insert(Ticket), [{"no": k, "amount": 0} for k in TICKETS])
        rows = [{"id": i, "region": REGIONS[i % len(REGIONS)], "name": "x"} for i in range(400)]
        s.execute(insert(Shop), rows)
        s.commit()
    w.shops.update({r["id"]: (r["region"], r["name"]) for r in rows})
    cluster.start_monitor()
    yield w
    cluster.dispose()


# -- the application's threads ---------------------------------------------------------------


class MixedWriters(WriterThreads):
    """Each thread owns the accounts ``k % n == me`` (and the new ids it makes), so the ledger
    of its acknowledged commits is exact.  Every op goes through run_transaction; some read
    their write back in the same session (replicas, read_your_writes)."""

    def __init__(self, w: World, n: int = 4, slices: bool = False) -> None:
        super().__init__(w.Session, n)
        self.w = w
        self.slices = slices
        self.counts: dict[str, int] = {}
        self.misses: list[str] = []

    # a run_transaction that also reads back in the committed session
    def write_then_read(self, fn: Any, check: Any) -> Any:
        for attempt in range(4):
            with self.Session() as s:
                seen = s.cluster.map_version
                try:
                    out = fn(s)
                    s.commit()
                except shardkit.NotOwned:
                    s.rollback()
                    s.cluster.refresh_map(newer_than=seen or 0, timeout=5.0)
                    continue
                problem = check(s, out)
                if problem:
                    self.misses.append(problem)
                return out
        raise AssertionError("NotOwned 4 times")

    def _run(self, me: int) -> None:
        if self.slices:
            return self._run_slices(me)
        w, L = self.w, self.w.accounts
        rnd = random.Random(1000 + me + self.base)
        next_id = self.base + 1_000_000 * (me + 1)
        mine_initial = [k for k in range(N_ACCOUNTS) if k % self.n == me]
        made: list[int] = []     # accounts this thread created (no notes: may be deleted)

        def new_ids(n: int) -> list[int]:
            nonlocal next_id
            out = list(range(next_id, next_id + n))
            next_id += n
            return out

        def live(pool: list[int], n: int) -> list[int]:
            cand = [k for k in pool if L.get(k) is not None]
            return rnd.sample(cand, min(n, len(cand)))

        def record(name: str, changes: dict[int, int | None]) -> None:
            with w.lock:
                L.update(changes)
                self.counts[name] = self.counts.get(name, 0) + 1
                self.ops += 1

        ops = ["core_insert_many", "upsert_one", "upsert_many", "update_in", "bulk_update_pk",
               "bulk_mappings", "delete_returning", "in_returning", "for_update", "scope_keyless", "child_insert",
               "reference", "ryw"]
        while not self.stop.is_set():
            op = rnd.choice(ops)
            v = rnd.randrange(1, 1_000_000)
            if op == "core_insert_many":
                ids = new_ids(6)
                target = rnd.choice([insert(Account), Account.__table__.insert()])  # ORM-enabled or Core
                shardkit.run_transaction(self.Session, lambda s, ids=ids, v=v, target=target: s.execute(
                    target, [{"id": k, "balance": v + i, "tag": _tag(k)} for i, k in enumerate(ids)]))
                made += ids
                record(op, {k: v + i for i, k in enumerate(ids)})
            elif op == "upsert_one":
                k = rnd.choice(live(mine_initial, 1) + new_ids(1))

                def fn(s, k=k, v=v):
                    stmt = pg_insert(Account).values(id=k, balance=v, tag=_tag(k))
                    s.execute(stmt.on_conflict_do_update(index_elements=[Account.id], set_={"balance": v}))
                shardkit.run_transaction(self.Session, fn)
                if k not in L:
                    made.append(k)
                record(op, {k: v})
            elif op == "upsert_many":
                ks = live(mine_initial, 3) + new_ids(3)
                rows = [{"id": k, "balance": v + i, "tag": _tag(k)} for i, k in enumerate(ks)]

                core = rnd.random() < 0.5

                def fn(s, rows=rows, core=core):
                    stmt = pg_insert(Account.__table__ if core else Account)
                    s.execute(stmt.on_conflict_do_update(index_elements=["id"],
                                                         set_={"balance": stmt.excluded.balance}), rows)
                shardkit.run_transaction(self.Session, fn)
                made += [k for k in ks if k not in L]
                record(op, {r["id"]: r["balance"] for r in rows})
            elif op == "update_in":
                ks = live(mine_initial, 5)
                n = shardkit.run_transaction(self.Session, lambda s, ks=ks, v=v: s.execute(
                    update(Account).where(Account.id.in_(ks)).values(balance=v)
                    .execution_options(synchronize_session=False)).rowcount)
                if n != len(ks):
                    c = self.w.cluster
                    self.misses.append(f"update IN {ks}: rowcount {n} (map v{c.map_version}: "
                                       f"{[(k, c.shard_for('mx_accounts', k), shardkit.bucket_for(k, 1024)) for k in ks]}, "
                                       f"foreign {dict((s_, sorted(b)[:8]) for s_, b in c.foreign_buckets.items())})")
                record(op, {k: v for k in ks})
            elif op == "bulk_update_pk":
                ks = live(mine_initial, 4)
                rows = [{"id": k, "balance": v + i} for i, k in enumerate(ks)]
                shardkit.run_transaction(self.Session, lambda s, rows=rows: s.execute(update(Account), rows))
                record(op, {r["id"]: r["balance"] for r in rows})
            elif op == "bulk_mappings":
                ins = new_ids(3)
                ks = live(mine_initial, 3)
                up = [{"id": k, "balance": v + i} for i, k in enumerate(ks)]

                def fn(s, ins=ins, up=up, v=v):
                    s.bulk_insert_mappings(Account, [{"id": k, "balance": v, "tag": _tag(k)} for k in ins])
                    s.bulk_update_mappings(Account, up)
                shardkit.run_transaction(self.Session, fn)
                made += ins
                record(op, {**{k: v for k in ins}, **{r["id"]: r["balance"] for r in up}})
            elif op == "delete_returning":
                ks = live(made, 1)
                if not ks:
                    continue
                k = ks[0]
                got = shardkit.run_transaction(self.Session, lambda s, k=k: list(s.scalars(
                    delete(Account).where(Account.id == k).returning(Account.id))))
                if got != [k]:
                    self.misses.append(f"delete {k} returning {got}")
                record(op, {k: None})
            elif op == "in_returning":
                ks = live(made, 2)
                up = live(mine_initial, 3)
                if len(ks) < 2:
                    continue

                def fn(s, ks=ks, up=up, v=v):
                    gone = sorted(s.scalars(delete(Account).where(Account.id.in_(ks)).returning(Account.id)))
                    set_ = sorted(s.scalars(update(Account).where(Account.id.in_(up)).values(balance=v)
                                            .returning(Account.id)))
                    return gone, set_
                gone, set_ = shardkit.run_transaction(self.Session, fn)
                if gone != sorted(ks) or set_ != sorted(up):
                    self.misses.append(f"IN ... RETURNING: deleted {gone} of {ks}, updated {set_} of {up}")
                record(op, {**{k: None for k in ks}, **{k: v for k in up}})
            elif op == "for_update":
                k = live(mine_initial, 1)[0]
                expected = L[k]

                def fn(s, k=k):
                    acc = s.execute(select(Account).where(Account.id == k).with_for_update()).scalar_one()
                    old = acc.balance
                    acc.balance = old + 1
                    return old
                old = shardkit.run_transaction(self.Session, fn)
                if old != expected:
                    self.misses.append(f"FOR UPDATE of {k} read {old}, ledger {expected}")
                record(op, {k: old + 1})
            elif op == "scope_keyless":
                k = live(mine_initial, 1)[0]

                def fn(s, k=k, v=v):
                    with shardkit.scope(key=k):
                        return s.execute(update(Account).where(Account.tag == _tag(k)).values(balance=v)
                                         .execution_options(synchronize_session=False)).rowcount
                n = shardkit.run_transaction(self.Session, fn)
                if n != 1:
                    self.misses.append(f"scope(key={k}) key-less update: rowcount {n}")
                record(op, {k: v})
            elif op == "child_insert":
                k = rnd.choice(mine_initial)
                nid = new_ids(1)[0]
                if rnd.random() < 0.5:
                    shardkit.run_transaction(self.Session, lambda s, k=k, nid=nid: s.add(
                        Note(id=nid, account_id=k, body="n")))
                else:
                    def fn(s, k=k, nid=nid):
                        parent = s.execute(select(Account).where(Account.id == k)
                                           .execution_options(shardkit_role="primary")).scalar_one()
                        parent.notes.append(Note(id=nid, body="r"))
                    shardkit.run_transaction(self.Session, fn)
                with w.lock:
                    w.notes[nid] = k
                record(op, {})
            elif op == "reference":
                code = f"c{me}-{rnd.randrange(5)}"
                name = f"n{v}"
                if rnd.random() < 0.5:
                    shardkit.run_transaction(self.Session, lambda s, code=code, name=name: s.execute(
                        pg_insert(Country).values(code=code, name=name)
                        .on_conflict_do_update(index_elements=[Country.code], set_={"name": name})))
                elif code in w.countries and rnd.random() < 0.5:
                    def fn(s, code=code, name=name, k=rnd.choice(mine_initial)):
                        with shardkit.scope(key=k):  # still every shard: a reference table
                            s.execute(update(Country).where(Country.code == code).values(name=name))
                    shardkit.run_transaction(self.Session, fn)
                else:
                    def fn(s, code=code, name=name):  # ORM flush of a reference row
                        obj = s.get(Country, code, execution_options={"shardkit_role": "primary"})
                        if obj is None:
                            s.add(Country(code=code, name=name))
                        else:
                            obj.name = name
                    shardkit.run_transaction(self.Session, fn)
                with w.lock:
                    w.countries[code] = name
                record(op, {})
            elif op == "ryw":
                k = rnd.choice(live(mine_initial, 1) + new_ids(1))

                def fn(s, k=k, v=v):
                    s.execute(pg_insert(Account).values(id=k, balance=v, tag=_tag(k))
                              .on_conflict_do_update(index_elements=[Account.id], set_={"balance": v}))

                def check(s, _out, k=k, v=v):
                    got = s.execute(select(Account.balance).where(Account.id == k)).scalar_one_or_none()
                    got2 = s.scalars(select(Account.balance).where(Account.id.in_([k, -1]))).all()
                    if got != v or got2 != [v]:
                        return f"read-your-writes of account {k}: wrote {v}, read {got} / {got2}"
                    return None
                self.write_then_read(fn, check)
                if k not in L:
                    made.append(k)
                record(op, {k: v})

    def _run_slices(self, me: int) -> None:
        w = self.w
        rnd = random.Random(2000 + me + self.base)
        mine = [k for k in TICKETS if k % self.n == me]
        next_id = self.base + 1_000_000 * (me + 1)
        shops: list[int] = []
        ops = ["t_insert_many", "t_upsert_many", "t_update_in", "t_bulk_pk", "t_for_update",
               "s_insert_many", "s_bulk_pk", "s_delete_returning", "t_ryw"]
        while not self.stop.is_set():
            op = rnd.choice(ops)
            v = rnd.randrange(1, 1_000_000)
            next_id += 10
            base = next_id
            tk: dict[int, int | None] = {}
            sh: dict[int, tuple[str, str] | None] = {}
            if op == "t_insert_many":
                # New ticket numbers on both sides of every split point tested below.
                ids = [-base, base + 1, 10**10 + base]
                shardkit.run_transaction(self.Session, lambda s, ids=ids: s.execute(
                    insert(Ticket), [{"no": k, "amount": v} for k in ids]))
                tk = {k: v for k in ids}
            elif op == "t_upsert_many":
                ks = rnd.sample(mine, 4)
                rows = [{"no": k, "amount": v + i} for i, k in enumerate(ks)]

                def fn(s, rows=rows):
                    stmt = pg_insert(Ticket)
                    s.execute(stmt.on_conflict_do_update(index_elements=[Ticket.no],
                                                         set_={"amount": stmt.excluded.amount}), rows)
                shardkit.run_transaction(self.Session, fn)
                tk = {r["no"]: r["amount"] for r in rows}
            elif op == "t_update_in":
                ks = rnd.sample(mine, 5)
                n = shardkit.run_transaction(self.Session, lambda s, ks=ks: s.execute(
                    update(Ticket).where(Ticket.no.in_(ks)).values(amount=v)
                    .execution_options(synchronize_session=False)).rowcount)
                if n != len(ks):
                    self.misses.append(f"ticket update IN {ks}: rowcount {n}")
                tk = {k: v for k in ks}
            elif op == "t_bulk_pk":
                ks = rnd.sample(mine, 4)
                rows = [{"no": k, "amount": v + i} for i, k in enumerate(ks)]

                def fn(s, rows=rows):
                    if rnd.random() < 0.5:
                        s.execute(update(Ticket), rows)
                    else:
                        s.bulk_update_mappings(Ticket, rows)
                shardkit.run_transaction(self.Session, fn)
                tk = {r["no"]: r["amount"] for r in rows}
            elif op == "t_for_update":
                k = rnd.choice(mine)
                expected = w.tickets[k]

                def fn(s, k=k):
                    t = s.execute(select(Ticket).where(Ticket.no == k).with_for_update()).scalar_one()
                    old = t.amount
                    t.amount = old + 1
                    return old
                old = shardkit.run_transaction(self.Session, fn)
                if old != expected:
                    self.misses.append(f"FOR UPDATE of ticket {k} read {old}, ledger {expected}")
                tk = {k: old + 1}
            elif op == "s_insert_many":
                rows = [{"id": base + i, "region": r, "name": f"n{v}"} for i, r in enumerate(REGIONS)]
                shardkit.run_transaction(self.Session, lambda s, rows=rows: s.execute(insert(Shop), rows))
                shops += [r["id"] for r in rows]
                sh = {r["id"]: (r["region"], r["name"]) for r in rows}
            elif op == "s_bulk_pk" and shops:
                ids = rnd.sample(shops, min(3, len(shops)))
                rows = [{"id": i, "region": w.shops[i][0], "name": f"u{v}"} for i in ids]
                shardkit.run_transaction(self.Session, lambda s, rows=rows: s.bulk_update_mappings(Shop, rows))
                sh = {r["id"]: (r["region"], r["name"]) for r in rows}
            elif op == "s_delete_returning" and shops:
                i = shops.pop(rnd.randrange(len(shops)))
                region = w.shops[i][0]
                got = shardkit.run_transaction(self.Session, lambda s, i=i, region=region: list(s.scalars(
                    delete(Shop).where(Shop.region == region, Shop.id == i).returning(Shop.id))))
                if got != [i]:
                    self.misses.append(f"delete shop {i} returning {got}")
                sh = {i: None}
            elif op == "t_ryw":
                k = rnd.choice(mine)

                def fn(s, k=k, v=v):
                    s.execute(pg_insert(Ticket).values(no=k, amount=v)
                              .on_conflict_do_update(index_elements=[Ticket.no], set_={"amount": v}))

                def check(s, _out, k=k, v=v):
                    got = s.get(Ticket, k)
                    if got is None or got.amount != v:
                        return f"read-your-writes of ticket {k}: wrote {v}, read {got and got.amount}"
                    return None
                self.write_then_read(fn, check)
                tk = {k: v}
            else:
                continue
            with w.lock:
                w.tickets.update(tk)
                w.shops.update(sh)
                self.counts[op] = self.counts.get(op, 0) + 1
                self.ops += 1


class FrozenReader:
    """Key-less scatter reads (replicas, read_your_writes sessions) during the move over rows
    no writer touches (accounts with tag 'frozen'): they must never change."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.w.Strong() as s:
                want = self._read(s)
            while not self.stop.is_set():
                with self.w.Session() as s:
                    got = self._read(s)
                if got != want:
                    self.errors.append(f"scatter read changed: {got} != {want}")
                self.reads += 1
                time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001
            self.errors.append(repr(e))

    def _read(self, s: Any) -> Any:
        frozen = Account.tag.like("frozen%")
        top = s.execute(select(Account.id, Account.balance).where(frozen)
                        .order_by(Account.balance.desc(), Account.id).limit(15)).all()
        agg = s.execute(select(func.count(), func.sum(Account.balance), func.max(Account.id))
                        .where(frozen)).one()
        notes = s.scalar(select(func.count()).select_from(Note).where(Note.body == "frozen"))
        return [tuple(r) for r in top], tuple(agg), notes

    def __enter__(self) -> FrozenReader:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)


@contextlib.contextmanager
def _replicas_lagging(replicas: list[Any], seconds: float = 1.5) -> Iterator[None]:
    """Every replica replays ``seconds`` behind its primary inside the block."""
    for r in replicas:
        r.set_apply_delay(seconds)
    try:
        yield
    finally:
        for r in replicas:
            r.set_apply_delay(0)


def _move_while_reading(cluster: shardkit.Cluster, plan: Any, read_all: Any, what: str) -> None:
    """Apply ``plan`` in a thread, calling ``read_all`` until the move is done."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rebalance.Mover(cluster, grace=0.2, progress=lambda line: None).apply(plan)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()
    threading.Thread(target=run, daemon=True).start()
    while not done.is_set():
        read_all(f"during the {what}")
        time.sleep(0.02)
    assert not errors, errors


def _freeze_some(w: World) -> None:
    """Give 60 of the initial accounts the tag 'frozen...' (and a frozen note); writers then
    leave them alone (their scope/upsert ops use the tag t<k>... so they are excluded)."""
    with w.Strong() as s:
        if s.scalar(select(func.count()).select_from(Account).where(Account.tag.like("frozen%"))):
            return
        ids = list(range(N_ACCOUNTS, N_ACCOUNTS + 60))
        s.execute(insert(Account), [{"id": 10**12 + k, "balance": k * 7 % 1000, "tag": f"frozen{k}"} for k in ids])
        s.execute(insert(Note), [{"id": 10**12 + k, "account_id": 10**12 + k, "body": "frozen"} for k in ids])
        s.commit()
    # Replayed before anyone reads them: FrozenReader's sessions hold no token of these
    # writes, and a replica that had not replayed them would rightly show the rows missing.
    replayed(w.dev)
    with w.lock:
        w.accounts.update({10**12 + k: k * 7 % 1000 for k in ids})
        w.notes.update({10**12 + k: 10**12 + k for k in ids})


# -- checks against the servers ---------------------------------------------------------------


def _check_accounts(w: World) -> None:
    cluster = w.cluster
    cluster.refresh_map()
    accounts = rows_by_key(w.dev.shards, "SELECT id, balance FROM mx_accounts")
    notes = rows_by_key(w.dev.shards, "SELECT id, account_id FROM mx_notes")
    problems = []
    for k, places in accounts.items():
        if len(places) != 1:
            problems.append(f"account {k} is on {places}")
        elif places[0][0] != cluster.shard_for("mx_accounts", k):
            problems.append(f"account {k} on {places[0][0]}, owner {cluster.shard_for('mx_accounts', k)}")
    for k, bal in w.accounts.items():
        if bal is None:
            if k in accounts:
                problems.append(f"account {k} deleted (acknowledged), found {accounts[k]}")
        elif k not in accounts:
            problems.append(f"account {k} acknowledged with balance {bal}, lost")
        elif accounts[k][0][1] != bal:
            problems.append(f"account {k}: ledger {bal}, found {accounts[k]}")
    extra = set(accounts) - set(w.accounts)
    if extra:
        problems.append(f"{len(extra)} accounts nobody acknowledged: {sorted(extra)[:5]}")
    for nid, acc in w.notes.items():
        if nid not in notes:
            problems.append(f"note {nid} (account {acc}) acknowledged, lost")
        elif len(notes[nid]) != 1 or notes[nid][0][0] != cluster.shard_for("mx_notes", acc):
            problems.append(f"note {nid} of account {acc} at {notes[nid]}")
    if set(notes) - set(w.notes):
        problems.append(f"notes nobody acknowledged: {sorted(set(notes) - set(w.notes))[:5]}")
    for shard in w.dev.shards:  # the reference table: the ledger, on every shard
        with psycopg.connect(shard.primary.dsn) as c:
            got = dict(c.execute("SELECT code, name FROM mx_countries").fetchall())
        if got != w.countries:
            problems.append(f"countries on {shard.name}: {len(got)} rows, differ from the ledger")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
    report = verify(cluster)
    assert report.ok, report.render()


def _check_slices(w: World) -> None:
    cluster = w.cluster
    cluster.refresh_map()
    tickets = rows_by_key(w.dev.shards, "SELECT no, amount FROM mx_tickets")
    shops = rows_by_key(w.dev.shards, "SELECT id, region, name FROM mx_shops")
    problems = []
    for k, places in tickets.items():
        if len(places) != 1 or places[0][0] != cluster.shard_for("mx_tickets", k):
            problems.append(f"ticket {k} at {places}, owner {cluster.shard_for('mx_tickets', k)}")
    for k, amount in w.tickets.items():
        if k not in tickets:
            problems.append(f"ticket {k} acknowledged ({amount}), lost")
        elif tickets[k][0][1] != amount:
            problems.append(f"ticket {k}: ledger {amount}, found {tickets[k]}")
    for i, places in shops.items():
        if len(places) != 1 or places[0][0] != cluster.shard_for("mx_shops", places[0][1]):
            problems.append(f"shop {i} at {places}")
    for i, val in w.shops.items():
        if val is None:
            if i in shops:
                problems.append(f"shop {i} deleted (acknowledged), found {shops[i]}")
        elif i not in shops:
            problems.append(f"shop {i} acknowledged, lost")
        elif tuple(shops[i][0][1:]) != val:
            problems.append(f"shop {i}: ledger {val}, found {shops[i]}")
    if set(tickets) - set(w.tickets) or set(shops) - set(w.shops):
        problems.append("rows nobody acknowledged")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
    report = verify(cluster)
    assert report.ok, report.render()


def _check_scatter_accounts(w: World) -> None:
    """Quiescent: key-less reads (primaries, and replicas once caught up) equal the ledger."""
    live = {k: v for k, v in w.accounts.items() if v is not None}
    top = sorted(live.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
    want = (len(live), sum(live.values()), top, len(w.notes))
    for shard in w.dev.shards:
        for r in shard.replicas:
            r.wait_caught_up()
    for factory, opts in ((w.Strong, {}), (w.Session, {"shardkit_consistency": "eventual"})):
        with factory() as s:
            n, total = s.execute(select(func.count(), func.sum(Account.balance)).execution_options(**opts)).one()
            rows = s.execute(select(Account.id, Account.balance).order_by(Account.balance.desc(), Account.id)
                             .limit(25).execution_options(**opts)).all()
            notes = s.scalar(select(func.count(Note.id)).execution_options(**opts))
        assert (n, total, [tuple(r) for r in rows], notes) == want


def _assert_writers(writers: MixedWriters, w: World, min_ops: int = 60) -> None:
    assert not writers.errors, writers.errors[:3]
    # The servers against the ledger first: a wrong answer (misses) may or may not have lost data.
    try:
        _check_accounts(w) if not writers.slices else _check_slices(w)
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe writers' wrong answers: {writers.misses[:10]}") from None
    assert not writers.misses, writers.misses[:10]
    assert writers.ops >= min_ops, (writers.ops, writers.counts)


# -- tests ------------------------------------------------------------------------------------


def test_bucket_move_with_mixed_writers_and_scatter_reads(world):
    w = world
    _freeze_some(w)
    cluster = w.cluster
    plan = plan_add_shards(cluster.config.bucket_map, ["s2"])
    replica_before = w.replica_reads
    mover = rebalance.Mover(cluster, grace=0.3, progress=lambda line: None)
    with MixedWriters(w) as writers, FrozenReader(w) as reader:
        time.sleep(0.5)
        move_id = mover.apply(plan, max_buckets=128)
        time.sleep(0.5)
    _assert_writers(writers, w)
    assert not reader.errors, reader.errors[:3]
    assert reader.reads > 10
    assert rebalance.move_status(cluster, move_id)[0]["state"] == "done"
    assert cluster.config.bucket_map == plan.new_map
    assert w.replica_reads > replica_before  # the read-your-writes reads used replicas too
    _check_accounts(w)
    _check_scatter_accounts(w)


@pytest.mark.parametrize("kill_after", ["capturing", "copied"])
def test_bucket_move_killed_mid_copy_then_resumed_with_mixed_writers(world, kill_after):
    """SIGKILL of a CLI mover once its journal shows ``kill_after`` (capture on and the copy
    starting; or copied, not switched: the target holds copies), then `rebalance resume`."""
    w = world
    cluster = w.cluster
    cluster.refresh_map()
    flag = "--drain" if "s2" in cluster.config.bucket_map else "--add"
    with MixedWriters(w, n=3) as writers:
        move_id = kill_mover_after(cluster, w.cfg_path, kill_after, flag, "s2", "--batch-buckets", "128")
        time.sleep(0.5)
        resume(w.cfg_path, move_id)
        time.sleep(0.5)
    _assert_writers(writers, w)
    assert rebalance.move_status(cluster, move_id)[0]["state"] == "done"
    cluster.refresh_map()
    assert ("s2" in cluster.config.bucket_map) == (flag == "--add")
    _check_accounts(w)
    _check_scatter_accounts(w)


def test_range_split_and_list_value_move_with_mixed_writers(world):
    w = world
    cluster = w.cluster
    mover = rebalance.Mover(cluster, grace=0.3, progress=lambda line: None)
    with MixedWriters(w, slices=True) as writers:
        time.sleep(0.5)
        cluster.refresh_map()
        split = plan_split_range(list(cluster.config.slices), "tickets", 100_800, "s2")
        mover.apply(split)
        cluster.refresh_map()
        br = plan_move_value(list(cluster.config.slices), "shops", "br", "s2")
        mover.apply(br)
        cluster.refresh_map()
        uk = plan_move_value(list(cluster.config.slices), "shops", "uk", "s1")
        mover.apply(uk)
        time.sleep(0.5)
    _assert_writers(writers, w)
    assert cluster.shard_for("mx_tickets", 100_799) == "s1" and cluster.shard_for("mx_tickets", 100_800) == "s2"
    assert cluster.shard_for("mx_shops", "br") == "s2" and cluster.shard_for("mx_shops", "uk") == "s1"
    with psycopg.connect(w.dev.shards[1].primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM mx_tickets WHERE no >= 100800").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM mx_shops WHERE region = 'br'").fetchone()[0] == 0
    with psycopg.connect(w.dev.shards[0].primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM mx_shops WHERE region = 'uk'").fetchone()[0] == 0
    _check_slices(w)
    with w.Strong() as s:  # quiescent scatter reads over the moved groups
        live = {k: v for k, v in w.tickets.items() if v is not None}
        assert s.execute(select(func.count(), func.sum(Ticket.amount))).one() == (len(live), sum(live.values()))
        top = sorted(live.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert [tuple(r) for r in s.execute(select(Ticket.no, Ticket.amount)
                                           .order_by(Ticket.amount.desc(), Ticket.no).limit(10))] == top
        shops = {k for k, v in w.shops.items() if v is not None}
        assert s.scalar(select(func.count()).select_from(Shop)) == len(shops)


# -- a process whose map is stale, one path at a time ------------------------------------------


STALE_PATHS = ["scope_keyless_update", "update_in", "bulk_update_pk", "bulk_update_mappings",
               "upsert_one", "upsert_many", "delete_returning", "for_update",
               "core_update_executemany", "scope_keyless_delete", "delete_in_returning",
               "update_returning", "core_delete_executemany"]


def _repair(w: World, k: int, owner: str, balance: int | None) -> None:
    with psycopg.connect(w.dev.shard(owner).primary.dsn, autocommit=True) as c:
        c.execute("SET shardkit.mover = 'on'")
        if balance is None:
            c.execute("DELETE FROM mx_notes WHERE account_id = %s", (k,))
            c.execute("DELETE FROM mx_accounts WHERE id = %s", (k,))
        else:
            c.execute("UPDATE mx_accounts SET balance = %s WHERE id = %s", (balance, k))


@contextlib.contextmanager
def _moved_under_a_stale_process(w: World, index: int, label: str) -> Iterator[tuple[Any, ...]]:
    """Move the bucket of the ``index``-th live account to another shard (clean-up done at
    once) while a process that does not follow the map (follow_map=False) keeps the old
    map; yield (stale cluster, the account, the live accounts, the map before, its
    bucket, source, target)."""
    cluster = w.cluster
    cluster.refresh_map()
    stale = shardkit.Cluster.from_config(w.cfg_path, follow_map=False, metadata=Base.metadata)
    try:
        live = cluster.config.bucket_map
        keys = [k for k in range(N_ACCOUNTS) if w.accounts.get(k) is not None]
        k = keys[index]
        bucket = shardkit.bucket_for(k, len(live))
        source = live[bucket]
        target = next(s for s in ("s0", "s1", "s2") if s != source)
        new_map = list(live)
        new_map[bucket] = target
        rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(
            plan_from_maps(live, tuple(new_map), f"test: {label}"))
        assert stale.shard_for("mx_accounts", k) == source
        yield stale, k, keys, live, bucket, source, target
    finally:
        stale.dispose()


@pytest.mark.parametrize("path", STALE_PATHS)
def test_stale_process_write_paths_after_a_move_are_refused_or_land(world, path):
    """One bucket moves; a process that did not follow (follow_map=False) then writes an
    account of it by one path through run_transaction: the write must land on the new owner
    (refused with NotOwned on the old one and retried), never be acknowledged and lost."""
    w = world
    with _moved_under_a_stale_process(w, STALE_PATHS.index(path) * 7, f"stale {path}") as \
            (stale, k, keys, live, bucket, source, target):
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale)
        other = next(j for j in keys if shardkit.bucket_for(j, len(live)) != bucket
                     and live[shardkit.bucket_for(j, len(live))] == source)
        v = 424242 + STALE_PATHS.index(path)
        if path == "core_delete_executemany":  # their notes first (current map), then only accounts
            shardkit.run_transaction(w.Strong, lambda s: s.execute(delete(Note).where(Note.account_id.in_([k, other]))))
            with w.lock:
                for nid in [n for n, a in w.notes.items() if a in (k, other)]:
                    del w.notes[nid]
        expect = {k: v}

        def fn(s):
            if path == "scope_keyless_update":
                with shardkit.scope(key=k):
                    return s.execute(update(Account).where(Account.tag == _tag(k)).values(balance=v)
                                     .execution_options(synchronize_session=False)).rowcount
            if path == "update_in":
                return s.execute(update(Account).where(Account.id.in_([k, other])).values(balance=v)
                                 .execution_options(synchronize_session=False)).rowcount
            if path == "bulk_update_pk":
                return s.execute(update(Account), [{"id": k, "balance": v}, {"id": other, "balance": v}]).rowcount
            if path == "bulk_update_mappings":
                s.bulk_update_mappings(Account, [{"id": k, "balance": v}, {"id": other, "balance": v}])
                return None
            if path == "upsert_one":
                return s.execute(pg_insert(Account).values(id=k, balance=v, tag=_tag(k))
                                 .on_conflict_do_update(index_elements=[Account.id], set_={"balance": v})).rowcount
            if path == "upsert_many":
                stmt = pg_insert(Account)
                return s.execute(stmt.on_conflict_do_update(index_elements=[Account.id],
                                                            set_={"balance": stmt.excluded.balance}),
                                 [{"id": k, "balance": v, "tag": _tag(k)},
                                  {"id": other, "balance": v, "tag": _tag(other)}]).rowcount
            if path == "delete_returning":
                s.execute(delete(Note).where(Note.account_id == k))
                return list(s.scalars(delete(Account).where(Account.id == k).returning(Account.id)))
            if path == "for_update":
                acc = s.execute(select(Account).where(Account.id == k).with_for_update()).scalar_one_or_none()
                if acc is None:  # get-or-create under a lock: the insert is refused on the old owner
                    s.add(Account(id=k, balance=v, tag=_tag(k)))
                    return "created"
                acc.balance = v
                return "locked"
            if path == "core_update_executemany":
                t = Account.__table__
                return s.execute(t.update().where(t.c.id == bindparam("k")).values(balance=bindparam("b")),
                                 [{"k": k, "b": v}, {"k": other, "b": v}]).rowcount
            if path == "core_delete_executemany":
                t = Account.__table__
                return s.execute(t.delete().where(t.c.id == bindparam("k")), [{"k": k}, {"k": other}]).rowcount
            if path == "scope_keyless_delete":
                s.execute(delete(Note).where(Note.account_id == k))
                with shardkit.scope(key=k):
                    return s.execute(delete(Account).where(Account.tag == _tag(k))
                                     .execution_options(synchronize_session=False)).rowcount
            if path == "delete_in_returning":
                s.execute(delete(Note).where(Note.account_id.in_([k, -1])))
                return sorted(s.scalars(delete(Account).where(Account.id.in_([k, -1])).returning(Account.id)))
            if path == "update_returning":
                return list(s.scalars(update(Account).where(Account.id == k).values(balance=v)
                                      .returning(Account.id)))
            raise AssertionError(path)
        out = shardkit.run_transaction(S, fn)
        if path in ("update_in", "bulk_update_mappings", "bulk_update_pk", "upsert_many",
                    "core_update_executemany"):
            expect[other] = v
        deletes = path in ("delete_returning", "scope_keyless_delete", "delete_in_returning",
                           "core_delete_executemany")
        if deletes:
            expect = {k: None}
        if path == "core_delete_executemany":
            expect[other] = None
        if path in ("delete_returning", "delete_in_returning", "update_returning"):
            assert out == [k], f"{path}: returned {out}"
        if path == "scope_keyless_delete":
            assert out == 1, f"acknowledged, deleted {out} rows"
        if path == "scope_keyless_update":
            assert out == 1, f"acknowledged, matched {out} rows"
        if path == "for_update":
            assert out in ("created", "locked")
        with w.lock:
            w.accounts.update(expect)
            if deletes:
                for nid in [n for n, a in w.notes.items() if a in (k, other if path.startswith("core_") else k)]:
                    del w.notes[nid]
        got = rows_by_key(w.dev.shards, f"SELECT id, balance FROM mx_accounts WHERE id = {k}")
        want = None if expect[k] is None else [(target, v)]
        if got.get(k) != want:
            _repair(w, k, target, expect[k])  # so that the tests after this one start clean
        assert got.get(k) == want, \
            f"{path}: acknowledged (result {out!r}) {expect[k]}, the servers hold {got.get(k)}"


@pytest.mark.parametrize("path", ["delete_one", "update_in_two_shards"])
def test_stale_write_is_refused_when_the_map_arrives_between_it_and_the_check(world, path):
    """A process whose map is stale writes a moved key on the old owner, which has deleted
    the rows (nothing matches), and its new map arrives just after the statement.  The
    check that follows must judge the statement by the map that routed it: by the new
    map the old owner is right about everything it was given, and the write would be
    acknowledged having changed nothing while the row lives on elsewhere."""
    w = world
    with _moved_under_a_stale_process(w, 3 if path == "delete_one" else 11, f"stale check {path}") as \
            (stale, k, keys, live, bucket, source, target):
        elsewhere = next(j for j in keys if live[shardkit.bucket_for(j, len(live))] not in (source,))
        before = rows_by_key(w.dev.shards, f"SELECT id, balance FROM mx_accounts WHERE id IN ({k}, {elsewhere})")

        def reload_after_write(conn, cursor, statement, *a):
            if statement.lstrip().upper().startswith(("DELETE", "UPDATE")):
                stale.refresh_map()
        engine = stale.primary(source)
        event.listen(engine, "after_cursor_execute", reload_after_write)
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale)
        try:
            with S() as s, pytest.raises(shardkit.NotOwned):
                if path == "delete_one":
                    got = list(s.scalars(delete(Account).where(Account.id == k).returning(Account.id)))
                else:
                    got = s.execute(update(Account).where(Account.id.in_([k, elsewhere])).values(balance=-7)
                                    .execution_options(synchronize_session=False)).rowcount
                s.commit()
                pytest.fail(f"{path} acknowledged ({got!r}) by a shard that no longer holds {k}")
        finally:
            event.remove(engine, "after_cursor_execute", reload_after_write)
        assert stale.map_version == w.cluster.map_version
        assert rows_by_key(w.dev.shards,
                           f"SELECT id, balance FROM mx_accounts WHERE id IN ({k}, {elsewhere})") == before
    _check_accounts(w)


def test_replica_reads_never_miss_or_double_a_moved_write_with_lagging_replicas(world):
    """A session writes an account and a note, keeps its token; every replica lags 1.5 s; the
    account's bucket moves (switch and clean-up inside the lag).  Keyed, IN-list and key-less
    reads under read_your_writes (with the token, and fresh sessions) must see the acknowledged
    row exactly once, at every moment of the move and after it; a write after the switch in the
    same session must be read back too."""
    w = world
    cluster = w.cluster
    cluster.refresh_map()
    live = cluster.config.bucket_map
    k = next(j for j in range(N_ACCOUNTS) if w.accounts.get(j) is not None and j % 5 == 3)
    bucket = shardkit.bucket_for(k, len(live))
    source = live[bucket]
    target = next(s for s in ("s2", "s0", "s1") if s != source)
    v = 777_001
    nid = 9 * 10**12 + k
    with w.Session() as s:
        s.execute(update(Account).where(Account.id == k).values(balance=v))
        s.add(Note(id=nid, account_id=k, body="ryw"))
        s.commit()
        token = s.consistency_token()
    with w.lock:
        w.accounts[k] = v
        w.notes[nid] = k
    new_map = list(live)
    new_map[bucket] = target
    plan = plan_from_maps(live, tuple(new_map), "test: ryw across a switch")
    replicas = [r for shard in w.dev.shards for r in shard.replicas]
    problems: list[str] = []
    reads = [0]

    def read_all(tag: str) -> None:
        with w.Session(consistency_token=token) as s:
            got = s.get(Account, k)
            if got is None or got.balance != v:
                problems.append(f"{tag}: get -> {got and got.balance}")
            inl = s.scalars(select(Account.balance).where(Account.id.in_([k, -5]))).all()
            if inl != [v]:
                problems.append(f"{tag}: IN -> {inl}")
            kl = s.scalars(select(Account.balance).where(Account.tag == _tag(k))).all()
            if kl != [v]:
                problems.append(f"{tag}: key-less -> {kl}")
            nn = s.scalars(select(Note.id).where(Note.body == "ryw", Note.id == nid)).all()
            if nn != [nid]:
                problems.append(f"{tag}: key-less note -> {nn}")
        with w.Session() as s:  # no token: may be stale, but never doubled nor vanished
            kl = s.scalars(select(Account.balance).where(Account.tag == _tag(k))).all()
            if len(kl) != 1:
                problems.append(f"{tag}: fresh session key-less -> {kl}")
        reads[0] += 1

    replica_before = w.replica_reads
    with _replicas_lagging(replicas):
        _move_while_reading(cluster, plan, read_all, "move")
        assert cluster.shard_for("mx_accounts", k) == target
        for _ in range(20):
            read_all("after the move")
        # A write after the switch, in one session, read back at once.
        with w.Session(consistency_token=token) as s:
            s.execute(update(Account).where(Account.id == k).values(balance=v + 1))
            s.commit()
            again = s.scalars(select(Account.balance).where(Account.tag == _tag(k))).all()
            if again != [v + 1]:
                problems.append(f"after own write post-switch: key-less -> {again}")
            if s.get(Account, k).balance != v + 1:
                problems.append("after own write post-switch: get stale")
        with w.lock:
            w.accounts[k] = v + 1
    assert reads[0] > 20
    assert w.replica_reads > replica_before  # some of those reads were served by replicas
    assert not problems, problems[:10]
    for r in replicas:
        r.wait_caught_up()
    _check_accounts(w)
    _check_scatter_accounts(w)


SLICE_PATHS = ["update_in", "bulk_update_pk", "bulk_update_mappings", "core_update_executemany",
               "update_returning", "upsert_many"]


@pytest.mark.parametrize("path", SLICE_PATHS)
def test_stale_process_write_paths_after_a_range_split_are_refused_or_land(world, path):
    """As above for a range group: the range holding ticket ``at`` is split at ``at`` and
    the upper side moves; a process that did not follow writes ``at`` (moved) and ``at - 1``
    (stayed) in one statement through run_transaction: both must land."""
    w = world
    cluster = w.cluster
    cluster.refresh_map()
    at = 100_100 + 50 * SLICE_PATHS.index(path)
    k, other = at, at - 1
    stale = shardkit.Cluster.from_config(w.cfg_path, follow_map=False, metadata=Base.metadata)
    try:
        source = cluster.shard_for("mx_tickets", k)
        target = next(s for s in ("s0", "s2", "s1") if s != source)
        rebalance.Mover(cluster, grace=0, progress=lambda line: None).apply(
            plan_split_range(list(cluster.config.slices), "tickets", at, target))
        assert cluster.shard_for("mx_tickets", k) == target
        assert stale.shard_for("mx_tickets", k) == source == stale.shard_for("mx_tickets", other)
        S = sessionmaker(class_=shardkit.ShardedSession, cluster=stale)
        v = 515151 + SLICE_PATHS.index(path)
        rows = [{"no": k, "amount": v}, {"no": other, "amount": v}]

        def fn(s):
            if path == "update_in":
                return s.execute(update(Ticket).where(Ticket.no.in_([k, other])).values(amount=v)
                                 .execution_options(synchronize_session=False)).rowcount
            if path == "bulk_update_pk":
                return s.execute(update(Ticket), rows).rowcount
            if path == "bulk_update_mappings":
                return s.bulk_update_mappings(Ticket, rows)
            if path == "core_update_executemany":
                t = Ticket.__table__
                return s.execute(t.update().where(t.c.no == bindparam("k")).values(amount=bindparam("a")),
                                 [{"k": r["no"], "a": r["amount"]} for r in rows]).rowcount
            if path == "update_returning":
                return sorted(s.scalars(update(Ticket).where(Ticket.no.in_([k, other])).values(amount=v)
                                        .returning(Ticket.no)))
            if path == "upsert_many":
                stmt = pg_insert(Ticket)
                return s.execute(stmt.on_conflict_do_update(index_elements=[Ticket.no],
                                                            set_={"amount": stmt.excluded.amount}), rows).rowcount
            raise AssertionError(path)
        out = shardkit.run_transaction(S, fn)
        with w.lock:
            w.tickets.update({k: v, other: v})
        got = rows_by_key(w.dev.shards, f"SELECT no, amount FROM mx_tickets WHERE no IN ({k}, {other})")
        want = {k: [(target, v)], other: [(source, v)]}
        if got != want:
            with psycopg.connect(w.dev.shard(target).primary.dsn, autocommit=True) as c:
                c.execute("SET shardkit.mover = 'on'")
                c.execute("UPDATE mx_tickets SET amount = %s WHERE no = %s", (v, k))
            with psycopg.connect(w.dev.shard(source).primary.dsn, autocommit=True) as c:
                c.execute("SET shardkit.mover = 'on'")
                c.execute("UPDATE mx_tickets SET amount = %s WHERE no = %s", (v, other))
        assert got == want, f"{path}: acknowledged (result {out!r}) amount {v}, the servers hold {got}"
    finally:
        stale.dispose()
    _check_slices(w)


class PauseAfter(rebalance.Mover):
    """A mover that waits (in its thread) after recording ``step`` until ``go`` is set."""

    def __init__(self, cluster: Any, step: str) -> None:
        super().__init__(cluster, grace=0.2, progress=lambda line: None)
        self.step = step
        self.reached = threading.Event()
        self.go = threading.Event()

    def _pause(self, step: str) -> None:
        if step == self.step:
            self.reached.set()
            assert self.go.wait(60)

    def _record(self, move_id, batch, step, detail=None):
        super()._record(move_id, batch, step, detail)
        self._pause(step)

    def _cut_over(self, *a, **kw):  # the switch is journalled by the cut-over itself
        r = super()._cut_over(*a, **kw)
        self._pause("switched")
        return r


def test_core_executemany_update_while_a_bucket_is_copied(world):
    """A Core UPDATE executemany (one parameter set per key, keys on two shards) while a
    bucket is copied to one of those shards: it must update both rows, as it does outside
    moves (the copy's rows left out on the target)."""
    w = world
    cluster = w.cluster
    cluster.refresh_map()
    live = cluster.config.bucket_map
    keys = [j for j in range(N_ACCOUNTS) if w.accounts.get(j) is not None]
    k = keys[-3]
    bucket = shardkit.bucket_for(k, len(live))
    source = live[bucket]
    other = next(j for j in keys if live[shardkit.bucket_for(j, len(live))] not in (source,))
    target = live[shardkit.bucket_for(other, len(live))]
    new_map = list(live)
    new_map[bucket] = target
    mover = PauseAfter(cluster, "copied")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mover.apply(plan_from_maps(live, tuple(new_map), "test: executemany during a copy"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert mover.reached.wait(60), errors
        deadline = time.monotonic() + 5
        while bucket not in cluster.foreign_buckets.get(target, ()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bucket in cluster.foreign_buckets.get(target, ())  # the target holds a copy
        t = Account.__table__
        v = 313131
        shardkit.run_transaction(w.Session, lambda s: s.execute(
            t.update().where(t.c.id == bindparam("k")).values(balance=bindparam("b")),
            [{"k": k, "b": v}, {"k": other, "b": v + 1}]))
        with w.lock:
            w.accounts.update({k: v, other: v + 1})
    finally:
        mover.go.set()
        thread.join(60)
    assert not errors, errors
    _check_accounts(w)


def test_replica_reads_of_a_split_range_never_miss_or_double_with_lagging_replicas(world):
    """As the hash test above, for a range split: ticket ``at`` written (token kept), every
    replica lags 1.5 s, the range is split at ``at`` and the upper side moves; keyed and
    key-less reads under read_your_writes see the acknowledged amount exactly once."""
    w = world
    cluster = w.cluster
    cluster.refresh_map()
    at = 100_650
    source = cluster.shard_for("mx_tickets", at)
    target = next(s for s in ("s0", "s2", "s1") if s != source)
    v = 616161
    with w.Session() as s:
        s.execute(update(Ticket).where(Ticket.no == at).values(amount=v))
        s.commit()
        token = s.consistency_token()
    with w.lock:
        w.tickets[at] = v
    plan = plan_split_range(list(cluster.config.slices), "tickets", at, target)
    replicas = [r for shard in w.dev.shards for r in shard.replicas]
    problems: list[str] = []
    reads = [0]

    def read_all(tag: str) -> None:
        with w.Session(consistency_token=token) as s:
            got = s.get(Ticket, at)
            if got is None or got.amount != v:
                problems.append(f"{tag}: get -> {got and got.amount}")
            kl = s.scalars(select(Ticket.no).where(Ticket.amount == v)).all()
            if kl != [at]:
                problems.append(f"{tag}: key-less -> {kl}")
            rng = s.scalars(select(Ticket.amount).where(Ticket.no.between(at - 1, at + 1))
                            .order_by(Ticket.no)).all()
            if len(rng) != 3 or rng[1] != v:
                problems.append(f"{tag}: BETWEEN -> {rng}")
        with w.Session() as s:  # no token: may be stale, but never doubled nor vanished
            kl = s.scalars(select(Ticket.no).where((Ticket.no + 0) == at)).all()
            if kl != [at]:
                problems.append(f"{tag}: fresh session key-less -> {kl}")
        reads[0] += 1

    replica_before = w.replica_reads
    with _replicas_lagging(replicas):
        _move_while_reading(cluster, plan, read_all, "split")
        assert cluster.shard_for("mx_tickets", at) == target
        for _ in range(20):
            read_all("after the split")
    assert reads[0] > 20
    assert w.replica_reads > replica_before  # some of those reads were served by replicas
    assert not problems, problems[:10]
    for r in replicas:
        r.wait_caught_up()
    _check_slices(w)


def test_rebalance_init_rerun_while_a_process_reads_the_catalog(world):
    """`rebalance init` is run again to add a shard while applications follow the map.  A
    follower's read of the catalog (Catalog.current_state: maps, then move_batches, in one
    REPEATABLE READ transaction), slowed down between its two reads, and a re-run of init
    at that moment must both succeed: neither may die of a deadlock."""
    from shardkit.catalog import Catalog

    w = world
    follower = Catalog(w.cluster.config.catalog_url)
    slowed = threading.Event()

    def slow(conn, cursor, statement, *a):  # a slow network between the follower's two reads
        if "shardkit_catalog.move_batches b" in statement and not slowed.is_set():
            slowed.set()
            time.sleep(1.5)
    event.listen(follower.engine, "before_cursor_execute", slow)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            assert follower.current_state() is not None
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    admin = shardkit.Cluster.from_config(w.cfg_path, follow_map=False)
    try:
        assert slowed.wait(10)
        rebalance.init(admin)  # as `shardkit rebalance init` after adding a shard
    finally:
        thread.join(30)
        admin.dispose()
        follower.engine.dispose()
    assert not errors, errors

