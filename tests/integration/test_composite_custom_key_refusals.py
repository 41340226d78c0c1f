"""Composite shard keys and custom strategies: statements touch
only the shards that can hold their keys, never miss one that holds a matching row, and
never leave a row on a shard that does not own its key.

Each test works in fresh databases on the shared cluster's servers (dropped afterwards);
the oracle for a read is the same statement run on every shard by name."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, func, select, types, update
from sqlalchemy.orm import sessionmaker

import shardkit
from shardkit.verify import verify

pytestmark = pytest.mark.integration

BUCKETS = 64
_names = itertools.count()

md = MetaData()
pairs = Table("k5b_pairs", md, Column("a", BigInteger, primary_key=True),
              Column("b", String(20), primary_key=True), Column("v", BigInteger))
items = Table("k5b_items", md, Column("k", BigInteger, primary_key=True), Column("v", BigInteger))


def item_shard(key):
    """A custom strategy: even keys on s0, odd on s1."""
    return "s0" if key % 2 == 0 else "s1"


GROUPS = {"groups": {"pairs": {"tables": {"k5b_pairs": ["a", "b"]}},
                     "items": {"strategy": "custom", "tables": {"k5b_items": "k"},
                               "function": item_shard}}}


class Db:
    """A fresh database on each of the shared cluster's two shard servers, with ``config``."""

    def __init__(self, dev, config: dict, metadata=md) -> None:
        self.name = f"k5b{next(_names)}_{uuid.uuid4().hex[:8]}"
        self.servers = dev.shards[:2]
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.name}")
        self.data = {
            "bucket_count": BUCKETS,
            "shards": [{"name": s.name, "primary": s.primary.url.rsplit("/", 1)[0] + "/" + self.name,
                        "replicas": []} for s in self.servers],
            **config,
        }
        self.cluster = shardkit.Cluster.from_config(self.data, metadata=metadata, follow_map=False)
        for s in self.cluster.shard_names:
            metadata.create_all(self.cluster.primary(s))
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster,
                                    consistency="strong")

    def close(self) -> None:
        self.cluster.dispose()
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


@pytest.fixture
def db(shardkit_dev_cluster):
    made: list[Db] = []

    def make(config: dict = GROUPS, **kw) -> Db:
        d = Db(shardkit_dev_cluster, config, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _pair_on(cluster, shard: str, b: str = "x", start: int = 0) -> int:
    return next(a for a in itertools.count(start) if cluster.shard_for(pairs, (a, b)) == shard)


def test_executemany_update_whose_parameters_set_the_key_is_refused(db):
    """SQLAlchemy takes an UPDATE's SET clause from its parameters when it has no values():
    ``update(t).where(t.c.a == bindparam("old_a"), ...)`` run with ``[{"old_a": .., "a": ..}]``
    sets ``a``.  With one parameter set shardkit refuses a new key another shard owns; with a
    list of them it did not look at the sets at all, ran the UPDATE on the old key's shard, and
    the row stayed there under a key it does not own (found by no keyed read, reported by
    verify).  Each parameter set is now checked as a single one is."""
    d = db()
    c = d.cluster
    a0 = _pair_on(c, "s0")
    a1 = _pair_on(c, "s1")
    with d.Session() as s:
        s.execute(pairs.insert(), [{"a": a0, "b": "x", "v": 1}, {"a": a1, "b": "x", "v": 2}])
        s.execute(items.insert(), [{"k": 2, "v": 1}, {"k": 4, "v": 2}])
        s.commit()
    moves = [
        # composite key: (a0, x) on s0 becomes (a1, x), owned by s1
        (update(pairs).where(pairs.c.a == bindparam("old_a"), pairs.c.b == bindparam("old_b")),
         [{"old_a": a0, "old_b": "x", "a": _pair_on(c, "s1", start=a1 + 1), "b": "x"}]),
        # custom group: 2 and 4 (s0) become 3 and 5 (s1)
        (update(items).where(items.c.k == bindparam("old")),
         [{"old": 2, "k": 3}, {"old": 4, "k": 5}]),
    ]
    for stmt, params in moves:
        with d.Session() as s:
            with pytest.raises(shardkit.CrossShardWriteError, match="sets its shard key"):
                s.execute(stmt, params)
    rep = verify(c)
    assert rep.ok, rep.render()
    # A set that keeps each row on its own shard runs.
    a0b = _pair_on(c, "s0", start=a0 + 1)
    with d.Session() as s:
        s.execute(update(pairs).where(pairs.c.a == bindparam("old_a"), pairs.c.b == bindparam("old_b")),
                  [{"old_a": a0, "old_b": "x", "a": a0b, "b": "x"}])
        s.execute(update(items).where(items.c.k == bindparam("old")), [{"old": 2, "k": 6}, {"old": 4, "k": 8}])
        s.commit()
    with d.Session() as s:
        assert s.execute(select(pairs.c.v).where(pairs.c.a == a0b, pairs.c.b == "x")).scalar_one() == 1
        assert sorted(s.scalars(select(items.c.k).where(items.c.k.in_([6, 8])))) == [6, 8]
    assert verify(c).ok


_REGION_SHARDS = {1: "s0", 2: "s1"}


def region_shard(key):
    """A custom strategy that looks its key up, as many do: KeyError for a key it lacks."""
    return _REGION_SHARDS[key]


def test_a_custom_function_that_raises_is_a_shardkit_error_naming_it(db):
    """A custom function that raises for a key (here a KeyError from its lookup table)
    reached the application as that bare ``KeyError: 3`` from deep inside routing: no word
    of the table, the group's function or what to do, and not a ShardkitError, so the
    session's own fallbacks for a key that cannot be placed (they catch ShardkitError)
    crashed on it instead.  It is now a ShardKeyError naming the function and the key, with
    the function's exception as its cause."""
    d = db({"groups": {"regions": {"strategy": "custom", "tables": {"k5b_items": "k"},
                                   "function": region_shard}}})
    with d.Session() as s:
        s.execute(items.insert(), [{"k": 1, "v": 1}, {"k": 2, "v": 2}])
        s.commit()
    attempts = (
        lambda s: s.execute(select(items).where(items.c.k == 3)).all(),
        lambda s: s.execute(select(items).where(items.c.k.in_([1, 3]))).all(),
        lambda s: s.execute(items.insert().values(k=3, v=3)),
        lambda s: d.cluster.shard_for(items, 3),
    )
    for attempt in attempts:
        with d.Session() as s:
            with pytest.raises(shardkit.ShardKeyError, match=r"region_shard raised KeyError\(3\) for key 3") as ei:
                attempt(s)
            assert isinstance(ei.value.__cause__, KeyError)
            assert ei.value.key == 3
    with d.Session() as s:
        assert s.execute(select(items.c.v).where(items.c.k.in_([1, 2]))).scalars().all() != []


class LowerText(types.TypeDecorator):
    """A text column stored lower-cased by SQL (SQLAlchemy's documented bind_expression)."""
    impl = String
    cache_ok = True

    def bind_expression(self, bindvalue):
        return func.lower(bindvalue)


def test_a_key_column_whose_type_computes_the_value_in_sql_is_refused(db, shardkit_dev_cluster):
    """A key column whose type has a ``bind_expression`` (``lower(:code)``) stores what the
    database computes, not the value given: shardkit placed the row ``(a, 'EU')`` by that
    value and the database stored ``(a, 'eu')`` there, so a read by the stored key looked on
    the other shard and found nothing (run on every shard, the same SELECT finds it), and
    verify reported the row misplaced.  Such a column is now refused when the cluster is made
    with its metadata, as a citext key is (a custom strategy may compute the value itself)."""
    md2 = MetaData()
    Table("k5b_codes", md2, Column("a", BigInteger, primary_key=True),
          Column("code", LowerText(20), primary_key=True))
    base = {"bucket_count": BUCKETS,
            "shards": [{"name": s.name, "primary": s.primary.url, "replicas": []}
                       for s in shardkit_dev_cluster.shards[:2]]}
    for strategy in ({}, {"strategy": "list", "values": {"s0": [[1, "eu"]]}, "default": "s1"}):
        cfg = {**base, "groups": {"codes": {"tables": {"k5b_codes": ["a", "code"]}, **strategy}}}
        with pytest.raises(shardkit.ConfigurationError, match=r"k5b_codes\.code is of type LowerText, "
                           r"whose bind_expression\(\) computes the stored value in SQL"):
            shardkit.Cluster.from_config(cfg, metadata=md2, follow_map=False)
    cfg = {**base, "groups": {"codes": {"strategy": "custom", "tables": {"k5b_codes": ["a", "code"]},
                                        "function": lambda k: "s0"}}}
    shardkit.Cluster.from_config(cfg, metadata=md2, follow_map=False).dispose()
