"""Writes sent to a shard by name (``execution_options(shardkit_shard=...)``,
``bind_arguments={"shard_id": ...}``, ``set_shard_id(...)``, ``Query.set_shard(...)``) run on
that shard, but never leave a row there under a shard key another shard owns (README
"Overrides, per statement"):

- an INSERT whose row carries a key of another shard is refused (``CrossShardWriteError``
  naming the key, its owner and the named shard), not rerouted, and nothing is written;
- an UPDATE (Core, ORM-enabled, executemany, an upsert's ``ON CONFLICT DO UPDATE SET``) that sets
  the key to another shard's key, or part of a composite key, is refused, as inside
  ``scope(shard=...)``;
- rows without a key, ``INSERT ... SELECT``, keys the named shard owns, reference tables and
  DELETEs run on the named shard as before; a read naming a shard is not checked at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, Integer, String, bindparam, delete, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit


class Base(DeclarativeBase):
    pass


class Item(Base):
    """Range-sharded on a nullable ``k`` (not the primary key): k < 100 on s0, < 200 on s1,
    the rest on s2; a NULL ``k`` is a row without a key."""
    __tablename__ = "nsw8_item"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    k: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    v: Mapped[int] = mapped_column(Integer, default=0)


class Pair(Base):
    """Hash-sharded on the composite key (a, b)."""
    __tablename__ = "nsw8_pair"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    a: Mapped[int] = mapped_column(BigInteger)
    b: Mapped[str] = mapped_column(String(20))
    v: Mapped[int] = mapped_column(Integer, default=0)


class Ref(Base):
    __tablename__ = "nsw8_ref"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[int] = mapped_column(Integer, default=0)


CONFIG = {
    "groups": {
        "items": {"strategy": "range", "ranges": [
            {"to": 100, "shard": "s0"}, {"from": 100, "to": 200, "shard": "s1"}, {"from": 200, "shard": "s2"}],
            "tables": {"nsw8_item": "k"}},
        "pairs": {"strategy": "hash", "tables": {"nsw8_pair": ["a", "b"]}},
    },
    "reference_tables": ["nsw8_ref"],
}


class Env:
    def __init__(self, cluster: shardkit.Cluster) -> None:
        self.cluster = cluster
        self.Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")

    def rows(self, table: str) -> dict[str, list[tuple[Any, ...]]]:
        """Every shard's rows of ``table`` (read on its primary), by id."""
        out = {}
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).connect() as c:
                out[s] = [tuple(r) for r in c.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
        return out


@pytest.fixture(scope="module")
def module_env(sharded_dev) -> Iterator[Env]:
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as cluster:
        assert tuple(cluster.shard_names) == ("s0", "s1", "s2")
        yield Env(cluster)


@pytest.fixture
def env(module_env: Env) -> Env:
    for s in module_env.cluster.shard_names:
        with module_env.cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text("TRUNCATE nsw8_item, nsw8_pair, nsw8_ref"))
    return module_env


def _pair_key(env: Env, shard: str, other_than: tuple[int, str] | None = None) -> tuple[int, str]:
    """A composite key (a, b) that ``shard`` owns."""
    for a in range(1, 500):
        for b in ("x", "y", "z", "w"):
            if (a, b) != other_than and env.cluster.shard_for(Pair, (a, b)) == shard:
                return a, b
    raise AssertionError(shard)


def _named(stmt: Any, how: str, shard: str = "s0") -> tuple[Any, dict[str, Any]]:
    """``stmt`` sent to ``shard`` by name, the ``how`` way: the statement and execute()'s kwargs."""
    if how == "shardkit_shard":
        return stmt.execution_options(shardkit_shard=shard), {}
    if how == "call_option":
        return stmt, {"execution_options": {"shardkit_shard": shard}}
    if how == "bind_arguments":
        return stmt, {"bind_arguments": {"shard_id": shard}}
    assert how == "set_shard_id"
    return stmt.options(set_shard_id(shard)), {}


HOWS = ["shardkit_shard", "call_option", "bind_arguments", "set_shard_id"]


# -- INSERT -------------------------------------------------------------------


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("shape", ["values", "params", "executemany", "multi_values", "orm_bulk", "orm_returning"])
def test_an_insert_of_another_shards_key_on_a_named_shard_is_refused(env, how, shape):
    own, other = {"id": 1, "k": 5, "v": 1}, {"id": 2, "k": 150, "v": 2}   # 5 -> s0, 150 -> s1
    kw: dict[str, Any] = {}
    if shape == "values":
        stmt, params = insert(Item.__table__).values(**other), None
    elif shape == "params":
        stmt, params = insert(Item.__table__), other
    elif shape == "executemany":
        stmt, params = insert(Item.__table__), [own, other]
    elif shape == "multi_values":
        stmt, params = insert(Item.__table__).values([own, other]), None
    elif shape == "orm_bulk":
        stmt, params = insert(Item), [own, other]
    else:
        stmt, params = insert(Item).values(**other).returning(Item), None
    stmt, kw = _named(stmt, how)
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError) as ei:
            s.execute(stmt, params, **kw)
            s.commit()
    msg = str(ei.value)
    assert "150" in msg and "owned by shard s1" in msg and "on shard s0" in msg, msg
    assert "without naming a shard" in msg, msg   # what to do
    assert env.rows("nsw8_item") == {"s0": [], "s1": [], "s2": []}


def test_an_insert_of_another_shards_composite_key_on_a_named_shard_is_refused(env):
    a, b = _pair_key(env, "s1")
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="owned by shard s1"):
            s.execute(insert(Pair).values(id=1, a=a, b=b).execution_options(shardkit_shard="s0"))
    assert env.rows("nsw8_pair") == {"s0": [], "s1": [], "s2": []}


@pytest.mark.parametrize("how", HOWS)
def test_an_insert_of_the_named_shards_keys_and_of_keyless_rows_runs_there(env, how):
    rows = [{"id": 1, "k": 5, "v": 1}, {"id": 2, "k": None, "v": 2}, {"id": 3, "k": 99, "v": 3}]
    stmt, kw = _named(insert(Item.__table__), how)
    one, kw1 = _named(insert(Item.__table__).values(id=4, k=None, v=4), how, "s2")
    with env.Session() as s:
        s.execute(stmt, rows, **kw)
        s.execute(one, **kw1)                           # a key-less row on another named shard
        s.commit()
    assert env.rows("nsw8_item") == {"s0": [(1, 5, 1), (2, None, 2), (3, 99, 3)], "s1": [], "s2": [(4, None, 4)]}


def test_an_insert_select_on_a_named_shard_runs_there(env):
    with env.Session() as s:
        s.execute(insert(Item), [{"id": 1, "k": 5, "v": 1}, {"id": 2, "k": 150, "v": 2}])
        s.commit()
    # Copies s0's rows under new ids, keys kept (s0's): the SELECT reads that shard alone.
    sel = select((Item.id + 100).label("id"), Item.k, Item.v)
    stmt = insert(Item.__table__).from_select(["id", "k", "v"], sel).execution_options(shardkit_shard="s0")
    with env.Session() as s:
        s.execute(stmt)
        s.commit()
    assert env.rows("nsw8_item") == {"s0": [(1, 5, 1), (101, 5, 1)], "s1": [(2, 150, 2)], "s2": []}


@pytest.mark.parametrize("how", HOWS)
def test_a_reference_write_on_a_named_shard_is_not_checked(env, how):
    # As documented: a reference table's write on a named shard changes that shard's copy.
    stmt, kw = _named(insert(Ref.__table__).values(id=1, v=1), how, "s1")
    up, kwu = _named(update(Ref.__table__).where(Ref.id == 1).values(id=2, v=5), how, "s1")
    with env.Session() as s:
        s.execute(stmt, **kw)
        s.execute(up, **kwu)
        s.commit()
    assert env.rows("nsw8_ref") == {"s0": [], "s1": [(2, 5)], "s2": []}


# -- UPDATE -------------------------------------------------------------------


def _seed(env: Env) -> None:
    with env.Session() as s:
        s.execute(insert(Item), [{"id": 1, "k": 5, "v": 1}, {"id": 2, "k": 150, "v": 2}])
        s.execute(insert(Pair), [{"id": 1, "a": _pair_key(env, "s0")[0], "b": _pair_key(env, "s0")[1], "v": 1}])
        s.commit()


SEEDED = {"s0": [(1, 5, 1)], "s1": [(2, 150, 2)], "s2": []}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("shape", ["core", "orm", "executemany", "params_set", "bound"])
def test_an_update_moving_the_key_to_another_shard_on_a_named_shard_is_refused(env, how, shape):
    _seed(env)
    params: Any = None
    if shape == "core":
        stmt = update(Item.__table__).where(Item.__table__.c.id == 1).values(k=150)
    elif shape == "orm":
        stmt = update(Item).where(Item.id == 1).values(k=150, v=Item.v + 1)
    elif shape == "executemany":
        stmt = update(Item.__table__).where(Item.__table__.c.id == bindparam("i")).values(k=bindparam("nk"))
        params = [{"i": 1, "nk": 6}, {"i": 1, "nk": 250}]          # the second to s2's key
    elif shape == "params_set":
        # An UPDATE without values(): its parameters are its SET.
        stmt, params = update(Item.__table__).where(Item.__table__.c.id == 1), {"k": 150}
    else:
        stmt, params = update(Item.__table__).where(Item.__table__.c.id == 1).values(k=bindparam("nk")), {"nk": 150}
    stmt, kw = _named(stmt, how)
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="sets its shard key") as ei:
            s.execute(stmt, params, **kw)
            s.commit()
    assert "owned by shard s" in str(ei.value) and "Delete and re-insert" in str(ei.value)
    assert env.rows("nsw8_item") == SEEDED


def test_an_update_setting_the_key_to_null_or_sql_on_a_named_shard_is_refused(env):
    # As inside scope(shard=...): a value shardkit cannot evaluate could belong to any shard.
    _seed(env)
    for value in (None, Item.k + 100):
        with env.Session() as s:
            with pytest.raises(shardkit.CrossShardWriteError, match="cannot evaluate"):
                s.execute(update(Item).where(Item.id == 1).values(k=value).execution_options(shardkit_shard="s0"))
    assert env.rows("nsw8_item") == SEEDED


def test_query_set_shard_update_moving_the_key_is_refused(env):
    _seed(env)
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="owned by shard s1"):
            s.query(Item).set_shard("s0").filter(Item.id == 1).update({"k": 150}, synchronize_session=False)
            s.commit()
    assert env.rows("nsw8_item") == SEEDED


def test_an_update_setting_part_of_a_composite_key_on_a_named_shard_is_refused(env):
    _seed(env)
    before = env.rows("nsw8_pair")
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="part of a composite key"):
            s.execute(update(Pair).where(Pair.id == 1).values(b="q").execution_options(shardkit_shard="s0"))
            s.commit()
    assert env.rows("nsw8_pair") == before


@pytest.mark.parametrize("keyless", [False, True])
def test_an_upsert_setting_another_shards_key_on_a_named_shard_is_refused(env, keyless):
    _seed(env)
    ins = postgresql.insert(Item.__table__).values(id=1, k=None if keyless else 5, v=9)
    stmt = ins.on_conflict_do_update(index_elements=["id"], set_={"k": 250}).execution_options(shardkit_shard="s0")
    with env.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
            s.execute(stmt)
            s.commit()
    assert env.rows("nsw8_item") == SEEDED


@pytest.mark.parametrize("how", HOWS)
def test_updates_keeping_the_key_on_the_named_shard_run_there(env, how):
    _seed(env)
    a, b = _pair_key(env, "s0", other_than=tuple(env.rows("nsw8_pair")["s0"][0][1:3]))
    statements = [
        update(Item.__table__).where(Item.__table__.c.id == 1).values(k=50, v=7),    # 50: s0's
        update(Item).where(Item.id == 1).values(v=Item.v + 1),                       # key not set
        update(Pair).where(Pair.id == 1).values(a=a, b=b),                           # s0's pair
        postgresql.insert(Item.__table__).values(id=1, k=5, v=0).on_conflict_do_update(
            index_elements=["id"], set_={"k": 60}),                                  # 60: s0's
        delete(Item).where(Item.id == 99),
    ]
    with env.Session() as s:
        for stmt in statements:
            st, kw = _named(stmt, how)
            s.execute(st, **kw)
        s.commit()
    assert env.rows("nsw8_item") == {"s0": [(1, 60, 8)], "s1": [(2, 150, 2)], "s2": []}
    assert env.rows("nsw8_pair")["s0"] == [(1, a, b, 1)]


def test_a_read_naming_a_shard_is_not_checked(env, monkeypatch):
    _seed(env)

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("a read naming a shard was checked as a write")
    monkeypatch.setattr(env.cluster.router, "refuse_named_write", refuse)
    with env.Session() as s:
        assert s.execute(select(Item.id).execution_options(shardkit_shard="s1")).scalars().all() == [2]
        assert s.execute(select(Item.id).where(Item.k == 5), bind_arguments={"shard_id": "s0"}).scalars().all() == [1]
        assert [i.id for i in s.query(Item).set_shard("s0")] == [1]
        # A write with no named shard is routed by its key, not checked this way either.
        s.execute(update(Item).where(Item.k == 150).values(v=3))
        s.rollback()


def test_inside_a_scope_an_insert_still_goes_where_its_key_belongs(env):
    # Unchanged: scope(shard=...) reroutes a keyed row rather than refusing it.
    with env.Session() as s, shardkit.scope(shard="s0"):
        s.execute(insert(Item.__table__), [{"id": 1, "k": 150, "v": 1}, {"id": 2, "k": None, "v": 2}])
        s.commit()
    assert env.rows("nsw8_item") == {"s0": [(2, None, 2)], "s1": [(1, 150, 1)], "s2": []}
    # A named shard inside the scope is named: refused.
    with env.Session() as s, shardkit.scope(shard="s0"):
        with pytest.raises(shardkit.CrossShardWriteError, match="owned by shard s1"):
            s.execute(insert(Item.__table__).values(id=3, k=160).execution_options(shardkit_shard="s0"))


def test_an_insert_of_a_key_no_shard_takes_on_a_named_shard_is_refused(env):
    # A text for a bigint key: no shard owns it (refused as outside a named shard).
    with env.Session() as s:
        with pytest.raises(shardkit.ShardKeyError):
            s.execute(insert(Item.__table__).values(id=1, k="150").execution_options(shardkit_shard="s0"))
    assert env.rows("nsw8_item") == {"s0": [], "s1": [], "s2": []}


def test_inside_a_scope_a_keyless_upsert_setting_another_shards_key_is_refused(env):
    # The row without a key runs on the scope's shard: its DO UPDATE may not set a key
    # another shard owns there (as for a keyed row, whose own shard is the one checked).
    _seed(env)
    ins = postgresql.insert(Item.__table__).values(id=1, k=None, v=9)
    with env.Session() as s, shardkit.scope(shard="s0"):
        with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
            s.execute(ins.on_conflict_do_update(index_elements=["id"], set_={"k": 250}))
    with env.Session() as s, shardkit.scope(shard="s0"):
        s.execute(ins.on_conflict_do_update(index_elements=["id"], set_={"k": 50}))
        s.commit()
    assert env.rows("nsw8_item") == {**SEEDED, "s0": [(1, 50, 1)]}
