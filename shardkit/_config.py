"""Parse and validate a cluster description (``shardkit.toml`` or the same structure as a dict).

Every mistake raises :class:`~shardkit.errors.ConfigurationError` naming the
field (``shards[1].primary``, ``groups.users.ranges[2]``) and the fix.  The
format is documented in the README ("Configuration reference").
"""

from __future__ import annotations

import datetime
import functools
import importlib
import math
import os
import re
import threading
import uuid
from decimal import Decimal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._slices import by_group, strategy_from_slices
from ._strategies import (
    CustomStrategy,
    HashStrategy,
    KeyRange,
    ListStrategy,
    RangeStrategy,
    Strategy,
)
from .errors import ConfigurationError

__all__ = [
    "ClusterConfig",
    "GroupConfig",
    "ReplicaSettings",
    "ShardConfig",
    "load_config",
    "mask_url",
]

DEFAULT_BUCKET_COUNT = 1024
MAX_BUCKET_COUNT = 1 << 20

#: A node's role: the shard's primary, or one of its replicas.
PRIMARY = "primary"
REPLICA = "replica"

_TOP_LEVEL_KEYS = {"name", "bucket_count", "shards", "groups", "reference_tables", "replicas", "pool",
                   "catalog"}
_SHARD_KEYS = {"name", "primary", "replicas", "buckets", "pool", "primary_pool"}
_GROUP_KEYS = {"strategy", "tables", "ranges", "values", "default", "function"}
_STRATEGIES = ("hash", "range", "list", "custom")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}")
# The name in a ${NAME} or ${NAME:-default} reference.
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The fields that hold a database URL.
_URL_FIELD = re.compile(r"shards\[\d+\]\.(?:primary|replicas\[\d+\](?:\.url)?)|catalog\.url")


# The scheme and user info of a URL, read as SQLAlchemy's make_url reads them (a user name
# holds no ':' or '/', a password runs to the first '@').
_USER_INFO = re.compile(r"[\w+]+://(?:[^:/]*(?::[^@]*)?@)?")
# A control character (C0, DEL, C1): not other non-printable characters, which a password
# may hold (a no-break or ideographic space, a zero-width joiner) and libpq sends as they are.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Whether make_url decodes a URL's database name, as SQLAlchemy 2.1 does ("sh%00op" is
# "sh\x00op"); 2.0 keeps it as written, so a %00 there is still three characters then.
_DATABASE_DECODED: Final = make_url("postgresql://h/a%41").database == "aA"

# libpq parameters that are secrets, when a URL carries them in its query string.
SECRET_QUERY_KEYS: Final = ("password", "sslpassword")


#: Seconds a connection attempt to a node or the catalog may take, unless its URL says otherwise.
CONNECT_TIMEOUT: Final = 3


def connect_timeout_args(url: URL | str) -> dict[str, Any]:
    """``{"connect_timeout": CONNECT_TIMEOUT}``, or nothing when ``url`` gives its own
    ``connect_timeout`` (a driver's keyword argument would override the URL's)."""
    query = (url if isinstance(url, URL) else make_url(url)).query
    return {} if "connect_timeout" in query else {"connect_timeout": CONNECT_TIMEOUT}


def _unencoded_at(raw: str) -> bool:
    """Whether ``raw`` has an ``@`` past the one that ends its user info (outside a query
    value): an unencoded ``@`` in the password, whose tail SQLAlchemy reads as the host,
    the database name or the query string, where it would be shown."""
    m = _USER_INFO.match(raw)
    if m is None:
        return False
    path, _, query = raw[m.end():].partition("?")
    return "@" in path or any("@" in item.partition("=")[0] for item in query.split("&"))


def _unencoded_amp(raw: str) -> bool:
    """Whether a secret of ``raw``'s query string (``?password=...``) is followed by an item
    that is no ``key=value`` of a libpq parameter: an unencoded ``&`` in the secret, whose
    tail would be read as a parameter of its own (and named in a refusal, or dropped)."""
    items = raw.partition("?")[2].split("&")
    for prev, item in zip(items, items[1:]):
        key, eq, _ = item.partition("=")
        # (prepare_threshold: refused by _check_query with its own advice.)
        if prev.partition("=")[0].lower() in SECRET_QUERY_KEYS and not (
                eq and (key in _libpq_keywords() or key == "prepare_threshold")):
            return True
    return False


def mask_url(url: URL | str) -> str:
    """Render a database URL with its password replaced by ``***``."""
    try:
        u = url if isinstance(url, URL) else make_url(url)
        if (u.host and "@" in u.host) or (isinstance(url, str) and _unencoded_at(url)):
            # An unencoded "@" in the password: what looks like the host or database holds part of it.
            return "<URL with an unencoded '@' in its user or password>"
        if isinstance(url, str) and _unencoded_amp(url):
            return "<URL with an unencoded '&' in a password of its query string>"
        if any(k.lower() in SECRET_QUERY_KEYS for k in u.query):
            # libpq also takes the password as a query parameter.  (Shown as *** as in the
            # user info, not percent-encoded.)
            mark = "shardkitmasked" + uuid.uuid4().hex
            u = u.update_query_dict({k: mark for k in u.query if k.lower() in SECRET_QUERY_KEYS})
            return u.render_as_string(hide_password=True).replace(mark, "***")
        return u.render_as_string(hide_password=True)
    except Exception:
        # Unparseable: never echo it raw, it may hold a password.
        return "<unparseable URL>"


@dataclass(frozen=True)
class ShardConfig:
    """One shard: its primary and replica URLs and (optionally) the buckets it owns."""

    name: str
    primary: URL
    replicas: tuple[URL, ...] = ()
    buckets: tuple[int, ...] | None = None
    replica_weights: tuple[float, ...] = ()
    pool: Mapping[str, Any] = field(default_factory=dict)          # overrides for every node
    primary_pool: Mapping[str, Any] = field(default_factory=dict)  # overrides for the primary
    replica_pools: tuple[Mapping[str, Any], ...] = ()              # per replica

    def node_pool(self, defaults: Mapping[str, Any], role: str, index: int = 0) -> dict[str, Any]:
        """Pool settings for one node: global defaults < shard < node."""
        out = dict(defaults)
        out.update(self.pool)
        if role == "primary":
            out.update(self.primary_pool)
        elif index < len(self.replica_pools):
            out.update(self.replica_pools[index])
        return out

    def __repr__(self) -> str:
        return (
            f"ShardConfig(name={self.name!r}, primary={mask_url(self.primary)!r}, "
            f"replicas={[mask_url(r) for r in self.replicas]!r})"
        )


@dataclass(frozen=True)
class GroupConfig:
    """A table group: colocated tables sharded by the same key with one strategy.

    ``tables`` maps each table name to its shard-key column names (one or more,
    in key order).
    """

    name: str
    strategy: Strategy
    tables: Mapping[str, tuple[str, ...]]


CONSISTENCY_MODES = ("eventual", "read_your_writes", "strong")
POLICIES = ("round_robin", "random", "least_outstanding", "lowest_latency")


@dataclass(frozen=True)
class ReplicaSettings:
    """How reads use replicas (the ``[replicas]`` table)."""

    consistency: str = "read_your_writes"
    max_lag_seconds: float = 5.0
    max_lag_bytes: int = 16 * 1024 * 1024
    policy: str = "round_robin"
    poll_interval: float = 0.2
    poll_timeout: float = 0.5
    ban_seconds: float = 5.0
    when_no_replica: str = "primary"
    wait_for_token: float = 0.0


POOL_KEYS = ("size", "max_overflow", "timeout", "recycle", "pre_ping", "max_connections",
             "prepared_statements")


def parse_pool(raw: Any, path: str) -> dict[str, Any]:
    """Validate a pool table (``[pool]``, ``shards[i].pool``, a node's ``pool``)."""
    if not isinstance(raw, Mapping):
        raise ConfigurationError(path, "must be a table", "e.g. pool = { size = 10 }")
    _check_keys(raw, set(POOL_KEYS), path)
    out: dict[str, Any] = {}
    for key, val in raw.items():
        p = f"{path}.{key}"
        if key in ("pre_ping", "prepared_statements"):
            if not isinstance(val, bool):
                if isinstance(val, str):
                    raise ConfigurationError(p, f"{val!r} is a string, not true or false", _QUOTED)
                raise ConfigurationError(p, f"{val!r} must be true or false")
            out[key] = val
        elif key in ("size", "max_connections"):
            out[key] = _number(val, p, minimum=1, integer=True)
        elif key == "max_overflow":
            out[key] = _number(val, p, minimum=-1, integer=True)
        elif key == "recycle":
            # SQLAlchemy's pool_recycle: -1 (its default) never recycles, 0 at every checkout.
            out[key] = _number(val, p, minimum=-1)
        else:  # timeout: SQLAlchemy's queue waits that long for a connection
            out[key] = _number(val, p, minimum=0, maximum=_LONGEST_WAIT,
                               why="longer than a wait for a connection can take (a checkout of an "
                                   "exhausted pool would raise OverflowError)")
    return out


# The fix for a number or boolean given as a string.
_QUOTED = ("write it without quotes; a value in quotes is a string, also one a ${VAR} makes: "
           "the environment fills in strings only, such as URLs and passwords")


# The longest wait a lock, an event or a queue takes (a longer one raises OverflowError).
_LONGEST_WAIT: Final = threading.TIMEOUT_MAX
# The longest poll_timeout: a poll's connection gets tcp_user_timeout = 4 * poll_timeout in
# milliseconds, which libpq refuses past a C int (every poll would fail: every node down).
_LONGEST_POLL_TIMEOUT: Final = float((2 ** 31 - 1) // 4000)


def _number(raw: Any, path: str, *, minimum: float, integer: bool = False,
            maximum: float | None = None, why: str = "") -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (integer and not isinstance(raw, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigurationError(path, f"{raw!r} must be {kind}", _QUOTED if isinstance(raw, str) else None)
    try:
        float(raw)
    except OverflowError:
        # TOML reads an integer of any size; not echoed (it may have hundreds of digits).
        raise ConfigurationError(path, "is too large a number", f"give a number >= {minimum} of at "
                                 "most a few digits more than the values you mean") from None
    if raw != raw:
        raise ConfigurationError(path, "nan is not a number", f"give a number >= {minimum}")
    if math.isinf(raw):
        # SQLAlchemy's pool and the replica monitor compute with it (int(inf * 1000)
        # raises OverflowError, a queue timeout of inf too).
        raise ConfigurationError(path, f"{raw!r} is not a finite number",
                                 f"give a finite number >= {minimum} (a large one, if you mean 'no limit')")
    if raw < minimum:
        raise ConfigurationError(path, f"{raw!r} must be >= {minimum}")
    if maximum is not None and raw > maximum:
        raise ConfigurationError(path, f"{raw!r} is more than {maximum:.0f} seconds, {why}",
                                 f"give at most {maximum:.0f}")
    return raw


def parse_replica_settings(raw: Mapping[str, Any], path: str) -> ReplicaSettings:
    """Validate a ``[replicas]`` table."""
    _check_keys(raw, set(ReplicaSettings.__dataclass_fields__), path)
    kw: dict[str, Any] = {}
    if "consistency" in raw:
        if raw["consistency"] not in CONSISTENCY_MODES:
            raise ConfigurationError(f"{path}.consistency", f"unknown mode {raw['consistency']!r}",
                                     "choose one of: " + ", ".join(CONSISTENCY_MODES))
        kw["consistency"] = raw["consistency"]
    if "policy" in raw:
        if raw["policy"] not in POLICIES:
            raise ConfigurationError(f"{path}.policy", f"unknown policy {raw['policy']!r}",
                                     "choose one of: " + ", ".join(POLICIES))
        kw["policy"] = raw["policy"]
    if "when_no_replica" in raw:
        if raw["when_no_replica"] not in ("primary", "raise"):
            raise ConfigurationError(f"{path}.when_no_replica", f"{raw['when_no_replica']!r}",
                                     "choose 'primary' (read from the primary) or 'raise'")
        kw["when_no_replica"] = raw["when_no_replica"]
    for name in ("max_lag_seconds", "ban_seconds", "wait_for_token"):
        if name in raw:
            kw[name] = float(_number(raw[name], f"{path}.{name}", minimum=0))
    if "max_lag_bytes" in raw:
        kw["max_lag_bytes"] = _number(raw["max_lag_bytes"], f"{path}.max_lag_bytes", minimum=0,
                                      integer=True)
    for name, lo, hi, why in (
            ("poll_interval", 0.01, _LONGEST_WAIT, "longer than the monitor's wait between polls can take"),
            ("poll_timeout", 0.05, _LONGEST_POLL_TIMEOUT,
             "past what libpq takes as a poll connection's tcp_user_timeout (4 x poll_timeout, in "
             "milliseconds): every poll would fail, every node look down")):
        if name in raw:
            kw[name] = float(_number(raw[name], f"{path}.{name}", minimum=lo, maximum=hi, why=why))
    return ReplicaSettings(**kw)


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster description.  Immutable."""

    name: str
    bucket_count: int
    shards: tuple[ShardConfig, ...]
    bucket_map: tuple[str, ...]
    groups: tuple[GroupConfig, ...]
    reference_tables: frozenset[str]
    replicas: ReplicaSettings = field(default_factory=lambda: ReplicaSettings())
    pool: Mapping[str, Any] = field(default_factory=dict)
    #: The catalog database holding the live bucket map (``[catalog] url``), if any.
    catalog_url: URL | None = None
    #: The slices of range and list groups, when routing by a catalog's map.
    slices: tuple[Any, ...] = ()

    @property
    def shard_names(self) -> tuple[str, ...]:
        """The shards' names, in the config's order."""
        return tuple(s.name for s in self.shards)

    def shard(self, name: str) -> ShardConfig:
        """The shard called ``name`` (its ``primary`` and ``replicas`` URLs); ``KeyError`` if none is."""
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    def __repr__(self) -> str:
        # Not the dataclass repr: SQLAlchemy's URL repr hides a password in the user
        # info but not one in the query string (?password=...), so mask it as shards do.
        catalog = None if self.catalog_url is None else mask_url(self.catalog_url)
        return (
            f"ClusterConfig(name={self.name!r}, bucket_count={self.bucket_count}, "
            f"shards={list(self.shards)!r}, groups={[g.name for g in self.groups]!r}, "
            f"reference_tables={sorted(self.reference_tables)!r}, catalog_url={catalog!r})"
        )


# How deep a cluster description nests (groups.g.ranges[i].to[j] is 5 levels), and how deep
# ${A:-${B:-...}} defaults nest: far past any real one, short of Python's recursion limit.
_MAX_DEPTH: Final = 32


def _interpolate(value: Any, path: str, env: Mapping[str, str], depth: int = 0) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value; ``$$`` is a literal ``$``.

    As in a shell or Docker Compose, ``${VAR:-default}`` gives the default when
    ``VAR`` is unset or empty, ``${VAR}`` gives an empty ``VAR`` as is, and a default
    may itself hold references (``${PW:-${OTHER}}``), expanded only when used.  A
    substituted value is not expanded again.  Table keys (names) are not substituted.

    In a database URL (a node's or the catalog's), a ``${VAR}`` whose
    ``VAR`` is set but empty is an error naming it: the URL would lose its password (libpq
    then uses another one, or fails at the first query), host or database name."""
    if depth > _MAX_DEPTH and isinstance(value, (Mapping, list)):
        raise ConfigurationError(path, f"nests tables or lists more than {_MAX_DEPTH} levels deep",
                                 "a cluster description nests a few levels only (see the README's "
                                 "Configuration reference): check the brackets")
    if isinstance(value, int) and value.bit_length() > 1000:
        try:
            str(value)
        except ValueError:
            # Python will not print it (sys.get_int_max_str_digits()): no message could show it.
            raise ConfigurationError(path, "is an integer of thousands of digits",
                                     "give a number of at most a few digits more than the values "
                                     "you mean") from None
    if isinstance(value, str):
        empty: list[str] = []
        out = _expand(value, 0, path, env, nested=False, use=True, empty=empty)[0]
        if empty and _URL_FIELD.fullmatch(path):
            raise ConfigurationError(
                path, f"environment variable {empty[0]} is set but empty",
                f"export {empty[0]}=... with its value, or write ${{{empty[0]}:-}} if empty is meant")
        return out
    if isinstance(value, Mapping):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, depth + 1) for i, v in enumerate(value)]
    return value


def _bad_reference(path: str) -> ConfigurationError:
    # The text is not quoted: the string may be a password.
    return ConfigurationError(
        path, "has a '${' that is not a ${NAME} or ${NAME:-default} reference",
        "close the reference with '}', or write '$${' for a literal '${'")


def _expand(text: str, i: int, path: str, env: Mapping[str, str], *, nested: bool,
            use: bool, empty: list[str], depth: int = 0) -> tuple[str, int]:
    """Expand ``text`` from ``i`` to its end, or (``nested``: a default) to the ``}`` that
    closes it; returns the expansion and the index after it.  ``use``: the result is
    used (a default that is not is parsed, but an unset variable in it is no error).
    ``empty`` gets the names of the used ``${VAR}`` references (no default) that were empty."""
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "$" and text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if c == "$" and text.startswith("${", i):
            m = _ENV_NAME_RE.match(text, i + 2)
            if m is None:
                raise _bad_reference(path)
            var, j = m.group(0), m.end()
            if text.startswith("}", j):
                i = j + 1
                if use and var not in env:
                    raise ConfigurationError(
                        path,
                        f"environment variable {var} is not set",
                        f"export {var}=... or write ${{{var}:-default}}",
                    )
                if use and env.get(var) == "":
                    empty.append(var)
                out.append(env.get(var, ""))
            elif text.startswith(":-", j):
                unset = not env.get(var)
                if depth >= _MAX_DEPTH:
                    raise ConfigurationError(
                        path, f"nests ${{NAME:-default}} references more than {_MAX_DEPTH} deep",
                        "give a default of a few references at most, e.g. ${DB_PASSWORD:-${PGPASSWORD}}")
                default, i = _expand(text, j + 2, path, env, nested=True, use=use and unset, empty=empty,
                                     depth=depth + 1)
                out.append(default if unset else env[var])
            else:
                raise _bad_reference(path)
            continue
        if nested and c == "}":
            return "".join(out), i + 1
        out.append(c)
        i += 1
    if nested:
        raise _bad_reference(path)
    return "".join(out), i


def _check_keys(obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
    # (A dict's keys may be of any type: sorted by their text, named as text.)
    unknown = sorted(set(obj) - allowed, key=lambda k: (not isinstance(k, str), str(k)))
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) else repr(unknown[0])
        hint = "known settings here: " + ", ".join(sorted(allowed))
        if path and key in _TOP_LEVEL_KEYS:
            # TOML puts every key written after a [header] in that header's table.
            hint = (f"{key} is a top-level setting: write it before the first [header] or "
                    f"[[header]] of the file (after one, TOML puts it in that table); {hint}")
        raise ConfigurationError(f"{path}.{key}" if path else key, "unknown setting", hint)


def _parse_url(raw: Any, path: str) -> URL:
    if not isinstance(raw, str) or not raw:
        raise ConfigurationError(path, "must be a database URL string",
                                 "e.g. postgresql+psycopg://user@host:5432/db")
    if _CONTROL.search(raw) or raw != raw.strip():
        # Kept, it would be part of the password, the host or the database name: the node
        # would only look down.  Not shown: the URL may hold a password.
        raise ConfigurationError(
            path, "the URL holds a control character (a newline, a tab) or starts or ends with a "
            "blank: often the newline that ends a secret file read into a ${VAR}",
            "remove it (strip the variable's value); percent-encode one a password holds "
            "(newline as %0A, space as %20)")
    if _unencoded_at(raw):
        # Checked first: every message below shows the URL, whose host or database name
        # would be the password's tail.
        raise ConfigurationError(
            path, "the URL's user name or password contains an unencoded '@'",
            "percent-encode it (@ as %40, : as %3A, / as %2F), also in ${VAR} values")
    if _unencoded_amp(raw):
        # Before the query string is checked: its tail would be named as an unknown parameter.
        # The item is not named: it may be the password's tail.
        raise ConfigurationError(
            path, "a password in the URL's query string (?password=...) is followed by an item that "
            "is no libpq connection parameter: an unencoded '&' in the password, or a misspelt "
            "parameter name after it",
            "percent-encode a '&' in the password (& as %26, + as %2B, % as %25), also in ${VAR} "
            "values, and spell the parameters as libpq does (sslmode, connect_timeout, application_name)")
    try:
        url = make_url(raw)
        url.port  # noqa: B018 - a port that is not a number raises here
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            path, f"{mask_url(raw)} is not a valid database URL",
            "e.g. postgresql+psycopg://user@host:5432/db",
        ) from None
    database = url.database if _DATABASE_DECODED or url.database is None else unquote(url.database)
    if any("\x00" in str(v) for v in (url.username, url.password, url.host, database,
                                       *(x for v in url.query.values()
                                         for x in (v if isinstance(v, tuple) else (v,))))):
        # libpq reads the connection string up to it: the parameters after it (the port,
        # sslmode ...) would be dropped, and the password's start sent elsewhere.
        raise ConfigurationError(
            path, "the URL holds a percent-encoded NUL (%00), which libpq cannot take: it ends "
            "the connection string there, dropping the settings after it (port, sslmode)",
            "remove the %00 (a password or name cannot hold a NUL character)")
    if url.get_backend_name() == "postgres":
        # libpq and hosting providers write postgres://; SQLAlchemy knows only postgresql.
        raise ConfigurationError(
            path, f"{mask_url(url)}: SQLAlchemy does not read the scheme postgres://",
            "write postgresql+psycopg:// (or postgresql://) instead, also in a ${VAR} value")
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            path, f"{mask_url(url)} is not a PostgreSQL URL",
            "shardkit shards PostgreSQL only; use postgresql+psycopg://...",
        )
    driver = url.get_driver_name()
    if url.drivername == "postgresql":
        # A bare postgresql:// would pick psycopg2; shardkit is built on psycopg 3.
        url = url.set(drivername="postgresql+psycopg")
    elif driver != "psycopg":
        raise ConfigurationError(
            path, f"driver {driver!r} is not supported",
            "use postgresql+psycopg:// (psycopg 3)",
        )
    if not url.host and "host" not in url.query and "hostaddr" not in url.query:
        # libpq's (and SQLAlchemy's) ?host=/socket/dir and ?host=h1:p1&host=h2:p2 name it too.
        raise ConfigurationError(path, f"{mask_url(url)} has no host",
                                 "add host[:port], or ?host=/socket/directory for a Unix socket")
    if not url.database:
        raise ConfigurationError(path, f"{mask_url(url)} has no database name", "add /dbname")
    _check_query(url, path)
    try:
        # The multi-host forms (?host=h1:p1&host=h2:p2, ?host=h1,h2&port=p1,p2) as the driver will read them.
        _, params = url.get_dialect()().create_connect_args(url)
    except (ArgumentError, ValueError) as e:
        raise ConfigurationError(path, f"{mask_url(url)}: {e}",
                                 "give the hosts one way: ?host=h1:p1&host=h2:p2, or ?host=h1,h2&port=p1,p2") from None
    ports = [str(url.port)] if url.port is not None else []
    for port in ports + [p.strip() for p in str(params.get("port") or "").split(",")]:
        # libpq refuses every connection then ("invalid port number"): the node would look down.
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigurationError(path, f"{mask_url(url)}: port {port} is not a TCP port",
                                     "give a port in 1..65535 (PostgreSQL's default is 5432)")
    if "password" in url.query:
        # libpq's ?password= is the URL's password (the driver gets the same value): held
        # there, SQLAlchemy hides it wherever the URL or an engine on it is shown.
        if url.password is not None:
            raise ConfigurationError(
                path, f"{mask_url(url)} gives a password twice: before the host (user:password@) "
                "and as ?password=", "give it once")
        url = url.set(password=url.query["password"]).difference_update_query(["password"])
    _, secrets = split_secret_query(url)
    if url.password == "***" or "***" in secrets.values():
        # What str(url) of SQLAlchemy 2 (and shardkit's own output) shows for a password:
        # libpq would send those three characters, and the node only look down.
        raise ConfigurationError(
            path, f"{mask_url(url)}: the password is '***', which is how SQLAlchemy's str(url) "
            "and shardkit's output hide a password, not the password itself",
            "give the real one: url.render_as_string(hide_password=False) of a SQLAlchemy URL, "
            "or a ${VAR} holding it")
    return url


def split_secret_query(url: URL | str) -> tuple[URL, dict[str, Any]]:
    """``url`` without the secrets of its query string (``?sslpassword=``, ``?password=``),
    and those secrets as the driver's connect arguments: an engine's repr hides only the
    URL's own password."""
    url = url if isinstance(url, URL) else make_url(url)
    hidden = [k for k in url.query if k.lower() in SECRET_QUERY_KEYS]
    secrets = {k: v[-1] if isinstance(v, tuple) else v for k, v in url.query.items() if k in hidden}
    return (url.difference_update_query(hidden) if hidden else url), secrets


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    """The connection parameters the installed libpq accepts (what ``connect()`` will)."""
    from psycopg.pq import Conninfo

    return frozenset(o.keyword.decode() for o in Conninfo.get_defaults())


def _check_query(url: URL, path: str) -> None:
    """Refuse a query string that every connection would fail on, naming the parameter.

    SQLAlchemy hands the query string to psycopg as connection parameters, so an
    unknown name or a timeout that is not a number would otherwise surface only at the
    first query, as a node that looks down.  Values are never echoed: ``sslpassword``
    and the like are secrets.
    """
    if not url.query:
        return
    known = _libpq_keywords()
    for key, value in url.query.items():
        if isinstance(value, tuple) and key != "host" and key in known:
            # (?host=h1:p1&host=h2:p2 is SQLAlchemy's form for several hosts.)  The driver
            # would get the values as one tuple, which libpq refuses (the node would look
            # down), or, for a password, take one of them silently.
            raise ConfigurationError(
                path, f"{key} is given {len(value)} times in the URL's query string",
                f"give {key} once" + ("; several hosts' ports as ?host=h1,h2&port=p1,p2" if key == "port" else ""))
        if key == "prepare_threshold":
            raise ConfigurationError(
                path, "prepare_threshold cannot be set in the URL (psycopg receives it as a "
                "string and every query then fails)",
                "set [pool] prepared_statements = false to turn prepared statements off, or "
                "pass connect_args={'prepare_threshold': N} in engine_options")
        if key not in known:
            raise ConfigurationError(
                path, f"{key!r} in the URL's query string is not a libpq connection parameter",
                "use the names of the libpq documentation (Parameter Key Words), e.g. "
                "sslmode, connect_timeout, application_name; driver and pool settings go in [pool]")
        if key == "connect_timeout":
            values = value if isinstance(value, tuple) else (value,)
            if not all(re.fullmatch(r"\s*\d+\s*", v) for v in values):
                raise ConfigurationError(
                    path, "connect_timeout in the URL's query string is not a whole number of seconds",
                    "e.g. ?connect_timeout=5")


def _parse_bucket_spec(raw: Any, path: str, bucket_count: int) -> tuple[int, ...]:
    """``["0-511", 700, "800-801"]`` -> sorted bucket numbers."""
    if not isinstance(raw, list):
        raise ConfigurationError(path, "must be a list of bucket numbers or 'lo-hi' ranges",
                                 'e.g. buckets = ["0-511"]')
    out: list[int] = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if isinstance(item, bool):
            raise ConfigurationError(p, "must be an integer or 'lo-hi'")
        if isinstance(item, int):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*(-\s*\d+\s*)?", item):
            parts = [int(x) for x in item.split("-")]
            lo, hi = parts[0], parts[-1]
        else:
            raise ConfigurationError(p, f"{item!r} is not a bucket number or 'lo-hi' range")
        if lo > hi:
            raise ConfigurationError(p, f"range {item!r} is reversed", f"write '{hi}-{lo}'")
        if lo < 0 or hi >= bucket_count:
            raise ConfigurationError(
                p, f"{item!r} is outside 0..{bucket_count - 1}",
                f"bucket_count is {bucket_count}",
            )
        out.extend(range(lo, hi + 1))
    return tuple(out)


def _even_bucket_map(shards: list[str], bucket_count: int) -> tuple[str, ...]:
    # Contiguous equal slices: bucket b belongs to shard floor(b * n / count).
    n = len(shards)
    return tuple(shards[b * n // bucket_count] for b in range(bucket_count))


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 shard``, ``3 shards``: a count and its noun, agreeing."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _compress(buckets: list[int]) -> str:
    spans: list[str] = []
    start = prev = None
    for b in sorted(buckets):
        if start is None:
            start = prev = b
        elif b == prev + 1:
            prev = b
        else:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = b
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(spans)


def _load_callable(spec: Any, path: str) -> Callable[[Any], str]:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigurationError(path, f"{spec!r} is not a callable or 'module:function' string",
                                 "e.g. function = 'myapp.sharding:shard_for'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigurationError(path, f"cannot import {spec!r}: {e}",
                                 "check the module is importable and the name exists") from None
    except Exception as e:  # noqa: BLE001 - the module's own code failed (a SyntaxError in it, ...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigurationError(path, f"importing {mod_name!r} failed: {type(e).__name__}: {first}",
                                 "fix the module (this error's cause has its traceback)") from e
    if not callable(obj):
        raise ConfigurationError(path, f"{spec!r} is not callable")
    return obj


def _check_qualified_name(table: str, path: str) -> None:
    """``schema.table`` (split at the last ``.``) must name both parts."""
    schema, dot, name = table.rpartition(".")
    if dot and not (schema and name):
        raise ConfigurationError(
            path, f"table {table!r} has an empty {'schema' if not schema else 'table'} name",
            'a table of another schema is "schema.table" (e.g. "archive.users"); '
            "one of the default schema is its name alone")


def _parse_group(name: str, raw: Any, shard_names: list[str],
                 bucket_map: tuple[str, ...]) -> GroupConfig:
    path = f"groups.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigurationError(path, "must be a table", "e.g. [groups.users] strategy = 'hash'")
    _check_keys(raw, _GROUP_KEYS, path)
    strategy_name = raw.get("strategy", "hash")
    if strategy_name not in _STRATEGIES:
        raise ConfigurationError(f"{path}.strategy", f"unknown strategy {strategy_name!r}",
                                 "choose one of: " + ", ".join(_STRATEGIES))
    tables_raw = raw.get("tables")
    if not isinstance(tables_raw, Mapping) or not tables_raw:
        raise ConfigurationError(
            f"{path}.tables", "must map each table to its shard-key column(s)",
            'e.g. tables = { users = "id", orders = "user_id" }',
        )
    tables: dict[str, tuple[str, ...]] = {}
    arity = None
    for tname, cols in tables_raw.items():
        tp = f"{path}.tables.{tname}"
        if not isinstance(tname, str) or not tname.strip():
            raise ConfigurationError(f"{path}.tables", f"has a table with no name ({tname!r})",
                                     'name each table, e.g. tables = { users = "id" }')
        _check_qualified_name(tname, f"{path}.tables")
        if isinstance(cols, str):
            cols = [cols]
        if isinstance(cols, Mapping):
            raise ConfigurationError(
                tp, "must be a column name or a list of column names, not a table",
                f'a table of another schema is named in quotes: "{tname}.<table>" = "<column>" '
                "(unquoted, TOML reads the dotted name as nested tables)")
        if (not isinstance(cols, list) or not cols
                or not all(isinstance(c, str) and c for c in cols)):
            raise ConfigurationError(tp, "must be a column name or a list of column names")
        if len(set(cols)) != len(cols):
            raise ConfigurationError(tp, f"column repeated in {cols}")
        if arity is not None and len(cols) != arity:
            raise ConfigurationError(
                tp, f"has {len(cols)} key column(s) but other tables in the group have {arity}",
                "colocated tables share one key: give each the same number of columns",
            )
        arity = len(cols)
        tables[str(tname)] = tuple(cols)

    known = set(shard_names)

    def check_shard(value: Any, p: str) -> str:
        if not isinstance(value, str):
            raise ConfigurationError(p, f"{value!r} is not a shard name",
                                     'name one shard, e.g. shard = "s0" (known shards: '
                                     + ", ".join(shard_names) + ")")
        if value not in known:
            raise ConfigurationError(p, f"unknown shard {value!r}",
                                     "known shards: " + ", ".join(shard_names))
        return value

    strategy: Strategy
    extra = {"ranges", "values", "default", "function"} & set(raw)
    allowed_extra = {"hash": set(), "range": {"ranges"}, "list": {"values", "default"},
                     "custom": {"function"}}[strategy_name]
    if extra - allowed_extra:
        bad = sorted(extra - allowed_extra)[0]
        raise ConfigurationError(f"{path}.{bad}", f"does not apply to strategy {strategy_name!r}")

    if strategy_name == "hash":
        strategy = HashStrategy(bucket_map)
    elif strategy_name == "range":
        ranges_raw = raw.get("ranges")
        if not isinstance(ranges_raw, list) or not ranges_raw:
            raise ConfigurationError(
                f"{path}.ranges", "a range group needs a list of ranges",
                'e.g. ranges = [{ to = 1000, shard = "s0" }, { from = 1000, shard = "s1" }]',
            )
        ranges: list[KeyRange] = []
        for i, r in enumerate(ranges_raw):
            rp = f"{path}.ranges[{i}]"
            if not isinstance(r, Mapping):
                raise ConfigurationError(rp, "must be a table with from/to/shard")
            _check_keys(r, {"from", "to", "shard"}, rp)
            lo = _range_bound(r.get("from"), f"{rp}.from", arity)
            hi = _range_bound(r.get("to"), f"{rp}.to", arity)
            shard = check_shard(r.get("shard"), f"{rp}.shard")
            if lo is not None and hi is not None:
                try:
                    if not lo < hi:
                        raise ConfigurationError(rp, f"from ({lo!r}) must be less than to ({hi!r})")
                except TypeError:
                    raise ConfigurationError(rp, f"from {lo!r} and to {hi!r} are not comparable") from None
            ranges.append(KeyRange(lo, hi, shard))
        _check_bound_kinds(ranges, f"{path}.ranges")
        try:
            ordered = sorted(enumerate(ranges), key=lambda t: (t[1].lower is not None, t[1].lower))
        except TypeError:
            kinds = sorted({type(x).__name__ for r in ranges for x in (r.lower, r.upper) if x is not None})
            raise ConfigurationError(f"{path}.ranges", f"bounds mix types ({', '.join(kinds)}) that "
                                     "cannot be compared", "make every from/to the key column's type") from None
        for (ia, a), (ib, b) in zip(ordered, ordered[1:]):
            try:
                overlap = a.upper is None or b.lower is None or a.upper > b.lower
            except TypeError:  # _check_bound_kinds lets none through; never a bare TypeError
                raise ConfigurationError(
                    f"{path}.ranges[{ib}]", f"its bounds cannot be compared with ranges[{ia}]'s ({a} and {b})",
                    "make every from/to the key column's type") from None
            if overlap:
                raise ConfigurationError(
                    f"{path}.ranges[{ib}]", f"overlaps ranges[{ia}] ({a} and {b})",
                    "ranges are half-open [from, to): make each start at or after the previous `to`",
                )
        strategy = RangeStrategy(ranges)
    elif strategy_name == "list":
        values_raw = raw.get("values")
        if not isinstance(values_raw, Mapping) or not values_raw:
            raise ConfigurationError(
                f"{path}.values", "a list group needs a shard -> values table",
                'e.g. values = { s0 = ["eu", "uk"], s1 = ["us", "ca"] }',
            )
        mapping: dict[Any, str] = {}
        kinds: dict[int, tuple[str, Any]] = {}  # key part -> (kind, first value of it)
        for shard, vals in values_raw.items():
            vp = f"{path}.values.{shard}"
            check_shard(shard, vp)
            if not isinstance(vals, list):
                raise ConfigurationError(vp, "must be a list of key values")
            for v in vals:
                v = _list_value(v, vp, arity)
                for part, x in enumerate(v if arity > 1 else (v,)):
                    kind = _bound_kind(x)
                    if kind is None:
                        continue
                    seen = kinds.setdefault(part, (kind, x))
                    if seen[0] != kind:
                        # A column holds one type: the values of the other could never be a key.
                        raise ConfigurationError(
                            vp, f"value {x!r} is a {kind} but {seen[1]!r} is a {seen[0]}",
                            "give every value the key column's type (TOML: dates and date-times, "
                            "local and with an offset, are different types)")
                if v in mapping:
                    raise ConfigurationError(
                        vp, f"value {v!r} is already mapped to shard {mapping[v]!r}",
                        "each value lives on exactly one shard",
                    )
                mapping[v] = shard
        default = raw.get("default")
        if default is not None:
            check_shard(default, f"{path}.default")
        elif not mapping:
            # Every key would be NoShardForKey: no row of the group could be written.
            raise ConfigurationError(
                f"{path}.values", "lists no value and the group has no default, so no key has a shard",
                'list the values each shard holds, e.g. values = { s0 = ["eu", "uk"] }, or set '
                'default = "s0" for every value')
        strategy = ListStrategy(mapping, default)
    else:
        fn = _load_callable(raw.get("function"), f"{path}.function")
        spec = raw.get("function")  # (a callable's own name, not its repr with an address)
        strategy = CustomStrategy(fn, frozenset(shard_names), name=spec if isinstance(spec, str) else "")
    return GroupConfig(name=name, strategy=strategy, tables=tables)


def _bound_kind(v: Any) -> str | None:
    """What a range bound (or one part of a composite one) is, for telling bounds that
    cannot be compared apart; ``None``: it cannot be a bound."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int) or (isinstance(v, Decimal) and not v.is_nan()) or (isinstance(v, float) and v == v):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, datetime.datetime):
        return "local date-time" if v.utcoffset() is None else "date-time with an offset"
    if isinstance(v, datetime.date):
        return "date"
    if isinstance(v, datetime.time):
        return "local time" if v.utcoffset() is None else "time with an offset"
    if isinstance(v, (bytes, uuid.UUID)):
        return type(v).__name__
    return None


def _range_bound(raw: Any, p: str, arity: int) -> Any:
    """A range bound as the router compares keys: a scalar, or for a composite key a tuple
    (TOML has only arrays, which Python does not compare with tuples)."""
    if raw is None:
        return None
    if arity > 1:
        if not isinstance(raw, (list, tuple)) or len(raw) != arity:
            raise ConfigurationError(p, f"{raw!r} is not a list of {arity} values",
                                     f"the group's key has {arity} columns: give each bound as one value "
                                     "per column, e.g. [5, 0]")
        parts = tuple(raw)
    else:
        parts = (raw,)
    for v in parts:
        if _bound_kind(v) is None:
            raise ConfigurationError(p, f"{v!r} ({type(v).__name__}) cannot be a range bound",
                                     "use integers, strings, dates or date-times, of the key column's type")
    return parts if arity > 1 else raw


def _check_bound_kinds(ranges: list[KeyRange], path: str) -> None:
    """Every bound (every part of one) of a range group is of one kind: ranges compare them."""
    first: dict[int, tuple[str, str]] = {}   # key part -> (kind, where)
    for i, r in enumerate(ranges):
        for end, v in (("from", r.lower), ("to", r.upper)):
            if v is None:
                continue
            for part, x in enumerate(v if isinstance(v, tuple) else (v,)):
                kind = _bound_kind(x)
                where = f"ranges[{i}].{end}"
                seen = first.setdefault(part, (kind or "", where))
                if seen[0] != kind:
                    raise ConfigurationError(
                        f"{path}[{i}].{end}",
                        f"is a {kind} ({x!r}) but {seen[1]} is a {seen[0]}: they cannot be compared",
                        "give every from/to the key column's type (TOML: dates and date-times, "
                        "local and with an offset, are different types)")


def _list_value(v: Any, vp: str, arity: int) -> Any:
    """A list group's value as keys are looked up: hashable; a tuple for a composite key."""
    if arity > 1:
        if not isinstance(v, (list, tuple)) or len(v) != arity:
            raise ConfigurationError(vp, f"value {v!r} is not a list of {arity} values",
                                     f"the group's key has {arity} columns: give each value as e.g. "
                                     '["eu", 1]')
        parts = tuple(v)
    else:
        if isinstance(v, (list, tuple, dict)):
            raise ConfigurationError(vp, f"value {v!r} is not a scalar")
        parts = (v,)
    for x in parts:
        if x is None:
            raise ConfigurationError(vp, "None is not a value: a NULL key has no shard",
                                     "list the key values rows hold")
        if (isinstance(x, float) and x != x) or (isinstance(x, Decimal) and x.is_nan()):
            # No key equals it (a NaN key is refused): listed, it only looks like a value.
            raise ConfigurationError(vp, "nan is not a value: no key equals it (a NaN key is refused)",
                                     "list the key values rows hold")
        try:
            hash(x)
        except TypeError:
            raise ConfigurationError(vp, f"value {x!r} ({type(x).__name__}) cannot be looked up "
                                     "(it is not hashable)", "give strings, integers or other scalars") from None
        if isinstance(x, (list, tuple, dict)):
            raise ConfigurationError(vp, f"value {v!r} is not a scalar")
    return parts if arity > 1 else v


def _is_conninfo(text: str) -> bool:
    """Whether ``text`` reads as a libpq keyword/value connection string naming a libpq
    parameter (``host=db0 dbname=shop password=...``)."""
    if "=" not in text:
        return False
    if re.search(r"(?i)(?:^|\s)\w*password\s*=", text):
        return True   # (also beside a misspelt keyword, which libpq would refuse)
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        return bool(set(conninfo_to_dict(text)) & _libpq_keywords())
    except Error:  # (libpq refuses a string with one unknown keyword: not a conninfo)
        return False


def load_config(source: str | os.PathLike[str] | Mapping[str, Any],
                env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read and validate a cluster description from a TOML file path or a dict."""
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        origin = "<dict>"
    else:
        if not isinstance(source, (str, os.PathLike)) or "\x00" in str(source):
            # (Cluster.from_config(os.environ.get("SHARDKIT_CONFIG")) with the variable unset.)
            raise ConfigurationError(
                "config", "a NUL character is in the config file's path" if isinstance(source, str) else
                f"the cluster description is {'None' if source is None else 'of type ' + type(source).__name__}, "
                "not the path of a TOML file or a dict",
                "pass the path of a TOML file (shardkit.toml), as a str or pathlib.Path, or the "
                "same structure as a dict")
        p = Path(source)
        try:
            is_file = p.is_file()
        except OSError:   # a name too long for a path: read_text() below says so
            is_file = False
        if not is_file and "\n" in str(source):
            # The file's text where its path goes (a path holds no newline): not echoed,
            # it may hold passwords.
            raise ConfigurationError(
                "config", "a text of several lines is given, not the path of a config file",
                "pass the path of the TOML file (--config shardkit.toml), or in Python its text "
                "parsed into a dict: Cluster.from_config(tomllib.loads(text))")
        if "://" in str(source) and not is_file:
            # A database URL where the file's path goes (--config "$DATABASE_URL"): not
            # echoed as a path (nor in an OSError's), its password would be shown.
            raise ConfigurationError(
                "config", f"{mask_url(str(source))} is a database URL, not the path of a "
                "config file", "pass --config PATH of a TOML file (shardkit.toml), and put the "
                "URL in it: a shard's primary, or [catalog] url")
        if not is_file and _is_conninfo(str(source)):
            # libpq's other spelling of $DATABASE_URL (host=db0 password=...): not echoed either.
            raise ConfigurationError(
                "config", "a libpq connection string (key=value ...) is given, not the path of a "
                "config file", "pass --config PATH of a TOML file (shardkit.toml), and put the "
                "database in it as a URL: a shard's primary, or [catalog] url")
        try:
            # utf-8-sig: editors on Windows start a UTF-8 file with a byte order mark.
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            where = "" if p.is_absolute() else (
                f"; a relative path is read from the current directory, so this was {p.absolute()}")
            raise ConfigurationError(str(p), f"config file not found{where}",
                                     "pass the file's path (--config PATH on the command line), "
                                     "or create it") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(str(p), f"cannot read the config file ({type(e).__name__}: "
                                     f"{getattr(e, 'strerror', None) or e})",
                                     "pass --config PATH of a UTF-8 TOML file") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(str(p), f"invalid TOML: {e}") from None
        except ValueError:
            # tomllib's int() of an integer past sys.get_int_max_str_digits() (4300 digits).
            raise ConfigurationError(str(p), "invalid TOML: an integer of thousands of digits, more "
                                     "than Python reads", "give a number of at most a few digits "
                                     "more than the values you mean") from None
        except RecursionError:
            raise ConfigurationError(str(p), "invalid TOML: arrays or inline tables nested hundreds "
                                     "of levels deep", "a cluster description nests a few levels only: "
                                     "check the brackets") from None
        origin = str(p)
    raw = _interpolate(raw, "", os.environ if env is None else env)
    try:
        return _parse_config(raw, origin)
    except ConfigurationError as e:
        _hide_secrets(e, raw)
        raise


def _hide_secrets(error: ConfigurationError, raw: Any) -> None:
    """Mask in ``error`` every string of ``raw`` (the interpolated description, values and
    keys) that may hold a password, and those passwords: a message shows the value it
    refuses, which may be a URL put in another setting (``bucket_count = "${DATABASE_URL}"``)."""
    shown: dict[str, str] = {}
    secrets: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(k)
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str):
            if "://" in value:
                shown[value] = mask_url(value)
                try:
                    url = make_url(value)
                    secrets.update(str(v) for v in (url.password, *split_secret_query(url)[1].values()) if v)
                except Exception:  # noqa: BLE001 - unparseable: masked as a whole above
                    pass
            elif re.search(r"(?i)password\s*=", value):
                shown[value] = "<a connection string with a password>"

    visit(raw)
    if not shown:
        return

    def scrub(text: str | None) -> str | None:
        if not text:
            return text
        for value in sorted(shown, key=len, reverse=True):
            text = text.replace(value, shown[value]).replace(repr(value)[1:-1], shown[value])
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= 4:   # (masking a shorter one everywhere would show where it is)
                text = text.replace(secret, "***")
        return text

    parts = (error.field, error.problem, error.hint)
    clean = tuple(scrub(t) for t in parts)
    if clean != parts:
        ConfigurationError.__init__(error, *clean)  # type: ignore[arg-type]


def _parse_config(raw: Any, origin: str) -> ClusterConfig:
    """Validate an interpolated cluster description (``origin``: its file, or ``<dict>``)."""
    _check_keys(raw, _TOP_LEVEL_KEYS, "")

    name = raw.get("name", "shardkit")
    if not isinstance(name, str):
        raise ConfigurationError("name", "must be a string")

    bucket_count = raw.get("bucket_count", DEFAULT_BUCKET_COUNT)
    if isinstance(bucket_count, bool) or not isinstance(bucket_count, int) or not (
        1 <= bucket_count <= MAX_BUCKET_COUNT
    ):
        raise ConfigurationError("bucket_count", f"{bucket_count!r} must be an integer in 1..{MAX_BUCKET_COUNT}",
                                 _QUOTED if isinstance(bucket_count, str) else
                                 "it is fixed for the life of the cluster; 1024 is a good default")

    shards_raw = raw.get("shards")
    if isinstance(shards_raw, Mapping) and shards_raw:
        # TOML's [shards] or [shards.s0] (single brackets) makes one table, not a list.
        raise ConfigurationError(
            "shards", "is a table, not a list of shards",
            "in TOML write [[shards]] (double brackets) above each shard's name and primary; "
            'in a dict, "shards": [{"name": "s0", "primary": "postgresql+psycopg://..."}]')
    if shards_raw is not None and shards_raw != [] and not isinstance(shards_raw, list):
        raise ConfigurationError(
            "shards", f"must be a list of shards, not a {type(shards_raw).__name__}",
            'e.g. "shards": [{"name": "s0", "primary": "postgresql+psycopg://..."}] '
            "([[shards]] tables in TOML)")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise ConfigurationError("shards", f"{origin} defines no shards",
                                 'add [[shards]] tables with name = "s0", primary = "postgresql+psycopg://..."')
    shards: list[ShardConfig] = []
    seen: dict[str, int] = {}
    for i, s in enumerate(shards_raw):
        sp = f"shards[{i}]"
        if not isinstance(s, Mapping):
            raise ConfigurationError(sp, "must be a table with name, primary, replicas")
        _check_keys(s, _SHARD_KEYS, sp)
        sname = s.get("name")
        if not isinstance(sname, str) or not _NAME_RE.fullmatch(sname):
            raise ConfigurationError(f"{sp}.name", f"{sname!r} is not a valid shard name",
                                     "use letters, digits, _ and -, starting with a letter or _, "
                                     "at most 63 characters")
        if sname in seen:
            raise ConfigurationError(f"{sp}.name", f"duplicate shard name {sname!r} (also shards[{seen[sname]}])",
                                     "every shard needs a unique name")
        seen[sname] = i
        primary = _parse_url(s.get("primary"), f"{sp}.primary")
        replicas_raw = s.get("replicas", [])
        if not isinstance(replicas_raw, list):
            raise ConfigurationError(f"{sp}.replicas", "must be a list of URLs")
        replica_urls = []
        weights = []
        replica_pools: list[dict[str, Any]] = []
        for j, r in enumerate(replicas_raw):
            rp = f"{sp}.replicas[{j}]"
            if isinstance(r, Mapping):
                _check_keys(r, {"url", "weight", "pool"}, rp)
                replica_pools.append(parse_pool(r.get("pool", {}), f"{rp}.pool"))
                w = _number(r.get("weight", 1), f"{rp}.weight", minimum=0)
                if w == 0:
                    raise ConfigurationError(f"{rp}.weight", "0 must be a positive number",
                                             "weights are relative: e.g. 1, 2, 10")
                replica_urls.append(_parse_url(r.get("url"), f"{rp}.url"))
                weights.append(float(w))
            else:
                replica_urls.append(_parse_url(r, rp))
                weights.append(1.0)
                replica_pools.append({})
        replicas = tuple(replica_urls)
        buckets = None
        if "buckets" in s:
            buckets = _parse_bucket_spec(s["buckets"], f"{sp}.buckets", bucket_count)
        shard_pool = parse_pool(s.get("pool", {}), f"{sp}.pool")
        primary_pool = parse_pool(s.get("primary_pool", {}), f"{sp}.primary_pool")
        shards.append(ShardConfig(sname, primary, replicas, buckets, tuple(weights),
                                  shard_pool, primary_pool, tuple(replica_pools)))

    shard_names = [s.name for s in shards]
    with_buckets = [s for s in shards if s.buckets is not None]
    if not with_buckets:
        if bucket_count < len(shards):
            # The even split would leave shards with no bucket: they would never get a row.
            raise ConfigurationError(
                "bucket_count", f"{bucket_count} buckets cannot be split over {len(shards)} shards "
                "(some would own none)",
                f"set bucket_count >= {len(shards)} (it is fixed for the life of the cluster; 1024 is a "
                "good default), or list each shard's buckets (an empty list for a shard that owns none)")
        bucket_map = _even_bucket_map(shard_names, bucket_count)
    else:
        if len(with_buckets) != len(shards):
            missing = [s.name for s in shards if s.buckets is None]
            raise ConfigurationError(
                f"shards[{shard_names.index(missing[0])}].buckets",
                "some shards list their buckets and this one does not",
                "list buckets for every shard, or for none (an even split)",
            )
        owner: list[str | None] = [None] * bucket_count
        for s in shards:
            for b in s.buckets or ():
                if owner[b] is not None:
                    raise ConfigurationError(
                        f"shards[{seen[s.name]}].buckets",
                        f"bucket {b} is listed twice" if owner[b] == s.name else
                        f"bucket {b} is also owned by shard {owner[b]!r}",
                        "list each bucket exactly once, on the shard that owns it",
                    )
                owner[b] = s.name
        missing_b = [b for b, o in enumerate(owner) if o is None]
        if missing_b:
            raise ConfigurationError(
                "shards[*].buckets",
                f"{len(missing_b)} of {bucket_count} buckets have no shard: {_compress(missing_b)[:200]}",
                "assign every bucket 0..bucket_count-1 to a shard",
            )
        bucket_map = tuple(o for o in owner if o is not None)

    groups_raw = raw.get("groups", {})
    if not isinstance(groups_raw, Mapping):
        raise ConfigurationError("groups", "must be a table of table groups",
                                 "e.g. [groups.users] tables = { users = \"id\" }")
    groups = []
    table_owner: dict[str, str] = {}
    for gname, graw in groups_raw.items():
        g = _parse_group(str(gname), graw, shard_names, bucket_map)
        for t in g.tables:
            if t in table_owner:
                raise ConfigurationError(f"groups.{gname}.tables.{t}",
                                         f"table {t!r} is already in group {table_owner[t]!r}",
                                         "a table belongs to one group")
            table_owner[t] = g.name
        groups.append(g)

    refs_raw = raw.get("reference_tables", [])
    if not isinstance(refs_raw, list) or not all(isinstance(t, str) for t in refs_raw):
        raise ConfigurationError("reference_tables", "must be a list of table names")
    for i, t in enumerate(refs_raw):
        if not t.strip():
            raise ConfigurationError(f"reference_tables[{i}]", "is an empty table name",
                                     'name the table, e.g. reference_tables = ["countries"]')
        _check_qualified_name(t, f"reference_tables[{i}]")
        if t in table_owner:
            raise ConfigurationError(f"reference_tables[{i}]",
                                     f"table {t!r} is sharded in group {table_owner[t]!r}",
                                     "a table is either sharded or a reference table")

    replicas_cfg = raw.get("replicas", {})
    pool_cfg = raw.get("pool", {})
    for key, val in (("replicas", replicas_cfg), ("pool", pool_cfg)):
        if not isinstance(val, Mapping):
            raise ConfigurationError(key, "must be a table", (
                "[replicas] holds how reads use replicas (consistency, policy, ...); a shard's "
                "replica URLs go in its [[shards]] table: replicas = [\"postgresql+psycopg://...\"] "
                "after its name and primary") if key == "replicas" else
                "e.g. [pool] size = 10, or pool = { size = 10 } before the first [header]")
    replica_settings = parse_replica_settings(replicas_cfg, "replicas")
    pool_cfg = parse_pool(pool_cfg, "pool")
    catalog_raw = raw.get("catalog")
    catalog_url = None
    if catalog_raw is not None:
        if not isinstance(catalog_raw, Mapping):
            raise ConfigurationError("catalog", "must be a table", 'e.g. [catalog] url = "postgresql+psycopg://..."')
        _check_keys(catalog_raw, {"url"}, "catalog")
        catalog_url = _parse_url(catalog_raw.get("url"), "catalog.url")

    return ClusterConfig(
        name=name,
        bucket_count=bucket_count,
        shards=tuple(shards),
        bucket_map=bucket_map,
        groups=tuple(groups),
        reference_tables=frozenset(refs_raw),
        replicas=replica_settings,
        pool=dict(pool_cfg),
        catalog_url=catalog_url,
    )


def conninfo(url: URL) -> str:
    """A libpq connection string for a SQLAlchemy URL, every value quoted as libpq needs
    (a password with spaces or quotes works, and never surfaces in a parse error): the
    parameters the URL's engine connects with (SQLAlchemy's reading of it: several hosts,
    a socket directory, an empty password left to libpq's PGPASSWORD and ~/.pgpass)."""
    from psycopg.conninfo import make_conninfo

    _, params = url.get_dialect()().create_connect_args(url)
    return make_conninfo("", **{k: v for k, v in params.items() if k != "context" and v is not None})


def with_bucket_map(config: ClusterConfig, bucket_map: tuple[str, ...],
                    slices: tuple[Any, ...] = ()) -> ClusterConfig:
    """``config`` routing hash groups by ``bucket_map`` and range and list groups by
    ``slices`` (a catalog's live map); a group without slices keeps the config's strategy."""
    if len(bucket_map) != config.bucket_count:
        raise ConfigurationError(
            "catalog", f"the catalog's map has {len(bucket_map)} buckets, the config {config.bucket_count}",
            "bucket_count is fixed for the life of a cluster: use the catalog's count")
    unknown = sorted(set(bucket_map) - set(config.shard_names))
    if unknown:
        raise ConfigurationError(
            "shards", f"the catalog's map places buckets on {', '.join(unknown)}, which the config does not define",
            "add those shards (with their URLs) to the config file; a shard leaves the file only once "
            "`shardkit rebalance apply --drain` has moved everything off it")
    unknown = sorted({s.shard for s in slices} - set(config.shard_names))
    if unknown:
        raise ConfigurationError(
            "shards", f"the catalog's map places key ranges or values on {', '.join(unknown)}, which the "
            "config does not define", "add those shards (with their URLs) to the config file; a shard "
            "leaves the file only once its ranges and values moved off it too (`rebalance apply --split` "
            "or `--move-value` ... `--to`)")
    grouped = by_group(slices)
    groups = tuple(
        replace(g, strategy=HashStrategy(bucket_map)) if isinstance(g.strategy, HashStrategy)
        else replace(g, strategy=strategy_from_slices(grouped[g.name])) if g.name in grouped
        else g
        for g in config.groups)
    return replace(config, bucket_map=tuple(bucket_map), groups=groups, slices=tuple(slices))
