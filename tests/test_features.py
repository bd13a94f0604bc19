import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from autojudge import Engine
from autojudge.commands import main
from autojudge.errors import AutojudgeError
from autojudge.judge.features import _shared_passes, feature_set, good_tokens, label_features, load_features
from autojudge.judge.judge_file import load_judge
from autojudge.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A draft narrower than the target, so DD-DT block order and sizes are visible."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "d", arch="qwen2", seed=3, hidden_size=32)


@pytest.fixture(scope="module")
def eng(tiny_qwen, small_draft):
    return Engine.from_pretrained(target=str(tiny_qwen), draft=str(small_draft), max_seq_len=256)


def label_rows(n_problems=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(n_problems):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(0, 256, (20,), generator=g).tolist()
        rows.append({"kind": "problem", "problem_id": f"p{p}", "correct": True})
        for pos in (2, 5, 9, 14):
            draft = response[pos]
            rows.append({"problem_id": f"p{p}", "prompt_ids": prompt, "prefix_ids": response[:pos],
                         "target_token": (draft + 1) % 256, "draft_token": draft,
                         "important": bool((draft + pos + p) % 3 == 0)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_features_are_hidden_states_at_the_draft_token(eng):
    rows = [r for r in label_rows(3) if "prompt_ids" in r]
    dd = label_features(eng, rows, "DD-DT")
    dt = label_features(eng, rows, "DT")
    assert dd.shape == (len(rows), 32 + 64) and dt.shape == (len(rows), 64) and dd.dtype == torch.float32
    for i, r in enumerate(rows):
        seq = r["prompt_ids"] + r["prefix_ids"] + [r["draft_token"]]
        target_h = eng.target.teacher_forced(seq)[1][-1]
        draft_h = eng.draft.teacher_forced(seq)[1][-1]
        torch.testing.assert_close(dt[i], target_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dd[i], torch.cat([draft_h, target_h]), atol=1e-5, rtol=1e-5)


def test_cache_is_keyed_and_reused(eng, tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", label_rows(4))
    fs, path, reused = feature_set(eng, labels=labels, setup="DT")
    assert not reused and path.is_file() and fs.features.shape == (16, 64)
    again, path2, reused = feature_set(eng, labels=labels, setup="DT")
    assert reused and path2 == path and torch.equal(again.features, fs.features)
    assert again.groups == fs.groups and torch.equal(again.important, fs.important)
    _, path3, reused = feature_set(eng, labels=labels, setup="DD-DT")
    assert not reused and path3 != path
    write_jsonl(labels, label_rows(5))
    changed, path4, reused = feature_set(eng, labels=labels, setup="DT")
    assert not reused and path4 != path and changed.features.shape[0] == 20
    assert load_features(path4).meta["fingerprints"] == {"target": eng.target.fingerprint}


def test_dt_features_come_from_a_dd_dt_cache(eng, tmp_path):
    """With DD-DT features of the same labels cached, DT ones are their target block: no model pass, same values."""
    labels = write_jsonl(tmp_path / "labels.jsonl", label_rows(4))
    both, _, _ = feature_set(eng, labels=labels, setup="DD-DT")
    fresh, _, _ = feature_set(eng, labels=labels, setup="DT", cache=tmp_path / "fresh.safetensors")
    sliced, path, reused = feature_set(eng, labels=labels, setup="DT")
    assert reused and path.is_file() and sliced.meta["setup"] == "DT" and sliced.meta["key"] == fresh.meta["key"]
    assert torch.equal(sliced.features, fresh.features) and torch.equal(sliced.important, fresh.important)
    assert sliced.groups == fresh.groups and both.features.shape[1] == sliced.features.shape[1] + 32


def test_labels_mined_with_other_models_are_refused(eng, tmp_path):
    meta = {"kind": "meta", "target": eng.target.name, "target_fingerprint": eng.target.fingerprint,
            "draft": "some-other-draft", "draft_fingerprint": "0123456789abcdef"}
    labels = write_jsonl(tmp_path / "labels.jsonl", [meta, *label_rows(2)])
    with pytest.raises(AutojudgeError, match=r"mined with draft some-other-draft .* loaded draft is"):
        feature_set(eng, labels=labels, setup="DD-DT")
    fs, _, _ = feature_set(eng, labels=labels, setup="DT")  # target-only features need only the target to match
    assert fs.features.shape[0] == 8
    write_jsonl(labels, [{**meta, "target_fingerprint": "fedcba9876543210"}, *label_rows(2)])
    with pytest.raises(AutojudgeError, match="mined with target"):
        feature_set(eng, labels=labels, setup="DT")


def test_cache_made_in_fp32_is_not_reused_in_bf16(eng, tiny_qwen, tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", label_rows(3))
    fp32, path, _ = feature_set(eng, labels=labels, setup="DT")
    bf16_eng = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=256, dtype="bf16")
    bf16, path_bf16, reused = feature_set(bf16_eng, labels=labels, setup="DT")
    assert not reused and path_bf16 != path and bf16.meta["dtypes"] == {"target": "bfloat16"}
    assert torch.allclose(bf16.features, fp32.features, atol=0.1) and not torch.equal(bf16.features, fp32.features)


@pytest.mark.parametrize(
    "first_error, expected",
    [(None, [1, 1, 1, 1]), (0, [0, 0, 0, 0]), (4, [1, 0, 0, 0]), (3, [1, 0, 0, 0]), (6, [1, 1, 0, 0]), (9, [1, 1, 1, 1])],
)
def test_good_tokens(first_error, expected):
    offsets = [(0, 3), (3, 6), (6, 7), (7, 9)]
    assert good_tokens(offsets, first_error) == [bool(e) for e in expected]


def test_annotation_features_and_labels(eng, tmp_path):
    response = "the cat in there"
    tok = eng.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ends = [e for _, e in tok["offset_mapping"]]
    cut = response.index("in") + 1  # inside a merged "in" token
    anns = [
        {"prompt": "Say it", "response": response, "first_error": None},
        {"prompt": [{"role": "user", "content": "Say it"}], "response": response, "first_error": 0},
        {"prompt": "Say it", "response": response, "first_error": cut},
    ]
    fs, _, _ = feature_set(eng, annotations=write_jsonl(tmp_path / "ann.jsonl", anns))
    n = len(tok["input_ids"])
    assert fs.meta["kind"] == "judge-decoding" and fs.meta["setup"] == "DT"
    assert fs.features.shape == (3 * n, 64)
    imp = fs.important.view(3, n).tolist()
    assert imp[0] == [False] * n and imp[1] == [True] * n
    assert imp[2] == [e > cut for e in ends] and any(imp[2]) and not all(imp[2])
    assert [s for s, e in tok["offset_mapping"] if s < cut < e], "cut should fall inside a token"
    prompt_ids = eng.encode_prompt("Say it")
    hidden = eng.target.teacher_forced(prompt_ids + tok["input_ids"])[1][len(prompt_ids):]
    torch.testing.assert_close(fs.features[:n], hidden, atol=1e-5, rtol=1e-5)
    assert len(set(fs.groups)) == 3
    with pytest.raises(AutojudgeError, match="--setup DT"):
        feature_set(eng, annotations=tmp_path / "ann.jsonl", setup="DD-DT")


@pytest.mark.parametrize("kind", ["labels", "annotations"])
def test_a_killed_feature_run_resumes_without_redoing_passes(eng, tmp_path, monkeypatch, kind):
    """A run that dies mid-way leaves its checkpoint; the next run does only the rest, and the features equal an
    uninterrupted run's. The checkpoint goes once the features are saved; one made for other inputs is ignored."""
    from autojudge.judge import features as features_module

    if kind == "labels":
        source = {"labels": write_jsonl(tmp_path / "labels.jsonl", label_rows(6)), "setup": "DD-DT"}
    else:
        anns = [{"prompt": f"Say {i}", "response": f"the cat {i} in there", "first_error": i} for i in range(7)]
        source = {"annotations": write_jsonl(tmp_path / "ann.jsonl", anns)}
    want, _, _ = feature_set(eng, cache=tmp_path / "uninterrupted.safetensors", **source)

    real_hidden, passes = features_module._hidden, []

    def dies_after(n):
        def hidden(dec, ids):
            if len(passes) == n:
                raise KeyboardInterrupt
            passes.append(dec)
            return real_hidden(dec, ids)
        return hidden

    monkeypatch.setattr(features_module, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(features_module, "_hidden", dies_after(5))
    with pytest.raises(KeyboardInterrupt):
        feature_set(eng, **source)
    cache = next(tmp_path.glob("*.features.safetensors.partial"))
    first = len(passes)
    monkeypatch.setattr(features_module, "_hidden", dies_after(10_000))
    got, path, reused = feature_set(eng, **source)
    assert not reused and torch.equal(got.features, want.features) and got.groups == want.groups
    assert torch.equal(got.important, want.important)
    both_runs = len(passes)
    passes.clear()
    feature_set(eng, cache=tmp_path / "again.safetensors", **source)
    # Only the item the kill interrupted is redone: with DD-DT, the draft pass that had finished before it.
    per_item = len(features_module._decoders(eng, source.get("setup", "DT")))
    assert first == 5 and both_runs == len(passes) + first % per_item
    assert not cache.exists() and path.is_file()
    # A checkpoint made for other inputs (another key) is not used.
    stale = features_module.Checkpoint(cache, "another key")
    stale.add(0, rows=torch.zeros(1, 1))
    assert features_module.Checkpoint(cache, "the key").done == {} and cache.exists()


def test_bad_first_error_is_reported_with_its_line(eng, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "ab", "first_error": 5}])
    with pytest.raises(AutojudgeError, match="bad.jsonl:1"):
        feature_set(eng, annotations=path)


def test_train_cli_end_to_end(tiny_qwen, small_draft, tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", label_rows(12))
    engine_args = ["--target", str(tiny_qwen), "--draft", str(small_draft), "--max-seq-len", "128"]
    runner = CliRunner()
    res = runner.invoke(main, ["features", "--labels", str(labels), *engine_args])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["train", "--labels", str(labels), "--out", str(tmp_path / "j"),
                               "--learning-curve", "0.5,1", *engine_args])
    assert res.exit_code == 0, res.output
    assert "features:" in res.output and "reused" in res.output and "ROC-AUC" in res.output
    assert res.output.count("learning curve: ") == 2
    meta = json.loads((tmp_path / "j.json").read_text())
    assert [p["fraction"] for p in meta["report"]["learning_curve"]] == [0.5, 1.0]
    bad = runner.invoke(main, ["train", "--labels", str(labels), "--out", str(tmp_path / "b"),
                               "--learning-curve", "0,1", *engine_args])
    assert bad.exit_code == 1 and "--learning-curve" in bad.output and not (tmp_path / "b.json").exists()
    eng = Engine.from_pretrained(target=str(tiny_qwen), draft=str(small_draft), max_seq_len=128)
    judge = load_judge(tmp_path / "j", target=eng.target, draft=eng.draft)
    assert judge.setup == "DD-DT" and judge.weight.shape == (96,)
    res = runner.invoke(main, ["train", "--labels", str(labels), "--out", str(tmp_path / "v"), "--export", "vllm",
                               *engine_args])
    assert res.exit_code == 1 and "--setup DT" in res.output
    res = runner.invoke(main, ["train", "--labels", str(labels), "--out", str(tmp_path / "v"), "--export", "vllm",
                               "--setup", "DT", *engine_args])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "v.vllm.pkl", "rb") as f:
        assert pickle.load(f)["weights"].shape == (64,)
    other = make_tiny_checkpoint(tmp_path / "other", arch="llama", seed=4)
    other_eng = Engine.from_pretrained(target=str(other), draft=None, max_seq_len=64)
    with pytest.raises(AutojudgeError, match="retrain with `autojudge train`"):
        load_judge(tmp_path / "v", target=other_eng.target)


def test_train_on_several_label_files_is_training_on_their_rows(tiny_qwen, small_draft, tmp_path):
    """Problem ranges mined into separate files (`mine --offset`) train one judge: the same head as one file holding
    all their rows, with every file named in the judge."""
    rows = label_rows(12)
    half = next(i for i, r in enumerate(rows) if r["problem_id"] == "p6")
    whole, first, second = (write_jsonl(tmp_path / name, part) for name, part in
                            (("all.jsonl", rows), ("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])))
    engine_args = ["--target", str(tiny_qwen), "--draft", str(small_draft), "--max-seq-len", "128"]
    runner = CliRunner()
    for stem, files in (("one", [whole]), ("two", [first, second])):
        args = [arg for path in files for arg in ("--labels", str(path))]
        res = runner.invoke(main, ["train", *args, "--out", str(tmp_path / stem), *engine_args])
        assert res.exit_code == 0, res.output
    one, two = (json.loads((tmp_path / f"{stem}.json").read_text()) for stem in ("one", "two"))
    assert [s["file"] for s in one["trained_on"]] == ["all.jsonl"]
    assert [s["file"] for s in two["trained_on"]] == ["a.jsonl", "b.jsonl"]
    assert one["report"]["val_auc"] == two["report"]["val_auc"] and one["thresholds"] == two["thresholds"]
    weights = [load_file(str(tmp_path / f"{stem}.safetensors")) for stem in ("one", "two")]
    torch.testing.assert_close(weights[0], weights[1])
    res = runner.invoke(main, ["train", "--labels", str(first), "--labels", str(second), "--out", str(tmp_path / "x"),
                               "--features", str(tmp_path / "f.safetensors"), *engine_args])
    assert res.exit_code == 1 and "one --labels file" in res.output and not (tmp_path / "x.json").exists()
    res = runner.invoke(main, ["train", "--labels", str(first), "--annotations", str(second), "--out",
                               str(tmp_path / "x"), *engine_args])
    assert res.exit_code == 1 and "exactly one of --labels" in res.output


def test_unfinished_adds_the_checkpointed_labels_of_problems_in_flight(tiny_qwen, small_draft, tmp_path):
    """`--unfinished` reads LABELS.inflight too: the labels of a problem's last start, none of a finished problem's
    (a resume drops those rows; until then they are in both files), and the judge names both files."""
    rows = label_rows(6)
    labels = write_jsonl(tmp_path / "labels.jsonl", rows[:10])  # p0, p1 finished
    steps = [r for r in rows[10:] if r.get("kind") != "problem"]  # p2 .. p5, four labels each
    answer = {"kind": "answer", "answer_ids": [1, 2]}
    inflight = [
        {**answer, "problem_id": "p1"}, {"kind": "step", "problem_id": "p1", "label": rows[1]},  # finished since
        {**answer, "problem_id": "p2"}, {"kind": "step", "problem_id": "p2", "label": steps[0]},  # restarted:
        {**answer, "problem_id": "p2"}, *({"kind": "step", "problem_id": "p2", "label": r} for r in steps[:2]),
        {**answer, "problem_id": "p3"}, {"kind": "step", "problem_id": "p3", "label": steps[4]},
    ]
    write_jsonl(tmp_path / "labels.jsonl.inflight", inflight)
    engine_args = ["--target", str(tiny_qwen), "--draft", str(small_draft), "--max-seq-len", "128"]
    runner = CliRunner()
    res = runner.invoke(main, ["features", "--labels", str(labels), *engine_args])
    assert res.exit_code == 0 and "(8 rows x" in res.output, res.output
    res = runner.invoke(main, ["train", "--labels", str(labels), "--unfinished", "--out", str(tmp_path / "j"),
                               "--val-fraction", "0.25", *engine_args])
    assert res.exit_code == 0, res.output
    assert "11 rows" in res.output and "from 4 problems" in res.output, res.output
    meta = json.loads((tmp_path / "j.json").read_text())
    assert [f["file"] for f in meta["trained_on"]] == ["labels.jsonl", "labels.jsonl.inflight"]
    res = runner.invoke(main, ["train", "--annotations", str(labels), "--unfinished", "--out", str(tmp_path / "x"),
                               *engine_args])
    assert res.exit_code == 1 and "--unfinished" in res.output


def test_rows_sharing_a_prefix_share_one_pass():
    prompts = [(1, 2)] * 3 + [(9,)]
    seqs = [(1, 2, 5), (1, 2, 5, 6, 7), (1, 2, 4), (9, 5, 6)]
    passes, owner = _shared_passes(prompts, seqs)
    assert sorted(passes) == sorted([(1, 2, 5, 6, 7), (1, 2, 4), (9, 5, 6)])
    assert owner[0] == owner[1] and len({owner[0], owner[2], owner[3]}) == 3
