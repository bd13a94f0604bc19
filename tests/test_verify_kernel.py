"""Fused verify kernel (Triton, run by the CPU interpreter here) against the eager reference."""

import math
import os
import subprocess
import sys
from pathlib import Path

# The kernel module reads the flag when it is imported; conftest sets it too, this keeps the file
# runnable on its own.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lossless_stats import CHI2_DF7_CRIT, STAT_T, chi_square, sample_first_tokens, stat_problem

from autojudge import kernels
from autojudge.errors import AutojudgeError
from autojudge.kernels import (
    VerifyOutput,
    resolve_kernels,
    triton_verify,
    verify,
    verify_reference,
)
from autojudge.kernels.reference import sampling_probs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def assert_same(got: VerifyOutput, want: VerifyOutput) -> None:
    for name in ("num_accepted", "next_token", "target_ok", "judge_ok"):
        assert torch.equal(getattr(got, name), getattr(want, name)), (
            name, getattr(got, name), getattr(want, name))
    torch.testing.assert_close(got.judge_prob, want.judge_prob, rtol=1e-4, atol=1e-6)


def both(*args, **kwargs) -> VerifyOutput:
    got = verify(*args, **kwargs)
    want = verify_reference(*args, **kwargs)
    assert_same(got, want)
    return got


def make_judge(gen, b, k, dims, dtype, z_target=None):
    """Judge features (a tuple when several blocks) and weight; z_target [B, K] steers f.w + bias."""
    feats = [torch.randn(b, k, d, generator=gen) for d in dims]
    weight = torch.randn(sum(dims), generator=gen) / sum(dims) ** 0.5
    bias = 0.1
    if z_target is not None:
        z = sum(f @ w for f, w in zip(feats, weight.split(list(dims)))) + bias
        step = (z_target - z) / (weight @ weight)
        feats = [f + step[..., None] * w for f, w in zip(feats, weight.split(list(dims)))]
    feats = tuple(f.to(dtype) for f in feats)
    return {"judge_features": feats if len(feats) > 1 else feats[0], "judge_weight": weight, "judge_bias": bias}


def greedy_of(logits):
    x = logits.float()
    return torch.where(torch.isnan(x), float("-inf"), x).argmax(-1)


# (B, K, V, dtype, judge dims): a covering subset, big vocabularies only with small B*K.
SHAPES = [
    (1, 1, 151936, "bf16", (896, 1536)),
    (1, 2, 128256, "fp16", (4096,)),
    (2, 7, 32000, "fp32", (100,)),
    (3, 16, 1000, "bf16", (896, 1536)),
    (4, 33, 517, "fp16", (100,)),
    (1, 64, 517, "fp32", (4096,)),
    (2, 7, 1000, "fp32", None),
]


SCENARIOS = ["all_accepted", "first_rejected", "rescued", "judge_only", "mixed"]


@pytest.mark.parametrize("b,k,v,dtype,dims", SHAPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_greedy_matches_reference(b, k, v, dtype, dims, scenario):
    if dims is None and scenario in ("rescued", "judge_only"):
        pytest.skip("scenario needs a judge")
    gen = torch.Generator().manual_seed(v * 1000 + k * 10 + SCENARIOS.index(scenario))
    logits = (3 * torch.randn(b, k + 1, v, generator=gen)).to(DTYPES[dtype])
    greedy = greedy_of(logits)
    draft = greedy[:, :k].clone()
    wrong = (draft + 1) % v
    z = torch.full((b, k), 4.0)  # judge says "important" (prob 0.98) unless steered below
    if scenario == "first_rejected":
        draft[:, 0] = wrong[:, 0]
    elif scenario == "rescued":
        draft[:, k // 2] = wrong[:, k // 2]
        z[:, k // 2] = -4.0
    elif scenario == "judge_only":
        draft = wrong
        z[:, : k // 2] = -4.0
    elif scenario == "mixed":
        draft = torch.where(torch.rand(b, k, generator=gen) < 0.8, draft, wrong)
        z = 4 * torch.randn(b, k, generator=gen)
    judge = make_judge(gen, b, k, dims, DTYPES[dtype], z) if dims else {}
    out = both(logits, draft, **judge)
    expected_accepted = {"all_accepted": k, "first_rejected": 0, "rescued": k, "judge_only": k // 2}
    if scenario in expected_accepted:
        assert (out.num_accepted == expected_accepted[scenario]).all()
    if scenario == "rescued":
        assert not out.target_ok[:, k // 2].any() and out.judge_ok[:, k // 2].all()
    rows = torch.arange(b)
    assert torch.equal(out.next_token, greedy[rows, out.num_accepted])


def sampling_case(gen, b, k, v, dtype, temperature=0.8, draft_noise=0.7):
    """Target logits, a draft distribution near the target and drafted tokens sampled from it."""
    logits = (2 * torch.randn(b, k + 1, v, generator=gen)).to(DTYPES[dtype])
    q = torch.softmax(logits[:, :k].float() / temperature + draft_noise * torch.randn(b, k, v, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, v), 1, generator=gen).reshape(b, k)
    uniforms = torch.rand(b, k, generator=gen)
    noise = torch.empty(b, k + 1, v).exponential_(generator=gen)
    return logits, draft, {"temperature": temperature, "draft_probs": q, "uniforms": uniforms, "noise": noise}


@pytest.mark.parametrize("b,k,v,dtype,dims", SHAPES)
def test_sampling_matches_reference_with_explicit_randomness(b, k, v, dtype, dims):
    gen = torch.Generator().manual_seed(1000 + k)
    logits, draft, kw = sampling_case(gen, b, k, v, dtype)
    judge = make_judge(gen, b, k, dims, DTYPES[dtype], 4 * torch.randn(b, k, generator=gen)) if dims else {}
    both(logits, draft, **kw, **judge)


def test_sampling_covers_accept_reject_and_bonus():
    gen = torch.Generator().manual_seed(5)
    logits, draft, kw = sampling_case(gen, 64, 3, 50, "fp32", draft_noise=1.0)
    out = both(logits, draft, **kw)
    counts = torch.bincount(out.num_accepted, minlength=4)
    assert (counts > 0).all(), counts  # rejections at every position and full acceptances


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy sees -inf - -inf
def test_nan_and_inf_policy():
    v = 517
    logits = torch.randn(1, 5, v)
    logits[0, 0, [7, 9]] = float("inf")  # +inf wins, lowest index among several
    logits[0, 0, 3] = float("nan")
    logits[0, 1] = float("nan")  # all NaN: argmax is 0
    logits[0, 2, 5] = float("nan")  # NaN is never chosen...
    logits[0, 2, 11] = 100.0
    logits[0, 3] = float("-inf")
    logits[0, 3, :40] = float("nan")
    draft = torch.tensor([[7, 0, 5, 0]])
    out = both(logits, draft)
    assert out.target_ok.tolist() == [[True, True, False, True]]
    assert out.num_accepted.item() == 2 and out.next_token.item() == 11

    draft = torch.tensor([[7, 0, 11, 0]])
    out = both(logits, draft)
    assert out.num_accepted.item() == 4  # the all -inf/NaN row 3 also has argmax 0

    p = sampling_probs(logits, 0.5)
    assert p[0, 0, 7] == p[0, 0, 9] == 0.5 and p[0, 1].sum() == 0 and p[0, 2, 5] == 0
    gen = torch.Generator().manual_seed(0)
    for first in (7, 9, 3):
        q = torch.softmax(torch.randn(1, 4, v, generator=gen), -1)
        draft = torch.tensor([[first, 0, 11, 0]])
        kw = {"temperature": 0.5, "draft_probs": q, "uniforms": torch.rand(1, 4, generator=gen),
                  "noise": torch.empty(1, 5, v).exponential_(generator=gen)}
        out = both(logits, draft, **kw)
        assert out.target_ok[0, 0].item() == (first != 3)
        if first == 3:  # the residual of a row whose mass sits on the two +inf tokens
            assert out.next_token.item() in (7, 9)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_out_of_vocab_drafts_are_rejected(temperature):
    gen = torch.Generator().manual_seed(3)
    logits, _, kw = sampling_case(gen, 2, 3, 64, "fp32")
    draft = torch.tensor([[-1, 0, 0], [64, 0, 0]])
    kw["draft_probs"][:, 0] = 0.0  # q = 0 would accept anything in range
    out = both(logits, draft, **(kw if temperature else {}))
    assert not out.target_ok[:, 0].any() and (out.num_accepted == 0).all()


def test_ties_and_splits_across_blocks(monkeypatch):
    """Three uneven V splits of two blocks each: partial combine and lowest-index ties."""
    monkeypatch.setattr(triton_verify, "launch_config", lambda *a: triton_verify.LaunchConfig(3, 384, 128, 64, 1))
    gen = torch.Generator().manual_seed(9)
    b, k, v = 3, 5, 1000
    logits = torch.randint(0, 4, (b, k + 1, v), generator=gen).float()  # many exact ties
    logits[0, :, 900] = 10.0
    logits[0, :, 390] = 10.0  # tie across splits: 390 wins
    greedy = greedy_of(logits)
    assert greedy[0, 0] == 390
    draft = torch.where(torch.rand(b, k, generator=gen) < 0.7, greedy[:, :k], (greedy[:, :k] + 1) % v)
    both(logits, draft, **make_judge(gen, b, k, (70, 30), torch.float32, 3 * torch.randn(b, k, generator=gen)))
    out = both(logits, draft, topk=3, topk_alpha=0.1)  # rank counts summed over the splits
    assert out.judge_ok.any() and not out.judge_ok.all()
    logits, draft, kw = sampling_case(gen, b, k, v, "fp16")
    both(logits, draft, **kw)
    both(logits, draft, **kw, topk=2, topk_alpha=0.1)  # raw maxima combined over the splits
    # ... and raw argmaxes, for protected tokens (the lower index of a tie across splits).
    ties = torch.randint(0, 3, (b, k + 1, v), generator=gen).to(torch.float16)
    ties[:, :, [390, 900]] = 5.0
    protected = torch.zeros(v, dtype=torch.bool)
    protected[390] = True
    out = both(ties, draft, **kw, topk=v, protected_tokens=protected)
    assert not out.judge_ok.any()
    protected[390], protected[900] = False, True
    assert both(ties, draft, **kw, topk=v, protected_tokens=protected).judge_ok.all()
    # The sampled draw's tie across splits: q = 0 accepts every draft, so row K draws between two
    # equally likely tokens with equal noise, and the lower index wins.
    tie = torch.full((b, k + 1, v), -30.0)
    tie[:, :, [390, 900]] = 0.0
    kw.update(draft_probs=torch.zeros(b, k, v), noise=torch.ones(b, k + 1, v))
    out = both(tie, torch.full((b, k), 390), **kw)
    assert (out.num_accepted == k).all() and (out.next_token == 390).all()


def test_strided_inputs_and_out_reuse():
    gen = torch.Generator().manual_seed(4)
    b, k, v, d = 2, 6, 3000, 96
    out = VerifyOutput.empty(b, k, "cpu")
    workspace = None
    for _ in range(3):
        big = torch.randn(b, k + 4, v, generator=gen).to(torch.bfloat16)
        logits = big[:, 1 : k + 2]  # a window of a bigger buffer: strided batch and row
        hidden = torch.randn(b, k + 1, d, generator=gen)
        draft = torch.where(torch.rand(b, k, generator=gen) < 0.8, greedy_of(logits)[:, :k], 0)
        judge = {"judge_features": (hidden[:, :k], hidden[:, 1:]), "judge_weight": torch.randn(2 * d, generator=gen)}
        got = verify(logits, draft, **judge, out=out)
        assert got is out
        assert workspace is None or out.workspace is workspace  # no per-cycle allocation
        workspace = out.workspace
        assert (workspace.counter == 0).all()  # the last program re-arms the counter
        assert_same(got, verify_reference(logits, draft, **judge))
        sampled = {"temperature": 0.9, "draft_probs": torch.softmax(logits[:, :k].float(), -1),
                   "uniforms": torch.rand(b, k, generator=gen), "noise": torch.rand(b, k + 1, v, generator=gen) + 0.1}
        got = verify(logits, draft, **judge, **sampled, out=out)
        assert out.workspace is workspace and (workspace.counter == 0).all() and (workspace.race_counter == 0).all()
        assert_same(got, verify_reference(logits, draft, **judge, **sampled))


def test_seeded_kernel_is_deterministic_and_offset_moves_it():
    gen = torch.Generator().manual_seed(6)
    logits, draft, kw = sampling_case(gen, 32, 2, 40, "fp32")
    kw = {"temperature": kw["temperature"], "draft_probs": kw["draft_probs"]}
    a = verify(logits, draft, **kw, seed=123, offset=5)
    b = verify(logits, draft, **kw, seed=123, offset=torch.tensor(5))
    c = verify(logits, draft, **kw, seed=123, offset=6)
    assert_same(a, b)
    assert not (torch.equal(a.next_token, c.next_token) and torch.equal(a.target_ok, c.target_ok))
    ref = verify_reference(logits, draft, **kw, seed=123, offset=5)
    assert_same(ref, verify_reference(logits, draft, **kw, seed=123, offset=5))


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3), k=st.integers(1, 6), v=st.integers(1, 300), seed=st.integers(0, 2**16),
    sampling=st.booleans(), rule=st.sampled_from(["lossless", "judge", "topk"]),
    dtype=st.sampled_from(sorted(DTYPES)), topk=st.integers(1, 4), alpha=st.sampled_from([0.0, 0.2, 1.0]),
    protect=st.booleans(),
)
def test_property_kernel_equals_reference(b, k, v, seed, sampling, rule, dtype, topk, alpha, protect):
    gen = torch.Generator().manual_seed(seed)
    logits, draft, kw = sampling_case(gen, b, k, v, dtype)
    if not sampling:
        kw = {}
        draft = torch.where(torch.rand(b, k, generator=gen) < 0.7, greedy_of(logits)[:, :k], draft)
    if rule == "judge":
        kw |= make_judge(gen, b, k, (5,), torch.float32, 3 * torch.randn(b, k, generator=gen))
    elif rule == "topk":
        kw |= {"topk": topk, "topk_alpha": alpha}
    if protect:
        kw["protected_tokens"] = torch.rand(v, generator=gen) < 0.3
    both(logits, draft, **kw)


# ---- protected tokens: a lossy rule never overrules the target's choice to end the answer ------------


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("rule", ["judge", "topk"])
def test_protected_target_choice_is_never_overruled(rule, sampling):
    """Every draft token mismatches and the rule accepts every one; rows 1 and 3 have a protected argmax
    (row 3's a +inf tie, lowest index first), so the cycle accepts exactly row 0, whatever the temperature."""
    b, k, v, end = 2, 4, 300, 7
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(b, k + 1, v, generator=gen)
    logits[:, :, end + 1] = 4.0  # argmax of every row but the protected ones, a close second there
    logits[:, 1, end] = 4.2
    logits[:, 3, [end, end + 1]] = INF
    draft = torch.full((b, k), end + 2)
    logits[:, :k, end + 2] = 3.9  # rank 1 or 2: inside the top-k rule (alpha 0: any ratio)
    kw = {"topk": 3, "topk_alpha": 0.0} if rule == "topk" else make_judge(gen, b, k, (16,), torch.float32,
                                                                            torch.full((b, k), -6.0))
    if sampling:  # q = 1 on the draft token and u = 1: the target rejects every draft token
        q = torch.zeros(b, k, v)
        q[:, :, end + 2] = 1.0
        kw |= {"temperature": 0.8, "draft_probs": q, "uniforms": torch.ones(b, k),
               "noise": torch.empty(b, k + 1, v).exponential_(generator=gen)}
    protected = torch.zeros(v, dtype=torch.bool)
    protected[end] = True
    free = both(logits, draft, **kw)
    assert free.judge_ok.all() and (free.num_accepted == k).all()
    guarded = both(logits, draft, **kw, protected_tokens=protected)
    assert not guarded.target_ok.any()
    assert guarded.judge_ok.tolist() == [[True, False, True, False]] * b and (guarded.num_accepted == 1).all()
    torch.testing.assert_close(guarded.judge_prob, free.judge_prob)  # the rule's score is still reported
    lossless = both(logits, draft, **{n: x for n, x in kw.items() if n not in ("topk", "topk_alpha", "judge_features",
                                                                               "judge_weight", "judge_bias")},
                    protected_tokens=protected)
    assert (lossless.num_accepted == 0).all()  # nothing to protect without a rule


# ---- top-k rule: a drafted token within the target's top k and alpha of its top probability -------

INF, NAN = float("inf"), float("nan")
# Rows of the hand example, V = 5 (draft 5 and -1 are out of vocabulary), and what the definition gives:
# rank = #{logits > the drafted one}, ratio = exp(L_d - max L).
HAND_ROWS = [
    ([0, 3, 2, 2, 1], 2),  # rank 1 (the other 2 ties), ratio e^-1
    ([0, 3, 2, 2, 1], 4),  # rank 3, ratio e^-2
    ([NAN, 5, -INF, 5, 4], 0),  # NaN draft logit: never accepted
    ([NAN, 5, -INF, 5, 4], 2),  # -inf draft logit: never accepted
    ([INF, 1, INF, 0, 0], 2),  # tied with +inf max: rank 0, ratio 1
    ([INF, 1, INF, 0, 0], 1),  # under two +inf: rank 2, ratio 0
    ([-INF] * 5, 1),  # no finite logit: never accepted
    ([0, 1, 2, 3, 4], -1),
    ([0, 1, 2, 3, 4], 5),
]
HAND_PROB = [math.exp(-1), math.exp(-2), 0, 0, 1, 0, 0, 0, 0]


# numpy sees -inf - -inf in the sampling pass over the all -inf row
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("topk,alpha,accepted", [
    (1, 0.0, [0, 0, 0, 0, 1, 0, 0, 0, 0]),
    (2, 0.0, [1, 0, 0, 0, 1, 0, 0, 0, 0]),
    (3, 0.0, [1, 0, 0, 0, 1, 1, 0, 0, 0]),  # alpha 0: no probability condition, even at ratio 0
    (4, 0.0, [1, 1, 0, 0, 1, 1, 0, 0, 0]),
    (4, math.exp(-1), [1, 0, 0, 0, 1, 0, 0, 0, 0]),  # ratio exactly alpha is accepted
    (4, 0.37, [0, 0, 0, 0, 1, 0, 0, 0, 0]),
    (4, 1.0, [0, 0, 0, 0, 1, 0, 0, 0, 0]),
    (100, 0.1, [1, 1, 0, 0, 1, 0, 0, 0, 0]),  # topk beyond V
])
def test_topk_rule_hand_example(topk, alpha, accepted):
    k = len(HAND_ROWS)
    logits = torch.tensor([[row for row, _ in HAND_ROWS] + [[0.0] * 5]])
    draft = torch.tensor([[d for _, d in HAND_ROWS]])
    out = both(logits, draft, topk=topk, topk_alpha=alpha)
    assert out.judge_ok.tolist() == [[bool(a) for a in accepted]]
    torch.testing.assert_close(out.judge_prob, torch.tensor([HAND_PROB]))
    assert not out.target_ok[0, 0] and out.num_accepted.item() == accepted.index(0)
    # Sampling at another temperature: the rule still reads the raw logits.
    gen = torch.Generator().manual_seed(0)
    sampled = both(logits, draft, topk=topk, topk_alpha=alpha, temperature=0.5,
                   draft_probs=torch.full((1, k, 5), 0.2), uniforms=torch.rand(1, k, generator=gen),
                   noise=torch.empty(1, k + 1, 5).exponential_(generator=gen))
    assert torch.equal(sampled.judge_ok, out.judge_ok) and torch.equal(sampled.judge_prob, out.judge_prob)


def topk_case(gen, b, k, v, dtype, topk):
    """Drafts at every edge of the rule: rank exactly topk-1 or topk (tied with other tokens, top
    token at ratio exp(-0.5)), the argmax, random tokens, -1 and V, and NaN/-inf/+inf logits."""
    x = 2 * torch.randn(b, k + 1, v, generator=gen)
    draft = torch.randint(0, v, (b, k), generator=gen)
    kinds = torch.randint(0, 6, (b, k), generator=gen).tolist()
    for bi in range(b):
        for i in range(k):
            row, d, kind = x[bi, i], draft[bi, i].item(), kinds[bi][i]
            if kind < 2 and topk - 1 + kind < v:
                above = torch.randperm(v, generator=gen)
                above = above[above != d][: topk - 1 + kind]
                row.clamp_(max=3.0)
                row[d] = 3.0
                row[above] = 3.25
                row[above[:1]] = 3.5
            elif kind == 2:
                draft[bi, i] = row.argmax()
            elif kind == 3:
                draft[bi, i] = (-1, v)[i % 2]
            elif kind == 4:
                row[d] = (NAN, -INF, INF)[i % 3]
            else:  # +inf somewhere, maybe on the draft
                row[torch.randint(0, v, (2,), generator=gen)] = INF
    return x.to(DTYPES[dtype]), draft


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("b,k,v,dtype", [(1, 3, 32000, "bf16"), (2, 5, 1000, "fp16"), (3, 4, 517, "fp32")])
def test_topk_rule_matches_reference(b, k, v, dtype, sampling):
    gen = torch.Generator().manual_seed(v + k)
    kw = {}
    if sampling:
        kw = {"temperature": 0.7, "draft_probs": torch.softmax(torch.randn(b, k, v, generator=gen), -1),
              "uniforms": torch.rand(b, k, generator=gen), "noise": torch.empty(b, k + 1, v).exponential_(generator=gen)}
    verdicts = []
    for topk, alpha in [(1, 0.0), (2, math.exp(-0.5)), (3, 1.0), (5, 0.3)]:
        logits, draft = topk_case(gen, b, k, v, dtype, topk)
        verdicts.append(both(logits, draft, **kw, topk=topk, topk_alpha=alpha).judge_ok)
    verdicts = torch.cat(verdicts)
    assert verdicts.any() and not verdicts.all()




@pytest.mark.parametrize("k", [1, 2, 3])
def test_reference_sampling_is_lossless(k):
    tokens, _, _ = sample_first_tokens(verify_reference, k, 40_000, seed=11)
    assert chi_square(tokens, k) < CHI2_DF7_CRIT


@pytest.mark.parametrize("k", [1, 3])
def test_wrong_residual_fails_the_chi_square(k):
    """Drawing the correction from p instead of max(p - q, 0) over-weights the draft's tokens."""
    tokens, out, draft = sample_first_tokens(verify_reference, k, 40_000, seed=11)
    p0 = sampling_probs(stat_problem(k)[0][0, 0], STAT_T)
    redraw = torch.multinomial(p0, len(tokens), replacement=True, generator=torch.Generator().manual_seed(1))
    wrong = torch.where(out.num_accepted > 0, draft[:, 0], redraw)
    assert chi_square(wrong, k) > 10 * CHI2_DF7_CRIT


@pytest.mark.parametrize(
    "k,trials", [(1, 500), (3, 200), pytest.param(2, 5000, marks=pytest.mark.slow)])
def test_kernel_seeded_sampling_is_lossless(k, trials):
    """In-kernel Philox; few trials by default, as the interpreter pays ~20 ms per program."""
    tokens, _, _ = sample_first_tokens(verify, k, trials, seed=12)
    assert chi_square(tokens, k) < CHI2_DF7_CRIT


# ---- errors and backend selection -------------------------------------------------------------


@pytest.mark.parametrize("fn", [verify, verify_reference])
def test_bad_input_raises_clear_errors(fn):
    logits = torch.randn(2, 4, 10)
    draft = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="K\\+1=4"):
        fn(logits[:, :3], draft)
    with pytest.raises(ValueError, match="K >= 1"):
        fn(logits[:, :1], draft[:, :0])
    with pytest.raises(ValueError, match="draft_probs"):
        fn(logits, draft, temperature=0.5, seed=0)
    with pytest.raises(ValueError, match="needs randomness"):
        fn(logits, draft, temperature=0.5, draft_probs=torch.rand(2, 3, 10))
    with pytest.raises(ValueError, match="draft_probs has shape"):
        fn(logits, draft, temperature=0.5, draft_probs=torch.rand(2, 3, 11), seed=0)
    with pytest.raises(ValueError, match="judge_weight has shape"):
        fn(logits, draft, judge_features=torch.randn(2, 3, 5), judge_weight=torch.randn(6))
    with pytest.raises(ValueError, match="without judge_weight"):
        fn(logits, draft, judge_features=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="draft_tokens"):
        fn(logits, draft.float())
    with pytest.raises(ValueError, match="temperature"):
        fn(logits, draft, temperature=-1.0)
    with pytest.raises(ValueError, match="judge_features or topk, not both"):
        fn(logits, draft, judge_features=torch.randn(2, 3, 5), judge_weight=torch.randn(5), topk=2)
    for topk in (-1, 1.5, True):
        with pytest.raises(ValueError, match="topk must be an int >= 0"):
            fn(logits, draft, topk=topk)
    for alpha in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="topk_alpha must be in \\[0, 1\\]"):
            fn(logits, draft, topk=1, topk_alpha=alpha)
    with pytest.raises(ValueError, match="protected_tokens has shape"):
        fn(logits, draft, topk=1, protected_tokens=torch.zeros(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask over the vocabulary"):
        fn(logits, draft, topk=1, protected_tokens=torch.zeros(10, dtype=torch.long))


def test_resolve_kernels(monkeypatch):
    assert resolve_kernels("eager", "cpu") is verify_reference
    assert resolve_kernels("auto", "cpu") is verify  # the interpreter is on in tests
    assert resolve_kernels("triton", torch.device("cpu")) is verify
    with pytest.raises(AutojudgeError, match="unknown kernels"):
        resolve_kernels("cuda-graphs", "cpu")
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    monkeypatch.setattr(triton_verify, "interpreted", lambda: False)
    assert resolve_kernels("auto", "cpu") is verify_reference
    with pytest.raises(AutojudgeError, match="TRITON_INTERPRET=1.*--kernels eager"):
        resolve_kernels("triton", "cpu")
    with pytest.raises(AutojudgeError, match="TRITON_INTERPRET=1"):
        verify(torch.randn(1, 2, 5), torch.zeros(1, 1, dtype=torch.long))


# The interpreter accepts programs that the compiler rejects (loop-carried type changes,
# non-constexpr globals), so compile the real GPU kernel too: no GPU needed, only ptxas from the
# triton wheel. It runs in a subprocess because this process has TRITON_INTERPRET=1.
COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from autojudge.kernels.triton_verify import _residual_draw_kernel, _verify_kernel

pointers = {"logits_ptr": "*bf16", "draft_ptr": "*i64", "protect_ptr": "*i8", "f1_ptr": "*bf16", "f2_ptr": "*fp16",
            "offset_ptr": "*i64", "part_idx_ptr": "*i32", "counter_ptr": "*i32", "num_acc_ptr": "*i64",
            "next_tok_ptr": "*i64", "target_ok_ptr": "*i8", "judge_ok_ptr": "*i8", "part_cnt_ptr": "*i32"}
verify_flags = dict.fromkeys(("SAMPLING", "HAS_JUDGE", "HAS_F2", "TOPK", "PROTECT", "SEEDED", "OFFSET_FROM_PTR"),
                             False)
# Phase 2's tile from the largest (64 splits x 65 rows -> 64 x 128) down to a single element.
for fn, consts in (
    (_verify_kernel, {"S_PAD": 64, "R_PAD": 128, "BLOCK_D": 1024, **verify_flags, "HAS_JUDGE": True, "HAS_F2": True}),
    (_verify_kernel, {"S_PAD": 64, "R_PAD": 128, "BLOCK_D": 1024, **verify_flags, "SAMPLING": True,
                      "HAS_JUDGE": True, "PROTECT": True, "SEEDED": True, "OFFSET_FROM_PTR": True}),
    (_verify_kernel, {"S_PAD": 1, "R_PAD": 2, "BLOCK_D": 1024, **verify_flags, "SAMPLING": True, "TOPK": True}),
    (_verify_kernel, {"S_PAD": 8, "R_PAD": 8, "BLOCK_D": 1024, **verify_flags, "TOPK": True, "PROTECT": True}),
    (_verify_kernel, {"S_PAD": 4, "R_PAD": 16, "BLOCK_D": 1024, **verify_flags, "HAS_JUDGE": True, "PROTECT": True}),
    (_residual_draw_kernel, {"S_PAD": 64, "SEEDED": True, "OFFSET_FROM_PTR": True}),
    (_residual_draw_kernel, {"S_PAD": 1, "SEEDED": False, "OFFSET_FROM_PTR": False}),
):
    consts = {**consts, "BLOCK_V": 2048}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name in ("judge_bias", "threshold", "temperature", "log_alpha"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in ("seed", "offset_val") else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", int(sys.argv[1]), 32), options={"num_warps": 8})
    assert kernel.asm["cubin"]
"""


@pytest.mark.parametrize("arch", [90])
def test_kernel_compiles_for_gpu(arch):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch)], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
