import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autojudge.errors import AutojudgeError
from autojudge.judge.logreg import Scaler, fit_head, fit_logreg
from autojudge.judge.metrics import confusion_at, roc_auc, threshold_for_quantile, threshold_for_recall
from autojudge.judge.train import C_GRID, grouped_split, pick_c, train_judge


def planted(n, d=8, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 5
    w = torch.linspace(-1, 1, d, dtype=torch.float64)
    z = (x - 5) @ w / 3 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x, (z > 0.5).to(torch.float64)


def newton_reference(x, y, c, iters=50):
    """Plain numpy Newton on 0.5*||w||^2 + c*sum logloss, intercept unpenalized."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.eye(d + 1)
    reg[d, d] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-a @ theta))
        grad = reg @ theta + c * a.T @ (p - y)
        hess = reg + c * (a.T * (p * (1 - p))) @ a
        theta -= np.linalg.solve(hess, grad)
    return theta[:d], theta[d]


def test_matches_newton_reference():
    x, y = planted(300, d=5, seed=1, noise=1.0)
    z = Scaler.fit(x).transform(x)
    for c in (0.01, 1.0, 10.0):
        w, b = fit_logreg(z, y, c)
        w_ref, b_ref = newton_reference(z.numpy(), y.numpy(), c)
        np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-5)
        assert abs(b - b_ref) < 1e-5


def test_scaler_matches_population_std_and_keeps_constant_columns():
    x = torch.tensor([[1.0, 7.0], [3.0, 7.0]], dtype=torch.float64)
    s = Scaler.fit(x)
    assert s.mean.tolist() == [2.0, 7.0]
    assert s.scale.tolist() == [1.0, 1.0]


def test_recovers_planted_rule_on_held_out_data():
    x, y = planted(2000, seed=2)
    head = fit_head(x[:1500], y[:1500], c=1.0)
    assert roc_auc(y[1500:], head.predict_proba(x[1500:])) >= 0.95


def test_training_is_deterministic():
    x, y = planted(600, seed=3)
    groups = [f"p{i // 10}" for i in range(600)]
    a = train_judge(x, y, groups, seed=4)
    b = train_judge(x, y, groups, seed=4)
    assert torch.equal(a.head.weight, b.head.weight) and a.head.bias == b.head.bias
    assert a.thresholds == b.thresholds and a.best_c == b.best_c


def test_train_report_and_thresholds():
    x, y = planted(800, seed=5)
    groups = [f"p{i // 8}" for i in range(800)]
    res = train_judge(x, y, groups, val_fraction=0.25, seed=0)
    assert res.report["val_auc"] >= 0.95
    assert res.report["train_rows"] + res.report["val_rows"] == 800
    recall = res.thresholds["recall"]
    # Higher required recall can only lower the threshold.
    assert recall["0.8"] >= recall["0.9"] >= recall["0.95"] >= recall["0.99"]
    quant = list(res.thresholds["quantile"].values())
    assert quant == sorted(quant)
    for r, stats in res.report["val_at_thresholds"]["recall"].items():
        assert stats["recall"] >= float(r) - 1e-12
    assert res.default_threshold["value"] == recall["0.95"]


def test_learning_curve_shares_the_validation_split_and_ends_at_the_full_head():
    x, y = planted(900, seed=7, noise=1.5)
    groups = [f"p{i // 9}" for i in range(900)]  # 100 problems: 80 train, 20 validation
    full = train_judge(x, y, groups, val_fraction=0.2, seed=3, curve_fractions=[1.0, 0.1, 0.5])
    curve = full.report["learning_curve"]
    assert [p["fraction"] for p in curve] == [0.1, 0.5, 1.0]
    assert [p["problems"] for p in curve] == [8, 40, 80]
    assert [p["rows"] for p in curve] == [72, 360, 720]
    # The whole training share is exactly the split train_judge picks C on: a head fitted on it from scratch
    # scores what the curve reuses.
    refit_c, refit_auc, _, _ = pick_c(*_split_rows(x, y, groups, 0.2, 3), C_GRID, "training")
    assert (curve[-1]["best_c"], curve[-1]["val_auc"]) == (refit_c, refit_auc) == (full.best_c, full.report["val_auc"])
    assert curve[0]["val_auc"] < curve[-1]["val_auc"]  # 8 noisy problems learn less than 80
    with pytest.raises(AutojudgeError, match="--learning-curve"):
        train_judge(x, y, groups, curve_fractions=[0.0, 0.5])


def _split_rows(x, y, groups, val_fraction, seed):
    train_idx, val_idx = grouped_split(groups, val_fraction, seed)
    x, y = x.to(torch.float64), y.to(torch.float64)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def test_single_class_validation_is_refused():
    x, y = planted(40, seed=6)
    y[:] = 0
    y[0] = 1
    with pytest.raises(AutojudgeError, match="only unimportant"):
        train_judge(x, y, [f"p{i // 4}" for i in range(40)], seed=0)


def brute_auc(y, s):
    pos = [v for v, t in zip(s, y) if t]
    neg = [v for v, t in zip(s, y) if not t]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_matches_brute_force_with_ties(pairs):
    y = [t for t, _ in pairs]
    s = [v / 5 for _, v in pairs]
    if all(y) or not any(y):
        return
    assert abs(roc_auc(y, s) - brute_auc(y, s)) < 1e-12


def test_recall_threshold_is_the_largest_reaching_recall():
    y = [1] * 10 + [0] * 5
    s = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2] + [0.1] * 5
    assert threshold_for_recall(y, s, 0.9) == 0.3
    assert threshold_for_recall(y, s, 0.8) == 0.4
    assert threshold_for_recall(y, s, 0.85) == 0.3
    assert threshold_for_recall(y, s, 1.0) == 0.2
    assert confusion_at(y, s, 0.3)["recall"] == 0.9
    assert confusion_at(y, s, 0.3)["accept_rate"] == 6 / 15
    assert threshold_for_quantile(list(range(11)), 0.5) == 5.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abcdef", min_size=1, max_size=2), min_size=2, max_size=60),
       st.floats(0.05, 0.95), st.integers(0, 10))
def test_grouped_split_never_leaks_a_group(groups, fraction, seed):
    if len(set(groups)) < 2:
        with pytest.raises(AutojudgeError):
            grouped_split(groups, fraction, seed)
        return
    tr, va = grouped_split(groups, fraction, seed)
    assert sorted(tr + va) == list(range(len(groups)))
    assert tr and va
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
