"""Shard keys of the column types applications use, given every way a key is given
(a model's statement, an ORM object, ``scope(key=...)``, ``cluster.shard_for``, the
``shardkit route`` command line): each way must name the shard the row is on."""

from __future__ import annotations

import datetime
import json
import uuid
from contextlib import contextmanager

import pytest
from own_tables import shards_holding
from sqlalchemy import BigInteger, MetaData, String, Uuid, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit import cli
from shardkit.errors import ShardKeyError

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Device(Base):
    """Hash-sharded by a uuid."""
    __tablename__ = "ktr_devices"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Account(Base):
    """Hash-sharded by an integer."""
    __tablename__ = "ktr_accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class Tenant(Base):
    """List-sharded by a uuid: TOML has no uuid type, so the config lists them as strings."""
    __tablename__ = "ktr_tenants"
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


BIG_TENANT = uuid.UUID("6f1c2a3e-5b7d-4c2e-9a41-0d3b8e9f1a27")


@contextmanager
def _cluster_without_metadata(dev):
    """A cluster built as most applications build it, from the config alone (no
    ``metadata=``), with this module's tables created on every shard."""
    names = [s.name for s in dev.shards]
    config = {**dev.config_dict(), "groups": {
        "devices": {"tables": {"ktr_devices": "id", "ktr_accounts": "id"}},
        "tenants": {"strategy": "list", "tables": {"ktr_tenants": "tenant_id"},
                    "values": {names[2]: [str(BIG_TENANT)]}, "default": names[0]},
    }}
    cluster = shardkit.Cluster.from_config(config)
    try:
        for s in cluster.shard_names:
            Base.metadata.drop_all(cluster.primary(s))
            Base.metadata.create_all(cluster.primary(s))
        yield cluster, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    finally:
        for s in cluster.shard_names:
            Base.metadata.drop_all(cluster.primary(s))
        cluster.dispose()


@pytest.fixture(scope="module")
def env(sharded_dev):
    with _cluster_without_metadata(sharded_dev) as e:
        yield e


# -- 1. scope(key=...) reads the key in the statement's column type ------------------------------


def test_scope_key_given_as_a_uuid_string_finds_the_row(env):
    """README: uuid key columns accept the string form, "wherever a key is read: ... and
    scope(key=...)".  A statement's own key is read in its model's column type, but the
    scope's key was routed by the table's *name*, which (without metadata=) knows no
    type: the uuid's string hashed as text, and the read went to another shard and came
    back empty (the row is there)."""
    cluster, Session = env
    # A uuid whose string form hashes to another shard than the uuid itself.
    u = next(uuid.UUID(int=i) for i in range(1, 500)
             if shardkit._hashing.bucket_for(uuid.UUID(int=i), cluster.config.bucket_count) !=
             shardkit._hashing.bucket_for(str(uuid.UUID(int=i)), cluster.config.bucket_count)
             and cluster.shard_for(Device, uuid.UUID(int=i)) !=
             cluster.config.bucket_map[shardkit._hashing.bucket_for(str(uuid.UUID(int=i)),
                                                                    cluster.config.bucket_count)])
    with Session() as s:
        s.add(Device(id=u, name="probe"))
        s.commit()
    try:
        assert shards_holding(cluster, "ktr_devices", "id", u) == [cluster.shard_for(Device, u)]
        with Session() as s:
            # The statement's own key, as a string: found.
            assert [d.name for d in s.scalars(select(Device).where(Device.id == str(u)))] == ["probe"]
            with shardkit.scope(key=str(u)):
                assert [d.name for d in s.scalars(select(Device))] == ["probe"]
    finally:
        with Session() as s, shardkit.scope(key=u):
            s.execute(Device.__table__.delete())
            s.commit()


def test_scope_key_of_the_wrong_type_is_refused_not_a_silent_miss(env):
    """An integer key column given a string in a statement is refused (ShardKeyError: "42"
    hashes unlike 42); inside scope(key="42") the same read went to the string's shard
    and silently found nothing."""
    cluster, Session = env
    with Session() as s:
        s.add(Account(id=42))
        s.commit()
    try:
        with Session() as s:
            with pytest.raises(ShardKeyError):
                s.scalars(select(Account).where(Account.id == "42")).all()
        with Session() as s, shardkit.scope(key="42"):
            with pytest.raises(ShardKeyError):
                s.scalars(select(Account)).all()
    finally:
        with Session() as s, shardkit.scope(key=42):
            s.execute(Account.__table__.delete())
            s.commit()


# -- 2. a list group of uuids, listed as strings -------------------------------------------------


def test_list_group_of_uuids_listed_as_strings_places_them_as_listed(env):
    """TOML lists a uuid as a string.  The router reads a uuid key column's key as a
    uuid.UUID (from a model, a statement, an ORM object), and looked it up among the
    strings: never found, every listed tenant went to the default shard, while a key
    given by table name as a string was found (another shard), and the guard's SQL
    (``k::text = value``) finds it too: one tenant's rows written where reads by the
    other spelling do not look."""
    cluster, Session = env
    listed = [s.name for s in cluster.config.shards][2]
    assert cluster.shard_for("ktr_tenants", str(BIG_TENANT)) == listed
    assert cluster.shard_for(Tenant, BIG_TENANT) == listed
    assert cluster.shard_for(Tenant, str(BIG_TENANT)) == listed
    with Session() as s:
        s.add(Tenant(tenant_id=BIG_TENANT, name="big"))
        s.commit()
    try:
        assert shards_holding(cluster, "ktr_tenants", "tenant_id", BIG_TENANT) == [listed]
        with Session() as s:
            assert s.get(Tenant, BIG_TENANT).name == "big"
            with shardkit.scope(key=str(BIG_TENANT)):
                assert [t.name for t in s.scalars(select(Tenant))] == ["big"]
    finally:
        for sh in cluster.shard_names:
            with cluster.primary(sh).begin() as c:
                c.execute(text("DELETE FROM ktr_tenants"))


def test_list_group_given_uuid_objects_in_a_dict_config_routes_their_string_form_alike():
    """A dict config may list uuid.UUID objects: the uuid and its string route alike."""
    other = shardkit.Cluster.from_config({
        "shards": [{"name": f"s{i}", "primary": f"postgresql+psycopg://u@h{i}/db"} for i in range(2)],
        "groups": {"tenants": {"strategy": "list", "tables": {"ktr_tenants": "tenant_id"},
                               "values": {"s1": [BIG_TENANT]}, "default": "s0"}}})
    try:
        for key in (BIG_TENANT, str(BIG_TENANT)):
            assert other.shard_for(Tenant, key) == "s1"
            assert other.shard_for("ktr_tenants", key) == "s1"
    finally:
        other.dispose()


# -- 3. `shardkit route` reads a key like its group's bounds or values ---------------------------


def _route(tmp_path, capsys, *argv):
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text(
        'bucket_count = 16\n'
        '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://u@h0/db"\n'
        '[[shards]]\nname = "s1"\nprimary = "postgresql+psycopg://u@h1/db"\n'
        '[groups.days]\nstrategy = "range"\ntables = { visits = "day" }\n'
        'ranges = [ { to = 2024-01-01, shard = "s0" }, { from = 2024-01-01, shard = "s1" } ]\n'
        '[groups.moments]\nstrategy = "range"\ntables = { readings = "at" }\n'
        'ranges = [ { to = 2024-01-01T00:00:00Z, shard = "s0" }, '
        '{ from = 2024-01-01T00:00:00Z, shard = "s1" } ]\n'
        '[groups.zips]\nstrategy = "list"\ntables = { stores = "zip" }\n'
        'values = { s1 = ["10115", "10117"] }\ndefault = "s0"\n'
        '[groups.mixed]\nstrategy = "list"\ntables = { sites = ["region", "n"] }\n'
        'values = { s1 = [["eu", 7]] }\ndefault = "s0"\n')
    rc = cli.main([*argv, "--json", "--config", str(cfg)])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


@pytest.mark.parametrize("argv, shown", [
    (["route", "visits", "2024-05-01"], "visits key 2024-05-01 -> shard s1"),
    (["route", "stores", "10115"], "stores key '10115' -> shard s1"),
    (["route", "sites", "eu", "7"], "sites key ('eu', 7) -> shard s1"),
])
def test_route_prints_a_key_as_the_command_line_takes_it(tmp_path, capsys, argv, shown):
    """The plain output printed Python's notation for a key (datetime.date(2024, 5, 1),
    UUID('...')): an operator reads it, and pastes it back into `route`."""
    _route(tmp_path, capsys, "route", "visits", "2024-05-01")  # (writes the config)
    assert cli.main([*argv, "--config", str(tmp_path / "shardkit.toml")]) == 0
    assert capsys.readouterr().out.startswith(shown)


@pytest.mark.parametrize("argv, shard", [
    (["route", "visits", "2024-05-01"], "s1"),
    (["route", "visits", "2023-12-31"], "s0"),
    (["route", "readings", "2024-01-01T01:00:00+02:00"], "s0"),   # 23:00 UTC the day before
    (["route", "readings", "2024-01-01T00:30:00+00:00"], "s1"),
    (["route", "stores", "10115"], "s1"),
    (["route", "sites", "eu", "7"], "s1"),
])
def test_route_reads_the_key_like_the_groups_bounds_or_values(tmp_path, capsys, argv, shard):
    """The command line gives every key as a string.  `route` read '2024-05-01' as a
    string (a date range group: "cannot be compared", no way to route a date), and
    '10115' as an int (a list of zip codes written as strings: the int is not listed, so
    the default shard was printed, not the shard that holds the store's rows)."""
    rc, out, err = _route(tmp_path, capsys, *argv)
    assert rc == 0, err
    assert out["shard"] == shard


def test_route_says_what_a_key_of_the_wrong_form_should_look_like(tmp_path, capsys):
    rc, _, err = _route(tmp_path, capsys, "route", "visits", "yesterday")
    assert rc == 2
    assert "yesterday" in err and "date" in err and "YYYY-MM-DD" in err


# -- 4. bounds and values of a type the key column never holds -----------------------------------


def _config_with(group: dict) -> dict:
    return {"shards": [{"name": f"s{i}", "primary": f"postgresql+psycopg://u@h{i}/db"} for i in range(2)],
            "groups": {"g": group}}


def _table(type_):
    from sqlalchemy import Column, Integer, Table
    md = MetaData()
    Table("ktr_t", md, Column("id", Integer, primary_key=True), Column("k", type_))
    return md


@pytest.mark.parametrize("type_, group, field", [
    # zip codes written unquoted in TOML for a text column: every store went to the default
    (String(5), {"strategy": "list", "tables": {"ktr_t": "k"}, "values": {"s1": [10115, 10117]},
                 "default": "s0"}, "groups.g.values.s1"),
    # digits quoted for an integer column: every key missed
    (BigInteger(), {"strategy": "list", "tables": {"ktr_t": "k"}, "values": {"s1": ["7"]},
                    "default": "s0"}, "groups.g.values.s1"),
    # a uuid listed in capitals: PostgreSQL prints (and the guard matches) it in lowercase
    (Uuid(), {"strategy": "list", "tables": {"ktr_t": "k"},
              "values": {"s1": [str(BIG_TENANT).upper()]}, "default": "s0"}, "groups.g.values.s1"),
    # local date-times for a timestamptz column: keys read back from it carry an offset
    ("tz", {"strategy": "range", "tables": {"ktr_t": "k"},
            "ranges": [{"to": datetime.datetime(2024, 1, 1), "shard": "s0"},
                       {"from": datetime.datetime(2024, 1, 1), "shard": "s1"}]},
     "groups.g.ranges"),
    # dates for a timestamp column: a datetime never compares with a date
    ("ts", {"strategy": "range", "tables": {"ktr_t": "k"},
            "ranges": [{"to": datetime.date(2024, 1, 1), "shard": "s0"},
                       {"from": datetime.date(2024, 1, 1), "shard": "s1"}]},
     "groups.g.ranges"),
])
def test_bounds_and_values_the_key_column_cannot_hold_are_refused_with_metadata(type_, group, field):
    """With metadata=, the key column's type is known: a list value of another type never
    matches a key (a key is read in its column's type), so every row silently went to the
    default shard (or was refused as unmapped); a range bound of another type fails every
    key read back from the database.  Say so when the cluster is made."""
    from sqlalchemy import DateTime
    if type_ == "tz":
        type_ = DateTime(timezone=True)
    elif type_ == "ts":
        type_ = DateTime()
    md = _table(type_)
    with pytest.raises(shardkit.ConfigurationError) as ei:
        shardkit.Cluster.from_config(_config_with(group), metadata=md)
    assert ei.value.field == field
    assert "ktr_t.k" in str(ei.value)


def test_bounds_and_values_of_the_key_columns_type_are_accepted():
    from decimal import Decimal

    from sqlalchemy import Date, DateTime, Enum, Numeric
    ok = [
        (String(5), {"strategy": "list", "tables": {"ktr_t": "k"}, "values": {"s1": ["10115"]}}),
        (BigInteger(), {"strategy": "list", "tables": {"ktr_t": "k"}, "values": {"s1": [7]}}),
        (Uuid(), {"strategy": "list", "tables": {"ktr_t": "k"}, "values": {"s1": [str(BIG_TENANT)]}}),
        (Enum("eu", "us", name="ktr_region"), {"strategy": "list", "tables": {"ktr_t": "k"},
                                               "values": {"s1": ["eu"]}}),
        (Numeric(12, 2), {"strategy": "range", "tables": {"ktr_t": "k"},
                          "ranges": [{"to": 10, "shard": "s0"}, {"from": 10, "shard": "s1"}]}),
        (Numeric(12, 2), {"strategy": "range", "tables": {"ktr_t": "k"},
                          "ranges": [{"to": Decimal("9.5"), "shard": "s0"}, {"from": Decimal("9.5"), "shard": "s1"}]}),
        (Date(), {"strategy": "range", "tables": {"ktr_t": "k"},
                  "ranges": [{"to": datetime.date(2024, 1, 1), "shard": "s0"},
                             {"from": datetime.date(2024, 1, 1), "shard": "s1"}]}),
        (DateTime(timezone=True), {"strategy": "range", "tables": {"ktr_t": "k"}, "ranges": [
            {"to": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), "shard": "s0"},
            {"from": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), "shard": "s1"}]}),
    ]
    for type_, group in ok:
        shardkit.Cluster.from_config(_config_with(group), metadata=_table(type_)).dispose()
