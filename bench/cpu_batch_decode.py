"""A batched decode step of the default target on the CPU (rows x one new token over a cached context, mining's
and a batched eval's inner loop) by weight precision and KV-cache precision. Prints a table of median ms.

    python bench/cpu_batch_decode.py [--rows 16,64,128] [--context 400] [--reps 3] [--threads 2]

Settings: fp32 everywhere; bf16 weights with an fp32 cache (what the engine does on a CPU); bf16 weights with a
bf16 cache (what it did before: torch's CPU attention in bf16 is the slow part). A last table times one layer's
cache write both ways: the indexed write the cache does and the scatter_ it replaced, which is slow in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge import Engine  # noqa: E402
from autojudge.engine import model as model_module  # noqa: E402

SETTINGS = {  # name -> (weights, KV cache in the weights' precision?)
    "fp32": ("fp32", False),
    "bf16 weights, fp32 cache": ("bf16", False),
    "bf16 weights, bf16 cache": ("bf16", True),
}


def measure(weights: str, cache_like_weights: bool, rows: list[int], context: int, reps: int) -> dict[int, float]:
    real = model_module.kv_cache_dtype
    if cache_like_weights:
        model_module.kv_cache_dtype = lambda dtype, device: dtype
    try:
        eng = Engine.from_pretrained(target="default", draft=None, dtype=weights, max_seq_len=context + 8)
        dec, out = eng.target, {}
        for n in rows:
            dec.model.setup_cache(context + 8, batch=n)
            # Each row attends to `context` cached slots (what they hold does not change the cost; no prefill).
            tokens = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n))
            step = [(row, context, 1) for row in range(n)]
            out[n] = median_ms(lambda step=step, tokens=tokens: dec.forward_packed(tokens, step), reps)
    finally:
        model_module.kv_cache_dtype = real
    return out


def cache_write_ms(rows: int, context: int, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(indexed write, scatter_) of one token a row into one layer's [rows, 2, context, 128] keys."""
    keys = torch.zeros(rows, 2, context + 1, 128, dtype=dtype)
    new = torch.randn(rows, 2, 1, 128, dtype=dtype)
    positions = torch.full((rows, 1), context - 1)
    row_ids = torch.arange(rows)[:, None]

    def indexed():
        keys[row_ids, :, positions] = new.transpose(1, 2)

    def scattered():
        keys.scatter_(2, positions[:, None, :, None].expand(-1, 2, -1, 128), new)

    return median_ms(indexed, reps), median_ms(scattered, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16,64,128", help="rows per step, comma-separated")
    parser.add_argument("--context", type=int, default=400, help="tokens already cached in every row")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    ms = {name: measure(*setting, rows, args.context, args.reps) for name, setting in SETTINGS.items()}
    print(f"target decode step, {args.context} tokens cached a row, median of {args.reps} (ms)\n")
    print("| rows | " + " | ".join(SETTINGS) + " | fp32 cache vs bf16 cache |")
    print("|---:|" + "---:|" * (len(SETTINGS) + 1))
    for n in rows:
        cells = " | ".join(f"{ms[name][n]:.0f}" for name in SETTINGS)
        speedup = ms["bf16 weights, bf16 cache"][n] / ms["bf16 weights, fp32 cache"][n]
        print(f"| {n} | {cells} | {speedup:.2f}x |")
    print("\none layer's cache write of one token a row (ms)\n")
    print("| rows | dtype | indexed write | scatter_ |")
    print("|---:|---|---:|---:|")
    for n in rows:
        for dtype in (torch.float32, torch.bfloat16):
            indexed, scattered = cache_write_ms(n, args.context, dtype, args.reps)
            print(f"| {n} | {str(dtype).removeprefix('torch.')} | {indexed:.3f} | {scattered:.3f} |")


if __name__ == "__main__":
    main()
