"""`autojudge generate` and `autojudge bench`."""

from __future__ import annotations

import json
import sys

import click

from autojudge.engine.engine import MAX_WINDOW, MODES, check_window
from autojudge.engine.options import engine_from_options, engine_options
from autojudge.errors import AutojudgeError


@click.command()
@click.argument("prompt", required=False)
@engine_options
@click.option("--mode", type=click.Choice(MODES), default="speculative", show_default=True)
@click.option("--window", default=8, show_default=True, type=int, help=f"Draft tokens per cycle (1..{MAX_WINDOW}).")
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
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
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise AutojudgeError("empty prompt: pass text as an argument or on stdin")
    if mode != "target" and draft == "none":
        raise AutojudgeError(f"mode {mode!r} needs a draft model; drop --draft none or use --mode target")
    if mode != "target":
        check_window(window)
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
    if mode not in ("autojudge", "judge"):
        if judge_path or threshold is not None or recall is not None:
            raise AutojudgeError(f"--judge/--threshold/--recall apply to modes autojudge and judge, not {mode!r}")
        return None, None
    from autojudge.judge.judge_file import load_judge_for_engine

    judge = load_judge_for_engine(judge_path or "default", engine, mode)
    return judge, judge.threshold_for(recall=recall, threshold=threshold)


@click.command()
@engine_options
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--window", default=8, show_default=True, type=int)
@click.option("--prompts", default=3, show_default=True, type=int, help="How many GSM8K test prompts.")
@click.option("--hf/--no-hf", default=True, show_default=True, help="Also time transformers' generate.")
def bench(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs, max_new_tokens, window, prompts, hf):
    """Tokens/s of target-only and speculative decoding (and transformers' generate) in one process."""
    from autojudge.engine.benchmark import run_generation_bench

    engine = engine_from_options(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs)
    click.echo(run_generation_bench(engine, max_new_tokens=max_new_tokens, window=window, n_prompts=prompts,
                                    with_transformers=hf))
