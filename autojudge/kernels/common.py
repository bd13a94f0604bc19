"""Verify-step inputs and outputs shared by the Triton kernel and the eager reference.

Terms (vLLM's): of the K drafted tokens, the *accepted* ones are the leading run that passes the
verification; the one token the target adds after them is either *recovered* (drawn in place of the
first rejected draft token) or, when all K are accepted, the *bonus* token (drawn from row K). A cycle
therefore emits ``num_accepted`` draft tokens plus ``next_token`` (recovered or bonus).

Semantics (per sequence b, drafted tokens d_0..d_{K-1}, target logits rows L_0..L_K where row i
predicts drafted position i and row K the bonus token). ``target_ok`` is the lossless rule, the
target's own verdict; ``judge_ok`` the judge's:

* greedy (temperature == 0): ``target_ok_i = argmax(L_i) == d_i``.
* sampling (temperature T > 0): p = softmax(L / T), q = ``draft_probs`` (already tempered);
  ``target_ok_i = u_i * q_i(d_i) <= p_i(d_i)``, i.e. ``u_i <= min(1, p/q)`` without dividing
  (q = 0 accepts). The token emitted at the first rejection j is an exponential-race draw
  ``argmax_v w_v / n_v`` with ``w = max(p_j - q_j, 0)``; after K acceptances ``w = p_K``.
  Tokens with ``w_v == 0`` score 0 whatever their noise, so a zero-probability token can only
  win when every ``w_v`` is 0 (then the lowest index, 0, is emitted).
* judge: ``judge_prob_i = sigmoid(f_i . w + b)``, ``judge_ok_i = judge_prob_i < threshold``.
* top-k rule (``topk`` > 0, a training-free lossy baseline in place of the judge): on row i's raw
  logits L_i (temperature 1 even when sampling, NaN -> -inf, +inf kept),
  ``rank_i = #{v : L_i[v] > L_i[d_i]}`` (ties share the better rank), ``judge_prob_i =
  exp(L_i[d_i] - max L_i)`` (1 when L_i[d_i] is the max, +inf included; 0 when d_i is out of
  vocabulary or L_i[d_i] is -inf/NaN) and ``judge_ok_i = rank_i < topk and
  L_i[d_i] - max L_i >= log(topk_alpha)``, the difference compared in fp32 (``topk_alpha`` 0:
  no probability condition), never for an out-of-vocabulary or -inf/NaN draft.
* protected tokens (``protected_tokens`` [V] bool, e.g. end-of-sequence and code-fence tokens): where the
  target's own choice at row i, ``argmax L_i`` (raw logits even when sampling, NaN -> -inf, lowest index
  among ties), is protected, ``judge_ok_i`` is False whatever the judge or top-k rule says (``judge_prob_i``
  is still reported): a lossy rule may swap one token of the answer for another, never overrule the target's
  choice to end it.
* ``ok_i = target_ok_i | judge_ok_i``; ``num_accepted`` = index of the first not-ok position
  (K if none); ``next_token`` = the greedy argmax / sampled token of row ``num_accepted``.
  Positions accepted only by the judge keep the drafted token: the caller emits
  ``draft_tokens[:num_accepted]`` followed by ``next_token``.

Non-finite logits (identical in kernel and reference):

* NaN is treated as -inf: never chosen by argmax and zero probability when sampling.
* +inf wins greedy argmax (lowest index among several). When sampling, ``L / T`` is clamped to
  the largest finite fp32, so all +inf tokens share the probability mass equally.
* A row that is entirely NaN / -inf has argmax 0 and, when sampling, p = 0 everywhere
  (a drafted token is then accepted only if its q is 0 too, and the draw emits token 0).
* Drafted tokens outside [0, V) are never target-accepted (checked on device, no host sync).

Randomness when sampling: explicit ``uniforms`` [B, K] and exponential ``noise`` [B, K+1, V]
give results that the kernel and the reference agree on exactly (up to fp32 rounding of p,
which only matters at measure-zero ties). With ``seed`` (+ ``offset``) the kernel draws from
Philox inside the launch while the reference uses a seeded ``torch.Generator``: both are
correct samplers but they do not produce the same numbers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class VerifyOutput:
    """Results of one verify step; reusable as ``out=`` so every cycle writes the same buffers."""

    num_accepted: torch.Tensor  # [B] int64
    next_token: torch.Tensor  # [B] int64
    target_ok: torch.Tensor  # [B, K] bool
    judge_ok: torch.Tensor  # [B, K] bool
    judge_prob: torch.Tensor  # [B, K] fp32
    # The Triton path keeps its scratch (per-split partials, arrival counters) here so that a
    # reused ``out`` needs no allocation or memset per cycle, which CUDA-graph capture requires.
    workspace: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, batch: int, k: int, device: torch.device | str) -> VerifyOutput:
        return cls(
            num_accepted=torch.empty(batch, dtype=torch.int64, device=device),
            next_token=torch.empty(batch, dtype=torch.int64, device=device),
            target_ok=torch.empty(batch, k, dtype=torch.bool, device=device),
            judge_ok=torch.empty(batch, k, dtype=torch.bool, device=device),
            judge_prob=torch.empty(batch, k, dtype=torch.float32, device=device),
        )


@dataclass
class VerifyInputs:
    """Validated, normalised arguments (features always a tuple, last dims contiguous)."""

    logits: torch.Tensor
    draft_tokens: torch.Tensor
    features: tuple[torch.Tensor, ...]
    judge_weight: torch.Tensor | None
    judge_bias: float
    threshold: float
    temperature: float
    draft_probs: torch.Tensor | None
    uniforms: torch.Tensor | None
    noise: torch.Tensor | None
    seed: int | None
    offset: int | torch.Tensor
    topk: int
    topk_alpha: float
    protected_tokens: torch.Tensor | None
    out: VerifyOutput

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    @property
    def k(self) -> int:
        return self.draft_tokens.shape[1]

    @property
    def vocab(self) -> int:
        return self.logits.shape[2]

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def topk_log_alpha(self) -> float:
        return math.log(self.topk_alpha) if self.topk_alpha > 0 else float("-inf")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but target_logits is on {device}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def prepare_inputs(
    target_logits,
    draft_tokens,
    *,
    judge_features,
    judge_weight,
    judge_bias,
    threshold,
    temperature,
    draft_probs,
    uniforms,
    noise,
    seed,
    offset,
    topk,
    topk_alpha,
    protected_tokens,
    out,
) -> VerifyInputs:
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3:
        shape = tuple(target_logits.shape) if isinstance(target_logits, torch.Tensor) else None
        raise ValueError(f"target_logits must be a [B, K+1, V] tensor, got shape {shape}")
    _check_float("target_logits", target_logits)
    batch, rows, vocab = target_logits.shape
    device = target_logits.device
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2:
        raise ValueError("draft_tokens must be a [B, K] integer tensor")
    k = draft_tokens.shape[1]
    if batch < 1 or k < 1 or vocab < 1:
        raise ValueError(f"need B >= 1, K >= 1 drafted tokens and V >= 1, got B={batch}, K={k}, V={vocab}")
    _check_shape("draft_tokens", draft_tokens, (batch, k), device)
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_tokens must be int32 or int64, got {draft_tokens.dtype}")
    if rows != k + 1:
        raise ValueError(f"target_logits has {rows} rows per sequence; K={k} drafted tokens need K+1={k + 1}")

    temperature = float(temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0:
        if draft_probs is None:
            raise ValueError("temperature > 0 needs draft_probs [B, K, V] (the tempered draft distribution)")
        _check_shape("draft_probs", draft_probs, (batch, k, vocab), device)
        _check_float("draft_probs", draft_probs)
        draft_probs = _last_dim_contiguous(draft_probs)
        if (uniforms is None) != (noise is None):
            raise ValueError("pass both uniforms and noise, or neither (and a seed)")
        if uniforms is None and seed is None:
            raise ValueError("temperature > 0 needs randomness: pass seed=, or uniforms= and noise=")
        if uniforms is not None:
            _check_shape("uniforms", uniforms, (batch, k), device)
            _check_shape("noise", noise, (batch, k + 1, vocab), device)
            _check_float("uniforms", uniforms)
            _check_float("noise", noise)
            noise = _last_dim_contiguous(noise)
        if seed is not None and not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        if isinstance(offset, torch.Tensor):
            if offset.numel() != 1 or offset.dtype != torch.int64 or offset.device != device:
                raise ValueError("a tensor offset must be a one-element int64 tensor on the logits' device")
        elif not 0 <= int(offset) < 2**63:
            raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    else:
        draft_probs = uniforms = noise = None

    if judge_features is None:
        if judge_weight is not None:
            raise ValueError("judge_weight given without judge_features")
        features: tuple[torch.Tensor, ...] = ()
    else:
        features = (judge_features,) if isinstance(judge_features, torch.Tensor) else tuple(judge_features)
        if not 1 <= len(features) <= 2:
            raise ValueError(f"judge_features must be one tensor or a tuple of 1-2 tensors, got {len(features)}")
        for i, f in enumerate(features):
            if not isinstance(f, torch.Tensor) or f.dim() != 3:
                raise ValueError(f"judge_features[{i}] must be a [B, K, D] tensor")
            _check_shape(f"judge_features[{i}]", f, (batch, k, f.shape[2]), device)
            _check_float(f"judge_features[{i}]", f)
        features = tuple(_last_dim_contiguous(f) for f in features)
        dim = sum(f.shape[2] for f in features)
        if judge_weight is None:
            raise ValueError("judge_features given without judge_weight")
        _check_shape("judge_weight", judge_weight, (dim,), device)
        if judge_weight.dtype != torch.float32:
            raise ValueError(f"judge_weight must be float32, got {judge_weight.dtype}")
        judge_weight = judge_weight.contiguous()

    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 0:
        raise ValueError(f"topk must be an int >= 0, got {topk!r}")
    topk_alpha = float(topk_alpha)
    if not 0 <= topk_alpha <= 1:
        raise ValueError(f"topk_alpha must be in [0, 1], got {topk_alpha}")
    if topk and features:
        raise ValueError("topk > 0 replaces the judge: pass judge_features or topk, not both")

    if protected_tokens is not None:
        _check_shape("protected_tokens", protected_tokens, (vocab,), device)
        if protected_tokens.dtype != torch.bool:
            raise ValueError(f"protected_tokens must be a bool mask over the vocabulary, got {protected_tokens.dtype}")
        # Without a judge or top-k rule nothing can overrule the target: there is nothing to protect.
        protected_tokens = protected_tokens.contiguous() if (features or topk) else None

    if out is None:
        out = VerifyOutput.empty(batch, k, device)
    else:
        expected = {
            "num_accepted": ((batch,), torch.int64),
            "next_token": ((batch,), torch.int64),
            "target_ok": ((batch, k), torch.bool),
            "judge_ok": ((batch, k), torch.bool),
            "judge_prob": ((batch, k), torch.float32),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(out, name)
            _check_shape(f"out.{name}", t, shape, device)
            if t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"out.{name} must be a contiguous {dtype} tensor")

    return VerifyInputs(
        logits=_last_dim_contiguous(target_logits),
        draft_tokens=draft_tokens,
        features=features,
        judge_weight=judge_weight,
        judge_bias=float(judge_bias),
        threshold=float(threshold),
        temperature=temperature,
        draft_probs=draft_probs,
        uniforms=uniforms,
        noise=noise,
        seed=None if seed is None else int(seed),
        offset=offset,
        topk=int(topk),
        topk_alpha=topk_alpha,
        protected_tokens=protected_tokens,
        out=out,
    )
