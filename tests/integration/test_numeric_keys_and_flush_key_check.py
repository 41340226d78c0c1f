"""NUMERIC range and list keys against bounds and
values written as floats (a TOML config has no decimal type), the flush's check that no
listener moved a key after routing (what it costs a flush without such listeners), and
get()'s short load path on shards without replicas compared with the general path."""

from __future__ import annotations

from decimal import Decimal

import pytest
from own_tables import cluster_with_tables, truncate_everywhere
from sqlalchemy import BigInteger, ForeignKey, Integer, Numeric, String, event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    defer,
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


class Price(Base):
    """Range-sharded by a NUMERIC(12, 2), split at 0.1 (a float in the config)."""
    __tablename__ = "dc5_prices"
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(20), default="")


class Rate(Base):
    """List-sharded by a NUMERIC(6, 2), values listed as floats."""
    __tablename__ = "dc5_rates"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    rate: Mapped[Decimal] = mapped_column(Numeric(6, 2))


class Account(Base):
    __tablename__ = "dc5_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20), default="")
    entries = relationship("Entry", back_populates="account")


class Entry(Base):
    __tablename__ = "dc5_entries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("dc5_accounts.id"), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)
    account = relationship("Account", back_populates="entries")


CONFIG = {"groups": {
    "prices": {"strategy": "range", "tables": {"dc5_prices": "amount"},
               "ranges": [{"to": 0.1, "shard": "s0"}, {"from": 0.1, "shard": "s1"}]},
    "rates": {"strategy": "list", "tables": {"dc5_rates": "rate"},
              "values": {"s0": [0.1, 1.5], "s1": [0.2]}},
    "accounts": {"tables": {"dc5_accounts": "id", "dc5_entries": "account_id"}},
}}
TABLES = [t.name for t in reversed(Base.metadata.sorted_tables)]


@pytest.fixture(scope="module")
def env(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def cl(env):
    truncate_everywhere(env, *TABLES)
    return env


def S(cluster):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")


def rows_on(cluster, shard, table):
    with cluster.primary(shard).connect() as c:
        return c.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()


# -- NUMERIC keys against float bounds and values ------------------------------------


@pytest.mark.parametrize("key", [0.1, Decimal("0.1"), Decimal("0.10"), Decimal("0.095"), 0.095, 0.1000001])
def test_one_stored_numeric_key_has_one_shard_whatever_its_python_type(cl, key):
    """PostgreSQL stores each of these as 0.10: a float and a Decimal key of one stored
    value must route alike (a Decimal compared with the float bound 0.1 is below it)."""
    assert cl.shard_for(Price, key) == cl.shard_for(Price, 0.1) == "s1"


def test_a_numeric_row_written_with_a_float_is_found_by_its_decimal(cl):
    Session = S(cl)
    with Session() as s:
        s.add(Price(amount=0.1, label="float"))
        s.commit()
    with Session() as s:
        # What the row gives back, and what an application holding Decimals asks for.
        assert s.get(Price, Decimal("0.10")) is not None
        assert s.scalars(select(Price.label).where(Price.amount == Decimal("0.10"))).all() == ["float"]
        assert s.scalars(select(Price.label).where(Price.amount.in_([Decimal("0.1")]))).all() == ["float"]
    with Session() as s:
        # One key, one row: on one database this INSERT is a duplicate key.
        s.add(Price(amount=Decimal("0.10"), label="decimal"))
        with pytest.raises(Exception, match="duplicate key"):
            s.commit()
    assert rows_on(cl, "s0", "dc5_prices") == 0


def test_a_numeric_list_value_written_as_a_float_matches_decimal_keys(cl):
    Session = S(cl)
    with Session() as s:
        s.add_all([Rate(id=1, rate=0.1), Rate(id=2, rate=Decimal("0.20")), Rate(id=3, rate=Decimal("1.50"))])
        s.commit()
    assert (rows_on(cl, "s0", "dc5_rates"), rows_on(cl, "s1", "dc5_rates")) == (2, 1)
    with Session() as s:
        assert s.scalars(select(Rate.id).where(Rate.rate == Decimal("0.10"))).all() == [1]
        got = s.scalars(select(Rate).where(Rate.rate == 0.2)).one()
        assert got.rate == Decimal("0.20")
        got.rate = Decimal("0.2")  # (the same stored value, so the same shard)
        s.commit()


# -- the flush's key check after routing -------------------------------------------------


def test_the_key_check_after_routing_costs_nothing_without_a_key_listener(cl, monkeypatch):
    """Only a before_insert listener runs between routing and the INSERT: without one,
    each new row's shard is worked out once (its routing), not twice."""
    calls = []
    real = sk_session.shard_of_instance
    monkeypatch.setattr(sk_session, "shard_of_instance", lambda *a: (calls.append(a[2]), real(*a))[1])
    with S(cl)() as s:
        s.add_all([Account(id=i, entries=[Entry(id=1), Entry(id=2)]) for i in range(1, 21)])
        s.commit()
    assert len(calls) == 60, len(calls)


def test_a_before_insert_listener_moving_the_key_is_still_refused(cl):
    k = next(k for k in range(1, 200) if cl.shard_for(Account, k) != cl.shard_for(Account, k + 1000))

    def move(mapper, connection, target):
        target.id = k + 1000
    event.listen(Account, "before_insert", move)
    try:
        with S(cl)() as s:
            s.add(Account(id=k))
            with pytest.raises(shardkit.CrossShardWriteError, match="before_insert"):
                s.commit()
    finally:
        event.remove(Account, "before_insert", move)
    assert rows_on(cl, "s0", "dc5_accounts") + rows_on(cl, "s1", "dc5_accounts") == 0


# -- get()'s short path, on shards without replicas ----------------------------------------


@pytest.fixture
def no_replicas(cl, shardkit_dev_cluster):
    cfg = shardkit_dev_cluster.config_dict()
    for s in cfg["shards"]:
        s["replicas"] = []
    cluster = shardkit.Cluster.from_config({**cfg, **CONFIG}, metadata=Base.metadata)
    with S(cluster)() as s:
        s.add_all([Account(id=i, name=f"a{i}", entries=[Entry(id=1)]) for i in range(1, 7)])
        s.commit()
    yield cluster
    cluster.dispose()


GETS = {
    "plain": lambda s: s.get(Account, 1),
    "get_one": lambda s: s.get_one(Account, 2),
    "missing": lambda s: s.get(Account, 99),
    "other token": lambda s: s.get(Account, 3, identity_token="s1" if s.cluster.shard_for(Account, 3) == "s0" else "s0"),
    "unknown token": lambda s: s.get(Account, 3, identity_token="nope"),
    "selectinload": lambda s: s.get(Account, 4, options=[selectinload(Account.entries)]),
    "joinedload": lambda s: s.get(Account, 4, options=[joinedload(Account.entries)]),
    "defer": lambda s: s.get(Account, 5, options=[defer(Account.name)]),
    "criteria": lambda s: s.get(Account, 5, options=[with_loader_criteria(Account, Account.name == "x")]),
    "populate_existing": lambda s: (s.get(Account, 6), s.get(Account, 6, populate_existing=True))[1],
    "composite": lambda s: s.get(Entry, {"id": 1, "account_id": 6}),
    "then lazy": lambda s: s.get(Account, 6).entries,
}


def _outcome(session_factory, fn):
    def shown(o):
        if isinstance(o, list):
            return [shown(x) for x in o]
        return None if o is None else (type(o).__name__, o.__dict__.get("name"), o._sa_instance_state.key)
    try:
        with session_factory() as s:
            return "ok", shown(fn(s)), set(s._sk_written), dict(s._sk_replica)
    except Exception as e:  # noqa: BLE001 - compared
        return "error", type(e).__name__, str(e)


@pytest.mark.parametrize("name", list(GETS))
def test_get_short_path_gives_what_the_general_path_gives(no_replicas, monkeypatch, name):
    fn = GETS[name]
    seen = []
    real = sk_session.ShardedSession._primary_read
    monkeypatch.setattr(sk_session.ShardedSession, "_primary_read",
                        lambda self, *a: (seen.append(1), real(self, *a))[1])
    short = _outcome(S(no_replicas), fn)
    assert seen or name in ("unknown token",), "the short path was not taken"
    # Every short path closed: each read takes the general path.
    monkeypatch.setattr(sk_session.ShardedSession, "_short_path_open", lambda self, *a: False)
    assert short == _outcome(S(no_replicas), fn)
