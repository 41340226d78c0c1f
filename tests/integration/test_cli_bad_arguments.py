"""The `shardkit` command line with bad input, as an operator meets it.

Argument values that can never work must be refused up front, in one `error:` line
naming the flag, before a move is recorded or a server started; and the commands must
not leave a catalog follower thread logging "retrying" while they fail or exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

import shardkit
from shardkit import cli
from shardkit.devcluster import to_toml
from test_cli_config_edges import free_port, one_line_error, run

integration = pytest.mark.integration


# -- no server -----------------------------------------------------------------------------------


def test_dev_up_with_fewer_buckets_than_shards_is_refused_before_starting_anything(capsys):
    """`dev up --shards 3 --buckets 2` wrote a shardkit.toml (no shard lists buckets) that
    every command refuses ("2 buckets cannot be split over 3 shards"), after starting three
    servers; it must be refused up front, like --buckets 0."""
    base_dir = Path(tempfile.mkdtemp(prefix="shardkit-cli-args-"))
    os.chmod(base_dir, 0o755)
    d = base_dir / "dev"
    try:
        res = run(["dev", "up", "--shards", "3", "--replicas", "0", "--buckets", "2", "--dir", str(d)],
                  capsys)
        started = (d / "devcluster.json").exists()
        problems = one_line_error(*res, "buckets")
        assert not problems and not started, (problems, started, res[1][-300:])
    finally:
        if (d / "devcluster.json").exists():
            cli.main(["dev", "down", "--dir", str(d)])
        capsys.readouterr()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_demo_shape_check_still_accepts_its_default_shape():
    from shardkit._demo import DEFAULT_REPLICAS, DEFAULT_SHARDS
    from shardkit.devcluster import DevCluster

    DevCluster._check_shape(DEFAULT_SHARDS, DEFAULT_REPLICAS, 1024, None)
    DevCluster._check_shape(3, 0, 3, None)   # one bucket each is enough


def test_verify_does_not_follow_the_map_in_a_thread(tmp_path, capsys, monkeypatch):
    """`verify` reads the catalog's map itself (refresh_map, again when a problem is
    found); a follower thread besides only logs "retrying in 0.2 s" for a catalog that is
    down while the command fails and exits (as `migrate`, `route`, `status` and
    `rebalance`, which read the map once)."""
    import shardkit.verify

    cfg = {"bucket_count": 8,
           "shards": [{"name": "s0", "primary": f"postgresql+psycopg://u@127.0.0.1:{free_port()}/db"}],
           "groups": {"users": {"tables": {"users": "id"}}},
           "catalog": {"url": f"postgresql+psycopg://u@127.0.0.1:{free_port()}/cat"}}
    path = tmp_path / "shardkit.toml"
    path.write_text(to_toml(cfg))
    seen = []

    def fake_verify(cluster, **kw):
        seen.append(cluster._follower)
        raise shardkit.ShardUnavailable("the catalog is unreachable (test)")

    monkeypatch.setattr(shardkit.verify, "verify", fake_verify)
    res = run(["verify", "--config", str(path)], capsys)
    assert seen == [None], seen
    assert not one_line_error(*res, "unreachable")


# -- on a cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=8)
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS users (id bigint PRIMARY KEY, name text)")
    data = dev.config_dict()
    data["groups"] = {"users": {"tables": {"users": "id"}}}
    data["catalog"] = {"url": dev.create_catalog("cli_bad_args_catalog")}
    path = tmp_path_factory.mktemp("cli-edges") / "shardkit.toml"
    path.write_text(to_toml(data))
    assert cli.main(["rebalance", "init", "--config", str(path)]) == 0
    return path


def moves(path):
    from shardkit import rebalance

    c = shardkit.Cluster.from_config(path, follow_map=False)
    try:
        return rebalance.move_status(c)
    finally:
        c.dispose()


@integration
@pytest.mark.parametrize("grace", ["inf", "1e10"])
def test_a_grace_no_sleep_can_take_is_refused_before_a_move_starts(env, capsys, grace):
    """`apply --grace inf` (or any more seconds than time.sleep() takes) was accepted: the
    move was recorded and its first batch started capturing, then failed with
    "OverflowError: timestamp out of range for platform time_t", leaving a running move
    to resume or abort.  Like `--grace -1`, it must be refused before anything moves."""
    before = {m["move"] for m in moves(env)}
    res = run(["rebalance", "apply", "--drain", "s1", "--grace", grace, "--config", str(env)], capsys)
    started = [m for m in moves(env) if m["move"] not in before]
    try:
        problems = one_line_error(*res, "grace")
        assert not problems and not started, (problems, [(m["move"], m["state"]) for m in started])
    finally:
        for m in started:
            if m["state"] == "running":
                cli.main(["rebalance", "abort", str(m["move"]), "--config", str(env)])
        capsys.readouterr()


@integration
def test_batch_buckets_below_one_names_the_flag(env, capsys):
    """`apply --batch-buckets 0` said "max_buckets: 0 must be an integer >= 1 (e.g.
    batches(16))": a Python parameter and method the operator never wrote."""
    before = {m["move"] for m in moves(env)}
    res = run(["rebalance", "apply", "--drain", "s1", "--batch-buckets", "0", "--config", str(env)], capsys)
    started = [m for m in moves(env) if m["move"] not in before]
    problems = one_line_error(*res, "--batch-buckets")
    assert not problems and not started, problems
    assert "batches(" not in res[2]


@integration
@pytest.mark.parametrize("flags, named", [
    (["--add", "s1", "--drain", "s0"], ("--add", "--drain")),
    (["--even", "rows", "--split", "users:5", "--to", "s1"], ("--even", "--split")),
])
def test_two_planning_options_say_they_conflict(env, capsys, flags, named):
    """Two of --add/--drain/--even/--split/--move-value at once got the message for none
    ("say what to plan: ..."): it must say that they exclude each other, naming those given."""
    res = run(["rebalance", "plan", *flags, "--config", str(env)], capsys)
    problems = one_line_error(*res, *named, "one of")
    assert not problems, problems
