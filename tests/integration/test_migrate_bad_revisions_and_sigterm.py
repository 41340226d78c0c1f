"""`shardkit migrate` as an operator meets it on a bad day: a revision file that does not
load (a syntax error, no down_revision, a down_revision naming no revision, an import
that fails), a deploy tool's SIGTERM in the middle of an upgrade, and a shard whose
schema differs in a schema the config does not name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from test_migrate_failures import BUCKETS, World

from waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0, bucket_count=BUCKETS)


@pytest.fixture
def world(dev, tmp_path):
    made = []

    def make(**kw) -> World:
        w = World(dev, tmp_path / f"w{len(made)}", **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        for i in range(len(w.servers)):   # nothing of a failed run may sleep on
            w.sql(i, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        w.close()


def two_revs(w: World) -> None:
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    w.rev("a2", "a1", "op.add_column('t', sa.Column('x', sa.Integer))", "op.drop_column('t', 'x')")


BROKEN = {
    "syntax error": "revision = 'a3'\ndown_revision = 'a2'\n\ndef upgrade(:\n    pass\n",
    "no down_revision": "revision = 'a3'\n\ndef upgrade():\n    pass\n\ndef downgrade():\n    pass\n",
    "unknown down_revision": "revision = 'a3'\ndown_revision = 'zz'\n\ndef upgrade():\n    pass\n\n"
                             "def downgrade():\n    pass\n",
    "failing import": "import no_such_module_anywhere\nrevision = 'a3'\ndown_revision = 'a2'\n",
}


@pytest.fixture(scope="module")
def at_a2(dev, tmp_path_factory):
    """Two shards at a2 (of a1, a2), shared by the cases that add a broken a3.py (each
    leaves them there, or fails)."""
    w = World(dev, tmp_path_factory.mktemp("at_a2"))
    two_revs(w)
    r = w.cli("migrate", "upgrade", "head")
    assert r.returncode == 0, r.stderr
    yield w
    w.close()


# Every breakage through `check`; `upgrade` and `downgrade` run the same check first
# (one breakage each shows they do).
@pytest.mark.parametrize("kind, verb", [
    *((kind, ("check",)) for kind in BROKEN),
    ("syntax error", ("upgrade",)),
    ("unknown down_revision", ("downgrade", "-1")),
], ids=lambda v: v[0] if isinstance(v, tuple) else v)
def test_a_revision_file_that_does_not_load_is_named_once_and_no_shard_is_touched(at_a2, kind, verb):
    """`migrate check` printed a traceback; `upgrade`/`downgrade` ran every shard's Alembic,
    each failing with the same bare `SyntaxError: invalid syntax` (or `KeyError: 'zz'`),
    naming neither the file nor what to do.  Now: one line, naming the file (or the
    revision it is about), exit status 2, every shard where it was."""
    w = at_a2
    assert [w.sql(i, "SELECT version_num FROM alembic_version") for i in range(2)] == [[("a2",)]] * 2
    a3 = w.versions / "a3.py"
    a3.write_text(BROKEN[kind])
    try:
        r = w.cli("migrate", *verb)
    finally:
        # The next case writes its own a3.py (and must not load this one's bytecode).
        a3.unlink()
        shutil.rmtree(w.versions / "__pycache__", ignore_errors=True)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == 2, (r.returncode, out)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "a3" in errors[0], errors[0]
    assert "fix" in errors[0] and "remove" in errors[0], errors[0]
    assert "upgrade head ..." not in r.stdout, "a shard's Alembic was started: " + r.stdout
    # (Read directly: `migrate current` is tested on its own; one process fewer per case.)
    assert [w.sql(i, "SELECT version_num FROM alembic_version") for i in range(2)] == [[("a2",)]] * 2


def migrate_current(w: World) -> dict:
    r = w.cli("migrate", "current", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sleeping(w: World, i: int) -> bool:
    return bool(w.sql(i, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND query LIKE 'SELECT pg_sleep%%' AND pid <> pg_backend_pid()")[0][0])


def test_sigterm_in_migrate_upgrade_stops_every_shard_and_reports_where_each_stands(world):
    """A deploy tool (systemd, Kubernetes, a CI job's timeout) stops with SIGTERM, sent to
    the command alone.  The command died at once, saying nothing, and the Alembic it had
    started went on migrating s0 on its own, orphaned (s1 never started).  Now it stops as
    for Ctrl-C: the running revision rolls back, no shard starts after it, and one line
    says where each shard stands."""
    w = world()
    w.rev("r1", None, "op.create_table('users', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('users')")
    w.rev("r2", "r1", "op.add_column('users', sa.Column('email', sa.Text))\n"
                      "op.execute('SELECT pg_sleep(60)')", "op.drop_column('users', 'email')")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardkit.cli", "migrate", "upgrade", "--parallel", "1", "--config", str(w.cfg),
         "--alembic-ini", str(w.ini)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=_interruptible)
    try:
        wait_for(lambda: _sleeping(w, 0) or proc.poll() is not None, 60, "r2 running on s0")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "Traceback" not in err, err
    assert proc.returncode != 0 and proc.returncode != -signal.SIGTERM, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    assert "s0 at r1" in lines[0] and "s1 at base (not started)" in lines[0], lines[0]
    assert not _sleeping(w, 0), "r2 went on running on s0 after the command ended"
    assert migrate_current(w) == {"s0": "r1", "s1": None}
    cols = w.sql(0, "SELECT count(*) FROM information_schema.columns "
                    "WHERE table_name = 'users' AND column_name = 'email'")[0][0]
    assert cols == 0, "r2's column stayed on s0 without its revision"


def test_check_reports_an_extra_index_in_a_schema_the_config_does_not_name(world):
    """A migration keeps a per-shard table in a schema of its own (audit.log, not in the
    config: no group nor reference table); one shard got an extra index by hand.  `check`
    compared the default schema and the config's schemas only, and said "no drift"."""
    w = world()
    w.rev("a1", None, "op.execute('CREATE SCHEMA audit')\n"
                      "op.create_table('log', sa.Column('id', sa.BigInteger, primary_key=True), "
                      "sa.Column('v', sa.Text), schema='audit')",
          "op.drop_table('log', schema='audit')\nop.execute('DROP SCHEMA audit')")
    r = w.cli("migrate", "upgrade", "head")
    assert r.returncode == 0, r.stderr
    r = w.cli("migrate", "check")
    assert r.returncode == 0, r.stdout + r.stderr   # the same on both shards: no drift
    w.sql(1, "CREATE INDEX log_v_extra ON audit.log (v)")

    r = w.cli("migrate", "check")
    assert r.returncode == 1, r.stdout + r.stderr
    drift = [ln for ln in r.stdout.splitlines() if ln.startswith("DRIFT: ")]
    assert any("s1: audit.log indexes differ" in d and "log_v_extra" in d for d in drift), r.stdout
