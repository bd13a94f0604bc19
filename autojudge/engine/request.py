"""What a decode request may ask for: the modes, the window range, the judge threshold range, and the one check
that the engine runs on every request and that the command line and eval run before loading any model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autojudge.errors import AutojudgeError

MODES = ("target", "speculative", "autojudge", "judge", "topk")
JUDGE_MODES = ("autojudge", "judge")  # a learned judge may keep a mismatching draft token
LOSSY_MODES = (*JUDGE_MODES, "topk")  # ... or, as a baseline needing no training, the top-k rule
MAX_WINDOW = 64
DEFAULT_WINDOW = 8
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TOPK = 3
DEFAULT_TOPK_ALPHA = 0.3
# Lossy modes leave the target's end of answer (EOS, code fence) alone: see tokenizer.end_of_answer_ids.
DEFAULT_PROTECT_ENDS = True
# How a batch takes greedy speculative decisions: in cycles (what serving runs), or one token at a time with the
# same outcome at about half the arithmetic (`autojudge.engine.tokenwise`; for evaluation, whose speed is measured
# on rows decoded alone).
SCHEDULES = ("cycles", "tokenwise")


@dataclass(frozen=True)
class TopkRule:
    """The simplest lossy rule a user could write without training: keep a mismatching draft token when it is
    among the target's top `k` tokens with probability >= `alpha` x the top token's (`autojudge.kernels.common`).

    It stands where a judge does (`generate(mode="topk", judge=TopkRule(...))`); like a judge's threshold, an
    explicit `threshold` overrides `alpha`.
    """

    k: int = DEFAULT_TOPK
    alpha: float = DEFAULT_TOPK_ALPHA
    uses_draft = False  # its verdict reads only the target's logits

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise AutojudgeError(f"top-k rule: k must be an integer >= 1, got {self.k!r}")
        check_threshold(self.alpha, "top-k rule alpha")

    @property
    def default_threshold(self) -> float:
        return self.alpha


def check_threshold(threshold: float, what: str = "judge threshold") -> float:
    """A judge keeps a mismatch when p_important < threshold: 0 keeps none (lossless), 1 keeps nearly all. The
    top-k rule's alpha shares the range: 0 keeps every top-k token, 1 only ties with the top one."""
    if not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise AutojudgeError(f"{what} must be in [0, 1], got {threshold}")
    return float(threshold)


def check_request(mode: str, *, window: int, max_new_tokens: int, temperature: float = 0.0, has_draft: bool = True,
                  has_judge: bool = False, threshold: float | None = None, schedule: str = "cycles") -> None:
    """Refuses an inconsistent request with one line naming the fix. `has_judge`: a judge was given, or will be
    (the command line loads the default judge for the judge modes)."""
    if mode not in MODES:
        raise AutojudgeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise AutojudgeError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise AutojudgeError(f"--temperature must be a finite number >= 0, got {temperature}")
    if mode != "target":
        if not has_draft:
            raise AutojudgeError(f"mode {mode!r} needs a draft model; pass --draft (not 'none') or use --mode target")
        if not 1 <= window <= MAX_WINDOW:
            raise AutojudgeError(f"--window must be between 1 and {MAX_WINDOW}, got {window}")
    if mode in LOSSY_MODES:
        if not has_judge:
            fix = "pass a TopkRule as judge (--topk K)" if mode == "topk" else "pass --judge PATH or --judge default"
            raise AutojudgeError(f"mode {mode!r} needs a judge; {fix}")
        if temperature > 0:
            raise AutojudgeError(f"mode {mode!r} decodes greedily; drop --temperature")
    elif has_judge or threshold is not None:
        raise AutojudgeError(f"a judge and its threshold are used only in modes {', '.join(LOSSY_MODES)}, not {mode!r}")
    if threshold is not None:
        check_threshold(threshold)
    if schedule not in SCHEDULES:
        raise AutojudgeError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "tokenwise" and temperature > 0:
        raise AutojudgeError("the tokenwise schedule replays greedy cycles; drop --temperature or use --schedule cycles")
