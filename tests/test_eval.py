"""`autojudge eval`: aggregation numbers, the resumable rows file, the CLI end to end, bad input."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from autojudge import Engine
from autojudge.commands import main
from autojudge.engine.decoder import Decoder
from autojudge.engine.engine import GenerationStats
from autojudge.errors import AutojudgeError
from autojudge.eval import runner
from autojudge.eval.report import aggregate, markdown_table, paired_difference, plot_pareto
from autojudge.eval.runner import (
    Run,
    parse_mode_thresholds,
    parse_modes,
    parse_thresholds,
    plan_runs,
    validate,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(mode, threshold, pid, correct, new_tokens, cycles, accepted, rescues, decode_s, wall_s):
    return {"mode": mode, "threshold": threshold, "recall": None, "problem_id": pid, "correct": correct,
            "new_tokens": new_tokens, "cycles": cycles, "accepted": accepted, "judge_rescues": rescues,
            "decode_s": decode_s, "wall_s": wall_s}


ROWS = [
    _row("target", None, "p1", True, 10, 0, 0, 0, 1.0, 1.5),
    _row("target", None, "p2", False, 30, 0, 0, 0, 2.0, 2.5),
    _row("autojudge", 0.2, "p1", True, 12, 3, 9, 2, 0.5, 0.75),
    _row("autojudge", 0.2, "p2", True, 20, 5, 11, 1, 1.5, 1.75),
    _row("autojudge", 0.5, "p1", False, 8, 1, 7, 4, 0.25, 0.5),
]


def test_aggregate_every_number():
    target, aj2, aj5 = aggregate(ROWS)
    assert (target["mode"], target["threshold"], aj2["threshold"], aj5["threshold"]) == ("target", None, 0.2, 0.5)
    assert target["n"] == 2 and target["correct"] == 1 and target["accuracy"] == 0.5
    assert target["accepted_per_cycle"] is None and target["judge_rescues_per_cycle"] is None
    assert target["tokens_per_second"] == pytest.approx(40 / 3.0)
    assert target["mean_new_tokens"] == 20 and target["wall_s"] == 4.0 and target["decode_s"] == 3.0
    assert aj2["n"] == 2 and aj2["accuracy"] == 1.0
    # Weighted by cycles: 20 accepted / 8 cycles, not the mean of 3.0 and 2.2 per problem.
    assert aj2["accepted_per_cycle"] == 2.5 and aj2["cycles"] == 8 and aj2["accepted"] == 20
    assert aj2["tokens_per_second"] == 16.0 and aj2["judge_rescues"] == 3 and aj2["judge_rescues_per_cycle"] == 3 / 8
    assert aj2["mean_new_tokens"] == 16 and aj2["wall_s"] == 2.5
    assert aj5["n"] == 1 and aj5["accuracy"] == 0.0 and aj5["accepted_per_cycle"] == 7.0
    assert aj5["tokens_per_second"] == 32.0 and aj5["judge_rescues_per_cycle"] == 4.0 and aj5["mean_new_tokens"] == 8
    # What a user waits for a whole answer: single-stream seconds, and cycles (none without a draft).
    assert target["seconds_per_answer"] == 1.5 and target["cycles_per_answer"] is None
    assert aj2["seconds_per_answer"] == 1.0 and aj2["cycles_per_answer"] == 4.0
    assert aj5["seconds_per_answer"] == 0.25 and aj5["cycles_per_answer"] == 1.0


def test_markdown_and_plot(tmp_path):
    results = aggregate(ROWS)
    lines = markdown_table(results).splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| mode | threshold |")
    assert lines[2] == "| target | - | - | 2 | 0.500 | - | - | - | - | 13.3 | 1.5 | - | - | 20.0 | 4.0 |"
    assert lines[3] == ("| autojudge | 0.2 | - | 2 | 1.000 | 0/1 +0.500 [-0.480, +1.480] | - | 2.50 | 4.0 | 16.0 | 1.0 "
                        "| - | 0.375 | 16.0 | 2.5 |")
    assert lines[4].startswith("| autojudge | 0.5 | - | 1 | 0.000 | 1/0 -1.000 | - | 7.00 | 1.0 | 32.0 | 0.2 |")
    plot_pareto(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_paired_difference_counts_discordant_problems_and_its_interval():
    reference = {f"p{i}": i < 5 for i in range(16)}  # solves p0-p4
    # Loses p0, wins p5-p7: +2/16, sample variance (4 - 16 * 0.125**2) / 15 of the per-problem differences.
    mode = {**reference, "p0": False, "p5": True, "p6": True, "p7": True}
    result = paired_difference(mode, reference)
    half = 1.959963984540054 * math.sqrt((4 - 16 * 0.125**2) / 15 / 16)
    assert (result["n"], result["lost"], result["won"], result["difference"]) == (16, 1, 3, 0.125)
    assert result["ci95"] == pytest.approx([0.125 - half, 0.125 + half])
    assert [round(x, 2) for x in result["ci95"]] == [-0.12, 0.37]  # bench/RESULTS.md, judge mode at n = 16
    # Only problems both runs decoded are paired; agreeing everywhere is a zero-width interval.
    assert paired_difference({"p0": True, "x": False}, reference) == {
        "n": 1, "won": 0, "lost": 0, "difference": 0.0, "ci95": None}
    assert paired_difference(reference, reference)["ci95"] == [0.0, 0.0]
    assert paired_difference({"x": True}, reference) is None


def test_aggregate_pairs_every_mode_against_target_and_speculative():
    rows = [_row(mode, tau, pid, ok, 10, 2, 4, 0, 1.0, 1.0)
            for mode, tau, answers in (("target", None, (True, False, True)), ("speculative", None, (True, True, True)),
                                       ("topk", 0.3, (False, True, True)))
            for pid, ok in zip(("a", "b", "c"), answers)]
    target, spec, topk = aggregate(rows)
    assert "vs_target" not in target and "vs_speculative" not in spec
    assert target["vs_speculative"]["difference"] == pytest.approx(-1 / 3)
    assert (spec["vs_target"]["won"], spec["vs_target"]["lost"]) == (1, 0)
    assert (topk["vs_target"]["won"], topk["vs_target"]["lost"], topk["vs_target"]["difference"]) == (1, 1, 0.0)
    assert (topk["vs_speculative"]["won"], topk["vs_speculative"]["lost"]) == (0, 1)


def test_plan_sweeps_stored_recall_thresholds_sorted():
    # Recall 0.95 and 0.99 share a threshold: one run, labelled with the higher recall.
    judge = SimpleNamespace(thresholds={"recall": {"0.8": 0.4, "0.99": 0.05, "0.9": 0.2, "0.95": 0.05},
                                        "quantile": {"0.5": 0.3}})
    assert plan_runs(["target", "autojudge"], None, {"autojudge": judge}) == [
        Run("target"), Run("autojudge", 0.05, 0.99), Run("autojudge", 0.2, 0.9), Run("autojudge", 0.4, 0.8)]
    assert plan_runs(["speculative", "judge"], {None: [0.1, 0.3]}, {"judge": judge}) == [
        Run("speculative"), Run("judge", 0.1), Run("judge", 0.3)]
    # A mode's own thresholds override the ones for every judge mode, and a mode given none sweeps its head's.
    both = parse_mode_thresholds(["0.1,0.3", "judge=0.14"])
    assert plan_runs(["autojudge", "judge"], both, {"autojudge": judge, "judge": judge}) == [
        Run("autojudge", 0.1), Run("autojudge", 0.3), Run("judge", 0.14)]
    assert plan_runs(["autojudge", "judge"], parse_mode_thresholds(["judge=0.14"]),
                     {"autojudge": judge, "judge": judge})[0] == Run("autojudge", 0.05, 0.99)
    # Each judge mode sweeps the thresholds stored in its own head.
    other = SimpleNamespace(thresholds={"recall": {"0.9": 0.7}})
    assert plan_runs(["autojudge", "judge"], None, {"autojudge": judge, "judge": other})[-2:] == [
        Run("autojudge", 0.4, 0.8), Run("judge", 0.7, 0.9)]


@pytest.mark.parametrize("call, needle", [
    (lambda: parse_modes("target,fast"), "--modes"),
    (lambda: parse_thresholds("0.1,-1"), "[0, 1]"),
    (lambda: parse_thresholds("1.5"), "[0, 1]"),
    (lambda: parse_thresholds("a,b"), "comma-separated"),
    (lambda: validate(["autojudge"], {}, False, 8, 16), "needs a judge"),
    (lambda: validate(["speculative"], {None: [0.1]}, False, 8, 16), "--thresholds apply"),
    (lambda: validate(["autojudge"], {"judge": [0.1]}, True, 8, 16), "add judge to --modes"),
    (lambda: parse_mode_thresholds(["topk=0.1"]), "'topk' is not a judge mode"),
    (lambda: parse_mode_thresholds(["judge=0.1", "judge=0.2"]), "given twice"),
    (lambda: parse_mode_thresholds(["0.1", "0.2"]), "every judge mode given twice"),
    (lambda: parse_mode_thresholds(["judge=2"]), "[0, 1]"),
    (lambda: validate(["speculative"], {}, True, 8, 16), "--judge applies"),
    (lambda: validate(["speculative"], {}, False, 0, 16), "--window"),
])
def test_bad_options(call, needle):
    with pytest.raises(AutojudgeError, match=re.escape(needle)):
        call()


# ---------------------------------------------------------------------------------------------- CLI, fake engine

QUESTIONS = [("What is 1 + 1?", 2), ("What is 2 + 2?", 4), ("What is 3 + 3?", 6)]


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"so #### {a}"}) + "\n" for q, a in QUESTIONS))
    return path


class FakeEngine:
    """Answers 1 + 1 and 2 + 2 right and 3 + 3 wrong; every generation: 8 tokens, 2 cycles, 5 accepted."""

    def __init__(self):
        self.calls, self.judges = [], []
        self.target = self.draft = None

    def generate(self, prompt, max_new_tokens, mode, window, judge=None, threshold=None):
        self.calls.append((mode, threshold))
        self.judges.append(judge)
        question = prompt[-1]["content"]
        answer = next(a for q, a in QUESTIONS if q in question)
        text = f"The answer is {answer + (answer == 6)}."
        speculative = mode != "target"
        stats = GenerationStats(mode=mode, window=window, new_tokens=8, cycles=2 * speculative,
                                histogram={2: 1, 3: 1} if speculative else {},
                                judge_rescues=int(judge is not None), total_s=0.5, finish_reason="eos")
        return SimpleNamespace(text=text, token_ids=[0] * 8, stats=stats)


@pytest.fixture
def fake(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr("autojudge.commands.eval.engine_from_options", lambda **kw: engine)
    return engine


def _eval(args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_cli_report_table_plot_and_resume(tmp_path, dataset, fake):
    out, plot = tmp_path / "report.json", tmp_path / "pareto.png"
    args = ["--dataset", dataset, "--modes", "target,speculative", "--max-new-tokens", 8, "--out", out]
    result = _eval([*args, "--plot", plot])
    assert result.exit_code == 0, result.output
    assert len(fake.calls) == 6
    report = json.loads(out.read_text())
    assert report["config"]["dataset"] == str(dataset) and report["config"]["n_problems"] == 3
    target, spec = report["results"]
    assert (target["mode"], spec["mode"]) == ("target", "speculative")
    for r in (target, spec):
        assert r["n"] == 3 and r["accuracy"] == pytest.approx(2 / 3) and r["tokens_per_second"] == 16.0
        assert {"threshold", "judge_rescues_per_cycle", "wall_s", "mean_new_tokens"} <= set(r)
    assert target["accepted_per_cycle"] is None and spec["accepted_per_cycle"] == 2.5
    assert spec["judge_rescues_per_cycle"] == 0.0
    assert ("| speculative | - | - | 3 | 0.667 | 0/0 +0.000 [+0.000, +0.000] | - | 2.50 | 2.0 | 16.0 | 0.5 | - | 0.000 "
            "| 8.0 |") in result.stdout
    assert plot.read_bytes().startswith(PNG_MAGIC)

    rows_file = tmp_path / "report.json.partial.jsonl"
    assert len(rows_file.read_text().splitlines()) == 1 + 6
    out.unlink()
    fake.calls.clear()
    result = _eval([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert fake.calls == []
    assert json.loads(out.read_text())["results"] == report["results"]

    # Without --resume the rows start over.
    assert _eval(args).exit_code == 0 and len(fake.calls) == 6


def test_resume_after_crash_and_with_more_problems(tmp_path, dataset, fake):
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--modes", "speculative", "--max-new-tokens", 8, "--out", out]
    assert _eval([*args, "--limit", 2]).exit_code == 0 and len(fake.calls) == 2
    rows_file = tmp_path / "r.json.partial.jsonl"
    with rows_file.open("a") as f:
        f.write('{"mode": "speculative", "thresh')  # killed mid-write
    result = _eval([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(fake.calls) == 3  # only the third problem
    lines = rows_file.read_text().splitlines()
    assert len(lines) == 1 + 3 and all(json.loads(line) for line in lines)
    assert json.loads(out.read_text())["results"][0]["n"] == 3


def test_offset_takes_the_problems_after_it(tmp_path, dataset, fake):
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--modes", "target", "--max-new-tokens", 8, "--out", out]
    assert _eval([*args, "--offset", 1]).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "r.json.partial.jsonl").read_text().splitlines()[1:]]
    assert [r["problem_id"].split("/")[-1] for r in rows] == ["1", "2"]
    assert json.loads(out.read_text())["results"][0]["n"] == 2
    result = _eval([*args, "--resume"])  # rows of problems 1-2 are not rows of problems 0-2
    assert result.exit_code == 1 and "offset" in result.output


def test_resume_refuses_other_settings(tmp_path, dataset, fake):
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--modes", "speculative", "--out", out]
    assert _eval([*args, "--max-new-tokens", 8]).exit_code == 0
    result = _eval([*args, "--max-new-tokens", 16, "--resume"])
    assert result.exit_code == 1 and "max_new_tokens" in result.output


def test_resume_with_or_without_topk_mixes_no_k(tmp_path, dataset, fake):
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--max-new-tokens", 8, "--out", out]
    assert _eval([*args, "--modes", "speculative"]).exit_code == 0 and len(fake.calls) == 3
    # A mode the rows never had takes its setting; the header records it for the next resume.
    result = _eval([*args, "--modes", "speculative,topk", "--topk", 2, "--resume"])
    assert result.exit_code == 0, result.output
    assert fake.calls[3:] == [("topk", 0.3)] * 3
    header = json.loads((tmp_path / "r.json.partial.jsonl").read_text().splitlines()[0])
    assert header["topk"] == 2
    # Reporting fewer modes than the rows hold needs no decoding.
    fake.calls.clear()
    result = _eval([*args, "--modes", "speculative", "--resume"])
    assert result.exit_code == 0, result.output
    assert fake.calls == [] and [r["mode"] for r in json.loads(out.read_text())["results"]] == ["speculative"]
    result = _eval([*args, "--modes", "speculative,topk", "--topk", 3, "--resume"])
    assert result.exit_code == 1 and "different topk" in result.output and fake.calls == []


def test_resume_never_mixes_protected_and_unprotected_lossy_rows(tmp_path, dataset, fake):
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--max-new-tokens", 8, "--out", out]
    assert _eval([*args, "--modes", "speculative,topk", "--no-protect-ends"]).exit_code == 0
    header = json.loads((tmp_path / "r.json.partial.jsonl").read_text().splitlines()[0])
    assert header["protect_ends"] is False
    fake.calls.clear()
    result = _eval([*args, "--modes", "speculative,topk", "--resume"])
    assert result.exit_code == 1 and "different protect_ends" in result.output and fake.calls == []
    # Lossless rows are the same either way: a lossless-only resume takes them.
    assert _eval([*args, "--modes", "speculative", "--resume"]).exit_code == 0 and fake.calls == []
    # Rows files from before the option held unprotected lossy rows.
    lines = (tmp_path / "r.json.partial.jsonl").read_text().splitlines()
    del header["protect_ends"]
    (tmp_path / "r.json.partial.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert "different protect_ends" in _eval([*args, "--modes", "speculative,topk", "--resume"]).output
    assert _eval([*args, "--modes", "speculative,topk", "--no-protect-ends", "--resume"]).exit_code == 0
    assert fake.calls == []


def test_resume_never_mixes_rows_of_a_retrained_head_under_the_same_name(tmp_path, dataset, fake, monkeypatch):
    heads = {"autojudge": SimpleNamespace(thresholds={}, fingerprint="old"),
             "judge": SimpleNamespace(thresholds={}, fingerprint="jd")}
    monkeypatch.setattr(runner, "load_eval_judges",
                        lambda path, engine, modes, task: {m: heads[m] for m in modes if m in heads})
    out = tmp_path / "r.json"
    args = ["--dataset", dataset, "--max-new-tokens", 8, "--out", out]
    judged = [*args, "--judge", "default", "--thresholds", "0.3"]
    assert _eval([*judged, "--modes", "speculative,autojudge"]).exit_code == 0
    heads["autojudge"].fingerprint = "new"  # `autojudge train` shipped another default
    fake.calls.clear()
    result = _eval([*judged, "--modes", "speculative,autojudge", "--resume"])
    assert result.exit_code == 1 and "different autojudge_head" in result.output and fake.calls == []
    # Rows no head shaped still resume, and another judge mode's head is taken up and recorded.
    assert _eval([*args, "--modes", "speculative", "--resume"]).exit_code == 0
    assert fake.calls == []
    result = _eval([*judged, "--modes", "speculative,judge", "--resume"])
    assert result.exit_code == 0, result.output
    assert fake.calls == [("judge", 0.3)] * 3
    header = json.loads((tmp_path / "r.json.partial.jsonl").read_text().splitlines()[0])
    assert header["autojudge_head"] == "old" and header["judge_head"] == "jd"


def test_judge_modes_sweep_stored_thresholds(tmp_path, dataset, fake, monkeypatch):
    judge = SimpleNamespace(thresholds={"recall": {"0.9": 0.3, "0.8": 0.6}, "quantile": {"0.5": 0.1}}, fingerprint="a")
    monkeypatch.setattr(runner, "load_eval_judges", lambda path, engine, modes, task: {"autojudge": judge})
    out = tmp_path / "r.json"
    result = _eval(["--dataset", dataset, "--judge", "j", "--max-new-tokens", 8, "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["threshold"], r["recall"]) for r in results] == [
        ("target", None, None), ("speculative", None, None), ("autojudge", 0.3, 0.9), ("autojudge", 0.6, 0.8)]
    assert ("autojudge", 0.3) in fake.calls and results[2]["judge_rescues_per_cycle"] == 0.5


def test_each_judge_mode_decodes_with_its_own_head(tmp_path, dataset, fake, monkeypatch):
    heads = {"autojudge": SimpleNamespace(thresholds={"recall": {"0.9": 0.3}}, fingerprint="a"),
             "judge": SimpleNamespace(thresholds={"recall": {"0.9": 0.05}}, fingerprint="b")}
    monkeypatch.setattr(runner, "load_eval_judges", lambda path, engine, modes, task: heads)
    out = tmp_path / "r.json"
    result = _eval(["--dataset", dataset, "--modes", "autojudge,judge", "--judge", "default", "--out", out])
    assert result.exit_code == 0, result.output
    assert {(call, id(judge)) for call, judge in zip(fake.calls, fake.judges)} == {
        (("autojudge", 0.3), id(heads["autojudge"])), (("judge", 0.05), id(heads["judge"]))}
    # Each head on its own scale: thresholds given per mode.
    fake.calls.clear()
    result = _eval(["--dataset", dataset, "--modes", "autojudge,judge", "--judge", "default", "--out", out,
                    "--thresholds", "autojudge=0.2,0.4", "--thresholds", "judge=0.1"])
    assert result.exit_code == 0, result.output
    assert sorted(set(fake.calls)) == [("autojudge", 0.2), ("autojudge", 0.4), ("judge", 0.1)]
    assert [(r["mode"], r["threshold"]) for r in json.loads(out.read_text())["results"]] == [
        ("autojudge", 0.2), ("autojudge", 0.4), ("judge", 0.1)]


def _assert_clean_error(args, needle):
    result = _eval(args)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], result.output


@pytest.mark.parametrize("extra, needle", [
    (["--modes", "target,turbo"], "--modes"),
    (["--modes", "autojudge"], "needs a judge"),
    (["--modes", "autojudge", "--judge", "j", "--thresholds", "0.2,1.5"], "[0, 1]"),
    (["--modes", "autojudge", "--judge", "default"], "needs a draft model (default-draft"),
    (["--limit", "0"], "--limit"),
    (["--offset", "3"], "--offset 3 skips all 3 problems"),
])
def test_cli_bad_input(tmp_path, dataset, fake, extra, needle):
    _assert_clean_error(["--dataset", dataset, "--out", tmp_path / "r.json", *extra], needle)
    assert fake.calls == []


# ---------------------------------------------------------------------------------------------- CLI, tiny models

def _tiny_judge(tmp_path, target_dir):
    """A DT judge trained on random features, stamped for the tiny target."""
    from autojudge.judge.judge_file import save_judge
    from autojudge.judge.train import train_judge

    dec = Engine.from_pretrained(target=str(target_dir), draft=None, max_seq_len=64).target
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, dec.config.hidden_size, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(200, generator=g) > 0).float()
    res = train_judge(x, y, [f"p{i // 10}" for i in range(200)])
    meta = {"kind": "autojudge", "setup": "DT", "hidden_sizes": {"target": dec.config.hidden_size},
            "fingerprints": {"target": dec.fingerprint}, "models": {"target": dec.name},
            "dtypes": {"target": "float32"}, "source": "labels.jsonl", "source_sha256": "0" * 64}
    save_judge(tmp_path / "judge", res, meta)
    return tmp_path / "judge", res.thresholds["recall"]


def test_cli_tiny_models_end_to_end(tmp_path, dataset, tiny_pair):
    target, draft = tiny_pair
    judge_path, stored = _tiny_judge(tmp_path, target)
    out = tmp_path / "report.json"
    result = _eval(["--dataset", dataset, "--modes", "target,speculative,autojudge", "--judge", judge_path,
                    "--max-new-tokens", 8, "--window", 4, "--out", out, "--plot", tmp_path / "p.png",
                    "--target", target, "--draft", draft, "--kernels", "eager", "--max-seq-len", 256])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    taus = sorted({float(t) for t in stored.values()})
    assert [(r["mode"], r["threshold"]) for r in report["results"]] == (
        [("target", None), ("speculative", None)] + [("autojudge", t) for t in taus])
    for r in report["results"]:
        assert r["n"] == 3 and r["accuracy"] == 0.0 and 0 < r["mean_new_tokens"] <= 8 and r["tokens_per_second"] > 0
    assert report["config"]["window"] == 4 and report["config"]["target"] == str(target)
    rows = [json.loads(line) for line in (tmp_path / "report.json.partial.jsonl").read_text().splitlines()[1:]]
    texts = {mode: [r["text"] for r in rows if r["mode"] == mode] for mode in ("target", "speculative")}
    assert texts["target"] == texts["speculative"]  # lossless speculative decoding
    assert result.stdout.count("| autojudge |") == len(taus)
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_aggregate_splits_single_stream_and_batch_speed():
    alone = _row("speculative", None, "p1", True, 10, 2, 6, 0, 2.0, 2.5)
    batched = [{**_row("speculative", None, f"p{i}", True, 20, 4, 9, 0, 4.0, w), "batch_size": 4}
               for i, w in ((2, 1.0), (3, 0.25), (4, 0.75))]
    (result,) = aggregate([alone, *batched])
    assert result["tokens_per_second"] == 5.0  # the row decoded alone: 10 tokens in 2 s
    assert result["batch_tokens_per_second"] == 30.0  # 60 tokens over the batch's 2 s of wall time
    assert result["batch_size"] == 4 and result["n"] == 4
    (only_alone,) = aggregate([alone])
    assert only_alone["batch_tokens_per_second"] is None and only_alone["batch_size"] == 1


def _problems_file(tmp_path, n):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(n)))
    return path


def test_cli_batched_rows_equal_batch_one_rows_and_resume(tmp_path, tiny_pair, monkeypatch):
    """fp32: --batch-size changes only timing: every row's text, answer and acceptance equal batch 1's; a batched
    run killed mid-way resumes without losing or doubling a row."""
    target, draft = tiny_pair
    judge_path, _ = _tiny_judge(tmp_path, target)
    dataset = _problems_file(tmp_path, 7)
    common = ["--dataset", dataset, "--modes", "target,speculative,autojudge", "--judge", judge_path,
              "--thresholds", "0.3", "--max-new-tokens", 12, "--window", 4, "--target", target, "--draft", draft,
              "--kernels", "eager", "--max-seq-len", 256, "--dtype", "fp32"]

    def rows(out):
        lines = (tmp_path / f"{out}.partial.jsonl").read_text().splitlines()[1:]
        return {(r["mode"], r["problem_id"]): r for r in map(json.loads, lines)}

    assert _eval([*common, "--out", tmp_path / "one.json"]).exit_code == 0
    result = _eval([*common, "--out", tmp_path / "many.json", "--batch-size", 3, "--single-stream", 2])
    assert result.exit_code == 0, result.output
    one, many = rows("one.json"), rows("many.json")
    assert one.keys() == many.keys() and len(one) == 21
    same = ("text", "outcome", "correct", "new_tokens", "cycles", "accepted", "judge_rescues", "finish_reason")
    for key in one:
        assert {k: one[key][k] for k in same} == {k: many[key][k] for k in same}, key
        assert many[key]["batch_size"] == (1 if int(key[1].split("/")[-1]) < 2 else 3), key
    report = json.loads((tmp_path / "many.json").read_text())
    for r in report["results"]:
        assert r["batch_size"] == 3 and r["tokens_per_second"] > 0 and r["batch_tokens_per_second"] > 0

    # Killed after 9 rows (inside the speculative mode's batch), then resumed: the same 21 rows, once each.
    real_row, written = runner._row, []

    def dying_row(*args, **kwargs):
        if len(written) == 9:
            raise KeyboardInterrupt
        written.append(1)
        return real_row(*args, **kwargs)

    batched = [*common, "--out", tmp_path / "crash.json", "--batch-size", 3, "--single-stream", 2]
    monkeypatch.setattr(runner, "_row", dying_row)
    assert _eval(batched).exit_code != 0
    monkeypatch.undo()
    assert len(rows("crash.json")) == 9
    assert _eval([*batched, "--resume"]).exit_code == 0
    lines = (tmp_path / "crash.json.partial.jsonl").read_text().splitlines()[1:]
    assert len(lines) == 21 and rows("crash.json").keys() == one.keys()
    result = _eval([*common, "--out", tmp_path / "crash.json", "--batch-size", 4, "--resume"])
    assert result.exit_code == 1 and "batch_size" in result.output


def test_cli_tokenwise_schedule_gives_the_batch_one_rows(tmp_path, tiny_pair, monkeypatch):
    """fp32: --schedule tokenwise changes only the batch's arithmetic: every row equals batch 1's; the report keeps
    the speculative modes' batch tokens/s out (it is the schedule's), and a resume under cycles is refused. Every run
    reuses the prompts' caches of the first."""
    target, draft = tiny_pair
    judge_path, _ = _tiny_judge(tmp_path, target)
    dataset = _problems_file(tmp_path, 5)
    common = ["--dataset", dataset, "--modes", "target,speculative,autojudge,topk", "--judge", judge_path,
              "--thresholds", "0.3", "--alphas", "0.1", "--max-new-tokens", 14, "--window", 5, "--target", target,
              "--draft", draft, "--kernels", "eager", "--max-seq-len", 256, "--dtype", "fp32"]

    def rows(out):
        lines = (tmp_path / f"{out}.partial.jsonl").read_text().splitlines()[1:]
        return {(r["mode"], r["problem_id"]): r for r in map(json.loads, lines)}

    assert _eval([*common, "--out", tmp_path / "one.json"]).exit_code == 0
    tokenwise = [*common, "--out", tmp_path / "tw.json", "--batch-size", 3, "--single-stream", 1,
                 "--schedule", "tokenwise"]
    prefills = []
    real = Decoder.forward_rows

    def counting(self, tokens, positions, *a, **k):
        if int(positions[0, 0]) == 0:  # only a prefill starts at position 0
            prefills.append(self)
        return real(self, tokens, positions, *a, **k)

    monkeypatch.setattr(Decoder, "forward_rows", counting)
    result = _eval(tokenwise)
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    # 4 batched problems, 4 runs: each prompt prefilled once in each model, not once a run.
    assert len(prefills) == 8 and len(set(prefills)) == 2
    one, tw = rows("one.json"), rows("tw.json")
    assert one.keys() == tw.keys() and len(one) == 20
    same = ("text", "outcome", "correct", "new_tokens", "cycles", "accepted", "judge_rescues", "finish_reason")
    for key in one:
        assert {k: one[key][k] for k in same} == {k: tw[key][k] for k in same}, key
        batched = int(key[1].split("/")[-1]) >= 1
        assert tw[key]["schedule"] == ("tokenwise" if batched and key[0] != "target" else "cycles"), key
    report = {r["mode"]: r for r in json.loads((tmp_path / "tw.json").read_text())["results"]}
    assert report["target"]["batch_tokens_per_second"] > 0
    for mode in ("speculative", "autojudge", "topk"):
        assert report[mode]["batch_tokens_per_second"] is None and report[mode]["tokens_per_second"] > 0
    result = _eval([*common, "--out", tmp_path / "tw.json", "--batch-size", 3, "--single-stream", 1, "--resume"])
    assert result.exit_code == 1 and "schedule" in result.output
    result = _eval([*common, "--out", tmp_path / "x.json", "--schedule", "tokenwise"])
    assert result.exit_code == 1 and "--schedule tokenwise applies to batched decoding; add --batch-size" in result.output
