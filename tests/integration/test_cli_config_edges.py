"""Configuration loading and the `shardkit` command line, as an operator meets them.

Pure configuration and argument checks run without a server.  Tests marked
`integration` share one 2-shard x 1-replica cluster with a catalog, on which a role
`pwuser` must log in with a password (scram), so that a wrong password really fails.
No output, log record or error may ever show a password.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

import shardkit
from shardkit import ConfigurationError, cli, load_config
from shardkit.devcluster import to_toml

ROOT = Path(__file__).resolve().parents[2]
PW = "Rv-Secret-8kQz2"          # the real password of role pwuser
BAD_PW = "Rv-Wrong-3mXp7"       # a wrong one; must not be printed either
SECRETS = (PW, BAD_PW)
URL = "postgresql+psycopg://app:" + PW + "@db{}.example:5432/shop"

integration = pytest.mark.integration


# -- helpers ---------------------------------------------------------------------------------


def base(**over):
    cfg = {"bucket_count": 16,
           "shards": [{"name": "s0", "primary": URL.format(0)}, {"name": "s1", "primary": URL.format(1)}]}
    cfg.update(over)
    return cfg


def config_error(cfg, **kw) -> ConfigurationError:
    """The ConfigurationError load_config raises (any other exception fails the test)."""
    try:
        load_config(cfg, **kw)
    except ConfigurationError as e:
        return e
    except Exception as e:  # noqa: BLE001 - a traceback for the user
        pytest.fail(f"{type(e).__name__} escaped instead of a ConfigurationError: {e}")
    pytest.fail("the mistake was accepted")


def run(argv, capsys, caplog=None):
    """Run the CLI in-process: (exit code, stdout, stderr, escaped traceback or '')."""
    tb = ""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except Exception:  # noqa: BLE001 - what a user would see as a traceback
        rc, tb = 1, traceback.format_exc()
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, tb


def one_line_error(rc, out, err, tb, *needles):
    """README: "Errors print one line, `error: ...`, and exit with status 2"."""
    problems = []
    if tb:
        problems.append("traceback: " + tb.strip().splitlines()[-1])
    if rc != 2:
        problems.append(f"exit status {rc}, not 2")
    lines = err.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr is not one `error:` line: {err.strip()[-300:]!r}")
    for n in needles:
        if n not in err:
            problems.append(f"{n!r} not named in {err.strip()[-300:]!r}")
    return problems


def leaks(*texts):
    return [s for s in SECRETS for t in texts if t and s in t]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path: Path, data) -> Path:
    path.write_text(to_toml(data))
    return path


# -- configuration: pure -----------------------------------------------------------------------


def test_range_bounds_of_different_types_in_different_ranges_name_the_field():
    """An int range next to a string range (or a date) is a mistake: a ConfigurationError
    naming groups.ev.ranges[..], not a TypeError from sorting the ranges."""
    cfg = base(groups={"ev": {"strategy": "range", "tables": {"events": "id"},
                              "ranges": [{"from": 0, "to": 10, "shard": "s0"},
                                         {"from": "m", "shard": "s1"}]}})
    e = config_error(cfg)
    assert e.field.startswith("groups.ev.ranges"), e.field


def test_custom_function_spec_with_a_bad_module_name_names_the_field():
    """`function = ":fn"` or a relative module is a ConfigurationError on groups.c.function
    (not ValueError 'Empty module name' / TypeError from importlib)."""
    for spec in (":shard_for", ".relative:shard_for"):
        cfg = base(groups={"c": {"strategy": "custom", "tables": {"t": "k"}, "function": spec}})
        assert config_error(cfg).field == "groups.c.function", spec


def test_nan_is_not_a_valid_number_anywhere(tmp_path):
    """TOML allows `nan`; every numeric setting must refuse it (nan passes `x < minimum`)."""
    cases = {
        "replicas.poll_interval": '[replicas]\npoll_interval = nan\n',
        "replicas.max_lag_seconds": '[replicas]\nmax_lag_seconds = nan\n',
        "replicas.ban_seconds": '[replicas]\nban_seconds = nan\n',
        "pool.timeout": '[pool]\ntimeout = nan\n',
        "shards[0].replicas[0].weight": None,
    }
    accepted = []
    for field, extra in cases.items():
        shard = '[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://u@h/db"\n'
        if extra is None:
            body = shard + 'replicas = [{ url = "postgresql+psycopg://u@r/db", weight = nan }]\n'
        else:
            body = extra + shard
        p = tmp_path / "c.toml"
        p.write_text(body)
        try:
            load_config(p, env={})
            accepted.append(field)
        except ConfigurationError as e:
            assert e.field == field, (field, e.field)
    assert not accepted, f"nan accepted for {accepted}"


def test_shard_name_with_a_trailing_newline_is_refused():
    """Shard names are letters, digits, _ and -: `$` in the regex also matches before a
    final newline, so "s0\\n" slips through."""
    e = config_error(base(shards=[{"name": "s0\n", "primary": URL.format(0)}]))
    assert e.field == "shards[0].name"


def test_a_bucket_listed_twice_on_one_shard_is_refused():
    """README: shards[].buckets lists "every bucket exactly once"."""
    cfg = base(bucket_count=4, shards=[
        {"name": "s0", "primary": URL.format(0), "buckets": ["0-2", 1]},
        {"name": "s1", "primary": URL.format(1), "buckets": [3]},
    ])
    e = config_error(cfg)
    assert e.field.startswith("shards[0].buckets")


def test_an_unterminated_env_reference_is_an_error_not_a_literal_password():
    """`${DB_PASSWORD` (no closing brace) is a typo: a ConfigurationError naming the field,
    not the literal text sent as the password."""
    cfg = base()
    cfg["shards"][0]["primary"] = "postgresql+psycopg://app:${DB_PASSWORD@db0.example/shop"
    e = config_error(cfg, env={"DB_PASSWORD": PW})
    assert e.field == "shards[0].primary" and not leaks(str(e))


def test_env_default_applies_to_an_empty_variable_as_in_the_compose_file():
    """README: "The password is SHARDKIT_PASSWORD (default shardkit) in both files".
    Compose's `${VAR:-default}` uses the default when VAR is unset *or empty*;
    shardkit.compose.toml must then mean the same password."""
    cfg = load_config(ROOT / "shardkit.compose.toml", env={"SHARDKIT_PASSWORD": ""})
    assert cfg.shards[0].primary.password == "shardkit", repr(cfg.shards[0].primary.password)


def test_env_interpolation_escapes_and_no_reinterpolation():
    """`$$` is a literal `$`; a variable's value is not interpolated again; a missing
    variable inside a replica table names that field and the fix."""
    cfg = base(name="a$$$${X}-${X}-${Y:-d e}")
    cfg["shards"][1]["replicas"] = [{"url": "postgresql+psycopg://app:${RP}@r/shop", "weight": 2}]
    c = load_config(cfg, env={"X": "${Y}", "RP": PW})
    assert c.name == "a$${X}-${Y}-d e"
    assert c.shards[1].replicas[0].password == PW and not leaks(repr(c.shards[1]))
    e = config_error(cfg, env={"X": "x"})
    assert e.field == "shards[1].replicas[0].url" and "export RP=" in str(e)


# -- command line: no server ---------------------------------------------------------------------


def _route_config(tmp_path: Path) -> Path:
    return write(tmp_path / "route.toml", {
        "bucket_count": 16,
        "shards": [{"name": "s0", "primary": "postgresql+psycopg://app:" + PW + "@127.0.0.1:1/db"},
                   {"name": "s1", "primary": "postgresql+psycopg://app:" + PW + "@127.0.0.1:2/db"}],
        "groups": {"users": {"tables": {"users": "id"}}, "comp": {"tables": {"comp": ["a", "b"]}}},
    })


def test_route_key_not_of_the_given_type_exits_2(tmp_path, capsys):
    """A key that is not an int/uuid under --type int/uuid is an error: one line, status 2
    (SystemExit with a message exits 1)."""
    cfg = _route_config(tmp_path)
    for kind in ("int", "uuid"):
        res = run(["route", "users", "abc", "--type", kind, "--config", str(cfg)], capsys)
        assert not one_line_error(*res, "abc"), (kind, one_line_error(*res, "abc"))


def test_route_with_the_wrong_number_of_key_parts_is_an_error(tmp_path, capsys):
    """README: several KEYs for a composite key.  Three values for a 2-column key, or two
    for a 1-column key, must be refused, not hashed into a bucket as a tuple."""
    cfg = _route_config(tmp_path)
    for argv in (["comp", "1", "2", "3"], ["users", "1", "2"]):
        rc, out, err, tb = run(["route", *argv, "--config", str(cfg)], capsys)
        assert rc == 2 and err.startswith("error: ") and not tb, (argv, rc, out, err, tb)


def test_dev_up_with_an_impossible_shape_is_one_clear_line(tmp_path, capsys):
    """`dev up --shards 0 | --replicas -1 | --buckets 0` must print `error: ...` and exit 2,
    not a ValueError traceback."""
    for opt, val in (("--shards", "0"), ("--replicas", "-1"), ("--buckets", "0")):
        res = run(["dev", "up", opt, val, "--dir", str(tmp_path / "dev")], capsys)
        problems = one_line_error(*res)
        assert not problems, (opt, problems)


def test_demo_with_an_impossible_shape_is_one_clear_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """`demo --shards 0`: `error: ...`, exit 2, and no shardkit-demo-* temporary directory left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = run(["demo", "--shards", "0"], capsys)
    problems = one_line_error(*res)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("shardkit-demo-")]
    assert not problems and not left, (problems, left)


def test_demo_help_lists_the_documented_options(capsys):
    """README: `shardkit demo [--shards 3] [--replicas 1] [--dir D] [--keep]`."""
    rc, out, err, tb = run(["demo", "--help"], capsys)
    assert rc == 0 and not tb, (rc, err, tb)
    for opt in ("--shards", "--replicas", "--dir", "--keep"):
        assert opt in out, opt


# -- the shared cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    nodes = [n for s in dev.shards for n in s.nodes]
    if not all(hasattr(n, "datadir") for n in nodes) or os.geteuid() != 0:
        pytest.skip("needs a local DevCluster whose pg_hba.conf this test can edit")
    for n in nodes:   # pwuser logs in with a password; everyone else stays trusted
        hba = n.datadir / "pg_hba.conf"
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            c.execute(f"CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD '{PW}'")
            c.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
            c.execute("CREATE TABLE comp (a bigint, b text, PRIMARY KEY (a, b))")
    for n in nodes:
        with psycopg.connect(n.dsn, autocommit=True) as c:
            c.execute("SELECT pg_reload_conf()")
    catalog = dev.create_catalog()
    fresh_catalog = dev.create_catalog("fresh_catalog")
    tmp = tmp_path_factory.mktemp("cli")
    down_port = free_port()

    def cfg(name, *, pw=PW, db=None, catalog_url=catalog, catalog_pw=None, port0=None):
        def u(url, password, dbname=None):
            url = url.replace("://shardkit@", f"://pwuser:{password}@")
            if port0 is not None:
                url = url.replace(f"127.0.0.1:{dev.shards[0].primary.port}/", f"127.0.0.1:{port0}/")
            return url.rsplit("/", 1)[0] + "/" + dbname if dbname else url
        data = dev.config_dict()
        for s in data["shards"]:
            s["primary"] = u(s["primary"], pw, db)
            s["replicas"] = [u(r, pw, db) for r in s["replicas"]]
        data["groups"] = {"users": {"tables": {"users": "id"}}}
        if catalog_url is not None:
            data["catalog"] = {"url": u(catalog_url, catalog_pw or pw)}
        return write(tmp / f"{name}.toml", data)

    good = cfg("good")
    rc = cli.main(["rebalance", "init", "--config", str(good)])
    assert rc == 0
    return SimpleNamespace(
        dev=dev, tmp=tmp, good=good,
        wrong_pw=cfg("wrong_pw", pw=BAD_PW),
        bad_db=cfg("bad_db", db="no_such_db"),
        node_down=cfg("node_down", port0=down_port, catalog_url=None),
        catalog_wrong_pw=cfg("catalog_wrong_pw", catalog_pw=BAD_PW),
        catalog_down=cfg("catalog_down", catalog_url=catalog.replace(
            f":{dev.shards[0].primary.port}/", f":{down_port}/")),
        fresh=cfg("fresh", catalog_url=fresh_catalog),
        no_catalog=cfg("no_catalog", catalog_url=None),
    )


def moves(env):
    from shardkit import rebalance

    c = shardkit.Cluster.from_config(env.good, follow_map=False)
    try:
        return rebalance.move_status(c)
    finally:
        c.dispose()


@integration
def test_passwords_never_appear_in_any_command_output_log_or_error(env, capsys, caplog):
    """Wrong password, missing database, a node down: whatever each command prints (or
    raises), at DEBUG logging, never shows a password."""
    caplog.set_level(logging.DEBUG)
    ini = str(ROOT / "migrations" / "alembic.ini")
    commands = [["status"], ["status", "--json"], ["verify"], ["verify", "--json"], ["migrate", "current"],
                ["migrate", "check", "--alembic-ini", ini], ["rebalance", "status"],
                ["rebalance", "plan", "--drain", "s1"], ["route", "users", "42", "--json"]]
    found = []
    for name in ("good", "wrong_pw", "bad_db", "node_down"):
        path = getattr(env, name)
        for argv in commands:
            if name == "node_down" and argv[0] == "rebalance":
                continue
            rc, out, err, tb = run(["-v", *argv, "--config", str(path)], capsys)
            found += [(name, argv[:2], s) for s in leaks(out, err, tb)]
    found += [("logs", "", s) for s in leaks(caplog.text, *(str(r.args) for r in caplog.records))]
    assert not found, found


def _all_one_line_errors(env, capsys, runs, *needles):
    problems = {}
    for argv in runs:
        res = run(argv, capsys)
        p = one_line_error(*res, *needles) + [f"leaks {s}" for s in leaks(*res[1:])]
        if p:
            problems[" ".join(Path(a).name if a.startswith("/") else a for a in argv)] = p
    return problems


@integration
def test_verify_with_an_unreachable_catalog_is_one_clear_error(env, capsys):
    """`verify` when the catalog refuses the password or is down: one line naming the
    catalog, exit 2; not a sqlalchemy OperationalError traceback."""
    runs = [["verify", "--config", str(getattr(env, w))] for w in ("catalog_wrong_pw", "catalog_down")]
    problems = _all_one_line_errors(env, capsys, runs, "catalog")
    assert not problems, problems


@integration
def test_rebalance_commands_with_an_unreachable_catalog_are_one_clear_error(env, capsys):
    """`rebalance status|plan|resume|abort` when the catalog refuses the password or is
    down: one line naming the catalog, exit 2; no traceback, no password."""
    runs = [[*argv, "--config", str(getattr(env, w))]
            for w in ("catalog_wrong_pw", "catalog_down")
            for argv in (["rebalance", "status"], ["rebalance", "plan", "--drain", "s1"],
                         ["rebalance", "resume", "1"], ["rebalance", "abort", "1"])]
    problems = _all_one_line_errors(env, capsys, runs, "catalog")
    assert not problems, problems


@integration
def test_resume_and_abort_before_rebalance_init_say_to_run_init(env, capsys):
    """A catalog database without its schema yet (`dev up --catalog`, no `rebalance init`):
    resume/abort must say so (as `plan` does), not raise UndefinedTable."""
    runs = [["rebalance", verb, "1", "--config", str(env.fresh)] for verb in ("resume", "abort")]
    problems = _all_one_line_errors(env, capsys, runs, "init")
    assert not problems, problems


@integration
def test_plan_file_mistakes_are_one_clear_line(env, capsys):
    """`--plan FILE` that does not exist or is not JSON, `--out` into a missing
    directory: `error: ...` naming the file, exit 2 (not FileNotFoundError/JSONDecodeError)."""
    bad = env.tmp / "not-json.json"
    bad.write_text("this is not json\n")
    problems = {}
    for argv, needle in ((["--plan", str(env.tmp / "missing.json")], "missing.json"),
                         (["--plan", str(bad)], "not-json.json"),
                         (["--even", "rows", "--out", str(env.tmp / "no-such-dir" / "plan.json")], "plan.json")):
        res = run(["rebalance", "plan", *argv, "--config", str(env.good)], capsys)
        if one_line_error(*res, needle):
            problems[needle] = one_line_error(*res, needle)
    assert not problems, problems


@integration
def test_rebalance_argument_mistakes_exit_2(env, capsys):
    """Nothing to plan, --split without --to, a malformed GROUP:KEY, an unknown group:
    README says errors exit 2 (these exit 1 through SystemExit(str))."""
    runs = [["rebalance", *argv, "--config", str(env.good)]
            for argv in (["plan"], ["plan", "--split", "users:5"], ["plan", "--split", "nocolon", "--to", "s1"],
                         ["plan", "--move-value", "nope:uk", "--to", "s1"])]
    problems = _all_one_line_errors(env, capsys, runs)
    assert not problems, problems


@integration
def test_plan_add_of_a_shard_not_in_the_config_is_refused(env, capsys):
    """`--add SHARD` gives a new shard "(already in the config)" its buckets; `apply`
    refuses s9, `plan` prints a plan moving a third of the buckets to it and exits 0."""
    res = run(["rebalance", "plan", "--add", "s9", "--config", str(env.good)], capsys)
    problems = one_line_error(*res, "s9")
    assert not problems, (problems, res[1][-300:])


@integration
def test_rebalance_status_of_an_unknown_move_is_an_error(env, capsys):
    """`resume 999` and `abort 999` say there is no move 999 (exit 2); `status 999`
    prints "no moves" and exits 0, as if the catalog were empty."""
    res = run(["rebalance", "status", "999", "--config", str(env.good)], capsys)
    problems = one_line_error(*res, "999")
    assert not problems, (problems, res[1])


@integration
def test_negative_grace_is_refused_before_anything_moves(env, capsys):
    """`apply --grace -1` must be refused up front (like --duty 0 and --batch-buckets 0),
    not start a move that switches ownership and then fails on time.sleep(-1)."""
    before = {m["move"] for m in moves(env)}
    res = run(["rebalance", "apply", "--drain", "s1", "--grace", "-1", "--batch-buckets", "1024",
               "--config", str(env.good)], capsys)
    started = [m for m in moves(env) if m["move"] not in before]
    try:
        problems = one_line_error(*res, "grace")
        assert not problems and not started, (problems, [(m["move"], m["state"]) for m in started])
    finally:   # put the map back as it was: finish the move, then move the buckets back
        for m in started:
            if m["state"] != "done":
                cli.main(["rebalance", "resume", str(m["move"]), "--grace", "0", "--config", str(env.good)])
            cli.main(["rebalance", "apply", "--add", "s1", "--grace", "0", "--batch-buckets", "1024",
                      "--config", str(env.good)])
        capsys.readouterr()


@integration
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_max_pause_that_is_not_a_positive_number_of_seconds_is_refused_before_anything_moves(env, capsys,
                                                                                               value):
    before = {m["move"] for m in moves(env)}
    res = run(["rebalance", "apply", "--drain", "s1", "--max-pause", value, "--batch-buckets", "1024",
               "--config", str(env.good)], capsys)
    started = [m for m in moves(env) if m["move"] not in before]
    problems = one_line_error(*res, "--max-pause", "more than 0")
    assert not problems and not started, (problems, [(m["move"], m["state"]) for m in started])


@integration
def test_status_route_and_verify_agree_with_the_catalog_map(env, capsys):
    """With a catalog, `status` counts each shard's buckets from the live map, `route`
    routes by it and `verify` is clean; exit 0 each, no password."""
    rc, out, err, tb = run(["status", "--json", "--config", str(env.good)], capsys)
    assert rc == 0 and not tb, (err, tb)
    data = json.loads(out)
    counts = {s["shard"]: s["buckets"] for s in data["shards"]}
    c = shardkit.Cluster.from_config(env.good, follow_map=False)
    try:
        expected = {name: c.config.bucket_map.count(name) for name in c.shard_names}
        key = next(k for k in range(1000) if c.shard_for("users", k) == "s1")
    finally:
        c.dispose()
    assert counts == expected and sum(counts.values()) == 1024
    rc, out, err, tb = run(["route", "users", str(key), "--json", "--config", str(env.no_catalog)], capsys)
    assert rc == 0 and json.loads(out)["bucket"] == shardkit.bucket_for(key, 1024)
    rc, out, err, tb = run(["verify", "--config", str(env.good)], capsys)
    assert rc == 0 and "clean" in out, out + err + tb
    assert not leaks(out, err, tb)


@integration
def test_status_exits_0_with_a_replica_down_and_shows_it(env, capsys):
    """README: status "exits 1 when a primary is down" -- a replica down is shown (NO,
    with its error) but the exit status stays 0."""
    replica = env.dev.shards[1].replicas[0]
    replica.stop()
    try:
        rc, out, err, tb = run(["status", "--json", "--config", str(env.good)], capsys)
    finally:
        replica.start()
    assert rc == 0 and not tb, (rc, err, tb)
    nodes = {n["node"]: n for s in json.loads(out)["shards"] for n in s["nodes"]}
    assert nodes["s1/r0"]["up"] is False and nodes["s1/r0"]["error"]
    assert nodes["s1/primary"]["up"] is True and not leaks(out, err)


@integration
def test_dev_up_with_more_buckets_than_a_config_allows_is_refused(capsys):
    """`dev up --buckets 2000000` must be refused (bucket_count is 1..1048576) instead of
    starting servers and writing a shardkit.toml every command then rejects."""
    base_dir = Path(tempfile.mkdtemp(prefix="shardkit-cli-"))
    os.chmod(base_dir, 0o755)
    d = base_dir / "dev"
    try:
        res = run(["dev", "up", "--shards", "1", "--replicas", "0", "--buckets", "2000000", "--dir", str(d)],
                  capsys)
        problems = one_line_error(*res, "bucket")
        assert not problems, (problems, res[1][-300:])
    finally:
        if (d / "devcluster.json").exists():
            cli.main(["dev", "down", "--dir", str(d)])
        capsys.readouterr()
        import shutil
        shutil.rmtree(base_dir, ignore_errors=True)
