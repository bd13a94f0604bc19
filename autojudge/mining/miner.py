"""Greedy AutoJudge mining: which draft/target mismatches change the target's final answer.

For a problem, the target answers greedily; then, left to right, the first position where the draft's
greedy prediction differs from the current sequence is swapped to the draft token and the target
continues greedily from there. If the checker's outcome is unchanged the mismatch is unimportant and the
swapped sequence becomes the current one; otherwise it is important and the sequence is kept. An answer
the token budget cuts off has no final answer to keep or change, so by default its problem gets no labels.

Continuations dominate the cost. Two exact tricks, both switchable: lossless speculative decoding, and
the previous continuation as a free draft (after a swap the old text often still fits, at once or after
a few tokens), verified by teacher-forced target passes over pieces that grow while they fit.

The search is written once, as generators that yield the model calls they need (`Predict`, `Generate`) and
receive the answers: `Miner.mine` serves them one at a time, `mining.batched` serves the calls of many problems
in shared forward passes. Both give the same labels.

With `save_features` on, each label also asks both models for their hidden state at the draft token (`Hidden`:
one position each, past the prefix the caches already hold), so training reads the judge's features instead of
running the models over every label's sequence again (judge/features.py, `StoredFeatures`).

A problem can take an hour in a large batch, so the search reports checkpoints as it goes (`on_checkpoint`): an
`answer` row once the target has answered, a `step` row as each mismatch gets its label (with the continuation
it kept, if any). Handed those rows back (`resume`), a search goes on from the last one instead of starting over.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field

from autojudge.engine.request import DEFAULT_WINDOW
from autojudge.tasks.checkers import Checker
from autojudge.tasks.datasets import Problem

# A previous continuation is proposed again when its n-gram matches the end of the new text.
_NGRAMS = (4, 3, 2)
# Tokens generated before the next attempt to rejoin the previous continuation; each chunk costs a
# prefill, so chunks double while the texts stay apart and start small again once they meet.
_FIRST_CHUNK = 8
# Tokens of the previous continuation checked in one target pass; doubled while accepted whole. A pass
# costs a fixed part plus a part per token, so a long proposal that parts after a few tokens wastes most
# of its pass (bf16 on the 2-core CPU: ~150 ms + ~8 ms a token, bench/RESULTS.md).
_FIRST_PROPOSAL = 32
# Positions the draft predicts in its first piece when looking for the next mismatch (doubled while none is found):
# mismatches lie ~20 tokens apart on GSM8K answers, and a piece costs its positions plus little else.
_FIRST_DRAFT_PIECE = 8


@dataclass(frozen=True)
class MiningOptions:
    max_new_tokens: int = 256
    window: int = DEFAULT_WINDOW
    speculative: bool = True  # continuations by lossless speculative decoding
    # The previous continuation as a free draft: its checks run from the cached prefix, so they cost
    # little, and on the default pair it cut mining time by 1.6x (bench/RESULTS.md).
    reuse_continuation: bool = True
    # An answer cut by the token budget has no final answer, so every swap "changes" whatever number the
    # cut happens to end on: its labels would be noise. Synthetic checkers that read any text can keep them.
    skip_truncated: bool = True
    save_features: bool = False  # each label's judge features, handed to on_features


@dataclass
class Cost:
    """What one problem cost; forwards are model calls, positions the tokens they processed."""

    target_forwards: int = 0
    target_positions: int = 0
    draft_forwards: int = 0
    draft_positions: int = 0
    generated_tokens: int = 0  # continuation tokens that came from the engine
    reused_tokens: int = 0  # continuation tokens confirmed from the previous continuation
    verify_passes: int = 0  # teacher-forced target passes that checked a previous continuation
    continuation_s: float = 0.0
    checker_s: float = 0.0

    def count_forward(self, model: str, positions: int) -> None:
        if model == "target":
            self.target_forwards += 1
            self.target_positions += positions
        else:
            self.draft_forwards += 1
            self.draft_positions += positions


@dataclass(frozen=True)
class Predict:
    """The greedy next token after ids[: t + 1] for each t in [start, len(ids)), from model "target" or "draft"
    (the draft's restricted to the vocabulary both share). `until_mismatch`: a check of proposed tokens, which needs
    no answer past the first t whose greedy token differs from ids[t + 1] (those may be left out)."""

    model: str
    ids: list[int]
    start: int
    until_mismatch: bool = False


@dataclass(frozen=True)
class Generate:
    """Up to n greedy target tokens after `context`, ending after an EOS token or at the cache end."""

    context: list[int]
    n: int


@dataclass(frozen=True)
class Hidden:
    """The last-layer hidden state (after the final norm, fp32 [D]) of model "target" or "draft" at the last
    position of ids: a judge feature when ids ends with the draft token being judged."""

    model: str
    ids: list[int]


# A generator of the search: yields Predict/Generate/Hidden, is sent each answer, returns its result.
Steps = Generator[Predict | Generate | Hidden, object, object]


def run_steps(steps: Steps, serve):
    """Drives `steps` to its end, answering each request with serve(request)."""
    answer = None
    while True:
        try:
            request = steps.send(answer)
        except StopIteration as stop:
            return stop.value
        answer = serve(request)


@dataclass
class ProblemResult:
    labels: list[dict]
    record: dict
    cost: Cost = field(default_factory=Cost)


class Miner:
    def __init__(self, engine, checker: Checker, options: MiningOptions = MiningOptions(), on_checkpoint=None,
                 on_features=None):
        """on_checkpoint(row): called with each checkpoint row (module docstring), so long problems show progress
        and lose nothing when the run is killed before they end. on_features(label, {"draft": h, "target": h}):
        with options.save_features, called with each label's features before its checkpoint."""
        self.engine = engine
        self.checker = checker
        self.options = options
        self.on_checkpoint = on_checkpoint
        self.on_features = on_features
        self.common_vocab = min(engine.target.config.vocab_size, engine.draft.config.vocab_size)
        self.max_seq_len = engine.target.max_seq_len

    # ------------------------------------------------------------------ continuations

    def continuation(self, prefix: list[int], budget: int, hint: list[int], cost: Cost) -> list[int]:
        return run_steps(self.continuation_steps(prefix, budget, hint, cost), lambda r: self.serve(r, cost))

    def continuation_steps(self, prefix: list[int], budget: int, hint: list[int], cost: Cost) -> Steps:
        """The target's greedy continuation of `prefix` (at most `budget` tokens, up to EOS).

        `hint` is a guess at it (the continuation before the last swap); when reuse is on, its
        pieces are proposed wherever they line up with the text so far.
        """
        t0 = time.perf_counter()
        hint = hint if self.options.reuse_continuation else []
        out: list[int] = []
        # `follow`: the hint goes on at `cursor` (as at the start); otherwise it is looked up by n-gram.
        cursor, propose, follow = 0, bool(hint), True
        chunk, proposal = (_FIRST_CHUNK if hint else budget), _FIRST_PROPOSAL
        while not self._finished(prefix, out, budget):
            start = None
            if propose:
                start = cursor if follow else self._rejoin(hint, prefix + out, cursor)
            if start is not None and start < len(hint):
                piece = hint[start : start + min(proposal, budget - len(out))]
                accepted, new = yield from self._verify(prefix + out, piece, cost)
                whole = accepted == len(piece)
                proposal = proposal * 2 if whole else _FIRST_PROPOSAL
                cursor = start + accepted
                # After a whole piece the target's next token may simply be the hint's next one.
                follow = whole and cursor < len(hint) and new[-1] == hint[cursor]
                cursor += follow
                # A miss at once means the texts parted again: generate a while before looking again.
                propose = accepted > 0
                if accepted:
                    chunk = _FIRST_CHUNK
            else:
                follow = False
                new = yield from self._generate(prefix + out, min(chunk, budget - len(out)), cost)
                propose, chunk = bool(hint), chunk * 2
                if not new:
                    break
            out.extend(self._clip(new, budget - len(out)))
        cost.continuation_s += time.perf_counter() - t0
        return out

    def _finished(self, prefix: list[int], out: list[int], budget: int) -> bool:
        last = out[-1] if out else prefix[-1]
        return (len(out) >= budget or last in self.engine.eos_token_ids
                or len(prefix) + len(out) >= self.max_seq_len)

    def _clip(self, new: list[int], room: int) -> list[int]:
        new = new[:room]
        eos_at = next((i for i, t in enumerate(new) if t in self.engine.eos_token_ids), None)
        return new if eos_at is None else new[: eos_at + 1]

    @staticmethod
    def _rejoin(hint: list[int], context: list[int], cursor: int) -> int | None:
        """Where `hint` goes on after the end of `context`, judged by the longest matching n-gram."""
        for n in _NGRAMS:
            key = context[-n:]
            for j in range(max(cursor, n), len(hint)):
                if hint[j - n : j] == key:
                    return j
        return None

    def _verify(self, context: list[int], proposal: list[int], cost: Cost):
        """One teacher-forced target pass over context + proposal: (tokens kept, kept + the target's next)."""
        proposal = proposal[: self.max_seq_len - len(context) - 1]
        greedy = yield Predict("target", context + proposal, len(context) - 1, until_mismatch=True)
        accepted = next((i for i, (p, g) in enumerate(zip(proposal, greedy)) if p != g), len(proposal))
        cost.verify_passes += 1
        cost.reused_tokens += accepted
        return accepted, proposal[:accepted] + [greedy[accepted]]

    def _generate(self, context: list[int], n: int, cost: Cost):
        new = yield Generate(context, n)
        cost.generated_tokens += len(new)
        return new

    # ------------------------------------------------------------------ serving requests one at a time

    def serve(self, request: Predict | Generate | Hidden, cost: Cost):
        if isinstance(request, Generate):
            return self._generate_now(request, cost)
        decoder = self.engine.target if request.model == "target" else self.engine.draft
        if isinstance(request, Hidden):
            _, hidden = decoder.teacher_forced(request.ids, start=len(request.ids) - 1)
            cost.count_forward(request.model, 1)
            return hidden[-1]
        # Only positions from `start` on are needed, so the cached keys/values before them are reused.
        logits, _ = decoder.teacher_forced(request.ids, start=request.start)
        cost.count_forward(request.model, len(request.ids) - request.start)
        return self.greedy(request.model, logits).tolist()

    def greedy(self, model: str, logits):
        """Argmax over the vocabulary; the draft's over the part both models share, so its picks are target ids."""
        return (logits[..., : self.common_vocab] if model == "draft" else logits).argmax(-1)

    def _generate_now(self, request: Generate, cost: Cost) -> list[int]:
        context, n = request.context, request.n
        mode = "speculative" if self.options.speculative else "target"
        out = self.engine.generate(context, max_new_tokens=n, mode=mode, window=self.options.window)
        stats = out.stats
        if mode == "speculative":
            cost.target_forwards += 1 + stats.cycles
            cost.target_positions += len(context) + stats.cycles + stats.drafted_tokens
            cost.draft_forwards += 1 + stats.drafted_tokens
            cost.draft_positions += len(context) + stats.drafted_tokens
        else:
            cost.target_forwards += max(len(out.token_ids), 1)
            cost.target_positions += len(context) + max(len(out.token_ids) - 1, 0)
        return out.token_ids

    # ------------------------------------------------------------------ mining

    def _next_mismatch(self, cur: list[int], left: int, preds: list):
        """The first position q >= left where the draft's greedy token differs from cur[q] (None if there is none
        before the end), and `preds` extended: entry q is the draft's greedy token for position q given cur[:q],
        for left <= q < len(preds) (earlier entries are stale or None).

        The draft is asked for pieces that double from _FIRST_DRAFT_PIECE positions and stops at the first
        mismatch: a kept swap changes everything after it, so predictions past the mismatch are mostly wasted
        (on the budget-640 run, predicting to the end after every kept swap cost 5-6x the draft positions)."""
        piece = _FIRST_DRAFT_PIECE
        while True:
            q = next((q for q in range(left, len(preds)) if cur[q] != preds[q]), None)
            if q is not None or len(preds) >= len(cur):
                return q, preds
            known = max(len(preds), left)
            end = min(known + piece, len(cur))
            # Predictions for positions known..end; the last one looks past cur's end when end == len(cur).
            greedy = yield Predict("draft", cur[:end], known - 1)
            preds = preds[:known] + [None] * (known - len(preds)) + greedy[: len(cur) - known]
            piece *= 2

    def _check(self, problem: Problem, response: list[int], cost: Cost):
        t0 = time.perf_counter()
        outcome = self.checker(problem, self.engine.tokenizer.decode(response, skip_special_tokens=True))
        cost.checker_s += time.perf_counter() - t0
        return outcome

    def _checkpoint(self, kind: str, problem: Problem, cost: Cost, elapsed_s: float, **fields) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint({"kind": kind, "problem_id": problem.problem_id, **fields, "cost": asdict(cost),
                                "elapsed_s": elapsed_s})

    def mine(self, problem: Problem, prompt_ids: list[int], resume: list[dict] = ()) -> ProblemResult:
        cost = Cost()
        return run_steps(self.mining_steps(problem, prompt_ids, cost, resume), lambda r: self.serve(r, cost))

    def mining_steps(self, problem: Problem, prompt_ids: list[int], cost: Cost, resume: list[dict] = ()) -> Steps:
        """The whole search for one problem; returns its ProblemResult. `resume`: the checkpoint rows of an
        interrupted search of this problem, in the order they were reported."""
        t0 = time.perf_counter()
        if resume:
            answer, ref = resume[0]["answer_ids"], resume[0]["ref_answer"]
            for key, value in resume[-1]["cost"].items():
                setattr(cost, key, value)
            before_s = resume[-1]["elapsed_s"]
        else:
            answer = yield from self.continuation_steps(prompt_ids, self.options.max_new_tokens, [], cost)
            ref = self._check(problem, answer, cost)
            before_s = 0.0
        truncated = not answer or answer[-1] not in self.engine.eos_token_ids
        skip = truncated and self.options.skip_truncated
        if not skip and not resume:
            self._checkpoint("answer", problem, cost, time.perf_counter() - t0, answer_ids=answer, ref_answer=ref)
        labels = [] if skip else (yield from self._label(problem, prompt_ids, answer, ref, cost,
                                                         lambda: before_s + time.perf_counter() - t0, resume[1:]))
        record = {
            "kind": "problem", "problem_id": problem.problem_id,
            "answer_text": self.engine.tokenizer.decode(answer, skip_special_tokens=True),
            "answer_ids": answer, "ref_answer": ref, "ground_truth": problem.expected,
            "correct": ref == problem.expected, "truncated": truncated, "n_mismatches": len(labels),
            "n_important": sum(label["important"] for label in labels),
            "speculative": self.options.speculative, "reuse_continuation": self.options.reuse_continuation,
            "wall_s": before_s + time.perf_counter() - t0, "cost": asdict(cost),
        }
        return ProblemResult(labels, record, cost)

    def _label(self, problem: Problem, prompt_ids: list[int], answer: list[int], ref, cost: Cost, elapsed,
               done_steps: list[dict]):
        """Swap in the draft's token at each mismatch, left to right, and keep the swap if `ref` survives.
        `done_steps`: checkpointed steps of an interrupted search, replayed without model calls."""
        budget, n0 = self.options.max_new_tokens, len(prompt_ids)
        cur, left, preds, labels = prompt_ids + answer, n0, [], []
        for step in done_steps:
            label = step["label"]
            p = n0 + label["position"]
            labels.append(label)
            if not label["important"]:
                cur = cur[:p] + [label["draft_token"]] + step["continuation"]
            left = p + 1
            if cur[p] in self.engine.eos_token_ids:
                return labels
        while True:
            p, preds = yield from self._next_mismatch(cur, left, preds)
            if p is None:
                break
            alt = cur[:p] + [preds[p]]
            features = {}
            if self.options.save_features:
                for model in ("draft", "target"):
                    features[model] = yield Hidden(model, alt)
            continuation = yield from self.continuation_steps(alt, budget - (p + 1 - n0), cur[p + 1 :], cost)
            alt += continuation
            alt_answer = self._check(problem, alt[n0:], cost)
            label = {
                "kind": "label", "problem_id": problem.problem_id, "position": p - n0,
                "prompt_ids": prompt_ids, "prefix_ids": cur[n0:p],
                "target_token": cur[p], "draft_token": preds[p],
                "important": alt_answer != ref, "ref_answer": ref, "alt_answer": alt_answer,
            }
            labels.append(label)
            kept = alt_answer == ref
            if features and self.on_features is not None:
                self.on_features(label, features)
            self._checkpoint("step", problem, cost, elapsed(), label=label, continuation=continuation if kept else None)
            if kept:
                cur, preds = alt, preds[: p + 1]
            left = p + 1
            if cur[p] in self.engine.eos_token_ids:
                break
        return labels
