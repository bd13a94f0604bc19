"""How long the target's answers run: the token budget that keeps a share of them whole, before mining with it.
Greedy target-only answers of the first N problems (batched), then percentiles and, per budget, the share of
answers that end before it. A cut answer has no final answer, so mining gets no labels from it.

    python bench/answer_lengths.py --dataset gsm8k --split train --limit 64 --max-new-tokens 1024 --batch-size 8
    python bench/answer_lengths.py --dataset humaneval --limit 64 --max-new-tokens 1024

Prints a markdown table; --out FILE also keeps one JSON line per problem (id, tokens, ended).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from autojudge import Engine
from autojudge.tasks.datasets import load_dataset
from autojudge.tasks.prompts import build_messages


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--split", default=None, help="default: train for gsm8k, test for humaneval")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="answers still going here count as cut")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--target", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--budgets", default="256,320,384,448,512,640,768,1024",
                        help="comma-separated budgets to report (those up to --max-new-tokens)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    split = args.split or ("test" if args.dataset == "humaneval" else "train")
    problems = load_dataset(args.dataset, split)[: args.limit]
    engine = Engine.from_pretrained(target=args.target, draft=None, dtype=args.dtype, max_seq_len=args.max_seq_len)
    outputs = engine.generate_batch([build_messages(p) for p in problems], max_batch=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, mode="target")
    rows = [{"problem_id": p.problem_id, "tokens": o.stats.new_tokens, "ended": o.stats.finish_reason == "eos"}
            for p, o in zip(problems, outputs)]
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ended = sorted(r["tokens"] for r in rows if r["ended"])
    n = len(rows)
    print(f"{args.dataset}/{split}, first {n} problems, target {engine.target.name}, {engine.target.precision}, "
          f"greedy, up to {args.max_new_tokens} tokens: {len(ended)} answers ended, {n - len(ended)} still going\n")
    print("| percentile | answer tokens |\n|---:|---:|")
    for q in (50, 75, 90, 95, 99):
        k = math.ceil(q / 100 * n) - 1  # the answer at this rank; past the ended ones it is a cut one
        print(f"| {q} | {ended[k] if k < len(ended) else f'> {args.max_new_tokens}'} |")
    print("\n| budget | answers whole |\n|---:|---:|")
    for budget in (b for b in map(int, args.budgets.split(",")) if b <= args.max_new_tokens):
        print(f"| {budget} | {sum(t <= budget for t in ended) / n:.0%} |")


if __name__ == "__main__":
    main()
