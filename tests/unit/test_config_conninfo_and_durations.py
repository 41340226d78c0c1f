"""Configuration and command line, server-free.

1. ``--config`` given a libpq keyword/value connection string (``host=db0 password=...``,
   what ``$DATABASE_URL`` holds for many psycopg users) echoed it, password and all, twice
   in its "config file not found" error; only ``scheme://`` URLs were recognised.
2. A duration too large for the waits that use it was accepted and failed at run time:
   ``[pool] timeout = 1e10`` (the refusal of ``inf`` advises "a large one, if you mean 'no
   limit'") made every checkout of an exhausted pool raise OverflowError instead of
   waiting; ``[replicas] poll_timeout`` past 536870 s made libpq refuse every poll's
   ``tcp_user_timeout`` (every node down); an integer too large for a float (TOML reads
   any size) raised a bare OverflowError, not a ConfigurationError naming the field.
3. A group whose name holds a ``:`` (``[groups."eu:orders"]``) could never be named by
   ``rebalance --split GROUP:KEY`` / ``--move-value GROUP:VALUE``: the spec was cut at its
   first ``:``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from shardkit import ConfigurationError, cli, load_config
from shardkit._slices import initial_slices

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inproc_cli import run  # noqa: E402

PW = "Hunter2-s3cr3t"


def cfg(**over):
    return {"bucket_count": 16, "shards": [{"name": "s0", "primary": "postgresql+psycopg://app@db0.example/app"}],
            **over}


def err(config) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as ei:
        load_config(config, env={})
    return ei.value


# -- 1. a connection string where the config file's path goes --------------------------------

@pytest.mark.parametrize("dsn", [
    f"host=db0 user=app password={PW} dbname=shop",
    f"dbname=shop password='{PW}'",
    f"host=db0 passwrd=x password={PW}",   # a misspelt keyword: libpq would refuse it
])
def test_config_that_is_a_conninfo_string_is_refused_without_its_password(dsn):
    e = err(dsn)
    assert PW not in str(e)
    assert e.field == "config" and "connection string" in str(e)


def test_cli_config_that_is_a_conninfo_string_never_shows_the_password():
    r = run(["status", "--config", f"host=db0 user=app password={PW} dbname=shop"])
    assert r.returncode == 2 and PW not in r.stdout + r.stderr
    assert r.stderr.startswith("error: config:")


def test_a_missing_config_file_is_still_named():
    e = err("no-such-dir/shardkit.toml")
    assert "config file not found" in str(e) and "no-such-dir/shardkit.toml" in str(e)


def test_an_existing_file_named_like_a_conninfo_string_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "name=x.toml").write_text(
        '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app@db0.example/app"\n')
    assert load_config("name=x.toml", env={}).shard_names == ("s0",)


# -- 2. durations and integers too large for what uses them ----------------------------------

@pytest.mark.parametrize("section, key, value", [
    ("pool", "timeout", 1e10),
    ("pool", "timeout", threading.TIMEOUT_MAX * 2),
    ("replicas", "poll_interval", 1e10),
    ("replicas", "poll_timeout", 600_000),
])
def test_durations_past_what_their_waits_take_are_refused(section, key, value):
    e = err(cfg(**{section: {key: value}}))
    assert e.field == f"{section}.{key}"


@pytest.mark.parametrize("section, key, value", [
    ("pool", "timeout", 86_400 * 365),
    ("replicas", "poll_timeout", 3600),
    ("replicas", "poll_timeout", 536_870),
    ("replicas", "wait_for_token", 1e10),    # (only compared with the clock: any size works)
])
def test_long_durations_within_range_are_accepted(section, key, value):
    c = load_config(cfg(**{section: {key: value}}), env={})
    assert (c.pool if section == "pool" else c.replicas.__dict__)[key] == value


@pytest.mark.parametrize("section, key", [
    ("pool", "timeout"), ("pool", "size"), ("pool", "recycle"), ("replicas", "max_lag_seconds"),
    ("replicas", "max_lag_bytes"), ("replicas", "poll_interval"),
])
def test_integers_too_large_for_a_float_are_a_configuration_error(tmp_path, section, key):
    p = tmp_path / "shardkit.toml"
    p.write_text('[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app@db0.example/app"\n'
                 f'[{section}]\n{key} = {"9" * 400}\n')
    e = err(p)
    assert e.field == f"{section}.{key}" and "9" * 400 not in str(e)


def test_replica_weight_too_large_for_a_float_is_a_configuration_error():
    e = err(cfg(shards=[{"name": "s0", "primary": "postgresql+psycopg://app@db0.example/app",
                         "replicas": [{"url": "postgresql+psycopg://app@db0r.example/app",
                                       "weight": 10 ** 400}]}]))
    assert e.field == "shards[0].replicas[0].weight"


# -- 3. --split / --move-value on a group whose name holds a ':' -----------------------------

def _config_with(group: str, strategy: dict):
    return load_config({
        "bucket_count": 16,
        "shards": [{"name": n, "primary": f"postgresql+psycopg://app@{n}.example/app"} for n in ("s0", "s1")],
        "groups": {group: {"tables": {"t": "k"}, **strategy}},
    }, env={})


def test_split_names_a_range_group_whose_name_holds_a_colon():
    config = _config_with("eu:events", {"strategy": "range",
                                        "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "shard": "s1"}]})
    slices = initial_slices(config.groups)
    assert cli._group_key("eu:events:50", slices, "--split", config) == ("eu:events", 50)


def test_move_value_names_a_list_group_whose_name_holds_a_colon():
    config = _config_with("eu:tenants", {"strategy": "list", "values": {"s0": ["a:b"], "s1": ["c"]}})
    slices = initial_slices(config.groups)
    assert cli._group_key("eu:tenants:a:b", slices, "--move-value", config) == ("eu:tenants", "a:b")


def test_a_key_holding_a_colon_still_splits_at_the_first_one():
    config = _config_with("ev", {"strategy": "list", "values": {"s0": ["12:00"], "s1": ["c"]}})
    slices = initial_slices(config.groups)
    assert cli._group_key("ev:12:00", slices, "--move-value", config) == ("ev", "12:00")
