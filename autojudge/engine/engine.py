"""The decoding engine: target-only and (lossless or judged) speculative decoding over static caches."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autojudge.engine import loading
from autojudge.engine.cuda_graphs import CudaGraphs
from autojudge.engine.decoder import Decoder
from autojudge.engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROTECT_ENDS,
    DEFAULT_WINDOW,
    TopkRule,
    check_request,
)
from autojudge.engine.tokenizer import check_compatible, encode_prompt, end_of_answer_ids, load_tokenizer
from autojudge.errors import AutojudgeError
from autojudge.kernels import VerifyOutput


@dataclass
class GenerationStats:
    mode: str
    window: int
    prompt_tokens: int = 0
    new_tokens: int = 0
    cycles: int = 0
    accepted_per_cycle: float = 0.0  # draft tokens kept per cycle (the correction/bonus token not counted)
    tokens_per_cycle: float = 0.0  # tokens emitted per cycle, correction/bonus included
    histogram: dict[int, int] = field(default_factory=dict)  # accepted draft tokens -> cycles
    drafted_tokens: int = 0  # proposed by the draft; a cycle drafts fewer than the window near the end
    judge_rescues: int = 0  # draft tokens kept only because the judge called the mismatch unimportant
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    tokens_per_second: float = 0.0
    finish_reason: str = "length"

    def record_cycle(self, drafted: int, accepted: int, judge_rescues: int, draft_s: float, verify_s: float):
        self.cycles += 1
        self.drafted_tokens += drafted
        self.judge_rescues += judge_rescues
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.histogram[accepted] = self.histogram.get(accepted, 0) + 1
        self.accepted_per_cycle = sum(a * c for a, c in self.histogram.items()) / self.cycles
        self.tokens_per_cycle = self.accepted_per_cycle + 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def draft_length(window: int, max_seq_len: int, seq_len: int, wanted: int) -> int:
    """Tokens to draft this cycle (< 1: no room for a cycle). A cycle yields up to k + 1 tokens: drafting past the
    tokens still wanted would be thrown away (mining asks for short pieces of text many times over), and the
    token after k accepted ones needs a cache slot too."""
    return min(window, max_seq_len - seq_len - 1, max(wanted - 1, 1))


class Progress:
    """Applies the token budget and EOS to the tokens each step of one generation yields; keeps the totals."""

    def __init__(self, stats: GenerationStats, max_new_tokens: int, ignore_eos: bool, eos_token_ids):
        self.stats, self.max_new_tokens, self.ignore_eos = stats, max_new_tokens, ignore_eos
        self.eos_token_ids = eos_token_ids
        self.produced = 0
        self.start = time.perf_counter()

    def take(self, new: list[int], cache_full: bool) -> tuple[list[int], bool]:
        """(the tokens to emit, whether the generation is done); `cache_full`: no slot is left after them."""
        stats = self.stats
        new = new[: self.max_new_tokens - self.produced]
        if not self.ignore_eos:
            eos_at = next((i for i, t in enumerate(new) if t in self.eos_token_ids), None)
            if eos_at is not None:
                new = new[: eos_at + 1]
                stats.finish_reason = "eos"
        self.produced += len(new)
        stats.new_tokens = self.produced
        stats.total_s = time.perf_counter() - self.start
        stats.tokens_per_second = self.produced / stats.total_s if stats.total_s > 0 else 0.0
        done = stats.finish_reason == "eos" or self.produced >= self.max_new_tokens
        if not done and cache_full:
            stats.finish_reason = "cache_full"
            done = True
        return new, done


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerationStats


class Engine:
    def __init__(self, target: Decoder, draft: Decoder | None, tokenizer, eos_token_ids, kernels: str = "auto",
                 cuda_graphs: bool | None = None, protected_token_ids=()):
        """protected_token_ids: target choices that lossy modes never overrule (see `end_of_answer_ids`)."""
        from autojudge.kernels import resolve_kernels

        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.protected_tokens = None
        if protected_token_ids:
            self.protected_tokens = torch.zeros(target.config.vocab_size, dtype=torch.bool, device=target.device)
            self.protected_tokens[[i for i in protected_token_ids if i < target.config.vocab_size]] = True
        self.verify = resolve_kernels(kernels, target.device)
        self._busy = threading.Lock()
        # Committed tokens live on the device so that drafting and verifying read views, never copies.
        self._tokens = torch.zeros(target.max_seq_len, dtype=torch.long, device=target.device)
        on_cuda = target.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise AutojudgeError(f"--cuda-graphs needs a CUDA device, not {target.device}; drop it or use --device cuda")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        # Decode-time forwards replay CUDA graphs that read self._tokens; the prefill stays eager.
        self._graphs = CudaGraphs(self._tokens) if self.cuda_graphs else None

    @classmethod
    def from_pretrained(cls, target: str = "default", draft: str | None = "default", device: str = "cpu",
                        dtype: str | torch.dtype | None = None, max_seq_len: int = 4096, kernels: str = "auto",
                        cuda_graphs: bool | None = None, attention: str = "sdpa",
                        protect_ends: bool = DEFAULT_PROTECT_ENDS) -> Engine:
        """cuda_graphs None: on for CUDA, off for CPU. attention: "sdpa", or "flash" (CUDA, the `gpu` extra).
        protect_ends: lossy modes never overrule the target's end of sequence or code fence."""
        device = _parse_device(device)
        dtype = _parse_dtype(dtype, device)
        if max_seq_len < 2:
            raise AutojudgeError(f"--max-seq-len must be at least 2, got {max_seq_len}")
        target_ckpt = loading.resolve(target, "target")
        tokenizer = load_tokenizer(target_ckpt.directory)
        target_dec = Decoder.load(target_ckpt, tokenizer, dtype, device, max_seq_len, attention)
        draft_dec = None
        if draft is not None:
            draft_ckpt = loading.resolve(draft, "draft")
            draft_tok = load_tokenizer(draft_ckpt.directory)
            check_compatible(tokenizer, draft_tok, target_ckpt.name, draft_ckpt.name)
            # The draft embeds every token the target commits. Ids past the draft's rows but inside the target's
            # padding rows (Qwen2.5-7B has 152064 rows, its 0.5B draft 151936) are clamped by the model; real
            # tokens past the draft's rows would be embedded wrongly throughout, so the pair is refused.
            draft_rows = draft_ckpt.config.vocab_size
            if len(tokenizer) > draft_rows:
                raise AutojudgeError(
                    f"the draft ({draft_ckpt.name}) has {draft_rows} vocabulary rows but the tokenizer has "
                    f"{len(tokenizer)} tokens; pick a draft whose vocabulary covers the target's tokenizer"
                )
            draft_dec = Decoder.load(draft_ckpt, draft_tok, dtype, device, max_seq_len, attention)
        eos = target_ckpt.eos_token_ids() | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        protected = end_of_answer_ids(tokenizer, eos) if protect_ends else ()
        return cls(target_dec, draft_dec, tokenizer, eos, kernels, cuda_graphs, protected)

    def encode_prompt(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.target.config.vocab_size)

    def generate(self, prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, mode: str = "speculative",
                 window: int = DEFAULT_WINDOW, ignore_eos: bool = False, temperature: float = 0.0,
                 seed: int | None = None, judge=None, threshold: float | None = None) -> GenerationOutput:
        steps = list(self._decode(prompt, max_new_tokens, mode, window, ignore_eos, temperature, seed, judge,
                                  threshold))
        prompt_ids, _, stats = steps[-1]
        token_ids = [t for _, new, _ in steps for t in new]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return GenerationOutput(text=text, token_ids=token_ids, prompt_ids=prompt_ids, stats=stats)

    def generate_batch(self, prompts, max_batch: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       mode: str = "speculative", window: int = DEFAULT_WINDOW, ignore_eos: bool = False,
                       temperature: float = 0.0, seed: int | None = None, judge=None, threshold: float | None = None,
                       on_output=None, schedule: str = "cycles", prompt_states: dict | None = None):
        """One GenerationOutput per prompt, in order (a list that also carries `.stats` for the batch), decoded
        with continuous batching through at most `max_batch` cache rows. Same options as `generate`; every prompt
        is checked before any is decoded. `on_output(index, output)` is called as each prompt finishes (in
        finishing order), so a caller can keep results that a later crash would otherwise lose. `schedule`
        "tokenwise" takes greedy cycles' decisions one token at a time: the same outputs and cycle statistics for
        about half the arithmetic, but not speculative decoding's timing (`autojudge.engine.tokenwise`).
        `prompt_states`: a dict the caller keeps between calls; each prompt's caches after its prefill are kept in
        it, and a prompt found there is copied into its cache row instead of prefilled (an eval decodes the same
        prompts in every mode). It grows by ~80 KB a prompt token for the default pair in fp32."""
        from autojudge.engine.batched import BatchRun
        from autojudge.engine.tokenwise import TokenwiseRun

        if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise AutojudgeError("generate_batch takes a non-empty list of prompts")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise AutojudgeError(f"max_batch must be at least 1, got {max_batch}")
        threshold = self._checked_threshold(mode, window, max_new_tokens, temperature, judge, threshold, schedule)
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(self._encode_fitting(prompt))
            except AutojudgeError as err:
                raise AutojudgeError(f"prompt {i} of {len(prompts)}: {err}") from None
        with self._exclusive():
            run = TokenwiseRun if schedule == "tokenwise" and mode != "target" else BatchRun
            return run(self, encoded, max_batch, max_new_tokens, mode, window, ignore_eos, temperature, seed, judge,
                       threshold, on_output, prompt_states).run()

    def _encode_fitting(self, prompt) -> list[int]:
        prompt_ids = self.encode_prompt(prompt)
        limit = self.target.max_seq_len
        if len(prompt_ids) >= limit:
            raise AutojudgeError(
                f"prompt of {len(prompt_ids)} tokens does not fit the KV cache of {limit} tokens; raise --max-seq-len"
            )
        return prompt_ids

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yields text pieces as cycles finish; a piece is held back while it ends inside a UTF-8 character."""
        token_ids: list[int] = []
        sent = 0
        for _, new, _ in self._decode(prompt, **_decode_kwargs(kwargs)):
            token_ids.extend(new)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if len(text) > sent:
            yield text[sent:]

    # ------------------------------------------------------------------ decoding

    def _decode(self, prompt, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, mode="speculative", window=DEFAULT_WINDOW,
                ignore_eos=False, temperature=0.0, seed=None, judge=None, threshold=None):
        """Yields (prompt_ids, new token ids of this step, stats) after the prefill and after every cycle."""
        with self._exclusive():
            yield from self._decode_owned(prompt, max_new_tokens, mode, window, ignore_eos, temperature, seed, judge,
                                          threshold)

    @contextmanager
    def _exclusive(self):
        """One generation at a time: the caches and the committed-token buffer belong to it until it ends."""
        if not self._busy.acquire(blocking=False):
            raise AutojudgeError("this engine is already generating (a stream not yet finished or closed, or another "
                                 "thread); finish or close that first, or use one Engine per thread")
        try:
            yield
        finally:
            self._busy.release()

    def _checked_threshold(self, mode, window, max_new_tokens, temperature, judge, threshold,
                           schedule="cycles") -> float | None:
        """Checks the request; returns the judge threshold to decode with (the judge's own default if None)."""
        check_request(mode, window=window, max_new_tokens=max_new_tokens, temperature=temperature,
                      has_draft=self.draft is not None, has_judge=judge is not None, threshold=threshold,
                      schedule=schedule)
        if judge is not None and (mode == "topk") != isinstance(judge, TopkRule):
            raise AutojudgeError(f"mode {mode!r} takes {'a TopkRule' if mode == 'topk' else 'a trained judge'} as "
                                 f"judge, not {type(judge).__name__}")
        return judge.default_threshold if judge is not None and threshold is None else threshold

    def _decode_owned(self, prompt, max_new_tokens, mode, window, ignore_eos, temperature, seed, judge, threshold):
        threshold = self._checked_threshold(mode, window, max_new_tokens, temperature, judge, threshold)
        prompt_ids = self._encode_fitting(prompt)
        stats = GenerationStats(mode=mode, window=window if mode != "target" else 0, prompt_tokens=len(prompt_ids))
        sampler = _Sampler(temperature, seed, self.target.device)
        progress = Progress(stats, max_new_tokens, ignore_eos, self.eos_token_ids)
        if mode == "target":
            steps = self._target_steps(prompt_ids, sampler, stats)
        else:
            steps = self._speculative_steps(prompt_ids, window, sampler, stats, judge, threshold, max_new_tokens)
        for new in steps:
            new, done = progress.take(new, cache_full=self._cache_full())
            yield prompt_ids, new, stats
            if done:
                steps.close()
                return

    def _cache_full(self) -> bool:
        return self._seq_len >= self.target.max_seq_len

    def _prefill(self, decoder: Decoder, prompt_ids: list[int], logits_from: int | None):
        """Runs the prompt through `decoder`, skipping the prefix its cache already holds (mining and eval
        re-decode from long shared prefixes); the last prompt token always runs, for its logits."""
        n = len(prompt_ids)
        start = min(decoder.reusable_prefix(prompt_ids), n - 1)
        return decoder.forward(self._tokens[start:n], start, logits_from=logits_from)

    def _start(self, prompt_ids: list[int], sampler, stats) -> int:
        """Prefills the target and commits its first token."""
        n = len(prompt_ids)
        t0 = time.perf_counter()
        self._tokens[:n] = torch.as_tensor(prompt_ids, dtype=torch.long)
        logits, _ = self._prefill(self.target, prompt_ids, logits_from=-1)
        self._tokens[n] = sampler.sample(logits[-1])
        self._seq_len = n + 1
        stats.prefill_s = time.perf_counter() - t0
        return int(self._tokens[n])

    def _forward(self, decoder: Decoder, start: int, end: int, logits_from: int | None):
        """`decoder` over tokens[start:end] at positions start..: a graph replay when CUDA graphs are on."""
        if self._graphs is not None:
            return self._graphs.forward(decoder, start, end, logits_from)
        return decoder.forward(self._tokens[start:end], start, logits_from=logits_from)

    def _target_steps(self, prompt_ids, sampler, stats):
        yield [self._start(prompt_ids, sampler, stats)]
        while True:
            yield [self._target_step(sampler)]

    def _target_step(self, sampler) -> int:
        pos = self._seq_len - 1
        logits, _ = self._forward(self.target, pos, pos + 1, 0)
        self._tokens[pos + 1] = sampler.sample(logits[-1])
        self._seq_len += 1
        return int(self._tokens[pos + 1])

    def _speculative_steps(self, prompt_ids, window, sampler, stats, judge, threshold, max_new_tokens):
        """Cycle after cycle: draft k tokens, verify them in one target pass, commit the accepted ones and the
        target's next token (a correction after a rejection, a bonus token after a full window)."""
        first = self._start(prompt_ids, sampler, stats)
        t0 = time.perf_counter()
        self._prefill(self.draft, prompt_ids, logits_from=None)
        stats.prefill_s += time.perf_counter() - t0
        yield [first]
        cycle = _Cycle(self, len(prompt_ids), window, sampler, judge, threshold)
        wanted = max_new_tokens - 1
        while True:
            seq_len = self._seq_len
            k = draft_length(window, self.target.max_seq_len, seq_len, wanted)
            if k < 1:  # one slot left: the target fills it, as target-only decoding would
                yield [self._target_step(sampler)]
                continue
            cycle.clock.mark(0)
            self._draft(cycle, seq_len, k)
            cycle.clock.mark(1)
            result = self._verify(cycle, seq_len, k, offset=stats.cycles)
            cycle.clock.mark(2)
            new_tokens, rescues = self._commit(cycle, seq_len, k, result)
            stats.record_cycle(k, len(new_tokens) - 1, rescues, cycle.clock.seconds(0, 1), cycle.clock.seconds(1, 2))
            wanted -= len(new_tokens)
            yield new_tokens

    def _draft(self, cycle: _Cycle, seq_len: int, k: int) -> None:
        """Drafts k tokens into tokens[seq_len : seq_len + k]. With a draft-side judge, one more draft step yields
        the hidden state at the last drafted token (and saves that step next cycle if all are accepted)."""
        steps = k + 1 if cycle.draft_hidden is not None else k
        for i in range(steps):
            begin = cycle.draft_valid if i == 0 else seq_len + i - 1
            logits, hidden = self._forward(self.draft, begin, seq_len + i, -1)
            if i > 0 and cycle.draft_hidden is not None:
                cycle.draft_hidden[i - 1] = hidden[-1]
            if i < k:
                self._tokens[seq_len + i] = cycle.sampler.draft(logits[-1, : cycle.common_vocab], cycle.draft_probs, i)
        cycle.draft_end = seq_len + steps - 1  # the draft has processed every token before this position

    def _verify(self, cycle: _Cycle, seq_len: int, k: int, offset: int) -> VerifyOutput:
        """One target pass over the last committed token and the k drafted ones, then the fused verify kernel."""
        logits, hidden = self._forward(self.target, seq_len - 1, seq_len + k, 0)

        def features():
            target_hidden = hidden[1:].float()[None]
            return target_hidden if cycle.draft_hidden is None else (cycle.draft_hidden[:k][None], target_hidden)

        if k not in cycle.verify_outs:
            cycle.verify_outs[k] = VerifyOutput.empty(1, k, self.target.device)
        return self.verify(
            logits[None], self._tokens[seq_len : seq_len + k][None],
            **self.lossy_verify_args(cycle.judge, cycle.threshold, features),
            temperature=cycle.sampler.temperature,
            draft_probs=None if cycle.draft_probs is None else cycle.draft_probs[:k][None],
            # The kernel launches after the graph, not inside it, so a host int is a fresh argument every cycle;
            # no device offset tensor is needed.
            seed=cycle.sampler.seed, offset=offset,
            out=cycle.verify_outs[k],
        )

    def _commit(self, cycle: _Cycle, seq_len: int, k: int, result: VerifyOutput) -> tuple[list[int], int]:
        """Keeps the accepted draft tokens and writes the target's next token after them; returns the new tokens
        and how many of them only the judge accepted. The cycle's one host read happens here."""
        tokens = self._tokens
        parts = [result.num_accepted, result.next_token, tokens[seq_len : seq_len + k]]
        if cycle.judge is not None:
            parts.append((result.judge_ok[0] & ~result.target_ok[0]).long())
        gathered = torch.cat(parts)  # queued before the commit below writes over a rejected draft slot
        # Committed on the device: a host int written into a CUDA tensor is a blocking copy, a second sync.
        tokens.index_put_((result.num_accepted + seq_len,), result.next_token)
        host = gathered.tolist()
        accepted, next_token, drafted = host[0], host[1], host[2 : 2 + k]
        rescues = sum(host[2 + k : 2 + k + accepted]) if cycle.judge is not None else 0
        self._seq_len = seq_len + accepted + 1
        cycle.draft_valid = min(seq_len + accepted, cycle.draft_end)
        return drafted[:accepted] + [next_token], rescues

    def lossy_verify_args(self, judge, threshold: float | None, features) -> dict:
        """The verify kernel's arguments for a lossy rule: a trained judge scores `features()` (called only then),
        the top-k rule reads the logits alone; both leave the protected tokens alone. None for lossless decoding."""
        if judge is None:
            return {}
        if isinstance(judge, TopkRule):
            return dict(topk=judge.k, topk_alpha=threshold, protected_tokens=self.protected_tokens)
        return dict(judge_features=features(), judge_weight=judge.weight, judge_bias=float(judge.bias),
                    threshold=threshold, protected_tokens=self.protected_tokens)


class _Cycle:
    """What the steps of a speculative generation share: its settings and the buffers reused every cycle."""

    def __init__(self, engine: Engine, prompt_len: int, window: int, sampler: _Sampler, judge, threshold):
        target, draft = engine.target, engine.draft
        self.sampler, self.judge = sampler, judge
        self.threshold = threshold
        self.common_vocab = min(draft.config.vocab_size, target.config.vocab_size)
        self.draft_valid = prompt_len  # the draft's cache holds correct keys/values for [0, draft_valid)
        self.draft_end = prompt_len
        self.draft_hidden = (torch.zeros(window, draft.config.hidden_size, dtype=torch.float32, device=draft.device)
                             if judge is not None and judge.uses_draft else None)
        self.draft_probs = (torch.zeros(window, target.config.vocab_size, device=target.device)
                            if sampler.temperature > 0 else None)
        self.verify_outs: dict[int, VerifyOutput] = {}  # per draft length: the kernel writes the same buffers
        self.clock = _PhaseClock(target.device)


class _PhaseClock:
    """Phase boundaries of a cycle: CUDA events on a GPU, where host clocks would time the launches rather than
    the work; perf_counter on CPU. Read after the cycle's host sync, so the events have completed and reading
    them adds no sync."""

    def __init__(self, device: torch.device, marks: int = 3):
        self.cuda = device.type == "cuda"
        self.marks = [torch.cuda.Event(enable_timing=True) if self.cuda else 0.0 for _ in range(marks)]

    def mark(self, i: int):
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = time.perf_counter()

    def seconds(self, i: int, j: int) -> float:
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j]) / 1e3
        return self.marks[j] - self.marks[i]


class _Sampler:
    """Greedy when temperature is 0; otherwise seeded sampling of draft tokens (the target side is in verify)."""

    def __init__(self, temperature: float, seed: int | None, device: torch.device):
        self.temperature = temperature
        self.seed = seed if seed is not None else (int(torch.randint(0, 2**31 - 1, ())) if temperature > 0 else None)
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax()
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def draft(self, logits: torch.Tensor, probs_out: torch.Tensor | None, i: int) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax()
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        probs_out[i].zero_()
        probs_out[i, : probs.shape[0]] = probs
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def _decode_kwargs(kwargs: dict) -> dict:
    allowed = {"max_new_tokens", "mode", "window", "ignore_eos", "temperature", "seed", "judge", "threshold"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    return kwargs


def _parse_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise AutojudgeError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise AutojudgeError(f"device {str(device)!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutojudgeError("--device cuda asked but no CUDA GPU is available; use --device cpu")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AMX or AVX512_BF16: there bf16 halves a decode step (bench/RESULTS.md); elsewhere torch emulates bf16
    matmuls, slower than fp32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", text) is not None


def _parse_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: fp32 on CPU (exact), bf16 on CUDA; "auto": the fast one, bf16 also on a CPU with native bf16."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise AutojudgeError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
