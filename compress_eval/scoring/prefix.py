"""Cached prefix states: the hidden states entering every block, for scoring block removal cheaply.

Blocks before a candidate are unchanged by skipping it, so the score of "model without block i"
needs only blocks i+1..L-1 run from the cached X_i (the hidden state entering block i), instead of
a full forward pass. Over all candidates that is about half the naive cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from compress_eval import distributed
from compress_eval.models.adapters import Adapter, BlockRunner, embed_inputs
from compress_eval.progress import bar
from compress_eval.scoring.ppl import window_nll


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for b in range(0, windows.size(0), batch_size):
        yield windows[b: b + batch_size]


def calibration_tokens(windows: torch.Tensor) -> int:
    """Tokens that carry an NLL term (every one but the first of each window)."""
    return windows.size(0) * (windows.size(1) - 1)


class PrefixStates:
    """X_0..X_L for every calibration batch: ``states[i][b]`` enters block i (X_L = last block's output).
    Under data parallelism each process caches its share of the windows, and the scores are summed.

    ``store`` is where the cache lives (``"cpu"`` keeps GPU memory for the suffix runs on big models);
    each tensor moves to the model's device only while it is being used.
    """

    def __init__(self, adapter: Adapter, calib: torch.Tensor, batch_size: int = 8, store: str | None = None):
        self.adapter = adapter
        self.device = adapter.device
        self.store = torch.device(store) if store else self.device
        self.runner = BlockRunner(adapter, calib.size(1))
        self.input_ids = list(batches(distributed.shard(calib), batch_size))  # this process's windows
        self.states: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_blocks + 1)]
        with torch.no_grad(), bar(desc="calibration forwards", total=len(self.input_ids) * adapter.num_blocks,
                                  unit="block", leave=False) as shown:
            for ids in self.input_ids:
                hidden = embed_inputs(self.adapter, ids.to(self.device))
                self.states[0].append(hidden.to(self.store))
                for i in range(adapter.num_blocks):
                    hidden = self.runner.run_block(i, hidden)
                    self.states[i + 1].append(hidden.to(self.store))
                    shown.update()

    @property
    def num_batches(self) -> int:
        return len(self.input_ids)

    def entering(self, i: int, b: int) -> torch.Tensor:
        return self.states[i][b].to(self.device)

    @torch.no_grad()
    def final_without(self, skip: int, b: int, width: int = 1) -> torch.Tensor:
        """H for batch b with blocks ``skip``..``skip+width-1`` replaced by the identity, from the
        cached X_skip (only the suffix after them runs)."""
        return self.runner.run(self.entering(skip, b), start=skip + width)

    def final(self, b: int) -> torch.Tensor:
        return self.entering(self.adapter.num_blocks, b)

    @property
    def tokens(self) -> int:
        """Calibration tokens that carry an NLL term (of every process)."""
        return int(distributed.all_sum(float(sum(calibration_tokens(ids) for ids in self.input_ids))))

    def batch_nll(self, hidden: torch.Tensor, b: int) -> float:
        """Summed next-token NLL of calibration batch b given its last hidden state H.

        The logits are made one window at a time: a batch of 512-token windows times a 50k-128k
        vocabulary would otherwise be the largest tensor of the whole scoring.
        """
        ids = self.input_ids[b].to(self.device)
        return sum(window_nll(self.runner.logits(hidden[n: n + 1]), ids[n: n + 1]).item()
                   for n in range(ids.size(0)))

    def suffix_nll(self, start: int, skip: int = 0) -> float:
        """Summed next-token NLL of every calibration window, the model's blocks from ``start + skip``
        on run on the cached X_start: ``skip`` blocks skipped, or none (blocks from ``start`` on
        changed since the cache was made, e.g. a module replaced)."""
        return self.score_each_removal(self.batch_nll, [start], skip)[0]

    def ppl(self, nll: float) -> float:
        """Calibration perplexity from a summed NLL of all the windows."""
        return math.exp(nll / self.tokens)

    def score_each_removal(self, score: Callable[[torch.Tensor, int], float],
                           candidates: Iterable[int] | None = None, width: int = 1) -> list[float]:
        """For each candidate i (default: every possible start): sum over batches (of every process) of
        ``score(H, b)``, H being the last hidden state with blocks i..i+width-1 skipped."""
        n = self.adapter.num_blocks
        candidates = list(range(n - width + 1) if candidates is None else candidates)
        return self._score_suffixes(score, [(i + width, functools.partial(self.entering, i), False)
                                            for i in candidates])

    def score_each_sublayer_removal(self, score: Callable[[torch.Tensor, int], float],
                                    candidates: list[tuple[int, str]]) -> list[float]:
        """For each candidate (i, kind): the summed ``score(H, b)`` with block i's attention or MLP
        sublayer skipped: block i runs without it on the cached X_i, then the blocks after it."""
        def without(i: int, kind: str, b: int) -> torch.Tensor:
            with self.adapter.sublayer_skipped(i, kind):
                return self.runner.run_block(i, self.entering(i, b))

        return self._score_suffixes(score, [(i + 1, functools.partial(without, i, kind), True)
                                            for i, kind in candidates])

    @torch.no_grad()
    def _score_suffixes(self, score: Callable[[torch.Tensor, int], float],
                        starts: list[tuple[int, Callable[[int], torch.Tensor], bool]]) -> list[float]:
        """For each candidate (j, state, runs_block): the sum over batches (of every process) of
        ``score(H, b)``, H being ``state(b)``, the hidden state entering block j, run through blocks
        j..L-1; ``runs_block``: ``state`` runs block j-1 (else it reads the cache).

        Block-major: per batch, every candidate's state advances through block j while j is on the
        device, and the states made by running block j are made then too, so an offloaded model loads
        each block once per batch, not once per candidate (the same operations on the same inputs as
        running each suffix in turn, so the same numbers)."""
        n = self.adapter.num_blocks
        totals = [0.0] * len(starts)
        runs = self.num_batches * sum(n - j for j, *_ in starts)  # block runs: the bar's ETA is exact
        with bar(desc="scoring candidates", total=runs, unit="block", leave=False) as shown:
            for b in range(self.num_batches):
                live: dict[int, torch.Tensor] = {}  # candidate -> its state entering the next block
                for j in range(n + 1):
                    live.update({k: state(b) for k, (start, state, runs_block) in enumerate(starts)
                                 if start == j and not runs_block})
                    made_here = [k for k, (start, _, runs_block) in enumerate(starts) if start == j + 1 and runs_block]
                    if j == n or not (live or made_here):
                        continue
                    with self.adapter.hold([j]):
                        for k in live:
                            live[k] = self.runner.run_block(j, live[k])
                        shown.update(len(live))
                        live.update({k: starts[k][1](b) for k in made_here})
                for k in range(len(starts)):
                    totals[k] += score(live.pop(k), b)
        return distributed.all_sum(totals)
