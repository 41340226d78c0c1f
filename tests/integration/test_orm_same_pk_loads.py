"""ORM loads on a ShardedSession (populate_existing, refresh, expired objects, lazy and
eager loaders, get(populate_existing/with_for_update)) for objects of different shards with
the same primary key, under a named shard, and after a move of their bucket.

Own module-scoped world: 2 shards x 1 replica, a catalog.  ``members`` (key ``id``),
``purchases`` (key ``member_id``, primary key ``id`` unique per shard only) and ``refunds``
(key ``member_id``, related to their purchase by ``purchase_id`` and ``member_id``).
"""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, Integer, String, and_, create_engine, select, text
from sqlalchemy.orm import (DeclarativeBase, Mapped, foreign, joinedload, mapped_column, relationship,
                            selectinload, sessionmaker, subqueryload)

import shardkit
from shardkit import rebalance

pytestmark = pytest.mark.integration

BUCKETS = 32


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "olr_members"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    purchases: Mapped[list[Purchase]] = relationship(
        primaryjoin=lambda: Member.id == foreign(Purchase.member_id), back_populates="member",
        order_by=lambda: Purchase.id)


class Purchase(Base):
    """Primary key ``id`` is unique per shard only: each shard numbers its own purchases."""
    __tablename__ = "olr_purchases"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(Integer)
    member: Mapped[Member] = relationship(
        primaryjoin=lambda: Member.id == foreign(Purchase.member_id), back_populates="purchases")
    refunds: Mapped[list[Refund]] = relationship(
        primaryjoin=lambda: and_(Purchase.id == foreign(Refund.purchase_id),
                                 Purchase.member_id == foreign(Refund.member_id)),
        back_populates="purchase", order_by=lambda: Refund.id)


class Refund(Base):
    __tablename__ = "olr_refunds"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_id: Mapped[int] = mapped_column(BigInteger)
    purchase_id: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(Integer)
    purchase: Mapped[Purchase] = relationship(
        primaryjoin=lambda: and_(Purchase.id == foreign(Refund.purchase_id),
                                 Purchase.member_id == foreign(Refund.member_id)),
        back_populates="refunds")


GROUPS = {
    "groups": {"members": {"strategy": "hash", "tables": {
        "olr_members": "id", "olr_purchases": "member_id", "olr_refunds": "member_id"}}},
    "replicas": {"poll_interval": 0.05, "max_lag_seconds": 30.0},
}


class World:
    def __init__(self, dev, cfg):
        self.dev = dev
        self.cfg = cfg
        self.admin = shardkit.Cluster.from_config(cfg, follow_map=False)
        self.app = shardkit.Cluster.from_config(cfg)
        # one member per shard, each with purchase id 1 (and 2): the same primary keys
        self.m = {}
        for s in ("s0", "s1"):
            self.m[s] = next(k for k in range(1, 1000) if self.admin.shard_for("olr_members", k) == s)

    def sessions(self, consistency="strong", **kw):
        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.app, consistency=consistency, **kw)

    def primary_rows(self, shard, sql):
        with self.admin.primary(shard).connect() as c:
            return c.execute(text(sql)).all()


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1, bucket_count=BUCKETS)
    catalog_url = dev.create_catalog()
    for s in dev.shards:
        eng = create_engine(s.primary.url)
        Base.metadata.create_all(eng)
        eng.dispose()
    cfg = {**dev.config_dict(), **GROUPS, "catalog": {"url": catalog_url}}
    admin = shardkit.Cluster.from_config(cfg, follow_map=False)
    rebalance.init(admin)
    admin.dispose()
    w = World(dev, cfg)
    with w.sessions()() as s:
        for shard, mid in w.m.items():
            s.add(Member(id=mid, name=f"member of {shard}"))
            for pid in (1, 2):
                s.add(Purchase(id=pid, member_id=mid, amount=100 * pid + (0 if shard == "s0" else 5)))
                s.add(Refund(id=10 * pid, member_id=mid, purchase_id=pid, amount=pid + (0 if shard == "s0" else 50)))
        s.commit()
    w.app.start_monitor()
    yield w
    w.app.dispose()
    w.admin.dispose()


def _shard_of(obj):
    from sqlalchemy import inspect
    return inspect(obj).key[2]


def _check_refunds(w, purchases):
    problems = []
    for p in purchases:
        shard = _shard_of(p)
        want = w.primary_rows(shard, f"SELECT id, amount FROM olr_refunds WHERE purchase_id = {p.id} "
                                     f"AND member_id = {p.member_id} ORDER BY id")
        got = [(r.id, r.amount) for r in p.refunds]
        if got != [tuple(x) for x in want]:
            problems.append(f"purchase {p.id} of {shard}: refunds {got}, its shard has {want}")
        for r in p.refunds:
            if _shard_of(r) != shard:
                problems.append(f"purchase {p.id} of {shard} holds refund {r.id} of {_shard_of(r)}")
    return problems


@pytest.mark.parametrize("loader", ["selectinload", "subqueryload", "joinedload"])
def test_eager_loads_of_same_pk_purchases_stay_on_their_shards(world, loader):
    opt = {"selectinload": selectinload, "subqueryload": subqueryload, "joinedload": joinedload}[loader]
    with world.sessions()() as s:
        got = s.scalars(select(Purchase).where(Purchase.id == 1).options(opt(Purchase.refunds))).unique().all()
        assert sorted(_shard_of(p) for p in got) == ["s0", "s1"]
        assert not _check_refunds(world, got)


@pytest.mark.parametrize("loader", ["selectinload", "subqueryload", "joinedload"])
@pytest.mark.parametrize("how", ["shardkit_shard", "identity_token", "bind_arguments"])
def test_eager_loads_under_a_named_shard(world, loader, how):
    opt = {"selectinload": selectinload, "subqueryload": subqueryload, "joinedload": joinedload}[loader]
    stmt = select(Purchase).where(Purchase.id == 1).options(opt(Purchase.refunds))
    with world.sessions()() as s:
        if how == "bind_arguments":
            got = s.scalars(stmt, bind_arguments={"shard_id": "s1"}).unique().all()
        else:
            got = s.scalars(stmt.execution_options(**{how: "s1"})).unique().all()
        assert [_shard_of(p) for p in got] == ["s1"]
        assert not _check_refunds(world, got)


@pytest.mark.parametrize("where", ["scope shard", "scope key of the other shard", "strict session"])
def test_selectinload_of_same_pk_purchases_in_scopes(world, where):
    """selectinload of a colocated collection runs on the shard of the objects it loads for:
    inside scope(key=...) naming another shard's key (the statement has its own key), and in
    a strict session (it is not a cross-shard read)."""
    mid = world.m["s1"]
    stmt = select(Purchase).where(Purchase.member_id == mid).options(selectinload(Purchase.refunds))
    Session = world.sessions(strict=True) if where == "strict session" else world.sessions()
    with Session() as s:
        if where == "scope shard":
            with shardkit.scope(shard="s1"):
                got = s.scalars(select(Purchase).options(selectinload(Purchase.refunds))).all()
        elif where == "scope key of the other shard":
            with shardkit.scope(key=world.m["s0"]):
                got = s.scalars(stmt).all()
        else:
            got = s.scalars(stmt).all()
        assert sorted(p.id for p in got) == [1, 2] and {_shard_of(p) for p in got} == {"s1"}
        assert not _check_refunds(world, got)


def _touch(world, shard, sql):
    with world.admin.primary(shard).begin() as c:
        c.execute(text(sql))


def test_loads_of_same_pk_objects_keep_to_their_shards(world):
    """Purchase 1 of s0 and of s1 in one session: populate_existing on a named shard, refresh
    and expired reloads inside scope(shard=) of the other shard, lazy collections and
    many-to-ones, with_parent, contains_eager, get(identity_token=, populate_existing,
    with_for_update), Query.set_shard with selectinload, nested selectinload/subqueryload."""
    from sqlalchemy.orm import contains_eager, with_parent
    problems = []
    m0, m1 = world.m["s0"], world.m["s1"]
    with world.sessions("strong")() as s:
        ps = {_shard_of(p): p for p in s.scalars(select(Purchase).where(Purchase.id == 1))}
        assert set(ps) == {"s0", "s1"}
        a0, a1 = ps["s0"].amount, ps["s1"].amount
        _touch(world, "s1", "UPDATE olr_purchases SET amount = amount + 1 WHERE id = 1")
        try:
            got = s.scalars(select(Purchase).where(Purchase.id == 1).execution_options(
                populate_existing=True, shardkit_shard="s1")).all()
            if got != [ps["s1"]] or ps["s1"].amount != a1 + 1 or ps["s0"].amount != a0:
                problems.append(f"populate_existing s1: {[(_shard_of(p), p.amount) for p in got]}")
            with shardkit.scope(shard="s0"):
                s.refresh(ps["s1"], ["amount"])
            s.expire_all()
            with shardkit.scope(shard="s0"):
                if ps["s1"].amount != a1 + 1:
                    problems.append(f"expired s1 reloaded in scope s0: {ps['s1'].amount}")
            # lazy loads
            for sh, p in ps.items():
                s.expire(p)
                with shardkit.scope(shard="s0" if sh == "s1" else "s1"):
                    refs = [(r.id, r.amount, _shard_of(r)) for r in p.refunds]
                    if any(x[2] != sh for x in refs) or len(refs) != 1:
                        problems.append(f"lazy refunds of {sh}: {refs}")
                    r = p.refunds[0]
                    s.expire(r)
                    if r.purchase is not p:
                        problems.append(f"lazy purchase of refund of {sh}: {r.purchase}")
                    if r.purchase.member is None or _shard_of(r.purchase.member) != sh:
                        problems.append(f"lazy member of {sh}")
            for sh, p in ps.items():
                got = s.scalars(select(Refund).where(with_parent(p, Purchase.refunds))).all()
                if [_shard_of(r) for r in got] != [sh]:
                    problems.append(f"with_parent {sh}: {[(_shard_of(r), r.id) for r in got]}")
            got = s.scalars(select(Purchase).join(Purchase.refunds).options(contains_eager(Purchase.refunds))
                            .where(Purchase.id == 1).execution_options(populate_existing=True)).unique().all()
            problems += _check_refunds(world, got)
            # get
            g = s.get(Purchase, 1, identity_token="s1", populate_existing=True, with_for_update=True)
            if g is not ps["s1"]:
                problems.append(f"get s1 for update -> {g and _shard_of(g)}")
            with shardkit.scope(shard="s0"):
                g = s.get(Purchase, 1, populate_existing=True, with_for_update={"nowait": True})
            if g is not ps["s0"]:
                problems.append(f"get in scope s0 -> {g and _shard_of(g)}")
            try:
                s.get(Purchase, 1, populate_existing=True)
                problems.append("get(Purchase, 1) across shards answered")
            except shardkit.RoutingError:
                pass
            q = s.query(Purchase).set_shard("s1").populate_existing().options(selectinload(Purchase.refunds))
            problems += _check_refunds(world, q.filter(Purchase.id == 1).all())
            got = s.scalars(select(Member).options(selectinload(Member.purchases).selectinload(Purchase.refunds))).all()
            problems += _check_refunds(world, [p for m in got for p in m.purchases])
            got = s.scalars(select(Member).where(Member.id.in_([m0, m1])).options(
                selectinload(Member.purchases).subqueryload(Purchase.refunds))).all()
            problems += _check_refunds(world, [p for m in got for p in m.purchases])
            s.rollback()
        finally:
            _touch(world, "s1", "UPDATE olr_purchases SET amount = amount - 1 WHERE id = 1")
    assert not problems, "\n".join(problems)



@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning")  # (Query.get, on purpose)
@pytest.mark.parametrize("held", ["both shards' objects", "the other shard's object"])
def test_get_inside_scope_key_returns_the_scope_shards_object(world, held):
    """Inside scope(key=...), get() by a primary key without the shard key loads the row of
    the scope key's shard (as a select() of it does); an object of another shard with that
    primary key, held by the session, is not the answer (it was, depending on what the
    session happened to hold: the first shard's object in shard order)."""
    m0, m1 = world.m["s0"], world.m["s1"]
    with world.sessions()() as s:
        held_objs = {_shard_of(p): p for p in s.scalars(select(Purchase).where(Purchase.id == 1))}
        if held == "the other shard's object":
            s.expunge(held_objs.pop("s1"))
        for key, shard in ((m1, "s1"), (m0, "s0")):
            with shardkit.scope(key=key):
                got = s.get(Purchase, 1)
                again = s.get(Purchase, 1, populate_existing=True)
                selected = s.scalars(select(Purchase).where(Purchase.id == 1)).one()
                legacy = s.query(Purchase).get(1)
            assert _shard_of(got) == shard, f"scope(key={key}): get() -> {_shard_of(got)}'s object"
            assert got is again is selected is legacy


# -- a move of a member's bucket ---------------------------------------------------------------


def _owned(world, table, key_col):
    """(id -> (key, amount), shard) of the rows each shard owns (ownership guard's table)."""
    out = {}
    for s in ("s0", "s1"):
        for row in world.primary_rows(s, f"SELECT id, {key_col}, amount FROM {table} WHERE "
                                         f"shardkit.bucket({key_col}, {BUCKETS}) IN (SELECT bucket FROM "
                                         "shardkit.owned_buckets)"):
            out[(s, row[0])] = (row[1], row[2])
    return out


def test_eager_loads_and_gets_while_a_bucket_moves(world):
    """A member of s0 (purchases 900, 901 with refunds) moves to s1.  At each pause: cross-shard
    reads with nested selectinload give every purchase once with its own shard's refunds;
    a session holding the member from before the move gets it with populate_existing and
    with_for_update from its owner."""
    from test_reads_during_moves import Moving, PausingMover
    from shardkit._rebalance_plan import plan_from_maps

    bucket_of = {s: shardkit.bucket_for(world.m[s], BUCKETS) for s in ("s0", "s1")}
    k = next(k for k in range(1000, 5000) if world.admin.shard_for("olr_members", k) == "s0"
             and shardkit.bucket_for(k, BUCKETS) not in bucket_of.values())
    with world.sessions()() as s:
        s.add(Member(id=k, name="mover"))
        for pid in (900, 901):
            s.add(Purchase(id=pid, member_id=k, amount=pid))
            s.add(Refund(id=pid * 10, member_id=k, purchase_id=pid, amount=pid))
        s.commit()
    before = world.sessions("eventual")()
    old = before.get(Member, k)
    assert _shard_of(old) == "s0"
    before.commit()
    world.admin.refresh_map()
    live = world.admin.config.bucket_map
    new = list(live)
    new[shardkit.bucket_for(k, BUCKETS)] = "s1"
    plan = plan_from_maps(live, tuple(new), "test: the mover's bucket to s1")
    run = Moving(PausingMover(world.admin, {"copy-committed", "switched", "cleaned"}), plan)
    problems, steps = [], []
    try:
        while (step := run.next_step()) is not None:
            steps.append(step)
            world.app.refresh_map()
            owner = "s1" if step in ("switched", "cleaned") else "s0"
            truth = _owned(world, "olr_purchases", "member_id")
            with world.sessions()() as s:
                got = s.scalars(select(Purchase).options(selectinload(Purchase.refunds))).all()
                seen = sorted((_shard_of(p), p.id) for p in got)
                if seen != sorted(truth):
                    problems.append(f"{step}: purchases {seen}, owned {sorted(truth)}")
                problems += [f"{step}: {x}" for x in _check_refunds(world, got)]
                ms = s.scalars(select(Member).options(
                    selectinload(Member.purchases).selectinload(Purchase.refunds))).all()
                problems += [f"{step} (nested): {x}" for x in _check_refunds(world, [p for m in ms for p in m.purchases])]
            for kw in ({"populate_existing": True}, {"with_for_update": True}):
                try:
                    m = before.get(Member, k, **kw)
                    if _shard_of(m) != owner or sorted(p.id for p in m.purchases) != [900, 901]:
                        problems.append(f"{step}: get({kw}) -> {_shard_of(m)}, owner {owner}")
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{step}: get({kw}): {type(e).__name__}: {str(e)[:200]}")
                before.rollback()
            run.resume()
    finally:
        run.finish()
        before.close()
    assert not run.errors, run.errors
    assert steps == ["copy-committed", "switched", "cleaned"], steps
    assert not problems, "\n".join(problems)
