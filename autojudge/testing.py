"""Tiny random-weight checkpoints for tests and demos: real architectures, real tokenizer files, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(path: Path):
    """Byte-level BPE with every byte as a token and a few merges: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("r", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_checkpoint(path, arch: str = "qwen2", seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                         num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                         vocab_size: int = 320, tie_word_embeddings: bool | None = None,
                         init_std: float = 0.1, base_state: dict | None = None, noise: float = 0.0) -> Path:
    """Writes a Hugging Face checkpoint directory with random weights and returns its path.

    vocab_size defaults to more rows than the tokenizer has, like real models' padded embeddings.
    With `base_state`, weights are base_state + noise * N(0, 1): a draft that mostly agrees with its target.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(path)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=init_std,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    if arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
                             rope_theta=1_000_000.0)
    elif arch == "llama":
        config = LlamaConfig(
            **common, tie_word_embeddings=False if tie_word_embeddings is None else tie_word_embeddings,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if base_state is not None:
                param.copy_(base_state[name] + noise * torch.randn_like(param))
            elif "norm" not in name:
                param.normal_(0.0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    (path / "autojudge-tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return path
