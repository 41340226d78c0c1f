"""The README's configuration example is a config shardkit loads, with the values it describes."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import shardkit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_example_loads(monkeypatch, tmp_path):
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README has no ```toml block"
    (tmp_path / "shardkit.toml").write_text(block.group(1))
    # The example's custom strategy names a function of the application.
    fake = types.ModuleType("myapp.sharding")
    fake.shard_for_item = lambda key: "s0"
    monkeypatch.setitem(sys.modules, "myapp", types.ModuleType("myapp"))
    monkeypatch.setitem(sys.modules, "myapp.sharding", fake)
    config = shardkit.load_config(tmp_path / "shardkit.toml", env={"DB_PASSWORD": "secret"})
    assert config.shard_names == ("s0", "s1")
    assert config.reference_tables == frozenset({"countries", "plans"})
    assert {g.name for g in config.groups} == {"users", "events", "tenants", "legacy"}
    assert config.bucket_map[511] == "s0" and config.bucket_map[512] == "s1"
