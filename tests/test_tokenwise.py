"""The tokenwise schedule: every row equals its batch-1 speculative run, cycle statistics included (fp32, tiny
models), in every lossy mode, at EOS and at the cache end."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autojudge import Engine
from autojudge.engine.request import TopkRule
from autojudge.errors import AutojudgeError
from autojudge.judge.judge_file import Judge

MAX_SEQ = 160


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=MAX_SEQ,
                                  kernels="eager")


def prompts_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=gen).tolist() for n in lengths]


def assert_tokenwise_equals_batch1(engine, prompts, max_batch, **kw):
    got = engine.generate_batch(prompts, max_batch=max_batch, schedule="tokenwise", **kw)
    want = [engine.generate(p, **kw) for p in prompts]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, i
        assert g.stats.finish_reason == w.stats.finish_reason, i
        assert g.stats.histogram == w.stats.histogram, i
        assert (g.stats.cycles, g.stats.drafted_tokens, g.stats.judge_rescues) == \
            (w.stats.cycles, w.stats.drafted_tokens, w.stats.judge_rescues), i
    return got


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8), max_batch=st.integers(1, 8),
       window=st.integers(1, 16), budget=st.integers(1, 40), seed=st.integers(0, 100))
def test_speculative_rows_equal_batch1(engine, lengths, max_batch, window, budget, seed):
    assert_tokenwise_equals_batch1(engine, prompts_of(lengths, seed), max_batch, max_new_tokens=budget,
                                   mode="speculative", window=window, ignore_eos=True)


def random_judge(engine, setup, seed):
    dim = engine.target.config.hidden_size + (engine.draft.config.hidden_size if setup == "DD-DT" else 0)
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.3
    return Judge(weight=weight, bias=torch.tensor([0.0]), setup=setup, thresholds={}, meta={})


@pytest.mark.parametrize("mode,setup", [("autojudge", "DD-DT"), ("autojudge", "DT"), ("judge", "DT"), ("topk", None)])
def test_lossy_rows_equal_batch1_with_the_same_rescues(engine, mode, setup):
    judge = TopkRule(k=3) if mode == "topk" else random_judge(engine, setup, seed=5)
    threshold = 0.05 if mode == "topk" else 0.5
    prompts = prompts_of([6, 19, 3, 11, 25, 8], seed=6)
    for window, budget in ((4, 33), (7, 18), (16, 45)):
        got = assert_tokenwise_equals_batch1(engine, prompts, 3, max_new_tokens=budget, mode=mode, window=window,
                                             ignore_eos=True, judge=judge, threshold=threshold)
        assert sum(o.stats.judge_rescues for o in got) > 0


def test_eos_inside_a_cycle_and_the_cache_end(engine):
    prompts = prompts_of([4, 12, 7, 20, 3, 9, 15], seed=2) + prompts_of([MAX_SEQ - 12], seed=3)
    kw = dict(max_new_tokens=40, mode="autojudge", window=6, judge=random_judge(engine, "DD-DT", 7), threshold=0.5)
    free = engine.generate_batch(prompts, max_batch=3, ignore_eos=True, **kw)
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({free[1].token_ids[5]})  # rows stop at uneven lengths, mid-cycle
    try:
        got = assert_tokenwise_equals_batch1(engine, prompts, 3, **kw)
    finally:
        engine.eos_token_ids = saved
    assert {o.stats.finish_reason for o in got} >= {"eos", "cache_full"}


def test_target_mode_and_bad_requests(engine):
    prompts = prompts_of([5, 9], seed=8)
    kw = dict(max_new_tokens=12, mode="target", ignore_eos=True)
    got = engine.generate_batch(prompts, schedule="tokenwise", **kw)
    assert [o.token_ids for o in got] == [engine.generate(p, **kw).token_ids for p in prompts]
    with pytest.raises(AutojudgeError, match="tokenwise schedule replays greedy cycles; drop --temperature"):
        engine.generate_batch(prompts, schedule="tokenwise", temperature=0.7)
    with pytest.raises(AutojudgeError, match="unknown schedule 'steps'; choose one of cycles, tokenwise"):
        engine.generate_batch(prompts, schedule="steps")
