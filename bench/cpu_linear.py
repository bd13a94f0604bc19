"""CPU fp32 linear layers with few rows: F.linear (x @ W^T) against the engine's W @ x^T, per layer shape and
for whole forwards of the default pair. Prints two markdown tables of median ms.

    python bench/cpu_linear.py [--rows 1,2,4,9,17,33] [--reps 5] [--no-models]

A batch of decode steps, a verify pass and the miner's logits rows all multiply a few rows by a large weight;
MKL serves x @ W^T with 2-64 rows by a slow path on some hosts, which made a batch of 4 cost ~4 single steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge import Engine  # noqa: E402
from autojudge.engine import model as model_module  # noqa: E402

# (out, in) of the default target (1.5B) and draft (0.5B) projections; 151936 is the vocabulary.
SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (4864, 896), (896, 4864), (151936, 1536)]
CONTEXT = 300


def layer_table(rows: list[int], reps: int):
    print("| weight (out x in) | rows | F.linear ms | W @ x^T ms | speedup |")
    print("|---|---:|---:|---:|---:|")
    layer = model_module.Linear(1, 1, bias=False)
    for out, inn in SHAPES:
        layer.weight = torch.nn.Parameter(torch.randn(out, inn), requires_grad=False)
        for m in rows:
            x = torch.randn(m, inn)
            base = median_ms(lambda x=x: F.linear(x, layer.weight), reps)
            ours = median_ms(lambda x=x: layer(x), reps)
            print(f"| {out} x {inn} | {m} | {base:.2f} | {ours:.2f} | {base / ours:.2f} |", flush=True)


def model_table(rows: list[int], reps: int):
    """One forward of `rows` new tokens after CONTEXT cached ones, with every Linear switched to F.linear and back."""
    eng = Engine.from_pretrained(target="default", draft="default", dtype="fp32", max_seq_len=CONTEXT + max(rows) + 1)
    ids = torch.randint(0, 1000, (CONTEXT + max(rows),), generator=torch.Generator().manual_seed(0))
    ours_forward = model_module.Linear.forward
    print("| model | tokens/pass | F.linear ms | W @ x^T ms | speedup | ours vs 1 token |")
    print("|---|---:|---:|---:|---:|---:|")
    for role, dec in (("target", eng.target), ("draft", eng.draft)):
        dec.forward(ids[:CONTEXT], 0)
        ms = {}
        for name, forward in (("base", lambda self, x: F.linear(x, self.weight, self.bias)), ("ours", ours_forward)):
            model_module.Linear.forward = forward
            for m in rows:
                ms[name, m] = median_ms(lambda m=m, dec=dec: dec.forward(ids[CONTEXT : CONTEXT + m], CONTEXT), reps)
        model_module.Linear.forward = ours_forward
        for m in rows:
            print(f"| {role} | {m} | {ms['base', m]:.0f} | {ms['ours', m]:.0f} | {ms['base', m] / ms['ours', m]:.2f} "
                  f"| {ms['ours', m] / ms['ours', 1]:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,9,17,33", help="rows (tokens) per product, comma-separated")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-models", action="store_true", help="only the per-layer table (no model weights needed)")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    layer_table(rows, args.reps)
    if not args.no_models:
        model_table(rows, args.reps)


if __name__ == "__main__":
    main()
