"""Alembic on every shard: the env.py driver, the ``shardkit migrate`` verbs, drift checks.

One revision chain for the whole cluster; each shard's primary keeps its own
``alembic_version`` table.  ``migrations/env.py`` calls :func:`run_migrations`,
which migrates one shard (``-x shard=s1``) or every shard in turn.

The ``shardkit migrate`` verbs run Alembic once per shard in separate
processes (Alembic's ``context`` and ``op`` are process-wide proxies, so
threads cannot migrate two databases at once), at most ``parallel`` at a time,
optionally one canary shard first, and report every shard's outcome.

shardkit's own SQL objects (the hash function) are an Alembic operation: add
``op.install_shardkit_sql()`` to a migration's ``upgrade()`` and
``op.uninstall_shardkit_sql()`` to its ``downgrade()``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.operations import MigrateOperation, Operations
from alembic.util import CommandError
from sqlalchemy import inspect, pool, text
from sqlalchemy.exc import DBAPIError

from ._cluster import Cluster, _translate_errors
from ._config import connect_timeout_args, counted, mask_url, split_secret_query
from ._guard import (
    CONFIGURED_TABLES,
    configured_tables,
    guard_fires_sql,
    guard_installed,
    guarded_tables,
    install_guard,
    slice_comparable,
    stale_guards,
    table_parts,
    table_shape,
    table_sql,
)
from ._sql import install as _install_sql
from ._sql import uninstall as _uninstall_sql
from .errors import ConfigurationError, ShardkitError, first_line

log = logging.getLogger("shardkit.migrate")

__all__ = [
    "DriftReport",
    "MigrationError",
    "MigrationInterrupted",
    "ShardResult",
    "check",
    "current",
    "run_command",
    "run_migrations",
    "schema_fingerprint",
]


class MigrationError(ShardkitError):
    """A migration failed on one or more shards; ``.results`` has every shard's outcome."""

    def __init__(self, message: str, results: Sequence[ShardResult]) -> None:
        self.results = list(results)
        self.failed = [r.shard for r in results if not r.ok]
        super().__init__(message)


class MigrationInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`run_command`: the shards being migrated were
    interrupted too (each rolls back the revision it was running), those not started yet
    were left alone.  Still a ``KeyboardInterrupt``; ``.results`` has every shard's outcome
    and revision, ``str()`` says where each shard stands."""

    def __init__(self, message: str, results: Sequence[ShardResult]) -> None:
        self.results = list(results)
        self.failed = [r.shard for r in results if not r.ok]
        super().__init__(message)


# -- Alembic operations -------------------------------------------------------------


@Operations.register_operation("install_shardkit_sql")
class InstallShardkitSQL(MigrateOperation):
    """``op.install_shardkit_sql()``: create shardkit's SQL functions (idempotent)."""

    @classmethod
    def install_shardkit_sql(cls, operations: Operations) -> Any:
        return operations.invoke(cls())

    def reverse(self) -> MigrateOperation:
        return UninstallShardkitSQL()


@Operations.register_operation("uninstall_shardkit_sql")
class UninstallShardkitSQL(MigrateOperation):
    """``op.uninstall_shardkit_sql()``: drop shardkit's SQL functions."""

    @classmethod
    def uninstall_shardkit_sql(cls, operations: Operations) -> Any:
        return operations.invoke(cls())

    def reverse(self) -> MigrateOperation:
        return InstallShardkitSQL()


@Operations.implementation_for(InstallShardkitSQL)
def _install(operations: Operations, operation: InstallShardkitSQL) -> None:
    _install_sql(operations.get_bind())


@Operations.implementation_for(UninstallShardkitSQL)
def _uninstall(operations: Operations, operation: UninstallShardkitSQL) -> None:
    _uninstall_sql(operations.get_bind())


@Operations.register_operation("install_shardkit_guard")
class InstallShardkitGuard(MigrateOperation):
    """``op.install_shardkit_guard()``: put the ownership guard on the tables the config
    guards (after creating a sharded table, so moves can capture its writes).  There is
    no reverse: dropping a table drops its trigger, and the shard's ownership must stay."""

    @classmethod
    def install_shardkit_guard(cls, operations: Operations) -> Any:
        return operations.invoke(cls())



def _migrating(operations: Operations, op_name: str) -> tuple[Cluster, str]:
    opts = operations.migration_context.opts
    cluster, shard = opts.get("shardkit_cluster"), opts.get("shardkit_shard")
    if cluster is None or shard is None:
        raise ShardkitError(
            f"op.{op_name}() needs to know the cluster and the shard: call "
            "shardkit.migrate.run_migrations(context) in env.py, as migrations/env.py does")
    return cluster, shard


@Operations.implementation_for(InstallShardkitGuard)
def _install_guard(operations: Operations, operation: InstallShardkitGuard) -> None:
    cluster, shard = _migrating(operations, "install_shardkit_guard")
    if isinstance(cluster, _ShardCluster):
        cluster.read_map()
    conn = operations.get_bind()
    if guard_installed(conn):
        # Ownership changes only with moves: keep the shard's own record of it (which
        # needs no catalog: one that does not answer now must not leave the table unguarded).
        install_guard(conn, cluster.config, None)
        return
    if cluster.catalog is None or cluster.map_version is None:
        # Nothing can move yet; `shardkit rebalance init` installs the guard everywhere.
        log.info("%s: no initialised catalog; the guard is installed by `shardkit rebalance init`", shard)
        return
    config = cluster.config
    owned = [b for b, s in enumerate(config.bucket_map) if s == shard] + \
        [s.id for s in config.slices if s.shard == shard]
    install_guard(conn, config, owned, config.slices)


# -- env.py driver -----------------------------------------------------------------------


class _ShardCluster(Cluster):
    """The cluster of :func:`run_migrations`: the catalog's map is read by the first
    ``op.install_shardkit_guard()``, the one operation that needs it, not by every
    shard's Alembic as it starts (nor waited for when the catalog does not answer)."""

    _read_catalog_at_start = False
    _map_read = False

    def read_map(self) -> None:
        """Route by the catalog's live map (read once; without a catalog, nothing)."""
        if self.catalog is not None and not self._map_read:
            self._map_read = True
            self._first_map()


#: First key of the advisory lock a shard's migration holds (after the other classes, "SH".."SK").
MIGRATE_LOCK_CLASS = 0x534C  # "SL"


def _config_path(context: Any) -> str:
    x = context.get_x_argument(as_dictionary=True)
    path = x.get("config") or os.environ.get("SHARDKIT_CONFIG") or \
        context.config.get_main_option("shardkit_config")
    if not path:
        raise ConfigurationError(
            "shardkit_config", "no cluster config for the migration",
            "pass -x config=shardkit.toml, set SHARDKIT_CONFIG, or set shardkit_config in alembic.ini",
        )
    return path


def _target_metadata(context: Any) -> Any:
    spec = (context.config.get_main_option("shardkit_metadata") or "").strip().strip("\"'")
    if not spec:
        return None
    mod, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigurationError(
            "shardkit_metadata", f"{spec!r} does not name an importable MetaData ({e})",
            "write it as package.module:Base.metadata, with the package importable from "
            "where alembic runs (PYTHONPATH)") from e
    return obj


#: context.configure() options run_migrations() sets itself, per shard.
_OWN_OPTIONS = frozenset({"connection", "shardkit_cluster", "shardkit_shard"})


def run_migrations(context: Any, **configure: Any) -> None:
    """Body of ``migrations/env.py``: migrate one shard (``-x shard=``) or every shard in turn.

    ``configure``: further options of Alembic's ``context.configure()`` for every shard
    (``include_object``, ``include_name``, ``compare_server_default``, ``render_item``,
    ``target_metadata`` in place of the ini's ``shardkit_metadata`` ...).  An
    ``include_name`` sees only the names shardkit's own lets through (it hides shardkit's
    schema from autogenerate); a ``process_revision_directives`` runs after shardkit's,
    which keeps one set of operations for all shards.
    """
    own = sorted(_OWN_OPTIONS & set(configure))
    if own:
        raise ConfigurationError(
            "run_migrations()", f"{', '.join(own)} is set by shardkit for each shard",
            "leave it out of run_migrations(context, ...) in env.py")
    moved = [f"{k}={configure[k]!r}" for k, default in (("version_table", "alembic_version"),
                                                          ("version_table_schema", None))
             if configure.get(k, default) != default]
    if moved:
        # Alembic's CLI prints a CommandError as one line ("FAILED: ..."), not a traceback.
        raise CommandError(
            f"run_migrations(): {moved[0]} is not supported (`shardkit migrate current` and "
            "`check` read each shard's alembic_version table, on its search_path): leave it out "
            "of run_migrations(context, ...) in env.py, after renaming the version table to "
            "alembic_version on every shard")
    their_names = configure.pop("include_name", None)
    their_directives = configure.pop("process_revision_directives", None)
    cmd = getattr(getattr(context.config, "cmd_opts", None), "cmd", None)
    verb = getattr(cmd[0], "__name__", "") if cmd else ""
    if context.is_offline_mode():
        # Alembic's CLI prints a CommandError as one line ("FAILED: ..."), not a traceback.
        instead = ("`alembic ... stamp REVISION` without --sql" if verb == "stamp" else
                   f"`shardkit migrate {verb} REVISION` (or `alembic ... {verb} REVISION` without --sql)"
                   if verb in ("upgrade", "downgrade") else
                   "`shardkit migrate upgrade|downgrade REVISION`")
        raise CommandError(
            "offline (--sql) migrations are not supported across shards: every shard is "
            f"migrated on a live connection (shardkit's operations read its schema); run {instead} instead"
        )
    cluster = _ShardCluster.from_config(_config_path(context), follow_map=False)
    x = context.get_x_argument(as_dictionary=True)
    shards = [x["shard"]] if x.get("shard") else list(cluster.shard_names)
    for s in shards:
        if s not in cluster.shard_names:
            raise ConfigurationError("-x shard", f"unknown shard {s!r}",
                                     "shards: " + ", ".join(cluster.shard_names))
    try:
        destination = context.get_revision_argument()   # "-1" also for "branch@-1"
    except Exception:   # none (current, check, revision ...), or one Alembic reports itself
        destination = None
    if len(shards) > 1 and isinstance(destination, str) and _RELATIVE_TO_CURRENT.match(destination.strip()):
        # As `shardkit migrate` does: each shard would count from its own revision.
        at = {s: _revision(cluster, s) for s in shards}
        if len(set(at.values())) > 1:
            cluster.dispose()
            states = ", ".join(f"{s} at {r or 'base'}" for s, r in at.items())
            raise CommandError(
                f"{destination} counts from each shard's own revision, and the shards are at "
                f"different revisions ({states}): name the revision every shard should reach "
                f"(`alembic ... {verb or 'upgrade|downgrade'} REVISION`), or migrate one shard "
                "with -x shard=NAME")
    metadata = configure.pop("target_metadata") if "target_metadata" in configure else _target_metadata(context)
    # Autogenerate compares the default schema, and the schemas the models' tables live
    # in (not all of the database's: shardkit's own would look like tables to drop).
    schemas = {t.schema for m in (metadata if isinstance(metadata, (list, tuple)) else [metadata])
               if m is not None for t in m.tables.values() if t.schema}
    one_diff = _OneDiff()

    def include_name(name: Any, type_: str, parents: Any) -> bool:
        # Autogenerate compares the models' schemas only (shardkit's own would look like
        # tables to drop), then asks env.py's own filter, if it gave one.
        if type_ == "schema" and name is not None and name not in schemas:
            return False
        return their_names is None or bool(their_names(name, type_, parents))

    def directives(migration_context: Any, revision: Any, scripts: list[Any]) -> None:
        one_diff(migration_context, revision, scripts)
        # Once, on the one set of operations kept, after the last shard's comparison:
        # run for each shard, it changed that set once per shard (what it added was in
        # the revision as many times), and one that emptied the directives (Alembic's
        # "no empty revision" recipe) left the next shard's comparison nothing to fill.
        if their_directives is not None and one_diff.shard == shards[-1]:
            their_directives(migration_context, revision, scripts)
    # Under `shardkit migrate` (one shard, its receipt expected): shardkit's warnings of
    # this shard's migration (what an operation did not do) go to the command's report,
    # which otherwise keeps a shard's output to itself when it succeeds.
    recorder = (_WarningRecorder(os.environ[_RECEIPT] + _WARNINGS)
                if x.get("shard") and os.environ.get(_RECEIPT) else None)
    try:
        for shard in shards:
            one_diff.shard = shard
            if not x.get("shard"):
                # What Alembic prints next (`current`: a revision; `upgrade`: what it runs)
                # is this shard's, and says so nowhere itself (-q leaves this out too).
                context.config.print_stdout(f"shard {shard}:")
                getattr(context.config, "stdout", sys.stdout).flush()
            engine = _engine(cluster, shard)
            with engine.connect() as connection:
                # One migration of a shard at a time: another one (a second deploy) waits,
                # then starts from the revision the first left, instead of failing midway.
                _lock_shard(connection, shard)
                context.configure(**{
                    "target_metadata": metadata,
                    "transaction_per_migration": True,
                    "compare_type": True,
                    "include_schemas": bool(schemas),
                    **configure,
                    "connection": connection,
                    "process_revision_directives": directives,
                    "include_name": include_name,
                    # For shardkit's operations (op.install_shardkit_guard()).
                    "shardkit_cluster": cluster,
                    "shardkit_shard": shard,
                })
                try:
                    with context.begin_transaction():
                        context.run_migrations()
                except CommandError as e:
                    # Alembic prints only this message ("Target database is not up to date.",
                    # "Can't locate revision ..."): say which of the shards it is about.
                    if x.get("shard"):
                        raise
                    raise CommandError(f"shard {shard}: {e} (every shard's revision: "
                                       "`shardkit migrate current`)") from e
                except Exception as e:
                    if not x.get("shard"):
                        done = shards[:shards.index(shard)]
                        e.add_note(f"(on shard {shard}" + (f"; this command went through "
                                   f"{', '.join(done)} before it)" if done else ")"))
                    raise
            engine.dispose()
            if x.get("shard") and os.environ.get(_RECEIPT):
                # For `shardkit migrate`: this shard was migrated here, by this env.py.
                Path(os.environ[_RECEIPT]).write_text(shard, encoding="utf-8")
    finally:
        if recorder is not None:
            recorder.close()
        cluster.dispose()


#: The file each shard's Alembic under `shardkit migrate` writes once run_migrations() has
#: migrated the shard: an env.py that does not call it (Alembic's own, migrating
#: ``sqlalchemy.url`` whichever shard is named) exits 0 having left the shard alone.
_RECEIPT = "SHARDKIT_MIGRATE_RECEIPT"
#: Beside the receipt: shardkit's warnings of that shard's migration, one JSON string a line.
_WARNINGS = ".warnings"


class _WarningRecorder(logging.Handler):
    """Appends the ``shardkit`` loggers' warnings (and worse) to ``path`` as they come
    (whatever alembic.ini's logging does with them), for `shardkit migrate`'s report."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.WARNING)
        self.path = path
        self.logger = logging.getLogger("shardkit")
        self.level_before = self.logger.level
        if self.logger.getEffectiveLevel() > logging.WARNING:
            self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record.getMessage()) + "\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


def _recorded_warnings(receipt: Path, shard: str) -> list[str]:
    path = Path(str(receipt) + _WARNINGS)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            msg = str(json.loads(line))
            out.append(msg[len(shard) + 2:] if msg.startswith(f"{shard}: ") else msg)
    return out


def _lock_shard(connection: Any, shard: str) -> None:
    """Take the shard's migration lock (a session lock, held until the connection closes;
    committed, so that each revision still runs in its own transaction).

    Waited for in attempts shorter than PostgreSQL's ``deadlock_timeout``, each in its own
    transaction: a waiter holds a snapshot while it waits, and a CREATE INDEX CONCURRENTLY
    of the migration holding the lock waits for every older snapshot to go.  One long
    wait would be a deadlock, which PostgreSQL breaks by failing that index build."""
    deadlock_ms = connection.execute(text(
        "SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'")).scalar() or 1000
    wait_ms = max(10, min(500, deadlock_ms // 2))
    connection.commit()
    said = False
    while True:
        try:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
            connection.execute(text("SELECT pg_advisory_lock(:c, 0)"), {"c": MIGRATE_LOCK_CLASS})
        except DBAPIError as e:
            connection.rollback()
            if getattr(e.orig, "sqlstate", None) != "55P03":   # lock_not_available
                raise
            if not said:
                log.warning("%s: another migration of this shard is running; waiting for it", shard)
                said = True
            continue
        connection.commit()
        return


class _OneDiff:
    """``process_revision_directives`` for a revision generated across shards.

    Alembic runs ``env.py``'s ``run_migrations()`` once per shard and, under
    ``revision --autogenerate`` or ``alembic check``, adds each shard's
    comparison with the models to the script as a further set of operations;
    rendering keeps only the last, and ``alembic check`` cannot read more
    than one.  Every shard is compared, one set of operations is kept, and a
    shard whose comparison differs from the first shard's is refused: the
    revision would be right for some shards only.
    """

    def __init__(self) -> None:
        self.shard = ""
        self.first: tuple[str, list[str], list[str]] | None = None

    def __call__(self, migration_context: Any, revision: Any, directives: list[Any]) -> None:
        if not directives:
            return
        script = directives[-1]
        ups, downs = script.upgrade_ops_list, script.downgrade_ops_list
        rendered = (self.shard, _op_set(ups[-1]), _op_set(downs[-1]))
        if self.first is None:
            self.first = rendered
            return
        if rendered[1:] != self.first[1:]:
            raise ShardkitError(
                f"shard {self.shard}'s schema compares with the models differently from shard "
                f"{self.first[0]}'s: a revision generated from one would be wrong for the other. "
                "See the differences with `shardkit migrate check`, bring the shards in line, or "
                f"generate against one shard with -x shard={self.first[0]}"
            )
        script.upgrade_ops = ups[0]
        script.downgrade_ops = downs[0]


def _op_set(container: Any) -> list[str]:
    """A set of autogenerated operations, each rendered on its own, in sorted order:
    Alembic lists some of them in the order it meets them in the database (tables or
    columns the models no longer have), which two shards with the same schema need not share."""
    from alembic.autogenerate import render_python_code
    from alembic.operations.ops import OpContainer, UpgradeOps

    out: list[str] = []
    for op in container.ops:
        if isinstance(op, OpContainer):
            out.extend(_op_set(op))  # a table's column, index and constraint changes
        else:
            out.append(render_python_code(UpgradeOps([op])))
    return sorted(out)


def _engine(cluster: Cluster, shard: str) -> Any:
    """A throwaway engine on ``shard``'s primary (migrations must not hold pooled
    connections), whose connection failures are the cluster's ShardUnavailable.  A
    connection attempt gives up as the cluster's own do (after 3 s, or the URL's
    ``connect_timeout``): a primary that accepts connections and never answers must not
    hang ``current``, ``check`` and every shard's Alembic."""
    from sqlalchemy import create_engine, event

    url = cluster.node_url(shard)
    # A secret in the query string would show in the engine's repr.
    bare, secrets = split_secret_query(url)
    engine = create_engine(bare, poolclass=pool.NullPool,
                           connect_args={**connect_timeout_args(url), **secrets})
    event.listen(engine, "handle_error", _translate_errors(cluster, shard, f"{shard}/primary", url),
                 retval=True)
    return engine


@contextlib.contextmanager
def _shard_connection(cluster: Cluster, shard: str) -> Iterator[Any]:
    """A connection to ``shard``'s primary; an unreachable one is a ShardUnavailable naming it."""
    eng = _engine(cluster, shard)
    try:
        with eng.connect() as conn:
            yield conn
    finally:
        eng.dispose()


# -- the shardkit migrate verbs ---------------------------------------------------------


@dataclass
class ShardResult:
    """What happened on one shard."""

    shard: str
    ok: bool
    seconds: float = 0.0
    revision_before: str | None = None
    revision_after: str | None = None
    error: str | None = None
    output: str = field(default="", repr=False)
    #: shardkit's warnings of the shard's migration (an operation that did not do it all).
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "ok": self.ok, "seconds": round(self.seconds, 3),
                "revision_before": self.revision_before, "revision_after": self.revision_after,
                "error": self.error, "warnings": self.warnings}


def default_alembic_ini() -> Path:
    """``migrations/alembic.ini`` in the current directory.

    There is no fallback: shardkit's own ``migrations/`` holds no revisions, so running
    it instead of a project's would report every shard migrated having done nothing."""
    return Path.cwd() / "migrations" / "alembic.ini"


def _existing_ini(alembic_ini: str | os.PathLike[str] | None) -> Path:
    if not alembic_ini:
        ini = default_alembic_ini()
        if not ini.exists():
            raise ConfigurationError(
                "--alembic-ini", f"no migrations/alembic.ini in the current directory ({Path.cwd()})",
                "run from your project's directory, or pass --alembic-ini PATH")
        return _usable_ini(ini)
    ini = Path(alembic_ini)
    if not ini.exists():
        raise ConfigurationError("--alembic-ini", f"{ini} does not exist",
                                 "point it at the migrations/alembic.ini of your project")
    return _usable_ini(ini)


def _usable_ini(ini: Path) -> Path:
    """``ini`` if Alembic can read it and find its scripts: else a ConfigurationError now,
    not a traceback of ``check`` nor every shard's Alembic failing alike."""
    import configparser

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    hint = ("point it at your project's migrations/alembic.ini (an Alembic config whose "
            "[alembic] section names script_location)")
    if ini.is_dir():
        raise ConfigurationError("--alembic-ini", f"{ini} is a directory, not an Alembic config file", hint)
    try:
        script = ScriptDirectory.from_config(Config(str(ini)))
    except (CommandError, configparser.Error, UnicodeDecodeError) as e:
        raise ConfigurationError("--alembic-ini", f"{ini} is not a usable Alembic config: {first_line(e)}",
                                 hint) from None
    # Every revision file, loaded now as each shard's Alembic would: one that does not load
    # is named once, before any shard is touched (not a traceback, nor every shard failing
    # with the same bare "SyntaxError: invalid syntax").
    # Each shard's Alembic runs as `python -m alembic`, which puts the current directory
    # first on sys.path (the `shardkit` script's own sys.path lacks it): a revision that
    # imports the project's package from there loads there, so it must load here too.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            script.get_heads()
        except Exception as e:
            dirs = {Path(d).resolve() for d in [script.versions, *(script.version_locations or [])]}
            where = (e.filename if isinstance(e, SyntaxError) else
                     getattr(getattr(e, "obj", None), "__file__", None)   # no down_revision
                     or next((f.filename for f in reversed(traceback.extract_tb(e.__traceback__))
                              if Path(f.filename).resolve().parent in dirs), None))  # its own code
            # A down_revision naming no revision: Alembic warns which, then fails on a KeyError.
            why = (str(said[-1].message) if isinstance(e, KeyError) and said
                   else f"{type(e).__name__}: {first_line(e)}")
            raise ConfigurationError(
                str(where or script.versions), f"a revision script does not load ({why})",
                "fix or remove the revision file (its Python, its revision or down_revision); "
                "no shard was touched") from None
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    return ini


def current(cluster: Cluster) -> dict[str, str | None]:
    """Each shard's revision (``None``: at base, no migration applied)."""
    out: dict[str, str | None] = {}
    for shard in cluster.shard_names:
        out[shard] = _revision(cluster, shard)
    return out


def _revision(cluster: Cluster, shard: str) -> str | None:
    with _shard_connection(cluster, shard) as c:
        if not inspect(c).has_table("alembic_version"):
            return None
        revs = [r[0] for r in c.execute(text("SELECT version_num FROM alembic_version"))]
        return ",".join(sorted(revs)) or None


_UNKNOWN = "unknown (unreachable)"
_NOT_RUN = "not run: interrupted (Ctrl-C, SIGTERM) before it started"


def _revisions_after(cluster: Cluster, results: Sequence[ShardResult]) -> None:
    """Fill in each result's revision now; a shard that cannot be reached says so
    (its failure is in the report, which must not be lost to it)."""
    for res in results:
        try:
            res.revision_after = _revision(cluster, res.shard)
        except ShardkitError as e:
            res.revision_after = _UNKNOWN
            if res.ok:
                res.ok, res.error = False, f"finished, then unreachable: {e}"


def run_command(
    cluster: Cluster,
    config_path: str,
    command: str,
    revision: str,
    *,
    alembic_ini: str | os.PathLike[str] | None = None,
    parallel: int = 4,
    canary: str | None = None,
    shards: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    x_args: Sequence[str] = (),
) -> list[ShardResult]:
    """Run ``alembic upgrade|downgrade REVISION`` on every shard; raise MigrationError on failure.

    ``x_args``: further ``-x KEY=VALUE`` arguments for every shard's Alembic (what
    ``context.get_x_argument()`` gives env.py and the migrations); ``config`` and
    ``shard`` are shardkit's own.

    With ``canary``, that shard goes first and alone; the others start only if it
    succeeded.  The rest run at most ``parallel`` at a time.  Ctrl-C (KeyboardInterrupt), or SIGTERM,
    interrupts the shards being migrated and starts no other: once they have stopped,
    :class:`MigrationInterrupted` reports every shard's revision.
    """
    if command not in ("upgrade", "downgrade"):
        raise ValueError(command)
    ini = _existing_ini(alembic_ini)
    if parallel < 1:
        raise ConfigurationError("--parallel", f"must be at least 1, not {parallel}")
    targets = list(shards or cluster.shard_names)
    unknown = [s for s in targets if s not in cluster.shard_names]
    if unknown or (canary and canary not in cluster.shard_names):
        bad = unknown[0] if unknown else canary
        raise ConfigurationError("shards" if unknown else "canary (--canary)", f"unknown shard {bad!r}",
                                 "shards: " + ", ".join(cluster.shard_names))
    own = [a for a in x_args if a.partition("=")[0] in ("config", "shard")]
    if own:
        raise ConfigurationError(
            "-x", f"{own[0]}: shardkit sets config= and shard= for each shard's Alembic itself",
            "give the cluster config with --config; to migrate one shard, run plain "
            "`alembic -x config=PATH -x shard=NAME ...`")
    if not revision.strip():
        # (Alembic answers an empty one with a bare AssertionError on every shard.)
        raise ConfigurationError("REVISION", f"{revision!r} is empty or blank",
                                 f"name the revision to {command} to: head, base, a revision id, -1 ...")
    say = progress or (lambda msg: None)
    before = current(cluster)
    if _RELATIVE_TO_CURRENT.match(revision.strip()):
        # Each shard's Alembic counts from that shard's revision: shards left at different
        # revisions (a deploy that failed on some) would end at different ones again, those
        # behind going further back than intended.
        at = {before.get(s) for s in targets}
        if len(at) > 1:
            states = ", ".join(f"{s} at {before.get(s) or 'base'}" for s in targets)
            raise ConfigurationError(
                "REVISION", f"{revision} counts from each shard's own revision, and the shards are "
                f"at different revisions ({states})",
                f"name the revision every shard should reach: shardkit migrate {command} REVISION")
    # The Alembic processes running now, and whether Ctrl-C stopped the command: then
    # no shard starts, and those running are interrupted (by the terminal, which signals
    # the whole process group, and by this process, for a SIGINT sent to it alone).
    running: dict[str, subprocess.Popen[str]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def one(shard: str) -> ShardResult:
        with lock:
            if stop.is_set():
                return ShardResult(shard, False, 0.0, before.get(shard), None, _NOT_RUN)
            say(f"{shard}: {command} {revision} ...")
            t = time.monotonic()
            receipt = Path(receipts.name) / str(targets.index(shard) if shard in targets else "canary")
            proc = subprocess.Popen(
                [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"config={config_path}",
                 "-x", f"shard={shard}", *(a for x in x_args for a in ("-x", x)), command, revision],
                # Not the terminal: Alembic wraps its messages to the width of a terminal on
                # stdin, and a migration must not wait for input.
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, _RECEIPT: str(receipt)},
            )
            running[shard] = proc
        try:
            stdout, stderr = proc.communicate()
        finally:
            with lock:
                running.pop(shard, None)
        dt = time.monotonic() - t
        ok = proc.returncode == 0
        out = (stdout + stderr).strip()
        err = None
        if ok and not receipt.exists():
            ok, err = False, (
                f"alembic exited 0 but did not migrate this shard: the env.py of {ini} does not "
                "call shardkit.migrate.run_migrations(context) (Alembic's own env.py migrates "
                "sqlalchemy.url, whichever shard it is given); use shardkit's migrations/env.py")
        elif not ok:
            err = ("interrupted (Ctrl-C, SIGTERM): its revision in progress rolled back"
                   if stop.is_set() or proc.returncode == -signal.SIGINT
                   else _error_line(out) or f"alembic exited {proc.returncode}")
        said = _recorded_warnings(receipt, shard)
        with lock:  # (a shard's lines together, not mixed with another's finishing meanwhile)
            # (Without Alembic's own "FAILED: " before its error: the line says it already.)
            say(f"{shard}: {'ok' if ok else 'FAILED'} in {dt:.1f} s"
                + (f": {err.removeprefix('FAILED: ')}" if err else ""))
            for warning in said:
                say(f"{shard}: warning: {warning}")
        return ShardResult(shard, ok, dt, before.get(shard), None, err, out, said)

    def interrupted(results: list[ShardResult]) -> MigrationInterrupted:
        _revisions_after(cluster, results)
        states = ", ".join(f"{r.shard} at {r.revision_after or 'base'}"
                           + (" (not started)" if r.error == _NOT_RUN else "") for r in results)
        return MigrationInterrupted(
            f"{command} {revision} stopped; shards now: {states} (each revision commits on its "
            f"own: one that was running rolled back). Run `shardkit migrate {command} {revision}` "
            "again to go on", results)

    def run_all(shards: list[str], workers: int, later: Sequence[str] = ()) -> list[ShardResult]:
        """Migrate ``shards``, ``workers`` at a time; ``later``: the shards to migrate after
        them (reported as not started if Ctrl-C stops these)."""
        # A deploy tool (systemd, Kubernetes, a CI timeout) stops with SIGTERM: stop as for
        # Ctrl-C, or this process would die unreported, its shards' Alembic going on orphaned.
        previous = (signal.signal(signal.SIGTERM, signal.default_int_handler)
                    if threading.current_thread() is threading.main_thread() else None)
        ex = ThreadPoolExecutor(max_workers=workers)
        futures = [ex.submit(one, s) for s in shards]
        try:
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            while True:
                with lock:
                    stop.set()
                    for proc in running.values():
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGINT)
                try:
                    ex.shutdown(wait=True, cancel_futures=True)
                    break
                except KeyboardInterrupt:  # again: passed on again, as the terminal would
                    continue
            raise interrupted(results + [
                f.result() if not f.cancelled()
                else ShardResult(s, False, 0.0, before.get(s), None, _NOT_RUN)
                for s, f in zip(shards, futures)]
                + [ShardResult(s, False, 0.0, before.get(s), None, _NOT_RUN) for s in later]) from None
        finally:
            ex.shutdown(wait=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return [f.result() for f in futures]

    # Where each shard's Alembic says it migrated the shard (see _RECEIPT).
    receipts = tempfile.TemporaryDirectory(prefix="shardkit-migrate-")
    try:
        results: list[ShardResult] = []
        rest = list(targets)
        if canary:
            rest.remove(canary) if canary in rest else None
            r = run_all([canary], 1, later=rest)[0]
            results.append(r)
            if not r.ok:
                _revisions_after(cluster, results)
                skipped = [ShardResult(s, False, 0.0, before.get(s), before.get(s),
                                       "not run: the canary shard failed") for s in rest]
                states = ", ".join(f"{x.shard} at {x.revision_after or 'base'}" for x in results + skipped)
                raise MigrationError(
                    f"{command} failed on canary shard {canary}: {(r.error or '').removeprefix('FAILED: ')}; the other shards "
                    f"({', '.join(rest) or 'none'}) were not touched. Shards now: {states}",
                    results + skipped,
                )
        results.extend(run_all(rest, parallel))
        _revisions_after(cluster, results)
        failed = [r for r in results if not r.ok]
        if failed:
            states = ", ".join(f"{r.shard} at {r.revision_after or 'base'}" for r in results)
            # (One shard's error is not named by it again; Alembic's "FAILED: " is left out,
            # as in the progress lines.)
            errors = [(r.shard, (r.error or "").removeprefix("FAILED: ")) for r in failed]
            raise MigrationError(
                f"{command} {revision} failed on {', '.join(r.shard for r in failed)}: "
                + (errors[0][1] if len(errors) == 1 else "; ".join(f"{sh}: {e}" for sh, e in errors))
                + f". Shards now: {states}",
                results,
            )
    finally:
        receipts.cleanup()
    return results


#: A revision counted from where a shard is (``-1``, ``+2``, ``branch@-1``), not from a
#: named one (``head-1``, ``ae10+2``).
_RELATIVE_TO_CURRENT = re.compile(r"^(?:[^@]+@)?[+-]\d+$")


def _error_line(output: str) -> str | None:
    """The line of Alembic's output that names the error: the exception that ended a
    traceback (the last one: the one raised from the others), with PostgreSQL's
    ``DETAIL:`` and ``HINT:`` lines that follow it (the duplicated key of a unique index,
    the row a constraint refused: what to fix), or Alembic's own ``FAILED: ...`` (on
    stdout, before any warning on stderr); else the last line."""
    found = None
    in_traceback = after_exception = False
    for line in output.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback, after_exception = True, False
        elif in_traceback and line.strip() and not line[0].isspace():
            found, in_traceback = line.strip(), False   # its frames are indented, not it
            after_exception = True
        elif after_exception and line.startswith(("DETAIL:  ", "HINT:  ")):
            found = f"{found} {line.strip()}"
        elif line.startswith("FAILED: "):
            found, after_exception = line.strip(), False
        else:
            after_exception = False
    if found is None:
        # Not alembic.ini's log of what ran ("INFO  [alembic...] Running upgrade ...").
        lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith("INFO ")]
        found = lines[-1] if lines else None
    return found if found is None or len(found) < 400 else found[:397] + "..."


# -- drift ---------------------------------------------------------------------------------


def schema_fingerprint(connection: Any, schemas: Iterable[str] = ()) -> dict[str, Any]:
    """Tables, columns (their types as PostgreSQL writes them, defaults and generation),
    indexes, unique, foreign (with their actions) and check constraints of
    the current schema (tables by name), and of each of ``schemas`` (tables as
    ``schema.table``), comparable across shards."""
    insp = inspect(connection)
    out: dict[str, Any] = {}
    for schema in (None, *sorted(set(schemas))):
        # Column types as PostgreSQL writes them (format_type), for the schema's tables at
        # once: the reflected type's str() is the generic one ("TIMESTAMP" for both timestamp
        # and timestamptz, "ARRAY" for any array, "NULL" for a type SQLAlchemy does not know).
        # With the column's collation where it is not its type's (it orders and compares
        # the column's values: ORDER BY, unique indexes, a scatter's merge).
        pg_types = {(t, c): typ for t, c, typ in connection.execute(text(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) || coalesce(("
            "SELECT ' COLLATE ' || quote_ident(cn.nspname) || '.' || quote_ident(co.collname) "
            "FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace "
            "WHERE co.oid = a.attcollation AND a.attcollation <> "
            "(SELECT ty.typcollation FROM pg_type ty WHERE ty.oid = a.atttypid)), '') FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = coalesce(:s, current_schema()) AND a.attnum > 0 AND NOT a.attisdropped"),
            {"s": schema})}
        # The table's triggers (not shardkit's guard: checked on its own), row-level
        # security, and the parent and bounds of a partition.
        triggers: dict[str, list[tuple[str, str]]] = {}
        for t, name, definition, enabled in connection.execute(text(
                "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = coalesce(:s, current_schema()) AND NOT t.tgisinternal "
                "AND t.tgname NOT IN ('shardkit_guard', 'shardkit_guard_truncate') ORDER BY 1, 2"),
                {"s": schema}):
            state = {"D": " (DISABLED)", "R": " (ENABLE REPLICA)", "A": " (ENABLE ALWAYS)"}.get(enabled, "")
            triggers.setdefault(t, []).append((name, definition + state))
        settings: dict[str, list[str]] = {}
        for t, rls, force, parent, bound in connection.execute(text(
                "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
                "(SELECT string_agg(i.inhparent::regclass::text, ', ' ORDER BY i.inhseqno) "
                "FROM pg_inherits i WHERE i.inhrelid = c.oid), pg_get_expr(c.relpartbound, c.oid) "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = coalesce(:s, current_schema()) AND c.relkind IN ('r', 'p')"),
                {"s": schema}):
            settings[t] = [x for x in (
                "ROW LEVEL SECURITY" if rls else None, "FORCE ROW LEVEL SECURITY" if force else None,
                (f"PARTITION OF {parent} {bound}" if bound else f"INHERITS ({parent})") if parent else None)
                if x]
        for t in sorted(insp.get_table_names(schema=schema)):
            if t == "alembic_version" and schema is None:
                continue
            columns = insp.get_columns(t, schema=schema)
            cols = [(c["name"], pg_types.get((t, c["name"]), str(c["type"])), c["nullable"]) for c in columns]
            # What fills a column: a default, or its generation (identity, or computed).
            defaults = [(c["name"], c["default"]) for c in columns if c.get("default") is not None]
            defaults += [(c["name"], "GENERATED " + ("ALWAYS" if c["identity"].get("always") else
                                                     "BY DEFAULT") + " AS IDENTITY")
                         for c in columns if c.get("identity")]
            defaults += [(c["name"], f"GENERATED ALWAYS AS ({c['computed']['sqltext']})"
                          + (" STORED" if c["computed"].get("persisted") else ""))
                         for c in columns if c.get("computed")]
            defaults.sort()
            checks = sorted((c["name"], c["sqltext"]) for c in insp.get_check_constraints(t, schema=schema))
            # The full definition: an index on an expression, or a partial one, differs
            # from another of the same name by more than its column names.
            idx = sorted(tuple(r) for r in connection.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = coalesce(:s, current_schema()) AND tablename = :t"),
                {"s": schema, "t": t}))
            uq = sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t, schema=schema))
            # With its actions (ON DELETE CASCADE ...), deferrability and MATCH.
            fks = sorted((tuple(f["constrained_columns"]),
                          ".".join(filter(None, (f.get("referred_schema"), f["referred_table"]))),
                          tuple(f["referred_columns"]),
                          " ".join(f"{k} {v}" for k, v in sorted((f.get("options") or {}).items())))
                         for f in insp.get_foreign_keys(t, schema=schema))
            pk = tuple(insp.get_pk_constraint(t, schema=schema).get("constrained_columns") or ())
            out[t if schema is None else f"{schema}.{t}"] = {
                "columns": cols, "defaults": defaults, "indexes": idx, "unique": uq,
                "foreign_keys": fks, "check_constraints": checks, "pk": pk,
                "triggers": triggers.get(t, []), "settings": settings.get(t, [])}
    return out


def _configured_schemas(cluster: Cluster) -> set[str]:
    """The schemas the config names tables of (``archive`` of ``archive.users``)."""
    config = cluster.config
    names = {t for g in config.groups for t in g.tables} | set(config.reference_tables)
    return {parts[0] for parts in map(table_parts, names) if len(parts) == 2}


def _enum_types(connection: Any, schemas: Iterable[str] = ()) -> dict[str, list[str]]:
    """The enum types visible in the current schema (by name), and those of ``schemas``
    (as ``schema.name``), with their labels in sort order."""
    insp = inspect(connection)
    get_enums = getattr(insp, "get_enums", None)  # PostgreSQL's inspector has it
    if get_enums is None:
        return {}
    out = {e["name"]: list(e["labels"]) for e in get_enums() if e.get("visible", True)}
    for schema in sorted(set(schemas)):
        out.update({f"{schema}.{e['name']}": list(e["labels"]) for e in get_enums(schema=schema)})
    return out


def _invalid_indexes(connection: Any, schemas: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(index, table) of the indexes PostgreSQL does not use (``pg_index.indisvalid`` false:
    a CREATE INDEX or REINDEX CONCURRENTLY that failed, or one running now) in the current
    schema (by name) and in ``schemas`` (as ``schema.name``)."""
    rows = connection.execute(text(
        "SELECT n.nspname = current_schema(), n.nspname, ic.relname, tc.relname FROM pg_index x "
        "JOIN pg_class ic ON ic.oid = x.indexrelid JOIN pg_class tc ON tc.oid = x.indrelid "
        "JOIN pg_namespace n ON n.oid = ic.relnamespace WHERE NOT x.indisvalid "
        "AND (n.nspname = current_schema() OR n.nspname = ANY(CAST(:s AS text[]))) ORDER BY 2, 3"),
        {"s": sorted(set(schemas))}).all()
    return [(i, t) if here else (f"{ns}.{i}", f"{ns}.{t}") for here, ns, i, t in rows]


#: Settings that change how values are written as text: fixed while copies are compared,
#: so that equal rows on servers set up differently compare equal.
_TEXT_SETTINGS = (("TimeZone", "UTC"), ("DateStyle", "ISO, YMD"), ("IntervalStyle", "postgres"),
                  ("extra_float_digits", "1"), ("bytea_output", "hex"))


def _reference_rows(connection: Any, tables: Iterable[str]) -> dict[str, tuple[int, str]]:
    """(row count, digest of the rows) of each reference table that exists on this shard."""
    for name, value in _TEXT_SETTINGS:
        connection.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
    out: dict[str, tuple[int, str]] = {}
    for t in tables:
        if not connection.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table_sql(t)}).scalar():
            continue   # reported as a missing table
        n, digest = connection.execute(text(
            f"SELECT count(*), md5(coalesce(string_agg(r::text, E'\\n' ORDER BY r::text COLLATE \"C\"), '')) "
            f"FROM {table_sql(t)} AS r")).one()
        out[t] = (n, digest)
    return out


@dataclass
class DriftReport:
    """Shards at different revisions, with schemas that differ, or whose copies of the
    reference tables differ."""

    revisions: dict[str, str | None]
    heads: list[str]
    schema_differences: list[str]
    reference_differences: list[str] = field(default_factory=list)

    @property
    def revision_drift(self) -> bool:
        return len(set(self.revisions.values())) > 1

    @property
    def ok(self) -> bool:
        return not self.revision_drift and not self.schema_differences and not self.reference_differences

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "revisions": self.revisions, "heads": self.heads,
                "revision_drift": self.revision_drift,
                "schema_differences": self.schema_differences,
                "reference_differences": self.reference_differences}


def _heads(ini: Path) -> list[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    return sorted(ScriptDirectory.from_config(Config(str(ini))).get_heads())


def check(cluster: Cluster, *, alembic_ini: str | os.PathLike[str] | None = None) -> DriftReport:
    """Compare every shard's revision, schema and copies of the reference tables with the
    others'; name the INVALID indexes of every shard."""
    ini = _existing_ini(alembic_ini)
    revisions = current(cluster)
    prints: dict[str, dict[str, Any]] = {}
    enums: dict[str, dict[str, list[str]]] = {}
    invalid: dict[str, list[tuple[str, str]]] = {}
    copies: dict[str, dict[str, tuple[int, str]]] = {}
    schemas = _configured_schemas(cluster)
    config_diffs: list[str] = []
    for shard in cluster.shard_names:
        with _shard_connection(cluster, shard) as c:
            # And every other schema of the shard's own (a migration's, one made by hand),
            # not shardkit's: one only some shards have shows as tables missing on others.
            insp = inspect(c)
            here = schemas | (set(insp.get_schema_names()) - {
                insp.default_schema_name, "information_schema", "shardkit", "shardkit_catalog"})
            prints[shard] = schema_fingerprint(c, here)
            enums[shard] = _enum_types(c, here)
            invalid[shard] = _invalid_indexes(c, here)
            copies[shard] = _reference_rows(c, cluster.config.reference_tables)
            config_diffs.extend(_config_against_schema(cluster, shard, c))
    diffs: list[str] = []
    ref_name = cluster.shard_names[0]
    ref = prints[ref_name]
    # An index PostgreSQL does not use (what a concurrent build that failed leaves, also
    # when every shard has it): its definition is the same as a valid one's.
    for shard in cluster.shard_names:
        diffs.extend(
            f"{shard}: index {i} of {t} is INVALID (what a CREATE INDEX CONCURRENTLY that failed "
            f"leaves behind; queries do not use it): REINDEX INDEX CONCURRENTLY {i}, or drop it "
            "and create it again"
            for i, t in invalid[shard])
    ref_copies = copies[ref_name]
    reference_diffs = []
    for shard in cluster.shard_names[1:]:
        for t in cluster.config.reference_tables:
            mine, theirs = copies[shard].get(t), ref_copies.get(t)
            if mine is None or theirs is None or mine == theirs:
                continue
            counts = (f"{counted(mine[0], 'row')} on each" if mine[0] == theirs[0]
                      else f"{counted(mine[0], 'row')}, {theirs[0]} on {ref_name}")
            reference_diffs.append(f"{shard}: reference table {t} rows differ from {ref_name} ({counts})")
    for shard, fp in prints.items():
        if shard == ref_name:
            continue
        # An enum's labels are part of every column of its type: a label missing on
        # one shard makes its writes fail there alone.
        for e in sorted(set(enums[ref_name]) | set(enums[shard])):
            mine, theirs = enums[shard].get(e), enums[ref_name].get(e)
            if mine == theirs:
                continue
            if mine is None:
                diffs.append(f"{shard}: enum type {e} missing (present on {ref_name})")
            elif theirs is None:
                diffs.append(f"{shard}: extra enum type {e} (absent on {ref_name})")
            else:
                diffs.append(f"{shard}: enum type {e} labels are {_short(mine)}, on {ref_name} "
                             f"{_short(theirs)}")
        for t in sorted(set(ref) | set(fp)):
            if t not in fp:
                diffs.append(f"{shard}: table {t} missing (present on {ref_name})")
            elif t not in ref:
                diffs.append(f"{shard}: extra table {t} (absent on {ref_name})")
            else:
                for part in ("columns", "defaults", "pk", "indexes", "unique", "foreign_keys",
                             "check_constraints", "triggers", "settings"):
                    mine, theirs = fp[t][part], ref[t][part]
                    if mine == theirs:
                        continue
                    if part == "pk":
                        diffs.append(f"{shard}: {t} primary key is {_short(mine)}, on {ref_name} "
                                     f"{_short(theirs)}")
                        continue
                    # Name what one shard has and the other lacks, not both whole lists.
                    only_here = [x for x in mine if x not in theirs]
                    only_ref = [x for x in theirs if x not in mine]
                    what = [f"only on {shard}: {_short(only_here)}"] if only_here else []
                    what += [f"only on {ref_name}: {_short(only_ref)}"] if only_ref else []
                    if not what:  # the same items in another order (columns)
                        what = [f"in another order: {_short(mine)} vs {_short(theirs)}"]
                    diffs.append(f"{shard}: {t} {part.replace('_', ' ')} differ from {ref_name}, "
                                 + "; ".join(what))
    heads = _heads(ini) if ini.exists() else []
    return DriftReport(revisions, heads, diffs + config_diffs, reference_diffs)


def _config_against_schema(cluster: Cluster, shard: str, conn: Any) -> list[str]:
    """What a migration that renamed a configured table's shard-key column, or the table,
    left behind on ``shard`` (the same on every shard, so no difference between them): a
    key column the config names that the table lacks, guards out of date (their function
    reads the old column, or records a move's writes under the old name), and, on a
    guarded shard, configured tables a migration created without a guard."""
    config = cluster.config
    keyed = {t: cols for g in config.groups for t, cols in g.tables.items()}
    have = dict(conn.execute(text(
        f"SELECT n.tbl, array_agg(a.attname::text) FROM {CONFIGURED_TABLES} JOIN pg_attribute a "
        "ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped GROUP BY n.tbl"),
        configured_tables(keyed)).all())
    out = [f"{shard}: {t} has no column {k}, its shard key in the config (renamed or dropped by a "
           "migration?): statements and the ownership guard need it; name the column the table "
           "has now in the config's groups"
           for t, cols in sorted(keyed.items()) if t in have for k in cols if k not in have[t]]
    if not guard_installed(conn):
        return out
    try:
        guarded = [g for g in guarded_tables(config) if g.key in have.get(g.table, ())]
    except ConfigurationError:   # a config the guard cannot cover (composite hash keys)
        return out
    # A table created after the guard was installed, by a migration that did not call
    # op.install_shardkit_guard(): its writes are neither checked against the shard's
    # buckets nor captured by a move.  (Range and list groups are guarded once the shard
    # has their slices, and only with a key the slices compare with.)
    # Enabled as PostgreSQL fires it in the application's sessions (an ENABLE REPLICA
    # trigger, 'R', fires only under session_replication_role = replica), on the table and
    # on each of its partitions (each has its own clone of it).
    enabled = dict(conn.execute(text(
        f"SELECT n.tbl, {guard_fires_sql('c.oid')} "
        f"FROM {CONFIGURED_TABLES} JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'shardkit_guard'"),
        configured_tables(g.table for g in guarded)).all())
    triggered = {t for t, on in enabled.items() if on}
    sliced = set(conn.execute(text(
        "SELECT DISTINCT grp FROM shardkit.slices")).scalars()) if conn.execute(text(
            "SELECT to_regclass('shardkit.slices') IS NOT NULL")).scalar() else set()
    out.extend(f"{shard}: {g.table} has no ownership guard (created after the guard was installed, "
               "by a migration that did not call op.install_shardkit_guard()): its writes are not "
               "checked against the shard's buckets nor captured by a move; run a migration "
               "calling op.install_shardkit_guard(), or `shardkit rebalance init`"
               if g.table not in enabled else
               f"{shard}: the ownership guard of {g.table} is disabled, on it or on a partition "
               "(ALTER TABLE ... DISABLE TRIGGER, or ENABLE REPLICA TRIGGER, shardkit_guard): its writes are not checked "
               "against the shard's buckets nor captured by a move; run a migration calling "
               "op.install_shardkit_guard(), or `shardkit rebalance init`, which enable it again"
               for g in guarded if g.table not in triggered and (g.kind == "hash" or (
                   g.group in sliced and slice_comparable(g.value_kind, table_shape(conn, g.table)[2][g.key]))))
    out.extend(f"{shard}: the ownership guard of {t} is out of date (installed before the table "
               "was renamed or its shard key or primary key changed, or by an older shardkit): its "
               "writes may fail, or a move miss them; run a migration calling "
               "op.install_shardkit_guard(), or `shardkit rebalance init`"
               for t in stale_guards(conn, guarded, config.bucket_count))
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) < 200 else s[:197] + "..."


def describe_target(cluster: Cluster, shard: str) -> str:
    return mask_url(cluster.node_url(shard))
