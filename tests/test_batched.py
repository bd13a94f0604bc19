"""Batched decoding with continuous batching, and the tokenwise schedule: every row equals its batch-1 run, cycle
statistics included (fp32, tiny models)."""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autojudge import Engine
from autojudge.commands import main
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


def batch1(engine, prompts, **kw):
    return [engine.generate(p, **kw) for p in prompts]


def assert_rows_equal(batched, singles):
    assert len(batched) == len(singles)
    for i, (got, want) in enumerate(zip(batched, singles)):
        assert got.token_ids == want.token_ids, i
        assert got.stats.finish_reason == want.stats.finish_reason, i
        assert got.stats.histogram == want.stats.histogram, i
        assert (got.stats.cycles, got.stats.drafted_tokens, got.stats.judge_rescues) == \
            (want.stats.cycles, want.stats.drafted_tokens, want.stats.judge_rescues), i


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8), max_batch=st.integers(1, 8),
       window=st.integers(1, 16), budget=st.integers(1, 40), seed=st.integers(0, 100),
       schedule=st.sampled_from(["cycles", "tokenwise"]))
def test_speculative_rows_equal_batch1(engine, lengths, max_batch, window, budget, seed, schedule):
    prompts = prompts_of(lengths, seed)
    kw = dict(max_new_tokens=budget, mode="speculative", window=window, ignore_eos=True)
    got = engine.generate_batch(prompts, max_batch=max_batch, schedule=schedule, **kw)
    assert_rows_equal(got, batch1(engine, prompts, **kw))


def test_on_output_hands_over_each_row_once(engine):
    """Each finished output reaches the callback once, before the batch ends (a caller can save it then)."""
    prompts = prompts_of([4, 9, 6, 3, 12], seed=5)
    handed = {}
    kw = dict(max_new_tokens=6, mode="speculative", window=3, ignore_eos=True)
    out = engine.generate_batch(prompts, max_batch=2, on_output=lambda i, o: handed.setdefault(i, []).append(o),
                                **kw)
    assert sorted(handed) == list(range(5)) and all(len(v) == 1 and v[0] is out[i] for i, v in handed.items())
    assert_rows_equal(out, batch1(engine, prompts, **kw))


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_target_rows_equal_batch1(engine, max_batch):
    prompts = prompts_of([5, 17, 2, 30, 9, 11], seed=1)
    kw = dict(max_new_tokens=25, mode="target", ignore_eos=True)
    out = engine.generate_batch(prompts, max_batch=max_batch, **kw)
    assert_rows_equal(out, batch1(engine, prompts, **kw))
    assert out.stats.slots == min(max_batch, 6) and out.stats.new_tokens == 6 * 25
    assert 0 < out.stats.occupancy <= 1 and out.stats.tokens_per_second > 0


def test_eos_mid_batch_and_refilled_slots(engine):
    prompts = prompts_of([4, 12, 7, 20, 3, 9, 15], seed=2)
    kw = dict(max_new_tokens=30, mode="speculative", window=4)
    free = batch1(engine, prompts, ignore_eos=True, **kw)
    eos = free[1].token_ids[5]  # a token some rows emit mid-answer: rows stop at uneven lengths
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({eos})
    try:
        want = batch1(engine, prompts, **kw)
        got = engine.generate_batch(prompts, max_batch=3, **kw)
    finally:
        engine.eos_token_ids = saved
    assert_rows_equal(got, want)
    assert {o.stats.finish_reason for o in got} == {"eos", "length"}


def test_cache_filling_up_on_one_row(engine):
    prompts = prompts_of([MAX_SEQ - 12, 6, 10], seed=3)
    for mode in ("target", "speculative"):
        kw = dict(max_new_tokens=40, mode=mode, window=8, ignore_eos=True)
        got = engine.generate_batch(prompts, max_batch=3, **kw)
        assert_rows_equal(got, batch1(engine, prompts, **kw))
        assert [o.stats.finish_reason for o in got] == ["cache_full", "length", "length"]


@pytest.mark.parametrize("mode,schedule,setup", [
    ("target", "cycles", None), ("speculative", "cycles", None), ("speculative", "tokenwise", None),
    ("autojudge", "cycles", "DD-DT"), ("autojudge", "tokenwise", "DD-DT"), ("topk", "tokenwise", None)])
def test_rows_left_busy_are_packed_down_and_still_equal_batch1(engine, mode, schedule, setup, monkeypatch):
    """Long prompts reach the cache end first, so answers end at very different steps: once no prompt waits, the
    busy rows move into the free rows below them and each forward serves only the busy rows, every row still its
    batch-1 run (tokens, cycles, rescues)."""
    prompts = prompts_of([MAX_SEQ - 8, 6, MAX_SEQ - 20, 12, 3, MAX_SEQ - 14, 9], seed=12)
    judge = TopkRule(k=3) if mode == "topk" else (random_judge(engine, setup, seed=5) if setup else None)
    kw = dict(max_new_tokens=60, mode=mode, window=6, ignore_eos=True)
    if judge is not None:
        kw.update(judge=judge, threshold=0.05 if mode == "topk" else 0.5)
    served = []
    forward_rows = type(engine.target).forward_rows

    def counting(decoder, tokens, *args, **kwargs):
        if decoder is engine.target:
            served.append(tokens.shape[0])
        return forward_rows(decoder, tokens, *args, **kwargs)

    monkeypatch.setattr(type(engine.target), "forward_rows", counting)
    got = engine.generate_batch(prompts, max_batch=4, schedule=schedule, **kw)
    monkeypatch.undo()
    assert_rows_equal(got, batch1(engine, prompts, **kw))
    assert {o.stats.finish_reason for o in got} == {"cache_full", "length"}
    # Prefills serve one row; without packing every decode forward would serve all 4.
    assert max(served) == 4 and any(1 < rows < 4 for rows in served)


def test_self_draft_fills_windows_to_the_cache_end(tiny_pair):
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[0]), max_seq_len=48,
                                    kernels="eager")
    prompts = prompts_of([30, 33, 36, 25], seed=4)
    kw = dict(max_new_tokens=100, mode="speculative", window=5, ignore_eos=True)
    got = engine.generate_batch(prompts, max_batch=4, **kw)
    assert_rows_equal(got, batch1(engine, prompts, **kw))
    assert all(o.stats.finish_reason == "cache_full" for o in got)


def random_judge(engine, setup, seed):
    dim = engine.target.config.hidden_size + (engine.draft.config.hidden_size if setup == "DD-DT" else 0)
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.3
    return Judge(weight=weight, bias=torch.tensor([0.0]), setup=setup, thresholds={}, meta={})


@pytest.mark.parametrize("setup", ["DT", "DD-DT"])
def test_judged_rows_equal_batch1(engine, setup):
    judge = random_judge(engine, setup, seed=5)
    prompts = prompts_of([6, 19, 3, 11, 25], seed=6)
    for window, budget in ((4, 33), (7, 18)):
        kw = dict(max_new_tokens=budget, mode="autojudge", window=window, ignore_eos=True, judge=judge,
                  threshold=0.5)
        got = engine.generate_batch(prompts, max_batch=3, **kw)
        want = batch1(engine, prompts, **kw)
        assert_rows_equal(got, want)
        assert [o.stats.judge_rescues for o in got] == [o.stats.judge_rescues for o in want]
        assert sum(o.stats.judge_rescues for o in got) > 0


def test_sampling_is_seeded_and_rows_are_independent(engine):
    prompts = prompts_of([8] * 6, seed=7)
    prompts[3] = prompts[0]
    kw = dict(max_new_tokens=20, mode="speculative", window=4, temperature=1.0, seed=11, ignore_eos=True)
    a = engine.generate_batch(prompts, max_batch=6, **kw)
    b = engine.generate_batch(prompts, max_batch=6, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids != a[3].token_ids  # the same prompt in two rows draws its own randomness


def test_answers_ending_at_their_first_token_hand_slots_on_without_recursion(engine):
    """Past Python's recursion limit: each prompt is prefilled, ends at once and frees its slot to the next."""
    prompts = prompts_of([2] * 1100, seed=10)
    out = engine.generate_batch(prompts, max_batch=2, max_new_tokens=1, mode="speculative")
    assert [o.token_ids for o in out[:5]] == [engine.generate(p, max_new_tokens=1).token_ids for p in prompts[:5]]
    assert len(out) == 1100 and all(len(o.token_ids) == 1 for o in out)


def test_bad_batches_are_refused_up_front(engine):
    good = prompts_of([5, 6], seed=8)
    with pytest.raises(AutojudgeError, match="non-empty list of prompts"):
        engine.generate_batch([])
    with pytest.raises(AutojudgeError, match="non-empty list of prompts"):
        engine.generate_batch("one prompt")
    with pytest.raises(AutojudgeError, match="max_batch must be at least 1"):
        engine.generate_batch(good, max_batch=0)
    with pytest.raises(AutojudgeError, match=r"prompt 1 of 3: prompt of \d+ tokens does not fit"):
        engine.generate_batch([good[0], list(range(3, 3 + MAX_SEQ)), good[1]])
    with pytest.raises(AutojudgeError, match="--window"):
        engine.generate_batch(good, window=0)
    # Nothing was half-done: the engine still decodes normally.
    assert engine.generate_batch(good, max_new_tokens=3)[1].token_ids == engine.generate(good[1], max_new_tokens=3).token_ids


def test_cli_prompts_file_gives_one_json_line_per_prompt_in_order(tiny_pair, tmp_path):
    prompts = prompts_of([4, 9, 2, 13, 6], seed=9)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p if i % 2 else {"prompt": p}) + "\n" for i, p in enumerate(prompts)))
    args = ["generate", "--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]), "--kernels", "eager",
            "--max-seq-len", "64", "--max-new-tokens", "12", "--ignore-eos", "--window", "4"]
    result = CliRunner().invoke(main, [*args, "--prompts-file", str(path), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=64,
                                    kernels="eager")
    want = [engine.generate(p, max_new_tokens=12, window=4, ignore_eos=True).token_ids for p in prompts]
    assert [r["token_ids"] for r in rows] == want
    path.write_text('[1, 2]\n{"prompt": [3\n')
    bad = CliRunner().invoke(main, [*args, "--prompts-file", str(path)])
    assert bad.exit_code == 1 and f"{path}:2: not valid JSON" in bad.output
    both = CliRunner().invoke(main, [*args, "hello", "--prompts-file", str(path)])
    assert both.exit_code == 1 and "not both" in both.output


def test_bench_batch_sizes_runs_on_tiny_models(tiny_pair):
    args = ["bench", "--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]), "--kernels", "eager",
            "--max-seq-len", "512", "--max-new-tokens", "4", "--no-hf"]
    result = CliRunner().invoke(main, [*args, "--batch-sizes", "1,3"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert len(rows) == 2 and cells[0][4] == "1.00"  # batch 1 is its own baseline
    # Decode tok/s leaves the prefills out: never below the figure that counts them.
    assert all(float(c[3]) >= float(c[2]) and float(c[6]) >= float(c[5]) for c in cells), cells
    bad = CliRunner().invoke(main, [*args, "--batch-sizes", "4,0"])
    assert bad.exit_code == 1 and "--batch-sizes" in bad.output


def test_batched_speculative_sampling_is_lossless(engine):
    """3000 rows of one prompt, temperature 0.3: the first token comes from the prefill, the second from a
    speculative cycle. Their joint distribution must be the target's, p(t1) p(t2 | t1) (chi-square, df 7, false
    alarm 1e-4), over the 7 likeliest pairs and the rest."""
    prompt, temperature, rows = [5, 17, 42, 99, 7], 0.3, 3000
    out = engine.generate_batch([prompt] * rows, max_batch=rows, max_new_tokens=2, mode="speculative", window=3,
                                temperature=temperature, seed=123, ignore_eos=True)
    p1 = torch.softmax(engine.target.teacher_forced(prompt)[0][-1].double() / temperature, -1)
    joint = {}
    for t1 in p1.topk(40).indices.tolist():
        p2 = torch.softmax(engine.target.teacher_forced(prompt + [t1])[0][-1].double() / temperature, -1)
        for t2, q in zip(p2.topk(40).indices.tolist(), p2.topk(40).values.tolist()):
            joint[t1, t2] = float(p1[t1]) * q
    top = sorted(joint, key=joint.get, reverse=True)[:7]
    expected = [joint[pair] * rows for pair in top]
    expected.append(rows - sum(expected))
    seen = [sum(tuple(o.token_ids) == pair for o in out) for pair in top]
    seen.append(rows - sum(seen))
    chi2 = sum((s - e) ** 2 / e for s, e in zip(seen, expected))
    assert min(expected) > 5 and chi2 < 29.88, (seen, expected)


def test_batched_decoding_refuses_flash_attention(tiny_pair):
    """flash-attn appends each row's keys/values consecutively, which ragged padded rows would break."""
    engine = Engine.from_pretrained(target=str(tiny_pair[0]), draft=None, max_seq_len=32)
    engine.target.model.attention = "flash"  # cannot be set up on a CPU; the refusal comes before any kernel
    with pytest.raises(AutojudgeError, match="need attention 'sdpa'"):
        engine.generate_batch([[5, 6], [7]], mode="target", max_new_tokens=3)


def test_answer_lengths_bench_runs_on_a_tiny_model(tiny_qwen, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "answer_lengths.py"
    out = tmp_path / "lengths.jsonl"
    result = subprocess.run([sys.executable, str(script), "--target", str(tiny_qwen), "--limit", "3",
                             "--max-new-tokens", "24", "--budgets", "8,16", "--batch-size", "2",
                             "--max-seq-len", "512", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem_id"] for r in rows] == ["gsm8k/train/0", "gsm8k/train/1", "gsm8k/train/2"]
    whole = sum(r["ended"] and r["tokens"] <= 16 for r in rows)
    assert f"| 16 | {whole / 3:.0%} |" in result.stdout and "| 90 |" in result.stdout


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(prefixes=[0, 7, 30, 59], news=[1, 1, 5, 40, 1], order_seed=3)
@example(prefixes=[3, 0, 12], news=[1, 1, 1, 1, 1], order_seed=1)  # one token a row: the padded path
@given(prefixes=st.lists(st.integers(0, 60), min_size=1, max_size=5), news=st.lists(st.integers(1, 40), min_size=5,
       max_size=5), order_seed=st.integers(0, 1000))
def test_packed_forward_equals_each_row_alone(engine, prefixes, news, order_seed):
    """A packed ragged batch (rows in any order, 1 to 40 new tokens after 0 to 60 cached ones) gives each row
    the hidden states of running it alone, and leaves its cache row as that run would."""
    decoder = engine.target
    decoder.ensure_rows(len(prefixes))
    sequences = prompts_of([p + n for p, n in zip(prefixes, news)], order_seed)
    order = torch.randperm(len(prefixes), generator=torch.Generator().manual_seed(order_seed)).tolist()

    def alone(b, begin, end):
        ids = torch.tensor(sequences[b][begin:end])[None]
        return decoder.forward_rows(ids, torch.arange(begin, end)[None], end, slice(b, b + 1), None)[1][0]

    def packed(spans):
        tokens = torch.tensor([t for b, begin, end in spans for t in sequences[b][begin:end]])
        return decoder.forward_packed(tokens, [(b, begin, end - begin) for b, begin, end in spans])

    want, cache = [], []
    for b, p in enumerate(prefixes):
        if p:
            alone(b, 0, p)
        want.append(alone(b, p, len(sequences[b])))
        cache.append(decoder.model.model.layers[-1].self_attn.kv_cache.k[b, :, : len(sequences[b])].clone())
    decoder.ensure_rows(len(prefixes))
    for layer in decoder.model.model.layers:  # what the packed run writes must not come from the runs above
        layer.self_attn.kv_cache.k.normal_()
        layer.self_attn.kv_cache.v.normal_()
    if any(prefixes):
        packed([(b, 0, prefixes[b]) for b in order if prefixes[b]])
    got = packed([(b, prefixes[b], len(sequences[b])) for b in order]).split([news[b] for b in order])
    for b, hidden in zip(order, got):
        torch.testing.assert_close(hidden, want[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder.model.model.layers[-1].self_attn.kv_cache.k[b, :, : len(sequences[b])],
                                   cache[b], rtol=1e-5, atol=1e-5)


def test_prompt_states_skip_prefills_and_change_nothing(engine, monkeypatch):
    """A prompt decoded again with the same `prompt_states` is copied into its cache rows, not prefilled: a
    target-mode run keeps the target's caches, the next speculative run adds the draft's, the third prefills none."""
    prompts = prompts_of([7, 15, 4, 22, 9], seed=12)
    prefills = []
    for dec in (engine.target, engine.draft):
        real = dec.forward_rows

        def counting(tokens, positions, *a, real=real, name=dec.name, **k):
            if int(positions[0, 0]) == 0:  # only a prefill starts at position 0
                prefills.append(name)
            return real(tokens, positions, *a, **k)

        monkeypatch.setattr(dec, "forward_rows", counting)
    states = {}
    target_kw = dict(max_new_tokens=9, mode="target", ignore_eos=True)
    spec_kw = dict(max_new_tokens=21, mode="speculative", window=5, ignore_eos=True)
    got_target = engine.generate_batch(prompts, max_batch=2, prompt_states=states, **target_kw)
    assert prefills == [engine.target.name] * 5 and len(states) == 5
    prefills.clear()
    got_spec = engine.generate_batch(prompts, max_batch=3, prompt_states=states, **spec_kw)
    assert prefills == [engine.draft.name] * 5
    prefills.clear()
    again = engine.generate_batch(prompts, max_batch=2, prompt_states=states, schedule="tokenwise", **spec_kw)
    assert prefills == []
    monkeypatch.undo()
    assert_rows_equal(got_target, batch1(engine, prompts, **target_kw))
    want = batch1(engine, prompts, **spec_kw)
    assert_rows_equal(got_spec, want)
    assert_rows_equal(again, want)


# ------------------------------------------------------------------ the tokenwise schedule (autojudge.engine.tokenwise)

def assert_tokenwise_equals_batch1(engine, prompts, max_batch, **kw):
    got = engine.generate_batch(prompts, max_batch=max_batch, schedule="tokenwise", **kw)
    assert_rows_equal(got, batch1(engine, prompts, **kw))
    return got


@pytest.mark.parametrize("mode,setup", [("autojudge", "DD-DT"), ("autojudge", "DT"), ("judge", "DT"), ("topk", None)])
def test_tokenwise_lossy_rows_equal_batch1_with_the_same_rescues(engine, mode, setup):
    judge = TopkRule(k=3) if mode == "topk" else random_judge(engine, setup, seed=5)
    threshold = 0.05 if mode == "topk" else 0.5
    prompts = prompts_of([6, 19, 3, 11, 25, 8], seed=6)
    for window, budget in ((4, 33), (7, 18), (16, 45)):
        got = assert_tokenwise_equals_batch1(engine, prompts, 3, max_new_tokens=budget, mode=mode, window=window,
                                             ignore_eos=True, judge=judge, threshold=threshold)
        assert sum(o.stats.judge_rescues for o in got) > 0


def test_tokenwise_eos_inside_a_cycle_and_the_cache_end(engine):
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


def test_tokenwise_target_mode_and_bad_requests(engine):
    prompts = prompts_of([5, 9], seed=8)
    kw = dict(max_new_tokens=12, mode="target", ignore_eos=True)
    got = engine.generate_batch(prompts, schedule="tokenwise", **kw)
    assert [o.token_ids for o in got] == [engine.generate(p, **kw).token_ids for p in prompts]
    with pytest.raises(AutojudgeError, match="tokenwise schedule replays greedy cycles; drop --temperature"):
        engine.generate_batch(prompts, schedule="tokenwise", temperature=0.7)
    with pytest.raises(AutojudgeError, match="unknown schedule 'steps'; choose one of cycles, tokenwise"):
        engine.generate_batch(prompts, schedule="steps")
