"""``shardkit`` commands run in the test process, seen as a process would see them.

``run(argv)`` gives a ``subprocess.CompletedProcess`` (exit status, stdout, stderr) of
``shardkit.cli.main(argv)``, without starting ``python -m shardkit.cli`` (about 0.6 s of
imports each): for tests about what a command does and says, not about the process
itself (signals, a terminal, the console script), which keep a real subprocess.

What the process would write to stderr is kept there: the log records its
``logging.basicConfig`` would print (WARNING and above; DEBUG with ``-v``), the warnings
Python would print, and the traceback of an exception that escapes (exit status 1).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence

from shardkit import cli

#: Python's default warning filters (what ``python -m shardkit.cli`` starts with).
_DEFAULT_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                    ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                    ("ignore", ResourceWarning, None))


def shardkit(argv: Sequence[str], *, proc: bool = False, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGV``: in this process (:func:`run`), or with ``proc`` as ``python -m
    shardkit.cli`` in a process of its own, as it also runs with ``env`` (variables added
    to this process's environment)."""
    if not proc and env is None:
        return run(argv)
    return subprocess.run([sys.executable, "-m", "shardkit.cli", *(str(a) for a in argv)],
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def as_a_process(main: Callable[[], int | None], out: io.StringIO, err: io.StringIO) -> int:
    """Run ``main()`` as its process would: Python's default warning filters, warnings and
    stdout/stderr into ``out``/``err``, ``SystemExit`` as the exit status (mod 256), an
    escaping exception as a traceback on stderr and status 1; the exit status."""

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = show
        try:
            rc = main() or 0
        except SystemExit as e:   # argparse's usage errors, sys.exit(-1) ...
            code = e.code
            rc = code % 256 if isinstance(code, int) else (0 if code is None else 1)
            if not isinstance(code, int) and code is not None:
                err.write(f"{code}\n")
        except KeyboardInterrupt:
            raise
        except BaseException:   # noqa: BLE001 - what the process would print as a traceback
            err.write(traceback.format_exc())
            rc = 1
    return rc


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    verbose = "-v" in argv or "--verbose" in argv
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # Not the records of the test process's threads already running (a monitor, writers):
    # the command's process would not have them.  Its own threads start during the run.
    others = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
    handler.addFilter(lambda record: record.thread not in others)
    root = logging.getLogger()
    level = root.level
    # Added before main() runs: its basicConfig() then adds no handler of its own.
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        rc = as_a_process(lambda: cli.main(argv), out, err)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["shardkit", *argv], rc, out.getvalue(), err.getvalue())
