"""`autojudge annotate`: Judge Decoding annotations from GSM8K reference solutions (no model needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.command()
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="GSM8K split whose reference solutions are annotated.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems.")
@click.option("--altered", type=click.IntRange(min=0), default=1, show_default=True,
              help="Copies per problem with one computed number altered (besides the correct one).")
@click.option("--seed", default=0, show_default=True, help="Which digits are altered, and how.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Annotations JSONL for `autojudge train --annotations`.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def annotate(split, limit, altered, seed, out, force):
    """Write Judge Decoding annotations: correct GSM8K solutions and copies with a first error marked."""
    from autojudge.errors import AutojudgeError
    from autojudge.tasks.annotations import CONSTRUCTION, build_annotations
    from autojudge.tasks.datasets import load_dataset

    if out.exists() and not force:
        raise AutojudgeError(f"{out} exists; pass --force to replace it or choose another --out")
    problems = load_dataset("gsm8k", split)[:limit]
    header = {"kind": "header", "source": f"gsm8k/{split}", "problems": len(problems), "altered": altered,
              "seed": seed, "construction": CONSTRUCTION}
    rows = list(build_annotations(problems, altered=altered, seed=seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: an interrupted run leaves no half file for `train` to read.
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", encoding="utf-8") as f:
        for row in [header, *rows]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    errors = sum(row["first_error"] is not None for row in rows)
    click.echo(f"wrote {out}: {len(rows)} responses from {len(problems)} problems, {errors} with a first error")
