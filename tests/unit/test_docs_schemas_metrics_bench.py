"""README.md and BENCHMARKS.md against the code: tables in
other schemas, the metrics paragraph, the benchmark commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import shardkit
from shardkit._guard import table_parts, table_sql

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _config(tables_toml: str, reference: str = "") -> dict:
    return tomllib.loads(f"""{reference}
[[shards]]
name = "s0"
primary = "postgresql+psycopg://u@h.invalid/db"
[groups.g]
strategy = "hash"
tables = {tables_toml}
""")


def test_qualified_table_names_are_read_as_the_readme_says():
    readme = _one_line(README)
    assert 'tables = { "archive.users" = "id" }' in readme
    cfg = shardkit.Cluster.from_config(_config('{ "archive.users" = "id" }',
                                               'reference_tables = ["archive.countries"]')).config
    assert "archive.users" in cfg.groups[0].tables and "archive.countries" in cfg.reference_tables
    # "quoted: TOML reads archive.users unquoted as a nested table" (refused, naming the field)
    assert "TOML reads `archive.users` unquoted as a nested table" in readme
    with pytest.raises(shardkit.ConfigurationError) as e:
        shardkit.Cluster.from_config(_config('{ archive.users = "id" }'))
    assert e.value.field == "groups.g.tables.archive"
    assert '"archive.<table>" = "<column>"' in str(e.value)  # the fix, in the message
    # '"Arc-hive.Events" is table "Events" of schema "Arc-hive"; the last . separates them'
    assert '(`"Arc-hive.Events"` is table `"Events"` of schema `"Arc-hive"`; the last `.`' in readme
    assert table_parts("Arc-hive.Events") == ("Arc-hive", "Events")
    assert table_sql("Arc-hive.Events") == '"Arc-hive"."Events"'
    assert table_parts("a.b.c") == ("a.b", "c") and table_parts("users") == ("users",)


@pytest.mark.parametrize("name, field, part", [
    (".users", "groups.g.tables", "schema"), ("archive.", "groups.g.tables", "table")])
def test_a_qualified_name_missing_a_part_is_a_configuration_error(name, field, part):
    """README: every mistake is a ConfigurationError whose .field names the setting."""
    with pytest.raises(shardkit.ConfigurationError) as e:
        shardkit.Cluster.from_config(_config(f'{{ "{name}" = "id" }}'))
    assert e.value.field == field and f"empty {part} name" in str(e.value)
    with pytest.raises(shardkit.ConfigurationError) as e:
        shardkit.Cluster.from_config(_config('{ users = "id" }', f'reference_tables = ["{name}"]'))
    assert e.value.field == "reference_tables[0]"


def test_the_metrics_paragraph_says_what_the_counters_leave_out():
    """A failed statement is not in shardkit_queries_total (only after_cursor_execute counts
    there): an error rate of errors / queries would be wrong.  The behaviour itself:
    tests/integration/test_docs_query_metrics.py."""
    section = _one_line(README.split("### Metrics", 1)[1].split("\n### ", 1)[0])
    assert ("a statement that fails counts in `shardkit_query_errors_total`, not in "
            "`shardkit_queries_total` or the histogram") in section
    assert "so does a connection to the node that cannot be opened" in section


def test_the_benchmark_commands_name_scripts_and_options_that_exist():
    """BENCHMARKS.md's commands are how its numbers were made: each names a script in
    bench/ and only options that script accepts."""
    block = BENCHMARKS.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split() for line in block.splitlines() if line.strip()]
    assert len(commands) == 5
    for words in commands:
        script = ROOT / words[1]
        assert script.is_file(), words[1]
        accepted = set(re.findall(r'add_argument\("(--[a-z-]+)"', script.read_text()))
        given = {w.strip("[]") for w in words[2:] if w.strip("[]").startswith("--")}
        assert given <= accepted, (words[1], given - accepted)
