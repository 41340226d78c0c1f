"""Passwords in less obvious places: a database URL given where the
config file's path goes (``--config "$DATABASE_URL"``, ``Cluster.from_config(url)``), and a
percent-encoded NUL in a URL, at which libpq cuts the connection string: the password's
start then goes to the host's default port, without the URL's later parameters (port,
sslmode).  No server needed."""

from __future__ import annotations

import contextlib
import io
from urllib.parse import quote

import pytest

import shardkit
from shardkit import ConfigurationError, cli, load_config

PW = "S3cr3t@Pw:/%!"
ENC = quote(PW, safe="")
FRAGMENTS = ("S3cr3t", "Pw:", "Pw%3A", ENC, PW)


def _leaks(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


URLS = [
    f"postgresql+psycopg://app:{ENC}@db0.example:5432/shop",
    f"postgresql://app@db0.example/shop?password={ENC}",
]


@pytest.mark.parametrize("url", URLS)
def test_a_database_url_as_the_config_path_is_refused_without_its_password(url):
    with pytest.raises(ConfigurationError) as ei:
        load_config(url)
    e = ei.value
    shown = " ".join([str(e), repr(e), repr(vars(e)), repr(e.args)])
    assert not _leaks(shown), shown
    assert "database URL" in str(e) and "db0.example" in str(e), str(e)   # says what it was


@pytest.mark.parametrize("url", URLS)
def test_cli_config_option_given_a_database_url_does_not_print_its_password(url):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["status", "--config", url])
    text = out.getvalue() + err.getvalue()
    assert rc == 2 and "error:" in text, (rc, text)
    assert not _leaks(text), text


def _cfg(url: str) -> dict:
    return {"bucket_count": 16, "groups": {"users": {"tables": {"users": "id"}}},
            "shards": [{"name": "s0", "primary": url}]}


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://app:S3cr3t%00{ENC}@db0.example:6543/shop?sslmode=verify-full",
    f"postgresql+psycopg://app@db0.example:6543/shop?password=S3cr3t%00{ENC}&sslmode=verify-full",
    f"postgresql+psycopg://app:{ENC}@db0.example:6543/sh%00op?sslmode=verify-full",
])
def test_a_percent_encoded_nul_in_a_url_is_refused(url):
    """libpq reads the connection string as a C string: everything after the NUL (the
    port, sslmode) is dropped, and the password's start is sent to the default port,
    maybe without TLS.  Refused, naming the field and not showing the password."""
    with pytest.raises(ConfigurationError) as ei:
        shardkit.Cluster.from_config(_cfg(url), follow_map=False)
    e = ei.value
    assert e.field == "shards[0].primary" and "%00" in str(e), str(e)
    shown = " ".join([str(e), repr(e), repr(vars(e)), repr(e.args)])
    assert not _leaks(shown), shown


def test_mask_secrets_masks_the_password_as_sqlalchemy_renders_it():
    """mask_secrets (the mover's messages) knew the password raw and quote(pw, safe=""):
    SQLAlchemy's URL keeps a space and a '+' as they are in the user info
    (quote(safe=" +")) and writes the query string with quote_plus, so a password with a
    space or '+' beside an encoded character was shown whole in either form."""
    from urllib.parse import quote_plus

    from sqlalchemy.engine import make_url

    from shardkit.rebalance import mask_secrets

    pw = "pa ss+w/rd"
    url = make_url("postgresql+psycopg://app@db0.example/shop").set(password=pw)
    cfg = {"shards": [{"name": "s0", "primary": url.render_as_string(hide_password=False)}],
           "groups": {"g": {"tables": {"t": "id"}}}}
    cluster = shardkit.Cluster.from_config(cfg, follow_map=False)
    try:
        rendered = url.render_as_string(hide_password=False)
        message = f"could not connect with {rendered} nor with ?password={quote_plus(pw)}"
        masked = mask_secrets(message, cluster)
        assert quote_plus(pw) not in masked and rendered not in masked, masked
        assert masked.count("***") == 2, masked
    finally:
        cluster.dispose()
