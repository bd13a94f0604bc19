"""`autojudge annotate`: Judge Decoding annotations built from GSM8K reference solutions."""

import json

import pytest
from click.testing import CliRunner

from autojudge.commands import main
from autojudge.engine.engine import Engine
from autojudge.judge.features import feature_set
from autojudge.tasks.annotations import build_annotations, response_and_results
from autojudge.tasks.datasets import load_dataset

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_a_solution_becomes_a_response_with_its_computed_numbers():
    response, results = response_and_results(NATALIA)
    assert response == ("Natalia sold 48/2 = 24 clips in May.\n"
                        "Natalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is 72.")
    assert [response[a:b] for a, b in results] == ["24", "72", "72"]
    assert results[0][0] == response.index("= 24") + 2  # the result, not the 24 inside "48+24"


@pytest.fixture(scope="module")
def problems():
    return load_dataset("gsm8k", "train")[:300]


def test_each_altered_copy_differs_in_one_digit_of_a_computed_number(problems):
    rows = list(build_annotations(problems, altered=2, seed=0))
    by_problem = {}
    for row in rows:
        by_problem.setdefault(row["problem_id"], []).append(row)
    assert len(by_problem) == 300
    altered_rows = 0
    for problem in problems:
        correct, *copies = by_problem[problem.problem_id]
        response, results = response_and_results(problem.meta["solution"])
        assert correct["first_error"] is None and correct["response"] == response
        assert "<<" not in response and "####" not in response and response.endswith(f"{problem.expected}.")
        assert correct["prompt"][0]["content"].endswith(problem.question)
        assert len(copies) == (2 if results else 0)
        for copy in copies:
            i, text = copy["first_error"], copy["response"]
            assert len(text) == len(response) and [j for j in range(len(text)) if text[j] != response[j]] == [i]
            assert text[i].isdigit() and response[i].isdigit()
            assert any(a <= i < b for a, b in results)
            altered_rows += 1
    assert altered_rows > 500


def test_the_same_seed_gives_the_same_file_and_another_seed_another(problems):
    first = list(build_annotations(problems[:50], seed=3))
    assert first == list(build_annotations(problems[:50], seed=3))
    assert first != list(build_annotations(problems[:50], seed=4))
    # A problem's copies do not depend on the problems before it.
    assert list(build_annotations(problems[10:11], seed=3)) == first[20:22]


def test_cli_writes_a_header_and_train_reads_the_file(tmp_path, tiny_qwen):
    out = tmp_path / "ann.jsonl"
    result = CliRunner().invoke(main, ["annotate", "--limit", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["kind"] == "header" and header["problems"] == 4 and header["seed"] == 0
    assert "first_error is that digit's character offset" in header["construction"]
    assert len(rows) == 8 and sum(r["first_error"] is not None for r in rows) == 4

    again = CliRunner().invoke(main, ["annotate", "--limit", "4", "--out", str(out)])
    assert again.exit_code == 1 and "pass --force" in again.output and len(again.output.splitlines()) == 1
    assert len(out.read_text().splitlines()) == 9  # nothing already written is lost

    eng = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=1024)
    fs, _, _ = feature_set(eng, annotations=out)
    assert 0 < int(fs.important.sum()) < fs.important.numel() and len(set(fs.groups)) == 4
