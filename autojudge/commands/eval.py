"""`autojudge eval`: accuracy and speed of each decoding mode (and judge threshold) on a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from autojudge.commands.options import (
    engine_from_options,
    engine_options,
    problem_range,
    problem_range_options,
    protect_ends_option,
)
from autojudge.engine.request import DEFAULT_TOPK, DEFAULT_TOPK_ALPHA, DEFAULT_WINDOW, LOSSY_MODES, SCHEDULES


def rows_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


@click.command("eval")
@click.option("--dataset", default="gsm8k", show_default=True, help="gsm8k, humaneval or a PATH.jsonl (GSM8K rows).")
@click.option("--split", default="test", show_default=True)
@problem_range_options
@click.option("--modes", default=None,
              help="Comma-separated: target, speculative, autojudge, judge, topk "
                   "[default: target,speculative, plus autojudge with --judge].")
@click.option("--thresholds", multiple=True,
              help="Comma-separated judge thresholds in (0, 1] for modes autojudge/judge, or MODE=... for one of "
                   "them (repeat the option for both) [default: each judge's stored recall-based thresholds].")
@click.option("--topk", default=DEFAULT_TOPK, show_default=True, type=click.IntRange(min=1),
              help="Mode topk: a mismatching draft token is kept when among the target's top K ...")
@click.option("--alphas", default=None,
              help="... with probability >= ALPHA x the top token's: comma-separated, one run each "
                   f"[default: {DEFAULT_TOPK_ALPHA}].")
@click.option("--judge", "judge_path", default=None,
              help="Judge file for modes autojudge/judge: PATH, 'default' (the shipped one for the dataset's "
                   "domain), 'default-math' or 'default-code'.")
@protect_ends_option
@click.option("--window", default=DEFAULT_WINDOW, show_default=True, type=int, help="Draft tokens per cycle.")
@click.option("--max-new-tokens", default=512, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Report (JSON).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw accuracy against accepted tokens per cycle and tokens/s (PNG).")
@click.option("--resume", is_flag=True, help="Keep the rows already in OUT.partial.jsonl and do only the rest.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Problems decoded together (continuous batching); the report adds batch tokens/s.")
@click.option("--single-stream", default=8, show_default=True, type=click.IntRange(min=0),
              help="With --batch-size > 1: the first N problems of each mode are decoded alone, for the "
                   "single-stream tokens/s a user waits on.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cycles", show_default=True,
              help="With --batch-size > 1: 'tokenwise' takes the greedy speculative modes' cycle decisions one token "
                   "at a time: the same rows for about half the arithmetic; their batch tokens/s is then the "
                   "schedule's, so the report leaves it out (single-stream tokens/s is still measured).")
@engine_options
def eval_cmd(dataset, split, offset, limit, modes, thresholds, topk, alphas, judge_path, protect_ends, window,
             max_new_tokens, out, plot, resume, batch_size, single_stream, schedule, **engine_kw):
    """Evaluate decoding modes on a dataset; rows go to OUT.partial.jsonl as they finish, the report to OUT."""
    from autojudge.errors import AutojudgeError
    from autojudge.eval import runner
    from autojudge.eval.report import build_report, markdown_table, plot_pareto, write_report
    from autojudge.tasks.datasets import load_dataset

    mode_list = runner.parse_modes(modes or ("target,speculative,autojudge" if judge_path else "target,speculative"))
    taus = runner.parse_mode_thresholds(thresholds)
    alpha_list = runner.parse_thresholds(alphas, "--alphas")
    runner.validate(mode_list, taus, judge_path is not None, window, max_new_tokens, alpha_list)
    if schedule != "cycles" and batch_size == 1:
        raise AutojudgeError(f"--schedule {schedule} applies to batched decoding; add --batch-size N (N > 1)")
    problems = problem_range(load_dataset(dataset, split), offset, limit, dataset)
    if mode_list == ["target"]:
        engine_kw["draft"] = None
    config = {"dataset": dataset, "split": split, "offset": offset, "limit": limit, "n_problems": len(problems), "modes": mode_list,
              "thresholds": {mode or "every judge mode": values for mode, values in taus.items()} or None,
              "judge": judge_path, "window": window, "max_new_tokens": max_new_tokens,
              "batch_size": batch_size, "single_stream": single_stream if batch_size > 1 else 0,
              "schedule": schedule, "topk": topk if "topk" in mode_list else None, "alphas": alpha_list,
              "protect_ends": protect_ends if set(mode_list) & set(LOSSY_MODES) else None,
              **engine_kw, "rows": str(rows_path(out))}

    engine = engine_from_options(**engine_kw, protect_ends=protect_ends)
    judges = runner.load_eval_judges(judge_path, engine, mode_list, problems[0].task) if judge_path else {}
    config.update(runner.head_settings(judges))
    runs = runner.plan_runs(mode_list, taus, judges, alpha_list)
    log = runner.RowLog(rows_path(out), config, resume)
    rows = runner.evaluate(engine, problems, runs, log, window=window, max_new_tokens=max_new_tokens,
                           judges=runner.judges_by_mode(judges, topk), batch_size=batch_size,
                           single_stream=config["single_stream"], schedule=schedule)

    report = build_report(rows, config)
    write_report(report, out)
    click.echo(markdown_table(report["results"]))
    click.echo(f"wrote {out}", err=True)
    if plot:
        plot_pareto(report["results"], plot)
        click.echo(f"wrote {plot}", err=True)
