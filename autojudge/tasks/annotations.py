"""Judge Decoding annotations built from GSM8K reference solutions, with no human and no model.

A Judge Decoding head learns which response tokens are still acceptable: everything before a response's first
error is, everything from it on is not. From each reference solution this builds a correct response (every token
acceptable, `first_error` null) and copies in which one computed number (a calculator result of the solution,
or its final answer) has one digit changed, with `first_error` at the character offset of that digit. Responses
are the solutions as a model would write them under our prompt: calculator annotations `<<48/2=24>>` removed
and the closing `#### 72` written as `The answer is 72.`. The same seed gives the same file.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from autojudge.tasks.datasets import Problem
from autojudge.tasks.prompts import build_messages

CONSTRUCTION = (
    "GSM8K reference solutions with calculator annotations removed and '#### N' written as 'The answer is N.': "
    "one correct copy per problem (first_error null), and per problem `altered` copies in which one digit of one "
    "computed number (a calculator result or the final answer, chosen at random) is replaced by another digit; "
    "first_error is that digit's character offset"
)
# A calculator annotation and the result written right after it.
_CALCULATION = re.compile(r"<<[^>]*>>(-?[\d,]*\.?\d+)?")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def response_and_results(solution: str) -> tuple[str, list[tuple[int, int]]]:
    """(the solution as a response, the (start, end) offsets of its computed numbers in that response)."""
    parts, results, at = [], [], 0
    length = 0
    final = _FINAL.search(solution)
    body, answer = (solution[: final.start()], final.group(1)) if final else (solution, None)
    for match in _CALCULATION.finditer(body):
        parts.append(body[at : match.start()])
        length += match.start() - at
        number = match.group(1)
        if number:
            results.append((length, length + len(number)))
            parts.append(number)
            length += len(number)
        at = match.end()
    parts.append(body[at:])
    response = "".join(parts).rstrip()
    if answer is not None:
        response += f"\nThe answer is {answer}."
        start = len(response) - len(answer) - 1
        results.append((start, start + len(answer)))
    return response, results


def _alter(response: str, span: tuple[int, int], rng: random.Random) -> tuple[str, int]:
    """The response with one digit of the number at `span` replaced; the offset of that digit."""
    digits = [i for i in range(*span) if response[i].isdigit()]
    i = rng.choice(digits)
    new = str((int(response[i]) + rng.randint(1, 9)) % 10)
    return response[:i] + new + response[i + 1 :], i


def build_annotations(problems: list[Problem], altered: int = 1, seed: int = 0) -> Iterator[dict]:
    """Annotation rows (`prompt` as chat messages, `response`, `first_error`, `problem_id`) for GSM8K problems."""
    for problem in problems:
        response, results = response_and_results(problem.meta["solution"])
        base = {"problem_id": problem.problem_id, "prompt": build_messages(problem)}
        yield {**base, "response": response, "first_error": None}
        # Seeded per problem, so a problem's copies do not depend on which problems come before it.
        rng = random.Random(f"{seed}/{problem.problem_id}")
        for _ in range(altered if results else 0):
            text, first_error = _alter(response, rng.choice(results), rng)
            yield {**base, "response": text, "first_error": first_error}
