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

from autojudge.engine.request import (
    DEFAULT_TOPK_ALPHA,
    JUDGE_MODES,
    LOSSY_MODES,
    MODES,
    TopkRule,
    check_request,
    check_threshold,
)
from autojudge.errors import AutojudgeError
from autojudge.jsonl import changed_settings
from autojudge.judge.judge_file import load_judge_for_engine
from autojudge.progress import progress
from autojudge.tasks.checkers import gsm8k_checker, humaneval_checker
from autojudge.tasks.prompts import build_messages

CHECKERS = {"gsm8k": gsm8k_checker, "humaneval": humaneval_checker}
# The config key naming the weights each judge mode decoded with: a head retrained under the same path (a new
# shipped default) scores differently, so its rows must not mix with the old head's.
HEAD_KEYS = {mode: f"{mode}_head" for mode in JUDGE_MODES}
# Rows made under a different value of any of these measure something else; resuming would mix them.
RESUME_KEYS = ("dataset", "split", "offset", "window", "max_new_tokens", "target", "draft", "judge", "dtype", "device",
               "batch_size", "single_stream", "topk", "schedule", "protect_ends", *HEAD_KEYS.values())
# Batched eval decodes this many batches' worth of problems in every run before the next ones, keeping their
# prompts' caches meanwhile (~2.3 GB at batch 64 for the default pair in fp32): a prompt is prefilled once, not
# once a run, and an interrupted eval has every run on the same problems.
PROMPT_CHUNK_BATCHES = 4
# What a rows file written before a key existed was made with.
_BEFORE_KEY = {"batch_size": 1, "single_stream": 0, "schedule": "cycles", "offset": 0, "protect_ends": False}
# Settings of some modes only (None where the run had none of them: `topk` for mode topk, `protect_ends` for the
# lossy modes, the judge and its heads for the judge modes): rows made without those modes hold none that the
# setting shaped, so resuming with or without them, or reporting fewer modes, mixes nothing.
_MODE_ONLY = ("topk", "protect_ends", "judge", *HEAD_KEYS.values())


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


def parse_thresholds(text: str | None, option: str = "--thresholds") -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise AutojudgeError(f"{option} {text!r}: expected comma-separated numbers such as 0.1,0.3")
    return sorted({check_threshold(v, option) for v in values})


def parse_mode_thresholds(values: tuple[str, ...] | list[str]) -> dict[str | None, list[float]]:
    """The --thresholds given: "0.1,0.3" for every judge mode (key None) or "MODE=0.1,0.3" for one, each at most
    once (the heads score on different scales, so each mode can sweep its own)."""
    parsed = {}
    for value in values:
        mode, named, text = value.rpartition("=")
        if named and mode not in JUDGE_MODES:
            raise AutojudgeError(f"--thresholds {value!r}: {mode!r} is not a judge mode; "
                                 f"name one of {', '.join(JUDGE_MODES)} or give the thresholds alone")
        key = mode if named else None
        if key in parsed:
            raise AutojudgeError(f"--thresholds {value!r}: thresholds for {key or 'every judge mode'} given twice; "
                                 "give them once, comma-separated")
        parsed[key] = parse_thresholds(text, f"--thresholds {mode}=" if named else "--thresholds")
    return parsed


def validate(modes: list[str], thresholds: dict[str | None, list[float]], has_judge: bool, window: int,
             max_new_tokens: int, alphas: list[float] | None = None) -> None:
    """Refuse inconsistent options before any model is loaded."""
    judged = [m for m in modes if m in JUDGE_MODES]
    if thresholds and not judged:
        raise AutojudgeError("--thresholds apply to modes autojudge and judge; add one to --modes or drop them")
    for mode in thresholds:
        if mode is not None and mode not in modes:
            raise AutojudgeError(f"--thresholds {mode}=...: add {mode} to --modes or drop its thresholds")
    if has_judge and not judged:
        raise AutojudgeError("--judge applies to modes autojudge and judge; add one to --modes or drop --judge")
    if alphas is not None and "topk" not in modes:
        raise AutojudgeError("--alphas apply to mode topk; add it to --modes or drop them")
    for mode in modes:
        check_request(mode, window=window, max_new_tokens=max_new_tokens,
                      has_judge=mode == "topk" or (has_judge and mode in judged))


def plan_runs(modes: list[str], thresholds: dict[str | None, list[float]] | None = None, judges: dict | None = None,
              alphas: list[float] | None = None) -> list[Run]:
    """Target/speculative once each; judge modes once per threshold (`parse_mode_thresholds`' list for the mode,
    else the one for every mode, else the recall-based ones stored in that mode's judge, `judges[mode]`); mode
    topk once per alpha, held in the run's threshold.

    `judges` is needed only to sweep stored thresholds; `validate` has checked it is there when modes need it.
    """
    runs, thresholds = [], thresholds or {}
    for mode in modes:
        if mode in JUDGE_MODES:
            given = thresholds.get(mode, thresholds.get(None))
            runs += [Run(mode, tau, recall) for tau, recall in _sweep(given, judges and judges[mode])]
        elif mode == "topk":
            runs += [Run(mode, alpha) for alpha in alphas or (DEFAULT_TOPK_ALPHA,)]
        else:
            runs.append(Run(mode))
    return runs


def _sweep(thresholds: list[float] | None, judge) -> list[tuple[float, float | None]]:
    if thresholds is not None:
        return [(tau, None) for tau in thresholds]
    levels = sorted(judge.thresholds["recall"].items(), key=lambda item: float(item[0]))
    # Several recall levels can share a threshold; one run measures them all.
    return sorted({float(tau): float(recall) for recall, tau in levels}.items())


def judges_by_mode(judges: dict, topk: int) -> dict:
    """What stands in for a judge in each lossy mode: the trained heads (`load_eval_judges`), or the top-k rule
    (alpha comes per run)."""
    return {**judges, "topk": TopkRule(k=topk)}


def load_eval_judges(path: str, engine, modes: list[str], task: str) -> dict:
    """The head of each judge mode in `modes`: the file at `path` (it must suit them all), or with 'default' the
    head shipped for each mode and `task`'s domain (`load_judge_for_engine`)."""
    return {mode: load_judge_for_engine(path, engine, mode, task) for mode in modes if mode in JUDGE_MODES}


def head_settings(judges: dict) -> dict:
    """The config's fingerprint of each judge mode's head (None for a mode the run does not decode)."""
    return {key: judges[mode].fingerprint if mode in judges else None for mode, key in HEAD_KEYS.items()}


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
        changed = changed_settings(header, config, RESUME_KEYS, _BEFORE_KEY, _MODE_ONLY)
        if header.get("kind") != "config" or changed:
            raise AutojudgeError(
                f"{self.path} holds rows made with different {', '.join(changed) or 'settings'}; "
                "use the same settings, another --out, or drop --resume to start over"
            )
        adopted = {k: config[k] for k in _MODE_ONLY if header.get(k) is None and config.get(k) is not None}
        if adopted:
            # The header must name the setting the new mode's rows are made with, or a later resume could mix
            # them with another's; written whole then renamed, so a crash leaves the old file or the new one.
            lines[0] = json.dumps({**header, **adopted})
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        for row in rows:
            self.done[row_key(row["mode"], row["threshold"], row["problem_id"])] = row

    def append(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row_key(row["mode"], row["threshold"], row["problem_id"])] = row


def _row(problem, run: Run, out, wall_s: float, batch_size: int, checkers, schedule: str = "cycles") -> dict:
    outcome = checkers[problem.task](problem, out.text)
    stats = out.stats
    return {
        "mode": run.mode, "threshold": run.threshold, "recall": run.recall, "problem_id": problem.problem_id,
        "correct": outcome == problem.expected, "outcome": outcome, "expected": problem.expected,
        "new_tokens": stats.new_tokens, "cycles": stats.cycles,
        "accepted": sum(int(a) * c for a, c in stats.histogram.items()),
        "judge_rescues": stats.judge_rescues, "decode_s": stats.total_s,
        "wall_s": wall_s, "batch_size": batch_size, "finish_reason": stats.finish_reason, "text": out.text,
        # Target mode has no cycles: every schedule decodes it the same way.
        "schedule": "cycles" if run.mode == "target" else schedule,
    }


def _decode_kwargs(run: Run, judges: dict, window: int, max_new_tokens: int) -> dict:
    return dict(max_new_tokens=max_new_tokens, mode=run.mode, window=window,
                judge=judges.get(run.mode) if run.mode in LOSSY_MODES else None, threshold=run.threshold)


def evaluate_one(engine, problem, run: Run, judges: dict, window: int, max_new_tokens: int,
                 checkers=CHECKERS) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(build_messages(problem), **_decode_kwargs(run, judges, window, max_new_tokens))
    return _row(problem, run, out, time.perf_counter() - t0, 1, checkers)


def evaluate_batched(engine, problems, run: Run, log: RowLog, bar, *, judges: dict, window: int,
                     max_new_tokens: int, batch_size: int, checkers=CHECKERS, schedule: str = "cycles",
                     prompt_states: dict | None = None) -> None:
    """Decodes `problems` for one run in batches of `batch_size`, appending each row the moment it finishes.

    A row's `wall_s` is the time since the previous row of the batch finished, so the rows of a run add up to
    its wall time and `new_tokens / wall_s` summed over them is the batch throughput.
    """
    last = time.perf_counter()

    def keep(index: int, out) -> None:
        nonlocal last
        now = time.perf_counter()
        log.append(_row(problems[index], run, out, now - last, batch_size, checkers, schedule))
        last = now
        bar.update()

    engine.generate_batch([build_messages(p) for p in problems], max_batch=batch_size, on_output=keep,
                          schedule=schedule, prompt_states=prompt_states,
                          **_decode_kwargs(run, judges, window, max_new_tokens))


def evaluate(engine, problems, runs: list[Run], log: RowLog, *, window: int, max_new_tokens: int,
             judges: dict | None = None, checkers=CHECKERS, batch_size: int = 1, single_stream: int = 0,
             schedule: str = "cycles") -> list[dict]:
    """Rows for every (run, problem), reusing those already in `log` and appending the new ones. `judges`: what
    each lossy mode decodes with (`judges_by_mode`).

    With batch_size > 1 the first `single_stream` problems of each run are still decoded alone: their tokens/s
    is what one user waits for, the batched rows' is what the machine serves (`schedule` "tokenwise": the
    same rows, sooner, but not speculative decoding's batch speed). The batched problems go through every run a
    chunk of `PROMPT_CHUNK_BATCHES` batches at a time, so each prompt is prefilled once for all runs.
    """
    keys = {(run, p.problem_id): row_key(run.mode, run.threshold, p.problem_id) for run in runs for p in problems}
    already = sum(k in log.done for k in keys.values())
    alone = [p for i, p in enumerate(problems) if batch_size == 1 or i < single_stream]
    together = [p for i, p in enumerate(problems) if not (batch_size == 1 or i < single_stream)]
    chunk = PROMPT_CHUNK_BATCHES * batch_size
    with progress(total=len(keys), initial=already, desc="eval", unit="gen") as bar:
        for run in runs:
            for problem in alone:
                if keys[run, problem.problem_id] not in log.done:
                    bar.set_postfix_str(_label(run))
                    log.append(evaluate_one(engine, problem, run, judges or {}, window, max_new_tokens, checkers))
                    bar.update()
        for start in range(0, len(together), chunk):
            prompt_states = {}
            for run in runs:
                todo = [p for p in together[start : start + chunk] if keys[run, p.problem_id] not in log.done]
                if todo:
                    bar.set_postfix_str(_label(run))
                    evaluate_batched(engine, todo, run, log, bar, judges=judges or {}, window=window,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, checkers=checkers,
                                     schedule=schedule, prompt_states=prompt_states)
    return [log.done[keys[run, p.problem_id]] for run in runs for p in problems]


def _label(run: Run) -> str:
    return run.mode if run.threshold is None else f"{run.mode} tau={run.threshold:.4g}"
