"""CPU attention of a batch of decode steps over a fp32 cache (the engine keeps keys and values in fp32 on a CPU):
torch's SDPA with enable_gqa against the engine's `_attend`, which folds each KV head's query heads into its
query rows. Prints a markdown table of median ms a layer, at the default pair's head shapes.

    python bench/cpu_attention.py [--rows 16,64] [--slots 300,750] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge.engine.model import _attend  # noqa: E402

# (query heads, KV heads, head dim) of the default target (1.5B) and draft (0.5B).
SHAPES = {"target": (12, 2, 128), "draft": (14, 2, 64)}
CACHE_SLOTS = 1025


def time_shape(rows: int, slots: int, heads: int, kv_heads: int, head_dim: int, reps: int):
    """(enable_gqa ms, folded ms, max abs difference) of one decode step's attention a layer."""
    k = torch.randn(rows, kv_heads, CACHE_SLOTS, head_dim)[:, :, :slots]
    v = torch.randn(rows, kv_heads, CACHE_SLOTS, head_dim)[:, :, :slots]
    q = torch.randn(rows, 1, heads, head_dim).transpose(1, 2)  # as the projections lay it out
    positions = torch.randint(slots // 4, slots, (rows, 1))
    mask = (torch.arange(slots)[None, None, :] <= positions[:, :, None])[:, None]

    def with_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def folded():
        return _attend(q, k, v, mask)

    diff = (with_gqa() - folded()).abs().max().item()
    return median_ms(with_gqa, reps), median_ms(folded, reps), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--slots", default="300,750", help="attended slots (the step's kv_len)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| model | rows | slots | enable_gqa ms | folded ms | speed-up | max abs diff |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        for rows in map(int, args.rows.split(",")):
            for slots in map(int, args.slots.split(",")):
                gqa_ms, folded_ms, diff = time_shape(rows, slots, *shape, args.reps)
                print(f"| {name} | {rows} | {slots} | {gqa_ms:.2f} | {folded_ms:.2f} | {gqa_ms / folded_ms:.2f}x "
                      f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
