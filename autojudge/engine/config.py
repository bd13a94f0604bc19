"""Architecture description shared by the model, the loaders and the judge fingerprints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from autojudge.errors import AutojudgeError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_scaling: dict | None = field(default=None, hash=False, compare=True)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "checkpoint") -> ModelConfig:
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        kind = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if kind is None and model_type in ("llama", "qwen2"):
            kind = model_type
        if kind is None:
            raise AutojudgeError(
                f"unknown architecture {archs or model_type!r} in {source}: autojudge runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; convert the model to one of those or pick another checkpoint"
            )
        heads = hf["num_attention_heads"]
        rope_params = hf.get("rope_parameters") or {}
        rope_scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        return cls(
            architecture=kind,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            # Qwen2 always has q/k/v biases; Llama has them only when attention_bias is set.
            attention_bias=bool(hf.get("attention_bias", False)) or kind == "qwen2",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, computed exactly as transformers does (fp32 math on int64 aranges)."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in ("default", None):
            return inv_freq
        if rope_type == "llama3":
            return _llama3_scale(inv_freq, scaling)
        raise AutojudgeError(
            f"unsupported rope_scaling type {rope_type!r}: autojudge implements 'default' and 'llama3'"
        )


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
