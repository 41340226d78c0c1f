"""A data-modifying WITH on a shard named by the caller (``scope(shard=...)``,
``execution_options(shardkit_shard=...)``): the documented way to run one.  It writes,
so it must run on that shard's primary (a replica refuses it: "cannot execute DELETE
in a read-only transaction"), count as a write of the transaction (later reads of the
shard in it see it; its WAL position is tokened at commit) and stay under the shard's
ownership guard.  Real PostgreSQL: 2 shards with a streaming replica each, a catalog,
the guard installed."""

from __future__ import annotations

import pytest
from sqlalchemy import BigInteger, String, column, delete, insert, inspect, select, table, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column, sessionmaker

import shardkit
from movers import guarded_cluster
from shardkit._replicas import parse_token

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Pet(Base):
    __tablename__ = "fsr_pets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


GROUPS = {"groups": {"pets": {"tables": {"fsr_pets": "id"}}}}


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cluster = guarded_cluster(dev, Base.metadata, GROUPS, tmp_path_factory.mktemp("fsr") / "shardkit.toml")
    # read_your_writes (the default): reads go to the replicas unless the session wrote.
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    cluster.start_monitor()
    yield cluster, Session
    cluster.dispose()


def _keys(cluster, shard: str, start: int, n: int) -> list[int]:
    out = []
    k = start
    while len(out) < n:
        if cluster.shard_for(Pet, k) == shard:
            out.append(k)
        k += 1
    return out


def _on_primary(cluster, shard: str, sql: str) -> list:
    with cluster.primary(shard).connect() as c:
        return c.execute(text(sql)).all()


def _seed(cluster, Session, shard: str, start: int, n: int = 2) -> list[int]:
    keys = _keys(cluster, shard, start, n)
    with Session() as s:
        s.add_all(Pet(id=k, name="orig") for k in keys)
        s.commit()
    return keys


@pytest.mark.parametrize("how", ["scope", "option", "bind_arguments"])
def test_delete_cte_on_a_named_shard_runs_on_its_primary(world, how):
    cluster, Session = world
    s1 = cluster.shard_names[1]
    a, b = _seed(cluster, Session, s1, 1000 * (1 + ["scope", "option", "bind_arguments"].index(how)))
    d = delete(Pet).where(Pet.id == a).returning(Pet.id).cte("moved")
    stmt = select(d.c.id)
    with Session() as s:
        if how == "scope":
            with shardkit.scope(shard=s1):
                got = s.execute(stmt).scalars().all()
        elif how == "option":
            got = s.execute(stmt, execution_options={"shardkit_shard": s1}).scalars().all()
        else:
            got = s.execute(stmt, bind_arguments={"shard_id": s1}).scalars().all()
        s.commit()
    assert got == [a]
    assert _on_primary(cluster, s1, f"SELECT id FROM fsr_pets WHERE id IN ({a}, {b})") == [(b,)]


def test_insert_and_update_ctes_in_scope_run_on_the_primary(world):
    cluster, Session = world
    s0 = cluster.shard_names[0]
    (a,) = _seed(cluster, Session, s0, 5000, 1)
    (new,) = _keys(cluster, s0, 6000, 1)
    ins = insert(Pet).values(id=new, name="via cte").returning(Pet.id).cte("ins")
    up = update(Pet).where(Pet.id == a).values(name="renamed").returning(Pet.id, Pet.name).cte("up")
    with Session() as s, shardkit.scope(shard=s0):
        assert s.execute(select(ins.c.id)).scalar_one() == new
        assert s.execute(select(up.c.name)).scalar_one() == "renamed"
        s.commit()
    rows = _on_primary(cluster, s0, f"SELECT id, name FROM fsr_pets WHERE id IN ({a}, {new}) ORDER BY id")
    assert rows == sorted([(a, "renamed"), (new, "via cte")])


def test_a_named_shard_dml_cte_is_a_write_of_the_transaction(world):
    """Even run on the primary as the error message says (shardkit_role='primary'): the
    rest of the transaction's reads of the shard see it, and the commit tokens the shard
    (a later read_your_writes session must not read a replica that lacks it)."""
    cluster, Session = world
    s1 = cluster.shard_names[1]
    a, b = _seed(cluster, Session, s1, 8000)
    d = delete(Pet).where(Pet.id == a).returning(Pet.id).cte("gone")
    with Session() as s:
        with shardkit.scope(shard=s1):
            assert s.execute(select(d.c.id), execution_options={"shardkit_role": "primary"}
                             ).scalars().all() == [a]
            # Read in the same transaction, in another statement: not on the replica,
            # which cannot see the uncommitted delete.
            left = s.execute(select(Pet.id).where(Pet.id.in_([a, b]))).scalars().all()
        assert left == [b]
        s.commit()
        assert s1 in parse_token(s.consistency_token()), s.consistency_token()


def test_a_named_shard_dml_cte_is_still_guarded(world):
    """A row of another shard's bucket written through a CTE on the named shard: the
    ownership guard refuses it (on the primary), nothing is written."""
    cluster, Session = world
    s0, s1 = cluster.shard_names[:2]
    (foreign,) = _keys(cluster, s1, 9000, 1)
    ins = insert(Pet).values(id=foreign, name="misplaced").returning(Pet.id).cte("ins")
    with Session() as s, shardkit.scope(shard=s0):
        with pytest.raises(shardkit.NotOwned):
            s.execute(select(ins.c.id))
        s.rollback()
    assert _on_primary(cluster, s0, f"SELECT id FROM fsr_pets WHERE id = {foreign}") == []


def test_outside_a_named_shard_a_dml_cte_is_still_refused(world):
    cluster, Session = world
    d = delete(Pet).where(Pet.id == 1).returning(Pet.id).cte("d")
    with Session() as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="data-modifying WITH"):
            s.execute(select(d.c.id))


def test_orm_objects_from_a_dml_cte_on_a_named_shard(world):
    cluster, Session = world
    s0 = cluster.shard_names[0]
    a, b = _seed(cluster, Session, s0, 11000)
    up = update(Pet).where(Pet.id.in_([a, b])).values(name="bumped").returning(Pet.id, Pet.name).cte("up")
    with Session() as s, shardkit.scope(shard=s0):
        pets = s.execute(select(aliased(Pet, up)).order_by(up.c.id)).scalars().all()
        assert [(p.id, p.name) for p in pets] == [(a, "bumped"), (b, "bumped")]
        assert {inspect(p).identity_token for p in pets} == {s0}
        s.commit()


def test_tables_the_map_does_not_name_on_a_named_shard(world):
    """A named shard runs statements on tables the map does not name (system catalogs,
    a table of the application's own): a SELECT of one still reads, a WITH writing one
    runs on the primary."""
    cluster, Session = world
    s0 = cluster.shard_names[0]
    with cluster.primary(s0).begin() as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS fsr_scratch (id bigint PRIMARY KEY)"))
    scratch = table("fsr_scratch", column("id"))
    ins = insert(scratch).values(id=1).returning(scratch.c.id).cte("ins")
    with Session() as s, shardkit.scope(shard=s0):
        assert s.execute(select(column("relname")).select_from(table("pg_class"))
                         .where(column("relname") == "pg_class")).scalar_one() == "pg_class"
        assert s.execute(select(ins.c.id)).scalar_one() == 1
        s.commit()
    assert _on_primary(cluster, s0, "SELECT id FROM fsr_scratch") == [(1,)]


def test_a_with_that_writes_a_reference_table_inside_a_shard_scope_is_refused(sharded):
    """Inside scope(shard=...) a write of a reference table goes to every shard (README: a
    reference table's writes reach every shard, "also inside scope(shard=...)").  The
    refusal of a data-modifying WITH advises naming the shard with scope(shard=...), where
    it now runs as a write: for a WITH that updates a reference table, that changed the
    scope shard's copy alone and the copies diverged, silently.  It is refused instead,
    and the refusal outside a scope says to run such a write as its own statement."""
    from models import Country
    from sqlalchemy import update

    from shardkit.errors import CrossShardWriteError

    cluster = sharded.cluster
    with shardkit.ShardedSession(cluster) as s:
        s.add(Country(code="fr", name="France"))
        s.commit()
    u = update(Country).values(name="changed").returning(Country.code).cte("u")
    with shardkit.ShardedSession(cluster) as s:
        with pytest.raises(CrossShardWriteError, match="as its own statement and use its rows \\(the only way to write a reference table"):
            s.execute(select(u.c.code))
    with shardkit.ShardedSession(cluster) as s, shardkit.scope(shard=cluster.shard_names[0]):
        with pytest.raises(CrossShardWriteError, match="UPDATE of countries in 'u'.*reference table countries"):
            s.execute(select(u.c.code))
        s.commit()
    copies = {n: sharded.count(n, "SELECT name FROM countries") for n in cluster.shard_names}
    assert copies == {n: "France" for n in cluster.shard_names}
