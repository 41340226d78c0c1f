"""The ``shardkit`` command.

One function per verb (as in Alembic's ``command`` module).  This is the only
place that catches :class:`~shardkit.errors.ShardkitError` (argument mistakes
included, as :class:`UsageError`) and the driver errors of a server a command
could not use: it prints one line (never a password) and exits with status 2.
(``migrate upgrade|downgrade`` exit 1 when a migration fails, ``status``, ``verify`` and
``migrate check`` 1 when they find a problem, ``demo`` 1 when one of its checks fails; argparse's usage errors exit 2 with its
usage text; output piped into a reader that stops early, like ``head``, ends the command
quietly with status 1; Ctrl-C ends it with one ``interrupted:`` line and status 130, and so
do SIGTERM and SIGHUP, unless they were ignored when it started.)
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc

from ._cluster import Cluster
from ._config import _compress, counted, mask_url
from .errors import ConfigurationError, RebalanceError, ShardkitError, ShardUnavailable

__all__ = ["main"]


class UsageError(ShardkitError):
    """A mistake in the command's arguments (exit status 2, like argparse's own)."""


DEFAULT_DEV_DIR = ".shardkit-dev"

#: Exit status of a command stopped by Ctrl-C (SIGINT), as a shell reports it: 128 + 2.
INTERRUPTED = 130


# Only ASCII digits: str.isdigit() also accepts '²' (which int() refuses) and
# other scripts' digits (which int() reads, so '١٢' would route as 12).
_ASCII_INT = re.compile(r"-?[0-9]+")
# --type int: what PostgreSQL reads as an integer in ASCII (a sign, blanks around it).
_TYPED_INT = re.compile(r"[ \t]*[+-]?[0-9]+[ \t]*")


def _parse_key(raw: str, kind: str) -> Any:
    if kind == "int" or (kind == "auto" and _ASCII_INT.fullmatch(raw)):
        # --type int too: int() reads '١٢' and '４２', which PostgreSQL refuses as an integer.
        if not _TYPED_INT.fullmatch(raw):
            raise UsageError(f"key {raw!r} is not an integer (ASCII digits 0-9, optionally signed)")
        return int(raw)
    if kind == "uuid" or kind == "auto":
        try:
            return uuid.UUID(raw)
        except ValueError:
            if kind == "uuid":
                raise UsageError(f"key {raw!r} is not a UUID") from None
    return raw


# How to read a KEY like a range group's bounds or a list group's values, by their type:
# (parse, what it must look like).
_KEY_FORMS: dict[type, tuple[Any, str]] = {
    str: (str, "a string"),
    datetime.datetime: (datetime.datetime.fromisoformat,
                        "a date-time (YYYY-MM-DDTHH:MM:SS, with an offset such as +00:00 or Z "
                        "when the bounds have one)"),
    datetime.date: (datetime.date.fromisoformat, "a date (YYYY-MM-DD)"),
    datetime.time: (datetime.time.fromisoformat, "a time (HH:MM:SS)"),
    decimal.Decimal: (decimal.Decimal, "a decimal number"),
    float: (float, "a number"),
    uuid.UUID: (uuid.UUID, "a UUID"),
}


def _group_key_types(strategy: Any, width: int) -> list[type | None]:
    """Per part of a key of ``width`` parts, the one type of a range group's bounds or a
    list group's values (None: no such group, or values of several types)."""
    from ._strategies import ListStrategy, RangeStrategy

    if isinstance(strategy, RangeStrategy):
        samples = [x for r in strategy.ranges for x in (r.lower, r.upper) if x is not None]
    elif isinstance(strategy, ListStrategy):
        samples = list(strategy.mapping)
    else:
        return [None] * width
    out: list[type | None] = []
    for i in range(width):
        kinds = set()
        for v in samples:
            part = v[i] if width > 1 and isinstance(v, tuple) and len(v) == width else v
            if width > 1 and not isinstance(v, tuple):
                kinds.add(None)
                continue
            kinds.add(type(part))
        if kinds == {int, float}:
            kinds = {float}
        kind = kinds.pop() if len(kinds) == 1 else None
        out.append(kind if kind is int or kind in _KEY_FORMS else None)
    return out


def _parse_group_key(raw: str, kind: type | None, group: str | None) -> Any:
    """``raw`` read as ``kind``, the type of its group's bounds or values (else by the
    --type auto rules): a date range group's key '2024-05-01' is a date, a list group of
    zip codes written as strings takes '10115' as a string."""
    if kind is None:
        return _parse_key(raw, "auto")
    if kind is int:
        return _parse_key(raw, "int")
    parse, form = _KEY_FORMS[kind]
    try:
        return parse(raw)
    except (ValueError, decimal.InvalidOperation):
        raise UsageError(f"key {raw!r} is not {form}, as the bounds or values of group {group} are; "
                         "give the key in that form") from None


def _move_number(raw: str) -> int:
    """A MOVE argument: a move's number, as the catalog numbers them (1 and up, a bigint:
    beyond it the catalog's server would refuse it with an obscure error)."""
    if not _TYPED_INT.fullmatch(raw) or not 1 <= int(raw) <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a move's number (1 or more; "
                                         "`shardkit rebalance status` lists them)")
    return int(raw)


def _open_cluster(args: argparse.Namespace, *, warn_no_map: bool = True) -> Cluster:
    """The command's cluster, not following the map (a command reads it once; a
    follower thread would only log retries of a catalog that is down while it ends).  A catalog
    that cannot be read is the command's to report (its one error line, or status's
    catalog line), not a warning before that too (``-v`` shows it).  A catalog that answers
    with no map yet (before ``rebalance init``) is warned of here (``warn_no_map``): the
    follower that says so in an application does not run in a command."""
    from ._cluster import log as logger

    level = logger.level
    if not args.verbose:
        logger.setLevel(logging.ERROR)
    try:
        cluster = Cluster.from_config(args.config, follow_map=False)
    finally:
        logger.setLevel(level)
    if warn_no_map and _catalog_without_map(cluster):
        logger.warning("catalog %s %s; routing by the config file's map until it has one",
                       mask_url(cluster.config.catalog_url), _NO_MAP)
    return cluster


_NO_MAP = "has no bucket map yet (run `shardkit rebalance init`)"


def _catalog_without_map(cluster: Cluster) -> bool:
    """A catalog is configured and answered, and holds no map yet."""
    return cluster.catalog is not None and cluster.map_version is None and not cluster._catalog_error


def _show_key(key: Any) -> str:
    """A key as the command line takes it: a date as 2024-05-01 and a uuid bare (not
    Python's datetime.date(...) and UUID(...)); a string quoted, so that '42' and 42 differ."""
    if isinstance(key, tuple):
        return "(" + ", ".join(_show_key(part) for part in key) + ")"
    return repr(key) if isinstance(key, str) else str(key)


def cmd_route(args: argparse.Namespace) -> int:
    """Print the shard (and bucket) that owns a key."""
    cluster = _open_cluster(args)
    try:
        try:
            tr = cluster.router.table_route(args.table)
        except ShardkitError:
            tr = None   # shard_for() below says what is wrong with the table
        if tr is not None and tr.key_columns and len(tr.key_columns) != len(args.key):
            columns = ", ".join(tr.key_columns)
            raise UsageError(
                f"{args.table} has a composite shard key ({columns}): give {len(tr.key_columns)} KEY "
                f"values, one per column, in that order (got {len(args.key)})" if len(tr.key_columns) > 1
                else f"{args.table}'s shard key is one column ({columns}): give one KEY (got {len(args.key)})")
        if args.type == "auto":
            # A range or list group's keys are of its bounds' or values' type: read each
            # KEY so, not by its look (the command line gives every key as a string).
            kinds = _group_key_types(tr.strategy if tr else None, len(args.key))
            parts = [_parse_group_key(k, kind, tr.group if tr else None)
                     for k, kind in zip(args.key, kinds)]
        else:
            parts = [_parse_key(k, args.type) for k in args.key]
        key = parts[0] if len(parts) == 1 else tuple(parts)
        if cluster.catalog is not None and cluster.map_version is None and cluster._catalog_error:
            # The file's map is the catalog's as of the last move at best: an answer by it
            # could name a shard that gave the key's bucket away.
            raise ShardUnavailable(f"{cluster._catalog_error}; `route` answers only by the catalog's map "
                                   "(the config file's may be out of date)")
        shard = cluster.shard_for(args.table, key)
        bucket = cluster.bucket_for(args.table, key)
        primary = cluster.config.shard(shard).primary
    finally:
        cluster.dispose()
    out = {"table": args.table, "key": str(key) if len(parts) == 1 else [str(p) for p in parts],
           "bucket": bucket, "shard": shard,
           "primary": mask_url(primary)}
    if args.json:
        print(json.dumps(out))
    else:
        via = f" -> bucket {bucket}" if bucket is not None else ""
        print(f"{args.table} key {_show_key(key)}{via} -> shard {shard} (primary {mask_url(primary)})")
    return 0


def cmd_dev_up(args: argparse.Namespace) -> int:
    """Start a local cluster of real PostgreSQL servers."""
    from .devcluster import DevCluster

    cluster = DevCluster.up(Path(args.dir), shards=args.shards, replicas=args.replicas,
                            bucket_count=args.buckets)
    if args.catalog:
        _add_catalog(cluster, Path(cluster.base_dir) / "shardkit.toml")
    print(f"local cluster up in {cluster.base_dir}:")
    for shard in cluster.shards:
        for node in shard.nodes:
            print(f"  {node.name:<12} {node.role:<8} 127.0.0.1:{node.port}")
    print(f"config: {Path(cluster.base_dir) / 'shardkit.toml'}")
    print(f"stop it with: shardkit dev down --dir {shlex.quote(str(cluster.base_dir))}")
    return 0


def _add_catalog(cluster: Any, path: Path) -> None:
    """Create the catalog database and name it in the config at ``path``: a ``[catalog]``
    table appended to the file as it is (the user's groups and comments stay), unless
    the file already has one."""
    import tomllib

    from .devcluster import to_toml

    url = cluster.create_catalog()
    if not path.exists():
        cluster.write_config(path, {"catalog": {"url": url}})
        return
    text = path.read_text(encoding="utf-8")
    try:
        has_catalog = "catalog" in tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ShardkitError(f"{path} is not valid TOML ({e}); fix it, or remove it and run "
                            "`shardkit dev up --catalog` again to have it written") from None
    if has_catalog:
        return
    path.write_text(text + ("" if text.endswith("\n") else "\n") + "\n"
                    + to_toml({"catalog": {"url": url}}), encoding="utf-8")


def cmd_dev_down(args: argparse.Namespace) -> int:
    """Stop a local cluster started by ``dev up`` and remove its files."""
    from .devcluster import DevCluster

    base = Path(args.dir)
    if not (base / "devcluster.json").exists():
        print(f"no local cluster in {base}")
        return 0
    DevCluster.load(base).down(remove=not args.keep_files)
    print(f"local cluster in {base} stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a local cluster and walk through routing on real data."""
    from ._demo import run_demo

    return run_demo(dir=args.dir, keep=args.keep, shards=args.shards, replicas=args.replicas)


def cmd_status(args: argparse.Namespace) -> int:
    """Show shards and nodes: role, up, lag, connections, buckets, rows."""
    from ._status import collect, render

    cluster = _open_cluster(args, warn_no_map=False)   # its catalog line says so
    try:
        data = collect(cluster, args.config)
        if _catalog_without_map(cluster):
            data["catalog_error"] = f"the catalog {_NO_MAP}"
    finally:
        cluster.dispose()
    print(json.dumps(data, indent=2, default=str) if args.json else render(data))
    return 0 if data["ready"] else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    """Run Alembic on every shard, or report revisions and drift."""
    from . import migrate

    cluster = _open_cluster(args)
    try:
        if args.migrate_command == "current":
            revs = migrate.current(cluster)
            if args.json:
                print(json.dumps(revs))
            else:
                for shard, rev in revs.items():
                    print(f"{shard}: {rev or '(base: no migration applied)'}")
            return 0
        if args.migrate_command == "check":
            report = migrate.check(cluster, alembic_ini=args.alembic_ini)
            if args.json:
                print(json.dumps(report.as_dict(), indent=2))
            else:
                for shard, rev in report.revisions.items():
                    print(f"{shard}: {rev or '(base)'}")
                print(f"heads: {', '.join(report.heads) or '(none)'}")
                if report.revision_drift:
                    print("DRIFT: shards are at different revisions")
                for d in report.schema_differences + report.reference_differences:
                    print(f"DRIFT: {d}")
                if report.ok:
                    print("no drift: every shard has the same revision and schema")
            return 0 if report.ok else 1
        progress = None if args.json else (lambda msg: print(msg, flush=True))
        try:
            results = migrate.run_command(
                cluster, args.config, args.migrate_command, args.revision,
                alembic_ini=args.alembic_ini, parallel=args.parallel, canary=args.canary,
                progress=progress, x_args=args.x_args,
            )
        except (migrate.MigrationError, migrate.MigrationInterrupted) as e:
            stopped = isinstance(e, migrate.MigrationInterrupted)
            if args.json:
                print(json.dumps({"ok": False, "error": str(e), **({"interrupted": True} if stopped else {}),
                                  "shards": [r.as_dict() for r in e.results]}, indent=2))
            else:
                print(f"{'interrupted' if stopped else 'error'}: {e}", file=sys.stderr)
            return INTERRUPTED if stopped else 1
        if args.json:
            print(json.dumps({"ok": True, "shards": [r.as_dict() for r in results]}, indent=2))
        else:
            warned = sum(len(r.warnings) for r in results)
            print(f"{args.migrate_command} {args.revision}: {'all ' if len(results) > 1 else ''}"
                  f"{counted(len(results), 'shard')} ok"
                  + (f" ({counted(warned, 'warning')} above)" if warned else ""))
        return 0
    finally:
        cluster.dispose()


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every shard holds only rows the map assigns to it."""
    from .verify import verify

    cluster = _open_cluster(args)
    try:
        report = verify(cluster)
    finally:
        cluster.dispose()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def _make_plan(args: argparse.Namespace, cluster: Cluster) -> Any:
    from . import _rebalance_plan as rp
    from .rebalance import (_need_catalog, check_live_map, check_slice_plan, refuse_published_gained,
                            refuse_taken_slice_numbers, refuse_unknown_targets, shard_weights, slice_key)

    catalog = _need_catalog(cluster)
    current = catalog.current_map()
    if current is None:
        raise RebalanceError("the catalog has no map yet: run `shardkit rebalance init`")
    check_live_map(cluster, current)
    live, slices = current.bucket_map, current.slices
    chosen = [bool(args.add), bool(args.drain), bool(args.even), bool(args.split), bool(args.move_value)]
    if getattr(args, "plan", None):
        if any(chosen) or args.to or args.lower:
            raise UsageError("--plan FILE applies a stored plan; do not also say what to plan "
                             "(--add, --drain, --even, --split, --move-value, --to, --lower)")
        try:
            raw = json.loads(Path(args.plan).read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"--plan {args.plan}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:
            raise UsageError(f"--plan {args.plan}: not a plan written by `plan --out` (not JSON: {e})") from None
        plan = rp.plan_from_dict(raw)
        if isinstance(plan, rp.SlicePlan):
            fresh = tuple(s for s in slices if s.group == plan.group) in (plan.old, plan.split)
        else:
            fresh = plan.old_map == live
        if not fresh:
            raise RebalanceError(f"{args.plan} was planned against another map than the live one "
                                 f"(version {current.version}); make a new plan")
        try:
            refuse_taken_slice_numbers(plan, slices, current.version)
            refuse_published_gained(plan, slices, current.version)
        except RebalanceError as e:
            raise RebalanceError(f"{args.plan}: {e}") from None
        refuse_unknown_targets(cluster, plan)
        check_slice_plan(cluster, plan)
        return plan
    if sum(chosen) > 1:
        given = [flag for flag, on in zip(("--add", "--drain", "--even", "--split", "--move-value"), chosen) if on]
        raise UsageError(f"{' and '.join(given)} exclude each other: plan one of --add, --drain, --even, "
                         "--split or --move-value at a time")
    if sum(chosen) != 1:
        raise UsageError("say what to plan: --add SHARD [--add ...], --drain SHARD, --even rows|bytes, "
                         "--split GROUP:KEY --to SHARD or --move-value GROUP:VALUE --to SHARD")
    if args.to and not (args.split or args.move_value):
        raise UsageError(f"--to {args.to} names the target of --split or --move-value; "
                         "--add, --drain and --even choose their targets themselves")
    if args.lower and not args.split:
        raise UsageError("--lower says which side of a --split moves; there is no --split")
    if args.split or args.move_value:
        if not args.to:
            raise UsageError("--split and --move-value need --to SHARD")
        if args.to not in cluster.shard_names:
            raise UsageError(f"--to {args.to}: no such shard in the config (shards: "
                             f"{', '.join(cluster.shard_names)}); add the shard to the config first")
        option = "--split" if args.split else "--move-value"
        spec = args.split or args.move_value
        group, key = _group_key(spec, slices, option, cluster.file_config)
        kind = next((s.kind for s in slices if s.group == group), None)
        if args.split and kind == "list":
            raise UsageError(f"{option} {spec}: group {group} is a list group, which has no ranges to split; "
                             f"move one of its values: --move-value {group}:VALUE --to SHARD")
        if args.move_value and kind == "range":
            raise UsageError(f"{option} {spec}: group {group} is a range group, which has no values to move; "
                             f"split one of its ranges and move a side: --split {group}:KEY --to SHARD [--lower]")
        key = slice_key(cluster, group, key, option, args.to)
        try:
            if args.split:
                sliced = rp.plan_split_range(slices, group, key, args.to, lower=args.lower)
            else:
                sliced = rp.plan_move_value(slices, group, key, args.to)
        except ConfigurationError as e:
            # Their fields name the planners' parameters (at, value, group): say the option.
            if e.field not in ("at", "value", "group"):
                raise
            raise UsageError(f"{option} {spec}: {e.problem}" + (f" ({e.hint})" if e.hint else "")) from None
        check_slice_plan(cluster, sliced)
        return sliced
    weights = shard_weights(cluster, by=args.even, bucket_map=live) if args.even else None
    if args.add:
        unknown = [a for a in args.add if a not in cluster.shard_names]
        if unknown:
            raise UsageError(f"--add {unknown[0]}: no such shard in the config (shards: "
                             f"{', '.join(cluster.shard_names)}); add the new shard to the config first")
        owning = [a for a in args.add if a in live]
        if owning:
            owned = counted(live.count(owning[0]), "bucket")
            raise UsageError(f"--add {owning[0]}: that shard already owns {owned} "
                             "(added before?); --add takes shards that own none. To even out the shards, "
                             "plan --even rows")
        return rp.plan_add_shards(live, args.add)
    if args.drain:
        if args.drain not in cluster.shard_names:
            raise UsageError(f"--drain {args.drain}: no such shard in the config (shards: "
                             f"{', '.join(cluster.shard_names)})")
        if args.drain not in live:
            return rp.plan_from_maps(live, live, f"drain {args.drain}: nothing to move, it owns no bucket")
        if len(cluster.shard_names) == 1:
            raise UsageError(f"--drain {args.drain}: it is the last shard in the config; add the shard "
                             "that takes its buckets to the config first")
        # Every other configured shard receives, those that own nothing yet included.
        return rp.plan_drain(live, args.drain,
                             remaining=[s for s in cluster.shard_names if s != args.drain])
    assert weights is not None
    return rp.plan_even(live, weights, shards=list(cluster.shard_names))


def _drain_leftovers(cluster: Cluster, slices: Any, shard: str) -> str:
    """What a ``--drain shard`` plan leaves on ``shard`` (it moves hash buckets alone), as a
    note for stderr, or "": the range and list slices the catalog gives it, and the groups
    whose rows the config file places there (or, for a custom function, may place)."""
    from ._slices import movable_kind
    from ._strategies import ListStrategy, RangeStrategy

    stays = [f"slice {s.id} ({s.describe()})" for s in slices if s.shard == shard and not s.default]
    # A list group's default slice cannot move (SlicePlan refuses it): its listed values can,
    # one by one, but the keys no value lists keep landing on its shard.
    pinned = [s.group for s in slices if s.shard == shard and s.default]
    stays += [f"the default of group {g} (the values no slice of it lists)" for g in pinned]
    for g in cluster.file_config.groups:
        strategy = g.strategy
        if isinstance(strategy, (RangeStrategy, ListStrategy)):
            if movable_kind(g)[0] is not None:
                continue  # its slices, above, say where its keys are
            owners = ({r.shard for r in strategy.ranges} if isinstance(strategy, RangeStrategy)
                      else {*strategy.mapping.values(), strategy.default})
            if shard in owners:
                stays.append(f"group {g.name} (its {strategy.kind} keys there cannot move: "
                             f"{movable_kind(g)[1]})")
        elif strategy.kind == "custom":
            stays.append(f"group {g.name} (its custom function may place keys there)")
    if not stays:
        return ""
    return (f"note: --drain moves hash buckets only; still on {shard} after it: " + "; ".join(stays)
            + ". Move the slices with --split GROUP:KEY or --move-value GROUP:VALUE --to SHARD, "
            f"and keep {shard} in the config until no group places rows there"
            + (f"; a list group's default cannot move (--move-value takes values out of it one by one, "
               f"but the values no slice lists keep landing on {shard}), so {shard} stays in the config "
               f"while it holds the default of {', '.join(pinned)}" if pinned else ""))


def _group_key(spec: str, slices: Any, option: str, config: Any = None) -> tuple[str, Any]:
    """``GROUP:KEY`` -> (group, key typed like the group's bounds or values)."""
    from ._slices import key_kind, movable_kind

    group, sep, raw = spec.partition(":")
    # A group whose name holds a ':' ([groups."eu:events"]) is its whole name, not the
    # part before its first ':' (the longest such name, if several fit).
    named = sorted({s.group for s in slices} | {g.name for g in (config.groups if config else ())},
                   key=len, reverse=True)
    whole = next((g for g in named if ":" in g and spec.startswith(g + ":")), None)
    if whole is not None:
        group, raw = whole, spec[len(whole) + 1:]
    if not sep or not group:
        raise UsageError(f"{option} takes GROUP:KEY, e.g. {option} events:2000")
    mine = [s for s in slices if s.group == group]
    configured = next((g for g in config.groups if g.name == group), None) if config else None
    why = movable_kind(configured)[1] if configured is not None and not mine else ""
    if why:
        # Configured, but not a group whose ranges or values can move: say why, rather
        # than that the catalog does not know it.
        rest = ("its keys move with their hash buckets (--add, --drain, --even)"
                if configured.strategy.kind == "hash" else
                "its rows stay on the shards the config file places them on")
        raise UsageError(f"{option}: {why}, so it cannot move by ranges or values; {rest}")
    if not mine:
        known = sorted({s.group for s in slices})
        raise UsageError(f"{option}: the catalog has no range or list group {group!r} that can move "
                         f"(movable groups: {', '.join(known) or 'none'}); after adding one to the config, "
                         "run `shardkit rebalance init`")
    if key_kind(mine) == "int":
        if not _TYPED_INT.fullmatch(raw):  # (int() reads "1_000" and "１２" too)
            raise UsageError(f"{option}: group {group}'s keys are integers (ASCII digits 0-9, "
                             f"optionally signed); {raw!r} is not one")
        return group, int(raw)
    return group, raw


def _note_drain_leftovers(args: argparse.Namespace, cluster: Cluster) -> None:
    if getattr(args, "drain", None) and args.drain in cluster.shard_names:
        current = cluster.catalog.current_map()
        note = _drain_leftovers(cluster, current.slices if current is not None else (), args.drain)
        if note:
            print(note, file=sys.stderr)


def _note_running_moves(cluster: Cluster, running: list[dict[str, Any]] | None = None) -> None:
    """Say (on stderr) which moves are in progress (``running``: as found earlier): a plan
    is made against the live map, which they have not switched yet, so it does not count
    what they will move (a drain in progress, say, whose shard the plan may give buckets to)."""
    from . import rebalance

    if running is None:
        running = [m for m in rebalance.move_status(cluster) if m["state"] == "running"]
    if running:
        print("note: " + "; ".join(f"move {m['move']} is in progress ({m['reason']})" for m in running)
              + "; this plan does not count what it will move (see `shardkit rebalance status`)",
              file=sys.stderr)


def _print_move(m: dict[str, Any]) -> None:
    """One move of `shardkit rebalance status` (see rebalance.move_status)."""
    n = m["move"]
    # A range or list move's batches hold slices, which `buckets` counts too.
    unit = m["unit"]
    copied = counted(m["rows_copied"], "row")
    if m["state"] == "aborted":
        # The abort deleted the copies of the batches it undid; finished ones moved.
        finished = any(b["step"] == "cleaned" for b in m["batches"])
        copied = f"{copied} moved by its finished batches" if finished else "nothing moved"
        if m.get("rows_undone"):
            copied += f"; the abort deleted the copies of {counted(m['rows_undone'], 'row')}"
    else:
        copied += " copied"
        if m.get("rows_undone"):
            copied += f"; an abort deleted the copies of {counted(m['rows_undone'], 'row')}"
        if m.get("rows_undoing"):
            copied += (f"; an abort began to delete the copies of {counted(m['rows_undoing'], 'row')}"
                       + (" (it is deleting them now)" if m.get("aborting") else " (they may be gone)"))
    # An aborted move keeps the error of the run that stopped (why it was aborted).
    said = "error of the run before the abort" if m["state"] == "aborted" else "error"
    print(f"move {n}: {m['state']} - {m['reason']} ({copied})"
          + (f"\n  {said}: {m['error']}" if m['error'] else ""))
    if m["state"] == "running" and m.get("mover") is not None:
        resume, abort = f"`shardkit rebalance resume {n}`", f"`shardkit rebalance abort {n}`"
        stuck = [b["batch"] for b in m["batches"] if b["step"] in ("switched", "verified")]
        cutting = [b["batch"] for b in m["batches"] if b.get("cutting_over")]
        if m.get("aborting"):
            print("  an abort is undoing it now")
        elif m["mover"]:
            print("  a mover is running it now")
        elif m.get("leftovers"):
            print(f"  no process is running it: an abort stopped half-way, leaving batches whose target may "
                  f"still hold copies; {abort} finishes the abort ({resume} is refused)")
        elif stuck:
            print(f"  no mover is running it (stopped, interrupted or killed): {resume} goes on; "
                  f"{abort} is refused while batch{'es' if len(stuck) > 1 else ''} "
                  f"{', '.join(map(str, stuck))} switched and not finished")
        elif m.get("abort_stopped"):
            print(f"  no process is running it: an abort stopped before it finished (killed, failed, or a "
                  f"shard was unreachable); {abort} finishes the abort, or {resume} goes on with the move, "
                  "capturing and copying again what the abort undid")
        elif not m["batches"] and m.get("split_published") is False:
            # A move giving a shard keys no slice held (no batch: nothing moves), stopped
            # before the catalog published its new slices.
            print(f"  no mover is running it (stopped, interrupted or killed) before the catalog published its "
                  f"new slices: {resume} publishes them, {abort} takes them back off the shards")
        elif not m["batches"]:
            print(f"  no mover is running it (stopped, interrupted or killed) and the catalog published its new "
                  f"slices: {resume} records it done (so does {abort}: nothing is left to undo)")
        elif all(b["step"] == "cleaned" for b in m["batches"]):
            print(f"  no mover is running it (stopped, interrupted or killed) and every batch finished: "
                  f"{resume} records it done (so does {abort}: nothing is left to undo)")
        else:
            print(f"  no mover is running it (stopped, interrupted or killed): {resume} goes on, {abort} "
                  "undoes the batches that have not switched"
                  + (f" (a cut-over of batch{'es' if len(cutting) > 1 else ''} "
                     f"{', '.join(map(str, cutting))} began and did not record its end: if it switched, "
                     f"{abort} is refused and says so)" if cutting else ""))
    for b in m["batches"]:
        note = ""
        if b.get("undoing"):
            note = ("  (an abort is undoing it)" if m.get("aborting") else
                    "  (an abort began to undo it and stopped: its capture may be stopped and its copies deleted)")
        elif b.get("cutting_over") and not m.get("mover"):
            note = "  (a cut-over began and stopped: it may have switched)"
        print(f"  batch {b['batch']:>3}: {b['source']} -> {b['target']} "
              f"{b['buckets']:>4} {unit if b['buckets'] == 1 else unit + 's':<7}  {b['step']}{note}")
    for lo in m.get("leftovers", ()):
        print(f"  leftovers: {lo['shard']} may still hold rows of buckets {_compress(lo['buckets'])} "
              f"(batch {lo['batch']}); once it is reachable: shardkit rebalance abort {n}")


def cmd_rebalance(args: argparse.Namespace) -> int:
    """Plan, run, resume and abort online bucket moves (needs a [catalog])."""
    from . import rebalance
    from ._rebalance_plan import SlicePlan

    cluster = _open_cluster(args, warn_no_map=False)   # init makes the map; the others refuse without it
    try:
        verb = args.rebalance_command
        if verb == "init":
            version = rebalance.init(cluster)
            print(f"catalog ready (map version {version}); ownership guard installed on "
                  f"{counted(len(cluster.shard_names), 'shard')}")
            return 0
        if verb == "plan":
            plan = _make_plan(args, cluster)
            catalog = rebalance._need_catalog(cluster)
            with catalog.engine.connect() as conn:
                if catalog.initialised(conn):
                    rebalance.refuse_onto_leftovers(conn, plan)
            if args.out:
                try:
                    Path(args.out).write_text(json.dumps(plan.as_dict(), indent=2) + "\n", encoding="utf-8")
                except OSError as e:
                    raise UsageError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
            print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.render())
            _note_drain_leftovers(args, cluster)
            _note_running_moves(cluster)
            return 0
        if verb == "status":
            moves = rebalance.move_status(cluster, args.move)
            if args.move is not None and not moves:
                raise RebalanceError(f"there is no move {args.move} (`shardkit rebalance status` lists them)",
                                     move_id=args.move)
            if args.json:
                print(json.dumps(moves, indent=2))
            elif not moves:
                print("no moves")
            # A range or list move's batches hold slices, which `buckets` counts too.
            for m in moves if not args.json else ():
                _print_move(m)
            return 0
        if verb == "abort":
            result = rebalance.abort(cluster, args.move, target_lost=args.target_lost)
            if result.get("removed_leftovers"):
                print(f"move {args.move}: leftovers of batches {result['removed_leftovers']} removed")
                return 0
            if result.get("done"):
                print(f"move {args.move}: every batch had finished (its mover stopped before recording "
                      f"the end), so nothing was left to undo: recorded done; what it moved stays moved "
                      f"(a new plan moves it back)")
                return 0
            if not result["undone_batches"] and not result["finished_batches"]:
                # A move with no batch (giving a shard keys no slice held): nothing moved.
                print(f"move {args.move} aborted: nothing had moved; its new slices, not published, were "
                      "taken back off the shards")
            else:
                print(f"move {args.move} aborted: batches undone {result['undone_batches']}, "
                      f"already finished {result['finished_batches']}")
            for lo in result.get("leftovers", ()):
                print(f"  {lo['shard']} was unreachable: it may still hold rows of buckets "
                      f"{_compress(lo['buckets'])} (batch {lo['batch']}); moves of them to it are refused "
                      f"until `shardkit rebalance abort {args.move}`, run once it is reachable, removes them")
            return 0
        if verb == "apply" and args.batch_buckets < 1:
            raise UsageError(f"--batch-buckets {args.batch_buckets}: must be at least 1 (buckets per batch)")
        mover = rebalance.Mover(cluster, grace=args.grace, step_delay=args.step_delay, duty=args.duty,
                                max_pause=args.max_pause, progress=_progress)
        if verb == "apply":
            plan = _make_plan(args, cluster)
            gained = plan.gained if isinstance(plan, SlicePlan) else ()
            if not plan.moves and not gained:
                print("nothing to move: " + plan.reason)
                _note_drain_leftovers(args, cluster)
                return 0
            running = [m for m in rebalance.move_status(cluster) if m["state"] == "running"]
            move_id = mover.start(plan, max_buckets=args.batch_buckets)
            # Once this move is accepted (a clash with one of those is refused, and says so).
            _note_drain_leftovers(args, cluster)
            _note_running_moves(cluster, running)
            unit = "slice" if isinstance(plan, SlicePlan) else "bucket"
            if gained:
                print(f"move {move_id}: " + ", ".join(f"{s.describe()} to {s.shard}" for s in gained)
                      + " (keys no slice held: nothing moves)", flush=True)
                mover.run(move_id)
                print(f"move {move_id}: done; " + ", ".join(f"{s.describe()} is on {s.shard}" for s in gained))
                return 0
            print(f"move {move_id}: {counted(len(plan.moves), unit)} in "
                  f"{counted(len(plan.batches(args.batch_buckets)), 'batch', 'batches')}", flush=True)
            mover.run(move_id)
        else:  # resume: the batches were cut when the move started
            move_id = args.move
            mover.run(move_id)
            if not mover.batches_run:
                # A move giving a shard keys no slice held: it has no batch, nothing moves.
                print(f"move {move_id}: done; its new slices are published (nothing moves)")
                return 0
        print(f"move {move_id}: done; " + (f"longest write pause {mover.longest_pause * 1000:.0f} ms"
                                            if mover.cut_overs else "no cut-over in this run (its batches "
                                            "had switched before)"))
        return 0
    finally:
        cluster.dispose()


def _progress(line: str) -> None:
    """A mover's progress line.  Its reader gone (`apply | head -3`) stops the move as Ctrl-C
    does (it stays running, to be resumed; the catalog says why), and the command ends
    quietly with status 1 (see main): not a failed batch, "fix the cause", status 2."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        raise _OutputClosed("its output was closed") from None


class _OutputClosed(KeyboardInterrupt):
    """The reader of a mover's progress went away."""


class _Once(argparse.Action):
    """An option a command takes once: a second one (another --split) was ignored silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice; a plan takes one (make one plan for each)")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardkit", description="Sharding and replica routing for "
                                "SQLAlchemy on PostgreSQL: route keys, show status, migrate every "
                                "shard, rebalance online, run local clusters and the demo.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("route", help="print the shard that owns a key")
    r.add_argument("table", help="table name, as in the config's groups")
    r.add_argument("key", nargs="+", help="key value (several for a composite key)")
    r.add_argument("--config", "-c", default="shardkit.toml", help="cluster config (default: %(default)s)")
    r.add_argument("--type", choices=["auto", "int", "str", "uuid"], default="auto",
                   help="how to read KEY (default: as the type of a range or list group's bounds or "
                        "values; else int if it looks like one, then uuid, else str)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_route)

    st = sub.add_parser("status", help="shards and nodes: role, up, lag, connections, rows")
    st.add_argument("--config", "-c", default="shardkit.toml")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    v = sub.add_parser("verify", help="check every row is on the shard the map says")
    v.add_argument("--config", "-c", default="shardkit.toml")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=cmd_verify)

    rb = sub.add_parser("rebalance", help="move buckets, ranges and list values between shards online (needs a [catalog])")
    rsub = rb.add_subparsers(dest="rebalance_command", required=True)
    rsub.add_parser("init", help="create the catalog and install the ownership guard on every shard")
    for verb, helptext in (("plan", "compute the moves (hash buckets, range or list slices) and print them"),
                           ("apply", "plan, then make the moves online")):
        rp_ = rsub.add_parser(verb, help=helptext)
        rp_.add_argument("--add", action="append", metavar="SHARD", default=[],
                         help="give new shard SHARD (already in the config) its share of buckets")
        rp_.add_argument("--drain", metavar="SHARD", action=_Once, help="move every bucket off SHARD")
        rp_.add_argument("--even", choices=["rows", "bytes"], action=_Once, help="even out shards by rows or bytes")
        rp_.add_argument("--split", metavar="GROUP:KEY", action=_Once,
                         help="split a range group's range at KEY and move the keys >= KEY (to the end of "
                              "that range) to --to; a KEY no range holds: give its gap to --to")
        rp_.add_argument("--lower", action="store_true",
                         help="with --split: move the keys below KEY (to the start of that range) instead")
        rp_.add_argument("--move-value", metavar="GROUP:VALUE", action=_Once, help="move one value of a list group to --to (a value no slice lists, of a group "
                              "without a default: give it to --to)")
        rp_.add_argument("--to", metavar="SHARD", action=_Once, help="the target shard of --split or --move-value")
        rp_.add_argument("--plan", metavar="FILE", action=_Once, help="a plan written by `plan --out`")
        if verb == "plan":
            rp_.add_argument("--out", metavar="FILE", help="also write the plan as JSON to FILE")
            rp_.add_argument("--json", action="store_true", help="print JSON")
    rsub.add_parser("resume", help="finish a move that stopped").add_argument(
        "move", type=_move_number, help="the move's number (shardkit rebalance status lists them)")
    ab = rsub.add_parser("abort", help="undo a move's unfinished batches (again on an aborted move: "
                                       "remove what --target-lost left)")
    ab.add_argument("move", type=_move_number, help="the move's number (shardkit rebalance status lists them)")
    ab.add_argument("--target-lost", action="store_true",
                    help="undo a batch whose target cannot be reached on its source alone (capture stops, "
                         "the source keeps the buckets); the target may keep copies of their rows, "
                         "recorded in the catalog: moves of them to it are refused until `abort MOVE`, "
                         "run again once it is reachable, removes them. Not for batches that switched")
    rsub.add_parser("status", help="moves and the step each batch reached").add_argument(
        "move", type=_move_number, nargs="?", help="one move's number (default: every move)")
    rsub.choices["status"].add_argument("--json", action="store_true", help="print JSON")
    for verb in ("apply", "resume", "abort", "status", "init", "plan"):
        rp_ = rsub.choices[verb]
        rp_.add_argument("--config", "-c", default="shardkit.toml")
        if verb == "apply":
            rp_.add_argument("--batch-buckets", type=int, default=256,
                             help="hash buckets per batch; a range or list move has one batch per slice "
                                  "(default: %(default)s)")
        if verb in ("apply", "resume"):   # abort moves nothing; resume keeps the move's batches
            rp_.add_argument("--grace", type=float, default=1.0,
                             help="seconds between a switch and deleting the source's rows (default: %(default)s)")
            rp_.add_argument("--duty", type=float, default=1.0,
                             help="share of time the copy and verification work (0.01 to 1); 0.5 rests "
                                  "as long as it works, leaving the cores to other writers (default: "
                                  "%(default)s, never rest; the clean-up always rests at least that long)")
            rp_.add_argument("--max-pause", type=float, default=1.0,
                             help="seconds a cut-over may pause the writes of a batch's buckets; past "
                                  "that it lets them go, catches up and tries again; after three such "
                                  "attempts the move stops, to be resumed (default: %(default)s)")
            rp_.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    rb.set_defaults(func=cmd_rebalance)

    m = sub.add_parser("migrate", help="Alembic on every shard")
    msub = m.add_subparsers(dest="migrate_command", required=True)
    for verb, helptext in (("upgrade", "upgrade every shard to REVISION (default head)"),
                           ("downgrade", "downgrade every shard to REVISION")):
        mp = msub.add_parser(verb, help=helptext)
        mp.add_argument("revision", nargs="?" if verb == "upgrade" else None,
                        default="head" if verb == "upgrade" else None)
        mp.add_argument("--parallel", type=int, default=4,
                        help="shards migrated at once (default: %(default)s)")
        mp.add_argument("--canary", metavar="SHARD",
                        help="migrate this shard first, alone; stop if it fails")
        mp.add_argument("-x", action="append", default=[], metavar="KEY=VALUE", dest="x_args",
                        help="passed to every shard's Alembic as its -x (context.get_x_argument())")
    for verb, helptext in (("current", "each shard's revision"),
                           ("check", "report drift: different revisions or schemas")):
        msub.add_parser(verb, help=helptext)
    for verb, mp in msub.choices.items():
        mp.add_argument("--config", "-c", default="shardkit.toml")
        # current reads each shard's alembic_version, not the scripts; it accepts the
        # flag so that one command line works for every verb.
        mp.add_argument("--alembic-ini", default=None,
                        help="Alembic config (default: ./migrations/alembic.ini)"
                        + ("; accepted and not needed by current" if verb == "current" else ""))
        mp.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_migrate)

    d = sub.add_parser("dev", help="a local development cluster of real PostgreSQL servers")
    dsub = d.add_subparsers(dest="dev_command", required=True)
    up = dsub.add_parser("up", help="start N primaries with R streaming replicas each")
    up.add_argument("--shards", type=int, default=2, help="number of shards (default: %(default)s)")
    up.add_argument("--replicas", type=int, default=1,
                    help="streaming replicas per shard (default: %(default)s)")
    up.add_argument("--buckets", type=int, default=1024, help="bucket count (default: %(default)s)")
    up.add_argument("--dir", default=DEFAULT_DEV_DIR, help="cluster directory (default: %(default)s)")
    up.add_argument("--catalog", action="store_true",
                    help="also create a catalog database (for `shardkit rebalance`) and name it in the config")
    up.set_defaults(func=cmd_dev_up)
    down = dsub.add_parser("down", help="stop the local cluster")
    down.add_argument("--dir", default=DEFAULT_DEV_DIR, help="cluster directory (default: %(default)s)")
    down.add_argument("--keep-files", action="store_true", help="keep DIR and the servers' data (`dev up` on it starts them again)")
    down.set_defaults(func=cmd_dev_down)

    demo = sub.add_parser("demo", help="start a local cluster and show routing on real data")
    demo.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    demo.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    demo.add_argument("--shards", type=int, default=None,
                      help="shards of the cluster the demo starts (default: 3); a cluster already running "
                           "in --dir is used as it is")
    demo.add_argument("--replicas", type=int, default=None,
                      help="replicas per shard of the cluster the demo starts (default: 1)")
    demo.set_defaults(func=cmd_demo)
    return p


class _Stopped(KeyboardInterrupt):
    """SIGTERM (a process manager, `timeout`, `kill PID`) or SIGHUP (the terminal closed):
    unwound as Ctrl-C is, so that what the command started is stopped or recorded on the way
    out (`dev up`'s servers, a mover's interrupt, a running migration), not left behind."""


def _on_stop_signal(signum: int, frame: Any) -> None:
    # A second one must not cut the clean-up short (a process manager kills in the end).
    signal.signal(signum, signal.SIG_IGN)
    raise _Stopped(signal.Signals(signum).name)


def _stop_on_signals() -> list[tuple[int, Any]]:
    """SIGTERM and SIGHUP end the command as Ctrl-C does (where their disposition is the
    default: `nohup` ignores SIGHUP, and it stays ignored); what to restore afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return []
    previous = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous.append((sig, signal.signal(sig, _on_stop_signal)))
    return previous


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (see the module's docstring)."""
    previous = _stop_on_signals()
    try:
        try:
            return _main(argv)
        finally:
            for sig, handler in previous:
                signal.signal(sig, handler)
            # Flushed here, inside the try: a reader that went away (`shardkit status | head -1`)
            # shows now as a BrokenPipeError, not as a traceback when Python flushes at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        # As Python's documentation advises (library/signal, "Note on SIGPIPE"): send what is
        # left to devnull so that the flush at exit does not fail again, and exit with status 1,
        # as Python does on EPIPE.  SIGPIPE keeps Python's disposition (ignored): with SIG_DFL a
        # closed socket would kill the command too.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (captured in-process): nothing to flush at exit
            pass
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ShardkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sa_exc.DBAPIError as e:
        # A server the command needed (the catalog, say) refused or failed: one line,
        # the driver's own first line (which never holds a password).
        first = (str(e.orig).strip().splitlines() or [""])[0]
        print(f"error: {type(e.orig).__name__}: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C: one line, with where the command stopped and what to do when it knows.
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        if isinstance(e.__context__, _OutputClosed) or isinstance(e, _OutputClosed):
            raise BrokenPipeError() from None   # (status 1, as for any reader that went away)
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
