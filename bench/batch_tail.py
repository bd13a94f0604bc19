"""The tail of a batch: GSM8K test prompts through fewer slots than prompts, decoded with the busy rows packed
down once no prompt waits (the engine's way) and with every slot served to the end (packing switched off here),
default pair. Prints whether every row's tokens agree, each way's decode time and target positions pushed.

    python bench/batch_tail.py [--problems 24] [--batch-size 12] [--new-tokens 200] [--mode target|speculative]
        [--schedule tokenwise] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

from autojudge import Engine
from autojudge.engine.batched import BatchRun
from autojudge.tasks.datasets import load_dataset
from autojudge.tasks.prompts import build_messages


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
        positions = 0
        forward_rows = eng.target.forward_rows

        def counting(tokens, *a, forward_rows=forward_rows, **k):
            nonlocal positions
            positions += tokens.numel()  # padding included: it costs what a real position does
            return forward_rows(tokens, *a, **k)

        eng.target.forward_rows = counting
        t0 = time.perf_counter()
        out = eng.generate_batch(prompts, **kw)
        wall = time.perf_counter() - t0
        eng.target.forward_rows = forward_rows
        BatchRun._pack_rows = pack_rows
        lengths = sorted(o.stats.new_tokens for o in out)
        decode = wall - sum(o.stats.prefill_s for o in out)
        print(f"| {name} | {decode:.1f} | {positions} | {sum(lengths)} | {lengths[0]} / "
              f"{lengths[len(lengths) // 2]} / {lengths[-1]} |")
        outs[name] = [o.token_ids for o in out]
    print(f"every row's tokens agree: {outs['packed'] == outs['every slot']}")


if __name__ == "__main__":
    main()
