"""Statistics of the reduce stage: binomial intervals for per-tier rates and paired tests of the gap.

How answers enter (the reduce stage follows this; see ``alignfake.stages.reduce``):

- A **rate per tier** is over that tier's *valid* answers (``n`` = valid count); invalid answers (truncated or
  malformed after retries) are counted and reported beside the rate, never folded into it.
- A **pair** is the same ``(query_id, sample)`` answered in both tiers, valid in both. The paired statistics
  (bootstrap CI of the gap, exact McNemar test) use only such pairs, and the number of pairs is reported.

Pure numpy/scipy: no pandas, no torch.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# scipy.special, not scipy.stats: the latter takes seconds to import and the CLI imports this module.
from scipy.special import bdtr

__all__ = ["wilson_ci", "binomial_se", "mcnemar_exact", "paired_bootstrap_gap"]

# Bootstrap replicates are drawn in blocks of at most this many indices, so 10k replicates of 50k pairs do not
# allocate gigabytes at once.
_BLOCK_ELEMENTS = 4_000_000


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(nan, nan)`` when ``n == 0``.

    Wilson rather than the normal approximation because compliance rates near 0 % are common and the normal
    interval collapses to a point there."""
    _check_counts(k, n)
    z = _z(confidence)
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # At k = 0 and k = n the bounds are exactly 0 and 1; rounding would leave 1 - 1e-16 and put the estimate
    # outside its own interval.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


def binomial_se(k: int, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of a rate: the 1-sigma error bars of the paper's figures;
    ``nan`` when ``n == 0``."""
    _check_counts(k, n)
    if n == 0:
        return math.nan
    p = k / n
    return math.sqrt(p * (1.0 - p) / n)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pair counts.

    ``b``: pairs where only the first tier complied; ``c``: pairs where only the second did. Under the null
    hypothesis each discordant pair goes either way with probability 1/2, so the test is a binomial test of
    ``min(b, c)`` in ``b + c`` trials; the two-sided p-value is twice the smaller tail, capped at 1. Returns 1.0
    when there are no discordant pairs (no evidence either way)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * bdtr(min(b, c), n, 0.5)))


def paired_bootstrap_gap(
    free: np.ndarray,
    paid: np.ndarray,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Gap ``mean(free) - mean(paid)`` over pairs, with a percentile bootstrap CI ``(gap, lo, hi)``.

    ``free[i]`` and ``paid[i]`` are the outcomes (0/1, or any numbers) of pair ``i`` in the two tiers. Pairs are
    resampled with replacement, keeping both tiers of a pair together: the paired design is what makes the CI
    narrower than comparing two independent rates. With ``clusters`` (e.g. the query id of each pair when a query
    was sampled several times) whole clusters are resampled instead, since samples of one query are not
    independent. Seeded and deterministic; ``(nan, nan, nan)`` for zero pairs."""
    free = np.asarray(free, dtype=float)
    paid = np.asarray(paid, dtype=float)
    if free.shape != paid.shape or free.ndim != 1:
        raise ValueError(
            f"free and paid must be 1-d arrays of equal length, got {free.shape} and {paid.shape}"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if free.size == 0:
        return (math.nan, math.nan, math.nan)
    diff = free - paid
    gap = float(diff.mean())

    # Reduce to per-cluster sums and sizes; without clusters every pair is its own cluster of size 1.
    if clusters is None:
        sums, sizes = diff, np.ones_like(diff)
    else:
        clusters = np.asarray(clusters)
        if clusters.shape != diff.shape:
            raise ValueError(f"clusters must have the shape of free/paid, got {clusters.shape}")
        _, inverse = np.unique(clusters, return_inverse=True)
        sums = np.bincount(inverse, weights=diff)
        sizes = np.bincount(inverse).astype(float)
    m = sums.size

    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // m)
    replicates = np.empty(n_boot)
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        idx = rng.integers(0, m, size=(stop - start, m))
        replicates[start:stop] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (gap, float(lo), float(hi))
