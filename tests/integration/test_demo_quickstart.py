"""`shardkit demo` as a first-time user meets it: Ctrl-C, twice, and part-way through its
online move; and a Ctrl-C that a failed driver clean-up hides.  (What it prints on a cluster
without replicas or with one shard: test_devcluster_misuse.py::test_demo_with_one_shard.)

Every cluster lives under a fresh ``/tmp/demoquick-*`` directory, reaped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from shardkit import _demo, rebalance
from shardkit.devcluster import DevCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("SHARDKIT_TEST_BACKEND", "local") == "docker",
                       reason="runs the demo's local DevCluster"),
]


def _postmasters_under(root: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "postgres" in cmdline and str(root) in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture()
def root():
    d = Path(tempfile.mkdtemp(prefix="demoquick-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        try:
            states = list(d.rglob("devcluster.json"))
        except OSError:  # a directory removed while it was walked
            states = []
        for state in states:
            try:
                DevCluster.load(state.parent).down()
            except Exception:
                pass
        shutil.rmtree(d, ignore_errors=True)


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's Ctrl-C, also under `cmd &`


def _demo_until(tmp: Path, marker: str) -> subprocess.Popen[str]:
    """`shardkit demo --shards 2 --replicas 0` in its own process group, read up to ``marker``."""
    p = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "demo", "--shards", "2",
                          "--replicas", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1"),
                         start_new_session=True, preexec_fn=_interruptible)
    assert p.stdout is not None
    for line in p.stdout:
        if marker in line:
            return p
    p.wait(30)
    pytest.fail(f"demo ended before printing {marker!r}: {p.stderr.read() if p.stderr else ''}")


def test_ctrl_c_again_during_the_clean_up_still_removes_the_cluster(root):
    """An impatient user presses Ctrl-C again while the demo stops its servers: the
    terminal's SIGINT reached the pg_ctl it runs and the clean-up itself, which left the
    temporary cluster directory behind (its path never shown) with warnings to "retry with
    a longer timeout"."""
    p = _demo_until(root, "== writes")
    try:
        os.killpg(p.pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            try:
                os.killpg(p.pid, signal.SIGINT)  # again and again, until it has ended
            except ProcessLookupError:
                break
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # (A SIGINT after the clean-up, as the command exits, may end it by the signal.)
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, err)
    assert "retry with a longer timeout" not in err, err
    assert "cluster stopped and removed" in out, out[-500:]
    assert _postmasters_under(root) == []
    assert list(root.iterdir()) == [], f"left behind: {list(root.rglob('*'))[:5]}"


def test_ctrl_c_in_the_online_move_does_not_say_to_resume_a_removed_cluster(root):
    """Ctrl-C while the demo drains a shard printed `shardkit rebalance resume 1 goes on
    from there` right after `cluster stopped and removed`: there is nothing to resume."""
    p = _demo_until(root, "capturing changes")
    try:
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "cluster stopped and removed" in out, out[-500:]
    assert p.returncode == 130, (p.returncode, err)
    assert "interrupted" in err and "rebalance resume" not in err, err
    assert list(root.iterdir()) == []


def test_an_interrupt_masked_by_a_failed_driver_clean_up_is_still_an_interrupt(root, monkeypatch, capsys):
    """Ctrl-C inside SQLAlchemy's pre-ping of a pooled connection becomes psycopg's
    ProgrammingError "can't change 'autocommit' now" (do_ping resets autocommit on a
    connection still ACTIVE): the mover reported it as a failed batch, `fix the cause`,
    exit 2, instead of an interrupt (exit 130)."""
    def interrupted_in_pre_ping(self, *args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise sa_exc.ProgrammingError(
                "SELECT 1", {}, Exception("can't change 'autocommit' now: connection in "
                                          "transaction status ACTIVE")) from None

    monkeypatch.setattr(rebalance.Mover, "_run_batch", interrupted_in_pre_ping)
    with pytest.raises(KeyboardInterrupt):
        _demo.run_demo(dir=str(root / "d"), shards=2, replicas=0)
    assert "cluster stopped and removed" in capsys.readouterr().out
    assert not (root / "d").exists()


# What `demo --shards 1 --replicas 0` prints (the cluster described as it is: no "fresh-enough
# replica", no empty consistency token, no `plan: None`) is checked on the one-shard demo that
# test_devcluster_misuse.py::test_demo_with_one_shard runs anyway: the demo is started once.
