import json
from importlib import resources

import pytest

from autojudge.errors import AutojudgeError
from autojudge.tasks.checkers import (
    extract_code,
    extract_gsm8k_answer,
    humaneval_program,
    load_checker,
)
from autojudge.tasks.datasets import Problem, canonical_number, load_dataset
from autojudge.tasks.prompts import build_messages


def _gsm8k_rows(split):
    with resources.files("autojudge").joinpath(f"data/gsm8k/{split}.jsonl").open() as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split, size", [("train", 7473), ("test", 1319)])
def test_vendored_gsm8k_loads(split, size):
    problems = load_dataset("gsm8k", split)
    assert len(problems) == size
    assert len({p.problem_id for p in problems}) == size
    assert all(p.task == "gsm8k" and p.expected is not None for p in problems)


def test_real_gsm8k_solutions_extract_to_their_answer():
    rows, problems = _gsm8k_rows("test"), load_dataset("gsm8k", "test")
    for row, problem in zip(rows, problems):
        solution = row["answer"]
        final = solution.rsplit("####", 1)[-1].strip()
        body = solution.rsplit("####", 1)[0]
        assert extract_gsm8k_answer(solution) == problem.expected
        # The same worked solution in the formats models use.
        assert extract_gsm8k_answer(f"{body}The answer is {final}.") == problem.expected
        assert extract_gsm8k_answer(f"{body}So the answer is $\\boxed{{{final}}}$.") == problem.expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is $1,234.50.", "1234.5"),
    ("so the total is \\boxed{18.00}", "18"),
    ("\\boxed{\\$1{,}000} dollars", "1000"),
    ("\\boxed{\\text{42 apples}}", "42"),
    ("#### -5", "-5"),
    ("She has 5-3=2 apples left.", "2"),
    ("The answer is: **42**", "42"),
    ("The answer is 7. Check: 7 + 1 = 8", "7"),
    ("It rose by 20%.", "20"),
    ("The temperature is -3.5 degrees.", "-3.5"),
    ("You need .5 cups", "0.5"),
    ("She paid $18.", "18"),
    ("1,000,000 people", "1000000"),
    ("3 apples and 4 pears, 7 fruits in total", "7"),
    ("I cannot tell.", None),
    ("", None),
])
def test_gsm8k_extraction_formats(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.00", "18"), ("0.50", "0.5"), ("-0", "0"), ("-0.0", "0"), ("1,234", "1234"), ("100", "100"),
    ("abc", None), ("nan", None), ("123456789012345678901234567890123", "123456789012345678901234567890123"),
    ("1e999999999", None), ("-1e-999999999", None),  # a billion digits written out; no answer is that large
])
def test_canonical_number(text, expected):
    assert canonical_number(text) == expected


def test_equal_numbers_compare_equal():
    assert extract_gsm8k_answer("The answer is 18.00") == extract_gsm8k_answer("#### 18")
    assert extract_gsm8k_answer("The answer is 18.5") != extract_gsm8k_answer("#### 18")


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n\n{"question": "q", "answer": "#### 1,000", "id": "x"}\n')
    problems = load_dataset(str(path))
    assert [(p.problem_id, p.expected) for p in problems] == [("mine/0", "2"), ("x", "1000")]


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "#### 2"}\n{"question": ', ":2: not valid JSON"),
    ('{"question": "q"}\n', "expected an object with 'question' and 'answer'"),
    ('{"question": "q", "answer": "two"}\n', "must end in '#### <number>'"),
    ("\n", "no problems"),
    (b'{"question": "q", "answer": "#### 2"}\n{"question": "caf\xe9", "answer": "#### 3"}\n', ":2: not UTF-8 text"),
])
def test_malformed_jsonl_dataset(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AutojudgeError, match=message):
        load_dataset(str(path))


def test_missing_or_unknown_dataset(tmp_path):
    with pytest.raises(AutojudgeError, match="file not found"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(AutojudgeError, match="expected gsm8k, humaneval or a PATH.jsonl"):
        load_dataset("mmlu")
    with pytest.raises(AutojudgeError, match="only 'test'"):
        load_dataset("humaneval", "train")


@pytest.fixture(scope="module")
def humaneval():
    return {p.problem_id: p for p in load_dataset("humaneval")}


def test_humaneval_loads_offline(humaneval):
    assert len(humaneval) == 164
    assert humaneval["HumanEval/0"].meta["entry_point"] == "has_close_elements"


def test_extract_code():
    answer = "Sure:\n```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_code(answer) == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off by the budget
    assert extract_code("    return 1\n") == "    return 1\n"


def test_humaneval_program_shapes(humaneval):
    problem = humaneval["HumanEval/0"]
    body = "    return True\n"
    full = "from typing import List\n\ndef has_close_elements(numbers, threshold):\n    return True\n"
    assert humaneval_program(problem, body).startswith(problem.meta["prompt"] + body)
    chat = humaneval_program(problem, f"Here you go:\n```python\n{full}```\nIt works.")
    assert full in chat and "It works" not in chat
    assert humaneval_program(problem, "return True").startswith(problem.meta["prompt"] + "    return True")
    assert humaneval_program(problem, body).endswith("check(has_close_elements)\n")


def test_prompts(humaneval):
    question = "Tom has {x} apples and 3 more."
    problem = Problem("p", "gsm8k", question, "3")
    [message] = build_messages(problem)
    assert message["role"] == "user" and question in message["content"] and "The answer is" in message["content"]
    [code] = build_messages(humaneval["HumanEval/0"])
    assert "```python" in code["content"] and humaneval["HumanEval/0"].question in code["content"]
    assert build_messages(problem, "Q: {question}\nA:")[0]["content"] == f"Q: {question}\nA:"
    with pytest.raises(AutojudgeError, match="must contain"):
        build_messages(problem, "no placeholder")


def test_load_checker():
    assert load_checker("autojudge.tasks.checkers:gsm8k_checker").__name__ == "gsm8k_checker"
    for spec in ("nocolon", "autojudge.nope:f", "autojudge.tasks.checkers:nope"):
        with pytest.raises(AutojudgeError, match="--checker"):
            load_checker(spec)
