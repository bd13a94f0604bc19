"""`autojudge generate`."""

from __future__ import annotations

import json
import sys

import click

from autojudge.commands.options import engine_from_options, engine_options
from autojudge.engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_WINDOW,
    JUDGE_MODES,
    MAX_WINDOW,
    MODES,
    check_request,
)
from autojudge.errors import AutojudgeError
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
@click.option("--judge", "judge_path", default=None, help="Judge file (modes autojudge/judge): PATH or 'default'.")
@click.option("--threshold", default=None, type=float, help="Judge threshold tau: accept a mismatch when p < tau.")
@click.option("--recall", default=None, type=float, help="Pick tau from the judge's stored thresholds by recall.")
@click.option("--json", "as_json", is_flag=True, help="Print output and stats as one JSON object.")
def generate(prompt, target, draft, device, dtype, max_seq_len, kernels, cuda_graphs, mode, window, max_new_tokens,
             temperature, seed, ignore_eos, judge_path, threshold, recall, as_json):
    """Generate from PROMPT (text; '-' or nothing reads stdin)."""
    if prompt is None or prompt == "-":
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv and stdin bytes that are not UTF-8 arrive as lone surrogates
        raise AutojudgeError("the prompt is not valid UTF-8 text; re-encode it as UTF-8") from None
    if not prompt.strip():
        raise AutojudgeError("empty prompt: pass text as an argument or on stdin")
    # Judge modes load the default judge when no --judge is given.
    check_request(mode, window=window, max_new_tokens=max_new_tokens, temperature=temperature,
                  has_draft=draft != "none", has_judge=mode in JUDGE_MODES or judge_path is not None,
                  threshold=threshold)
    if recall is not None and mode not in JUDGE_MODES:
        raise AutojudgeError(f"--recall applies to modes autojudge and judge, not {mode!r}")
    engine = engine_from_options(target, None if mode == "target" else draft, device, dtype, max_seq_len, kernels,
                                 cuda_graphs)
    judge, threshold = _judge_for(engine, mode, judge_path, threshold, recall)
    options = dict(max_new_tokens=max_new_tokens, mode=mode, window=window, ignore_eos=ignore_eos,
                   temperature=temperature, seed=seed, judge=judge, threshold=threshold)
    if as_json:
        out = engine.generate(prompt, **options)
        click.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
        return
    for piece in engine.stream(prompt, **options):
        click.echo(piece, nl=False)
    click.echo()


def _judge_for(engine, mode, judge_path, threshold, recall):
    if mode not in JUDGE_MODES:
        return None, None
    judge = load_judge_for_engine(judge_path or "default", engine, mode)
    return judge, judge.threshold_for(recall=recall, threshold=threshold)
