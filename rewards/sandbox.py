"""Run untrusted code (e.g. model-written programs) in a fresh, locked-down subprocess.

Use :func:`run_untrusted`; it never raises for anything the program does, it reports it::

    >>> r = run_untrusted("print(sum(range(10)))")           # doctest: +SKIP
    >>> r.ok, r.stdout
    (True, '45\\n')

Every run gets a new process tree, started by ``_sandbox_boot.py``, with these layers:

===========================  =======================================================  ========================
protection                   how                                                      needs
===========================  =======================================================  ========================
CPU time                     ``RLIMIT_CPU`` (SIGKILL one second past the soft limit)  always
wall time                    the parent kills the whole tree at the deadline          always
memory                       ``RLIMIT_AS`` (address space: ``MemoryError``)           always
file size                    ``RLIMIT_FSIZE`` (``EFBIG`` / SIGXFSZ)                   always
process count                ``RLIMIT_NPROC`` counted for a uid used only by this     root (exact); approximate
                             run (threads count too)                                  without root
output size                  stdout and stderr read up to a cap, then the run is      always
                             killed (``killed_reason="output_limit"``)
clean environment            ``env`` holds only PATH, HOME, LANG, TMPDIR and thread   always
                             caps; no secret of the parent is passed
scratch directory            a fresh directory as cwd, deleted afterwards (a          always; tmpfs with a
                             size-capped tmpfs when a mount namespace is available)   mount namespace
no network                   a new network namespace (``unshare --net``): only a      ``unshare`` permitted
                             loopback device, down; ``network_isolated`` says
                             whether it held
nothing outlives the run     a new pid namespace: when the program ends, the kernel   ``unshare`` permitted
                             kills everything it started (double-forked daemons
                             included); without it, every process of the run's uid
                             (or its session) is killed
cannot signal the parent     runs as an unprivileged uid of its own and, in the pid   root or ``unshare``
                             namespace, cannot even see other processes
no writes outside scratch    the uid owns nothing on the host; in the mount           root or ``unshare``
                             namespace the whole tree is read-only (Linux 5.12+),
                             and ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are private
                             tmpfs mounts thrown away with the run
===========================  =======================================================  ========================

Where each layer holds (checked once per process by :func:`sandbox_capabilities`; each
:class:`SandboxResult` lists the layers that held for that run in ``protections``):

* **root with ``unshare``** (this project's CPU test machine, most containers run as root that
  allow ``unshare``): every layer above. The program runs as uid ``2_000_000_000 + 64*pid +
  slot``, a uid no file or other process uses. If the interpreter lives in a directory
  that uid cannot enter (e.g. ``/root/.pyenv``), that directory is covered by an empty tmpfs in
  the mount namespace and only the Python install is bound back, read-only.
* **not root, user namespaces allowed** (``unshare --user --map-root-user``): all namespaces
  (network, pid, mount with the read-only tree and private ``/tmp``), but no uid of its own:
  the process-count limit counts the user's other processes too (we add their current count),
  and the program runs as the (mapped) user.
* **not root, no user namespaces** (some hardened clusters): only the resource limits, the
  output cap, the clean environment, a scratch directory on disk and a process-group kill.
  ``network_isolated`` is ``False``; files the user can write are writable, and a program
  that calls ``setsid`` can outlive the run. Use a container with ``unshare`` for untrusted code.

Not covered anywhere: CPU and memory *bandwidth* (a run can slow its neighbours within its
limits), reads of world-readable files, and kernel exploits. This is a strong guard against
accidents and reward hacking, not a security boundary for hostile multi-tenant use.
"""

from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["SandboxLimits", "SandboxResult", "run_untrusted", "sandbox_capabilities"]

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py")
_UID_BASE = 2_000_000_000
_UID_SLOTS = 64
_SCRATCH_PREFIX = "grove-sbx-"
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
_NS_FLAGS = ["--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private"]


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. Sizes in bytes, times in seconds.

    ``max_processes`` counts every process and thread of the run at one time, the program
    included. ``python`` is the interpreter that runs ``code`` (default: the current one,
    ``sys.executable``, with its installed packages).
    """

    cpu_time_s: float = 2.0
    wall_time_s: float = 5.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    max_file_bytes: int = 4 * 2**20
    max_open_files: int = 64
    max_output_bytes: int = 64 * 2**10
    scratch_bytes: int = 32 * 2**20
    tmpfs_bytes: int = 8 * 2**20
    network: bool = False
    python: str | None = None


@dataclass
class SandboxResult:
    """What a run did. ``returncode`` is the exit code, ``-N`` for death by signal N, or
    ``None`` when the sandbox killed the run (then ``killed_reason`` says why)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None  # "wall_time" | "cpu_time" | "output_limit" | "memory" | "setup"
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_time_s: float = 0.0
    wall_time_s: float = 0.0
    network_isolated: bool = False
    protections: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0 and was not cut short."""
        return self.returncode == 0 and self.killed_reason is None


@dataclass(frozen=True)
class _Caps:
    root: bool
    unshare: str | None
    namespaces: bool
    prefix: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def _caps(network: bool) -> _Caps:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return _Caps(root, None, False, ())
    flags = ([] if root else ["--user", "--map-root-user"]) + ([] if network else ["--net"]) + _NS_FLAGS
    prefix = (unshare, *flags)
    try:
        ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return _Caps(root, unshare, ok, prefix if ok else ())


def sandbox_capabilities() -> dict[str, bool]:
    """Which isolation layers this machine allows (probed once per process)."""
    c = _caps(False)
    return {
        "root": c.root,
        "namespaces": c.namespaces,
        "network_namespace": c.namespaces,
        "pid_namespace": c.namespaces,
        "mount_namespace": c.namespaces,
        "own_uid": c.root,
    }


_uid_lock = threading.Lock()
_uid_used: set[int] = set()


def _take_uid() -> int:
    with _uid_lock:
        for slot in range(_UID_SLOTS):
            uid = _UID_BASE + (os.getpid() % 2**22) * _UID_SLOTS + slot
            if uid not in _uid_used:
                _uid_used.add(uid)
                return uid
    raise RuntimeError(f"more than {_UID_SLOTS} concurrent sandbox runs in one process")


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real or effective uid is ``uid`` (from /proc/<pid>/status, which shows
    the truth even for non-dumpable processes)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"State:") and b"Z" in line:
                        break  # a zombie holds nothing; its parent reaps it
                    if line.startswith(b"Uid:"):
                        if str(uid).encode() in line.split()[1:3]:
                            pids.append(int(name))
                        break
        except OSError:
            continue
    return pids


def _kill_uid(uid: int) -> None:
    for _ in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _traversable(path: str) -> bool:
    """Can an unrelated uid reach and read ``path``?"""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(p).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _blocking_ancestor(path: str) -> str | None:
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if not os.stat(p).st_mode & stat.S_IXOTH:
            return p
    return None


def _python_roots(python: str) -> list[str]:
    """Directories an interpreter needs: its install (and the venv, for sys.executable)."""
    real = os.path.realpath(python)
    if os.path.realpath(sys.executable) == real or os.path.abspath(python) == sys.executable:
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    else:
        roots = {os.path.dirname(os.path.dirname(real))}
    roots.add(os.path.dirname(os.path.abspath(python)))
    roots.add(os.path.dirname(real))
    # keep only the outermost of nested roots
    roots = sorted({os.path.realpath(r) for r in roots} | {os.path.abspath(r) for r in roots})
    out: list[str] = []
    for r in roots:
        if not any(r == o or r.startswith(o + os.sep) for o in out):
            out.append(r)
    return out


def _mount_plan(python: str, limits: SandboxLimits, scratch: str) -> dict | None:
    """Masks and binds so an unprivileged uid can run ``python``; None if that is impossible."""
    masks: list[str] = []
    binds: list[str] = []
    world_writable = [d for d in _WORLD_WRITABLE
                      if os.path.isdir(d) and not os.path.islink(d) and os.stat(d).st_mode & stat.S_IWOTH]
    for root in _python_roots(python):
        if any(root == d or root.startswith(d + os.sep) for d in world_writable):
            binds.append(root)  # e.g. a checkout under /tmp: re-bound over the private /tmp
            continue
        if _traversable(root):
            continue
        blocker = _blocking_ancestor(root)
        if blocker is None:  # readable path but unreadable leaf: nothing a mount can fix
            return None
        if blocker not in masks:
            masks.append(blocker)
        binds.append(root)
    return {
        "readonly_root": True,
        "masks": masks,
        "binds": binds,
        "world_writable": world_writable,
        "tmpfs_bytes": limits.tmpfs_bytes,
        "scratch_bytes": limits.scratch_bytes,
    }


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _rlimits(limits: SandboxLimits, nproc: int) -> dict[str, tuple[int, int]]:
    cpu = max(1, math.ceil(limits.cpu_time_s))
    return {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_CORE": (0, 0),
    }


def _remove_stale_scratch() -> None:
    """Delete scratch directories whose creator died before cleaning up (e.g. a reward worker
    killed on timeout mid-run). Names carry the creator's pid."""
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_SCRATCH_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _write_files(scratch: str, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = os.path.normpath(os.path.join(scratch, rel))
        if os.path.isabs(rel) or not path.startswith(scratch + os.sep):
            raise ValueError(f"sandbox file {rel!r} must be a relative path inside the scratch directory")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def run_untrusted(
    code: str,
    stdin: str | bytes = "",
    limits: SandboxLimits | None = None,
    *,
    files: Mapping[str, str | bytes] | None = None,
    argv: list[str] | None = None,
) -> SandboxResult:
    """Run Python ``code`` (saved as ``main.py`` in a fresh scratch directory) and report.

    ``stdin`` is fed to the program; ``files`` are extra files put next to ``main.py``;
    ``argv`` replaces the command (default ``[python, "-E", "-s", "-B", "main.py"]``; use it
    to run other programs, e.g. ``["/bin/sh", "-c", "..."]``). Never raises for anything the
    program does; raises only for bad arguments or when the sandbox itself cannot start.
    """
    limits = limits or SandboxLimits()
    caps = _caps(limits.network)
    python = limits.python or sys.executable
    t0 = time.monotonic()
    _remove_stale_scratch()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-"))
    uid: int | None = None
    status_r = status_w = -1
    stdin_file = None
    try:
        _write_files(scratch, {"main.py": code, **(files or {})})
        stdin_path = os.path.join(os.path.dirname(scratch), os.path.basename(scratch) + ".stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        stdin_file = open(stdin_path, "rb")
        os.unlink(stdin_path)

        mounts = _mount_plan(python, limits, scratch) if caps.namespaces else None
        can_drop = caps.root and (mounts is not None or _traversable(python))
        if can_drop:
            uid = _take_uid()
            if not caps.namespaces:
                _kill_uid(uid)  # leftovers of an earlier run with this uid, if any
                os.chown(scratch, uid, uid)
                for dirpath, dirs, names in os.walk(scratch):
                    for n in dirs + names:
                        os.chown(os.path.join(dirpath, n), uid, uid)
        nproc = limits.max_processes + 1  # + the reaper
        if not caps.root:
            nproc += len(_pids_of_uid(os.getuid()))
        status_r, status_w = os.pipe()
        plan = {
            "status_fd": status_w,
            "cwd": scratch,
            "uid": uid,
            "mounts": mounts,
            "rlimits": _rlimits(limits, nproc),
            "argv": argv or [python, "-E", "-s", "-B", "main.py"],
            "env": _clean_env(scratch),
        }
        cmd = [*caps.prefix, sys.executable, "-I", "-S", "-B", _BOOT, json.dumps(plan)]
        proc = subprocess.Popen(
            cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_clean_env(scratch), cwd=scratch, pass_fds=(status_w,),
            # In a pid namespace the tree dies with its init; stay in our process group so a
            # kill of the calling reward worker's group takes the sandbox down too.
            start_new_session=not caps.namespaces,
        )
        os.close(status_w)
        status_w = -1
        result = _supervise(proc, limits, caps, uid, t0)
        report = _read_report(status_r)
        _finish(result, report, limits, caps)
        return result
    finally:
        if uid is not None and not caps.namespaces:
            _kill_uid(uid)
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if stdin_file is not None:
            stdin_file.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            with _uid_lock:
                _uid_used.discard(uid)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_tree(proc: subprocess.Popen, caps: _Caps, uid: int | None) -> None:
    """SIGKILL everything the run started (without waiting; the caller keeps draining pipes).

    With namespaces: kill the namespace's init (the child of ``unshare``); the kernel then
    kills every process in the pid namespace, and ``unshare`` exits and is reaped by us.
    (``unshare --kill-child`` alone is not enough: dropping the uid clears the parent-death
    signal it relies on; the boot script arms it again, for when the caller dies.)
    """
    if caps.namespaces:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        _kill_uid(uid)


def _supervise(proc: subprocess.Popen, limits: SandboxLimits, caps: _Caps, uid: int | None,
               t0: float) -> SandboxResult:
    deadline = t0 + limits.wall_time_s
    cap = limits.max_output_bytes
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    killed: str | None = None
    killed_at: float | None = None
    exited_at: float | None = None
    sel = selectors.DefaultSelector()
    for name, f in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ, name)

    def kill(reason: str) -> None:
        nonlocal killed, killed_at
        killed, killed_at = reason, time.monotonic()
        _kill_tree(proc, caps, uid)

    try:
        while sel.get_map():
            now = time.monotonic()
            running = proc.poll() is None
            if killed is None and running and now >= deadline:
                kill("wall_time")
            if running and killed_at is not None and now - killed_at > 2.0:
                proc.kill()  # the launcher itself is stuck: take it down too
            if not running and exited_at is None:
                exited_at = now
                if not caps.namespaces:  # no pid namespace: reap what the program left behind
                    _kill_tree(proc, caps, uid)
            if exited_at is not None and now - exited_at > 1.0:
                break  # something we could not kill still holds the pipes; stop reading
            timeout = 0.05 if (exited_at or killed_at) else max(0.0, min(deadline - now, 0.2))
            for key, _ in sel.select(timeout):
                name = key.data
                try:
                    chunk = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = cap - len(bufs[name])
                if len(chunk) > room:  # keep draining (so nothing blocks on a full pipe) but drop it
                    bufs[name] += chunk[:max(room, 0)]
                    truncated[name] = True
                    if killed is None and proc.poll() is None:
                        kill("output_limit")
                else:
                    bufs[name] += chunk
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        killed = killed or "wall_time"
        _kill_tree(proc, caps, uid)
        proc.kill()
        proc.wait()
    stderr = bufs["stderr"].decode("utf-8", "replace")
    if killed:  # unshare's own complaint about re-raising SIGKILL on itself is noise
        stderr = stderr.replace("unshare: sigprocmask unblock failed: Invalid argument\n", "")
    return SandboxResult(
        returncode=None,
        stdout=bufs["stdout"].decode("utf-8", "replace"),
        stderr=stderr,
        timed_out=killed == "wall_time",
        killed_reason=killed,
        stdout_truncated=truncated["stdout"],
        stderr_truncated=truncated["stderr"],
        wall_time_s=time.monotonic() - t0,
    )


def _read_report(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    try:
        return json.loads(data.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _finish(result: SandboxResult, report: dict | None, limits: SandboxLimits, caps: _Caps) -> None:
    notes = list(report.get("notes", [])) if report else []
    if caps.namespaces:
        notes += ["pid_namespace", "mount_namespace"] + ([] if limits.network else ["network_namespace"])
    notes += ["rlimits", "clean_env", "output_cap"]
    result.protections = tuple(notes)
    result.network_isolated = caps.namespaces and not limits.network
    if report is None:
        return  # killed by us (killed_reason set) or the sandbox died before reporting
    if "setup_error" in report:
        result.killed_reason = "setup"
        return
    status = report["status"]
    result.cpu_time_s = float(report.get("cpu_s", 0.0))
    if result.killed_reason is None:
        result.returncode = os.waitstatus_to_exitcode(status)
    if result.killed_reason is None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        cpu_limit = max(1, math.ceil(limits.cpu_time_s))
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and result.cpu_time_s >= cpu_limit - 0.05):
            result.killed_reason = "cpu_time"
    if (result.killed_reason is None and result.returncode not in (0, None)
            and "MemoryError" in result.stderr[-2000:]):
        result.killed_reason = "memory"
