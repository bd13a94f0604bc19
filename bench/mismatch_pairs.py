"""Which mismatches a labels file calls important: the most frequent (target token -> draft token) pairs among
important and among unimportant mismatches, and the share of important ones by the kind of token the target
wanted (digit, operator, word, ...). Prints markdown tables.

    python bench/mismatch_pairs.py data/mined/default/gsm8k-train-bf16.jsonl [--top 12] [--target default]

This is the AutoJudge paper's qualitative check ("important tokens are numbers and operators in math, ...")
on our own labels. Needs only the target's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autojudge.engine import loading  # noqa: E402
from autojudge.engine.tokenizer import load_tokenizer  # noqa: E402


def token_kind(text: str) -> str:
    core = text.strip()
    if not core:
        return "whitespace"
    if any(c.isdigit() for c in core):
        return "number"
    if all(c in "+-*/=×÷^()%$.,:;" for c in core):
        return "operator/punctuation"
    if core.startswith("\\") or all(c in "{}[]\\_" for c in core):
        return "latex"
    if core.isalpha():
        return "word"
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", type=Path)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--target", default="default", help="model whose tokenizer decodes the ids")
    args = parser.parse_args()
    tokenizer = load_tokenizer(loading.resolve(args.target, "target").directory)
    rows = [json.loads(line) for line in args.labels.read_text().splitlines()]
    labels = [r for r in rows if r.get("kind") == "label"]
    if not labels:
        parser.error(f"{args.labels} holds no label rows")

    def show(token: int) -> str:
        return json.dumps(tokenizer.decode([token]), ensure_ascii=False).replace("|", "\\|")

    important = sum(r["important"] for r in labels)
    print(f"{len(labels)} mismatches from {len({r['problem_id'] for r in labels})} problems, "
          f"{important} important ({important / len(labels):.0%})\n")
    for flag, title in ((True, "important"), (False, "unimportant")):
        pairs = Counter((r["target_token"], r["draft_token"]) for r in labels if r["important"] == flag)
        print(f"| most frequent {title} pairs: target -> draft | count |\n|---|---:|")
        for (t, d), n in pairs.most_common(args.top):
            print(f"| {show(t)} -> {show(d)} | {n} |")
        print()
    kinds: dict[str, list[int]] = {}
    for r in labels:
        kinds.setdefault(token_kind(tokenizer.decode([r["target_token"]])), []).append(r["important"])
    print("| token the target wanted | mismatches | important |\n|---|---:|---:|")
    for kind, flags in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        print(f"| {kind} | {len(flags)} | {sum(flags) / len(flags):.0%} |")


if __name__ == "__main__":
    main()
