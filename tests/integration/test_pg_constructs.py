"""PostgreSQL-specific statements through ShardedSession: each is routed and merged exactly as
one database would answer it, or refused naming the construct; never silently wrong."""

from __future__ import annotations

import warnings

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy import tablesample as sa_tablesample
from sqlalchemy.dialects import postgresql as pg

import shardkit
from models import Country, Order, User

pytestmark = pytest.mark.integration


def _key_per_shard(cluster) -> dict[str, int]:
    """The smallest user id each shard owns."""
    out: dict[str, int] = {}
    for k in range(1, 10_000):
        out.setdefault(cluster.shard_for(User, k), k)
        if len(out) == len(cluster.shard_names):
            return out
    raise AssertionError("a shard owns no small key")


def _rows(sharded, sql: str) -> dict[str, list]:
    out = {}
    for s in sharded.cluster.shard_names:
        with sharded.cluster.primary(s).connect() as c:
            out[s] = [tuple(r) for r in c.execute(text(sql))]
    return out


@pytest.fixture
def three(sharded):
    keys = _key_per_shard(sharded.cluster)
    with sharded.Session() as s:
        s.add_all(User(id=k, name=f"u{k}") for k in keys.values())
        s.add(Country(code="fr", name="France"))
        s.commit()
    return keys


# -- data-modifying CTEs (WITH x AS (INSERT/UPDATE/DELETE ... RETURNING) SELECT ...) -------------

def test_update_of_reference_table_in_cte_is_refused_not_written_to_one_copy(sharded, three):
    # One database: every copy of countries says "Frankreich". Routed as a read of a
    # reference table, it ran on one shard and the copies diverged.
    u = update(Country).values(name="Frankreich").returning(Country.code).cte("u")
    with sharded.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH") as e:
            s.execute(select(u.c.code))
        assert "countries" in str(e.value) and "RETURNING as its own statement" in str(e.value)
        s.rollback()
    assert _rows(sharded, "SELECT name FROM countries") == {
        n: [("France",)] for n in sharded.cluster.shard_names}
    with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH"):
        sharded.cluster.explain(select(u.c.code))


def test_insert_in_cte_is_refused_not_written_on_the_outer_querys_shard(sharded, three):
    s0, s1 = sharded.cluster.shard_names[:2]
    a, b = three[s0], three[s1]
    new = b + len(sharded.cluster.shard_names) * 10_000  # a free id
    new = next(k for k in range(new, new + 10_000) if sharded.cluster.shard_for(User, k) == s1)
    i = insert(User).values(id=new, name="via cte").returning(User.id).cte("i")
    with sharded.Session() as s:
        # The outer SELECT names a key of s0: the INSERT of an s1 key ran there.
        with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH"):
            s.execute(select(User.id).where(User.id == a).add_cte(i))
        s.rollback()
    assert sum(len(v) for v in _rows(sharded, f"SELECT id FROM users WHERE id = {new}").values()) == 0


def test_keyless_update_in_cte_needs_all_shards_as_an_update_does(sharded, three):
    uu = update(User).values(name="zapped").returning(User.id).cte("uu")
    with sharded.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH"):
            s.execute(select(User.id).where(User.name == "nobody").add_cte(uu))
        s.rollback()
    with sharded.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH"):
            # The DML's own statement too: WITH d AS (DELETE ...) UPDATE ...
            d = delete(Order).where(Order.user_id == three[sharded.cluster.shard_names[1]]).cte("d")
            s.execute(update(User).where(User.id == three[sharded.cluster.shard_names[0]])
                      .values(name="x").add_cte(d))
        s.rollback()
    assert all(r[0] != "zapped" for v in _rows(sharded, "SELECT name FROM users").values() for r in v)


def test_dml_cte_runs_on_a_named_shard_on_its_primary(sharded, three):
    s1 = sharded.cluster.shard_names[1]
    d = delete(User).where(User.id == three[s1]).returning(User.id).cte("d")
    with sharded.Session() as s:
        got = s.execute(select(d.c.id), execution_options={
            "shardkit_shard": s1, "shardkit_role": "primary"}).scalars().all()
        s.commit()
    assert got == [three[s1]]
    assert _rows(sharded, f"SELECT id FROM users WHERE id = {three[s1]}")[s1] == []


# -- INSERT ... VALUES (...), (...) ON CONFLICT DO UPDATE SET key = ... ----------------------------

def _free_key_on(cluster, shard: str, above: int) -> int:
    return next(k for k in range(above + 1, above + 10_000) if cluster.shard_for(User, k) == shard)


@pytest.mark.parametrize("set_", ["plain", "expression"])
def test_multi_row_upsert_moving_the_key_is_refused_as_a_single_row_one_is(sharded, three, set_):
    s0, s1 = sharded.cluster.shard_names[:2]
    a = three[s0]
    target = _free_key_on(sharded.cluster, s1, 50_000)
    stmt = pg.insert(User).values([{"id": a, "name": "again"}])
    stmt = stmt.on_conflict_do_update(
        index_elements=[User.id],
        set_={"id": target if set_ == "plain" else stmt.excluded.id + (target - a), "name": "moved"})
    single = pg.insert(User).values(id=a, name="again").on_conflict_do_update(
        index_elements=[User.id], set_=dict(stmt._post_values_clause.update_values_to_set))
    with sharded.Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
            s.execute(single)  # (as documented)
        s.rollback()
    with sharded.Session() as s:
        # One database: user a becomes user `target`, which s1 owns; here the row stayed
        # on s0 under a key that s0 does not own (no read by key finds it).
        with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
            s.execute(stmt)
        s.rollback()
    with pytest.raises(shardkit.CrossShardWriteError, match="ON CONFLICT DO UPDATE"):
        sharded.cluster.explain(stmt)
    assert _rows(sharded, f"SELECT id, name FROM users WHERE id IN ({a}, {target})") == {
        s: ([(a, f"u{a}")] if s == s0 else []) for s in sharded.cluster.shard_names}


def test_multi_row_upsert_keeping_the_key_still_runs_on_the_owner(sharded, three):
    s0 = sharded.cluster.shard_names[0]
    a = three[s0]
    other = _free_key_on(sharded.cluster, s0, 50_000)
    stmt = pg.insert(User).values([{"id": a, "name": "x"}, {"id": other, "name": "y"}])
    stmt = stmt.on_conflict_do_update(index_elements=[User.id],
                                      set_={"id": stmt.excluded.id, "name": stmt.excluded.name})
    with sharded.Session() as s:
        got = s.execute(stmt.returning(User.id, User.name)).all()
        s.commit()
    assert sorted(got) == sorted([(a, "x"), (other, "y")])
    assert sorted(_rows(sharded, "SELECT id, name FROM users")[s0]) == sorted([(a, "x"), (other, "y")])


# -- key IN (SELECT DISTINCT ON (...) ...) ----------------------------------------------------------

def _distinct_on(stmt, column, spelling):
    if spelling == "ext":
        if not hasattr(pg, "distinct_on"):
            pytest.skip("postgresql.distinct_on() is SQLAlchemy 2.1's")
        return stmt.ext(pg.distinct_on(column))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy 2.1 deprecates distinct(*expressions)
        return stmt.distinct(column)


@pytest.mark.parametrize("spelling", ["ext", "legacy"])
def test_in_subquery_with_distinct_on_another_column_is_refused(sharded, three, spelling):
    # "The users who placed the first order of each amount": one database picks one order
    # per amount among all orders; each shard would pick one among its own.
    names = sharded.cluster.shard_names
    with sharded.Session() as s:
        for n, shard in enumerate(names):
            s.add(Order(id=n + 1, user_id=three[shard], amount=10))
        s.commit()
    sub = _distinct_on(select(Order.user_id).order_by(Order.amount, Order.id), Order.amount, spelling)
    stmt = select(User.id).where(User.id.in_(sub))
    with sharded.Session() as s:
        with pytest.raises(shardkit.ScatterRefused, match="DISTINCT ON") as e:
            s.execute(stmt).all()  # (was every shard's first order's user: 3 rows, not 1)
        assert e.value.construct == "statement not colocated on the shard key"
    # DISTINCT ON the key itself keeps each key's rows whole: exact, and still merged.
    keyed = _distinct_on(select(Order.user_id).order_by(Order.user_id, Order.id), Order.user_id, spelling)
    with sharded.Session() as s:
        assert sorted(s.scalars(select(User.id).where(User.id.in_(keyed))).all()) == sorted(three.values())


# -- TABLESAMPLE of a sharded table ---------------------------------------------------------------

def test_tablesample_of_a_sharded_table_is_that_table(sharded, three):
    # BERNOULLI (100): every row, so one database's answer is known.
    names = sharded.cluster.shard_names
    a, b, c = (three[n] for n in names[:3])
    with sharded.Session() as s:
        # Each order's amount is the id of a user on another shard.
        s.add_all([Order(id=1, user_id=a, amount=b), Order(id=2, user_id=b, amount=c),
                   Order(id=3, user_id=c, amount=a)])
        s.commit()
    sample = sa_tablesample(User.__table__, func.bernoulli(100), name="sample")
    with sharded.Session() as s:
        # A join on another column than the key: one database matches all three orders,
        # each shard none (the users they name are elsewhere).
        with pytest.raises(shardkit.ScatterRefused, match="not joined on the shard key"):
            s.execute(select(Order.id, sample.c.name).join(sample, sample.c.id == Order.amount)).all()
        # A subquery not correlated on the key: one database gives one row, every shard its own max.
        with pytest.raises(shardkit.ScatterRefused, match="not correlated"):
            s.execute(select(User.id).where(
                User.id == select(func.max(sample.c.id)).scalar_subquery())).all()
        # Joined on the key, it is exact.
        got = s.execute(select(Order.id, sample.c.name).join(sample, sample.c.id == Order.user_id)).all()
        assert sorted(got) == [(1, f"u{a}"), (2, f"u{b}"), (3, f"u{c}")]
        # The sample alone: each shard samples its own rows (it was refused as rows of
        # reference tables that every shard would return).
        assert sorted(s.scalars(select(sample.c.id)).all()) == sorted(three.values())
        sharded.reset_hits()
        assert s.scalars(select(sample.c.name).where(sample.c.id == b)).all() == [f"u{b}"]
        assert dict(sharded.hits) == {sharded.cluster.shard_for(User, b): 1}
