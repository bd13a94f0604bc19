"""Ranking metrics and threshold choice for judge scores (p_important).

Convention everywhere: a score is P(important); the decoder accepts a draft/target mismatch
when p_important < tau, so "predicted important" means p_important >= tau. ROC-AUC is scikit-learn's; the
threshold rules below are ours because they are one-liners over sorted scores that scikit-learn has no
function for (precision_recall_curve would need the same search on top of it).
"""

from __future__ import annotations

import math

import torch
from sklearn.metrics import roc_auc_score


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).flatten()


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (tied scores count 1/2), by scikit-learn."""
    y = (_as_f64(labels) > 0.5).numpy()
    if y.all() or not y.any():
        raise ValueError("ROC-AUC needs both classes")
    return float(roc_auc_score(y, _as_f64(scores).numpy()))


def threshold_for_recall(labels, scores, recall: float) -> float:
    """Largest tau such that at least `recall` of the important tokens have score >= tau."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    y = _as_f64(labels) > 0.5
    pos = torch.sort(_as_f64(scores)[y], descending=True).values
    if pos.numel() == 0:
        raise ValueError("no important tokens to set a recall threshold from")
    # The 1e-9 keeps e.g. 0.9 * 10 = 9.000000000000002 from asking for a 10th token.
    k = min(max(math.ceil(recall * pos.numel() - 1e-9), 1), pos.numel())
    return pos[k - 1].item()


def threshold_for_quantile(scores, q: float) -> float:
    """tau at quantile q of the scores: the decoder then accepts about a fraction q of mismatches."""
    return torch.quantile(_as_f64(scores), q).item()


def confusion_at(labels, scores, tau: float) -> dict:
    """Precision/recall of "important" (score >= tau) and the share of mismatches the decoder would accept."""
    y = _as_f64(labels) > 0.5
    flagged = _as_f64(scores) >= tau
    tp = int((flagged & y).sum())
    fp = int((flagged & ~y).sum())
    n_pos = int(y.sum())
    return {
        "threshold": tau,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / n_pos if n_pos else 1.0,
        "accept_rate": 1.0 - flagged.double().mean().item(),
        "important_accepted": n_pos - tp,
    }
