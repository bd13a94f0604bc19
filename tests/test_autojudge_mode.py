"""Judge-in-the-loop decoding (modes autojudge / judge) on tiny random models."""

import re

import pytest
import torch

from autojudge import Engine
from autojudge.engine.tokenizer import end_of_answer_ids
from autojudge.errors import AutojudgeError
from autojudge.judge.features import label_features
from autojudge.judge.judge_file import Judge

WINDOW = 4
PROMPT = list(range(20, 44))


@pytest.fixture(scope="module")
def engine(tiny_pair, tiny_unrelated_draft):
    # An unrelated draft disagrees almost everywhere: every accepted draft token is the judge's doing.
    return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_unrelated_draft), max_seq_len=512,
                                  kernels="eager")


def _judge(engine, setup, bias, weight=None):
    dim = engine.target.config.hidden_size + (engine.draft.config.hidden_size if setup == "DD-DT" else 0)
    weight = torch.zeros(dim) if weight is None else weight
    return Judge(weight=weight, bias=torch.tensor([float(bias)]), setup=setup, thresholds={}, meta={})


@pytest.mark.parametrize("setup", ["DT", "DD-DT"])
def test_judge_accepting_everything_emits_draft_tokens(engine, setup):
    out = engine.generate(PROMPT, max_new_tokens=31, mode="autojudge", window=WINDOW, ignore_eos=True,
                          judge=_judge(engine, setup, bias=-30.0), threshold=0.5)
    assert out.stats.histogram == {WINDOW: out.stats.cycles}
    seq = PROMPT + out.token_ids
    draft_pred = engine.draft.teacher_forced(seq)[0].argmax(-1).tolist()
    target_pred = engine.target.teacher_forced(seq)[0].argmax(-1).tolist()
    # Token 0 comes from the prefill; then each cycle emits WINDOW draft tokens and the target's bonus token.
    for i in range(1, len(out.token_ids)):
        pos = len(PROMPT) + i
        expected = target_pred if i % (WINDOW + 1) == 0 else draft_pred
        assert seq[pos] == expected[pos - 1], f"token {i}"
    assert out.stats.judge_rescues > 0.5 * out.stats.cycles * WINDOW


@pytest.mark.parametrize("setup", ["DT", "DD-DT"])
def test_judge_accepting_nothing_equals_speculative(engine, setup):
    spec = engine.generate(PROMPT, max_new_tokens=40, mode="speculative", window=WINDOW, ignore_eos=True)
    judged = engine.generate(PROMPT, max_new_tokens=40, mode="autojudge", window=WINDOW, ignore_eos=True,
                             judge=_judge(engine, setup, bias=30.0), threshold=0.5)
    assert judged.token_ids == spec.token_ids
    assert judged.stats.judge_rescues == 0


def test_protecting_every_token_makes_the_judge_lossless(engine, monkeypatch):
    """Protected target choices bound the judge on every decode path: protect all and a judge that accepts
    everything gives speculative decoding's tokens, alone and batched under both schedules."""
    prompts = [PROMPT, PROMPT[:7]]
    spec = [engine.generate(p, max_new_tokens=30, mode="speculative", window=WINDOW, ignore_eos=True)
            for p in prompts]
    kw = dict(max_new_tokens=30, mode="autojudge", window=WINDOW, ignore_eos=True,
              judge=_judge(engine, "DD-DT", bias=-30.0), threshold=0.5)
    assert engine.generate(PROMPT, **kw).token_ids != spec[0].token_ids
    monkeypatch.setattr(engine, "protected_tokens", torch.ones(engine.target.config.vocab_size, dtype=torch.bool))
    out = engine.generate(PROMPT, **kw)
    assert out.token_ids == spec[0].token_ids and out.stats.judge_rescues == 0
    for schedule in ("cycles", "tokenwise"):
        batched = engine.generate_batch(prompts, max_batch=2, schedule=schedule, **kw)
        assert [o.token_ids for o in batched] == [o.token_ids for o in spec], schedule


def test_end_of_answer_ids_and_the_switch(tiny_pair):
    class Vocab:
        def get_vocab(self):
            return {"```": 5, "Ġ```": 6, "```Ċ": 9, "``": 7, "abc": 8}

    assert end_of_answer_ids(Vocab(), {2}) == {2, 5, 6, 9}
    on = Engine.from_pretrained(target=str(tiny_pair[0]), draft=None, max_seq_len=64, kernels="eager")
    eos = sorted(on.eos_token_ids)
    assert eos and on.protected_tokens[eos].all()
    assert on.protected_tokens.sum() == len(end_of_answer_ids(on.tokenizer, on.eos_token_ids))
    off = Engine.from_pretrained(target=str(tiny_pair[0]), draft=None, max_seq_len=64, kernels="eager",
                                 protect_ends=False)
    assert off.protected_tokens is None


def test_decoder_features_equal_offline_features(engine, monkeypatch):
    """The features the verify step sees equal `label_features` on the same sequences.

    Tolerance 1e-4: the decoder builds hidden states incrementally (prefill, then 1-2 token steps) while
    the offline pass runs the whole sequence at once; the same math in other matmul shapes rounds
    differently in fp32 (about 1e-6 relative here).
    """
    torch.manual_seed(0)
    dim = engine.target.config.hidden_size + engine.draft.config.hidden_size
    judge = _judge(engine, "DD-DT", bias=0.0, weight=torch.randn(dim) * 0.01)
    seen = []
    real_verify = engine.verify

    def spy(logits, drafts, **kw):
        feats = kw["judge_features"]
        seen.append((drafts[0].tolist(), torch.cat([f[0] for f in feats], dim=-1).clone()))
        return real_verify(logits, drafts, **kw)

    monkeypatch.setattr(engine, "verify", spy)
    out = engine.generate(PROMPT, max_new_tokens=30, mode="autojudge", window=WINDOW, ignore_eos=True,
                          judge=judge, threshold=0.54)
    assert out.stats.judge_rescues > 0 and any(a < WINDOW for a in out.stats.histogram)
    rows, decoder_feats = [], []
    emitted = 1
    for drafts, feats in seen:
        prefix = out.token_ids[:emitted]
        for i, tok in enumerate(drafts):
            rows.append({"prompt_ids": PROMPT, "prefix_ids": prefix + drafts[:i], "draft_token": tok})
            decoder_feats.append(feats[i])
            if out.token_ids[emitted + i: emitted + i + 1] != [tok]:
                break  # positions after the first rejection were never part of the output
        accepted = next((i for i, t in enumerate(drafts) if out.token_ids[emitted + i: emitted + i + 1] != [t]),
                        len(drafts))
        emitted += accepted + 1
    offline = label_features(engine, rows, "DD-DT")
    assert torch.allclose(torch.stack(decoder_feats), offline, atol=1e-4)


@pytest.mark.parametrize("stored, accepts_all", [(0.6, True), (0.4, False)])
def test_the_judges_stored_threshold_is_the_default(engine, stored, accepts_all):
    """p_important is 0.5 everywhere (zero weight and bias): the stored threshold, not a constant, decides."""
    judge = _judge(engine, "DT", bias=0.0)
    judge.meta["default_threshold"] = {"value": stored}
    out = engine.generate(PROMPT, max_new_tokens=21, mode="autojudge", window=WINDOW, ignore_eos=True, judge=judge)
    spec = engine.generate(PROMPT, max_new_tokens=21, mode="speculative", window=WINDOW, ignore_eos=True)
    assert out.token_ids == engine.generate(PROMPT, max_new_tokens=21, mode="autojudge", window=WINDOW,
                                            ignore_eos=True, judge=judge, threshold=stored).token_ids
    if accepts_all:
        assert out.stats.histogram == {WINDOW: out.stats.cycles}
    else:
        assert out.token_ids == spec.token_ids and out.stats.judge_rescues == 0


def test_judge_mode_errors(engine):
    with pytest.raises(AutojudgeError, match="needs a judge"):
        engine.generate(PROMPT, max_new_tokens=4, mode="autojudge")
    with pytest.raises(AutojudgeError, match="only in modes"):
        engine.generate(PROMPT, max_new_tokens=4, mode="speculative", judge=_judge(engine, "DT", 0.0))
    with pytest.raises(AutojudgeError, match="stores no default threshold"):
        engine.generate(PROMPT, max_new_tokens=4, mode="autojudge", judge=_judge(engine, "DT", 0.0))
    with pytest.raises(AutojudgeError, match=re.escape("must be in [0, 1]")):
        engine.generate(PROMPT, max_new_tokens=4, mode="autojudge", judge=_judge(engine, "DT", 0.0), threshold=1.5)


@pytest.mark.parametrize("window", [16, 33, 64])
def test_long_windows(engine, window):
    judge = _judge(engine, "DD-DT", bias=-30.0)
    out = engine.generate(PROMPT, max_new_tokens=2 * window + 2, mode="autojudge", window=window,
                          ignore_eos=True, judge=judge, threshold=0.5)
    assert out.stats.histogram.get(window, 0) >= 1
