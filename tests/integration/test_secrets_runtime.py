"""Passwords at run time, against a real cluster: what `shardkit status` shows of a config
file that holds them.

(The rest of the runtime surface was checked and shows no password: every node, the catalog
included, requiring scram-sha-256 passwords given percent-encoded in the URL, through
``${ENV}`` and as ``?password=``; logs at DEBUG of every logger with SQLAlchemy's echo and
echo_pool, stdout/stderr, the reprs of the cluster, config, engines, pools, sessions and
routes, health(), pool_stats(), Prometheus text, every CLI command with and without a
wrong password or a dead node, Alembic's output, the catalog's moves and journal after a
move stopped by an authentication failure, and the str/repr/args/notes/tracebacks/pickles
and copies of the errors raised.)
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import quote

from shardkit import cli
from shardkit._status import config_version

PASSWORDS = ("Pw-7c1d!x@y", "Ev-9q2k:z/w#", "Qs-4m8p;t+u")
OTHERS = ("hunter2", "correct horse", "Zz-0&0=0")


def _config(dev, passwords, *, encode: bool = True) -> str:
    """The cluster's config with a password in every form a file can hold one: in a URL's
    user info (percent-encoded, unless not ``encode``), as a ``${VAR:-default}`` there, and
    as ``?password=``."""
    userinfo, default, query = (quote(p, safe="") if encode else p for p in passwords)
    lines = [f"bucket_count = {dev.config_dict()['bucket_count']}"]
    for i, shard in enumerate(dev.config_dict()["shards"]):
        primary = shard["primary"].replace(
            "://shardkit@", f"://shardkit:{userinfo}@" if i == 0 else f"://shardkit:${{SK_SECRET_UNSET:-{default}}}@")
        replicas = [r + f"?password={query}" for r in shard.get("replicas", [])]
        lines += ["[[shards]]", f'name = "{shard["name"]}"', f'primary = "{primary}"',
                  f"replicas = {json.dumps(replicas)}"]
    return "\n".join(lines) + "\n"


def _status_version(path, capsys) -> str:
    assert cli.main(["status", "--config", str(path), "--json"]) == 0
    version = json.loads(capsys.readouterr().out)["config_version"]
    assert cli.main(["status", "--config", str(path)]) == 0
    assert re.search(rf"\bconfig {version}\b", capsys.readouterr().out)
    return version


def test_status_config_fingerprint_confirms_no_password_guess(shardkit_dev_cluster, tmp_path, capsys,
                                                              monkeypatch):
    """`status` printed a fingerprint of the config file: the first 12 hex digits of its
    SHA-256, passwords and all, in output that is pasted into tickets and logged.  With the
    rest of the file (the masked URLs `status` itself shows, a copy in the repository) it
    confirmed a guessed password offline: hash the file with the guess in.  The fingerprint
    leaves the passwords out (the same for any password), and still changes with the rest."""
    monkeypatch.delenv("SK_SECRET_UNSET", raising=False)
    dev = shardkit_dev_cluster
    real, other = tmp_path / "real.toml", tmp_path / "other.toml"
    real.write_text(_config(dev, PASSWORDS))
    other.write_text(_config(dev, OTHERS))
    version = _status_version(real, capsys)
    # The guess that is right gives what `status` shows: a verifier of the password.
    assert version != hashlib.sha256(real.read_bytes()).hexdigest()[:12]
    assert version == _status_version(other, capsys)
    real.write_text(real.read_text() + "# edited\n")
    assert _status_version(real, capsys) != version


def test_fingerprint_leaves_out_passwords_with_blanks(shardkit_dev_cluster, tmp_path, capsys, monkeypatch):
    """The fingerprint masked a password up to its first blank only: the rest ("horse" of
    "correct horse") stayed in the hash, which then confirmed a guess of it offline. It is
    the same for any password, and still changes with the rest of the file."""
    monkeypatch.delenv("SK_SECRET_UNSET", raising=False)
    dev = shardkit_dev_cluster
    real, other = tmp_path / "real.toml", tmp_path / "other.toml"
    real.write_text(_config(dev, ("correct horse",) * 3, encode=False))
    other.write_text(_config(dev, ("correct staple",) * 3, encode=False))
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
