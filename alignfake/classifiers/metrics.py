"""Binary-classifier metrics for judge validation (numpy and scipy only; no scikit-learn at runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _arrays(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D and the same length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    return y.astype(int), s


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney U statistic over n_pos * n_neg). NaN if one class is absent."""
    from scipy.stats import rankdata

    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def confusion(labels: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray) -> np.ndarray:
    """2x2 matrix ``[[tn, fp], [fn, tp]]`` (rows: true label 0/1; columns: predicted 0/1)."""
    y, p = _arrays(labels, predicted)
    p = p.astype(int)
    m = np.zeros((2, 2), dtype=int)
    np.add.at(m, (y, p), 1)
    return m


@dataclass(frozen=True)
class BinaryReport:
    n: int
    positives: int
    auroc: float
    threshold: float
    accuracy: float
    confusion: np.ndarray
    """``[[tn, fp], [fn, tp]]``."""

    @property
    def precision(self) -> float:
        tp, fp = self.confusion[1, 1], self.confusion[0, 1]
        return float(tp / (tp + fp)) if tp + fp else float("nan")

    @property
    def recall(self) -> float:
        tp, fn = self.confusion[1, 1], self.confusion[1, 0]
        return float(tp / (tp + fn)) if tp + fn else float("nan")


def binary_report(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                  threshold: float) -> BinaryReport:
    """AUROC of ``scores``, and accuracy and confusion matrix of ``score >= threshold`` (with the judges'
    1e-9 tolerance, so a vote share of 8/20 meets a threshold of 0.4 exactly as the AF judge decides)."""
    y, s = _arrays(labels, scores)
    if len(y) == 0:
        raise ValueError("no labelled examples")
    pred = (s >= threshold - 1e-9).astype(int)
    return BinaryReport(
        n=len(y),
        positives=int(y.sum()),
        auroc=auroc(y, s),
        threshold=threshold,
        accuracy=float((pred == y).mean()),
        confusion=confusion(y, pred),
    )
