"""Objects of a float in an unscaled numeric key: the identity map and the guard.

A float written to an unscaled ``numeric`` key is placed (and stored) by its 15 significant
digits, while a float compared with the key is compared in ``float8`` (as it is).  An object
keeps the float in its identity either way: one written with it (on the shard of the 15
digits), or one loaded through ``Numeric(asdecimal=False)`` from a row stored with more
digits (on the shard of the value as it is).  Checked against what one database does:

* ``get()`` of the identity of an object this session flushed finds it in the identity map
  (it looked under the shard of the float as it is only, missed, and read that shard: None),
  in a range group and a list group;
* ``merge()`` of a copy of such an object merges into the one held (it loaded another
  shard's row, found none, and made a second object of that identity);
* an object loaded as a float (asdecimal=False) from a row stored with more than 15 digits
  is on the shard of the value as it is: its refresh said it had moved (NotOwned), as did
  a shard key outside the primary key;
* an ORM bulk UPDATE by primary key compares the key with the float in float8: the row
  stored as exactly the float is updated (it was sent to the 15 digits' shard: StaleDataError);
* ``get()`` of a float not held still reads the shard of the float as it is (the row stored
  as exactly that is the one PostgreSQL finds).

One module-scoped dev cluster (3 shards), a database of its own with a catalog and the
ownership guard (``rebalance.init``): test_numeric_key_bind_types.guarded_world.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import BigInteger, Column, MetaData, Numeric, Table, Text, select
from sqlalchemy.orm import registry

import shardkit
from test_numeric_key_bind_types import F, guarded_world

pytestmark = pytest.mark.integration

md = MetaData()
mapper_registry = registry(metadata=md)

TABLES = {t.name: t for t in [
    Table("nid_num", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
          Column("k", Numeric, primary_key=True), Column("note", Text)),
    Table("nid_flt", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
          Column("k", Numeric(asdecimal=False), primary_key=True), Column("note", Text)),
    # (a list group: 3 on s0, any other value on s1)
    Table("nid_list", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
          Column("k", Numeric, primary_key=True), Column("note", Text)),
    # (a shard key outside the primary key)
    Table("nid_flt_nonpk", md, Column("id", BigInteger, primary_key=True, autoincrement=False),
          Column("k", Numeric(asdecimal=False), nullable=False), Column("note", Text)),
]}
CLASSES: dict[str, type] = {}
for _name, _t in TABLES.items():
    CLASSES[_name] = type(_name.title().replace("_", ""), (), {})
    mapper_registry.map_imperatively(CLASSES[_name], _t)

RANGES = 'ranges = [ { to = 0, shard = "s0" }, { from = 0, to = 3, shard = "s1" }, { from = 3, shard = "s2" } ]'
GROUPS = "\n".join(f'[groups.g_{n}]\nstrategy = "range"\ntables = {{ {n} = "k" }}\n{RANGES}'
                   for n in TABLES if n != "nid_list") + """
[groups.g_nid_list]
strategy = "list"
tables = { nid_list = "k" }
values = { s0 = [3] }
default = "s1"
"""

@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    yield from guarded_world(shardkit_module_cluster_factory, tmp_path_factory, md, TABLES, GROUPS, "nid")


@pytest.mark.parametrize("name", ["nid_num", "nid_flt", "nid_list"])
def test_get_finds_the_object_flushed_with_a_float_key(world, name):
    """One database: the identity map holds the flushed object under (id, F), and get() of
    (id, F) returns it (no SELECT, which would compare F in float8 and miss the row)."""
    cls = CLASSES[name]
    with world.Session() as s:
        obj = cls()
        row_id = obj.id = next(world.ids)
        obj.k = F
        s.add(obj)
        s.flush()
        assert world.where(name, row_id) == []  # (not committed: seen by this session only)
        assert s.get(cls, (row_id, F)) is obj
        assert s.get(cls, {"id": row_id, "k": F}) is obj
        # (read from the database, where the key stored as 3 is not equal to the float8)
        assert s.get(cls, (row_id, F), populate_existing=True) is None
        s.commit()
        assert world.where(name, row_id) == ["s0" if name == "nid_list" else "s2"]


@pytest.mark.parametrize("name", ["nid_num", "nid_flt", "nid_list"])
def test_merge_of_a_copy_merges_into_the_held_object(world, name):
    """One database: merge() of a transient copy keyed (id, F) finds the object the session
    holds under that identity and returns it, with the copy's changes."""
    cls = CLASSES[name]
    with world.Session() as s:
        obj = cls()
        obj.id, obj.k = next(world.ids), F
        s.add(obj)
        s.flush()
        copy = cls()
        copy.id, copy.k, copy.note = obj.id, F, "merged"
        merged = s.merge(copy)
        assert merged is obj
        assert obj.note == "merged"
        assert len([o for o in s.identity_map.values() if isinstance(o, cls)]) == 1
        s.rollback()


def test_get_of_a_float_not_held_reads_the_row_compared_in_float8(world):
    """Without the object in the identity map, get((id, F)) reads the row PostgreSQL finds:
    the one stored as exactly F (shard s1), not the 15 digits' shard."""
    name = "nid_num"
    cls = CLASSES[name]
    exact, = world.insert(name, Decimal(repr(F)))
    assert world.where(name, exact) == ["s1"]
    with world.Session() as s:
        got = s.get(cls, (exact, F))
        assert got is not None and got.id == exact and got.k == Decimal(repr(F))
        with pytest.raises(shardkit.CrossShardWriteError):
            # (written as a float8, the key would be stored as 3, on s2: as for any key change)
            copy = cls()
            copy.id, copy.k, copy.note = exact, F, "merged"
            s.merge(copy)
            s.flush()


@pytest.mark.parametrize("name", ["nid_flt", "nid_flt_nonpk"])
def test_an_object_loaded_as_a_float_is_where_it_was_loaded_from(world, name):
    """``Numeric(asdecimal=False)``: a row stored as exactly 2.9999999999999996 (shard s1)
    loads with the float in its key; its refresh and its UPDATE are the row's, as on one
    database (the guard said it had moved to s2, the shard of the float's 15 digits)."""
    cls = CLASSES[name]
    row_id, = world.insert(name, Decimal(repr(F)))
    assert world.where(name, row_id) == ["s1"]
    with world.Session() as s:
        obj = s.execute(select(cls).where(cls.id == row_id)).scalar_one()
        assert obj.k == F and type(obj.k) is float
        for attrs in (["note"], None):  # (the key in the object, or expired too)
            s.expire(obj, attrs)
            assert obj.note is None  # (the refresh)
            s.refresh(obj, attrs)
        obj.note = "changed"
        s.commit()
        assert obj.note == "changed"
    with world.Session() as s:
        assert s.execute(select(cls.note).where(cls.id == row_id)).scalar_one() == "changed"


def test_bulk_update_by_primary_key_compares_the_float_in_float8(world):
    """ORM bulk UPDATE by primary key (``update(Model)`` with a list of rows): each row's
    WHERE compares the key with the float in float8, as one database: the row stored as
    exactly 2.9999999999999996 (s1) is updated, the one written with the float (stored as 3,
    s2) is not."""
    from sqlalchemy import update
    name = "nid_num"
    cls = CLASSES[name]
    exact, written = world.insert(name, Decimal(repr(F)), F)
    assert world.where(name, exact) == ["s1"] and world.where(name, written) == ["s2"]
    with world.Session() as s:
        s.execute(update(cls), [{"id": exact, "k": F, "note": "bulk"}])
        s.commit()
    with world.Session() as s:
        notes = dict(s.execute(select(cls.id, cls.note).where(cls.id.in_([exact, written]))).all())
    assert notes == {exact: "bulk", written: None}
