"""Run untrusted generated code in a locked-down subprocess, never in our own interpreter.

Limits: wall-clock timeout (the whole process group is killed), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
RLIMIT_NPROC, a fresh temporary working directory and an empty environment. RLIMIT_NPROC does not
bind root, so when we run as root the child runs as `nobody`, with an interpreter that `nobody` can
reach (a pyenv under /root is not).

The limits are set by a bootstrap inside the child rather than by a preexec_fn: preexec_fn runs
Python between fork and exec, which can deadlock in a process with threads (torch has many).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from autojudge.errors import AutojudgeError

_NOBODY = 65534
_STDERR_TAIL = 2000
_MB = 1024 * 1024

# A pass is the verdict file holding a fresh key, written only after the program ran to its end: an exit
# status can be faked by `sys.exit(0)` or `os._exit(0)` before the tests run. The key file is read and
# deleted before the program starts, so only code that goes looking through the bootstrap's memory could
# forge a verdict: accidental exits cannot.
_BOOTSTRAP = """\
import os, resource, runpy, sys
with open("verdict.key") as f:
    key = f.read()
os.unlink("verdict.key")
verdict = os.path.abspath("verdict")
for name, soft, hard in {limits!r}:
    resource.setrlimit(getattr(resource, name), (soft, hard))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
with open(verdict, "w") as f:
    f.write(key)
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 16
    # Counted per user, threads included; generated solutions never need to fork.
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
class SandboxResult:
    passed: bool
    timed_out: bool
    returncode: int | None
    stderr_tail: str


def _world_executable(path: str) -> bool:
    real = Path(os.path.realpath(path))
    try:
        dirs_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
        mode = real.stat().st_mode
    except OSError:
        return False
    return dirs_ok and bool(mode & stat.S_IXOTH) and bool(mode & stat.S_IROTH)


def _interpreter(as_nobody: bool) -> str:
    if not as_nobody:
        return sys.executable
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise AutojudgeError(
        "running as root, the code sandbox runs as user `nobody`, but no Python interpreter is "
        "reachable by it; install a system python3 (e.g. /usr/bin/python3) or run as a non-root user"
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_code(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` as a script; passed means it ran to its end, exit status 0, within the limits."""
    as_nobody = os.geteuid() == 0
    drop = {"user": _NOBODY, "group": _NOBODY, "extra_groups": []} if as_nobody else {}
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="autojudge-sandbox-") as tmp:
        workdir = Path(tmp)
        (workdir / "program.py").write_text(code)
        (workdir / "verdict.key").write_text(key)
        if as_nobody:
            for path in (workdir, workdir / "verdict.key"):
                os.chown(path, _NOBODY, _NOBODY)
        # Output goes to files (bounded by RLIMIT_FSIZE) rather than pipes we would have to drain.
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [_interpreter(as_nobody), "-I", "-B", "-c", _BOOTSTRAP.format(limits=limits.rlimits())],
                cwd=workdir,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                **drop,
            )
            timed_out = False
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            # Children that outlived the main process would otherwise keep running.
            _kill_group(proc.pid)
        stderr = (workdir / "stderr").read_bytes()[-_STDERR_TAIL:].decode("utf-8", "replace")
        verdict = workdir / "verdict"
        finished = verdict.is_file() and not verdict.is_symlink() and verdict.read_text(errors="replace") == key
    return SandboxResult(
        passed=not timed_out and returncode == 0 and finished,
        timed_out=timed_out,
        returncode=None if timed_out else returncode,
        stderr_tail=stderr,
    )
