"""SQLAlchemy 2.1's session-wide execution options (``Session(execution_options={...})``,
also through a sessionmaker) route like the same options given per statement or per
call, on execute() and on the paths beside it (get, loads, legacy Query, scatter
reads, key-less writes, scopes, eager loads, merge()); a statement's or call's own
option still wins.  A session-wide ``isolation_level`` reaches the primaries, not the
replicas (which read in autocommit).  On the shared local cluster, its own tables."""

from __future__ import annotations

import time

import pytest
from own_tables import cluster_with_tables, nodes_used
from waiting import wait_replicas_usable
from sqlalchemy import BigInteger, ForeignKey, String, event, select, text, update
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, mapped_column, relationship,
                            selectinload, sessionmaker)

import shardkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif("execution_options" not in Session.__init__.__code__.co_varnames,
                       reason="session-wide execution options are new in SQLAlchemy 2.1"),
]


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "swo_owners"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))
    pets: Mapped[list[Pet]] = relationship(back_populates="owner", order_by="Pet.id")


class Pet(Base):
    __tablename__ = "swo_pets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(Owner.id))
    owner: Mapped[Owner] = relationship(back_populates="pets")


CONFIG = {"groups": {"owners": {"tables": {Owner.__tablename__: "id", Pet.__tablename__: "owner_id"}}},
          "replicas": {"consistency": "eventual", "max_lag_seconds": 60, "max_lag_bytes": 1 << 40,
                       "when_no_replica": "raise"}}
KEYS = range(1, 21)


@pytest.fixture(scope="module")
def cluster(shardkit_dev_cluster):
    with cluster_with_tables(shardkit_dev_cluster, CONFIG, Base.metadata) as c:
        with sessionmaker(class_=shardkit.ShardedSession, cluster=c)() as s:
            s.add_all([Owner(id=k, v=f"v{k}", pets=[Pet(id=k * 100 + j) for j in range(2)])
                       for k in KEYS])
            s.commit()
        # (when_no_replica = "raise": a replica the first poll misjudged fails the read.)
        wait_replicas_usable(c)
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=c,
                               execution_options={"shardkit_role": "replica"})
        deadline = time.monotonic() + 30
        with Session() as s:
            while len(s.execute(select(Pet)).all()) < 2 * len(KEYS):
                assert time.monotonic() < deadline, "rows did not reach the replicas"
                time.sleep(0.05)
        yield c


def _other_shard(cluster, key):
    own = cluster.shard_for(Owner, key)
    return own, next(s for s in cluster.shard_names if s != own)


def _maker(cluster, **eo):
    return sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, execution_options=eo)


def test_get_reads_the_shard_the_session_names(cluster):
    own, other = _other_shard(cluster, 3)
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        per_call = s.get(Owner, 3, execution_options={"shardkit_shard": other})
    with _maker(cluster, shardkit_shard=other)() as s:
        assert s.execute(select(Owner).where(Owner.id == 3)).scalar() is None
        session_wide = s.get(Owner, 3)
    assert per_call is None
    assert session_wide is None


def test_a_statements_own_shard_naming_wins_over_the_sessions(cluster):
    own, other = _other_shard(cluster, 3)
    with _maker(cluster, shardkit_shard=other)() as s:
        o = s.query(Owner).set_shard(own).filter(Owner.id == 3).one()
        assert o.v == "v3"
    with _maker(cluster, shardkit_shard=other)() as s:
        stmt = select(Owner).where(Owner.id == 3).execution_options(identity_token=own)
        assert s.execute(stmt).scalar_one().v == "v3"


def test_a_calls_own_shard_naming_wins_over_the_sessions(cluster):
    own, other = _other_shard(cluster, 3)
    with _maker(cluster, shardkit_shard=other)() as s:
        stmt = select(Owner).where(Owner.id == 3)
        assert s.execute(stmt, execution_options={"identity_token": own}).scalar_one().v == "v3"
        assert s.get(Owner, 3, execution_options={"identity_token": own}).v == "v3"


def test_session_wide_streaming_scatter_reads_ordered_text(cluster):
    with _maker(cluster, yield_per=3, shardkit_role="replica")() as s:
        got = s.scalars(select(Owner.v).order_by(Owner.v)).all()
    assert got == sorted(f"v{k}" for k in KEYS)


def test_session_wide_scatter_timeout_and_partial_results(cluster):
    with _maker(cluster, shardkit_timeout=30, shardkit_partial_results=True)() as s:
        assert len(s.scalars(select(Pet).order_by(Pet.id)).all()) == 2 * len(KEYS)


def test_session_wide_primary_role_for_loads(cluster):
    with nodes_used(cluster) as used, _maker(cluster, shardkit_role="primary")() as s:
        o = s.get(Owner, 5)
        assert [p.id for p in o.pets] == [500, 501]          # lazy load
        s.refresh(o)
        s.expire(o, ["v"])
        assert o.v == "v5"
        os_ = s.scalars(select(Owner).where(Owner.id.in_([6, 7])).options(selectinload(Owner.pets))).all()
        assert sorted(len(x.pets) for x in os_) == [2, 2]
        assert s.scalar(select(Owner.v).where(Owner.id == 8)) == "v8"
        assert s.query(Owner).filter(Owner.id == 9).one().v == "v9"
        assert s.query(Owner).get(10).v == "v10"
        assert len(s.query(Owner).all()) == len(KEYS)
    assert used and all(n.endswith("/primary") for n in used), used


def test_session_wide_all_shards_allows_keyless_update(cluster):
    with _maker(cluster, shardkit_all_shards=True)() as s:
        s.execute(update(Owner).values(v=Owner.v))
        s.commit()


def test_scope_role_against_session_wide_role_as_per_statement(cluster):
    # Per statement: the statement's role wins over scope(role=...); the session's the same.
    with nodes_used(cluster) as per_stmt, sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        with shardkit.scope(role="primary"):
            s.execute(select(Owner).where(Owner.id == 3).execution_options(shardkit_role="replica")).all()
    with nodes_used(cluster) as session_wide, _maker(cluster, shardkit_role="replica")() as s:
        with shardkit.scope(role="primary"):
            s.execute(select(Owner).where(Owner.id == 3)).all()
    assert [n.split("/")[1] == "primary" for n in per_stmt] == [n.split("/")[1] == "primary" for n in session_wide]


def test_a_statements_own_role_wins_over_the_sessions(cluster):
    with nodes_used(cluster) as used, _maker(cluster, shardkit_role="primary")() as s:
        stmt = select(Owner.v).where(Owner.id == 3).execution_options(shardkit_role="replica")
        assert s.execute(stmt).scalar_one() == "v3"
    assert used and not any(n.endswith("/primary") for n in used), used


def test_a_session_wide_yield_per_streams_replica_reads(cluster):
    # (Before it routed, a replica read with it ran a server-side cursor in autocommit:
    # DECLARE CURSOR can only be used in transaction blocks.)
    with _maker(cluster, yield_per=5)() as s:
        assert sorted(o.id for o in s.execute(select(Owner)).scalars()) == list(KEYS)
        assert s.execute(select(Owner.v).where(Owner.id == 7)).scalar_one() == "v7"


# -- eager loads follow the statement's own options, not the session's under them -------

@pytest.mark.parametrize("naming", ["statement", "call", "set_shard_id", "Query.set_shard"])
def test_selectinload_follows_the_shard_its_statement_names_over_the_sessions(cluster, naming):
    own, other = _other_shard(cluster, 3)
    with _maker(cluster, shardkit_shard=other)() as s:
        stmt = select(Owner).where(Owner.id == 3).options(selectinload(Owner.pets))
        if naming == "statement":
            o = s.scalars(stmt.execution_options(shardkit_shard=own)).one()
        elif naming == "call":
            o = s.scalars(stmt, execution_options={"shardkit_shard": own}).one()
        elif naming == "set_shard_id":
            o = s.scalars(stmt.options(set_shard_id(own))).one()
        else:
            o = s.query(Owner).set_shard(own).filter(Owner.id == 3).options(selectinload(Owner.pets)).one()
        # (Before: the pets were read on the session's shard, which has none of them: [].)
        assert [p.id for p in o.pets] == [300, 301]


def test_selectinload_follows_its_statements_role_over_the_sessions(cluster):
    # Per statement (no session option), a role="primary" statement's selectinload reads
    # the primaries; the session's role="replica" must not take that back for the load.
    def on_pets(sql):
        return Pet.__tablename__ in sql.split("FROM", 1)[-1].split("WHERE")[0]

    stmt = select(Owner).where(Owner.id.in_([4, 5])).options(selectinload(Owner.pets)) \
        .execution_options(shardkit_role="primary")
    with nodes_used(cluster, on_pets) as per_statement, \
            sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s:
        assert len(s.scalars(stmt).all()) == 2
    with nodes_used(cluster, on_pets) as session_wide, _maker(cluster, shardkit_role="replica")() as s:
        assert len(s.scalars(stmt).all()) == 2
    assert per_statement and all(n.endswith("/primary") for n in per_statement), per_statement
    assert session_wide and all(n.endswith("/primary") for n in session_wide), session_wide


# -- merge() compares with the row where its flush writes ---------------------------------

@pytest.mark.parametrize("naming", ["session", "scope"])
def test_merge_under_a_named_shard_compares_with_the_row_it_writes(cluster, naming):
    own, other = _other_shard(cluster, 3)
    maker = _maker(cluster, shardkit_shard=other) if naming == "session" else _maker(cluster)
    with maker() as s, shardkit.scope(shard=other if naming == "scope" else None):
        merged = s.merge(Owner(id=3, v="m3"))
        # (Before: the row was looked for on the session's shard, not found, and the flush
        # INSERTed a second row 3 on its own shard: UniqueViolation.)
        s.flush()
        assert s.execute(select(Owner.v).where(Owner.id == 3).execution_options(
            shardkit_shard=own, shardkit_role="primary")).scalar_one() == "m3"
        assert merged.v == "m3"
        s.rollback()


# -- a session-wide isolation_level: primaries get it, replicas read in autocommit ---------

@pytest.fixture
def replica_autocommit(cluster):
    """Per replica statement run inside the test: whether its connection was in autocommit."""
    seen: list[bool] = []

    def note(conn, *_a):
        seen.append(conn.connection.dbapi_connection.autocommit)
    engines = [cluster.engine(s, "replica", i) for s in cluster.shard_names
               for i in range(cluster.replica_count(s))]
    for eng in engines:
        event.listen(eng, "before_cursor_execute", note)
    yield seen
    for eng in engines:
        event.remove(eng, "before_cursor_execute", note)


@pytest.mark.parametrize("level", ["SERIALIZABLE", "REPEATABLE READ"])
def test_session_wide_isolation_level_reaches_primaries_and_replicas_read_in_autocommit(
        cluster, replica_autocommit, level):
    own, _ = _other_shard(cluster, 3)
    with _maker(cluster, isolation_level=level)() as s:
        # (Before: SERIALIZABLE failed every replica read, "cannot use serializable mode
        # in a hot standby"; another level made replica reads hold a transaction.)
        assert s.execute(select(Owner.v).where(Owner.id == 3)).scalar_one() == "v3"
        assert sorted(s.scalars(select(Owner.id)).all()) == list(KEYS)        # scatter read
        assert s.get(Owner, 4).pets                                             # get + lazy load
        assert s.execute(text("SHOW transaction_isolation"),
                         execution_options={"shardkit_shard": own}).scalar() == level.lower()
    assert replica_autocommit and all(replica_autocommit), replica_autocommit


def test_session_wide_isolation_level_with_a_streamed_replica_read(cluster):
    with _maker(cluster, isolation_level="SERIALIZABLE", yield_per=5)() as s:
        assert sorted(o.id for o in s.scalars(select(Owner))) == list(KEYS)


def test_an_isolation_level_given_to_a_replica_connection_is_said_once_per_node(
        shardkit_dev_cluster, caplog):
    # Not silently: the first connection of each replica given one says it is not applied.
    c = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(), **CONFIG})
    try:
        shard = c.shard_names[0]
        eng = c.engine(shard, "replica", 0)
        with caplog.at_level("WARNING", logger="shardkit.cluster"):
            for _ in range(3):
                with eng.connect() as conn:
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                    assert conn.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
                    assert conn.connection.dbapi_connection.autocommit
        said = [r for r in caplog.records if "isolation_level" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]
        msg = said[0].getMessage()
        assert "REPEATABLE READ" in msg and f"{shard}/r0" in msg and "shardkit_role='primary'" in msg
    finally:
        c.dispose()


def test_no_node_engine_dispatches_connection_events(cluster, shardkit_dev_cluster):
    # What shardkit hooks into a node's engine goes through its dialect and pool: a
    # connection-event listener would make every statement on it dispatch all the
    # connection events (about 5% of a replica read).  (A cluster of its own: a test's
    # listener leaves an engine dispatching them even once removed; the module's has the rows.)
    c = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(), **CONFIG})
    try:
        with _maker(c, isolation_level="REPEATABLE READ")() as s:
            s.execute(select(Owner.v).where(Owner.id == 3)).all()
            s.execute(select(Owner.v).where(Owner.id == 3).execution_options(shardkit_role="primary")).all()
        engines = [c.engine(s, "primary") for s in c.shard_names]
        engines += [c.engine(s, "replica", i) for s in c.shard_names for i in range(c.replica_count(s))]
        # (On the engine itself: a listener another test put on the Engine class leaves the
        # class's flag set, for every engine, once removed.)
        assert engines and not [e.url.port for e in engines if e.__dict__.get("_has_events")]
    finally:
        c.dispose()


def test_a_session_in_autocommit_is_not_told_its_replica_reads_ignore_it(cluster, shardkit_dev_cluster, caplog):
    """A session-wide isolation_level reaches every connection of the session (SQLAlchemy
    2.1); on a replica it is dropped, said once per node at WARNING.  AUTOCOMMIT, a common
    level for a read-only session, is what replica reads run in: the warning ("isolation_level
    AUTOCOMMIT is not applied on replica ...: replica reads run in autocommit") was wrong,
    and it used up the node's one warning for a level that is not applied there."""
    import logging

    c = shardkit.Cluster.from_config({**shardkit_dev_cluster.config_dict(), **CONFIG})  # engines of its own
    shard = c.shard_for(Owner, 3)
    on_replica: list[str] = []
    event.listen(c.engine(shard, "replica", 0), "before_cursor_execute",
                 lambda *a: on_replica.append(a[2]))
    read = select(Owner.v).where(Owner.id == 3).execution_options(shardkit_role="replica")
    try:
        with caplog.at_level(logging.WARNING, logger="shardkit.cluster"):
            with shardkit.ShardedSession(c, execution_options={"isolation_level": "AUTOCOMMIT"}) as s:
                assert s.execute(read).scalar_one() == "v3"
            assert on_replica
            assert [r.getMessage() for r in caplog.records if "isolation_level" in r.getMessage()] == []
            with shardkit.ShardedSession(c, execution_options={"isolation_level": "SERIALIZABLE"}) as s:
                assert s.execute(read).scalar_one() == "v3"
            said = [r.getMessage() for r in caplog.records if "isolation_level" in r.getMessage()]
            assert len(said) == 1 and said[0].startswith(f"isolation_level SERIALIZABLE is not applied on replica {shard}/r0")
    finally:
        c.dispose()
