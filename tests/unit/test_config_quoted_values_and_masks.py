"""Configuration and command line as an operator meets them.

- a setting that must be a boolean or a number, written in quotes (as every ``${VAR}``
  makes it), says to write it without quotes: ``pre_ping = "${PRE_PING:-false}"``
  said "'false' must be true or false";
- a password that is ``***`` (what SQLAlchemy 2's ``str(url)``, and shardkit's own
  output, put in place of one) is refused: it is never the real password;
- a URL with a control character or a blank at either end (a ``${VAR}`` read from a
  secrets file ends in a newline) is refused naming the field, without showing it.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from shardkit import ConfigurationError, cli, load_config

PW = "Hunter2-secret"


def cfg(primary: str = "postgresql+psycopg://app@db0.example:5432/app", **over):
    shard = {"name": "s0", "primary": primary}
    shard.update(over.pop("shard", {}))
    return {"bucket_count": 16, "shards": [shard],
            "groups": {"users": {"tables": {"users": "id"}}}, **over}


def err(config, env=None) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as ei:
        load_config(config, env=env or {})
    return ei.value


# -- 1. quoted booleans and numbers ----------------------------------------------------------

@pytest.mark.parametrize("config, field", [
    (cfg(pool={"pre_ping": "${PRE_PING:-false}"}), "pool.pre_ping"),
    (cfg(shard={"pool": {"prepared_statements": "false"}}), "shards[0].pool.prepared_statements"),
    (cfg(bucket_count="${BUCKETS:-1024}"), "bucket_count"),
    (cfg(shard={"replicas": [{"url": "postgresql+psycopg://app@db0r.example/app", "weight": "2"}]}),
     "shards[0].replicas[0].weight"),
])
def test_a_quoted_boolean_or_number_says_to_write_it_without_quotes(config, field):
    e = err(config)
    assert e.field == field
    assert e.hint and "without quotes" in e.hint, str(e)
    assert "'false' must be true or false" not in str(e)


def test_a_quoted_boolean_through_the_command_line_is_one_line_with_the_fix(tmp_path, capsys):
    path = tmp_path / "shardkit.toml"
    path.write_text('bucket_count = 16\n[[shards]]\nname = "s0"\n'
                    'primary = "postgresql+psycopg://app@db0.example/app"\n'
                    '[groups.users]\ntables = { users = "id" }\n'
                    '[pool]\npre_ping = "${SK_TEST_PRE_PING:-false}"\n', encoding="utf-8")
    assert cli.main(["route", "users", "1", "-c", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("error: pool.pre_ping:")
    assert "without quotes" in out.err


# -- 2. a masked password ---------------------------------------------------------------------

def _sa_str(password: str) -> str:
    # What str() of a SQLAlchemy 2 URL gives: the password hidden.
    return str(URL.create("postgresql+psycopg", username="app", password=password,
                          host="db0.example", database="app"))


@pytest.mark.parametrize("where, field", [
    ("primary", "shards[0].primary"),
    ("replica", "shards[0].replicas[0]"),
    ("catalog", "catalog.url"),
])
def test_a_password_masked_as_stars_is_refused(where, field):
    url = _sa_str(PW)
    assert ":***@" in url   # (SQLAlchemy 2's str(url))
    if where == "primary":
        config = cfg(url)
    elif where == "replica":
        config = cfg(shard={"replicas": [url]})
    else:
        config = cfg(catalog={"url": url})
    e = err(config)
    assert e.field == field
    assert "render_as_string(hide_password=False)" in str(e)


def test_a_masked_query_string_password_is_refused_too():
    # As shardkit's own output shows one (mask_url): ?password=*** / ?sslpassword=***.
    for query in ("password=***", "sslpassword=%2A%2A%2A", "sslpassword=***"):
        e = err(cfg(f"postgresql+psycopg://app@db0.example/app?{query}"))
        assert e.field == "shards[0].primary" and "***" in e.problem


def test_a_real_password_with_stars_in_it_is_accepted():
    url = URL.create("postgresql+psycopg", username="app", password="a***b", host="h", database="d")
    loaded = load_config(cfg(url.render_as_string(hide_password=False)))
    assert loaded.shards[0].primary.password == "a***b"


# -- 3. control characters and blanks at the ends -----------------------------------------------

@pytest.mark.parametrize("url, env", [
    # A secret file read into the environment ends in a newline.
    ("postgresql+psycopg://app:${PW}@db0.example/app", {"PW": PW + "\n"}),
    ("${DATABASE_URL}", {"DATABASE_URL": f"postgresql+psycopg://app:{PW}@db0.example/app\n"}),
    ("${DATABASE_URL}", {"DATABASE_URL": f" postgresql+psycopg://app:{PW}@db0.example/app"}),
    ("${DATABASE_URL}", {"DATABASE_URL": f"postgresql+psycopg://app:{PW}@db0.example/app\r\n"}),
    (f"postgresql+psycopg://app:{PW}\t@db0.example/app", {}),
    (f"postgresql+psycopg://app:{PW}@db0.example/app ", {}),
])
def test_a_url_with_a_control_character_or_an_end_blank_is_refused(url, env):
    e = err(cfg(url), env)
    assert e.field == "shards[0].primary"
    assert "newline" in str(e) and PW not in str(e) and "Hunter2" not in repr(vars(e))


def test_a_space_inside_a_password_and_encoded_control_characters_are_kept():
    loaded = load_config(cfg("postgresql+psycopg://app:a b%0A@db0.example/app"))
    assert loaded.shards[0].primary.password == "a b\n"


# -- 4. a list of replica URLs at the top level ---------------------------------------------------

def test_replica_urls_at_the_top_level_say_where_they_go():
    """``replicas = ["postgresql+psycopg://..."]`` above the first ``[[shards]]`` (replicas
    for every shard, the writer thought) said only "replicas: must be a table"."""
    e = err(cfg(replicas=["postgresql+psycopg://app@db0r.example/app"]))
    assert e.field == "replicas"
    assert e.hint and "[[shards]]" in e.hint and "[replicas]" in e.hint
    e = err(cfg(pool=[{"size": 5}]))
    assert e.field == "pool" and e.hint and "[pool]" in e.hint
