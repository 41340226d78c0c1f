"""The SQL hash functions agree with Python's, key for key.

Rows are placed by Python (:mod:`shardkit._hashing`) and later selected and
verified by bucket inside PostgreSQL (:mod:`shardkit._sql`), so any
disagreement would lose rows during a bucket move.  Keys go to the server
thousands at a time, as one array per query, to keep this fast.

Everything runs in a scratch database on the first shard's primary, so that
installing and uninstalling cannot disturb other tests of the session.
"""

from __future__ import annotations

import random
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo

from shardkit import _sql
from shardkit._hashing import hash_key

pytestmark = pytest.mark.integration

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
BUCKET_COUNTS = (1, 7, 1024, 4096)
INT_TYPES = ("bigint", "integer", "smallint")

EDGE_INTS = sorted(
    {0, 1, -1, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1}
    | {sign * (2**k) + d for k in (8, 15, 16, 31, 32, 33, 47, 48, 62) for sign in (1, -1)
       for d in (-1, 0, 1)}
)

# Strings whose UTF-8 lengths cover every tail case (0 to 3 bytes after the
# last whole block) with characters of 1 to 4 bytes, some of them straddling
# a block boundary.
EDGE_STRINGS = [
    "", "a", "ab", "abc", "abcd", "abcde", "abcdefgh", "abcdefghi",
    "é", "aé", "aaé", "aaaé", "éé", "€", "a€", "aa€", "aaa€", "€€",
    "😀", "a😀", "aa😀", "aaa😀", "😀😀", "é漢字", "ÿ\u0080\u07ff\u0800\uffff",
    "\U0010ffff", "e\u0301", "\u00e9", "x" * 10_000, "漢" * 1_001,
]

# PostgreSQL reads a block with its top bit set as a negative int4: cover those.
EDGE_BYTES = [
    pattern * n for n in range(21) for pattern in (b"\x00", b"\x7f", b"\x80", b"\xff")
]

# PostgreSQL text cannot hold NUL, and UTF-8 cannot hold surrogates.
pg_text = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
int64s = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)

# The bulk of each batch comes from a generator seeded by Hypothesis: drawing
# thousands of keys from Hypothesis itself is slow, and hard to shrink anyway.
seeds = st.integers(min_value=0, max_value=2**64 - 1)

bulk = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def scratch(shardkit_dev_cluster) -> Iterator[SimpleNamespace]:
    """A fresh UTF8 database on the first shard's primary, with the functions installed.

    Has the ``url`` (SQLAlchemy) and ``dsn`` (psycopg) of the database.
    """
    primary = shardkit_dev_cluster.shards[0].primary
    name = f"shardkit_hash_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(primary.dsn, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    try:
        url = sa.make_url(primary.url).set(database=name)
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                _sql.install(conn)
        finally:
            engine.dispose()
        yield SimpleNamespace(url=url, dsn=make_conninfo(primary.dsn, dbname=name))
    finally:
        with psycopg.connect(primary.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def engine(scratch) -> Iterator[sa.Engine]:
    engine = sa.create_engine(scratch.url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def conn(engine) -> Iterator[sa.Connection]:
    # Read-only queries: one connection for the module, no transaction kept.
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


def sql_values(
    conn: sa.Connection, function: str, sql_type: str, keys: Sequence[Any]
) -> list[int]:
    """``function(key)`` for every key, computed by the server in one query.

    ``function`` is SQL with ``k`` for the key, e.g. ``shardkit.hash(k)``.
    """
    rows = conn.execute(
        sa.text(
            f"SELECT {function} FROM unnest(CAST(:keys AS {sql_type}[])) "
            "WITH ORDINALITY AS t(k, i) ORDER BY i"
        ),
        {"keys": list(keys)},
    ).scalars().all()
    assert len(rows) == len(keys)
    return rows


def assert_parity(conn: sa.Connection, sql_type: str, keys: Sequence[Any]) -> None:
    """shardkit.hash and shardkit.bucket agree with Python on every key; so does the
    bucket a scan computes in SQL for an integer key (``_sql.int8_bucket_scan``)."""
    expected = [hash_key(k) for k in keys]
    got = sql_values(conn, "shardkit.hash(k)", sql_type, keys)
    mismatches = [(k, g, e) for k, g, e in zip(keys, got, expected) if g != e]
    assert not mismatches[:10], f"{len(mismatches)} of {len(keys)} {sql_type} keys differ"
    for n in BUCKET_COUNTS:
        got = sql_values(conn, f"shardkit.bucket(k, {n})", sql_type, keys)
        if sql_type in INT_TYPES:
            scanned = scan_buckets(conn, sql_type, keys, n)
            assert scanned == got, f"bucket_count {n}: the scan's buckets differ from shardkit.bucket()'s"
        mismatches = [(k, g, e % n) for k, g, e in zip(keys, got, expected) if g != e % n]
        assert not mismatches[:10], (
            f"bucket_count {n}: {len(mismatches)} of {len(keys)} {sql_type} keys differ"
        )


def scan_buckets(conn: sa.Connection, sql_type: str, keys: Sequence[Any], n: int) -> list[Any]:
    """Every key's bucket as a scan computes it (``_sql.int8_bucket_scan``), in one query."""
    lateral, bucket = _sql.int8_bucket_scan("t.k", n)
    rows = conn.execute(
        sa.text(
            f"SELECT {bucket} FROM unnest(CAST(:keys AS {sql_type}[])) WITH ORDINALITY AS t(k, i) "
            f"{lateral} ORDER BY t.i"
        ),
        {"keys": list(keys)},
    ).scalars().all()
    assert len(rows) == len(keys)
    return rows


# --- bigint ---------------------------------------------------------------------


def test_edge_ints(conn):
    assert_parity(conn, "bigint", EDGE_INTS)


@bulk
@given(chosen=st.lists(int64s, max_size=200), seed=seeds)
def test_int64_batches(conn, chosen, seed):
    # Hypothesis picks (and shrinks) a few hundred keys; the seeded bulk around
    # them spreads over the whole range, and over narrow ones near zero.
    rnd = random.Random(seed)
    keys = chosen + [rnd.randint(INT64_MIN, INT64_MAX) for _ in range(3_000)]
    keys += [rnd.randint(-(2**rnd.randint(1, 63)), 2**rnd.randint(1, 63) - 1) for _ in range(1_000)]
    assert_parity(conn, "bigint", keys)


def test_smaller_int_types_hash_and_scan_as_bigint(conn):
    ints = [k for k in EDGE_INTS if -(2**31) <= k < 2**31] + list(range(-300, 300))
    assert_parity(conn, "integer", ints)
    assert_parity(conn, "smallint", [k for k in ints if -(2**15) <= k < 2**15])
    assert scan_buckets(conn, "bigint", [None, 5], 1024) == [None, hash_key(5) % 1024]


def test_scan_buckets_mix_each_key_once(conn):
    # The point of the LATERAL item: the planner keeps it as a subquery (OFFSET 0),
    # so the finaliser reads the mixed key as a column instead of mixing it again.
    lateral, bucket = _sql.int8_bucket_scan("t.k", 1024)
    plan = "\n".join(conn.execute(sa.text(
        f"EXPLAIN (VERBOSE) SELECT {bucket} FROM unnest(CAST(:keys AS bigint[])) AS t(k) {lateral}"
    ), {"keys": [1, 2]}).scalars())
    # (A trivial subquery scan is left out of the plan: its Result node computes the
    # mixed key, which merged into the scan would be one long expression instead.)
    assert "Subquery Scan on _shardkit_m" in plan or "->  Result" in plan, plan


def test_smaller_int_types_hash_as_bigint(conn):
    row = conn.execute(
        sa.text(
            "SELECT shardkit.hash(42), shardkit.hash(CAST(-7 AS smallint)), "
            "shardkit.bucket(2147483647, 1024)"
        )
    ).one()
    assert tuple(row) == (hash_key(42), hash_key(-7), hash_key(2147483647) % 1024)


# --- text -----------------------------------------------------------------------


def test_edge_strings(conn):
    assert_parity(conn, "text", EDGE_STRINGS)


@bulk
@given(chosen=st.lists(pg_text, max_size=300), seed=seeds)
def test_string_batches(conn, chosen, seed):
    rnd = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]

    def random_string() -> str:
        return "".join(
            chr(rnd.randint(*rnd.choice(ranges))) for _ in range(rnd.randint(0, 40))
        )

    assert_parity(conn, "text", chosen + [random_string() for _ in range(1_000)])


def test_varchar_and_untyped_literals_hash_as_text(conn):
    row = conn.execute(
        sa.text(
            "SELECT shardkit.hash(CAST('acme' AS varchar(10))), shardkit.hash('acme'), "
            "shardkit.bucket('acme', 4096)"
        )
    ).one()
    assert tuple(row) == (hash_key("acme"), hash_key("acme"), hash_key("acme") % 4096)


def test_text_hashes_as_utf8_in_a_latin1_database(shardkit_dev_cluster):
    primary = shardkit_dev_cluster.shards[0].primary
    name = f"shardkit_hash_latin1_{uuid.uuid4().hex[:8]}"
    keys = ["", "abc", "é", "çà ÿ", "Grüße", "\u00a0\u00ff" * 5]
    with psycopg.connect(primary.dsn, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    try:
        engine = sa.create_engine(sa.make_url(primary.url).set(database=name))
        try:
            with engine.begin() as conn:
                _sql.install(conn)
                assert sql_values(conn, "shardkit.hash(k)", "text", keys) == [
                    hash_key(k) for k in keys
                ]
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(primary.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- uuid -----------------------------------------------------------------------


@bulk
@given(chosen=st.lists(st.uuids(), max_size=200), seed=seeds)
def test_uuid_batches(conn, chosen, seed):
    rnd = random.Random(seed)
    edges = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID(int=1), uuid.UUID(int=2**127)]
    keys = edges + chosen + [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(1_000)]
    assert_parity(conn, "uuid", keys)


# --- bytea ----------------------------------------------------------------------


def test_edge_bytes(conn):
    assert_parity(conn, "bytea", EDGE_BYTES)


@bulk
@given(chosen=st.lists(st.binary(max_size=40), max_size=200), seed=seeds)
def test_bytes_batches(conn, chosen, seed):
    # Every length 0..20 many times over, then some longer values.
    rnd = random.Random(seed)
    keys = [rnd.randbytes(n) for n in range(21) for _ in range(50)]
    keys += [rnd.randbytes(rnd.randint(21, 300)) for _ in range(200)]
    assert_parity(conn, "bytea", chosen + keys)


def test_int_key_and_its_bytes_agree(conn):
    # The bigint function is a specialisation of the bytea one.
    keys = EDGE_INTS
    by_int = sql_values(conn, "shardkit.hash(k)", "bigint", keys)
    by_bytes = sql_values(conn, "shardkit.hash(k)", "bytea", [struct.pack("<q", k) for k in keys])
    assert by_int == by_bytes


# --- behaviour of the functions ---------------------------------------------------


def test_null_key_gives_null(conn):
    row = conn.execute(
        sa.text(
            "SELECT shardkit.hash(CAST(NULL AS bigint)), shardkit.hash(CAST(NULL AS text)), "
            "shardkit.hash(CAST(NULL AS uuid)), shardkit.hash(CAST(NULL AS bytea)), "
            "shardkit.bucket(CAST(NULL AS bigint), 1024), shardkit.bucket(1, NULL)"
        )
    ).one()
    assert tuple(row) == (None,) * 6


def test_functions_are_immutable_strict_parallel_safe(conn):
    rows = conn.execute(
        sa.text(
            "SELECT p.proname, p.provolatile, p.proisstrict, p.proparallel "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'shardkit' AND p.proname IN ('hash', 'bucket', 'hash_version')"
        )
    ).all()
    assert len(rows) == 9
    assert {(r.provolatile, r.proisstrict, r.proparallel) for r in rows} == {("i", True, "s")}


def test_bucket_is_inlined(conn):
    # bucket() is a SQL function so that the planner replaces it by its body.
    plan = "\n".join(
        conn.execute(
            sa.text(
                "EXPLAIN VERBOSE SELECT shardkit.bucket(k, 1024) "
                "FROM unnest(CAST(ARRAY[1, 2] AS bigint[])) AS t(k)"
            )
        ).scalars()
    )
    assert "mod(" in plan and "bucket(" not in plan


def test_hash_version(conn):
    assert conn.execute(sa.text("SELECT shardkit.hash_version()")).scalar_one() == _sql.SQL_VERSION


# --- install / uninstall ----------------------------------------------------------


def shardkit_functions(conn: sa.Connection) -> list[str]:
    return conn.execute(
        sa.text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'shardkit' ORDER BY 1"
        )
    ).scalars().all()


def schema_exists(conn: sa.Connection) -> bool:
    return conn.execute(
        sa.text("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'shardkit')")
    ).scalar_one()


def test_install_is_idempotent(engine):
    with engine.connect() as conn:
        before = shardkit_functions(conn)
    with engine.begin() as conn:
        _sql.install(conn)
        _sql.install(conn)
    with engine.begin() as conn:
        _sql.install(conn)
        assert shardkit_functions(conn) == before
        assert conn.execute(sa.text("SELECT shardkit.hash(1)")).scalar_one() == hash_key(1)
    assert len(before) == 9


def test_uninstall_removes_everything(engine):
    # DDL is transactional: roll back, so that the other tests keep their functions.
    with engine.connect() as conn, conn.begin() as trans:
        _sql.uninstall(conn)
        assert shardkit_functions(conn) == []
        assert not schema_exists(conn)
        _sql.uninstall(conn)  # idempotent
        _sql.install(conn)
        assert conn.execute(sa.text("SELECT shardkit.bucket(1, 7)")).scalar_one() == hash_key(1) % 7
        trans.rollback()


def test_uninstall_keeps_a_schema_holding_other_objects(engine):
    with engine.connect() as conn, conn.begin() as trans:
        conn.execute(sa.text("CREATE TABLE shardkit.other_component (id int)"))
        _sql.uninstall(conn)
        assert shardkit_functions(conn) == []
        assert schema_exists(conn)
        trans.rollback()


def test_install_and_uninstall_sql_scripts(scratch):
    # The constants run as whole scripts too, e.g. from a migration tool.
    with psycopg.connect(scratch.dsn) as raw:
        raw.execute(_sql.UNINSTALL_SQL)
        assert raw.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'shardkit'"
        ).fetchone() == (0,)
        raw.execute(_sql.INSTALL_SQL)
        raw.execute(_sql.INSTALL_SQL)
        assert raw.execute("SELECT shardkit.hash(CAST('abc' AS text))").fetchone() == (
            hash_key("abc"),
        )
        raw.rollback()


def test_concurrent_installs_do_not_fail(engine):
    # Without the advisory lock, a second CREATE OR REPLACE of the same
    # function waits for the first, then fails with "tuple concurrently updated".
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            with engine.begin() as conn:
                barrier.wait(timeout=30)
                _sql.install(conn)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
