"""What a mined labels file holds so far: finished problems, labels, share important, cost per problem.

    python bench/mining_summary.py data/mined/default/gsm8k-train-640.jsonl [--csv per-problem.csv]

Prints Markdown for bench/RESULTS.md: one summary table (finished problems, and the unfinished ones whose
checkpoints wait in `<file>.inflight` for the next `--resume`) and the per-problem rows, which `--csv` writes
to a file instead once they are too many to read.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autojudge.judge.labels import checkpointed_labels  # noqa: E402
from autojudge.mining.store import read_rows  # noqa: E402

COLUMNS = ["problem", "target correct", "answer tokens", "mismatches", "important", "generated tokens",
           "reused tokens", "hours in flight", "batch size"]


def per_problem(rows: list[dict]) -> list[list]:
    return [[r["problem_id"], r["correct"], len(r["answer_ids"]), r["n_mismatches"], r["n_important"],
             r["cost"]["generated_tokens"], r["cost"]["reused_tokens"], r["wall_s"] / 3600, r.get("batch_size", 1)]
            for r in rows if r["kind"] == "problem"]


def inflight(labels_path: Path) -> tuple[int, int, int]:
    """(unfinished problems with an answer, their checkpointed labels, of which important), as --resume sees them."""
    done = {r["problem_id"] for r in read_rows(labels_path, "problem")}
    by_problem = checkpointed_labels(labels_path, done)
    labels = [label for problem_labels in by_problem.values() for label in problem_labels]
    return len(by_problem), len(labels), sum(label["important"] for label in labels)


def summary(problems: list[list], pending: tuple[int, int, int]) -> list[list]:
    finished = len(problems)
    labels = sum(p[3] for p in problems)
    important = sum(p[4] for p in problems)
    with_labels = sum(p[3] > 0 for p in problems)

    def share(a, b):
        return f"{a / b:.1%}" if b else "n/a"

    rows = [["finished problems (with labels)", f"{finished} ({with_labels})"],
            ["target answers correct", share(sum(p[1] for p in problems), finished)],
            ["labels, important", f"{labels}, {important} ({share(important, labels)})"],
            ["mismatches per problem (median)", f"{statistics.median(p[3] for p in problems):.0f}" if problems else "n/a"],
            ["answer tokens (median)", f"{statistics.median(p[2] for p in problems):.0f}" if problems else "n/a"],
            ["generated / reused tokens per label",
             f"{sum(p[5] for p in problems) / labels:.0f} / {sum(p[6] for p in problems) / labels:.0f}" if labels
             else "n/a"]]
    for size in sorted({p[8] for p in problems}):
        hours = [p[7] for p in problems if p[8] == size]
        rows.append([f"hours in flight per problem at batch {size} (median, {len(hours)} problems)",
                     f"{statistics.median(hours):.2f}"])
    rows.append(["unfinished, checkpointed: problems, labels (important)", f"{pending[0]}, {pending[1]} ({pending[2]})"])
    return rows


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(c):
        return "yes" if c is True else "no" if c is False else f"{c:.2f}" if isinstance(c, float) else str(c)

    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", type=Path, help="a labels file written by `autojudge mine`")
    parser.add_argument("--csv", type=Path, default=None, help="write the per-problem rows here instead of printing")
    args = parser.parse_args()
    if not args.labels.exists():
        parser.error(f"no labels file at {args.labels}: pass the --out of an `autojudge mine` run")
    problems = per_problem(read_rows(args.labels))
    print(markdown(["", args.labels.name], summary(problems, inflight(args.labels))))
    if args.csv is None:
        print("\n" + markdown(COLUMNS, problems))
    else:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([COLUMNS, *problems])
        print(f"\n{len(problems)} per-problem rows in {args.csv}")


if __name__ == "__main__":
    main()
