"""The tail of a batch: GSM8K test prompts through fewer slots than prompts, decoded with the busy rows packed
down once no prompt waits (the engine's way) and with every slot served to the end (packing switched off here),
default pair. Prints whether every row's tokens agree, each way's decode time and target positions pushed
(prefills out).

    python bench/batch_tail.py [--problems 24] [--batch-size 12] [--new-tokens 200] [--mode target|speculative]
        [--schedule tokenwise] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from timing import timed_batch  # noqa: E402

from autojudge import Engine  # noqa: E402
from autojudge.engine.batched import BatchRun  # noqa: E402
from autojudge.tasks.datasets import load_dataset  # noqa: E402
from autojudge.tasks.prompts import build_messages  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--mode", default="target", choices=("target", "speculative"))
    parser.add_argument("--schedule", default="tokenwise", choices=("tokenwise", "cycles"))
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    eng = Engine.from_pretrained(target="default", draft="default", dtype=args.dtype, max_seq_len=1024)
    prompts = [build_messages(p) for p in load_dataset("gsm8k", "test")[: args.problems]]
    kw = dict(max_batch=args.batch_size, max_new_tokens=args.new_tokens, mode=args.mode, window=args.window,
              schedule=args.schedule)
    print(f"{len(prompts)} GSM8K test prompts through {args.batch_size} slots, <= {args.new_tokens} new tokens, "
          f"{args.mode}, {args.schedule}, {args.dtype}")
    print("| busy rows | decode s (prefills out) | target positions | tokens | answer tokens min / median / max |")
    print("|---|---:|---:|---:|---|")
    outs = {}
    pack_rows = BatchRun._pack_rows
    for name in ("packed", "every slot"):
        if name == "every slot":
            BatchRun._pack_rows = lambda self: None
        out, decode_s, positions = timed_batch(eng, prompts, **kw)
        BatchRun._pack_rows = pack_rows
        lengths = sorted(o.stats.new_tokens for o in out)
        print(f"| {name} | {decode_s:.1f} | {positions} | {sum(lengths)} | {lengths[0]} / "
              f"{lengths[len(lengths) // 2]} / {lengths[-1]} |")
        outs[name] = [o.token_ids for o in out]
    print(f"every row's tokens agree: {outs['packed'] == outs['every slot']}")


if __name__ == "__main__":
    main()
