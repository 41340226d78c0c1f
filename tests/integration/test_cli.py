"""The shardkit command, run as a user would: what it does and says, through
``shardkit.cli.main`` in this process (``tests/inproc_cli.py``), and once as
``python -m shardkit.cli`` in a process of its own (a bad config's one clear line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inproc_cli import run

pytestmark = pytest.mark.integration


def shardkit(*args: str) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGS`` in this process (no interpreter start-up and imports)."""
    return run(args)


def shardkit_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m shardkit.cli ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "shardkit.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_route_prints_owner(tmp_path):
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text(
        "bucket_count = 1024\n"
        '[[shards]]\nname = "a"\nprimary = "postgresql+psycopg://u:hunter2@h1/db"\n'
        '[[shards]]\nname = "b"\nprimary = "postgresql+psycopg://u:hunter2@h2/db"\n'
        '[groups.users]\ntables = { users = "id" }\n'
    )
    import shardkit as sk
    c = sk.Cluster.from_config(cfg)
    r = shardkit("route", "users", "42", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shard"] == c.shard_for("users", 42)
    assert out["bucket"] == sk.bucket_for(42, 1024)
    assert "hunter2" not in r.stdout
    r = shardkit("route", "users", "42", "--config", str(cfg))
    assert f"-> shard {out['shard']}" in r.stdout and "hunter2" not in r.stdout
    r = shardkit("route", "nope", "1", "--config", str(cfg))
    assert r.returncode == 2 and "not in the shard map" in r.stderr


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "shardkit.toml"
    cfg.write_text('[[shards]]\nname = "a"\nprimary = "mysql://u:pw@h/db"\n')
    r = shardkit_process("route", "t", "1", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.startswith("error: shards[0].primary: ") and "pw" not in r.stderr
    assert "Traceback" not in r.stderr


def sk_load(path):
    from shardkit import load_config
    return load_config(path)


def test_dev_up_and_down():
    import pathlib
    import tempfile

    # pytest's tmp_path is private to root; the server user must reach the directory.
    base = pathlib.Path(tempfile.mkdtemp(prefix="shardkit-cli-"))
    os.chmod(base, 0o755)
    d = base / "dev"
    r = shardkit("dev", "up", "--shards", "2", "--replicas", "0", "--dir", str(d))
    try:
        assert r.returncode == 0, r.stderr
        assert (d / "shardkit.toml").exists()
        # The user adds groups; `dev up --catalog` on the running cluster keeps them.
        edits = '\n# my groups\n[groups.users]\ntables = { users = "id" }\n'
        (d / "shardkit.toml").write_text((d / "shardkit.toml").read_text() + edits)
        r = shardkit("dev", "up", "--shards", "2", "--replicas", "0", "--dir", str(d), "--catalog")
        assert r.returncode == 0, r.stderr
        assert edits in (d / "shardkit.toml").read_text()
        assert dict(sk_load(d / "shardkit.toml").groups[0].tables) == {"users": ("id",)}
        import shardkit as sk
        c = sk.Cluster.from_config(d / "shardkit.toml")
        for name in c.shard_names:
            with c.primary(name).connect() as conn:
                assert conn.exec_driver_sql("select 1").scalar() == 1
        assert c.config.catalog_url is not None
        with c.catalog.engine.connect() as conn:
            assert conn.exec_driver_sql("select current_database()").scalar() == "shardkit_catalog"
        c.dispose()
        r3 = shardkit("rebalance", "init", "--config", str(d / "shardkit.toml"))
        assert r3.returncode == 0 and "map version 1" in r3.stdout, r3.stderr
    finally:
        r2 = shardkit("dev", "down", "--dir", str(d))
    assert r2.returncode == 0, r2.stderr
    assert not d.exists()
    base.rmdir()


def test_demo_runs_and_cleans_up():
    r = shardkit("demo", "--shards", "2", "--replicas", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok:" in r.stdout and "MISMATCH" not in r.stdout
    assert "(not refused!)" not in r.stdout
    assert "cluster stopped and removed" in r.stdout
    assert "has no bucket map yet" not in r.stderr   # the demo runs `rebalance init` itself
    assert "shardkit verify: clean" in r.stdout and "s1 owns 0 buckets" in r.stdout
    assert "invoices 7500 and up: 2500 on s0, 0 left on s1" in r.stdout
    # The statements counted per node are the tour's, not shardkit's own questions to a
    # shard (its collation, an aggregate's name: asked of a primary, once): reads are on
    # replicas, the one read on a primary is inside the transaction that wrote.
    counted = [ln for ln in r.stdout.splitlines() if "statements per node:" in ln]
    assert len(counted) == 8, r.stdout
    assert [ln for ln in counted if "/primary" in ln] == [
        "  after writing customer 7: statements per node: {'s0/primary': 1}"], counted


def test_demo_exits_1_when_a_check_fails(monkeypatch, capsys):
    """A demo whose checks print MISMATCH is not a success: the run's status says so."""
    from shardkit import _demo

    monkeypatch.setattr(_demo, "_tour", lambda path, rebalance_ok: print(
        f"  rows [{_demo._check(False, 'rows on s0')}]"))
    assert _demo.run_demo(shards=1, replicas=0) == 1
    out = capsys.readouterr()
    assert "MISMATCH" in out.out and "cluster stopped and removed" in out.out
    assert "the demo's checks failed: rows on s0" in out.err
