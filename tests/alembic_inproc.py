"""Plain ``alembic`` commands run in the test process, seen as a process would see them.

``alembic(argv, path=...)`` gives a ``subprocess.CompletedProcess`` (exit status, stdout,
stderr) of ``alembic.config.main(argv)`` -- what ``python -m alembic ARGV`` runs -- without
starting a process (about 0.7 s of imports each).  For tests of what env.py and the
migrations do and print through plain Alembic, not of the process itself.

As a process would: what Alembic prints goes to stdout, the log records of the logging
env.py sets up from alembic.ini (``fileConfig``) and the warnings Python would print go to
stderr, an escaping exception is a traceback on stderr (exit status 1), Alembic's own
``FAILED: ...`` (its ``sys.exit(-1)``) exit status 255, as a process's.  ``path``: a directory put first on
``sys.path`` (``PYTHONPATH``), its modules forgotten afterwards.  The test process's
logging (which ``fileConfig`` replaces) is put back as it was afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from alembic import config as alembic_config
from inproc_cli import as_a_process


class _Config(alembic_config.Config):
    """Alembic's Config, printing (``print_stdout``: `current`, `history` ...) to the
    sys.stdout of the moment, as in a process, not to the one of the import (its default)."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("stdout", sys.stdout)
        super().__init__(*args, **kw)


def _logging_state():
    root = logging.getLogger()
    loggers = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return root.level, list(root.handlers), loggers, list(logging._handlerList)


def _restore_logging(state) -> None:
    level, handlers, loggers, handler_list = state
    root = logging.getLogger()
    root.setLevel(level)
    root.handlers[:] = handlers
    for name, lg in logging.Logger.manager.loggerDict.items():
        if not isinstance(lg, logging.Logger):
            continue
        lg.level, lg.handlers[:], lg.propagate, lg.disabled = loggers.get(name, (logging.NOTSET, [], True, False))
    logging._handlerList[:] = handler_list
    logging.Logger.manager._clear_cache()


@contextlib.contextmanager
def _config_class(cls):
    was = alembic_config.Config
    alembic_config.Config = cls
    try:
        yield
    finally:
        alembic_config.Config = was


def alembic(argv: Sequence[str], *, path: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    state = _logging_state()
    modules = set(sys.modules)
    # (Alembic prepends alembic.ini's prepend_sys_path to sys.path on every run.)
    sys_path = list(sys.path)
    if path is not None:
        sys.path.insert(0, str(path))

    try:
        with _config_class(_Config):
            rc = as_a_process(lambda: alembic_config.main(argv=argv, prog="alembic"), out, err)
    finally:
        _restore_logging(state)
        sys.path[:] = sys_path
        if path is not None:
            for name in set(sys.modules) - modules:
                file = getattr(sys.modules[name], "__file__", None) or ""
                if file.startswith(str(path)):
                    del sys.modules[name]
    return subprocess.CompletedProcess(["alembic", *argv], rc, out.getvalue(), err.getvalue())


def upgrade_every_shard(ini: str | os.PathLike[str], config: str | os.PathLike[str], revision: str = "head") -> None:
    """Set-up: plain ``alembic -x config=CONFIG upgrade REVISION`` (every shard in turn, in
    this process), for a test whose subject is not ``shardkit migrate upgrade`` itself (that
    starts an Alembic process per shard)."""
    r = alembic(["-c", str(ini), "-x", f"config={config}", "upgrade", revision])
    assert r.returncode == 0, r.stdout + r.stderr
