"""Continuous batching: any number of prompts through at most `max_batch` cache rows ("slots"), every model
call serving all busy slots at once. A finished sequence frees its slot and the next waiting prompt is
prefilled into it, so uneven answer lengths do not leave slots idle; once no prompt waits, the rows still busy
move down into the free ones and forwards serve only them (`_pack_rows`).

Each slot keeps its own length; a forward takes per row its own tokens at its own positions. Rows with fewer
tokens than the longest are padded, and padding is written to the trash slot `max_seq_len`, which no real
query sees. A speculative cycle drafts the longest window any row needs; a row whose own window is shorter
(near its budget or its cache end) is verified as if it had drafted only that many tokens, so every row takes
exactly the decisions its batch-1 run would. Sampling uses one window for all rows (the shortest), which
keeps it lossless without that correction. The cycle keeps one host read for the whole batch. With CUDA graphs
on, the batched decode-time forwards replay one graph per (model, rows, tokens); prefills stay eager.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from autojudge.engine.engine import (
    GenerationOutput,
    GenerationStats,
    Progress,
    _PhaseClock,
    _Sampler,
    draft_length,
)
from autojudge.kernels import VerifyOutput


@dataclass
class BatchStats:
    prompts: int
    slots: int
    new_tokens: int = 0
    model_steps: int = 0  # batched decode steps (target mode) or cycles (speculative modes)
    busy_slot_steps: int = 0  # summed over model steps: slots holding an unfinished sequence
    total_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def occupancy(self) -> float:
        """Mean share of the slots that held a sequence during a model step."""
        return self.busy_slot_steps / (self.model_steps * self.slots) if self.model_steps else 0.0


@dataclass
class PromptState:
    """A prompt's keys and values in each model (`Decoder.row_state`) and the target's logits after it."""

    target: dict[str, torch.Tensor]
    logits: torch.Tensor
    draft: dict[str, torch.Tensor] | None = None


class BatchOutputs(list):
    """One GenerationOutput per prompt, in the prompts' order, plus `stats` for the whole batch."""

    def __init__(self, outputs: list[GenerationOutput], stats: BatchStats):
        super().__init__(outputs)
        self.stats = stats


@dataclass
class _Slot:
    prompt_index: int
    prompt_ids: list[int]
    stats: GenerationStats
    progress: Progress
    seq_len: int = 0  # committed tokens (prompt included)
    draft_valid: int = 0  # the draft's cache holds correct keys/values for [0, draft_valid)
    wanted: int = 0  # tokens still to generate, as the batch-1 cycle counts them
    token_ids: list[int] = field(default_factory=list)


class BatchRun:
    def __init__(self, engine, prompts: list[list[int]], max_batch: int, max_new_tokens: int, mode: str,
                 window: int, ignore_eos: bool, temperature: float, seed: int | None, judge, threshold,
                 on_output=None, prompt_states: dict | None = None):
        self.engine, self.mode, self.window = engine, mode, window
        self.prompt_states = prompt_states
        self.on_output = on_output
        self.max_new_tokens, self.ignore_eos = max_new_tokens, ignore_eos
        self.judge, self.threshold = judge, threshold
        self.target, self.draft = engine.target, (None if mode == "target" else engine.draft)
        self.device = self.target.device
        self.n = min(max_batch, len(prompts))
        self.trash = self.target.max_seq_len  # a slot past every real position
        for dec in filter(None, (self.target, self.draft)):
            dec.ensure_rows(self.n)
        self.tokens = torch.zeros(self.n, self.trash + 1, dtype=torch.long, device=self.device)
        self.rows = torch.arange(self.n, device=self.device)
        self.graphs = engine._graphs
        self.sampler = _Sampler(temperature, seed, self.device)
        self.waiting = deque(enumerate(prompts))
        self.slots: list[_Slot | None] = [None] * self.n
        self.outputs: list[GenerationOutput | None] = [None] * len(prompts)
        self.stats = BatchStats(prompts=len(prompts), slots=self.n)
        self.clock = _PhaseClock(self.device)
        if self.draft is not None:
            self.common_vocab = min(self.draft.config.vocab_size, self.target.config.vocab_size)
            uses_draft = judge is not None and judge.uses_draft
            self.draft_hidden = (torch.zeros(self.n, window, self.draft.config.hidden_size, device=self.device)
                                 if uses_draft else None)
            self.draft_probs = (torch.zeros(self.n, window, self.target.config.vocab_size, device=self.device)
                                if temperature > 0 else None)
            self.verify_outs: dict[int, VerifyOutput] = {}

    # ---------------------------------------------------------------------------------------- the loop

    def run(self) -> BatchOutputs:
        start = time.perf_counter()
        for b in range(self.n):
            self._refill(b)
        while any(slot is not None for slot in self.slots):
            self.stats.model_steps += 1
            self.stats.busy_slot_steps += sum(slot is not None for slot in self.slots)
            if self.mode == "target":
                self._target_step()
            else:
                self._cycle()
            self._pack_rows()
        self.stats.total_s = time.perf_counter() - start
        self.stats.new_tokens = sum(out.stats.new_tokens for out in self.outputs)
        return BatchOutputs(self.outputs, self.stats)

    def _pack_rows(self) -> None:
        """Once no prompt waits, moves the busy rows into the free rows below them and serves only those from then
        on: on a CPU a step costs about its rows (180 ms + 9 ms a row for the default target in bf16,
        bench/RESULTS.md), and the last long answers of a batch would otherwise take every free row through each
        forward. CUDA graphs replay a fixed number of rows, so with graphs on the rows stay where they are; so do
        sampled rows, as their random numbers are drawn for all rows in slot order: moved, they would draw other
        tokens than the same run with graphs on."""
        if self.waiting or self.graphs is not None or self.sampler.temperature > 0:
            return
        busy = [b for b, slot in enumerate(self.slots) if slot is not None]
        if len(busy) == self.n:
            return
        free = (b for b in range(len(busy)) if self.slots[b] is None)
        for src in (b for b in busy if b >= len(busy)):
            self._move_row(src, next(free))
        self._keep_rows(len(busy))

    def _move_row(self, src: int, dst: int) -> None:
        for dec in filter(None, (self.target, self.draft)):
            dec.move_row(src, dst)
        self.tokens[dst] = self.tokens[src]
        self.slots[dst], self.slots[src] = self.slots[src], None

    def _keep_rows(self, n: int) -> None:
        """Serves rows [0, n) from now on; the per-row buffers become views of their first n rows."""
        self.n = n
        self.tokens, self.rows, self.slots = self.tokens[:n], self.rows[:n], self.slots[:n]
        if self.draft is not None:
            if self.draft_hidden is not None:
                self.draft_hidden = self.draft_hidden[:n]
            if self.draft_probs is not None:
                self.draft_probs = self.draft_probs[:n]
            self.verify_outs = {}

    def _refill(self, b: int) -> None:
        """Prefills the next waiting prompt into slot b (each prompt alone: prompts are ragged); a prompt whose
        first token already ends it hands the slot straight to the next one."""
        self.slots[b] = None
        while self.waiting and self.slots[b] is None:
            index, ids = self.waiting.popleft()
            stats = GenerationStats(mode=self.mode, window=self.window if self.mode != "target" else 0,
                                    prompt_tokens=len(ids))
            slot = _Slot(index, ids, stats, Progress(stats, self.max_new_tokens, self.ignore_eos,
                                                     self.engine.eos_token_ids))
            n = len(ids)
            t0 = time.perf_counter()
            self.tokens[b, :n] = torch.as_tensor(ids, dtype=torch.long)
            self.tokens[b, n] = self._pick(self._prefill(b, ids)[None])[0]
            slot.seq_len, slot.draft_valid, slot.wanted = n + 1, n, self.max_new_tokens - 1
            stats.prefill_s = time.perf_counter() - t0
            self.slots[b] = slot
            self._emit(b, [int(self.tokens[b, n])])

    def _prefill(self, b: int, ids: list[int]) -> torch.Tensor:
        """Runs prompt `ids` (already in tokens[b]) into cache row b of each model; returns the target's logits
        [V] at its last token. A prompt held in `prompt_states` is copied in instead of run, and one that is not
        is added to it."""
        n, key = len(ids), tuple(ids)
        kept = self.prompt_states.get(key) if self.prompt_states is not None else None
        rows, positions, prompt = slice(b, b + 1), torch.arange(n, device=self.device)[None], self.tokens[b : b + 1, :n]
        if kept is None:
            logits = self.target.forward_rows(prompt, positions, n, rows, -1)[0][0, -1]
        else:
            self.target.load_row_state(b, kept.target)
            logits = kept.logits
        if self.draft is not None:
            if kept is None or kept.draft is None:
                self.draft.forward_rows(prompt, positions, n, rows, None)
            else:
                self.draft.load_row_state(b, kept.draft)
        if self.prompt_states is not None:
            if kept is None:
                kept = self.prompt_states[key] = PromptState(self.target.row_state(b, n), logits.clone())
            if self.draft is not None and kept.draft is None:
                kept.draft = self.draft.row_state(b, n)
        return logits

    def _emit(self, b: int, new: list[int]) -> bool:
        """Adds a step's tokens to row b's answer; a finished answer is stored and frees the slot (True)."""
        slot = self.slots[b]
        new, done = slot.progress.take(new, cache_full=slot.seq_len >= self.trash)
        slot.token_ids += new
        if done:
            text = self.engine.tokenizer.decode(slot.token_ids, skip_special_tokens=True)
            output = GenerationOutput(text, slot.token_ids, slot.prompt_ids, slot.stats)
            self.outputs[slot.prompt_index] = output
            self.slots[b] = None
            if self.on_output is not None:
                self.on_output(slot.prompt_index, output)
        return done

    def _emit_and_refill(self, b: int, new: list[int]) -> None:
        if self._emit(b, new):
            self._refill(b)

    # ---------------------------------------------------------------------------------------- helpers

    def _pick(self, logits: torch.Tensor, probs_out: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row of logits [B, V]: argmax, or a sample (its distribution kept in probs_out)."""
        if self.sampler.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.sampler.temperature, dim=-1)
        if probs_out is not None:
            probs_out.zero_()
            probs_out[:, : probs.shape[-1]] = probs
        return torch.multinomial(probs, 1, generator=self.sampler.generator)[:, 0]

    def _index(self, columns: list[list[int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T], positions [B, T]) read from the committed-token buffer at per-row positions; None
        marks padding, which reads the trash column and is written to the trash slot."""
        positions = torch.tensor([[self.trash if p is None else p for p in row] for row in columns],
                                 dtype=torch.long, device=self.device)
        return self.tokens.gather(1, positions), positions

    def _write(self, columns: list[int | None], values: torch.Tensor) -> None:
        """tokens[b, columns[b]] = values[b] on the device; None writes to the trash column."""
        cols = torch.tensor([self.trash if c is None else c for c in columns], dtype=torch.long, device=self.device)
        self.tokens.index_put_((self.rows, cols), values)

    def _forward(self, decoder, columns: list[list[int | None]], logits_from: int | None):
        """`decoder` over every cache row at the committed tokens of `columns` (see `_index`): a graph replay when
        CUDA graphs are on, else eager, attending up to the last real position (padding sees none of them)."""
        tokens, positions = self._index(columns)
        if self.graphs is not None:
            logits, hidden = self.graphs.forward_rows(decoder, tokens, positions, logits_from)
        else:
            kv_len = max((p for row in columns for p in row if p is not None), default=0) + 1
            logits, hidden = decoder.forward_rows(tokens, positions, kv_len, slice(0, self.n), logits_from)
        return tokens, logits, hidden

    # ---------------------------------------------------------------------------------------- target mode

    def _target_step(self) -> None:
        columns = [[None if s is None else s.seq_len - 1] for s in self.slots]
        _, logits, _ = self._forward(self.target, columns, 0)
        nxt = self._pick(logits[:, 0])
        self._write([None if s is None else s.seq_len for s in self.slots], nxt)
        host = nxt.tolist()
        for b, slot in enumerate(self.slots):
            if slot is not None:
                slot.seq_len += 1
                self._emit_and_refill(b, [host[b]])

    def _target_step_alone(self, b: int) -> None:
        """The last free cache slot of row b: the target fills it, as batch-1 decoding would."""
        slot = self.slots[b]
        pos = slot.seq_len - 1
        positions = torch.tensor([[pos]], device=self.device)
        logits, _ = self.target.forward_rows(self.tokens[b : b + 1, pos : pos + 1], positions, pos + 1,
                                             slice(b, b + 1), 0)
        self.tokens[b, pos + 1] = self._pick(logits[:, 0])[0]
        slot.seq_len += 1
        slot.wanted -= 1
        self._emit_and_refill(b, [int(self.tokens[b, pos + 1])])

    # ---------------------------------------------------------------------------------------- speculative

    def _windows(self) -> dict[int, int]:
        """Each busy row's window as its batch-1 run would choose it (budget and cache end); rows with no room
        for a window take their last token from the target alone first."""
        ks = {}
        for b in range(self.n):
            while self.slots[b] is not None:
                slot = self.slots[b]
                k = draft_length(self.window, self.trash, slot.seq_len, slot.wanted)
                if k >= 1:
                    ks[b] = k
                    break
                self._target_step_alone(b)
        if ks and self.sampler.temperature > 0:
            shortest = min(ks.values())
            ks = dict.fromkeys(ks, shortest)
        return ks

    def _cycle(self) -> None:
        ks = self._windows()
        if not ks:
            return
        k_max = max(ks.values())
        extra = 1 if self.draft_hidden is not None else 0
        self.clock.mark(0)
        draft_end = self._draft(ks, k_max, extra)
        self.clock.mark(1)
        result, drafts, logits = self._verify(ks, k_max)
        self.clock.mark(2)
        self._commit(ks, k_max, result, drafts, logits, draft_end)

    def _draft(self, ks: dict[int, int], k_max: int, extra: int) -> dict[int, int]:
        """Drafts up to k_max tokens per row (row b needs ks[b], plus one step for a draft-side judge)."""
        slots = self.slots
        for i in range(k_max + extra):
            if i == 0:
                # Catch-up: the tokens the draft has not seen yet (1 or 2), left-padded to a common length.
                spans = {b: list(range(slots[b].draft_valid, slots[b].seq_len)) for b in ks}
                width = max(len(span) for span in spans.values())
                columns = [[None] * (width - len(spans[b])) + spans[b] if b in spans else [None] * width
                           for b in range(self.n)]
            else:
                columns = [[slots[b].seq_len + i - 1] if b in ks and i < ks[b] + extra else [None]
                           for b in range(self.n)]
            _, logits, hidden = self._forward(self.draft, columns, -1)
            if i > 0 and self.draft_hidden is not None:
                self.draft_hidden[:, i - 1] = hidden[:, -1]
            if i < k_max:
                probs = None if self.draft_probs is None else self.draft_probs[:, i]
                drafted = self._pick(logits[:, -1, : self.common_vocab], probs)
                self._write([slots[b].seq_len + i if b in ks and i < ks[b] else None for b in range(self.n)], drafted)
        return {b: slots[b].seq_len + ks[b] + extra - 1 for b in ks}

    def _verify(self, ks: dict[int, int], k_max: int):
        """One target pass over each row's last committed token and its drafts, then the fused kernel."""
        slots = self.slots
        columns = [[slots[b].seq_len - 1 + j if b in ks and j <= ks[b] else None for j in range(k_max + 1)]
                   for b in range(self.n)]
        tokens, logits, hidden = self._forward(self.target, columns, 0)
        # Past a row's own window the drafts are -1: out of the vocabulary, never accepted by the target.
        live = torch.tensor([[b in ks and j < ks[b] for j in range(k_max)] for b in range(self.n)],
                            device=self.device)
        drafts = torch.where(live, tokens[:, 1:], -1)

        def features():
            target_hidden = hidden[:, 1:].float()
            return target_hidden if self.draft_hidden is None else (self.draft_hidden[:, :k_max], target_hidden)

        if k_max not in self.verify_outs:
            self.verify_outs[k_max] = VerifyOutput.empty(self.n, k_max, self.device)
        result = self.engine.verify(
            logits, drafts,
            **self.engine.lossy_verify_args(self.judge, self.threshold, features),
            temperature=self.sampler.temperature,
            draft_probs=None if self.draft_probs is None else self.draft_probs[:, :k_max],
            seed=self.sampler.seed, offset=self.stats.model_steps,
            out=self.verify_outs[k_max],
        )
        return result, drafts, logits

    def _commit(self, ks, k_max, result, drafts, logits, draft_end) -> None:
        """Per row: keep its accepted drafts, write the target's next token after them; one host read."""
        slots = self.slots
        accepted, nxt = result.num_accepted, result.next_token
        if self.judge is not None:
            # Past a row's own window the drafts are -1, so only a judge can accept there; that row then gets
            # the target's bonus token at its own window.
            own_k = torch.tensor([ks.get(b, k_max) for b in range(self.n)], device=self.device)
            cut = accepted > own_k
            accepted = torch.minimum(accepted, own_k)
            nxt = torch.where(cut, logits[self.rows, own_k].argmax(-1), nxt)
        parts = [accepted, nxt, drafts.flatten()]
        if self.judge is not None:
            parts.append((result.judge_ok & ~result.target_ok).long().flatten())
        gathered = torch.cat(parts)  # queued before the commit below writes over a rejected draft slot
        cols = torch.tensor([slots[b].seq_len if b in ks else self.trash for b in range(self.n)],
                            device=self.device)
        self.tokens.index_put_((self.rows, torch.where(cols == self.trash, cols, cols + accepted)), nxt)
        host = gathered.tolist()
        n = self.n
        acc, nxt_host, drafted = host[:n], host[n : 2 * n], host[2 * n : 2 * n + n * k_max]
        rescued = host[2 * n + n * k_max :]
        draft_s, verify_s = self.clock.seconds(0, 1), self.clock.seconds(1, 2)
        for b, k in ks.items():
            slot, a = slots[b], acc[b]
            rescues = sum(rescued[b * k_max : b * k_max + a]) if self.judge is not None else 0
            new = drafted[b * k_max : b * k_max + a] + [nxt_host[b]]
            slot.draft_valid = min(slot.seq_len + a, draft_end[b])
            slot.seq_len += a + 1
            slot.wanted -= a + 1
            slot.stats.record_cycle(k, a, rescues, draft_s, verify_s)
            self._emit_and_refill(b, new)
