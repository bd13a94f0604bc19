"""Answer checkers: map a model's response text to a comparable outcome.

A checker is `check(problem, text) -> outcome` with a JSON-serialisable outcome; mining labels a
token important when swapping it changes the outcome. GSM8K outcomes are canonical number strings
(or None when no number is found); HumanEval outcomes are whether the tests pass.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from autojudge.errors import AutojudgeError
from autojudge.tasks.datasets import Problem, canonical_number
from autojudge.tasks.sandbox import SandboxLimits, run_code

Checker = Callable[[Problem, str], Any]

# A minus sign only counts when it does not follow a digit or word ("5-3" is not "-3").
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*[*$\\\s]*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*[$\\]*\s*(" + _NUMBER + ")")
_NUMBERS = re.compile(_NUMBER)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def _boxed_contents(text: str) -> list[str]:
    contents = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer: last \\boxed{}, else last '#### N', else last 'The answer is N', else the last number."""
    for boxed in reversed(_boxed_contents(text)):
        numbers = _NUMBERS.findall(boxed.replace("\\!", "").replace("{,}", ","))
        if numbers:
            return canonical_number(numbers[0])
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return canonical_number(found[-1])
    numbers = _NUMBERS.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_checker(problem: Problem, text: str) -> str | None:
    return extract_gsm8k_answer(text)


def extract_code(text: str) -> str:
    """The code of a chat answer: its ```python blocks (an unclosed one runs to the end), else the text."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    # Prefer the block that looks like the solution; answers often add a usage example after it.
    with_def = [b for b in blocks if "def " in b]
    return (with_def or blocks)[0]


def humaneval_program(problem: Problem, completion: str) -> str:
    """prompt + completion + tests + check(entry_point); `completion` is a chat answer or a raw body."""
    entry_point = problem.meta["entry_point"]
    prompt = problem.meta["prompt"]
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # A full function: keep the prompt for its imports and helpers; the new def overrides its stub,
        # whose docstring already makes it a complete function.
        solution = prompt + "\n" + code
    else:
        first = next((line for line in code.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            code = "".join("    " + line for line in code.splitlines(keepends=True))
        solution = prompt + code
    return f"{solution}\n\n{problem.meta['test']}\n\ncheck({entry_point})\n"


def humaneval_checker(problem: Problem, text: str, limits: SandboxLimits = SandboxLimits()) -> bool:
    return run_code(humaneval_program(problem, text), limits).passed


def load_checker(spec: str) -> Checker:
    """'module:function' -> the function (for custom tasks and tests)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AutojudgeError(f"--checker {spec!r}: expected MODULE:FUNCTION")
    try:
        checker = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise AutojudgeError(f"--checker {spec!r}: cannot load it ({err}); check the module is importable") from err
    if not callable(checker):
        raise AutojudgeError(f"--checker {spec!r} is not callable")
    return checker
