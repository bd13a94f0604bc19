"""Run untrusted generated code in a locked-down subprocess, never in our own interpreter.

A supervisor (`_SUPERVISOR`, our own code in a separate interpreter) starts the program with what the
machine allows, and reports what held (`Isolation`; `isolation()` probes the machine once):

- namespaces, as root or wherever unprivileged user namespaces are allowed: a network namespace whose
  loopback is down (no connection in or out, 127.0.0.1 included); a PID namespace whose init is the
  supervisor, so the program cannot signal anything outside it and every descendant, `setsid` ones
  included, dies with it; an IPC namespace; a mount namespace whose root holds only read-only system
  directories, the interpreter's prefix, the working directory (/sandbox) and empty private /tmp,
  /var/tmp and /dev/shm. Without them the supervisor, a child subreaper, kills and reaps every descendant
  it can find at the end, and TMPDIR points into the working directory, which is removed afterwards.
- a memory cgroup (v2, or the v1 memory hierarchy) when one can be made and joined, so `memory_mb` caps
  the whole tree. Without one the process limit drops to `_UNCAPPED_PROCESSES`, which bounds the tree to
  that many times `memory_mb`.
- as root, a uid of its own for each concurrent run (claimed with a lock file from a range far above
  real users), so RLIMIT_NPROC, which does not bind root, counts that run alone and no run can signal
  another. Where our user namespace does not map that range, runs take turns as `nobody`. Not as root,
  the program runs as our own user.

Per-process limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, no core files, an empty
environment, no_new_privs (setuid binaries grant nothing), and a wall-clock timeout after which the
supervisor kills the tree. Limits are set by the supervisor in a fork of its own rather than by a
preexec_fn: preexec_fn runs Python between fork and exec, which can deadlock in a process with threads
(torch has many); the supervisor has a single thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autojudge.errors import AutojudgeError

_STDERR_TAIL = 2000
_MB = 1024 * 1024
# After the timeout the supervisor is asked to kill the tree; past this we kill its process group.
_GRACE_S = 5.0
_UNCAPPED_PROCESSES = 4
# Far above the uids that distributions hand out to users, services and /etc/subuid ranges.
_UID_BASE = 2_000_000_000
_UID_SLOTS = 256
_NOBODY = 65534
# Mounted read-only in the sandbox's root, along with the interpreter's prefix; the ld.so cache and
# localtime keep the loader and `time` working as outside.
_SYSTEM_PATHS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime")

# A pass is the verdict file holding a fresh key, written only after the program ran to its end: an exit
# status can be faked by `sys.exit(0)` or `os._exit(0)` before the tests run. The key file is read and
# deleted before the program starts, so only code that goes looking through the bootstrap's memory could
# forge a verdict: accidental exits cannot.
_BOOTSTRAP = """\
import os, runpy, sys
with open("verdict.key") as f:
    key = f.read()
os.unlink("verdict.key")
verdict = os.path.abspath("verdict")
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
with open(verdict, "w") as f:
    f.write(key)
"""

# Runs as our user (only the program drops to the run's uid), single-threaded, with `python -I -B -S`,
# after a line `cfg = {...}` from `_run` (a literal rather than JSON: importing json costs more than
# the rest of its start). On the report fd it writes the Isolation that held, as three 0/1 fields, just
# before the program starts, then the program's wait status once it ended. Without namespaces, and
# for anything that fails before namespaces are entered, it carries on without them; a failure after
# entering them ends the run with no report, which is how `isolation()` learns not to ask for them.
_SUPERVISOR = r"""
import ctypes, os, resource, signal, sys, time

report = os.fdopen(cfg["report_fd"], "w", buffering=1)
os.set_inheritable(report.fileno(), False)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE, MS_RELATIME = 4096, 8192, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
try:
    libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    libc = None


def call(name, *args):
    if libc is None:
        raise OSError(f"no libc for {name}")
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def prctl(option, value):
    call("prctl", *(ctypes.c_ulong(a) for a in (option, value, 0, 0, 0)))


def mount(source, target, fstype, flags, data=None):
    call("mount", *(a if a is None else a.encode() for a in (source, target, fstype)),
         ctypes.c_ulong(flags), data if data is None else data.encode())


def bind(source, target, writable=False):
    if not os.path.lexists(source):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.mkdir(target)
    else:
        open(target, "w").close()
    mount(source, target, None, MS_BIND | MS_REC)
    # A remount must keep the flags the source mount already has: a user namespace may not drop them.
    kept = os.statvfs(source).f_flag
    flags = (kept & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)) | (MS_RELATIME if kept & 4096 else 0)
    flags |= MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if writable else MS_RDONLY)
    mount(None, target, None, flags)


def enter_new_root():
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = cfg["newroot"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=755")
    for path in cfg["binds"]:
        bind(path, root + path)
    for name in ("null", "zero", "full", "random", "urandom"):
        bind("/dev/" + name, root + "/dev/" + name, writable=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(root + path, exist_ok=True)
        os.chmod(root + path, 0o1777)
    os.mkdir(root + "/proc")
    bind(cfg["workdir"], root + "/sandbox", writable=True)
    # Moving the new root over / rather than only chroot-ing into it leaves no path to the old one,
    # even for a process that escapes a chroot.
    os.chdir(root)
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def start_program(held):
    limits = {name: (soft, hard) for name, soft, hard in cfg["limits"]}
    n = limits["RLIMIT_NPROC"][0]
    if not held["cgroup"]:
        n = min(n, cfg["uncapped_processes"])
    if held["namespaces"] and cfg["uid"] is None:
        # In a user namespace of our own, both supervisors share the program's uid and count with it.
        n += 2
    limits["RLIMIT_NPROC"] = (n, n)
    workdir = "/sandbox" if held["namespaces"] else cfg["workdir"]
    env = {} if held["namespaces"] else {"TMPDIR": workdir}
    report.write(" ".join(str(int(held[k])) for k in ("namespaces", "cgroup", "own_uid")) + "\n")
    pid = os.fork()
    if pid:
        return pid
    try:
        for sig in (signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for name, (soft, hard) in limits.items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        os.chdir(workdir)
        os.execve(cfg["python"], [cfg["python"], "-I", "-B", "-c", cfg["bootstrap"]], env)
    except BaseException as exc:
        os.write(2, f"autojudge sandbox: cannot start the program: {exc}\n".encode())
    os._exit(127)


def wait_for(pid):
    # As init or subreaper we inherit orphans; reap them while waiting so none stays a zombie.
    while True:
        done, status = os.wait()
        if done == pid:
            return status


def descendants():
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_descendants():
    while pids := descendants():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.005)


child = None


def stop(signum, frame):
    if child:
        os.kill(child, signal.SIGKILL)


signal.signal(signal.SIGTERM, stop)
held = {"namespaces": False, "cgroup": False, "own_uid": cfg["own_uid"]}
try:
    prctl(PR_SET_NO_NEW_PRIVS, 1)
except OSError:
    pass
if cfg["cgroup"]:
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        held["cgroup"] = True
    except OSError:
        pass
if cfg["namespaces"]:
    uid, gid = os.getuid(), os.getgid()
    try:
        call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWUSER if uid else 0))
        held["namespaces"] = True
    except OSError:
        pass
    if held["namespaces"] and uid:
        # Mapped to itself rather than to root: exec-ing the program as a non-root uid drops the
        # capabilities that creating the user namespace gave us.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
# Blocked until `child` is set, so a timeout that lands in between still reaches the child.
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
if held["namespaces"]:
    child = os.fork()
    if child == 0:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        enter_new_root()
        status = wait_for(start_program(held))
        report.write(f"{status}\n")
        # Our exit as init kills and reaps everything left in the PID namespace.
        os._exit(0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    sys.exit(0 if os.waitpid(child, 0)[1] == 0 else 1)
else:
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    child = start_program(held)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    status = wait_for(child)
    # Reaped, so its pid may be reused: a late timeout must not kill a stranger.
    child = None
    report.write(f"{status}\n")
    kill_descendants()
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 16
    # Counted per uid (as root, the run's own), threads included; generated solutions never need to fork.
    max_processes: int = 32

    def rlimits(self) -> list[tuple[str, int, int]]:
        return [
            ("RLIMIT_CPU", self.cpu_s, self.cpu_s + 1),
            ("RLIMIT_AS", self.memory_mb * _MB, self.memory_mb * _MB),
            ("RLIMIT_FSIZE", self.file_mb * _MB, self.file_mb * _MB),
            ("RLIMIT_NPROC", self.max_processes, self.max_processes),
            ("RLIMIT_CORE", 0, 0),
        ]


@dataclass(frozen=True)
class Isolation:
    """What held for a run, beyond the per-process limits that always hold (see the module docstring)."""

    namespaces: bool  # network, PID, IPC and mount namespaces with a private root
    cgroup: bool  # memory_mb caps the whole process tree
    own_uid: bool  # a uid no concurrent run shares


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    timed_out: bool
    returncode: int | None
    stderr_tail: str
    # None when the supervisor failed before starting the program.
    isolation: Isolation | None = None


def _world_executable(path: str) -> bool:
    real = Path(os.path.realpath(path))
    try:
        dirs_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
        mode = real.stat().st_mode
    except OSError:
        return False
    return dirs_ok and bool(mode & stat.S_IXOTH) and bool(mode & stat.S_IROTH)


def _interpreter(as_root: bool) -> str:
    # The real file, not a venv's link: the sandbox's root holds the interpreter's prefix, not the venv.
    if not as_root:
        return os.path.realpath(sys.executable)
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise AutojudgeError(
        "running as root, the code sandbox runs the program as an unprivileged uid, but no Python "
        "interpreter is reachable by it; install a system python3 (e.g. /usr/bin/python3) or run as a "
        "non-root user"
    )


def _binds(python: str) -> list[str]:
    prefix = os.path.dirname(os.path.dirname(python))
    covered = prefix == "/" or any(prefix == p or prefix.startswith(p + "/") for p in _SYSTEM_PATHS)
    return list(_SYSTEM_PATHS) if covered else [*_SYSTEM_PATHS, prefix]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@functools.cache
def _uid_pool() -> tuple[int, int]:
    """The first uid runs may claim and how many: a private range where our user namespace maps it,
    else `nobody` alone, so that runs take turns (root only)."""

    def mapped(kind: str) -> bool:
        try:
            lines = Path(f"/proc/self/{kind}_map").read_text().splitlines()
        except OSError:
            return False
        return any(
            int(inside) <= _UID_BASE and _UID_BASE + _UID_SLOTS <= int(inside) + int(count)
            for inside, _, count in (line.split() for line in lines)
        )

    return (_UID_BASE, _UID_SLOTS) if mapped("uid") and mapped("gid") else (_NOBODY, 1)


@contextlib.contextmanager
def _claimed_uid() -> Iterator[int]:
    """A uid that no other run on this machine holds until we leave; root only."""
    locks = Path(tempfile.gettempdir()) / "autojudge-sandbox-uids"
    with contextlib.suppress(FileExistsError):
        locks.mkdir(mode=0o700)
    info = os.lstat(locks)
    # Anyone else who could write there could hold every slot, or swap a lock file for a link.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise AutojudgeError(f"{locks} must be a directory owned and writable only by root; remove it")
    first, count = _uid_pool()
    for blocking in (False, True):
        for uid in range(first, first + count):
            fd = os.open(locks / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)
            return


@functools.cache
def _cgroup_parent() -> Path | None:
    """Where a memory cgroup can be made: under our own v1 memory cgroup, else under the nearest v2
    ancestor that hands the memory controller to its children."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        ours = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in mounts:
        fields = line.split()
        tail = fields[fields.index("-") + 1 :]
        if tail[0] == "cgroup" and "memory" in tail[2].split(","):
            v1 = Path(fields[4])
        elif tail[0] == "cgroup2":
            v2 = Path(fields[4])
    for line in ours:
        _, controllers, path = line.split(":", 2)
        if v1 is not None and "memory" in controllers.split(","):
            here = v1 / path.lstrip("/")
            return here if os.access(here, os.W_OK) else None
    for line in ours:
        _, controllers, path = line.split(":", 2)
        if v2 is not None and controllers == "":
            here = v2 / path.lstrip("/")
            while True:
                with contextlib.suppress(OSError):
                    if "memory" in (here / "cgroup.subtree_control").read_text().split() and os.access(here, os.W_OK):
                        return here
                if here == v2:
                    return None
                here = here.parent
    return None


@contextlib.contextmanager
def _memory_cgroup(memory_mb: int) -> Iterator[Path | None]:
    parent = _cgroup_parent()
    if parent is None:
        yield None
        return
    group = parent / f"autojudge-sandbox-{secrets.token_hex(8)}"
    try:
        group.mkdir()
    except OSError:
        yield None
        return
    try:
        limit = str(memory_mb * _MB)
        # Swap would let the tree run past the cap instead of being killed at it.
        if (group / "memory.max").exists():
            settings = [("memory.max", limit), ("memory.swap.max", "0")]
        else:
            settings = [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)]
        for name, value in settings:
            if (group / name).exists():
                (group / name).write_text(value)
        yield group
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    # Empty already when namespaces held (the supervisor waited for its PID namespace to end);
    # without them, a descendant that escaped the supervisor's sweep is still in here.
    deadline = time.monotonic() + _GRACE_S
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                return
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.01)


def _read_report(fd: int) -> tuple[Isolation | None, int | None]:
    # Every writer is gone by now, but a supervisor killed mid-write must not leave us blocked.
    os.set_blocking(fd, False)
    try:
        lines = os.read(fd, 4096).decode(errors="replace").splitlines()
    except BlockingIOError:
        lines = []
    fields = lines[0].split() if lines else []
    if len(fields) != 3:
        return None, None
    held = Isolation(*(field == "1" for field in fields))
    status = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None
    return held, status


def _run(code: str, limits: SandboxLimits, namespaces: bool, cgroup: bool) -> SandboxResult:
    as_root = os.geteuid() == 0
    python = _interpreter(as_root)
    key = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_claimed_uid()) if as_root else None
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autojudge-sandbox-")))
        # Without namespaces the program, under its own uid, reaches its working directory through here.
        tmp.chmod(0o711)
        workdir, newroot = tmp / "work", tmp / "root"
        workdir.mkdir()
        newroot.mkdir()
        (workdir / "program.py").write_text(code)
        (workdir / "verdict.key").write_text(key)
        if uid is not None:
            for path in (workdir, workdir / "verdict.key"):
                os.chown(path, uid, uid)
        group = stack.enter_context(_memory_cgroup(limits.memory_mb)) if cgroup else None
        report_r, report_w = os.pipe()
        stack.callback(os.close, report_r)
        config = {
            "report_fd": report_w,
            "namespaces": namespaces,
            "cgroup": None if group is None else str(group),
            "uid": uid,
            "own_uid": uid is not None and uid >= _UID_BASE,
            "python": python,
            "bootstrap": _BOOTSTRAP,
            "limits": limits.rlimits(),
            "uncapped_processes": _UNCAPPED_PROCESSES,
            "workdir": str(workdir),
            "newroot": str(newroot),
            "binds": _binds(python),
            # The sandbox's /tmp lives in memory: its files count against the cgroup, and are bounded here.
            "tmpfs_mb": limits.memory_mb,
        }
        # Output goes to files (bounded by RLIMIT_FSIZE) rather than pipes we would have to drain.
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-B", "-S", "-c", f"cfg = {config!r}\n{_SUPERVISOR}"],
                    cwd=tmp,
                    env={},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=(report_w,),
                )
            finally:
                os.close(report_w)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.terminate()
                try:
                    proc.wait(timeout=_GRACE_S)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
            # Without namespaces, a program running as our own user may have killed the supervisor.
            _kill_group(proc.pid)
        held, status = _read_report(report_r)
        stderr = (tmp / "stderr").read_bytes()[-_STDERR_TAIL:].decode("utf-8", "replace")
        verdict = workdir / "verdict"
        finished = verdict.is_file() and not verdict.is_symlink() and verdict.read_text(errors="replace") == key
    exitcode = proc.returncode if status is None else os.waitstatus_to_exitcode(status)
    return SandboxResult(
        passed=not timed_out and status is not None and exitcode == 0 and finished,
        timed_out=timed_out,
        returncode=None if timed_out else exitcode,
        stderr_tail=stderr,
        isolation=held,
    )


@functools.cache
def isolation() -> Isolation:
    """What the sandbox can do on this machine, found by running an empty program; `run_code` asks
    only for that, so a machine that refuses namespaces costs one failed try, not one per run."""
    for namespaces in (True, False):
        held = _run("", SandboxLimits(), namespaces, cgroup=True).isolation
        if held is not None:
            return held
    return Isolation(namespaces=False, cgroup=False, own_uid=os.geteuid() == 0 and _uid_pool()[0] == _UID_BASE)


def run_code(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a script; passed means it ran to its end, exit status 0, within the limits."""
    can = isolation()
    return _run(code, limits, can.namespaces, can.cgroup)
