"""Bulk writes across shards (Core executemany split by shard: RETURNING
order, rowcount, inserted primary keys)."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert

from models import Event

# events: a range group, id < 1000 -> s0, 1000..4999 -> s1, >= 5000 -> the last shard;
# the input order interleaves the shards.
IDS = [6000, 1, 2000, 6001, 2, 2001]
T = Event.__table__


def test_insert_returning_sort_by_parameter_order_across_shards_keeps_input_order(sharded):
    """SQLAlchemy promises RETURNING rows in the order of the parameter sets with
    sort_by_parameter_order=True; split by shard, the rows came back grouped by shard."""
    rows = [{"id": i, "payload": f"p{i}"} for i in IDS]
    with sharded.Session() as s:
        got = s.execute(insert(T).returning(T.c.id, T.c.payload, sort_by_parameter_order=True),
                        rows).all()
        assert [tuple(r) for r in got] == [(i, f"p{i}") for i in IDS]
        up = pg_insert(T)
        up = up.on_conflict_do_update(index_elements=["id"], set_={"payload": up.excluded.payload})
        again = list(reversed(IDS))
        got = s.execute(up.returning(T.c.id, sort_by_parameter_order=True),
                        [{"id": i, "payload": "n"} for i in again]).scalars().all()
        assert got == again
        s.rollback()


def test_core_executemany_insert_across_shards_rowcount_is_unknown_not_zero(sharded):
    """An executemany INSERT's rowcount is -1 (unknown) on one database; split over shards
    it was reported as 0 (the -1 of each shard clamped and added up): no rows inserted."""
    with sharded.Session() as s:
        with sharded.cluster.primary("s0").connect() as c:
            one_db = c.execute(insert(T), [{"id": 1, "payload": "x"}, {"id": 2, "payload": "x"}]).rowcount
            c.rollback()
        r = s.execute(insert(T), [{"id": i, "payload": "x"} for i in IDS])
        assert r.rowcount == one_db == -1
        s.rollback()


def test_core_executemany_insert_across_shards_gives_every_rows_primary_key(sharded):
    """On one database an executemany INSERT's inserted_primary_key_rows has a key per
    row; split over shards it had only the first shard's rows."""
    with sharded.Session() as s:
        r = s.execute(insert(T), [{"id": i, "payload": "x"} for i in IDS])
        assert [tuple(k) for k in r.inserted_primary_key_rows] == [(i,) for i in IDS]
        s.rollback()
