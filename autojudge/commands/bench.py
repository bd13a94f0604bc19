"""`autojudge bench`: transformers' generate vs our target mode vs speculative, one process."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone

import click
import torch

from autojudge.commands.options import engine_from_options, engine_options
from autojudge.engine.request import DEFAULT_WINDOW
from autojudge.errors import AutojudgeError


def gsm8k_test_questions(n: int) -> list[str]:
    from autojudge.tasks.datasets import load_dataset

    return [problem.question for problem in load_dataset("gsm8k", "test")[:n]]


def _transformers_tps(engine, prompts: list[list[int]], max_new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.target.checkpoint.directory,
                                                 dtype=engine.target.model.lm_head.weight.dtype)
    model = model.to(engine.target.device).eval()
    tokens, seconds = 0, 0.0
    for ids in prompts:
        inputs = torch.tensor([ids], device=engine.target.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=engine.tokenizer.pad_token_id)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - len(ids)
    return tokens / seconds


def run_generation_bench(engine, max_new_tokens: int, window: int, n_prompts: int, with_transformers: bool) -> str:
    prompts = [engine.encode_prompt(q) for q in gsm8k_test_questions(n_prompts)]
    engine.generate(prompts[0], max_new_tokens=4, mode="target")  # warm-up: first-call allocations
    rows = []
    if with_transformers:
        rows.append(("transformers generate (target)", _transformers_tps(engine, prompts, max_new_tokens), None))
    modes = [("autojudge target", "target")] + ([("autojudge speculative", "speculative")] if engine.draft else [])
    for label, mode in modes:
        tokens, seconds, accepted = 0, 0.0, []
        for ids in prompts:
            out = engine.generate(ids, max_new_tokens=max_new_tokens, mode=mode, window=window, ignore_eos=True)
            tokens += out.stats.new_tokens
            seconds += out.stats.total_s
            accepted.append(out.stats.accepted_per_cycle)
        rows.append((label + (f" (window {window})" if mode != "target" else ""), tokens / seconds,
                     sum(accepted) / len(accepted) if mode != "target" else None))
    base = next(tps for label, tps, _ in rows if label == "autojudge target")
    lines = [
        f"{datetime.now(timezone.utc):%Y-%m-%d} · {platform.machine()} {torch.get_num_threads()} threads · "
        f"device {engine.target.device} · dtype {engine.target.model.lm_head.weight.dtype} · "
        f"target {engine.target.name} · draft {engine.draft.name if engine.draft else '-'} · "
        f"{len(prompts)} GSM8K test prompts × {max_new_tokens} tokens",
        "",
        "| decoder | tokens/s | × our target mode | accepted draft tokens/cycle |",
        "|---|---:|---:|---:|",
    ]
    for label, tps, acc in rows:
        lines.append(f"| {label} | {tps:.2f} | {tps / base:.2f} | {'-' if acc is None else f'{acc:.2f}'} |")
    return "\n".join(lines)


@click.command()
@engine_options
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--window", default=DEFAULT_WINDOW, show_default=True, type=int)
@click.option("--prompts", default=3, show_default=True, type=int, help="How many GSM8K test prompts.")
@click.option("--hf/--no-hf", default=True, show_default=True, help="Also time transformers' generate.")
def bench(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs, max_new_tokens, window, prompts, hf):
    """Tokens/s of target-only and speculative decoding (and transformers' generate) in one process."""
    if prompts < 1:
        raise AutojudgeError(f"--prompts must be at least 1, got {prompts}")
    engine = engine_from_options(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs)
    click.echo(run_generation_bench(engine, max_new_tokens=max_new_tokens, window=window, n_prompts=prompts,
                                    with_transformers=hf))
