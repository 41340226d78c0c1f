"""Shard keys the database compares without case (a nondeterministic collation, citext),
refused where shardkit reads the key column from the database: the guard's install,
`shardkit verify` and the mover. 'Ada' = 'ada' there, but shardkit places keys by their
exact string, so one key would live on two shards."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest

import shardkit
from shardkit import rebalance
from shardkit.errors import ConfigurationError
from shardkit.verify import verify

pytestmark = pytest.mark.integration

BUCKETS = 64
_names = itertools.count()
CI = "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
FIX = "lower(...), under a deterministic collation"


class Db:
    """A fresh database on each shard server of the shared cluster, a catalog, a cluster."""

    def __init__(self, dev, groups: dict) -> None:
        self.dev = dev
        self.name = f"kc{next(_names)}_{uuid.uuid4().hex[:8]}"
        self.servers = dev.shards[:2]
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.name}")
        self.catalog = dev.create_catalog(self.name + "_cat")
        self.cluster = shardkit.Cluster.from_config({
            "bucket_count": BUCKETS,
            "shards": [{"name": s.name, "primary": s.primary.url.rsplit("/", 1)[0] + "/" + self.name,
                        "replicas": []} for s in self.servers],
            "groups": groups,
            "catalog": {"url": self.catalog},
        }, follow_map=False)

    def dsn(self, i: int) -> str:
        return self.servers[i].primary.dsn.replace("dbname=shardkit", f"dbname={self.name}")

    def sql(self, query: str) -> None:
        for i in range(len(self.servers)):
            with psycopg.connect(self.dsn(i), autocommit=True) as c:
                c.execute(query)

    def close(self) -> None:
        self.cluster.dispose()
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        with psycopg.connect(self.servers[0].primary.dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {self.name}_cat WITH (FORCE)")


@pytest.fixture
def db(shardkit_dev_cluster):
    with psycopg.connect(shardkit_dev_cluster.shards[0].primary.dsn, autocommit=True) as c:
        if not c.execute("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'").fetchone()[0]:
            pytest.skip("the server is built without ICU: no nondeterministic collation to test")
    made: list[Db] = []

    def make(groups: dict) -> Db:
        d = Db(shardkit_dev_cluster, groups)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


HASH = {"users": {"strategy": "hash", "tables": {"users": "name"}}}
LIST = {"stores": {"strategy": "list", "tables": {"stores": "region"},
                   "values": {"s0": ["eu"], "s1": ["us"]}, "default": "s1"}}
RANGE = {"people": {"strategy": "range", "tables": {"people": "surname"},
                    "ranges": [{"to": "m", "shard": "s0"}, {"from": "m", "shard": "s1"}]}}


def test_guard_refuses_a_hash_key_under_a_nondeterministic_collation(db):
    d = db(HASH)
    d.sql(CI)
    d.sql("CREATE TABLE users (name text COLLATE ci PRIMARY KEY, n int)")
    with pytest.raises(ConfigurationError) as e:
        rebalance.init(d.cluster)
    msg = str(e.value)
    assert "users.name" in msg and "collation ci" in msg and "nondeterministic" in msg and FIX in msg


def test_guard_refuses_list_and_range_keys_under_a_nondeterministic_collation(db):
    for groups, table, column in ((LIST, "stores", "region"), (RANGE, "people", "surname")):
        d = db(groups)
        d.sql(CI)
        # The collation on a domain: the column's attcollation is the domain's.
        d.sql("CREATE DOMAIN ci_text AS text COLLATE ci")
        d.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, {column} ci_text NOT NULL)")
        with pytest.raises(ConfigurationError, match=f"{table}.{column} is under collation ci"):
            rebalance.init(d.cluster)


def test_guard_says_why_a_citext_key_is_refused(db):
    d = db({**HASH, **LIST})
    d.sql("CREATE EXTENSION IF NOT EXISTS citext")
    d.sql("CREATE TABLE users (name citext PRIMARY KEY)")
    with pytest.raises(ConfigurationError) as e:
        rebalance.init(d.cluster)
    assert "users.name is citext, which compares without case" in str(e.value) and FIX in str(e.value)
    # A list key: guarded without a word (its values compare as text).
    d2 = db(LIST)
    d2.sql("CREATE EXTENSION IF NOT EXISTS citext")
    d2.sql("CREATE TABLE stores (id bigint PRIMARY KEY, region citext NOT NULL)")
    with pytest.raises(ConfigurationError, match="stores.region is citext, which compares without case"):
        rebalance.init(d2.cluster)


def test_verify_and_the_mover_refuse_a_key_collated_after_init(db):
    d = db({**HASH, **LIST})
    d.sql("CREATE TABLE users (name text PRIMARY KEY)")
    d.sql("CREATE TABLE stores (id bigint PRIMARY KEY, region text COLLATE \"C\" NOT NULL)")
    rebalance.init(d.cluster)   # deterministic collations: guarded
    assert verify(d.cluster).ok
    # The collation changed in the database afterwards, where the models cannot show it.
    d.sql(CI)
    d.sql("ALTER TABLE users ALTER COLUMN name TYPE text COLLATE ci")
    with pytest.raises(ConfigurationError, match="users.name is under collation ci"):
        verify(d.cluster)
    with psycopg.connect(d.dsn(0)) as conn:
        with pytest.raises(ConfigurationError, match="users.name is under collation ci"):
            rebalance._moved_tables(d.cluster, conn, d.cluster.shard_names[0])
