"""Paired statistics: does model B differ from model A on the same documents, and by how much?

Two models scored on the same documents are correlated: most documents are right (or wrong) for
both, so the difference of their accuracies is far more precise than their two standard errors
suggest. Per task: the paired difference with a 95 % confidence interval from a paired bootstrap
over documents (seeded), and the exact McNemar test on the documents where they disagree. Per
perplexity: a bootstrap over windows of the difference of the two perplexities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from compress_eval.errors import UserError

RESAMPLES = 2000
LEVEL = 0.95
ALPHA = 1 - LEVEL


@dataclass(frozen=True)
class Paired:
    """B against A on the same units (documents or windows)."""

    a: float
    b: float
    stderr_a: float
    stderr_b: float
    delta: float  # b - a
    low: float  # the delta's confidence interval
    high: float
    p: float | None  # exact McNemar (accuracies only)
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (and, for accuracies, McNemar agrees at the same level)."""
        excluded = self.low > 0 or self.high < 0
        return excluded and (self.p is None or self.p < ALPHA)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(samples, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: of the documents where A and B disagree, is the split 50/50?"""
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def accuracy_stderr(x: np.ndarray) -> float:
    """lm-eval's standard error of a mean (sample standard deviation / sqrt(n))."""
    return float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def bootstrap_delta_counts(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of mean(b - a) over documents.

    b - a per document is -1, 0 or +1, so a resample of n documents is a multinomial draw of how
    many of each it holds: the same distribution as resampling indices, at a cost independent of n.
    """
    d = (b.astype(np.int64) - a.astype(np.int64))
    counts = np.array([np.sum(d == -1), np.sum(d == 0), np.sum(d == 1)], dtype=np.float64)
    draws = rng(seed).multinomial(d.size, counts / d.size, size=resamples)
    return (draws[:, 2] - draws[:, 0]) / d.size


def paired_accuracy(a, b, resamples: int = RESAMPLES, seed: int = 0) -> Paired:
    """B's accuracy against A's on the same documents (0/1 lists in the same document order)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.size != b.size or a.size == 0:
        raise UserError(f"paired accuracies need the same non-empty documents ({a.size} against {b.size})")
    low, high = interval(bootstrap_delta_counts(a, b, resamples, seed))
    return Paired(float(a.mean()), float(b.mean()), accuracy_stderr(a), accuracy_stderr(b),
                  float(b.mean() - a.mean()), low, high, mcnemar_p(a, b), int(a.size))


def ppl_of(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Perplexity over the last axis (windows): exp(total NLL / total tokens)."""
    return np.exp(nll.sum(axis=-1) / tokens.sum(axis=-1))


def paired_ppl(nll_a, nll_b, tokens, resamples: int = RESAMPLES, seed: int = 0) -> Paired:
    """B's perplexity against A's on the same windows: the delta's interval from resampling windows."""
    nll_a, nll_b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if not (nll_a.size == nll_b.size == tokens.size) or nll_a.size == 0:
        raise UserError(f"paired perplexities need the same non-empty windows ({nll_a.size} against {nll_b.size})")
    idx = rng(seed).integers(0, nll_a.size, size=(resamples, nll_a.size))
    deltas = ppl_of(nll_b[idx], tokens[idx]) - ppl_of(nll_a[idx], tokens[idx])
    low, high = interval(deltas)
    pa, pb = float(ppl_of(nll_a, tokens)), float(ppl_of(nll_b, tokens))
    spread = [float(np.std(ppl_of(x[idx], tokens[idx]), ddof=1)) for x in (nll_a, nll_b)]
    return Paired(pa, pb, spread[0], spread[1], pb - pa, low, high, None, int(nll_a.size))


def average_accuracy(per_task: list[np.ndarray], resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """The mean over tasks of each task's accuracy, with a bootstrap interval (documents resampled
    within each task, independently)."""
    generator = rng(seed)
    replicates = np.zeros(resamples)
    for x in per_task:
        replicates += generator.binomial(x.size, x.mean(), size=resamples) / x.size
    replicates /= len(per_task)
    low, high = interval(replicates)
    return float(np.mean([x.mean() for x in per_task])), low, high


def paired_average(pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES,
                   seed: int = 0) -> tuple[float, float, float]:
    """The mean over tasks of B - A, with a paired bootstrap interval (documents within each task)."""
    replicates = np.zeros(resamples)
    for k, (a, b) in enumerate(pairs):
        replicates += bootstrap_delta_counts(a, b, resamples, seed + k)
    replicates /= len(pairs)
    low, high = interval(replicates)
    return float(np.mean([b.mean() - a.mean() for a, b in pairs])), low, high
