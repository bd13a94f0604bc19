"""Train a judge head: grouped validation split, C chosen by validation ROC-AUC, refit on all data.

Thresholds come from the held-out predictions of the model chosen on the split (as the AutoJudge
authors do), then the head is refit on every row with the chosen C; the held-out numbers are the
honest estimate of how the refit head behaves on new problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from autojudge.errors import AutojudgeError
from autojudge.judge.logreg import LinearHead, Scaler, fit_head, fit_logreg
from autojudge.judge.metrics import confusion_at, roc_auc, threshold_for_quantile, threshold_for_recall

C_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 5))  # 1e-4 ... 1e2, half-decade steps
RECALL_LEVELS = (0.8, 0.9, 0.95, 0.99)
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Missing 5% of important tokens already costs accuracy on long answers; start conservative.
DEFAULT_RECALL = 0.95


@dataclass
class TrainResult:
    head: LinearHead
    best_c: float
    thresholds: dict  # {"recall": {"0.9": tau, ...}, "quantile": {"0.5": tau, ...}}
    default_threshold: dict  # {"recall": r, "value": tau}
    report: dict


def grouped_split(groups: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, val) with every group wholly on one side."""
    if not 0.0 < val_fraction < 1.0:
        raise AutojudgeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    names = sorted(set(groups))
    if len(names) < 2:
        raise AutojudgeError(
            f"need labelled rows from at least 2 problems for a validation split, got {len(names)}; "
            "mine more problems"
        )
    random.Random(seed).shuffle(names)
    n_val = min(max(1, round(len(names) * val_fraction)), len(names) - 1)
    val_names = set(names[:n_val])
    train_idx = [i for i, g in enumerate(groups) if g not in val_names]
    val_idx = [i for i, g in enumerate(groups) if g in val_names]
    return train_idx, val_idx


def _check_classes(y: torch.Tensor, where: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise AutojudgeError(
            f"the {where} set has only {'important' if n_pos else 'unimportant'} tokens "
            f"({y.numel()} rows); mine more problems or change --val-fraction/--seed"
        )


def pick_c(x_tr: torch.Tensor, y_tr: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, c_grid, where: str):
    """(best C, its validation ROC-AUC, its head, AUC by C): a head fitted on the training rows per C."""
    _check_classes(y_tr, where)
    scaler = Scaler.fit(x_tr)
    z_tr, z_val = scaler.transform(x_tr), scaler.transform(x_val)
    auc_by_c = {}
    best = None
    init = None
    for c in sorted(c_grid):
        # Warm start from the previous (more regularized) solution: same optimum, fewer iterations.
        init = fit_logreg(z_tr, y_tr, c, init=init)
        auc = roc_auc(y_val, torch.sigmoid(z_val @ init[0] + init[1]))
        auc_by_c[f"{c:.6g}"] = auc
        if best is None or auc > best[1]:
            best = (c, auc, LinearHead(scaler, *init))
    return (*best, auc_by_c)


def train_judge(
    features: torch.Tensor,
    important: torch.Tensor,
    groups: list[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    c_grid: tuple[float, ...] = C_GRID,
    curve_fractions: list[float] | None = None,
) -> TrainResult:
    """`curve_fractions` (e.g. [0.25, 0.5, 1]) adds a learning curve to the report: does labelling more problems
    still help?"""
    if curve_fractions is not None:
        check_fractions(curve_fractions)
    x = features.to(torch.float64)
    y = important.to(torch.float64)
    train_idx, val_idx = grouped_split(groups, val_fraction, seed)
    x_tr, y_tr, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    _check_classes(y_val, "validation")
    best_c, val_auc, split_head, auc_by_c = pick_c(x_tr, y_tr, x_val, y_val, c_grid, "training")
    p_val = split_head.predict_proba(x_val)

    thresholds = {
        "recall": {str(r): threshold_for_recall(y_val, p_val, r) for r in RECALL_LEVELS},
        "quantile": {str(q): threshold_for_quantile(p_val, q) for q in QUANTILES},
    }
    at_thresholds = {
        kind: {k: confusion_at(y_val, p_val, tau) for k, tau in table.items()}
        for kind, table in thresholds.items()
    }
    head = fit_head(x, y, best_c)
    report = {
        "rows": y.numel(),
        "important": int(y.sum()),
        "positive_rate": y.mean().item(),
        "groups": len(set(groups)),
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "val_groups": len({groups[i] for i in val_idx}),
        "val_positive_rate": y_val.mean().item(),
        "seed": seed,
        "val_fraction": val_fraction,
        "best_c": best_c,
        "val_auc": val_auc,
        "val_auc_by_c": auc_by_c,
        "train_auc_refit": roc_auc(y, head.predict_proba(x)),
        "val_at_thresholds": at_thresholds,
    }
    if curve_fractions is not None:
        report["learning_curve"] = _learning_curve(x, y, groups, train_idx, val_idx, curve_fractions, seed, c_grid,
                                                   full_split=(best_c, val_auc))
    default = {"recall": DEFAULT_RECALL, "value": thresholds["recall"][str(DEFAULT_RECALL)]}
    return TrainResult(head, best_c, thresholds, default, report)


def check_fractions(fractions: list[float]) -> None:
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise AutojudgeError(f"--learning-curve shares must lie in (0, 1], e.g. 0.25,0.5,1; got {fractions}")


def _learning_curve(x, y, groups, train_idx, val_idx, fractions, seed, c_grid, full_split) -> list[dict]:
    """Validation ROC-AUC of heads trained on a share of the training problems (the same validation problems,
    C picked on them for each share). The shares are nested: each adds problems, in a seeded order, to the smaller
    one. The whole share is the split `train_judge` already picked C on: `full_split` (best C, its AUC) is
    reused, not refitted (the largest fits are the slowest)."""
    names = sorted({groups[i] for i in train_idx})
    random.Random(seed).shuffle(names)
    points = []
    for fraction in sorted(set(fractions)):
        kept = set(names[: max(1, round(fraction * len(names)))])
        rows = [i for i in train_idx if groups[i] in kept]
        if len(kept) == len(names):
            best_c, val_auc = full_split
        else:
            best_c, val_auc, _, _ = pick_c(x[rows], y[rows], x[val_idx], y[val_idx], c_grid,
                                            f"training ({fraction:g} of the problems)")
        points.append({"fraction": fraction, "problems": len(kept), "rows": len(rows), "best_c": best_c,
                       "val_auc": val_auc})
    return points
