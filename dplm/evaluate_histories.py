"""Scores of synthetic subjects' histories against the training subjects, beside the holdout's.

Each set is a `histories.Histories` (a subject table and an event table keyed alike). The
overall figure follows mostlyai-qa's sequential accuracy, so the two compare:
* the flat table: one row per subject, drawn at a random position (any but the last, as
  mostlyai-qa), with the subject's own columns and its number of rows; its uni-, bi- and
  trivariate accuracy (`evaluate.accuracy`);
* coherence, the mean of three parts: each column's value against the same column in the next
  row (bivariate accuracy, one such pair a subject), the number of distinct (binned) values a
  subject's rows hold, and the number of subjects holding each (binned) value;
* overall = the mean of the flat table's uni-, bi- and trivariate accuracy and the coherence.
Beside it: per-subject figures (rows, the sum and mean of every number column, the span from
first to last of the ordering column), each 1 - TVD over 10 quantile bins of the training
subjects' values, and their table's accuracy; the gaps between consecutive events; the first
rows' and the later rows' accuracy; every event row's accuracy; a discriminator AUC on whole
subjects (all-MiniLM-L6-v2 embeddings of each history as text); and the share of synthetic
subjects whose whole history copies a training subject's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dplm.evaluate import Binner, as_float, tv_accuracy, accuracy, discriminator_auc, embed, is_numeric
from dplm.histories import Histories

SUBJECT_TEXT_ROWS = 20  # rows of a history in its embedded text (the embedder reads ~256 tokens)
COHERENCE_BINS = 30  # bins of the distinct-values parts of coherence (mostlyai-qa's)
TOP_VALUES = 9  # subjects-per-value part: the most common values, the rest as one


def ordered_events(h: Histories, key: str, order_by: str | None) -> pd.DataFrame:
    """The events in history order, with `_index` the row's position in its subject's history."""
    events = h.events.reset_index(drop=True)
    events = events.assign(_pos=np.arange(len(events)))
    events = events.sort_values([key, order_by, "_pos"] if order_by else [key, "_pos"], kind="stable")
    events["_index"] = events.groupby(key, sort=False).cumcount()
    return events.drop(columns="_pos").reset_index(drop=True)


def per_subject(h: Histories, events: pd.DataFrame, key: str, order_by: str | None, numbers: list[str]) -> pd.DataFrame:
    """One row per subject: its rows, each number column's sum and mean, and its span."""
    out = pd.DataFrame(index=pd.Index(h.subjects[key].to_numpy(), name=key))
    groups = events.groupby(key, sort=False)
    out["rows"] = groups.size().reindex(out.index).fillna(0).astype(int)
    for c in numbers:
        values = pd.Series(as_float(events[c]), index=events.index).groupby(events[key])
        out[f"{c} per subject"] = values.sum().reindex(out.index)
        out[f"{c} mean"] = values.mean().reindex(out.index)
    if order_by:
        values = pd.Series(as_float(events[order_by]), index=events.index).groupby(events[key])
        span = (values.max() - values.min()).reindex(out.index)
        out[f"{order_by} span"] = span / 86_400e9 if pd.api.types.is_datetime64_any_dtype(events[order_by]) else span
    return out.reset_index(drop=True)


def flat_table(h: Histories, events: pd.DataFrame, key: str, columns: list[str], rng) -> pd.DataFrame:
    """One row per subject with rows: at position int((rows - 1) * U), its own columns, its row count."""
    lengths = events.groupby(key, sort=False).size()
    start = events.groupby(key, sort=False).cumcount() == 0
    first = np.flatnonzero(start.to_numpy())
    pick = first + (np.floor((lengths.to_numpy() - 1) * rng.random(len(first)))).astype(int)
    rows = events.iloc[pick][[key, *columns]].reset_index(drop=True)
    rows["rows"] = lengths.to_numpy()
    own = h.subjects.set_index(key)
    for c in own.columns:
        rows[c] = rows[key].map(own[c]).to_numpy()
    return rows.drop(columns=[key])


def coherence(train: pd.DataFrame, other: pd.DataFrame, key: str, columns: list[str], seed: int = 0) -> dict:
    """mostlyai-qa's sequential coherence, per column and its mean: the mean of (1) a random
    consecutive pair a subject, (value, next value) bivariate accuracy (10 bins), (2) the
    distinct binned values (30 bins) per subject, 10 bins, 1 - TVD, (3) the share of subjects
    holding each binned value (the 9 most common, the rest together), 1 - TVD. The random pairs
    come from `seed` alone, so every set is scored against the same training pairs."""
    rng = np.random.default_rng(seed)
    fine = Binner(train[columns], bins=COHERENCE_BINS)
    coarse = Binner(train[columns])

    def consecutive(events):  # one random (row, next row) pair of each subject with two rows or more
        lengths = events.groupby(key, sort=False).size().to_numpy()
        starts = np.flatnonzero(events["_index"].to_numpy() == 0)
        many = lengths >= 2
        keep = starts[many] + np.floor((lengths[many] - 1) * rng.random(many.sum())).astype(int)
        codes = coarse.codes(events[columns])
        return codes[keep], codes[keep + 1]

    def distinct(events):
        codes = pd.DataFrame(fine.codes(events[columns]), columns=columns)
        codes[key] = events[key].to_numpy()
        return codes.groupby(key, sort=False).nunique()

    def holders(events):
        codes = pd.DataFrame(fine.codes(events[columns]), columns=columns)
        codes[key] = events[key].to_numpy()
        return {c: codes.drop_duplicates([key, c])[c].value_counts() / codes[key].nunique() for c in columns}

    (a0, a1), (b0, b1) = consecutive(train), consecutive(other)
    da, db = distinct(train), distinct(other)
    ha, hb = holders(train), holders(other)
    out = {}
    for j, c in enumerate(columns):
        size = len(coarse.labels[c])
        parts = []
        if len(a0) and len(b0):
            parts.append(tv_accuracy(a0[:, j] * size + a1[:, j], b0[:, j] * size + b1[:, j], size * size))
        counts = Binner(da[[c]])
        parts.append(tv_accuracy(counts.codes(da[[c]])[:, 0], counts.codes(db[[c]])[:, 0], len(counts.labels[c])))
        top = ha[c].index[:TOP_VALUES]
        pa, pb = ha[c].reindex(top).fillna(0), hb[c].reindex(top).fillna(0)
        pa = np.append(pa.to_numpy(), ha[c].drop(top).sum())
        pb = np.append(pb.to_numpy(), hb[c].drop(top, errors="ignore").sum())
        parts.append(float(1 - 0.5 * np.abs(pa / pa.sum() - pb / max(pb.sum(), 1e-12)).sum()))
        out[c] = float(np.mean(parts))
    return out


def _as_text(values: pd.Series) -> pd.Series:
    """Each value as text, a missing one too ("nan", "<NA>"): a nullable column's astype(str)
    keeps its missing values missing, and they would drop whole subjects from the text."""
    return values.astype(object).map(str)


def subject_texts(h: Histories, events: pd.DataFrame, key: str, columns: list[str],
                  max_rows: int | None = SUBJECT_TEXT_ROWS) -> pd.Series:
    """Each subject as text (indexed by key): its own values, then (the first `max_rows` of)
    its rows' values, in order."""
    kept = events if max_rows is None else events[events["_index"] < max_rows]
    line = _as_text(kept[columns[0]])
    for c in columns[1:]:
        line = line + ", " + _as_text(kept[c])
    rows = line.groupby(kept[key].to_numpy(), sort=False).agg("; ".join)
    own = h.subjects.set_index(key)
    head = pd.Series("", index=own.index)
    for i, c in enumerate(own.columns):
        head = head + (", " if i else "") + _as_text(own[c])
    texts = head.str.cat(rows.reindex(own.index).fillna(""), sep=" | ")
    return texts


def history_scores(train: Histories, holdout: Histories, synthetic: Histories, key: str, order_by: str | None,
                   embed_sample: int = 2000, seed: int = 0) -> dict:
    """Every history score for the synthetic subjects and, as the reference, the holdout's."""
    columns = [c for c in train.events.columns if c != key]
    numbers = [c for c in columns if is_numeric(train.events[c]) and c != order_by
               and not pd.api.types.is_datetime64_any_dtype(train.events[c])]
    sets = {"training": train, "holdout": holdout, "synthetic": synthetic}
    events = {name: ordered_events(h, key, order_by) for name, h in sets.items()}
    # one generator per set: a set's figures do not depend on how many draws another set took
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(sets)}
    flat = {name: flat_table(h, events[name], key, columns, rngs[name]) for name, h in sets.items()}
    figures = {name: per_subject(h, events[name], key, order_by, numbers) for name, h in sets.items()}
    texts = {name: subject_texts(h, events[name], key, columns) for name, h in sets.items()}
    n = min(embed_sample, *(len(t) for t in texts.values()))
    emb = {name: embed(t.iloc[rngs[name].permutation(len(t))[:n]].tolist()) for name, t in texts.items()}
    training_histories = set(subject_texts(train, events["training"], key, columns, max_rows=None))
    flat_binner, figure_binner, event_binner = Binner(flat["training"]), Binner(figures["training"]), \
        Binner(train.events[columns])
    out = {"subjects": {name: len(h) for name, h in sets.items()}, "subjects_embedded": n}
    real = events["training"]
    for name in ("synthetic", "holdout"):
        e = events[name]
        flat_acc = accuracy(flat["training"], flat[name], flat_binner, seed)
        figure_acc = accuracy(figures["training"], figures[name], figure_binner, seed)
        per_column = coherence(real, e, key, columns, seed)
        first, later = e[e["_index"] == 0][columns], e[e["_index"] > 0][columns]
        real_first, real_later = real[real["_index"] == 0][columns], real[real["_index"] > 0][columns]
        scores = {
            "overall": float(np.mean([flat_acc[k] for k in ("univariate", "bivariate", "trivariate")
                                      if flat_acc[k] is not None] + [np.mean(list(per_column.values()))])),
            "flat": {k: flat_acc[k] for k in ("univariate", "bivariate", "trivariate", "overall")},
            "coherence": float(np.mean(list(per_column.values()))),
            "coherence_per_column": per_column,
            "per_subject": figure_acc["per_column"],
            "per_subject_accuracy": figure_acc["overall"],
            "mean_rows_per_subject": float(figures[name]["rows"].mean()),
            "event_accuracy": accuracy(train.events[columns], e[columns], event_binner, seed)["overall"],
            "first_row_accuracy": accuracy(real_first, first, Binner(real_first), seed)["overall"] if len(first) else None,
            "later_row_accuracy": (accuracy(real_later, later, Binner(real_later), seed)["overall"]
                                   if len(later) and len(real_later) else None),
            "discriminator_auc": discriminator_auc(emb["training"], emb[name], seed),
            "copied_subject_share": float(subject_texts(sets[name], e, key, columns, max_rows=None)
                                          .isin(training_histories).mean()),
        }
        if order_by:
            real_gaps, their_gaps = gaps(real, key, order_by), gaps(e, key, order_by)
            scores["gaps"] = _one_way(real_gaps, their_gaps) if len(their_gaps) and len(real_gaps) else None
        out[name] = scores
    out["mean_rows_per_subject_training"] = float(figures["training"]["rows"].mean())
    return out


def gaps(events: pd.DataFrame, key: str, order_by: str) -> np.ndarray:
    """The ordering column's differences between consecutive rows of a subject (days for dates)."""
    values = pd.Series(as_float(events[order_by]), index=events.index)
    diff = values.groupby(events[key].to_numpy(), sort=False).diff().dropna().to_numpy()
    return diff / 86_400e9 if pd.api.types.is_datetime64_any_dtype(events[order_by]) else diff


def _one_way(real: np.ndarray, other: np.ndarray) -> float:
    """1 - TVD over 10 quantile bins of the real values."""
    binner = Binner(pd.DataFrame({"v": real}))
    return tv_accuracy(binner.codes(pd.DataFrame({"v": real}))[:, 0], binner.codes(pd.DataFrame({"v": other}))[:, 0],
                        len(binner.labels["v"]))
