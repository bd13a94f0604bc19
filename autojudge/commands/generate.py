"""`autojudge generate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from autojudge.commands.options import engine_from_options, engine_options, protect_ends_option
from autojudge.engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOPK,
    DEFAULT_TOPK_ALPHA,
    DEFAULT_WINDOW,
    JUDGE_MODES,
    LOSSY_MODES,
    MAX_WINDOW,
    MODES,
    TopkRule,
    check_request,
)
from autojudge.errors import AutojudgeError
from autojudge.jsonl import read_jsonl
from autojudge.judge.judge_file import load_judge_for_engine


@click.command()
@click.argument("prompt", required=False)
@engine_options
@click.option("--mode", type=click.Choice(MODES), default="speculative", show_default=True)
@click.option("--window", default=DEFAULT_WINDOW, show_default=True, type=int, help=f"Draft tokens per cycle (1..{MAX_WINDOW}).")
@click.option("--max-new-tokens", default=DEFAULT_MAX_NEW_TOKENS, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 decodes greedily.")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens.")
@click.option("--judge", "judge_path", default=None,
              help="Judge file (modes autojudge/judge): PATH, 'default' (math), 'default-math' or 'default-code'.")
@click.option("--threshold", default=None, type=float, help="Judge threshold tau: accept a mismatch when p < tau.")
@click.option("--recall", default=None, type=float, help="Pick tau from the judge's stored thresholds by recall.")
@click.option("--topk", default=None, type=int,
              help=f"Mode topk: keep a mismatching draft token among the target's top K [default: {DEFAULT_TOPK}].")
@click.option("--alpha", default=None, type=float,
              help="Mode topk: ... whose probability is at least ALPHA x the top token's "
                   f"[default: {DEFAULT_TOPK_ALPHA}].")
@protect_ends_option
@click.option("--json", "as_json", is_flag=True, help="Print output and stats as one JSON object.")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL, one prompt per line (a string, chat messages, token ids, or {\"prompt\": ...}): "
                   "decoded in batches, one JSON line out per prompt, in order.")
@click.option("--batch-size", default=8, show_default=True, type=int,
              help="With --prompts-file: sequences decoded together (continuous batching).")
def generate(prompt, target, draft, device, dtype, max_seq_len, kernels, cuda_graphs, mode, window, max_new_tokens,
             temperature, seed, ignore_eos, judge_path, threshold, recall, topk, alpha, protect_ends, as_json,
             prompts_file, batch_size):
    """Generate from PROMPT (text; '-' or nothing reads stdin), or from every line of --prompts-file."""
    if prompts_file is not None:
        if prompt is not None:
            raise AutojudgeError("give a PROMPT or --prompts-file, not both")
        if batch_size < 1:
            raise AutojudgeError(f"--batch-size must be at least 1, got {batch_size}")
        prompts = read_prompts_file(prompts_file)
    else:
        prompt = read_prompt(prompt)
    # Judge modes load the default judge when no --judge is given.
    check_request(mode, window=window, max_new_tokens=max_new_tokens, temperature=temperature,
                  has_draft=draft != "none", has_judge=mode in LOSSY_MODES or judge_path is not None,
                  threshold=threshold)
    if recall is not None and mode not in JUDGE_MODES:
        raise AutojudgeError(f"--recall applies to modes autojudge and judge, not {mode!r}")
    rule = topk_rule(mode, topk, alpha, judge_path, threshold)
    engine = engine_from_options(target, None if mode == "target" else draft, device, dtype, max_seq_len, kernels,
                                 cuda_graphs, protect_ends)
    judge, threshold = (rule, None) if rule is not None else _judge_for(engine, mode, judge_path, threshold, recall)
    options = dict(max_new_tokens=max_new_tokens, mode=mode, window=window, ignore_eos=ignore_eos,
                   temperature=temperature, seed=seed, judge=judge, threshold=threshold)
    if prompts_file is not None:
        for out in engine.generate_batch(prompts, max_batch=batch_size, **options):
            click.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
        return
    if as_json:
        out = engine.generate(prompt, **options)
        click.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
        return
    for piece in engine.stream(prompt, **options):
        click.echo(piece, nl=False)
    click.echo()


def read_prompt(prompt: str | None) -> str:
    """PROMPT from the command line; '-' or none reads stdin."""
    if prompt is None or prompt == "-":
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv and stdin bytes that are not UTF-8 arrive as lone surrogates
        raise AutojudgeError("the prompt is not valid UTF-8 text; re-encode it as UTF-8") from None
    if not prompt.strip():
        raise AutojudgeError("empty prompt: pass text as an argument or on stdin")
    return prompt


def read_prompts_file(path: Path) -> list:
    rows = read_jsonl(path)
    if not rows:
        raise AutojudgeError(f"{path} holds no prompts")
    return [row["prompt"] if isinstance(row, dict) and "prompt" in row else row for _, row in rows]


def topk_rule(mode: str, topk: int | None, alpha: float | None, judge_path=None, threshold=None) -> TopkRule | None:
    """Mode topk's rule from --topk/--alpha (each defaulting to the rule's own); refused in other modes."""
    if mode != "topk":
        if topk is not None or alpha is not None:
            raise AutojudgeError(f"--topk and --alpha apply to mode topk, not {mode!r}")
        return None
    if judge_path is not None or threshold is not None:
        raise AutojudgeError("mode topk needs no trained judge: drop --judge/--threshold, set --topk and --alpha")
    return TopkRule(**{name: value for name, value in (("k", topk), ("alpha", alpha)) if value is not None})


def _judge_for(engine, mode, judge_path, threshold, recall):
    if mode not in JUDGE_MODES:
        return None, None
    judge = load_judge_for_engine(judge_path or "default", engine, mode)
    return judge, judge.threshold_for(recall=recall, threshold=threshold)
