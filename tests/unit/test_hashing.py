"""Shard-key hashing.

The key -> bucket mapping is a storage format: rows already placed by it must
stay findable forever.  The pinned vectors below were computed once and are
hard-coded on purpose; if one of them fails, the change broke the format, and
the fix is to revert it, never to update the vector.
"""

from __future__ import annotations

import array
import re
import enum
import struct
import uuid
from collections import namedtuple
from decimal import Decimal

import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit._hashing import bucket_for, canonical_bytes, hash_key
from shardkit.errors import RoutingError, ShardKeyError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

FIXED_UUID = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")

# key, canonical bytes (hex), unsigned MurmurHash3_x86_32 with seed 0.
PINNED = [
    (0, "0000000000000000", 1669671676),
    (1, "0100000000000000", 1392991556),
    (-1, "ffffffffffffffff", 1651860712),
    (INT64_MAX, "ffffffffffffff7f", 2188461247),
    (INT64_MIN, "0000000000000080", 1366273829),
    (2**31, "0000008000000000", 386683422),
    (2**32, "0000000001000000", 987256456),
    ("", "", 0),
    ("a", "61", 1009084850),
    ("ab", "6162", 2613040991),
    ("abc", "616263", 3017643002),  # the published test vector 0xb3dd93fa
    ("abcd", "61626364", 1139631978),
    ("abcde", "6162636465", 3902511862),
    ("é漢字", "c3a9e6bca2e5ad97", 4020686648),
    (FIXED_UUID, "6ba7b8109dad11d180b400c04fd430c8", 325945815),
    (b"", "", 0),
    (b"\x00", "00", 1364076727),
    (bytes(range(20)), "000102030405060708090a0b0c0d0e0f10111213", 2788237380),
    ((42, "acme"), "080000002a000000000000000400000061636d65", 3312165465),
    (("ab", "c"), "0200000061620100000063", 1206584791),
    (("a", "bc"), "0100000061020000006263", 1143632225),
    (
        (FIXED_UUID, b"\x01", -7),
        "100000006ba7b8109dad11d180b400c04fd430c8010000000108000000f9ffffffffffffff",
        2852059768,
    ),
]

int64s = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
scalar_keys = st.one_of(
    int64s,
    st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    st.uuids(),
    st.binary(),
)
bucket_counts = st.integers(min_value=1, max_value=2**20)


# --- pinned vectors ---------------------------------------------------------


@pytest.mark.parametrize(("key", "encoded", "expected"), PINNED, ids=repr)
def test_pinned_canonical_bytes(key, encoded, expected):
    assert canonical_bytes(key).hex() == encoded


@pytest.mark.parametrize(("key", "encoded", "expected"), PINNED, ids=repr)
def test_pinned_hash(key, encoded, expected):
    assert hash_key(key) == expected


@pytest.mark.parametrize(("key", "encoded", "expected"), PINNED, ids=repr)
@pytest.mark.parametrize("bucket_count", [1, 7, 1024, 4096])
def test_pinned_bucket(key, encoded, expected, bucket_count):
    assert bucket_for(key, bucket_count) == expected % bucket_count


def test_pinned_buckets_of_a_run_of_ints():
    # Guards the int fast path of bucket_for() on its own.
    assert [bucket_for(k, 1024) for k in range(10)] == [
        764, 324, 756, 947, 294, 759, 465, 67, 319, 503,
    ]


# --- encoding rules -----------------------------------------------------------


@given(int64s)
def test_int_encoding_is_int64_little_endian(key):
    assert canonical_bytes(key) == struct.pack("<q", key)


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_str_encoding_is_utf8(key):
    assert canonical_bytes(key) == key.encode("utf-8")


def test_str_is_not_normalised():
    nfc, nfd = "\u00e9", "e\u0301"
    assert hash_key(nfc) != hash_key(nfd)


@given(st.uuids())
def test_uuid_encoding_is_rfc4122_bytes(key):
    assert canonical_bytes(key) == key.bytes


@given(st.binary())
def test_bytes_like_keys_hash_alike(key):
    assert canonical_bytes(key) == key
    assert hash_key(bytearray(key)) == hash_key(memoryview(key)) == hash_key(key)


def test_memoryview_uses_its_logical_bytes():
    view = memoryview(array.array("H", [1, 2, 3]))
    assert canonical_bytes(view) == view.tobytes()
    strided = memoryview(b"abcdef")[::2]
    assert canonical_bytes(strided) == b"ace"


@given(st.lists(scalar_keys, min_size=1, max_size=5))
def test_composite_encoding_is_length_prefixed(parts):
    expected = b"".join(
        struct.pack("<I", len(canonical_bytes(p))) + canonical_bytes(p) for p in parts
    )
    assert canonical_bytes(tuple(parts)) == expected


@given(st.lists(st.text(), min_size=1, max_size=4), st.lists(st.text(), min_size=1, max_size=4))
def test_composite_keys_are_unambiguous(a, b):
    # Without the length prefixes ("ab", "c") and ("a", "bc") would collide.
    try:
        ca, cb = canonical_bytes(tuple(a)), canonical_bytes(tuple(b))
    except ShardKeyError:
        return  # a lone surrogate: covered by test_lone_surrogate_is_rejected
    assert (ca == cb) == (a == b)


def test_composite_differs_from_concatenation():
    assert canonical_bytes(("ab", "c")) != canonical_bytes(("a", "bc"))
    assert hash_key(("ab", "c")) != hash_key(("a", "bc"))
    assert hash_key(("abc",)) != hash_key("abc")


def test_subclasses_hash_like_their_base_type():
    class Colour(enum.IntEnum):
        RED = 5

    class Name(str):
        pass

    Pair = namedtuple("Pair", "a b")
    assert hash_key(Colour.RED) == hash_key(5)
    assert bucket_for(Colour.RED, 1024) == bucket_for(5, 1024)
    assert hash_key(Name("acme")) == hash_key("acme")
    assert bucket_for(Name("acme"), 1024) == bucket_for("acme", 1024)
    assert hash_key(Pair(1, "x")) == hash_key((1, "x"))


# --- properties ---------------------------------------------------------------


@given(st.one_of(scalar_keys, st.tuples(scalar_keys, scalar_keys)), bucket_counts)
def test_bucket_is_in_range_and_deterministic(key, bucket_count):
    bucket = bucket_for(key, bucket_count)
    assert 0 <= bucket < bucket_count
    assert bucket == bucket_for(key, bucket_count)
    assert bucket == hash_key(key) % bucket_count


@given(st.one_of(scalar_keys, st.tuples(scalar_keys, scalar_keys)))
def test_hash_is_murmur3_of_canonical_bytes(key):
    h = hash_key(key)
    assert 0 <= h < 2**32
    assert h == mmh3.hash(canonical_bytes(key), 0, False)


@given(st.integers(min_value=-(2**70), max_value=2**70), bucket_counts)
def test_int_fast_path_agrees_with_general_path(key, bucket_count):
    if INT64_MIN <= key <= INT64_MAX:
        assert bucket_for(key, bucket_count) == hash_key(key) % bucket_count
    else:
        with pytest.raises(ShardKeyError):
            bucket_for(key, bucket_count)


@given(st.text(), bucket_counts)
def test_str_fast_path_agrees_with_general_path(key, bucket_count):
    try:
        expected = hash_key(key) % bucket_count
    except ShardKeyError:
        with pytest.raises(ShardKeyError):
            bucket_for(key, bucket_count)
    else:
        assert bucket_for(key, bucket_count) == expected


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("key", [True, False])
def test_bool_is_rejected(key):
    for call in (canonical_bytes, hash_key, lambda k: bucket_for(k, 1024)):
        with pytest.raises(ShardKeyError, match="bool") as info:
            call(key)
        assert info.value.key is key


def test_bool_inside_composite_is_rejected():
    with pytest.raises(ShardKeyError, match="part 1 of the composite shard key.*bool"):
        hash_key((1, True))


@pytest.mark.parametrize("key", [2**63, INT64_MIN - 1, 10**30, -(10**30)])
def test_int_outside_int64_is_rejected(key):
    for call in (canonical_bytes, hash_key, lambda k: bucket_for(k, 1024)):
        with pytest.raises(ShardKeyError, match="signed 64-bit") as info:
            call(key)
        assert info.value.key == key


def test_huge_int_is_abbreviated_in_message():
    with pytest.raises(ShardKeyError) as info:
        hash_key(10**500)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("key", "type_name"),
    [
        (1.0, "float"),
        (None, "NoneType"),
        (Decimal("1"), "decimal.Decimal"),
        ([1, 2], "list"),
        ({"id": 1}, "dict"),
        (frozenset(), "frozenset"),
    ],
)
def test_unsupported_type_is_rejected_naming_the_types(key, type_name):
    for call in (canonical_bytes, hash_key, lambda k: bucket_for(k, 1024)):
        with pytest.raises(ShardKeyError) as info:
            call(key)
        message = str(info.value)
        assert f"of type {type_name}" in message
        for supported in ("int", "str", "uuid.UUID", "bytes", "bytearray", "memoryview", "tuple"):
            assert supported in message
        assert info.value.key is key


def test_unsupported_part_of_composite_is_rejected():
    with pytest.raises(ShardKeyError) as info:
        hash_key((1, "a", 2.5))
    assert "part 2 of the composite shard key of type float" in str(info.value)
    assert "each part must be one of int" in str(info.value)


def test_none_is_reported_as_a_missing_key():
    with pytest.raises(ShardKeyError, match="missing"):
        bucket_for(None, 1024)


def test_nested_tuple_is_rejected():
    key = (1, ("a", "b"))
    with pytest.raises(ShardKeyError, match="cannot be nested") as info:
        hash_key(key)
    assert info.value.key is key


def test_empty_tuple_is_rejected():
    with pytest.raises(ShardKeyError, match="empty"):
        bucket_for((), 1024)


def test_lone_surrogate_is_rejected():
    for call in (canonical_bytes, hash_key, lambda k: bucket_for(k, 1024)):
        with pytest.raises(ShardKeyError, match="UTF-8"):
            call("ab\ud800")
    with pytest.raises(ShardKeyError, match="part 0"):
        hash_key(("\udc80", 1))


def test_shard_key_error_is_a_routing_error():
    with pytest.raises(RoutingError):
        hash_key(None)


@pytest.mark.parametrize("count", [0, -4, 1024.0, True, "1024", None])
def test_bucket_for_refuses_a_bucket_count_that_is_not_a_positive_int(count):
    # 0 divided by zero, a negative count gave buckets <= 0, a float a float bucket.
    with pytest.raises(ValueError, match=r"bucket_count must be a positive int .*not " + re.escape(repr(count))):
        bucket_for(42, count)


def test_bucket_for_of_one_bucket_is_zero():
    assert bucket_for(42, 1) == bucket_for("x", 1) == 0


def test_bucket_for_takes_what_stands_for_an_int():
    class Count(enum.IntEnum):
        BUCKETS = 1024
    assert bucket_for(42, Count.BUCKETS) == bucket_for(42, 1024) == 318
