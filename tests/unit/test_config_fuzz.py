"""A fuzzer of cluster descriptions (dicts and TOML files), and the defects it found.

The promise (README, "Configuration reference"): every mistake in a cluster description
is a ``ConfigurationError`` whose ``.field`` names the setting, and no message shows a
password.  Starting from a valid description that uses every setting, hypothesis replaces
any value at any depth by one of another type (None, booleans, integers huge and small,
nan/inf, strings blank, unicode, with control characters, ``${...}`` references good and
broken, dates and times, lists, tables, nested), deletes settings, adds unknown ones,
duplicates names, tables and list values; and it writes such descriptions as TOML files,
and random text as one.  Whatever it gives, ``Cluster.from_config`` (which connects to
nothing here: no ``[catalog]``) either builds a cluster from a description that makes
sense, or raises ``ConfigurationError`` naming a field; the password planted in every URL
never shows.  No server is needed.
"""

from __future__ import annotations

import copy
import datetime
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit import Cluster, ConfigurationError, load_config
from shardkit._strategies import ListStrategy, RangeStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inproc_cli import run  # noqa: E402

PW = "s3cr3t-PW"
ENV = {"DB_PW": PW, "EMPTY": "", "NAME": "shop", "DB_URL": f"postgresql+psycopg://app:{PW}@envhost/shop"}
FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def url(host: str, query: str = "") -> str:
    return f"postgresql+psycopg://app:{PW}@{host}.example:5432/shop{query}"


def base() -> dict:
    """A valid description using every setting (a fresh copy each time)."""
    return {
        "name": "shop",
        "bucket_count": 8,
        "shards": [
            {"name": "s0", "primary": url("db0"),
             "replicas": [url("db0r"), {"url": "postgresql+psycopg://app:${DB_PW}@db0r2/shop", "weight": 2,
                                        "pool": {"size": 2}}],
             "buckets": ["0-3"], "pool": {"size": 3}, "primary_pool": {"max_overflow": 4}},
            {"name": "s1", "primary": url("db1", f"?sslmode=require&sslpassword={PW}"), "buckets": [4, 5, "6-7"]},
        ],
        "groups": {
            "users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}},
            "events": {"strategy": "range", "tables": {"events": "id"},
                       "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "shard": "s1"}]},
            "pairs": {"strategy": "range", "tables": {"pairs": ["a", "b"]},
                      "ranges": [{"to": [5, 0], "shard": "s0"}, {"from": [5, 0], "shard": "s1"}]},
            "tenants": {"strategy": "list", "tables": {"tenants": "region", "invoices": "region"},
                        "values": {"s0": ["eu", "uk"], "s1": ["us"]}, "default": "s1"},
            "days": {"strategy": "range", "tables": {"logs": "day"},
                     "ranges": [{"to": datetime.date(2024, 1, 1), "shard": "s0"},
                                {"from": datetime.date(2024, 1, 1), "shard": "s1"}]},
            "legacy": {"strategy": "custom", "tables": {"legacy": "code"}, "function": "os.path:basename"},
        },
        "reference_tables": ["countries", "archive.plans"],
        "replicas": {"consistency": "eventual", "max_lag_seconds": 5.0, "max_lag_bytes": 100,
                     "policy": "random", "poll_interval": 0.2, "poll_timeout": 0.5, "ban_seconds": 5.0,
                     "when_no_replica": "primary", "wait_for_token": 0.0},
        "pool": {"size": 5, "max_overflow": 10, "timeout": 30, "recycle": -1, "pre_ping": True,
                 "max_connections": 50, "prepared_statements": True},
    }


def _paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))


PATHS = [p for p in _paths(base()) if p]


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


# Strings a description may hold by mistake: blank, unicode, control characters, ${...}
# references that work and that do not, URLs (with the password) in the wrong place.
SPECIAL_STRINGS = [
    "", " ", "\t", "\n", "\x00", "\x7f", "\u00a0", "\u200b", "é", "😀", "s0", "s1", "s9", "0-3", "3-0", "-1",
    "hash", "range", "list", "custom", "id", "users", "true", "1", "1.5", "nan", "inf",
    "${DB_PW}", "${EMPTY}", "${UNSET_CFGFUZZ}", "${UNSET_CFGFUZZ:-s0}", "${NAME}", "${", "${}", "$${X}", "${X",
    "${X:-${Y}", "${DB_PW:-${UNSET_CFGFUZZ}}", "${EMPTY:-${DB_PW}}", "}", "$", "${ X}", "${DB_URL}",
    url("elsewhere"), f"postgresql://app:{PW}@/x", f"postgres://app:{PW}@h/db", f"mysql://app:{PW}@h/db",
    f"host=h password={PW}", f"postgresql+psycopg://app:{PW}@h:bad/db", f"postgresql+psycopg://app@h/db?password={PW}",
    "os.path:nope", "os:getcwd", "no_such_module_cfgfuzz:f", "x" * 200,
]
# (10 ** 5000 is made in a map: hypothesis shows a sampled_from's elements, and Python prints no int of
# more than 4300 digits.)
HUGE = [2 ** 63, -2 ** 63 - 1, 10 ** 30, -10 ** 30, 2 ** 1024]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2 ** 21), st.sampled_from(HUGE), st.just(5000).map(lambda n: 10 ** n),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=6), st.dates(), st.times(), st.datetimes(),
    st.datetimes(timezones=st.just(datetime.timezone.utc)), st.sampled_from([Decimal("NaN"), Decimal("1.5")]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["size", "url", "shard", "to", "from", "s0",
                                                                 "name", "x", "tables"]) | st.text(max_size=4)
                                                 | st.integers(0, 2) | st.none(),
                                                 inner, max_size=3)), max_leaves=6)


@st.composite
def mutated(draw):
    """A description with one to three mistakes (or none: a mutation may keep it valid)."""
    cfg = base()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "unknown", "duplicate", "catalog"]))
        paths = [p for p in _paths(cfg) if p]
        if op in ("replace", "delete"):
            path = draw(st.sampled_from(paths))
            parent = _get(cfg, path[:-1])
            if op == "replace":
                parent[path[-1]] = draw(junk)
            else:
                del parent[path[-1]]
        elif op == "unknown":
            containers = [p for p in _paths(cfg) if isinstance(_get(cfg, p), dict)]
            target = _get(cfg, draw(st.sampled_from(containers)))
            target[draw(st.sampled_from(["bogus", "name", "shards", "replicas", "pool", "url", "tables", 1, None]))] = draw(junk)
        elif op == "catalog":
            cfg["catalog"] = draw(st.just({"url": url("cat")}) | st.dictionaries(st.just("url"), junk) | junk)
        else:
            draw(st.sampled_from(DUPLICATIONS))(cfg)
    return cfg


def _dup_shard(cfg):
    if isinstance(cfg.get("shards"), list) and cfg["shards"]:
        cfg["shards"].append(copy.deepcopy(cfg["shards"][0]))


def _dup_table_across_groups(cfg):
    try:
        cfg["groups"]["events"]["tables"]["users"] = "id"
    except (KeyError, TypeError):
        pass


def _dup_list_value(cfg):
    try:
        cfg["groups"]["tenants"]["values"]["s1"].append("eu")
    except (KeyError, TypeError, AttributeError):
        pass


def _dup_reference(cfg):
    if isinstance(cfg.get("reference_tables"), list):
        cfg["reference_tables"].append("orders")


def _dup_bucket(cfg):
    try:
        cfg["shards"][1]["buckets"].append(0)
    except (KeyError, TypeError, AttributeError, IndexError):
        pass


DUPLICATIONS = [_dup_shard, _dup_table_across_groups, _dup_list_value, _dup_reference, _dup_bucket]


def _texts(e: ConfigurationError) -> str:
    return " ".join(str(x) for x in (e, repr(e), e.args, e.field, e.problem, e.hint))


def _check_error(e: ConfigurationError) -> None:
    assert isinstance(e.field, str) and e.field.strip(), f"no field named: {e!r}"
    assert PW not in _texts(e), f"the password shows: {e}"


def _check_sensible(config) -> None:
    """What an accepted description must mean."""
    names = config.shard_names
    assert names and len(set(names)) == len(names)
    assert 1 <= config.bucket_count and len(config.bucket_map) == config.bucket_count
    assert set(config.bucket_map) <= set(names)
    for s in config.shards:
        assert s.primary.drivername == "postgresql+psycopg" and s.primary.host or s.primary.query
        assert all(w > 0 and math.isfinite(w) for w in s.replica_weights)
        for pool in (s.pool, s.primary_pool, *s.replica_pools):
            _check_pool(pool)
    _check_pool(config.pool)
    r = config.replicas
    for v in (r.max_lag_seconds, r.poll_interval, r.poll_timeout, r.ban_seconds, r.wait_for_token):
        assert isinstance(v, float) and math.isfinite(v) and v >= 0
    assert isinstance(r.max_lag_bytes, int) and not isinstance(r.max_lag_bytes, bool) and r.max_lag_bytes >= 0
    owner: dict[str, str] = {}
    for g in config.groups:
        assert g.tables
        arity = {len(cols) for cols in g.tables.values()}
        assert len(arity) == 1
        for t, cols in g.tables.items():
            assert isinstance(t, str) and t.strip() and t not in owner, t
            assert all(isinstance(c, str) and c for c in cols)
            owner[t] = g.name
        if isinstance(g.strategy, ListStrategy):
            for v in g.strategy.mapping:
                for part in v if isinstance(v, tuple) else (v,):
                    assert part is not None and part == part, f"nonsense list value {v!r}"
            assert set(g.strategy.mapping.values()) <= set(names)
            assert g.strategy.mapping or g.strategy.default in names
        if isinstance(g.strategy, RangeStrategy):
            assert {r.shard for r in g.strategy.ranges} <= set(names)
    assert not (config.reference_tables & set(owner))


def _labels_hold_pw(config) -> bool:
    """Whether PW is also where it is shown as given: the cluster's name, table names, a
    URL's user, host, database name (a ``${DB_PW}`` appended to a URL by the fuzzer)."""
    urls = [config.catalog_url] if config.catalog_url is not None else []
    for s in config.shards:
        urls += [s.primary, *s.replicas]
    shown = [config.name, *config.reference_tables,
             *(x for g in config.groups for t, cols in g.tables.items() for x in (t, *cols)),
             *(str(x) for u in urls for x in (u.username, u.host, u.database, u.port)),
             *(f"{k}={v}" for u in urls for k, v in u.query.items() if k not in ("password", "sslpassword"))]
    return any(PW in x for x in shown)


def _check_pool(pool) -> None:
    for key, v in pool.items():
        if key in ("pre_ping", "prepared_statements"):
            assert isinstance(v, bool)
        else:
            assert not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v), (key, v)
            assert v >= (1 if key in ("size", "max_connections") else -1 if key in ("max_overflow", "recycle") else 0)


def outcome(source, env=ENV):
    """Build the cluster (connecting to nothing); the ConfigurationError if it is refused.
    Any other exception fails the test.  (With a ``[catalog]``, a Cluster would read it:
    the description is loaded only.)"""
    if isinstance(source, dict) and source.get("catalog") is not None or (
            isinstance(source, Path) and "catalog" in source.read_text(encoding="utf-8", errors="replace")):
        try:
            config = load_config(source, env=env)
        except ConfigurationError as e:
            _check_error(e)
            return e
        _check_sensible(config)
        assert config.catalog_url is None or config.catalog_url.drivername == "postgresql+psycopg"
        if not _labels_hold_pw(config):
            assert PW not in repr(config)
        return config
    try:
        cluster = Cluster.from_config(source, env=env, follow_map=False)
    except ConfigurationError as e:
        _check_error(e)
        return e
    try:
        _check_sensible(cluster.config)
        if not _labels_hold_pw(cluster.config):
            assert PW not in repr(cluster.config) + repr(cluster)
        # Deterministic: the same description gives the same config.
        assert repr(load_config(source, env=env)) == repr(cluster.config)
    finally:
        cluster.dispose()
    return cluster.config


# ---------------------------------------------------------------------------------------------
# The fuzzers
# ---------------------------------------------------------------------------------------------


def test_the_base_description_is_valid():
    config = outcome(base())
    assert not isinstance(config, ConfigurationError), config
    assert config.shard_names == ("s0", "s1") and len(config.groups) == 6


@FUZZ
@given(mutated())
def test_mutated_descriptions_build_or_name_the_field(cfg):
    outcome(cfg)


@FUZZ
@given(st.sampled_from(PATHS), junk)
def test_any_setting_of_any_type_builds_or_names_the_field(path, value):
    cfg = base()
    _get(cfg, path[:-1])[path[-1]] = value
    outcome(cfg)


@FUZZ
@given(st.sampled_from(PATHS), st.sampled_from(SPECIAL_STRINGS), st.sampled_from(["prefix", "suffix", "whole"]),
       st.dictionaries(st.sampled_from(["DB_PW", "EMPTY", "NAME", "DB_URL", "X", "Y"]),
                       st.sampled_from(["", PW, "s0", "${DB_PW}", "a}b", "$$", url("e")]), max_size=4))
def test_broken_env_references_build_or_name_the_field(path, ref, where, env):
    """``${...}`` references anywhere, good and broken, with variables set, empty or unset."""
    cfg = base()
    parent, key = _get(cfg, path[:-1]), path[-1]
    old = parent[key]
    if isinstance(old, str) and where != "whole":
        parent[key] = ref + old if where == "prefix" else old + ref
    else:
        parent[key] = ref
    outcome(cfg, env={**env, "DB_PW": PW} if "DB_PW" not in env or env["DB_PW"] != "" else env)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str | None:
    """``v`` in TOML (inline), None where TOML has no such value (None, a Decimal)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if v.bit_length() < 1000 else None
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        items = [_toml_value(x) for x in v]
        return "[" + ", ".join(x for x in items if x is not None) + "]"
    if isinstance(v, dict):
        items = [(k, _toml_value(x)) for k, x in v.items()]
        return "{" + ", ".join(f"{_toml_string(str(k))} = {x}" for k, x in items if x is not None) + "}"
    return None


def _toml(cfg: dict) -> str:
    lines = []
    for k, v in cfg.items():
        value = _toml_value(v)
        if value is not None:
            lines.append(f"{_toml_string(str(k))} = {value}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def toml_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("config_fuzz")


def test_the_base_description_as_toml_is_valid(toml_dir):
    p = toml_dir / "base.toml"
    p.write_text(_toml(base()), encoding="utf-8")
    assert repr(outcome(p)) == repr(outcome(base()))


@FUZZ
@given(mutated())
def test_mutated_toml_files_build_or_name_the_field(toml_dir, cfg):
    """Valid TOML of the wrong shape: dates and times where strings go, and the rest."""
    p = toml_dir / "mutated.toml"
    p.write_text(_toml(cfg), encoding="utf-8")
    outcome(p)


TOML_PIECES = ["[[shards]]\n", "[shards]\n", "[groups.g]\n", "[groups.g.tables]\n", "[pool]\n", "[replicas]\n",
               "[catalog]\n", 'name = "s0"\n', f'primary = "{url("h")}"\n', "bucket_count = 4\n",
               'tables = { t = "id" }\n', "size = 0\n", "x = 1979-05-27\n", "x = 07:32:00\n",
               "name = 1979-05-27T07:32:00Z\n", "primary = 1979-05-27T00:32:00.999999-07:00\n",
               "strategy = 2024-01-01\n", "values = { s0 = [1979-05-27] }\n", "[[groups]]\n", "[[pool]]\n",
               "reference_tables = [[1], [2]]\n", "buckets = [0, 1979-05-27]\n", 'strategy = "list"\n',
               "weight = nan\n", "= 1\n", "[\n", '"\n', "a = \"\\q\"\n", "a.b.c = 1\n", "a = 1\na = 2\n",
               "\x00\n", "\ufeff", "x = 0x7fffffffffffffffffffffffffff\n", 'f = "${UNSET_CFGFUZZ}"\n']


@FUZZ
@given(st.lists(st.sampled_from(TOML_PIECES), max_size=8) | st.text(max_size=40))
def test_random_toml_text_builds_or_is_refused(toml_dir, pieces):
    text = pieces if isinstance(pieces, str) else "".join(pieces)
    p = toml_dir / "random.toml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    outcome(p)


# ---------------------------------------------------------------------------------------------
# The defects found, one regression test each
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, place", [
    ("bucket_count", lambda c, v: c.__setitem__("bucket_count", v)),
    ("shards[0].name", lambda c, v: c["shards"][0].__setitem__("name", v)),
    ("shards[1].buckets[0]", lambda c, v: c["shards"][1]["buckets"].__setitem__(0, v)),
    ("pool.size", lambda c, v: c["pool"].__setitem__("size", v)),
    ("replicas.policy", lambda c, v: c["replicas"].__setitem__("policy", v)),
    ("groups.events.ranges[0].shard", lambda c, v: c["groups"]["events"]["ranges"][0].__setitem__("shard", v)),
    ("groups.tenants.default", lambda c, v: c["groups"]["tenants"].__setitem__("default", v)),
    ("groups.users.strategy", lambda c, v: c["groups"]["users"].__setitem__("strategy", v)),
    ("groups.tenants.values.s0", lambda c, v: c["groups"]["tenants"]["values"]["s0"].append([v])),
])
@pytest.mark.parametrize("value", ["${DB_URL}", url("other"), [url("other")], f"host=h password={PW}"])
def test_a_url_given_to_another_setting_does_not_show_its_password(field, place, value):
    """A URL (``${DATABASE_URL}``) written in the wrong setting was echoed whole in the
    message refusing it, password and all: ``bucket_count: 'postgresql://app:s3cr3t-PW@...'
    must be an integer``."""
    cfg = base()
    place(cfg, value)
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == field, e
    if value != f"host=h password={PW}":
        assert "app:***@" in str(e)


def test_a_url_in_a_toml_file_setting_of_another_kind_does_not_show_its_password(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f'bucket_count = "{url("h")}"\n[[shards]]\nname = "s0"\nprimary = "{url("h")}"\n')
    e = outcome(p)
    assert e.field == "bucket_count" and "app:***@" in str(e)


@pytest.mark.parametrize("field, place", [
    ("bucket_count", lambda c, v: c.__setitem__("bucket_count", v)),
    ("shards[1].buckets[0]", lambda c, v: c["shards"][1]["buckets"].__setitem__(0, v)),
    ("groups.events.ranges[0].to", lambda c, v: c["groups"]["events"]["ranges"][0].__setitem__("to", v)),
    ("groups.tenants.default", lambda c, v: c["groups"]["tenants"].__setitem__("default", v)),
    ("shards[0].name", lambda c, v: c["shards"][0].__setitem__("name", v)),
])
def test_an_integer_python_cannot_print_is_a_configuration_error(field, place):
    """An integer of more than 4300 digits escaped as ValueError ("Exceeds the limit (4300
    digits) for integer string conversion") from the f-string of the very message that
    refused it."""
    cfg = base()
    place(cfg, 10 ** 5000)
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == field, e


def test_a_toml_integer_python_cannot_read_is_a_configuration_error(tmp_path):
    """tomllib raises ValueError (no TOMLDecodeError) for an integer of more than 4300
    digits: it escaped load_config, and `shardkit ... --config` printed a traceback."""
    p = tmp_path / "big.toml"
    p.write_text("bucket_count = " + "9" * 5000 + "\n")
    e = outcome(p)
    assert isinstance(e, ConfigurationError) and e.field == str(p) and "digits" in str(e)


def test_toml_nested_hundreds_deep_is_a_configuration_error(tmp_path):
    """tomllib recurses once per nested array: RecursionError escaped load_config."""
    p = tmp_path / "deep.toml"
    p.write_text("x = " + "[" * 2000 + "]" * 2000 + "\n")
    e = outcome(p)
    assert isinstance(e, ConfigurationError) and e.field == str(p) and "nested" in str(e)


@pytest.mark.parametrize("make", [lambda v: [v], lambda v: {"a": v}])
def test_a_dict_nested_hundreds_deep_is_a_configuration_error(make):
    """_interpolate recursed over the whole dict first: RecursionError."""
    deep = 1
    for _ in range(3000):
        deep = make(deep)
    cfg = base()
    cfg["groups"]["users"]["tables"]["users"] = deep
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field.startswith("groups.users.tables.users"), e


def test_env_defaults_nested_thousands_deep_are_a_configuration_error():
    """``${A:-${A:-...}}`` 2000 deep: _expand recursed once per default, RecursionError."""
    cfg = base()
    cfg["name"] = "${UNSET_CFGFUZZ:-" * 2000 + "x" + "}" * 2000
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == "name", e
    cfg["name"] = "${UNSET_CFGFUZZ:-${UNSET_CFGFUZZ:-${NAME}}}"       # a few levels are fine
    assert outcome(cfg).name == "shop"


@pytest.mark.parametrize("nan", [lambda: float("nan"), lambda: Decimal("NaN")])
@pytest.mark.parametrize("listed", [1, 2])
def test_a_nan_list_value_is_refused(nan, listed):
    """A NaN list value (TOML's ``nan``) was accepted, also twice on one shard (NaN equals
    nothing, not even the other NaN: no "already mapped"); no key ever matched it, and a
    group listing only NaN passed the check that some value or a default gives keys a shard."""
    cfg = base()
    cfg["groups"]["tenants"]["values"] = {"s0": [nan() for _ in range(listed)]}
    del cfg["groups"]["tenants"]["default"]
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == "groups.tenants.values.s0", e
    cfg = base()
    cfg["groups"]["pairs"] = {"strategy": "list", "tables": {"pairs": ["a", "b"]}, "values": {"s1": [["x", nan()]]}}
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == "groups.pairs.values.s1", e


@pytest.mark.parametrize("where", [(), ("shards", 0), ("pool",), ("replicas",), ("shards", 0, "replicas", 1),
                                   ("groups", "events", "ranges", 0), ("groups", "users")])
@pytest.mark.parametrize("key", [1, None, (1, 2)])
def test_a_key_that_is_no_string_is_an_unknown_setting(where, key):
    """A dict's key of another type beside a string one: _check_keys sorted the unknown
    keys together, TypeError ('<' not supported between 'str' and 'int'); alone, the
    error's field was the key itself, not a string."""
    cfg = base()
    _get(cfg, where)[key] = 1
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and isinstance(e.field, str) and repr(key) in e.field, e
    _get(cfg, where)["bogus_field"] = 1
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field.endswith("bogus_field"), e


@pytest.mark.parametrize("source", [None, 0, [base()], b"shardkit.toml", "shard\x00kit.toml"])
def test_a_description_that_is_no_path_nor_dict_is_a_configuration_error(source):
    """``Cluster.from_config(os.environ.get("SHARDKIT_CONFIG"))`` with the variable unset
    raised TypeError ("expected str, bytes or os.PathLike object, not NoneType"); a path
    with a NUL ValueError ("embedded null byte")."""
    e = outcome(source)
    assert isinstance(e, ConfigurationError) and e.field == "config", e


def test_the_text_of_a_toml_file_given_as_its_path_is_a_configuration_error():
    """``Cluster.from_config(text)`` with the file's text: a URL in it made the message say
    "<unparseable URL> is a database URL"; without one, "config file not found" echoed the
    whole text as the path, several lines."""
    text = f'bucket_count = 4\n[[shards]]\nname = "s0"\nprimary = "{url("h")}"\n'
    for source in (text, text.replace(url("h"), "${DB_URL}")):
        e = outcome(source)
        assert isinstance(e, ConfigurationError) and e.field == "config" and "tomllib.loads" in str(e), e
        assert "\n" not in str(e)


@pytest.mark.parametrize("source", ["x" * 300, "a/" * 3000])
def test_a_path_too_long_is_a_configuration_error(source):
    """``Path.is_file()`` raises OSError (ENAMETOOLONG) for such a name: it escaped."""
    e = outcome(source)
    assert isinstance(e, ConfigurationError) and "too long" in str(e), e


@pytest.mark.parametrize("body, kind", [("def f(:\n", "SyntaxError"), ("raise RuntimeError('boom')\n", "RuntimeError")])
def test_a_custom_function_whose_module_fails_to_import_is_a_configuration_error(tmp_path, monkeypatch, body, kind):
    """Only ImportError and three others were caught: a SyntaxError or any exception of
    the module's own code escaped load_config."""
    (tmp_path / "sharding_cfgfuzz_broken.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sharding_cfgfuzz_broken", raising=False)
    cfg = base()
    cfg["groups"]["legacy"]["function"] = "sharding_cfgfuzz_broken:f"
    e = outcome(cfg)
    assert isinstance(e, ConfigurationError) and e.field == "groups.legacy.function" and kind in str(e), e


# ---------------------------------------------------------------------------------------------
# The command line: one line, exit status 2, per class of mistake
# ---------------------------------------------------------------------------------------------

_SHARD = f'[[shards]]\nname = "s0"\nprimary = "{url("h")}"\n'
_GROUP = '[groups.g]\ntables = { t = "id" }\n'

CLI_CASES = {
    "toml syntax": _SHARD + "bucket_count = \n",
    "wrong type": "bucket_count = 1979-05-27\n" + _SHARD,
    "url elsewhere": f'bucket_count = "{url("h")}"\n' + _SHARD,
    "unknown key": _SHARD + "prmary = 1\n",
    "no shards": 'name = "x"\n',
    "shards a table": '[shards]\nname = "s0"\n',
    "bad url": '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:' + PW + '@h:bad/db"\n',
    "unset env": '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:${UNSET_CFGFUZZ}@h/db"\n',
    "broken env": '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app:${DB@h/db"\n',
    "date where a string goes": _SHARD + "[groups.g]\nstrategy = 2024-01-01\ntables = { t = \"id\" }\n",
    "nan list value": _SHARD + '[groups.g]\nstrategy = "list"\ntables = { t = "id" }\nvalues = { s0 = [nan] }\n',
    "duplicate table": _SHARD + _GROUP + '[groups.h]\ntables = { t = "id" }\n',
    "huge integer": "bucket_count = " + "9" * 5000 + "\n" + _SHARD,
    "deep nesting": "x = " + "[" * 1000 + "]" * 1000 + "\n" + _SHARD,
    "negative pool": _SHARD + "[pool]\nsize = -1\n",
    "inf weight": '[[shards]]\nname = "s0"\nprimary = "' + url("h") + '"\nreplicas = [{ url = "'
                  + url("r") + '", weight = inf }]\n',
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_cli_says_one_line_and_exits_2(tmp_path, monkeypatch, case):
    monkeypatch.delenv("UNSET_CFGFUZZ", raising=False)
    p = tmp_path / "bad.toml"
    p.write_text(CLI_CASES[case], encoding="utf-8")
    r = run(["route", "t", "1", "--config", str(p)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and PW not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
