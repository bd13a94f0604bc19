import json
import pickle
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from autojudge.errors import AutojudgeError
from autojudge.judge.judge_file import export_vllm, judge_paths, load_judge, save_judge
from autojudge.judge.labels import read_label_rows
from autojudge.judge.train import train_judge


def fake_dec(fp, hidden, name):
    return SimpleNamespace(fingerprint=fp, name=name, device=torch.device("cpu"),
                           config=SimpleNamespace(hidden_size=hidden))


DRAFT = fake_dec("d" * 64, 3, "tiny-draft")
TARGET = fake_dec("t" * 64, 5, "tiny-target")


def trained(setup="DD-DT", seed=0):
    d = 8 if setup == "DD-DT" else 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, d, generator=g) * torch.linspace(0.5, 4, d) + torch.linspace(-3, 3, d)
    y = ((x - torch.linspace(-3, 3, d)) @ torch.linspace(-1, 1, d) > 0).float()
    res = train_judge(x, y, [f"p{i // 5}" for i in range(400)], seed=seed)
    sizes = {"draft": 3, "target": 5} if setup == "DD-DT" else {"target": 5}
    meta = {
        "kind": "autojudge", "setup": setup, "hidden_sizes": sizes,
        "fingerprints": {"draft": DRAFT.fingerprint, "target": TARGET.fingerprint},
        "models": {"draft": DRAFT.name, "target": TARGET.name},
        "dtypes": {"draft": "float32", "target": "float32"},
        "source": "labels.jsonl", "source_sha256": "0" * 64,
    }
    return x, res, meta


def test_round_trip_and_folded_probabilities(tmp_path):
    x, res, meta = trained()
    st_path, json_path = save_judge(tmp_path / "j", res, meta)
    for given in (tmp_path / "j", st_path, json_path, str(st_path)):
        judge = load_judge(given, target=TARGET, draft=DRAFT)
        assert judge.setup == "DD-DT" and judge.uses_draft and judge.weight.shape == (8,) and judge.bias.shape == (1,)
        assert judge.weight.dtype == torch.float32
    torch.testing.assert_close(judge.p_important(x).double(), res.head.predict_proba(x), atol=1e-5, rtol=0)
    stored = json.loads(json_path.read_text())
    assert stored["kind"] == "autojudge" and stored["hidden_sizes"] == {"draft": 3, "target": 5}
    assert stored["thresholds"] == res.thresholds and "created" in stored
    assert judge.threshold_for() == res.default_threshold["value"]
    assert judge.threshold_for(recall=0.9) == res.thresholds["recall"]["0.9"]
    assert judge.threshold_for(threshold=0.3) == 0.3
    with pytest.raises(AutojudgeError, match="0.8, 0.9, 0.95, 0.99"):
        judge.threshold_for(recall=0.5)
    # The fingerprint names the weights, not the file: a copy agrees, a retrained head does not.
    _, other, _ = trained(seed=1)
    assert load_judge(save_judge(tmp_path / "copy", res, meta)[0], TARGET, DRAFT).fingerprint == judge.fingerprint
    assert load_judge(save_judge(tmp_path / "j", other, meta)[0], TARGET, DRAFT).fingerprint != judge.fingerprint
    with pytest.raises(AutojudgeError):
        judge.threshold_for(recall=0.9, threshold=0.2)


def test_dotted_stem_keeps_its_name(tmp_path):
    assert judge_paths(tmp_path / "qwen-0.5b")[1].name == "qwen-0.5b.json"


@pytest.mark.parametrize(
    "target, draft, needle",
    [
        (fake_dec("x" * 64, 5, "other"), DRAFT, "xxxxxxxxxxxx"),
        (fake_dec("t" * 64, 6, "wide"), DRAFT, "hidden 6"),
        (TARGET, fake_dec("y" * 64, 3, "other-draft"), "yyyyyyyyyyyy"),
        (TARGET, None, "needs a draft model"),
    ],
)
def test_other_models_are_refused(tmp_path, target, draft, needle):
    _, res, meta = trained()
    save_judge(tmp_path / "j", res, meta)
    with pytest.raises(AutojudgeError, match="autojudge train") as err:
        load_judge(tmp_path / "j", target=target, draft=draft)
    assert needle in str(err.value)


def test_dt_judge_ignores_the_draft(tmp_path):
    _, res, meta = trained("DT")
    save_judge(tmp_path / "j", res, meta)
    judge = load_judge(tmp_path / "j", target=TARGET, draft=None)
    assert judge.weight.shape == (5,) and not judge.uses_draft


def test_vllm_export(tmp_path):
    x, res, _ = trained("DT")
    path = export_vllm(tmp_path / "j.vllm.pkl", res, "DT")
    with path.open("rb") as f:
        data = pickle.load(f)
    assert {"mean", "scale", "weights", "bias"} <= data.keys()
    assert [data[k].shape for k in ("mean", "scale", "weights", "bias")] == [(5,), (5,), (5,), (1,)]
    z = (x.double().numpy() - data["mean"]) / data["scale"] @ data["weights"] + data["bias"]
    torch.testing.assert_close(torch.sigmoid(torch.from_numpy(z)), res.head.predict_proba(x))
    with pytest.raises(AutojudgeError, match="--setup DT"):
        export_vllm(tmp_path / "k.pkl", res, "DD-DT")


@pytest.mark.parametrize("name", ["default", "default-code"])
def test_shipped_default_judge_is_for_the_mined_default_pair(name):
    """Each AutoJudge head in the package was trained on committed default-pair labels: same models, sizes,
    precision."""
    shipped = Path(str(resources.files("autojudge") / "judges" / name))
    meta = json.loads(judge_paths(shipped)[1].read_text())
    labels = Path(__file__).parents[1] / "data" / "mined" / "default" / meta["trained_on"][0]["file"]
    mined = json.loads(labels.read_text().splitlines()[0])
    assert meta["kind"] == "autojudge" and meta["setup"] == "DD-DT"
    assert mined["dataset"] == {"default": "gsm8k", "default-code": "humaneval"}[name]
    assert meta["hidden_sizes"] == {"draft": 896, "target": 1536}
    assert meta["fingerprints"] == {"draft": mined["draft_fingerprint"], "target": mined["target_fingerprint"]}
    assert meta["dtypes"] == {"draft": mined["dtype"], "target": mined["dtype"]}
    dec = {b: fake_dec(meta["fingerprints"][b], meta["hidden_sizes"][b], b) for b in ("draft", "target")}
    judge = load_judge(shipped, target=dec["target"], draft=dec["draft"])
    assert judge.weight.shape == (896 + 1536,) and torch.isfinite(judge.weight).all()
    assert all(0.0 < tau <= 1.0 for tau in judge.thresholds["recall"].values())
    # Mining goes on appending to the file after the judge is trained, never dropping a label it held (a finished
    # problem's checkpointed labels move from `.inflight` into the file).
    unfinished = any(source["file"].endswith(".inflight") for source in meta["trained_on"])
    assert meta["report"]["rows"] <= len(read_label_rows(labels, unfinished))


def test_default_judge_follows_the_mode(tmp_path):
    """--judge default is the AutoJudge head for mode autojudge and the Judge Decoding head for mode judge, both
    for the default target; the Judge Decoding head's annotations are rebuilt byte for byte by `autojudge annotate`."""
    import hashlib

    from click.testing import CliRunner

    from autojudge.commands import main
    from autojudge.judge.judge_file import load_judge_for_engine

    shipped = json.loads(judge_paths(Path(str(resources.files("autojudge") / "judges" / "default")))[1].read_text())
    target = fake_dec(shipped["fingerprints"]["target"], 1536, "default-target")
    draft = fake_dec(shipped["fingerprints"]["draft"], 896, "default-draft")
    engine = SimpleNamespace(target=target, draft=draft)
    assert load_judge_for_engine("default", engine, "autojudge").meta["kind"] == "autojudge"
    assert load_judge_for_engine("default", engine).meta["kind"] == "autojudge"
    head = load_judge_for_engine("default", engine, "judge")
    assert head.meta["kind"] == "judge-decoding" and head.meta["setup"] == "DT"
    assert head.weight.shape == (1536,) and torch.isfinite(head.weight).all()
    assert 0.0 < head.threshold_for() <= 1.0
    with pytest.raises(AutojudgeError, match="needs a judge-decoding head"):
        load_judge_for_engine(judge_paths(Path(str(resources.files("autojudge") / "judges" / "default")))[1],
                              engine, "judge")

    limit = int(head.meta["trained_on"][0]["file"].removeprefix("ann-").removesuffix(".jsonl"))
    out = tmp_path / "ann.jsonl"
    result = CliRunner().invoke(main, ["annotate", "--limit", str(limit), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == head.meta["trained_on"][0]["sha256"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(change):
    def damage(st_path, json_path):
        meta = json.loads(json_path.read_text())
        change(meta)
        json_path.write_text(json.dumps(meta))
    return damage


def _set(key, value):
    return _edit_meta(lambda meta: meta.update({key: value}))


DAMAGE = {
    "truncated safetensors": (lambda st, js: _truncate(st), "truncated or damaged"),
    "empty safetensors": (lambda st, js: st.write_bytes(b""), "truncated or damaged"),
    "safetensors without bias": (lambda st, js: save_file({"weight": torch.zeros(8)}, str(st)), "no bias tensor"),
    "empty metadata": (lambda st, js: js.write_text(""), "it is empty"),
    "non-JSON metadata": (lambda st, js: js.write_text('{"format": "autojudge-judge", '), "it is not JSON"),
    "non-UTF-8 metadata": (lambda st, js: js.write_bytes(b"\xff\xfe\x00{"), "it is not JSON"),
    "metadata not an object": (lambda st, js: js.write_text("[1, 2]"), "is not a version-1 autojudge judge file"),
    "missing setup": (_edit_meta(lambda meta: meta.pop("setup")), "it lacks setup"),
    "missing thresholds and models": (_edit_meta(lambda meta: [meta.pop("thresholds"), meta.pop("models")]),
                                      "it lacks models, thresholds"),
    "unknown setup": (_set("setup", "XX"), "setup 'XX' is not one of DT, DD-DT"),
    "setup of wrong type": (_set("setup", ["DT"]), "setup ['DT'] is not one of"),
    "unknown kind": (_set("kind", 3), "kind 3 is not one of"),
    "hidden sizes a list": (_set("hidden_sizes", [3, 5]), "hidden_sizes must be JSON objects"),
    "hidden size a string": (_set("hidden_sizes", {"draft": 3, "target": "5"}), "hidden_sizes.target is '5'"),
    "fingerprint a number": (_set("fingerprints", {"draft": 1, "target": "t"}), "fingerprints.draft is 1"),
    "recall thresholds a list": (_set("thresholds", {"recall": [0.1]}), "thresholds.recall is not an object"),
    "recall level not a number": (_set("thresholds", {"recall": {"high": 0.1}}), "thresholds.recall is not"),
    "default threshold a string": (_set("default_threshold", "0.2"), "default_threshold is '0.2'"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_judge_is_refused_in_one_line(tmp_path, damage):
    damage_fn, needle = DAMAGE[damage]
    _, res, meta = trained()
    st_path, json_path = save_judge(tmp_path / "j", res, meta)
    damage_fn(st_path, json_path)
    with pytest.raises(AutojudgeError) as err:
        load_judge(tmp_path / "j", target=TARGET, draft=DRAFT)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert str(st_path if "safetensors" in damage else json_path) in message, message


def test_default_judge_follows_the_task_domain(tmp_path, monkeypatch):
    """--judge default picks the shipped head for the task's domain; a domain with none shipped is refused in one
    line that names the way out, and default-math / default-code name a domain outright."""
    from autojudge.judge import judge_file
    from autojudge.judge.judge_file import load_judge_for_engine

    shipped = json.loads(judge_paths(Path(str(resources.files("autojudge") / "judges" / "default")))[1].read_text())
    engine = SimpleNamespace(target=fake_dec(shipped["fingerprints"]["target"], 1536, "default-target"),
                             draft=fake_dec(shipped["fingerprints"]["draft"], 896, "default-draft"))
    math = load_judge_for_engine("default", engine, "autojudge", "gsm8k")
    assert load_judge_for_engine("default-math", engine, "autojudge", "humaneval").meta == math.meta
    if judge_file._shipped("autojudge", "code") is None:
        for name, task in (("default", "humaneval"), ("default-code", None)):
            with pytest.raises(AutojudgeError, match="no default autojudge judge for code is shipped in this version; "
                                                     "train one .* or pass --judge default-math to use the math one"):
                load_judge_for_engine(name, engine, "autojudge", task)
        with pytest.raises(AutojudgeError, match="no default judge-decoding judge for code .* --judge default-math"):
            load_judge_for_engine("default", engine, "judge", "humaneval")
    # A code head shipped beside the math one is what `default` gives on code.
    code = tmp_path / "judges"
    code.mkdir()
    for src in judge_paths(Path(str(resources.files("autojudge") / "judges" / "default"))):
        (code / src.name.replace("default", "default-code")).write_bytes(src.read_bytes())
    monkeypatch.setattr(judge_file, "_shipped", lambda kind, domain: (
        code / "default-code.json" if (kind, domain) == ("autojudge", "code") else
        Path(str(resources.files("autojudge") / "judges" / judge_file.SHIPPED_DEFAULT[kind, domain]))))
    assert load_judge_for_engine("default", engine, "autojudge", "humaneval").meta == math.meta
