"""Tests of configuration, sharding strategies and key handling.

No server is needed.  Each test states the behaviour the README documents (or that a
demanding SQLAlchemy user would expect); a failing test here is a bug, not a flaky
expectation.  Config mistakes must be a ``ConfigurationError`` naming the field (never
a bare TypeError/KeyError/ValueError), passwords must never show, keys must route the
same way wherever they are read.
"""

from __future__ import annotations

import datetime
import enum
import json
import struct
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from shardkit import Cluster, ConfigurationError, load_config
from shardkit._hashing import bucket_for, canonical_bytes, hash_key
from shardkit._strategies import CustomStrategy, KeyRange, RangeStrategy
from shardkit.errors import NoShardForKey, RoutingError, ScatterRefused, ShardKeyError

URL = "postgresql+psycopg://app@db{}.example:5432/app"
SECRET = "Hx-Secret-9zQw4"


def base(**over):
    cfg = {
        "bucket_count": 16,
        "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}],
        "groups": {"users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}}},
        "reference_tables": ["countries"],
    }
    cfg.update(over)
    return cfg


def config_error(cfg, **kw) -> ConfigurationError:
    """The ConfigurationError that load_config raises; anything else fails the test."""
    try:
        load_config(cfg, **kw)
    except ConfigurationError as e:
        return e
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped instead of a ConfigurationError: {e}")
    pytest.fail("the mistake was accepted")


def range_group(ranges, **kw):
    return base(groups={"ev": {"strategy": "range", "tables": {"events": "id"}, "ranges": ranges, **kw}})


def list_group(values, **kw):
    return base(groups={"t": {"strategy": "list", "tables": {"tenants": "region"}, "values": values, **kw}})


# ---------------------------------------------------------------------------------------------
# Configuration: wrong types and shapes are ConfigurationErrors naming the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, field", [
    (base(bucket_count="16"), "bucket_count"),
    (base(bucket_count=16.0), "bucket_count"),
    (base(bucket_count=True), "bucket_count"),
    (base(bucket_count=0), "bucket_count"),
    (base(bucket_count=-4), "bucket_count"),
    (base(bucket_count=10**20), "bucket_count"),
    (base(shards={"s0": URL.format(0)}), "shards"),
    (base(shards=[]), "shards"),
    (base(shards=["s0"]), "shards[0]"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "replcas": []}]), "shards[0].replcas"),
    (base(shards=[{"name": 0, "primary": URL.format(0)}]), "shards[0].name"),
    (base(shards=[{"name": "s0", "primary": URL.format(0)}, {"name": " s0", "primary": URL.format(1)}]),
     "shards[1].name"),
    (base(shards=[{"name": "s0", "primary": URL.format(0)}, {"name": "s0", "primary": URL.format(1)}]),
     "shards[1].name"),
    (base(shards=[{"name": "s0"}]), "shards[0].primary"),
    (base(shards=[{"name": "s0", "primary": 5}]), "shards[0].primary"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "replicas": URL.format(1)}]), "shards[0].replicas"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "replicas": [{"url": URL.format(1), "weight": "2"}]}]),
     "shards[0].replicas[0].weight"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "buckets": "0-15"}]), "shards[0].buckets"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "buckets": [1.0]}]), "shards[0].buckets[0]"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "buckets": [{"from": 0, "to": 15}]}]),
     "shards[0].buckets[0]"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "buckets": ["0-5-15"]}]), "shards[0].buckets[0]"),
    (base(shards=[{"name": "s0", "primary": URL.format(0), "buckets": ["15-0"]}]), "shards[0].buckets[0]"),
    (base(groups=[]), "groups"),
    (base(groups={"g": "hash"}), "groups.g"),
    (base(groups={"g": {"tabels": {"t": "id"}}}), "groups.g.tabels"),
    (base(groups={"g": {"tables": ["t"]}}), "groups.g.tables"),
    (base(groups={"g": {"tables": {"t": 1}}}), "groups.g.tables.t"),
    (base(groups={"g": {"strategy": ["hash"], "tables": {"t": "id"}}}), "groups.g.strategy"),
    (base(groups={"g": {"tables": {"t": "id"}, "ranges": []}}), "groups.g.ranges"),
    (base(reference_tables="countries"), "reference_tables"),
    (base(reference_tables=["users"]), "reference_tables[0]"),
    (base(pool={"size": "5"}), "pool.size"),
    (base(pool={"size": True}), "pool.size"),
    (base(replicas={"policy": {}}), "replicas.policy"),
    (base(catalog={"uri": "x"}), "catalog.uri"),
])
def test_wrong_types_and_shapes_name_the_field(cfg, field):
    assert config_error(cfg).field == field


@pytest.mark.parametrize("ranges, field", [
    # Bounds of another type than the others: the overlap check compares them.
    ([{"to": 10, "shard": "s0"}, {"from": "10", "shard": "s1"}], "groups.ev.ranges"),
    # TOML has local dates and local date-times: a config mixing them must be refused clearly.
    ([{"to": datetime.date(2024, 1, 1), "shard": "s0"},
      {"from": datetime.datetime(2024, 1, 1), "shard": "s1"}], "groups.ev.ranges"),
    # ... and offset date-times with local ones.
    ([{"to": datetime.datetime(2024, 1, 1), "shard": "s0"},
      {"from": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), "shard": "s1"}],
     "groups.ev.ranges"),
    # A table (dict) as a bound: TOML inline tables are easy to write by mistake.
    ([{"to": {"a": 1}, "shard": "s0"}, {"from": {"a": 1}, "shard": "s1"}], "groups.ev.ranges"),
])
def test_range_bounds_of_mixed_or_unordered_types_are_a_configuration_error(ranges, field):
    """README: every mistake is a ConfigurationError naming the setting.  Unchecked, the overlap
    check (`a.upper > b.lower` in _config._parse_group) raises a bare TypeError."""
    e = config_error(range_group(ranges))
    assert e.field.startswith(field), e.field


@pytest.mark.parametrize("cfg, field", [
    (range_group([{"to": 10, "shard": ["s0"]}, {"from": 10, "shard": "s1"}]), "groups.ev.ranges[0].shard"),
    (list_group({"s0": ["eu"]}, default=["s1"]), "groups.t.default"),
])
def test_a_shard_given_as_a_list_is_a_configuration_error(cfg, field):
    """`shard = ["s0"]` / `default = ["s1"]`: check_shard does `value not in set(...)`,
    which raises TypeError (unhashable) instead of a ConfigurationError."""
    assert config_error(cfg).field == field


@pytest.mark.parametrize("value", [{"eu"}, bytearray(b"eu")])
def test_unhashable_list_values_are_a_configuration_error(value):
    """A dict config can carry any Python object; an unhashable list value must be
    refused by name, not crash with `TypeError: unhashable type`."""
    e = config_error(list_group({"s0": [value]}))
    assert e.field == "groups.t.values.s0"


@pytest.mark.parametrize("where", ["groups", "reference_tables"])
def test_an_empty_table_name_is_a_configuration_error(where):
    """`"" = "id"` is valid TOML; a table with no name can never be matched and is a typo."""
    if where == "groups":
        cfg = base(groups={"g": {"tables": {"": "id"}}})
    else:
        cfg = base(reference_tables=[""])
    e = config_error(cfg)
    assert e.field.startswith(where)


def test_even_split_with_fewer_buckets_than_shards_is_refused():
    """bucket_count = 2 with three shards and no `buckets`: the "even split" leaves s2 with
    no bucket at all, so it never receives a row.  That is a mistake (the count is fixed
    for the life of the cluster), and should be refused naming bucket_count."""
    cfg = base(bucket_count=2, shards=[{"name": f"s{i}", "primary": URL.format(i)} for i in range(3)])
    e = config_error(cfg)
    assert e.field == "bucket_count"


@pytest.mark.parametrize("section, key", [("pool", "timeout"), ("replicas", "poll_timeout")])
def test_infinite_timeouts_are_refused(tmp_path, section, key):
    """TOML has `inf`.  `pool.timeout = inf` becomes pool_timeout=inf, on which SQLAlchemy's
    queue raises OverflowError as soon as the pool is exhausted; `poll_timeout = inf` makes
    the monitor compute int(inf * 1000).  _config._number only refuses NaN and negatives."""
    p = tmp_path / "shardkit.toml"
    p.write_text('[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://u@h/db"\n'
                 f'[{section}]\n{key} = inf\n')
    e = config_error(p)
    assert e.field == f"{section}.{key}"


def test_duplicate_list_value_on_two_shards_names_the_second():
    e = config_error(list_group({"s0": ["eu"], "s1": ["eu"]}))
    assert e.field == "groups.t.values.s1" and "'s0'" in str(e)


def test_unsorted_and_gapped_ranges_are_accepted_and_sorted():
    c = load_config(range_group([{"from": 20, "shard": "s1"}, {"to": 10, "shard": "s0"}]))
    s = c.groups[0].strategy
    assert s.shard_for_key(9) == "s0" and s.shard_for_key(20) == "s1"
    with pytest.raises(NoShardForKey):
        s.shard_for_key(15)


@pytest.mark.parametrize("ranges", [
    [{"to": 11, "shard": "s0"}, {"from": 10, "shard": "s1"}],
    [{"from": 0, "to": 10, "shard": "s0"}, {"from": 0, "to": 10, "shard": "s1"}],
    [{"to": 5, "shard": "s0"}, {"to": 10, "shard": "s1"}],
    [{"from": 5, "shard": "s0"}, {"from": 10, "shard": "s1"}],
    [{"shard": "s0"}, {"shard": "s1"}],
    [{"from": 10, "to": 10, "shard": "s0"}],
])
def test_overlapping_duplicate_and_empty_ranges_are_refused(ranges):
    assert config_error(range_group(ranges)).field.startswith("groups.ev.ranges")


@pytest.mark.parametrize("spec", ["nope_mod_xyz:f", "os:nope", ":f", "os:", "os.path.join", ".rel:f",
                                  "os:sep", 5, None])
def test_custom_strategy_bad_import_paths(spec):
    cfg = base(groups={"g": {"strategy": "custom", "tables": {"t": "id"}, "function": spec}})
    assert config_error(cfg).field == "groups.g.function"


# ---------------------------------------------------------------------------------------------
# ${ENV} interpolation
# ---------------------------------------------------------------------------------------------


def _primary(url: str, env: dict[str, str]):
    return load_config(base(shards=[{"name": "s0", "primary": url}]), env=env).shards[0].primary


def test_env_interpolation_basics():
    assert _primary("postgresql+psycopg://app:${PW}@h/db", {"PW": "pw1"}).password == "pw1"
    assert _primary("postgresql+psycopg://app:${PW:-dflt}@h/db", {}).password == "dflt"
    assert _primary("postgresql+psycopg://app:${PW:-dflt}@h/db", {"PW": ""}).password == "dflt"
    assert _primary("postgresql+psycopg://app:$${X}@h/db", {}).password == "${X}"
    assert _primary("postgresql+psycopg://app:pa$$w@h/db", {}).password == "pa$w"
    # a value is not interpolated again
    assert _primary("postgresql+psycopg://app:${PW}@h/db", {"PW": "a${B}c"}).password == "a${B}c"
    e = config_error(base(shards=[{"name": "s0", "primary": "postgresql+psycopg://app:${PW}@h/db"}]), env={})
    assert e.field == "shards[0].primary" and "PW" in str(e)
    e = config_error(base(shards=[{"name": "s0", "primary": "postgresql+psycopg://app:${PW@h/db"}]),
                     env={"PW": "x"})
    assert e.field == "shards[0].primary"
    # in a non-URL field: substituted as a string, then refused by its own check
    assert config_error(base(bucket_count="${BC}"), env={"BC": "16"}).field == "bucket_count"
    assert load_config(base(name="${N}"), env={"N": "shop"}).name == "shop"


def test_nested_env_default_is_expanded_or_refused():
    """`${PW:-${OTHER}}` (nested default, as a shell and Docker Compose expand it) could
    yield the literal text "${OTHER}" as the password: _ENV_RE's lazy `(.*?)\\}` stops at
    the first `}` and the rest of the string is taken literally.  Either expand it or
    refuse it, never connect with a password nobody wrote."""
    url = "postgresql+psycopg://app:${PW:-${OTHER}}@h/db"
    try:
        pw = _primary(url, {"OTHER": "from-other"}).password
    except ConfigurationError as e:
        assert e.field == "shards[0].primary"
        return
    assert pw == "from-other"


# ---------------------------------------------------------------------------------------------
# Passwords never show
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://app:{SECRET}@h:notaport/db",
    f"mysql://app:{SECRET}@h/db",
    f"postgresql+psycopg2://app:{SECRET}@h/db",
    f"postgresql+psycopg://app:{SECRET}@/db",
    f"postgresql+psycopg://app:{SECRET}@h",
    f"postgresql+psycopg://app:{SECRET}@x@h/db",
    "postgresql+psycopg://app:${PW}@h:${PORT}/db",
])
def test_password_never_in_url_errors(url):
    e = config_error(base(shards=[{"name": "s0", "primary": url}]), env={"PW": SECRET, "PORT": "xx"})
    assert SECRET not in f"{e} {e!r} {e.field} {e.hint} {e.problem}"


def test_password_never_in_repr_of_config_or_cluster():
    """repr(ClusterConfig) is the dataclass repr; its catalog_url is a raw SQLAlchemy URL,
    whose repr hides the userinfo password but not a libpq `?password=` (which
    mask_url handles for shards)."""
    cfg = base(
        shards=[{"name": "s0", "primary": f"postgresql+psycopg://app:{SECRET}@h/db?sslpassword={SECRET}",
                 "replicas": [{"url": f"postgresql+psycopg://app@h/db?password={SECRET}", "weight": 2}]},
                {"name": "s1", "primary": f"postgresql+psycopg://app@h/db?password={SECRET}"}],
        catalog={"url": f"postgresql+psycopg://app@cat/db?password={SECRET}"},
    )
    c = load_config(cfg)
    no_catalog = load_config({k: v for k, v in cfg.items() if k != "catalog"})
    shown = [repr(c), str(c), repr(c.shards), str(c.shards[0]), repr(c.groups),
             repr(no_catalog), repr(Cluster(no_catalog, follow_map=False))]
    for text in shown:
        assert SECRET not in text, text


# ---------------------------------------------------------------------------------------------
# TOML files
# ---------------------------------------------------------------------------------------------

GOOD_TOML = ('bucket_count = 4\n[[shards]]\nname = "a"\nprimary = "postgresql://u@h/db"\n'
             '[groups.g]\ntables = { t = "k" }\n')


def test_toml_file_errors(tmp_path):
    e = config_error(tmp_path / "nope.toml")
    assert "not found" in str(e)
    e = config_error(tmp_path)
    assert "directory" in str(e).lower()
    bad = tmp_path / "bad.toml"
    bad.write_text('bucket_count = 4\n[[shards]]\nname = "a"\nprimary = postgresql://u@h/db\n')
    e = config_error(bad)
    assert "line 4" in str(e)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    config_error(latin)
    crlf = tmp_path / "crlf.toml"
    crlf.write_bytes(GOOD_TOML.replace("\n", "\r\n").encode())
    assert load_config(crlf).bucket_count == 4


def test_toml_file_with_utf8_bom(tmp_path):
    """Editors on Windows save UTF-8 with a byte order mark.  Unhandled, the file is refused as
    `invalid TOML: Invalid statement (at line 1, column 1)`, which points at a line that
    looks fine.  Read it (utf-8-sig), or say that the BOM is the problem."""
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD_TOML.encode())
    try:
        c = load_config(p)
    except ConfigurationError as e:
        assert "bom" in str(e).lower() or "byte order mark" in str(e).lower(), str(e)
        return
    assert c.bucket_count == 4


def test_composite_range_group_from_toml_routes(tmp_path):
    """TOML has no tuples: composite range bounds are arrays, i.e. lists.  Keys of a
    composite key are tuples (README), and `(5, 0) < [5, 0]` is a TypeError, so every key
    of such a group fails with ShardKeyError although the config was accepted.  The config
    must convert the bounds to tuples (or refuse composite range groups up front)."""
    p = tmp_path / "shardkit.toml"
    p.write_text(
        'bucket_count = 4\n'
        '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://u@h0/db"\n'
        '[[shards]]\nname = "s1"\nprimary = "postgresql+psycopg://u@h1/db"\n'
        '[groups.rc]\nstrategy = "range"\ntables = { rc = ["a", "b"] }\n'
        'ranges = [ { to = [5, 0], shard = "s0" }, { from = [5, 0], shard = "s1" } ]\n')
    try:
        cluster = Cluster.from_config(p)
    except ConfigurationError as e:
        assert e.field.startswith("groups.rc")
        return
    assert cluster.shard_for("rc", (1, 9)) == "s0"
    assert cluster.shard_for("rc", (5, 0)) == "s1"
    assert cluster.shard_for("rc", (7, -3)) == "s1"


# ---------------------------------------------------------------------------------------------
# Hashing: the documented canonical bytes
# ---------------------------------------------------------------------------------------------


def _murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """An independent reference implementation of MurmurHash3_x86_32."""
    c1, c2, m = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed
    n = len(data) // 4
    for i in range(n):
        k = struct.unpack_from("<I", data, 4 * i)[0]
        k = (k * c1) & m
        k = ((k << 15) | (k >> 17)) & m
        k = (k * c2) & m
        h ^= k
        h = ((h << 13) | (h >> 19)) & m
        h = (h * 5 + 0xE6546B64) & m
    tail = data[4 * n:]
    k = 0
    for i, b in enumerate(tail):
        k |= b << (8 * i)
    if tail:
        k = (k * c1) & m
        k = ((k << 15) | (k >> 17)) & m
        k = (k * c2) & m
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    h ^= h >> 16
    return h


scalar_keys = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=40).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    st.binary(max_size=40),
    st.uuids(),
)


def _expected_bytes(k) -> bytes:
    if isinstance(k, int):
        return struct.pack("<q", k)
    if isinstance(k, str):
        return k.encode("utf-8")
    if isinstance(k, uuid.UUID):
        return k.bytes
    return bytes(k)


@settings(max_examples=300, deadline=None)
@given(st.one_of(scalar_keys, st.tuples(scalar_keys), st.tuples(scalar_keys, scalar_keys, scalar_keys)),
       st.integers(1, 1 << 20))
def test_hash_matches_the_documented_format_and_a_reference_murmur3(key, count):
    if isinstance(key, tuple):
        want = b"".join(struct.pack("<I", len(_expected_bytes(p))) + _expected_bytes(p) for p in key)
    else:
        want = _expected_bytes(key)
    assert canonical_bytes(key) == want
    assert hash_key(key) == _murmur3_x86_32(want)
    assert bucket_for(key, count) == _murmur3_x86_32(want) % count


@pytest.mark.parametrize("key", [True, False, 1.0, Decimal(1), None, [1, 2], (), ((1,),), (1, None),
                                 2**63, -(2**63) - 1, datetime.date(2024, 1, 1), "\ud800"])
def test_unhashable_keys_are_shard_key_errors(key):
    with pytest.raises(ShardKeyError):
        bucket_for(key, 1024)


def test_int64_limits_and_uuid_forms():
    assert canonical_bytes(2**63 - 1) == b"\xff" * 7 + b"\x7f"
    assert canonical_bytes(-(2**63)) == b"\x00" * 7 + b"\x80"
    u = uuid.UUID(int=7)
    assert canonical_bytes(u) == u.bytes
    assert canonical_bytes("é") != canonical_bytes("e\u0301")  # not normalised, as documented


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def range_layouts(draw):
    points = sorted(draw(st.sets(st.integers(-50, 50), min_size=1, max_size=8)))
    bounds = ([None] if draw(st.booleans()) else []) + points + ([None] if draw(st.booleans()) else [])
    out = [KeyRange(a, b, draw(st.sampled_from(["s0", "s1", "s2"])))
           for a, b in zip(bounds, bounds[1:]) if draw(st.integers(0, 3))]  # 0: leave a gap
    return out or [KeyRange(None, None, "s0")]


def _linear(ranges, k):
    for r in ranges:
        if (r.lower is None or k >= r.lower) and (r.upper is None or k < r.upper):
            return r.shard
    return None


@settings(max_examples=300, deadline=None)
@given(range_layouts(), st.integers(-60, 60), st.integers(-60, 60), st.booleans(), st.booleans())
def test_range_strategy_agrees_with_a_linear_scan(ranges, k, hi, lo_incl, hi_incl):
    s = RangeStrategy(list(reversed(ranges)))
    try:
        got = s.shard_for_key(k)
    except NoShardForKey:
        got = None
    assert got == _linear(ranges, k)
    # intervals: a superset of the shards holding any key in it
    shards = s.shards_for_interval(k, hi, low_inclusive=lo_incl, high_inclusive=hi_incl)
    need = {_linear(ranges, x) for x in range(-70, 71)
            if (x > k or (lo_incl and x == k)) and (x < hi or (hi_incl and x == hi))} - {None}
    assert need <= set(shards)


def test_range_boundaries_and_open_ends():
    c = load_config(range_group([{"to": 10, "shard": "s0"}, {"from": 10, "to": 100, "shard": "s1"},
                                 {"from": 200, "shard": "s0"}]))
    s = c.groups[0].strategy
    assert [s.shard_for_key(k) for k in (-(10**30), 9, 10, 99, 200, 10**30)] == \
        ["s0", "s0", "s1", "s1", "s0", "s0"]
    for gap in (100, 150, 199):
        with pytest.raises(NoShardForKey):
            s.shard_for_key(gap)
    with pytest.raises(ShardKeyError):
        s.shard_for_key(None)
    with pytest.raises(ShardKeyError):
        s.shard_for_key("10")


def test_range_of_dates_and_strings():
    d = load_config(range_group([{"to": datetime.date(2024, 1, 1), "shard": "s0"},
                                 {"from": datetime.date(2024, 1, 1), "shard": "s1"}])).groups[0].strategy
    assert d.shard_for_key(datetime.date(2023, 12, 31)) == "s0"
    assert d.shard_for_key(datetime.date(2024, 1, 1)) == "s1"
    with pytest.raises(ShardKeyError):
        d.shard_for_key("2024-01-01")
    s = load_config(range_group([{"to": "m", "shard": "s0"}, {"from": "m", "shard": "s1"}])).groups[0].strategy
    assert s.shard_for_key("") == "s0" and s.shard_for_key("m") == "s1" and s.shard_for_key("zz") == "s1"


def test_list_strategy_default_missing_and_case():
    s = load_config(list_group({"s0": ["eu"], "s1": ["us"]})).groups[0].strategy
    assert s.shard_for_key("eu") == "s0"
    with pytest.raises(NoShardForKey):
        s.shard_for_key("EU")  # exact values, no case folding
    s = load_config(list_group({"s0": ["eu"]}, default="s1")).groups[0].strategy
    assert s.shard_for_key("zz") == "s1"


def test_custom_strategy_returning_a_non_shard_is_no_shard_for_key():
    """fn(key) -> shard name, checked against the shards: a wrong answer is NoShardForKey.
    A list answer, unchecked, escapes as `TypeError: unhashable type: 'list'` from
    `shard not in self._shards` in CustomStrategy.shard_for_key."""
    for answer in (None, "s9", 0):
        with pytest.raises(NoShardForKey):
            CustomStrategy(lambda k, a=answer: a, frozenset({"s0"})).shard_for_key(1)
    with pytest.raises(RoutingError):
        CustomStrategy(lambda k: ["s0"], frozenset({"s0"})).shard_for_key(1)


# ---------------------------------------------------------------------------------------------
# Keys through the cluster: shard_for, explain, inserts
# ---------------------------------------------------------------------------------------------

md = sa.MetaData()
users = sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True))
orders = sa.Table("orders", md, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("user_id", sa.BigInteger))
devices = sa.Table("devices", md, sa.Column("id", sa.Uuid, primary_key=True))
names = sa.Table("names", md, sa.Column("name", sa.Text, primary_key=True))
comp = sa.Table("comp", md, sa.Column("a", sa.Integer, primary_key=True), sa.Column("b", sa.Text, primary_key=True))
events = sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True))
codes = sa.Table("codes", md, sa.Column("code", sa.Integer, primary_key=True))
tenants = sa.Table("tenants", md, sa.Column("region", sa.String, primary_key=True))
countries = sa.Table("countries", md, sa.Column("code", sa.Text, primary_key=True))

CLUSTER_CFG = {
    "bucket_count": 16,
    "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}],
    "groups": {
        "users": {"tables": {"users": "id", "orders": "user_id"}},
        "devices": {"tables": {"devices": "id"}},
        "names": {"tables": {"names": "name"}},
        "comp": {"tables": {"comp": ["a", "b"]}},
        "events": {"strategy": "range", "tables": {"events": "id"},
                   "ranges": [{"to": 10, "shard": "s0"}, {"from": 10, "to": 100, "shard": "s1"},
                              {"from": 200, "shard": "s0"}]},
        "tenants": {"strategy": "list", "tables": {"tenants": "region"}, "values": {"s0": ["eu"], "s1": ["us"]}},
        "codes": {"strategy": "list", "tables": {"codes": "code"}, "values": {"s0": [1, 2], "s1": [3]},
                  "default": "s1"},
    },
    "reference_tables": ["countries"],
}


@pytest.fixture(scope="module")
def cluster():
    return Cluster.from_config(CLUSTER_CFG, metadata=md)


@pytest.fixture(scope="module")
def bare():
    return Cluster.from_config(CLUSTER_CFG)


def test_keys_of_the_wrong_type_are_refused_with_metadata(cluster):
    for table, key in (("users", "42"), ("users", True), ("users", 1.0), ("users", Decimal(1)),
                       ("names", 42), ("events", "10"), ("events", 9.5), ("events", True),
                       ("codes", True), ("codes", "1"), ("tenants", 5), ("comp", (1, 2)),
                       ("comp", ("1", "a")), ("devices", "not-a-uuid")):
        with pytest.raises(ShardKeyError):
            cluster.shard_for(table, key)


def test_uuid_string_and_uuid_route_alike_with_metadata(cluster):
    u = uuid.UUID(int=7)
    assert cluster.bucket_for("devices", u) == cluster.bucket_for("devices", str(u)) == \
        cluster.bucket_for(devices, str(u).upper()) == bucket_for(u, 16)


def test_composite_keys_must_be_tuples_of_the_right_arity(bare):
    assert bare.shard_for("comp", (1, "a")) in ("s0", "s1")
    for key in ([1, "a"], (1,), (1, "a", 2), None, 1):
        with pytest.raises(ShardKeyError):
            bare.shard_for("comp", key)
    with pytest.raises(ShardKeyError):
        bare.shard_for("users", (42,))


def test_none_keys_are_clear_errors(cluster):
    for table, key in (("users", None), ("events", None), ("comp", (None, "a"))):
        with pytest.raises(ShardKeyError):
            cluster.shard_for(table, key)


def test_list_group_null_key_is_refused_like_every_other_strategy(cluster):
    """A NULL shard key has no owner: hash and range refuse it (ShardKeyError), a
    multi-row insert into a list group refuses it too, and `verify` reports such a row as
    "with a NULL shard key" (misplaced).  But ListStrategy.shard_for_key looks None up
    like a value and returns the default shard, so shard_for() and a one-row INSERT put
    the row on the default shard, where verify then flags it."""
    with pytest.raises(ShardKeyError):
        cluster.shard_for("codes", None)
    with pytest.raises(ShardKeyError):
        cluster.explain(insert(codes).values(code=None))
    with pytest.raises(ShardKeyError):
        cluster.explain(insert(codes), [{"code": None}, {"code": 1}])


def test_reference_and_unknown_tables(cluster):
    with pytest.raises(RoutingError, match="reference table"):
        cluster.shard_for("countries", "fr")
    assert cluster.bucket_for("countries", "fr") is None
    assert cluster.bucket_for("events", 5) is None
    for call in (cluster.shard_for, cluster.bucket_for):
        with pytest.raises(RoutingError, match="not in the shard map"):
            call("nope", 1)
    unknown = sa.Table("nope", sa.MetaData(), sa.Column("id", sa.Integer))
    with pytest.raises(RoutingError):
        cluster.explain(select(unknown).where(unknown.c.id == 1))
    with pytest.raises(RoutingError):
        cluster.explain(select(users, unknown).where(users.c.id == 1))
    with pytest.raises(RoutingError):
        cluster.explain(insert(unknown).values(id=1))


def test_statements_route_like_shard_for(cluster):
    ua = users.alias("u")
    owner = cluster.shard_for(users, 42)
    assert cluster.explain(select(ua).where(ua.c.id == 42)).shards == (owner,)
    assert cluster.explain(select(users).where(users.c.id == sa.bindparam("k")), {"k": 42}).shards == (owner,)
    assert cluster.explain(insert(users).values(id=42)).shards == (owner,)
    with pytest.raises(ShardKeyError):
        cluster.explain(select(ua).where(ua.c.id == "42"))
    app_users = sa.Table("users", sa.MetaData(schema="app"), sa.Column("id", sa.BigInteger, primary_key=True))
    assert cluster.explain(select(app_users).where(app_users.c.id == 42)).shards == (owner,)
    # two groups in one statement with no key: refused, not silently scattered
    with pytest.raises(ScatterRefused):
        cluster.explain(select(users.c.id, names.c.name))
    # range and list routing of comparisons
    assert cluster.explain(select(events).where(events.c.id < 10)).shards == ("s0",)
    assert set(cluster.explain(select(events).where(events.c.id.between(5, 15))).shards) == {"s0", "s1"}
    with pytest.raises(NoShardForKey):
        cluster.explain(select(events).where(events.c.id == 150))
    assert cluster.explain(select(codes).where(codes.c.code == 99)).shards == ("s1",)


def test_a_same_named_table_in_another_schema_does_not_change_the_key_type():
    """Config table `users` (BIGINT id); the MetaData also holds `archive.users` with a TEXT
    id (an unrelated archive table).  Router.know_tables maps archive.users onto the
    configured `users` by its short name and overwrites users' key coercer with archive's,
    so `shard_for("users", 42)` is refused ("text shard key got 42") and
    `shard_for("users", "42")` is routed as text: by-name routing now disagrees with
    routing by the Table."""
    m = sa.MetaData()
    u = sa.Table("users", m, sa.Column("id", sa.BigInteger, primary_key=True))
    sa.Table("users", m, sa.Column("id", sa.Text, primary_key=True), schema="archive")
    cfg = {"bucket_count": 16,
           "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}],
           "groups": {"users": {"tables": {"users": "id"}}}}
    c = Cluster.from_config(cfg, metadata=m)
    assert c.shard_for("users", 42) == c.shard_for(u, 42)
    with pytest.raises(ShardKeyError):
        c.shard_for("users", "42")


class Region(enum.Enum):
    eu = "eu"
    us = "us"


def test_list_group_on_a_sqlalchemy_enum_column_routes_enum_members():
    """`region: Mapped[Region]` (sa.Enum) is the natural column for the README's list
    strategy by region.  SQLAlchemy persists a member by its name ('us'), and TOML can only
    list strings, so `Region.us` must route like 'us'.  If coercer_for() skipped sa.Enum,
    the list lookup would compare Region.us with 'us' and every ORM insert and keyed
    query would fail with NoShardForKey ("list value <Region.us> is not mapped") for a listed value."""
    m = sa.MetaData()
    t = sa.Table("tenants", m, sa.Column("region", sa.Enum(Region), primary_key=True))
    cfg = {"bucket_count": 16,
           "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}],
           "groups": {"t": {"strategy": "list", "tables": {"tenants": "region"},
                            "values": {"s0": ["eu"], "s1": ["us"]}}}}
    c = Cluster.from_config(cfg, metadata=m)
    assert c.explain(select(t).where(t.c.region == "us")).shards == ("s1",)
    assert c.explain(select(t).where(t.c.region == Region.us)).shards == ("s1",)
    assert c.explain(insert(t).values(region=Region.eu)).shards == ("s0",)


# ---------------------------------------------------------------------------------------------
# `shardkit route`: keys given as strings
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def route_toml(tmp_path):
    p = tmp_path / "route.toml"
    p.write_text(
        'bucket_count = 16\n'
        f'[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:{SECRET}@127.0.0.1:1/db"\n'
        f'[[shards]]\nname = "s1"\nprimary = "postgresql+psycopg://app@127.0.0.1:2/db?password={SECRET}"\n'
        '[groups.users]\ntables = { users = "id" }\n'
        '[groups.ev]\nstrategy = "range"\ntables = { events = "id" }\n'
        'ranges = [ { to = 10, shard = "s0" }, { from = 10, shard = "s1" } ]\n')
    return p


def _route(argv, capsys):
    from shardkit import cli
    rc = cli.main(["route", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_route_reads_keys_as_documented(route_toml, capsys):
    u = uuid.UUID(int=5)
    for argv, key in ((["users", "42"], 42), (["users", "42", "--type", "str"], "42"),
                      (["users", str(u)], u), (["users", str(u), "--type", "str"], str(u)),
                      (["users", "-7"], -7)):
        rc, out, err = _route([*argv, "--json", "--config", str(route_toml)], capsys)
        assert rc == 0, err
        data = json.loads(out)
        assert data["bucket"] == bucket_for(key, 16), (argv, data)
        assert SECRET not in out + err
    rc, out, err = _route(["events", "10", "--config", str(route_toml)], capsys)
    assert rc == 0 and "s1" in out and SECRET not in out
    for argv in (["users", "9223372036854775808"], ["nope", "1"], ["events", "abc"]):
        rc, out, err = _route([*argv, "--config", str(route_toml)], capsys)
        assert rc == 2 and err.startswith("error: ") and SECRET not in out + err, (argv, rc, err)


@pytest.mark.parametrize("raw", ["\u0661\u0662", "\uff14\uff12"])
def test_cli_route_type_int_refuses_what_is_not_an_ascii_integer(route_toml, capsys, raw):
    """cli._parse_key refuses non-ASCII digits under --type auto (its comment: "'١٢' would
    route as 12"), but --type int hands the text straight to int(), which reads '١٢' as 12
    and fullwidth '４２' as 42 (PostgreSQL refuses both as an integer): the CLI answers
    for a key that cannot exist in an integer column."""
    rc, out, err = _route(["users", raw, "--type", "int", "--config", str(route_toml)], capsys)
    assert rc == 2 and err.startswith("error: "), (rc, out, err)
