"""Read-your-writes tokens and consistency modes at their edges: writes that are not an
ORM flush (text(), Core tables, bulk methods, upserts, session.connection(), reference
tables) each put their shards in the token; reads that are not select() sent to a named
shard; a statement's consistency against a scope's role; an empty token.

One 2-shard x 1-replica cluster serves the module; tests that delay replicas restore them.
"""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import BigInteger, Column, String, Table, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardkit
from shardkit._replicas import parse_token
from replica_env import lagging, on_primary, on_replica, replica_env

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "ryw_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Color(Base):
    __tablename__ = "ryw_colors"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


core_rows = Table("ryw_core", Base.metadata,
                  Column("id", BigInteger, primary_key=True, autoincrement=False),
                  Column("name", String(50)))


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    yield from replica_env(shardkit_module_cluster_factory, Base.metadata,
                           {"groups": {"ryw": {"tables": {"ryw_items": "id", "ryw_core": "id"}}},
                            "reference_tables": ["ryw_colors"]},
                           "ryw_items", "ryw_")


def seed(env, *pairs):
    with env.Session() as s:
        s.add_all(Item(id=k, name=v) for k, v in pairs)
        s.commit()
    env.caught_up()


def read(env, s, k):
    return env.nodes(lambda: s.execute(select(Item.name).where(Item.id == k)).scalar())


def shards_of(token):
    return set(parse_token(token))


@contextlib.contextmanager
def committed(env, write, want, lag=("s0", "s1"), **session_kw):
    """Commit what ``write(session)`` does while the replicas of ``lag`` replay 30 s
    behind: the session's token names exactly the shards ``want``; the block is given a
    new session holding that token, whose reads must see the writes."""
    with lagging(env, shards=lag):
        with env.Session(**session_kw) as s:
            write(s)
            s.commit()
            tok = s.consistency_token()
        assert shards_of(tok) == want, tok
        with env.Session(consistency_token=tok) as s2:
            yield s2


def test_text_update_named_shard(env):
    k = env.key("s0")
    seed(env, (k, "old"))
    with committed(env, lambda s: s.execute(text("UPDATE ryw_items SET name = 'txt' WHERE id = :k"), {"k": k},
                                            bind_arguments={"shard_id": "s0"}), {"s0"}, lag=("s0",)) as s2:
        assert read(env, s2, k)[0] == "txt"


def test_text_all_shards(env):
    k0, k1 = env.key("s0"), env.key("s1")
    seed(env, (k0, "old"), (k1, "old"))
    with committed(env, lambda s: s.execute(
            text("UPDATE ryw_items SET name = 'all' WHERE id IN (:a, :b)"), {"a": k0, "b": k1},
            execution_options={"shardkit_all_shards": True}), {"s0", "s1"}) as s2:
        assert read(env, s2, k0)[0] == read(env, s2, k1)[0] == "all"


def test_core_table_executemany(env):
    k0, k1 = env.key("s0"), env.key("s1")
    with committed(env, lambda s: s.execute(insert(core_rows), [{"id": k0, "name": "a"}, {"id": k1, "name": "b"}]),
                   {"s0", "s1"}) as s2:
        got = s2.execute(select(core_rows.c.name).where(core_rows.c.id.in_([k0, k1]))).scalars().all()
        assert sorted(got) == ["a", "b"]


def test_reference_core_update(env):
    with env.Session() as s:
        s.add(Color(id=1, name="red"))
        s.commit()
    env.caught_up()
    with committed(env, lambda s: s.execute(update(Color).where(Color.id == 1).values(name="blue")),
                   {"s0", "s1"}) as s2:
        for _ in range(4):  # (reference reads take turns between shards)
            assert s2.execute(select(Color.name).where(Color.id == 1)).scalar() == "blue"
            s2.rollback()


def test_reference_bulk_insert(env):
    with committed(env, lambda s: s.bulk_insert_mappings(Color, [{"id": 2, "name": "g"}]), {"s0", "s1"}) as s2:
        assert s2.execute(select(Color.name).where(Color.id == 2)).scalar() == "g"


def test_bulk_save_objects(env):
    k0, k1 = env.key("s0"), env.key("s1")
    with committed(env, lambda s: s.bulk_save_objects([Item(id=k0, name="b0"), Item(id=k1, name="b1")]),
                   {"s0", "s1"}) as s2:
        assert read(env, s2, k0)[0] == "b0"
        assert read(env, s2, k1)[0] == "b1"


def test_orm_bulk_insert(env):
    k0, k1 = env.key("s0"), env.key("s1")
    with committed(env, lambda s: s.execute(insert(Item), [{"id": k0, "name": "b0"}, {"id": k1, "name": "b1"}]),
                   {"s0", "s1"}) as s2:
        assert read(env, s2, k1)[0] == "b1"


def test_upsert(env):
    k0 = env.key("s0")
    seed(env, (k0, "old"))
    with committed(env, lambda s: s.execute(pg_insert(Item).values(id=k0, name="up").on_conflict_do_update(
            index_elements=[Item.id], set_={"name": "up"})), {"s0"}, lag=("s0",)) as s2:
        assert read(env, s2, k0)[0] == "up"


def test_query_update_delete(env):
    k0, k1 = env.key("s0"), env.key("s1")
    seed(env, (k0, "old"), (k1, "old"))

    def write(s):
        s.query(Item).filter(Item.id == k0).update({"name": "q"})
        s.execute(delete(Item).where(Item.id == k1))
    with committed(env, write, {"s0", "s1"}) as s2:
        assert read(env, s2, k0)[0] == "q" and read(env, s2, k1)[0] is None


def test_session_connection_scope(env):
    k = env.key("s1")
    seed(env, (k, "old"))

    def write(s):
        with shardkit.scope(shard="s1"):
            s.connection().execute(text("UPDATE ryw_items SET name = 'c' WHERE id = :k"), {"k": k})
    with committed(env, write, {"s1"}, lag=("s1",)) as s2:
        assert read(env, s2, k)[0] == "c"


def test_nested_release_commit(env):
    k = env.key("s0")
    seed(env, (k, "old"))

    def write(s):
        with s.begin_nested():
            s.get(Item, k).name = "nested"
    with committed(env, write, {"s0"}, lag=("s0",)) as s2:
        assert read(env, s2, k)[0] == "nested"


def test_require_token_mid_transaction(env):
    k = env.key("s0")
    seed(env, (k, "old"))
    with lagging(env, shards=("s0",)):
        with env.Session() as b:
            name, nodes = read(env, b, k)
            assert name == "old" and on_replica(nodes)
            with env.Session() as a:
                a.get(Item, k).name = "new"
                a.commit()
                tok = a.consistency_token()
            b.require_token(tok)
            assert read(env, b, k)[0] == "new"


def test_eventual_session_token(env):
    k = env.key("s0")
    seed(env, (k, "old"))

    def write(s):
        s.get(Item, k).name = "ev"
    with committed(env, write, {"s0"}, lag=("s0",), consistency="eventual") as s2:
        assert read(env, s2, k)[0] == "ev"


def test_a_statements_consistency_overrides_the_scopes_role(env):
    """Options are per statement overrides of a block's defaults: a statement that asks for
    shardkit_consistency="strong" inside scope(role="replica") (a reporting block calling
    code that must see the latest balance) reads the primary, and one that asks for
    "eventual" inside scope(role="primary") may read a replica; the scope's consistency
    gives way to the statement's as before, and a statement's own role still wins."""
    k = env.key("s0")
    seed(env, (k, "old"))
    stmt = select(Item.name).where(Item.id == k)

    def nodes(sess, st):
        return env.nodes(lambda: sess.execute(st).scalar())[1]

    with env.Session() as s, shardkit.scope(consistency="strong"):
        assert on_primary(nodes(s, stmt), "s0")
    with env.Session() as s, shardkit.scope(consistency="strong"):
        assert on_replica(nodes(s, stmt.execution_options(shardkit_consistency="eventual")), "s0")
    with env.Session() as s, shardkit.scope(role="replica"):
        assert on_replica(nodes(s, stmt), "s0")
    with env.Session() as s, shardkit.scope(role="replica"):
        got = nodes(s, stmt.execution_options(shardkit_consistency="strong"))
        assert on_primary(got, "s0"), f"strong statement inside scope(role='replica') read {got}"
    with env.Session() as s, shardkit.scope(role="primary"):
        assert on_replica(nodes(s, stmt.execution_options(shardkit_consistency="eventual")), "s0")
    with env.Session() as s, shardkit.scope(role="replica", consistency="strong"):
        assert on_primary(nodes(s, stmt.execution_options(shardkit_role="primary")), "s0")


# -- reads sent to a named shard that are not select() ------------------------------------


def test_from_statement_read_on_a_named_shard_is_a_read_not_a_write(env):
    """select(Model).from_statement(select(...)) with the shard named reads like the
    select() it wraps: from a replica, the shard not pinned to its primary, and no position
    in the session's token after the commit (the same statement routed by its key already
    reads a replica)."""
    k = env.key("s0")
    seed(env, (k, "old"))
    stmt = select(Item).from_statement(select(Item).where(Item.id == k))
    with env.Session() as s:
        rows, nodes = env.nodes(lambda: s.scalars(stmt).all())
        assert [r.name for r in rows] == ["old"] and on_replica(nodes, "s0"), nodes
    with env.Session() as s:
        rows, nodes = env.nodes(lambda: s.scalars(stmt, bind_arguments={"shard_id": "s0"}).all())
        assert [r.name for r in rows] == ["old"] and on_replica(nodes, "s0"), nodes
        again = env.nodes(lambda: s.execute(select(Item.name).where(Item.id == k)).scalar())[1]
        assert on_replica(again, "s0"), again
        s.commit()
        assert s.consistency_token() == "v1:"


def test_textual_select_forced_to_a_replica_reads_the_replica(env):
    """A text() SELECT sent to a named shard runs on its primary (shardkit cannot tell a
    read from a write in SQL text), but one the caller forces to a replica with
    shardkit_role="replica" reads the replica, as every other read so forced does: it
    neither loads the primary nor counts as a write (shard pinned, token advanced)."""
    k = env.key("s1")
    seed(env, (k, "old"))
    q = text("SELECT name FROM ryw_items WHERE id = :k")
    with env.Session() as s:
        assert env.nodes(lambda: s.execute(q, {"k": k}, bind_arguments={"shard_id": "s1"}).scalar()) \
            == ("old", ["s1/primary"])
        s.rollback()
    for stmt in (q, q.columns(name=String)):
        with env.Session() as s:
            name, nodes = env.nodes(lambda: s.execute(stmt, {"k": k}, execution_options={
                "shardkit_shard": "s1", "shardkit_role": "replica"}).scalar())
            assert name == "old" and on_replica(nodes, "s1"), nodes
            again = env.nodes(lambda: s.execute(select(Item.name).where(Item.id == k)).scalar())[1]
            assert on_replica(again, "s1"), again
            s.commit()
            assert s.consistency_token() == "v1:"
    with env.Session() as s, pytest.raises(Exception, match="read-only"):
        s.execute(text("UPDATE ryw_items SET name = 'x' WHERE id = :k"), {"k": k},
                  execution_options={"shardkit_shard": "s1", "shardkit_role": "replica"})


def test_text_on_every_shard_forced_to_replicas_is_refused_not_run_on_the_primaries(env):
    """Text run on every shard runs on their primaries as a write: shardkit_role="replica"
    given to it was ignored (the read loaded every primary and went into the token). It is
    refused, saying what to do, and nothing runs."""
    with env.Session() as s:
        with pytest.raises(shardkit.errors.RoutingError, match="select\\(\\)") as e:
            env.nodes(lambda: s.execute(text("SELECT count(*) FROM ryw_items"), execution_options={
                "shardkit_all_shards": True, "shardkit_role": "replica"}))
        assert "shardkit_shard" in str(e.value)
        assert s.consistency_token() == "v1:"


# -- tokens from outside -------------------------------------------------------------------


def test_an_empty_token_means_the_same_to_require_token_as_to_the_constructor(env):
    """The README offers Session(consistency_token=token) and session.require_token(token)
    as the two ways in.  An empty string (a cookie not set yet) is "no token" to the
    constructor, so it is to require_token too; an empty bytes value or 0 is not a str
    and is refused by both, as every non-str token is."""
    k = env.key("s0")
    seed(env, (k, "old"))
    with env.Session(consistency_token="") as s:
        assert s.consistency_token() == "v1:"
    with env.Session() as s:
        s.require_token("")
        assert s.consistency_token() == "v1:"
        assert on_replica(read(env, s, k)[1], "s0")
    for bad in (b"", 0, b"v1:s0=0/1"):
        with pytest.raises(shardkit.ShardkitError, match="token"):
            env.Session(consistency_token=bad)
        with env.Session() as s, pytest.raises(shardkit.ShardkitError, match="token"):
            s.require_token(bad)
