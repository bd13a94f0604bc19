"""GPU hot path at real shapes: model steps against their floor, CUDA graphs against eager, the fused verify
step against eager, the whole speculative cycle and its overhead, tokens/s against accepted tokens per cycle,
and transformers' assisted generation on the same weights.

    python bench/gpu_bench.py --part quick     # the default pair's shapes: 0.5B/1.5B, windows 4-16, batches 1-32
    python bench/gpu_bench.py --part rest      # Llama 1B/8B and Qwen 7B, windows to 64, V=128256
    python bench/gpu_bench.py                  # both (about 4 minutes on an H100)
    python bench/gpu_bench.py --smoke          # tiny models, CPU too: runs every code path in seconds
    python bench/gpu_bench.py --json out.json  # every number, rewritten after each table

Method: CUDA events around each timed call, warm-up first, the median of
repeats. Model weights are 20x the L2 cache and more, so model steps need no L2 flush; the verify step's logits
fit in L2, so its timings flush L2 before each call. A step's floor is the larger of (bytes it must move /
measured copy bandwidth) and (FLOPs / measured bf16 matmul rate).

Weights are random (drawn on the device): timings depend on shapes only, but a random draft almost never
agrees with a random target. Tokens/s at other acceptance rates is therefore derived from the measured cycle
time as (a + 1) / t_cycle: a cycle does the same work whatever it keeps, bar a 2-token draft catch-up step
instead of a 1-token one after a fully accepted window.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module defines its kernels
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import device_bandwidth, median_ms  # noqa: E402

from autojudge.engine.cuda_graphs import CudaGraphs  # noqa: E402
from autojudge.engine.engine import Engine  # noqa: E402
from autojudge.engine.presets import parameter_count, random_decoder, tiny_preset  # noqa: E402
from autojudge.kernels import VerifyOutput, verify, verify_reference  # noqa: E402

_REAL = {"dtype": torch.bfloat16, "max_seq_len": 2048, "prompt": 128, "position": 512,
         "new_tokens": {"graphs": (16, 64), "eager": (4, 16), "hf": (8, 32)}, "reps": 30}
PARTS = {
    # The default pair's shapes first: what a short GPU slot must measure before anything else.
    "quick": {
        **_REAL,
        "models": {name: name for name in ("qwen2.5-0.5b", "qwen2.5-1.5b")},
        "windows": [4, 8, 16],
        # (draft, target, windows)
        "pairs": [("qwen2.5-0.5b", "qwen2.5-1.5b", [4, 8, 16])],
        "hf_windows": [4, 8],
        "verify_vocabs": [151936], "verify_windows": [4, 8, 16, 32],
        # (draft, target, window, batch sizes): continuous batching, graphed and eager
        "batched": [("qwen2.5-0.5b", "qwen2.5-1.5b", 8, [1, 8, 32])],
    },
    "rest": {
        **_REAL,
        "models": {name: name for name in ("llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b")},
        "windows": [4, 8, 16, 32, 64],
        "pairs": [("llama-3.2-1b", "llama-3.1-8b", [8]), ("qwen2.5-0.5b", "qwen2.5-7b", [8])],
        "hf_windows": [4],
        "verify_vocabs": [128256], "verify_windows": [4, 8, 16, 32, 64],
        "batched": [],
    },
}
SMOKE = {
    "models": {"tiny-draft": tiny_preset(hidden=32), "tiny-target": tiny_preset(hidden=64)},
    "windows": [2, 4],
    "pairs": [("tiny-draft", "tiny-target", [2, 4])],
    "hf_windows": [2],
    "verify_vocabs": [1000], "verify_windows": [2, 4],
    "batched": [("tiny-draft", "tiny-target", 2, [1, 3])],
    "dtype": torch.float32, "max_seq_len": 128, "prompt": 16, "position": 32,
    "new_tokens": {"graphs": (4, 12), "eager": (4, 12), "hf": (4, 12)},
    "reps": 3,
}

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
SMOKE_RUN = False  # set by --smoke
RESULTS: dict[str, list[dict]] = {}
JSON_PATH: Path | None = None  # set by --json; rewritten after every table, so a killed run keeps its tables
CURRENT_PART = ""


def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def ceilings() -> tuple[float | None, float | None]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), measured; None on CPU."""
    if not ON_CUDA:
        return None, None
    bandwidth = device_bandwidth()
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    rate = 2 * n**3 / (median_ms(lambda: a @ b, 10) / 1e3)
    return bandwidth, rate


class L2Flush:
    """Writes a buffer twice the L2 size, so the next kernel reads its inputs from HBM."""

    def __init__(self):
        size = 2 * torch.cuda.get_device_properties(DEVICE).L2_cache_size if ON_CUDA else 1
        self.buf = torch.empty(max(size, 1), dtype=torch.uint8, device=DEVICE)

    def __call__(self):
        self.buf.fill_(1)


def step_floor_ms(cfg, itemsize: int, t: int, logits_rows: int, kv_len: int, bandwidth, rate) -> float | None:
    if bandwidth is None:
        return None
    h, v = cfg.hidden_size, cfg.vocab_size
    params = parameter_count(cfg)
    unread_embedding = 0 if cfg.tie_word_embeddings else v * h  # an untied table is read only at T rows
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_len * itemsize
    moved = (params - unread_embedding) * itemsize + t * h * itemsize + kv + logits_rows * v * 4
    linear = params - v * h  # every matrix but the embedding/LM head
    flops = 2 * t * linear + 2 * logits_rows * v * h + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * kv_len * t
    return max(moved / bandwidth, flops / rate) * 1e3


def fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def emit(title: str, header: list[str], rows: list[list], key: str):
    RESULTS[f"{CURRENT_PART}/{key}"] = [dict(zip(header, row)) for row in rows]
    lines = [f"\n### {title} [{CURRENT_PART}]\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if isinstance(c, float) or c is None else str(c) for c in row) + " |"
              for row in rows]
    print("\n".join(lines), flush=True)
    if JSON_PATH is not None:
        JSON_PATH.write_text(json.dumps(RESULTS, indent=1, default=str))


def guarded(what: str, fn, *args):
    """Runs one part of the benchmark; a failure (say, out of memory on a smaller GPU) costs that part's rows,
    not the tables of the others. --smoke re-raises, so that the CPU test sees every failure."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        if SMOKE_RUN:
            raise
        print(f"\n**{what} failed**: {type(err).__name__}: {str(err)[:300]}", flush=True)


def release():
    """Returns the memory of models the caller has just dropped, before the next ones are built."""
    gc.collect()
    if ON_CUDA:
        torch.cuda.empty_cache()


# ---- model steps ------------------------------------------------------------------------------


def _model_steps(name, preset, cfg_set, bandwidth, rate, reps, steps, decode_rows, verify_rows):
    p, dtype = cfg_set["position"], cfg_set["dtype"]
    itemsize = torch.finfo(dtype).bits // 8
    dec = random_decoder(preset, DEVICE, dtype, cfg_set["max_seq_len"])
    cfg = dec.config
    tokens = torch.randint(0, cfg.vocab_size, (cfg_set["max_seq_len"],), device=DEVICE)
    graphs = CudaGraphs(tokens) if ON_CUDA else None
    for t in [1] + [k + 1 for k in cfg_set["windows"]]:
        logits_from = -1 if t == 1 else 0
        eager = median_ms(lambda t=t, lf=logits_from: dec.forward(tokens[p : p + t], p, lf), reps)
        graph = None
        if graphs is not None:
            graph = median_ms(lambda t=t, lf=logits_from: graphs.forward(dec, p, p + t, lf), reps)
        steps[name, t] = (eager, graph)
        floor = step_floor_ms(cfg, itemsize, t, 1 if t == 1 else t, p + t, bandwidth, rate)
        best = graph if graph is not None else eager
        row = [eager, graph, None if graph is None else eager / graph, floor, None if floor is None else best / floor]
        if t == 1:
            params = parameter_count(cfg)
            decode_rows.append([name, f"{params / 1e9:.3f}", f"{params * itemsize / 1e9:.2f}", *row])
        else:
            verify_rows.append([name, t - 1, *row])


def model_steps(cfg_set, bandwidth, rate, reps) -> dict:
    """Times each model's T=1 step (logits of the last row, as drafting) and T=k+1 steps (all logits, as
    verifying), eager and graph-replayed. Returns {(model, T): (eager ms, graph ms)}."""
    steps, decode_rows, verify_rows = {}, [], []
    for name, preset in cfg_set["models"].items():
        guarded(f"model steps of {name}", _model_steps, name, preset, cfg_set, bandwidth, rate, reps, steps,
                decode_rows, verify_rows)
        release()
    emit("Decode step (T=1, last-row logits): eager vs CUDA graph vs floor",
         ["model", "params B", "weights GB", "eager ms", "graph ms", "graph speedup", "floor ms", "best / floor"],
         decode_rows, "decode_step")
    emit("Verify step (T=k+1, all logits): eager vs CUDA graph vs floor",
         ["model", "k", "eager ms", "graph ms", "graph speedup", "floor ms", "best / floor"], verify_rows,
         "verify_step")
    return steps


# ---- verify kernel at the engine's call ---------------------------------------------------------


def host_ms(fn, reps: int, flush=None) -> float:
    """Median wall time in ms from the host's call to the result being ready on the device: launch overheads
    and Python included, which device-side timers leave out."""
    fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_device_ms(launches: list, reps: int) -> float:
    """Device time per launch: one CUDA graph replays all of `launches` back to back, so no host gap or launch
    latency is counted. Each launch reads its own inputs, and together they overflow L2, so every launch
    reads from HBM as a decode-time verify step does."""
    for launch in launches:
        launch()  # compile and allocate workspaces outside the capture
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    return median_ms(graph.replay, reps) / len(launches)


def verify_kernel(cfg_set, bandwidth, reps):
    """The engine's call (logits [1, k+1, V], int64 drafts, reused outputs; sampling seeded, its offset a device
    tensor), for bf16 and fp32 logits. Four timings per case: the fused kernel on the device alone (graph
    replay, HBM-cold inputs), the fused step from the host's call to its result, the eager reference on the
    device, and the eager reference as the engine would pay it (ending with its host read)."""
    flush = L2Flush() if ON_CUDA else None
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size if ON_CUDA else 0
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for v in cfg_set["verify_vocabs"]:
        for k in cfg_set["verify_windows"]:
            for dtype in (torch.bfloat16, torch.float32):
                itemsize = torch.finfo(dtype).bits // 8
                for mode in ("greedy", "sampling"):
                    step_bytes = (k + 1) * v * itemsize + (v * (itemsize + 4) if mode == "sampling" else 0)
                    copies = max(2, min(64, -(-3 * l2 // step_bytes))) if ON_CUDA else 1
                    steps = []
                    for _ in range(copies):
                        logits = torch.randn(1, k + 1, v, device=DEVICE, generator=gen).to(dtype)
                        greedy = logits.float().argmax(-1)[:, :k]
                        draft = torch.where(torch.rand(1, k, device=DEVICE, generator=gen) < 0.8, greedy, 0)
                        kw = {"out": VerifyOutput.empty(1, k, DEVICE)}
                        if mode == "sampling":
                            kw.update(temperature=0.8, draft_probs=torch.softmax(logits[:, :k].float() / 0.8, -1),
                                      seed=1, offset=torch.zeros(1, dtype=torch.long, device=DEVICE))
                        steps.append(((logits, draft), kw))
                    (args, kw) = steps[0]
                    fused_host = host_ms(lambda a=args, kw=kw: verify(*a, **kw), reps, flush)
                    eager_device = median_ms(lambda a=args, kw=kw: verify_reference(*a, **kw), reps, flush)
                    eager_read = median_ms(lambda a=args, kw=kw: verify_reference(*a, **kw).num_accepted.cpu(),
                                           reps, flush)
                    fused_device = None
                    if ON_CUDA:
                        launches = [lambda a=a, kw=kw: verify(*a, **kw) for a, kw in steps]
                        fused_device = graph_device_ms(launches * max(1, 64 // copies), reps)
                    best = fused_device if fused_device is not None else fused_host
                    floor = None if bandwidth is None else step_bytes / bandwidth * 1e3
                    rows.append([v, k, str(dtype).removeprefix("torch."), mode, _us(fused_device), _us(fused_host),
                                 _us(eager_device), _us(eager_read), eager_read / best, _us(floor),
                                 None if floor is None else best / floor])
                    del steps
    emit("Fused verify step vs eager reference (engine call; device = CUDA-graph replay of many launches on "
         "HBM-cold inputs; host = from the call to the result)",
         ["V", "k", "logits", "mode", "fused device us", "fused host us", "eager device us",
          "eager us (+host read)", "eager+read / fused", "floor us", "fused / floor"], rows, "verify_kernel")


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3


# ---- whole cycle, tokens/s, transformers --------------------------------------------------------


class _NoText:
    """The engine decodes text for its outputs; random models have no tokenizer, so the text is empty."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def timed_generate(engine, prompt, k, n_short, n_long, mode="speculative", repeats=3):
    """(ms per cycle, ms per token, spread of the ms per cycle over the repeats / their median, a long run's
    stats). Each repeat times a long and a short run and keeps the difference, so prefill and first-call costs
    cancel; the median of the repeats drops a one-off stall, which on an H200 made a single difference 0.4 s
    short. One long run first captures every graph and touches every position the timed runs reach. Target
    mode counts a token as a cycle."""

    def run(n):
        return engine.generate(prompt, max_new_tokens=n, mode=mode, window=k, ignore_eos=True).stats

    run(n_long)
    per_cycle, per_token = [], []
    for _ in range(repeats):
        a, b = run(n_short), run(n_long)
        ms = (b.total_s - a.total_s) * 1e3
        tokens = b.new_tokens - a.new_tokens
        per_cycle.append(ms / ((b.cycles - a.cycles) if mode == "speculative" else tokens))
        per_token.append(ms / tokens)
    mid = statistics.median(per_cycle)
    return mid, statistics.median(per_token), (max(per_cycle) - min(per_cycle)) / mid, b


def hf_model(dec):
    """transformers' model class for `dec`'s architecture, sharing `dec`'s weight tensors (names match)."""
    import transformers

    cfg = dec.config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
                  rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if cfg.architecture == "qwen2":
        hf_cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        hf_cfg = transformers.LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=cfg.attention_bias)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        model = cls(hf_cfg)
    model.load_state_dict(dec.model.state_dict(), strict=True, assign=True)
    # The rotary table is a non-persistent buffer, so no state dict brings it off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg).to(dec.device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, leftover
    return model.eval()


def hf_per_token(model, prompt, n_short, n_long, assistant=None, k=None) -> float:
    """ms per new token of transformers' greedy generate, from the difference of two runs."""
    ids = torch.tensor([prompt], device=DEVICE)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if assistant is not None:
        gc_ = assistant.generation_config
        # A fixed window and no confidence-based early stop: the same drafting as ours.
        gc_.num_assistant_tokens, gc_.num_assistant_tokens_schedule, gc_.assistant_confidence_threshold = (
            k, "constant", 0.0)
        kw["assistant_model"] = assistant
    seconds = []
    for n in (n_long, n_short, n_long):  # warmed up as timed_generate is
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        seconds.append(time.perf_counter() - t0)
        assert out.shape[1] == len(prompt) + n
    return (seconds[2] - seconds[1]) / (n_long - n_short) * 1e3


def _pair(draft_name, target_name, windows, cfg_set, steps, with_hf):
    models, dtype, seq = cfg_set["models"], cfg_set["dtype"], cfg_set["max_seq_len"]
    # A pair may draw on a model of another part: presets are named by their keys.
    draft = random_decoder(models.get(draft_name, draft_name), DEVICE, dtype, seq, seed=1)
    target = random_decoder(models.get(target_name, target_name), DEVICE, dtype, seq, seed=2)
    common_vocab = min(draft.config.vocab_size, target.config.vocab_size)
    prompt = torch.randint(0, common_vocab, (cfg_set["prompt"],), generator=torch.Generator().manual_seed(0)).tolist()
    engines = {True: Engine(target, draft, _NoText(), [], cuda_graphs=True)} if ON_CUDA else {}
    engines[False] = Engine(target, draft, _NoText(), [], cuda_graphs=False)
    label = f"{draft_name} → {target_name}"
    target_only, timed, cycle_rows, tps_rows = {}, {}, [], []
    for graphed, engine in engines.items():
        n_short, n_long = cfg_set["new_tokens"]["graphs" if graphed else "eager"]
        target_only[graphed] = 1e3 / timed_generate(engine, prompt, 1, n_short, n_long, mode="target")[1]
        for k in windows:
            ms, ms_token, spread, stats = timed[graphed, k] = timed_generate(engine, prompt, k, n_short, n_long)
            col = 1 if graphed else 0
            model_ms = None  # the model steps of the part that timed them, where this part did not
            if (draft_name, 1) in steps and (target_name, k + 1) in steps:
                model_ms = k * steps[draft_name, 1][col] + steps[target_name, k + 1][col]
            cycle_rows.append([label, k, "on" if graphed else "off", ms, spread * 100, stats.draft_s / stats.cycles * 1e3,
                               stats.verify_s / stats.cycles * 1e3, model_ms,
                               None if model_ms is None else (ms / model_ms - 1) * 100,
                               stats.accepted_per_cycle, 1e3 / ms_token])
            if graphed or not ON_CUDA:
                accepted = sorted({0, 1, max(1, k // 4), k // 2, k})
                tps_rows.append([label, k, target_only[graphed],
                                 ", ".join(f"{a}: {(a + 1) / ms * 1e3:.0f}" for a in accepted),
                                 ms * target_only[graphed] / 1e3 - 1])
    # Each pair's tables go out before transformers runs, so a time limit that cuts the latter keeps them.
    emit(f"Speculative cycle {label}: wall time vs the sum of its model steps (overhead = cycle / steps - 1)",
         ["pair", "k", "graphs", "ms/cycle", "spread %", "draft phase ms", "verify phase ms", "model steps ms", "overhead %",
          "accepted/cycle", "tokens/s"], cycle_rows, f"cycle {label}")
    emit(f"Tokens/s of {label} against accepted draft tokens per cycle a: (a + 1) / t_cycle, vs target-only decoding",
         ["pair", "k", "target-only tok/s", "a: tok/s", "break-even a"], tps_rows, f"tokens_per_second {label}")
    if not with_hf:
        return
    if draft.config.vocab_size != target.config.vocab_size:
        print(f"(no transformers row for {label}: different vocabulary sizes make transformers ask for two "
              "tokenizers)", flush=True)
        return
    guarded(f"transformers on {label}", _hf_rows, label, target, draft, engines, prompt, target_only, timed, cfg_set)


def _hf_rows(label, target, draft, engines, prompt, target_only, timed, cfg_set):
    n_short, n_long = cfg_set["new_tokens"]["hf"]
    hf_target, hf_draft = hf_model(target), hf_model(draft)
    hf_plain = hf_per_token(hf_target, prompt, n_short, n_long)
    rows = []
    for k in cfg_set["hf_windows"]:
        hf_spec = hf_per_token(hf_target, prompt, n_short, n_long, hf_draft, k)
        # Our cycle table's timings where it has this window (ms per token does not depend on the run length).
        ours = {g: timed.get((g, k)) or timed_generate(e, prompt, k, n_short, n_long) for g, e in engines.items()}
        best = ours.get(True, ours[False])
        # Lossless greedy: both libraries draft and keep the same tokens, so the acceptance is the same.
        rows.append([label, k, n_long - n_short, best[3].accepted_per_cycle, 1e3 / hf_spec,
                     1e3 / ours[True][1] if True in ours else None, 1e3 / ours[False][1], hf_spec / best[1],
                     1e3 / hf_plain, target_only.get(True, target_only[False])])
    emit(f"{label} against transformers' assisted generation (same weights, greedy, fixed window)",
         ["pair", "k", "HF timed tokens", "our accepted/cycle", "HF assisted tok/s", "ours tok/s (graphs)",
          "ours tok/s (eager)", "ours / HF", "HF target-only tok/s", "ours target-only tok/s"], rows, f"hf {label}")


def pairs(cfg_set, steps, with_hf: bool):
    for draft_name, target_name, windows in cfg_set["pairs"]:
        guarded(f"pair {draft_name} → {target_name}", _pair, draft_name, target_name, windows, cfg_set, steps,
                with_hf)
        release()


def timed_batch(engine, prompts, mode, k, n_short, n_long) -> tuple[float, object]:
    """(tokens/s, a long run's batch stats) of `generate_batch` over `prompts` (one slot each): the difference of a
    long and a short run, after a long one that captures every graph, so that prefill and capture cancel."""

    def run(n):
        return engine.generate_batch(prompts, max_batch=len(prompts), max_new_tokens=n, mode=mode, window=k,
                                     ignore_eos=True).stats

    run(n_long)
    a, b = run(n_short), run(n_long)
    return (b.new_tokens - a.new_tokens) / (b.total_s - a.total_s), b


def _batched(draft_name, target_name, k, sizes, cfg_set, rows):
    models, dtype = cfg_set["models"], cfg_set["dtype"]
    draft = random_decoder(models.get(draft_name, draft_name), DEVICE, dtype, cfg_set["max_seq_len"], seed=1)
    target = random_decoder(models.get(target_name, target_name), DEVICE, dtype, cfg_set["max_seq_len"], seed=2)
    gen = torch.Generator().manual_seed(0)
    vocab = min(draft.config.vocab_size, target.config.vocab_size)
    label = f"{draft_name} → {target_name}"
    for graphed in ([True, False] if ON_CUDA else [False]):
        engine = Engine(target, draft, _NoText(), [], cuda_graphs=graphed)
        n_short, n_long = cfg_set["new_tokens"]["graphs" if graphed else "eager"]
        base = {}
        for batch in sizes:
            prompts = [torch.randint(0, vocab, (cfg_set["prompt"],), generator=gen).tolist() for _ in range(batch)]
            for mode in ("target", "speculative"):
                tps, stats = timed_batch(engine, prompts, mode, k, n_short, n_long)
                base.setdefault(mode, tps)
                rows.append([label, mode, k if mode == "speculative" else "-", "on" if graphed else "off", batch,
                             tps, tps / base[mode], stats.occupancy])


def batched(cfg_set):
    rows = []
    for draft_name, target_name, k, sizes in cfg_set["batched"]:
        guarded(f"batched {draft_name} → {target_name}", _batched, draft_name, target_name, k, sizes, cfg_set,
                rows)
        release()
    if rows:
        emit("Continuous batching: tokens/s of the whole batch (random weights: speculative accepts ~0 per cycle)",
             ["pair", "mode", "k", "graphs", "batch", "tokens/s", "x batch 1", "slot occupancy"], rows, "batched")


def check_hf_parity(cfg_set):
    """Smoke check: transformers on our shared weights decodes the same greedy tokens as our engine."""
    dec = random_decoder(cfg_set["models"]["tiny-target"], DEVICE, torch.float32, cfg_set["max_seq_len"],
                         init_std=0.1)
    engine = Engine(dec, None, _NoText(), [], cuda_graphs=False)
    prompt = list(range(3, 3 + cfg_set["prompt"]))
    ours = engine.generate(prompt, max_new_tokens=8, mode="target", ignore_eos=True).token_ids
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = hf_model(dec).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref, (ours, ref)
    print("smoke: transformers on the shared weights decodes the same tokens as the engine", flush=True)


def run_part(part: str, cfg_set: dict, bandwidth, rate, reps: int, with_hf: bool, tables: set[str]):
    global CURRENT_PART
    CURRENT_PART = part
    print(f"\n## part {part}", flush=True)
    # Cheapest and most asked-for first: a part cut short by its time limit keeps the kernel table.
    if "verify" in tables:
        verify_kernel(cfg_set, bandwidth, reps)
    steps = model_steps(cfg_set, bandwidth, rate, reps) if "steps" in tables else {}
    if "pairs" in tables:
        pairs(cfg_set, steps, with_hf)
    if "batched" in tables:
        batched(cfg_set)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models: a seconds-long run of every code path")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all", help="which shapes to run (CUDA only)")
    parser.add_argument("--tables", default="verify,steps,pairs,batched",
                        help="comma-separated subset of verify (kernel), steps (model steps), pairs (cycles, tokens/s, "
                             "transformers), batched (continuous batching at several batch sizes)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' assisted generation")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--json", type=Path, default=None, help="every number, rewritten after each table")
    args = parser.parse_args()
    if not ON_CUDA and not args.smoke:
        parser.error("no CUDA GPU here: real shapes need one; run with --smoke for the tiny CPU run")
    tables = set(args.tables.split(","))
    if not tables <= {"verify", "steps", "pairs", "batched"}:
        parser.error("--tables takes a subset of verify,steps,pairs,batched")
    global SMOKE_RUN, JSON_PATH
    SMOKE_RUN, JSON_PATH = args.smoke, args.json
    parts = {"smoke": SMOKE} if args.smoke else PARTS if args.part == "all" else {args.part: PARTS[args.part]}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bandwidth, rate = ceilings()
    import transformers
    import triton

    name = torch.cuda.get_device_name() if ON_CUDA else "CPU (smoke: timings are not performance numbers)"
    print(f"## gpu_bench on {name}\n\ntorch {torch.__version__}, triton {triton.__version__}, transformers "
          f"{transformers.__version__}; copy bandwidth {fmt(bandwidth and bandwidth / 1e9, 0)} GB/s (read + write), "
          f"bf16 matmul {fmt(rate and rate / 1e12, 0)} TFLOP/s", flush=True)
    RESULTS["device"] = [{"name": name, "bandwidth_Bps": bandwidth, "matmul_flops": rate,
                          "torch": torch.__version__, "triton": triton.__version__}]
    if args.smoke:
        check_hf_parity(SMOKE)
    for part, cfg_set in parts.items():
        run_part(part, cfg_set, bandwidth, rate, args.reps or cfg_set["reps"], not args.no_hf, tables)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
