"""What limits the AutoJudge head on our labels: features or label noise? Three checks on one labels file.

    python bench/judge_diagnostics.py data/mined/default/gsm8k-train-640-bf16.jsonl --dtype bf16 \
        --out bench/results/cpu-2026-11-27/judge-diagnostics.json

1. Logit features: both models' log-probabilities at the mismatch (of the draft's and the target's token, their
   gap, the entropy, the draft token's rank under the target): the top-k rule's evidence. Each one's ROC-AUC alone,
   and the validation ROC-AUC of the hidden-state head with and without them.
2. Label noise: the share of important labels where the target's own answer is right and where it is wrong (a
   wrong answer changes under almost any swap), and a head trained on labels "correctness flipped" instead of
   "answer changed".
3. Training only on problems the target gets right, validated on the same problems as the head trained on all.
4. A nonlinear head (scikit-learn's gradient-boosted trees) on the same hidden states: is the linear head the limit?

Heads are `train_judge`'s (C picked on the validation problems); validation ROC-AUC is averaged over --seeds
grouped splits. The hidden states are the ones mining stored; the logit features cost one pass of each model per
problem (its longest labelled prefix: a problem's labels lie on one path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from sklearn.ensemble import HistGradientBoostingClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autojudge.engine.engine import Engine  # noqa: E402
from autojudge.judge.features import StoredFeatures, model_identity  # noqa: E402
from autojudge.judge.labels import read_label_rows  # noqa: E402
from autojudge.judge.metrics import roc_auc  # noqa: E402
from autojudge.judge.train import C_GRID, grouped_split, pick_c  # noqa: E402
from autojudge.progress import progress  # noqa: E402
from autojudge.tasks.datasets import canonical_number, load_dataset  # noqa: E402

LOGIT_FEATURES = ["target logprob of draft token", "target logprob of its own token", "target gap (draft - own)",
                  "draft logprob of draft token", "draft logprob of target token", "draft gap (own - target's)",
                  "target entropy", "draft entropy", "log(1 + draft token's rank under target)"]


def logit_features(eng, rows: list[dict]) -> torch.Tensor:
    by_problem = defaultdict(list)
    for i, r in enumerate(rows):
        by_problem[r["problem_id"]].append(i)
    out = torch.zeros(len(rows), len(LOGIT_FEATURES))
    for idx in progress(iterable=by_problem.values(), desc="logit features", unit="problem"):
        longest = max((rows[i] for i in idx), key=lambda r: len(r["prefix_ids"]))
        prompt = longest["prompt_ids"]
        seq = torch.tensor(prompt + longest["prefix_ids"])
        # Logits at the last prefix position predict the mismatched token.
        at = torch.tensor([len(prompt) + len(rows[i]["prefix_ids"]) - 1 for i in idx])
        logprobs = {}
        for block in ("target", "draft"):
            dec = getattr(eng, block)
            _, hidden = dec.forward(seq, 0, logits_from=None)
            logprobs[block] = torch.log_softmax(dec.model.lm_head(hidden[at]).float(), -1)
        for j, i in enumerate(idx):
            r = rows[i]
            assert longest["prefix_ids"][: len(r["prefix_ids"])] == r["prefix_ids"], "labels of one problem on one path"
            t, d = logprobs["target"][j], logprobs["draft"][j]
            drafted, wanted = r["draft_token"], r["target_token"]
            out[i] = torch.tensor([
                t[drafted], t[wanted], t[drafted] - t[wanted], d[drafted], d[wanted], d[drafted] - d[wanted],
                -(t.exp() * t).sum(), -(d.exp() * d).sum(), torch.log1p((t > t[drafted]).sum().float()),
            ])
    return out


def val_auc(x: torch.Tensor, y: torch.Tensor, groups: list[str], seed: int, train_rows=None, val_rows=None) -> float:
    """Validation ROC-AUC of the best C on one grouped split, optionally restricted to subsets of its rows."""
    train_idx, val_idx = grouped_split(groups, 0.2, seed)
    train_idx = [i for i in train_idx if train_rows is None or train_rows[i]]
    val_idx = [i for i in val_idx if val_rows is None or val_rows[i]]
    x, y = x.double(), y.double()
    return pick_c(x[train_idx], y[train_idx], x[val_idx], y[val_idx], C_GRID, "training")[1]


def boosted_trees_auc(x: torch.Tensor, y: torch.Tensor, groups: list[str], seed: int) -> float:
    train_idx, val_idx = grouped_split(groups, 0.2, seed)
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0,
                                           random_state=0)
    model.fit(x[train_idx].numpy(), y[train_idx].numpy())
    return roc_auc(y[val_idx], model.predict_proba(x[val_idx].numpy())[:, 1])


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values), "by_seed": values}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels", type=Path)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = read_label_rows(args.labels, unfinished=True)
    eng = Engine.from_pretrained(dtype=args.dtype, max_seq_len=args.max_seq_len)
    stored = StoredFeatures(StoredFeatures.for_labels(args.labels), model_identity(eng))
    hidden = [stored.load(r, "DD-DT") for r in rows]
    kept = [i for i, h in enumerate(hidden) if h is not None]  # mining stores features for nearly every label
    rows = [rows[i] for i in kept]
    hidden = torch.stack([hidden[i] for i in kept])
    logits = logit_features(eng, rows)
    important = torch.tensor([bool(r["important"]) for r in rows])
    groups = [r["problem_id"] for r in rows]
    gold = {p.problem_id: canonical_number(str(p.expected)) for p in load_dataset("gsm8k", "train")}
    target_right = torch.tensor([gold[r["problem_id"]] == r["ref_answer"] for r in rows])
    swap_right = torch.tensor([gold[r["problem_id"]] == r["alt_answer"] for r in rows])
    seeds = range(args.seeds)

    alone = {}
    for name, column in zip(LOGIT_FEATURES, logits.T):
        auc = roc_auc(important, column)
        alone[name] = max(auc, 1 - auc)  # either direction: a ranking, not a sign, is what a head could use
    heads = {
        "hidden states (DD-DT)": hidden,
        "logit features": logits,
        "hidden states + logit features": torch.cat([hidden, logits], 1),
    }
    report = {
        "labels": str(args.labels), "rows": len(rows), "problems": len(set(groups)),
        "important": int(important.sum()), "seeds": args.seeds,
        "logit_feature_auc_alone": alone,
        "val_auc_by_features": {name: summary([val_auc(x, important, groups, s) for s in seeds])
                                for name, x in heads.items()},
        "val_auc_boosted_trees_hidden_states": summary([boosted_trees_auc(hidden, important, groups, s) for s in seeds]),
        "target_right_share": target_right.float().mean().item(),
        "important_rate_target_right": important[target_right].float().mean().item(),
        "important_rate_target_wrong": important[~target_right].float().mean().item(),
        "val_auc_correctness_flip_labels": summary(
            [val_auc(hidden, target_right != swap_right, groups, s) for s in seeds]),
        "val_auc_train_on_target_right": {
            f"train {t_name}, validate {v_name}": summary(
                [val_auc(hidden, important, groups, s, t_rows, v_rows) for s in seeds])
            for t_name, t_rows in (("all", None), ("target right", target_right.tolist()))
            for v_name, v_rows in (("all", None), ("target right", target_right.tolist()))
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
