"""Mining -> training -> judged decoding, through the command line, on tiny random models."""

import json

from click.testing import CliRunner

from autojudge import Engine
from autojudge.commands import main
from autojudge.judge.judge_file import load_judge_for_engine


def test_mine_train_generate(tiny_pair, tmp_path, monkeypatch):
    target, draft = tiny_pair
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                               for i in range(16)))
    labels = tmp_path / "labels.jsonl"
    models = ["--target", str(target), "--draft", str(draft), "--max-seq-len", "512"]
    runner = CliRunner()
    mined = runner.invoke(main, ["mine", *models, "--dataset", str(dataset), "--out", str(labels),
                                 "--max-new-tokens", "28", "--prompt-template", "{question}", "--checker",
                                 "test_mining:parity", "--label-truncated"])
    assert mined.exit_code == 0, mined.output
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    kinds = {row.get("kind") for row in rows}
    assert {"meta", "label", "problem"} <= kinds
    assert {row["important"] for row in rows if row.get("kind") == "label"} == {True, False}

    stem = tmp_path / "judge"
    trained = runner.invoke(main, ["train", *models, "--labels", str(labels), "--out", str(stem)])
    assert trained.exit_code == 0, trained.output

    engine = Engine.from_pretrained(target=str(target), draft=str(draft), max_seq_len=512, kernels="eager")
    judge = load_judge_for_engine(stem, engine, "autojudge")
    assert judge.uses_draft  # DD-DT is the default setup
    out = engine.generate("What is 3 + 3?", max_new_tokens=20, mode="autojudge", window=4, ignore_eos=True,
                          judge=judge, threshold=judge.threshold_for(recall=0.8))
    assert len(out.token_ids) == 20 and out.stats.cycles >= 1

    generated = runner.invoke(main, ["generate", "What is 3 + 3?", *models, "--mode", "autojudge", "--judge",
                                     str(stem), "--max-new-tokens", "8", "--ignore-eos", "--json"])
    assert generated.exit_code == 0, generated.output
    assert json.loads(generated.output)["stats"]["mode"] == "autojudge"
