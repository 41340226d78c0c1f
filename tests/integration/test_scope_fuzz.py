"""``shardkit.scope()`` / ``Cluster.scope()`` under random nesting, against the documented rules.

Random stacks of 1-3 scopes (random fields: shard, key, role, consistency, lag limits,
all_shards, strict; invalid values too), entered in the main thread, in threads started
inside (plain ``threading.Thread``/``ThreadPoolExecutor``: no scope; ``copy_context().run``:
the scope) and in asyncio tasks created inside.  In them, random reads and writes through a
``ShardedSession`` (rolled back) on the session-wide 3-shard dev cluster with one replica
per shard, each statement checked against a model of the README's rules: the shards it ran
on and the role (``before_cursor_execute`` on every node), ``cluster.explain()`` in the same
scope, the rows against a one-database oracle (plus the session's own writes), the refusals
(a key-less write outside a key/shard scope, an UPDATE moving a key off the scope's shard,
strict scopes), and that nothing leaks after the scopes end (also after an exception).
``SCOPEFUZZ_SEED`` / ``SCOPEFUZZ_N`` change the seed / number of iterations (the default,
200 times ``SHARDKIT_FUZZ_SCALE`` (tests/fuzz_size.py), takes about 3 s; seeds 1-14 at 400-800 found no disagreement).

Behaviours the model takes as they are (documented, or left as they are on purpose): an
unknown shard or a wrong-typed key in a scope is refused at the first statement that uses
it, so a keyed INSERT or flush inside ``scope(shard="typo")`` runs (on its key's shard)
without a word; ``strict=`` refuses scatter reads, not writes its ``all_shards=`` permits;
an ORM object without its key is refused by the flush also inside ``scope(shard=...)``
(a Core INSERT of such a row runs on the scope's shard); an INSERT's rowcount is -1.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_size import fuzz_size
from own_tables import NodeStatements
from replica_env import replayed, replica_cluster
from sqlalchemy import Column, Integer, delete, func, insert, inspect, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import declarative_base, sessionmaker

import shardkit
from shardkit._scope import NO_SCOPE

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("SCOPEFUZZ_SEED", "9"))
STATS: Counter[tuple[str, str]] = Counter()   # (statement kind, outcome) checked, printed at the end
N = fuzz_size("SCOPEFUZZ_N", 200)

Base = declarative_base()


class Item(Base):
    __tablename__ = "sfz9_item"
    id = Column(Integer, primary_key=True, autoincrement=False)
    k = Column(Integer, nullable=True)
    v = Column(Integer, nullable=False)


class Acct(Base):
    """A table whose primary key is the shard key (get() takes its own short path)."""
    __tablename__ = "sfz9_acct"
    k = Column(Integer, primary_key=True, autoincrement=False)
    v = Column(Integer, nullable=False)


CONFIG = {"groups": {"sfz9": {"strategy": "hash", "tables": {"sfz9_item": "k", "sfz9_acct": "k"}}}}
NKEYS = 40
SHARDS = ("s0", "s1", "s2")


@dataclass
class Kit:
    dev: Any
    cluster: shardkit.Cluster
    Session: sessionmaker
    rec: NodeStatements
    rows: dict[tuple[str, int], tuple[int | None, int]]   # (shard, id) -> (k, v), committed
    keyless: dict[str, int] = field(default_factory=dict)  # shard -> id of a row without a key


@pytest.fixture(scope="module")
def kit(sharded_dev) -> Iterator[Kit]:
    cluster = replica_cluster(sharded_dev, CONFIG, Base.metadata)
    for s in cluster.shard_names:
        Base.metadata.drop_all(cluster.primary(s))
        Base.metadata.create_all(cluster.primary(s))
    S = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    rows: dict[tuple[str, int], tuple[int | None, int]] = {}
    keyless = {}
    with S() as s:
        for i in range(NKEYS * 2):
            k = i % NKEYS
            s.add(Item(id=i, k=k, v=i * 7 % 13))
            rows[(cluster.shard_for(Item, k), i)] = (k, i * 7 % 13)
        s.flush()
        for k in range(NKEYS):
            s.add(Acct(k=k, v=k + 1))
        s.flush()
        for n, sh in enumerate(cluster.shard_names):
            with shardkit.scope(shard=sh):
                s.execute(insert(Item), [{"id": 900 + n, "k": None, "v": n}])
            rows[(sh, 900 + n)] = (None, n)
            keyless[sh] = 900 + n
        s.commit()
    cluster.start_monitor()
    replayed(sharded_dev)
    rec = NodeStatements([cluster], ("sfz9_",))
    yield Kit(sharded_dev, cluster, S, rec, rows, keyless)
    rec.close()
    for s in cluster.shard_names:
        Base.metadata.drop_all(cluster.primary(s))
    cluster.dispose()


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------

FIELDS = ("shard", "key", "role", "consistency", "max_lag_seconds", "max_lag_bytes", "all_shards", "strict")
INVALID = {
    "role": ["master", "REPLICA", 1],
    "consistency": ["weak", "Strong"],
    "max_lag_seconds": [-1, "5", float("nan"), True],
    "max_lag_bytes": [-1, 1.5, "10", True],
}


def random_layer(rng: random.Random, valid_only: bool = False) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for f in rng.sample(FIELDS, rng.randint(1, 3)):
        if f == "shard":
            layer[f] = rng.choice(list(SHARDS) + [None])
        elif f == "key":
            layer[f] = rng.choice([rng.randrange(NKEYS), None])
        elif f == "role":
            layer[f] = rng.choice(["primary", "replica", None])
        elif f == "consistency":
            layer[f] = rng.choice(["eventual", "read_your_writes", "strong", None])
        elif f == "max_lag_seconds":
            layer[f] = rng.choice([300, 1000.0, None])
        elif f == "max_lag_bytes":
            layer[f] = rng.choice([10**9, None])
        elif f == "all_shards":
            layer[f] = rng.choice([True, False])
        else:
            layer[f] = rng.random() < 0.25
    if not valid_only and rng.random() < 0.12:
        f = rng.choice(list(INVALID))
        layer[f] = rng.choice(INVALID[f])
    if not valid_only and rng.random() < 0.06:
        # refused at the first statement that uses them, not at scope()
        if rng.random() < 0.5:
            layer["shard"] = "s9"
        else:
            layer["key"] = rng.choice(["7", 1.5])
    return layer


def invalid(layer: dict[str, Any]) -> bool:
    return any(f in INVALID and any(layer[f] is b or (layer[f] == b and type(layer[f]) is type(b))
                                    for b in INVALID[f]) for f in layer) or any(
        isinstance(layer.get(f), float) and layer[f] != layer[f] for f in ("max_lag_seconds",))


def fold(layers: list[dict[str, Any]]) -> dict[str, Any]:
    eff = {"shard": None, "key": None, "role": None, "consistency": None, "max_lag_seconds": None,
           "max_lag_bytes": None, "all_shards": False, "strict": False}
    for layer in layers:
        eff.update(layer)
    return eff


class Refused(Exception):
    pass


@dataclass
class Model:
    """A session's state, as the README describes it."""
    kit: Kit
    rows: dict[tuple[str, int], tuple[int | None, int]]
    written: set[str] = field(default_factory=set)
    on_primary: set[str] = field(default_factory=set)
    next_id: int = 0

    def owner(self, k: int) -> str:
        return self.kit.cluster.shard_for(Item, k)

    def read_role(self, shard: str, eff: dict[str, Any], new: bool = False) -> str:
        written = set() if new else self.written
        pinned = set() if new else self.on_primary
        if shard in written:
            return "primary"
        role = eff["role"]
        if role == "primary":
            return "primary"
        if role is None and shard in pinned:
            return "primary"
        consistency = eff["consistency"] or self.kit.cluster.replica_settings.consistency
        if consistency == "strong" and role != "replica":
            return "primary"
        return "replica"

    def note_read(self, shards: list[str], roles: dict[str, str]) -> None:
        for s in shards:
            if roles.get(s) == "primary":
                self.on_primary.add(s)


def read_shards(m: Model, eff: dict[str, Any], own_keys: list[int] | None) -> list[str]:
    """The shards a read runs on (raises Refused when a strict scope refuses it)."""
    if eff["shard"] is not None:
        return [eff["shard"]]
    if own_keys:
        shards = sorted({m.owner(k) for k in own_keys})
    elif eff["key"] is not None:
        shards = [m.owner(eff["key"])]
    else:
        shards = list(SHARDS)
    if eff["strict"] and len(shards) > 1:
        raise Refused("strict")
    return shards


# ---------------------------------------------------------------------------
# one operation
# ---------------------------------------------------------------------------


def keyless_write_shards(m: Model, eff: dict[str, Any]) -> list[str] | None:
    """Where a key-less UPDATE/DELETE runs in scope ``eff``: the scope's shard, its key's, or
    every shard its all_shards= permits (strict refuses scatter reads, not such writes);
    None: refused."""
    if eff["shard"] is not None:
        return [eff["shard"]]
    if eff["key"] is not None:
        return [m.owner(eff["key"])]
    return list(SHARDS) if eff["all_shards"] else None


def run_op(kit: Kit, s: shardkit.ShardedSession, m: Model, eff: dict[str, Any], rng: random.Random,
           log: list[str]) -> None:
    kind = rng.choice(["read_key", "read_keys", "read_keyless", "count", "get", "insert", "insert_keyless",
                       "update_key", "update_keyless", "update_move", "orm_update", "insert_multi", "orm_add",
                       "get_acct", "orm_read", "insert_many", "delete_keyless", "upsert_move"])
    cl = kit.cluster
    opts: dict[str, Any] = {}
    if kind in ("read_key", "read_keys", "read_keyless", "count") and rng.random() < 0.4:
        # a statement's own options override the scope's (its consistency also the scope's role)
        for o in rng.sample(["shardkit_role", "shardkit_consistency", "shardkit_shard",
                             "shardkit_max_lag_seconds"], rng.randint(1, 2)):
            opts[o] = rng.choice({"shardkit_role": ["primary", "replica"],
                                  "shardkit_consistency": ["eventual", "read_your_writes", "strong"],
                                  "shardkit_shard": list(SHARDS),
                                  "shardkit_max_lag_seconds": [300, 1000.0]}[o])
        eff = dict(eff)
        if "shardkit_shard" in opts:
            eff["shard"] = opts["shardkit_shard"]
        if "shardkit_role" in opts:
            eff["role"] = opts["shardkit_role"]
        elif "shardkit_consistency" in opts:
            eff["role"] = None
        if "shardkit_consistency" in opts:
            eff["consistency"] = opts["shardkit_consistency"]
    bad_shard = eff["shard"] is not None and eff["shard"] not in SHARDS
    bad_key = eff["shard"] is None and eff["key"] is not None and not isinstance(eff["key"], int)
    if bad_shard or bad_key:
        run_bad(kit, s, m, eff, rng, log, kind, bad_shard)
        return
    kit.rec.take()
    expected_error: type[BaseException] | tuple | None = None
    shards: list[str] | None = None
    is_write = kind.startswith(("insert", "update", "orm", "delete", "upsert"))
    stmt: Any = None
    params: Any = None
    new_rows: dict[tuple[str, int], tuple[int | None, int]] = {}
    if kind == "read_key":
        k = rng.randrange(NKEYS)
        stmt = select(Item.id, Item.k, Item.v).where(Item.k == k).order_by(Item.id)
        pred = lambda key, ident: key == k  # noqa: E731
        own: list[int] | None = [k]
    elif kind == "read_keys":
        ks = rng.sample(range(NKEYS), 3)
        stmt = select(Item.id, Item.k, Item.v).where(Item.k.in_(ks)).order_by(Item.id)
        pred = lambda key, ident: key in ks  # noqa: E731
        own = ks
    elif kind in ("read_keyless", "count"):
        lo = rng.randrange(0, 80)
        if kind == "count":
            stmt = select(func.count()).select_from(Item).where(Item.id >= lo)
        else:
            stmt = select(Item.id, Item.k, Item.v).where(Item.id >= lo).order_by(Item.id)
        pred = lambda key, ident: ident >= lo  # noqa: E731
        own = None
    elif kind == "get":
        ident = rng.choice([rng.randrange(NKEYS * 2), *kit.keyless.values()])
        own = None
    if kind in ("read_key", "read_keys", "read_keyless", "count", "get"):
        try:
            shards = read_shards(m, eff, own)
        except Refused:
            expected_error = shardkit.ScatterRefused
        if kind == "get":
            # get() by a primary key without the shard key: the scope's shard, the scope
            # key's shard, else every shard (a scatter, which a strict scope refuses)
            shards = [eff["shard"]] if eff["shard"] else ([m.owner(eff["key"])] if eff["key"] is not None
                                                           else list(SHARDS))
            expected_error = shardkit.ScatterRefused if eff["strict"] and len(shards) > 1 else None
    if kind == "get":
        try:
            obj = s.get(Item, ident)
            err = None
        except Exception as e:  # noqa: BLE001
            err, obj = e, None
        ran = kit.rec.take()
        log.append(f"get({ident}) -> {err!r} ran={[(a, b) for a, b, _ in ran]}")
        if expected_error is not None:
            assert isinstance(err, expected_error) and not ran, (eff, err, ran)
            return
        if err is not None:
            raise AssertionError(f"get({ident}) in {eff} raised {err!r}")
        found = [(sh, i) for (sh, i) in m.rows if i == ident and sh in shards]
        assert {a for a, _, _ in ran} <= set(shards), (eff, ran)
        if len(found) == 1:
            assert obj is not None and (obj.k, obj.v) == m.rows[found[0]], (eff, ident, obj)
        elif not found:
            assert obj is None, (eff, ident, obj)
        s.expunge_all()
        return
    if kind == "get_acct":
        # get() by the shard key: its shard, or the scope's shard (where the row may not be)
        k = rng.randrange(NKEYS)
        shard = eff["shard"] or m.owner(k)
        if rng.random() < 0.3:
            # held afterwards (when found): no statement; the shard read on the primary
            s.get(Acct, k, execution_options={"shardkit_role": "primary"})
            m.on_primary.add(shard)
        kit.rec.take()
        held = s.identity_map.get(s.identity_key(Acct, k, identity_token=m.owner(k)))
        try:
            obj = s.get(Acct, k)
            err = None
        except Exception as e:  # noqa: BLE001
            err, obj = e, None
        ran = kit.rec.take()
        log.append(f"get(Acct, {k}) in {eff} -> {obj!r} {err!r} ran={[(a, b) for a, b, _ in ran]}")
        assert err is None, (eff, k, err)
        if shard == m.owner(k):
            assert obj is not None and obj.v == k + 1, (eff, k, obj)
            if held is not None:
                assert obj is held and not ran, (eff, ran)
        else:
            assert obj is None, (eff, k, obj)
        if ran:
            assert [(a, b) for a, b, _ in ran] == [(shard, m.read_role(shard, eff))], \
                (eff, k, ran, m.written, m.on_primary)
            m.note_read([shard], {a: b for a, b, _ in ran})
        return
    if kind == "orm_read":
        # ORM objects by a key IN list: the identity token is the shard each row came from
        ks = rng.sample(range(NKEYS), 2)
        stmt = select(Item).where(Item.k.in_(ks))
        try:
            shards = read_shards(m, eff, ks)
        except Refused:
            shards = None
        try:
            objs = s.scalars(stmt).all()
            err = None
        except Exception as e:  # noqa: BLE001
            err, objs = e, []
        ran = kit.rec.take()
        log.append(f"orm_read {ks} in {eff} -> {err!r} ran={[(a, b) for a, b, _ in ran]}")
        if shards is None:
            assert isinstance(err, shardkit.ScatterRefused) and not ran, (eff, err, ran)
            return
        assert err is None, (eff, err)
        assert sorted({a for a, _, _ in ran}) == sorted(shards), (eff, ran, shards)
        roles = {a: b for a, b, _ in ran}
        for sh in shards:
            assert roles[sh] == m.read_role(sh, eff), (eff, sh, roles, m.written, m.on_primary)
        m.note_read(shards, roles)
        got = sorted((inspect(o).identity_token, o.id, o.k, o.v) for o in objs)
        want = sorted((sh, i, kk, vv) for (sh, i), (kk, vv) in m.rows.items() if sh in shards and kk in ks)
        assert got == want, (eff, got, want)
        s.expunge_all()
        return
    if kind == "insert":
        k = rng.randrange(NKEYS)
        ident = 5000 + m.next_id
        m.next_id += 1
        stmt = insert(Item).values(id=ident, k=k, v=1)
        shards = [m.owner(k)]
        new_rows[(m.owner(k), ident)] = (k, 1)
    elif kind == "insert_keyless":
        ident = 5000 + m.next_id
        m.next_id += 1
        stmt = insert(Item).values(id=ident, k=None, v=2)
        if eff["shard"] is not None:
            shards = [eff["shard"]]
            new_rows[(eff["shard"], ident)] = (None, 2)
        else:
            expected_error = shardkit.ShardkitError
    elif kind == "update_key":
        k = rng.randrange(NKEYS)
        nv = rng.randrange(100, 200)
        stmt = update(Item).where(Item.k == k).values(v=nv)
        shards = [eff["shard"]] if eff["shard"] is not None else [m.owner(k)]
        for (sh, i), (kk, _v) in m.rows.items():
            if sh == shards[0] and kk == k:
                new_rows[(sh, i)] = (kk, nv)
    elif kind == "update_keyless":
        ident = rng.randrange(NKEYS * 2)
        nv = rng.randrange(100, 200)
        stmt = update(Item).where(Item.id == ident).values(v=nv)
        shards = keyless_write_shards(m, eff)
        if shards is None:
            expected_error = shardkit.ShardkitError
        if shards and not expected_error:
            for (sh, i), (kk, _v) in m.rows.items():
                if sh in shards and i == ident:
                    new_rows[(sh, i)] = (kk, nv)
    elif kind == "update_move":
        # UPDATE that sets the key: refused when the new key's shard is not the one it runs on.
        k = rng.randrange(NKEYS)
        nk = rng.randrange(NKEYS)
        stmt = update(Item).where(Item.k == k).values(k=nk)
        on = eff["shard"] if eff["shard"] is not None else m.owner(k)
        shards = [on]
        if m.owner(nk) != on:
            expected_error = shardkit.CrossShardWriteError
        else:
            for (sh, i), (kk, vv) in m.rows.items():
                if sh == on and kk == k:
                    new_rows[(sh, i)] = (nk, vv)
    elif kind == "insert_many":
        # an executemany: inside scope(shard=...) the rows with a key go where it belongs,
        # the others (k=None) to the scope's shard; outside it, a row without its key is refused
        rows = []
        for _ in range(rng.randint(2, 4)):
            k = rng.randrange(NKEYS) if rng.random() < 0.7 else None
            rows.append({"id": 5000 + m.next_id, "k": k, "v": 5})
            m.next_id += 1
        stmt, params = insert(Item), rows
        if any(r["k"] is None for r in rows) and eff["shard"] is None:
            expected_error = shardkit.ShardkitError
        else:
            for r in rows:
                sh = eff["shard"] if r["k"] is None else m.owner(r["k"])
                new_rows[(sh, r["id"])] = (r["k"], 5)
            shards = sorted({sh for sh, _ in new_rows})
    elif kind == "delete_keyless":
        ident = 5000 + rng.randrange(max(m.next_id, 1))
        stmt = delete(Item).where(Item.id == ident)
        shards = keyless_write_shards(m, eff)
        if shards is None:
            expected_error = shardkit.ShardkitError
        if shards:
            gone = [key for key in m.rows if key[1] == ident and key[0] in shards]
            for key in gone:
                del m.rows[key]
            n_deleted = len(gone)
    elif kind == "upsert_move":
        # an upsert whose DO UPDATE sets the key: refused when it moves the row to another shard
        k = rng.randrange(NKEYS)
        nk = rng.randrange(NKEYS)
        ident = rng.choice([i for (sh, i), (kk, _v) in kit.rows.items() if kk == k])
        stmt = pg_insert(Item).values(id=ident, k=k, v=6)
        stmt = stmt.on_conflict_do_update(index_elements=[Item.id], set_={"k": nk, "v": 6})
        if m.owner(nk) != m.owner(k):
            expected_error = shardkit.CrossShardWriteError
        else:
            shards = [m.owner(k)]
            if (m.owner(k), ident) in m.rows:
                new_rows[(m.owner(k), ident)] = (nk, 6)
            else:   # (deleted by this session: inserted anew)
                new_rows[(m.owner(k), ident)] = (k, 6)
    elif kind == "insert_multi":
        ks = rng.sample(range(NKEYS), rng.randint(2, 3))
        rows = []
        for k in ks:
            rows.append({"id": 5000 + m.next_id, "k": k, "v": 3})
            m.next_id += 1
        stmt = insert(Item).values(rows)
        owners = sorted({m.owner(k) for k in ks})
        if len(owners) > 1:
            # a multi-row VALUES spanning shards is refused, inside scope(shard=...) as outside
            expected_error = shardkit.CrossShardWriteError
        else:
            shards = owners
            for r in rows:
                new_rows[(owners[0], r["id"])] = (r["k"], 3)
    elif kind == "orm_add":
        keyed = rng.random() < 0.7
        k = rng.randrange(NKEYS) if keyed else None
        ident = 5000 + m.next_id
        m.next_id += 1
        s.add(Item(id=ident, k=k, v=4))
        # (an object without its key is refused by the flush, also inside scope(shard=...),
        # where a Core INSERT of such a row runs on the scope's shard)
        want = m.owner(k) if keyed else None
        try:
            s.flush()
            err = None
        except Exception as e:  # noqa: BLE001
            err = e
        ran = kit.rec.take()
        log.append(f"orm_add k={k} -> {err!r} ran={[(a, b) for a, b, _ in ran]}")
        if want is None:
            # a row without its key needs scope(shard=...)
            assert isinstance(err, shardkit.ShardkitError), (eff, err, ran)
            assert not ran, ran
            s.rollback()
            m.rows = dict(kit.rows)
            m.written.clear()
            m.on_primary.clear()
            return
        assert err is None, (eff, k, err)
        assert [(a, b) for a, b, _ in ran] == [(want, "primary")], (eff, k, ran)
        m.written.add(want)
        m.rows[(want, ident)] = (k, 4)
        s.expunge_all()
        return
    elif kind == "orm_update":
        k = rng.randrange(NKEYS)
        objs = s.scalars(select(Item).where(Item.k == k).execution_options(shardkit_shard=m.owner(k),
                                                                            shardkit_role="primary")).all()
        m.on_primary.add(m.owner(k))
        kit.rec.take()
        nv = rng.randrange(300, 400)
        for o in objs:
            o.v = nv
            new_rows[(m.owner(k), o.id)] = (o.k, nv)
        try:
            s.flush()
            err = None
        except Exception as e:  # noqa: BLE001
            err = e
        ran = kit.rec.take()
        log.append(f"orm_update k={k} -> {err!r} ran={[(a, b) for a, b, _ in ran]}")
        assert err is None, (eff, err)
        if objs:
            assert {(a, b) for a, b, _ in ran} == {(m.owner(k), "primary")}, (eff, k, ran)
            m.written.add(m.owner(k))
        m.rows.update(new_rows)
        s.expunge_all()
        return

    # explain() in the same scope, as a new session would run it
    if opts:
        stmt = stmt.execution_options(**opts)
    try:
        route = cl.explain(stmt, params)
    except Exception as e:  # noqa: BLE001
        route = e
    try:
        result = s.execute(stmt, params)
        got = result.all() if not is_write else result.rowcount
        err = None
    except Exception as e:  # noqa: BLE001
        err, got = e, None
    ran = kit.rec.take()
    log.append(f"{kind}: {stmt} eff={eff} -> {err!r} ran={[(a, b) for a, b, _ in ran]} "
               f"explain={getattr(route, 'shards', route)!r}/{getattr(route, 'role', '')}")
    if expected_error is not None:
        STATS[kind, "refused"] += 1
        assert err is not None and isinstance(err, expected_error), \
            f"{kind} in {eff}: expected {expected_error}, got {err!r} (ran {ran})"
        assert isinstance(route, BaseException), f"{kind} in {eff}: explain() routed {route} but execution refused"
        assert not [r for r in ran if r[2].lstrip().upper().startswith(("UPDATE", "INSERT"))], ran
        return
    STATS[kind, "ok" if err is None else "refused"] += 1
    assert err is None, f"{kind} in {eff}: {err!r} (ran {ran})"
    assert not isinstance(route, BaseException), f"{kind} in {eff}: explain() raised {route!r}, execution ran"
    ran_shards = sorted({a for a, _, _ in ran})
    assert ran_shards == sorted(shards), f"{kind} in {eff}: ran on {ran}, expected {shards}"
    assert sorted(route.shards) == sorted(shards), f"{kind} in {eff}: explain {route.shards} != {shards}"
    if is_write:
        assert {b for _, b, _ in ran} == {"primary"}, ran
        assert route.role == "primary", route
        m.written.update(shards)
        m.rows.update(new_rows)
        # (an INSERT's rowcount is -1 on a plain engine too, SQLAlchemy 2.1 with psycopg)
        if kind == "delete_keyless":
            assert got == n_deleted, f"delete in {eff}: rowcount {got}, expected {n_deleted}"
        if kind.startswith("update") and (kind != "update_move" or new_rows):
            assert got == len(new_rows), f"{kind} in {eff}: rowcount {got}, expected {len(new_rows)}"
        return
    roles = {a: b for a, b, _ in ran}
    for sh in shards:
        want = m.read_role(sh, eff)
        assert roles[sh] == want, f"{kind} in {eff}: {sh} read on {roles[sh]}, expected {want} (written {m.written}, primary {m.on_primary})"
    new_role = {m.read_role(sh, eff, new=True) for sh in shards}
    assert route.role in new_role and len(new_role) == 1, \
        f"{kind} in {eff}: explain role {route.role}, a new session would read {new_role}"
    m.note_read(shards, roles)
    want_rows = sorted((i, kk, vv) for (sh, i), (kk, vv) in m.rows.items() if sh in shards and pred(kk, i))
    if kind == "count":
        assert got == [(len(want_rows),)], f"count in {eff}: {got} != {len(want_rows)}"
    else:
        assert sorted(tuple(r) for r in got) == want_rows, f"{kind} in {eff}: rows {got} != {want_rows}"


def run_bad(kit: Kit, s: shardkit.ShardedSession, m: Model, eff: dict[str, Any], rng: random.Random,
            log: list[str], kind: str, bad_shard: bool) -> None:
    """Inside a scope with an unknown shard or a shard key of the wrong type: a statement
    that uses it is refused before any database runs it (RoutingError, ShardKeyError), with
    a message naming the value; one that does not (its own key decides) runs as outside."""
    k = rng.randrange(NKEYS)
    stmts = {
        "read_keyless": select(Item.id).where(Item.id >= 5),
        "count": select(func.count()).select_from(Item),
        "update_keyless": update(Item).where(Item.id == 3).values(v=9),
        "get": None,
    }
    kind = rng.choice(list(stmts))
    try:
        if kind == "get":
            s.get(Item, 3)
        else:
            s.execute(stmts[kind])
        err = None
    except Exception as e:  # noqa: BLE001
        err = e
    ran = kit.rec.take()
    log.append(f"bad {kind} in {eff} -> {err!r} ran={ran}")
    assert isinstance(err, shardkit.ShardkitError), f"{kind} in {eff}: {err!r} (ran {ran})"
    assert not ran, (kind, eff, ran)
    bad = eff["shard"] if bad_shard else eff["key"]
    assert repr(bad) in str(err) or str(bad) in str(err), (bad, err)
    if kind != "get":
        with pytest.raises(type(err)):
            kit.cluster.explain(stmts[kind])
    # a keyed read ignores the bad key (its own decides); the bad shard, named, is refused
    try:
        rows = s.execute(select(Item.id).where(Item.k == k)).all()
        err = None
    except Exception as e:  # noqa: BLE001
        err = e
    kit.rec.take()
    if bad_shard:
        assert isinstance(err, shardkit.ShardkitError), (eff, err)
    else:
        assert err is None, (eff, err)
        assert sorted(r[0] for r in rows) == sorted(i for (sh, i), (kk, _v) in m.rows.items() if kk == k)


# ---------------------------------------------------------------------------
# stacks of scopes, in the main thread, threads and tasks
# ---------------------------------------------------------------------------


def in_scopes(kit: Kit, layers: list[dict[str, Any]], rng: random.Random, log: list[str],
              m: Model, s: shardkit.ShardedSession, where: str) -> None:
    """Enter the layers one by one (checking current_scope() each time and that an invalid one
    is refused at scope() leaving the outer one intact), then run ops inside."""
    entered: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for layer in layers:
            before = shardkit.current_scope()
            use_cluster = rng.random() < 0.5
            make = kit.cluster.scope if use_cluster else shardkit.scope
            if invalid(layer):
                with pytest.raises(ValueError) as ei:
                    stack.enter_context(make(**layer))
                assert str(ei.value), layer
                assert shardkit.current_scope() is before, (layer, before, shardkit.current_scope())
                continue
            sc = stack.enter_context(make(**layer))
            entered.append(layer)
            eff = fold(entered)
            assert shardkit.current_scope() is sc
            for f in FIELDS:
                assert getattr(sc, f) == eff[f], (f, layers, sc)
        eff = fold(entered)
        log.append(f"[{where}] scopes {entered}")
        for _ in range(rng.randint(1, 4)):
            run_op(kit, s, m, eff, rng, log)
        if where == "raise":
            raise KeyError("boom")   # leaves every scope of the stack by an exception


def fresh_model(kit: Kit) -> Model:
    return Model(kit, dict(kit.rows))


def check_no_scope(kit: Kit, log: list[str]) -> None:
    """Outside every scope: current_scope() is the empty one, and a key-less read runs on
    every shard's replica in a new session."""
    assert shardkit.current_scope() is NO_SCOPE, shardkit.current_scope()
    with kit.Session() as s:
        kit.rec.take()
        n = s.execute(select(func.count()).select_from(Item)).scalar()
        ran = kit.rec.take()
        assert n == len(kit.rows), (n, log[-5:])
        assert sorted((a, b) for a, b, _ in ran) == [(sh, "replica") for sh in SHARDS], (ran, log[-5:])


def one_iteration(kit: Kit, rng: random.Random, log: list[str]) -> None:
    layers = [random_layer(rng) for _ in range(rng.randint(1, 3))]
    where = rng.choice(["main", "main", "raise", "thread_copy", "thread_plain", "pool", "task", "task_after",
                        "to_thread", "executor"])
    if where in ("main", "raise"):
        m = fresh_model(kit)
        with kit.Session() as s:
            try:
                with contextlib.ExitStack() as outer:
                    if where == "raise":
                        outer.enter_context(pytest.raises(KeyError))
                    in_scopes(kit, layers, rng, log, m, s, where)
            finally:
                s.rollback()
        return
    # An outer scope, then a thread or task started inside it.
    outer_layer = random_layer(rng, valid_only=True)
    inner_layers = layers
    results: list[BaseException | None] = []
    seed = rng.randrange(1 << 30)

    def body(inherited: dict[str, Any]) -> None:
        r = random.Random(seed)
        m = fresh_model(kit)
        try:
            with kit.Session() as s:
                sub_log: list[str] = []
                # what this thread/task sees: its inherited scope, then its own layers
                entered = [inherited] if inherited else []
                assert {f: getattr(shardkit.current_scope(), f) for f in FIELDS} == fold(entered), \
                    (where, inherited, shardkit.current_scope())
                base = fold(entered)
                with contextlib.ExitStack() as stack:
                    for layer in inner_layers:
                        if invalid(layer):
                            with pytest.raises(ValueError):
                                stack.enter_context(shardkit.scope(**layer))
                            continue
                        stack.enter_context(shardkit.scope(**layer))
                        entered.append(layer)
                    eff = fold(entered)
                    for _ in range(r.randint(1, 3)):
                        run_op(kit, s, m, eff, r, sub_log)
                assert {f: getattr(shardkit.current_scope(), f) for f in FIELDS} == base
                s.rollback()
                log.extend(sub_log)
            results.append(None)
        except BaseException as e:  # noqa: BLE001
            results.append(e)

    with shardkit.scope(**outer_layer):
        log.append(f"[{where}] outer {outer_layer} inner {inner_layers}")
        if where == "thread_copy":
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(body, outer_layer))
            t.start()
            t.join()
        elif where == "thread_plain":
            t = threading.Thread(target=body, args=({},))
            t.start()
            t.join()
        elif where == "pool":
            with ThreadPoolExecutor(1) as ex:
                ex.submit(body, {}).result()
        elif where == "to_thread":
            # asyncio.to_thread runs the function in a copy of the caller's context
            async def main3() -> None:
                await asyncio.to_thread(body, outer_layer)
            asyncio.run(main3())
        elif where == "executor":
            # loop.run_in_executor does not copy it (as ThreadPoolExecutor.submit)
            async def main4() -> None:
                await asyncio.get_running_loop().run_in_executor(None, body, {})
            asyncio.run(main4())
        elif where == "task":
            async def main() -> None:
                async def task_body() -> None:
                    body(outer_layer)
                await asyncio.create_task(task_body())
                # the task's own scopes do not leak into its creator
                assert shardkit.current_scope().shard == fold([outer_layer])["shard"]
            asyncio.run(main())
        elif where == "task_after":
            # A task created inside the scope keeps it after the creator has left the scope.
            async def main2() -> None:
                async def task_body() -> None:
                    await asyncio.sleep(0)
                    body(outer_layer)
                with shardkit.scope(**outer_layer):
                    task = asyncio.create_task(task_body())
                await task
            # (asyncio.run copies the current context: the outer scope is in it)
            asyncio.run(main2())
    if results and results[0] is not None:
        raise results[0]


def test_scope_fuzz(kit: Kit) -> None:
    rng = random.Random(SEED)
    log: list[str] = []
    for it in range(N):
        try:
            one_iteration(kit, rng, log)
            check_no_scope(kit, log)
        except AssertionError as e:
            raise AssertionError(f"iteration {it} (SCOPEFUZZ_SEED={SEED}): {e}\n" + "\n".join(log[-12:])) from e
    print(f"scope fuzz, seed {SEED}, {N} iterations:", dict(sorted(STATS.items())))





@pytest.mark.parametrize("rows", ["one row", "executemany"])
def test_a_keyed_insert_inside_a_scope_naming_an_unknown_shard_is_refused(kit: Kit, rows: str) -> None:
    """``scope(shard="s9")``, a typo: every read in the block is refused as naming an unknown
    shard, while a Core INSERT whose rows carry their key was written on the key's shard and
    the typo never reported."""
    params = [{"id": 90_000 + i, "k": i, "v": 1} for i in range(2 if rows == "executemany" else 1)]
    with kit.Session() as s:
        with shardkit.scope(shard="s9"):
            with pytest.raises(shardkit.RoutingError, match="unknown shard 's9'; shards: s0, s1, s2"):
                s.execute(insert(Item), params)
        assert kit.rec.take() == []
        s.rollback()
    with kit.Session() as s:
        assert s.execute(select(func.count()).select_from(Item).where(Item.id >= 90_000)).scalar() == 0
    kit.rec.take()


def test_a_flush_inside_a_scope_naming_an_unknown_shard_is_refused(kit: Kit) -> None:
    """The same typo with ORM objects that carry their key: the flush wrote each on its
    key's shard and said nothing.  Refused; the objects stay pending, to flush outside."""
    with kit.Session() as s:
        s.add(Item(id=90_100, k=3, v=1))
        with shardkit.scope(shard="s9"):
            with pytest.raises(shardkit.RoutingError, match=r"unknown shard 's9' \(named by scope"):
                s.flush()
        assert kit.rec.take() == []
        s.flush()
        assert [sh for sh, _, _ in kit.rec.take()] == [kit.cluster.shard_for(Item, 3)]
        s.rollback()
    kit.rec.take()


def test_sql_text_inside_a_key_scope_says_the_key_does_not_place_it(kit: Kit) -> None:
    """Inside ``scope(key=...)`` SQL text is refused (no table says whose key it is); the
    error told how to name a shard but not why the scope's key did not count."""
    with kit.Session() as s, shardkit.scope(key=3):
        with pytest.raises(shardkit.RoutingError, match=r"a scope's key= does not place SQL text.*"
                                                        r"cluster\.shard_for\(Model, key\)"):
            s.execute(text("SELECT v FROM sfz9_item WHERE k = 3"))
    assert kit.rec.take() == []


@pytest.mark.parametrize("value", ["false", "no", 0, 1, "True"])
def test_switches_given_another_value_than_true_or_false_are_refused(kit: Kit, value: Any) -> None:
    """``scope(all_shards="false")`` (a setting's string) was true: a key-less UPDATE then ran
    on every shard.  The same for strict= and the execution options: refused, nothing run."""
    from sqlalchemy import exc as sa_exc

    for name in ("all_shards", "strict"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, not {value!r}"):
            with shardkit.scope(**{name: value}):
                pass
        assert shardkit.current_scope() is NO_SCOPE
    with pytest.raises(sa_exc.ArgumentError, match=f"strict must be True or False, not {value!r}"):
        kit.Session(strict=value)
    keyless = update(Item).where(Item.v == -1).values(v=-2)
    with pytest.raises(sa_exc.ArgumentError, match="all_shards must be True or False"):
        kit.cluster.explain(keyless, all_shards=value)
    with kit.Session() as s:
        for name, stmt in (("shardkit_all_shards", keyless),
                           ("shardkit_strict", select(Item.id)),
                           ("shardkit_partial_results", select(Item.id))):
            with pytest.raises(sa_exc.ArgumentError, match=f"execution option {name}={value!r} is not valid"):
                s.execute(stmt.execution_options(**{name: value}))
            s.rollback()
    assert kit.rec.take() == []


def test_an_orm_object_without_its_key_is_refused_by_the_flush_in_a_scope_too(kit: Kit) -> None:
    """README: "an ORM object without its key is refused by the flush, ShardKeyError, in a
    scope too" (an INSERT's rows without the key run on the scope's shard)."""
    with kit.Session() as s, shardkit.scope(shard="s1"):
        s.add(Item(id=90_200, k=None, v=1))
        with pytest.raises(shardkit.ShardKeyError):
            s.flush()
        s.rollback()
    assert kit.rec.take() == []
