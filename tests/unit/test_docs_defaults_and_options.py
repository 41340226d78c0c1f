"""README.md against the code, as a user who copies from it (a docs audit).

tests/unit/test_readme.py and test_docs_claims.py check that the README's settings,
flags, names and keyword arguments exist.  These add the other direction and the
values: every execution option the code reads is documented; every attribute an error
sets is in the error tree; the defaults the README states (the [replicas] example, the
pool's unset values, every CLI option's default) are the code's, and a stated default
written out is accepted; every command line the README shows parses; the signatures in
"The Python API at a glance" are the functions'; the config fragments quoted in prose
load.  Each test fails while the README and the code disagree.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import shardkit
import shardkit.errors as errors
from shardkit import cli
from shardkit._config import ReplicaSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CODE_BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
BASE = {"shards": [{"name": "s0", "primary": "postgresql+psycopg://app@db0.invalid/app"}]}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# -- execution options ------------------------------------------------------------------------

# Execution options shardkit sets on the statements it makes itself (the loads that follow a
# read of reference rows), never given by an application.
_INTERNAL_OPTIONS = {"shardkit_reference_read"}


def test_every_execution_option_the_code_reads_is_documented():
    # (Not migrate.py: its "shardkit_cluster" and "shardkit_shard" are options of Alembic's
    # context.configure() that env.py sets per shard, not execution options.)
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "shardkit").glob("*.py")
                       if p.name != "migrate.py")
    # _option("shardkit_x", ...), opt("shardkit_x"), opts.get("shardkit_x"), execution_options.get(...)
    read = set(re.findall(r"\b(?:_option|opt|opts\.get|execution_options\.get|own\.get)\(\s*\"(shardkit_\w+)\"",
                          source))
    assert {"shardkit_shard", "shardkit_role", "shardkit_timeout"} <= read   # the pattern finds them
    options = read - _INTERNAL_OPTIONS
    undocumented = sorted(o for o in options
                          if not re.search(rf"\b{o}\s*=|\"{o}\"\s*:|`{o}`", README))
    assert undocumented == []


# -- the error tree ------------------------------------------------------------------------------


def test_every_attribute_an_error_sets_is_in_the_error_tree():
    (tree,) = [c for _, c in CODE_BLOCKS if c.startswith("ShardkitError\n")]
    shown: dict[str, set[str]] = {}
    for line in tree.splitlines():
        m = re.match(r"^[│├└─ ]*(\w+)\s*(.*)$", line)
        shown[m.group(1)] = set(re.findall(r"(?<![\w])\.(\w+)", m.group(2)))
    missing = []
    for name in errors.__all__:
        cls = getattr(errors, name)
        own = set(re.findall(r"\bself\.([a-z]\w*) = ", inspect.getsource(cls)))
        own.discard("message")   # "Errors carry their context as attributes (`.message` is the text)"
        missing += [f"{name}.{a}" for a in sorted(own - shown.get(name, set()))]
    assert "(`.message` is the text)" in README
    assert missing == []


# -- stated defaults of the config ---------------------------------------------------------------


def _config_toml() -> tuple[str, dict[str, Any]]:
    code = next(c for lang, c in CODE_BLOCKS if lang == "toml")
    return code, tomllib.loads(code)


def test_the_replicas_example_shows_the_defaults():
    code, toml = _config_toml()
    assert re.search(r"^\[replicas\].*these are the defaults", code, re.M)
    defaults = ReplicaSettings()
    assert {k: getattr(defaults, k) for k in toml["replicas"]} == toml["replicas"]
    assert set(toml["replicas"]) == set(ReplicaSettings.__dataclass_fields__)


def _stated_pool_defaults() -> dict[str, Any]:
    m = re.search(r"Unset, each is SQLAlchemy's `QueuePool` default: (.*?);", _one_line(README))
    assert m, "README states no pool defaults"
    out: dict[str, Any] = {}
    for key, value in re.findall(r"(\w+) (-?[0-9.]+|true|false)", m.group(1)):
        out[key] = {"true": True, "false": False}.get(value) if value in ("true", "false") else ast.literal_eval(value)
    assert set(out) == {"size", "max_overflow", "timeout", "recycle", "pre_ping"}
    return out


def _pool_values(pool: dict[str, Any]) -> dict[str, Any]:
    cluster = shardkit.Cluster.from_config({**BASE, "pool": pool})
    try:
        p = cluster.engine("s0").pool
        return {"size": p.size(), "max_overflow": p._max_overflow, "timeout": p._timeout,
                "recycle": p._recycle, "pre_ping": p._pre_ping}
    finally:
        cluster.dispose()


def test_unset_pool_settings_are_the_stated_defaults():
    assert _pool_values({}) == _stated_pool_defaults()


@pytest.mark.parametrize("key", ["size", "max_overflow", "timeout", "recycle", "pre_ping"])
def test_each_stated_pool_default_can_be_written_out(key):
    """A user who writes the default the README states (`recycle = -1`: never) gets it."""
    value = _stated_pool_defaults()[key]
    assert _pool_values({key: value})[key] == value


def test_replica_weight_default():
    cell = re.search(r"\| `shards\[\]\.replicas\[\]` \|([^\n]*)", README).group(1)
    default = float(re.search(r"`weight` a number > 0 \(default (\d+)\)", cell).group(1))
    config = shardkit.load_config(
        {"shards": [{**BASE["shards"][0], "replicas": ["postgresql://a@r0.invalid/d",
                                                      {"url": "postgresql://a@r1.invalid/d"}]}]}, env={})
    assert config.shards[0].replica_weights == (default, default)


# -- config fragments quoted in prose -------------------------------------------------------------


def _placements(key: str, value: Any) -> list[dict[str, Any]]:
    shard = BASE["shards"][0]
    return [
        {**BASE, key: value},
        {"shards": [{**shard, key: value}]},
        {**BASE, "pool": {key: value}},
        {**BASE, "replicas": {key: value}},
        *({**BASE, "groups": {"g": {"strategy": s, **g, key: value}}} for s, g in (
            ("hash", {"tables": {"t": "id"}}),
            ("range", {"tables": {"t": ["a", "b"]}, "ranges": [{"to": [5, 0], "shard": "s0"}]}),
            ("list", {"tables": {"t": "id"}, "values": {"s0": ["x"]}}))),
        {**BASE, "groups": {"g": {"strategy": "range", "tables": {"t": ["a", "b"]},
                                  "ranges": [{key: value, "shard": "s0"}]}}},
    ]


def test_config_fragments_quoted_in_prose_load():
    settings = set(re.findall(r"^\s*(\w+)\s*=", _config_toml()[0], re.M)) | {"to", "from"}
    fragments = [f for f in re.findall(r"`(\w+ = [^`]+)`", README)
                 if f.split(" ", 1)[0] in settings and "{ ... }" not in f]
    assert len(fragments) >= 5
    refused = []
    for fragment in fragments:
        (key, value), = tomllib.loads(fragment.replace("postgresql+psycopg://...",
                                                       "postgresql+psycopg://app@r.invalid/app")).items()
        for raw in _placements(key, value):
            try:
                shardkit.load_config(raw, env={})
                break
            except shardkit.ConfigurationError:
                continue
        else:
            refused.append(fragment)
    assert refused == []


# -- the command line -----------------------------------------------------------------------------

PLACEHOLDERS = {"TABLE": "users", "KEY": "1", "MOVE": "3", "REVISION": "head", "SHARD": "s0",
                "D": "/tmp/d", "PATH": "x.toml", "FILE": "plan.json"}


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    out = {} if subs else {path: parser}
    for action in subs:
        for name, sub in action.choices.items():
            out.update(_leaf_commands(sub, path + (name,)))
    return out


COMMANDS = _leaf_commands(cli.build_parser())


def _readme_command_lines() -> list[str]:
    lines = [line.strip() for _, code in CODE_BLOCKS for line in code.splitlines()
             if line.strip().startswith("shardkit ")]
    return lines + re.findall(r"`(shardkit [^`]*)`", README)


def test_every_command_line_in_the_readme_parses(capsys):
    refused, checked = [], 0
    for line in _readme_command_lines():
        text = line.split("#", 1)[0].split("(see", 1)[0].strip()
        elided = "[...]" in text
        text = re.sub(r"\[([^\]]*)\]", r"\1", text.replace("[...]", "").replace("[KEY ...]", ""))
        words = [w for w in text.split()[1:] if w != "..."]
        for combo in itertools.product(*(w.split("|") for w in words)):
            argv = [PLACEHOLDERS.get(w, w) for w in combo]
            command = next((c for c in COMMANDS if tuple(argv[:len(c)]) == c), None)
            if command is None:
                # a command group named in prose (`shardkit rebalance`), or `shardkit -v ...`
                assert argv and (argv[0].startswith("-") or any(c[:len(argv)] == tuple(argv) for c in COMMANDS)), line
                continue
            if elided:
                continue   # "shardkit migrate downgrade REVISION [...]": its words name a command
            checked += 1
            try:
                cli.build_parser().parse_args(argv)
            except SystemExit:
                refused.append(f"{line!r} -> {argv}")
    capsys.readouterr()
    assert checked >= 30
    assert refused == []


def _numbers_equal(text: str, default: Any) -> bool:
    try:
        return type(default)(text) == default
    except (TypeError, ValueError):
        return False


def _command_groups() -> list[str]:
    """Each ``shardkit ...`` line of the README's code blocks with its continuation comments."""
    groups: list[str] = []
    for _, code in CODE_BLOCKS:
        open_group = False
        for line in code.splitlines():
            s = line.strip()
            if s.startswith("shardkit "):
                groups.append(s)
                open_group = True
            elif open_group and s.startswith("#") and line.startswith(" "):
                groups[-1] += "\n" + s
            else:
                open_group = False
    return groups


def _command_text(command: tuple[str, ...]) -> str:
    """The README's groups of ``shardkit <command>`` (or of a sibling whose comment says
    ``(also <verb>)``), and the one before a group that says ``[...]`` (``shardkit migrate
    downgrade REVISION [...]``: the options shown before)."""
    out: list[str] = []
    groups = _command_groups()
    for i, group in enumerate(groups):
        words = tuple(w for w in group.split("#", 1)[0].split()[1:] if w != "...")
        also = command[:-1] + tuple(re.findall(r"\(also (\w+)\)", group))[:1]
        if words[:len(command)] == command or (
                len(command) > 1 and words[:len(command) - 1] == command[:-1] and also == command):
            out.append(group)
            if "[...]" in group and i:
                out.append(groups[i - 1])
    return "\n".join(out)


def _default_stated(flag: str, default: Any, text: str) -> bool:
    value = re.escape(str(default))
    if isinstance(default, str):
        return bool(re.search(rf"\[{re.escape(flag)} {value}[|\]]", text)
                    or re.search(rf"{re.escape(flag)} {value} \(default\)", text))
    for m in re.finditer(rf"\[{re.escape(flag)} ([0-9.]+)\]|{re.escape(flag)} ([0-9.]+) \(default\)", text):
        if _numbers_equal(m.group(1) or m.group(2), default):
            return True
    # "--duty 0.5 ... (... default 1: ...)": a default stated in the flag's own comment
    for m in re.finditer(rf"{re.escape(flag)}\b(.*?)(?=\nshardkit |\Z)", text, re.S):
        for number in re.findall(r"\bdefault ([0-9.]+)", m.group(1)):
            if _numbers_equal(number.rstrip("."), default):
                return True
    return False


def test_every_cli_default_is_stated_for_its_command():
    config = re.search(r"`--config PATH` \(or `-c PATH`;\s+default `([^`]+)`\)", README)
    missing = []
    for command, parser in COMMANDS.items():
        text = _command_text(command)
        for action in parser._actions:
            if (isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS
                    or action.default in (None, False, [], argparse.SUPPRESS)):
                continue
            if not action.option_strings:
                # a positional with a default: "`REVISION` defaults to `head` (upgrade)"
                name = (action.metavar or action.dest).upper()
                if not re.search(rf"`{name}` defaults to `{re.escape(str(action.default))}`", README):
                    missing.append(f"shardkit {' '.join(command)} [{name}]: default {action.default}")
                continue
            flag = action.option_strings[0]
            if flag == "--config":
                if config.group(1) != action.default:
                    missing.append(f"shardkit {' '.join(command)} --config: default {action.default}")
                continue
            if action.choices:
                shown = re.search(rf"\[{re.escape(flag)} ([\w|]+)\]", text)
                if not (shown and shown.group(1).split("|")[0] == action.default):
                    missing.append(f"shardkit {' '.join(command)} {flag}: default {action.default}")
                continue
            if not _default_stated(flag, action.default, text):
                missing.append(f"shardkit {' '.join(command)} {flag}: default {action.default}")
    assert missing == [], "defaults the README does not state:\n  " + "\n  ".join(missing)


def test_repeatable_cli_options_are_documented_as_such():
    missing = []
    for command, parser in COMMANDS.items():
        for action in parser._actions:
            if isinstance(action, argparse._AppendAction):
                flag = re.escape(action.option_strings[0])
                if not re.search(rf"{flag} \S+ {flag} \S+", README):
                    missing.append(f"shardkit {' '.join(command)} {action.option_strings[0]}")
    assert missing == [], "repeatable, but the README never shows it given twice"


# -- the Python API at a glance -------------------------------------------------------------------


def _api_table() -> str:
    return README.split("### The Python API at a glance", 1)[1].split("\n## ", 1)[0]


def _resolve(name: str) -> Any:
    for owner in (shardkit, shardkit.Cluster, shardkit.ShardedSession):
        obj: Any = owner
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and callable(obj):
            return inspect.unwrap(obj)
    return None


def test_signatures_in_the_api_table_are_the_functions():
    wrong, checked = [], 0
    for name, args in re.findall(r"`((?:\w+\.)?\w+)\(([^`()]*)\)`", _api_table()):
        fn = _resolve(name)
        if fn is None or "=" not in args:
            continue
        checked += 1
        params = {p.name: p for p in inspect.signature(fn).parameters.values()
                  if p.name not in ("self", "cls")}
        shown = dict(re.findall(r"(\w+)=([^,]+)", args))
        for kw, text in shown.items():
            if kw not in params:
                wrong.append(f"{name}: no parameter {kw}")
            elif ast.literal_eval(text.strip()) != params[kw].default:
                wrong.append(f"{name}: {kw} defaults to {params[kw].default!r}, README {text.strip()}")
        keyword_params = {n for n, p in params.items() if p.default is not inspect.Parameter.empty}
        wrong += [f"{name}: {kw}= not shown" for kw in sorted(keyword_params - set(shown))]
        if ("*," in args) != any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()):
            wrong.append(f"{name}: keyword-only marker")
    assert checked >= 4
    assert wrong == []


def test_every_scope_and_session_argument_is_documented():
    scope_row = re.search(r"\| `scope\(\.\.\.\)`[^\n]*", _api_table()).group(0)
    missing = [f"scope({p}=)" for p in inspect.signature(inspect.unwrap(shardkit.scope)).parameters
               if f"`{p}=`" not in scope_row]
    session = inspect.signature(shardkit.ShardedSession.__init__).parameters
    missing += [f"ShardedSession({p}=)" for p, param in session.items()
                if p not in ("self", "cluster") and param.kind is not inspect.Parameter.VAR_KEYWORD
                and not re.search(rf"Session\([^)]*\b{p}=", README)]
    assert missing == []


def test_route_fields_in_the_api_table_are_routes():
    import dataclasses

    row = re.search(r"\| `Route` \|([^\n]*)", _api_table()).group(1)
    shown = set(re.findall(r"`(\w+)`(?! returns)", row.split("returns:", 1)[1]))
    public = {f.name for f in dataclasses.fields(shardkit.Route) if f.repr}
    assert public - shown == set() and {"shards", "keys", "anywhere"} <= shown


def test_url_rules_the_field_table_states():
    cell = re.search(r"\| `shards\[\]\.primary` \|([^\n]*)", README).group(1)
    assert "another driver" in cell and "without a host (or `?host=`) or a database name" in cell
    refused = [u for u in re.findall(r"another driver \(([^)]*)\)", cell)[0].replace("`", "").split(", ")]
    refused += ["postgresql+psycopg://app@/shop", "postgresql+psycopg://app@db0.invalid"]
    for url in refused:
        with pytest.raises(shardkit.ConfigurationError):
            shardkit.load_config({"shards": [{"name": "s0", "primary": url + ("app@h/db" if url.endswith("//") else "")}]},
                                 env={})
    config = shardkit.load_config({"shards": [{"name": "s0", "primary": "postgresql://app@h/db"}]}, env={})
    assert config.shards[0].primary.drivername == "postgresql+psycopg"
