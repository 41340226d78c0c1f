"""Processes of their own without their imports: `python -c SCRIPT ARGS` forked from a
server process that has imported shardkit once.

Tests that SIGKILL a mover (or run one while a server dies) need a real process: its
sessions end with it, its locks go with them, its exit status is its own.  Started with
``subprocess.Popen([sys.executable, "-c", ...])`` each costs ~0.7 s of CPU in imports
alone.  :func:`popen` forks it instead from a server that imported ``shardkit.cli``
(and ``rebalance``, ``catalog``) once per test process.  The child is a process like
that one: its own pid, killable; its stdout and stderr the files given; the caller's
``os.environ`` (of the moment, with ``env`` added) and working directory; ``PYTHONPATH``
entries put first on ``sys.path``; ``sys.argv`` ``["-c", *args]``; an uncaught
KeyboardInterrupt ends it by SIGINT; its other threads are joined before it exits.
Unlike a new interpreter it shares the server's hash seed and ``__main__`` module
(classes its script defines cannot be pickled by name).

The server has no threads and no connections when it forks.  It reaps its children
and reports each one's exit status by request (negative: killed by that signal, as
``Popen``'s); when its test process goes away (its input closes) it SIGKILLs the
children still running.  If the server itself dies, waiting on a child raises.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from typing import Any

_SERVER = r"""
import json, os, selectors, signal, sys, threading, traceback
from shardkit import cli, rebalance, catalog  # noqa: F401 - the imports the children skip

report = os.dup(1)
requests = os.dup(0)
rfd, wfd = os.pipe()
os.set_blocking(wfd, False)
signal.set_wakeup_fd(wfd)
signal.signal(signal.SIGCHLD, lambda *a: None)
children = {}   # pid -> request number
base_path = list(sys.path)


def tell(line):
    os.write(report, (line + "\n").encode())


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        n = children.pop(pid, None)
        if n is not None:
            tell(f"exit {n} {os.waitstatus_to_exitcode(status)}")


def child(req):
    os.close(report)
    os.close(requests)
    os.close(rfd)
    os.close(wfd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 1)
    os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = extra + [p for p in base_path if p not in extra]
    sys.argv = ["-c", *req["args"]]
    code = 0
    interrupted = False
    try:
        exec(compile(req["script"], "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()   # (what the interpreter does at exit: join non-daemon threads)
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if interrupted:   # (as Python ends on an uncaught KeyboardInterrupt: by SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


sel = selectors.DefaultSelector()
sel.register(requests, selectors.EVENT_READ, "request")
sel.register(rfd, selectors.EVENT_READ, "signal")
tell("ready")
pending = b""
while True:
    for key, _ in sel.select():
        if key.data == "signal":
            os.read(rfd, 4096)
            reap()
            continue
        data = os.read(requests, 1 << 16)
        if not data:
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sys.exit(0)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            try:
                pid = os.fork()
            except OSError as e:
                tell(f"error {req['n']} {json.dumps(str(e))}")
                continue
            if pid == 0:
                child(req)
            children[pid] = req["n"]
            tell(f"pid {req['n']} {pid}")
    reap()
"""


class _Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        self.cond = threading.Condition()
        self.pids: dict[int, int] = {}      # request number -> pid
        self.codes: dict[int, int] = {}     # request number -> exit status
        self.errors: dict[int, str] = {}    # request number -> why it could not fork
        self.ready = False
        self.dead = False
        self.numbers = iter(range(10**9))
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        with self.cond:
            if not self.cond.wait_for(lambda: self.ready or self.dead, 120):
                raise RuntimeError("the prefork server did not start in 120 s")
            if not self.ready:
                raise RuntimeError(f"the prefork server exited ({self.proc.wait()})")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            what, n, rest = (line.rstrip("\n").split(" ", 2) + ["", ""])[:3]
            with self.cond:
                if what == "ready":
                    self.ready = True
                elif what == "pid":
                    self.pids[int(n)] = int(rest)
                elif what == "exit":
                    self.codes[int(n)] = int(rest)
                elif what == "error":
                    self.errors[int(n)] = json.loads(rest)
                self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def spawn(self, request: dict[str, Any]) -> tuple[int, int]:
        """(request number, pid) of a child forked for ``request``."""
        assert self.proc.stdin is not None
        with self.lock:
            n = next(self.numbers)
            self.proc.stdin.write(json.dumps({**request, "n": n}) + "\n")
            self.proc.stdin.flush()
        with self.cond:
            if not self.cond.wait_for(lambda: n in self.pids or n in self.errors or self.dead, 60):
                raise RuntimeError("the prefork server did not fork in 60 s")
            if n in self.errors:
                raise OSError(f"the prefork server could not fork: {self.errors.pop(n)}")
            if n not in self.pids:
                raise RuntimeError("the prefork server died")
            return n, self.pids.pop(n)

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - at exit
            self.proc.kill()


_server: _Server | None = None
_server_lock = threading.Lock()


def _get() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.dead or _server.proc.poll() is not None:
            _server = _Server()
            atexit.register(_server.close)
        return _server


class Forked:
    """A forked `python -c SCRIPT ARGS`: the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
        self._server = _get()
        self.args = ["-c", *args]
        self.returncode: int | None = None
        self._n, self.pid = self._server.spawn({
            "script": script, "args": args, "env": {**os.environ, **env}, "cwd": os.getcwd(),
            "stdout": stdout, "stderr": stderr})

    def _known(self) -> bool:
        """(Under the server's lock.)  Whether the exit status is known; raises if it never
        will be (the server died: it no longer reaps or reports)."""
        if self.returncode is None and self._n in self._server.codes:
            self.returncode = self._server.codes.pop(self._n)
        if self.returncode is None and self._server.dead:
            raise RuntimeError(f"the prefork server died: the exit status of pid {self.pid} is unknown")
        return self.returncode is not None

    def poll(self) -> int | None:
        with self._server.cond:
            self._known()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._server.cond:
            if not self._server.cond.wait_for(self._known, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal
        self.send_signal(signal.SIGKILL)


def popen(script: str, args: list[Any], *, stdout: Any, stderr: Any, env: dict[str, str] | None = None) -> Forked:
    """`python -c SCRIPT ARGS` (with ``env`` added to the environment), its output to the
    files named ``stdout`` and ``stderr`` (appended), forked from the server."""
    return Forked(script, [str(a) for a in args], dict(env or {}), str(stdout), str(stderr))
