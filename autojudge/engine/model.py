"""Decoder-only transformer (Llama 3.x / Qwen2 / Qwen2.5) over a static, position-addressed KV cache.

Keys and values are written at the positions given to `forward` and attention looks at cache slots by
position, so rolling back rejected draft tokens is free: the next cycle overwrites those slots.
Parameter names match Hugging Face checkpoints, so state dicts load without renaming.

Two attention backends, chosen once in `setup_cache`: "sdpa" (torch's scaled_dot_product_attention under a
position mask, any device and dtype) and "flash" (flash-attn's `flash_attn_with_kvcache`, CUDA and bf16/fp16
only, from the `gpu` extra). Each has its own cache layout: SDPA wants [B, H, S, D] so that a slot range is a
view, flash-attn wants [B, S, H, D] and writes the new keys/values into it itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autojudge.engine.config import ModelConfig
from autojudge.errors import AutojudgeError

ATTENTION_BACKENDS = ("sdpa", "flash")
GPU_EXTRA_HINT = "pip install -e '.[gpu]'"


def check_attention(attention: str, device, dtype: torch.dtype):
    """Returns flash-attn's kernel for "flash" (None for "sdpa"); fails with the fix when it cannot run here."""
    if attention not in ATTENTION_BACKENDS:
        raise AutojudgeError(f"unknown attention backend {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if attention == "sdpa":
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        raise AutojudgeError(f"attention 'flash' needs the flash-attn package: {GPU_EXTRA_HINT}; "
                             "or use attention 'sdpa'") from None
    if torch.device(device).type != "cuda":
        raise AutojudgeError(f"attention 'flash' runs on CUDA only, not {device}; use attention 'sdpa' "
                             f"(on a GPU machine: --device cuda and {GPU_EXTRA_HINT})")
    if dtype not in (torch.bfloat16, torch.float16):
        raise AutojudgeError(f"attention 'flash' computes in bf16/fp16, not {dtype}; use --dtype bf16 or attention 'sdpa'")
    return flash_attn_with_kvcache


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation can still get on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch's caching allocator holds but no tensor uses is free to torch, not to the driver.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil  # installed with accelerate

    return psutil.virtual_memory().available


def kv_cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """Keys and values stay fp32 on a CPU whatever the weights' precision: torch's CPU attention in bf16 (SDPA and
    the few-row products of a decode step alike) runs ~6x slower than in fp32 even with AVX512_BF16, while bf16
    projections run ~3.6x faster than fp32 ones (bench/RESULTS.md). Accelerators keep the weights' precision."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def cache_bytes(cfg: ModelConfig, max_seq_len: int, batch: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """What `Transformer.setup_cache` allocates: keys and values of every layer with their row ids, the RoPE
    tables, the positions."""
    kv_itemsize = kv_cache_dtype(dtype, device).itemsize
    per_slot = (2 * cfg.num_layers * batch * cfg.num_kv_heads * kv_itemsize + 2 * dtype.itemsize) * cfg.head_dim + 8
    return (max_seq_len + 1) * per_slot + cfg.num_layers * batch * 8


class Linear(nn.Linear):
    """nn.Linear whose CPU fp32 product for several rows is computed as W @ x^T.

    MKL serves x @ W^T with few rows (a batch of decode steps, a verify pass, a logits row per mismatch) by a slow
    path: on a 2-core AVX2 host a 4-token pass of the 1.5B target cost 3.1 single-token passes, as W @ x^T it costs
    1.0, and forwards of 2-33 tokens run 1.4-3.1x faster (bench/cpu_linear.py). One row stays F.linear: both forms
    are the same GEMV there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or x.numel() == x.shape[-1]:
            return F.linear(x, weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = (torch.mm(weight, rows.T) if self.bias is None else torch.addmm(self.bias[:, None], weight, rows.T))
        return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly like transformers, so bf16 runs agree.
        in_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(in_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype, device):
        super().__init__()
        # Zeros, not empty: a masked slot gets weight exactly 0, but 0 * NaN from stale memory is still NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("row_ids", torch.arange(shape[0], device=device)[:, None], persistent=False)

    def update(self, rows: slice, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes k/v [B, H, T, D] of cache rows `rows` at per-row slots `positions` [B, T]; returns those rows."""
        keys, values = self.k[rows], self.v[rows]
        # An indexed write, not scatter_: torch's CPU scatter_ in bf16 takes ~600x its fp32 time (95 ms for one
        # token of 128 rows, bench/RESULTS.md), more than the layer's products.
        slot = (self.row_ids[: k.shape[0]], slice(None), positions)
        keys[slot] = k.transpose(1, 2).to(keys.dtype)
        values[slot] = v.transpose(1, 2).to(values.dtype)
        return keys, values


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k/v [B, H_kv, L, D], query head h reading KV head h // (H / H_kv); `mask` None
    or bool [B or 1, 1, T, L]. Each KV head's query heads are folded into its query rows rather than passing
    enable_gqa, which torch's CPU SDPA serves about twice as slowly: a decode step's attention at 64 rows x 750
    slots took 22 ms a layer with enable_gqa and 9-14 folded (fp32, 2 cores; bench/cpu_attention.py)."""
    batch, heads, seqlen, head_dim = q.shape
    group = heads // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(batch, k.shape[1], group * seqlen, head_dim)
    if mask is not None:
        mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(mask.shape[0], 1, group * seqlen, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(batch, heads, seqlen, head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.flash_attn = None  # flash_attn_with_kvcache when the "flash" backend is set up

    def forward(self, x, cos, sin, positions, visible, cache_lens, kv_len: int, rows: slice | list[Segment]):
        """SDPA reads `visible` ([B, 1, T, kv_len] bool: slot j is visible to query t of row b); flash-attn reads
        `cache_lens` (int32 [B]: the cache length before these tokens); the other one is None. `rows`: the
        cache rows of this batch, or for a packed batch (B = 1, see `Transformer.forward_packed`) its segments."""
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if isinstance(rows, list):
            return self.o_proj(self._attend_segments(q[0], k[0], v[0], rows).transpose(0, 1).reshape(bsz, seqlen, -1))
        if self.flash_attn is not None:
            # Appends k/v at slot cache_lens[b] and lets query i see slots <= cache_lens[b] + i (bottom-right
            # causal): SDPA's visibility, as positions are always consecutive from the cache length.
            cache = self.kv_cache
            out = self.flash_attn(q.transpose(1, 2), cache.k[rows], cache.v[rows], k=k.transpose(1, 2),
                                  v=v.transpose(1, 2), cache_seqlens=cache_lens, causal=True)
            return self.o_proj(out.reshape(bsz, seqlen, -1))
        k_all, v_all = self.kv_cache.update(rows, positions, k, v)
        out = _attend(q.to(k_all.dtype), k_all[:, :, :kv_len], v_all[:, :, :kv_len], visible)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(bsz, seqlen, -1))

    def _attend_segments(self, q, k, v, segments: list[Segment]):
        """q [H, N, D], k/v [H_kv, N, D] of a packed batch: each segment writes its keys/values into its own cache
        row and attends to that row alone. Returns [H, N, D]."""
        out = torch.empty_like(q)
        cache = self.kv_cache
        for segment in segments:
            span = slice(segment.begin, segment.begin + segment.count)
            slots = slice(segment.start, segment.start + segment.count)
            cache.k[segment.row, :, slots] = k[:, span]
            cache.v[segment.row, :, slots] = v[:, span]
            visible = slice(segment.row, segment.row + 1), slice(None), slice(0, slots.stop)
            out[:, span] = _attend(q[None, :, span].to(cache.k.dtype), cache.k[visible], cache.v[visible],
                                   segment.mask)[0]
        return out


class Segment:
    """Tokens [begin, begin + count) of a packed batch: the new tokens of cache row `row`, at positions from `start`
    on. `mask` [1, 1, count, start + count] (None for one token, which sees every slot up to its own) lets each
    attend to the slots up to its position."""

    def __init__(self, row: int, begin: int, start: int, count: int, cache_positions: torch.Tensor):
        self.row, self.begin, self.start, self.count = row, begin, start, count
        self.mask = None
        if count > 1:
            positions = cache_positions[start : start + count]
            self.mask = (cache_positions[: start + count][None, :] <= positions[:, None])[None, None]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, visible, cache_lens, kv_len, rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, visible, cache_lens, kv_len, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_seq_len = 0
        self.attention = "sdpa"

    def setup_cache(self, max_seq_len: int, batch: int = 1, attention: str = "sdpa"):
        """Allocates the KV cache (`batch` rows) and the RoPE tables once; decoding never allocates them again.

        Slot `max_seq_len`, one past the last real position, is a trash slot: padding tokens of a ragged batch
        are written there, and no real query ever sees it (slot j is visible to position p only if j <= p)."""
        param = self.lm_head.weight
        cfg = self.config
        flash_attn = check_attention(attention, param.device, param.dtype)
        self._check_memory(max_seq_len, batch)
        slots = max_seq_len + 1
        shape = ((batch, slots, cfg.num_kv_heads, cfg.head_dim) if flash_attn is not None
                 else (batch, cfg.num_kv_heads, slots, cfg.head_dim))
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(shape, kv_cache_dtype(param.dtype, param.device), param.device)
            layer.self_attn.flash_attn = flash_attn
        inv_freq = cfg.rope_inv_freq().to(param.device)
        freqs = torch.outer(torch.arange(slots, device=param.device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(param.dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(param.dtype), persistent=False)
        self.register_buffer("cache_positions", torch.arange(slots, device=param.device), persistent=False)
        self.max_seq_len = max_seq_len
        self.batch = batch
        self.attention = attention

    def _check_memory(self, max_seq_len: int, batch: int):
        """Refuses a cache that cannot fit, which would otherwise fail deep in the allocator or, on a host that
        overcommits memory, swap until it is killed."""
        param = self.lm_head.weight
        need = cache_bytes(self.config, max_seq_len, batch, param.dtype, param.device)
        # A cache set up before is dropped as the new one replaces it.
        free = available_memory(param.device) + sum(b.nbytes for b in self.buffers())
        if need > free:
            rows = f" x {batch} rows" if batch > 1 else ""
            fits = free * max_seq_len // need
            raise AutojudgeError(
                f"a KV cache of {max_seq_len} tokens{rows} needs {need / 2**30:.1f} GiB ({need} bytes) on "
                f"{param.device}, but {free / 2**30:.1f} GiB ({free} bytes) is available; lower --max-seq-len "
                f"(about {fits} tokens{rows} fit)"
            )

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, logits_from: int | None = 0,
                rows: slice | None = None):
        """tokens [B, T] at cache `positions` ([T] shared by the rows, or [B, T]) of cache rows `rows` (default the
        first B); attends to cache slots [0, kv_len).

        Any kv_len past the last position gives the same logits, since the mask zeroes the slots beyond it:
        CUDA graphs pass max_seq_len, so no host value of the current length is baked into a recording.
        The flash backend ignores kv_len (it reads the length off `positions` on the device), and needs
        `positions` consecutive, as every caller passes them.

        Returns (logits [B, T', V] fp32 for the positions from index `logits_from` on, or None when it is None;
        hidden [B, T, D]: the last layer's output after the final norm).
        """
        return self._run(tokens, positions, kv_len, logits_from, slice(0, tokens.shape[0]) if rows is None else rows)

    def forward_packed(self, tokens: torch.Tensor, rows: list[tuple[int, int, int]]):
        """A ragged batch with no padding: tokens [N] are the new tokens of several cache rows one after another,
        `rows` their (cache row, first position, count) in that order. Every projection runs once over the N
        tokens, where a padded batch runs it over rows x the longest; each row attends to its own cache.
        Returns hidden [N, D] after the final norm."""
        if self.attention == "flash":
            raise AutojudgeError("packed batches need attention 'sdpa'; drop attention 'flash'")
        if all(count == 1 for _, _, count in rows):
            return self._one_token_rows(tokens, rows)
        segments, begin = [], 0
        for row, start, count in rows:
            segments.append(Segment(row, begin, start, count, self.cache_positions))
            begin += count
        positions = torch.cat([self.cache_positions[start : start + count] for _, start, count in rows])
        _, hidden = self._run(tokens[None], positions[None], 0, None, segments)
        return hidden[0]

    def _one_token_rows(self, tokens: torch.Tensor, rows: list[tuple[int, int, int]]):
        """A packed batch of one token a row, run as a padded one: a single attention call over the rows is
        cheaper than one per row (bench/packed_rounds.py), and there is no padding to skip."""
        index = torch.tensor([row for row, _, _ in rows], device=tokens.device)
        batch = int(index.max()) + 1
        padded = torch.zeros(batch, 1, dtype=tokens.dtype, device=tokens.device)
        positions = torch.full_like(padded, self.max_seq_len)  # rows without a token write the trash slot
        padded[index, 0] = tokens
        positions[index, 0] = torch.tensor([start for _, start, _ in rows], device=tokens.device)
        kv_len = max(start for _, start, _ in rows) + 1
        _, hidden = self._run(padded, positions, kv_len, None, slice(0, batch))
        return hidden[index, 0]

    def _run(self, tokens, positions, kv_len: int, logits_from: int | None, rows: slice | list[Segment]):
        batch = tokens.shape[0]
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        # A draft with fewer rows than its target may be handed an id of the target's padding rows, which a trained
        # target never emits: it embeds as the last row (the draft only proposes, so output is unchanged).
        x = self.model.embed_tokens(tokens.clamp(max=self.config.vocab_size - 1))
        cos = self.rope_cos[positions][:, None]
        sin = self.rope_sin[positions][:, None]
        visible = cache_lens = None
        if self.attention == "flash":
            cache_lens = positions[:, 0].to(torch.int32)
        elif not isinstance(rows, list):  # a packed batch's segments carry their own masks
            # Slot j is visible to a query at position p iff j <= p: stale slots past p never leak in.
            visible = (self.cache_positions[:kv_len][None, None, :] <= positions[:, :, None])[:, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, visible, cache_lens, kv_len, rows)
        hidden = self.model.norm(x)
        logits = None if logits_from is None else self.lm_head(hidden[:, logits_from:]).float()
        return logits, hidden
