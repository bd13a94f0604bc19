"""`autojudge features` and `autojudge train`."""

from __future__ import annotations

from pathlib import Path

import click

from autojudge.commands.options import engine_from_options, engine_options
from autojudge.errors import AutojudgeError
from autojudge.judge.features import SETUPS, feature_set, merge_feature_sets

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _feature_sets(eng, labels: tuple[Path, ...], annotations: Path | None, setup: str | None, cache: Path | None,
                  unfinished: bool):
    """(features, cache path, reused) for each source file: one per --labels file, or the --annotations file."""
    if len(labels) > 1 and cache is not None:
        raise AutojudgeError("a feature file holds one source's features: give one --labels file with it, or drop it "
                             "to use each file's own cache")
    sources = [dict(labels=path, annotations=annotations) for path in labels] or [dict(annotations=annotations)]
    return [feature_set(eng, setup=setup, cache=cache, unfinished=unfinished, **source) for source in sources]


def _source_options(fn):
    fn = click.option("--setup", type=click.Choice(SETUPS), default=None,
                      help="Features: DD-DT (draft+target hidden; default for --labels) or DT (target only; "
                           "default and only choice for --annotations).")(fn)
    fn = click.option("--annotations", type=_FILE, default=None,
                      help="Judge Decoding JSONL: {prompt, response, first_error}.")(fn)
    fn = click.option("--unfinished", is_flag=True,
                      help="With --labels: also the labels of problems still in flight (checkpointed in "
                           "LABELS.inflight, each final when written), to train while a long run goes on.")(fn)
    fn = click.option("--labels", type=_FILE, multiple=True,
                      help="Label rows from `autojudge mine` (JSONL); repeat it to train on several files mined "
                           "with the same models.")(fn)
    return fn


@click.command()
@_source_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Feature file (.safetensors); default: next to the input, named by its cache key.")
@engine_options
def features(labels, unfinished, annotations, setup, out, **engine_kw):
    """Compute (or reuse cached) judge features for mined labels or annotated responses."""
    eng = engine_from_options(**engine_kw)
    for fs, path, reused in _feature_sets(eng, labels, annotations, setup, out, unfinished):
        state = "up to date" if reused else "written"
        click.echo(f"{path}: {state} ({fs.features.shape[0]} rows x {fs.features.shape[1]} features, "
                   f"{int(fs.important.sum())} important, setup {fs.meta['setup']})")


@click.command()
@_source_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Judge stem: writes STEM.safetensors and STEM.json.")
@click.option("--features", "features_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Feature cache file to reuse or write (default as in `autojudge features`).")
@click.option("--export", type=click.Choice(["vllm"]), default=None,
              help="Also write STEM.vllm.pkl for the AutoJudge authors' vLLM integration (needs --setup DT).")
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of problems held out to pick C.")
@click.option("--seed", default=0, show_default=True, help="Seed of the problem-grouped validation split.")
@click.option("--learning-curve", "curve", default=None,
              help="Comma-separated shares of the training problems, e.g. 0.25,0.5,1: validation ROC-AUC of a "
                   "head trained on each (same validation problems), in the output and the judge's report.")
@engine_options
def train(labels, unfinished, annotations, setup, out, features_path, export, val_fraction, seed, curve, **engine_kw):
    """Train a logistic-regression judge head and write the judge file."""
    from autojudge.eval.runner import parse_thresholds
    from autojudge.judge.judge_file import export_vllm, save_judge
    from autojudge.judge.train import check_fractions, train_judge

    if export == "vllm" and (setup or ("DD-DT" if labels else "DT")) != "DT":
        raise AutojudgeError("--export vllm needs target-only features; add --setup DT")
    fractions = parse_thresholds(curve, "--learning-curve")
    if fractions is not None:
        check_fractions(fractions)
    eng = engine_from_options(**engine_kw)
    sets = _feature_sets(eng, labels, annotations, setup, features_path, unfinished)
    for one, path, reused in sets:
        click.echo(f"features: {path} ({'reused' if reused else 'computed'}, {one.features.shape[0]} rows)", err=True)
    fs = merge_feature_sets([one for one, _, _ in sets])
    result = train_judge(fs.features, fs.important, fs.groups, val_fraction=val_fraction, seed=seed,
                         curve_fractions=fractions)
    written = list(save_judge(out, result, fs.meta))
    if export == "vllm":
        written.append(export_vllm(out.with_name(out.name + ".vllm.pkl"), result, fs.meta["setup"]))
    _print_report(result)
    for p in written:
        click.echo(f"wrote {p}")


def _print_report(result) -> None:
    r = result.report
    click.echo(
        f"rows {r['rows']} ({r['important']} important, rate {r['positive_rate']:.3f}) from {r['groups']} problems; "
        f"validation {r['val_rows']} rows / {r['val_groups']} problems"
    )
    click.echo(f"best C {result.best_c:.3g}: validation ROC-AUC {r['val_auc']:.4f}")
    click.echo(f"{'threshold':>22} {'tau':>8} {'precision':>9} {'recall':>7} {'accept':>7}")
    for kind, table in r["val_at_thresholds"].items():
        for level, s in table.items():
            click.echo(f"{kind + ' ' + level:>22} {s['threshold']:8.4f} {s['precision']:9.3f} "
                       f"{s['recall']:7.3f} {s['accept_rate']:7.3f}")
    for point in r.get("learning_curve", ()):
        click.echo(f"learning curve: {point['fraction']:g} of the training problems ({point['problems']}, "
                   f"{point['rows']} rows): validation ROC-AUC {point['val_auc']:.4f} at C {point['best_c']:.3g}")
    d = result.default_threshold
    click.echo(f"default threshold {d['value']:.4f} (recall {d['recall']} of important tokens on validation); "
               "the decoder accepts a mismatch when p_important < threshold")
