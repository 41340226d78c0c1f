"""The README against the code: mechanically checkable claims.

tests/unit/test_readme.py checks that the README's TOML example loads.  These
tests check the rest of what can be checked without a server:

* every config setting the parser accepts, at every level, is documented, and
  the defaults, bounds and choices the README states are the parser's;
* every CLI command and flag is documented for the command that takes it, and
  the defaults shown in the synopses are argparse's;
* every ``shardkit.X`` name, method, keyword argument and execution option the
  README uses exists, and the error tree is the class hierarchy;
* other stated facts: the metric names, the consistency-token claim, the
  packaging extras, the Docker Compose files, the hashing example.

Each test fails while the README and the code disagree.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import shardkit
from shardkit import cli
from shardkit._config import CONSISTENCY_MODES, POLICIES, ReplicaSettings
from shardkit.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE_SOURCE = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "shardkit").rglob("*.py"))


# -- README parsing ---------------------------------------------------------------------


def _blocks_and_prose() -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """([(section heading, fence language, code)], [(section heading, prose line)])."""
    blocks: list[tuple[str, str, str]] = []
    prose: list[tuple[str, str]] = []
    heading, lang, buf, fenced = "", "", [], False
    for line in README_TEXT.splitlines():
        if line.startswith("```"):
            if fenced:
                blocks.append((heading, lang, "\n".join(buf)))
                fenced, buf = False, []
            else:
                fenced, lang = True, line[3:].strip()
            continue
        if fenced:
            buf.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        else:
            prose.append((heading, line))
    return blocks, prose


BLOCKS, PROSE = _blocks_and_prose()


def _section_prose(prefix: str) -> str:
    return "\n".join(line for h, line in PROSE if h.startswith(prefix))


def _config_toml() -> dict[str, Any]:
    (code,) = [c for h, lang, c in BLOCKS if lang == "toml" and h.startswith("Configuration reference")]
    return tomllib.loads(code)


def _config_table() -> dict[str, str]:
    """The configuration reference's field table: each backticked field -> its meaning cell."""
    out: dict[str, str] = {}
    for line in _section_prose("Configuration reference").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            out[name] = cells[1]
    return out


README_TOML = _config_toml()
CONFIG_TABLE = _config_table()


# -- config settings: documented, defaults, bounds -------------------------------------------

BASE = {"shards": [{"name": "s0", "primary": "postgresql://app@db0/app"}]}


def _known_keys(raw: dict[str, Any]) -> set[str]:
    """The settings the parser accepts where ``raw`` has an unknown key ``zz_unknown``
    (read from the error's hint, so no list is copied from the code here)."""
    with pytest.raises(ConfigurationError) as info:
        shardkit.load_config(raw, env={})
    assert info.value.field.endswith("zz_unknown"), info.value
    hint = info.value.hint or ""
    assert hint.startswith("known settings here: "), hint
    return {k.strip() for k in hint.removeprefix("known settings here: ").split(",")}


def _shard(**extra: Any) -> dict[str, Any]:
    return {**BASE, "shards": [{**BASE["shards"][0], **extra}]}


def _group(**g: Any) -> dict[str, Any]:
    return {**BASE, "groups": {"g": {"tables": {"t": "id"}, **g}}}


def _table_names(prefix: str) -> set[str]:
    """Setting names the field table documents under ``prefix`` (``shards[].`` ...)."""
    out = set()
    for name in CONFIG_TABLE:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            m = re.match(r"[A-Za-z_]+", rest)
            if m:
                out.add(m.group(0))
    return out


def _cell_names(field: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]+", CONFIG_TABLE.get(field, "")))


LEVELS = {
    # level: (a config with an unknown key there, the names the README documents there)
    "top level": (
        {**BASE, "zz_unknown": 1},
        set(README_TOML) | {re.match(r"[A-Za-z_]+", n).group(0) for n in CONFIG_TABLE}),
    "[[shards]]": (
        _shard(zz_unknown=1),
        {k for s in README_TOML["shards"] for k in s} | _table_names("shards[].")),
    "a replica's table": (
        _shard(replicas=[{"url": "postgresql://app@db0r/app", "zz_unknown": 1}]),
        _cell_names("shards[].replicas[]")),
    "[pool]": ({**BASE, "pool": {"zz_unknown": 1}}, set(README_TOML["pool"]) | _cell_names("pool.*")),
    "shards[].pool": (_shard(pool={"zz_unknown": 1}), _cell_names("pool.*")),
    "shards[].primary_pool": (_shard(primary_pool={"zz_unknown": 1}), _cell_names("pool.*")),
    "[replicas]": ({**BASE, "replicas": {"zz_unknown": 1}}, set(README_TOML["replicas"])),
    "[groups.*]": (
        _group(zz_unknown=1),
        {k for g in README_TOML["groups"].values() for k in g} | _table_names("groups.<name>.")),
    "a range": (
        _group(strategy="range", ranges=[{"to": 5, "shard": "s0", "zz_unknown": 1}]),
        {k for g in README_TOML["groups"].values() for r in g.get("ranges", []) for k in r}
        | _cell_names("groups.<name>.ranges")),
    "[catalog]": ({**BASE, "catalog": {"url": "postgresql://app@cat/cat", "zz_unknown": 1}},
                  set(README_TOML["catalog"]) | _table_names("catalog.")),
}


@pytest.mark.parametrize("level", list(LEVELS))
def test_every_config_setting_the_parser_accepts_is_documented(level):
    raw, documented = LEVELS[level]
    accepted = _known_keys(raw)
    assert accepted - documented == set(), f"{level}: accepted but not in the README"


@pytest.mark.parametrize("level", list(LEVELS))
def test_every_documented_config_setting_is_accepted(level):
    raw, documented = LEVELS[level]
    accepted = _known_keys(raw)
    # The table's meaning cells hold words too: only compare names the README writes as settings.
    settings_in_toml = {
        "top level": set(README_TOML),
        "[[shards]]": {k for s in README_TOML["shards"] for k in s} | _table_names("shards[]."),
        "[pool]": set(README_TOML["pool"]),
        "[replicas]": set(README_TOML["replicas"]),
        "[groups.*]": {k for g in README_TOML["groups"].values() for k in g} | _table_names("groups.<name>."),
        "[catalog]": set(README_TOML["catalog"]),
    }.get(level, set())
    assert settings_in_toml - accepted == set(), f"{level}: documented but refused by the parser"


def _default_in_table(field: str) -> str:
    m = re.search(r"\(default `?([^`)]+?)`?\)", CONFIG_TABLE[field]) or \
        re.search(r"\(default ([^)]+)\)", CONFIG_TABLE[field])
    assert m, f"README states no default for {field}"
    return m.group(1)


def test_stated_top_level_defaults_are_the_parsers():
    config = shardkit.load_config(BASE, env={})
    assert _default_in_table("name") == config.name
    assert int(_default_in_table("bucket_count")) == config.bucket_count
    assert "default 1024" in README_TOML_COMMENTS["bucket_count"]


def _toml_comments() -> dict[str, str]:
    """Setting -> the comment on its first line in the README's TOML example."""
    out: dict[str, str] = {}
    for code in [c for h, lang, c in BLOCKS if lang == "toml" and h.startswith("Configuration reference")]:
        for m in re.finditer(r"^\s*([A-Za-z_]+)\s*=.*?#\s*(.*)$", code, re.M):
            out.setdefault(m.group(1), m.group(2))
    return out


README_TOML_COMMENTS = _toml_comments()


def test_bucket_count_bounds():
    lo, hi = map(int, re.search(r"(\d+)\.\.(\d+)", CONFIG_TABLE["bucket_count"]).groups())
    for ok in (lo, hi):
        assert shardkit.load_config({**BASE, "bucket_count": ok}, env={}).bucket_count == ok
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ConfigurationError):
            shardkit.load_config({**BASE, "bucket_count": bad}, env={})


def test_strategy_choices_and_default():
    comment = README_TOML_COMMENTS["strategy"]
    names = re.findall(r"[a-z]+", comment.replace("(default)", ""))
    default = re.search(r"(\w+) \(default\)", comment).group(1)
    assert set(names) == {"hash", "range", "list", "custom"} == set(
        re.findall(r"`(\w+)`", CONFIG_TABLE["groups.<name>.strategy"]))
    group = shardkit.load_config(_group(), env={}).groups[0]
    assert group.strategy.__class__.__name__.lower().startswith(default)
    with pytest.raises(ConfigurationError):
        shardkit.load_config(_group(strategy="nope"), env={})


def test_replica_setting_choices():
    def choices(name: str) -> list[str]:
        words = re.split(r"\s*\|\s*", README_TOML_COMMENTS[name])
        return [re.match(r"\w+", w).group(0) for w in words]

    assert choices("consistency") == list(CONSISTENCY_MODES)
    assert choices("policy") == list(POLICIES)
    for value in choices("when_no_replica"):
        shardkit.load_config({**BASE, "replicas": {"when_no_replica": value}}, env={})
    with pytest.raises(ConfigurationError):
        shardkit.load_config({**BASE, "replicas": {"when_no_replica": "replica"}}, env={})


def test_the_default_consistency_is_the_one_the_readme_names():
    assert "**Read-your-writes** (the default)" in README_TEXT
    assert ReplicaSettings().consistency == "read_your_writes"


def test_replica_poll_minimums():
    cell = CONFIG_TABLE["replicas.*"]
    for name in ("poll_interval", "poll_timeout"):
        minimum = float(re.search(rf"`{name}` at least ([0-9.]+) s", cell).group(1))
        shardkit.load_config({**BASE, "replicas": {name: minimum}}, env={})
        with pytest.raises(ConfigurationError):
            shardkit.load_config({**BASE, "replicas": {name: minimum * 0.99}}, env={})


def test_pool_bounds():
    cell = CONFIG_TABLE["pool.*"]
    for name, minimum in re.findall(r"`(\w+)` \(>= (-?\d+)", cell):
        minimum = int(minimum)
        shardkit.load_config({**BASE, "pool": {name: minimum}}, env={})
        with pytest.raises(ConfigurationError):
            shardkit.load_config({**BASE, "pool": {name: minimum - 1}}, env={})


def test_shard_name_rule():
    # "a letter or `_`, then letters, digits, `_` and `-`, at most 63 characters"
    cell = CONFIG_TABLE["shards[].name"]
    limit = int(re.search(r"at most (\d+)", cell).group(1))
    for ok in ("_a", "a-b_9", "x" * limit):
        shardkit.load_config({**BASE, "shards": [{**BASE["shards"][0], "name": ok}]}, env={})
    for bad in ("9a", "-a", "a.b", "x" * (limit + 1)):
        with pytest.raises(ConfigurationError):
            shardkit.load_config({**BASE, "shards": [{**BASE["shards"][0], "name": bad}]}, env={})


# -- the command line -----------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf command: its words -> its parser."""
    out: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        out[path] = parser
    for action in subs:
        for name, sub in action.choices.items():
            out.update(_commands(sub, path + (name,)))
    return out


PARSER = cli.build_parser()
COMMANDS = _commands(PARSER)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _cli_groups() -> list[tuple[tuple[str, ...], str]]:
    """Each ``shardkit ...`` line of the README's code blocks, with the comment lines that
    continue it, as (command words, text)."""
    groups: list[tuple[tuple[str, ...], str]] = []
    for _, _, code in BLOCKS:
        for line in code.splitlines():
            s = line.strip()
            if s.startswith("shardkit "):
                # The longest run of words that names a command (TABLE, KEY, ... follow it).
                words: list[str] = []
                for w in s.split()[1:]:
                    if not any(c[:len(words) + 1] == (*words, w) for c in COMMANDS):
                        break
                    words.append(w)
                groups.append((tuple(words), s))
            elif s.startswith("#") and line.startswith(" ") and groups:
                words, text = groups[-1]
                groups[-1] = (words, text + "\n" + s)
            elif s.startswith("#"):
                groups.append(((), s))
    return groups


def _documented_flags() -> dict[tuple[str, ...], set[str]]:
    """command -> the flags the README's code blocks show it with."""
    flags_re = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")
    doc: dict[tuple[str, ...], set[str]] = {c: set() for c in COMMANDS}
    previous: tuple[str, ...] | None = None
    for words, text in _cli_groups():
        if not words:
            # "# upgrade, downgrade, check: --alembic-ini PATH": flags of the listed siblings
            m = re.match(r"#\s*([a-z, ]+):\s*(--.*)", text)
            if m and previous:
                for verb in re.split(r",\s*", m.group(1).strip()):
                    target = previous[:-1] + (verb,)
                    if target in doc:
                        doc[target] |= set(flags_re.findall(m.group(2)))
            continue
        target = tuple(words)
        if target not in doc:
            continue
        found = set(flags_re.findall(text))
        doc[target] |= found
        for verb in re.findall(r"\(also (\w+)\)", text):
            sibling = target[:-1] + (verb,)
            if sibling in doc:
                doc[sibling] |= found
        if "[...]" in text and previous and previous[:-1] == target[:-1]:
            doc[target] |= doc[previous]   # "shardkit migrate downgrade REVISION [...]"
        previous = target
    # Prose: "Every command that reads a config takes `--config PATH` (or `-c PATH`; ...)"
    m = re.search(r"Every command that reads a config takes `(--[a-z-]+)[^`]*`\s+\(or `(-[a-z])", README_TEXT)
    if m:
        for c, parser in COMMANDS.items():
            if any(m.group(1) in a.option_strings for a in _options(parser)):
                doc[c] |= {m.group(1), m.group(2)}
    # `apply` is documented as `plan` and then moving what was planned: it takes the
    # planning options (--add, --drain, --even, --split, --lower, --move-value, --to).
    planning = {"--add", "--drain", "--even", "--split", "--lower", "--move-value", "--to"}
    doc[("rebalance", "apply")] |= doc[("rebalance", "plan")] & planning
    return doc


def test_every_cli_command_is_documented():
    groups = {words for words, _ in _cli_groups()}
    for command in COMMANDS:
        alternatives = f"shardkit {' '.join(command[:-1])} " if len(command) > 1 else "shardkit "
        listed = re.search(re.escape(alternatives) + r"[a-z|]*\b" + re.escape(command[-1]) + r"\b", README_TEXT)
        assert command in groups or listed, f"`shardkit {' '.join(command)}` is not in the README"


def test_every_cli_flag_appears_in_the_readme():
    for command, parser in COMMANDS.items():
        for action in _options(parser):
            assert any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", README_TEXT)
                       for o in action.option_strings), \
                f"`shardkit {' '.join(command)}` takes {'/'.join(action.option_strings)}, not in the README"
    assert any(re.search(rf"shardkit {re.escape(o)}\b", README_TEXT) for o in ("-v", "--verbose"))


def test_every_cli_flag_is_documented_for_the_command_that_takes_it():
    doc = _documented_flags()
    missing = []
    for command, parser in COMMANDS.items():
        for action in _options(parser):
            if not set(action.option_strings) & doc[command]:
                missing.append(f"shardkit {' '.join(command)} {'/'.join(action.option_strings)}")
    assert missing == [], "accepted but not documented for that command:\n  " + "\n  ".join(missing)


def test_every_documented_flag_is_accepted_by_its_command():
    doc = _documented_flags()
    wrong = []
    for command, flags in doc.items():
        accepted = {o for a in COMMANDS[command]._actions for o in a.option_strings}
        wrong += [f"shardkit {' '.join(command)} {f}" for f in sorted(flags - accepted)]
    assert wrong == [], "documented but refused:\n  " + "\n  ".join(wrong)


def _coerce(value: str, default: Any) -> Any:
    return type(default)(value) if isinstance(default, (int, float)) and not isinstance(default, bool) else value


def test_defaults_shown_in_cli_synopses_are_argparses():
    wrong = []
    for words, text in _cli_groups():
        if tuple(words) not in COMMANDS:
            continue
        parser = COMMANDS[tuple(words)]
        shown = re.findall(r"\[(--[a-z-]+) ([^\]\s]+)\]", text) + \
            re.findall(r"(--[a-z-]+) (\S+) \(default\)", text)
        for flag, value in shown:
            action = next((a for a in parser._actions if flag in a.option_strings), None)
            if action is None:
                wrong.append(f"shardkit {' '.join(words)}: {flag} is not an option")
            elif "|" in value:
                if value.split("|") != list(action.choices or []):
                    wrong.append(f"shardkit {' '.join(words)} {flag}: README {value}, choices {action.choices}")
            elif value.isupper() or value == "D":
                continue  # a placeholder
            elif action.default is not None and _coerce(value, action.default) != action.default:
                wrong.append(f"shardkit {' '.join(words)} {flag}: README {value}, default {action.default}")
    m = re.search(r"`(--[a-z-]+) PATH` \(or `(-[a-z]) PATH`;\s+default `([^`]+)`\)", README_TEXT)
    assert m
    for command, parser in COMMANDS.items():
        for a in parser._actions:
            if m.group(1) in a.option_strings and a.default != m.group(3):
                wrong.append(f"shardkit {' '.join(command)} {m.group(1)}: default {a.default}")
    assert wrong == []


def test_cli_errors_exit_2_with_one_line(capsys, tmp_path):
    code = cli.main(["route", "users", "1", "--config", str(tmp_path / "missing.toml")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


# -- Python names, methods, keyword arguments --------------------------------------------------


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    obj: Any = None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        rest = parts[i:]
        break
    else:
        return False
    for name in rest:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def test_every_shardkit_name_in_the_readme_exists():
    names = set(re.findall(r"\bshardkit(?:\.[A-Za-z_]\w*)+", README_TEXT))
    missing = []
    for dotted in sorted(names):
        if dotted.endswith(".toml") or dotted.endswith(".compose"):
            continue   # shardkit.toml, shardkit.compose.toml: file names
        # SQL objects live in the schema shardkit (shardkit.bucket(...), shardkit.owned_buckets)
        if not _resolve(dotted) and dotted not in PACKAGE_SOURCE:
            missing.append(dotted)
    assert missing == []


def _readme_python() -> str:
    return "\n".join(c for _, lang, c in BLOCKS if lang == "python")


OBJECTS = {
    "cluster": shardkit.Cluster,
    "session": shardkit.ShardedSession,
    "route": shardkit.Route,
}


def test_methods_and_attributes_used_in_the_readme_exist():
    from shardkit.devcluster import DevCluster, DevNode

    objects = {**OBJECTS, "dev": DevCluster, "node": DevNode, "replica": DevNode}
    missing = []
    for var, cls in objects.items():
        for attr in set(re.findall(rf"(?<![\w.]){var}\.([a-z_]\w*)", README_TEXT)):
            fields = getattr(cls, "__dataclass_fields__", {})
            if not hasattr(cls, attr) and attr not in fields:
                missing.append(f"{var}.{attr} ({cls.__name__})")
    assert missing == []


def _kwargs_of(call: str) -> set[str]:
    found: set[str] = set()
    for m in re.finditer(re.escape(call) + r"\(([^()]*(?:\([^()]*\)[^()]*)*)\)", README_TEXT):
        found |= set(re.findall(r"(?<![\w.])([a-z_]\w*)=", m.group(1)))
    return found


@pytest.mark.parametrize("call, fn", [
    ("Cluster.from_config", shardkit.Cluster.from_config),
    ("Session", shardkit.ShardedSession.__init__),
    ("scope", shardkit.scope),
])
def test_keyword_arguments_used_in_the_readme_exist(call, fn):
    params = set(inspect.signature(inspect.unwrap(fn)).parameters)
    used = _kwargs_of(call)
    if call == "scope":
        used |= set(re.findall(r"`(\w+)=`", README_TEXT.split("(scopes also take", 1)[1].split(")", 1)[0]))
    if call == "Session":
        used -= {"class_", "cluster"} - params  # sessionmaker(class_=..., cluster=...)
    assert used, f"README never calls {call}"
    assert used - params == set()


def test_run_transaction_keyword_defaults():
    m = re.search(r"\(`retries=(\d+)` and `refresh_timeout=([0-9.]+)`", README_TEXT)
    params = inspect.signature(shardkit.run_transaction).parameters
    assert int(m.group(1)) == params["retries"].default
    assert float(m.group(2)) == params["refresh_timeout"].default


def test_execution_options_in_the_readme_are_read_by_the_code():
    options = set(re.findall(r"\b(shardkit_(?:shard|all_shards|role|consistency|max_lag_seconds|"
                             r"max_lag_bytes|timeout|partial_results|strict|[a-z_]+))\s*[=\"]", README_TEXT))
    options |= set(re.findall(r"`(shardkit_[a-z_]+)`", README_TEXT))
    missing = [o for o in sorted(options)
               if f'"{o}"' not in PACKAGE_SOURCE and o not in {"shardkit_cluster_factory", "shardkit_module_cluster_factory", "shardkit_dev_cluster"}]
    assert missing == []


def test_error_tree_is_the_class_hierarchy():
    (tree,) = [c for _, _, c in BLOCKS if c.startswith("ShardkitError\n")]
    stack: list[tuple[int, type]] = [(-1, shardkit.ShardkitError)]
    seen = {"ShardkitError"}
    problems = []
    for line in tree.splitlines()[1:]:
        m = re.match(r"^([│ ]*)[├└]── (\w+)\s*(.*)$", line)
        assert m, line
        depth, name, rest = len(m.group(1)) // 4, m.group(2), m.group(3)
        cls = getattr(shardkit, name, None)
        if cls is None:
            problems.append(f"{name}: not exported")
            continue
        seen.add(name)
        while stack[-1][0] >= depth:
            stack.pop()
        if not issubclass(cls, stack[-1][1]):
            problems.append(f"{name} is not a {stack[-1][1].__name__}")
        stack.append((depth, cls))
        source = "\n".join(inspect.getsource(k) for k in cls.__mro__ if k.__module__ == "shardkit.errors")
        for attr in re.findall(r"(?<![\w])\.(\w+)", rest.split("  ")[0] if "  " in rest else rest):
            if f"self.{attr} =" not in source:
                problems.append(f"{name}.{attr}: not set")
    import shardkit.errors as errors

    problems += [f"{n}: exported, not in the tree" for n in errors.__all__ if n not in seen]
    assert problems == []
    assert issubclass(shardkit.ShardkitError, importlib.import_module("sqlalchemy.exc").SQLAlchemyError)


# -- other stated facts --------------------------------------------------------------------------


def test_quick_example_bucket_and_shard():
    # cluster.shard_for(User, 42)  # 's0' (2 shards, even split);  cluster.bucket_for(User, 42)  # 318
    m = re.search(r"cluster\.bucket_for\(User, 42\)\s*# (\d+)", README_TEXT)
    cluster = shardkit.Cluster.from_config({
        "shards": [{"name": "s0", "primary": "postgresql://a@h0/d"}, {"name": "s1", "primary": "postgresql://a@h1/d"}],
        "groups": {"users": {"tables": {"users": "id"}}}})
    assert cluster.bucket_for("users", 42) == int(m.group(1)) == shardkit.bucket_for(42, 1024)
    assert cluster.shard_for("users", 42) == re.search(r"shard_for\(User, 42\)\s*# '(\w+)'", README_TEXT).group(1)


def test_metric_names():
    prometheus_client = pytest.importorskip("prometheus_client")
    import shardkit.metrics

    section = _section_prose("Metrics")
    documented = set(re.findall(r"`(shardkit_[a-z_]+)`", section))
    cluster = shardkit.Cluster.from_config(BASE)
    registry = prometheus_client.CollectorRegistry()
    shardkit.metrics.instrument(cluster, registry)
    exported = set()
    for family in registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exported == documented


def test_consistency_tokens_are_checked_as_the_readme_says():
    # README (corrected: it claimed an edited or truncated token is refused, but the token
    # is not signed and only its form can be checked): "Only its form is checked: a token
    # that does not start with `v1:`, has a part that is not `SHARD=HEX/HEX` ..., or names
    # a shard twice is refused with `ShardkitError`; positions of shards the cluster does
    # not have are ignored. ... a well-formed token that was edited or truncated
    # (`s1=0/305595` for `s1=0/3055958`) is accepted as the positions it says."
    text = " ".join(README_TEXT.split())
    assert "Only its form is checked" in text
    example = re.search(r"\(e\.g\. `(v1:[^`]+)`\)", text).group(1)
    edited, original = re.search(r"edited or truncated \(`([^`]+)` for `([^`]+)`\) is accepted as the "
                                 r"positions it says", text).groups()
    assert original in example
    assert re.search(r"does not start with `v1:`, has a part that is not `SHARD=HEX/HEX` \(a WAL position, "
                     r"at most 8 hex digits each side\), or names a shard twice is refused with "
                     r"`ShardkitError`; positions of shards the cluster does not have are ignored", text)
    cluster = shardkit.Cluster.from_config({
        "shards": [{"name": "s0", "primary": "postgresql://a@h0/d"}, {"name": "s1", "primary": "postgresql://a@h1/d"}]})

    def session_with(token: str) -> shardkit.ShardedSession:
        session = shardkit.ShardedSession(cluster)
        session.require_token(token)
        return session

    assert session_with(example).consistency_token() == example  # the README's example is a valid token
    accepted = []
    for what, bad in (("not v1:", "v2:" + example[3:]),
                      ("no version", example[3:]),
                      ("a part without a position", example + ",s0"),
                      ("a part without its low half", example + ",s0=0"),
                      ("more than 8 hex digits", "v1:s0=0/123456789"),
                      ("not hex", "v1:s0=0/30G8890"),
                      ("an empty part", example + ","),
                      ("a shard named twice", example + ",s0=0/1")):
        try:
            session_with(bad)
        except shardkit.ShardkitError:
            continue
        accepted.append(f"{what}: {bad!r}")
    assert accepted == [], "accepted:\n  " + "\n  ".join(accepted)
    # Well-formed, edited or truncated: taken as the positions it says (the README's
    # "accepted as the positions it says"); unknown shards ignored.
    for token in (example.replace(original, edited),
                  example[:-1] + ("1" if example[-1] != "1" else "2")):
        assert session_with(token).consistency_token() == token
    assert session_with("v1:s0=0/1,s9=0/5").consistency_token() == "v1:s0=0/1"


def test_extras_and_requirements():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in set(re.findall(r"\.\[(\w+)\]", README_TEXT)) | set(re.findall(r"shardkit\[(\w+)\]", README_TEXT)):
        assert extra in extras
    m = re.search(r"testcontainers >= ([0-9.]+)", README_TEXT)
    assert f"testcontainers>={m.group(1)}" in extras["docker"]
    m = re.search(r"Python >= ([0-9.]+)", README_TEXT)
    assert pyproject["project"]["requires-python"] == f">={m.group(1)}"
    assert pyproject["project"]["scripts"]["shardkit"] == "shardkit.cli:main"
    assert "shardkit.testing.plugin" in pyproject["project"]["entry-points"]["pytest11"].values()
    import shardkit.testing.plugin as plugin

    for fixture in re.findall(r"def test_\w+\((shardkit_\w+)\)", README_TEXT):
        assert fixture in plugin.__all__


def test_compose_files_are_what_the_readme_says():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    images = {s.get("image") for s in services.values()}
    m = re.search(r"official `(postgres:\d+)` image", README_TEXT)
    assert images == {m.group(1)}
    assert sum(1 for n in services if "replica" in n) == sum(1 for n in services if "primary" in n) == 2
    assert any("catalog" in n for n in services)
    password, default = re.search(r"The password is `(\w+)` \(default `(\w+)`\)", README_TEXT).groups()
    config = shardkit.load_config(ROOT / "shardkit.compose.toml", env={})
    assert len(config.shards) == 2 and all(len(s.replicas) == 1 for s in config.shards)
    assert config.catalog_url is not None
    assert {s.primary.password for s in config.shards} == {default}
    assert f"${{{password}:-{default}}}" in (ROOT / "docker-compose.yml").read_text()


def test_explain_takes_what_the_readme_says():
    # "`explain()` routes a statement by what it says (its WHERE clause, tables and `all_shards=`)"
    m = re.search(r"`explain\(\)` routes a statement by what it says \([^)]*`(\w+)=`\)", README_TEXT)
    assert m and m.group(1) in inspect.signature(shardkit.Cluster.explain).parameters
    assert {"shards", "kind", "role", "reason", "split", "merge"} <= set(shardkit.Route.__dataclass_fields__)
