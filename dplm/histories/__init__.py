"""Subjects' whole histories, each one token sequence (`data.subject` with `data.mode: histories`).

    codec      a history as tokens and back, and the grammar sampling walks (`HistoryCodec`)
    training   the training split's subjects as training units (`TrainingHistories`), their bounds
    counts     the counts of subjects per rows, span and sums that calibrated sampling follows
    sampling   subjects drawn under the grammar, and calibrated (`sample_subjects`)
    tables     synthetic subjects as a subject table and an event table (`Histories`)
"""

from dplm.histories.codec import (
    CHANGES, LENGTH, ROW_TOKENS, SAME, Change, HistoryCodec, SameValue, change_columns, gap_column, layout_schemas,
    same_columns,
)
from dplm.histories.counts import (
    CAP_QUANTILE, LENGTH_EDGES, SPAN_SHARES, SUM_BINS, column_sums, dp_history_length, folded_counts, length_bins,
    length_counts, rows_counts, span_bins, subject_counts, subject_spans, subject_sums, sum_bins,
)
from dplm.histories.sampling import (
    LENGTH_TOLERANCE, calibrated_subjects, drawn_lengths, rows_gap, sample_histories, sample_subjects, subject_rows,
)
from dplm.histories.tables import Histories, subjects_path
from dplm.histories.training import (
    HISTORY_PLAN_ROWS, HistoryBounds, TrainingHistories, check_order_by, check_subject_columns_constant,
    check_subject_table,
)

__all__ = [
    "CAP_QUANTILE", "CHANGES", "Change", "HISTORY_PLAN_ROWS", "Histories", "HistoryBounds", "HistoryCodec", "LENGTH",
    "LENGTH_EDGES", "LENGTH_TOLERANCE", "ROW_TOKENS", "SAME", "SPAN_SHARES", "SUM_BINS", "SameValue",
    "TrainingHistories", "calibrated_subjects", "change_columns", "check_order_by", "check_subject_columns_constant",
    "check_subject_table", "column_sums", "dp_history_length", "drawn_lengths", "folded_counts", "gap_column",
    "layout_schemas", "length_bins", "length_counts", "rows_counts", "rows_gap", "same_columns", "sample_histories",
    "sample_subjects", "span_bins", "subject_counts", "subject_rows", "subject_spans", "subject_sums", "subjects_path",
    "sum_bins",
]
