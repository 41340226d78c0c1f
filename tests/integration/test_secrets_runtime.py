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

PASSWORDS = ("Pw-7c1d!x@y", "Ev-9q2k:z/w#", "Qs-4m8p;t+u")
OTHERS = ("hunter2", "correct horse", "Zz-0&0=0")


def _config(dev, passwords) -> str:
    """The cluster's config with a password in every form a file can hold one: in a URL's
    user info (percent-encoded), as a ``${VAR:-default}`` there, and as ``?password=``."""
    userinfo, default, query = (quote(p, safe="") for p in passwords)
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
