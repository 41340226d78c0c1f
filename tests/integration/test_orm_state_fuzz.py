"""A stateful fuzzer of the ORM unit of work: the same random sequence of ORM operations run
on a plain SQLAlchemy ``Session`` over ONE unsharded database (``osf8_oracle``, on the first
shard's server) and on a ``ShardedSession`` over a 3-shard cluster, checked after every step.

Model: ``Account`` (hash-sharded on its primary key ``id``; a ``version_id_col``, a Python
default, a server default) with a ``lazy="selectin"`` collection of ``Order`` (composite
primary key ``(account_id, id)``, colocated; ``cascade="all, delete-orphan"``,
``back_populates``; a server default) with a collection of ``LineItem`` (primary key
``(account_id, order_id, n)``, foreign key to its order with ``ON UPDATE/DELETE CASCADE``; a
Python default), and ``Currency``, a reference table the orders reference by foreign key.

Operations: add accounts / orders / items (keys on every shard; children keyed by their
parent relationship or explicitly), change non-key attributes, move an order to another
account (same shard: done as on one database; another shard: a documented refusal),
delete objects and orphans, flush, commit, rollback, savepoints (begin / commit / rollback),
expire / expire_all / refresh, merge of a detached copy, get, selects with where / order by,
reference rows added / changed / deleted, duplicate primary keys, close and reopen.

Checks after each step: the committed tables of both sides are equal (the sharded side read
from every shard's primary: each row on the shard owning its key, every reference copy the
same); inside a transaction the session's own view of every table is equal; the sessions
hold the same objects (by class and logical key) in the same states with the same loaded
values, the same ``new``/``dirty``/``deleted`` sizes, ``in_transaction()`` and savepoint
depth.  An operation that raises on one side must raise the same on the other, or raise a
shardkit error on the sharded side (a documented refusal) while the plain session succeeds;
then both are rolled back.

``SHARDKIT_ORM_FUZZ_RUNS`` / ``_STEPS`` / ``_SEED`` set the runs (each from empty tables), the
steps of each and the seed (default 4 x 60, seed 9; ``SHARDKIT_FUZZ_SCALE``
multiplies the runs: tests/fuzz_size.py); ``SHARDKIT_ORM_FUZZ_MINIMISE=1`` prints a
failing run shrunk, and ``SHARDKIT_ORM_FUZZ_REPLAY=FILE`` replays (and shrinks) a printed list of steps.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fuzz_size import fuzz_size
from orm_fuzz_driver import (
    FuzzBase,
    Side,
    fuzz_env,
    minimise,
    play,
    rule_registry,
    run_fuzz,
    spread_keys,
    st,
    table_rows,
)
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import shardkit

pytestmark = [
    pytest.mark.integration,
    # The duplicate primary key steps make SQLAlchemy warn on both sides, as they should.
    pytest.mark.filterwarnings("ignore:New instance .* conflicts with persistent instance"),
]

RUNS = fuzz_size("SHARDKIT_ORM_FUZZ_RUNS", 4)
STEPS = int(os.environ.get("SHARDKIT_ORM_FUZZ_STEPS", "60"))
SEED = int(os.environ.get("SHARDKIT_ORM_FUZZ_SEED", "9"))

RULES, rule = rule_registry()   # name -> (weight, argument generators)


class OsBase(DeclarativeBase):
    pass


class Currency(OsBase):
    __tablename__ = "osf8_currencies"
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(30))
    rate: Mapped[int] = mapped_column(Integer, default=100)


class Account(OsBase):
    __tablename__ = "osf8_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(30))
    balance: Mapped[int] = mapped_column(Integer, default=0)
    tag: Mapped[str] = mapped_column(String(10), server_default="srv")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    orders: Mapped[list[Order]] = relationship(
        back_populates="account", cascade="all, delete-orphan", lazy="selectin", order_by="Order.id")
    __mapper_args__ = {"version_id_col": version}


class Order(OsBase):
    __tablename__ = "osf8_orders"
    account_id: Mapped[int] = mapped_column(ForeignKey("osf8_accounts.id"), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    note: Mapped[str | None] = mapped_column(String(30))
    status: Mapped[str] = mapped_column(String(10), server_default="new")
    currency_code: Mapped[str | None] = mapped_column(ForeignKey("osf8_currencies.code"))
    account: Mapped[Account] = relationship(back_populates="orders")
    currency: Mapped[Currency | None] = relationship()
    items: Mapped[list[LineItem]] = relationship(
        back_populates="order", cascade="all, delete-orphan", order_by="LineItem.n")


class LineItem(OsBase):
    __tablename__ = "osf8_items"
    account_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    qty: Mapped[int] = mapped_column(Integer, default=1)
    order: Mapped[Order] = relationship(back_populates="items")
    __table_args__ = (ForeignKeyConstraint(
        ["account_id", "order_id"], ["osf8_orders.account_id", "osf8_orders.id"],
        onupdate="CASCADE", ondelete="CASCADE"),)


CONFIG = {
    "groups": {"osf8": {"strategy": "hash", "tables": {
        "osf8_accounts": "id", "osf8_orders": "account_id", "osf8_items": "account_id"}}},
    "reference_tables": ["osf8_currencies"],
}
CLASSES = (Currency, Account, Order, LineItem)
TABLES = [t.name for t in OsBase.metadata.sorted_tables]
CODES = ("EUR", "USD", "GBP", "JPY", "CHF")


def lkey(obj: Any) -> tuple[str, Any]:
    """An object's logical key: its class and the part of its primary key the fuzzer never
    changes (an order keeps its ``id`` when it moves to another account)."""
    st_ = inspect(obj)
    ident = st_.identity
    d = st_.dict
    if isinstance(obj, Account):
        return ("A", ident[0] if ident else d.get("id"))
    if isinstance(obj, Order):
        return ("O", ident[1] if ident else d.get("id"))
    if isinstance(obj, LineItem):
        return ("L", ident[2] if ident else d.get("n"))
    return ("C", ident[0] if ident else d.get("code"))


ROW_KEY = {"osf8_currencies": lambda r: ("C", r["code"]), "osf8_accounts": lambda r: ("A", r["id"]),
           "osf8_orders": lambda r: ("O", r["id"]), "osf8_items": lambda r: ("L", r["n"])}


class Fuzz(FuzzBase):
    rules = RULES
    metadata = OsBase.metadata
    tables = TABLES
    lkey = staticmethod(lkey)
    seed_sql = ("INSERT INTO osf8_currencies (code, name, rate) "
                "VALUES ('EUR', 'euro', 100), ('USD', 'dollar', 90), ('GBP', 'pound', 120)")

    # ------------------------------------------------------------------ rules

    @rule(3, i=st.integers(0, 11), name=st.sampled_from(["a", "b", "c"]), bal=st.none() | st.integers(0, 9))
    def add_account(self, i: int, name: str, bal: int | None) -> None:
        k = self.env["akeys"][i]

        def op(side: Side) -> None:
            a = Account(id=k, name=name) if bal is None else Account(id=k, name=name, balance=bal)
            side.s.add(a)
            side.reg.setdefault(("A", k), a)
        self.both(f"add_account({k}, {name!r}, {bal})", op)

    @rule(4, i=st.integers(0, 99), cur=st.none() | st.sampled_from(CODES[:3] * 4 + CODES[3:]), via=st.booleans(),
          note=st.none() | st.sampled_from(["x", "y"]))
    def add_order(self, i: int, cur: str | None, via: bool, note: str | None) -> None:
        if via:
            k = self.pick("A", i)
            if k is None:
                return
        else:   # (now and then an account that may not exist)
            k = (i % 5 and self.pick("A", i)) or self.env["akeys"][i % 12]
        oid = self.new_id()

        def op(side: Side) -> None:
            o = Order(id=oid, note=note, currency_code=cur)
            if via:
                side.reg["A", k].orders.append(o)
            else:
                o.account_id = k
                side.s.add(o)
            side.reg["O", oid] = o
        self.both(f"add_order({oid}, {'to' if via else 'key'} {k}, {cur})", op)

    @rule(3, i=st.integers(0, 99), qty=st.none() | st.integers(1, 5))
    def add_item(self, i: int, qty: int | None) -> None:
        ok = self.pick("O", i)
        if ok is None:
            return
        n = self.new_id()

        def op(side: Side) -> None:
            li = LineItem(n=n) if qty is None else LineItem(n=n, qty=qty)
            side.reg["O", ok].items.append(li)
            side.reg["L", n] = li
        self.both(f"add_item({n} to order {ok}, {qty})", op)

    @rule(3, kind=st.sampled_from("AOLC"), i=st.integers(0, 99), v=st.integers(0, 3))
    def set_attr(self, kind: str, i: int, v: int) -> None:
        k = self.pick(kind, i)
        if k is None:
            return
        attr, val = {"A": [("name", "n%d" % v), ("balance", v)][v % 2],
                     "O": [("note", "m%d" % v), ("currency_code", CODES[v])][v % 2],
                     "L": ("qty", v + 10),
                     "C": [("name", "c%d" % v), ("rate", v)][v % 2]}[kind]

        def op(side: Side) -> None:
            setattr(side.reg[kind, k], attr, val)
        self.both(f"set {kind}{k}.{attr} = {val!r}", op)

    @rule(4, i=st.integers(0, 99), j=st.integers(0, 11), how=st.sampled_from(["append", "assign"]))
    def move_order(self, i: int, j: int, how: str) -> None:
        ok = self.pick("O", i)
        target = self.env["akeys"][j]
        if ok is None:
            return

        def op(side: Side) -> None:
            o = side.reg["O", ok]
            a = side.reg.get(("A", target)) or side.s.get(Account, target)
            if a is None:
                return
            if side is self.plain:
                cl = self.env["cluster"]
                st_ = inspect(o)
                src = st_.identity[0] if st_.identity else None
                self.stats["move " + ("pending" if src is None else "same shard" if cl.shard_for(Account, src)
                                      == cl.shard_for(Account, target) else "to another shard")] += 1
            if how == "append":
                a.orders.append(o)
            else:
                o.account = a
        self.both(f"move order {ok} to account {target} by {how}", op)

    @rule(kind=st.sampled_from("AOLC"), i=st.integers(0, 99))
    def delete(self, kind: str, i: int) -> None:
        k = self.pick(kind, i)
        if k is None:
            return

        def op(side: Side) -> None:
            o = side.reg[kind, k]
            if inspect(o).pending:
                side.s.expunge(o)
            else:
                side.s.delete(o)
        self.both(f"delete {kind}{k}", op)

    @rule(i=st.integers(0, 99), which=st.sampled_from(["order", "item"]))
    def orphan(self, i: int, which: str) -> None:
        k = self.pick("O" if which == "order" else "L", i)
        if k is None:
            return

        def op(side: Side) -> None:
            if which == "order":
                o = side.reg["O", k]
                if o.account is not None:
                    o.account.orders.remove(o)
            else:
                li = side.reg["L", k]
                if li.order is not None:
                    li.order.items.remove(li)
        self.both(f"orphan {which} {k}", op)

    @rule(6, what=st.sampled_from(["flush", "commit", "rollback", "begin_nested", "nested_commit",
                                "nested_rollback", "expire_all", "close"]))
    def session_op(self, what: str) -> None:
        self.run_session_op(what)

    @rule(kind=st.sampled_from("AOLC"), i=st.integers(0, 99), refresh=st.booleans(),
          attrs=st.booleans())
    def expire_or_refresh(self, kind: str, i: int, refresh: bool, attrs: bool) -> None:
        k = self.pick(kind, i)
        if k is None:
            return
        names = {"A": ["name", "orders"], "O": ["note", "items"], "L": ["qty"], "C": ["rate"]}[kind] if attrs else None

        def op(side: Side) -> None:
            o = side.reg[kind, k]
            if inspect(o).pending:
                return
            (side.s.refresh if refresh else side.s.expire)(o, names)
        self.both(f"{'refresh' if refresh else 'expire'} {kind}{k} {names}", op)

    @rule(i=st.integers(0, 11), name=st.sampled_from(["m1", "m2"]), bal=st.integers(0, 9))
    def merge_account(self, i: int, name: str, bal: int) -> None:
        k = self.env["akeys"][i]

        def op(side: Side) -> None:
            # a detached copy, as from another session or a cache: the version it was read at
            with side.maker() as other:
                a = other.get(Account, k)
                if a is None:
                    a = Account(id=k)
                else:
                    other.expunge(a)
            a.name, a.balance = name, bal
            side.reg["A", k] = side.s.merge(a)
        self.both(f"merge account {k} ({name}, {bal})", op)

    @rule(kind=st.sampled_from("AOC"), i=st.integers(0, 99))
    def get(self, kind: str, i: int) -> None:
        if kind == "A":
            k = self.env["akeys"][i % 12]
            cls, pk, lk = Account, k, ("A", k)
        elif kind == "C":
            k = CODES[i % len(CODES)]
            cls, pk, lk = Currency, k, ("C", k)
        else:
            rows = self.env["committed_orders"]()
            if not rows:
                return
            aid, oid = rows[i % len(rows)]
            cls, pk, lk = Order, (aid, oid), ("O", oid)

        def op(side: Side) -> None:
            o = side.s.get(cls, pk)
            if o is not None:
                side.reg[lk] = o
        self.both(f"get {cls.__name__} {pk}", op)

    @rule(q=st.integers(0, 5), i=st.integers(0, 11))
    def query(self, q: int, i: int) -> None:
        ks = self.env["akeys"]
        stmt = [
            select(Account).order_by(Account.id),
            select(Account).where(Account.id.in_(ks[i: i + 4])).order_by(Account.balance.desc(), Account.id),
            select(Order).where(Order.account_id == ks[i]).order_by(Order.id),
            select(Order).where(Order.note.is_not(None)).order_by(Order.id.desc()),
            select(LineItem).where(LineItem.qty > 1).order_by(LineItem.n),
            select(Currency).order_by(Currency.code),
        ][q]

        def op(side: Side) -> None:
            got = side.s.scalars(stmt).all()
            for o in got:
                side.reg[lkey(o)] = o
            side.last = [lkey(o) for o in got]
        self.both_same_result(f"query {q} {i}", op)

    @rule(i=st.integers(0, len(CODES) - 1), name=st.sampled_from(["euro", "dollar"]))
    def add_currency(self, i: int, name: str) -> None:
        code = CODES[i]

        def op(side: Side) -> None:
            c = Currency(code=code, name=name)
            side.s.add(c)
            side.reg.setdefault(("C", code), c)
        self.both(f"add currency {code}", op)

    # ------------------------------------------------------------------ checks

    def same_object(self, k: tuple[str, Any], pa: tuple, pb: tuple) -> None:
        if k[0] == "C":   # one object per shard: compare what both have loaded
            ca, cb = pa[1], pb[1]
            common = ca.keys() & cb.keys()
            assert {c: ca[c] for c in common} == {c: cb[c] for c in common}, (k, pa, pb)
            return
        # order.currency: a reference row, one object per shard (README, "Guarantees
        # and limits"): the plain session finds the one it holds without SQL where
        # the sharded one holds it keyed on another shard; compared where both loaded it
        ra, rb = dict(pa[2]), dict(pb[2])
        if "currency" in ra.keys() ^ rb.keys():
            ra.pop("currency", None)
            rb.pop("currency", None)
            self.stats["tolerated: order.currency loaded on one side only"] += 1
        # (seen with item.order: see FuzzBase.tolerate_deleted_one_sided)
        self.tolerate_deleted_one_sided(pa[0], pb[0], ra, rb)
        assert (pa[0], pa[1], ra) == (pb[0], pb[1], rb), (k, pa, pb)


def _committed(oracle: Any, cluster: shardkit.Cluster) -> Any:
    def read() -> tuple[dict, dict]:
        plain = table_rows(oracle, TABLES)
        per_shard = {s: table_rows(cluster.primary(s), TABLES) for s in cluster.shard_names}
        union: dict[str, list] = {}
        for t in TABLES:
            if t == "osf8_currencies":
                copies = {s: per_shard[s][t] for s in cluster.shard_names}
                first = copies[cluster.shard_names[0]]
                assert all(v == first for v in copies.values()), copies
                union[t] = first
            else:
                rows = []
                for s in cluster.shard_names:
                    for r in per_shard[s][t]:
                        # the key: accounts.id is the first column, orders' and items' account_id too
                        owner = cluster.shard_for(t, r[0])
                        assert owner == s, f"{t} row {r} on {s}, owned by {owner}"
                        rows.append(r)
                union[t] = sorted(rows)
        return plain, union
    return read


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    with fuzz_env(dev, CONFIG, OsBase.metadata, "osf8_oracle", _committed) as e:
        oracle = e["oracle"]
        akeys = spread_keys(e["cluster"], Account, 4, lambda n: n)   # four keys on each shard, in turn

        def committed_orders() -> list[tuple[int, int]]:
            with oracle.connect() as c:
                return [tuple(r) for r in c.execute(text("SELECT account_id, id FROM osf8_orders ORDER BY id"))]

        # bring the key columns first for the placement check
        assert [c.name for c in Order.__table__.c][0] == "account_id"
        assert [c.name for c in LineItem.__table__.c][0] == "account_id"
        yield {**e, "akeys": akeys, "committed_orders": committed_orders}


def test_orm_unit_of_work_matches_one_database(env):
    stats = run_fuzz(Fuzz, env, RUNS, STEPS, SEED, bool(os.environ.get("SHARDKIT_ORM_FUZZ_MINIMISE")), "ORM fuzz")
    assert stats["steps"] >= RUNS * STEPS // 2   # (at least half the drawn steps ran an operation)


@pytest.mark.parametrize("read_first", [False, True])
def test_reference_row_added_in_a_transaction_is_the_object_its_reads_return(env, read_first):
    """A case from the fuzzer: a reference row added and flushed was keyed on the first shard
    (where the flush writes it before copying it), but the transaction's reference reads take
    the shard whose turn it is: from the second transaction of a session on, a select of the
    row returned ANOTHER object than the one added (a plain Session returns the same one), and
    after a rollback the session kept that copy as a persistent object of a row that no
    longer exists, where a plain Session has none.  Now the new object is keyed on the shard
    the transaction reads reference rows from (the first, if it has read none yet)."""
    for eng in [env["oracle"], *env["primaries"].values()]:
        with eng.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
            c.execute(text("INSERT INTO osf8_currencies (code, name, rate) VALUES ('EUR', 'euro', 1)"))
    for maker in (env["Plain"], env["Sharded"]):
        with maker() as s:
            for turn in range(4):   # the shards take turns between transactions
                if read_first:
                    s.scalars(select(Currency)).all()
                c = Currency(code="CHF", name="franc")
                s.add(c)
                s.flush()
                assert s.scalars(select(Currency).where(Currency.code == "CHF")).one() is c, turn
                assert s.get(Currency, "CHF") is c
                s.rollback()
                assert inspect(c).transient
                assert s.get(Currency, "CHF") is None
                left = [o for o in s.identity_map.values() if isinstance(o, Currency) and o.code == "CHF"]
                assert left == [], (turn, left)


def test_moving_a_child_leaves_its_expired_old_parent_unloaded(env):
    """A case from the fuzzer: an order moved to another account (``order.account = b``) after
    a commit, its old account expired.  The backref looks the old account up in the identity
    map without SQL (PASSIVE_NO_FETCH); SQLAlchemy's horizontal_shard ``_identity_lookup``
    dropped that flag, so the sharded session refreshed the old account (and selectin-loaded
    its orders) where a plain Session leaves it expired and reads nothing."""
    for eng in [env["oracle"], *env["primaries"].values()]:
        with eng.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    a, b = [k for k in env["akeys"] if env["cluster"].shard_for(Account, k) == "s0"][:2]
    seen = {}
    for maker in (env["Plain"], env["Sharded"]):
        with maker() as s:
            old, new = Account(id=a, name="a"), Account(id=b, name="b")
            order = Order(id=1, note="x")
            old.orders.append(order)
            s.add_all([old, new])
            s.commit()
            order.items.append(LineItem(n=5))   # (loads the order, expired by the commit)
            sql = []
            listen_on = [s.get_bind()] if maker is env["Plain"] else list(env["primaries"].values())
            from sqlalchemy import event

            def note(*args: Any) -> None:
                sql.append(args[2].split()[0])
            for eng in listen_on:
                event.listen(eng, "before_cursor_execute", note)
            try:
                order.account = new
            finally:
                for eng in listen_on:
                    event.remove(eng, "before_cursor_execute", note)
            seen[maker is env["Sharded"]] = (sorted(inspect(old).unloaded), sql)
            s.commit()
            assert s.get(Order, (b, 1)) is order and order.account is new
    assert seen[True] == seen[False], seen
    assert "name" in seen[False][0] and seen[False][1] == []


@pytest.mark.skipif(not os.environ.get("SHARDKIT_ORM_FUZZ_REPLAY"), reason="a developer's tool")
def test_replay_and_minimise(env):
    """Replay the steps in the file named by SHARDKIT_ORM_FUZZ_REPLAY (a Python list, as a
    failure prints it) and print the shortest failing sublist found."""
    import ast

    steps = ast.literal_eval(open(os.environ["SHARDKIT_ORM_FUZZ_REPLAY"]).read())
    steps = minimise(Fuzz, env, steps)
    print("\nMINIMISED:", steps)
    play(Fuzz, env, steps)
