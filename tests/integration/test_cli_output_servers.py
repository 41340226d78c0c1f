"""The `shardkit` command on real servers: partial row estimates in `status`, a reader
that stops early, a range move counted in slices, and `demo` on a `dev up` cluster.

One 2-shard cluster without replicas, with a catalog, for the module; the demo test
starts its own (the demo drops and creates its tables)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import inproc_cli
import psycopg
import pytest

pytestmark = pytest.mark.integration

HASH = {"users": {"tables": {"users": "id", "notes": "user_id"}}}
RANGE = {"events": {"strategy": "range", "tables": {"events": "id"},
                    "ranges": [{"to": 1000, "shard": "s0"}, {"from": 1000, "shard": "s1"}]}}


def shardkit(*args: str, timeout: float = 300, proc: bool = False) -> subprocess.CompletedProcess[str]:
    """The command in this process; ``proc``: as ``python -m shardkit.cli``."""
    return inproc_cli.shardkit(args, proc=proc, timeout=timeout)


def sql(dev, shard: int, statement: str) -> None:
    with psycopg.connect(dev.shards[shard].primary.dsn, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    catalog = dev.create_catalog()
    for i in (0, 1):
        sql(dev, i, "CREATE TABLE users (id bigint PRIMARY KEY); "
                    "CREATE TABLE notes (id bigint PRIMARY KEY, user_id bigint); "
                    "CREATE TABLE events (id bigint PRIMARY KEY)")
        sql(dev, i, f"INSERT INTO users SELECT g FROM generate_series(1, {40 + 10 * i}) g")
        # Range-sharded: each shard holds its own range.
        sql(dev, i, f"INSERT INTO events SELECT g FROM generate_series({1000 * i}, {1000 * i + 999}) g")
        # users analysed, events too; notes stays empty and never analysed (reltuples -1).
        sql(dev, i, "ANALYZE users; ANALYZE events")
    sql(dev, 0, "CREATE TABLE ghost (id bigint PRIMARY KEY); INSERT INTO ghost VALUES (1), (2); ANALYZE ghost")
    d = tmp_path_factory.mktemp("cli_polish")
    status_cfg = dev.write_config(d / "status.toml", {"groups": HASH, "reference_tables": ["ghost"]})
    moves_cfg = d / "moves.toml"
    dev.write_config(moves_cfg, {"groups": {**HASH, **RANGE}, "catalog": {"url": catalog}})
    return dev, str(status_cfg), str(moves_cfg)


def test_status_keeps_a_partial_row_estimate(env):
    """A table never analysed (reltuples -1) or missing on a shard no longer blanks the
    shard's estimate: the known ones are summed, marked partial, and the unknown named."""
    _, cfg, _ = env
    r = shardkit("status", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    by = {s["shard"]: s for s in json.loads(r.stdout)["shards"]}
    s0, s1 = by["s0"], by["s1"]
    assert s0["rows_estimate"] == {"ghost": 2, "notes": None, "users": 40}
    assert s0["rows_estimate_total"] == 42 and s0["rows_estimate_partial"] is True
    assert s0["rows_estimate_unknown"] == {"notes": "never analysed"}
    assert s1["rows_estimate_total"] == 50 and s1["rows_estimate_partial"] is True
    assert s1["rows_estimate_unknown"] == {"ghost": "no such table", "notes": "never analysed"}
    r = shardkit("status", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^s0\s+s0/primary\s.*\s42\+$", r.stdout, re.M), r.stdout
    assert re.search(r"^s1\s+s1/primary\s.*\s50\+$", r.stdout, re.M), r.stdout
    assert "s1: ghost (no such table), notes (never analysed)" in r.stdout, r.stdout
    # Once analysed, the estimate is whole again: no mark, no note.
    for i in (0, 1):
        sql(env[0], i, "ANALYZE notes")
    r = shardkit("status", "--config", cfg, "--json")
    s0 = {s["shard"]: s for s in json.loads(r.stdout)["shards"]}["s0"]
    assert s0["rows_estimate_partial"] is False and s0["rows_estimate_unknown"] == {}


def test_status_into_a_closed_pipe_is_quiet(env):
    """`shardkit status | head -1` with a reader that has gone: no traceback."""
    _, cfg, _ = env
    p = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "status", "--config", cfg],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_a_range_move_is_counted_in_slices(env):
    """`rebalance apply` and `rebalance status` of a range split say slices, not buckets,
    and count them (and batches, rows) with the right noun."""
    _, _, cfg = env
    r = shardkit("rebalance", "init", "--config", cfg)
    assert r.returncode == 0 and r.stdout.strip().endswith("installed on 2 shards"), r.stdout + r.stderr
    r = shardkit("rebalance", "apply", "--split", "events:1500", "--to", "s0", "--grace", "0", "--config", cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert re.fullmatch(r"move \d+: 1 slice in 1 batch", first), first
    r = shardkit("rebalance", "status", "--config", cfg)
    assert r.returncode == 0, r.stderr
    batches = [ln for ln in r.stdout.splitlines() if ln.lstrip().startswith("batch")]
    assert batches and all(re.search(r"\s1 slice\s", ln) for ln in batches), r.stdout
    assert "bucket" not in r.stdout and "(500 rows copied)" in r.stdout, r.stdout
    r = shardkit("rebalance", "status", "--config", cfg, "--json")
    assert json.loads(r.stdout)[0]["batches"][0]["buckets"] == 1   # the JSON keeps its key


def test_demo_uses_a_dev_up_cluster_as_it_is(shardkit_module_cluster_factory):
    """README: the demo reuses a cluster started by `shardkit dev up`, which starts 2 shards
    while the demo's default is 3: it uses the 2 and says so, rather than failing; asked
    for 3 shards explicitly, it refuses in one line and leaves the cluster as it was."""
    dev = shardkit_module_cluster_factory(shards=2, replicas=0)
    base = str(dev.base_dir)
    config_before = (dev.base_dir / "shardkit.toml").read_text()
    r = shardkit("demo", "--shards", "3", "--dir", base, proc=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "2 shards x (1 primary + 0 replicas)" in r.stderr and "leave out --shards 3" in r.stderr
    assert all(n.is_running() for n in dev.nodes)
    r = shardkit("demo", "--dir", base, proc=True)
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reusing a local cluster: 2 shards x (1 primary + 0 replicas)" in r.stdout, r.stdout[:1500]
    assert "uses it as it is" in r.stdout
    assert "[ok:" in r.stdout and "MISMATCH" not in r.stdout
    assert "online rebalancing: skipped" in r.stdout
    assert "config -" not in r.stdout   # the status step: a config given as a dict has no fingerprint
    assert all(n.is_running() for n in dev.nodes)
    assert (dev.base_dir / "shardkit.toml").read_text() == config_before
