"""Damaged checkpoints, caches beyond memory, mismatched vocabularies and weights fingerprints: each fails with one
line naming the problem and the fix, before anything crashes mid-run."""

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from autojudge import Engine
from autojudge.engine import default_pair, loading, model
from autojudge.engine.loading import Checkpoint
from autojudge.errors import AutojudgeError
from autojudge.mining.store import LabelStore
from autojudge.testing import make_tiny_checkpoint


def _refused(needle, **kwargs):
    with pytest.raises(AutojudgeError) as err:
        Engine.from_pretrained(**{"max_seq_len": 64, "kernels": "eager", **kwargs})
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    return message


def _edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _truncate_weights(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _drop_tokenizer(path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


BAD_CHECKPOINTS = {
    "narrower MLP in config": (lambda p: _edit_config(p, lambda c: c.update(intermediate_size=96)),
                               "has shape (128, 64) but config.json implies (96, 64)"),
    "smaller vocabulary in config": (lambda p: _edit_config(p, lambda c: c.update(vocab_size=300)),
                                     "model.embed_tokens.weight has shape (320, 64) but config.json implies (300, 64)"),
    "missing config field": (lambda p: _edit_config(p, lambda c: c.pop("num_attention_heads")),
                             "lacks 'num_attention_heads'"),
    "null config field": (lambda p: _edit_config(p, lambda c: c.update(num_hidden_layers=None)),
                          "num_layers = None, not a positive integer"),
    "config field of the wrong type": (lambda p: _edit_config(p, lambda c: c.update(hidden_size="64")),
                                       "holds a value of the wrong type"),
    "config not JSON": (lambda p: (p / "config.json").write_text('{"vocab_size": '), "is not valid JSON"),
    "config not an object": (lambda p: (p / "config.json").write_text("[]"), "is not a JSON object"),
    "truncated weights": (_truncate_weights, "model.safetensors is not a readable safetensors file"),
    "no tokenizer files": (_drop_tokenizer, "has no tokenizer (tokenizer.json or tokenizer.model or vocab.json)"),
    "generation config not JSON": (lambda p: (p / "generation_config.json").write_text("{"),
                                   "generation_config.json is not valid JSON"),
    "eos id of the wrong type": (lambda p: (p / "generation_config.json").write_text('{"eos_token_id": "x"}'),
                                 "eos_token_id ['x'] is not a token id"),
}


@pytest.mark.parametrize("damage", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_refused_in_one_line(tmp_path, tiny_qwen, damage):
    damage_fn, needle = BAD_CHECKPOINTS[damage]
    broken = shutil.copytree(tiny_qwen, tmp_path / "broken")
    damage_fn(broken)
    _refused(needle, target=str(broken), draft=None)


# ---------------------------------------------------------------------------- the KV cache against memory


def test_a_cache_beyond_memory_is_refused_before_allocating(tiny_qwen):
    # 10**12 tokens of this tiny model need 648 TB, more than any machine has.
    message = _refused("lower --max-seq-len", target=str(tiny_qwen), draft=None, max_seq_len=10**12)
    assert re.search(r"a KV cache of 1000000000000 tokens needs [\d.]+ GiB \(\d+ bytes\) on cpu, but [\d.]+ GiB "
                     r"\(\d+ bytes\) is available", message), message


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_memory_estimate_is_what_the_cache_allocates(tiny_qwen, monkeypatch, precision):
    dec = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=64, kernels="eager",
                                 dtype=precision).target
    transformer, dtype = dec.model, dec.model.lm_head.weight.dtype
    for batch in (1, 3):
        transformer.setup_cache(64, batch=batch)
        assert model.cache_bytes(dec.config, 64, batch, dtype, "cpu") == sum(b.nbytes for b in transformer.buffers())
    # Just too little room for a bigger cache: what the cache it replaces holds counts as room.
    need, held = model.cache_bytes(dec.config, 128, 3, dtype, "cpu"), sum(b.nbytes for b in transformer.buffers())
    monkeypatch.setattr(model, "available_memory", lambda device: need - held - 1)
    with pytest.raises(AutojudgeError, match=r"a KV cache of 128 tokens x 3 rows needs .* lower --max-seq-len"):
        transformer.setup_cache(128, batch=3)
    monkeypatch.setattr(model, "available_memory", lambda device: need - held)
    transformer.setup_cache(128, batch=3)


# ---------------------------------------------------------------------------- draft and target vocabularies


@pytest.fixture(scope="module")
def small_vocab_draft(tiny_dir):
    return make_tiny_checkpoint(tiny_dir / "qwen2-vocab300", arch="qwen2", seed=3, vocab_size=300)


def test_a_draft_whose_rows_miss_real_tokens_is_refused(tiny_qwen, tmp_path):
    """The tiny tokenizer has 265 tokens; a draft with 260 rows could not embed five of them."""
    short = shutil.copytree(tiny_qwen, tmp_path / "vocab260")
    state = load_file(short / "model.safetensors")
    save_file({name: t[:260] if t.shape[0] == 320 else t for name, t in state.items()}, short / "model.safetensors")
    _edit_config(short, lambda config: config.update(vocab_size=260, pad_token_id=None))
    message = _refused("pick a draft whose vocabulary covers", target=str(tiny_qwen), draft=str(short))
    assert "has 260 vocabulary rows" in message and "265 tokens" in message


def test_a_draft_with_fewer_padding_rows_than_the_target_is_exact(tiny_qwen, small_vocab_draft):
    """Target 320 rows, draft 300 (both cover the 265 tokens): ids 300..319 of the target's padding rows, which
    random weights do emit and which here also sit in the prompt, reach the draft without a crash, and
    speculative output still equals the target's."""
    eng = Engine.from_pretrained(target=str(tiny_qwen), draft=str(small_vocab_draft), max_seq_len=96,
                                 kernels="eager")
    prompt = [5, 310, 40, 319, 7, 300, 301]
    want = eng.generate(prompt, max_new_tokens=40, mode="target", ignore_eos=True).token_ids
    assert eng.generate(prompt, max_new_tokens=40, mode="speculative", window=4, ignore_eos=True).token_ids == want
    batched = eng.generate_batch([prompt, prompt[:3]], max_new_tokens=40, mode="speculative", window=4,
                                 ignore_eos=True)
    assert batched[0].token_ids == want


def test_a_draft_with_more_vocabulary_rows_than_the_target_runs(tiny_qwen, small_vocab_draft):
    eng = Engine.from_pretrained(target=str(small_vocab_draft), draft=str(tiny_qwen), max_seq_len=64,
                                 kernels="eager")
    prompt = eng.encode_prompt("hello there")
    want = eng.generate(prompt, max_new_tokens=12, mode="target", ignore_eos=True).token_ids
    assert eng.generate(prompt, max_new_tokens=12, mode="speculative", window=4, ignore_eos=True).token_ids == want


# ---------------------------------------------------------------------------- weights fingerprints


def test_file_hashes_are_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = default_pair.sha256_file
    monkeypatch.setattr(default_pair, "sha256_file", lambda path: hashed.append(path) or real(path))
    file = tmp_path / "w.bin"
    file.write_bytes(b"one")
    first = loading.file_sha256(file)
    assert loading.file_sha256(file) == first and len(hashed) == 1
    file.write_bytes(b"two")
    assert loading.file_sha256(file) != first and len(hashed) == 2


def test_weights_fingerprint_follows_the_weights(tmp_path, tiny_qwen, tiny_pair, monkeypatch):
    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(tiny_qwen, tmp_path / "copy")
    fingerprints = {name: Checkpoint(name, path).weights_fingerprint()
                    for name, path in {"original": tiny_qwen, "copy": copy, "draft": tiny_pair[1]}.items()}
    assert fingerprints["original"] == fingerprints["copy"] != fingerprints["draft"]
    state = load_file(copy / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    assert Checkpoint("copy", copy).weights_fingerprint() != fingerprints["original"]
    dec = Engine.from_pretrained(target=str(copy), draft=None, max_seq_len=16, kernels="eager").target
    assert dec.weights_fingerprint == Checkpoint("copy", copy).weights_fingerprint()


def test_a_gguf_checkpoint_is_fingerprinted_by_its_known_sha256(tmp_path, monkeypatch):
    """The default pair's digests are pinned: loading it hashes nothing."""
    monkeypatch.setenv("AUTOJUDGE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    known = "ab" * 32
    converted = default_pair.cache_root() / "converted" / known[:32]
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(loading, "file_sha256", lambda path: pytest.fail("hashed a file with a known digest"))
    assert loading._from_gguf(gguf, "m", known_sha256=known).weights_fingerprint() == known


META = {"target": "t", "target_fingerprint": "a", "draft": "d", "draft_fingerprint": "b", "dtype": "float32",
        "dataset": "x", "split": "train", "max_new_tokens": 8, "prompt_template": None, "checker": "gsm8k",
        "skip_truncated": True, "target_weights": "w1", "draft_weights": "w2"}


def test_resume_compares_weights_only_where_both_runs_know_them(tmp_path):
    path = tmp_path / "labels.jsonl"
    LabelStore(path, META, resume=False).close()
    with pytest.raises(AutojudgeError, match="cannot resume .*: draft_weights differ"):
        LabelStore(path, {**META, "draft_weights": "w3"}, resume=True)
    LabelStore(path, {**META, "target_weights": None}, resume=True).close()  # a model without a checkpoint
    old = tmp_path / "old.jsonl"
    LabelStore(old, {k: v for k, v in META.items() if not k.endswith("_weights")}, resume=False).close()
    LabelStore(old, META, resume=True).close()


@pytest.mark.parametrize("committed", sorted((Path(__file__).parents[1] / "data" / "mined" / "default").glob("*.jsonl")),
                         ids=lambda p: p.name)
def test_the_committed_default_labels_stay_resumable(tmp_path, committed):
    """A run with the default pair's pinned digests resumes them: those mined before weights were fingerprinted
    record none, the later ones record exactly those digests."""
    with open(committed) as f:
        meta_line = f.readline()
    meta = json.loads(meta_line)
    weights = {"target_weights": default_pair.DEFAULT_TARGET.sha256, "draft_weights": default_pair.DEFAULT_DRAFT.sha256}
    assert {k: meta[k] for k in weights if k in meta} in ({}, weights)
    copy = tmp_path / committed.name
    copy.write_text(meta_line)
    meta.pop("kind")
    LabelStore(copy, {**meta, **weights}, resume=True).close()
