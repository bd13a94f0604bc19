"""Mining many problems at once: every problem's search (miner.py) runs as a generator in a cache row of its own,
and each round serves the model calls of all problems in flight together.

A round answers one request per row: a `Predict`, or one token of a `Generate` (generation advances every
generating row by a token per round, as batched greedy decoding: the idle compute that speculative decoding
fills at batch 1 is filled here by the other rows, so `--speculative` applies to batch 1 only). Each row keeps the tokens whose keys/values
its cache holds, so a request runs only the tokens past the prefix it shares with them, as batch-1 mining does.
The rows' new tokens, one for a generating row, hundreds for a prompt, a checked piece of the previous
continuation or a draft pass over a changed answer, go into one packed forward without padding: each weight is
read once a round and multiplies all of them together. Greedy tokens are the same as batch 1's, so are the labels.

Beside its tokens each row keeps the greedy token the model gave after each of them, where a forward computed it.
A request whose answers are known costs no forward (a generating row takes known tokens many a round; a check of
proposed tokens needs them only up to its first mismatch), one with a known head computes only its tail, and one
inside what the row holds leaves the rest of the row in place. Searches seldom ask twice, but a resumed one asks
again for all it had when the run stopped: with the greedy tokens in its snapshot it replays them at once instead
of regenerating its continuation one token a round (a restart at batch 64 on the 2-core CPU: ~2 minutes, was ~8).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autojudge.mining.miner import Cost, Generate, Hidden, Miner, Predict, ProblemResult, Steps
from autojudge.mining.snapshots import CacheSnapshots, SnapshotRow
from autojudge.tasks.datasets import Problem


@dataclass
class _Row:
    problem: Problem
    steps: Steps
    cost: Cost
    request: Predict | Generate | None = None
    generated: list[int] = field(default_factory=list)  # tokens of the Generate request in progress


def mine_all(miner: Miner, items: list[tuple[Problem, list[int]]], batch_size: int,
             on_result: Callable[[Problem, ProblemResult], None], resumed: dict[str, list[dict]] | None = None,
             snapshots: CacheSnapshots | None = None) -> None:
    """Mines every (problem, prompt ids), `batch_size` problems in flight; on_result as each one finishes.
    `resumed`: problem id -> checkpoint rows of its interrupted search, which goes on from there. `snapshots`
    (batch_size > 1): where the cache rows of the problems in flight go on KeyboardInterrupt, and come from."""
    resumed = resumed or {}
    if batch_size == 1:
        for problem, prompt_ids in items:
            on_result(problem, miner.mine(problem, prompt_ids, resumed.get(problem.problem_id, ())))
        return
    BatchedMining(miner, batch_size, snapshots).run(items, on_result, resumed)


class BatchedMining:
    def __init__(self, miner: Miner, batch_size: int, snapshots: CacheSnapshots | None = None):
        self.miner = miner
        self.snapshots = snapshots
        self.decoders = {"target": miner.engine.target, "draft": miner.engine.draft}
        for decoder in self.decoders.values():
            decoder.ensure_rows(batch_size)
        self.n = batch_size
        # Per model and row: the tokens whose keys/values the row's cache holds, and entry t of `greedy` the model's
        # greedy token after cached[: t + 1] (None where no forward picked that position).
        self.cached = {model: [[] for _ in range(batch_size)] for model in self.decoders}
        self.greedy = {model: [[] for _ in range(batch_size)] for model in self.decoders}
        self.rows: list[_Row | None] = [None] * batch_size

    def run(self, items, on_result, resumed: dict[str, list[dict]]) -> None:
        waiting = deque(items)
        self.on_result = on_result
        try:
            while True:
                for b in range(self.n):
                    while self.rows[b] is None and waiting:
                        problem, prompt_ids = waiting.popleft()
                        cost = Cost()
                        steps = self.miner.mining_steps(problem, prompt_ids, cost,
                                                        resumed.get(problem.problem_id, ()))
                        self.rows[b] = _Row(problem, steps, cost)
                        self._restore(b, problem.problem_id)
                        self._advance(b, None)
                if all(row is None for row in self.rows):
                    return
                self._round()
        except KeyboardInterrupt:
            self._save_snapshots()
            raise

    def _restore(self, b: int, problem_id: str) -> None:
        """Starts row b with the cache rows its problem had when a run was interrupted, if they were saved."""
        if self.snapshots is None:
            return
        for model, row in self.snapshots.load(problem_id).items():
            decoder = self.decoders.get(model)
            if decoder is None or len(row.ids) != row.state["k"].shape[2]:
                continue
            try:
                decoder.load_row_state(b, row.state)
            except ValueError:
                continue  # saved from another shape or precision: the prefill runs as without a snapshot
            self.cached[model][b], self.greedy[model][b] = row.ids, row.greedy

    def _save_snapshots(self) -> None:
        if self.snapshots is None:
            return
        for b, row in enumerate(self.rows):
            if row is not None:
                self.snapshots.save(row.problem.problem_id, {
                    model: SnapshotRow(self.cached[model][b], self.greedy[model][b],
                                       decoder.row_state(b, len(self.cached[model][b])))
                    for model, decoder in self.decoders.items()})

    def _advance(self, b: int, answer) -> None:
        """Sends row b its answer; stores the next request, or the result when its search has ended."""
        row = self.rows[b]
        try:
            row.request = row.steps.send(answer)
        except StopIteration as stop:
            self.rows[b] = None
            self.on_result(row.problem, stop.value)
            if self.snapshots is not None:
                self.snapshots.drop(row.problem.problem_id)
            return
        row.generated = []

    def _round(self) -> None:
        work = {}
        for b in range(self.n):
            # Requests the greedy tokens already answer are served at once; the first that needs a forward waits.
            while (request := self._pending(b)) is not None:
                shared, known, complete = self._known(request, b)
                if not complete:
                    work[b] = request, shared, known
                    break
                self.rows[b].cost.count_forward(request.model, len(request.ids) - request.start)
                self._answer(b, known)
        answers = {}
        for model in self.decoders:
            mine = {b: job for b, job in work.items() if job[0].model == model}
            if mine:
                answers.update(self._predict(model, mine))
        for b, answer in answers.items():
            self._answer(b, answer)

    def _pending(self, b: int) -> Predict | Hidden | None:
        """Row b's request; a Generate as the Predict of its next token after what it has so far."""
        row = self.rows[b]
        if row is None:
            return None
        if isinstance(row.request, Generate):
            ids = row.request.context + row.generated
            return Predict("target", ids, len(ids) - 1)
        return row.request

    def _known(self, request: Predict | Hidden, b: int) -> tuple[int, list[int], bool]:
        """How many leading tokens the request shares with row b's cache, the greedy tokens known for its positions
        from `start` on (up to the first unknown one; none for a Hidden: only hidden states are), and whether they
        answer it: all of them, or for a check (`until_mismatch`) up to its first mismatch."""
        held, greedy = self.cached[request.model][b], self.greedy[request.model][b]
        shared = next((i for i, (x, y) in enumerate(zip(held, request.ids)) if x != y),
                      min(len(held), len(request.ids)))
        if isinstance(request, Hidden):
            return shared, [], False
        known = []
        for t in range(request.start, min(shared, len(request.ids))):
            if greedy[t] is None:
                break
            known.append(greedy[t])
            if request.until_mismatch and t + 1 < len(request.ids) and greedy[t] != request.ids[t + 1]:
                return shared, known, True
        return shared, known, len(known) == len(request.ids) - request.start

    def _answer(self, b: int, answer) -> None:
        if isinstance(self.rows[b].request, Generate):
            self._generated(b, answer[0])
        else:
            self._advance(b, answer)

    def _generated(self, b: int, token: int) -> None:
        row = self.rows[b]
        request = row.request
        row.generated.append(token)
        done = (len(row.generated) >= request.n or token in self.miner.engine.eos_token_ids
                or len(request.context) + len(row.generated) >= self.miner.max_seq_len)
        if done:
            self._advance(b, row.generated)

    def _predict(self, model: str, requests: dict[int, tuple[Predict | Hidden, int, list[int]]]) -> dict[int, object]:
        """Answers every row's request (with its shared prefix and known head, `_known`) in one packed forward (no
        padding) and one host read. A Hidden is answered with its hidden state; the greedy token after it is kept
        too, since what follows the judged token usually asks for it next."""
        decoder, cached, greedy = self.decoders[model], self.cached[model], self.greedy[model]
        rows, tokens, picks, spans, tails = [], [], [], {}, {}
        for b, (request, shared, known) in requests.items():
            asked = len(request.ids) - 1 if isinstance(request, Hidden) else request.start
            start = asked + len(known)
            begin = min(shared, start)
            picks += range(len(tokens) + start - begin, len(tokens) + len(request.ids) - begin)
            spans[b] = begin, start
            rows.append((b, begin, len(request.ids) - begin))
            tokens += request.ids[begin:]
            # A problem's cost counts what its search asked, known or not, as batch 1 does: the same on a resume.
            self.rows[b].cost.count_forward(model, len(request.ids) - asked)
            # A request inside what the row holds rewrites the same keys/values, so the row keeps what follows
            # (a resumed search re-asks the start of a continuation whose rest is cached).
            inside = shared == len(request.ids)
            tails[b] = (cached[b][shared:], greedy[b][shared:]) if inside else ([], [])
            # Until the forward has written every layer, the row holds only the prefix it keeps: an interrupt
            # in between must not snapshot half-written keys/values as the new tokens'.
            cached[b], greedy[b] = request.ids[:begin], greedy[b][:begin]
        device = decoder.device
        hidden = decoder.forward_packed(torch.tensor(tokens, device=device), rows)
        picks = torch.tensor(picks, device=device)
        with torch.inference_mode():
            logits = decoder.model.lm_head(hidden[picks]).float()
        picked = self.miner.greedy(model, logits).tolist()
        answers, at = {}, 0
        for b, (request, _, known) in requests.items():
            begin, start = spans[b]
            new = picked[at : at + len(request.ids) - start]
            at += len(new)
            # A copy: the search may go on to extend the list it asked with.
            tail_ids, tail_greedy = tails[b]
            cached[b] = list(request.ids) + tail_ids
            greedy[b] = greedy[b] + [None] * (start - begin) + new + tail_greedy
            answers[b] = hidden[picks[at - 1]].float().cpu().clone() if isinstance(request, Hidden) else known + new
        return answers
