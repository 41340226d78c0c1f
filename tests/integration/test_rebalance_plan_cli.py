"""A careless operator against rebalance *planning* and the `rebalance`/`verify` command line.

Pure planning properties (hypothesis) first, then the CLI on a real 3-shard cluster
(bucket_count 64, a few hundred rows) whose catalog starts with s0 and s1 owning
every bucket and s2 configured but empty.  Every URL carries a password (the dev
servers trust loopback, so it is accepted and ignored): no output may show it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import shardkit
from shardkit import ConfigurationError, cli, rebalance
from shardkit._rebalance_plan import plan_add_shards, plan_drain, plan_even, plan_from_dict, plan_split_range
from shardkit._slices import SLICE_BASE, Slice

PW = "Hx-Plan-S3cret-71q"
B = 64
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- pure planning: properties -------------------------------------------------------------------


@st.composite
def map_and_weights(draw):
    n = draw(st.integers(2, 40))
    k = draw(st.integers(2, 5))
    m = [f"s{draw(st.integers(0, k - 1))}" for _ in range(n)]
    if len(set(m)) < 2:
        m[0], m[-1] = "s0", "s1"
    w = {b: draw(st.sampled_from([0, 1, 1, 2, 3, 7, 50, 100])) for b in range(n)}
    return m, w


@SETTINGS
@given(map_and_weights(), st.sampled_from([0.0, 0.05, 0.2]))
@example((["s0", "s2", "s2", "s1", "s2"], {0: 5, 1: 10, 2: 1, 3: 3, 4: 7}), 0.0)
def test_even_planned_twice_moves_nothing_the_second_time(case, tol):
    """Spec: planning twice is a no-op the second time.  A best-effort plan_even says
    "no bucket move brings it closer", so re-planning on its result must move nothing."""
    m, w = case
    first = plan_even(m, w, tolerance=tol)
    second = plan_even(first.new_map, w, tolerance=tol)
    assert second.moves == (), (first.reason, second.reason, len(second.moves))


def _corruptions():
    junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**31), st.text(max_size=3),
                     st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
    return junk


def _bucket_plan_dict():
    return plan_add_shards(["s0", "s1"] * 4, ["s2"], weights={b: b + 1 for b in range(8)}).as_dict()


def _slice_plan_dict():
    sl = (Slice(SLICE_BASE, "ev", "s0", lower=0, upper=1000), Slice(SLICE_BASE + 1, "ev", "s1", lower=1000, upper=2000))
    return plan_split_range(sl, "ev", 1500, "s2").as_dict()


@SETTINGS
@given(st.sampled_from(["bucket", "slice"]), st.data())
def test_a_corrupt_plan_file_is_a_configuration_error_never_another_exception(kind, data):
    """`apply --plan FILE` reads the file through plan_from_dict; the CLI turns only
    ShardkitError into one `error:` line, so anything else is a traceback for the operator.
    Corrupt one field (or one move's field) of a valid plan: ConfigurationError, or a
    plan whose shard names are strings."""
    d = _bucket_plan_dict() if kind == "bucket" else _slice_plan_dict()
    where = data.draw(st.sampled_from(["top", "move"]))
    value = data.draw(_corruptions())
    if where == "top":
        d[data.draw(st.sampled_from(sorted(d)))] = value
    else:
        mv = d["moves"][0]
        mv[data.draw(st.sampled_from(sorted(mv)))] = value
    try:
        plan = plan_from_dict(json.loads(json.dumps(d)))
    except ConfigurationError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped plan_from_dict: {e}")
    assert all(isinstance(x, str) for m in plan.moves for x in (m.source, m.target)), plan.moves


@SETTINGS
@given(map_and_weights(), st.sampled_from(["add", "drain", "even"]))
def test_plan_json_round_trip_is_byte_identical(case, how):
    m, w = case
    if how == "add":
        p = plan_add_shards(m, ["s9", "s10"], weights=w)
    elif how == "drain":
        p = plan_drain(m, m[0], weights=w)
    else:
        p = plan_even(m, w)
    text1 = json.dumps(p.as_dict(), indent=2)
    again = plan_from_dict(json.loads(text1))
    assert again == p
    assert json.dumps(again.as_dict(), indent=2) == text1


# -- the cluster -----------------------------------------------------------------------------------

GROUPS = {
    "users": {"strategy": "hash", "tables": {"users": "id"}},
    "events": {"strategy": "range", "tables": {"events": "id"},
               "ranges": [{"from": 0, "to": 1000, "shard": "s0"}, {"from": 1000, "to": 2000, "shard": "s1"}]},
    "stores": {"strategy": "list", "tables": {"stores": "region"},
               "values": {"s0": ["eu", "uk"], "s1": ["us", "ca"]}},
}
DDL = ["CREATE TABLE users (id bigint PRIMARY KEY, name text)",
       "CREATE TABLE events (id bigint PRIMARY KEY, note text)",
       "CREATE TABLE stores (id bigint PRIMARY KEY, region text NOT NULL)"]


def _pw(url: str) -> str:
    return url.replace("://shardkit@", f"://shardkit:{PW}@")


def _cfg(dev, catalog_url, *, shards=None, db=None, groups=GROUPS, buckets=None):
    data = dev.config_dict()
    data["shards"] = [s for s in data["shards"] if shards is None or s["name"] in shards]
    for s in data["shards"]:
        s["primary"] = _pw(s["primary"] if db is None else s["primary"].rsplit("/", 1)[0] + "/" + db)
        s["replicas"] = []
        if buckets is not None:
            s["buckets"] = buckets[s["name"]]
    data["groups"] = groups
    if catalog_url is not None:
        data["catalog"] = {"url": _pw(catalog_url)}
    return data


def _write(path: Path, data) -> Path:
    from shardkit.devcluster import to_toml

    path.write_text(to_toml(data))
    return path


@pytest.fixture(scope="module")
def world(shardkit_module_cluster_factory, tmp_path_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0, bucket_count=B)
    for s in dev.shards:
        with psycopg.connect(s.primary.dsn, autocommit=True) as c:
            for ddl in DDL:
                c.execute(ddl)
            c.execute("CREATE DATABASE solo")
    catalog = dev.create_catalog("hx_catalog")
    solo_catalog = dev.create_catalog("hx_solo_catalog")
    fresh_catalog = dev.create_catalog("hx_fresh_catalog")
    tmp = tmp_path_factory.mktemp("plan_cli")
    two = shardkit.Cluster.from_config(_cfg(dev, catalog, shards=["s0", "s1"]), follow_map=False)
    rebalance.init(two)
    two.dispose()
    good = _write(tmp / "good.toml", _cfg(dev, catalog))
    assert cli.main(["rebalance", "init", "--config", str(good)]) == 0
    cluster = shardkit.Cluster.from_config(good, follow_map=False)
    rows = {"users": [(i, f"u{i}") for i in range(300)],
            "events": [(i, f"e{i}") for i in range(0, 2000, 10)],
            "stores": [(i, ["eu", "uk", "us", "ca"][i % 4]) for i in range(100)]}
    key = {"users": 0, "events": 0, "stores": 1}
    for table, rs in rows.items():
        by: dict[str, list] = {}
        for r in rs:
            by.setdefault(cluster.shard_for(table, r[key[table]]), []).append(r)
        for shard, part in by.items():
            with cluster.primary(shard).begin() as c:
                c.execute(text(f"INSERT INTO {table} VALUES (:a, :b)"), [{"a": a, "b": b} for a, b in part])
    cluster.dispose()
    # Another database on s0's and s1's servers, for one- and two-shard clusters of their own.
    for s in dev.shards[:2]:
        with psycopg.connect(s.primary.dsn.replace("dbname=shardkit", "dbname=solo"), autocommit=True) as c:
            c.execute(DDL[0])
    solo_groups = {"users": GROUPS["users"]}
    solo2 = _write(tmp / "solo2.toml", _cfg(dev, solo_catalog, shards=["s0", "s1"], db="solo", groups=solo_groups,
                                            buckets={"s0": ["0-63"], "s1": []}))
    assert cli.main(["rebalance", "init", "--config", str(solo2)]) == 0
    solo1 = _write(tmp / "solo1.toml", _cfg(dev, solo_catalog, shards=["s0"], db="solo", groups=solo_groups))
    return SimpleNamespace(
        dev=dev, tmp=tmp, good=good, solo1=solo1, solo2=solo2,
        no_catalog=_write(tmp / "no_catalog.toml", _cfg(dev, None)),
        fresh=_write(tmp / "fresh.toml", _cfg(dev, fresh_catalog)),
    )


# -- helpers ---------------------------------------------------------------------------------------


def run(*argv, config=None):
    """The CLI in-process: SimpleNamespace(rc, out, err, tb)."""
    out, err, tb = io.StringIO(), io.StringIO(), ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([*argv, *(["--config", str(config)] if config else [])])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - what the operator would see as a traceback
            rc, tb = 1, traceback.format_exc()
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue(), tb=tb)


def problems(res, *needles, rc=2):
    """README: errors print one line, `error: ...`, exit 2; never a password nor a traceback."""
    p = []
    if res.tb:
        p.append("traceback: " + res.tb.strip().splitlines()[-1])
    if res.rc != rc:
        p.append(f"exit {res.rc}, not {rc}")
    lines = [ln for ln in res.err.strip().splitlines() if not ln.startswith("WARNING ")]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        p.append(f"stderr is not one `error:` line: {res.err.strip()[-300:]!r}")
    for n in needles:
        if n not in res.err:
            p.append(f"{n!r} not named in {res.err.strip()[-300:]!r}")
    if any(PW in t for t in (res.out, res.err, res.tb)):
        p.append("password shown")
    return p


def ok(res):
    assert res.rc == 0 and not res.tb, (res.rc, res.err[-500:], res.tb[-800:])
    assert PW not in res.out + res.err
    return res


def live(w):
    c = shardkit.Cluster.from_config(w.good, follow_map=False)
    try:
        cur = c.catalog.current_map()
        return cur.version, cur.bucket_map, cur.slices
    finally:
        c.dispose()


def moves(w):
    c = shardkit.Cluster.from_config(w.good, follow_map=False)
    try:
        return rebalance.move_status(c)
    finally:
        c.dispose()


def baseline(w):
    """s2 owns no bucket (drain it if a test left it some)."""
    if "s2" in live(w)[1]:
        ok(run("rebalance", "apply", "--drain", "s2", "--grace", "0", "--batch-buckets", str(B), config=w.good))
    assert "s2" not in live(w)[1]


@contextlib.contextmanager
def pending_move(w, plan):
    """A move recorded in the catalog (running, no batch started), aborted afterwards."""
    c = shardkit.Cluster.from_config(w.good, follow_map=False)
    try:
        move_id = rebalance.Mover(c, grace=0).start(plan, max_buckets=B)
        try:
            yield move_id
        finally:
            if any(m["move"] == move_id and m["state"] == "running" for m in rebalance.move_status(c)):
                rebalance.abort(c, move_id)
    finally:
        c.dispose()


# -- status / resume / abort with nothing to do ----------------------------------------------------


@pytest.mark.integration
def test_status_resume_abort_with_nothing_in_progress(world):
    res = ok(run("rebalance", "status", "--json", config=world.good))
    listed = json.loads(res.out)
    assert all(m["state"] in ("done", "aborted") for m in listed), listed
    if not listed:
        assert ok(run("rebalance", "status", config=world.good)).out.strip() == "no moves"
    bad = {}
    for argv in (["resume", "999"], ["abort", "999"], ["status", "999"]):
        p = problems(run("rebalance", *argv, config=world.good), "999")
        if p:
            bad[" ".join(argv)] = p
    assert not bad, bad


@pytest.mark.integration
def test_without_a_catalog_every_rebalance_verb_says_it_cannot_be_rebalanced(world):
    bad = {}
    for argv in (["plan", "--drain", "s1"], ["plan", "--split", "events:1500", "--to", "s2"],
                 ["plan", "--even", "rows"], ["apply", "--add", "s2"], ["status"], ["resume", "1"],
                 ["abort", "1"]):
        p = problems(run("rebalance", *argv, config=world.no_catalog), "no catalog", "cannot be rebalanced")
        if p:
            bad[" ".join(argv)] = p
    assert not bad, bad
    # verify needs no catalog: it checks the config's map (an even split over 3 shards),
    # which the rows (placed by the catalog's 2-shard map) do not follow: exit 1
    res = run("verify", config=world.no_catalog)
    assert res.rc == 1
    assert not res.tb and PW not in res.out + res.err


@pytest.mark.integration
def test_plan_on_a_catalog_that_was_never_initialised_says_to_run_init(world):
    bad = {}
    for argv in (["plan", "--add", "s2"], ["apply", "--drain", "s1"], ["resume", "1"], ["abort", "1"]):
        p = problems(run("rebalance", *argv, config=world.fresh), "rebalance init")
        if p:
            bad[" ".join(argv)] = p
    assert not bad, bad


# -- plans: table, JSON, size, determinism --------------------------------------------------------


@pytest.mark.integration
def test_plan_add_is_a_table_and_json_with_the_expected_shape(world):
    baseline(world)
    version, before, _ = live(world)
    table = ok(run("rebalance", "plan", "--add", "s2", config=world.good)).out
    out = world.tmp / "add.json"
    res = ok(run("rebalance", "plan", "--add", "s2", "--json", "--out", str(out), config=world.good))
    d = json.loads(res.out)
    assert out.read_text() == res.out, "--out and --json differ"
    assert set(d) == {"reason", "bucket_count", "moves", "summary", "old_counts", "new_counts",
                      "old_map", "new_map", "weights"}
    assert d["bucket_count"] == B and tuple(d["old_map"]) == before
    assert len(d["new_map"]) == B and set(d["new_map"]) == {"s0", "s1", "s2"}
    # minimal: only buckets that go to the new shard move, about B*k/(n+k) of them
    assert all(m["target"] == "s2" and before[m["bucket"]] == m["source"] for m in d["moves"])
    assert len(d["moves"]) in (B // 3, B // 3 + 1), len(d["moves"])
    counts = Counter(d["new_map"])
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert sum(1 for b in range(B) if d["old_map"][b] != d["new_map"][b]) == len(d["moves"])
    # the table: a header row, the count, each pair, per-shard totals
    assert f"{len(d['moves'])} of {B} buckets move." in table
    assert any(ln.split()[:3] == ["source", "target", "buckets"] for ln in table.splitlines()), table
    assert any(ln.split()[:2] == ["s0", "->"] and ln.split()[2] == "s2" for ln in table.splitlines()), table
    assert live(world)[0] == version, "plan changed the map"


# In a process of its own (one per hash seed): `rebalance plan ARGV --config FILE` through
# cli.main for each ARGV, printed as JSON [[exit status, stdout], ...].
_PLAN_EACH = """
import contextlib, io, json, sys
from shardkit import cli
done = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["rebalance", "plan", *argv, "--config", sys.argv[2]])
    done.append([rc, out.getvalue()])
print(json.dumps(done))
"""


@pytest.mark.integration
def test_plans_are_byte_identical_across_processes_and_hash_seeds(world):
    argvs = (["--add", "s2", "--json"], ["--even", "rows"], ["--move-value", "stores:eu", "--to", "s2", "--json"])
    outs = {}
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", _PLAN_EACH, json.dumps(argvs), str(world.good)],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        for argv, (rc, out) in zip(argvs, json.loads(r.stdout), strict=True):
            assert rc == 0, (argv, r.stderr)
            outs.setdefault(" ".join(argv), set()).add(out)
    assert all(len(v) == 1 for v in outs.values()), {k: len(v) for k, v in outs.items()}


@pytest.mark.integration
def test_drain_leaves_the_drained_shard_empty_and_moves_nothing_else(world):
    baseline(world)
    _, before, _ = live(world)
    d = json.loads(ok(run("rebalance", "plan", "--drain", "s1", "--json", config=world.good)).out)
    assert "s1" not in d["new_map"] and d["new_counts"].get("s1", 0) == 0
    assert {m["bucket"] for m in d["moves"]} == {b for b, s in enumerate(before) if s == "s1"}
    assert all(m["source"] == "s1" for m in d["moves"])


@pytest.mark.integration
def test_drain_of_a_configured_shard_that_owns_nothing_is_a_no_op(world):
    """s2 is in the config and owns no bucket (it was never filled, or was drained already):
    draining it again must be "nothing to move", not `unknown shard 's2'`."""
    baseline(world)
    res = run("rebalance", "plan", "--drain", "s2", config=world.good)
    assert res.rc == 0 and "Nothing to move" in res.out, (res.rc, res.err.strip())


@pytest.mark.integration
def test_drain_onto_a_configured_empty_shard(world):
    """Replacing a shard: the config has s0 (every bucket) and s1 (empty).  `--drain s0`
    must move everything to s1, not say s0 is the last shard."""
    res = run("rebalance", "plan", "--drain", "s0", "--json", config=world.solo2)
    assert res.rc == 0, res.err.strip()
    assert set(json.loads(res.out)["new_map"]) == {"s1"}


@pytest.mark.integration
def test_drain_of_the_last_shard_is_one_clear_line(world):
    """A cluster whose config has one shard: nothing to drain it onto."""
    p = problems(run("rebalance", "plan", "--drain", "s0", config=world.solo1), "s0", "last shard")
    assert not p, p


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.integration
def test_bad_plan_arguments_are_one_line_errors_naming_the_mistake(world):
    cases = {
        ("--drain", "s9"): ["s9"],
        ("--drain", "s1", "--add", "s2"): ["--add", "--drain"],
        ("--add", "s0"): ["s0", "already"],
        ("--add", "s2", "--add", "s2"): ["s2", "twice"],
        ("--split", "events:abc", "--to", "s2"): ["events", "abc"],
        # (Keys no range holds: --lower has no side to move there; without it, below.)
        ("--split", "events:5000", "--lower", "--to", "s2"): ["events", "5000"],
        ("--split", "events:-5", "--lower", "--to", "s2"): ["events", "-5"],
        ("--split", "events:1.5", "--to", "s2"): ["events", "1.5"],
        ("--split", "stores:eu", "--to", "s2"): ["stores", "list"],
        ("--split", "users:5", "--to", "s2"): ["users"],
        ("--move-value", "events:5", "--to", "s2"): ["events", "range"],
        ("--move-value", "stores:eu"): ["--to"],
        ("--split", "events:1500", "--to", ""): ["--to"],
        ("--add", "s2", "--to", "s1"): ["--to", "--split"],
        ("--drain", "s1", "--lower"): ["--lower", "--split"],
        ("--move-value", "stores:eu", "--to", "s2", "--lower"): ["--lower"],
    }
    bad = {}
    for argv, needles in cases.items():
        for verb in ("plan", "apply"):
            p = problems(run("rebalance", verb, *argv, config=world.good), *needles)
            if p:
                bad[f"{verb} {' '.join(argv)}"] = p
    assert not bad, bad
    assert not [m for m in moves(world) if m["state"] == "running"]
    # A key no range holds and a value no slice lists (no default) were refused here; the
    # catalog routes these groups, so `--split`/`--move-value` now give them a shard (the plan
    # shows the new slice; tests/integration/test_slice_new_keys.py applies such plans).
    for argv, shown in ((("--split", "events:5000"), "events: [2000, +inf) on s2"),
                        (("--split", "events:-5"), "events: [-inf, 0) on s2"),
                        (("--move-value", "stores:zz"), "stores: 'zz' on s2")):
        res = ok(run("rebalance", "plan", *argv, "--to", "s2", config=world.good))
        assert "New slice" in res.out and shown in res.out, res.out


@pytest.mark.integration
def test_plan_to_a_shard_not_in_the_config_is_refused(world):
    """`--add s9` is refused by `plan` (not only by `apply`); `--to s9` must be too."""
    bad = {}
    for argv in (["--split", "events:1500", "--to", "s9"], ["--move-value", "stores:us", "--to", "s9"]):
        p = problems(run("rebalance", "plan", *argv, config=world.good), "s9")
        if p:
            bad[" ".join(argv)] = p
    assert not bad, bad


@pytest.mark.integration
def test_a_plan_file_given_with_what_to_plan_is_refused(world):
    """`--plan FILE --drain s1`: two different plans asked for; the flags must not be
    silently ignored (as `--drain s1 --add s2` is refused)."""
    baseline(world)
    f = world.tmp / "for-flags.json"
    ok(run("rebalance", "plan", "--add", "s2", "--out", str(f), config=world.good))
    for extra in (["--drain", "s1"], ["--to", "s1"], ["--lower"]):
        p = problems(run("rebalance", "plan", "--plan", str(f), *extra, config=world.good), "--plan")
        assert not p, (extra, p)


@pytest.mark.integration
def test_split_at_a_boundary_and_move_to_the_current_shard(world):
    version = live(world)[0]
    res = ok(run("rebalance", "plan", "--split", "events:1000", "--to", "s2", "--json", config=world.good))
    d = json.loads(res.out)
    assert d["split"] == d["old"], "splitting at an existing boundary must not add a slice"
    (mv,) = d["moves"]
    moved = next(s for s in d["split"] if s["id"] == mv["slice"])
    assert moved["lower"] == 1000 and mv["target"] == "s2"
    for argv in (["--move-value", "stores:us", "--to", "s1"], ["--split", "events:500", "--to", "s0"]):
        d = json.loads(ok(run("rebalance", "plan", *argv, "--json", config=world.good)).out)
        assert d["moves"] == [], argv
        res = ok(run("rebalance", "apply", *argv, "--grace", "0", config=world.good))
        assert "nothing to move" in res.out, res.out
    assert live(world)[0] == version


# -- moves in progress ------------------------------------------------------------------------------


@pytest.mark.integration
def test_plan_while_a_move_is_in_progress_says_so(world):
    """Planning while move N (adding s2) is in flight: `plan --add s2` re-plans the very
    buckets N is moving, as if nothing were happening; `apply` of that plan is refused.
    The plan must refuse or at least name the move in progress."""
    baseline(world)
    _, before, _ = live(world)
    with pending_move(world, plan_add_shards(before, ["s2"])) as move_id:
        res = run("rebalance", "plan", "--add", "s2", config=world.good)
        assert f"move {move_id}" in res.out + res.err, (res.rc, res.out[:300], res.err)


@pytest.mark.integration
def test_pending_move_second_apply_abort_twice_resume_after_abort_and_verify(world):
    baseline(world)
    version, before, _ = live(world)
    assert ok(run("verify", config=world.good)).rc == 0
    with pending_move(world, plan_add_shards(before, ["s2"])) as move_id:
        st_ = json.loads(ok(run("rebalance", "status", str(move_id), "--json", config=world.good)).out)
        assert st_[0]["state"] == "running" and {b["step"] for b in st_[0]["batches"]} == {"pending"}
        bad = {}
        for argv in (["apply", "--add", "s2"], ["apply", "--drain", "s0"]):
            p = problems(run("rebalance", *argv, config=world.good), f"move {move_id}", "abort")
            if p:
                bad[" ".join(argv)] = p
        assert not bad, bad
        assert ok(run("verify", config=world.good)).rc == 0
        ok(run("rebalance", "abort", str(move_id), config=world.good))
        p1 = problems(run("rebalance", "abort", str(move_id), config=world.good), str(move_id), "aborted")
        p2 = problems(run("rebalance", "resume", str(move_id), config=world.good), str(move_id), "aborted")
        assert not p1 and not p2, (p1, p2)
    assert live(world)[0] == version
    res = run("verify", "--json", config=world.good)
    assert res.rc == 0 and json.loads(res.out)["ok"], res.out[-500:]


@pytest.mark.integration
def test_two_applies_at_once_the_second_is_refused_clearly(world):
    baseline(world)
    before_ids = {m["move"] for m in moves(world)}
    first = subprocess.Popen(
        [sys.executable, "-m", "shardkit.cli", "rebalance", "apply", "--add", "s2", "--grace", "0",
         "--step-delay", "0.4", "--batch-buckets", str(B), "--config", str(world.good)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        mine = []
        while not mine and time.monotonic() < deadline:
            mine = [m for m in moves(world) if m["move"] not in before_ids and m["state"] == "running"]
            time.sleep(0.05)
        assert mine, "the first apply never started"
        move_id = mine[0]["move"]
        bad = {}
        for argv, needles in ((["apply", "--add", "s2", "--grace", "0"], [f"move {move_id}"]),
                              (["resume", str(move_id), "--grace", "0"], [str(move_id), "another mover"]),
                              (["abort", str(move_id)], [str(move_id), "mover"])):
            p = problems(run("rebalance", *argv, config=world.good), *needles)
            if p:
                bad[" ".join(argv)] = p
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err[-500:]
        assert not bad, bad
        assert PW not in out + err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "s2" in live(world)[1]
    assert ok(run("verify", config=world.good)).rc == 0
    baseline(world)


# -- plan files: applied back, edited, stale, corrupt -----------------------------------------------


@pytest.mark.integration
def test_plan_file_applies_back_and_edited_or_stale_files_are_refused(world):
    baseline(world)
    f = world.tmp / "add-s2.json"
    ok(run("rebalance", "plan", "--add", "s2", "--out", str(f), config=world.good))
    d = json.loads(f.read_text())
    # edited: one move retargeted without its map -> the file is inconsistent
    e1 = json.loads(f.read_text())
    e1["moves"][0]["target"] = "s1"
    (world.tmp / "e1.json").write_text(json.dumps(e1))
    # edited consistently to a shard the config does not define
    e2 = json.loads(f.read_text())
    b0 = e2["moves"][0]["bucket"]
    e2["moves"][0]["target"] = "s9"
    e2["new_map"][b0] = "s9"
    e2["moves"].sort(key=lambda m: (m["source"], m["target"], m["bucket"]))
    (world.tmp / "e2.json").write_text(json.dumps(e2))
    before_ids = {m["move"] for m in moves(world)}
    bad = {}
    for name, needles in (("e1.json", ["moves"]), ("e2.json", ["s9"])):
        p = problems(run("rebalance", "apply", "--plan", str(world.tmp / name), "--grace", "0",
                         config=world.good), *needles)
        if p:
            bad[name] = p
    assert not bad, bad
    # `plan --plan FILE` (shows a stored plan) refuses the retargeted one as apply does
    p = problems(run("rebalance", "plan", "--plan", str(world.tmp / "e2.json"), config=world.good), "s9")
    assert not p, p
    assert {m["move"] for m in moves(world)} == before_ids, "a refused plan left a move behind"
    # the plan as written applies back
    v0 = live(world)[0]
    ok(run("rebalance", "apply", "--plan", str(f), "--grace", "0", "--batch-buckets", str(B), config=world.good))
    v1, now, _ = live(world)
    assert list(now) == d["new_map"] and v1 > v0
    assert ok(run("verify", config=world.good)).rc == 0
    # the same file again: made against version v0, the live map is v1
    p = problems(run("rebalance", "apply", "--plan", str(f), "--grace", "0", config=world.good), "new plan")
    assert not p, p
    assert {m["move"] for m in moves(world)} - before_ids == {max(m["move"] for m in moves(world))}
    baseline(world)


@pytest.mark.integration
def test_planning_the_same_add_again_after_applying_it_moves_nothing(world):
    """After `apply --add s2`, `plan --add s2` plans no move: it is refused in one line
    saying s2 already owns buckets (as `--add` of any shard in the map is), and the
    way to even out the shards is named."""
    baseline(world)
    ok(run("rebalance", "apply", "--add", "s2", "--grace", "0", "--batch-buckets", str(B), config=world.good))
    try:
        _, before, _ = live(world)
        p = problems(run("rebalance", "plan", "--add", "s2", config=world.good), "s2", "already", "--even")
        assert not p, p
        assert live(world)[1] == before
    finally:
        baseline(world)


@pytest.mark.integration
def test_a_corrupt_plan_file_is_one_clear_line(world):
    baseline(world)
    f = world.tmp / "add-s2-b.json"
    ok(run("rebalance", "plan", "--add", "s2", "--out", str(f), config=world.good))
    d = json.loads(f.read_text())
    d["moves"] = None
    bad_file = world.tmp / "corrupt.json"
    bad_file.write_text(json.dumps(d))
    p = problems(run("rebalance", "apply", "--plan", str(bad_file), config=world.good), "moves")
    assert not p, p


@pytest.mark.integration
def test_stale_slice_plan_is_refused(world):
    f = world.tmp / "split.json"
    ok(run("rebalance", "plan", "--split", "events:1500", "--to", "s2", "--out", str(f), config=world.good))
    ok(run("rebalance", "apply", "--split", "events:1700", "--to", "s2", "--grace", "0", config=world.good))
    again = ok(run("rebalance", "plan", "--split", "events:1700", "--to", "s2", config=world.good)).out
    assert "Nothing to move" in again and "First split" not in again, again
    p = problems(run("rebalance", "apply", "--plan", str(f), "--grace", "0", config=world.good), "new plan")
    assert not p, p
    ok(run("rebalance", "apply", "--split", "events:1700", "--to", "s1", "--grace", "0", config=world.good))
    assert ok(run("verify", config=world.good)).rc == 0


# -- verify ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_verify_exit_codes_before_and_after_a_misplaced_row(world):
    res = ok(run("verify", "--json", config=world.good))
    assert json.loads(res.out)["ok"] is True
    c = shardkit.Cluster.from_config(world.good, follow_map=False)
    try:
        key = next(k for k in range(10_000, 20_000) if c.shard_for("users", k) == "s0")
        with c.primary("s1").begin() as conn:
            conn.execute(text("SET LOCAL shardkit.mover = on"))
            conn.execute(text("INSERT INTO users VALUES (:k, 'misplaced')"), {"k": key})
        try:
            res = run("verify", config=world.good)
            assert res.rc == 1 and not res.tb and "users" in res.out, (res.rc, res.out[-400:], res.err)
            res = run("verify", "--json", config=world.good)
            assert res.rc == 1 and json.loads(res.out)["ok"] is False
        finally:
            with c.primary("s1").begin() as conn:
                conn.execute(text("SET LOCAL shardkit.mover = on"))
                conn.execute(text("DELETE FROM users WHERE id = :k"), {"k": key})
    finally:
        c.dispose()
    assert ok(run("verify", config=world.good)).rc == 0



# -- last: a bad config can damage the shared cluster ---------------------------------------------


@pytest.mark.integration
def test_a_config_whose_bucket_count_differs_from_the_catalogs_cannot_plan_or_apply(world):
    """The operator edits bucket_count (64 -> 128) in the config.  `verify` refuses
    ("the catalog's map has 64 buckets, the config 128"); `rebalance plan`/`apply` must
    refuse too, not move buckets numbered by one count with rows bucketed by the other."""
    import tomllib

    baseline(world)
    data = tomllib.loads(world.good.read_text())
    data["bucket_count"] = 2 * B
    path = _write(world.tmp / "b128.toml", data)
    p_plan = problems(run("rebalance", "plan", "--add", "s2", config=path), "bucket")
    p_apply = problems(run("rebalance", "apply", "--add", "s2", "--grace", "0", "--batch-buckets", str(B),
                           config=path), "bucket")
    res = run("verify", config=world.good)
    assert not p_plan and not p_apply and res.rc == 0, (p_plan, p_apply, res.rc, res.out[:900])
