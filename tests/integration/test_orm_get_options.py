"""ShardedSession's ORM API against a plain Session: get() and its
options (populate_existing, with_for_update, loader options, identity_token, the
identity map, autoflush), refresh(), and ORM INSERT .. ON CONFLICT / UPDATE / DELETE
with synchronize_session, on a cluster with replicas and on the same shards without."""

from __future__ import annotations

import pytest
from own_tables import cluster_with_tables, nodes_used, one_database, statements_counted, statements_per_shard
from waiting import wait_for
from sqlalchemy import BigInteger, ForeignKey, Integer, MetaData, String, delete, inspect, select, text, update
from sqlalchemy import insert as sa_insert
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, defer, load_only, mapped_column,
                            relationship, selectinload, sessionmaker)
from sqlalchemy.orm import exc as orm_exc

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    metadata = MetaData()


class Acct(Base):
    __tablename__ = "od7_accts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40), default="")
    body: Mapped[str] = mapped_column(String(40), default="")
    n: Mapped[int] = mapped_column(Integer, default=0)
    lines: Mapped[list[Line]] = relationship(back_populates="acct", order_by="Line.id")


class Line(Base):
    __tablename__ = "od7_lines"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(ForeignKey("od7_accts.id"), primary_key=True)
    note: Mapped[str] = mapped_column(String(40), default="")
    acct: Mapped[Acct] = relationship(back_populates="lines")


class Memo(Base):
    """Its primary key is not the shard key: each shard has its own memo 1, 2, ..."""
    __tablename__ = "od7_memos"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(BigInteger)
    txt: Mapped[str] = mapped_column(String(40), default="")


CONFIG = {"groups": {"accts": {"strategy": "hash",
                               "tables": {"od7_accts": "id", "od7_lines": "acct_id",
                                          "od7_memos": "acct_id"}}}}
TABLES = "od7_memos, od7_lines, od7_accts"


class Env:
    def __init__(self, rep, norep, oracle):
        self.clusters = {"replicas": rep, "no_replicas": norep}
        self.oracle = oracle
        self.names = list(rep.shard_names)

    def keys_on(self, cluster, shard, n, start=1):
        out, k = [], start
        while len(out) < n:
            if cluster.shard_for(Acct, k) == shard:
                out.append(k)
            k += 1
        return out


@pytest.fixture(scope="module")
def env_(sharded_dev):
    with cluster_with_tables(sharded_dev, CONFIG, Base.metadata) as rep:
        cfg = {**sharded_dev.config_dict(), **CONFIG}
        cfg["shards"] = [{**s, "replicas": []} for s in cfg["shards"]]
        norep = shardkit.Cluster.from_config(cfg, metadata=Base.metadata)
        oracle = one_database(sharded_dev, "od7_oracle", Base.metadata)
        try:
            yield Env(rep, norep, oracle)
        finally:
            norep.dispose()
            oracle.dispose()


@pytest.fixture(params=["replicas", "no_replicas"])
def env(env_, request):
    cluster = env_.clusters[request.param]
    for s in env_.names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {TABLES}"))
    with env_.oracle.begin() as c:
        c.execute(text(f"TRUNCATE {TABLES}"))
    env_.cluster = cluster
    # Two accounts on each shard, each with two lines.
    env_.keys = {s: env_.keys_on(cluster, s, 2) for s in env_.names}
    with sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)() as s, s.begin():
        for ks in env_.keys.values():
            for k in ks:
                s.add(Acct(id=k, name=f"a{k}", body=f"b{k}", n=k,
                           lines=[Line(id=1, note="x"), Line(id=2, note="y")]))
        s.flush()
    env_.token = s.consistency_token()
    with Session(env_.oracle) as o, o.begin():
        for ks in env_.keys.values():
            for k in ks:
                o.add(Acct(id=k, name=f"a{k}", body=f"b{k}", n=k,
                           lines=[Line(id=1, note="x"), Line(id=2, note="y")]))
    return env_


def S(env, **kw):
    """A session of the cluster under test that sees the seeded rows (on a replica too)."""
    kw.setdefault("consistency", "read_your_writes")
    return shardkit.ShardedSession(env.cluster, consistency_token=env.token, **kw)


def O(env, **kw):
    return Session(env.oracle, **kw)


def primary_sql(env, shard, sql, **params):
    with env.cluster.primary(shard).connect() as c:
        return c.execute(text(sql), params).all()


def locked_elsewhere(env, shard, key, mode="FOR UPDATE"):
    """Whether another connection to ``shard``'s primary finds the account row locked."""
    with env.cluster.primary(shard).connect() as c:
        try:
            c.execute(text(f"SELECT 1 FROM od7_accts WHERE id = :k {mode} NOWAIT"), {"k": key})
        except sa_exc.OperationalError as e:
            assert getattr(e.orig, "sqlstate", None) == "55P03", e
            return True
        finally:
            c.rollback()
    return False


def same_as_one_database(env, run, **kw):
    """``run(session)`` gives the same on the cluster (a ShardedSession made with ``kw``) as
    on one plain database holding every row."""
    with S(env, **kw) as s:
        got = run(s)
    with O(env) as o:
        want = run(o)
    assert got == want


# -- get() ------------------------------------------------------------------------------


def test_get_populate_existing_sees_a_change_made_elsewhere(env):
    shard = env.names[1]
    k = env.keys[shard][0]
    for sess, bind in ((S(env, consistency="strong"), env.cluster.primary(shard)), (O(env), env.oracle)):
        with sess:
            a = sess.get(Acct, k)
            assert a.name == f"a{k}"
            with bind.begin() as c:
                c.execute(text("UPDATE od7_accts SET name = 'changed' WHERE id = :k"), {"k": k})
            assert sess.get(Acct, k).name == f"a{k}"
            assert sess.get(Acct, k, populate_existing=True) is a
            assert a.name == "changed"
            a.name = "mine"  # (modified: the ORM flushes it before loading again)
            assert sess.get(Acct, k, populate_existing=True).name == "mine"


@pytest.mark.parametrize("wfu,mode", [(True, "FOR UPDATE"), ({"nowait": True}, "FOR UPDATE"),
                                      ({"read": True}, "FOR UPDATE"), ({"key_share": True}, "FOR UPDATE")])
def test_get_with_for_update_locks_the_row_on_its_primary(env, wfu, mode):
    for shard in env.names:
        k = env.keys[shard][0]
        with S(env) as s:
            with statements_per_shard(env.cluster) as hits:
                a = s.get(Acct, k, with_for_update=wfu)
            assert a is not None and a.id == k
            assert dict(hits) == {shard: 1}, hits
            assert locked_elsewhere(env, shard, k, mode)
            # The object already held: with_for_update loads (and locks) it again.
            other = env.keys[shard][1]
            s.get(Acct, other)
            assert s.get(Acct, other, with_for_update=wfu) is not None
            assert locked_elsewhere(env, shard, other, mode)
        assert not locked_elsewhere(env, shard, k, mode)


@pytest.mark.parametrize("opts", [
    lambda: [selectinload(Acct.lines)],
    lambda: [load_only(Acct.name)],
    lambda: [defer(Acct.body)],
    lambda: [selectinload(Acct.lines), defer(Acct.body)],
])
def test_get_with_loader_options_matches_one_database(env, opts):
    def run(sess):
        out = []
        for ks in env.keys.values():
            for k in ks:
                a = sess.get(Acct, k, options=opts())
                st = a.__dict__
                out.append((a.id, "name" in st, "body" in st, "lines" in st,
                            [(ln.id, ln.acct_id, ln.note) for ln in a.lines], a.body))
        return out
    with S(env) as s:
        got = run(s)
        for obj in s.identity_map.values():
            shard = s.cluster.shard_for(Acct, obj.id if isinstance(obj, Acct) else obj.acct_id)
            assert inspect(obj).key[2] == shard
    with O(env) as o:
        want = run(o)
    assert got == want


def test_get_forced_to_replica_reads_a_replica(env):
    shard = env.names[0]
    k = env.keys[shard][0]
    with S(env, consistency="eventual") as s:
        if env.cluster.replica_count(shard):

            def found():
                s.expunge_all()
                return s.get(Acct, k, execution_options={"shardkit_role": "replica"}) is not None
            wait_for(found, 10, "the replica to replay the seed")
            s.expunge_all()
        with statements_per_shard(env.cluster) as hits:
            a = s.get(Acct, k, execution_options={"shardkit_role": "replica"})
        assert a is not None
        # (A shard without replicas reads its primary.)
        assert dict(hits) == ({} if env.cluster.replica_count(shard) else {shard: 1})


def test_get_with_an_explicit_identity_token(env):
    shard = env.names[2]
    k = env.keys[shard][0]
    with S(env) as s:
        a = s.get(Acct, k, identity_token=shard)
        assert a is not None and a.name == f"a{k}"
        assert inspect(a).key == (Acct, (k,), shard)
        assert s.get(Acct, k) is a
        assert s.get(Acct, k, identity_token=shard) is a
        # Another shard does not hold the row.
        wrong = env.names[0]
        assert s.get(Acct, k, identity_token=wrong) is None


def test_get_one_of_a_missing_key(env):
    with S(env) as s, O(env) as o:
        for sess in (s, o):
            with pytest.raises(orm_exc.NoResultFound):
                sess.get_one(Acct, 99999)
            assert sess.get(Acct, 99999) is None


def test_get_of_an_expired_object_reloads_it(env):
    shard = env.names[1]
    k = env.keys[shard][0]
    for sess in (S(env), O(env)):
        with sess:
            a = sess.get(Acct, k)
            sess.expire(a)
            assert sess.get(Acct, k) is a
            assert a.name == f"a{k}"
            sess.expire(a, ["name"])
            assert sess.get(Acct, k) is a
            assert a.name == f"a{k}"


def _autoflush_scenarios(sess, k, other):
    out = []
    # A pending object of the same key: get() finds it in the identity map? (No: a pending
    # object has no identity; the ORM autoflushes it first, then finds it.)
    p = Acct(id=k, name="pending")
    sess.add(p)
    try:
        got = sess.get(Acct, k)
        out.append(("pending same key", got is p))
    except Exception as e:  # noqa: BLE001
        out.append(("pending same key", type(e).__name__))
    sess.rollback()
    # A pending object of another key, and get() of a key not in the map: the flush happens.
    q = Acct(id=other, name="other")
    sess.add(q)
    got = sess.get(Acct, k)
    out.append(("pending other key flushed", q in sess.new, got.name))
    sess.rollback()
    # Inside no_autoflush: no flush.
    q = Acct(id=other, name="other")
    sess.add(q)
    with sess.no_autoflush:
        got = sess.get(Acct, k)
        out.append(("no_autoflush", q in sess.new, got.name))
    sess.rollback()
    # A modified object, and get() of another key.
    a = sess.get(Acct, k)
    a.name = "dirty"
    sess.get(Acct, k + 100000)
    out.append(("dirty flushed", a in sess.dirty))
    sess.rollback()
    return out


def test_get_autoflush_matches_one_database(env):
    shard = env.names[0]
    k = env.keys[shard][0]
    other = 50001
    with S(env) as s:
        got = _autoflush_scenarios(s, k, other)
    with O(env) as o:
        want = _autoflush_scenarios(o, k, other)
    assert got == want


def test_refresh_with_for_update_and_attribute_names(env):

    def prepare(sess, bind, k):
        a = sess.get(Acct, k)
        a.name = "dirty"
        with bind.begin() as c:
            c.execute(text("UPDATE od7_accts SET n = 77 WHERE id = :k"), {"k": k})
        return a

    def run(sess, a):
        sess.refresh(a, attribute_names=["n"], with_for_update=True)
        return a.n, a.name, a in sess.dirty
    for shard in env.names:
        k = env.keys[shard][0]
        with S(env) as s:
            a = prepare(s, env.cluster.primary(shard), k)
            with statements_counted(env.cluster, key=lambda sql: sql.split()[0] + (" FOR UPDATE" if "FOR UPDATE" in sql else "")) as hits:
                got = run(s, a)
            # (The ORM flushes the modified object first, as on one database.)
            assert dict(hits) == {(shard, "UPDATE"): 1, (shard, "SELECT FOR UPDATE"): 1}, hits
            assert locked_elsewhere(env, shard, k)
        with O(env) as o:
            assert got == run(o, prepare(o, env.oracle, k))


# -- ORM DML ----------------------------------------------------------------------------

def _upsert(sess, k, name):
    stmt = (pg_insert(Acct).values(id=k, name=name, body="u", n=1)
            .on_conflict_do_update(index_elements=[Acct.id], set_={"name": name})
            .returning(Acct))
    return sess.scalars(stmt).all()


def test_orm_upsert_returning_goes_to_the_keys_shard(env):
    for shard in env.names:
        k_old = env.keys[shard][0]
        k_new = env.keys_on(env.cluster, shard, 1, start=1000)[0]
        with S(env) as s:
            held = s.get(Acct, k_old)
            with statements_per_shard(env.cluster) as hits:
                rows = _upsert(s, k_old, "up")
            assert dict(hits) == {shard: 1}
            assert rows == [held]  # (not populated again, as on one database: see below)
            assert inspect(held).key[2] == shard
            new = _upsert(s, k_new, "new")[0]
            assert inspect(new).key == (Acct, (k_new,), shard)
            assert s.get(Acct, k_new) is new
            s.commit()
        assert primary_sql(env, shard, "SELECT name FROM od7_accts WHERE id = :k", k=k_new) == [("new",)]


def test_orm_upsert_returning_matches_one_database_for_a_held_object(env):
    shard = env.names[1]
    k = env.keys[shard][0]

    def run(sess):
        held = sess.get(Acct, k)
        rows = _upsert(sess, k, "up")
        return rows[0] is held, held.name
    same_as_one_database(env, run)


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_orm_update_by_key_synchronizes_held_objects(env, sync):
    shard = env.names[2]
    k = env.keys[shard][0]

    def run(sess):
        a = sess.get(Acct, k)
        b = sess.get(Acct, env.keys[env.names[0]][0])
        r = sess.execute(update(Acct).where(Acct.id == k).values(name="upd", n=Acct.n + 10),
                         execution_options={"synchronize_session": sync})
        out = (r.rowcount, a.__dict__.get("name"), "n" in a.__dict__, b.name)
        sess.commit()
        return out, a.name, a.n
    with S(env) as s:
        with statements_per_shard(env.cluster) as hits:
            got = run(s)
        assert hits[shard] >= 1 and hits[env.names[1]] == 0
    with O(env) as o:
        want = run(o)
    assert got == want


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_orm_delete_across_shards_synchronizes_held_objects(env, sync):
    ks = [env.keys[s][0] for s in env.names]

    def run(sess):
        held = [sess.get(Acct, k) for k in ks]
        sess.execute(delete(Line).where(Line.acct_id.in_(ks)), execution_options={"synchronize_session": sync})
        r = sess.execute(delete(Acct).where(Acct.id.in_(ks)), execution_options={"synchronize_session": sync})
        out = (r.rowcount, [a in sess for a in held], [sess.get(Acct, k) is None for k in ks] if sync else None)
        sess.commit()
        return out
    same_as_one_database(env, run)
    for shard in env.names:
        assert primary_sql(env, shard, "SELECT count(*) FROM od7_accts")[0][0] == 1


# -- probes ---------------------------------------------------------------------------

def _memos(env, s):
    """Memo 1 and 2 on every shard (one per account), loaded into ``s``."""
    for shard in env.names:
        for i, k in enumerate(env.keys[shard], 1):
            s.add(Memo(id=i, acct_id=k, txt=f"{shard}-{i}"))
    s.commit()
    return {(m.acct_id, m.id): m for m in s.scalars(select(Memo).execution_options(shardkit_all_shards=True)).all()}


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_update_of_one_shards_memo_leaves_other_shards_same_id(env, sync):
    with S(env, consistency="strong") as s:
        held = _memos(env, s)
        k = env.keys[env.names[0]][0]
        s.execute(update(Memo).where(Memo.acct_id == k, Memo.id == 1).values(txt="upd"),
                  execution_options={"synchronize_session": sync})
        for (acct, i), m in held.items():
            want = "upd" if acct == k else f"{env.cluster.shard_for(Acct, acct)}-{i}"
            assert m.txt == want, (acct, i, inspect(m).key, m.txt)


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_delete_of_one_shards_memo_leaves_other_shards_same_id(env, sync):
    with S(env, consistency="strong") as s:
        held = _memos(env, s)
        k = env.keys[env.names[1]][0]
        s.execute(delete(Memo).where(Memo.acct_id == k), execution_options={"synchronize_session": sync})
        for (acct, i), m in held.items():
            assert (m in s) == (acct != k), (acct, i)


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_update_across_shards_synchronizes_each_shards_objects(env, sync):
    with S(env, consistency="strong") as s:
        held = _memos(env, s)
        ks = [env.keys[sh][0] for sh in env.names[:2]]
        r = s.execute(update(Memo).where(Memo.acct_id.in_(ks)).values(txt=Memo.txt + "!"),
                      execution_options={"synchronize_session": sync})
        assert r.rowcount == 2
        for (acct, i), m in held.items():
            base = f"{env.cluster.shard_for(Acct, acct)}-{i}"
            assert m.txt == (base + "!" if acct in ks else base), (acct, i, m.txt)


def test_orm_upsert_returning_of_rows_on_several_shards_is_refused_clearly(env):
    """(Documented: one statement's RETURNING objects come from one shard.)"""
    ks = [env.keys[sh][0] for sh in env.names]
    ins = pg_insert(Acct)
    multi = (ins.values([{"id": k, "name": f"u{k}", "n": 0} for k in ks])
             .on_conflict_do_update(index_elements=[Acct.id], set_={"name": ins.excluded.name})
             .returning(Acct))
    bulk = (ins.on_conflict_do_update(index_elements=[Acct.id], set_={"name": ins.excluded.name})
            .returning(Acct, sort_by_parameter_order=True))
    with S(env, consistency="strong") as s:
        with pytest.raises(shardkit.CrossShardWriteError, match="add_all"):
            s.scalars(multi).all()
        with pytest.raises(shardkit.RoutingError, match="add_all"):
            s.scalars(bulk, [{"id": k, "name": "x", "body": "", "n": 0} for k in ks]).all()


def test_get_of_an_expired_object_whose_row_is_gone(env):
    shard = env.names[2]
    k = env.keys[shard][1]

    def run(sess, bind):
        a = sess.get(Acct, k)
        sess.expire(a)
        with bind.begin() as c:
            c.execute(text("DELETE FROM od7_lines WHERE acct_id = :k"), {"k": k})
            c.execute(text("DELETE FROM od7_accts WHERE id = :k"), {"k": k})
        return sess.get(Acct, k), a in sess
    with S(env, consistency="strong") as s:
        got = run(s, env.cluster.primary(shard))
    with O(env) as o:
        want = run(o, env.oracle)
    assert got == want


@pytest.mark.parametrize("ident", ["dict", "tuple", "list"])
def test_get_by_other_identity_forms(env, ident):
    shard = env.names[1]
    k = env.keys[shard][0]

    def run(sess):
        if ident == "dict":
            ln = sess.get(Line, {"id": 2, "acct_id": k})
        elif ident == "tuple":
            ln = sess.get(Line, (2, k))
        else:
            ln = sess.get(Line, [2, k])
        return ln.id, ln.acct_id, ln.note, sess.get(Line, (2, k)) is ln
    same_as_one_database(env, run, consistency="strong")


def test_get_inside_no_autoflush_with_a_pending_object_of_the_same_key(env):
    shard = env.names[0]
    k = env.keys[shard][0]

    def run(sess):
        p = Acct(id=k, name="pending")
        sess.add(p)
        with sess.no_autoflush:
            got = sess.get(Acct, k)
        return got is p, got is not None and got.name, p in sess.new
    same_as_one_database(env, run)


@pytest.mark.parametrize("how", ["scope", "option", "set_shard_id", "all_shards_where_id"])
@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_update_of_memo_1_on_a_named_shard(env, sync, how):
    from sqlalchemy.ext.horizontal_shard import set_shard_id
    shard = env.names[1]
    with S(env, consistency="strong") as s:
        held = _memos(env, s)
        stmt = update(Memo).where(Memo.id == 1).values(txt=Memo.txt + "!")
        eo = {"synchronize_session": sync}
        if how == "scope":
            with shardkit.scope(shard=shard):
                s.execute(stmt, execution_options=eo)
        elif how == "option":
            s.execute(stmt, execution_options={**eo, "shardkit_shard": shard})
        elif how == "set_shard_id":
            s.execute(stmt.options(set_shard_id(shard)), execution_options=eo)
        else:
            with shardkit.scope(all_shards=True):
                s.execute(stmt, execution_options=eo)
        for (acct, i), m in held.items():
            on = env.cluster.shard_for(Acct, acct)
            base = f"{on}-{i}"
            hit = i == 1 and (how == "all_shards_where_id" or on == shard)
            assert m.txt == (base + "!" if hit else base), (how, acct, i, m.txt)
        s.commit()
        for (acct, i), m in held.items():
            on = env.cluster.shard_for(Acct, acct)
            hit = i == 1 and (how == "all_shards_where_id" or on == shard)
            assert primary_sql(env, on, "SELECT txt FROM od7_memos WHERE id = :i AND acct_id = :a",
                               i=i, a=acct) == [(f"{on}-{i}" + ("!" if hit else ""),)]


@pytest.mark.parametrize("how", ["scope", "option", "all_shards_where_id"])
@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_delete_of_memo_1_on_a_named_shard(env, sync, how):
    shard = env.names[2]
    with S(env, consistency="strong") as s:
        held = _memos(env, s)
        stmt = delete(Memo).where(Memo.id == 1)
        eo = {"synchronize_session": sync}
        if how == "scope":
            with shardkit.scope(shard=shard):
                s.execute(stmt, execution_options=eo)
        elif how == "option":
            s.execute(stmt, execution_options={**eo, "shardkit_shard": shard})
        else:
            with shardkit.scope(all_shards=True):
                s.execute(stmt, execution_options=eo)
        for (acct, i), m in held.items():
            on = env.cluster.shard_for(Acct, acct)
            hit = i == 1 and (how == "all_shards_where_id" or on == shard)
            assert (m in s) == (not hit), (how, acct, i)


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_orm_dml_autoflushes_pending_objects_first(env, sync):
    ks = [env.keys_on(env.cluster, sh, 1, start=4000)[0] for sh in env.names]
    eo = {"synchronize_session": sync}

    def run(sess):
        objs = [Acct(id=k, name="p", n=1) for k in ks]
        sess.add_all(objs)
        r1 = sess.execute(update(Acct).where(Acct.id == ks[0]).values(n=Acct.n + 1), execution_options=eo)
        out = [r1.rowcount, objs[0].__dict__.get("n")]
        r2 = sess.execute(update(Acct).where(Acct.id.in_(ks[1:])).values(name="q"), execution_options=eo)
        out += [r2.rowcount, [o.__dict__.get("name") for o in objs]]
        dirty = sess.get(Acct, ks[1])
        dirty.n = 50
        r3 = sess.execute(delete(Acct).where(Acct.id.in_(ks), Acct.n > 40), execution_options=eo)
        out += [r3.rowcount, [o in sess for o in objs]]
        new = _upsert(sess, ks[2], "ups")
        out += [new[0] is objs[2], objs[2].__dict__.get("name")]
        sess.commit()
        return out
    same_as_one_database(env, run, consistency="strong")


@pytest.mark.parametrize("where", ["call", "statement"])
def test_orm_upsert_returning_with_populate_existing_refreshes_the_held_object(env, where):
    shard = env.names[2]
    k = env.keys[shard][0]

    def run(sess):
        held = sess.get(Acct, k)
        held.lines  # (loaded)
        stmt = (pg_insert(Acct).values(id=k, name="up", body="u", n=1)
                .on_conflict_do_update(index_elements=[Acct.id], set_={"name": "up", "n": Acct.n + 5})
                .returning(Acct))
        if where == "statement":
            rows = sess.scalars(stmt.execution_options(populate_existing=True)).all()
        else:
            rows = sess.scalars(stmt, execution_options={"populate_existing": True}).all()
        return rows[0] is held, held.name, held.n, len(held.lines)
    same_as_one_database(env, run, consistency="strong")


def test_bulk_update_by_primary_key_does_not_change_another_keys_row_of_that_id(env):
    """Memo's primary key (id) is unique per shard: a row of a bulk UPDATE names its
    memo by id and shard key, and the memo of that id on the key's shard belongs to
    another account.  It is not that row (StaleDataError, as documented: "a shard key
    that is not the row's"); the other account's memo is left as it was."""
    shard = env.names[1]
    ka, kb = env.keys[shard]
    with S(env, consistency="strong") as s:
        held = _memos(env, s)  # memo 1 of ka, memo 2 of kb on this shard
        with pytest.raises(orm_exc.StaleDataError):
            s.execute(update(Memo), [{"id": 2, "acct_id": ka, "txt": "hijacked"}])
        s.rollback()
        assert held[kb, 2].txt == f"{shard}-2"
    assert primary_sql(env, shard, "SELECT id, acct_id, txt FROM od7_memos ORDER BY id") == [
        (1, ka, f"{shard}-1"), (2, kb, f"{shard}-2")]
    with S(env, consistency="strong") as s:
        with pytest.raises(orm_exc.StaleDataError):
            s.bulk_update_mappings(Memo, [{"id": 2, "acct_id": ka, "txt": "hijacked"}])
    with S(env, consistency="strong") as s:
        # The row's own key: updated, and the held object with it.
        m = s.get(Memo, 2, identity_token=shard)
        s.execute(update(Memo), [{"id": 2, "acct_id": kb, "txt": "mine"}])
        assert m.txt == "mine"
        s.commit()
    assert primary_sql(env, shard, "SELECT id, acct_id, txt FROM od7_memos ORDER BY id") == [
        (1, ka, f"{shard}-1"), (2, kb, "mine")]

    with S(env, consistency="strong") as s:
        # bulk_save_objects() of the object, given another key of its shard: its own row
        # (by primary key, on the shard it was loaded from) takes it, as a flush would.
        m = s.get(Memo, 2, identity_token=shard)
        m.acct_id = ka
        s.bulk_save_objects([m])
        s.commit()
    assert primary_sql(env, shard, "SELECT id, acct_id, txt FROM od7_memos ORDER BY id") == [
        (1, ka, f"{shard}-1"), (2, ka, "mine")]


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate"])
def test_orm_update_and_delete_returning_entities_across_shards(env, sync):
    ks = [env.keys[sh][0] for sh in env.names]
    eo = {"synchronize_session": sync}

    def run(sess, check):
        held = {k: sess.get(Acct, k) for k in ks}
        lines = sess.scalars(select(Line).where(Line.acct_id.in_(ks))).all()
        up = sess.scalars(update(Acct).where(Acct.id.in_(ks)).values(n=Acct.n * 10).returning(Acct),
                          execution_options=eo).all()
        out = [sorted((a.id, a.n, a is held[a.id]) for a in up)]
        gone = sess.scalars(delete(Line).where(Line.acct_id.in_(ks), Line.id == 2).returning(Line),
                            execution_options=eo).all()
        out.append(sorted((ln.acct_id, ln.id, ln in sess, any(ln is x for x in lines)) for ln in gone))
        if check:
            for a in up:
                assert inspect(a).key[2] == env.cluster.shard_for(Acct, a.id)
        sess.commit()
        return out
    with S(env, consistency="strong") as s:
        got = run(s, True)
    with O(env) as o:
        want = run(o, False)
    assert got == want


@pytest.mark.skipif("execution_options" not in Session.__init__.__code__.co_varnames,
                    reason="Session(execution_options=...) is SQLAlchemy 2.1's")
def test_session_execution_options_apply_to_get(env):
    shard = env.names[0]
    k = env.keys[shard][0]
    with S(env, consistency="eventual", execution_options={"shardkit_role": "primary"}) as s:
        with nodes_used(env.cluster) as nodes:
            a = s.get(Acct, k, options=[selectinload(Acct.lines)])
        assert a is not None and len(a.lines) == 2
        assert nodes == [f"{shard}/primary"] * 2, nodes

    def run(sess, bind):
        a = sess.get(Acct, k)
        with bind.begin() as c:
            c.execute(text("UPDATE od7_accts SET name = 'ext' WHERE id = :k"), {"k": k})
        b = sess.get(Acct, k)
        c = sess.scalars(select(Acct).where(Acct.id == k)).one()
        return a is b is c, a.name
    with S(env, consistency="strong", execution_options={"populate_existing": True}) as s:
        got = run(s, env.cluster.primary(shard))
    with O(env, execution_options={"populate_existing": True}) as o:
        want = run(o, env.oracle)
    assert got == want


@pytest.mark.parametrize("where", ["call", "statement"])
@pytest.mark.parametrize("verb", ["insert", "update", "update_where"])
def test_orm_bulk_statements_honour_autoflush_false(env, verb, where):
    """ORM bulk INSERT / UPDATE by primary key with autoflush=False (an execution option
    of the call or the statement): the pending object stays pending, as on one database."""
    k_new = env.keys_on(env.cluster, env.names[0], 1, start=5000)[0]
    k_row = env.keys_on(env.cluster, env.names[1], 1, start=5000)[0]
    k_old = env.keys[env.names[2]][0]

    def run(sess):
        p = Acct(id=k_new, name="pending", n=1)
        sess.add(p)
        if verb == "insert":
            stmt, params = sa_insert(Acct), [{"id": k_row, "name": "bulk", "body": "", "n": 0}]
        elif verb == "update":
            stmt, params = update(Acct), [{"id": k_old, "name": "bulk"}]
        else:
            stmt, params = update(Acct).where(Acct.id == k_old).values(name="bulk"), None
        if where == "statement":
            sess.execute(stmt.execution_options(autoflush=False), params)
        else:
            sess.execute(stmt, params, execution_options={"autoflush": False})
        out = [p in sess.new]
        if verb == "insert":
            params = [{**params[0], "id": k_row + 100000}]
        sess.execute(stmt, params)  # (autoflush by default)
        return out + [p in sess.new]
    with S(env, consistency="strong") as s:
        got = run(s)
    with O(env) as o:
        want = run(o)
    assert got == want == [True, False]


@pytest.mark.parametrize("method", ["bulk_insert_mappings", "bulk_update_mappings", "bulk_save_objects"])
def test_legacy_bulk_methods_do_not_autoflush(env, method):
    """Session.bulk_insert_mappings(), bulk_update_mappings() and bulk_save_objects()
    write their rows without a flush: a pending object stays pending, as on one database."""
    k_new = env.keys_on(env.cluster, env.names[0], 1, start=6000)[0]
    k_row = env.keys_on(env.cluster, env.names[1], 1, start=6000)[0]
    k_old = env.keys[env.names[2]][0]

    def run(sess):
        p = Acct(id=k_new, name="pending", n=1)
        sess.add(p)
        if method == "bulk_insert_mappings":
            sess.bulk_insert_mappings(Acct, [{"id": k_row, "name": "bulk", "body": "", "n": 0}])
        elif method == "bulk_update_mappings":
            sess.bulk_update_mappings(Acct, [{"id": k_old, "name": "bulk"}])
        else:
            sess.bulk_save_objects([Acct(id=k_row, name="bulk", body="", n=0)])
        out = [p in sess.new]
        sess.commit()
        return out
    with S(env, consistency="strong") as s:
        got = run(s)
    with O(env) as o:
        want = run(o)
    assert got == want == [True]
