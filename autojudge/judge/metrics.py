"""Ranking metrics and threshold choice for judge scores (p_important).

Convention everywhere: a score is P(important); the decoder accepts a draft/target mismatch
when p_important < tau, so "predicted important" means p_important >= tau.
"""

from __future__ import annotations

import math

import torch


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).flatten()


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve from average ranks (Mann-Whitney U), so tied scores count 1/2."""
    y = _as_f64(labels) > 0.5
    s = _as_f64(scores)
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts
    avg_rank = before.to(torch.float64) + (counts.to(torch.float64) + 1.0) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[y].sum().item() - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


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
