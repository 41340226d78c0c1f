"""The README as a reference: every command, option, setting and public name is in it.

tests/unit/test_docs_claims.py and test_docs_defaults_and_options.py already check that every
CLI flag is documented for its command with argparse's default, and that every
config setting the parser accepts (read from its "known settings" hint) is in the
configuration reference.  This module checks what those leave out:

* every name of ``shardkit.__all__`` is in "The Python API at a glance" table or
  in the error tree the table points to;
* every field of ``ClusterConfig`` and every public attribute of ``Route`` is in
  its row of that table;
* the "Command line" summary lists every command and verb;
* every positional argument is named where its command is shown, and every
  choice of an option with choices is shown with that option;
* the demo's defaults, which argparse leaves as ``None``, are the ones the README
  and ``--help`` state;
* every key of the config parser's own key sets is written in the configuration
  reference (the same list as the hint, from the other side: a key added to a set
  is caught whichever way the parser reports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import shardkit
from shardkit import _config, _demo, cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    """The text under ``heading`` (a full heading line) up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    start = README.index(heading + "\n") + len(heading) + 1
    stop = re.compile(r"^#{1,%d} " % level, re.M)
    # Skip headings inside code blocks (a `# comment` line in a ```sh block).
    pos, fenced = start, False
    for line in README[start:].splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and stop.match(line):
            return README[start:pos]
        pos += len(line)
    return README[start:]


API_TABLE = _section("### The Python API at a glance")
ERRORS = _section("### Errors")
COMMAND_LINE = _section("## Command line")
CONFIG_REFERENCE = _section("## Configuration reference")


def _api_row(first_cell_start: str) -> str:
    rows = [line for line in API_TABLE.splitlines() if line.startswith("| `" + first_cell_start)]
    assert len(rows) == 1, f"the API table has one row starting with `{first_cell_start}"
    return rows[0]


# -- the Python API ------------------------------------------------------------------------------


def test_every_public_name_is_in_the_api_table_or_the_error_tree():
    error_tree = re.search(r"```\n(ShardkitError\n.*?)```", ERRORS, re.S)
    assert error_tree, "the Errors section has its class tree"
    missing = [name for name in shardkit.__all__
               if not re.search(rf"`{name}\b", API_TABLE)
               and not re.search(rf"(?m)^[│├└─ ]*{name}\b", error_tree.group(1))]
    assert missing == [], "in shardkit.__all__ but not in the API table nor the error tree"


def test_every_cluster_config_field_is_in_its_row():
    row = _api_row("load_config(")
    missing = [f.name for f in dataclasses.fields(shardkit.ClusterConfig) if f"`{f.name}`" not in row]
    missing += [n for n, v in vars(shardkit.ClusterConfig).items()
                if not n.startswith("_") and isinstance(v, property) and f"`{n}`" not in row]
    assert missing == [], "ClusterConfig fields the load_config row does not list"


def test_every_route_attribute_is_in_its_row():
    row = _api_row("Route`")
    # ``router`` is the router that chose the shards (repr=False): internal.
    fields = [f.name for f in dataclasses.fields(shardkit.Route) if f.repr]
    props = [n for n, v in vars(shardkit.Route).items() if not n.startswith("_") and isinstance(v, property)]
    missing = [n for n in fields + props if f"`{n}`" not in row]
    assert missing == [], "Route attributes the Route row does not list"


def test_every_from_config_argument_is_explained():
    import inspect
    row = _api_row("Cluster.from_config(")
    signature, meaning = row.split("|")[1], "|".join(row.split("|")[2:])
    params = [p for p in inspect.signature(shardkit.Cluster.from_config).parameters
              if p not in ("cls", "source")]
    for p in params:
        assert f"{p}=" in signature, f"from_config's {p} is not in the signature shown"
        # Explained in the row itself or in prose elsewhere (`metadata=`, `engine_options`, `follow_map=False`).
        assert (f"`{p}`" in meaning or re.search(rf"`[^`]*\b{p}\b[^`]*`", README.replace(row, ""))), p


# -- the command line ----------------------------------------------------------------------------


def _tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    out = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_tree(sub, path + (name,)))
    return out


TREE = _tree(cli.build_parser())
LEAVES = {c: p for c, p in TREE.items()
          if c and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}


def _summary_block() -> str:
    m = re.search(r"```\n(shardkit .*?)```", COMMAND_LINE, re.S)
    assert m, "the Command line section opens with its synopsis block"
    return m.group(1)


def test_the_command_line_summary_lists_every_command():
    block = _summary_block()
    missing = []
    for command in LEAVES:
        head, verb = command[:-1], command[-1]
        # `shardkit dev up ...`, or `shardkit rebalance init|plan|... [...]`
        pattern = r"(?m)^shardkit " + "".join(re.escape(w) + " " for w in head) + r"(?:[a-z-]+\|)*" \
            + re.escape(verb) + r"(?![\w-])"
        if not re.search(pattern, block):
            missing.append(" ".join(command))
    assert missing == [], "commands the Command line summary leaves out"


def _lines_of(command: tuple[str, ...]) -> list[str]:
    """README lines (code or inline) showing ``shardkit <command> ...``, verb alternations included."""
    head, verb = command[:-1], command[-1]
    pattern = re.compile(r"shardkit " + "".join(re.escape(w) + r"\s+" for w in head)
                         + r"(?:[a-z-]+\|)*" + re.escape(verb) + r"(?:\|[a-z-]+)*(?![\w-])")
    return [line for line in README.splitlines() if pattern.search(line)]


def test_every_positional_argument_is_shown_with_its_command():
    missing = []
    for command, parser in LEAVES.items():
        lines = "\n".join(_lines_of(command))
        for action in parser._actions:
            if action.option_strings or isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
                continue
            name = (action.metavar or action.dest).upper()
            if not re.search(rf"\b{re.escape(name)}\b", lines):
                missing.append(f"shardkit {' '.join(command)} {name}")
    assert missing == [], "positional arguments no README line of their command names"


def test_every_choice_is_shown_with_its_option():
    missing = []
    for command, parser in LEAVES.items():
        for action in parser._actions:
            if not action.option_strings or not action.choices or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[0]
            # `apply` is documented as taking every planning option of `plan`, as plan shows them.
            shown = _lines_of(command) + (_lines_of(("rebalance", "plan")) if command == ("rebalance", "apply") else [])
            lines = [line for line in shown if flag in line]
            for choice in action.choices:
                if not any(re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", line) for line in lines):
                    missing.append(f"shardkit {' '.join(command)} {flag} {choice}")
    assert missing == [], "choices no README line of the command shows with the option"


def test_the_demos_defaults_are_the_ones_stated():
    synopsis = re.search(r"(?m)^shardkit demo (.*)$", _summary_block())
    assert synopsis
    shown = dict(re.findall(r"\[(--[a-z-]+) (\d+)\]", synopsis.group(1)))
    assert shown == {"--shards": str(_demo.DEFAULT_SHARDS), "--replicas": str(_demo.DEFAULT_REPLICAS)}
    demo = TREE[("demo",)]
    for flag, value in shown.items():
        (action,) = [a for a in demo._actions if flag in a.option_strings]
        assert f"(default: {value})" in (action.help or ""), f"demo {flag}'s --help states another default"
    assert f"starts {_demo.DEFAULT_SHARDS} shards" in README


def test_every_top_level_option_is_documented():
    top = TREE[()]
    for action in top._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            assert any(f"shardkit {o} " in README for o in action.option_strings), action.option_strings


# -- the configuration ---------------------------------------------------------------------------


def _documented_keys() -> set[str]:
    """Names the configuration reference writes as settings: TOML keys of its example, the
    backticked names of its field table and its prose (``{url, weight, pool}`` split up)."""
    names: set[str] = set()
    for code in re.findall(r"```toml\n(.*?)```", CONFIG_REFERENCE, re.S):
        names |= set(re.findall(r"(?m)^\s*\[*([A-Za-z_]+)", code))
        names |= set(re.findall(r"([A-Za-z_]+)\s*=", code))
    for snippet in re.findall(r"`([^`]+)`", CONFIG_REFERENCE):
        names |= set(re.findall(r"[A-Za-z_]+", snippet))
    return names


KEY_SETS = {
    "top level": _config._TOP_LEVEL_KEYS,
    "[[shards]]": _config._SHARD_KEYS,
    "[groups.*]": _config._GROUP_KEYS,
    "pool tables": set(_config.POOL_KEYS),
    "[replicas]": {f.name for f in dataclasses.fields(_config.ReplicaSettings)},
    "a range": {"from", "to", "shard"},
    "a replica's table": {"url", "weight", "pool"},
    "[catalog]": {"url"},
    "strategies": set(_config._STRATEGIES),
    "replicas.consistency": set(_config.CONSISTENCY_MODES),
    "replicas.policy": set(_config.POLICIES),
}


@pytest.mark.parametrize("level", list(KEY_SETS))
def test_every_key_the_parser_knows_is_written_in_the_configuration_reference(level):
    documented = _documented_keys()
    assert sorted(KEY_SETS[level] - documented) == [], f"{level}: known to _config, not in the README"


def test_the_range_and_replica_key_sets_are_the_parsers():
    """The two literal sets above are copied from _config: fail if the parser's change."""
    source = (ROOT / "shardkit" / "_config.py").read_text(encoding="utf-8")
    assert '_check_keys(r, {"from", "to", "shard"}, rp)' in source
    assert '_check_keys(r, {"url", "weight", "pool"}, rp)' in source
    assert '_check_keys(catalog_raw, {"url"}, "catalog")' in source
    calls = len(re.findall(r"(?<!def )_check_keys\(", source))
    assert calls == 8, "a new key set: add it to KEY_SETS"
