"""A team that runs Alembic daily, through shardkit's `migrations/` environment: env.py's
own `process_revision_directives` (Alembic's cookbook recipes), what plain `alembic`
prints while it goes through every shard, and an env.py that does not migrate through
shardkit (Alembic's own template, migrating `sqlalchemy.url`) under `shardkit migrate`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import alembic
import pytest
from alembic_inproc import alembic as alembic_inproc
from test_migrate_failures import World, world  # noqa: F401 - world: a fixture (over this module's dev)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev(shardkit_module_cluster_factory):
    return shardkit_module_cluster_factory(shards=2, replicas=0)


def alembic_cmd(w: World, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Plain `alembic -c INI -x config=... ARGS` in this process (``alembic_inproc``), with
    ``path`` on sys.path as PYTHONPATH would put it."""
    return alembic_inproc(["-c", str(w.ini), "-x", f"config={w.cfg}", *args], path=path)


MODELS = '''
import sqlalchemy as sa
metadata = sa.MetaData()
sa.Table("gizmos", metadata, sa.Column("id", sa.BigInteger, primary_key=True))
'''

HOOKED_ENV = '''
from alembic import context
from alembic.operations import ops
from shardkit.migrate import run_migrations


def process_revision_directives(ctx, revision, directives):
    # Alembic's cookbook: no empty revision from autogenerate.
    if getattr(context.config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        return
    # A team's own addition to every generated revision.
    directives[0].upgrade_ops.ops.append(ops.ExecuteSQLOp("ANALYZE"))


run_migrations(context, process_revision_directives=process_revision_directives)
'''


def test_env_pys_process_revision_directives_runs_once_on_the_one_set_of_changes(world, tmp_path):
    """A process_revision_directives given to run_migrations() ran once per shard: what it
    adds was in the revision once per shard, and the cookbook's "no empty revision" recipe
    made the second shard's comparison fail with an IndexError inside Alembic."""
    (tmp_path / "gizmo_models.py").write_text(MODELS)
    w = world(shards=2)
    w.ini.write_text(w.ini.read_text().replace("# shardkit_metadata = myapp.models:Base.metadata",
                                               "shardkit_metadata = gizmo_models:metadata"))
    (w.ini.parent / "env.py").write_text(HOOKED_ENV)
    r = alembic_cmd(w, "revision", "--autogenerate", "-m", "gizmos", path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    [script] = list(w.versions.glob("*gizmos.py"))
    body = script.read_text()
    assert body.count("op.create_table('gizmos'") == 1, body
    assert body.count("op.execute('ANALYZE')") == 1, body
    r = alembic_cmd(w, "upgrade", "head", path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # Nothing to change: the recipe leaves no revision, on every shard alike.
    r = alembic_cmd(w, "revision", "--autogenerate", "-m", "nothing", path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not list(w.versions.glob("*nothing.py"))


def test_plain_alembic_names_the_shard_of_each_thing_it_prints(world):
    """`alembic current` (and `history -i`) going through every shard printed one revision
    per shard with no shard's name: shards at different revisions could not be told
    apart.  And env.py did not apply alembic.ini's logging, so `upgrade` said nothing of
    the revisions it ran."""
    w = world(shards=2)
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    w.rev("a2", "a1", "op.add_column('t', sa.Column('x', sa.Integer))", "op.drop_column('t', 'x')")
    r = alembic_cmd(w, "-x", "shard=s1", "upgrade", "a1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running upgrade  -> a1" in r.stderr, r.stderr
    r = alembic_cmd(w, "upgrade", "head")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running upgrade  -> a1" in r.stderr and "Running upgrade a1 -> a2" in r.stderr, r.stderr
    r = alembic_cmd(w, "-x", "shard=s0", "downgrade", "a1")
    assert r.returncode == 0, r.stdout + r.stderr
    r = alembic_cmd(w, "current")
    assert r.returncode == 0, r.stdout + r.stderr
    out = re.sub(r"\s+", " ", r.stdout)
    assert re.search(r"shard s0\b[^:]*: a1 shard s1\b[^:]*: a2 \(head\)", out), r.stdout
    # One shard named with -x shard=: Alembic's own output, as it is.
    r = alembic_cmd(w, "-x", "shard=s1", "current")
    assert r.returncode == 0 and r.stdout.strip() == "a2 (head)", r.stdout


ALEMBIC_TEMPLATE_ENV = Path(alembic.__file__).parent / "templates" / "generic" / "env.py"


def test_migrate_refuses_to_report_ok_for_shards_an_env_py_did_not_migrate(world):
    """An env.py that ignores -x shard= (Alembic's own template, migrating sqlalchemy.url:
    a team's existing migrations pointed at with --alembic-ini) migrated one database, or
    none, and `shardkit migrate upgrade` said "all 2 shards ok" with the others at base."""
    w = world(shards=2)
    w.rev("a1", None, "op.create_table('t', sa.Column('id', sa.BigInteger, primary_key=True))",
          "op.drop_table('t')")
    (w.ini.parent / "env.py").write_text(ALEMBIC_TEMPLATE_ENV.read_text())
    w.ini.write_text(w.ini.read_text().replace("shardkit_config = shardkit.toml",
                                               f"sqlalchemy.url = {w.url(0)}"))
    r = w.cli("migrate", "upgrade", "--parallel", "1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is False, report
    by = {s["shard"]: s for s in report["shards"]}
    assert not by["s1"]["ok"] and by["s1"]["revision_after"] is None, by
    assert "run_migrations" in by["s1"]["error"], by
    assert "run_migrations" in report["error"], report
    # The real thing works: shardkit's env.py migrates every shard and says so.
    (w.ini.parent / "env.py").write_text((Path(__file__).resolve().parents[2] / "migrations" / "env.py").read_text())
    r = w.cli("migrate", "upgrade", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {s["shard"]: s["revision_after"] for s in json.loads(r.stdout)["shards"]} == {"s0": "a1", "s1": "a1"}
