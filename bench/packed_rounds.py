"""One round of batched mining, packed against padded: the new tokens of every row in one forward without
padding (`Decoder.forward_packed`), or the way rounds ran before, rows with at most 4 new tokens sharing a padded
forward and each longer one (a checked piece of the previous continuation, a draft pass over a changed answer, a
prompt) in a forward of its own.

    python bench/packed_rounds.py [--model target|draft] [--reps 3] [--context 300]

Default-pair weights; prints a Markdown table of median ms per round. Each mix is `count x new tokens`.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from autojudge import Engine  # noqa: E402

MIXES = {
    "32 decoding rows": [(32, 1)],
    "16 rows: 12 decoding, 3 pieces of 40, a prompt of 150": [(12, 1), (3, 40), (1, 150)],
    "32 rows: 24 decoding, 6 pieces of 40, 2 prompts of 150": [(24, 1), (6, 40), (2, 150)],
    "32 rows: 28 decoding, 3 pieces of 4, a piece of 64": [(28, 1), (3, 4), (1, 64)],
}
SHARED_TOKENS = 4  # the old rule: rows with at most this many new tokens shared the padded forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["target", "draft"], default="target")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--context", type=int, default=300, help="Cached tokens before each row's new ones.")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    engine = Engine.from_pretrained(target="default", draft="default", dtype=args.dtype, max_seq_len=1024)
    decoder = getattr(engine, args.model)
    decoder.ensure_rows(max(sum(c for c, _ in mix) for mix in MIXES.values()))
    gen = torch.Generator().manual_seed(0)
    print(f"{decoder.name}, {decoder.precision}, {torch.get_num_threads()} threads, {args.context} cached tokens a row\n")
    print("| round | new tokens | padded + alone ms | packed ms | speedup |")
    print("|---|---:|---:|---:|---:|")
    for name, mix in MIXES.items():
        counts = [n for c, n in mix for _ in range(c)]
        tokens = [torch.randint(0, 1000, (n,), generator=gen) for n in counts]
        before = median_ms(partial(padded, decoder, tokens, args.context), args.reps)
        after = median_ms(partial(packed, decoder, tokens, args.context), args.reps)
        print(f"| {name} | {sum(counts)} | {before:.0f} | {after:.0f} | {before / after:.2f} |", flush=True)


def padded(decoder, tokens: list[torch.Tensor], context: int):
    counts = [len(t) for t in tokens]
    short = [b for b, n in enumerate(counts) if n <= SHARED_TOKENS]
    width = max(counts[b] for b in short)
    ids = torch.zeros(len(counts), width, dtype=torch.long)
    positions = torch.full_like(ids, decoder.max_seq_len)  # padding goes to the trash slot
    for b in short:
        ids[b, : counts[b]] = tokens[b]
        positions[b, : counts[b]] = torch.arange(context, context + counts[b])
    decoder.forward_rows(ids, positions, context + width, slice(0, len(counts)), None)
    for b, n in enumerate(counts):
        if n > SHARED_TOKENS:
            decoder.forward_rows(tokens[b][None], torch.arange(context, context + n)[None], context + n,
                                 slice(b, b + 1), None)


def packed(decoder, tokens: list[torch.Tensor], context: int):
    decoder.forward_packed(torch.cat(tokens), [(b, context, len(t)) for b, t in enumerate(tokens)])


if __name__ == "__main__":
    main()
