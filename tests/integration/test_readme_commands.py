"""The README walked as a new user: the `shardkit` commands run as documented, on a real
local cluster.  What it checks: an `--alembic-ini` Alembic cannot use (a directory, a
file that is no Alembic config) made `migrate check` print a traceback and `migrate upgrade`
fail on every shard; `status`, `route` and `verify` said nothing of a catalog without a map
yet (the README: every command warns until `rebalance init`); `route` of a date-time key
without the offset its group's bounds have failed with Python's comparison error."""

from __future__ import annotations

import json
import subprocess

import inproc_cli
import psycopg
import pytest

pytestmark = pytest.mark.integration


def shardkit(*args: str, proc: bool = False) -> subprocess.CompletedProcess[str]:
    """The command in this process; ``proc``: as ``python -m shardkit.cli``."""
    return inproc_cli.shardkit(args, proc=proc)


@pytest.mark.parametrize("kind", ["directory", "not an ini", "no script_location"])
def test_migrate_with_an_alembic_ini_alembic_cannot_use_is_one_error_line(shardkit_dev_cluster, tmp_path, kind,
                                                                          monkeypatch):
    """`--alembic-ini migrations` (the directory, not its alembic.ini) is an easy slip:
    it is a usage error (status 2, one `error:` line saying what to point it at), not a
    traceback of `check` (status 1: "drift") nor every shard's Alembic failing alike
    (status 1: "a migration failed")."""
    cfg = shardkit_dev_cluster.write_config(tmp_path / "shardkit.toml")
    if kind == "directory":
        ini = tmp_path / "migrations"
        ini.mkdir()
    else:
        ini = tmp_path / "alembic.ini"
        ini.write_text("garbage\n" if kind == "not an ini" else "[alembic]\nprepend_sys_path = .\n")
    monkeypatch.chdir(tmp_path)   # as the process ran in it (the paths given are absolute)
    for verb in ("check", "upgrade"):
        r = shardkit("migrate", verb, "--config", str(cfg), "--alembic-ini", str(ini))
        assert r.returncode == 2, (verb, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: --alembic-ini: "), r.stderr
        assert "alembic.ini" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "upgrade head ..." not in r.stdout, r.stdout   # no shard was started


def test_commands_say_the_catalog_has_no_map_until_rebalance_init(shardkit_dev_cluster, tmp_path):
    """A config with a `[catalog]` whose catalog is new (before `rebalance init`): the
    commands route by the file's map, and say why, with what to run."""
    dev = shardkit_dev_cluster
    with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS readme_walk_empty_catalog")
        c.execute("CREATE DATABASE readme_walk_empty_catalog")
    url = dev.create_catalog("readme_walk_empty_catalog")
    cfg = dev.write_config(tmp_path / "shardkit.toml",
                           {"groups": {"users": {"tables": {"users": "id"}}}, "catalog": {"url": url}})
    r = shardkit("status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "map of the config file" in r.stdout
    assert "no bucket map yet" in r.stdout and "shardkit rebalance init" in r.stdout, r.stdout
    r = shardkit("status", "--config", str(cfg), "--json")
    data = json.loads(r.stdout)
    assert data["map_version"] is None
    assert data["catalog_error"] and "shardkit rebalance init" in data["catalog_error"], data
    r = shardkit("route", "users", "42", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "no bucket map yet" in r.stderr and "shardkit rebalance init" in r.stderr, r.stderr
    # Once the catalog has a map (what `rebalance init` stores; the shards are not touched
    # here), neither says it.
    from shardkit import load_config
    from shardkit.catalog import Catalog

    cat = Catalog(url)
    try:
        cat.ensure_schema()
        with cat.engine.begin() as c:
            version = cat.publish_map(c, load_config(cfg).bucket_map, "test: first map")
    finally:
        cat.dispose()
    r = shardkit("route", "users", "42", "--config", str(cfg))
    assert r.returncode == 0 and "no bucket map" not in r.stderr, r.stderr
    data = json.loads(shardkit("status", "--config", str(cfg), "--json").stdout)
    assert data["map_version"] == version and data["catalog_error"] is None, data
    with psycopg.connect(dev.shards[0].primary.dsn, autocommit=True) as c:
        c.execute("DROP DATABASE readme_walk_empty_catalog WITH (FORCE)")


def test_route_of_a_date_time_key_without_the_bounds_offset_says_how_to_write_it(tmp_path):
    """README: `2024-05-01T12:00:00+02:00` is a date-time key when a group's bounds are.
    Without the offset the bounds have, the key cannot be placed: say so, and how to write
    it (not Python's "can't compare offset-naive and offset-aware datetimes")."""
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text(
        '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://u:pw@h0/db"\n'
        '[[shards]]\nname = "s1"\nprimary = "postgresql+psycopg://u:pw@h1/db"\n'
        '[groups.stamped]\nstrategy = "range"\ntables = { stamped = "ts" }\n'
        'ranges = [ { to = 2024-01-01T00:00:00Z, shard = "s0" }, { from = 2024-01-01T00:00:00Z, shard = "s1" } ]\n'
        '[groups.local]\nstrategy = "range"\ntables = { loc = "ts" }\n'
        'ranges = [ { to = 2024-01-01T00:00:00, shard = "s0" }, { from = 2024-01-01T00:00:00, shard = "s1" } ]\n'
    )
    r = shardkit("route", "stamped", "2024-05-01T12:00:00+02:00", "--config", str(cfg), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["shard"] == "s1", r.stderr
    for table, key in (("stamped", "2024-05-01"), ("stamped", "2024-05-01T12:00:00"),
                       ("loc", "2024-05-01T12:00:00+02:00")):
        r = shardkit("route", table, key, "--config", str(cfg))
        assert r.returncode == 2, (key, r.stdout)
        assert "offset" in r.stderr and "can't compare" not in r.stderr, r.stderr
        assert "datetime.datetime(" not in r.stderr and "give it " in r.stderr, r.stderr
