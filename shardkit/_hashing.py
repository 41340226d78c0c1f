"""Shard-key hashing: the mapping from a key to its bucket.

This module defines a storage format.  Once a row has been placed in the
bucket this code computes for its key, that placement is on disk, so the
mapping below must never change; ``tests/unit/test_hashing.py`` pins it with
hard-coded vectors.  The SQL functions in :mod:`shardkit._sql` compute the
same values inside PostgreSQL and must be kept in step with it.

The mapping
===========

::

    hash(key)          = MurmurHash3_x86_32(canonical_bytes(key), seed=0),
                         read as an unsigned 32-bit integer
    bucket(key, count) = hash(key) % count

where ``count`` is the cluster's fixed bucket count and ``canonical_bytes`` is:

=====================================  =========================================
Key type                               Canonical bytes
=====================================  =========================================
``int`` (not ``bool``)                 8 bytes, little-endian two's complement
                                       (``struct.pack('<q', key)``).  The value
                                       must fit a signed 64-bit integer.
``str``                                The UTF-8 encoding of the string, with
                                       no Unicode normalisation.
``uuid.UUID``                          Its 16 bytes in RFC 4122 (big-endian)
                                       order, i.e. ``key.bytes``.
``bytes``, ``bytearray``,              The bytes themselves.
``memoryview``
``tuple`` (composite key)              For each part in order: the part's
                                       canonical bytes, preceded by their
                                       length as 4 bytes little-endian
                                       unsigned.  Parts are any of the types
                                       above except ``tuple``.
=====================================  =========================================

Anything else raises :class:`~shardkit.errors.ShardKeyError`.  Notes on the
choices:

* ``bool`` is rejected although it is an ``int`` subclass: hashing it like
  ``0``/``1`` would silently co-locate ``True`` with the integer key ``1``,
  which is almost always a mistake in the caller.  Other ``int`` subclasses
  (``enum.IntEnum`` members, for instance) hash like their integer value.
* Strings are not normalised, so ``"é"`` written as one code point (NFC) and
  as ``"e"`` plus a combining accent (NFD) are different keys, exactly as they
  are different values to PostgreSQL.  Normalise in the application if the
  distinction is unwanted.  A string holding a lone surrogate has no UTF-8
  encoding and is rejected.
* The key's type is not part of the encoding: ``"ab"`` and ``b"ab"`` hash
  alike, as do ``1`` and ``b"\\x01" + b"\\x00" * 7``.  A table's shard key has
  one type, fixed by its schema, so this never places two rows of the same
  table inconsistently; it is also what lets PostgreSQL hash ``text`` by way
  of its UTF-8 ``bytea``.
* The length prefixes make composite keys unambiguous: ``("ab", "c")`` and
  ``("a", "bc")`` have different canonical bytes.  A one-part composite key
  ``(k,)`` is therefore *not* the same key as ``k``.
"""

from __future__ import annotations

import reprlib
import operator
import struct
import uuid
from typing import Any, Final, TypeAlias

try:
    # mmh3 >= 5: positional-only and buffer-based, measurably cheaper per call
    # than mmh3.hash(data, 0, False) on the routing hot path.
    from mmh3 import mmh3_32_uintdigest as _murmur3_32
except ImportError:  # mmh3 4.x
    import mmh3 as _mmh3

    def _murmur3_32(data: bytes, /) -> int:
        return _mmh3.hash(data, 0, False)

from shardkit.errors import ShardKeyError

__all__ = ["ScalarKey", "ShardKey", "bucket_for", "canonical_bytes", "hash_key"]

#: A single-column shard key value.
ScalarKey: TypeAlias = int | str | uuid.UUID | bytes | bytearray | memoryview
#: Any shard key value: a scalar, or a tuple of scalars for a composite key.
ShardKey: TypeAlias = ScalarKey | tuple[ScalarKey, ...]

# Precompiled packers: Struct.pack skips parsing the format string on every
# call, which matters on the routing hot path.
_pack_int64 = struct.Struct("<q").pack
_pack_uint32 = struct.Struct("<I").pack

_UINT32_LIMIT: Final = 1 << 32
_SCALARS: Final = "int (signed 64-bit), str, uuid.UUID, bytes, bytearray, memoryview"
_SUPPORTED: Final = f"{_SCALARS}, or a tuple of those for a composite key"

# Keeps error messages readable when the offending key is a huge int or a
# long string.
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 60


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(part: int | None) -> str:
    return "shard key" if part is None else f"part {part} of the composite shard key"


def _supported(part: int | None) -> str:
    if part is None:
        return f"supported types are {_SUPPORTED}"
    return f"each part must be one of {_SCALARS}"


def _encode_scalar(value: Any, key: Any, part: int | None) -> bytes:
    """Canonical bytes of a non-tuple key, or of one part of a composite key.

    ``key`` is the whole key as given by the caller, carried along so that the
    error names it; ``part`` is the index of ``value`` within it, if any.
    """
    if isinstance(value, bool):
        # Must come before the int test: bool is an int subclass.
        raise ShardKeyError(
            f"{_where(part)} {value!r} is a bool; bools are not accepted as shard "
            "keys because they would hash like the integers 1 and 0 (pass int(value) "
            f"if that is really intended); {_supported(part)}",
            key=key,
        )
    if isinstance(value, int):
        try:
            return _pack_int64(value)
        except struct.error:
            raise ShardKeyError(
                f"{_where(part)} {_repr.repr(value)} does not fit a signed 64-bit "
                f"integer (range -2**63 .. 2**63-1)",
                key=key,
            ) from None
    if isinstance(value, str):
        try:
            # Never hand a str to mmh3 itself: the byte sequence is the
            # storage format, so it is spelled out here, and mmh3 5.3 crashes
            # the interpreter on a str holding a lone surrogate.
            return value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ShardKeyError(
                f"{_where(part)} {_repr.repr(value)} is not valid Unicode (lone "
                f"surrogate at index {e.start}) and has no UTF-8 encoding",
                key=key,
            ) from None
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, bytes):
        return bytes(value)  # a bytes subclass becomes plain bytes
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, memoryview):
        # tobytes() yields the logical contents in C order whatever the
        # view's format or strides.
        return value.tobytes()
    if isinstance(value, tuple):
        raise ShardKeyError(
            f"{_where(part)} is a tuple; composite shard keys cannot be nested "
            f"({_supported(part)})",
            key=key,
        )
    # None is most often a key that was never set, rather than a wrong type.
    missing = " (is the key missing?)" if value is None else ""
    raise ShardKeyError(
        f"cannot hash {_where(part)} of type {_type_name(value)}{missing}: "
        f"{_supported(part)}",
        key=key,
    )


def _encode_composite(key: tuple[Any, ...]) -> bytes:
    if not key:
        raise ShardKeyError(
            "composite shard key is an empty tuple; it needs at least one part", key=key
        )
    chunks: list[bytes] = []
    for i, part in enumerate(key):
        data = _encode_scalar(part, key, i)
        if len(data) >= _UINT32_LIMIT:
            raise ShardKeyError(
                f"{_where(i)} is {len(data)} bytes long; a part must be shorter than 4 GiB",
                key=key,
            )
        chunks.append(_pack_uint32(len(data)))
        chunks.append(data)
    return b"".join(chunks)


def canonical_bytes(value: ShardKey) -> bytes:
    """Return the canonical byte encoding of the shard key *value*.

    See the module documentation for the encoding of each type.  A tuple
    subclass (a named tuple, say) is a composite key like a plain tuple.

    :raises ShardKeyError: *value* is of an unsupported type, a ``bool``, an
        ``int`` outside the signed 64-bit range, a string with no UTF-8
        encoding, or an empty or nested tuple.
    """
    if type(value) is int:
        try:
            return _pack_int64(value)
        except struct.error:
            pass  # _encode_scalar raises the descriptive error
    if isinstance(value, tuple):
        return _encode_composite(value)
    return _encode_scalar(value, value, None)


def hash_key(value: ShardKey) -> int:
    """Return the unsigned 32-bit MurmurHash3 (x86_32, seed 0) of *value*.

    :raises ShardKeyError: as :func:`canonical_bytes`.
    """
    return _murmur3_32(canonical_bytes(value))


def bucket_for(value: ShardKey, bucket_count: int) -> int:
    """Return the bucket of the shard key *value*: ``hash_key(value) % bucket_count``.

    *bucket_count* is a positive integer (a cluster's ``bucket_count``).  The result
    is in ``range(bucket_count)``.

    :raises ShardKeyError: as :func:`canonical_bytes`.
    :raises ValueError: *bucket_count* is not a positive integer.
    """
    try:
        count = operator.index(bucket_count)  # (an int, or what stands for one: numpy's)
    except TypeError:
        count = 0
    if count < 1 or isinstance(bucket_count, bool):
        raise ValueError(f"bucket_count must be a positive int (a cluster's bucket_count, such as "
                         f"1024), not {bucket_count!r}")
    return _bucket_for(value, count)


def _bucket_for(value: ShardKey, bucket_count: int) -> int:
    """:func:`bucket_for` with *bucket_count* known good: the hash strategy's, whose
    bucket count the configuration checked once."""
    # Every routed statement comes through here, and most shard keys are
    # plain ints or strings: handle those without the general dispatch.
    # ``type() is`` also keeps bool (an int subclass) off the int path.  On
    # failure, fall through: canonical_bytes raises the descriptive error.
    cls = type(value)
    if cls is int:
        try:
            return _murmur3_32(_pack_int64(value)) % bucket_count
        except struct.error:
            pass
    elif cls is str:
        try:
            return _murmur3_32(value.encode("utf-8")) % bucket_count
        except UnicodeEncodeError:
            pass
    return _murmur3_32(canonical_bytes(value)) % bucket_count
