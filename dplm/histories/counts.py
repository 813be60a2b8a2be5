"""The counts of subjects calibrated sampling follows: per rows, span and number sums, over public bins.

A subject's number of rows falls in one of the public `LENGTH_EDGES` bins, its span (first to
last value of the ordering column) in one of the `SPAN_SHARES` of the column's width, and each
event number column's sum per subject in one of the training subjects' deciles. Without DP
`TrainingHistories.bound` counts them exactly; under DP the rows alone, a noisy histogram whose
epsilon is counted (`dp_history_length`), from which the history cap is read too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dplm.privacy import integer_release, range_threshold

LENGTH_EDGES = np.array([1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300,
                         400, 500, 600, 800, 1000, 1500, 2000, 3000, 5000, 10000])
CAP_QUANTILE = 0.99  # under DP the history cap is this quantile of the rows per subject
# Span bins' upper edges as shares of the ordering column's public width (calibrated sampling without DP)
SPAN_SHARES = np.array([1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8])


def length_counts(lengths: np.ndarray) -> np.ndarray:
    """How many subjects have each number of rows, over the public `LENGTH_EDGES` bins."""
    return np.bincount(length_bins(lengths), minlength=len(LENGTH_EDGES) - 1).astype(float)


def length_bins(lengths: np.ndarray) -> np.ndarray:
    """Each subject's `LENGTH_EDGES` bin (no rows: the first)."""
    return np.searchsorted(LENGTH_EDGES, np.clip(lengths, 1, LENGTH_EDGES[-1] - 1), side="right") - 1


def span_bins(spans: np.ndarray, width: int) -> np.ndarray:
    """Each subject's bin of its span (first to last row, in the ordering column's scaled
    integers) over public edges: no span (0), then up to each of `SPAN_SHARES` of the column's
    width, then the rest (`len(SPAN_SHARES) + 2` bins)."""
    return np.where(spans <= 0, 0, 1 + np.searchsorted(SPAN_SHARES * max(width, 1), spans, side="left"))


def subject_spans(owners: np.ndarray, scaled: np.ndarray, subjects) -> np.ndarray:
    """Last minus first ordering value of each of `subjects` (0 without rows), from the event rows'
    owners and their scaled ordering values."""
    values = pd.Series(scaled).groupby(owners)
    return (values.max() - values.min()).reindex(subjects, fill_value=0).to_numpy()


def subject_counts(lengths: np.ndarray, spans: np.ndarray | None = None, width: int = 0) -> np.ndarray:
    """Subjects per (rows bin, span bin): `length_bins` x `span_bins`; one span bin without spans."""
    counts = np.zeros((len(LENGTH_EDGES) - 1, 1 if spans is None else len(SPAN_SHARES) + 2))
    np.add.at(counts, (length_bins(lengths), 0 if spans is None else span_bins(spans, width)), 1.0)
    return counts


SUM_BINS = 10  # calibrated sampling without DP: the training subjects' sums of each number column, in deciles


def sum_bins(sums: np.ndarray, edges) -> np.ndarray:
    """Each subject's bin of its sum over `edges` (`subject_sums`): (-inf, e0], (e0, e1], ..."""
    return np.searchsorted(np.asarray(edges, dtype=float), sums, side="left")


def column_sums(events: pd.DataFrame, owners: np.ndarray, subjects) -> dict[str, np.ndarray]:
    """Each of `subjects`' sum of each column of `events` (missing values and no rows: 0), from
    the event rows' owners."""
    return {name: events[name].astype(float).groupby(owners).sum().reindex(subjects, fill_value=0.0).to_numpy()
            for name in events.columns}


def subject_sums(sums: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per column: the decile edges of the training subjects' `sums` (`column_sums`) and the
    subjects in each bin between them (read from the data: without DP only)."""
    out = {}
    for name, values in sums.items():
        edges = np.unique(np.quantile(values, np.linspace(0, 1, SUM_BINS + 1)[1:-1]))
        out[name] = {"edges": edges.tolist(),
                     "counts": np.bincount(sum_bins(values, edges), minlength=len(edges) + 1).tolist()}
    return out


def dp_history_length(lengths: np.ndarray, epsilon: float, rng) -> tuple[int, np.ndarray]:
    """(cap, noisy `length_counts`) of the rows per subject, epsilon-DP: Laplace(1/epsilon) noise
    on every count (a subject is in one bin), counts below `privacy.range_threshold` taken as
    empty (noise alone would fill the tail), released as integers (`privacy.integer_release`),
    the cap the upper end of the bin where the noisy share reaches `CAP_QUANTILE`."""
    noisy = length_counts(lengths) + rng.laplace(0.0, 1.0 / epsilon, size=len(LENGTH_EDGES) - 1)
    noisy = integer_release(np.where(noisy > range_threshold(epsilon, len(noisy)), noisy, 0.0))
    if noisy.sum() <= 0:
        return 1, noisy
    b = int(np.searchsorted(np.cumsum(noisy) / noisy.sum(), CAP_QUANTILE))
    return int(LENGTH_EDGES[b + 1] - 1), noisy


def folded_counts(counts, cap: int) -> np.ndarray:
    """`subject_counts` with the rows bins past `cap`'s folded into the cap's bin."""
    counts = np.asarray(counts, dtype=float)
    last = int(np.searchsorted(LENGTH_EDGES, cap, side="right")) - 1
    target = counts[: last + 1].copy()
    target[last] += counts[last + 1:].sum(axis=0)
    return target


def rows_counts(counts, cap: int) -> np.ndarray:
    """Subjects per rows bin of `subject_counts` (folded at `cap`; negative noisy counts as 0)."""
    return np.clip(folded_counts(counts, cap), 0, None).sum(axis=1)
