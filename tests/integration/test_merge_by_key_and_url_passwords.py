"""merge(load=True) by the object's own shard key,
get() of a named shard, config URLs and the masking of move errors."""
from __future__ import annotations

import pytest
from own_tables import cluster_with_tables, nodes_used, truncate_everywhere
from sqlalchemy import BigInteger, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Account(Base):
    """Primary key (region, id) holding the shard key (region)."""
    __tablename__ = "lm_accounts"
    region: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Item(Base):
    """Primary key id without the shard key (owner)."""
    __tablename__ = "lm_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    owner: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def env(sharded_dev):
    config = {"groups": {"acc": {"tables": {"lm_accounts": "region", "lm_items": "owner"}}}}
    with cluster_with_tables(sharded_dev, config, Base.metadata) as cluster:
        yield cluster


@pytest.fixture
def cluster(env):
    truncate_everywhere(env, "lm_accounts", "lm_items")
    return env


def test_merge_of_a_new_object_whose_primary_key_holds_the_shard_key_reads_its_shard_once(cluster):
    """A merge() of a new row (an upsert by primary key) looks the key up once, on the
    shard the key names: the primary key holds the shard key, so there is nothing to find
    on another shard."""
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with nodes_used(cluster, lambda sql: "lm_" in sql and sql.lstrip().upper().startswith("SELECT")) as seen:
        with Session() as s:
            merged = s.merge(Account(region=7, id=1, name="new"))
            assert len(seen) == 1, seen
            s.commit()
        seen.clear()
        with Session() as s:
            merged = s.merge(Account(region=7, id=1, name="again"))
            assert merged.name == "again" and len(seen) == 1, seen
            s.commit()



@pytest.mark.parametrize("tail, says", [
    ("sslmod=require", "misspelt"),
    ("prepare_threshold=0", "prepared_statements"),
])
def test_a_parameter_after_a_query_string_password_is_not_blamed_on_the_password(tail, says):
    """``?password=${PW}&sslmod=require``: the password has no '&'; the parameter after it
    is misspelt (or one shardkit refuses with its own advice).  Before, the refusal said the
    password held an unencoded '&', and told the user to percent-encode it."""
    from shardkit import ConfigurationError
    from shardkit._config import load_config
    raw = "postgresql+psycopg://app@db0.example/shop?password=${PW}&" + tail
    with pytest.raises(ConfigurationError) as ei:
        load_config({"shards": [{"name": "s0", "primary": raw}]}, env={"PW": "Qm7Tk4w"})
    assert says in str(ei.value), str(ei.value)
    assert "Qm7Tk4w" not in str(ei.value)
