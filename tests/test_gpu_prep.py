"""The CPU-checkable parts of the GPU hot path: model presets, the static-shape attention path, the
attention backend switch (flash-attn's contract run through a torch reference), the engine's graph path with
replays emulated eagerly, the CUDA-graph option, and a smoke run of the GPU benchmark."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from autojudge import Engine
from autojudge.commands import main
from autojudge.engine import cuda_graphs, model
from autojudge.engine.model import GPU_EXTRA_HINT, check_attention
from autojudge.engine.presets import PRESETS, parameter_count, random_decoder, tiny_preset
from autojudge.errors import AutojudgeError

ROOT = Path(__file__).resolve().parents[1]

# Sizes on the models' Hugging Face cards (tied embeddings counted once).
PUBLISHED_PARAMS = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.61e9, "llama-3.2-1b": 1.24e9,
                    "llama-3.1-8b": 8.03e9}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameter_counts_match_published_sizes(preset):
    assert parameter_count(PRESETS[preset]) == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.01)


def test_random_decoder_is_seeded_tied_and_finite():
    a = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=32, seed=3)
    b = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=32, seed=3)
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight
    assert torch.equal(a.model.model.layers[0].mlp.up_proj.weight, b.model.model.layers[0].mlp.up_proj.weight)
    assert torch.all(a.model.model.norm.weight == 1)
    logits, _ = a.forward(torch.arange(10), 0)
    assert torch.isfinite(logits).all()
    with pytest.raises(AutojudgeError, match="unknown preset"):
        random_decoder("gpt-5", "cpu")


@pytest.mark.parametrize("t", [1, 2, 5])
def test_full_cache_attention_equals_sliced(t):
    """kv_len = max_seq_len (what a CUDA graph records) gives the sliced path's logits, stale slots included."""
    dec = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=64, init_std=0.1)
    tokens = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0))
    dec.forward(tokens[:40], 0)  # slots 20..39 now hold keys of tokens that are not the sequence below
    dec.forward(tokens[40:60].flip(0), 0)  # ...and 0..19 are rewritten by another sequence
    dec.forward(tokens[:20], 0)
    positions = torch.arange(20, 20 + t)
    m = dec.model
    sliced, hidden_sliced = m(tokens[20 : 20 + t][None], positions, 20 + t, 0)
    full, hidden_full = m(tokens[20 : 20 + t][None], positions, m.max_seq_len, 0)
    torch.testing.assert_close(full, sliced, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_full, hidden_sliced, rtol=1e-5, atol=1e-5)
    assert torch.equal(full.argmax(-1), sliced.argmax(-1))


def test_graphed_forward_reads_tokens_at_the_device_start():
    dec = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=64, init_std=0.1)
    tokens = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(1))
    dec.forward(tokens[:30], 0)
    step = cuda_graphs.GraphedForward(dec, tokens, 3, -1, pool=None)
    step.start.fill_(30)
    logits, hidden = step._forward()
    want_logits, want_hidden = dec.forward(tokens[30:33], 30, logits_from=-1)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)


# ---- attention backends ---------------------------------------------------------------------------


def test_unknown_backend_and_sdpa():
    with pytest.raises(AutojudgeError, match="unknown attention backend 'xformers'"):
        check_attention("xformers", "cpu", torch.float32)
    assert check_attention("sdpa", "cpu", torch.float32) is None


def test_flash_without_flash_attn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails whether or not it is installed
    with pytest.raises(AutojudgeError, match=F"needs the flash-attn package: {GPU_EXTRA_HINT}".replace("[", r"\[")):
        check_attention("flash", "cuda", torch.bfloat16)
    with pytest.raises(AutojudgeError, match="flash-attn"):
        random_decoder(tiny_preset(), "cpu", torch.float32, attention="flash")


def test_flash_needs_cuda_and_half_precision(monkeypatch):
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_with_kvcache = object()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    with pytest.raises(AutojudgeError, match="runs on CUDA only"):
        check_attention("flash", "cpu", torch.bfloat16)
    with pytest.raises(AutojudgeError, match="bf16/fp16"):
        check_attention("flash", "cuda", torch.float32)
    assert check_attention("flash", "cuda:0", torch.bfloat16) is fake.flash_attn_with_kvcache


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal):
    """flash-attn's documented contract in torch: append k/v at cache_seqlens, attend bottom-right causally."""
    assert causal
    batch, t, heads, _ = q.shape
    out = torch.empty_like(q)
    for b in range(batch):
        start = int(cache_seqlens[b])
        k_cache[b, start : start + t] = k[b]
        v_cache[b, start : start + t] = v[b]
        n = start + t
        visible = torch.arange(n)[None, :] <= torch.arange(start, n)[:, None]
        rep = heads // k_cache.shape[2]
        keys = k_cache[b, :n].transpose(0, 1).repeat_interleave(rep, 0)
        values = v_cache[b, :n].transpose(0, 1).repeat_interleave(rep, 0)
        out[b] = F.scaled_dot_product_attention(q[b].transpose(0, 1), keys, values, attn_mask=visible).transpose(0, 1)
    return out


def test_flash_backend_wiring_matches_sdpa(monkeypatch):
    """Our side of the flash path (cache layout, lengths, transposes) against a torch model of flash-attn."""
    real_check = model.check_attention
    monkeypatch.setattr(model, "check_attention", lambda attention, device, dtype: (
        reference_flash_attn_with_kvcache if attention == "flash" else real_check(attention, device, dtype)))
    sdpa = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=64, seed=5, init_std=0.1)
    flash = random_decoder(tiny_preset(), "cpu", torch.float32, max_seq_len=64, seed=5, init_std=0.1,
                           attention="flash")
    assert flash.model.model.layers[0].self_attn.kv_cache.k.shape == (1, 65, 2, 16)  # [B, S + trash slot, H, D]
    tokens = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2))
    for start, end in [(0, 17), (17, 18), (18, 23), (20, 26), (26, 27)]:  # (20, 26) rewrites rejected slots
        want, _ = sdpa.forward(tokens[start:end], start)
        got, _ = flash.forward(tokens[start:end], start)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the engine's graph path --------------------------------------------------------------------------


class EagerGraph:
    """Stands in for a recorded CUDA graph: a replay reruns the step into the recorded output buffers."""

    def __init__(self, graphed):
        self.graphed = graphed

    def replay(self):
        logits, hidden = self.graphed._forward()
        if logits is not None:
            self.graphed.logits.copy_(logits)
        self.graphed.hidden.copy_(hidden)


def eager_capture(self):
    self.logits, self.hidden = self._forward()
    self.graph = EagerGraph(self)


@pytest.fixture
def emulated_graphs(monkeypatch):
    """Turns an engine's graph path on without CUDA: same buffers and positions, eager replays."""
    monkeypatch.setattr(cuda_graphs._Graphed, "_capture", eager_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    def enable(engine):
        engine._graphs = cuda_graphs.CudaGraphs(engine._tokens)
        return engine

    return enable


@pytest.fixture(scope="module")
def pair_engines(tiny_pair):
    def build():
        return Engine.from_pretrained(target=str(tiny_pair[0]), draft=str(tiny_pair[1]), max_seq_len=96,
                                      kernels="eager")
    return build


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_graph_path_equals_eager(pair_engines, emulated_graphs, window, temperature):
    plain, graphed = pair_engines(), emulated_graphs(pair_engines())
    for prompt in (list(range(20, 40)), [7]):
        kw = dict(max_new_tokens=50, window=window, ignore_eos=True, temperature=temperature, seed=4)
        want = plain.generate(prompt, **kw)
        got = graphed.generate(prompt, **kw)
        assert got.token_ids == want.token_ids
        assert got.stats.histogram == want.stats.histogram
        if temperature == 0:
            assert got.token_ids == graphed.generate(prompt, mode="target", **kw).token_ids
    keys = {(dec.name, t) for dec, t, _ in graphed._graphs.graphs}
    assert len({t for _, t in keys}) >= 2  # a draft step and a verify step at least


def test_engine_graph_path_runs_to_the_cache_end(pair_engines, emulated_graphs):
    """Windows shrink near the end of the cache: new graph sizes are captured mid-generation."""
    plain, graphed = pair_engines(), emulated_graphs(pair_engines())
    prompt = list(range(20, 80))
    want = plain.generate(prompt, max_new_tokens=100, window=8, ignore_eos=True)
    got = graphed.generate(prompt, max_new_tokens=100, window=8, ignore_eos=True)
    assert got.stats.finish_reason == "cache_full"
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("mode, temperature", [("target", 0.0), ("speculative", 0.0), ("speculative", 0.8)])
def test_batched_graph_path_equals_eager(pair_engines, emulated_graphs, mode, temperature):
    """Batched steps through per-(model, rows, tokens) graphs: every row as the eager batch gives it, slots refilled,
    ragged prompts; the graphs' input buffers are refilled on each replay."""
    plain, graphed = pair_engines(), emulated_graphs(pair_engines())
    prompts = [list(range(20, 20 + n)) for n in (5, 17, 2, 30, 9)]
    kw = dict(max_batch=3, max_new_tokens=30, mode=mode, window=4, temperature=temperature, seed=2, ignore_eos=True)
    want = [o.token_ids for o in plain.generate_batch(prompts, **kw)]
    assert [o.token_ids for o in graphed.generate_batch(prompts, **kw)] == want
    if temperature == 0:
        assert want == [plain.generate(p, **{k: v for k, v in kw.items() if k != "max_batch"}).token_ids
                        for p in prompts]
    shapes = {(dec is graphed.target, rows, t) for dec, rows, t, _ in graphed._graphs.row_graphs}
    # Target mode: the target's 1-token step; speculative: its 5-token verify and the draft's 1-token step.
    assert ({(True, 3, 1)} if mode == "target" else {(True, 3, 5), (False, 3, 1)}) <= shapes, shapes


# ---- the option --------------------------------------------------------------------------------------


def test_cuda_graphs_refused_on_cpu(tiny_qwen):
    with pytest.raises(AutojudgeError, match="--cuda-graphs needs a CUDA device"):
        Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=32, cuda_graphs=True)
    auto = Engine.from_pretrained(target=str(tiny_qwen), draft=None, max_seq_len=32)
    assert auto.cuda_graphs is False and auto._graphs is None


def test_cli_cuda_graphs_flag(tiny_qwen):
    args = ["generate", "hi", "--target", str(tiny_qwen), "--draft", "none", "--mode", "target",
            "--max-new-tokens", "2"]
    refused = CliRunner().invoke(main, [*args, "--cuda-graphs"])
    assert refused.exit_code != 0 and "--cuda-graphs needs a CUDA device" in refused.output
    assert CliRunner().invoke(main, [*args, "--no-cuda-graphs"]).exit_code == 0


# ---- the benchmark ----------------------------------------------------------------------------------


def test_gpu_bench_smoke_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--smoke"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for title in ("Decode step", "Verify step", "Fused verify step", "Speculative cycle", "against accepted draft tokens",
                  "assisted generation", "Continuous batching"):
        assert title in result.stdout, result.stdout[-3000:]
