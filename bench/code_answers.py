"""How long code answers are, and how many carry test code inside their code block, per mode and threshold of
one or more eval rows files (`autojudge eval --dataset humaneval ... --out R.json` writes R.json.partial.jsonl).
Prints a markdown table.

    python bench/code_answers.py bench/results/eval/humaneval-100-163-w16.json.partial.jsonl [...]

Why: a judge mined on "does the answer stay right" may let the draft append tests after the function where the
target closes the block; the tests still pass, the answer grows, and no answer arrives sooner.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autojudge.eval.report import aggregate  # noqa: E402
from autojudge.jsonl import read_jsonl  # noqa: E402

FIRST_BLOCK = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)
# A line of test code: an assertion, a print, or the comment the 0.5B draft opens its tests with.
TEST_LINE = re.compile(r"^\s*(assert |print\(|# ?(Check|Test|Example))", re.M)


def has_test_code(text: str) -> bool:
    block = FIRST_BLOCK.search(text)
    return bool(TEST_LINE.search(block.group(1) if block else text))


def summarise(path: Path) -> list[tuple[str, str, int, int, float]]:
    rows = [row for _, row in read_jsonl(path)[1:]]  # the first line is the run's config
    tests = Counter((r["mode"], r["threshold"]) for r in rows if has_test_code(r["text"]))
    results = sorted(aggregate(rows), key=lambda r: (r["mode"], r["threshold"] or 0.0))
    return [(r["mode"], "-" if r["threshold"] is None else f"{r['threshold']:g}", r["n"],
             tests[r["mode"], r["threshold"]], r["mean_new_tokens"]) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.rows:
        print(f"\n{path}\n\n| mode | threshold | answers | with test code in the block | mean new tokens |")
        print("|---|---|---|---|---|")
        for mode, threshold, n, tests, tokens in summarise(path):
            print(f"| {mode} | {threshold} | {n} | {tests} | {tokens:.1f} |")


if __name__ == "__main__":
    main()
