"""Reading the project's JSONL files (datasets, labels, annotations, prompts) with one-line errors."""

from __future__ import annotations

import json

from autojudge.errors import AutojudgeError


def read_jsonl(source, name: str | None = None) -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line of `source` (a path, or anything with read_bytes()); what
    is not UTF-8 or not JSON is refused naming the file and the line."""
    name = name or str(source)
    rows = []
    for number, raw in enumerate(source.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AutojudgeError(f"{name}:{number}: not UTF-8 text; re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise AutojudgeError(f"{name}:{number}: not valid JSON ({err.msg}); fix or remove the line") from None
    return rows
