"""The parts of the dev cluster that need no server: TOML output, program discovery, helpers."""

import math
import re
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit import DevClusterError, load_config
from shardkit.devcluster import _deep_merge, _replay_target, _version_key, find_pg_bin, to_toml

# TOML strings cannot hold lone surrogates; everything else must survive.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=25,
)
documents = st.dictionaries(text, values, max_size=6)


@given(documents)
def test_toml_round_trip(doc):
    assert tomllib.loads(to_toml(doc)) == doc


def test_toml_layout_of_a_cluster_config():
    doc = {
        "bucket_count": 16,
        "shards": [
            {"name": "s0", "primary": "postgresql+psycopg://a@h:1/d", "replicas": []},
            {"name": "s1", "primary": "postgresql+psycopg://a@h:2/d",
             "replicas": ["postgresql+psycopg://a@h:3/d"],
             "pool": {"size": 5}},
        ],
        "groups": {"users": {"strategy": "hash", "tables": {"users": "id", "orders": ["user_id"]}}},
        "reference_tables": ["countries"],
    }
    out = to_toml(doc)
    assert tomllib.loads(out) == doc
    assert "[[shards]]" in out and "[shards.pool]" in out and "[groups.users.tables]" in out
    # Plain keys of the top level come before any section.
    assert out.index("reference_tables") < out.index("[[shards]]")
    load_config(tomllib.loads(out))


@pytest.mark.parametrize(
    "s", ['quo"te', "back\\slash", "tab\tnl\nr\r", "\x00\x1f\x7f", "ünï 😀", ""])
def test_toml_strings_and_keys_are_escaped(s):
    doc = {s: s, "t": {s: [s]}}
    assert tomllib.loads(to_toml(doc)) == doc


def test_toml_special_floats_and_nested_inline_tables():
    doc = {"a": [float("inf"), float("-inf"), -0.0, 1e300, 5e-324],
           "b": [[{"x": 1}], {"y": {"z": []}}], "e": {}, "l": [[]]}
    back = tomllib.loads(to_toml(doc))
    assert back == doc
    assert math.isnan(tomllib.loads(to_toml({"n": float("nan")}))["n"])


@pytest.mark.parametrize("bad, where", [
    ({"a": {"b": None}}, "a.b"),
    ({"a": [1, object()]}, "a[1]"),
    ({"a": {1: 2}}, "a"),
])
def test_toml_rejects_what_it_cannot_write_naming_the_key(bad, where):
    with pytest.raises(TypeError, match=rf"^{re.escape(where)}"):
        to_toml(bad)


def test_toml_rejects_integers_beyond_64_bits():
    with pytest.raises(ValueError, match="64-bit"):
        to_toml({"big": 1 << 63})


def test_deep_merge_merges_tables_and_replaces_the_rest():
    base = {"bucket_count": 8, "shards": [1], "pool": {"size": 5, "timeout": 1}}
    extra = {"shards": [2], "pool": {"size": 9}, "groups": {"g": {}}}
    assert _deep_merge(base, extra) == {
        "bucket_count": 8, "shards": [2], "pool": {"size": 9, "timeout": 1}, "groups": {"g": {}},
    }
    assert base["pool"] == {"size": 5, "timeout": 1}  # inputs untouched


def test_pg_bin_env_pointing_at_an_empty_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDKIT_PG_BIN", str(tmp_path))
    with pytest.raises(DevClusterError) as ei:
        find_pg_bin()
    msg = str(ei.value)
    assert f"SHARDKIT_PG_BIN={tmp_path}" in msg
    assert "missing: initdb, pg_ctl, postgres, pg_basebackup" in msg
    assert "unset it" in msg


def test_pg_bin_not_found_anywhere_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("SHARDKIT_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("shardkit.devcluster.glob.glob", lambda pattern: [])
    with pytest.raises(DevClusterError, match=r"apt-get install -y postgresql.*SHARDKIT_PG_BIN"):
        find_pg_bin()


def test_newest_postgresql_version_first():
    dirs = ["/usr/lib/postgresql/9.6/bin", "/usr/lib/postgresql/15/bin",
            "/usr/lib/postgresql/odd/bin", "/usr/lib/postgresql/13/bin"]
    assert sorted(dirs, key=_version_key, reverse=True)[:3] == [
        "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/13/bin", "/usr/lib/postgresql/9.6/bin",
    ]


@pytest.mark.parametrize("insert, expected", [
    (0x3000148, 0x3000148),            # mid-page: the insert position itself
    ((3 << 24) + 8192 + 24, (3 << 24) + 8192),  # right after a short page header
    ((3 << 24) + 40, 3 << 24),         # right after a segment's long page header
    ((3 << 24) + 8192 + 40, (3 << 24) + 8192 + 40),  # a record ends 16 bytes into a page
])
def test_replay_target_skips_an_empty_page_header(insert, expected):
    assert _replay_target(insert, 8192, 16 << 20) == expected


def test_up_with_a_dir_that_is_a_file_says_so(tmp_path):
    """`dev up --dir FILE` said the file "is not an empty directory and holds no dev
    cluster"; it says what it is, before anything starts."""
    from shardkit.devcluster import DevCluster

    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(DevClusterError, match="notes.txt exists and is not a directory; choose a new or empty"):
        DevCluster.up(path, 1, 0)
    assert path.read_text() == "keep me"
