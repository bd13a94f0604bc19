"""Real model shapes with random weights, for GPU benchmarks and tests that need no checkpoint download.

The hyperparameters are those of the published config.json files. Speed depends on the shapes and the
dtype only, so random weights time exactly like the real ones; the weights are drawn on the device itself,
so an 8B model costs no host memory and no host-to-device copy.
"""

from __future__ import annotations

import hashlib

import torch

from autojudge.engine.config import ModelConfig
from autojudge.engine.decoder import Decoder
from autojudge.engine.model import Transformer
from autojudge.errors import AutojudgeError


def _qwen25(vocab, hidden, intermediate, layers, heads, kv_heads, tie) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, attention_bias=True, tie_word_embeddings=tie, max_position_embeddings=32768,
    )


def _llama3(hidden, intermediate, layers, heads, factor, tie) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=hidden // heads, rms_norm_eps=1e-5,
        rope_theta=500_000.0, attention_bias=False, tie_word_embeddings=tie, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen25(151936, 896, 4864, 24, 14, 2, tie=True),
    "qwen2.5-1.5b": _qwen25(151936, 1536, 8960, 28, 12, 2, tie=True),
    "qwen2.5-7b": _qwen25(152064, 3584, 18944, 28, 28, 4, tie=False),
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, factor=32.0, tie=True),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, factor=8.0, tie=False),
}


def tiny_preset(vocab_size: int = 512, **overrides) -> ModelConfig:
    """A few-layer Qwen2-shaped config for CPU smoke runs of the GPU benchmarks and tests."""
    fields = dict(vocab=vocab_size, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tie=True)
    return _qwen25(**{**fields, **overrides})


def preset_config(preset: str | ModelConfig) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        return preset
    if preset not in PRESETS:
        raise AutojudgeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def random_decoder(preset: str | ModelConfig, device, dtype: torch.dtype = torch.bfloat16, max_seq_len: int = 2048,
                   seed: int = 0, attention: str = "sdpa", init_std: float = 0.02) -> Decoder:
    """A Decoder with N(0, init_std) weights (norms at 1) built directly on `device`."""
    cfg = preset_config(preset)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives the two modules separate storage; share one again
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, init_std, generator=gen)
    name = preset if isinstance(preset, str) else "custom"
    # Presets share a vocabulary with their family; the hash only has to tell families apart.
    vocab_hash = hashlib.sha256(f"random:{cfg.architecture}:{cfg.vocab_size}".encode()).hexdigest()
    return Decoder(model.eval(), f"random-{name}", vocab_hash, max_seq_len, attention=attention)


def parameter_count(cfg: ModelConfig) -> int:
    """Distinct parameters (a tied lm_head counted once), counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())
