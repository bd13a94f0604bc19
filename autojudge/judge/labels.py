"""The label rows of an `autojudge mine` file, as training reads them and a resumed run finds them.

A mining file holds a meta row, then per finished problem its `label` rows and one `problem` row. The problems
still in flight checkpoint their rows to `<file>.inflight` (mining/store.py): an `answer` row, then a `step` row
per labelled mismatch carrying its `label`. A checkpointed label is final when written (a resumed search goes on
after it), so training may read those of unfinished problems too.
"""

from __future__ import annotations

import json
from pathlib import Path

from autojudge.errors import AutojudgeError
from autojudge.jsonl import read_jsonl

LABEL_KEYS = ("problem_id", "prompt_ids", "prefix_ids", "draft_token", "important")


def inflight_path(labels: Path) -> Path:
    return Path(f"{labels}.inflight")


def inflight_rows(path: Path, done: set[str]) -> dict[str, list[dict]]:
    """Problem id -> checkpoint rows of each unfinished problem, from its `answer` row on; a torn tail is dropped."""
    rows: dict[str, list[dict]] = {}
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                row = None
            if row is None:
                break
            problem_id = row["problem_id"]
            if row["kind"] == "answer":
                rows[problem_id] = [row]  # a problem restarted from scratch starts its rows again
            elif problem_id in rows:
                rows[problem_id].append(row)
    return {problem_id: r for problem_id, r in rows.items() if problem_id not in done}


def checkpointed_labels(labels: Path, finished: set[str]) -> dict[str, list[dict]]:
    """Problem id -> the labels checkpointed so far, for each problem in flight (answered, not in `finished`)."""
    return {problem_id: [row["label"] for row in rows if row["kind"] == "step"]
            for problem_id, rows in inflight_rows(inflight_path(labels), finished).items()}


def read_label_rows(path: Path, unfinished: bool = False) -> list[dict]:
    """Mismatch rows of an `autojudge mine` file (its meta and per-problem records skipped); with `unfinished`,
    then the checkpointed labels of the problems it has not finished."""
    rows, finished = [], set()
    for lineno, row in read_jsonl(path):
        kind = row.get("kind", "label")
        if kind == "problem":
            finished.add(row.get("problem_id"))
        if kind != "label":
            continue
        missing = [k for k in LABEL_KEYS if k not in row]
        if missing:
            raise AutojudgeError(
                f"{path}:{lineno}: label row lacks {', '.join(missing)}; expected rows written by `autojudge mine`"
            )
        rows.append(row)
    if unfinished:
        for labels in checkpointed_labels(path, finished).values():
            rows += labels
    if not rows:
        raise AutojudgeError(f"{path} holds no labelled mismatches; run `autojudge mine` on more problems")
    return rows
