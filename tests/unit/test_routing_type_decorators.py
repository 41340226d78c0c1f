"""Routing, read by a demanding user: keys of columns whose type is a ``TypeDecorator``
or unknown (``table()``/``column()``), the names refusals give aliased tables, and
``shardkit route`` when the catalog's map cannot be read.  No server."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import CHAR, BigInteger, String, Uuid, column, insert, select, table, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column
from sqlalchemy.types import TypeDecorator

import shardkit
from models import Device, Order, User, offline_cluster
from shardkit import cli
from shardkit.catalog import Catalog, CatalogState
from shardkit.errors import ScatterRefused, ShardKeyError, ShardUnavailable

SHARDS = ["s0", "s1", "s2"]


# -- keys of TypeDecorator columns hash as the value the column stores -------------------------


class GUID(TypeDecorator):
    """A uuid column under an application type of its own (no processing)."""

    impl = Uuid
    cache_ok = True


class RecipeGUID(TypeDecorator):
    """SQLAlchemy's "backend-agnostic GUID" recipe: CHAR(32) elsewhere, uuid on PostgreSQL,
    which it is given as a string."""

    impl = CHAR
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID())
        return dialect.type_descriptor(CHAR(32))

    def process_bind_param(self, value, dialect):
        if value is None:
            return value
        if not isinstance(value, uuid.UUID):
            value = uuid.UUID(value)
        return str(value) if dialect.name == "postgresql" else value.hex


class Email(TypeDecorator):
    """Stores addresses in lower case."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.lower()


class AccountId:
    def __init__(self, n: int) -> None:
        self.n = n


class AccountIdType(TypeDecorator):
    """An integer id carried in the application as an object of its own."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.n


class DecoBase(DeclarativeBase):
    pass


class Gadget(DecoBase):
    __tablename__ = "gadgets"
    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)


class Widget(DecoBase):
    __tablename__ = "widgets"
    id: Mapped[uuid.UUID] = mapped_column(RecipeGUID, primary_key=True)


class Member(DecoBase):
    __tablename__ = "members"
    email: Mapped[str] = mapped_column(Email, primary_key=True)


class Account(DecoBase):
    __tablename__ = "accounts"
    id: Mapped[AccountId] = mapped_column(AccountIdType, primary_key=True)


@pytest.fixture(scope="module")
def deco():
    c = shardkit.Cluster.from_config({
        "bucket_count": 64,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://u@{s}.invalid/db"} for s in SHARDS],
        "groups": {t: {"strategy": "hash", "tables": {t: k}} for t, k in
                   (("gadgets", "id"), ("widgets", "id"), ("members", "email"), ("accounts", "id"))},
    }, metadata=DecoBase.metadata)
    yield c
    c.dispose()


def owner(cluster, group: str, stored) -> str:
    """The shard that owns a row storing ``stored`` (the hash of the storage format)."""
    (g,) = [g for g in cluster.config.groups if g.name == group]
    return g.strategy.shard_for_key(stored)


def test_a_key_of_a_type_decorator_column_routes_to_the_owner_of_the_value_it_stores(deco):
    """A uuid column behind a TypeDecorator queried or written with the uuid's string form,
    an e-mail column that stores lower case written in mixed case, an id object the type
    turns into an integer: each routes to the shard whose rows hold the stored value, not
    by the Python object as given (a query went to a shard without the row, an insert
    left the row where reads by its stored key never look)."""
    keys = [uuid.UUID(int=i * 7919) for i in range(40)]
    for Model, group in ((Gadget, "gadgets"), (Widget, "widgets")):
        for u in keys:
            want = owner(deco, group, u)
            assert deco.shard_for(Model, str(u)) == want
            assert deco.explain(select(Model).where(Model.id == str(u))).shards == (want,)
            assert deco.explain(select(Model).where(Model.id.in_([str(u)]))).shards == (want,)
            assert deco.explain(insert(Model), {"id": str(u)}).shards == (want,)
    emails = [f"User{i}@Example.ORG" for i in range(40)]
    assert any(owner(deco, "members", e) != owner(deco, "members", e.lower()) for e in emails)
    for e in emails:
        want = owner(deco, "members", e.lower())
        assert deco.explain(insert(Member), {"email": e}).shards == (want,)
        assert deco.explain(select(Member).where(Member.email == e)).shards == (want,)
        assert deco.shard_for(Member, e) == want
    for n in range(40):
        want = owner(deco, "accounts", n)
        assert deco.shard_for(Account, AccountId(n)) == want
        assert deco.explain(select(Account).where(Account.id == AccountId(n))).shards == (want,)


def test_a_key_the_type_decorator_refuses_or_cannot_read_is_a_shard_key_error(deco):
    with pytest.raises(ShardKeyError, match="RecipeGUID"):
        deco.explain(select(Widget).where(Widget.id == "not-a-uuid"))
    with pytest.raises(ShardKeyError, match="AccountIdType"):
        deco.explain(select(Account).where(Account.id == "5"))
    with pytest.raises(ShardKeyError):
        deco.explain(select(Gadget).where(Gadget.id == "nope"))


# -- table()/column() constructs: keys in the types learnt from the MetaData -------------------


@pytest.fixture(scope="module")
def models():
    c = offline_cluster(SHARDS)
    yield c
    c.dispose()


def test_untyped_table_constructs_read_keys_in_the_columns_types(models):
    """``table("users", column("id"))`` (Core, Alembic data migrations) has columns of no
    type.  With ``metadata=`` the router knows the key columns' types, as it does for
    ``shard_for("users", ...)``: an int key given as a string is refused as there, not
    hashed as text to a shard that does not hold the row; a uuid's string form routes
    like the uuid."""
    users = table("users", column("id"), column("name"))
    k = next(k for k in range(100) if models.shard_for(User, k) != owner(models, "users", str(k)))
    with pytest.raises(ShardKeyError, match="integer shard key"):
        models.shard_for("users", str(k))
    for stmt, params in ((select(users).where(users.c.id == str(k)), None),
                         (select(users).where(users.c.id.in_([str(k)])), None),
                         (update(users).where(users.c.id == str(k)).values(name="x"), None),
                         (insert(users), {"id": str(k), "name": "x"})):
        with pytest.raises(ShardKeyError, match="integer shard key"):
            models.explain(stmt, params)
    assert models.explain(select(users).where(users.c.id == k)).shards == (models.shard_for(User, k),)
    devices = table("devices", column("id"))
    for i in range(30):
        u = uuid.UUID(int=i * 104729)
        want = models.shard_for(Device, u)
        assert models.explain(select(devices).where(devices.c.id == str(u))).shards == (want,)
        assert models.explain(insert(devices), {"id": str(u)}).shards == (want,)


# -- refusals name aliased tables readably -------------------------------------------------------


def test_refusals_name_unnamed_aliases_not_sqlalchemys_placeholders(models):
    """``aliased(User)`` and ``.subquery()`` have no name until compiled; a refusal said
    ``%(19369a74271d400cf05b users)s``."""
    u1, u2 = aliased(User), aliased(User)
    cases = [
        (select(u1.id, u2.id).where(u1.id == 1, u2.id == 2), "an alias of users, an alias of users"),
        (select(u1.id, u2.id).join(u2, u2.name == u1.name), "an alias of users"),
        (select(User).join(select(Order).limit(3).subquery()), "'anon_1' over orders has LIMIT"),
    ]
    for stmt, needle in cases:
        with pytest.raises(ScatterRefused) as e:
            models.explain(stmt)
        assert "%(" not in str(e.value) and needle in str(e.value), str(e.value)


# -- shardkit route with a catalog ---------------------------------------------------------------

PW = "Rt-pw-4417"
CATALOG = f"postgresql+psycopg://app:{PW}@127.0.0.1:1/catalog_db"


def _route_config(tmp_path):
    path = tmp_path / "shardkit.toml"
    path.write_text("bucket_count = 16\n" + "".join(
        f'[[shards]]\nname = "{s}"\nprimary = "postgresql+psycopg://app@db{i}.example/app"\n'
        for i, s in enumerate(SHARDS))
        + f'[catalog]\nurl = "{CATALOG}"\n[groups.users]\ntables = {{ users = "id" }}\n')
    return path


def _followers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "follower" in t.name}


def test_route_answers_by_the_catalogs_map_and_refuses_when_it_cannot_be_read(tmp_path, monkeypatch, capsys):
    """With a catalog, `route` answers by the catalog's map; when the catalog cannot be
    read it exits 2 naming the catalog (it printed the config file's owner, which may
    have given the bucket away, with exit 0).  Either way it leaves no map follower
    thread behind (in process, each call left one)."""
    path = _route_config(tmp_path)
    moved = tuple(SHARDS[(b + 1) % 3] for b in range(16))
    answer: list[object] = [CatalogState(3, moved, (), {}, {}, 1, identity="db1")]

    def current_state(self, conn=None, **kw):
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]

    monkeypatch.setattr(Catalog, "current_state", current_state)
    before = _followers()
    key = 42
    assert cli.main(["route", "users", str(key), "--json", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'"shard": "{moved[shardkit.bucket_for(key, 16)]}"' in out, out
    assert _followers() <= before

    answer[0] = ShardUnavailable("the catalog (postgresql+psycopg://app:***@127.0.0.1:1/catalog_db) "
                                 "is unreachable: connection refused", node="catalog")
    rc = cli.main(["route", "users", str(key), "--json", "--config", str(path)])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "", cap.out
    assert "catalog" in cap.err and "unreachable" in cap.err and PW not in cap.err, cap.err
    assert _followers() <= before
