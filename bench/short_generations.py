"""Cost of the short speculative generations mining asks for: `generate(context, max_new_tokens=n)` with the
context already cached, as the miner calls it between checks of the previous continuation. Prints a table
of median ms per call, cycles and drafted tokens.

    python bench/short_generations.py [--labels data/mined/default/gsm8k-train-bf16.jsonl] [--dtype bf16]

Contexts are real: prompt + the first `cut` tokens of target answers from a mining file. Run it at two
commits to compare them (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge import Engine  # noqa: E402


def contexts(labels: str, problems: int, cuts: list[int]) -> list[list[int]]:
    prompts = {}
    out = []
    with open(labels, encoding="utf-8") as f:
        for row in map(json.loads, f):
            if row["kind"] == "label":
                prompts[row["problem_id"]] = row["prompt_ids"]
            elif row["kind"] == "problem" and row["problem_id"] in prompts and len(out) < problems * len(cuts):
                answer = row["answer_ids"]
                out += [prompts[row["problem_id"]] + answer[:cut] for cut in cuts if cut < len(answer)]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", default="data/mined/default/gsm8k-train-bf16.jsonl")
    parser.add_argument("--problems", type=int, default=3)
    parser.add_argument("--cuts", default="40,120,200", help="answer tokens in the context, comma-separated")
    parser.add_argument("--new-tokens", default="4,8,16", help="max_new_tokens per call, comma-separated")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(target="default", draft="default", dtype=args.dtype, max_seq_len=1024)
    ctxs = contexts(args.labels, args.problems, [int(c) for c in args.cuts.split(",")])
    print(f"{len(ctxs)} contexts, window {args.window}, {args.dtype}")
    print("| new tokens | median ms per call | cycles per call | drafted tokens per call |")
    print("|---:|---:|---:|---:|")
    for n in (int(t) for t in args.new_tokens.split(",")):
        times, cycles, drafted = [], 0, 0
        for ctx in ctxs:
            def call(ctx=ctx, n=n):
                return eng.generate(ctx, max_new_tokens=n, mode="speculative", window=args.window, ignore_eos=True)

            stats = call().stats  # fills the caches with the context, as the miner's earlier passes have
            cycles += stats.cycles
            drafted += getattr(stats, "drafted_tokens", stats.cycles * args.window)
            times.append(median_ms(call, args.reps))
        print(f"| {n} | {sorted(times)[len(times) // 2]:.0f} | {cycles / len(ctxs):.2f} | {drafted / len(ctxs):.1f} |")


if __name__ == "__main__":
    main()
