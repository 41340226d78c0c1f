"""A cluster over the shared local servers with a test module's own tables."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine

import shardkit


@contextmanager
def cluster_with_tables(dev: Any, config: dict[str, Any], metadata: Any) -> Iterator[shardkit.Cluster]:
    """A Cluster of ``dev``'s shards with ``config`` (groups, reference tables) whose
    ``metadata`` tables are created empty on every shard, and dropped afterwards."""
    cluster = shardkit.Cluster.from_config({**dev.config_dict(), **config}, metadata=metadata)
    try:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
            metadata.create_all(cluster.primary(s))
        yield cluster
    finally:
        for s in cluster.shard_names:
            metadata.drop_all(cluster.primary(s))
        cluster.dispose()


@contextmanager
def _before_each_statement(hooks: list[tuple[Any, Any]]) -> Iterator[None]:
    """Listen with each (engine, fn) of ``hooks`` to the engine's statements inside the block."""
    for eng, fn in hooks:
        event.listen(eng, "before_cursor_execute", fn)
    try:
        yield
    finally:
        for eng, fn in hooks:
            event.remove(eng, "before_cursor_execute", fn)


@contextmanager
def statements_per_shard(cluster: shardkit.Cluster) -> Iterator[Counter[str]]:
    """Count the statements each shard's primary runs inside the block (a Counter by
    shard name, which the caller may clear)."""
    hits: Counter[str] = Counter()

    def counter(name: str) -> Any:
        def count(*_a: Any) -> None:
            hits[name] += 1
        return count
    with _before_each_statement([(cluster.primary(n), counter(n)) for n in cluster.shard_names]):
        yield hits


@contextmanager
def statements_counted(cluster: shardkit.Cluster,
                       key: Any = lambda sql: sql.split()[0].upper()) -> Iterator[Counter[tuple[str, Any]]]:
    """Count the statements each shard's primary runs inside the block, by (shard name,
    ``key`` of the SQL: by default its first word, in capitals); a statement whose key is
    None is not counted."""
    hits: Counter[tuple[str, Any]] = Counter()

    def counter(name: str) -> Any:
        def count(conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
            k = key(statement)
            if k is not None:
                hits[name, k] += 1
        return count
    with _before_each_statement([(cluster.primary(n), counter(n)) for n in cluster.shard_names]):
        yield hits


@contextmanager
def nodes_used(cluster: shardkit.Cluster, counts: Any = lambda statement: True) -> Iterator[list[str]]:
    """The nodes (``s1/primary``, ``s1/r0``), in order, that run the statements ``counts``
    accepts (given the SQL) inside the block, over every primary and replica."""
    served: list[str] = []

    def noter(node: str) -> Any:
        def note(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
            if counts(statement):
                served.append(node)
        return note
    engines = [cluster.primary(s) if i < 0 else cluster.engine(s, "replica", i)
               for s in cluster.shard_names for i in range(-1, cluster.replica_count(s))]
    with _before_each_statement([(eng, noter(eng.info["node"])) for eng in engines]):
        yield served


class NodeStatements:
    """(shard, role, sql) of every statement the nodes of ``clusters`` (primaries and
    replicas) run whose SQL holds one of ``marks`` (a table prefix), shardkit's own and
    catalog queries aside, from now until :meth:`close`; thread-safe (scatters run
    their shards in threads)."""

    def __init__(self, clusters: list[shardkit.Cluster], marks: tuple[str, ...]) -> None:
        self.marks = marks
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, str]] = []
        self.engines = [c.engine(s, role, i) for c in clusters for s in c.shard_names
                        for role, i in [("primary", 0)] + [("replica", i) for i in range(c.replica_count(s))]]
        for eng in self.engines:
            event.listen(eng, "before_cursor_execute", self.grab)

    def grab(self, conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
        if any(m in statement for m in self.marks) and "/* shardkit */" not in statement \
                and "pg_catalog" not in statement:
            info = conn.engine.info
            with self.lock:
                self.seen.append((info["shard"], info["role"], statement))

    def take(self) -> list[tuple[str, str, str]]:
        """What was recorded since the last take()."""
        with self.lock:
            out, self.seen = self.seen, []
            return out

    def close(self) -> None:
        for eng in self.engines:
            event.remove(eng, "before_cursor_execute", self.grab)


def truncate_everywhere(cluster: shardkit.Cluster, *tables: str) -> None:
    """Empty ``tables`` on every shard's primary (waiting at most 10 s for their locks)."""
    for s in cluster.shard_names:
        with cluster.primary(s).begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '10s'"))
            c.execute(text(f"TRUNCATE {', '.join(tables)}"))


def alternating_keys(cluster: shardkit.Cluster, table: str, n: int) -> tuple[dict[str, list[int]], list[int]]:
    """:func:`keys_per_shard`, and its keys taken from each shard in turn (every key's
    neighbours are on other shards)."""
    by_shard = keys_per_shard(cluster, table, n)
    return by_shard, take_turns(by_shard)


def take_turns(by_shard: dict[str, list[Any]]) -> list[Any]:
    """The keys of ``by_shard`` (shard -> keys) taken from each shard in turn."""
    return [k for turn in zip(*by_shard.values()) for k in turn]


def keys_per_shard(cluster: shardkit.Cluster, table: str, n: int) -> dict[str, list[int]]:
    """The first ``n`` integer keys (from 1) that ``table``'s group places on each shard."""
    by_shard: dict[str, list[int]] = {s: [] for s in cluster.shard_names}
    k = 1
    while min(len(v) for v in by_shard.values()) < n:
        shard = cluster.shard_for(table, k)
        if len(by_shard[shard]) < n:
            by_shard[shard].append(k)
        k += 1
    return by_shard


def shards_holding(cluster: shardkit.Cluster, table: str, column: str, value: Any) -> list[str]:
    """The shards whose primary has a row of ``table`` with ``column`` = ``value``."""
    found = []
    for s in cluster.shard_names:
        with cluster.primary(s).connect() as c:
            if c.execute(text(f"SELECT count(*) FROM {table} WHERE {column} = :v"), {"v": value}).scalar():
                found.append(s)
    return found


class ShardEnv:
    """A test module's cluster over servers of its own (``dev``), with the helpers its
    tests share: ``model`` is the table whose keys ``keys_on`` finds and ``ids`` reads."""

    model: Any = None

    def __init__(self, dev: Any, cluster: shardkit.Cluster) -> None:
        self.dev = dev
        self.cluster = cluster
        self.names = list(cluster.shard_names)

    def Session(self, **kw: Any) -> Any:
        from sqlalchemy.orm import sessionmaker

        return sessionmaker(class_=shardkit.ShardedSession, cluster=self.cluster, **kw)

    def keys_on(self, shard: str, n: int, start: int = 1) -> list[int]:
        """``n`` keys of ``model`` that ``shard`` owns, from ``start`` up."""
        out, k = [], start
        while len(out) < n:
            if self.cluster.shard_for(self.model, k) == shard:
                out.append(k)
            k += 1
        return out

    def autocommit(self, shard: str) -> Any:
        return self.cluster.primary(shard).connect().execution_options(isolation_level="AUTOCOMMIT")

    def ids(self, shard: str) -> set[int]:
        """The ids of ``model``'s rows on ``shard``'s primary."""
        with self.autocommit(shard) as c:
            return set(c.execute(text(f"SELECT id FROM {self.model.__tablename__}")).scalars())

    def prepared(self, shard: str) -> list[str]:
        """The transactions prepared (two-phase) on ``shard``'s primary."""
        with self.autocommit(shard) as c:
            return list(c.execute(text("SELECT gid FROM pg_prepared_xacts")).scalars())

    @classmethod
    @contextmanager
    def started(cls, dev: Any, config: dict[str, Any], metadata: Any) -> Iterator[Any]:
        """The env of a cluster of ``dev``'s servers with ``config`` and ``metadata``'s tables."""
        with cluster_with_tables(dev, config, metadata) as cluster:
            yield cls(dev, cluster)

    def reset(self, *tables: str) -> None:
        """Before a test: no prepared transaction left (a failed test's would hold its
        locks for ever), and ``tables`` empty on every shard."""
        for s in self.names:
            with self.autocommit(s) as c:
                for gid in c.execute(text("SELECT gid FROM pg_prepared_xacts")).scalars().all():
                    c.execute(text(f"ROLLBACK PREPARED '{gid}'"))
            with self.cluster.primary(s).begin() as c:
                c.execute(text("SET LOCAL lock_timeout = '10s'"))
                c.execute(text(f"TRUNCATE {', '.join(tables)}"))


def one_database(dev: Any, name: str, metadata: Any) -> Engine:
    """A fresh database ``name`` on ``dev``'s first server holding ``metadata``'s tables: the
    one unsharded database a test compares the cluster's answers with."""
    url = make_url(dev.shards[0].primary.url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        c.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    engine = create_engine(url.set(database=name))
    metadata.create_all(engine)
    return engine


def database_on_every_shard(dev: Any, db: str) -> dict[str, Any]:
    """``dev``'s config with every shard's primary URL naming database ``db``, made afresh
    (dropped first) on every shard."""
    for shard in dev.shards:
        with shard.primary.connect(dbname="postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {db}")
            c.execute(f"CREATE DATABASE {db}")
    cfg = dev.config_dict()
    for s in cfg["shards"]:
        s["primary"] = s["primary"].rsplit("/", 1)[0] + "/" + db
    return cfg
