"""Mode topk, the training-free lossy baseline, end to end on tiny random models (fp32, eager and Triton)."""

import json

import pytest
import torch
from click.testing import CliRunner

from autojudge import Engine, TopkRule
from autojudge.commands import main
from autojudge.errors import AutojudgeError
from autojudge.judge.judge_file import Judge

WINDOW = 4
PROMPT = list(range(50, 80))  # random tiny models fall into loops; this prompt keeps a mix of near-ties


@pytest.fixture(scope="module", params=["eager", "triton"])
def engine(request, tiny_pair):
    # A draft close to the target: its mismatches are near-ties, the cases the rule exists for.
    return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=256,
                                  kernels=request.param)


def test_top1_is_lossless(engine):
    """k = 1 keeps only the target's own top token: exactly speculative decoding."""
    spec = engine.generate(PROMPT, max_new_tokens=30, mode="speculative", window=WINDOW, ignore_eos=True)
    top1 = engine.generate(PROMPT, max_new_tokens=30, mode="topk", window=WINDOW, ignore_eos=True,
                           judge=TopkRule(k=1, alpha=0.0))
    assert top1.token_ids == spec.token_ids and top1.stats.judge_rescues == 0


@pytest.mark.parametrize("k, alpha", [(3, 0.0), (2, 0.2), (5, 0.05)])
def test_every_emitted_token_passes_the_rule(engine, k, alpha):
    """Each token is the target's top one or, when a draft token was kept, within its top k at >= alpha x the top
    token's probability; the rule keeps some, so it accepts more than speculative decoding."""
    out = engine.generate(PROMPT, max_new_tokens=40, mode="topk", window=WINDOW, ignore_eos=True,
                          judge=TopkRule(k=k, alpha=alpha))
    spec = engine.generate(PROMPT, max_new_tokens=40, mode="speculative", window=WINDOW, ignore_eos=True)
    seq = PROMPT + out.token_ids
    logits = engine.target.teacher_forced(seq)[0]
    for i in range(len(out.token_ids)):
        row = logits[len(PROMPT) + i - 1]
        token = seq[len(PROMPT) + i]
        rank = int((row > row[token]).sum())
        ratio = float(torch.exp(row[token] - row.max()))
        assert rank < k and ratio >= alpha * (1 - 1e-5), (i, rank, ratio)
    assert out.stats.judge_rescues > 0
    assert out.stats.accepted_per_cycle >= spec.stats.accepted_per_cycle


def test_a_protected_target_choice_takes_back_the_rules_rescue(engine, monkeypatch):
    """Where the rule first kept a draft token over the target's own choice, protecting that choice makes the
    target's token come out there instead (the text before is the same: nothing before it was rescued)."""
    kw = dict(max_new_tokens=40, mode="topk", window=WINDOW, ignore_eos=True, judge=TopkRule(k=5, alpha=0.0))
    monkeypatch.setattr(engine, "protected_tokens", None)
    free = engine.generate(PROMPT, **kw)
    seq = PROMPT + free.token_ids
    wanted = engine.target.teacher_forced(seq)[0][len(PROMPT) - 1 :].argmax(-1).tolist()
    first = next(i for i, (got, want) in enumerate(zip(free.token_ids, wanted)) if got != want)
    protected = torch.zeros(engine.target.config.vocab_size, dtype=torch.bool)
    protected[wanted[first]] = True
    monkeypatch.setattr(engine, "protected_tokens", protected)
    guarded = engine.generate(PROMPT, **kw)
    assert guarded.token_ids[:first] == free.token_ids[:first] and guarded.token_ids[first] == wanted[first]


def test_threshold_overrides_alpha_and_batched_rows_equal_batch1(engine):
    prompts = [PROMPT, PROMPT[:9], list(range(20, 44))]
    kw = dict(max_new_tokens=25, mode="topk", window=WINDOW, ignore_eos=True, judge=TopkRule(k=3, alpha=0.9))
    singles = [engine.generate(p, **{**kw, "threshold": 0.1}) for p in prompts]
    strict = engine.generate(PROMPT, **kw)
    assert singles[0].stats.judge_rescues > strict.stats.judge_rescues  # alpha 0.1 keeps what 0.9 does not
    batched = engine.generate_batch(prompts, max_batch=2, threshold=0.1, **kw)
    for got, want in zip(batched, singles):
        assert got.token_ids == want.token_ids and got.stats.judge_rescues == want.stats.judge_rescues


def test_rule_and_mode_must_match(engine):
    judge = Judge(weight=torch.zeros(engine.target.config.hidden_size), bias=torch.tensor([0.0]), setup="DT",
                  thresholds={}, meta={})
    with pytest.raises(AutojudgeError, match="mode 'topk' takes a TopkRule"):
        engine.generate(PROMPT, max_new_tokens=4, mode="topk", judge=judge)
    with pytest.raises(AutojudgeError, match="takes a trained judge"):
        engine.generate(PROMPT, max_new_tokens=4, mode="autojudge", judge=TopkRule())
    with pytest.raises(AutojudgeError, match="needs a judge"):
        engine.generate(PROMPT, max_new_tokens=4, mode="topk")
    with pytest.raises(AutojudgeError, match="k must be an integer >= 1"):
        TopkRule(k=0)
    with pytest.raises(AutojudgeError, match=r"alpha must be in \[0, 1\]"):
        TopkRule(alpha=1.5)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_generate_and_eval(tiny_pair, tmp_path):
    models = ["--target", tiny_pair[0], "--draft", tiny_pair[1], "--max-seq-len", 256, "--kernels", "eager"]
    for protect in ("--protect-ends", "--no-protect-ends"):
        result = _cli("generate", "--mode", "topk", "--topk", 3, "--alpha", 0.1, "--max-new-tokens", 12, "--json",
                      protect, "hello", *models)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["stats"]["mode"] == "topk"
    for bad, needle in ((["--mode", "speculative", "--topk", 2], "apply to mode topk"),
                        (["--mode", "topk", "--alpha", 2], "alpha must be in [0, 1]"),
                        (["--mode", "topk", "--threshold", 0.5], "needs no trained judge")):
        result = _cli("generate", *bad, "hello", *models)
        assert result.exit_code == 1 and needle in result.output and len(result.output.splitlines()) == 1, result.output

    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"{i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                               for i in range(2)))
    out = tmp_path / "r.json"
    result = _cli("eval", "--dataset", dataset, "--modes", "speculative,topk", "--topk", 3, "--alphas", "0.5,0.05",
                  "--max-new-tokens", 10, "--window", WINDOW, "--out", out, *models)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["threshold"]) for r in results] == [("speculative", None), ("topk", 0.05), ("topk", 0.5)]
    assert results[1]["accepted_per_cycle"] >= results[2]["accepted_per_cycle"] >= results[0]["accepted_per_cycle"]
    result = _cli("eval", "--dataset", dataset, "--modes", "speculative", "--alphas", "0.5", "--out", out, *models)
    assert result.exit_code == 1 and "--alphas apply to mode topk" in result.output
