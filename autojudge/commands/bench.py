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


def _transformers_model(engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.target.checkpoint.directory,
                                                 dtype=engine.target.model.lm_head.weight.dtype)
    return model.to(engine.target.device).eval()


def _transformers_tps(model, engine, batches: list[list[list[int]]], max_new_tokens: int) -> float:
    """Tokens/s of transformers' greedy generate, each batch left-padded to its longest prompt."""
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    tokens, seconds = 0, 0.0
    for batch in batches:
        width = max(len(ids) for ids in batch)
        inputs = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=engine.target.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=inputs.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, pad_token_id=pad)
        seconds += time.perf_counter() - start
        tokens += (out.shape[1] - width) * len(batch)
    return tokens / seconds


def _header(engine, what: str) -> list[str]:
    return [
        f"{datetime.now(timezone.utc):%Y-%m-%d} · {platform.machine()} {torch.get_num_threads()} threads · "
        f"device {engine.target.device} · dtype {engine.target.model.lm_head.weight.dtype} · "
        f"target {engine.target.name} · draft {engine.draft.name if engine.draft else '-'} · {what}",
        "",
    ]


def _decode_tps(outputs) -> float:
    """Tokens/s of a batched run without its prefills, which run one prompt at a time before decoding joins them."""
    decode_s = outputs.stats.total_s - sum(o.stats.prefill_s for o in outputs)
    return outputs.stats.new_tokens / decode_s


def run_batch_bench(engine, batch_sizes: list[int], max_new_tokens: int, window: int,
                    with_transformers: bool) -> str:
    """Tokens/s of one batch of B GSM8K test prompts per batch size, ours (with and without the prefills) and
    transformers' (with)."""
    questions = [engine.encode_prompt(q) for q in gsm8k_test_questions(max(batch_sizes))]
    engine.generate(questions[0], max_new_tokens=4, mode="target")  # warm-up: first-call allocations
    model = _transformers_model(engine) if with_transformers else None
    lines = _header(engine, f"one batch of B GSM8K test prompts × {max_new_tokens} tokens; tok/s with the prefills, "
                            "decode tok/s without them")
    lines += ["| batch | transformers generate tok/s | target tok/s | target decode tok/s | × batch-1 decode | "
              f"speculative tok/s (window {window}) | speculative decode tok/s | accepted/cycle | slot occupancy |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = None
    for size in batch_sizes:
        prompts = questions[:size]
        kw = dict(max_batch=size, max_new_tokens=max_new_tokens, window=window, ignore_eos=True)
        target = engine.generate_batch(prompts, mode="target", **kw)
        decode = _decode_tps(target)
        base = base or decode
        spec, spec_decode, accepted, occupancy = "-", "-", "-", "-"
        if engine.draft is not None:
            out = engine.generate_batch(prompts, mode="speculative", **kw)
            spec, spec_decode = f"{out.stats.tokens_per_second:.2f}", f"{_decode_tps(out):.2f}"
            accepted = f"{sum(o.stats.accepted_per_cycle for o in out) / len(out):.2f}"
            occupancy = f"{out.stats.occupancy:.2f}"
        hf = f"{_transformers_tps(model, engine, [prompts], max_new_tokens):.2f}" if model is not None else "-"
        lines.append(f"| {size} | {hf} | {target.stats.tokens_per_second:.2f} | {decode:.2f} | {decode / base:.2f} "
                     f"| {spec} | {spec_decode} | {accepted} | {occupancy} |")
    return "\n".join(lines)


def run_generation_bench(engine, max_new_tokens: int, window: int, n_prompts: int, with_transformers: bool) -> str:
    prompts = [engine.encode_prompt(q) for q in gsm8k_test_questions(n_prompts)]
    engine.generate(prompts[0], max_new_tokens=4, mode="target")  # warm-up: first-call allocations
    rows = []
    if with_transformers:
        tps = _transformers_tps(_transformers_model(engine), engine, [[ids] for ids in prompts], max_new_tokens)
        rows.append(("transformers generate (target)", tps, None))
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
    lines = _header(engine, f"{len(prompts)} GSM8K test prompts × {max_new_tokens} tokens") + [
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
@click.option("--batch-sizes", default=None,
              help="Comma-separated batch sizes (e.g. 1,4,8,16): batched tokens/s instead of single streams.")
def bench(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs, max_new_tokens, window, prompts, hf,
          batch_sizes):
    """Tokens/s of target-only and speculative decoding (and transformers' generate) in one process."""
    if prompts < 1:
        raise AutojudgeError(f"--prompts must be at least 1, got {prompts}")
    sizes = _parse_sizes(batch_sizes) if batch_sizes is not None else None
    engine = engine_from_options(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs)
    if sizes is not None:
        click.echo(run_batch_bench(engine, sizes, max_new_tokens=max_new_tokens, window=window, with_transformers=hf))
        return
    click.echo(run_generation_bench(engine, max_new_tokens=max_new_tokens, window=window, n_prompts=prompts,
                                    with_transformers=hf))


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise AutojudgeError(f"--batch-sizes {text!r}: expected comma-separated sizes >= 1, such as 1,4,8,16")
    return sizes
