"""alignfake.stats against statsmodels / scipy, and the paired bootstrap's behaviour on data with a known gap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from alignfake.stats import binomial_se, mcnemar_exact, paired_bootstrap_gap, wilson_ci

COUNTS = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (1, 200), (57, 200), (199, 200), (123, 4950)]


@pytest.mark.parametrize("k,n", COUNTS)
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_ci_matches_statsmodels(k: int, n: int, confidence: float) -> None:
    lo, hi = wilson_ci(k, n, confidence)
    ref_lo, ref_hi = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert lo == pytest.approx(ref_lo, abs=1e-12)
    assert hi == pytest.approx(ref_hi, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_ci_without_trials_is_nan_and_bad_counts_raise() -> None:
    assert all(math.isnan(x) for x in wilson_ci(0, 0))
    with pytest.raises(ValueError):
        wilson_ci(5, 3)
    with pytest.raises(ValueError):
        wilson_ci(1, 3, confidence=1.0)


@pytest.mark.parametrize("k,n", COUNTS)
def test_binomial_se_is_the_half_width_of_the_normal_interval_over_z(k: int, n: int) -> None:
    lo, hi = proportion_confint(k, n, alpha=0.3173105078629141, method="normal")  # 1 sigma: z = 1
    assert binomial_se(k, n) == pytest.approx((hi - lo) / 2, abs=1e-12)
    assert math.isnan(binomial_se(0, 0))


TABLES = [
    [[10, 0], [0, 10]],  # no discordant pairs
    [[10, 5], [5, 10]],  # balanced
    [[50, 12], [3, 40]],
    [[0, 1], [0, 0]],
    [[30, 0], [9, 30]],
    [[100, 40], [25, 35]],
    [[5, 200], [180, 5]],  # large counts
]


@pytest.mark.parametrize("table", TABLES)
def test_mcnemar_exact_matches_statsmodels(table: list[list[int]]) -> None:
    b, c = table[0][1], table[1][0]
    ref = mcnemar(np.array(table), exact=True).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-10, abs=1e-300)
    assert mcnemar_exact(c, b) == mcnemar_exact(b, c)  # two-sided: symmetric


def test_mcnemar_without_discordant_pairs_is_one_and_matches_binomtest() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(12, 3) == pytest.approx(st.binomtest(12, 15, 0.5).pvalue, rel=1e-12)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def _pairs(rng: np.random.Generator, n: int, p_free: float, p_paid: float) -> tuple[np.ndarray, np.ndarray]:
    return rng.random(n) < p_free, rng.random(n) < p_paid


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    free, paid = _pairs(np.random.default_rng(7), 300, 0.5, 0.4)
    first = paired_bootstrap_gap(free, paid, n_boot=2000, seed=3)
    assert paired_bootstrap_gap(free, paid, n_boot=2000, seed=3) == first
    other = paired_bootstrap_gap(free, paid, n_boot=2000, seed=4)
    assert other[0] == first[0]  # the point estimate does not depend on the seed
    assert other[1:] != first[1:]
    assert first[0] == pytest.approx(free.mean() - paid.mean())


def test_bootstrap_ci_covers_a_known_gap_and_has_a_sane_width() -> None:
    free, paid = _pairs(np.random.default_rng(0), 400, 0.6, 0.3)
    gap, lo, hi = paired_bootstrap_gap(free, paid, n_boot=10000, seed=0)
    assert lo < 0.3 < hi
    assert lo < gap < hi
    # Independent tiers: the CI is close to the two-sample normal CI, 2 * 1.96 * sqrt(.24/400 + .21/400) ~ 0.13.
    assert 0.10 < hi - lo < 0.16


def test_bootstrap_coverage_over_many_datasets_is_near_nominal() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    trials = 100
    for i in range(trials):
        free, paid = _pairs(rng, 400, 0.6, 0.3)
        _, lo, hi = paired_bootstrap_gap(free, paid, n_boot=1000, seed=i)
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / trials <= 1.0


def test_pairing_narrows_the_ci_when_tiers_are_correlated() -> None:
    rng = np.random.default_rng(2)
    # Mostly the same answer in both tiers, as real models give: the paired CI must exploit that.
    base = rng.random(400) < 0.4
    free = base | (rng.random(400) < 0.15)
    paid = base & (rng.random(400) < 0.9)
    _, lo, hi = paired_bootstrap_gap(free, paid, n_boot=5000, seed=0)
    pf, pp = free.mean(), paid.mean()
    unpaired_width = 2 * 1.96 * math.sqrt(pf * (1 - pf) / 400 + pp * (1 - pp) / 400)
    assert hi - lo < 0.6 * unpaired_width


def test_cluster_bootstrap_widens_the_ci_for_repeated_samples_of_a_query() -> None:
    free, paid = _pairs(np.random.default_rng(3), 60, 0.6, 0.3)
    # Four identical samples per query carry the information of one: resampling pairs would overstate it.
    free4, paid4 = np.repeat(free, 4), np.repeat(paid, 4)
    queries = np.repeat(np.arange(60), 4)
    g_naive, lo_n, hi_n = paired_bootstrap_gap(free4, paid4, n_boot=4000, seed=0)
    g_clust, lo_c, hi_c = paired_bootstrap_gap(free4, paid4, n_boot=4000, seed=0, clusters=queries)
    _, lo_1, hi_1 = paired_bootstrap_gap(free, paid, n_boot=4000, seed=0)
    assert g_naive == g_clust == pytest.approx(free.mean() - paid.mean())
    assert (hi_c - lo_c) > 1.6 * (hi_n - lo_n)
    assert (hi_c - lo_c) == pytest.approx(hi_1 - lo_1, rel=0.15)


def test_bootstrap_edge_cases() -> None:
    assert all(math.isnan(x) for x in paired_bootstrap_gap(np.array([]), np.array([])))
    gap, lo, hi = paired_bootstrap_gap(np.ones(5), np.ones(5))
    assert (gap, lo, hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_gap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        paired_bootstrap_gap(np.ones(3), np.ones(3), clusters=np.arange(2))


def test_bootstrap_of_many_pairs_runs_in_blocks_with_the_same_answer_shape() -> None:
    # 10k replicates of 50k pairs would need 4 GB in one draw; blocks keep memory bounded.
    free, paid = _pairs(np.random.default_rng(4), 50_000, 0.2, 0.1)
    gap, lo, hi = paired_bootstrap_gap(free, paid, n_boot=200, seed=0)
    assert lo < gap < hi and hi - lo < 0.02
