"""`autojudge mine`: label draft/target mismatches as important or not, without humans."""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from pathlib import Path

import click

from autojudge.commands.options import (
    engine_from_options,
    engine_options,
    problem_range,
    problem_range_options,
)
from autojudge.engine.request import DEFAULT_WINDOW
from autojudge.errors import AutojudgeError
from autojudge.judge.features import StoredFeatures, model_identity
from autojudge.mining.batched import mine_all
from autojudge.mining.miner import Miner, MiningOptions
from autojudge.mining.snapshots import CacheSnapshots, run_identity
from autojudge.mining.store import RESUME_KEYS, LabelStore
from autojudge.progress import progress
from autojudge.tasks.checkers import Checker, gsm8k_checker, humaneval_checker, load_checker
from autojudge.tasks.datasets import Problem, load_dataset
from autojudge.tasks.prompts import build_messages

_CHECKERS = {"gsm8k": gsm8k_checker, "humaneval": humaneval_checker}


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise AutojudgeError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def select_problems(problems: list[Problem], shard: tuple[int, int]) -> list[Problem]:
    """Every n-th problem from i: shards of one --offset/--limit range cover it exactly."""
    i, n = shard
    return [p for index, p in enumerate(problems) if index % n == i]


def _check_fits(problems: list[Problem], prompts: list[list[int]], max_new_tokens: int, max_seq_len: int):
    """Fail before hours of mining rather than at the first long problem."""
    if not prompts:
        return
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    need = len(prompts[longest]) + max_new_tokens
    if need > max_seq_len:
        raise AutojudgeError(
            f"{problems[longest].problem_id}: a prompt of {len(prompts[longest])} tokens plus --max-new-tokens "
            f"{max_new_tokens} needs {need} cache slots; raise --max-seq-len to at least {need}"
        )


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (a session's end, `kill`) interrupts like Ctrl-C, so the run saves what it can before it exits."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_mining(engine, problems: list[Problem], prompts: list[list[int]], checker: Checker, store: LabelStore,
               options: MiningOptions, batch_size: int = 1, snapshots: CacheSnapshots | None = None,
               stored: StoredFeatures | None = None) -> dict:
    todo = [(p, ids) for p, ids in zip(problems, prompts) if p.problem_id not in store.done]
    # Interrupted problems first: their searches are the furthest along.
    todo.sort(key=lambda item: item[0].problem_id not in store.resumed)
    totals = {"problems": 0, "labels": 0, "important": 0, "correct": 0, "truncated": 0, "target_forwards": 0}
    labelled_before = sum(row["kind"] == "step" for rows in store.resumed.values() for row in rows)
    # A problem takes minutes: the second bar counts mismatches labelled, in problems still in flight too.
    with progress(total=len(problems), initial=len(problems) - len(todo), desc="mining", unit="problem") as bar, \
            progress(desc="mismatches", unit="label", position=1, initial=labelled_before) as label_bar:

        def checkpoint(row: dict) -> None:
            store.checkpoint(row)
            label_bar.update(row["kind"] == "step")

        miner = Miner(engine, checker, options, on_checkpoint=checkpoint,
                      on_features=None if stored is None else stored.save)

        def keep(problem: Problem, result) -> None:
            store.add_problem(result.labels, {**result.record, "batch_size": batch_size})
            totals["problems"] += 1
            totals["labels"] += len(result.labels)
            totals["important"] += result.record["n_important"]
            totals["correct"] += result.record["correct"]
            totals["truncated"] += result.record["truncated"]
            totals["target_forwards"] += result.cost.target_forwards
            bar.set_postfix(labels=totals["labels"], truncated=totals["truncated"], refresh=False,
                            important=f"{totals['important'] / max(totals['labels'], 1):.2f}")
            bar.update(1)

        mine_all(miner, todo, batch_size, keep, store.resumed, snapshots)
    return totals


@click.command("mine")
@engine_options
@click.option("--dataset", default="gsm8k", show_default=True,
              help="gsm8k, humaneval, or a PATH.jsonl with 'question' and 'answer' ('... #### N') per line.")
@click.option("--split", type=click.Choice(["train", "test"]), default=None,
              help="Dataset split [default: train for gsm8k, test for humaneval].")
@problem_range_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL file.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --out file, skipping finished problems.")
@click.option("--shard", default="0/1", show_default=True, help="I/N: mine problems whose index % N == I.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Token budget of every answer, continuations included.")
@click.option("--window", default=DEFAULT_WINDOW, show_default=True, type=int, help="Draft tokens per speculative cycle.")
@click.option("--prompt-template", default=None,
              help="Chat prompt with '{question}' where the problem goes [default: per task].")
@click.option("--speculative/--no-speculative", default=True, show_default=True,
              help="Generate continuations by lossless speculative decoding (batch size 1).")
@click.option("--reuse-continuation/--no-reuse-continuation", default=True, show_default=True,
              help="Try the previous continuation as a free draft after each swap (exact; each check runs "
                   "only the new tokens past the cached prefix).")
@click.option("--skip-truncated/--label-truncated", default=True, show_default=True,
              help="Leave unlabelled a problem whose answer hits --max-new-tokens before it ends: it has no "
                   "final answer for swaps to keep or change.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Problems mined at once, their model calls sharing forward passes (same labels as 1).")
@click.option("--snapshot-dir", type=click.Path(file_okay=False), default=None,
              help="With --batch-size > 1: on Ctrl-C or SIGTERM save the KV cache rows of the problems in flight "
                   "here (~80 KB a token for the default pair), and start resumed problems from them: --resume "
                   "then skips their prefill.")
@click.option("--save-features/--no-save-features", default=True, show_default=True,
              help="Keep each label's judge features (both models' hidden states at the draft token, fp16, "
                   "~5 KB a label for the default pair) in OUT.features/, so `autojudge train` reads them "
                   "instead of running the models over every label again.")
@click.option("--checker", "checker_spec", default=None, hidden=True,
              help="MODULE:FUNCTION(problem, text) -> outcome, replacing the task's checker.")
def mine(dataset, split, offset, limit, out, resume, shard, max_new_tokens, window, prompt_template,
         speculative, reuse_continuation, skip_truncated, batch_size, snapshot_dir, save_features, checker_spec,
         **engine_kwargs):
    """Mine important/unimportant labels for draft/target mismatches (AutoJudge)."""
    shard = parse_shard(shard)
    if snapshot_dir is not None and batch_size == 1:
        raise AutojudgeError("--snapshot-dir saves the cache rows of batched mining; add --batch-size 2 or more")
    split = split or ("test" if dataset == "humaneval" else "train")
    problems = select_problems(problem_range(load_dataset(dataset, split), offset, limit, dataset), shard)
    if engine_kwargs.get("draft") in (None, "none"):
        raise AutojudgeError("mining compares a draft with the target; pass --draft")
    task = "humaneval" if dataset == "humaneval" else "gsm8k"
    checker = load_checker(checker_spec) if checker_spec else _CHECKERS[task]
    engine = engine_from_options(**engine_kwargs)
    meta = {
        "target": engine.target.name, "target_fingerprint": engine.target.fingerprint,
        "target_weights": engine.target.weights_fingerprint,
        "draft": engine.draft.name, "draft_fingerprint": engine.draft.fingerprint,
        "draft_weights": engine.draft.weights_fingerprint,
        # Greedy answers (so labels) shift with precision: fp32 and bf16 rows must not share a file.
        "dtype": engine.target.precision,
        "dataset": dataset, "split": split, "max_new_tokens": max_new_tokens,
        "prompt_template": prompt_template, "checker": checker_spec or task, "skip_truncated": skip_truncated,
    }
    options = MiningOptions(max_new_tokens=max_new_tokens, window=window, speculative=speculative,
                            reuse_continuation=reuse_continuation, skip_truncated=skip_truncated,
                            save_features=save_features)
    prompts = [engine.encode_prompt(build_messages(p, prompt_template)) for p in problems]
    _check_fits(problems, prompts, max_new_tokens, engine.target.max_seq_len)
    snapshots = CacheSnapshots(snapshot_dir, run_identity(meta, RESUME_KEYS)) if snapshot_dir else None
    stored = StoredFeatures(StoredFeatures.for_labels(Path(out)), model_identity(engine)) if save_features else None
    with LabelStore(out, meta, resume) as store, _sigterm_interrupts():
        try:
            totals = run_mining(engine, problems, prompts, checker, store, options, batch_size, snapshots, stored)
        except KeyboardInterrupt:
            saved = f"; cache rows of the problems in flight saved in {snapshot_dir}" if snapshots else ""
            click.echo(f"finished problems and labels so far are in {out} (--resume goes on){saved}", err=True)
            raise
    ratio = totals["important"] / max(totals["labels"], 1)
    click.echo(f"mined {totals['problems']} problems: {totals['labels']} labels, {ratio:.1%} important, "
               f"target correct on {totals['correct']}, {totals['truncated']} answers cut by the budget, "
               f"{totals['target_forwards']} target forwards -> {out}")
