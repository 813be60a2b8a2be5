import json

import numpy as np
import pandas as pd
import pytest
import torch

import dplm
from dplm.config import RunConfig, from_dict
from dplm.histories import (
    HISTORY_PLAN_ROWS, LENGTH, LENGTH_EDGES, SPAN_SHARES, HistoryCodec, Histories, TrainingHistories,
    LENGTH_TOLERANCE, calibrated_subjects, dp_history_length, drawn_lengths, length_counts, rows_gap,
    column_sums, sample_histories, span_bins, subject_counts, subject_spans, subject_sums, sum_bins,
)
from dplm.sample import CompiledGrammar, LazyGrammar, generate_sequences
from dplm.schema import Column, MetadataSpend, Schema, coerce_table
from dplm.serialize import ParseError
from conftest import ROOT, shared_file

CDNOW_SCHEMA = ROOT / "recipes" / "cdnow_schema.yaml"


@pytest.fixture(scope="module")
def cdnow():
    return pd.read_csv(shared_file("cdnow_purchases.csv.gz"), nrows=6000)


def shop(num: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Customers (a country, a signup year) and their visits (a day, a spend): rows per
    customer 1-5, days increasing, spend higher in one country; some customers never visit."""
    rng = np.random.default_rng(seed)
    customers = pd.DataFrame({"cid": np.arange(100, 100 + num), "country": rng.choice(["fr", "de"], num),
                              "since": rng.integers(2000, 2010, num)})
    rows = []
    for cid, country in zip(customers["cid"], customers["country"]):
        day = pd.Timestamp("2020-01-01") + pd.Timedelta(days=int(rng.integers(0, 30)))
        for _ in range(0 if cid % 7 == 0 else int(rng.integers(1, 6))):
            rows.append({"cid": cid, "day": day, "spend": float(rng.integers(10, 50) + (30 if country == "fr" else 0))})
            day += pd.Timedelta(days=int(rng.integers(0, 20)))
    return pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True), customers


def history_units(events: pd.DataFrame, subject: str, order_by: str) -> list[np.ndarray]:
    """Each subject's row positions in `events`, in order (`order_by`, then the table's order)."""
    order = np.lexsort((np.arange(len(events)), events[order_by].to_numpy()))
    codes = pd.factorize(events[subject].to_numpy()[order])[0]
    return [np.asarray(g) for g in pd.Series(order).groupby(codes, sort=False).agg(list)]


SHOP_SCHEMA = {"columns": {
    "country": {"kind": "categorical", "categories": ["fr", "de"]}, "since": {"kind": "integer", "min": 2000, "max": 2010},
    "day": {"kind": "datetime", "min": "2020-01-01", "max": "2021-12-31"},
    "spend": {"kind": "float", "min": 0, "max": 200, "precision": 1}}}


@pytest.mark.parametrize("value_tokens", [True, False])
def test_histories_round_trip(cdnow, tokenizer, value_tokens):
    """A customer's purchases, in date order, are one sequence: the first date, then the gaps;
    decoding gives every row back exactly."""
    schema = Schema.from_yaml(str(CDNOW_SCHEMA))
    events = coerce_table(cdnow.drop(columns=["users_id"]), schema)
    events["users_id"] = cdnow["users_id"]
    codec = HistoryCodec(None, schema, tokenizer, value_tokens, "date", max_rows=40)
    for unit in history_units(events, "users_id", "date")[:500]:
        rows = events.iloc[unit[:40]]
        ids = codec.encode({}, rows)
        assert codec.rows_written(ids) == len(rows) and ids[0] == codec.bos_id and ids[-1] == codec.eos_id
        # the length, then each row's token says the rows left: n, n - 1, ..., 1
        assert [t for t in ids if t in codec.row_ids] == [codec.row_token(len(rows) - r) for r in range(len(rows))]
        length = ids[1: ids.index(codec.row_ids[0] if len(rows) == 0 else codec.row_token(len(rows)))]
        assert codec.length_field.parse(length if value_tokens else length[:-1]) == len(rows)  # digits: and a separator
        subject, decoded = codec.decode(ids)
        assert subject == {}
        pd.testing.assert_frame_equal(pd.DataFrame(decoded)[schema.names].astype(str),
                                      rows[schema.names].reset_index(drop=True).astype(str))
    assert codec.fields == [codec.length_field] and codec.max_tokens() >= max(len(codec.encode({}, events.iloc[u[:40]]))
                                                          for u in history_units(events, "users_id", "date")[:500])


@pytest.mark.parametrize("value_tokens", [True, False])
def test_every_added_token_starts_from_a_text(value_tokens):
    """Each token a history codec adds (the row tokens and the length's too) has a text its
    embedding starts from: none is left to the resize's random init, which a loaded or resumed
    run would draw anew."""
    from dplm.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    base = len(tokenizer)
    schema = Schema.from_dict(SHOP_SCHEMA)
    codec = HistoryCodec(Schema([schema["since"]]), Schema([schema["day"], schema["spend"], schema["country"]]),
                         tokenizer, value_tokens, "day", max_rows=4, same_columns=["country"] if value_tokens else [])
    texts = codec.value_token_texts()
    assert len(tokenizer) > base and set(range(base, len(tokenizer))) <= set(texts)
    assert len(codec.row_ids) == 4 and texts[codec.row_token(3)] == tokenizer("\n3", add_special_tokens=False).input_ids


def test_a_kept_category_is_written_as_same(tokenizer):
    """In later rows a categorical value equal to the row before's (missing ones too) is its
    column's "same" token, never in a first row; decoding gives the values back, and a random
    model's histories decode to the row before's value wherever it wrote "same"."""
    from dplm.histories import SAME, SameValue, same_columns
    from dplm.model import load_base_model, restrict_output_vocab

    channel = Column(name="channel", kind="categorical", categories=["web", "shop"], nullable=True)
    events = Schema([Column(name="day", kind="integer", min=0, max=99), channel])
    assert same_columns(events, True) == ["channel"] and same_columns(events, False) == []
    codec = HistoryCodec(None, events, tokenizer, True, "day", max_rows=6, same_columns=["channel"])
    same = codec.later_rows[1].same_id
    rows = pd.DataFrame({"day": [1, 2, 4, 4, 9, 9], "channel": ["web", "web", "shop", None, None, "web"]})
    ids = codec.encode({}, rows)
    assert ids.count(same) == 2  # row 2 (web after web) and row 5 (missing after missing)
    assert [ids[i + 1] == same for i, t in enumerate(ids) if t in codec.row_ids][:2] == [False, False]
    decoded = pd.DataFrame(codec.decode(ids)[1])
    assert decoded["channel"].tolist()[:3] == ["web", "web", "shop"] and decoded["channel"].isna().tolist()[3:5] == [True] * 2
    assert isinstance(codec.later_rows[1], SameValue) and codec.later_rows[1].parse([same]) is SAME
    model = load_base_model("tiny-random", len(tokenizer))
    restrict_output_vocab(model, codec.output_token_ids())
    grammar = CompiledGrammar.build(codec, codec.output_token_ids(), torch.device("cpu"))
    written = 0
    for ids in generate_sequences(model, grammar, 30, 1.0, torch.Generator().manual_seed(0), torch.device("cpu")):
        rows = codec.decode(ids)[1]
        marks = [ids[i + 2] == same for i, t in enumerate(ids) if t in codec.row_ids]  # row token, day, channel
        for r, row in enumerate(rows):
            assert row["channel"] in ("web", "shop", None)
            if marks[r]:
                written += 1
                assert r > 0 and row["channel"] == rows[r - 1]["channel"]
    assert written > 0


def test_an_integer_column_writes_its_small_changes(tokenizer):
    """In later rows an integer column writes "same", a change of at most 3 from the row before
    as its own token, or a fresh value; decoding gives the values back, and a random model's
    histories decode to the row before's value plus the change wherever it wrote one."""
    from dplm.histories import CHANGES, Change, change_columns
    from dplm.model import load_base_model, restrict_output_vocab

    events = Schema([Column(name="year", kind="integer", min=1980, max=1990),
                     Column(name="exper", kind="integer", min=0, max=40),
                     Column(name="kids", kind="integer", min=0, max=9, nullable=True)])
    assert change_columns(events, True, "year") == ["exper", "kids"] and change_columns(events, False, "year") == []
    codec = HistoryCodec(None, events, tokenizer, True, "year", max_rows=6, change_columns=["exper", "kids"])
    field = codec.later_rows[1]
    rows = pd.DataFrame({"year": [1980, 1981, 1983, 1984, 1985], "exper": [3, 4, 6, 6, 20],
                         "kids": [0, None, None, 2, 1]}).astype({"kids": "Int64"})
    ids = codec.encode({}, rows)
    assert [t for t in ids if t in field.marks] == [field.change_ids[1], field.change_ids[2], field.same_id]
    kids = codec.later_rows[2]
    assert [t for t in ids if t in kids.marks] == [kids.same_id, kids.change_ids[-1]]  # missing after missing; 2 -> 1
    decoded = pd.DataFrame(codec.decode(ids)[1])
    assert decoded["exper"].tolist() == [3, 4, 6, 6, 20] and decoded["kids"].tolist()[3:] == [2, 1]
    assert field.parse([field.change_ids[-3]]) == Change(-3) and len(CHANGES) == 6
    assert json.loads(json.dumps(codec.layout()))["change_columns"] == ["exper", "kids"]
    model = load_base_model("tiny-random", len(tokenizer))
    restrict_output_vocab(model, codec.output_token_ids())
    grammar = CompiledGrammar.build(codec, codec.output_token_ids(), torch.device("cpu"))
    changed = parsed = 0
    for ids in generate_sequences(model, grammar, 80, 1.0, torch.Generator().manual_seed(0), torch.device("cpu")):
        try:
            rows = codec.decode(ids)[1]
        except ParseError as e:
            assert "after a missing value" in str(e)  # kids: a change after a missing value
            continue
        parsed += 1
        marks = [ids[i + 2] for i, t in enumerate(ids) if t in codec.row_ids]  # row token, year, exper's token
        for r, row in enumerate(rows):
            assert 0 <= row["exper"] <= 40
            by = {t: d for d, t in field.change_ids.items()}.get(marks[r])
            if r > 0 and by is not None:
                changed += 1
                assert row["exper"] == min(40, max(0, rows[r - 1]["exper"] + by))
    assert changed > 0, parsed


def test_history_grammar_counts_rows_and_keeps_dates_in_order(tokenizer):
    """Sampling under the grammar (here from a random model) gives histories of min_rows to
    max_rows rows whose dates never go back, from the compiled and the lazy automaton alike;
    a history ends before its first row past the date's max (none parses if that leaves fewer
    than min_rows)."""
    from dplm.model import load_base_model, restrict_output_vocab

    events, customers = shop()
    schema = Schema.from_dict(SHOP_SCHEMA)
    subject_schema, event_schema = Schema([schema["country"], schema["since"]]), Schema([schema["day"], schema["spend"]])
    codec = HistoryCodec(subject_schema, event_schema, tokenizer, True, "day", max_rows=4, min_rows=2)
    model = load_base_model("tiny-random", len(tokenizer))
    restrict_output_vocab(model, codec.output_token_ids())
    token_ids = codec.output_token_ids()
    for grammar in (CompiledGrammar.build(codec, token_ids, torch.device("cpu")),
                    LazyGrammar(codec, token_ids, torch.device("cpu"))):
        assert grammar is not None
        generator = torch.Generator().manual_seed(0)
        cut = too_short = 0
        for ids in generate_sequences(model, grammar, 40, 1.0, generator, torch.device("cpu")):
            written = codec.rows_written(ids)
            try:
                subject, rows = codec.decode(ids)
            except ParseError as e:
                assert "passes its max before min_rows rows" in str(e)
                too_short += 1
                continue
            cut += len(rows) < written
            assert subject["country"] in ("fr", "de") and 2000 <= subject["since"] <= 2010
            assert 2 <= len(rows) <= 4
            days = [r["day"] for r in rows]
            assert days == sorted(days) and all(pd.Timestamp("2020-01-01") <= d <= pd.Timestamp("2021-12-31")
                                                for d in days)
        assert cut > 0 and too_short + cut < 40  # random gaps over two years: some pass the end, some do not


def test_plan_rows_are_public_under_dp():
    visits, _ = shop()
    history = TrainingHistories.of(visits, None, "cid", "day")
    mean = visits.groupby("cid").size().mean()  # the customers without visits have no rows here
    assert history.plan_rows(dp=False) == pytest.approx(mean)
    assert history.plan_rows(dp=True) == HISTORY_PLAN_ROWS and isinstance(history.plan_rows(dp=True), int)


def test_dp_history_cap_is_a_noisy_quantile():
    lengths = np.r_[np.ones(9000, dtype=int), np.full(950, 5), np.full(50, 40)]  # 99th percentile: 5
    exact = np.zeros(len(LENGTH_EDGES) - 1)
    exact[[0, 4, 14]] = 9000, 950, 50  # the bins [1, 2), [5, 6) and [40, 50)
    assert np.array_equal(length_counts(lengths), exact)
    results = [dp_history_length(lengths, 0.5, np.random.default_rng(seed)) for seed in range(40)]
    assert all(cap == 5 for cap, _ in results)  # the bin [5, 6) holds the quantile (shares 0.90..0.995)
    errors = np.array([counts[[0, 4, 14]] - exact[[0, 4, 14]] for _, counts in results]).ravel()
    assert abs(errors.mean()) < 0.6 and 2.2 < errors.std() < 3.5  # Laplace(1 / 0.5): sd 2 * sqrt(2) = 2.83
    assert all(counts[[i for i in range(len(exact)) if i not in (0, 4, 14)]].sum() == 0 for _, counts in results)
    assert dp_history_length(np.ones(3, dtype=int), 0.1, np.random.default_rng(0))[0] == 1  # too few: the smallest


def test_calibrated_subjects_follow_the_rows_per_subject_counts():
    """Drawn subjects that end too early (72 % one row, real 40 %) are thinned to the counts'
    shares; the cap's bin takes the counts past it, its factor held at RAKING_LIMIT; keys are
    1..n again, each subject with all its rows."""
    rng = np.random.default_rng(0)
    lengths = rng.choice([1, 2, 3, 9], size=2000, p=[0.72, 0.15, 0.1, 0.03])
    keys = np.arange(1, 2001)
    drawn = Histories(pd.DataFrame({"k": keys}),
                      pd.DataFrame({"k": np.repeat(keys, lengths), "was": np.repeat(keys, lengths)}))
    counts = np.zeros(len(LENGTH_EDGES) - 1)
    counts[[0, 1, 2, 8, 12]] = 400, 250, 200, 100, 50  # 1, 2 and 3 rows, 10-11 and 25-29 (past the cap of 9)
    out = calibrated_subjects(drawn, "k", counts[:, None], cap=9, n=400, rng=np.random.default_rng(1))
    assert list(out.subjects["k"]) == list(range(1, 401)) and set(out.events["k"]) == set(range(1, 401))
    shares = out.events.groupby("k").size().value_counts(normalize=True)
    drawn_nine = (lengths == 9).mean()  # ~0.03: the cap's bin [8, 10) wants 0.15, raised 4 times at most
    # (and a subject is drawn once at most: 400 of 2,000 leave room for that here)
    expected = np.array([0.4, 0.25, 0.2, 4 * drawn_nine])
    assert np.allclose(shares[[1, 2, 3, 9]].to_numpy(), expected / expected.sum(), atol=0.03)
    was = out.events.groupby("k")["was"].agg(["nunique", "first", "size"])
    assert (was["nunique"] == 1).all() and (lengths[was["first"] - 1] == was["size"]).all()  # whole subjects


def test_drawn_lengths_follow_the_rows_per_subject_counts():
    """Each subject's rows bin is drawn from the counts' rows (summed over span bins, the bins
    past the cap folded into the cap's, negative noisy counts as none), then its rows uniformly
    within the bin and [min_rows, cap]."""
    counts = np.zeros((len(LENGTH_EDGES) - 1, 2))
    counts[0] = 300, 100  # 1 row
    counts[1, 0], counts[8, 1], counts[12, 0], counts[3, 0] = 250, 100, 50, -7  # 2, 10-11, 25-29 rows; 4: noise
    rows = drawn_lengths(counts, cap=20, min_rows=0, n=8000, rng=np.random.default_rng(0))
    shares = pd.Series(rows).value_counts(normalize=True)
    assert set(shares.index) == {0, 1, 2, 10, 11, 20}  # bin 0 from min_rows; [25, 30) folded at the cap 20
    assert np.allclose(shares[[0, 1, 2, 10, 11, 20]].to_numpy(), [0.25, 0.25, 0.3125, 0.0625, 0.0625, 0.0625],
                       atol=0.015)
    assert drawn_lengths(np.zeros((len(LENGTH_EDGES) - 1, 1)) - 1, 5, 1, 10, np.random.default_rng(0)) is None


def test_given_lengths_hold_each_history_to_its_rows(tokenizer):
    """Sampling with `lengths` (a random model, whose own lengths are anything from 1 to the
    cap): every history has exactly its rows (row tokens written, rows decoded), the rows left
    counting down to 1; a given subject column is kept beside them."""
    from dplm.model import load_base_model, restrict_output_vocab

    schema = Schema.from_dict(SHOP_SCHEMA)
    codec = HistoryCodec(Schema([schema["country"]]), Schema([schema["spend"]]), tokenizer, True, None, max_rows=12)
    model = load_base_model("tiny-random", len(tokenizer))
    restrict_output_vocab(model, codec.output_token_ids())
    rows = np.array([1, 3, 4, 8, 12] * 8)
    out, _ = sample_histories(model, codec, 40, "k", 40, progress=False, lengths=rows,
                              given=pd.DataFrame({"country": ["de"] * 40}))
    assert out.events.groupby("k").size().reindex(range(1, 41)).tolist() == rows.tolist()
    assert (out.subjects["country"] == "de").all()
    grammar = CompiledGrammar.build(codec, codec.output_token_ids(), torch.device("cpu"))
    from dplm.sample import GivenValues

    given = GivenValues(codec, grammar, pd.DataFrame({LENGTH: rows}), 1)
    ids = generate_sequences(model, grammar, 40, 1.0, torch.Generator().manual_seed(0), torch.device("cpu"),
                             given.select(torch.arange(40)))
    assert [codec.rows_written(seq) for seq in ids] == rows.tolist()
    assert [[t for t in seq if t in codec.row_ids] for seq in ids] == [
        [codec.row_token(k) for k in range(n, 0, -1)] for n in rows]


def test_calibrated_sampling_holds_lengths_the_model_misses(cdnow):
    """A model whose own history lengths stay far from the counts after raking (a tiny random
    one after 3 steps) draws its subjects again, each held to a number of rows drawn from the
    counts: the rows gap falls below the tolerance; both draws are counted. (In the table's row
    order: with dates a random model's gaps pass the last date, which ends a history early.)"""
    config = tiny(False, schema=str(CDNOW_SCHEMA))
    config.data.subject, config.data.order_by, config.data.max_history = "users_id", None, 8  # short sequences
    config.sample.batch_size = 300
    synth = dplm.fit(cdnow, config, progress=False)
    counts, cap = synth.bounds.subject_counts, synth.codec.max_rows
    own, _ = sample_histories(synth.model, synth.codec, 600, "users_id", 300, seed=0, progress=False)
    raked = calibrated_subjects(own, "users_id", counts, cap, 300, np.random.default_rng(0), synth.codec.order_column())
    assert rows_gap(raked, "users_id", counts, cap) > LENGTH_TOLERANCE
    out = synth.sample(300, seed=0, progress=False)
    assert len(out) == 300 and rows_gap(out, "users_id", counts, cap) < LENGTH_TOLERANCE
    assert synth.last_sample_stats.rows_returned == 2 * 600 and synth.last_sample_stats.rows_kept == 300


def test_rows_gap_by_hand():
    counts = np.zeros((len(LENGTH_EDGES) - 1, 1))
    counts[0], counts[1], counts[12] = 60, 30, 10  # 1 and 2 rows, 25-29 (past the cap of 9: the bin [8, 10))
    drawn = Histories(pd.DataFrame({"k": [1, 2, 3, 4]}), pd.DataFrame({"k": [1, 2, 3, 3, 4, 4, 4]}))
    # drawn: 1, 1, 2, 3 rows (shares 0.5, 0.25, 0.25 in bins 0, 1, 2); counts 0.6, 0.3, 0 and 0.1 in bin 7
    assert rows_gap(drawn, "k", counts, cap=9) == pytest.approx(0.5 * (0.1 + 0.05 + 0.25 + 0.1))
    assert rows_gap(drawn, "k", counts * 0 - 1, cap=9) == 0.0  # empty (noisy) counts: no draw again


def test_subject_counts_per_rows_and_span():
    """Each subject in the cell of its rows bin and span bin, checked one by one; spans from the
    owners' first and last values (0 for a subject without rows)."""
    spans = subject_spans(np.array([0, 0, 2, 2, 2, 3]), np.array([5, 9, 1, 40, 100, 7]), range(5))
    assert spans.tolist() == [4, 0, 99, 0, 0]
    lengths = np.array([2, 0, 3, 1, 1])
    counts = subject_counts(lengths, spans, width=128)
    assert counts.sum() == 5 and counts.shape == (len(LENGTH_EDGES) - 1, len(SPAN_SHARES) + 2)
    # width 128: span 4 is in (2, 4] (1/32 of it: bin 2), 99 in (96, 112] (7/8: bin 10), 0 in bin 0
    for rows_bin, span_bin, n in [(1, 2, 1), (0, 0, 3), (2, 10, 1)]:
        assert counts[rows_bin, span_bin] == n
    assert np.array_equal(subject_counts(lengths)[:, 0], length_counts(lengths))


def test_calibrated_subjects_follow_the_spans():
    """Two-row subjects drawn with short spans (80 % a day, the counts' half) are kept at the
    counts' half and half: factors 0.5 / 0.8 and 0.5 / 0.2, so the long share 0.5 / (0.5 + 0.5)."""
    rng = np.random.default_rng(0)
    order = Column(name="day", kind="integer", min=0, max=640)
    long = rng.random(3000) < 0.2
    gaps = np.where(long, 300, 1)
    keys = np.arange(1, 3001)
    drawn = Histories(pd.DataFrame({"k": keys}), pd.DataFrame(
        {"k": np.repeat(keys, 2), "day": np.stack([np.zeros(3000, dtype=int), gaps], 1).ravel()}))
    counts = np.zeros((len(LENGTH_EDGES) - 1, len(SPAN_SHARES) + 2))
    counts[1, span_bins(np.array([1, 300]), 640)] = 500  # half a day apart, half 300 days
    out = calibrated_subjects(drawn, "k", counts, cap=5, n=1000, rng=np.random.default_rng(1), order=order)
    assert (out.events.groupby("k").size() == 2).all() and len(out) == 1000
    span = out.events.groupby("k")["day"].agg(lambda d: d.max() - d.min())
    assert 0.45 < (span == 300).mean() < 0.55 and set(span) == {1, 300}


def test_subject_sums_by_hand():
    """Each subject's sum of each column (missing values and no rows: 0), then the sums' decile
    edges and the subjects per bin."""
    events = pd.DataFrame({"a": [1.0, 2.0, np.nan, 5.0], "b": [1, 1, 1, 1]})
    sums = column_sums(events, np.array([0, 0, 1, 3]), range(4))
    assert sums["a"].tolist() == [3.0, 0.0, 0.0, 5.0] and sums["b"].tolist() == [2.0, 1.0, 0.0, 1.0]
    out = subject_sums({"x": np.arange(100.0)})
    assert out["x"]["edges"] == pytest.approx([9.9, 19.8, 29.7, 39.6, 49.5, 59.4, 69.3, 79.2, 89.1])
    assert out["x"]["counts"] == [10] * 10
    ties = subject_sums({"x": np.array([0.0] * 91 + [5.0] * 9)})["x"]  # nine tied deciles: one edge
    assert ties["edges"] == [0.0] and ties["counts"] == [91, 9]


def test_calibrated_subjects_follow_the_sums():
    """Subjects drawn with sums leaning low (a spend of 1 to 10 a row, squared: most small) are
    chosen so that their sums' deciles hold about a tenth each, as the training subjects'
    (uniform sums); their rows per subject stay at the counts' (all two rows)."""
    rng = np.random.default_rng(0)
    keys = np.arange(1, 4001)
    spend = (rng.integers(1, 11, size=(4000, 2)) ** 2).astype(float)
    drawn = Histories(pd.DataFrame({"k": keys}), pd.DataFrame({"k": np.repeat(keys, 2), "spend": spend.ravel()}))
    sums = subject_sums({"spend": rng.uniform(2, 200, 5000)})
    counts = np.zeros((len(LENGTH_EDGES) - 1, 1))
    counts[1] = 5000
    out = calibrated_subjects(drawn, "k", counts, cap=5, n=1000, rng=np.random.default_rng(1), sums=sums)
    assert (out.events.groupby("k").size() == 2).all() and len(out) == 1000
    shares = np.bincount(sum_bins(out.events.groupby("k")["spend"].sum().to_numpy(), sums["spend"]["edges"]),
                         minlength=10) / 1000
    before = np.bincount(sum_bins(spend.sum(1), sums["spend"]["edges"]), minlength=10) / 4000
    assert before[:5].sum() > 0.7 and before[-3:].sum() < 0.1  # drawn: 72 % in the lowest five deciles
    assert np.abs(shares - 0.1).max() < 0.02


def tiny(dp: bool, **data) -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"subject": "cid", "order_by": "day", **data}, "model": {"base": "tiny-random", "lora_r": 4, "lora_alpha": 8},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3, "learning_rate": 0.01},
        "privacy": {"enabled": dp, "max_epsilon": 4.0}, "sample": {"batch_size": 16}})


def test_two_tables_fit_sample_save_load(tmp_path):
    """An event table and a subject table: the subject's columns come first in its sequence and
    condition its rows; the output is both tables with matching fresh keys; given subject rows
    get histories of their own (and keep their keys)."""
    from dplm.inputs import training_keys

    events, customers = shop()
    synth = dplm.fit(events, tiny(False), schema=Schema.from_dict(SHOP_SCHEMA), subjects=customers, progress=False)
    assert synth.is_history and synth.codec.subject_schema.names == ["country", "since"]
    trained = training_keys(events, tiny(False), customers)  # ~80 % of the 60 customers, those without visits too
    assert synth.split["num_training_subjects"] == len(trained) and 40 <= len(trained) <= 56
    out = synth.sample(10, seed=1, progress=False)
    assert isinstance(out, Histories) and list(out.subjects.columns) == ["cid", "country", "since"]
    assert list(out.subjects["cid"]) == list(range(1, 11)) and set(out.events["cid"]) <= set(range(1, 11))
    assert list(out.events.columns) == ["cid", "day", "spend"]
    for _, rows in out.events.groupby("cid"):
        assert rows["day"].is_monotonic_increasing and len(rows) <= synth.codec.max_rows
    run = synth.save(tmp_path / "run", synthetic=out)
    assert (run / "synthetic.csv").exists() and (run / "synthetic_subjects.csv").exists()
    layout = json.loads((run / "history.json").read_text())
    assert layout["subject_columns"] == ["country", "since"] and layout["order_by"] == "day"
    assert layout["min_rows"] == 0 and layout["max_rows"] == 5  # the longest training history
    counts = np.array(layout["subject_counts"])  # without DP the exact counts per rows and span (no visits: first bin)
    assert counts.shape == (len(LENGTH_EDGES) - 1, len(SPAN_SHARES) + 2) and counts.sum() == 48
    # and the deciles of each event number column's sum per customer (not the ordering column's)
    assert list(layout["subject_sums"]) == ["spend"] and sum(layout["subject_sums"]["spend"]["counts"]) == 48
    again = dplm.load(run).sample(10, seed=1, progress=False)
    pd.testing.assert_frame_equal(out.events, again.events)
    given = pd.DataFrame({"cid": ["a", "b", "c"], "country": ["fr", "fr", "de"], "since": [2001, 2002, 2003]})
    completed = synth.sample(given=given, progress=False)
    assert completed.subjects.drop(columns="cid").to_dict("list") == {"country": ["fr", "fr", "de"],
                                                                       "since": [2001, 2002, 2003]}
    assert list(completed.subjects["cid"]) == ["a", "b", "c"] and set(completed.events["cid"]) <= {"a", "b", "c"}


def test_subject_columns_of_the_event_table(tmp_path):
    events, customers = shop()
    joined = events.merge(customers, on="cid")
    synth = dplm.fit(joined, tiny(False, subject_columns=["country", "since"]), schema=Schema.from_dict(SHOP_SCHEMA),
                     progress=False)
    assert synth.codec.subject_schema.names == ["country", "since"]
    joined.loc[0, "country"] = "de" if joined.loc[0, "country"] == "fr" else "fr"
    with pytest.raises(dplm.DplmError, match="column 'country' is declared a subject column but subject"):
        dplm.fit(joined, tiny(False, subject_columns=["country"]), schema=Schema.from_dict(SHOP_SCHEMA), progress=False)


@pytest.mark.parametrize("change,message", [
    (lambda e, c: (e, c[c["cid"] != e["cid"].iloc[0]]), "of the event table is not in the subject table"),
    (lambda e, c: (e, pd.concat([c, c.head(1)])), "holds subject '100' more than once"),
    (lambda e, c: (e.assign(day=e["day"].astype(object).where(e.index != 3, None)), c),
     "data.order_by column 'day' has missing values"),
    (lambda e, c: (e.assign(day=e["day"].astype(str).where(e.index != 3, "someday")), c), "'someday' is not a date"),
])
def test_bad_history_input_is_one_line(change, message):
    events, customers = shop()
    events, customers = change(events, customers)
    with pytest.raises(dplm.DplmError, match=message):
        dplm.fit(events, tiny(False), schema=Schema.from_dict(SHOP_SCHEMA), subjects=customers, progress=False)


def test_dp_per_subject_histories(cdnow, tmp_path, monkeypatch):
    """Under DP one subject's whole history is one unit: Poisson sampling over subjects, one
    clipped sequence each; the history cap is a DP estimate counted in epsilon, longer
    histories are cut and counted; plan() says what the run reports."""
    import dplm.stages
    from test_privacy import independent_epsilon

    config = tiny(True, schema=str(CDNOW_SCHEMA))
    config.data.subject, config.data.order_by = "users_id", "date"
    config.privacy.noise_multiplier, config.privacy.statistics_share, config.privacy.accountant = 1.5, 0.0, "rdp"
    config.privacy.max_epsilon = None
    synth = dplm.fit(cdnow, config, progress=False)
    record = synth.privacy_record
    subjects = record["num_training_units"]  # the DP count of the subjects
    assert abs(subjects - len(set(cdnow["users_id"].iloc[synth.split["train"]]))) < 200
    assert record["privacy_unit"] == "subject (column 'users_id')" and record["sample_rate"] == pytest.approx(8 / subjects)
    assert record["metadata_estimated_under_dp"] == {"(rows per subject)": ["max_history"], "(training units)": ["count"]}
    assert record["epsilon"] == pytest.approx(0.25 + independent_epsilon(1.5, 8 / subjects, 3, 1e-5), rel=1e-4)
    lengths = cdnow.iloc[synth.split["train"]].groupby("users_id").size()
    assert synth.values_cut["histories cut at data.max_history"] == int((lengths > synth.codec.max_rows).sum()) > 0
    # The plan sees the exact count: with the run's count exact too, the two agree exactly.
    monkeypatch.setattr(dplm.stages, "dp_count", lambda count, epsilon, rng: count)
    record = dplm.fit(cdnow, config, progress=False).privacy_record
    planned = dplm.plan(config, cdnow)
    assert planned["epsilon"] == pytest.approx(record["epsilon"], rel=1e-9)
    assert planned["units"] == record["num_training_units"] == synth.split["num_training_subjects"]


def test_resumed_dp_histories_keep_their_cap_and_counts(cdnow, tmp_path, monkeypatch):
    """A resumed DP run of histories trains with the cap and rows-per-subject counts its
    checkpoint was drawn with (nothing drawn or charged twice); sampling follows the counts."""
    import dplm.stages
    from dplm.train import Checkpoints

    config = tiny(True, schema=str(CDNOW_SCHEMA))
    config.data.subject, config.data.order_by = "users_id", "date"
    config.privacy.noise_multiplier, config.privacy.statistics_share, config.privacy.max_epsilon = 1.5, 0.0, None
    config.train.max_steps = 2
    with monkeypatch.context() as m:  # as if killed after its last checkpoint: the checkpoint stays
        m.setattr(dplm.stages.shutil, "rmtree", lambda *a, **k: None)
        first = dplm.fit(cdnow, config, progress=False, checkpoints=Checkpoints(tmp_path / "ck", every=1))
    config.train.max_steps = 4
    resumed = dplm.fit(cdnow, config, progress=False, checkpoints=Checkpoints(tmp_path / "ck", every=1, resume=True))
    assert resumed.training.resumed_from_step == 2 and resumed.training.steps == 4
    assert resumed.codec.max_rows == first.codec.max_rows and resumed.bounds == first.bounds
    assert resumed.privacy_record["metadata_epsilon"] == pytest.approx(0.25)  # the cap and the count
    assert resumed.privacy_record["num_training_units"] == first.privacy_record["num_training_units"]  # not drawn again
    lengths = cdnow.iloc[first.split["train"]].groupby("users_id").size().to_numpy()
    assert np.shape(first.bounds.subject_counts) == (len(LENGTH_EDGES) - 1, 1) and first.bounds.subject_sums is None  # under DP
    assert np.array(first.bounds.subject_counts)[:, 0].tolist() != length_counts(lengths).tolist()  # rows alone, noisy
    out = resumed.sample(20, seed=0, progress=False)
    assert len(out) == 20 and resumed.last_sample_stats.rows_kept == 20
    # histories' default calibration 4: four times the subjects drawn (twice that where lengths are held)
    assert resumed.last_sample_stats.rows_returned in (80, 160)


def test_history_report_and_audit(tmp_path):
    """`dplm report` scores histories beside the holdout subjects, `dplm audit` attacks whole subjects."""
    from dplm.audit import audit_run
    from dplm.report import report_run

    events, customers = shop(120)
    joined = events.merge(customers, on="cid")
    joined.to_csv(tmp_path / "shop.csv", index=False)
    config = tiny(False, subject_columns=["country", "since"], source=str(tmp_path / "shop.csv"))
    config.audit.canaries, config.audit.canary_repeats = 2, 2
    synth = dplm.fit(config=config, schema=Schema.from_dict(SHOP_SCHEMA), progress=False)
    run = synth.save(tmp_path / "run", synthetic=synth.sample(30, progress=False))
    _, report = report_run(run, out_dir=tmp_path / "report", progress=False)
    h = json.loads(report.read_text())["histories"]
    split = json.loads((run / "split.json").read_text())  # the subjects: customers with a visit (no subject table)
    visitors = {name: joined["cid"].iloc[split[name]].nunique() for name in ("train", "holdout")}
    assert h["subjects"] == {"training": visitors["train"], "holdout": visitors["holdout"], "synthetic": 30}
    assert visitors["train"] + visitors["holdout"] == events["cid"].nunique() and visitors["holdout"] >= 12
    hol = h["holdout"]
    # 24 holdout subjects of the same generator against 30 from an untrained random model
    assert 0.7 < hol["flat"]["univariate"] <= 1 and 0 <= h["synthetic"]["overall"] < hol["overall"] - 0.1
    assert set(hol["per_subject"]) == {"rows", "spend per subject", "spend mean", "day span"}
    assert set(hol["coherence_per_column"]) == {"day", "spend"} and hol["copied_subject_share"] == 0.0
    assert "Histories" in (tmp_path / "report" / "report.html").read_text()
    audit = audit_run(run, num_records=20, num_references=20)
    assert audit["unit"] == "subject" and audit["membership_inference"]["members"] == 20
    assert audit["canaries"]["count"] == 2


def test_subject_texts_keep_subjects_with_missing_values():
    from dplm.evaluate_histories import subject_texts

    subjects = pd.DataFrame({"id": [1, 2], "country": pd.Series(["uk", None], dtype="string")})
    events = pd.DataFrame({"id": [1, 1, 2], "_index": [0, 1, 0], "team": pd.Series(["a", None, "b"], dtype="string"),
                           "hr": pd.Series([3, 4, None], dtype="Int64")})
    texts = subject_texts(Histories(subjects, events), events, "id", ["team", "hr"])
    assert texts.to_dict() == {1: "uk | a, 3; <NA>, 4", 2: "<NA> | b, <NA>"}


def test_one_more_subject_moves_one_length_count_and_the_noise_is_laplace_at_epsilon():
    """The history cap's histogram on neighbouring tables: one more subject changes one bin by
    one (sensitivity 1), so Laplace noise of scale 1 / epsilon makes it epsilon-DP; it is
    released as integers."""
    from test_privacy import Recorder

    lengths = np.r_[np.ones(900, dtype=int), np.full(95, 5), np.full(5, 40)]
    grown = np.r_[lengths, 17]
    assert np.abs(length_counts(grown) - length_counts(lengths)).sum() == 1
    recorder = Recorder(np.random.default_rng(0))
    _, noisy = dp_history_length(lengths, 0.3, recorder)
    assert recorder.scales == [1 / 0.3] and noisy.dtype.kind == "i"


def panel(num: int = 40, seed: int = 0) -> pd.DataFrame:
    """Persons seen once a year: age grows by one a year, school never changes, wage varies."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(num):
        start, age, school = int(rng.integers(1980, 1985)), int(rng.integers(20, 40)), int(rng.integers(8, 17))
        for k in range(int(rng.integers(2, 6))):
            rows.append({"pid": pid, "year": start + k, "age": age + k, "school": school,
                         "wage": round(float(rng.normal(2.0, 0.5)), 2)})
    return pd.DataFrame(rows)


PANEL_SCHEMA = {"columns": {
    "year": {"kind": "integer", "min": 1980, "max": 1990}, "age": {"kind": "integer", "min": 18, "max": 60},
    "school": {"kind": "integer", "min": 6, "max": 18}, "wage": {"kind": "float", "min": 0, "max": 5, "precision": 2}},
    "rules": [{"step": {"column": "age", "per": "year", "size": 1}}, {"constant": ["school"]}]}


def panel_config(**data) -> RunConfig:
    config = tiny(False, subject="pid", order_by="year", **data)
    config.sample.calibration = 1
    return config


def test_rules_within_a_history_are_written_once_and_kept(tokenizer, tmp_path):
    """A column that grows by a fixed step per year and a column constant within a person are
    written in the first row only (fewer tokens) and derived in the later ones: every history
    sampled from a random model keeps both, and the run saves, loads and reports them."""
    from dplm.report import report_run

    schema = Schema.from_dict(PANEL_SCHEMA)
    events = Schema([schema[n] for n in ("year", "age", "school", "wage")])
    ruled = HistoryCodec(None, events, tokenizer, True, "year", max_rows=6, rules=schema.rules)
    plain = HistoryCodec(None, events, tokenizer, True, "year", max_rows=6)
    assert ruled.derived.keys() == {"age", "school"}
    assert [f.col.name for f in ruled.later_rows] == ["year+", "wage"]
    person = pd.DataFrame({"year": [1981, 1982, 1985], "age": [30, 31, 34], "school": [12, 12, 12],
                           "wage": [1.5, 2.25, 3.0]})
    ids = ruled.encode({}, person)
    assert len(plain.encode({}, person)) - len(ids) == 2 * 2  # age and school (one value token each) in rows 2 and 3
    assert pd.DataFrame(ruled.decode(ids)[1]).astype(person.dtypes.to_dict()).equals(person)

    table = panel()
    table.to_csv(tmp_path / "panel.csv", index=False)
    config = panel_config(source=str(tmp_path / "panel.csv"))
    synth = dplm.fit(config=config, schema=Schema.from_dict(PANEL_SCHEMA), progress=False)
    out = synth.sample(40, seed=2, progress=False)
    assert list(out.events.columns) == ["pid", "year", "age", "school", "wage"] and len(out.events) > 40
    for _, rows in out.events.groupby("pid"):
        assert (rows["age"] - rows["year"]).nunique() == 1 and rows["school"].nunique() == 1
        assert rows["age"].between(18, 60).all()
    run = synth.save(tmp_path / "run", synthetic=out)
    again = dplm.load(run).sample(40, seed=2, progress=False)
    pd.testing.assert_frame_equal(out.events, again.events)
    _, report = report_run(run, out_dir=tmp_path / "report", progress=False)
    declared = json.loads(report.read_text())["declared_rules"]
    assert declared["unit"] == "subjects" and declared["rules"] == [
        "age grows by 1 per 1 of year", "school constant within a subject"]
    assert declared["synthetic"]["per_rule"] == [1.0, 1.0] and declared["holdout"]["all_rules"] == 1.0


@pytest.mark.parametrize("change,message", [
    (lambda t, s: (t.assign(age=t["age"].where(t.index != 1, 55)), s),
     r"a training subject's rows break the schema rule 'age grows by 1 per 1 of year' \({'age': \[\d+, 55"),
    (lambda t, s: (t, {**s, "rules": [{"step": {"column": "year", "per": "age"}}]}), "'year' orders the rows"),
    (lambda t, s: (t, {**s, "rules": [{"step": {"column": "age", "per": "year"}}, {"constant": ["age"]}]}),
     "'age' is already determined by 'age grows by 1 per 1 of year'"),
    (lambda t, s: (t, {**s, "rules": [{"exclusive": ["age", "wage"]}]}), "not yet in histories"),
    (lambda t, s: (t, {**s, "rules": [{"step": {"column": "age", "per": "school", "size": 0}}]}),
     "give column, per and size \\(a non-zero number\\)"),
])
def test_bad_rules_within_a_history_are_one_line(change, message):
    table, spec = change(panel(), PANEL_SCHEMA)
    with pytest.raises(dplm.DplmError, match=message):
        dplm.fit(table, panel_config(), schema=Schema.from_dict(spec), progress=False)


def test_rules_within_a_history_need_histories():
    with pytest.raises(dplm.DplmError, match="holds within a subject's history: train histories"):
        dplm.fit(panel().drop(columns="pid"), from_dict(RunConfig, {"model": {"base": "tiny-random"}}),
                 schema=Schema.from_dict(PANEL_SCHEMA), progress=False)


def test_plan_suggests_the_rules_within_histories_the_rows_show(tmp_path):
    """Without DP `dplm plan` lists the columns constant within every person and those growing by
    one a year, as `rules:` entries, leaving out what the schema declares."""
    from dplm.synthesizer import plan

    spec = {"columns": PANEL_SCHEMA["columns"]}
    found = plan(panel_config(), panel(), Schema.from_dict(spec))["suggested_rules"]
    assert {"constant": ["school"]} in found and {"step": {"column": "age", "per": "year", "size": 1}} in found
    assert not any("wage" in str(rule) for rule in found)
    declared = plan(panel_config(), panel(), Schema.from_dict(PANEL_SCHEMA))["suggested_rules"]
    assert not any("school" in str(rule) or "age" in str(rule) for rule in declared)


def test_integer_columns_write_changes_where_the_rows_make_them_cheaper():
    """With `model.change_tokens`, without DP an integer column writes "same" / a change / a
    fresh value in later rows where that holds less entropy over the training subjects than its
    values (age growing by one a year, schooling constant), not for a count drawn anew each row;
    under DP every integer column does (choosing would read the rows); off by default."""
    table = panel().assign(visits=lambda t: np.random.default_rng(1).integers(0, 10, len(t)))
    spec = {"columns": {**PANEL_SCHEMA["columns"], "visits": {"kind": "integer", "min": 0, "max": 9}}}
    schema = Schema.from_dict(spec)
    units = TrainingHistories.of(table, None, "pid", "year")
    config = panel_config()
    assert units.bound(config, MetadataSpend(), schema)[1].change_columns == []  # off by default
    config.model.change_tokens = True
    assert units.bound(config, MetadataSpend(), schema)[1].change_columns == ["age", "school"]
    config.privacy.enabled, config.data.max_history = True, 8  # under DP: every integer column but the order
    assert units.bound(config, MetadataSpend(), schema)[1].change_columns == ["age", "school", "visits"]
