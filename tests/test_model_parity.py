"""Our decoder against transformers on tiny random checkpoints: logits at prefill and at each decode step."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from autojudge.engine import loading
from autojudge.engine.decoder import Decoder
from autojudge.engine.model import Linear, _attend
from autojudge.engine.tokenizer import load_tokenizer
from autojudge.testing import make_tiny_checkpoint

TOL = 1e-4


def _ours(path, max_seq_len=256):
    ckpt = loading.resolve(str(path), "target")
    return Decoder.load(ckpt, load_tokenizer(ckpt.directory), torch.float32, torch.device("cpu"), max_seq_len)


def _check_parity(path, prompt_len=23, steps=12, seed=0):
    ours = _ours(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (1, prompt_len + steps), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits[0]
    logits, hidden = ours.forward(ids[0, :prompt_len], 0)
    assert hidden.shape == (prompt_len, ours.config.hidden_size)
    assert (logits - ref[:prompt_len]).abs().max().item() <= TOL
    for t in range(prompt_len, prompt_len + steps):
        step_logits, _ = ours.forward(ids[0, t : t + 1], t)
        assert (step_logits[0] - ref[t]).abs().max().item() <= TOL, f"decode step at position {t}"


def test_qwen2_tied_matches_transformers(tiny_qwen):
    _check_parity(tiny_qwen)


def test_llama3_rope_scaling_untied_matches_transformers(tiny_llama):
    _check_parity(tiny_llama, prompt_len=90, steps=8)  # past original_max_position_embeddings=64


def test_qwen2_untied_gqa1_matches_transformers(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "q", arch="qwen2", seed=3, num_heads=4, num_kv_heads=1,
                                tie_word_embeddings=False)
    _check_parity(path, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (1, 9), (4, 1), (2, 5), (0, 3), (33,)])
def test_linear_equals_f_linear(lead, bias, dtype):
    """The CPU fp32 W @ x^T path (several rows) and the F.linear path give x @ W^T + b in the input's shape."""
    gen = torch.Generator().manual_seed(len(lead) * 7 + sum(lead) + bias)
    layer = Linear(48, 80, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 48, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(80, generator=gen))
    x = torch.randn(*lead, 48, generator=gen).to(dtype)
    out = layer(x)
    ref = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    assert out.shape == (*lead, 80) and out.dtype == dtype and out.is_contiguous()
    tol = 1e-4 if dtype == torch.float32 else 0.5
    if out.numel():
        assert (out.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("mask_rows", ["per-row", "shared", None])
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen,slots", [
    (1, 4, 4, 1, 7), (3, 4, 2, 1, 9), (5, 12, 2, 1, 33), (2, 14, 2, 6, 20), (4, 6, 3, 17, 40), (1, 8, 1, 5, 5)])
def test_folded_attention_equals_sdpa_with_gqa(batch, heads, kv_heads, seqlen, slots, mask_rows):
    """`_attend` folds each KV head's query heads into its query rows: the same attention as SDPA's enable_gqa,
    query head h reading KV head h // (heads / kv_heads), under a per-row, a shared or no mask."""
    gen = torch.Generator().manual_seed(batch * 100 + heads * 10 + seqlen)
    q = torch.randn(batch, seqlen, heads, 16, generator=gen).transpose(1, 2)  # strided, as the projections give it
    k, v = (torch.randn(batch, kv_heads, slots, 16, generator=gen) for _ in range(2))
    mask = None
    if mask_rows is not None:
        positions = torch.randint(0, slots, (batch if mask_rows == "per-row" else 1, seqlen), generator=gen)
        mask = (torch.arange(slots)[None, None, :] <= positions[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = _attend(q, k, v, mask)
    assert out.shape == (batch, heads, seqlen, 16)
    assert (out - ref).abs().max().item() <= 1e-5


def test_hidden_is_after_final_norm(tiny_qwen):
    ours = _ours(tiny_qwen)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    logits, hidden = ours.teacher_forced(ids[0])
    assert torch.allclose(hidden, ref.hidden_states[-1][0], atol=TOL)
    assert torch.allclose(hidden @ ours.model.lm_head.weight.T, logits, atol=TOL)


def test_rollback_overwrites_rejected_slots(tiny_qwen):
    """Writing garbage past the committed length, then the true tokens, gives the clean logits."""
    ours = _ours(tiny_qwen)
    ids = torch.arange(3, 40)
    clean, _ = ours.teacher_forced(ids)
    ours.forward(ids[:20], 0)
    ours.forward(torch.full((8,), 7), 20)  # rejected draft tokens at 20..27
    logits, _ = ours.forward(ids[20:], 20)
    assert torch.allclose(logits, clean[20:], atol=TOL)


def test_sequence_past_cache_is_refused(tiny_qwen):
    from autojudge.errors import AutojudgeError

    ours = _ours(tiny_qwen, max_seq_len=16)
    with pytest.raises(AutojudgeError, match="max-seq-len"):
        ours.forward(torch.arange(17), 0)


def test_teacher_forced_from_a_cached_prefix(tiny_qwen):
    ours = _ours(tiny_qwen)
    ids = list(range(3, 60))
    full_logits, full_hidden = ours.teacher_forced(ids)
    ours.teacher_forced(ids[:40] + [1, 2, 3])  # the cache now shares 40 tokens with ids
    assert ours.reusable_prefix(ids) == 40
    logits, hidden = ours.teacher_forced(ids, start=45)
    assert logits.shape[0] == len(ids) - 45
    assert torch.allclose(logits, full_logits[45:], atol=TOL) and torch.allclose(hidden, full_hidden[45:], atol=TOL)
    logits, _ = ours.teacher_forced(ids, start=20)  # before the end of the shared prefix: recompute from 20
    assert torch.allclose(logits, full_logits[20:], atol=TOL)
    with pytest.raises(ValueError):
        ours.teacher_forced(ids, start=len(ids))
