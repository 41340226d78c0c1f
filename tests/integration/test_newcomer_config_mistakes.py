"""A newcomer's first hour with shardkit, following the README from the top: a shop's
models (users with their orders and order lines colocated, a reference table of
countries, range-sharded events, list-sharded stores) on a local cluster with replicas,
configured by a ``shardkit.toml`` with ``${ENV}`` references.  Each test is a mistake
such a user makes on the way, and checks that the error names the thing and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, ForeignKey, ForeignKeyConstraint, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Country(Base):
    __tablename__ = "fh_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class User(Base):
    __tablename__ = "fh_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    country_code: Mapped[str] = mapped_column(ForeignKey("fh_countries.code"))
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")


class Order(Base):
    __tablename__ = "fh_orders"
    user_id: Mapped[int] = mapped_column(ForeignKey("fh_users.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column(Integer, default=0)
    user: Mapped[User] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(order_by="OrderLine.line", cascade="all, delete-orphan")


class OrderLine(Base):
    __tablename__ = "fh_order_lines"
    __table_args__ = (ForeignKeyConstraint(["user_id", "order_id"], ["fh_orders.user_id", "fh_orders.id"]),)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(String(20))


class Event(Base):
    __tablename__ = "fh_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))


class Store(Base):
    __tablename__ = "fh_stores"
    region: Mapped[str] = mapped_column(String(8), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


TOP = 'name = "shop"\nreference_tables = ["fh_countries"]\n'

SHARDS = """
[[shards]]
name = "s0"
primary = "postgresql+psycopg://${{SHOP_DB_USER}}@127.0.0.1:{p0}/shardkit"
replicas = ["postgresql+psycopg://${{SHOP_DB_USER}}@127.0.0.1:{r0}/shardkit"]

[[shards]]
name = "s1"
primary = "postgresql+psycopg://${{SHOP_DB_USER}}@127.0.0.1:{p1}/shardkit"
replicas = ["postgresql+psycopg://${{SHOP_DB_USER}}@127.0.0.1:{r1}/shardkit"]
"""

GROUPS = """
[groups.users]
tables = { fh_users = "id", fh_orders = "user_id", fh_order_lines = "user_id" }

[groups.events]
strategy = "range"
tables = { fh_events = "id" }
ranges = [
  { to = 1000000, shard = "s0" },
  { from = 1000000, shard = "s1" },
]

[groups.stores]
strategy = "list"
tables = { fh_stores = "region" }
values = { s0 = ["eu", "uk"], s1 = ["us", "ca"] }
default = "s1"

[replicas]
poll_interval = 0.1
"""

ENV = {"SHOP_DB_USER": "shardkit"}


@pytest.fixture(scope="module")
def shop(shardkit_module_cluster_factory, tmp_path_factory):
    """The shop's config file (in a directory of its own), its cluster and sessionmaker."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    s0, s1 = dev.shards
    shards = SHARDS.format(p0=s0.primary.port, r0=s0.replicas[0].port,
                           p1=s1.primary.port, r1=s1.replicas[0].port)
    d = tmp_path_factory.mktemp("shop")
    path = d / "shardkit.toml"
    path.write_text(TOP + shards + GROUPS, encoding="utf-8")
    cluster = shardkit.Cluster.from_config(path, metadata=Base.metadata, env=ENV)
    for name in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(name))
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    yield dev, cluster, Session, path, shards
    cluster.dispose()


def config_error(source, **kw) -> shardkit.ConfigurationError:
    with pytest.raises(shardkit.ConfigurationError) as info:
        shardkit.Cluster.from_config(source, metadata=Base.metadata, env=ENV, **kw).dispose()
    return info.value


def test_shards_written_as_a_toml_table_say_to_write_an_array_of_tables(shop, tmp_path):
    """``[shards]`` (single brackets, the usual TOML slip) or ``[shards.s0]`` makes a table,
    not the array of tables ``[[shards]]``: the error said the file "defines no shards",
    which is false (it defines one) and does not say what is wrong with it."""
    _, _, _, _, shards = shop
    one = shards.split("[[shards]]")[1]          # s0's settings
    for text in (TOP + "[shards]" + one + GROUPS,
                 TOP + "[shards.s0]" + one.replace('name = "s0"\n', "") + GROUPS):
        path = tmp_path / "shardkit.toml"
        path.write_text(text, encoding="utf-8")
        e = config_error(path)
        assert e.field == "shards", e
        assert "defines no shards" not in str(e), e
        assert "[[shards]]" in str(e) and "double brackets" in str(e), e
    # The dict form: shards keyed by name instead of a list.
    e = config_error({"shards": {"s0": {"primary": "postgresql+psycopg://u@h/db"}}})
    assert e.field == "shards" and "defines no shards" not in str(e) and "list" in str(e), e


def test_a_top_level_setting_written_after_a_header_says_to_move_it_up(shop, tmp_path):
    """The README warns that ``reference_tables`` must come before the first ``[header]``
    (TOML puts later keys in that header's table); the error for the slip listed the
    header table's own settings, never saying the key is a top-level one."""
    _, _, _, _, shards = shop
    cases = {
        # reference_tables at the end of the file: it lands in [replicas]
        'name = "shop"\n' + shards + GROUPS + 'reference_tables = ["fh_countries"]\n':
            ("replicas.reference_tables", "reference_tables"),
        # bucket_count after the last shard: it lands in shards[1]
        TOP + shards + "bucket_count = 1024\n" + GROUPS: ("shards[1].bucket_count", "bucket_count"),
    }
    for text, (field, key) in cases.items():
        path = tmp_path / "shardkit.toml"
        path.write_text(text, encoding="utf-8")
        e = config_error(path)
        assert e.field == field, e
        assert "top-level" in str(e) and "before the first [" in str(e), e


def test_a_postgres_scheme_url_names_the_scheme_to_write(shop, tmp_path):
    """Hosting providers hand out ``postgres://`` URLs (libpq takes them), which a user puts
    in ``${DATABASE_URL}``; SQLAlchemy does not read that scheme, and the error said the URL
    "is not a PostgreSQL URL", which it is."""
    dev, _, _, _, shards = shop
    port = dev.shards[0].primary.port
    text = TOP + shards.replace(f"postgresql+psycopg://${{SHOP_DB_USER}}@127.0.0.1:{port}/shardkit",
                                "${DATABASE_URL}") + GROUPS
    path = tmp_path / "shardkit.toml"
    path.write_text(text, encoding="utf-8")
    env = {**ENV, "DATABASE_URL": f"postgres://shardkit:pw-secret@127.0.0.1:{port}/shardkit"}
    with pytest.raises(shardkit.ConfigurationError) as info:
        shardkit.Cluster.from_config(path, metadata=Base.metadata, env=env)
    e = info.value
    assert e.field == "shards[0].primary", e
    assert "is not a PostgreSQL URL" not in str(e), e
    assert "postgres://" in str(e) and "postgresql+psycopg://" in str(e), e
    assert "pw-secret" not in str(e), e


def test_shard_for_given_a_column_or_a_class_name_says_what_to_pass(shop):
    """``cluster.shard_for(Order.user_id, 42)`` said "table 'user_id' is not in the shard map;
    add it to a [groups.*] tables entry", and ``shard_for("Order", 42)`` (the class's name,
    not its table's) the same of 'Order': advice to add to the config what is not a table.
    The errors say what was given and what to pass (the model, or the configured table)."""
    _, cluster, _, _, _ = shop
    k = cluster.shard_for(Order, 42)
    assert cluster.shard_for("fh_orders", 42) == k
    with pytest.raises(shardkit.RoutingError) as info:
        cluster.shard_for(Order.user_id, 42)
    msg = str(info.value)
    assert "column" in msg and "fh_orders" in msg and "add it to" not in msg, msg
    with pytest.raises(shardkit.RoutingError) as info:
        cluster.bucket_for(User.__table__.c.id, 42)
    msg = str(info.value)
    assert "column" in msg and "fh_users" in msg and "add it to" not in msg, msg
    with pytest.raises(shardkit.RoutingError) as info:
        cluster.shard_for("Order", 42)
    msg = str(info.value)
    assert "'Order'" in msg and "fh_orders" in msg and "__tablename__" in msg, msg
    assert "\n" not in msg  # `shardkit route` prints it as one line


def test_a_relative_config_path_says_where_it_was_looked_for(shop, tmp_path, monkeypatch):
    """The app is started from another directory than its config file's: the error
    ("shardkit.toml: config file not found (pass --config PATH ...)") gave neither the
    directory the relative path was read from nor advice that fits the Python API."""
    _, _, _, path, _ = shop
    elsewhere = tmp_path / "srv"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    e = config_error("shardkit.toml")
    assert str(elsewhere / "shardkit.toml") in str(e), e
    assert re.search(r"current directory", str(e)), e
    # The file's absolute path works from anywhere.
    shardkit.Cluster.from_config(Path(path), metadata=Base.metadata, env=ENV).dispose()
