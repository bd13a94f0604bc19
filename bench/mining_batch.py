"""Batched mining against batch 1 on the same problems: wall time per problem and whether the labels agree.

    python bench/mining_batch.py --limit 4 --batch-sizes 1,4 --max-new-tokens 128 [--dtype auto]

Real models (default pair unless --target/--draft), GSM8K train from problem 0; prints a Markdown table for
bench/RESULTS.md. Labels are compared per problem (a batch finishes problems in another order).
"""

from __future__ import annotations

import argparse
import time

import torch

from autojudge import Engine
from autojudge.mining.batched import mine_all
from autojudge.mining.miner import Miner, MiningOptions
from autojudge.tasks.checkers import gsm8k_checker
from autojudge.tasks.datasets import load_dataset
from autojudge.tasks.prompts import build_messages


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    engine = Engine.from_pretrained(target=args.target, draft=args.draft, dtype=args.dtype,
                                    max_seq_len=args.max_seq_len)
    problems = load_dataset("gsm8k", "train")[: args.limit]
    items = [(p, engine.encode_prompt(build_messages(p))) for p in problems]
    # Cut answers are labelled too, so every problem runs its whole search: this measures cost, not labels' worth.
    options = MiningOptions(max_new_tokens=args.max_new_tokens, skip_truncated=False)
    runs = {}
    for size in map(int, args.batch_sizes.split(",")):
        results = {}
        t0 = time.perf_counter()
        mine_all(Miner(engine, gsm8k_checker, options), items, size,
                 lambda problem, result, results=results: results.__setitem__(problem.problem_id, result))
        runs[size] = (time.perf_counter() - t0, results)
    base = runs[min(runs)][1]
    print(f"{engine.target.name} <- {engine.draft.name}, {engine.target.precision}, {args.limit} GSM8K train "
          f"problems, --max-new-tokens {args.max_new_tokens}, {torch.get_num_threads()} threads\n")
    print("| batch | wall s | s / problem | × batch-1 speed | labels | important | truncated | labels = batch 1 |")
    print("|---|---|---|---|---|---|---|---|")
    base_s = runs[min(runs)][0]
    for size, (wall, results) in runs.items():
        labels = sum(len(r.labels) for r in results.values())
        important = sum(r.record["n_important"] for r in results.values())
        truncated = sum(r.record["truncated"] for r in results.values())
        same = sum(results[pid].labels == base[pid].labels for pid in base)
        print(f"| {size} | {wall:.0f} | {wall / len(results):.1f} | {base_s / wall:.2f} | {labels} | {important} "
              f"| {truncated} | {same}/{len(base)} |")


if __name__ == "__main__":
    main()
