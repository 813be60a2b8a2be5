"""Sampling whole histories: subjects drawn under the codec's grammar, and calibrated sampling,
which keeps the subjects whose rows per subject, spans and sums come nearest the training
subjects' counts (`counts`): post-processing of the model and of counts already released.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pandas as pd
import torch

from dplm.config import SampleConfig
from dplm.histories.codec import LENGTH, HistoryCodec
from dplm.histories.counts import (
    LENGTH_EDGES, column_sums, folded_counts, length_bins, rows_counts, span_bins, subject_spans, sum_bins,
)
from dplm.histories.tables import Histories
from dplm.histories.training import HistoryBounds
from dplm.marginals import proportional_draw, raking_weights, smoothed
from dplm.progress import progress as progress_display
from dplm.sample import GivenValues, SampleStats, generate_sequences, output_token_ids, row_grammar, to_frame
from dplm.schema import Column, check_given
from dplm.serialize import ParseError, scaled_bounds, to_scaled_many


def sample_subjects(model, codec: HistoryCodec, num: int, key: str, config: SampleConfig,
                    bounds: HistoryBounds | None, seed: int, temperature: float, device, progress: bool = True,
                    given: pd.DataFrame | None = None, keep=None, output_order: list[str] | None = None
                    ) -> tuple[Histories, SampleStats]:
    """`num` synthetic subjects (or one per row of `given`, whose subject columns they keep, and
    whose keys if it holds the key column), calibrated without `given` (`sample.calibration`): a
    multiple of `num` drawn (`SampleConfig.draws_per_unit`) and `num` chosen by the `bounds`'
    counts (`calibrated_subjects`); where the model's own lengths stay off the counts, drawn
    again, each held to a number of rows drawn from the counts (`drawn_lengths`)."""
    keys = given[key].tolist() if given is not None and key in given.columns else None
    draws = config.draws_per_unit(True)
    calibrate = given is None and bounds is not None and bounds.subject_counts is not None and draws > 1
    drawn, rng = math.ceil(num * draws) if calibrate else num, np.random.default_rng(seed)

    def draw(lengths=None):
        return sample_histories(model, codec, drawn, key, config.batch_size, temperature, seed, device, progress,
                                given.drop(columns=[key]) if keys is not None else given, keep, output_order, lengths)

    out, stats = draw()
    if calibrate:
        counts, cap = bounds.subject_counts, codec.max_rows

        def chosen_of(drawn_subjects, sums):
            return calibrated_subjects(drawn_subjects, key, counts, cap, num, rng, codec.order_column(), sums)

        chosen = chosen_of(out, bounds.subject_sums)
        if bounds.subject_sums and rows_gap(chosen, key, counts, cap) > LENGTH_TOLERANCE:
            chosen = chosen_of(out, None)  # the sums pull the rows off: rows and spans alone
        if rows_gap(chosen, key, counts, cap) > LENGTH_TOLERANCE:
            # The model's own lengths stay off the counts after raking (few or noisy steps):
            # draw again, each history held to a number of rows drawn from the counts (and
            # chosen by rows and spans alone: raking such a model's sums pulls the rows off).
            out, again = draw(drawn_lengths(counts, cap, codec.min_rows, drawn, rng))
            stats = SampleStats(stats.rows_generated + again.rows_generated, stats.rows_returned + again.rows_returned,
                                stats.seconds + again.seconds)
            chosen = chosen_of(out, None)
        out = chosen
        stats = dataclasses.replace(stats, rows_kept=len(out))
    if keys is not None:  # the given subjects keep their keys
        out = out.with_keys(key, keys)
    return out, stats


def sample_histories(model, codec: HistoryCodec, num: int, key: str, batch_size: int = 64, temperature: float = 1.0,
                     seed: int = 0, device=None, progress: bool = True, given: pd.DataFrame | None = None,
                     keep=None, output_order: list[str] | None = None, lengths: np.ndarray | None = None):
    """`num` synthetic subjects (or one per row of `given`, a table of subject columns whose
    values they keep), each a whole history drawn under the codec's grammar, as `Histories`
    with fresh keys 1..num, plus the `SampleStats`. `keep(events) -> bool mask` (the table's
    rules): a subject with a row it refuses is drawn again, as one that does not parse is.
    `lengths` (`drawn_lengths`: each subject's rows) are given as the length field's values:
    each history then has those rows."""
    device = device or next(model.parameters()).device
    grammar = row_grammar(codec, output_token_ids(model), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    values = None
    if given is not None:
        given = check_given(given, codec.subject_schema)
        num = len(given)
    if lengths is not None:
        given = (given if given is not None else pd.DataFrame(index=range(num))).assign(**{LENGTH: lengths})
    if given is not None:
        values = GivenValues(codec, grammar, given, 1)
    drawn: list = [None] * num
    pending, generated, start = list(range(num)), 0, time.perf_counter()
    bar = progress_display(num, "sampling", "subjects", progress)
    while pending:
        if generated >= 10 * num + 10 * batch_size:
            raise RuntimeError(f"only {num - len(pending)} of {num} subjects were valid after generating {generated}")
        batch, pending = pending[:batch_size], pending[batch_size:]
        part = values.select(torch.tensor(batch, device=device)) if values is not None else None
        for i, ids in zip(batch, generate_sequences(model, grammar, len(batch), temperature, generator, device, part)):
            generated += 1
            try:
                subject, rows = codec.decode(ids)
            except ParseError:
                pending.append(i)
                continue
            if given is not None:
                subject.update(given.iloc[i].drop(LENGTH, errors="ignore").to_dict())
            if keep is not None and rows and not keep(to_frame(rows, codec.event_schema, order=False)).all():
                pending.append(i)
                continue
            drawn[i] = (subject, rows)
            bar.update(1)
    bar.close()
    stats = SampleStats(rows_generated=generated, rows_returned=num, seconds=time.perf_counter() - start)
    keys = np.arange(1, num + 1)
    subjects = to_frame([d[0] for d in drawn], codec.subject_schema, order=False)
    subjects.insert(0, key, keys)
    events = to_frame([row for d in drawn for row in d[1]], codec.event_schema, order=False)
    events.insert(0, key, np.repeat(keys, [len(d[1]) for d in drawn]))
    if output_order:
        events = events[[key] + [c for c in output_order if c in events.columns]]
        subjects = subjects[[key] + [c for c in output_order if c in subjects.columns]]
    return Histories(subjects, events), stats


def calibrated_subjects(drawn: Histories, key: str, counts: np.ndarray, cap: int, n: int, rng,
                        order: Column | None = None, sums: dict | None = None) -> Histories:
    """`n` of the `drawn` subjects (more than `n`), chosen so that their rows per subject, and
    with more than one span bin their spans with them, come near `counts` (`subject_counts` of
    the training subjects: without DP rows x span, exact; under DP rows alone, noisy; the rows
    bins past `cap` folded into the cap's; `order`: the ordering column), and without DP each
    number column's sum per subject near the training subjects' deciles (`sums`:
    `subject_sums`): raking weights (`marginals.raking_weights`), then the subjects drawn in
    proportion to them. Post-processing of the model and the counts: no epsilon."""
    target = folded_counts(counts, cap)
    subjects, rows = subject_rows(drawn, key)
    cells = np.minimum(length_bins(rows), len(target) - 1) * target.shape[1]
    owners = drawn.events[key].to_numpy()
    if target.shape[1] > 1:
        lo, hi = scaled_bounds(order)
        cells = cells + span_bins(subject_spans(owners, to_scaled_many(order, drawn.events[order.name]), subjects), hi - lo)
    margins = []
    if sums:
        drawn_sums = column_sums(drawn.events[list(sums)], owners, subjects)
        margins = [(sum_bins(drawn_sums[name], s["edges"]), smoothed(np.asarray(s["counts"], dtype=float), 1.0))
                   for name, s in sums.items()]
    margins.append((cells, smoothed(target.ravel(), 1.0)))  # last: each pass ends on the rows (and spans)
    return drawn.subset(proportional_draw(raking_weights(margins), n, rng), key)


def subject_rows(drawn: Histories, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The subjects' keys and each one's number of event rows."""
    subjects = drawn.subjects[key].to_numpy()
    return subjects, drawn.events.groupby(key).size().reindex(subjects, fill_value=0).to_numpy()


LENGTH_TOLERANCE = 0.05  # calibrated sampling holds histories to drawn lengths past this rows gap


def rows_gap(drawn: Histories, key: str, counts, cap: int) -> float:
    """Total-variation distance between the rows bins of the `drawn` subjects and those of
    `counts` (`subject_counts`, folded at `cap`; negative noisy counts as 0): how far a
    model's own history lengths are from the counts (0 for empty counts: nothing to hold them
    to). Post-processing: no epsilon."""
    target = rows_counts(counts, cap)
    if target.sum() <= 0:
        return 0.0
    rows = subject_rows(drawn, key)[1]
    share = np.bincount(np.minimum(length_bins(rows), len(target) - 1), minlength=len(target)) / max(1, len(rows))
    return float(0.5 * np.abs(share - target / target.sum()).sum())


def drawn_lengths(counts, cap: int, min_rows: int, n: int, rng) -> np.ndarray | None:
    """The rows of each of `n` subjects to draw: a rows bin drawn from the rows per subject of
    `counts` (`subject_counts`, folded at `cap`; negative noisy counts as 0), then a count
    within the bin, uniformly (within [min_rows, cap]), for calibrated sampling to hold each
    history to (`sample_histories`' `lengths`); None where the counts are empty. Post-processing of the
    counts: no epsilon."""
    target = rows_counts(counts, cap)
    if target.sum() <= 0:
        return None
    bins = rng.choice(len(target), size=n, p=target / target.sum())
    least = np.where(bins == 0, min_rows, LENGTH_EDGES[bins])
    most = np.maximum(least, np.minimum(LENGTH_EDGES[bins + 1] - 1, cap))
    return np.minimum(rng.integers(least, most + 1), cap)
