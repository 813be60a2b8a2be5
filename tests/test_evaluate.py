import numpy as np
import pandas as pd
import pytest

from conftest import shared_file
from dplm.errors import DplmError
from dplm.evaluate import (
    accuracy, check_inputs, discriminator_auc, embed, evaluate, privacy_scores, record_texts, text_scores, utility,
)


@pytest.fixture(scope="module")
def parts(census):
    """Three disjoint real samples: training, holdout, and fresh rows standing in as synthetic."""
    order = np.random.default_rng(0).permutation(len(census))
    return census.iloc[order[:6000]], census.iloc[order[6000:8000]], census.iloc[order[8000:10000]]


def shuffled(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({c: df[c].to_numpy()[rng.permutation(len(df))] for c in df.columns})


def test_accuracy_is_one_for_identical_data(parts):
    train = parts[0]
    acc = accuracy(train, train.copy())
    assert acc["overall"] == acc["univariate"] == acc["bivariate"] == acc["trivariate"] == 1.0
    assert acc["triples_scored"] == 100


def test_shuffled_columns_score_clearly_lower(parts):
    train, holdout, fresh = parts
    real = accuracy(train, fresh)
    fake = accuracy(train, shuffled(fresh))
    assert real["overall"] > 0.95
    assert fake["univariate"] == pytest.approx(real["univariate"])  # shuffling keeps each column
    assert fake["bivariate"] < real["bivariate"] - 0.04
    assert fake["overall"] < real["overall"] - 0.04


def test_holdout_accuracy_is_measured_at_the_synthetic_rows_count(parts):
    # 300 fresh real rows stand in as synthetic: the holdout's yardstick, at 300 rows too, scores
    # about as they do, below what all 2,000 holdout rows score (fewer rows, noisier marginals).
    train, holdout, fresh = parts
    scores = evaluate(train, holdout, fresh.iloc[:300], embed_sample=100)["accuracy"]
    whole = accuracy(train, holdout)["overall"]
    assert abs(scores["holdout"]["overall"] - scores["synthetic"]["overall"]) < 0.02
    assert scores["holdout"]["overall"] < whole - 0.02
    assert scores["shuffled"]["overall"] < scores["holdout"]["overall"] - 0.02


def test_discriminator_auc(parts):
    train, _, fresh = parts
    a = embed(record_texts(train.iloc[:1000]))
    b = embed(record_texts(fresh.iloc[:1000]))
    c = embed(record_texts(shuffled(fresh).iloc[:400]))  # the two clear cases need fewer records
    other_table = embed(record_texts(pd.read_csv(shared_file("london.csv.gz"), nrows=300)))
    assert a.shape == (1000, 384)
    assert abs(discriminator_auc(a, b) - 0.5) < 0.05
    assert discriminator_auc(a, c) > 0.65
    assert discriminator_auc(a, other_table) > 0.99


def test_dcr_share_near_half_for_fresh_real_rows(parts):
    train, holdout, fresh = parts
    scores = privacy_scores(train, holdout, fresh)
    assert abs(scores["synthetic"]["dcr_share"] - 0.5) < 0.05
    assert abs(scores["holdout"]["dcr_share"] - 0.5) < 0.05
    copied = privacy_scores(train, holdout, train.iloc[:500])
    assert copied["synthetic"]["exact_copies_of_training_rows"] == 500
    assert copied["synthetic"]["identical_match_share"] == 1.0
    assert copied["synthetic"]["dcr_share"] > 0.6  # copies sit in a third of the equal-size training sample


def test_tstr_on_real_rows_matches_trtr(parts):
    train, holdout, _ = parts
    result = utility(train, holdout, train, "income")
    assert result["tstr"] == result["trtr"]
    assert 0.8 < result["trtr"]["accuracy"] and 0.85 < result["trtr"]["roc_auc"]
    regression = utility(train, holdout, train, "age")
    assert regression["tstr"] == regression["trtr"] and regression["trtr"]["r2"] > 0.3


def test_bad_input(parts):
    train, holdout, fresh = parts
    with pytest.raises(DplmError, match="synthetic columns differ .*missing \\['age'\\]"):
        check_inputs(train, holdout, fresh.drop(columns="age"))
    with pytest.raises(DplmError, match="synthetic rows are empty"):
        check_inputs(train, holdout, fresh.iloc[:0])
    with pytest.raises(DplmError, match="target column 'salary' is not in the table"):
        check_inputs(train, holdout, fresh, target="salary")


@pytest.mark.parametrize("name,target", [("london.csv.gz", "room_type"), ("cdnow_purchases.csv.gz", "amt")])
def test_text_and_date_tables(name, target):
    table = pd.read_csv(shared_file(name)).sample(2000, random_state=0)
    if "date" in table:
        table["date"] = pd.to_datetime(table["date"])
    train, holdout, fresh = table.iloc[:1200], table.iloc[1200:1600], table.iloc[1600:]
    metrics = evaluate(train, holdout, fresh, target=target, embed_sample=150)
    assert 0.5 < metrics["accuracy"]["synthetic"]["overall"] <= 1
    assert metrics["embedding"]["records_per_set"] == 150
    assert 0 <= metrics["privacy"]["synthetic"]["dcr_share"] <= 1
    assert set(metrics["utility"]) >= {"tstr", "trtr"}


def test_text_section_scores_real_titles_as_real_and_shuffled_titles_as_uninformative():
    """Real unseen titles score like the reference (AUC near 0.5, room_type predictable from the
    title, few verbatim copies); titles shuffled across rows keep their look but lose their
    link to room_type."""
    table = pd.read_csv(shared_file("london.csv.gz")).sample(3000, random_state=0)[
        ["room_type", "neighbourhood", "price", "title"]]
    train, holdout, fresh = table.iloc[:1500], table.iloc[1500:2250], table.iloc[2250:]
    shuffled = fresh.assign(title=fresh["title"].sample(frac=1, random_state=1).to_numpy())
    fresh_t = evaluate(train, holdout, fresh, embed_sample=300, text_columns=["title"],
                       categorical=["room_type", "neighbourhood"])["text"]["title"]
    assert fresh_t["context"] == "room_type" and fresh_t["texts_scored"] == 300
    # The other sets score the text section alone (the record-level scores are tested above).
    shuffled_t = text_scores(train, holdout, shuffled, "title", "room_type", 300)
    assert fresh_t["synthetic"]["discriminator_auc"] < 0.6 and fresh_t["holdout"]["discriminator_auc"] < 0.6
    assert fresh_t["synthetic"]["context_accuracy"] > fresh_t["context_majority_share"] + 0.15
    assert shuffled_t["synthetic"]["context_accuracy"] < fresh_t["synthetic"]["context_accuracy"] - 0.15
    assert fresh_t["synthetic"]["length_accuracy"] > 0.9
    assert fresh_t["synthetic"]["verbatim_training_share"] < 0.1
    copies = text_scores(train, holdout, train.iloc[:750], "title", "room_type", 150)
    assert copies["synthetic"]["verbatim_training_share"] == 1.0
    assert copies["synthetic"]["nearest_training_distance_median"] < copies["holdout"]["nearest_training_distance_median"]


def test_rules_of_the_training_rows():
    """One-to-one pairs and mutually exclusive numbers are found in the training rows, and each
    row of another set is checked against them."""
    from dplm.evaluate import find_rules, rule_kept, rule_scores, shuffled_columns

    rng = np.random.default_rng(0)
    n = 2000
    level = rng.choice(["low", "mid", "high"], n)
    gain = np.where(rng.random(n) < 0.3, rng.integers(1, 100, n), 0)
    loss = np.where((gain == 0) & (rng.random(n) < 0.3), rng.integers(1, 100, n), 0)
    train = pd.DataFrame({"level": level, "rank": pd.Series(level).map({"low": 1, "mid": 2, "high": 3}),
                          "noise": rng.integers(0, 5, n), "gain": gain, "loss": loss})
    rules = find_rules(train)
    assert [(r["kind"], r["columns"]) for r in rules] == [("one_to_one", ["level", "rank"]),
                                                          ("mutually_exclusive", ["gain", "loss"])]
    other = pd.DataFrame({"level": ["low", "low", "mid"], "rank": [1, 2, 2], "noise": [0, 0, 0],
                          "gain": [5, 0, 3], "loss": [0, 0, 4]})
    assert rule_kept(rules[0], other).tolist() == [True, False, True]
    assert rule_kept(rules[1], other).tolist() == [True, True, False]
    scores = rule_scores(train, train, other)
    assert scores["holdout"]["all_rules"] == 1.0 and scores["synthetic"]["all_rules"] == pytest.approx(1 / 3)
    floor = shuffled_columns(train, 1000)
    assert len(floor) == 1000 and list(floor.columns) == list(train.columns)
    assert floor["level"].value_counts(normalize=True).sub(train["level"].value_counts(normalize=True)).abs().max() < 0.05
    assert not rule_kept(rules[0], floor).all()  # shuffling breaks the dependency


def test_real_floats_are_compared_at_the_schemas_precision():
    """The synthesizer writes a float at its column's precision: the real rows are read at it too,
    so their extra digits do not tell them apart."""
    from dplm.evaluate import align_types
    from dplm.schema import Schema

    schema = Schema.from_dict({"columns": {"wage": {"kind": "float", "min": -5, "max": 5, "precision": 2},
                                           "n": {"kind": "integer", "min": 0, "max": 9}}})
    out = align_types(pd.DataFrame({"wage": [1.19754, "-0.004", None], "n": [3, 4, 5]}), schema)
    assert out["wage"].tolist()[:2] == [1.2, -0.0] and np.isnan(out["wage"][2]) and out["n"].tolist() == [3, 4, 5]


def test_fluency_is_the_share_of_words_in_the_public_word_list():
    from dplm.evaluate import known_word_share, word_list

    words = word_list()
    assert {"beautiful", "flat", "london", "room"} <= words and "painking" not in words
    texts = pd.Series(["Beautiful flat in London", "Smith Painking with a Cotopipenton", "42 !!"])
    # words of two or more letters: beautiful flat in london / smith painking with cotopipenton
    assert known_word_share(texts, words) == pytest.approx(6 / 8)
    assert known_word_share(pd.Series(["42 !!"]), words) is None
