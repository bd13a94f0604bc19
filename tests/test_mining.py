import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from autojudge import Engine
from autojudge.commands.mine import mine, parse_shard, select_problems
from autojudge.errors import AutojudgeError
from autojudge.judge import features as features_module
from autojudge.judge.features import (
    StoredFeatures,
    feature_set,
    label_features,
    model_identity,
)
from autojudge.judge.labels import read_label_rows
from autojudge.mining.batched import mine_all
from autojudge.mining.miner import Cost, Miner, MiningOptions
from autojudge.mining.snapshots import CacheSnapshots
from autojudge.mining.store import LabelStore, read_rows
from autojudge.tasks.datasets import Problem

TESTS = Path(__file__).parent
MAX_SEQ_LEN = 256
# Random-weight models seldom stop, and parity reads any text, so the tests label answers the budget cuts.
MINING = MiningOptions(max_new_tokens=28, speculative=True, reuse_continuation=True, skip_truncated=False)


def parity(problem, text):
    """Synthetic checker for random-weight models: both outcomes are common and swaps flip it often enough."""
    return sum(map(ord, text[-3:])) % 2


def parity_logged(problem, text):
    """`parity`, logging each call to $MINING_TEST_CALLS, dying as kill -9 would at call $MINING_TEST_DIE_AT and
    sent SIGTERM at call $MINING_TEST_TERM_AT."""
    with open(os.environ["MINING_TEST_CALLS"], "a+") as log:
        log.write(problem.problem_id + "\n")
        log.seek(0)
        calls = len(log.readlines())
    if calls == int(os.environ.get("MINING_TEST_DIE_AT", 0)):
        os._exit(137)
    if calls == int(os.environ.get("MINING_TEST_TERM_AT", 0)):
        os.kill(os.getpid(), signal.SIGTERM)
    return parity(problem, text)


@pytest.fixture(scope="module")
def engine(tiny_pair):
    target, draft = tiny_pair
    return Engine.from_pretrained(target=str(target), draft=str(draft), max_seq_len=MAX_SEQ_LEN)


def _problems(n):
    return [Problem(f"p{i}", "gsm8k", f"Question {i}: what is {i} + {i}?", str(2 * i)) for i in range(n)]


def _mine(engine, options, n=4):
    miner = Miner(engine, parity, options)
    return [miner.mine(p, engine.encode_prompt(p.question)) for p in _problems(n)]


def _labels(results):
    return [label for r in results for label in r.labels]


def test_continuation_is_the_target_greedy_continuation(engine):
    miner = Miner(engine, parity, MiningOptions(max_new_tokens=40, reuse_continuation=True))
    for i in range(4):
        prefix = engine.encode_prompt(f"Question {i}: what is {i} + {i}?")
        expected = engine.generate(prefix, max_new_tokens=40, mode="target").token_ids
        wrong = [(t + 1) % 256 for t in expected]
        hints = {
            "none": [], "exact": expected, "wrong": wrong, "shifted": expected[3:],
            "rejoins": wrong[:5] + expected[5:], "too long": expected + expected,
        }
        for name, hint in hints.items():
            cost = Cost()
            assert miner.continuation(prefix, 40, hint, cost) == expected, name
        cost = Cost()
        miner.continuation(prefix, 40, expected, cost)
        # A right hint is checked 32 tokens first, then the rest (twice as many allowed); nothing is generated.
        assert cost.generated_tokens == 0 and cost.verify_passes == 2
        assert cost.reused_tokens == len(expected) - 1  # the first pass also yields the target's next token


def test_continuation_respects_budget_and_eos(engine):
    miner = Miner(engine, parity, MiningOptions())
    prefix = engine.encode_prompt("Question 1")
    assert len(miner.continuation(prefix, 5, [], Cost())) == 5
    assert miner.continuation(prefix, 0, [], Cost()) == []
    eos = next(iter(engine.eos_token_ids))
    assert miner.continuation(prefix + [eos], 10, [1, 2, 3], Cost()) == []


@pytest.fixture(scope="module")
def mined(engine):
    return _mine(engine, MINING)


def test_mining_is_deterministic_and_sees_both_labels(engine, mined):
    assert _labels(_mine(engine, MINING)) == _labels(mined)
    importance = [label["important"] for label in _labels(mined)]
    assert True in importance and False in importance


def test_labels_follow_the_greedy_algorithm(mined):
    for result in mined:
        record, labels = result.record, result.labels
        assert record["n_mismatches"] == len(labels)
        assert record["ref_answer"] == parity(None, record["answer_text"])
        assert [label["position"] for label in labels] == sorted({label["position"] for label in labels})
        # Each label's prefix extends the previous one by the token kept there: the draft's if the swap
        # kept the answer, else the target's.
        for before, after in zip(labels, labels[1:]):
            kept = before["target_token"] if before["important"] else before["draft_token"]
            assert after["prefix_ids"][: before["position"] + 1] == before["prefix_ids"] + [kept]
        for label in labels:
            assert label["target_token"] != label["draft_token"]
            assert label["important"] == (label["alt_answer"] != label["ref_answer"])


def test_each_label_is_the_first_mismatch_after_the_previous(engine, mined):
    """Checked against a full draft pass over each label's prefix, whatever pieces the search asked for."""
    common = min(engine.target.config.vocab_size, engine.draft.config.vocab_size)
    for result in mined:
        prompt = result.labels[0]["prompt_ids"] if result.labels else []
        left = 0
        for label in result.labels:
            ids = prompt + label["prefix_ids"] + [label["target_token"]]
            logits, _ = engine.draft.teacher_forced(ids)
            greedy = logits[:, :common].argmax(-1).tolist()  # greedy[t]: the draft's token for position t + 1
            answer_greedy = greedy[len(prompt) - 1 : len(ids) - 1]
            answer = ids[len(prompt):]
            p = label["position"]
            assert answer_greedy[left:p] == answer[left:p] and answer_greedy[p] == label["draft_token"]
            left = p + 1



def test_the_draft_predicts_in_pieces_up_to_the_next_mismatch(engine):
    # Continuations without speculation, so every draft position counted is one the search asked for.
    results = _mine(engine, replace(MINING, speculative=False, max_new_tokens=60), n=2)
    drafted = sum(r.cost.draft_positions for r in results)
    # Predicting to the end after each kept swap, as the search did before, needs at least this many.
    to_the_end = sum(len(r.record["answer_ids"]) + sum(len(r.record["answer_ids"]) - label["position"] - 1
                                                      for label in r.labels if not label["important"])
                     for r in results)
    # Random weights mismatch every ~5 tokens, so the pieces save less here than on real answers (5-6x there).
    assert drafted < 0.75 * to_the_end


@pytest.mark.parametrize("speculative, reuse", [(False, False), (True, False), (False, True)])
def test_speed_tricks_do_not_change_labels(engine, mined, speculative, reuse):
    results = _mine(engine, replace(MINING, speculative=speculative, reuse_continuation=reuse))
    assert _labels(results) == _labels(mined)
    assert (sum(r.cost.reused_tokens for r in results) > 0) == reuse


def _comparable_result(result):
    record = {k: v for k, v in result.record.items() if k not in ("wall_s", "cost")}
    return result.labels, record


@pytest.mark.parametrize("batch_size, reuse, budget", [(2, True, 28), (3, False, 28), (8, True, 40)])
def test_batched_mining_equals_batch_one(engine, batch_size, reuse, budget):
    """fp32: mining problems side by side (their calls in shared forwards, rows refilled as problems end) gives
    each problem exactly the labels and answer of mining it alone."""
    options = replace(MINING, reuse_continuation=reuse, max_new_tokens=budget)
    problems = _problems(6)
    alone = _mine(engine, options, n=6)
    together, labelled = {}, []
    miner = Miner(engine, parity, options,
                  on_checkpoint=lambda row: row["kind"] == "step" and labelled.append(len(together)))
    mine_all(miner, [(p, engine.encode_prompt(p.question)) for p in problems], batch_size,
             lambda problem, result: together.setdefault(problem.problem_id, []).append(result))
    assert sorted(together) == sorted(p.problem_id for p in problems)
    # The progress callback saw every label, the first one before any problem was written.
    assert len(labelled) == sum(len(r[0].labels) for r in together.values()) and labelled[0] == 0
    assert all(len(v) == 1 for v in together.values())
    assert sum(len(r.labels) for r in alone) > 6  # enough swaps for the comparison to mean something
    for problem, single in zip(problems, alone):
        assert _comparable_result(together[problem.problem_id][0]) == _comparable_result(single), problem.problem_id


class _CountingParity:
    def __init__(self):
        self.calls = 0

    def __call__(self, problem, text):
        self.calls += 1
        return parity(problem, text)


def _checkpoints(engine, options, problems):
    """Problem id -> (uninterrupted result, its checkpoint rows)."""
    rows = {}
    miner = Miner(engine, parity, options, on_checkpoint=lambda row: rows.setdefault(row["problem_id"], []).append(row))
    results = {p.problem_id: miner.mine(p, engine.encode_prompt(p.question)) for p in problems}
    return {pid: (results[pid], rows[pid]) for pid in results}


def test_a_search_resumed_from_any_checkpoint_equals_an_uninterrupted_one(engine):
    problems = _problems(3)
    checkpoints = _checkpoints(engine, MINING, problems)
    assert sum(len(full.labels) for full, _ in checkpoints.values()) >= 4  # enough cuts to mean something
    for pid, (full, rows) in checkpoints.items():
        assert rows[0]["kind"] == "answer" and [r["kind"] for r in rows[1:]] == ["step"] * len(full.labels)
        assert [r["label"] for r in rows[1:]] == full.labels
        problem = next(p for p in problems if p.problem_id == pid)
        for cut in range(1, len(rows) + 1):
            checker = _CountingParity()
            resumed = Miner(engine, checker, MINING).mine(problem, engine.encode_prompt(problem.question), rows[:cut])
            assert _comparable_result(resumed) == _comparable_result(full), (pid, cut)
            # Replayed, not recomputed: the answer and the labels before the cut were never checked again.
            assert checker.calls == len(full.labels) - (cut - 1)
            assert resumed.record["wall_s"] >= rows[cut - 1]["elapsed_s"]
            assert resumed.cost.target_forwards >= rows[cut - 1]["cost"]["target_forwards"]


def test_batched_mining_resumes_interrupted_searches(engine):
    options = replace(MINING, max_new_tokens=40)
    problems = _problems(5)
    checkpoints = _checkpoints(engine, options, problems)
    # Each problem cut at another point; the last one not started at all.
    resumed = {pid: rows[: 1 + i % len(rows)] for i, (pid, (_, rows)) in enumerate(checkpoints.items()) if i < 4}
    assert sum(len(rows) > 1 for rows in resumed.values()) >= 2  # some searches resume past their answer
    together = {}
    mine_all(Miner(engine, parity, options), [(p, engine.encode_prompt(p.question)) for p in problems], 3,
             lambda problem, result: together.__setitem__(problem.problem_id, result), resumed)
    assert sorted(together) == sorted(checkpoints)
    for pid, (full, _) in checkpoints.items():
        assert _comparable_result(together[pid]) == _comparable_result(full), pid


@pytest.mark.parametrize("batch_size", [1, 3])
def test_mined_features_are_the_label_features_and_change_no_label(engine, batch_size):
    """fp32: the hidden states a search asks for at each draft token are the judge's features of that label (as a
    fresh pass computes them for training), and asking for them changes no label."""
    options = replace(MINING, max_new_tokens=40)
    problems = _problems(4)
    saved, results = [], {}
    miner = Miner(engine, parity, replace(options, save_features=True),
                  on_features=lambda label, hidden: saved.append((label, hidden)))
    mine_all(miner, [(p, engine.encode_prompt(p.question)) for p in problems], batch_size,
             lambda problem, result: results.__setitem__(problem.problem_id, result))
    plain = _mine(engine, options)
    assert [_comparable_result(results[p.problem_id]) for p in problems] == [_comparable_result(r) for r in plain]
    labels = [label for label, _ in saved]
    key = lambda label: (label["problem_id"], label["position"])  # noqa: E731
    assert sorted(labels, key=key) == sorted(_labels(plain), key=key) and len(labels) >= 6
    mined = torch.stack([torch.cat([hidden["draft"], hidden["target"]]) for _, hidden in saved])
    torch.testing.assert_close(mined, label_features(engine, labels, "DD-DT"), rtol=1e-4, atol=1e-4)


def test_cache_row_state_round_trips_and_refuses_another_shape(engine):
    decoder = engine.target
    decoder.ensure_rows(2)
    ids = engine.encode_prompt("Question 7: what is 7 + 7?")
    n = len(ids)
    decoder.forward_packed(torch.tensor(ids), [(0, 0, n)])
    state = decoder.row_state(0, n)
    layers, kv_heads, head_dim = decoder.config.num_layers, decoder.config.num_kv_heads, decoder.config.head_dim
    assert state["k"].shape == state["v"].shape == (layers, kv_heads, n, head_dim)
    decoder.load_row_state(1, state)
    # Row 1 now continues the prompt from its loaded cache exactly as row 0 does from the one it computed.
    nxt = torch.tensor([5, 9])
    from_computed = decoder.forward_packed(nxt, [(0, n, 2)])
    from_loaded = decoder.forward_packed(nxt, [(1, n, 2)])
    assert torch.equal(from_computed, from_loaded)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.load_row_state(1, {"k": state["k"][:, :, :, :-1], "v": state["v"][:, :, :, :-1]})
    with pytest.raises(ValueError, match="does not fit"):
        decoder.load_row_state(1, {"k": state["k"].double(), "v": state["v"].double()})


def _interrupting(after_calls):
    calls = []

    def checker(problem, text):
        calls.append(problem.problem_id)
        if len(calls) == after_calls:
            raise KeyboardInterrupt  # what SIGTERM turns into (commands/mine.py)
        return parity(problem, text)
    return checker


def _counting_tokens(engine, monkeypatch):
    """Counts the tokens each model's packed forwards run."""
    counts = {"target": 0, "draft": 0}
    for model, decoder in (("target", engine.target), ("draft", engine.draft)):
        original = decoder.forward_packed

        def counted(tokens, rows, model=model, original=original):
            counts[model] += len(tokens)
            return original(tokens, rows)
        monkeypatch.setattr(decoder, "forward_packed", counted)
    return counts


def test_an_interrupted_batch_resumes_from_its_cache_snapshots(engine, tmp_path, monkeypatch):
    options = replace(MINING, max_new_tokens=40, save_features=True)
    problems = _problems(5)
    items = [(p, engine.encode_prompt(p.question)) for p in problems]
    reference = {pid: full for pid, (full, _) in _checkpoints(engine, options, problems).items()}
    snapshots = CacheSnapshots(tmp_path / "kv", "run-a")
    rows, finished = {}, {}

    def checkpoint(row):
        rows.setdefault(row["problem_id"], []).append(row)

    whole_counts = _counting_tokens(engine, monkeypatch)
    mine_all(Miner(engine, parity, options), items, 3, lambda problem, result: None)
    monkeypatch.undo()
    interrupted = Miner(engine, _interrupting(after_calls=7), options, on_checkpoint=checkpoint)
    interrupted_counts = _counting_tokens(engine, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        mine_all(interrupted, items, 3, lambda problem, result: finished.__setitem__(problem.problem_id, result),
                 snapshots=snapshots)
    monkeypatch.undo()
    in_flight = [pid for pid in rows if pid not in finished]
    assert len(in_flight) == 3 and len(list((tmp_path / "kv").glob("*.safetensors"))) == 3
    resumed = {pid: rows[pid] for pid in in_flight}
    todo = [item for item in items if item[0].problem_id not in finished]

    def resume(snapshots):
        counts = _counting_tokens(engine, monkeypatch)
        results = {}
        mine_all(Miner(engine, parity, options), todo, 3,
                 lambda problem, result: results.__setitem__(problem.problem_id, result), resumed, snapshots)
        monkeypatch.undo()
        return results, counts

    class CacheAlone(CacheSnapshots):
        """The same snapshots with their greedy tokens forgotten, as a snapshot written before they were kept."""

        def load(self, problem_id):
            rows = super().load(problem_id)
            return {model: replace(row, greedy=[None] * len(row.ids)) for model, row in rows.items()}

    # Another run's snapshots are ignored, and cost nothing but the prefill they would have saved.
    cold, cold_counts = resume(CacheSnapshots(tmp_path / "kv", "run-b"))
    assert len(list((tmp_path / "kv").glob("*.safetensors"))) == 3
    shutil.copytree(tmp_path / "kv", tmp_path / "kv-copy")  # a finished problem's snapshot is dropped
    cache_alone, cache_alone_counts = resume(CacheAlone(tmp_path / "kv-copy", "run-a"))
    warm, warm_counts = resume(snapshots)
    for results in (cold, cache_alone, warm):
        assert sorted(results) == sorted(pid for pid in reference if pid not in finished)
        for pid, result in results.items():
            assert _comparable_result(result) == _comparable_result(reference[pid]), pid
    assert cache_alone_counts["target"] < cold_counts["target"] and cache_alone_counts["draft"] < cold_counts["draft"]
    # The greedy tokens spare the regeneration of what the searches had asked before the interrupt: the target
    # runs what an uninterrupted batch runs, plus the judged token of each row in flight (its hidden state).
    assert warm_counts["target"] < cache_alone_counts["target"]
    assert interrupted_counts["target"] + warm_counts["target"] <= whole_counts["target"] + len(in_flight)
    assert not list((tmp_path / "kv").glob("*"))  # a finished problem's snapshot is dropped


def test_store_keeps_the_checkpoints_of_unfinished_problems(tmp_path):
    path = tmp_path / "labels.jsonl"
    inflight = Path(f"{path}.inflight")
    inflight.write_text('{"kind": "answer", "problem_id": "stale"}\n')  # left by an older run of the same name
    with LabelStore(path, META, resume=False) as store:
        assert store.resumed == {} and inflight.read_bytes() == b""
        for pid in ("a", "b", "c"):
            store.checkpoint({"kind": "answer", "problem_id": pid, "n": 0})
        store.checkpoint({"kind": "step", "problem_id": "b", "n": 1})
        _add(store, "a", 1)
        store.checkpoint({"kind": "step", "problem_id": "c", "n": 1})
        store.checkpoint({"kind": "answer", "problem_id": "b", "n": 0})  # b started over
    with open(inflight, "ab") as f:  # killed while writing a row
        f.write(b'{"kind": "step", "problem_id": "c", "n"')
    with LabelStore(path, META, resume=True) as store:
        assert store.done == {"a"}
        assert store.resumed == {"b": [{"kind": "answer", "problem_id": "b", "n": 0}],
                                 "c": [{"kind": "answer", "problem_id": "c", "n": 0},
                                       {"kind": "step", "problem_id": "c", "n": 1}]}
        store.checkpoint({"kind": "step", "problem_id": "c", "n": 2})
    # Compacted to the unfinished problems when resumed, then appended to.
    assert [(r["problem_id"], r["n"]) for r in read_rows(inflight)] == [("b", 0), ("c", 0), ("c", 1), ("c", 2)]


def test_an_answer_cut_by_the_budget_gets_no_labels(engine, mined):
    results = _mine(engine, replace(MINING, skip_truncated=True))
    for result, labelled in zip(results, mined):
        assert labelled.record["truncated"] and labelled.labels
        assert result.record["truncated"] and result.labels == [] and result.record["n_mismatches"] == 0
        assert result.record["answer_ids"] == labelled.record["answer_ids"]
        # Nothing beyond the answer itself was paid for: no draft pass over it, no continuation.
        assert result.cost.generated_tokens == MINING.max_new_tokens and result.cost.verify_passes == 0


def test_an_answer_that_ends_is_labelled_whatever_the_truncation_policy(engine, monkeypatch):
    def late_end(problem):
        """(prompt, answer, index of the last token the answer shows for the first time)."""
        prompt = engine.encode_prompt(problem.question)
        answer = engine.generate(prompt, max_new_tokens=MINING.max_new_tokens, mode="target").token_ids
        return prompt, answer, max(i for i in range(len(answer)) if answer[i] not in answer[:i])

    problem, (prompt, answer, end) = max(((p, late_end(p)) for p in _problems(4)), key=lambda pe: pe[1][2])
    monkeypatch.setattr(engine, "eos_token_ids", frozenset({answer[end]}))
    skip, keep = (Miner(engine, parity, replace(MINING, skip_truncated=policy)).mine(problem, prompt)
                  for policy in (True, False))
    assert skip.record["answer_ids"] == answer[: end + 1] and not skip.record["truncated"]
    assert skip.labels, "no mismatch before the chosen end: the test needs another problem"
    assert skip.labels == keep.labels


# ---------------------------------------------------------------------------- store


META = {"target": "t", "target_fingerprint": "a", "draft": "d", "draft_fingerprint": "b", "dataset": "x",
        "split": "train", "max_new_tokens": 8, "prompt_template": None, "checker": "gsm8k"}


def _add(store, pid, n_labels):
    store.add_problem([{"kind": "label", "problem_id": pid, "i": i} for i in range(n_labels)],
                      {"kind": "problem", "problem_id": pid})


def test_store_resume_drops_an_unfinished_problem(tmp_path):
    path = tmp_path / "labels.jsonl"
    with LabelStore(path, META, resume=False) as store:
        _add(store, "a", 2)
        _add(store, "b", 0)
    complete = path.read_bytes()
    with open(path, "ab") as f:  # a crash mid-problem: label rows without their problem row, then half a row
        f.write(b'{"kind": "label", "problem_id": "c", "i": 0}\n{"kind": "label", "probl')
    with LabelStore(path, META, resume=True) as store:
        assert store.done == {"a", "b"}
        assert path.read_bytes() == complete
        _add(store, "c", 1)
    assert [r["problem_id"] for r in read_rows(path, "problem")] == ["a", "b", "c"]
    assert len(read_rows(path, "label")) == 3


def test_a_second_miner_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "labels.jsonl"
    code = ("import sys; from autojudge.mining.store import LabelStore\n"
            f"LabelStore({str(path)!r}, {META!r}, resume=True)")
    with LabelStore(path, META, resume=False) as store:
        _add(store, "a", 1)
        # Another process, as a second `autojudge mine --resume` would be.
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "being written by another `autojudge mine`" in other.stderr
        _add(store, "b", 1)
    with LabelStore(path, META, resume=True) as store:  # free again once the first one ends
        assert store.done == {"a", "b"}
    assert [r["problem_id"] for r in read_rows(path, "problem")] == ["a", "b"]


def test_store_refuses_to_overwrite_or_mix_runs(tmp_path):
    path = tmp_path / "labels.jsonl"
    LabelStore(path, META, resume=False).close()
    with pytest.raises(AutojudgeError, match="--resume"):
        LabelStore(path, META, resume=False)
    with pytest.raises(AutojudgeError, match="max_new_tokens differ"):
        LabelStore(path, {**META, "max_new_tokens": 9}, resume=True)
    # META predates the truncation policy: such files were mined labelling cut answers.
    LabelStore(path, {**META, "skip_truncated": False}, resume=True).close()
    with pytest.raises(AutojudgeError, match="skip_truncated differ"):
        LabelStore(path, {**META, "skip_truncated": True}, resume=True)
    other = tmp_path / "other.jsonl"
    other.write_text("hello\n")
    with pytest.raises(AutojudgeError, match="not a mining file"):
        LabelStore(other, META, resume=True)


def test_shards_partition_problems():
    problems = _problems(10)
    shards = [select_problems(problems[:7], parse_shard(f"{i}/3")) for i in range(3)]
    ids = [p.problem_id for shard in shards for p in shard]
    assert sorted(ids) == sorted(p.problem_id for p in problems[:7])
    assert [p.problem_id for p in shards[1]] == ["p1", "p4"]
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(AutojudgeError, match="--shard"):
            parse_shard(bad)


# ---------------------------------------------------------------------------- command line


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "tiny.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _args(tiny_pair, dataset, out, *extra):
    target, draft = tiny_pair
    return ["--target", str(target), "--draft", str(draft), "--max-seq-len", str(MAX_SEQ_LEN),
            "--dataset", str(dataset), "--out", str(out), "--max-new-tokens", "24",
            "--reuse-continuation", "--label-truncated", "--checker", "test_mining:parity", *extra]


def _comparable(path):
    """The rows without timings, which differ run to run."""
    rows = read_rows(path)
    for row in rows:
        row.pop("wall_s", None)
        for key in [k for k in row.get("cost", {}) if k.endswith("_s")]:
            del row["cost"][key]
    return rows


def _by_problem(path):
    """meta row, then problem id -> its rows in file order: a problem's rows stay together, problems may not."""
    meta, *rows = _comparable(path)
    grouped = {}
    for row in rows:
        grouped.setdefault(row["problem_id"], []).append(row)
    return meta, grouped


def _cli(args, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    result = CliRunner().invoke(mine, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_cli_shards_cover_a_full_run(tiny_pair, dataset, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    _cli(_args(tiny_pair, dataset, full, "--limit", "5"), monkeypatch)
    shards = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(shards):
        _cli(_args(tiny_pair, dataset, out, "--limit", "5", "--shard", f"{i}/2"), monkeypatch)
    by_problem = {}
    for out in shards:
        for row in _comparable(out)[1:]:
            by_problem.setdefault(row["problem_id"], []).append(row)
    assert sorted(by_problem) == [f"tiny/{i}" for i in range(5)]
    assert [r["problem_id"] for r in read_rows(shards[1], "problem")] == ["tiny/1", "tiny/3"]
    full_rows = _comparable(full)[1:]
    assert [row for pid in sorted(by_problem) for row in by_problem[pid]] == full_rows
    # --offset continues the numbering in another file: its problems' rows are the full run's.
    tail = tmp_path / "tail.jsonl"
    _cli(_args(tiny_pair, dataset, tail, "--offset", "2", "--limit", "3"), monkeypatch)
    assert _comparable(tail)[1:] == [row for row in full_rows if row["problem_id"] in ("tiny/2", "tiny/3", "tiny/4")]


def test_cli_errors(tiny_pair, dataset, tmp_path):
    out = tmp_path / "labels.jsonl"
    out.write_text("x\n")
    result = CliRunner().invoke(mine, _args(tiny_pair, dataset, out))
    assert isinstance(result.exception, AutojudgeError) and "--resume" in str(result.exception)
    result = CliRunner().invoke(mine, _args(tiny_pair, tmp_path / "missing.jsonl", tmp_path / "o.jsonl"))
    assert isinstance(result.exception, AutojudgeError) and "file not found" in str(result.exception)
    result = CliRunner().invoke(mine, _args(tiny_pair, dataset, tmp_path / "o.jsonl", "--max-new-tokens", "250"))
    assert isinstance(result.exception, AutojudgeError) and "raise --max-seq-len" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()
    result = CliRunner().invoke(mine, _args(tiny_pair, dataset, tmp_path / "o.jsonl", "--offset", "16"))
    assert isinstance(result.exception, AutojudgeError) and "--offset 16 skips all 16 problems" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_resume_refuses_another_precision(tiny_pair, dataset, tmp_path):
    out = tmp_path / "labels.jsonl"
    first = CliRunner().invoke(mine, _args(tiny_pair, dataset, out, "--limit", "1", "--dtype", "fp32"))
    assert first.exit_code == 0, first.output
    assert read_rows(out, "meta")[0]["dtype"] == "float32"
    result = CliRunner().invoke(mine, _args(tiny_pair, dataset, out, "--limit", "2", "--dtype", "bf16", "--resume"))
    assert isinstance(result.exception, AutojudgeError) and "dtype differ" in str(result.exception)
    assert len(read_rows(out, "problem")) == 1


def _spawn(args, **env_extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "AUTOJUDGE_QUIET": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-c", "from autojudge.commands import main; main()", "mine", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _problem_rows(path):
    if not path.exists():
        return 0
    return path.read_bytes().count(b'"kind": "problem"')


@pytest.mark.parametrize("batch", [[], ["--batch-size", "4"]], ids=["batch1", "batch4"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_pair, dataset, tmp_path, batch):
    reference, interrupted = tmp_path / "reference.jsonl", tmp_path / "interrupted.jsonl"
    full = _spawn(_args(tiny_pair, dataset, reference, *batch))
    victim = _spawn(_args(tiny_pair, dataset, interrupted, *batch))
    deadline = time.monotonic() + 120
    while _problem_rows(interrupted) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 3 <= _problem_rows(interrupted) < 16, "the run finished before the kill; the test needs more problems"
    with open(interrupted, "ab") as f:  # as if the kill had landed in the middle of a problem's rows
        f.write(b'{"kind": "label", "problem_id": "tiny/15", "position": 0}\n{"kind": "lab')
    resumed = _spawn(_args(tiny_pair, dataset, interrupted, "--resume", *batch))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    assert full.wait(timeout=300) == 0, full.stdout.read().decode()
    # Problems finish in another order when a batch resumes with other problems in flight; each is the same.
    assert _by_problem(interrupted) == _by_problem(reference)
    assert _problem_rows(reference) == 16


def test_a_run_killed_mid_problem_goes_on_from_its_last_label(tiny_pair, dataset, tmp_path):
    """Killed right after a check, a run resumed loses only that check: every answer and label before it comes
    from `<out>.inflight`, so the two runs together check exactly one text more than an uninterrupted one.
    Batched (batch 1 resumes through the same checkpoints: test_a_search_resumed_from_any_checkpoint...)."""
    batch = ["--batch-size", "3"]
    def run(out, calls, *extra, **env):
        args = [a if a != "test_mining:parity" else "test_mining:parity_logged"
                for a in _args(tiny_pair, dataset, out, *batch, *extra)]
        process = _spawn(args, MINING_TEST_CALLS=str(calls), **env)
        code = process.wait(timeout=300)
        return code, process.stdout.read().decode(), calls.read_text().split() if calls.exists() else []

    reference, interrupted = tmp_path / "reference.jsonl", tmp_path / "interrupted.jsonl"
    code, output, reference_calls = run(reference, tmp_path / "reference.calls")
    assert code == 0, output
    # Die at a problem's third check (its answer, then two labels): its answer and first label are checkpointed.
    die_at = next(i for i in range(len(reference_calls)) if reference_calls[: i + 1].count(reference_calls[i]) == 3)
    code, _, killed_calls = run(interrupted, tmp_path / "killed.calls", MINING_TEST_DIE_AT=str(die_at + 1))
    assert code == 137 and killed_calls == reference_calls[: die_at + 1]
    unfinished = reference_calls[die_at]
    assert unfinished not in {r["problem_id"] for r in read_rows(interrupted, "problem")}
    inflight = read_rows(Path(f"{interrupted}.inflight"))
    assert [r["kind"] for r in inflight if r["problem_id"] == unfinished] == ["answer", "step"]
    # Its checkpointed label is final, so training may read it before the run ends (`train --unfinished`).
    finished = read_label_rows(interrupted)
    with_unfinished = read_label_rows(interrupted, unfinished=True)
    assert with_unfinished[: len(finished)] == finished and len(with_unfinished) == len(finished) + 1
    assert with_unfinished[-1]["problem_id"] == unfinished and with_unfinished[-1] in read_label_rows(reference)
    code, output, resumed_calls = run(interrupted, tmp_path / "resumed.calls", "--resume")
    assert code == 0, output
    assert _by_problem(interrupted) == _by_problem(reference)
    assert len(killed_calls) + len(resumed_calls) == len(reference_calls) + 1


def test_sigterm_saves_cache_snapshots_and_resume_equals_an_uninterrupted_run(tiny_pair, dataset, tmp_path):
    batch = ["--batch-size", "3", "--limit", "8"]

    def run(out, *extra, **env):
        args = [a if a != "test_mining:parity" else "test_mining:parity_logged"
                for a in _args(tiny_pair, dataset, out, *batch, *extra)]
        process = _spawn(args, MINING_TEST_CALLS=str(out) + ".calls", **env)
        return process.wait(timeout=300), process.stdout.read().decode()

    reference, interrupted, kv = tmp_path / "reference.jsonl", tmp_path / "interrupted.jsonl", tmp_path / "kv"
    assert run(reference)[0] == 0
    checks = Path(f"{reference}.calls").read_text().split()
    code, output = run(interrupted, "--snapshot-dir", str(kv), MINING_TEST_TERM_AT=str(len(checks) // 2))
    assert code == 130 and f"saved in {kv}" in output and "Traceback" not in output, output
    assert 0 < len(read_rows(interrupted, "problem")) < len(read_rows(reference, "problem"))
    assert len(list(kv.glob("*.safetensors"))) == 3  # one a row: every row had a problem in flight
    code, output = run(interrupted, "--snapshot-dir", str(kv), "--resume")
    assert code == 0, output
    assert _by_problem(interrupted) == _by_problem(reference)
    assert not list(kv.iterdir())


def test_train_reads_the_features_mining_saved(tiny_pair, dataset, tmp_path, monkeypatch):
    out = tmp_path / "labels.jsonl"
    _cli(_args(tiny_pair, dataset, out, "--limit", "8", "--batch-size", "4", "--max-new-tokens", "40", "--dtype", "fp32"),
         monkeypatch)
    rows = read_label_rows(out)
    directory = StoredFeatures.for_labels(out)
    assert len(list(directory.glob("*.safetensors"))) == len({json.dumps(features_module._label_sequence(r))
                                                             for r in rows}) >= 2
    target, draft = tiny_pair
    eng = Engine.from_pretrained(target=str(target), draft=str(draft), max_seq_len=MAX_SEQ_LEN, dtype="fp32")
    fresh = label_features(eng, rows, "DD-DT")
    passes = []
    original = features_module._hidden
    monkeypatch.setattr(features_module, "_hidden", lambda dec, ids: passes.append(ids) or original(dec, ids))

    fs, _, reused = feature_set(eng, labels=out, cache=tmp_path / "all-stored.safetensors")
    assert not reused and passes == []  # no model ran
    torch.testing.assert_close(fs.features, fresh, rtol=2e-3, atol=2e-3)  # fp16 on disk
    dt, _, _ = feature_set(eng, labels=out, setup="DT", cache=tmp_path / "dt.safetensors")
    assert passes == [] and torch.equal(dt.features, fs.features[:, -eng.target.config.hidden_size:])

    # A label without its file is computed (both models, one pass each); the others still come from disk.
    next(directory.glob("*.safetensors")).unlink()
    fs, _, _ = feature_set(eng, labels=out, cache=tmp_path / "one-missing.safetensors")
    assert len(passes) == 2
    torch.testing.assert_close(fs.features, fresh, rtol=2e-3, atol=2e-3)
    # Features of other models or another precision are never read.
    other = StoredFeatures(directory, {**model_identity(eng), "target": {"dtype": "bfloat16"}})
    assert all(other.load(row, "DD-DT") is None for row in rows)


def test_snapshot_dir_needs_a_batch(tiny_pair, dataset, tmp_path):
    result = CliRunner().invoke(mine, _args(tiny_pair, dataset, tmp_path / "o.jsonl", "--snapshot-dir", "kv"))
    assert isinstance(result.exception, AutojudgeError) and "--batch-size 2" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_resume_refuses_weights_changed_under_the_same_path(tiny_pair, dataset, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path / "cache"))
    target, draft = (shutil.copytree(model, tmp_path / name) for model, name in zip(tiny_pair, ("target", "draft")))
    out = tmp_path / "labels.jsonl"
    _cli(_args((target, draft), dataset, out, "--limit", "1"), monkeypatch)
    meta = read_rows(out, "meta")[0]
    assert meta["target_weights"] != meta["draft_weights"] and len(meta["draft_weights"]) == 64
    _cli(_args((target, draft), dataset, out, "--limit", "2", "--resume"), monkeypatch)  # same weights: resumes
    assert len(read_rows(out, "problem")) == 2
    weights = draft / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = state["model.norm.weight"] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    result = CliRunner().invoke(mine, _args((target, draft), dataset, out, "--limit", "3", "--resume"))
    assert isinstance(result.exception, AutojudgeError), result.output
    assert "draft_weights differ from the run that wrote it" in str(result.exception)
    assert len(read_rows(out, "problem")) == 2


def test_mismatch_pairs_report_counts_pairs_and_token_kinds(tmp_path, tiny_qwen):
    """bench/mismatch_pairs.py on a hand-made labels file: pair counts and the important share per token kind."""
    from autojudge.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(tiny_qwen))
    digit, word = tok.encode("7")[0], tok.encode("a")[0]
    rows = [{"kind": "meta"}]
    for i, (target, draft, important) in enumerate([(digit, word, True), (digit, word, True), (word, digit, False),
                                                     (word, digit, True), (word, digit, False)]):
        rows.append({"kind": "label", "problem_id": f"p{i % 2}", "target_token": target, "draft_token": draft,
                     "important": important})
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).parents[1] / "bench" / "mismatch_pairs.py"
    out = subprocess.run([sys.executable, str(script), str(labels), "--target", str(tiny_qwen)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5 mismatches from 2 problems, 3 important (60%)" in out.stdout
    assert '| "7" -> "a" | 2 |' in out.stdout and '| "a" -> "7" | 2 |' in out.stdout
    assert "| number | 2 | 100% |" in out.stdout and "| word | 3 | 33% |" in out.stdout


def test_mining_summary_counts_finished_and_checkpointed_problems(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mining_summary", Path(__file__).parents[1] / "bench" / "mining_summary.py")
    summary_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary_module)
    path = tmp_path / "labels.jsonl"
    cost = {"generated_tokens": 30, "reused_tokens": 10}
    with LabelStore(path, META, resume=False) as store:
        for pid, importance in (("a", [True, False, False]), ("b", [False])):
            store.checkpoint({"kind": "answer", "problem_id": pid})
            labels = [{"kind": "label", "problem_id": pid, "important": i} for i in importance]
            store.add_problem(labels, {"kind": "problem", "problem_id": pid, "correct": pid == "a", "answer_ids": [1] * 8,
                                       "n_mismatches": len(labels), "n_important": sum(importance), "cost": cost,
                                       "wall_s": 7200.0, "batch_size": 4})
        store.checkpoint({"kind": "answer", "problem_id": "c"})
        for important in (True, True, False):
            store.checkpoint({"kind": "step", "problem_id": "c", "label": {"important": important}})
    problems = summary_module.per_problem(read_rows(path))
    assert problems[0] == ["a", True, 8, 3, 1, 30, 10, 2.0, 4]
    table = dict(summary_module.summary(problems, summary_module.inflight(path)))
    assert table["finished problems (with labels)"] == "2 (2)"
    assert table["labels, important"] == "4, 1 (25.0%)"
    assert table["generated / reused tokens per label"] == "15 / 5"
    assert table["unfinished, checkpointed: problems, labels (important)"] == "1, 3 (2)"
