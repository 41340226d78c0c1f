"""The `shardkit` command's rough edges, without a server: partial row estimates in
`status`, output piped into a reader that stops early (`| head`), counts and their
nouns, and which cluster `demo` uses when a directory already holds one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shardkit import _demo, cli, migrate, rebalance
from shardkit._status import render
from shardkit.devcluster import STATE_FILE, DevCluster
from shardkit.errors import DevClusterError

ROOT = Path(__file__).resolve().parents[2]
URL = "postgresql+psycopg://app@db{}.example/app"


def write_config(tmp_path: Path, shards: int = 1) -> Path:
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text("bucket_count = 16\n" + "".join(
        f'[[shards]]\nname = "s{i}"\nprimary = "{URL.format(i)}"\n' for i in range(shards))
        + '[groups.users]\ntables = { users = "id" }\n')
    return cfg


def run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- status: a table never analysed does not blank the shard's estimate -----------------------


def node(shard: str) -> dict:
    return {"shard": shard, "node": f"{shard}/primary", "role": "primary", "up": True,
            "lag_bytes": None, "lag_seconds": None, "connections": 3}


def shard(name: str, rows, total, unknown) -> dict:
    return {"shard": name, "buckets": 8, "rows_estimate": rows, "rows_estimate_total": total,
            "rows_estimate_partial": None if unknown is None else bool(unknown),
            "rows_estimate_unknown": unknown, "nodes": [node(name)]}


def status_data(config_version="0123456789ab") -> dict:
    return {"cluster": "c", "config_version": config_version, "bucket_count": 16, "ready": True,
            "shards": [
                # s0: users analysed (1200 rows), events never analysed, audit not created.
                shard("s0", {"audit": None, "events": None, "users": 1200}, 1200,
                      {"audit": "no such table", "events": "never analysed"}),
                shard("s1", {"audit": 5, "events": 10, "users": 30}, 45, {}),
                shard("s2", {"audit": None, "events": None, "users": None}, None,
                      {"audit": "never analysed", "events": "never analysed", "users": "never analysed"}),
            ]}


def test_status_sums_the_known_estimates_and_says_which_tables_are_unknown():
    out = render(status_data())
    lines = out.splitlines()
    s0 = next(ln for ln in lines if ln.startswith("s0 "))
    s1 = next(ln for ln in lines if ln.startswith("s1 "))
    s2 = next(ln for ln in lines if ln.startswith("s2 "))
    assert s0.rstrip().endswith(" 1200+"), s0      # partial: marked, not dropped
    assert s1.rstrip().endswith(" 45"), s1         # complete: as before
    assert s2.rstrip().endswith(" ?"), s2          # nothing known
    assert "s0: audit (no such table), events (never analysed)" in out
    assert "ANALYZE" in out
    assert not any(ln.startswith("  s1:") for ln in lines), "s1's estimate is complete"


def test_status_header_without_a_config_file_has_no_dash():
    """A config given as a dict (as the demo's tour does) has no fingerprint: say nothing,
    not `config -`."""
    out = render(status_data(config_version=None))
    assert "config -" not in out and "config None" not in out
    assert out.splitlines()[0].startswith("cluster c  buckets 16")
    assert "config 0123456789ab" in render(status_data())


# -- a reader that stops early (`| head`) ------------------------------------------------------


def closed_pipe_run(*args: str, cwd: Path) -> tuple[int, str]:
    """Run ``shardkit ARGS`` with its stdout a pipe whose reader is already gone."""
    p = subprocess.Popen([sys.executable, "-m", "shardkit.cli", *args], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()   # before the command (still importing) writes anything
    err = p.stderr.read().decode()
    p.stderr.close()
    return p.wait(timeout=60), err


@pytest.mark.parametrize("args", [["route", "users", "42"], ["route", "users", "42", "--json"]])
def test_output_into_a_closed_pipe_exits_1_quietly(tmp_path, args):
    """Python's docs (signal, "Note on SIGPIPE"): catch BrokenPipeError, point stdout at
    devnull, exit 1 -- no traceback, no "Exception ignored" at the flush on exit."""
    write_config(tmp_path)
    rc, err = closed_pipe_run(*args, cwd=tmp_path)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert rc == 1, (rc, err)


def test_a_reader_that_reads_everything_changes_nothing(tmp_path):
    write_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "shardkit.cli", "route", "users", "42"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "-> shard s0" in r.stdout and r.stderr == "", r.stderr


# -- counts agree with their nouns -------------------------------------------------------------


def test_counted():
    assert cli.counted(1, "shard") == "1 shard"
    assert cli.counted(0, "shard") == "0 shards"
    assert cli.counted(2, "batch", "batches") == "2 batches"


def test_rebalance_init_on_one_shard(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rebalance, "init", lambda cluster: 1)
    rc, out, err = run(["rebalance", "init", "--config", str(write_config(tmp_path, 1))], capsys)
    assert rc == 0, err
    assert out.strip().endswith("ownership guard installed on 1 shard"), out
    rc, out, err = run(["rebalance", "init", "--config", str(write_config(tmp_path, 3))], capsys)
    assert out.strip().endswith("installed on 3 shards"), out


@pytest.mark.parametrize("shards, said", [(1, "upgrade head: 1 shard ok"), (3, "upgrade head: all 3 shards ok")])
def test_migrate_upgrade_counts_its_shards(tmp_path, capsys, monkeypatch, shards, said):
    monkeypatch.setattr(migrate, "run_command", lambda cluster, *a, **k: [
        SimpleNamespace(shard=name, warnings=[]) for name in cluster.shard_names])
    rc, out, err = run(["migrate", "upgrade", "--config", str(write_config(tmp_path, shards))], capsys)
    assert rc == 0, err
    assert out.strip() == said


def test_rebalance_status_counts_rows_and_buckets(tmp_path, capsys, monkeypatch):
    moves = [{"move": 4, "state": "running", "reason": "drain s1", "error": None, "rows_copied": 1, "unit": "bucket",
              "batches": [{"batch": 0, "source": "s1", "target": "s0", "buckets": 1, "step": "copied"},
                          {"batch": 1, "source": "s1", "target": "s0", "buckets": 2, "step": "pending"}]}]
    monkeypatch.setattr(rebalance, "move_status", lambda cluster, move=None: moves)
    rc, out, err = run(["rebalance", "status", "--config", str(write_config(tmp_path, 2))], capsys)
    assert rc == 0, err
    assert "(1 row copied)" in out, out
    first, second = [ln for ln in out.splitlines() if "batch" in ln]
    assert "   1 bucket " in first and "buckets" not in first, first
    assert "   2 buckets" in second, second
    # A range or list move's batches count slices (the integration test runs a real one).
    moves[0]["unit"] = "slice"
    rc, out, err = run(["rebalance", "status", "--config", str(write_config(tmp_path, 2))], capsys)
    assert "   1 slice " in out and "   2 slices" in out and "bucket" not in out, out


# -- demo: its header, and a cluster already in --dir ------------------------------------------


class _Stop(Exception):
    pass


@pytest.fixture()
def up_calls(monkeypatch):
    """DevCluster.up, recorded and stopped there (nothing is started)."""
    calls = []

    def fake_up(base, shards=2, replicas=1, **kw):
        calls.append({"shards": shards, "replicas": replicas, **kw})
        raise _Stop()

    monkeypatch.setattr(DevCluster, "up", staticmethod(fake_up))
    return calls


def test_demo_header_counts_shards_and_replicas(tmp_path, capsys, up_calls):
    with pytest.raises(_Stop):
        cli.main(["demo", "--shards", "1", "--replicas", "1", "--dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "starting a local cluster: 1 shard x (1 primary + 1 replica)" in out, out
    with pytest.raises(_Stop):
        cli.main(["demo", "--dir", str(tmp_path / "e")])
    assert "starting a local cluster: 3 shards x (1 primary + 1 replica)" in capsys.readouterr().out
    assert up_calls[-1]["shards"] == 3 and up_calls[-1]["replicas"] == 1


@pytest.fixture()
def existing(tmp_path, monkeypatch):
    """A directory that holds a `dev up --shards 2 --buckets 256` cluster (as its state file says)."""
    base = tmp_path / "dev"
    base.mkdir()
    (base / STATE_FILE).write_text("{}")
    shards = [SimpleNamespace(name=f"s{i}", replicas=[object()]) for i in range(2)]
    monkeypatch.setattr(DevCluster, "_load", classmethod(
        lambda cls, b: (SimpleNamespace(shards=shards, nodes=[], bucket_count=256), True)))
    return base


def test_demo_uses_a_cluster_already_there_as_it_is(existing, capsys, up_calls):
    """`dev up` starts 2 shards, the demo 3: on a `dev up` cluster the demo uses its
    2 shards (and 256 buckets) and says so, instead of failing on the shape."""
    with pytest.raises(_Stop):
        cli.main(["demo", "--dir", str(existing)])
    assert up_calls == [{"shards": 2, "replicas": 1, "bucket_count": 256}]
    out = capsys.readouterr().out
    assert "reusing a local cluster: 2 shards x (1 primary + 1 replica)" in out, out
    assert "uses it as it is" in out and "3 shards" in out, out


def test_demo_refuses_a_shape_that_contradicts_the_cluster_there(existing, capsys, up_calls):
    rc, out, err = run(["demo", "--shards", "3", "--dir", str(existing)], capsys)
    assert rc == 2 and up_calls == [], (rc, up_calls)
    line = err.strip()
    assert "\n" not in line and line.startswith("error: "), err
    assert "2 shards x (1 primary + 1 replica)" in line and "--shards 3" in line, line
    assert "leave out --shards 3" in line and "shardkit dev down --dir" in line, line
    rc, out, err = run(["demo", "--shards", "3", "--replicas", "1", "--dir", str(existing)], capsys)
    assert rc == 2 and "leave out --shards 3 to" in err, err   # --replicas 1 matches: not named
    # Asked for what is there: used.
    with pytest.raises(_Stop):
        cli.main(["demo", "--shards", "2", "--replicas", "1", "--dir", str(existing)])
    assert up_calls == [{"shards": 2, "replicas": 1, "bucket_count": 256}]
    assert "uses it as it is" not in capsys.readouterr().out   # nothing differs from what was asked


def test_demo_shape_is_still_checked_before_anything(tmp_path, capsys):
    with pytest.raises(DevClusterError, match="shards >= 1"):
        _demo.run_demo(dir=str(tmp_path / "d"), shards=0)
    assert not (tmp_path / "d").exists()


def test_route_json_gives_a_composite_key_as_a_list(tmp_path, capsys):
    cfg = write_config(tmp_path, shards=2)
    cfg.write_text(cfg.read_text() + '[groups.geo]\nstrategy = "hash"\ntables = { sites = ["region", "id"] }\n')
    rc, out, _ = run(["route", "sites", "eu", "7", "--json", "--config", str(cfg)], capsys)
    assert rc == 0 and json.loads(out)["key"] == ["eu", "7"]
    rc, out, _ = run(["route", "users", "42", "--json", "--config", str(cfg)], capsys)
    assert rc == 0 and json.loads(out)["key"] == "42"


@pytest.mark.parametrize("keys", [["eu"], ["eu", "7", "9"]])
def test_route_names_a_composite_keys_columns_when_given_another_number_of_values(tmp_path, capsys, keys):
    """A composite key given one KEY (or three) said "pass a tuple of 2 values", the
    Python API's wording: the command says which columns, in which order, it needs."""
    cfg = write_config(tmp_path, shards=2)
    cfg.write_text(cfg.read_text() + '[groups.geo]\nstrategy = "hash"\ntables = { sites = ["region", "id"] }\n')
    rc, out, err = run(["route", "sites", *keys, "--config", str(cfg)], capsys)
    assert rc == 2 and out == "", (out, err)
    assert f"sites has a composite shard key (region, id): give 2 KEY values, one per column, in that " \
        f"order (got {len(keys)})" in err, err
    rc, out, err = run(["route", "users", "4", "2", "--config", str(cfg)], capsys)
    assert rc == 2 and "users's shard key is one column (id): give one KEY (got 2)" in err, err


def test_status_says_why_an_up_node_is_unusable():
    """A read-only primary and a replica that does not follow its primary are up, yet
    unusable: the table says why under their rows."""
    data = status_data()
    primary = dict(node("s0"), read_only=True, error=None)
    replica = dict(node("s0"), node="s0/r0", role="replica", lag_bytes=None, read_only=None,
                   error="it replays past the primary's WAL position: it does not follow this primary")
    data["shards"][0]["nodes"] = [primary, replica]
    out = render(data)
    assert "read-only: its transactions are read-only, it refuses writes" in out
    assert "error: it replays past the primary's WAL position" in out


# -- a catalog that cannot be read: the command's one line, not a warning before it ----------


def test_a_catalog_that_is_down_gives_route_one_error_line_and_no_warning_before_it(tmp_path):
    """The README: an error is one line, `error: ...`.  A catalog that refused the
    connection also printed "WARNING shardkit._cluster: ... routing by the config file's
    map until it answers" first: the command reports it itself (-v still shows it)."""
    with socket.socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text() + f'[catalog]\nurl = "postgresql+psycopg://app:pw@127.0.0.1:{port}/catalog"\n')
    argv = [sys.executable, "-m", "shardkit.cli", "route", "users", "42", "--config", str(cfg)]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 2, quiet
    assert len(quiet.stderr.splitlines()) == 1 and quiet.stderr.startswith("error: "), quiet.stderr
    assert "catalog" in quiet.stderr and "unknown setting" not in quiet.stderr
    loud = subprocess.run(argv[:3] + ["-v"] + argv[3:], capture_output=True, text=True, timeout=60)
    assert "routing by the config file's map" in loud.stderr and "pw@" not in loud.stderr


@pytest.mark.parametrize("argv", [
    ["--split", "events:10", "--split", "events:20", "--to", "s1"],
    ["--move-value", "stores:eu", "--to", "s1", "--move-value", "stores:us"],
    ["--split", "events:10", "--to", "s1", "--to", "s2"],
    ["--drain", "s0", "--drain", "s1"],
    ["--even", "rows", "--even", "bytes"],
    ["--plan", "a.json", "--plan", "b.json"],
])
@pytest.mark.parametrize("verb", ["plan", "apply"])
def test_a_planning_option_given_twice_is_refused_not_the_first_dropped(verb, argv, capsys):
    """`--split A --split B` planned B alone, silently: the first was dropped."""
    with pytest.raises(SystemExit) as e:
        cli.main(["rebalance", verb, *argv, "--config", "/nonexistent/shardkit.toml"])
    assert e.value.code == 2
    option = next(a for i, a in enumerate(argv) if a.startswith("--") and a in argv[i + 1:])
    assert f"error: {option} is given twice; a plan takes one" in capsys.readouterr().err
