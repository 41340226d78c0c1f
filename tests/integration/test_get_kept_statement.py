"""get() by a one-column primary key that is the shard key runs SQLAlchemy's load by
primary key with a statement made once per mapper (ShardedSession._get_impl, _get_load),
where SQLAlchemy builds the same statement anew on every get(): it must be the statement
SQLAlchemy builds, and every kind of get() must give what it gives without the kept one
(same objects, same errors, same SQL on the same nodes)."""

from __future__ import annotations

import threading
import warnings

import pytest
from get_paths import outcome, with_and_without_kept
from own_tables import cluster_with_tables, truncate_everywhere
from replica_env import replayed
from waiting import wait_for, wait_replicas_usable
from sqlalchemy import exc as sa_exc
from sqlalchemy import BigInteger, ForeignKey, String, event, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.orm import exc as orm_exc

import shardkit
import shardkit._session as sk_session

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Wallet(Base):
    __tablename__ = "gk_wallets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(String(20), default="")
    coins = relationship("Coin", back_populates="wallet", order_by="Coin.id")


class Coin(Base):
    __tablename__ = "gk_coins"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    wallet_id: Mapped[int] = mapped_column(ForeignKey("gk_wallets.id"), primary_key=True)
    wallet = relationship("Wallet", back_populates="coins")


class Pet(Base):
    """Single-table inheritance: get(Dog, id) of a Cat's id is None."""
    __tablename__ = "gk_pets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "pet"}


class Cat(Pet):
    __mapper_args__ = {"polymorphic_identity": "cat"}


class Dog(Pet):
    __mapper_args__ = {"polymorphic_identity": "dog"}


class Vehicle(Base):
    """Joined-table inheritance, both tables in one group."""
    __tablename__ = "gk_vehicles"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Truck(Vehicle):
    __tablename__ = "gk_trucks"
    id: Mapped[int] = mapped_column(ForeignKey("gk_vehicles.id"), primary_key=True)
    load: Mapped[int] = mapped_column(BigInteger, default=0)
    __mapper_args__ = {"polymorphic_identity": "truck"}


class Tag(Base):
    """Sharded by text."""
    __tablename__ = "gk_tags"
    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


CONFIG = {"groups": {
    "wallets": {"tables": {"gk_wallets": "id", "gk_coins": "wallet_id"}},
    "pets": {"tables": {"gk_pets": "id"}},
    "vehicles": {"tables": {"gk_vehicles": "id", "gk_trucks": "id"}},
    "tags": {"tables": {"gk_tags": "name"}},
}}
TABLES = [t.name for t in reversed(Base.metadata.sorted_tables)]


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def unreplicated(env, shardkit_dev_cluster):
    cfg = shardkit_dev_cluster.config_dict()
    for s in cfg["shards"]:
        s["replicas"] = []
    cluster = shardkit.Cluster.from_config({**cfg, **CONFIG}, metadata=Base.metadata)
    yield cluster
    cluster.dispose()


def _seed(env, dev):
    truncate_everywhere(env, *TABLES)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=env)() as s:
        s.add_all([Wallet(id=i, owner=f"w{i}", coins=[Coin(id=1), Coin(id=2)]) for i in range(1, 9)])
        s.add(Wallet(id=9, owner="w9"))
        s.add_all([Cat(id=1), Dog(id=2)])
        s.add_all([Vehicle(id=1, kind="vehicle"), Truck(id=2, load=7)])
        s.add_all([Tag(name=n, n=i) for i, n in enumerate(["a", "b", "ü", ""])])
        s.commit()
    # (Replayed first by position: the first test's replicas may not have the tables yet,
    # whose count would fail rather than wait.)
    replayed(dev)
    wait_for(lambda: all(_replayed(env, shard) for shard in env.shard_names), 30, "the replicas to replay the rows")
    wait_replicas_usable(env, every=True)


def _contents(cluster):
    """Every row of the module's tables on each shard's primary, as one digest per shard."""
    parts = ", ".join(f"(SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {t} t)"
                      for t in TABLES)
    out = {}
    for shard in cluster.shard_names:
        with cluster.primary(shard).connect() as c:
            out[shard] = tuple(c.execute(text(f"SELECT {parts}")).one())
    return out


@pytest.fixture(scope="module")
def seeded(env, shardkit_dev_cluster):
    """The rows, written once: no test commits a change (every get()'s session is rolled
    back), which ``rows`` checks before each test."""
    _seed(env, shardkit_dev_cluster)
    return _contents(env)


@pytest.fixture
def rows(env, seeded, shardkit_dev_cluster):
    """The seeded rows, on the primaries and replayed by the replicas (written again
    if a test changed them)."""
    if _contents(env) != seeded:
        _seed(env, shardkit_dev_cluster)
        assert _contents(env) == seeded


def _replayed(cluster, shard):
    def counts(engine):
        with engine.connect() as c:
            return [c.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES]
    return all(counts(cluster.engine(shard, "replica", i)) == counts(cluster.primary(shard))
               for i in range(cluster.replica_count(shard)))


def _kept(session, entity):
    plan = session.cluster.router.get_plans.get(entity)
    return None if plan is None else plan[4]


def test_the_kept_statement_is_the_one_sqlalchemy_builds(env, rows):
    # SQLAlchemy's own get() on a plain Session: the statement its load runs, by cache
    # key (which decides the SQL compiled and how the rows are loaded), and its options.
    seen = []

    def capture(state):
        seen.append((state.statement, dict(state.execution_options), state.bind_arguments.get("clause")))
    for entity, key in ((Wallet, 3), (Tag, "b"), (Cat, 1), (Pet, 2), (Truck, 2), (Vehicle, 1)):
        seen.clear()
        plain = Session(env.primary(env.shard_for(entity, key)))
        event.listen(plain, "do_orm_execute", capture)
        assert plain.get(entity, key) is not None
        plain.close()
        (theirs, their_options, _), = seen
        seen.clear()
        with sessionmaker(class_=shardkit.ShardedSession, cluster=env, consistency="strong")() as s:
            event.listen(s, "do_orm_execute", capture)
            obj = s.get(entity, key)
            assert obj is not None and obj._sa_instance_state.key[2] == env.shard_for(entity, key)
            kept = _kept(s, entity)
        assert kept is not None, f"{entity.__name__}: no kept statement"
        (ours, our_options, _), = seen
        assert ours is kept[0], "the load did not run the kept statement"
        assert ours._generate_cache_key() == theirs._generate_cache_key()
        assert str(ours) == str(theirs)
        assert their_options["_sa_orm_load_options"]._identity_token is None
        assert our_options["_sa_orm_load_options"]._identity_token == env.shard_for(entity, key)


def test_get_on_a_second_key_column_or_a_composite_key_keeps_no_statement(env, rows):
    with sessionmaker(class_=shardkit.ShardedSession, cluster=env)() as s:
        assert s.get(Coin, {"id": 1, "wallet_id": 4}).wallet_id == 4
        assert _kept(s, Coin) is None


GETS = {
    "plain": lambda s: s.get(Wallet, 1),
    "twice": lambda s: [s.get(Wallet, 1), s.get(Wallet, 1)],
    "get_one": lambda s: s.get_one(Wallet, 2),
    "get_one missing": lambda s: s.get_one(Wallet, 99),
    "missing": lambda s: s.get(Wallet, 99),
    "text key": lambda s: [s.get(Tag, "ü"), s.get(Tag, ""), s.get(Tag, "zz")],
    "subclass": lambda s: [s.get(Cat, 1), s.get(Dog, 1), s.get(Pet, 2), s.get(Cat, 2)],
    "subclass held": lambda s: [s.get(Pet, 1), s.get(Dog, 1), s.get(Cat, 1)],
    "joined": lambda s: [s.get(Truck, 2), s.get(Truck, 1), s.get(Vehicle, 2), s.get(Vehicle, 1)],
    "listener criteria": lambda s: _with_criteria(s),
    "expired": lambda s: (lambda w: (s.expire(w), s.get(Wallet, 3))[1])(s.get(Wallet, 3)),
    "deleted": lambda s: (lambda w: (s.delete(w), s.flush(), s.get(Wallet, 9))[2])(s.get(Wallet, 9)),
    "pending": lambda s: (s.add(Wallet(id=50)), s.get(Wallet, 50))[1],
    "modified": lambda s: (lambda w: (setattr(w, "owner", "x"), s.get(Wallet, 4), s.get(Wallet, 5))[1:])(
        s.get(Wallet, 4)),
    "options": lambda s: [s.get(Wallet, 4, options=[selectinload(Wallet.coins)]).coins,
                          s.get(Wallet, 5, options=[joinedload(Wallet.coins), defer(Wallet.owner)])],
    "populate_existing": lambda s: (lambda w: (setattr(w, "owner", "x"),
                                               s.get(Wallet, 6, populate_existing=True).owner)[1])(
        s.get(Wallet, 6)),
    "for update": lambda s: s.get(Wallet, 6, with_for_update=True),
    "then lazy": lambda s: s.get(Wallet, 7).coins,
    "query get": lambda s: _legacy_get(s.query(Wallet), 8),
    "token": lambda s: s.get(Wallet, 8, identity_token=s.cluster.shard_for(Wallet, 8)),
    "scope": lambda s: _in_scope(s),
    "bad type": lambda s: s.get(Wallet, "x"),
    "wrong count": lambda s: s.get(Wallet, (1, 2)),
    "after a flush": lambda s: (s.add(Wallet(id=60)), s.flush(), [s.get(Wallet, k) for k in range(1, 9)])[2],
    "after select": lambda s: [s.execute(select(Wallet).where(Wallet.id == 2)).scalar_one(),
                               s.get(Wallet, 2)],
}


def _legacy_get(query, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa_exc.LegacyAPIWarning)
        return query.get(key)


def _with_criteria(s):
    # The multi-tenant recipe: a do_orm_execute listener adds criteria to every SELECT.
    @event.listens_for(s, "do_orm_execute")
    def only_odd(state):
        if state.is_select:
            state.statement = state.statement.options(with_loader_criteria(Wallet, Wallet.id % 2 == 1))
    return [s.get(Wallet, 1), s.get(Wallet, 2), s.get(Wallet, 3).coins]


def _in_scope(s):
    with shardkit.scope(key=5):
        return s.get(Wallet, 5)


@pytest.mark.parametrize("consistency", ["strong", "read_your_writes", "unreplicated"])
@pytest.mark.parametrize("name", list(GETS))
def test_every_get_gives_what_it_gives_without_the_kept_statement(env, unreplicated, rows, monkeypatch,
                                                                  name, consistency):
    cluster = unreplicated if consistency == "unreplicated" else env
    consistency = None if consistency == "unreplicated" else consistency
    fn = GETS[name]
    ran = []
    real = sk_session.ShardedSession.execute

    def execute(self, statement, *a, **kw):
        plans = self.cluster.router.get_plans
        ran.append(any(plan[4] is not None and statement is plan[4][0]
                       for plan in (plans.get(Wallet), plans.get(Wallet.__mapper__)) if plan is not None))
        return real(self, statement, *a, **kw)
    monkeypatch.setattr(sk_session.ShardedSession, "execute", execute)
    kept, theirs = with_and_without_kept(cluster, monkeypatch, fn, consistency=consistency)
    assert kept[0] == theirs[0]
    assert kept[3] == theirs[3], "not the same SQL"
    if consistency != "read_your_writes":  # (a replica's lag may change between the two runs)
        assert kept[1:3] == theirs[1:3], "not the same nodes"
    if name in ("plain", "twice", "get_one", "missing", "then lazy", "query get", "deleted", "modified"):
        assert any(ran), "the kept statement was not used"
    if name == "get_one missing":
        assert kept[0][:2] == ("error", orm_exc.NoResultFound.__name__)


def test_threads_share_the_kept_statement(env, rows):
    Maker = sessionmaker(class_=shardkit.ShardedSession, cluster=env)
    errors = []

    def reader(n):
        try:
            for i in range(200):
                k = (i + n) % 8 + 1
                with Maker() as s:
                    w = s.get(Wallet, k)
                    assert (w.id, w.owner, w._sa_instance_state.key[2]) == (k, f"w{k}", env.shard_for(Wallet, k))
                    assert s.get(Wallet, 100 + k) is None
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(e)
    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# -- a keyed select given its form's cache key (shardkit._routing._give_cache_key) ----------


@pytest.mark.parametrize("consistency", ["strong", "eventual"])
def test_keyed_selects_given_a_cache_key_read_their_own_rows(env, rows, consistency):
    Maker = sessionmaker(class_=shardkit.ShardedSession, cluster=env, consistency=consistency)
    given = 0
    for rnd in range(3):
        for k in list(range(1, 10)) + [99]:
            stmt = select(Wallet).where(Wallet.id == k)
            with Maker() as s:
                got = s.execute(stmt).scalars().all()
                given += _given_by_router(stmt)
                assert [(w.id, w.owner) for w in got] == ([(k, f"w{k}")] if k < 10 else [])
                # The same statement again, and one derived from it, in the same session.
                assert s.execute(stmt).scalars().all() == got
                assert s.execute(stmt.where(Wallet.owner == "nope")).scalars().all() == []
            tag = ["a", "b", "ü", "", "zz"][k % 5]
            with Maker() as s:
                assert [t.name for t in s.execute(select(Tag).where(Tag.name == tag)).scalars()] == \
                    ([tag] if tag != "zz" else [])
    assert given >= 20, "the keyed selects were not given their form's cache key"


def _given_by_router(statement):
    """Whether the router gave ``statement`` its cache key (SQLAlchemy's own memo of one is
    not the router's function)."""
    memo = statement.__dict__.get("_generate_cache_key")
    return memo is not None and memo.__qualname__.startswith("_give_cache_key.")


# -- get()'s load on a shard with replicas takes a plain read's way to its replica --------


@pytest.mark.parametrize("consistency", ["eventual", "read_your_writes"])
@pytest.mark.parametrize("name", list(GETS))
def test_a_get_on_a_replica_gives_what_the_general_path_gives(env, rows, monkeypatch, name, consistency):
    fn = GETS[name]
    served = []
    real = sk_session.ShardedSession._replica_read

    def replica_read(self, *a):
        out = real(self, *a)
        served.append(out is not sk_session._GENERAL)
        return out
    monkeypatch.setattr(sk_session.ShardedSession, "_replica_read", replica_read)
    wait_replicas_usable(env, every=True)
    short = outcome(env, fn, consistency=consistency)
    with monkeypatch.context() as m:
        m.setattr(sk_session.ShardedSession, "_short_path_open", lambda self, *a: False)
        general = outcome(env, fn, consistency=consistency)
    assert short[0] == general[0]
    assert short[3] == general[3], "not the same SQL"
    if consistency == "eventual":  # (a replica's lag may change a read-your-writes choice)
        assert short[1:3] == general[1:3], "not the same nodes"
    if name in ("plain", "twice", "get_one", "missing", "query get", "text key"):
        assert any(served), "the short path was not taken"
