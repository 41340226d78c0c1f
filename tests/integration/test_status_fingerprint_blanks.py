"""`shardkit status`'s config fingerprint and the passwords a config file writes as they
are: one holding a blank ("correct horse", accepted unencoded inside a URL's user info or
``?password=``), and one followed, in an inline array, by the next URL."""

from __future__ import annotations

import json
import re

from shardkit import cli
from shardkit._status import config_version


def _config(dev, password: str) -> str:
    """The cluster's config with ``password`` unencoded: in s0's primary's user info, as a
    ``${VAR:-default}`` default in the others', and as ``?password=`` in the replicas'."""
    lines = [f"bucket_count = {dev.config_dict()['bucket_count']}"]
    for i, shard in enumerate(dev.config_dict()["shards"]):
        primary = shard["primary"].replace(
            "://shardkit@", f"://shardkit:{password}@" if i == 0
            else f"://shardkit:${{SK_BLANK_UNSET:-{password}}}@")
        replicas = [r + f"?password={password}" for r in shard.get("replicas", [])]
        lines += ["[[shards]]", f'name = "{shard["name"]}"', f'primary = "{primary}"',
                  f"replicas = {json.dumps(replicas)}"]
    return "\n".join(lines) + "\n"


def _status_version(path, capsys) -> str:
    assert cli.main(["status", "--config", str(path), "--json"]) == 0
    version = json.loads(capsys.readouterr().out)["config_version"]
    assert cli.main(["status", "--config", str(path)]) == 0
    assert re.search(rf"\bconfig {version}\b", capsys.readouterr().out)
    return version


def test_fingerprint_leaves_out_passwords_with_blanks(shardkit_dev_cluster, tmp_path, capsys, monkeypatch):
    """The fingerprint masked a password up to its first blank only: the rest ("horse" of
    "correct horse") stayed in the hash, which then confirmed a guess of it offline. It is
    the same for any password, and still changes with the rest of the file."""
    monkeypatch.delenv("SK_BLANK_UNSET", raising=False)
    dev = shardkit_dev_cluster
    real, other = tmp_path / "real.toml", tmp_path / "other.toml"
    real.write_text(_config(dev, "correct horse"))
    other.write_text(_config(dev, "correct staple"))
    version = _status_version(real, capsys)
    assert version == _status_version(other, capsys)
    real.write_text(real.read_text() + "# edited\n")
    assert _status_version(real, capsys) != version


def test_fingerprint_keeps_the_url_after_a_query_password(tmp_path):
    """A ``?password=`` at the end of one URL of an inline array was masked up to the next
    blank: with none between the array's items, the next URL (its host and port) was left out
    of the fingerprint, so two files naming different replicas got the same one."""
    template = ('[[shards]]\nname = "s0"\nprimary = "postgresql+psycopg://app@db0:5432/shop"\n'
                'replicas = ["postgresql+psycopg://app@r0:5432/shop?password=pw",'
                '"postgresql+psycopg://app@{host}:5432/shop"]\n')
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(template.format(host="r1"))
    b.write_text(template.format(host="r9"))
    assert config_version(a) != config_version(b)
    # (The password itself stays out.)
    b.write_text(template.format(host="r1").replace("password=pw", "password=guess"))
    assert config_version(a) == config_version(b)
