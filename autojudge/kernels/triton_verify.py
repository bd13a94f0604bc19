"""Fused verify step: one Triton launch when greedy, two when sampling, no host sync (semantics in
``autojudge.kernels.common``).

Grid ``(S, K+1, B)``: program (s, r, b) reduces vocabulary split s of logits row r of sequence b
(blocked online max/argmax, plus the running softmax denominator when sampling, plus for the
top-k rule the count of logits above the drafted token's and the raw max) into one partial, and
split 0 of each drafted row also does the judge dot product over the D blocks of each feature
tensor. Splitting V keeps a B=1 step from running on only K+1 SMs. Each program then
takes a ticket from a per-sequence atomic counter; the last of the (K+1)*S programs of sequence b
combines the partials, runs the accept scan, picks the greedy next token and resets the counter,
so a reused workspace is ready for the next cycle (or CUDA-graph replay) without a memset.
When sampling, a second launch, grid ``(S', B)``, draws the next token from the row the scan
chose, split over V the same way (ticket, last program combines).

That last program starts only once all the others of its sequence are done, so its latency is
the step's tail. It therefore handles all K+1 rows at once (an ``[R_PAD, S_PAD]`` tile of partials,
R_PAD = next power of two of K+1, reduced per row, and the first rejection found by a reduction)
instead of scanning the rows, whose dependent loads cost one L2 round trip per drafted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from autojudge.errors import AutojudgeError
from autojudge.kernels.common import VerifyInputs, VerifyOutput, prepare_inputs

FP32_MAX = tl.constexpr(3.4028234663852886e38)
MAX_SPLITS = 64

INTERPRET_HINT = "Triton kernels on CPU need TRITON_INTERPRET=1 set before autojudge is imported; or use --kernels eager"


@triton.jit
def _load_row_x(row_ptr, idx, mask, temperature, SAMPLING: tl.constexpr):
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)  # noqa: PLR0124 (only NaN differs from itself)
    if SAMPLING:
        x = _temper(x, temperature)
    return x


@triton.jit
def _temper(x, temperature):
    return tl.minimum(x / temperature, FP32_MAX)


@triton.jit
def _uniform(seed, offset, c0, c1):
    # Philox counter = (vocab index or V for the accept test, b*(K+1)+row, offset lo, offset hi):
    # every (cycle, sequence, row, token) gets its own stream, and offsets past 2**32 stay distinct.
    c0 = c0.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c0 * 0 + c1.to(tl.uint32), c0 * 0 + (offset & 0xFFFFFFFF).to(tl.uint32),
                           c0 * 0 + (offset >> 32).to(tl.uint32))
    return tl.uint_to_uniform_float(r)


# Specialising on value would recompile whenever a seed, K or V happens to equal 1.
@triton.jit(do_not_specialize=["seed", "offset_val", "judge_bias", "threshold", "temperature", "D1", "D2", "K", "V",
                               "split_len", "S", "topk", "log_alpha"])
def _verify_kernel(
    logits_ptr, stride_lb, stride_lr,
    draft_ptr, stride_db, stride_dk,
    q_ptr, stride_qb, stride_qk,
    u_ptr, stride_ub, stride_uk,
    f1_ptr, stride_f1b, stride_f1k, D1,
    f2_ptr, stride_f2b, stride_f2k, D2,
    w_ptr, judge_bias, threshold, temperature, topk, log_alpha, protect_ptr,
    seed, offset_val, offset_ptr,
    part_max_ptr, part_idx_ptr, part_sum_ptr, part_cnt_ptr, part_top_ptr, counter_ptr,
    num_acc_ptr, next_tok_ptr, target_ok_ptr, judge_ok_ptr, judge_prob_ptr, sel_max_ptr, sel_sum_ptr,
    K, V, split_len, S,
    S_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SAMPLING: tl.constexpr, HAS_JUDGE: tl.constexpr, HAS_F2: tl.constexpr, TOPK: tl.constexpr,
    PROTECT: tl.constexpr, SEEDED: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
):
    s = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)

    # ---- phase 1: this program's vocabulary split of row r -------------------------------------
    row_ptr = logits_ptr + b * stride_lb + r * stride_lr
    start = s * split_len
    end = tl.minimum(start + split_len, V)
    best = float("-inf")
    best_idx = 0
    denom = 0.0
    above = 0
    raw_max = float("-inf")
    raw_idx = 0
    if TOPK:
        # The bonus row and out-of-vocabulary drafts count against -inf: phase 2 ignores those rows.
        d_own = tl.load(draft_ptr + b * stride_db + r * stride_dk, mask=r < K, other=-1).to(tl.int64)
        own_ok = (d_own >= 0) & (d_own < V)
        x_own = _load_row_x(row_ptr, tl.where(own_ok, d_own, 0), own_ok, temperature, False)
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        raw = _load_row_x(row_ptr, idx, idx < end, temperature, False)
        if SAMPLING:
            x = _temper(raw, temperature)
        else:
            x = raw
        if TOPK:
            above += tl.sum((raw > x_own).to(tl.int32), 0)  # strict: ties share the better rank
        if SAMPLING and (TOPK or PROTECT):
            # Greedy's best already is the raw max and argmax; tempering clamps, so it may tie distinct raw maxima.
            raw_best, raw_block_idx = tl.max(raw, 0, return_indices=True, return_indices_tie_break_left=True)
            take_raw = raw_best > raw_max
            raw_idx = tl.where(take_raw, v0 + raw_block_idx, raw_idx)
            raw_max = tl.where(take_raw, raw_best, raw_max)
        if SAMPLING:
            new_best = tl.maximum(best, tl.max(x, 0))
            # Online softmax denominator; the where()s keep all -inf rows at 0 instead of NaN.
            scale = tl.where(best == new_best, 1.0, tl.exp(best - new_best))
            denom = denom * scale + tl.sum(tl.where(x > float("-inf"), tl.exp(x - new_best), 0.0), 0)
            best = new_best
        else:
            block_best, block_idx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            # Strict > keeps the earlier block on ties: lowest index wins, like torch.argmax.
            take = block_best > best
            best_idx = tl.where(take, v0 + block_idx, best_idx)
            best = tl.where(take, block_best, best)
    part = (b * (K + 1) + r) * S + s
    tl.store(part_max_ptr + part, best)
    if SAMPLING:
        tl.store(part_sum_ptr + part, denom)
    else:
        tl.store(part_idx_ptr + part, best_idx)
    if TOPK:
        tl.store(part_cnt_ptr + part, above)
    if SAMPLING and (TOPK or PROTECT):
        tl.store(part_top_ptr + part, raw_max)
    if SAMPLING and PROTECT:
        tl.store(part_idx_ptr + part, raw_idx)

    if HAS_JUDGE and (s == 0) & (r < K):
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        f1 = f1_ptr + b * stride_f1b + r * stride_f1k
        for d0 in range(0, D1, BLOCK_D):
            dm = d0 + offs_d < D1
            f = tl.load(f1 + d0 + offs_d, mask=dm, other=0.0).to(tl.float32)
            acc += f * tl.load(w_ptr + d0 + offs_d, mask=dm, other=0.0)
        if HAS_F2:
            # The second feature block multiplies the tail of the weight: concatenation
            # along D without materialising it.
            f2 = f2_ptr + b * stride_f2b + r * stride_f2k
            for d0 in range(0, D2, BLOCK_D):
                dm = d0 + offs_d < D2
                f = tl.load(f2 + d0 + offs_d, mask=dm, other=0.0).to(tl.float32)
                acc += f * tl.load(w_ptr + D1 + d0 + offs_d, mask=dm, other=0.0)
        z = tl.sum(acc, 0) + judge_bias
        tl.store(judge_prob_ptr + b * K + r, 1.0 / (1.0 + tl.exp(-z)))

    # Make every thread's stores visible before the release; the last arriver acquires them.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + b, 1, sem="acq_rel", scope="gpu")
    if ticket != (K + 1) * S - 1:
        return

    # ---- phase 2 (last program of sequence b): combine, accept scan, next token ----------------
    # All rows at once, as an [R_PAD, S_PAD] tile or [R_PAD] vectors: no serial round trip per row.
    if OFFSET_FROM_PTR:
        offset = tl.load(offset_ptr).to(tl.int64)
    else:
        offset = offset_val.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    is_draft = offs_r < K
    offs_s = tl.arange(0, S_PAD)
    parts = (b * (K + 1) + offs_r)[:, None] * S + offs_s[None, :]
    tile_mask = (offs_r < K + 1)[:, None] & (offs_s < S)[None, :]
    # .cg: read through L2, never a stale L1 line of another SM's partial.
    pmax = tl.load(part_max_ptr + parts, mask=tile_mask, other=float("-inf"), cache_modifier=".cg")
    row_max = tl.max(pmax, 1)
    # Padding rows and the bonus row read no draft: -1 is out of vocabulary, so never target-accepted.
    d = tl.load(draft_ptr + b * stride_db + offs_r * stride_dk, mask=is_draft, other=-1).to(tl.int64)
    in_vocab = (d >= 0) & (d < V)
    d_safe = tl.where(in_vocab, d, 0)
    x_d_raw = _load_row_x(logits_ptr + b * stride_lb + offs_r * stride_lr, d_safe, is_draft, temperature, False)
    if SAMPLING:
        # Rows with no finite logit (padding rows too) have max -inf and sum 0: the safe max and
        # divisor give the same sums and p_d, without computing -inf - -inf or 0 / 0 on the way.
        row_max_safe = tl.where(row_max > float("-inf"), row_max, 0.0)
        psum = tl.load(part_sum_ptr + parts, mask=tile_mask, other=0.0, cache_modifier=".cg")
        row_sum = tl.sum(tl.where(pmax > float("-inf"), psum * tl.exp(pmax - row_max_safe[:, None]), 0.0), 1)
        x_d = _temper(x_d_raw, temperature)
        has_mass = row_sum > 0
        p_d = tl.where(has_mass, tl.exp(x_d - row_max_safe) / tl.where(has_mass, row_sum, 1.0), 0.0)
        q_d = tl.load(q_ptr + b * stride_qb + offs_r * stride_qk + d_safe, mask=is_draft, other=0.0).to(tl.float32)
        if SEEDED:
            u = _uniform(seed, offset, offs_r * 0 + V, b * (K + 1) + offs_r)
        else:
            u = tl.load(u_ptr + b * stride_ub + offs_r * stride_uk, mask=is_draft, other=0.0).to(tl.float32)
        target_ok = in_vocab & (u * q_d <= p_d)
        if TOPK or PROTECT:
            ptop = tl.load(part_top_ptr + parts, mask=tile_mask, other=float("-inf"), cache_modifier=".cg")
            row_top = tl.max(ptop, 1)
        if PROTECT:
            pidx = tl.load(part_idx_ptr + parts, mask=tile_mask, other=V, cache_modifier=".cg")
            row_tok = tl.min(tl.where(ptop == row_top[:, None], pidx, V), 1)
    else:
        pidx = tl.load(part_idx_ptr + parts, mask=tile_mask, other=V, cache_modifier=".cg")
        # Splits are in vocabulary order, so the smallest index among tied maxima is the global
        # lowest-index argmax.
        row_tok = tl.min(tl.where(pmax == row_max[:, None], pidx, V), 1)
        row_top = row_max
        target_ok = row_tok == d
    if TOPK:
        rank = tl.sum(tl.load(part_cnt_ptr + parts, mask=tile_mask, other=0, cache_modifier=".cg"), 1)
        valid = in_vocab & (x_d_raw > float("-inf"))
        # Only a finite logit below the max is subtracted: a tie is ratio 1 even at +inf, and no
        # inf - inf (or -inf - -inf on padding rows) makes a NaN.
        below = valid & (x_d_raw != row_top)
        diff = tl.where(below, x_d_raw, 0.0) - tl.where(below, row_top, 0.0)
        judge_ok = valid & (rank < topk) & (diff >= log_alpha)
        tl.store(judge_prob_ptr + b * K + offs_r, tl.where(valid, tl.exp(diff), 0.0), mask=is_draft)
    elif HAS_JUDGE:
        jp = tl.load(judge_prob_ptr + b * K + offs_r, mask=is_draft, other=1.0, cache_modifier=".cg")
        judge_ok = jp < threshold
    else:
        judge_ok = target_ok & False
        tl.store(judge_prob_ptr + b * K + offs_r, tl.zeros([R_PAD], dtype=tl.float32), mask=is_draft)
    if PROTECT:
        judge_ok = judge_ok & (tl.load(protect_ptr + row_tok, mask=is_draft & (row_tok < V), other=0) == 0)
    tl.store(target_ok_ptr + b * K + offs_r, target_ok.to(tl.int8), mask=is_draft)
    tl.store(judge_ok_ptr + b * K + offs_r, judge_ok.to(tl.int8), mask=is_draft)
    num_acc = tl.min(tl.where(is_draft & ~(target_ok | judge_ok), offs_r, K), 0)
    # Row num_acc's values, picked by masked reductions that are exact with a single survivor.
    chosen = offs_r == num_acc
    tl.store(num_acc_ptr + b, num_acc.to(tl.int64))
    if SAMPLING:
        # The draw itself is spread over the vocabulary by `_residual_draw_kernel`, launched next.
        tl.store(sel_max_ptr + b, tl.max(tl.where(chosen, row_max, float("-inf")), 0))
        tl.store(sel_sum_ptr + b, tl.sum(tl.where(chosen, row_sum, 0.0), 0))
    else:
        tl.store(next_tok_ptr + b, tl.max(tl.where(chosen, row_tok, 0), 0).to(tl.int64))
    tl.store(counter_ptr + b, 0)


@triton.jit(do_not_specialize=["seed", "offset_val", "temperature", "K", "V", "split_len", "S"])
def _residual_draw_kernel(
    logits_ptr, stride_lb, stride_lr,
    q_ptr, stride_qb, stride_qk,
    noise_ptr, stride_nb, stride_nr,
    temperature, seed, offset_val, offset_ptr,
    num_acc_ptr, sel_max_ptr, sel_sum_ptr,
    part_score_ptr, part_idx_ptr, counter_ptr, next_tok_ptr,
    K, V, split_len, S,
    S_PAD: tl.constexpr, BLOCK_V: tl.constexpr, SEEDED: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
):
    """Grid (S, B): the sampled token of row num_accepted[b], an exponential race (residual max(p - q, 0)
    after a rejection, p for the bonus row, q masked to 0) over vocabulary split s; the last program of
    sequence b combines the splits. A launch of its own, since the row to draw from is known only once every
    program of the verify launch is done; one program drawing over all of V took ~170 us on an H100."""
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if OFFSET_FROM_PTR:
        offset = tl.load(offset_ptr).to(tl.int64)
    else:
        offset = offset_val.to(tl.int64)
    num_acc = tl.load(num_acc_ptr + b)
    sel_max = tl.load(sel_max_ptr + b)
    sel_sum = tl.load(sel_sum_ptr + b)
    row_ptr = logits_ptr + b * stride_lb + num_acc * stride_lr
    q_row = q_ptr + b * stride_qb + tl.minimum(num_acc, K - 1) * stride_qk
    q_len = tl.where(num_acc < K, V, 0)
    start = s * split_len
    end = tl.minimum(start + split_len, V)
    race = -1.0
    best_idx = 0
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        mask = idx < end
        x = _load_row_x(row_ptr, idx, mask, temperature, True)
        p = tl.where(sel_sum > 0, tl.exp(x - sel_max) / sel_sum, 0.0)
        q = tl.load(q_row + idx, mask=idx < q_len, other=0.0).to(tl.float32)
        w = tl.maximum(p - q, 0.0)
        if SEEDED:
            n = -tl.log(_uniform(seed, offset, idx, b * (K + 1) + num_acc))
        else:
            n = tl.load(noise_ptr + b * stride_nb + num_acc * stride_nr + idx, mask=mask, other=1.0)
            n = n.to(tl.float32)
        score = tl.where(mask, tl.where(w > 0, w / n, 0.0), -1.0)
        block_best, block_idx = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        take = block_best > race  # strict: the earlier block keeps a tie
        best_idx = tl.where(take, v0 + block_idx, best_idx)
        race = tl.where(take, block_best, race)
    tl.store(part_score_ptr + b * S + s, race)
    tl.store(part_idx_ptr + b * S + s, best_idx)

    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + b, 1, sem="acq_rel", scope="gpu")
    if ticket != S - 1:
        return
    offs_s = tl.arange(0, S_PAD)
    # Every split holds an in-vocabulary token (score >= 0), so the padding's -2 never wins.
    scores = tl.load(part_score_ptr + b * S + offs_s, mask=offs_s < S, other=-2.0, cache_modifier=".cg")
    idxs = tl.load(part_idx_ptr + b * S + offs_s, mask=offs_s < S, other=V, cache_modifier=".cg")
    # Splits are in vocabulary order: the lowest index among tied scores, as one pass over V would pick.
    token = tl.min(tl.where(scores == tl.max(scores, 0), idxs, V), 0)
    tl.store(next_tok_ptr + b, token.to(tl.int64))
    tl.store(counter_ptr + b, 0)


@dataclass
class _Workspace:
    part_max: torch.Tensor
    part_idx: torch.Tensor
    part_sum: torch.Tensor
    part_cnt: torch.Tensor
    part_top: torch.Tensor
    counter: torch.Tensor
    # The residual draw's: row num_accepted's softmax max and sum, per-split race partials, arrivals.
    sel_max: torch.Tensor
    sel_sum: torch.Tensor
    race_score: torch.Tensor
    race_idx: torch.Tensor
    race_counter: torch.Tensor


@dataclass(frozen=True)
class LaunchConfig:
    splits: int
    split_len: int
    block_v: int
    block_d: int
    num_warps: int


def interpreted() -> bool:
    """True when this module's kernels were defined under TRITON_INTERPRET=1 (they run on CPU)."""
    return not isinstance(_verify_kernel, triton.runtime.JITFunction)


def launch_config(batch: int, k: int, vocab: int, device: torch.device) -> LaunchConfig:
    """Host-side, shape-only choice of blocks and V splits (deterministic, so graph-capturable)."""
    if device.type == "cuda":
        block_v, block_d, num_warps = 2048, 1024, 8
        # ~4 waves of programs keep HBM busy while each program still streams >= 2 blocks.
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter pays per block op, not per element: big blocks, few splits.
        block_v, block_d, num_warps = 4096, 4096, 1
        target_programs = 4
    block_v = min(block_v, triton.next_power_of_2(vocab))
    rows = batch * (k + 1)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(target_programs, rows), triton.cdiv(vocab, 2 * block_v)))
    split_len = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    return LaunchConfig(triton.cdiv(vocab, split_len), split_len, block_v, block_d, num_warps)


def _workspace(out: VerifyOutput, batch: int, k: int, splits: int, race_splits: int,
               device: torch.device) -> _Workspace:
    ws = out.workspace
    shape = (batch, k + 1, splits)
    if (not isinstance(ws, _Workspace) or tuple(ws.part_max.shape) != shape
            or tuple(ws.race_score.shape) != (batch, race_splits) or ws.counter.device != device):
        ws = _Workspace(
            part_max=torch.empty(shape, dtype=torch.float32, device=device),
            part_idx=torch.empty(shape, dtype=torch.int32, device=device),
            part_sum=torch.empty(shape, dtype=torch.float32, device=device),
            part_cnt=torch.empty(shape, dtype=torch.int32, device=device),
            part_top=torch.empty(shape, dtype=torch.float32, device=device),
            counter=torch.zeros(batch, dtype=torch.int32, device=device),
            sel_max=torch.empty(batch, dtype=torch.float32, device=device),
            sel_sum=torch.empty(batch, dtype=torch.float32, device=device),
            race_score=torch.empty(batch, race_splits, dtype=torch.float32, device=device),
            race_idx=torch.empty(batch, race_splits, dtype=torch.int32, device=device),
            race_counter=torch.zeros(batch, dtype=torch.int32, device=device),
        )
        out.workspace = ws
    return ws


def _launch(inp: VerifyInputs, cfg: LaunchConfig, race_cfg: LaunchConfig) -> VerifyOutput:
    out = inp.out
    logits, draft = inp.logits, inp.draft_tokens
    b, k, v = inp.batch, inp.k, inp.vocab
    ws = _workspace(out, b, k, cfg.splits, race_cfg.splits, logits.device)
    # Unused pointer arguments get any tensor: the constexpr flags compile their loads away.
    q = inp.draft_probs if inp.draft_probs is not None else logits
    u = inp.uniforms if inp.uniforms is not None else logits
    noise = inp.noise if inp.noise is not None else logits
    f1 = inp.features[0] if inp.features else logits
    f2 = inp.features[1] if len(inp.features) > 1 else f1
    w = inp.judge_weight if inp.judge_weight is not None else ws.part_sum
    protect = inp.protected_tokens if inp.protected_tokens is not None else out.judge_ok
    offset_is_tensor = isinstance(inp.offset, torch.Tensor)
    seeded = inp.sampling and inp.uniforms is None
    _verify_kernel[(cfg.splits, k + 1, b)](
        logits, logits.stride(0), logits.stride(1),
        draft, draft.stride(0), draft.stride(1),
        q, q.stride(0), q.stride(1),
        u, u.stride(0), u.stride(1),
        f1, f1.stride(0), f1.stride(1), f1.shape[2] if inp.features else 0,
        f2, f2.stride(0), f2.stride(1), f2.shape[2] if len(inp.features) > 1 else 0,
        w, inp.judge_bias, inp.threshold, inp.temperature if inp.sampling else 1.0,
        # A rank is below V, so a larger topk is V: one int32 signature for every topk.
        min(inp.topk, v), inp.topk_log_alpha, protect.view(torch.int8),
        inp.seed or 0, 0 if offset_is_tensor else int(inp.offset),
        inp.offset if offset_is_tensor else ws.counter,
        ws.part_max, ws.part_idx, ws.part_sum, ws.part_cnt, ws.part_top, ws.counter,
        out.num_accepted, out.next_token, out.target_ok.view(torch.int8), out.judge_ok.view(torch.int8),
        out.judge_prob, ws.sel_max, ws.sel_sum,
        k, v, cfg.split_len, cfg.splits,
        # R_PAD sizes phase 2's row tile: one compile per power of two of K+1, not one per K.
        S_PAD=triton.next_power_of_2(cfg.splits), R_PAD=triton.next_power_of_2(k + 1),
        BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        SAMPLING=inp.sampling, HAS_JUDGE=bool(inp.features), HAS_F2=len(inp.features) > 1, TOPK=inp.topk > 0,
        PROTECT=inp.protected_tokens is not None, SEEDED=seeded, OFFSET_FROM_PTR=offset_is_tensor,
        num_warps=cfg.num_warps,
    )
    if inp.sampling:
        _residual_draw_kernel[(race_cfg.splits, b)](
            logits, logits.stride(0), logits.stride(1),
            q, q.stride(0), q.stride(1),
            noise, noise.stride(0), noise.stride(1),
            inp.temperature, inp.seed or 0, 0 if offset_is_tensor else int(inp.offset),
            inp.offset if offset_is_tensor else ws.counter,
            out.num_accepted, ws.sel_max, ws.sel_sum,
            ws.race_score, ws.race_idx, ws.race_counter, out.next_token,
            k, v, race_cfg.split_len, race_cfg.splits,
            S_PAD=triton.next_power_of_2(race_cfg.splits), BLOCK_V=race_cfg.block_v, SEEDED=seeded,
            OFFSET_FROM_PTR=offset_is_tensor, num_warps=race_cfg.num_warps,
        )
    return out


def verify(
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
    """Fused verify step (one Triton launch, two when sampling; no host sync); semantics in
    ``autojudge.kernels.common``.

    target_logits [B, K+1, V] fp32/bf16/fp16 (only the last dim must be contiguous);
    draft_tokens [B, K] int; judge_features a [B, K, D] tensor or a tuple of two [B, K, Di]
    tensors read as concatenated along D, with judge_weight [sum Di] fp32. When sampling,
    ``offset`` may be a one-element int64 device tensor that the caller advances in place, so a
    CUDA graph replay draws fresh randomness. ``topk`` > 0 (with ``topk_alpha``) replaces the
    judge by the top-k rule in ``judge_ok`` / ``judge_prob``; ``protected_tokens`` [V] bool lists the target
    choices (end of answer) that neither may overrule. Pass ``out`` (e.g.
    ``VerifyOutput.empty``) to reuse buffers and scratch across cycles: then the step is its
    launches with no allocation.
    """
    inp = prepare_inputs(
        target_logits, draft_tokens, judge_features=judge_features, judge_weight=judge_weight,
        judge_bias=judge_bias, threshold=threshold, temperature=temperature, draft_probs=draft_probs,
        uniforms=uniforms, noise=noise, seed=seed, offset=offset, topk=topk, topk_alpha=topk_alpha,
        protected_tokens=protected_tokens, out=out,
    )
    device = inp.logits.device
    if device.type == "cpu" and not interpreted():
        raise AutojudgeError(INTERPRET_HINT)
    # The residual draw reads one row per sequence: its own, wider split of V.
    return _launch(inp, launch_config(inp.batch, inp.k, inp.vocab, device),
                   launch_config(inp.batch, 0, inp.vocab, device))
