"""Append-only JSONL label store that survives kill -9.

Rows: one `meta` row first, then per problem its `label` rows followed by one `problem` row, written
in a single write + flush + fsync. A problem is complete once its `problem` row is on disk; resuming
truncates the file back to the last complete problem (dropping a torn tail) and skips finished ids.

Problems still in flight write their checkpoint rows (mining/miner.py) to `<file>.inflight`, each fsync'ed as
it comes: resuming hands an unfinished problem's rows back to its search, which goes on from its last
label, so a kill loses at most the continuation each problem was generating. Rows of finished problems are
dropped from that file when the run resumes; a fresh run deletes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock, Timeout

from autojudge.errors import AutojudgeError
from autojudge.jsonl import changed_settings
from autojudge.judge.labels import inflight_path, inflight_rows

# Meta keys that must match to resume: a different model, data or budget would mix incompatible labels.
RESUME_KEYS = ("target", "target_fingerprint", "target_weights", "draft", "draft_fingerprint", "draft_weights",
               "dtype", "dataset", "split", "max_new_tokens", "prompt_template", "checker", "skip_truncated")
# What a file written before a key existed was mined with.
_BEFORE_KEY = {"skip_truncated": False}
# Files from before weights were fingerprinted (the committed default-pair labels among them) cannot say which
# weights they were mined with, and a model built without a checkpoint has none to hash: such a file stays
# resumable on the path and architecture checks alone, and weights count as changed only when both sides know them.
_KNOWN_ONLY = ("target_weights", "draft_weights")


def _scan(path: Path) -> tuple[dict | None, int, set[str]]:
    """(meta row, byte offset just past the last complete problem, finished problem ids)."""
    meta, end, done = None, 0, set()
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            kind = row.get("kind")
            if kind == "meta" and meta is None:
                meta, end = row, offset
            elif kind == "problem":
                done.add(row["problem_id"])
                end = offset
    return meta, end, done


class LabelStore:
    def __init__(self, path: str | Path, meta: dict, resume: bool):
        self.path = Path(path)
        self.inflight_path = inflight_path(self.path)
        self.done: set[str] = set()
        self.resumed: dict[str, list[dict]] = {}  # problem id -> checkpoint rows of its interrupted search
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two miners on one file would both resume from the same point and write each problem twice.
        self._lock = FileLock(f"{self.path}.lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise AutojudgeError(
                f"{self.path} is being written by another `autojudge mine`; wait for it to end or choose another --out"
            ) from None
        try:
            self._open(meta, resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, meta: dict, resume: bool) -> None:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume:
            raise AutojudgeError(f"{self.path} already exists; pass --resume to continue it or choose another --out")
        if exists:
            old_meta, end, self.done = _scan(self.path)
            if old_meta is None:
                raise AutojudgeError(f"{self.path} is not a mining file (no meta row); choose another --out")
            changed = changed_settings(old_meta, meta, RESUME_KEYS, _BEFORE_KEY, _KNOWN_ONLY)
            if changed:
                raise AutojudgeError(
                    f"cannot resume {self.path}: {', '.join(changed)} differ from the run that wrote it; "
                    "use the same settings or another --out"
                )
            # Label rows of a problem without its problem row, or half a line, came from a crash.
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            self._file = open(self.path, "ab")
            self.resumed = inflight_rows(self.inflight_path, self.done)
        else:
            self._file = open(self.path, "wb")
            self._write(self._file, [{"kind": "meta", **meta}])
        # Rewritten with only the unfinished problems' rows, then replaced in one step: a kill leaves the old
        # file or the new one, never a mix.
        staging = self.inflight_path.with_name(self.inflight_path.name + ".new")
        with open(staging, "wb") as f:
            self._write(f, [row for rows in self.resumed.values() for row in rows])
        os.replace(staging, self.inflight_path)
        self._inflight = open(self.inflight_path, "ab")

    @staticmethod
    def _write(file, rows: list[dict]) -> None:
        file.write(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())

    def checkpoint(self, row: dict) -> None:
        self._write(self._inflight, [row])

    def add_problem(self, labels: list[dict], record: dict) -> None:
        self._write(self._file, [*labels, record])
        self.done.add(record["problem_id"])

    def close(self) -> None:
        self._file.close()
        self._inflight.close()
        self._lock.release()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: str | Path, kind: str | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]
