"""CUDA graphs of the decode-time forwards: the draft's 1- and 2-token steps and the target's k+1-token verify.

Why: a small model's decode step is hundreds of short kernels. Launched one by one from Python the GPU waits
on the host between them; replayed as one recorded graph they run back to back.

What a recording may not contain is any host value that changes between replays. So a graph reads its
tokens from the engine's committed-token buffer at the positions `start + [0, t)`, with `start` a device
buffer filled (asynchronously) before each replay; attention spans the whole cache (kv_len = max_seq_len)
under the position mask, so no kernel shape depends on the current length either. One graph per
(model, token count) serves every position; all of them share one memory pool, which is safe because they
replay one at a time on one stream and each keeps its outputs alive. Batched steps (continuous batching) copy
their per-row tokens and positions into the graph's own input buffers instead, one graph per (model, rows,
token count); prefills of single rows stay eager.
"""

from __future__ import annotations

import torch

from autojudge.engine.decoder import Decoder


class _Graphed:
    """A forward of `decoder` recorded on first use and replayed after; subclasses say what it reads."""

    def __init__(self, decoder: Decoder, logits_from: int | None, pool):
        self.model = decoder.model
        self.cache_version = decoder.cache_version  # the cache buffers the recording reads and writes
        self.device = decoder.device
        self.logits_from = logits_from
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def _forward(self):
        raise NotImplementedError

    def _capture(self):
        # Warm up outside the recording (cuBLAS and SDPA choose kernels and allocate workspaces on first use),
        # on a side stream as torch asks. The warm-up is the very step about to be replayed, so the cache
        # slots it writes are written again with the same values.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits, self.hidden = self._forward()
        self.graph = graph

    def _replay(self):
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits, self.hidden


class GraphedForward(_Graphed):
    """`decoder`'s forward over `tokens[start : start + t]` at positions start.. (batch 1)."""

    def __init__(self, decoder: Decoder, tokens: torch.Tensor, t: int, logits_from: int | None, pool):
        super().__init__(decoder, logits_from, pool)
        self.tokens = tokens
        self.start = torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.offsets = torch.arange(t, device=tokens.device)

    def _forward(self):
        positions = self.start + self.offsets
        logits, hidden = self.model(self.tokens[positions][None], positions, self.model.max_seq_len,
                                    self.logits_from)
        return (None if logits is None else logits[0]), hidden[0]

    @torch.inference_mode()
    def __call__(self, start: int):
        """Runs the step at `start`; returns (logits [T', V] fp32 | None, hidden [T, D]), static buffers that
        the next replay of this graph overwrites (stream order keeps every earlier reader safe)."""
        self.start.fill_(start)
        return self._replay()


class GraphedRows(_Graphed):
    """`decoder`'s forward over cache rows [0, batch), t tokens a row at per-row positions (a batched step)."""

    def __init__(self, decoder: Decoder, batch: int, t: int, logits_from: int | None, pool):
        super().__init__(decoder, logits_from, pool)
        self.rows = slice(0, batch)
        self.tokens = torch.zeros(batch, t, dtype=torch.long, device=self.device)
        # Until the first copy-in, every token is padding: the trash slot.
        self.positions = torch.full((batch, t), decoder.max_seq_len, dtype=torch.long, device=self.device)

    def _forward(self):
        return self.model(self.tokens, self.positions, self.model.max_seq_len, self.logits_from, self.rows)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor):
        """Copies tokens/positions [B, T] in and replays; returns (logits [B, T', V] fp32 | None, hidden [B, T, D]),
        static buffers that the next replay of this graph overwrites."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        return self._replay()


class CudaGraphs:
    """The engine's graphs: batch-1 steps reading `tokens`, one per (decoder, token count, logits_from), and
    batched steps, one per (decoder, rows, token count, logits_from)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[Decoder, int, int | None], GraphedForward] = {}
        self.row_graphs: dict[tuple[Decoder, int, int, int | None], GraphedRows] = {}

    @staticmethod
    def _current(table: dict, key: tuple, decoder: Decoder, record):
        """table[key], recorded anew (record()) when missing or made on an older cache: a cache grown for batched
        decoding is new memory, and replaying the old recording would use freed buffers."""
        graph = table.get(key)
        if graph is None or graph.cache_version != decoder.cache_version:
            graph = table[key] = record()
        return graph

    def forward(self, decoder: Decoder, start: int, end: int, logits_from: int | None):
        """Same results as `decoder.forward(tokens[start:end], start, logits_from)`."""
        graph = self._current(self.graphs, (decoder, end - start, logits_from), decoder,
                              lambda: GraphedForward(decoder, self.tokens, end - start, logits_from, self.pool))
        return graph(start)

    def forward_rows(self, decoder: Decoder, tokens: torch.Tensor, positions: torch.Tensor,
                     logits_from: int | None):
        """Same results as `decoder.forward_rows(tokens, positions, kv_len, slice(0, B), logits_from)` for any
        kv_len past the last real position (padding at the trash slot)."""
        graph = self._current(self.row_graphs, (decoder, *tokens.shape, logits_from), decoder,
                              lambda: GraphedRows(decoder, *tokens.shape, logits_from, self.pool))
        decoder.cached_len = 0  # as in forward_rows: row 0 no longer holds what prefix reuse remembers
        return graph(tokens, positions)
