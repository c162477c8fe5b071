"""The code sandbox: normal runs, and every attack contained and reported (small limits, ~1 s)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rewards import sandbox
from rewards.sandbox import SandboxLimits, run_untrusted, sandbox_capabilities

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

CAPS = sandbox_capabilities()
needs_ns = pytest.mark.skipif(not CAPS["namespaces"], reason="unshare is not permitted here")
needs_root_ns = pytest.mark.skipif(not (CAPS["root"] and CAPS["namespaces"]), reason="needs root and unshare")

SMALL = SandboxLimits(cpu_time_s=1, wall_time_s=1.5, memory_bytes=256 * 2**20, max_processes=8,
                      max_output_bytes=16 * 1024)


def run(code: str, limits: SandboxLimits = SMALL, **kw):
    return run_untrusted(textwrap.dedent(code), limits=limits, **kw)


def sandbox_processes() -> list[int]:
    """Live processes running under any uid this test process's sandboxes use."""
    lo = sandbox._UID_BASE + (os.getpid() % 2**22) * sandbox._UID_SLOTS
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "Z" in fields.get("State", ""):
            continue
        uids = [int(u) for u in fields.get("Uid", "").split()[:2]]
        if any(lo <= u < lo + sandbox._UID_SLOTS for u in uids):
            found.append(int(name))
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its run"


# --- ordinary use ---------------------------------------------------------------------------


def test_runs_code_with_stdin_and_files():
    r = run(
        """
        import sys, helper
        data = sys.stdin.read().split()
        print(helper.add(int(data[0]), int(data[1])))
        """,
        stdin="2 40\n",
        files={"helper.py": "def add(a, b):\n    return a + b\n"},
    )
    assert r.ok, r
    assert r.stdout == "42\n"
    assert r.returncode == 0 and r.killed_reason is None and not r.timed_out
    assert r.wall_time_s < 5


def test_nonzero_exit_and_stderr_are_reported():
    r = run("import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)")
    assert r.returncode == 3 and not r.ok
    assert "bad" in r.stderr


def test_exception_in_program_is_reported():
    r = run("raise KeyError('x')")
    assert r.returncode == 1 and "KeyError" in r.stderr


def test_argv_runs_other_programs():
    r = run("", argv=["/bin/sh", "-c", "echo hi; exit 4"])
    assert r.stdout == "hi\n" and r.returncode == 4


def test_bad_file_path_is_refused():
    with pytest.raises(ValueError, match="relative path inside"):
        run("pass", files={"../escape.py": "x"})


def test_scratch_directory_is_fresh_and_deleted():
    code = "import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('mine.txt', 'w').write('x')"
    r1, r2 = run(code), run(code)
    cwd1 = r1.stdout.splitlines()[0]
    assert r1.ok and r2.ok
    assert r1.stdout.splitlines()[1] == "['main.py']" == r2.stdout.splitlines()[1]
    assert cwd1 != r2.stdout.splitlines()[0]
    assert not os.path.exists(cwd1)


@needs_root_ns
def test_protections_reported_on_this_machine():
    r = run("print(1)")
    assert r.network_isolated
    for layer in ("uid_drop", "pid_namespace", "network_namespace", "mount_namespace",
                  "readonly_root", "private_tmp", "rlimits", "clean_env", "output_cap"):
        assert layer in r.protections, (layer, r.protections)


# --- attacks --------------------------------------------------------------------------------


def test_infinite_loop_hits_cpu_limit():
    t0 = time.monotonic()
    r = run("while True:\n    pass", SandboxLimits(cpu_time_s=1, wall_time_s=5))
    assert r.killed_reason == "cpu_time", r
    assert not r.ok and r.cpu_time_s >= 0.9
    assert time.monotonic() - t0 < 4.5


def test_sleeping_past_wall_limit_is_killed():
    t0 = time.monotonic()
    r = run("import time\nprint('start', flush=True)\ntime.sleep(60)", SandboxLimits(wall_time_s=1.0))
    assert r.timed_out and r.killed_reason == "wall_time" and r.returncode is None
    assert r.stdout == "start\n"  # output before the kill is kept
    assert time.monotonic() - t0 < 4


def test_fork_bomb_is_capped_and_cleaned_up():
    limits = SandboxLimits(wall_time_s=1.0, max_processes=8)
    counted = run(
        """
        import os, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            print(n, e.errno, flush=True)
        """,
        limits,
    )
    n, errno = map(int, counted.stdout.split())
    assert n < 8 and errno == 11  # EAGAIN: the process limit held
    t0 = time.monotonic()
    bomb = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", limits)
    assert bomb.killed_reason in ("wall_time", "cpu_time")
    assert time.monotonic() - t0 < 5
    # the autouse fixture checks that no process of the bomb survived


def test_memory_bomb_gets_memory_error():
    r = run("a = []\nwhile True:\n    a.append(bytearray(10**7))", SandboxLimits(memory_bytes=192 * 2**20))
    assert r.killed_reason == "memory" and r.returncode == 1
    assert "MemoryError" in r.stderr


def test_single_huge_allocation_fails():
    r = run("x = bytearray(2**31)\nprint('allocated')", SandboxLimits(memory_bytes=192 * 2**20))
    assert "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_huge_stdout_is_capped_and_killed():
    t0 = time.monotonic()
    r = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", SandboxLimits(max_output_bytes=4096))
    assert r.killed_reason == "output_limit" and r.stdout_truncated
    assert len(r.stdout) == 4096
    assert time.monotonic() - t0 < 3


def test_huge_stderr_is_capped_too():
    r = run("import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", SandboxLimits(max_output_bytes=4096))
    assert r.killed_reason == "output_limit" and r.stderr_truncated and len(r.stderr) == 4096


def test_file_size_limit():
    r = run("open('big', 'wb').write(b'x' * (2 * 2**20))", SandboxLimits(max_file_bytes=2**20))
    assert r.returncode != 0 and ("File too large" in r.stderr or r.returncode == -signal.SIGXFSZ)


def test_writing_outside_scratch_is_contained(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable host folder must stay untouched
    tag = secrets.token_hex(6)
    targets = [str(tmp_path / f"escape-{tag}"), f"/tmp/escape-{tag}", f"/var/tmp/escape-{tag}",
               f"/dev/shm/escape-{tag}", os.path.join(os.path.dirname(sandbox.__file__), f"escape-{tag}")]
    r = run(
        f"""
        for p in {targets!r} + ['inside.txt']:
            try:
                with open(p, 'w') as f:
                    f.write('pwned')
                print('wrote', p)
            except OSError as e:
                print('denied', p, e.errno)
        """
    )
    assert r.ok, r
    assert "wrote inside.txt" in r.stdout
    for t in targets:
        assert not os.path.exists(t), f"the sandbox wrote {t} on the host"


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = "grove-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("GROVE_TEST_API_KEY", secret)
    r = run(
        """
        import os
        print(dict(os.environ))
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                for f in ('environ', 'cmdline'):
                    try:
                        print(pid, f, open(f'/proc/{pid}/{f}', 'rb').read())
                    except OSError as e:
                        print(pid, f, 'denied', e.errno)
        """
    )
    assert r.ok, r
    assert secret not in r.stdout and secret not in r.stderr
    assert "GROVE_TEST_API_KEY" not in r.stdout


@needs_ns
def test_network_connections_fail():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = run(
            f"""
            import socket
            for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect(addr)
                    print('connected', addr)
                except OSError as e:
                    print('failed', addr, e.errno)
            """
        )
        assert r.ok, r
        assert "connected" not in r.stdout and r.stdout.count("failed") == 2
        assert r.network_isolated
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_killing_the_parent_fails():
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        r = run(
            f"""
            import os, signal
            for pid in ({os.getpid()}, {os.getppid()}, {sentinel.pid}):
                try:
                    os.kill(pid, signal.SIGKILL)
                    print('killed', pid)
                except OSError as e:
                    print('failed', pid, e.errno)
            for how in (lambda: os.kill(-1, signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL)):
                try:
                    how()
                except OSError as e:
                    print('failed broadcast', e.errno)
            print('still here')
            """
        )
        assert sentinel.poll() is None, "the sandbox killed a host process"
        assert f"killed {sentinel.pid}" not in r.stdout
    finally:
        sentinel.kill()
        sentinel.wait()
    # we are alive to assert this


def test_child_outliving_the_run_is_killed():
    t0 = time.monotonic()
    r = run(
        """
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True)
        if os.fork() == 0:          # classic double-fork daemon
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            os._exit(0)
        time.sleep(0.2)
        print('parent done')
        """
    )
    assert r.ok and r.stdout == "parent done\n", r
    assert time.monotonic() - t0 < 3  # did not wait for the children
    # the autouse fixture checks that the daemons are gone


def test_threads_count_against_process_limit():
    r = run(
        """
        import threading, time
        ts = []
        try:
            for _ in range(100):
                t = threading.Thread(target=time.sleep, args=(30,), daemon=True)
                t.start()
                ts.append(t)
        except RuntimeError:
            pass
        print(len(ts))
        """,
        SandboxLimits(max_processes=6),
    )
    assert r.ok and int(r.stdout) < 6


# --- fallbacks ------------------------------------------------------------------------------


@pytest.mark.skipif(not (CAPS["root"] and os.access("/usr/bin/python3", os.X_OK)),
                    reason="needs root and a system python")
def test_fallback_without_namespaces_still_limits_and_cleans_up(monkeypatch):
    """No unshare: uid drop (with a world-readable interpreter), rlimits, and a uid sweep."""
    monkeypatch.setattr(sandbox, "_caps", lambda network: sandbox._Caps(True, None, False, ()))
    limits = SandboxLimits(wall_time_s=1.0, python="/usr/bin/python3")
    r = run("import os\nprint(os.getuid() >= 2_000_000_000)", limits)
    assert r.ok and r.stdout == "True\n" and not r.network_isolated
    assert "uid_drop" in r.protections and "pid_namespace" not in r.protections
    r = run(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(30)
            os._exit(0)
        print('done')
        """,
        limits,
    )
    assert r.ok
    r = run("import time\ntime.sleep(30)", limits)
    assert r.killed_reason == "wall_time"


@pytest.mark.skipif(not (CAPS["root"] and CAPS["namespaces"] and shutil.which("setpriv")
                         and os.access("/usr/bin/python3", os.X_OK)),
                    reason="needs root (to become another user), setpriv and a system python")
def test_unprivileged_user_gets_user_namespaces(tmp_path):
    """Run the sandbox as an ordinary user: namespaces via unshare --user, no own uid."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(sandbox.__file__)))
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {repo!r})
        from rewards.sandbox import run_untrusted, sandbox_capabilities, SandboxLimits
        r = run_untrusted("import socket\\ns = socket.socket()\\nprint(s.connect_ex(('1.1.1.1', 53)))",
                          limits=SandboxLimits(wall_time_s=3))
        print(json.dumps([sandbox_capabilities()['namespaces'], r.ok, r.stdout, r.network_isolated]))
        """
    )
    os.chmod(tmp_path, 0o755)
    out = subprocess.run(
        ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "/usr/bin/python3", "-c", script],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )
    if out.returncode != 0:
        pytest.skip(f"could not run as another user: {out.stderr[-300:]}")
    ns, ok, stdout, isolated = __import__("json").loads(out.stdout.splitlines()[-1])
    if not ns:
        pytest.skip("user namespaces are not allowed for unprivileged users here")
    assert ok and isolated and stdout.strip() != "0"
