"""Evaluation loop: one row per (mode, threshold, problem), appended to a JSONL the moment it is done.

The report is computed from those rows alone, so a crash loses at most the generation in flight and
`--resume` picks up where the rows end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from autojudge.engine.request import JUDGE_MODES, MODES, check_request, check_threshold
from autojudge.errors import AutojudgeError
from autojudge.judge.judge_file import load_judge_for_engine
from autojudge.progress import progress
from autojudge.tasks.checkers import gsm8k_checker, humaneval_checker
from autojudge.tasks.prompts import build_messages

CHECKERS = {"gsm8k": gsm8k_checker, "humaneval": humaneval_checker}
# Rows made under a different value of any of these measure something else; resuming would mix them.
RESUME_KEYS = ("dataset", "split", "window", "max_new_tokens", "target", "draft", "judge", "dtype", "device")


@dataclass(frozen=True)
class Run:
    mode: str
    threshold: float | None = None
    recall: float | None = None  # the judge recall level `threshold` was stored for, when it came from the judge


def parse_modes(text: str) -> list[str]:
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise AutojudgeError(f"--modes {text!r}: choose from {', '.join(MODES)} (comma-separated)")
    return modes


def parse_thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise AutojudgeError(f"--thresholds {text!r}: expected comma-separated numbers such as 0.1,0.3") from err
    if not values:
        raise AutojudgeError(f"--thresholds {text!r}: expected comma-separated numbers such as 0.1,0.3")
    return sorted({check_threshold(v) for v in values})


def validate(modes: list[str], thresholds: list[float] | None, has_judge: bool, window: int,
             max_new_tokens: int) -> None:
    """Refuse inconsistent options before any model is loaded."""
    judged = [m for m in modes if m in JUDGE_MODES]
    if thresholds is not None and not judged:
        raise AutojudgeError("--thresholds apply to modes autojudge and judge; add one to --modes or drop them")
    if has_judge and not judged:
        raise AutojudgeError("--judge applies to modes autojudge and judge; add one to --modes or drop --judge")
    for mode in modes:
        check_request(mode, window=window, max_new_tokens=max_new_tokens, has_judge=has_judge and mode in judged)


def plan_runs(modes: list[str], thresholds: list[float] | None, judge=None) -> list[Run]:
    """Target/speculative once each; judge modes once per threshold (default: the judge's recall-based ones).

    `judge` is needed only to sweep its stored thresholds; `validate` has checked it is there when modes need it.
    """
    sweep = [(tau, None) for tau in thresholds or ()]
    if thresholds is None and any(m in JUDGE_MODES for m in modes):
        levels = sorted(judge.thresholds["recall"].items(), key=lambda item: float(item[0]))
        # Several recall levels can share a threshold; one run measures them all.
        sweep = sorted({float(tau): float(recall) for recall, tau in levels}.items())
    runs = []
    for mode in modes:
        runs += [Run(mode, tau, recall) for tau, recall in sweep] if mode in JUDGE_MODES else [Run(mode)]
    return runs


def load_eval_judge(path: str, engine, modes: list[str]):
    return load_judge_for_engine(path, engine, next((m for m in modes if m in JUDGE_MODES), None))


def row_key(mode: str, threshold: float | None, problem_id: str) -> tuple:
    return mode, threshold, problem_id


class RowLog:
    """The append-only rows file; its first line is the config the rows were made under."""

    def __init__(self, path: Path, config: dict, resume: bool):
        self.path = Path(path)
        self.done: dict[tuple, dict] = {}
        if resume and self.path.is_file():
            self._load(config)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"kind": "config", **config}) + "\n")

    def _load(self, config: dict) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A crash mid-write leaves half a line; drop it so the next append starts on a line of its own.
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        lines = data.decode("utf-8").splitlines()
        try:
            header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except (json.JSONDecodeError, IndexError) as err:
            raise AutojudgeError(f"{self.path} is not an eval rows file; delete it or drop --resume") from err
        changed = [k for k in RESUME_KEYS if header.get(k) != config.get(k)]
        if header.get("kind") != "config" or changed:
            raise AutojudgeError(
                f"{self.path} holds rows made with different {', '.join(changed) or 'settings'}; "
                "use the same settings, another --out, or drop --resume to start over"
            )
        for row in rows:
            self.done[row_key(row["mode"], row["threshold"], row["problem_id"])] = row

    def append(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row_key(row["mode"], row["threshold"], row["problem_id"])] = row


def evaluate_one(engine, problem, run: Run, judge, window: int, max_new_tokens: int, checkers=CHECKERS) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(
        build_messages(problem), max_new_tokens=max_new_tokens, mode=run.mode, window=window,
        judge=judge if run.mode in JUDGE_MODES else None, threshold=run.threshold,
    )
    outcome = checkers[problem.task](problem, out.text)
    stats = out.stats
    return {
        "mode": run.mode, "threshold": run.threshold, "recall": run.recall, "problem_id": problem.problem_id,
        "correct": outcome == problem.expected, "outcome": outcome, "expected": problem.expected,
        "new_tokens": stats.new_tokens, "cycles": stats.cycles,
        "accepted": sum(int(a) * c for a, c in stats.histogram.items()),
        "judge_rescues": stats.judge_rescues, "decode_s": stats.total_s,
        "wall_s": time.perf_counter() - t0, "finish_reason": stats.finish_reason, "text": out.text,
    }


def evaluate(engine, problems, runs: list[Run], log: RowLog, *, window: int, max_new_tokens: int,
             judge=None, checkers=CHECKERS) -> list[dict]:
    """Rows for every (run, problem), reusing those already in `log` and appending the new ones."""
    todo = [(run, p) for run in runs for p in problems]
    keys = [row_key(run.mode, run.threshold, p.problem_id) for run, p in todo]
    already = sum(k in log.done for k in keys)
    rows, shown = [], None
    with progress(total=len(todo), initial=already, desc="eval", unit="gen") as bar:
        for (run, problem), key in zip(todo, keys):
            if key not in log.done:
                if run != shown:
                    bar.set_postfix_str(run.mode if run.threshold is None else f"{run.mode} tau={run.threshold:.4g}")
                    shown = run
                log.append(evaluate_one(engine, problem, run, judge, window, max_new_tokens, checkers))
                bar.update()
            rows.append(log.done[key])
    return rows
