"""The judge head: scikit-learn's StandardScaler and L2 LogisticRegression, as the AutoJudge authors train it,
held as float64 torch tensors so that it folds into the judge file's raw-feature weight and bias.

The objective is scikit-learn's: 0.5 * ||w||^2 + C * sum_i logloss_i, intercept unpenalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

# Tighter than scikit-learn's default 1e-4: the warm-started C sweep and the tests compare optima, not rankings.
TOLERANCE = 1e-10


@dataclass
class Scaler:
    mean: torch.Tensor  # [D] float64
    scale: torch.Tensor  # [D] float64; 1 for constant features, as StandardScaler leaves them

    @classmethod
    def fit(cls, x: torch.Tensor) -> Scaler:
        fitted = StandardScaler().fit(_numpy(x))
        return cls(torch.from_numpy(fitted.mean_), torch.from_numpy(fitted.scale_))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean) / self.scale


@dataclass
class LinearHead:
    """Scaler + logistic regression; scores are P(important)."""

    scaler: Scaler
    weight: torch.Tensor  # [D] float64, acts on standardized features
    bias: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler.transform(x) @ self.weight + self.bias

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def folded(self) -> tuple[torch.Tensor, float]:
        """(w', b') acting on raw features: w' = w / scale, b' = b - sum(w * mean / scale)."""
        w = self.weight / self.scaler.scale
        return w, self.bias - float((w * self.scaler.mean).sum())


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def fit_logreg(x: torch.Tensor, y: torch.Tensor, c: float, init: tuple[torch.Tensor, float] | None = None,
               max_iter: int = 5000) -> tuple[torch.Tensor, float]:
    """(w, b) minimizing 0.5*||w||^2 + c * sum logloss; x is already standardized. `init` warm-starts L-BFGS
    (the previous, more regularized C of a sweep: the same optimum in fewer iterations)."""
    model = LogisticRegression(C=c, tol=TOLERANCE, max_iter=max_iter, warm_start=init is not None)
    if init is not None:
        model.coef_ = _numpy(init[0])[None, :].copy()
        model.intercept_ = np.array([init[1]])
    model.fit(_numpy(x), _numpy(y).astype(np.int64))
    return torch.from_numpy(model.coef_[0].copy()), float(model.intercept_[0])


def fit_head(x: torch.Tensor, y: torch.Tensor, c: float) -> LinearHead:
    scaler = Scaler.fit(x)
    w, b = fit_logreg(scaler.transform(x), y, c)
    return LinearHead(scaler, w, b)
