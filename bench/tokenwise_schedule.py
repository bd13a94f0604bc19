"""The tokenwise schedule against cycles on real prompts: one batch of GSM8K test problems decoded both ways with
the default pair; prints whether every row's tokens and cycles agree, and each schedule's decode time, model steps
and target positions pushed (padding included; the prefills, the same in both, taken out).

    python bench/tokenwise_schedule.py [--problems 16] [--new-tokens 64] [--window 16] [--dtype fp32]
        [--mode speculative|autojudge|topk]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import timed_batch  # noqa: E402

from autojudge import Engine  # noqa: E402
from autojudge.engine.request import TopkRule  # noqa: E402
from autojudge.judge.judge_file import load_judge_for_engine  # noqa: E402
from autojudge.tasks.datasets import load_dataset  # noqa: E402
from autojudge.tasks.prompts import build_messages  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--mode", default="speculative", choices=("speculative", "autojudge", "topk"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(target="default", draft="default", dtype=args.dtype, max_seq_len=1024)
    judge = None if args.mode == "speculative" else TopkRule() if args.mode == "topk" else \
        load_judge_for_engine("default", eng, args.mode)
    prompts = [build_messages(p) for p in load_dataset("gsm8k", "test")[: args.problems]]
    kw = dict(max_batch=len(prompts), max_new_tokens=args.new_tokens, mode=args.mode, window=args.window,
              judge=judge)
    print(f"{len(prompts)} GSM8K test prompts in one batch, {args.new_tokens} new tokens, window {args.window}, "
          f"{args.mode}, {args.dtype}, {torch.get_num_threads()} threads")
    print("| schedule | decode s | model steps | target positions | tokens | accepted / cycle |")
    print("|---|---:|---:|---:|---:|---:|")
    outs = {}
    for schedule in ("tokenwise", "cycles"):
        out, decode_s, positions = timed_batch(eng, prompts, schedule=schedule, **kw)
        cycles = sum(o.stats.cycles for o in out)
        accepted = sum(a * c for o in out for a, c in o.stats.histogram.items())
        tokens = sum(o.stats.new_tokens for o in out)
        print(f"| {schedule} | {decode_s:.1f} | {out.stats.model_steps} | {positions} | {tokens} "
              f"| {accepted / cycles:.2f} |", flush=True)
        outs[schedule] = out
    same = [a.token_ids == b.token_ids and a.stats.histogram == b.stats.histogram
            for a, b in zip(outs["tokenwise"], outs["cycles"])]
    print(f"rows with the same tokens and cycles: {sum(same)} / {len(same)}")


if __name__ == "__main__":
    main()
