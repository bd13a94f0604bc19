"""Cache snapshots: the KV cache rows of the problems in flight, saved when a batched run is interrupted.

Resuming a search (store.py) replays its labels without model calls, but each row's cache starts empty: the
prompt, the answer and the continuation so far run through both models again before the row labels anything.
At batch 64 on the 2-core CPU that prefill took ~25 minutes of every restart. A snapshot holds, per problem and
model, the tokens a cache row held and their keys/values; a resumed row that gets its problem's snapshot starts
with them in its cache, and the usual prefix check (`BatchedMining._predict`) recomputes only what differs.

Keys/values depend on nothing but the model, its precision and the tokens, so a snapshot stays right for its
tokens however far the labels file has moved on since: one from an older interrupt still saves its prefix.
A snapshot of another run (other models, data or budget: `run_identity`) or of another shape is ignored.
It also holds the greedy tokens the run had computed after those tokens, so the resumed search gets again at once
what it had asked before the interrupt (batched.py); a snapshot written without them restores the cache alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_FORMAT = "autojudge-mining-snapshot"


def run_identity(meta: dict, keys: tuple[str, ...]) -> str:
    """What a snapshot must match to be used: the mining run's settings that fix its models and answers."""
    return hashlib.sha256(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SnapshotRow:
    """One model's cache row: its tokens, the greedy token after each (None where unknown), their keys/values
    (`Decoder.row_state`)."""

    ids: list[int]
    greedy: list[int | None]
    state: dict[str, torch.Tensor]


class CacheSnapshots:
    def __init__(self, directory: str | Path, identity: str):
        self.directory = Path(directory)
        self.identity = identity

    def _path(self, problem_id: str) -> Path:
        # Problem ids hold slashes ("gsm8k/train/12"); the hash keeps distinct ids, and runs sharing a directory,
        # in distinct files.
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", problem_id)
        digest = hashlib.sha256(f"{self.identity}/{problem_id}".encode()).hexdigest()[:12]
        return self.directory / f"{readable}-{digest}.safetensors"

    def save(self, problem_id: str, rows: dict[str, SnapshotRow]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{model}.{name}": t.contiguous() for model, row in rows.items() for name, t in row.state.items()}
        metadata = {"format": _FORMAT, "run": self.identity, "problem_id": problem_id,
                    "tokens": json.dumps({model: row.ids for model, row in rows.items()}),
                    "greedy": json.dumps({model: row.greedy for model, row in rows.items()})}
        path = self._path(problem_id)
        staging = path.with_name(path.name + ".tmp")
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)  # a kill mid-write leaves the old snapshot or none, never half of one

    def load(self, problem_id: str) -> dict[str, SnapshotRow]:
        """model -> its row in the problem's snapshot; empty when there is none for this run."""
        path = self._path(problem_id)
        if not path.is_file():
            return {}
        try:
            with safe_open(path, framework="pt") as f:  # one open: the metadata, then the tensors it vouches for
                metadata = f.metadata() or {}
                if (metadata.get("format"), metadata.get("run"), metadata.get("problem_id")) != (
                        _FORMAT, self.identity, problem_id):
                    return {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            tokens = json.loads(metadata["tokens"])
            greedy = json.loads(metadata.get("greedy", "{}"))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return {}  # unreadable: the prefill it would have saved simply runs
        rows = {}
        for model, ids in tokens.items():
            if f"{model}.k" not in tensors or f"{model}.v" not in tensors:
                continue
            known = greedy.get(model)
            rows[model] = SnapshotRow(ids, known if isinstance(known, list) and len(known) == len(ids)
                                      else [None] * len(ids),
                                      {"k": tensors[f"{model}.k"], "v": tensors[f"{model}.v"]})
        return rows

    def drop(self, problem_id: str) -> None:
        self._path(problem_id).unlink(missing_ok=True)
