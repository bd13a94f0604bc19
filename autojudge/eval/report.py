"""Eval rows -> per-(mode, threshold) results, a Markdown table and an accuracy/speed Pareto plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from autojudge.errors import AutojudgeError


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


# The lossless references a lossy mode's accuracy is paired against: target-only decoding, and speculative
# decoding, which in bf16 drifts from it by rounding.
REFERENCE_MODES = ("target", "speculative")
_Z95 = 1.959963984540054


def paired_difference(correct: dict[str, bool], reference: dict[str, bool]) -> dict | None:
    """Accuracy of `correct` minus that of `reference` on the problems both decoded, with a 95% interval.

    Per problem the difference is +1 (won: only `correct` solved it), -1 (lost) or 0; the interval is the normal
    one on their mean with the sample variance. Pairing removes the spread of problem difficulty, which both
    runs share: what is left is how often the two disagree, so the interval is much narrower than one per run.
    """
    common = [pid for pid in correct if pid in reference]
    n = len(common)
    if not n:
        return None
    won = sum(correct[pid] and not reference[pid] for pid in common)
    lost = sum(reference[pid] and not correct[pid] for pid in common)
    diff = (won - lost) / n
    half = None
    if n > 1:
        variance = max((won + lost - n * diff * diff) / (n - 1), 0.0)
        half = _Z95 * math.sqrt(variance / n)
    return {"n": n, "won": won, "lost": lost, "difference": diff,
            "ci95": None if half is None else [diff - half, diff + half]}


def aggregate(rows: list[dict]) -> list[dict]:
    """One result per (mode, threshold), in order of first appearance.

    Rates are ratios of sums over the rows (accepted / cycles, tokens / seconds), so long answers weigh more.
    A lossy mode can write longer answers (on code the draft adds test code the target would not), so tokens/s
    and accepted/cycle alone can flatter it: `seconds_per_answer` (single-stream, the rows decoded alone) and
    `cycles_per_answer` (every row) say how long a user waits for a whole answer.
    `tokens_per_second` is single-stream speed, from the rows decoded alone; `batch_tokens_per_second` is what a
    batched run served, its rows' tokens over their summed wall time (each row holds the time since the previous
    one finished). Every other result is paired against each reference mode that ran (`vs_target`,
    `vs_speculative`: `paired_difference`).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["threshold"]), []).append(row)
    results = []
    for (mode, threshold), group in groups.items():
        n = len(group)
        correct = sum(bool(r["correct"]) for r in group)
        cycles = sum(r["cycles"] for r in group)
        accepted = sum(r["accepted"] for r in group)
        rescues = sum(r["judge_rescues"] for r in group)
        new_tokens = sum(r["new_tokens"] for r in group)
        alone = [r for r in group if r.get("batch_size", 1) == 1]
        # Tokenwise rows give the same tokens as cycles, not their speed.
        batched = [r for r in group if r.get("batch_size", 1) > 1 and r.get("schedule", "cycles") == "cycles"]
        results.append({
            "mode": mode, "threshold": threshold, "recall": group[0].get("recall"), "n": n,
            "correct": correct, "accuracy": correct / n,
            "cycles": cycles, "accepted": accepted, "accepted_per_cycle": _ratio(accepted, cycles),
            "cycles_per_answer": _ratio(cycles, n) if cycles else None,  # target-only decoding has no cycles
            "tokens_per_second": _ratio(sum(r["new_tokens"] for r in alone), sum(r["decode_s"] for r in alone)),
            "seconds_per_answer": _ratio(sum(r["decode_s"] for r in alone), len(alone)),
            "batch_tokens_per_second": _ratio(sum(r["new_tokens"] for r in batched), sum(r["wall_s"] for r in batched)),
            "batch_size": max((r["batch_size"] for r in batched), default=1),
            "judge_rescues": rescues, "judge_rescues_per_cycle": _ratio(rescues, cycles),
            "new_tokens": new_tokens, "mean_new_tokens": new_tokens / n,
            "decode_s": sum(r["decode_s"] for r in group), "wall_s": sum(r["wall_s"] for r in group),
        })
    by_problem = {key: {r["problem_id"]: bool(r["correct"]) for r in group} for key, group in groups.items()}
    for result in results:
        key = (result["mode"], result["threshold"])
        for ref in REFERENCE_MODES:
            if (ref, None) in by_problem and key != (ref, None):
                result[f"vs_{ref}"] = paired_difference(by_problem[key], by_problem[ref, None])
    return results


def build_report(rows: list[dict], config: dict) -> dict:
    return {"results": aggregate(rows), "config": config}


def write_report(report: dict, path: Path) -> None:
    # Written whole then renamed: a reader never sees half a report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _label(result: dict) -> str:
    if result["threshold"] is None:
        return result["mode"]
    return f"{result['mode']} {result['threshold']:.3g}"


def _paired(comparison: dict | None) -> str:
    if comparison is None:
        return "-"
    interval = "" if comparison["ci95"] is None else " [{:+.3f}, {:+.3f}]".format(*comparison["ci95"])
    return f"{comparison['lost']}/{comparison['won']} {comparison['difference']:+.3f}{interval}"


def markdown_table(results: list[dict]) -> str:
    header = ("| mode | threshold | recall | n | accuracy | lost/won, Δ vs target (95%) | lost/won, Δ vs speculative "
              "(95%) | accepted/cycle | cycles/answer | tokens/s | s/answer | batch tokens/s | rescues/cycle "
              "| mean new tokens | wall s |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        lines.append(
            f"| {r['mode']} | {_fmt(r['threshold'], '.4g')} | {_fmt(r['recall'], 'g')} | {r['n']} "
            f"| {r['accuracy']:.3f} | {_paired(r.get('vs_target'))} | {_paired(r.get('vs_speculative'))} "
            f"| {_fmt(r['accepted_per_cycle'], '.2f')} | {_fmt(r['cycles_per_answer'], '.1f')} "
            f"| {_fmt(r['tokens_per_second'], '.1f')} | {_fmt(r['seconds_per_answer'], '.1f')} "
            f"| {_fmt(r.get('batch_tokens_per_second'), '.1f')} | {_fmt(r['judge_rescues_per_cycle'], '.3f')} "
            f"| {r['mean_new_tokens']:.1f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_pareto(results: list[dict], path: Path) -> None:
    """Accuracy against accepted tokens per cycle (left) and single-stream seconds per answer (right: what a user
    waits, which tokens/s misstates when a mode changes the answers' length); one line per mode."""
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone
    except ImportError as err:
        raise AutojudgeError("--plot needs matplotlib; pip install matplotlib (or autojudge[plot])") from err
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, xlabel in ((axes[0], "accepted_per_cycle", "accepted draft tokens per cycle"),
                            (axes[1], "seconds_per_answer", "seconds per answer, single stream (lower is faster)")):
        for i, mode in enumerate(dict.fromkeys(r["mode"] for r in results)):
            points = sorted((r[key], r["accuracy"], _label(r)) for r in results
                            if r["mode"] == mode and r[key] is not None)
            if not points:
                # Target-only decoding has no cycles: its accuracy is the lossless reference line.
                ref = next(r for r in results if r["mode"] == mode)
                ax.axhline(ref["accuracy"], linestyle="--", color=f"C{i}", label=f"{mode} (reference)")
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=mode)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
