"""The README's API table against the README itself.

tests/unit/test_docs_claims.py checks that every ``cluster.X`` the README uses
exists; this checks the other direction a reader relies on: a ``Cluster`` method or
attribute the README's examples and prose use is listed in the "Python API at a
glance" table, the one place that says what a cluster offers.
"""

from __future__ import annotations

import re
from pathlib import Path

import shardkit

ROOT = Path(__file__).resolve().parents[2]
README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")


def _cluster_row() -> str:
    rows = [line for line in README_TEXT.splitlines() if line.startswith("| `Cluster.from_config(")]
    assert len(rows) == 1, "the API table has one Cluster row"
    return rows[0]


def test_every_cluster_attribute_the_readme_uses_is_in_the_api_table():
    used = set(re.findall(r"(?<![\w.])cluster\.([a-z_]\w*)", README_TEXT))
    assert used, "the README uses cluster.X"
    row = _cluster_row()
    listed = set(re.findall(r"`([a-z_]\w*)", row))
    missing = sorted(a for a in used if hasattr(shardkit.Cluster, a) and a not in listed)
    assert missing == []
