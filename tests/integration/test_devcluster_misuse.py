"""The local cluster and demo tooling used the way a careless first-time user would.

`shardkit dev up|down`, `shardkit demo` and the pytest fixture's cluster
lifecycle: odd directories, crashes, concurrent starts, signals.  Every
cluster lives under a fresh ``/tmp/devmisuse-*`` directory that the test
stops and removes, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import uuid
from pathlib import Path

import inproc_cli
import psycopg
import pytest

from shardkit import DevClusterError, load_config
from shardkit import devcluster
from shardkit.devcluster import DevCluster, find_pg_bin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("SHARDKIT_TEST_BACKEND", "local") == "docker",
        reason="tests local DevCluster files, processes and the dev/demo commands"),
]


# --------------------------------------------------------------------------
# Helpers


def shardkit(*args: str) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGS`` in this process (``tests/inproc_cli.py``: no interpreter start-up,
    what it prints and its exit status as a process's): for what a command does and says.
    Signals, a command that must be stopped from outside, a pytest session: real processes."""
    return inproc_cli.run(args)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and "postgres" in cmdline:
                found.append(int(entry.name))
    return found


def _wait_no_servers(root: Path, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = _processes_mentioning(str(root))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _reap(root: Path) -> None:
    """Stop every server a test left under ``root`` (ours by construction), then remove it."""
    for state in sorted(root.rglob("devcluster.json")):
        try:
            DevCluster.load(state.parent).down()
        except Exception:
            pass
    # Whatever the state files missed: postmasters whose command line names our root.
    for pid_file in root.rglob("postmaster.pid"):
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(pid_file.parent) in cmdline:
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
    _wait_no_servers(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def root():
    """A fresh /tmp/devmisuse-* directory the server user can reach; reaped afterwards."""
    d = Path(tempfile.mkdtemp(prefix="devmisuse-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        _reap(d)
    assert _processes_mentioning(str(d)) == []


def _postmaster_pid(node) -> int:
    return int((node.datadir / "postmaster.pid").read_text().split("\n", 1)[0])


def _accepts_connections(node) -> bool:
    try:
        with psycopg.connect(node.dsn, connect_timeout=3) as conn:
            return conn.execute("SELECT inet_server_port()").fetchone()[0] == node.port
    except psycopg.OperationalError:
        return False


# --------------------------------------------------------------------------
# Bugs


def test_two_concurrent_ups_on_one_new_dir_do_not_fight(root, monkeypatch):
    """Two `dev up` on the same new directory at once: one cluster, and the
    other up either reuses it or fails with a DevClusterError -- without
    deleting the winner's files on its way out."""
    base = root / "c"
    results: list[object] = [None, None]
    loser_deleted: list[str] = []
    real_rmtree = shutil.rmtree
    threads: dict[int, int] = {}

    def recording_rmtree(path, *a, **kw):
        loser_deleted.append(f"thread {threads.get(threading.get_ident())}: {path}")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(devcluster.shutil, "rmtree", recording_rmtree)
    barrier = threading.Barrier(2)

    def go(i: int) -> None:
        threads[threading.get_ident()] = i
        barrier.wait()
        try:
            results[i] = DevCluster.up(base, shards=2, replicas=0)
        except BaseException as e:  # noqa: BLE001 - the type is what we check
            results[i] = e

    ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    monkeypatch.undo()

    winners = [r for r in results if isinstance(r, DevCluster)]
    assert winners, results
    for r in results:
        assert isinstance(r, (DevCluster, DevClusterError)), (
            f"the losing `dev up` crashed with {type(r).__name__}: {r} (the CLI prints a traceback)")
    # The loser must not have removed anything: it never owned a file there.
    assert loser_deleted == [], loser_deleted
    cluster = DevCluster.load(base)
    assert all(n.is_running() and _accepts_connections(n) for n in cluster.nodes)


def test_up_where_the_dir_cannot_be_made_is_one_error_line(root):
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    for d in (blocker / "sub", Path("/proc/x")):
        r = shardkit("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(d))
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dir_with_shell_metacharacters_is_not_run_through_a_shell(root):
    """pg_ctl builds a /bin/sh command line with the data directory in double
    quotes: `$(...)` in --dir runs as the server user.  Either the directory
    is used literally or `dev up` refuses it before starting anything."""
    drop = root / "drop"
    drop.mkdir()
    drop.chmod(0o777)
    marker = drop / f"pwned-{uuid.uuid4().hex[:8]}"
    base = root / f"x$(touch {marker})y"
    r = shardkit("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(base))
    assert not marker.exists(), (
        f"a command in --dir ran as the server user: {marker} exists\n{r.stdout}{r.stderr}")
    if r.returncode != 0:
        assert r.stderr.startswith("error: ") and "pg_ctl start" not in r.stderr, r.stderr
    else:
        assert _accepts_connections(DevCluster.load(base).nodes[0])


def _two_clusters_b_crashed_with_a_reused_pid(root: Path) -> tuple[DevCluster, DevCluster]:
    """Cluster A running; cluster B's server killed -9, its stale postmaster.pid
    naming a pid that now belongs to another PostgreSQL server (A's): pid reuse
    after a crash or a reboot."""
    a = DevCluster.up(root / "a", shards=1, replicas=0)
    b = DevCluster.up(root / "b", shards=1, replicas=0)
    b_node = b.nodes[0]
    pid_file = b_node.datadir / "postmaster.pid"
    b_node.kill()
    lines = pid_file.read_text().split("\n")
    lines[0] = str(_postmaster_pid(a.nodes[0]))
    pid_file.write_text("\n".join(lines))
    return a, b


def _forget_fake_pid(a: DevCluster, b: DevCluster) -> None:
    # Teardown must never act on a pid that is not B's: by then A's pid may
    # belong to somebody else's server.  Once B runs again its pid file is its
    # own, and removing it would hide B's server from teardown.
    pid_file = b.nodes[0].datadir / "postmaster.pid"
    try:
        if _postmaster_pid(b.nodes[0]) == _postmaster_pid(a.nodes[0]):
            pid_file.unlink()
    except (OSError, ValueError):
        pass


def test_a_pid_reused_by_another_server_is_not_taken_for_the_node(root):
    """B crashed; its stale postmaster.pid names A's postmaster.  B must not look
    running, stopping B must leave A alone, and `up` on B must start B's server."""
    a, b = _two_clusters_b_crashed_with_a_reused_pid(root)
    try:
        b_node = b.nodes[0]
        running_says = b_node.is_running()
        b.down(remove=False)  # what `dev down` does before removing the files
        a_alive = a.nodes[0].is_running() and _accepts_connections(a.nodes[0])
        again = DevCluster.up(b.base_dir, shards=1, replicas=0)
        b_up = _accepts_connections(again.nodes[0])
        a_still = _accepts_connections(a.nodes[0])
    finally:
        _forget_fake_pid(a, b)
    assert not running_says, "is_running() believes another cluster's postmaster is B's"
    assert a_alive, (f"stopping {b.base_dir} stopped the server of {a.base_dir} "
                     "(whose pid B's stale postmaster.pid named)")
    assert b_up, "`dev up` reused B and reported it up, but B's server never started"
    assert a_still


def test_huge_shard_count_fails_fast(root):
    """More servers than free ports: refuse up front.  (Without the check _pick_port
    loops forever once every ephemeral port has been handed out.)"""
    base = root / "huge"
    try:
        # A process of its own: the bug loops for ever, and only a process can be stopped then.
        r = inproc_cli.shardkit(["dev", "up", "--shards", "100000", "--replicas", "0", "--dir", str(base)],
                                proc=True, timeout=60)  # was 5: interpreter start-up and imports on a loaded machine
    except subprocess.TimeoutExpired:
        pytest.fail("`dev up --shards 100000` was still running after 60 s instead of refusing")
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert not base.exists() or not any(base.iterdir())


def test_demo_with_one_shard(root):
    """`demo --shards 1` passes the shape check, then starts a cluster and fails on its
    own config (the invoices range names shard s1).  Run it, or refuse before starting.

    The same run shows (test_demo_quickstart's topic, checked here to start the demo
    once) that `demo --shards 1 --replicas 0` describes the cluster as it is: it printed
    "on a fresh-enough replica" over reads that all went to the primary, an empty
    consistency token, and `plan: None`."""
    r = shardkit("demo", "--shards", "1", "--replicas", "0", "--dir", str(root / "d"))
    if r.returncode != 0:
        assert "up in" not in r.stdout, (
            f"demo started a cluster, then failed: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "MISMATCH" not in r.stdout
    out = r.stdout
    assert "fresh-enough replica" not in out and "(no replicas: on its primary)" in out, out
    assert "consistency token" not in out
    assert "plan: None" not in out and "plan: none needed: one shard runs it whole" in out


def test_demo_kept_runs_again_and_never_deletes_a_cluster_it_did_not_start(root):
    """`demo --keep` then `demo` again on that directory: the second run copes with
    the state the first kept (tables, catalog map), and -- having found the cluster
    running -- leaves it, with whatever the user put there (as after `dev up`)."""
    base = root / "d"
    r = shardkit("demo", "--shards", "2", "--replicas", "0", "--dir", str(base), "--keep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"shardkit dev down --dir {base}" in r.stdout
    mine = DevCluster.load(base)
    with mine.shards[0].primary.connect() as conn:
        conn.execute("CREATE TABLE precious (id int)")
        conn.execute("INSERT INTO precious VALUES (1)")
    r2 = shardkit("demo", "--shards", "2", "--replicas", "0", "--dir", str(base))
    assert "Traceback" not in r2.stderr, r2.stderr[-1500:]
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "[ok:" in r2.stdout and "MISMATCH" not in r2.stdout
    assert "verify: clean" in r2.stdout
    assert base.exists() and (base / "devcluster.json").exists(), (
        "demo deleted a cluster it had not started (and the user's data)")
    assert f"shardkit dev down --dir {base}" in r2.stdout
    with DevCluster.load(base).shards[0].primary.connect() as conn:
        assert conn.execute("SELECT count(*) FROM precious").fetchone() == (1,)
    # A cluster `dev up` started: left running and untouched, its config too, and
    # no online move resets its shards' ownership guard.
    users = root / "users"
    DevCluster.up(users, shards=2, replicas=0)
    config_before = (users / "shardkit.toml").read_text()
    r3 = shardkit("demo", "--shards", "2", "--replicas", "0", "--dir", str(users))
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert "[ok:" in r3.stdout and "online rebalancing: skipped" in r3.stdout, r3.stdout
    assert DevCluster.load(users).nodes[0].is_running()
    assert (users / "shardkit.toml").read_text() == config_before


def _demo_env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")


def _interruptible() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C delivers it.  A shell starting this
    suite as a background job (`cmd &`) ignores SIGINT, the children inherit that,
    and Python then raises no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_demo_and_wait_for(tmp: Path, marker: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "shardkit.cli", "demo", "--shards", "2",
                          "--replicas", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_demo_env(tmp), start_new_session=True,
                         preexec_fn=_interruptible)
    assert p.stdout is not None
    for line in p.stdout:
        if marker in line:
            return p
    p.wait(30)
    pytest.fail(f"demo ended before printing {marker!r}: {p.stderr.read() if p.stderr else ''}")


def test_demo_terminated_with_sigterm_stops_its_servers(root):
    """`timeout 60 shardkit demo`, a CI job's time limit, `kill PID`: SIGTERM
    kills Python without running the demo's finally, and the servers (set
    apart by pg_ctl in a session of their own) run on forever."""
    p = _start_demo_and_wait_for(root, "config written to")
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    left = _wait_no_servers(root, timeout=3)
    assert left == [], f"servers left running after SIGTERM: pids {left}"


def test_demo_whose_cluster_fails_to_start_leaves_no_temp_dir(root, monkeypatch):
    fake_bin = root / "bin"
    fake_bin.mkdir()
    real_bin = find_pg_bin()
    for program in ("pg_ctl", "postgres", "pg_basebackup", "pg_config"):
        (fake_bin / program).symlink_to(real_bin / program)
    initdb = fake_bin / "initdb"
    initdb.write_text("#!/bin/sh\necho 'initdb: simulated failure' >&2\nexit 1\n")
    initdb.chmod(0o755)
    tmp = root / "tmp"
    tmp.mkdir()
    # In this process: its environment, and the temporary directory TMPDIR would give.
    monkeypatch.setenv("SHARDKIT_PG_BIN", str(fake_bin))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    r = shardkit("demo", "--shards", "1", "--replicas", "0")
    assert r.returncode == 2 and "simulated failure" in r.stderr, r.stderr
    assert list(tmp.iterdir()) == [], "the demo's temporary directory was left behind"


_NESTED_TEST = textwrap.dedent("""
    import time

    def test_hold(shardkit_module_cluster_factory):
        c = shardkit_module_cluster_factory(shards=1, replicas=0)
        print("CLUSTER-UP", c.base_dir, flush=True)
        time.sleep(120)
""")


def _run_nested_session_and_signal(root: Path, sig: int) -> tuple[int, str]:
    """A pytest session that starts a cluster with the fixture, signalled once it is up."""
    work = root / "session"
    work.mkdir()
    (work / "test_hold.py").write_text(_NESTED_TEST)
    clusters = root / "clusters"
    clusters.mkdir()
    clusters.chmod(0o755)
    env = dict(os.environ, SHARDKIT_TEST_DIR=str(clusters), PYTHONUNBUFFERED="1")
    env.pop("SHARDKIT_TEST_BACKEND", None)
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                          "test_hold.py"], cwd=work, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                         preexec_fn=_interruptible)
    assert p.stdout is not None
    try:
        for line in p.stdout:
            if "CLUSTER-UP" in line:
                os.killpg(p.pid, sig)
                break
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out


def test_pytest_session_killed_with_sigterm_stops_its_clusters(root):
    """The plugin stops clusters at session end, on Ctrl-C and at exit (atexit),
    but SIGTERM (a CI time limit, `timeout`, a cancelled job) runs neither."""
    rc, out = _run_nested_session_and_signal(root, signal.SIGTERM)
    left = _wait_no_servers(root / "clusters", timeout=3)
    assert left == [], f"servers left running after SIGTERM to pytest (rc {rc}): pids {left}"
    assert list((root / "clusters").iterdir()) == [], "the session's cluster directory was left"


# --------------------------------------------------------------------------
# What works (keep it working)


def test_pytest_session_interrupted_with_ctrl_c_stops_its_clusters(root):
    rc, out = _run_nested_session_and_signal(root, signal.SIGINT)
    assert "KeyboardInterrupt" in out, out[-1000:]
    assert _wait_no_servers(root / "clusters", timeout=10) == []
    assert list((root / "clusters").iterdir()) == []


def test_demo_interrupted_with_ctrl_c_stops_and_removes_its_servers(root):
    p = _start_demo_and_wait_for(root, "config written to")
    try:
        os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert _wait_no_servers(root, timeout=10) == []
    assert list(root.iterdir()) == [], "the demo's temporary directory was left behind"
    assert "password" not in (out + err).lower()


def test_dev_up_config_reuse_crash_restart_and_down(root):
    base = root / "my cluster"  # a space: the printed stop command must still work
    r = shardkit("dev", "up", "--shards", "2", "--replicas", "1", "--dir", str(base))
    assert r.returncode == 0, r.stderr
    (hint,) = [line for line in r.stdout.splitlines() if "stop it with:" in line]
    stop_argv = shlex.split(hint.split("stop it with:", 1)[1])
    assert stop_argv[:3] == ["shardkit", "dev", "down"]
    assert "password" not in r.stdout.lower()
    with open(base / "shardkit.toml", "rb") as f:
        cfg = load_config(tomllib.load(f))
    assert [s.name for s in cfg.shards] == ["s0", "s1"]
    cluster = DevCluster.load(base)
    for node in cluster.nodes:
        assert node.is_running() and _accepts_connections(node)
    for shard in cluster.shards:
        with shard.replicas[0].connect() as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    if os.geteuid() == 0:
        # PostgreSQL refuses root: the servers run as the unprivileged user.
        owner = Path(f"/proc/{_postmaster_pid(cluster.nodes[0])}").stat().st_uid
        assert owner != 0
    # Twice on the same directory: the same cluster, no second set of servers;
    # a shardkit.toml deleted meanwhile is written again.
    (base / "shardkit.toml").unlink()
    r2 = shardkit("dev", "up", "--shards", "2", "--replicas", "1", "--dir", str(base))
    assert r2.returncode == 0, r2.stderr
    assert f"config: {base / 'shardkit.toml'}" in r2.stdout
    assert (base / "shardkit.toml").exists(), "`dev up` printed a config path that does not exist"
    assert [n.port for n in DevCluster.load(base).nodes] == [n.port for n in cluster.nodes]
    assert len(_processes_mentioning(str(base))) == 4
    r3 = shardkit("dev", "up", "--shards", "3", "--replicas", "1", "--dir", str(base))
    assert r3.returncode == 2 and "dev down --dir" in r3.stderr, r3.stderr
    # A crash (kill -9 of a postmaster, by its own pid): the pid file stays behind;
    # `dev up` starts the node again, and `dev down` copes with a crashed one.
    primary, replica = cluster.shards[0].primary, cluster.shards[0].replicas[0]
    os.kill(_postmaster_pid(primary), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while primary.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (primary.datadir / "postmaster.pid").exists()
    r = shardkit("dev", "up", "--shards", "2", "--replicas", "1", "--dir", str(base))
    assert r.returncode == 0, r.stderr
    assert _accepts_connections(primary)
    replica.wait_streaming(timeout=20)
    os.kill(_postmaster_pid(replica), signal.SIGKILL)
    r4 = shardkit(*stop_argv[1:])
    assert r4.returncode == 0, f"the printed `{hint.strip()}` fails: {r4.stderr}"
    assert not base.exists()
    assert _wait_no_servers(base) == []


def test_down_where_there_is_no_cluster_is_a_quiet_no_op(root):
    a_file = root / "f"
    a_file.write_text("x")
    for d in (root / "nothing-here", a_file, root):
        r = shardkit("dev", "down", "--dir", str(d))
        assert r.returncode == 0 and "no local cluster" in r.stdout, r.stderr
    assert a_file.exists()


@pytest.mark.parametrize("args, says", [
    (["--shards", "0"], "need shards >= 1"),
    (["--replicas", "-1"], "replicas >= 0"),
    (["--shards", "abc"], "invalid int value"),
])
def test_bad_shapes_are_refused_before_anything_is_made(root, args, says):
    base = root / "c"
    r = shardkit("dev", "up", *args, "--dir", str(base))
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not base.exists()


def test_dir_that_is_a_file_is_refused(root):
    a_file = root / "f"
    a_file.write_text("mine")
    r = shardkit("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(a_file))
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="about the unprivileged server user root needs")
def test_dir_the_server_user_cannot_reach_is_refused_with_a_hint(root):
    private = root / "private"
    private.mkdir(mode=0o700)
    r = shardkit("dev", "up", "--shards", "1", "--replicas", "0", "--dir", str(private / "c"))
    assert r.returncode == 2 and f"chmod o+x {private}" in r.stderr, r.stderr
    assert list(private.iterdir()) == []
