"""The tokenwise schedule: the decisions of greedy speculative cycles, taken one token at a time.

A greedy cycle's outcome depends only on what the two models predict at each position of the sequence it commits:
inside a window, the draft token at a position is kept when the target agrees or the lossy rule keeps it; the first
token refused ends the cycle with the target's token there (the correction), and a window whose k drafts are all
kept ends with the target's token after them (the bonus). So a batch can feed each row one token per step to both
models and take each decision as its position comes: the same tokens, the same cycles (k, accepted, judge rescues),
at one target and one draft position a token plus one of each per refused draft, where a cycle pushes k + 1 target
and k draft positions whatever it keeps. On a CPU, where a batch of 64 rows is bound by arithmetic, that is about
half of what cycles cost; the timing is the schedule's, not speculative decoding's (eval measures that from the
rows decoded alone).

Each decision is the verify kernel's at k = 1: logits at the draft token's position and after it, the draft token,
and the judge's features there (both models' hidden states with the draft token as input, as in a cycle's verify
pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autojudge.engine.batched import BatchRun, _Slot
from autojudge.engine.engine import draft_length
from autojudge.kernels import VerifyOutput


@dataclass
class _Turn:
    """Where one row's cycle stands: the token fed at `pos` next step, which is either committed or a draft
    token awaiting its verdict (`drafted`)."""

    slot: _Slot
    pos: int
    token: int
    drafted: bool = False
    window: int = 0  # k of the cycle under way
    target_token: int = -1  # the target's greedy token at `pos` (a drafted token's correction if refused)
    new: list[int] = field(default_factory=list)  # this cycle's kept drafts
    rescues: int = 0


class TokenwiseRun(BatchRun):
    """Greedy speculative modes in the tokenwise schedule (module docstring); target mode as `BatchRun`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.turns: list[_Turn | None] = [None] * self.n
        if self.draft is not None:
            # [:, 0] the target's logits at the fed position's predecessor, [:, 1] at the fed position.
            self.pair_logits = torch.zeros(self.n, 2, self.target.config.vocab_size, device=self.device)
            self.verify_out = VerifyOutput.empty(self.n, 1, self.device)

    def _move_row(self, src: int, dst: int) -> None:
        super()._move_row(src, dst)
        self.turns[dst], self.turns[src] = self.turns[src], None
        if self.draft is not None:
            self.pair_logits[dst] = self.pair_logits[src]

    def _keep_rows(self, n: int) -> None:
        super()._keep_rows(n)
        self.turns = self.turns[:n]
        if self.draft is not None:
            self.pair_logits = self.pair_logits[:n]
            self.verify_out = VerifyOutput.empty(n, 1, self.device)

    def _turn(self, b: int) -> _Turn:
        """Row b's turn; a slot just (re)filled starts at its first token, committed by the prefill."""
        slot = self.slots[b]
        if self.turns[b] is None or self.turns[b].slot is not slot:
            self.turns[b] = _Turn(slot, slot.seq_len - 1, slot.token_ids[-1])
        return self.turns[b]

    def _cycle(self) -> None:
        busy = {b: self._turn(b) for b in range(self.n) if self.slots[b] is not None}
        columns = [[busy[b].pos] if b in busy else [None] for b in range(self.n)]
        _, logits, target_hidden = self._forward(self.target, columns, 0)
        _, draft_logits, draft_hidden = self._forward(self.draft, columns, 0)
        self.pair_logits[:, 1] = logits[:, 0]
        drafts = torch.tensor([[busy[b].token if b in busy and busy[b].drafted else -1] for b in range(self.n)],
                              device=self.device)

        def features():
            target = target_hidden.float()
            return target if self.draft_hidden is None else (draft_hidden.float(), target)

        result = self.engine.verify(self.pair_logits, drafts,
                                    **self.engine.lossy_verify_args(self.judge, self.threshold, features),
                                    out=self.verify_out)
        parts = [result.num_accepted, logits[:, 0].argmax(-1), draft_logits[:, 0, : self.common_vocab].argmax(-1)]
        if self.judge is not None:
            parts.append((result.judge_ok & ~result.target_ok).long()[:, 0])
        host = torch.cat(parts).tolist()
        self.pair_logits[:, 0] = self.pair_logits[:, 1]
        n = self.n
        kept, target_next, draft_next = host[:n], host[n : 2 * n], host[2 * n : 3 * n]
        rescued = host[3 * n :] if self.judge is not None else [0] * n
        writes = {}
        for b, turn in busy.items():
            turn.token = self._advance(b, turn, kept[b], rescued[b], target_next[b], draft_next[b])
            if self.slots[b] is turn.slot:
                writes[b] = (turn.pos, turn.token)
        if writes:
            rows = list(writes)
            self.tokens[rows, [writes[b][0] for b in rows]] = torch.tensor([writes[b][1] for b in rows],
                                                                          device=self.device)

    def _advance(self, b: int, turn: _Turn, kept: int, rescued: int, target_next: int, draft_next: int) -> int:
        """Takes row b's decision on the token it was fed; returns the token to feed at `turn.pos` next step."""
        slot = turn.slot
        if turn.drafted:
            if kept:
                turn.new.append(turn.token)
                turn.rescues += rescued
                turn.pos += 1
                if len(turn.new) < turn.window:
                    turn.target_token = target_next
                    return draft_next
                return self._end_cycle(b, turn, target_next)  # the bonus token after a full window
            return self._end_cycle(b, turn, turn.target_token)  # the correction, fed again at the same position
        # A committed token was fed: a cycle starts after it, or the target alone fills the row's last slot.
        turn.pos += 1
        turn.window = draft_length(self.window, self.trash, slot.seq_len, slot.wanted)
        if turn.window < 1:
            slot.seq_len += 1
            slot.wanted -= 1
            self._emit_and_refill(b, [target_next])
            return target_next
        turn.drafted, turn.target_token, turn.new, turn.rescues = True, target_next, [], 0
        return draft_next

    def _end_cycle(self, b: int, turn: _Turn, last: int) -> int:
        slot, kept = turn.slot, len(turn.new)
        slot.seq_len += kept + 1
        slot.wanted -= kept + 1
        slot.stats.record_cycle(turn.window, kept, turn.rescues, 0.0, 0.0)
        turn.drafted = False
        self._emit_and_refill(b, turn.new + [last])
        return last
