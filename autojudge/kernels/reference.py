"""Eager torch verify step: the specification the Triton kernel is tested against.

Every formula mirrors the kernel's (same sanitisation, same ``u * q <= p`` test, same
``where(w > 0, w / n, 0)`` race score) so that with explicit uniforms and noise the two agree
exactly rather than merely in distribution. See ``autojudge.kernels.common`` for semantics.
"""

from __future__ import annotations

import torch

from autojudge.kernels.common import VerifyInputs, VerifyOutput, prepare_inputs

FP32_MAX = torch.finfo(torch.float32).max


def sanitised(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 with NaN -> -inf (+inf kept): what argmax and the top-k rule see."""
    x = logits.float()
    return torch.where(torch.isnan(x), float("-inf"), x)


def sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(L / T) in fp32 under the NaN -> -inf, +inf -> FP32_MAX policy; all-masked rows -> 0."""
    x = (sanitised(logits) / temperature).clamp(max=FP32_MAX)
    m = x.amax(-1, keepdim=True)
    e = torch.where(x > float("-inf"), torch.exp(x - m), 0.0)
    s = e.sum(-1, keepdim=True)
    return torch.where(s > 0, e / s, 0.0)


def _seeded_randomness(inp: VerifyInputs) -> tuple[torch.Tensor, torch.Tensor]:
    offset = int(inp.offset)  # a tensor offset costs a host sync here; the eager path syncs anyway
    gen = torch.Generator(device=inp.logits.device)
    gen.manual_seed((inp.seed * 0x9E3779B97F4A7C15 + offset) % 2**63)
    b, k, v = inp.batch, inp.k, inp.vocab
    uniforms = torch.rand(b, k, generator=gen, device=inp.logits.device)
    noise = torch.empty(b, k + 1, v, device=inp.logits.device).exponential_(generator=gen)
    return uniforms, noise


def _judge_probs(inp: VerifyInputs) -> torch.Tensor:
    z = torch.full((inp.batch, inp.k), inp.judge_bias, dtype=torch.float32, device=inp.logits.device)
    start = 0
    for f in inp.features:
        d = f.shape[2]
        z = z + f.float() @ inp.judge_weight[start : start + d]
        start += d
    return torch.sigmoid(z)


def _topk_rule(
    inp: VerifyInputs, in_vocab: torch.Tensor, safe_draft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(judge_prob, judge_ok) of the top-k rule: the probability ratio to the top token and the verdict."""
    x = sanitised(inp.logits[:, : inp.k])
    x_d = x.gather(-1, safe_draft).squeeze(-1)
    top = x.amax(-1)
    rank = (x > x_d.unsqueeze(-1)).sum(-1)
    valid = in_vocab & (x_d > float("-inf"))
    # As in the kernel: a tie with the max is ratio 1 even at +inf, and no inf - inf is computed.
    below = valid & (x_d != top)
    diff = torch.where(below, x_d, 0.0) - torch.where(below, top, 0.0)
    # A 0-dim fp32 tensor: log(alpha) rounded to fp32 as the kernel receives it, not compared in fp64.
    log_alpha = torch.tensor(inp.topk_log_alpha, dtype=torch.float32)
    ok = valid & (rank < inp.topk) & (diff >= log_alpha)
    return torch.where(valid, torch.exp(diff), 0.0), ok


def verify_reference(
    target_logits,
    draft_tokens,
    *,
    judge_features=None,
    judge_weight=None,
    judge_bias=0.0,
    threshold=0.5,
    temperature=0.0,
    draft_probs=None,
    uniforms=None,
    noise=None,
    seed=None,
    offset=0,
    topk: int = 0,
    topk_alpha: float = 0.0,
    protected_tokens: torch.Tensor | None = None,
    out: VerifyOutput | None = None,
) -> VerifyOutput:
    """Eager verify step; same signature and results as ``autojudge.kernels.verify``."""
    inp = prepare_inputs(
        target_logits, draft_tokens, judge_features=judge_features, judge_weight=judge_weight,
        judge_bias=judge_bias, threshold=threshold, temperature=temperature, draft_probs=draft_probs,
        uniforms=uniforms, noise=noise, seed=seed, offset=offset, topk=topk, topk_alpha=topk_alpha,
        protected_tokens=protected_tokens, out=out,
    )
    b, k, v = inp.batch, inp.k, inp.vocab
    device = inp.logits.device
    rows = torch.arange(b, device=device)
    draft = inp.draft_tokens.long()
    in_vocab = (draft >= 0) & (draft < v)
    safe_draft = torch.where(in_vocab, draft, 0).unsqueeze(-1)

    if inp.sampling:
        p = sampling_probs(inp.logits, inp.temperature)
        q = inp.draft_probs.float()
        if inp.uniforms is None:
            u, n = _seeded_randomness(inp)
        else:
            u, n = inp.uniforms.float(), inp.noise.float()
        p_d = p[:, :k].gather(-1, safe_draft).squeeze(-1)
        q_d = q.gather(-1, safe_draft).squeeze(-1)
        target_ok = in_vocab & (u * q_d <= p_d)
    else:
        greedy = sanitised(inp.logits).argmax(-1)
        target_ok = greedy[:, :k] == draft

    if inp.topk:
        judge_prob, judge_ok = _topk_rule(inp, in_vocab, safe_draft)
    elif inp.features:
        judge_prob = _judge_probs(inp)
        judge_ok = judge_prob < inp.threshold
    else:
        judge_prob = torch.zeros(b, k, dtype=torch.float32, device=device)
        judge_ok = torch.zeros(b, k, dtype=torch.bool, device=device)

    if inp.protected_tokens is not None:
        judge_ok = judge_ok & ~inp.protected_tokens[sanitised(inp.logits[:, :k]).argmax(-1)]

    rejected = ~(target_ok | judge_ok)
    # argmax over [rejected, True] finds the first rejection, or K when there is none.
    num_accepted = torch.cat([rejected, rejected.new_ones(b, 1)], dim=1).int().argmax(-1)

    if inp.sampling:
        q_row = torch.cat([q, q.new_zeros(b, 1, v)], dim=1)[rows, num_accepted]
        w = (p[rows, num_accepted] - q_row).clamp(min=0)
        score = torch.where(w > 0, w / n[rows, num_accepted], 0.0)
        next_token = score.argmax(-1)
    else:
        next_token = greedy[rows, num_accepted]

    o = inp.out
    o.num_accepted.copy_(num_accepted)
    o.next_token.copy_(next_token)
    o.target_ok.copy_(target_ok)
    o.judge_ok.copy_(judge_ok)
    o.judge_prob.copy_(judge_prob)
    return o
