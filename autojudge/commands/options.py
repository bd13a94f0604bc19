"""Click options shared by every command that builds an engine."""

from __future__ import annotations

import functools
import os

import click

from autojudge.engine.request import DEFAULT_PROTECT_ENDS
from autojudge.errors import AutojudgeError


def engine_options(fn):
    @click.option("--target", default="default", show_default=True,
                  help="Target model: 'default', a checkpoint directory, a local hub id or a .gguf file.")
    @click.option("--draft", default="default", show_default=True,
                  help="Draft model (same forms as --target); 'none' for target-only use.")
    @click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto (bf16 on GPU and on a CPU with AMX or AVX512_BF16, else fp32), fp32, bf16, fp16.")
    @click.option("--max-seq-len", default=4096, show_default=True, type=int, help="KV cache size in tokens.")
    @click.option("--kernels", type=click.Choice(["auto", "triton", "eager"]), default="auto", show_default=True,
                  help="Verify step: fused Triton kernel or eager torch reference.")
    @click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                  help="Replay the draft and verify forwards as CUDA graphs [default: on with --device cuda].")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def protect_ends_option(fn):
    """For the commands that decode in lossy modes."""
    return click.option(
        "--protect-ends/--no-protect-ends", default=DEFAULT_PROTECT_ENDS, show_default=True,
        help="Lossy modes never overrule the target where it ends the answer (end of sequence) or its code block "
             "(a ``` token); off, the judge or top-k rule alone decides, as in the AutoJudge paper.")(fn)


def engine_from_options(target, draft, device, dtype, max_seq_len, kernels, cuda_graphs=None,
                        protect_ends=DEFAULT_PROTECT_ENDS):
    from autojudge.engine.engine import Engine

    # Library log noise would bury the one-line errors and the streamed text.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return Engine.from_pretrained(
        target=target, draft=None if draft in (None, "none") else draft, device=device,
        dtype=dtype, max_seq_len=max_seq_len, kernels=kernels, cuda_graphs=cuda_graphs, protect_ends=protect_ends,
    )


def problem_range_options(fn):
    """--offset/--limit: which problems of a dataset a command takes (mining and eval share the numbering, so
    `eval --offset N` holds out what `mine --limit N` labelled)."""
    @click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Skip the first N problems (e.g. those already mined into another file, or those a judge "
                       "was mined on).")
    @click.option("--limit", type=int, default=None, help="Only the first N problems (after --offset).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def problem_range(problems: list, offset: int, limit: int | None, dataset: str) -> list:
    if limit is not None and limit < 1:
        raise AutojudgeError(f"--limit must be at least 1, got {limit}")
    if offset >= len(problems):
        raise AutojudgeError(f"--offset {offset} skips all {len(problems)} problems of {dataset}; lower it")
    return problems[offset:][:limit]
