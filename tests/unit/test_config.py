"""Configuration parsing: every mistake is a ConfigurationError naming the field and the fix."""

import copy
import datetime
from pathlib import Path

import pytest

from shardkit import Cluster, ConfigurationError, ShardKeyError, load_config
from shardkit._config import mask_url

URL = "postgresql+psycopg://app@db{}.example:5432/app"


def base(**over):
    cfg = {
        "bucket_count": 16,
        "shards": [
            {"name": "s0", "primary": URL.format(0), "replicas": [URL.format("0r")]},
            {"name": "s1", "primary": URL.format(1)},
        ],
        "groups": {"users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}}},
        "reference_tables": ["countries"],
    }
    cfg.update(over)
    return cfg


def err(cfg, **kw) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as ei:
        load_config(cfg, **kw)
    return ei.value


def test_valid_config_even_bucket_split():
    c = load_config(base())
    assert c.shard_names == ("s0", "s1")
    assert c.bucket_map == ("s0",) * 8 + ("s1",) * 8
    assert c.shards[0].replicas[0].host == "db0r.example"


def test_toml_file_round_trip(tmp_path):
    p = tmp_path / "shardkit.toml"
    p.write_text(
        'bucket_count = 4\n'
        '[[shards]]\nname = "a"\nprimary = "postgresql://u@h/db"\nbuckets = ["0-1"]\n'
        '[[shards]]\nname = "b"\nprimary = "postgresql+psycopg://u@h/db"\nbuckets = [2, 3]\n'
        '[groups.g]\ntables = { t = "k" }\n'
    )
    c = load_config(p)
    assert c.bucket_map == ("a", "a", "b", "b")
    # bare postgresql:// is upgraded to psycopg 3
    assert c.shards[0].primary.drivername == "postgresql+psycopg"


def test_env_interpolation_and_missing_var():
    cfg = base()
    cfg["shards"][0]["primary"] = "postgresql+psycopg://app:${DB_PW}@h/db"
    c = load_config(cfg, env={"DB_PW": "s3cret"})
    assert c.shards[0].primary.password == "s3cret"
    assert "s3cret" not in repr(c.shards[0])
    e = err(cfg, env={})
    assert e.field == "shards[0].primary" and "DB_PW" in str(e)
    cfg["shards"][0]["primary"] = "postgresql+psycopg://app:${DB_PW:-dflt}@h/db"
    assert load_config(cfg, env={}).shards[0].primary.password == "dflt"


def test_unknown_strategy():
    cfg = base()
    cfg["groups"]["users"]["strategy"] = "modulo"
    e = err(cfg)
    assert e.field == "groups.users.strategy"
    assert "hash, range, list, custom" in str(e)


def test_duplicate_shard_name():
    cfg = base()
    cfg["shards"][1]["name"] = "s0"
    e = err(cfg)
    assert e.field == "shards[1].name" and "duplicate" in str(e)


def test_bucket_map_missing_a_bucket():
    cfg = base()
    cfg["shards"][0]["buckets"] = ["0-7"]
    cfg["shards"][1]["buckets"] = ["8-14"]
    e = err(cfg)
    assert "15" in str(e) and "1 of 16 buckets" in str(e)


def test_bucket_owned_twice():
    cfg = base()
    cfg["shards"][0]["buckets"] = ["0-8"]
    cfg["shards"][1]["buckets"] = ["8-15"]
    e = err(cfg)
    assert e.field == "shards[1].buckets" and "bucket 8" in str(e)


def test_overlapping_ranges():
    cfg = base()
    cfg["groups"]["ev"] = {
        "strategy": "range",
        "tables": {"events": "id"},
        "ranges": [{"to": 100, "shard": "s0"}, {"from": 50, "shard": "s1"}],
    }
    e = err(cfg)
    assert e.field.startswith("groups.ev.ranges[") and "overlap" in str(e)


def test_range_bounds_reversed():
    cfg = base()
    cfg["groups"]["ev"] = {"strategy": "range", "tables": {"events": "id"},
                           "ranges": [{"from": 10, "to": 5, "shard": "s0"}]}
    assert "less than" in str(err(cfg))


@pytest.mark.parametrize("url,needle", [
    ("not a url", "not a valid database URL"),
    ("mysql://u@h/db", "not a PostgreSQL URL"),
    ("postgresql+asyncpg://u@h/db", "driver 'asyncpg'"),
    ("postgresql+psycopg://u@/db", "no host"),
    ("postgresql+psycopg://u:pw@h", "no database"),
])
def test_bad_url(url, needle):
    cfg = base()
    cfg["shards"][1]["primary"] = url
    e = err(cfg)
    assert e.field == "shards[1].primary" and needle in str(e)
    assert ":pw@" not in str(e)


@pytest.mark.parametrize("query,needle", [
    ("?prepare_threshold=0", "prepare_threshold cannot be set in the URL"),
    ("?sslmdoe=require", "'sslmdoe' in the URL's query string is not a libpq connection parameter"),
    ("?connect_timeout=soon", "connect_timeout in the URL's query string is not a whole number"),
    ("?sslmode=require&connect_timeout=5&connect_timeout=x", "connect_timeout is given 2 times"),
    ("?connect_timeout=x&sslmode=require", "not a whole number"),
    # A parameter given twice reached the driver as a tuple, which libpq refuses.
    ("?sslmode=require&sslmode=disable", "sslmode is given 2 times in the URL's query string (give sslmode once)"),
    ("?host=h1&host=h2&port=1&port=2", "port is given 2 times"),
])
def test_url_query_that_every_connection_would_fail_on(query, needle):
    cfg = base()
    cfg["shards"][0]["replicas"] = [URL.format("0r") + query]
    e = err(cfg)
    assert e.field == "shards[0].replicas[0]" and needle in str(e)


@pytest.mark.parametrize("url,needle", [
    ("postgresql+psycopg://app@h/db?password=first&password=second",
     "password is given 2 times in the URL's query string (give password once)"),
    ("postgresql+psycopg://app:first@h/db?password=second",
     "gives a password twice: before the host (user:password@) and as ?password= (give it once)"),
])
def test_a_password_given_twice_is_refused_not_one_of_them_taken(url, needle):
    """Two passwords in one URL: one of them was taken silently (the query string's last)."""
    cfg = base()
    cfg["shards"][1]["primary"] = url
    e = err(cfg)
    assert e.field == "shards[1].primary" and needle in str(e)
    assert "first" not in str(e) and "second" not in str(e)


def test_several_hosts_in_the_query_string_are_still_accepted():
    cfg = base()
    cfg["shards"][1]["primary"] = "postgresql+psycopg://app@/db?host=h1:5432&host=h2:5433"
    assert load_config(cfg).shards[1].primary.query["host"] == ("h1:5432", "h2:5433")


def test_url_query_never_echoes_values():
    cfg = base()
    cfg["shards"][1]["primary"] = URL.format(1) + "?sslpasword=hunter2"  # misspelt: unknown
    e = err(cfg)
    assert "sslpasword" in str(e) and "hunter2" not in str(e)


def test_url_query_with_libpq_parameters_is_accepted():
    cfg = base()
    cfg["shards"][1]["primary"] = URL.format(1) + "?sslmode=prefer&connect_timeout=7&application_name=web"
    assert load_config(cfg).shards[1].primary.query["connect_timeout"] == "7"


def test_unknown_shard_in_list_group():
    cfg = base()
    cfg["groups"]["geo"] = {"strategy": "list", "tables": {"customers": "region"},
                            "values": {"s9": ["eu"]}}
    e = err(cfg)
    assert e.field == "groups.geo.values.s9" and "unknown shard" in str(e)


@pytest.mark.parametrize("values,needle", [
    ({"s0": [1], "s1": ["a"]}, "value 'a' is a string but 1 is a number"),
    ({"s0": ["2024-01-02"], "s1": [datetime.date(2024, 1, 3)]}, "is a date but '2024-01-02' is a string"),
    ({"s0": [datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 3)]}, "is a local date-time but"),
])
def test_list_values_of_different_types_are_refused(values, needle):
    """A column holds one type: the values of another could never be a key (they were
    accepted, and such a group left unguarded and unmovable)."""
    cfg = base()
    cfg["groups"]["geo"] = {"strategy": "list", "tables": {"customers": "region"}, "values": values}
    e = err(cfg)
    assert e.field.startswith("groups.geo.values.") and needle in str(e), e
    assert "give every value the key column's type" in str(e)


def test_list_values_of_one_type_per_part_are_accepted():
    cfg = base()
    cfg["groups"]["geo"] = {"strategy": "list", "tables": {"customers": ["region", "n"]},
                            "values": {"s0": [["eu", 1], ["us", 2.5]], "s1": [["ca", 3]]}}
    geo = next(g for g in load_config(cfg).groups if g.name == "geo")
    assert len(geo.strategy.mapping) == 3


def test_list_value_on_two_shards():
    cfg = base()
    cfg["groups"]["geo"] = {"strategy": "list", "tables": {"customers": "region"},
                            "values": {"s0": ["eu"], "s1": ["eu"]}}
    assert "already mapped" in str(err(cfg))


def test_table_in_two_groups_and_reference():
    cfg = base()
    cfg["groups"]["other"] = {"tables": {"users": "id"}}
    assert "already in group" in str(err(cfg))
    cfg = base(reference_tables=["users"])
    e = err(cfg)
    assert e.field == "reference_tables[0]"


def test_table_names_of_another_schema_need_both_parts():
    for bad in (".users", "archive."):
        cfg = base()
        cfg["groups"]["users"]["tables"] = {bad: "id"}
        e = err(cfg)
        assert e.field == "groups.users.tables" and "empty" in str(e) and "archive.users" in str(e)
        e = err(base(reference_tables=[bad]))
        assert e.field == "reference_tables[0]" and "empty" in str(e)
    cfg = base(reference_tables=["archive.countries"])
    cfg["groups"]["users"]["tables"] = {"archive.users": "id", "Arc-hive.Orders": "user_id"}
    load_config(cfg)


def test_unknown_top_level_key_is_a_typo():
    e = err(base(bucket_cout=5))
    assert e.field == "bucket_cout" and "known settings" in str(e)


def test_colocated_tables_need_same_key_arity():
    cfg = base()
    cfg["groups"]["users"]["tables"]["orders"] = ["user_id", "id"]
    assert "key column" in str(err(cfg))


def test_custom_strategy_import_errors():
    cfg = base()
    cfg["groups"]["c"] = {"strategy": "custom", "tables": {"t": "k"}, "function": "nope.mod:fn"}
    e = err(cfg)
    assert e.field == "groups.c.function" and "cannot import" in str(e)
    cfg["groups"]["c"]["function"] = "os.path:join"
    c = load_config(cfg)
    assert c.groups[-1].strategy.kind == "custom"


def test_unknown_table_in_colocation_is_caught_against_metadata():
    from models import Base
    cfg = base()
    cfg["groups"]["users"]["tables"]["order_items"] = "user_id"
    with pytest.raises(ConfigurationError) as ei:
        Cluster.from_config(cfg, metadata=Base.metadata)
    assert ei.value.field == "groups.users.tables.order_items"
    assert "unknown table" in str(ei.value)
    cfg = base()
    cfg["groups"]["users"]["tables"]["orders"] = "owner_id"
    with pytest.raises(ConfigurationError, match="no column 'owner_id'"):
        Cluster.from_config(cfg, metadata=Base.metadata)


def test_citext_shard_key_is_refused_against_metadata():
    """citext compares without case, but keys are placed by their exact string: 'Ada' and
    'ada' (one value to the database) would be placed apart."""
    import sqlalchemy as sa
    from sqlalchemy.dialects.postgresql import CITEXT

    class Lowered(sa.TypeDecorator):
        impl = CITEXT
        cache_ok = True

    for type_ in (CITEXT(), Lowered()):
        md = sa.MetaData()
        sa.Table("members", md, sa.Column("email", type_, primary_key=True))
        cfg = {"shards": base()["shards"], "groups": {"m": {"strategy": "hash", "tables": {"members": "email"}}}}
        with pytest.raises(ConfigurationError) as ei:
            Cluster.from_config(cfg, metadata=md)
        assert ei.value.field == "groups.m.tables.members"
        assert "members.email is citext" in str(ei.value) and "lower(" in str(ei.value)
    md = sa.MetaData()
    sa.Table("members", md, sa.Column("email", sa.Text, primary_key=True))
    Cluster.from_config(cfg, metadata=md).dispose()
    # A custom strategy may place keys as the database compares them (lower() first).
    md = sa.MetaData()
    sa.Table("members", md, sa.Column("email", CITEXT(), primary_key=True))
    custom = {"strategy": "custom", "tables": {"members": "email"}, "function": "os.path:join"}
    Cluster.from_config({**cfg, "groups": {"m": custom}}, metadata=md).dispose()


def test_missing_file():
    e = err("/nonexistent/shardkit.toml")
    assert "not found" in str(e)


def test_mask_url():
    assert mask_url("postgresql+psycopg://u:secret@h/db") == "postgresql+psycopg://u:***@h/db"
    assert "secret" not in mask_url("::::secret")


def test_original_dict_not_mutated():
    cfg = base()
    snapshot = copy.deepcopy(cfg)
    load_config(cfg)
    assert cfg == snapshot


def test_catalog_url_and_its_mistakes():
    c = load_config(base(catalog={"url": "postgresql://app:${PW}@cat.example/shardkit_catalog"}),
                    env={"PW": "secret"})
    assert c.catalog_url.host == "cat.example" and c.catalog_url.drivername == "postgresql+psycopg"
    assert "secret" not in mask_url(c.catalog_url)
    assert load_config(base()).catalog_url is None
    assert err(base(catalog="postgresql://x/y")).field == "catalog"
    assert err(base(catalog={"url": "postgresql://x/y", "listen": True})).field == "catalog.listen"
    assert err(base(catalog={"url": "nonsense"})).field == "catalog.url"


def test_with_bucket_map_swaps_hash_groups_only():
    from shardkit._config import with_bucket_map

    cfg = load_config(base(groups={
        "users": {"strategy": "hash", "tables": {"users": "id"}},
        "events": {"strategy": "range", "tables": {"events": "id"},
                   "ranges": [{"to": 10, "shard": "s0"}, {"from": 10, "shard": "s1"}]},
    }))
    live = ("s1",) * 16
    moved = with_bucket_map(cfg, live)
    assert moved.bucket_map == live
    users = next(g for g in moved.groups if g.name == "users")
    events = next(g for g in moved.groups if g.name == "events")
    assert users.strategy.shard_for_key(12345) == "s1"
    assert events.strategy is next(g for g in cfg.groups if g.name == "events").strategy
    with pytest.raises(ConfigurationError, match="16"):
        with_bucket_map(cfg, ("s0",) * 8)
    with pytest.raises(ConfigurationError, match="s9"):
        with_bucket_map(cfg, ("s9",) * 16)


def test_migrate_arguments_are_checked_before_any_shard_is_touched(tmp_path):
    from shardkit import migrate

    cluster = Cluster.from_config(base())  # hosts that do not exist: never reached
    with pytest.raises(ConfigurationError, match="--alembic-ini"):
        migrate.check(cluster, alembic_ini=tmp_path / "missing.ini")
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\n")  # no script_location: Alembic cannot use it
    with pytest.raises(ConfigurationError, match="--alembic-ini: .* not a usable Alembic config"):
        migrate.check(cluster, alembic_ini=ini)
    migrations = Path(__file__).resolve().parents[2] / "migrations"
    ini.write_text(f"[alembic]\nscript_location = {migrations}\n")
    with pytest.raises(ConfigurationError, match="--parallel"):
        migrate.run_command(cluster, "shardkit.toml", "upgrade", "head", alembic_ini=ini, parallel=0)


def test_mask_url_hides_password_query_parameters_and_unencoded_at_signs():
    assert "s3cret" not in mask_url("postgresql+psycopg://u@h/db?password=s3cret")
    assert "s3cret" not in mask_url("postgresql+psycopg://u:pa@s3cret@h/db")
    cfg = base()
    cfg["shards"][0]["primary"] = "postgresql+psycopg://u:pa@s3cret@h/db"
    with pytest.raises(ConfigurationError, match="%40") as ei:
        load_config(cfg)
    assert "s3cret" not in str(ei.value)
    cfg["shards"][0]["primary"] = "postgresql+psycopg://u@h:notaport/db"
    with pytest.raises(ConfigurationError, match="not a valid database URL"):
        load_config(cfg)


def test_a_hash_key_column_of_a_type_the_hash_refuses_is_a_configuration_error():
    """A hash group keyed by a NUMERIC, date, timestamp or boolean column was accepted with
    metadata=, and every write of it then failed (ShardKeyError: the hash takes integers,
    strings, uuids and bytes).  The column is now refused when the cluster is made; range,
    list and custom groups keep such keys."""
    import sqlalchemy as sa

    class Money(sa.TypeDecorator):
        impl = sa.Numeric(12, 2)
        cache_ok = True

    for type_, shown in ((sa.Numeric(10, 2), "NUMERIC(10, 2)"), (sa.Date(), "DATE"),
                         (sa.DateTime(timezone=True), "TIMESTAMP WITH TIME ZONE"),
                         (sa.Boolean(), "BOOLEAN"), (Money(), "NUMERIC(12, 2)"), (sa.Float(), "FLOAT")):
        md = sa.MetaData()
        sa.Table("ledgers", md, sa.Column("k", type_, primary_key=True))
        cfg = {"shards": base()["shards"], "groups": {"l": {"strategy": "hash", "tables": {"ledgers": "k"}}}}
        with pytest.raises(ConfigurationError) as ei:
            Cluster.from_config(cfg, metadata=md)
        assert ei.value.field == "groups.l.tables.ledgers"
        assert f"ledgers.k is {shown}" in str(ei.value) and "range, list or custom" in str(ei.value)
    # Hashable key types, and a date key in a range group, are accepted.
    for type_ in (sa.BigInteger(), sa.Text(), sa.String(8), sa.CHAR(4), sa.Uuid(), sa.LargeBinary()):
        md = sa.MetaData()
        sa.Table("ledgers", md, sa.Column("k", type_, primary_key=True))
        cfg = {"shards": base()["shards"], "groups": {"l": {"strategy": "hash", "tables": {"ledgers": "k"}}}}
        Cluster.from_config(cfg, metadata=md).dispose()
    md = sa.MetaData()
    sa.Table("ledgers", md, sa.Column("k", sa.Date(), primary_key=True))
    shards = base()["shards"]
    cfg = {"shards": shards, "groups": {"l": {"strategy": "range", "tables": {"ledgers": "k"}, "ranges": [
        {"to": datetime.date(2024, 1, 1), "shard": shards[0]["name"]},
        {"from": datetime.date(2024, 1, 1), "shard": shards[1]["name"]}]}}}
    Cluster.from_config(cfg, metadata=md).dispose()


def test_a_wrong_key_type_names_the_table_and_column():
    """ShardKeyError for a key of the wrong type named the value's type but not where the
    key goes (only in ``e.table``): with several tables in play it did not say which."""
    import sqlalchemy as sa

    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True))
    sa.Table("orders", md, sa.Column("user_id", sa.BigInteger, primary_key=True))
    sa.Table("countries", md, sa.Column("code", sa.Text, primary_key=True))
    sa.Table("pairs", md, sa.Column("a", sa.BigInteger, primary_key=True), sa.Column("b", sa.Text, primary_key=True))
    cfg = base(groups={"users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}},
                       "pairs": {"strategy": "hash", "tables": {"pairs": ["a", "b"]}}})
    c = Cluster.from_config(cfg, metadata=md)
    try:
        with pytest.raises(ShardKeyError) as ei:
            c.shard_for("orders", "42")
        assert str(ei.value).startswith("orders.user_id: integer shard key got '42' (str)"), str(ei.value)
        assert ei.value.table == "orders"
        with pytest.raises(ShardKeyError) as ei:
            c.shard_for("pairs", (1, 2))
        assert str(ei.value).startswith("pairs.b: text shard key got 2 (int)"), str(ei.value)
    finally:
        c.dispose()


def test_a_number_given_as_a_string_says_to_write_it_without_quotes():
    """``max_lag_seconds = "${LAG:-5}"`` said only "'5' must be a number": an environment
    reference always gives a string, which the message now says."""
    for section, field, kind in (("replicas", "max_lag_seconds", "a number"), ("pool", "size", "an integer")):
        with pytest.raises(ConfigurationError) as ei:
            load_config(base(**{section: {field: "${SK_TEST_UNSET_NUMBER:-5}"}}), env={})
        assert ei.value.field == f"{section}.{field}"
        assert f"'5' must be {kind}" in str(ei.value) and "without quotes" in str(ei.value)
    with pytest.raises(ConfigurationError) as ei:
        load_config(base(pool={"size": 2.5}))
    assert ei.value.hint is None
