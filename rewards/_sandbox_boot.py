"""Inner half of the sandbox: sets up the namespaces' view of the machine, then becomes nobody.

Launched by :func:`rewards.sandbox.run_untrusted` as
``[unshare ...] python -I -S -B _sandbox_boot.py <json plan>``. Standard library only, and
nothing from ``rewards`` (``-I`` keeps the repo off ``sys.path``).

Steps, in order (the mount steps only when running in a private mount namespace):

1. Read the staged files (the program, its extra files) from the host scratch directory.
2. Make the whole mount tree read-only (``mount_setattr(2)``, recursive), cover directories the
   sandbox user cannot enter (e.g. ``/root`` holding the interpreter) with an empty tmpfs and
   bind back only the paths it needs, cover the world-writable directories (``/tmp``,
   ``/var/tmp``, ``/dev/shm``) with small private tmpfs mounts, and mount a size-capped tmpfs
   as the scratch directory, holding the staged files.
3. ``chdir`` into the scratch directory, drop supplementary groups, gid and uid.
4. Fork. The child sets the resource limits, closes stray descriptors and ``execve``-s the
   program. The parent (pid 1 of the namespace when there is one) reaps everything and, when
   the program ends, writes a one-line JSON report to the status descriptor and exits: with a
   pid namespace, the kernel then kills whatever the program left behind.

Any failure before the program starts exits with code 126 (a message on stderr and in the
report): the sandbox fails closed.
"""

import ctypes
import json
import os
import resource
import sys

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
AT_FDCWD = -100
PR_SET_PDEATHSIG = 1
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc, libc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data):
    rc = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, libc, f"mount {source!r} on {target!r}")


def _read_tree(root):
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mode & 0o777)
    return files


def _setup_mounts(m, cwd, uid, notes):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    staged = _read_tree(cwd)
    fds = {src: os.open(src, os.O_PATH | os.O_DIRECTORY) for src in m["binds"]}
    if m["readonly_root"]:
        attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        rc = libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
            ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc == 0:
            notes.append("readonly_root")
        elif ctypes.get_errno() != 38:  # ENOSYS: kernel too old; the other layers still hold
            _check(rc, libc, "mount_setattr(/, read-only)")
    for target in m["masks"]:
        _mount(libc, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for target in m["world_writable"]:
        _mount(libc, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
               f"mode=1777,size={m['tmpfs_bytes']}")
    if m["world_writable"]:
        notes.append("private_tmp")
    # Binds come last, so an interpreter under a masked or private directory (/root, or a
    # checkout in /tmp) is put back on top of the new mounts.
    for src, fd in fds.items():
        os.makedirs(src, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", src, None, MS_BIND, None)
        os.close(fd)
    os.makedirs(cwd, mode=0o700, exist_ok=True)
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    _mount(libc, "tmpfs", cwd, "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=0700,size={m['scratch_bytes']}{owner}")
    notes.append("scratch_tmpfs")
    for rel, (data, mode) in staged.items():
        path = os.path.join(cwd, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        if uid is not None:
            os.chown(path, uid, uid)
            d = os.path.dirname(path)
            while d != cwd:
                os.chown(d, uid, uid)
                d = os.path.dirname(d)


def main():
    plan = json.loads(sys.argv[1])
    status_fd = plan["status_fd"]
    notes = []
    uid = plan.get("uid")
    try:
        if plan.get("mounts"):
            _setup_mounts(plan["mounts"], plan["cwd"], uid, notes)
        os.chdir(plan["cwd"])
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getegid() != uid:
                raise OSError("could not drop privileges")
            notes.append("uid_drop")
            # Changing credentials cleared the parent-death signal `unshare --kill-child` set:
            # arm it again, so the namespace dies with its launcher.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except Exception as exc:  # noqa: BLE001 - fail closed with a reason
        msg = f"sandbox setup failed: {exc}"
        os.write(2, (msg + "\n").encode())
        os.write(status_fd, (json.dumps({"setup_error": msg, "notes": notes}) + "\n").encode())
        os._exit(126)
    pid = os.fork()
    if pid == 0:
        try:
            for name, (soft, hard) in plan["rlimits"].items():
                resource.setrlimit(getattr(resource, name), (soft, hard))
            os.closerange(3, 1 << 16)
            os.execve(plan["argv"][0], plan["argv"], plan["env"])
        except BaseException as exc:  # noqa: BLE001 - report anything and leave
            os.write(2, f"sandbox: cannot start program: {exc!r}\n".encode())
        os._exit(127)
    # Reaper: collect every child (orphans re-parent here when we are pid 1) until ours is done.
    while True:
        try:
            got, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(125)
        except InterruptedError:
            continue
        if got == pid:
            break
    report = {
        "status": status,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "notes": notes,
    }
    os.write(status_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
