"""Configuration and key strategies (README: Configuration reference, How keys hash,
Rebalancing).

Most tests need no server: config mistakes must be a ``ConfigurationError`` naming the
field and the fix, and keys that cannot be placed a ``ShardKeyError`` (never a bare
``decimal.InvalidOperation``).  One test needs servers: where the ownership guard
enforces a list group in SQL, it must place keys as the Python router does.
"""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
import sqlalchemy as sa

import shardkit
from shardkit import Cluster, ConfigurationError, load_config
from shardkit.errors import ShardKeyError

URL = "postgresql+psycopg://app@db{}.example:5432/app"


def base(**over):
    cfg = {"bucket_count": 16,
           "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}]}
    cfg.update(over)
    return cfg


def config_error(cfg, **kw) -> ConfigurationError:
    try:
        load_config(cfg, **kw)
    except ConfigurationError as e:
        return e
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped instead of a ConfigurationError: {e!r}")
    pytest.fail("the mistake was accepted")


# -- NaN keys and bounds of range groups ----------------------------------------------------


def _numeric_range_cluster() -> tuple[Cluster, sa.Table]:
    md = sa.MetaData()
    t = sa.Table("amounts", md, sa.Column("k", sa.Numeric, primary_key=True))
    cfg = base(groups={"n": {"strategy": "range", "tables": {"amounts": "k"},
                             "ranges": [{"to": 10, "shard": "s0"}, {"from": 10, "shard": "s1"}]}})
    return Cluster.from_config(cfg, metadata=md), t


@pytest.mark.parametrize("key", [Decimal("NaN"), float("nan")])
def test_a_nan_key_of_a_numeric_range_group_is_a_shard_key_error(key):
    """A PostgreSQL numeric column holds 'NaN' (read back as Decimal('NaN')).  Routing it
    raised a bare decimal.InvalidOperation ("[<class 'decimal.InvalidOperation'>]"),
    from shard_for() and from every statement naming it; a float NaN was NoShardForKey
    advising to "add a range that covers it", which no range can."""
    cluster, t = _numeric_range_cluster()
    for attempt in (lambda: cluster.shard_for("amounts", key),
                    lambda: cluster.explain(sa.insert(t).values(k=key)),
                    lambda: cluster.explain(sa.select(t).where(t.c.k == key))):
        with pytest.raises(ShardKeyError, match="NaN"):
            attempt()
    # A range predicate with NaN cannot be narrowed: every shard is asked, nothing raises.
    assert cluster.explain(sa.select(t).where(t.c.k > key)).shards == ("s0", "s1")
    assert cluster.shard_for("amounts", Decimal("9.5")) == "s0"


@pytest.mark.parametrize("bound", [Decimal("NaN"), Decimal("sNaN")])
def test_a_decimal_nan_range_bound_is_a_configuration_error(bound):
    """float nan was refused as a bound, Decimal NaN was accepted (and made every key
    raise InvalidOperation), and Decimal sNaN crashed load_config with InvalidOperation."""
    cfg = base(groups={"ev": {"strategy": "range", "tables": {"events": "id"},
                              "ranges": [{"to": bound, "shard": "s0"}, {"from": bound, "shard": "s1"}]}})
    e = config_error(cfg)
    assert e.field == "groups.ev.ranges[0].to"
    assert "cannot be a range bound" in str(e)


# -- list groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{"s0": []}, {"s0": [], "s1": []}])
def test_a_list_group_with_no_value_and_no_default_is_refused(values):
    """`values = { s0 = [] }` and no default: every key of the group is NoShardForKey, so
    no row can be written.  It was accepted silently."""
    cfg = base(groups={"t": {"strategy": "list", "tables": {"tenants": "region"}, "values": values}})
    e = config_error(cfg)
    assert e.field == "groups.t.values"
    assert "default" in str(e) and "no key has a shard" in str(e)
    # With a default, an empty list is fine: every key goes to the default.
    ok = load_config(base(groups={"t": {"strategy": "list", "tables": {"tenants": "region"},
                                        "values": values, "default": "s1"}}))
    assert ok.groups[0].strategy.shard_for_key("eu") == "s1"


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://app:${PW}@db:70000/app",
    "postgresql+psycopg://app:${PW}@db:0/app",
    "postgresql+psycopg://app:${PW}@db:${PORT}/app",
    "postgresql+psycopg://app:${PW}@/app?host=db0:5432&host=db1:65536",
    "postgresql+psycopg://app:${PW}@/app?host=db0,db1&port=5432,99999",
])
def test_a_port_outside_the_tcp_range_is_a_configuration_error(url):
    """libpq refuses such a port on every connection ("invalid port number"), and ':0'
    was silently dropped by SQLAlchemy (the engine connected to 5432): the node would
    look down, or be another server, instead of the config being refused."""
    pw = "S3cret-p@ss/wd".replace("@", "%40").replace("/", "%2F")
    e = config_error(base(shards=[{"name": "s0", "primary": url}]), env={"PW": pw, "PORT": "-1"})
    assert e.field == "shards[0].primary"
    assert "1..65535" in str(e) and "S3cret" not in str(e)
    cfg = load_config(base(shards=[{"name": "s0", "primary": "postgresql+psycopg://app@db:65535/app"},
                                   {"name": "s1", "primary": "postgresql+psycopg://app@/app?host=a:1&host=b"}]))
    assert cfg.shards[0].primary.port == 65535


# -- the guard places list values as Python does (needs servers) --------------------------------


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)


@pytest.mark.integration
def test_string_list_values_on_an_integer_column_do_not_guard_another_placement(dev, tmp_path, caplog):
    """`values = { s0 = ["5"] }` (quoted) for an integer column, config without metadata=:
    the router never finds the int key 5 under "5" and sends it to the default shard s1,
    but the guard `rebalance init` installed compared `k::text = '5'`, found s0's slice and
    refused the write as not owned, telling the application to retry (forever).  The guard
    must not enforce a placement Python does not make: such a group is left unguarded with
    a warning saying the fix, as one with integer bounds on a text column is."""
    from test_move_fidelity import make_world

    groups = {"t": {"strategy": "list", "tables": {"tenants": "tid"},
                    "values": {"s0": ["5"], "s1": ["6"]}, "default": "s1"}}
    with caplog.at_level(logging.WARNING, logger="shardkit.guard"):
        w = make_world(dev, tmp_path, "CREATE TABLE tenants (tid integer PRIMARY KEY, name text)", groups)
    try:
        t = sa.Table("tenants", sa.MetaData(), sa.Column("tid", sa.Integer, primary_key=True),
                     sa.Column("name", sa.Text))
        owner = w.cluster.shard_for("tenants", 5)
        assert owner == "s1"
        with shardkit.ShardedSession(cluster=w.cluster) as s:
            s.execute(sa.insert(t).values(tid=5, name="five"))
            s.commit()
        assert w.sql(owner, "SELECT tid FROM tenants") == [(5,)]
        assert w.sql("s0", "SELECT tid FROM tenants") == []
        assert any("tenants" in r.getMessage() and "not guarded" in r.getMessage()
                   and "as the column holds them" in r.getMessage() for r in caplog.records)
    finally:
        w.cluster.dispose()
