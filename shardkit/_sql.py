"""The SQL twin of :mod:`shardkit._hashing`, installed on every shard.

Moving a bucket between shards means selecting, copying and verifying exactly
the rows whose key falls in it, which has to happen inside PostgreSQL.  The
functions below compute there the same values :func:`shardkit._hashing.hash_key`
and :func:`~shardkit._hashing.bucket_for` compute in Python; the parity tests
in ``tests/integration/test_sql_hash_parity.py`` hold them to that.  They live
in the schema ``shardkit``::

    shardkit.hash(key bigint) -> bigint          -- also int2/int4, cast implicitly
    shardkit.hash(key text)   -> bigint          -- also varchar, cast implicitly
    shardkit.hash(key uuid)   -> bigint
    shardkit.hash(key bytea)  -> bigint
    shardkit.bucket(key <any of the above>, bucket_count integer) -> integer
    shardkit.hash_version()   -> integer         -- SQL_VERSION of the installed set

``hash`` is the unsigned 32-bit MurmurHash3_x86_32 (seed 0) of the key's
canonical bytes, returned in a ``bigint``; ``bucket`` is
``mod(hash, bucket_count)``.  A ``text`` key is hashed as its UTF-8 bytes
whatever the database encoding, and a ``uuid`` as its 16 bytes in RFC 4122
order, as in Python.  Composite keys have no SQL twin.  All functions are
``IMMUTABLE STRICT PARALLEL SAFE``, so they can be used in index expressions
and in parallel plans, and installing them needs no privilege beyond creating
a schema and functions.

How the arithmetic is done
==========================

PostgreSQL has no unsigned or wrapping integer types: ``int8`` ``+``, ``-``
and ``*`` raise an error on overflow.  Every 32-bit quantity is therefore held
in a ``bigint`` and reduced with ``& 4294967295``, and each step is arranged so
that no intermediate leaves the signed 64-bit range (each helper below states
its bounds):

* A 32-bit product ``x * c mod 2**32`` with a constant ``c >= 2**31`` is
  computed as ``(x * (c - 2**32)) & 4294967295``: the two are congruent modulo
  ``2**32``, and ``|x| < 2**32``, ``|c - 2**32| <= 2**31`` keep the product
  within ``bigint``.  One multiplication, no splitting into 16-bit halves.
* A 32-bit rotation ``rotl(x, r)`` is ``mod((x << r) - 1, 4294967295) + 1``.
  Since ``2**32 = 1 (mod 2**32 - 1)``, reducing ``x << r`` modulo
  ``2**32 - 1`` adds its high bits back onto its low bits, which is the
  rotation; the ``- 1``/``+ 1`` maps the residue into ``[1, 2**32 - 1]``
  rather than ``[0, 2**32 - 2]`` so that ``x = 2**32 - 1`` rotates to itself,
  while ``x = 0`` still gives ``0`` (``mod(-1, m)`` is ``-1``).  Unlike
  ``(x << r) | (x >> (32 - r))`` it names ``x`` once, so the expressions grow
  linearly with the number of steps.
* Masks are applied only where the next step needs a 32-bit operand, since
  ``(a # b) & m = (a & m) # (b & m)``.
* ``mod()`` is spelled as a function, never as the ``%`` operator, so that
  the text goes through drivers with a ``pyformat`` parameter style (psycopg)
  unchanged, whether or not parameters accompany it.

Why PL/pgSQL
============

The expressions are built by the small Python helpers in this module rather
than written out by hand, because they are long.  ``hash()`` is nonetheless
PL/pgSQL, not an inlinable SQL function, because PostgreSQL does not eliminate
common subexpressions: the finaliser's three xor-shifts each name their input
twice, so a single inlined expression evaluates the key mixing eight times.
For ``bigint`` keys that made the fully inlined SQL version two to three
times slower than PL/pgSQL, which computes the mixed value once into a
variable and then finalises it (PL/pgSQL evaluates such simple expressions
without going through the executor).  Splitting the work between an inlined SQL function
and a PL/pgSQL finaliser was no faster, and fell off a cliff (eight times
slower) whenever the argument was an expression costing more than a few
operators, because the planner refuses to inline a function that names such
an argument twice.  ``bucket()`` names its key once, so it stays an inlinable
SQL function around ``hash()``.

A scan that needs the bucket of every row of a table with a bigint key (the
mover's copy and verification) does better without any function:
:func:`int8_bucket_scan` mixes the key once in a ``LATERAL`` subquery kept apart
by ``OFFSET 0`` and finalises it in the scan, about twice as fast as calling
``bucket()`` per row.

Keep this module in step with :mod:`shardkit._hashing`: both define the same
storage format.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy.engine import Connection

log = logging.getLogger("shardkit.sql")

__all__ = ["INSTALL_SQL", "SQL_VERSION", "UNINSTALL_SQL", "install", "int8_bucket_scan", "uninstall"]

#: Version of the installed function set, returned by ``shardkit.hash_version()``.
#: Bump it whenever the SQL below changes in any way (the values it computes
#: never may).
SQL_VERSION: Final = 1

_M32: Final = 0xFFFFFFFF

# MurmurHash3_x86_32 constants.
_C1: Final = 0xCC9E2D51
_C2: Final = 0x1B873593
_N1: Final = 0xE6546B64
_F1: Final = 0x85EBCA6B
_F2: Final = 0xC2B2AE35

# Taken for the rest of the caller's transaction by install() and uninstall(),
# so that two processes doing it at once queue up instead of one failing with
# "tuple concurrently updated".  Arbitrary but fixed: ASCII "shardkit".
_INSTALL_LOCK: Final = 0x7368_6172_646B_6974

# ---------------------------------------------------------------------------
# Expression builders.  Each returns SQL text over bigint operands, fully
# parenthesised: PostgreSQL gives & | # << >> one shared precedence.
# ---------------------------------------------------------------------------


def _u32(x: str) -> str:
    """``x mod 2**32``, in ``[0, 2**32)``, for any bigint ``x``."""
    return f"({x} & {_M32})"


def _mul32(x: str, c: int) -> str:
    """``x * c mod 2**32``, in ``[0, 2**32)``, for ``-2**32 < x < 2**32``."""
    signed = c - (1 << 32) if c >= 1 << 31 else c
    # An explicit bigint constant, so that an int4 ``x`` multiplies in int8.
    return _u32(f"({x} * ({signed})::bigint)")


def _rotl32(x: str, r: int) -> str:
    """``x`` rotated left by ``r`` bits, in ``[0, 2**32)``, for ``0 <= x < 2**32``."""
    return f"(mod(({x} << {r}) - 1, {_M32}) + 1)"


def _xorshift(x: str, s: int) -> str:
    """``x ^ (x >> s)`` for ``0 <= x < 2**32``.  Names ``x`` twice."""
    return f"({x} # ({x} >> {s}))"


def _mix_k(k: str) -> str:
    """A block's key mixing ``rotl(k * c1, 15) * c2``, left unreduced.

    For ``-2**32 < k < 2**32`` whose low 32 bits are the block; the result is
    in ``[0, 2**61)`` and congruent to the mixed block modulo ``2**32``.
    """
    return f"({_rotl32(_mul32(k, _C1), 15)} * {_C2})"


def _mix_h(h: str | None, k: str) -> str:
    """One body round ``rotl(h ^ mix_k(k), 13) * 5 + n1``, left unreduced.

    ``h`` is the previous round's unreduced result, in ``[0, 2**35)``, or
    ``None`` for the first round (where ``h = 0``); so is the result
    (``< 5 * 2**32 + 2**32``).
    """
    mixed = _mix_k(k) if h is None else f"({h} # {_mix_k(k)})"
    return f"({_rotl32(_u32(mixed), 13)} * 5 + {_N1})"


def _fmix32(h: str) -> str:
    """The finaliser (MurmurHash3 ``fmix32``) for ``0 <= h < 2**32``.

    Names ``h`` eight times, so ``h`` should be a variable.
    """
    h = _xorshift(h, 16)
    h = _mul32(h, _F1)
    h = _xorshift(h, 13)
    h = _mul32(h, _F2)
    return _xorshift(h, 16)


def _block(data: str, offset: str | int) -> str:
    """The little-endian 32-bit block at byte ``offset`` of the bytea ``data``.

    An int4, negative when the top bit is set (int4 ``<<`` wraps): its low 32
    bits are the block, which is all :func:`_mix_k` needs.
    """
    if isinstance(offset, int):
        at = [str(offset + j) for j in range(4)]
    else:
        at = [offset] + [f"{offset} + {j}" for j in (1, 2, 3)]
    b0, b1, b2, b3 = (f"get_byte({data}, {a})" for a in at)
    return f"({b0} | ({b1} << 8) | ({b2} << 16) | ({b3} << 24))"


def _tail(data: str, n: str) -> str:
    """The 0 to 3 bytes of ``data`` (of length ``n``) after its last whole block."""
    b1, b2, b3 = (f"get_byte({data}, {n} - {j})" for j in (1, 2, 3))
    return (
        f"(CASE {n} & 3 WHEN 0 THEN 0"
        f" WHEN 1 THEN {b1}"
        f" WHEN 2 THEN {b2} | ({b1} << 8)"
        f" ELSE {b3} | ({b2} << 8) | ({b1} << 16) END)"
    )


# ---------------------------------------------------------------------------
# Function definitions.
# ---------------------------------------------------------------------------


def _plpgsql_hash(key_type: str, declare: list[str], body: list[str]) -> str:
    """``shardkit.hash(key <key_type>)``: *body* leaves the finaliser's input in ``h``."""
    lines = [
        f"CREATE OR REPLACE FUNCTION shardkit.hash(key {key_type}) RETURNS bigint",
        "LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $function$",
        "DECLARE",
        *(f"    {d}" for d in declare),
        "    h bigint;",
        "BEGIN",
        *(f"    {b}" for b in body),
        f"    RETURN {_fmix32('h')};",
        "END",
        "$function$",
    ]
    return "\n".join(lines)


def _mixed_int8(key: str) -> str:
    """The finaliser's input for the bigint ``key`` (an expression naming it twice)."""
    # The 8 little-endian bytes are two blocks: the low word is key & m, and
    # for the high word the arithmetic shift key >> 32, in [-2**31, 2**31),
    # already has the right low 32 bits.  No tail; the length is 8.
    h = _mix_h(None, _u32(key))
    h = _mix_h(h, f"({key} >> 32)")
    return _u32(f"({h} # 8)")


def _hash_int8() -> str:
    return _plpgsql_hash("bigint", [], [f"h := {_mixed_int8('key')};"])


def int8_bucket_scan(key: str, bucket_count: int) -> tuple[str, str]:
    """The bucket of the bigint ``key`` of every row of a scan, computed without a call of
    ``shardkit.hash()``: ``(lateral, bucket)``, a ``, LATERAL (...)`` item to write after the
    scanned table in the FROM clause, and the bucket's expression over it.

    ``shardkit.bucket(key, n)`` with the same value, about twice as fast over many rows:
    the key is mixed once in the LATERAL subquery (``OFFSET 0`` keeps the planner from
    merging it, which would repeat the mixing for each of the eight times the finaliser
    names its input), and no PL/pgSQL function is called per row.  ``key`` is SQL for a
    column of the scanned table (an int2 or int4 is cast to bigint here, as the function's
    argument would be).  The names ``_shardkit_m`` and ``_shardkit_h`` are taken.
    """
    mixed = _mixed_int8(f"({key})::bigint")
    # After a comma rather than CROSS JOIN: a JOIN hides the table's system columns
    # (ctid) from unqualified references.
    lateral = f", LATERAL (SELECT {mixed} AS _shardkit_h OFFSET 0) AS _shardkit_m"
    return lateral, f"mod({_fmix32('_shardkit_m._shardkit_h')}, {int(bucket_count)})::integer"


def _hash_uuid() -> str:
    # Always 16 bytes: four blocks, unrolled, and no tail.
    h = None
    for offset in range(0, 16, 4):
        h = _mix_h(h, _block("data", offset))
    return _plpgsql_hash(
        "uuid",
        ["data CONSTANT bytea := uuid_send(key);"],
        [f"h := {_u32(f'({h} # 16)')};"],
    )


def _hash_bytes(key_type: str, data_from_key: str | None) -> str:
    data = "data" if data_from_key else "key"
    declare = [f"data CONSTANT bytea := {data_from_key};"] if data_from_key else []
    declare.append(f"n CONSTANT integer := length({data});")
    tail = _mix_k(_tail(data, "n"))
    return _plpgsql_hash(
        key_type,
        declare,
        [
            "h := 0;",
            "FOR i IN 0 .. n - 4 BY 4 LOOP",
            f"    h := {_mix_h('h', _block(data, 'i'))};",
            "END LOOP;",
            # Mixing in an all-zero tail changes nothing (mix_k(0) = 0), so
            # the tail needs no test of its own.
            f"h := {_u32(f'(h # {tail} # n)')};",
        ],
    )


def _sql_function(signature: str, returns: str, body: str) -> str:
    return (
        f"CREATE OR REPLACE FUNCTION {signature} RETURNS {returns}\n"
        "LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $function$\n"
        f"    SELECT {body}\n"
        "$function$"
    )


_KEY_TYPES: Final = ("bigint", "text", "uuid", "bytea")

_INSTALL_STATEMENTS: Final[tuple[str, ...]] = (
    f"SELECT pg_advisory_xact_lock({_INSTALL_LOCK})",
    "CREATE SCHEMA IF NOT EXISTS shardkit",
    _sql_function("shardkit.hash_version()", "integer", str(SQL_VERSION)),
    _hash_int8(),
    _hash_uuid(),
    _hash_bytes("bytea", None),
    # convert_to() returns the text's own bytes, uncopied, in a UTF8
    # database, and converts them in any other.
    _hash_bytes("text", "convert_to(key, 'UTF8')"),
    *(
        _sql_function(
            f"shardkit.bucket(key {t}, bucket_count integer)",
            "integer",
            "mod(shardkit.hash(key), bucket_count)::integer",
        )
        for t in _KEY_TYPES
    ),
)

_UNINSTALL_STATEMENTS: Final[tuple[str, ...]] = (
    f"SELECT pg_advisory_xact_lock({_INSTALL_LOCK})",
    *(f"DROP FUNCTION IF EXISTS shardkit.bucket({t}, integer)" for t in _KEY_TYPES),
    *(f"DROP FUNCTION IF EXISTS shardkit.hash({t})" for t in _KEY_TYPES),
    "DROP FUNCTION IF EXISTS shardkit.hash_version()",
    # Other parts of shardkit may keep objects in the schema: drop it only if
    # nothing is left in it.
    """\
DO $do$
BEGIN
    DROP SCHEMA IF EXISTS shardkit RESTRICT;
EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;
END
$do$""",
)

#: The SQL that creates the schema ``shardkit`` and the hash functions in it.
#: Idempotent; run it in one transaction.
INSTALL_SQL: Final = ";\n\n".join(_INSTALL_STATEMENTS) + ";\n"

#: The SQL that drops the hash functions, and the schema ``shardkit`` if
#: nothing else is left in it.  Idempotent; run it in one transaction.
UNINSTALL_SQL: Final = ";\n\n".join(_UNINSTALL_STATEMENTS) + ";\n"


def install(connection: Connection) -> None:
    """Create, or replace, the hash functions in the database of *connection*.

    Idempotent.  The statements run in the connection's current transaction
    (beginning one if needed), which the caller commits.
    """
    # One statement per call, so that this works whatever protocol the driver
    # uses (psycopg's extended protocol takes one statement at a time).
    for statement in _INSTALL_STATEMENTS:
        connection.exec_driver_sql(statement)


def uninstall(connection: Connection) -> None:
    """Drop the hash functions, and the ``shardkit`` schema if that leaves it empty.

    Idempotent.  Fails, changing nothing once the transaction is rolled back,
    if other objects depend on the functions (an index on
    ``shardkit.bucket(...)``, say).  Keeps them (with a warning) on a shard
    whose ownership guard uses them.  The statements run in the connection's
    current transaction, which the caller commits.
    """
    from ._guard import guard_installed  # the guard's module builds on this one

    if guard_installed(connection):
        # PostgreSQL records no dependency of the guard's PL/pgSQL triggers on these
        # functions: dropping them would make every write to a guarded table fail.
        log.warning("shardkit's SQL functions are kept: this shard's ownership guard "
                    "(`shardkit rebalance init`) uses them")
        return
    for statement in _UNINSTALL_STATEMENTS:
        connection.exec_driver_sql(statement)
