"""One model plus its static cache: the unit the engine drafts and verifies with."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import torch

from autojudge.engine.config import ModelConfig
from autojudge.engine.loading import Checkpoint, load_weights
from autojudge.engine.model import Transformer
from autojudge.errors import AutojudgeError


def vocabulary_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class Decoder:
    def __init__(self, model: Transformer, name: str, vocab_hash: str, max_seq_len: int,
                 checkpoint: Checkpoint | None = None, attention: str = "sdpa"):
        self.model = model
        self.checkpoint = checkpoint
        self.config: ModelConfig = model.config
        self.name = name
        self.vocab_hash = vocab_hash
        model.setup_cache(max_seq_len, attention=attention)
        self.max_seq_len = max_seq_len
        # Which token each cache slot holds keys/values for: slots [0, cached_len) are valid for the tokens
        # recorded here, so a later sequence sharing that prefix skips recomputing it.
        self._cached_tokens = torch.full((max_seq_len,), -1, dtype=torch.long, device=model.lm_head.weight.device)
        self.cached_len = 0
        self.cache_version = 0  # counts cache reallocations: a CUDA graph records the buffers of one version

    @classmethod
    def load(cls, ckpt: Checkpoint, tokenizer, dtype: torch.dtype, device: torch.device, max_seq_len: int,
             attention: str = "sdpa") -> Decoder:
        model = load_weights(ckpt, ckpt.config, dtype, device)
        return cls(model, ckpt.name, vocabulary_hash(tokenizer), max_seq_len, checkpoint=ckpt, attention=attention)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def precision(self) -> str:
        """The weights' dtype as files record it: 'float32', 'bfloat16', ..."""
        return str(self.model.lm_head.weight.dtype).removeprefix("torch.")

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the architecture and vocabulary a judge was trained on (not the exact weights)."""
        blob = json.dumps({"config": self.config.to_dict(), "vocab": self.vocab_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @cached_property
    def weights_fingerprint(self) -> str | None:
        """sha256 of the exact weights (None without a checkpoint): fine-tuning keeps `fingerprint` unchanged."""
        return None if self.checkpoint is None else self.checkpoint.weights_fingerprint()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, logits_from: int | None = 0):
        """Runs tokens [T] (or [1, T]) at positions start.. ; returns (logits [T', V] fp32 | None, hidden [T, D])."""
        tokens = tokens.reshape(1, -1)
        end = start + tokens.shape[1]
        if end > self.max_seq_len:
            raise AutojudgeError(
                f"sequence of {end} tokens does not fit the KV cache of {self.max_seq_len}; raise --max-seq-len"
            )
        logits, hidden = self.model(tokens, self.model.cache_positions[start:end], end, logits_from)
        self._cached_tokens[start:end] = tokens[0]
        self.cached_len = end
        return (None if logits is None else logits[0]), hidden[0]

    def ensure_rows(self, rows: int) -> None:
        """Grows the KV cache to `rows` sequences (for batched decoding); what it held is dropped, and CUDA graphs
        recorded on the old cache are recorded again (`cache_version`). Every batched run calls it first."""
        if self.model.attention == "flash":
            # flash-attn writes a row's keys/values from its first position on, consecutively: padding would land
            # past the cache end, or over the row's own cache.
            raise AutojudgeError("batched decoding and batched mining need attention 'sdpa'; drop attention 'flash'")
        if rows > self.model.batch:
            self.model.setup_cache(self.max_seq_len, batch=rows, attention=self.model.attention)
            self.cache_version += 1
            self.cached_len = 0

    @torch.inference_mode()
    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, rows: slice,
                     logits_from: int | None = 0):
        """tokens [B, T] at per-row `positions` [B, T] of cache rows `rows`; padding goes to position
        `max_seq_len` (the trash slot). Returns (logits [B, T', V] fp32 | None, hidden [B, T, D])."""
        if rows.start == 0:
            self.cached_len = 0  # row 0 no longer holds the sequence that prefix reuse remembers
        return self.model(tokens, positions, kv_len, logits_from, rows)

    @torch.inference_mode()
    def forward_packed(self, tokens: torch.Tensor, rows: list[tuple[int, int, int]]):
        """The new tokens of several cache rows one after another, no padding: `rows` holds (cache row, first
        position, count) (`Transformer.forward_packed`); returns hidden [N, D]."""
        if any(row == 0 for row, _, _ in rows):
            self.cached_len = 0  # as in forward_rows
        return self.model.forward_packed(tokens, rows)

    def _caches(self):
        return [layer.self_attn.kv_cache for layer in self.model.model.layers]

    @torch.inference_mode()
    def row_state(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Keys and values of the first `length` slots of cache row `row` (the sdpa layout batched runs use), as
        CPU tensors [layers, kv heads, length, head dim] ("k", "v"): what `load_row_state` writes back, in this
        process or a later one."""
        caches = self._caches()
        return {"k": torch.stack([c.k[row, :, :length] for c in caches]).cpu(),
                "v": torch.stack([c.v[row, :, :length] for c in caches]).cpu()}

    @torch.inference_mode()
    def load_row_state(self, row: int, state: dict[str, torch.Tensor]) -> None:
        """Writes a `row_state` into cache row `row`; refuses one of another shape or precision."""
        caches = self._caches()
        k, v = state["k"], state["v"]
        expected = (len(caches), *caches[0].k.shape[1:2], k.shape[2], *caches[0].k.shape[3:])
        if (k.shape != expected or v.shape != expected or k.dtype != caches[0].k.dtype
                or v.dtype != k.dtype or k.shape[2] > self.max_seq_len):
            raise ValueError(f"a cache row state of shape {tuple(k.shape)} {k.dtype} does not fit {self.name}'s "
                             f"cache ({expected}, {caches[0].k.dtype})")
        if row == 0:
            self.cached_len = 0  # as in forward_rows
        for i, cache in enumerate(caches):
            cache.k[row, :, : k.shape[2]] = k[i].to(cache.k.device)
            cache.v[row, :, : v.shape[2]] = v[i].to(cache.v.device)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        """Copies cache row `src` whole into row `dst` (a batched run packing its busy rows together)."""
        if dst == 0:
            self.cached_len = 0  # as in forward_rows
        for cache in self._caches():
            cache.k[dst] = cache.k[src]
            cache.v[dst] = cache.v[src]

    def reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` already have valid keys/values in the cache (one host read)."""
        n = min(len(ids), self.cached_len)
        cached = self._cached_tokens[:n].tolist()
        return next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), n)

    def teacher_forced(self, ids, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [T - start, V] fp32 and hidden [T - start, D] fp32 for positions start.. of the sequence
        `ids` (logits row t predicts token t + 1). With start > 0 only what the cache does not already
        hold for this prefix is recomputed; start = 0 is a fresh pass over everything."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not 0 <= start < len(ids):
            raise ValueError(f"start {start} outside a sequence of {len(ids)} tokens")
        begin = min(self.reusable_prefix(ids), start) if start > 0 else 0  # start 0 needs no cache lookup
        tokens = torch.as_tensor(ids[begin:], dtype=torch.long, device=self.device)
        logits, hidden = self.forward(tokens, begin)
        return logits[start - begin :], hidden[start - begin :].float()
