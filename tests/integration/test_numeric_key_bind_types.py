"""Bind types and numeric keys: routing by the type a key is compared in.

A non-integer numeric key compared with a parameter SQLAlchemy typed INTEGER is compared
with the integer PostgreSQL casts the value to; an unscaled ``numeric`` key given a float is
stored at 15 significant digits but compared with a float in ``float8``.  The cases below,
each checked against the oracle of one database (the statement run on every shard
directly, the union of the rows):

* the keyed SELECT's shortcut (``Router._key_columns``, one entry per key column) kept the
  coercer of the first statement's parameter type and routed the next statement on that
  column by it, whatever its own parameter's type: ``k == bindparam(..., type_=Integer)``
  after ``k == Decimal("2.6")`` (or the reverse) went to the shard of the other reading;
* a ``Float``/``Double`` key compared with an INTEGER-typed parameter was routed by the value
  as given: SQLAlchemy 2.1's Float is no Numeric, which the check asked for;
* a ``TypeDecorator`` over an unscaled ``Numeric`` with a ``process_bind_param`` was read
  with the coercer of a write (15 digits): ``k == 2.9999999999999996`` missed the row stored
  as exactly that;
* an object given a float for an unscaled numeric key (placed by the 15 digits) was said to
  live on the shard of the float as it is: its refresh and its UPDATE raised NotOwned ("the
  map has changed, retry"), where one database says ObjectDeletedError and StaleDataError.

One module-scoped dev cluster (3 shards), a database of its own with a catalog and the
ownership guard (``rebalance.init``), as test_key_type_fuzz builds it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (BigInteger, Column, Double, Integer, MetaData, Numeric, Table, Text, TypeDecorator,
                        bindparam, create_engine, insert, literal, select)
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm import registry, sessionmaker

import shardkit
from shardkit import rebalance
from shardkit.devcluster import to_toml
from own_tables import database_on_every_shard

pytestmark = pytest.mark.integration

md = MetaData()
mapper_registry = registry(metadata=md)


class PassNumeric(TypeDecorator):
    """An unscaled numeric with a bind processing of its own (that changes nothing)."""
    impl = Numeric
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value


def _table(name: str, type_: Any) -> Table:
    return Table(name, md, Column("id", BigInteger, primary_key=True, autoincrement=False),
                 Column("k", type_, primary_key=True), Column("note", Text))


TABLES = {t.name: t for t in [
    _table("bt_entry", Numeric),      # the keyed SELECT's shortcut, Core
    _table("bt_entry_orm", Numeric),  # and ORM
    _table("bt_double", Double),
    _table("bt_pass", PassNumeric),
    _table("bt_numu", Numeric),
]}
CLASSES: dict[str, type] = {}
for _name, _t in TABLES.items():
    CLASSES[_name] = type(_name.title().replace("_", ""), (), {})
    mapper_registry.map_imperatively(CLASSES[_name], _t)

RANGES = 'ranges = [ { to = 0, shard = "s0" }, { from = 0, to = 3, shard = "s1" }, { from = 3, shard = "s2" } ]'
GROUPS = "\n".join(f'[groups.g_{n}]\nstrategy = "range"\ntables = {{ {n} = "k" }}\n{RANGES}' for n in TABLES)

F = 2.9999999999999996  # stored in an unscaled numeric as 3; as a float8, below 3
_dbs = itertools.count()  # (databases of every module that uses guarded_world)


class World:
    def __init__(self, cluster: shardkit.Cluster, direct: dict[str, Any], tables: dict[str, Table]) -> None:
        self.cluster, self.direct, self.tables = cluster, direct, tables
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
        self.ids = itertools.count(1)

    def one_database(self, stmt: Any) -> list[Any]:
        out = []
        for eng in self.direct.values():
            with eng.connect() as c:
                out.extend(c.execute(stmt).scalars().all())
        return sorted(out)

    def read(self, stmt: Any) -> list[Any]:
        with self.Session() as s:
            return sorted(s.execute(stmt).scalars().all())

    def where(self, name: str, row_id: int) -> list[str]:
        t = self.tables[name]
        out = []
        for shard, eng in self.direct.items():
            with eng.connect() as c:
                if c.execute(select(t.c.id).where(t.c.id == row_id)).first() is not None:
                    out.append(shard)
        return out

    def insert(self, name: str, *keys: Any) -> list[int]:
        ids = [next(self.ids) for _ in keys]
        with self.Session() as s:
            s.execute(insert(self.tables[name]), [{"id": i, "k": k} for i, k in zip(ids, keys)])
            s.commit()
        return ids


def guarded_world(factory: Any, tmp_path_factory: Any, metadata: MetaData, tables: dict[str, Table],
                  groups: str, prefix: str) -> Iterator[World]:
    """A World on a 3-shard dev cluster, in a database of its own with ``metadata``'s tables,
    a catalog and the ownership guard (``rebalance.init``), its groups ``groups`` (TOML)."""
    dev = factory(shards=3, replicas=0, bucket_count=16)
    db = f"{prefix}w{next(_dbs)}"
    cfg = database_on_every_shard(dev, db)
    direct = {s["name"]: create_engine(s["primary"].replace("postgresql://", "postgresql+psycopg://", 1),
                                       isolation_level="AUTOCOMMIT")
              for s in cfg["shards"]}
    for eng in direct.values():
        metadata.create_all(eng)
    cfg["catalog"] = {"url": dev.create_catalog(f"{db}_catalog")}
    path = Path(tmp_path_factory.mktemp(prefix)) / f"{db}.toml"
    path.write_text(to_toml(cfg) + "\n" + groups, encoding="utf-8")
    init_cluster = shardkit.Cluster.from_config(path, metadata=metadata, follow_map=False)
    rebalance.init(init_cluster)
    init_cluster.dispose()
    w = World(shardkit.Cluster.from_config(path, metadata=metadata, follow_map=False), direct, tables)
    yield w
    w.cluster.dispose()
    for eng in direct.values():
        eng.dispose()


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    yield from guarded_world(shardkit_module_cluster_factory, tmp_path_factory, md, TABLES, GROUPS, "bt")


def test_keyed_select_shortcut_is_per_parameter_type(world):
    """``k == Decimal("2.6")`` is compared as 2.6, ``k == bindparam(..., type_=Integer)`` given
    2.6 as the integer 3: statements of one key column with parameters of these two types
    must not share the route of the first one routed (in either order, Core and ORM)."""
    for name in ("bt_entry", "bt_entry_orm"):
        t, cls = TABLES[name], CLASSES[name]
        three, point = world.insert(name, 3, Decimal("2.6"))
        assert world.where(name, three) == ["s2"] and world.where(name, point) == ["s1"]

        def stmts(v: Any, name: str = name, t: Table = t, cls: type = cls) -> list[tuple[str, Any]]:
            if name == "bt_entry":
                return [("as given", select(t.c.id).where(t.c.k == v)),
                        ("integer", select(t.c.id).where(t.c.k == bindparam("x", v, type_=Integer))),
                        ("literal integer", select(t.c.id).where(t.c.k == literal(v, Integer)))]
            return [("integer", select(cls.id).where(cls.k == bindparam("x", v, type_=Integer))),
                    ("as given", select(cls.id).where(cls.k == v))]

        for round_ in range(2):
            for what, stmt in stmts(Decimal("2.6")):
                got = world.read(stmt)  # (first: executing a statement elsewhere memoizes on it)
                want = world.one_database(stmt)
                assert want == ([point] if what == "as given" else [three])
                assert got == want, (name, what, round_)


def test_a_float_key_compared_with_integers_is_routed_by_them(world):
    """``k.in_([3, -0.5])`` on a ``double precision`` key is sent as integers (the list takes
    its first value's type), and PostgreSQL casts -0.5 to 0 (half to even): the row of key
    -0.0 (shard s1) is found; -0.5 as given is on s0."""
    t = TABLES["bt_double"]
    three, zero = world.insert("bt_double", 3.0, -0.0)
    for stmt in (select(t.c.id).where(t.c.k.in_([3, -0.5])),
                 select(t.c.id).where(t.c.k == bindparam("x", Decimal("-0.4"), type_=Integer)),
                 select(t.c.id).where(t.c.k.in_([3, Decimal("2.6")]))):
        want = world.one_database(stmt)
        assert want in ([three, zero], [zero], [three])
        assert world.read(stmt) == want, str(stmt)


def test_a_bind_processing_decorator_over_numeric_reads_a_float_as_a_float8(world):
    """A TypeDecorator over an unscaled numeric with its own ``process_bind_param``: a float
    written is placed by the 15 digits stored (as without the decorator), while a float
    compared with the key is compared in float8, so ``k == 2.9999999999999996`` finds the
    row stored as exactly that (shard s1), not the one stored as 3."""
    name = "bt_pass"
    t, cls = TABLES[name], CLASSES[name]
    written, exact = world.insert(name, F, Decimal(repr(F)))
    assert world.where(name, written) == ["s2"] and world.where(name, exact) == ["s1"]
    for stmt in (select(t.c.id).where(t.c.k == F), select(t.c.id).where(t.c.k.in_([F, 2.5])),
                 select(cls.id).where(cls.k == F)):
        want = world.one_database(stmt)
        assert want == [exact]
        assert world.read(stmt) == want, str(stmt)
    with world.Session() as s:
        got = s.get(cls, (exact, F))
        assert got is not None and got.id == exact
        assert s.get(cls, (written, F)) is None  # (stored as 3: not equal to the float8)


@pytest.mark.parametrize("name", ["bt_numu", "bt_pass"])
def test_an_object_given_a_float_key_fails_as_on_one_database(world, name):
    """An object added with a float key (2.9999999999999996: placed, and stored, as 3) keeps
    the float in its identity; SQLAlchemy's refresh and UPDATE compare the key with it, in
    float8, and match no row: one database raises ObjectDeletedError and StaleDataError.
    shardkit said the object had moved to another shard (NotOwned, "retry"), which no retry
    cures."""
    cls = CLASSES[name]
    with world.Session() as s:
        obj = cls()
        row_id = next(world.ids)
        obj.id, obj.k = row_id, F
        s.add(obj)
        s.commit()
        assert world.where(name, row_id) == ["s2"]
        with pytest.raises(orm_exc.ObjectDeletedError):
            obj.note  # noqa: B018 - the refresh
    with world.Session(expire_on_commit=False) as s:
        obj = cls()
        obj.id, obj.k = next(world.ids), F
        s.add(obj)
        s.commit()
        obj.note = "changed"
        with pytest.raises(orm_exc.StaleDataError):
            s.commit()
