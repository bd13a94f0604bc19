"""Verify step: fused Triton kernel vs eager reference vs torch.compile'd reference.

    pytest bench/bench_verify.py              # pytest-benchmark, one row per case and implementation
    python bench/bench_verify.py --table      # Markdown table of median microseconds per step
    python bench/bench_verify.py --table --impls triton,eager   # skip torch.compile (minutes of compiling)

Every timed call is one whole step as the engine sees it: the eager and compiled references end by
reading ``num_accepted`` on the host (the sync they force on the engine); the Triton step ends with
a device synchronize only so that its GPU time is counted. On CUDA the table adds the floor: bytes
the step must move / measured device bandwidth (a big device-to-device copy), and the launch time
of an empty Triton kernel.

Without CUDA the kernel runs in the Triton interpreter and only a tiny subset of cases runs
(AUTOJUDGE_BENCH_FULL=1 forces the full grid): CPU timings are interpreter-only and not
meaningful as performance numbers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module defines its kernels

from timing import device_bandwidth, median_ms  # noqa: E402

from autojudge.kernels import VerifyOutput, verify, verify_reference  # noqa: E402

if __name__ != "__main__":
    pytest.importorskip("pytest_benchmark")

CPU_NOTE = "CPU run: the Triton kernel is interpreted; timings are interpreter-only and not meaningful."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    k: int
    vocab: int
    dims: tuple[int, ...]
    dtype: str
    mode: str  # "greedy" or "sampling"
    batch: int = 1

    @property
    def name(self) -> str:
        dims = "+".join(map(str, self.dims))
        return f"{self.mode}-B{self.batch}-K{self.k}-V{self.vocab}-D{dims}-{self.dtype}"


def cases() -> list[Case]:
    if ON_CUDA or os.environ.get("AUTOJUDGE_BENCH_FULL") == "1":
        grid = itertools.product([4, 8, 16, 32], [151936, 128256], [(896, 1536), (4096, 2048)],
                                 DTYPES, ["greedy", "sampling"])
    else:
        grid = itertools.product([4], [1000], [(96, 64)], DTYPES, ["greedy", "sampling"])
    return [Case(*c) for c in grid]


def make_inputs(case: Case, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    b, k, v = case.batch, case.k, case.vocab
    dtype = DTYPES[case.dtype]
    logits = torch.randn(b, k + 1, v, device=device, generator=gen).to(dtype)
    greedy = logits.float().argmax(-1)[:, :k]
    # Mostly-accepted drafts, so the scan and the next-token draw both do real work.
    draft = torch.where(torch.rand(b, k, device=device, generator=gen) < 0.8, greedy, 0)
    feats = tuple(torch.randn(b, k, d, device=device, generator=gen).to(dtype) for d in case.dims)
    kw = {
        "judge_features": feats,
        "judge_weight": torch.randn(sum(case.dims), device=device, generator=gen) / 64,
        "out": VerifyOutput.empty(b, k, device),
    }
    if case.mode == "sampling":
        # Explicit randomness keeps the three implementations on the same work and compilable.
        kw.update(
            temperature=0.8,
            draft_probs=torch.softmax(logits[:, :k].float() / 0.8, -1),
            uniforms=torch.rand(b, k, device=device, generator=gen),
            noise=torch.empty(b, k + 1, v, device=device).exponential_(generator=gen),
        )
    return {"target_logits": logits, "draft_tokens": draft, **kw}


def bytes_moved(case: Case) -> int:
    """Bytes any verify step must touch: every logit (target_ok is reported for all positions), the
    judge features and weight, and when sampling one row each of q and noise for the draw."""
    itemsize = torch.finfo(DTYPES[case.dtype]).bits // 8
    b, k, v = case.batch, case.k, case.vocab
    total = b * (k + 1) * v * itemsize + b * k * sum(case.dims) * itemsize + sum(case.dims) * 4
    if case.mode == "sampling":
        total += b * 2 * v * 4
    return total


IMPLS = ("triton", "eager", "compiled")


def step_fn(impl: str, inputs: dict):
    """Zero-argument callable running one full step, or None where ``impl`` cannot run here."""
    if impl == "triton":
        sync = torch.cuda.synchronize if ON_CUDA else (lambda: None)
        return lambda: (verify(**inputs), sync())
    if impl == "eager":
        return lambda: verify_reference(**inputs).num_accepted.cpu()
    # Each case is a new static shape; past dynamo's default 8 recompiles it would silently run eager.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
    try:
        compiled = torch.compile(verify_reference, dynamic=False)
        compiled(**inputs).num_accepted.cpu()  # compile now, outside any timing
    except Exception as err:  # noqa: BLE001 (inductor needs a working C++/Triton toolchain)
        print(f"torch.compile unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        return None
    return lambda: compiled(**inputs).num_accepted.cpu()


def median_us(fn, reps: int) -> float:
    return median_ms(fn, reps) * 1e3


def empty_launch_us() -> float:
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.empty(1, device="cuda")
    _empty[(1,)](x)
    torch.cuda.synchronize()
    n = 1000
    t0 = time.perf_counter()
    for _ in range(n):
        _empty[(1,)](x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


# ---- pytest-benchmark ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _cpu_note():
    if not ON_CUDA:
        print(f"\n{CPU_NOTE}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_verify_step(benchmark, case, impl):
    fn = step_fn(impl, make_inputs(case, torch.device("cuda" if ON_CUDA else "cpu")))
    if fn is None:
        pytest.skip(f"{impl} unavailable here")
    benchmark.extra_info.update(bytes=bytes_moved(case), interpreted=not ON_CUDA)
    if not ON_CUDA:
        benchmark.extra_info["note"] = CPU_NOTE
    benchmark.pedantic(fn, rounds=20 if ON_CUDA else 3, warmup_rounds=1)


# ---- script mode ----------------------------------------------------------------------------


def table(reps: int, impls: tuple[str, ...] = IMPLS) -> str:
    device = torch.device("cuda" if ON_CUDA else "cpu")
    lines = []
    if ON_CUDA:
        bandwidth, launch = device_bandwidth(), empty_launch_us()
        lines.append(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
                     f"empty Triton launch {launch:.1f} us\n")
    else:
        lines.append(CPU_NOTE + "\n")
    head = "| case | " + " | ".join(f"{impl} us" for impl in impls) + " | MB moved |" + (" floor us |" if ON_CUDA else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for case in cases():
        inputs = make_inputs(case, device)
        fns = [step_fn(impl, inputs) for impl in impls]
        cells = ["n/a" if fn is None else f"{median_us(fn, reps):.1f}" for fn in fns]
        row = f"| {case.name} | " + " | ".join(cells) + f" | {bytes_moved(case) / 1e6:.2f} |"
        if ON_CUDA:
            row += f" {bytes_moved(case) / bandwidth * 1e6 + launch:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print a Markdown table of median us per step")
    parser.add_argument("--reps", type=int, default=100 if ON_CUDA else 3)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    args = parser.parse_args()
    if not args.table:
        parser.error("nothing to do: pass --table (or run the file under pytest)")
    impls = tuple(args.impls.split(","))
    if not impls or not set(impls) <= set(IMPLS):
        parser.error(f"--impls takes a subset of {','.join(IMPLS)}")
    print(table(args.reps, impls))


if __name__ == "__main__":
    main()
