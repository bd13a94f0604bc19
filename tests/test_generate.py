"""Lossless decoding: target mode equals transformers' greedy generate; speculative equals target."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from autojudge import Engine
from autojudge.engine.engine import cpu_has_native_bf16 as real_cpu_has_native_bf16
from autojudge.errors import AutojudgeError


@pytest.fixture(scope="module")
def engine(tiny_pair):
    target, draft = tiny_pair
    return Engine.from_pretrained(target=str(target), draft=str(draft), max_seq_len=512, kernels="eager")


@pytest.fixture(scope="module")
def self_draft_engine(tiny_pair):
    target, _ = tiny_pair
    return Engine.from_pretrained(target=str(target), draft=str(target), max_seq_len=512, kernels="eager")


@pytest.fixture(scope="module")
def unrelated_engine(tiny_pair, tiny_unrelated_draft):
    return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_unrelated_draft), max_seq_len=512,
                                  kernels="eager")


@pytest.mark.parametrize("arch_fixture", ["tiny_qwen", "tiny_llama"])
def test_target_mode_equals_transformers_greedy(arch_fixture, request):
    path = request.getfixturevalue(arch_fixture)
    engine = Engine.from_pretrained(target=str(path), draft=None, max_seq_len=256, kernels="eager")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in (list(range(10, 30)), [5], "What is 2 + 3?"):
        ids = engine.encode_prompt(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
        out = engine.generate(ids, max_new_tokens=40, mode="target", ignore_eos=True)
        assert out.token_ids == ref[0, len(ids):].tolist()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 60), window=st.integers(1, 16),
       max_new=st.integers(1, 70))
def test_speculative_equals_target(engine, seed, prompt_len, window, max_new):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 259, (prompt_len,), generator=gen).tolist()
    want = engine.generate(prompt, max_new_tokens=max_new, mode="target", ignore_eos=True)
    got = engine.generate(prompt, max_new_tokens=max_new, mode="speculative", window=window, ignore_eos=True)
    assert got.token_ids == want.token_ids
    assert len(got.token_ids) == max_new


def test_noisy_draft_accepts_some_and_rejects_some(engine):
    out = engine.generate(list(range(20, 40)), max_new_tokens=120, mode="speculative", window=6, ignore_eos=True)
    assert 0 < out.stats.accepted_per_cycle < 6, out.stats.histogram
    assert sum(out.stats.histogram.values()) == out.stats.cycles


def test_draft_equal_to_target_accepts_everything(self_draft_engine):
    for window in (1, 4, 16):
        out = self_draft_engine.generate("hello", max_new_tokens=64, mode="speculative", window=window,
                                         ignore_eos=True)
        target = self_draft_engine.generate("hello", max_new_tokens=64, mode="target", ignore_eos=True)
        assert out.token_ids == target.token_ids
        full_cycles = out.stats.histogram.get(window, 0)
        assert full_cycles >= out.stats.cycles - 1, out.stats.histogram  # the last cycle may be cut short


@pytest.mark.parametrize("window, max_new", [(4, 64), (16, 64), (8, 9), (8, 5)])
def test_no_drafted_token_is_thrown_away_at_the_budget(self_draft_engine, window, max_new):
    out = self_draft_engine.generate("hello", max_new_tokens=max_new, mode="speculative", window=window,
                                     ignore_eos=True)
    assert len(out.token_ids) == max_new
    # A draft equal to the target keeps all it drafts: one token from the prefill, then each cycle's
    # drafts plus the bonus token, so every drafted token is used exactly when none is drafted in excess.
    assert out.stats.drafted_tokens == max_new - 1 - out.stats.cycles, out.stats.histogram


def test_unrelated_draft_rejects_almost_everything(unrelated_engine):
    prompt = list(range(40, 70))
    target = unrelated_engine.generate(prompt, max_new_tokens=60, mode="target", ignore_eos=True)
    out = unrelated_engine.generate(prompt, max_new_tokens=60, mode="speculative", window=8, ignore_eos=True)
    assert out.token_ids == target.token_ids
    assert out.stats.accepted_per_cycle < 0.5, out.stats.histogram


def test_eos_stops_unless_ignored(engine):
    prompt = list(range(30, 45))
    free = engine.generate(prompt, max_new_tokens=30, mode="target", ignore_eos=True)
    eos = free.token_ids[5]
    engine.eos_token_ids = frozenset({eos})
    try:
        for mode in ("target", "speculative"):
            out = engine.generate(prompt, max_new_tokens=30, mode=mode, window=4)
            first = free.token_ids.index(eos)
            assert out.token_ids == free.token_ids[: first + 1]
            assert out.stats.finish_reason == "eos"
    finally:
        engine.eos_token_ids = frozenset()


def test_stream_concatenates_to_text(engine):
    pieces = list(engine.stream("Tell me", max_new_tokens=25, mode="speculative", window=3, ignore_eos=True))
    out = engine.generate("Tell me", max_new_tokens=25, mode="speculative", window=3, ignore_eos=True)
    assert "".join(pieces) == out.text


def test_prompt_forms_and_stats(engine):
    text_ids = engine.encode_prompt("hi")
    chat_ids = engine.encode_prompt([{"role": "user", "content": "hi"}])
    assert text_ids == chat_ids and text_ids[-1] != 0
    out = engine.generate("hi", max_new_tokens=10, mode="speculative", window=4, ignore_eos=True)
    assert out.prompt_ids == text_ids
    assert out.stats.new_tokens == 10 and out.stats.tokens_per_second > 0
    assert out.stats.draft_s > 0 and out.stats.verify_s > 0


def test_generation_stops_at_full_cache(tiny_pair):
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=40,
                                    kernels="eager")
    prompt = list(range(1, 31))
    target = engine.generate(prompt, max_new_tokens=100, mode="target", ignore_eos=True)
    spec = engine.generate(prompt, max_new_tokens=100, mode="speculative", window=8, ignore_eos=True)
    assert spec.token_ids == target.token_ids
    assert target.stats.finish_reason == "cache_full" and len(prompt) + len(target.token_ids) == 40


def test_one_generation_at_a_time(engine):
    """A paused stream owns the caches: a generate() in between (this thread or another) would silently change
    what the stream says next, so it is refused until the stream ends or is closed."""
    kw = dict(max_new_tokens=24, mode="speculative", window=4, ignore_eos=True)
    want = engine.generate("hello", **kw).text
    stream = engine.stream("hello", **kw)
    pieces = [next(stream)]
    with pytest.raises(AutojudgeError, match="already generating"):
        engine.generate("other", **kw)
    caught = []

    def other_thread():
        try:
            engine.generate("other", **kw)
        except AutojudgeError as err:
            caught.append(str(err))

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert caught and "already generating" in caught[0]
    assert "".join(pieces + list(stream)) == want  # the paused stream continues undisturbed
    engine.generate("other", **kw)  # free again
    stream = engine.stream("hello", **kw)
    next(stream)
    stream.close()
    assert engine.generate("hello", **kw).text == want


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_a_fully_accepted_window_at_the_cache_end(tiny_pair, window):
    """A draft equal to the target accepts every window, so cycles run into the last cache slot."""
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[0]), max_seq_len=40,
                                    kernels="eager")
    for prompt_len in range(24, 33):
        prompt = list(range(1, 1 + prompt_len))
        target = engine.generate(prompt, max_new_tokens=100, mode="target", ignore_eos=True)
        spec = engine.generate(prompt, max_new_tokens=100, mode="speculative", window=window, ignore_eos=True)
        assert spec.token_ids == target.token_ids, prompt_len
        assert spec.stats.finish_reason == "cache_full" and prompt_len + len(spec.token_ids) == 40


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "--window"),
    (dict(window=65), "--window"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(mode="nope"), "unknown mode"),
    (dict(temperature=-1.0), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),
    (dict(temperature=float("inf")), "--temperature"),
])
def test_bad_arguments_raise_clear_errors(engine, kwargs, message):
    with pytest.raises(AutojudgeError, match=message):
        engine.generate("hi", **kwargs)


def test_bad_prompts_raise_clear_errors(engine):
    with pytest.raises(AutojudgeError, match="empty prompt"):
        engine.generate("   ")
    with pytest.raises(AutojudgeError, match="outside the vocabulary"):
        engine.generate([1, 10_000])
    with pytest.raises(AutojudgeError, match="does not fit the KV cache"):
        engine.generate(list(range(1, 200)) * 3)
    for messages in ([{"role": "wizard", "content": "hi"}], [{"role": "user", "content": ["hi"]}]):
        with pytest.raises(AutojudgeError, match="role must be one of system, user, assistant"):
            engine.generate(messages)


@pytest.fixture(scope="module")
def triton_engine(tiny_pair):
    return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=512,
                                  kernels="triton")


@pytest.mark.parametrize("window", [1, 5, 16])
def test_speculative_with_triton_kernel_equals_target(triton_engine, window):
    prompt = list(range(50, 77))
    want = triton_engine.generate(prompt, max_new_tokens=40, mode="target", ignore_eos=True)
    got = triton_engine.generate(prompt, max_new_tokens=40, mode="speculative", window=window, ignore_eos=True)
    assert got.token_ids == want.token_ids
    assert got.stats.cycles < 40


@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_speculative_sampling_is_seeded(tiny_pair, kernels):
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=256,
                                    kernels=kernels)
    kw = dict(max_new_tokens=30, mode="speculative", window=4, ignore_eos=True, temperature=1.0)
    a = engine.generate("Once upon", seed=3, **kw)
    b = engine.generate("Once upon", seed=3, **kw)
    c = engine.generate("Once upon", seed=4, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert len(a.token_ids) == 30 and a.stats.cycles >= 1


def test_shared_prefix_is_reused_and_exact(tiny_pair):
    """Re-decoding from a prefix of an earlier sequence (as mining does) reuses its cache and stays exact."""
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=256,
                                    kernels="eager")
    fresh = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=256,
                                   kernels="eager")
    prompt = list(range(60, 90))
    first = engine.generate(prompt, max_new_tokens=30, mode="speculative", window=4, ignore_eos=True)
    branch = prompt + first.token_ids[:12] + [7]
    assert engine.target.reusable_prefix(branch) == len(prompt) + 12
    engine.draft.teacher_forced(prompt + first.token_ids)  # an unrelated pass in between, as the miner makes
    for mode in ("speculative", "target"):
        got = engine.generate(branch, max_new_tokens=20, mode=mode, window=4, ignore_eos=True)
        fresh.target.cached_len = fresh.draft.cached_len = 0
        want = fresh.generate(branch, max_new_tokens=20, mode=mode, window=4, ignore_eos=True)
        assert got.token_ids == want.token_ids


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx2 avx512f avx512_vnni", False),  # AVX512 without bf16 dot products emulates them
    ("fpu sse2 avx2 avx512_bf16x", False),
])
def test_dtype_auto_picks_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, tiny_qwen, flags, native):
    from autojudge.engine import engine as engine_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert real_cpu_has_native_bf16(cpuinfo) is native  # imported before conftest pins it to False
    assert real_cpu_has_native_bf16(tmp_path / "missing") is False
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native)
    auto = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=32, dtype="auto")
    assert auto.target.precision == ("bfloat16" if native else "float32")
    exact = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=32)
    assert exact.target.precision == "float32"  # the API's default stays exact on CPU
