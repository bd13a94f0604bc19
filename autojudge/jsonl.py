"""Reading the project's JSONL files (datasets, labels, annotations, prompts) with one-line errors, and comparing the
settings their headers were made with before a run resumes them."""

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


def changed_settings(old: dict, new: dict, keys, before_key: dict, unknown_ok=()) -> list[str]:
    """The `keys` whose settings differ between the header a file was made with (`old`) and a resuming run's.

    `before_key`: what a header written before a key existed was made with. A key in `unknown_ok` differs only
    where both headers know it (not None): one side cannot say, or had nothing the setting shaped.
    """
    changed = []
    for key in keys:
        before, now = old.get(key, before_key.get(key)), new.get(key, before_key.get(key))
        if key in unknown_ok and (before is None or now is None):
            continue
        if before != now:
            changed.append(key)
    return changed
