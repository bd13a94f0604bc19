"""Forward cost of the default pair by precision and tokens per pass: what a decode step, a verify pass
and a teacher-forced check cost in fp32 and bf16. Prints a table of median ms and ratios.

    python bench/cpu_dtype_forward.py [--tokens 1,9,33,128] [--reps 3] [--threads 2]

On a CPU with native bf16 dot products (AVX512-BF16, AMX) bf16 halves the weight traffic of a decode step
and makes a multi-token pass far cheaper, which decides whether speculation pays (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge import Engine  # noqa: E402

CONTEXT = 300  # tokens already in the cache, as in the middle of a GSM8K answer


def measure(dtype: str, tokens: list[int], reps: int, max_seq_len: int) -> dict:
    eng = Engine.from_pretrained(target="default", draft="default", dtype=dtype, max_seq_len=max_seq_len)
    ids = torch.randint(0, 1000, (CONTEXT + max(tokens),), generator=torch.Generator().manual_seed(0))
    out = {}
    for role, dec in (("target", eng.target), ("draft", eng.draft)):
        dec.forward(ids[:CONTEXT], 0)
        for m in tokens:
            out[role, m] = median_ms(lambda m=m, dec=dec: dec.forward(ids[CONTEXT : CONTEXT + m], CONTEXT), reps)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,9,33,128", help="tokens per pass, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    ms = {dt: measure(dt, tokens, args.reps, CONTEXT + max(tokens) + 1) for dt in ("fp32", "bf16")}
    print("| model | tokens/pass | fp32 ms | bf16 ms | fp32/bf16 | fp32 vs 1 token | bf16 vs 1 token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for role in ("target", "draft"):
        for m in tokens:
            f, b = ms["fp32"][role, m], ms["bf16"][role, m]
            print(f"| {role} | {m} | {f:.0f} | {b:.0f} | {f / b:.2f} | {f / ms['fp32'][role, 1]:.2f} "
                  f"| {b / ms['bf16'][role, 1]:.2f} |")


if __name__ == "__main__":
    main()
