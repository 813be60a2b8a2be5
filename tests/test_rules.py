import numpy as np
import pandas as pd
import pytest
import torch

from dplm import model as models
from dplm.errors import DplmError
from dplm.rules import broken, kept, kept_shares, learn_mappings, suggested
from dplm.sample import CompiledGrammar, LazyGrammar, generate_sequences, sample_rows
from dplm.schema import Schema, random_records, value_fits
from dplm.serialize import ConstrainedRowCodec, RowCodec, row_codec

COLUMNS = {
    "level": {"kind": "categorical", "categories": ["low", "mid", "high"]},
    "code": {"kind": "integer", "min": 1, "max": 3},
    "gain": {"kind": "integer", "min": 0, "max": 9},
    "loss": {"kind": "float", "min": 0, "max": 90, "precision": 1, "nullable": True},
    "start": {"kind": "datetime", "min": "2020-01-01", "max": "2020-03-31"},
    "end": {"kind": "datetime", "min": "2020-01-01", "max": "2020-03-31", "nullable": True},
    "hours": {"kind": "integer", "min": 0, "max": 99},
    "sex": {"kind": "categorical", "categories": ["Male", "Female"]},
    "role": {"kind": "categorical", "categories": ["Husband", "Wife", "Child"]},
}
RULES = [
    {"mapping": {"from": "level", "to": "code", "values": {"low": 1, "mid": 2, "high": 3}}},
    {"exclusive": ["gain", "loss"]},
    {"inequality": ["end", ">=", "start"]},
    {"inequality": ["hours", "<=", 60]},
    {"combinations": {"columns": ["role", "sex"], "values": [["Husband", "Male"], ["Wife", "Female"],
                                                             ["Child", "Male"], ["Child", "Female"]]}},
]
SCHEMA = Schema.from_dict({"columns": COLUMNS, "rules": RULES})


def random_model(tokenizer, codec=None):
    model = models.load_base_model("tiny-random", len(tokenizer)).eval()
    if codec is not None and codec.value_tokens:
        models.init_value_embeddings(model, codec.value_token_texts())
        models.restrict_output_vocab(model, codec.output_token_ids())
    return model


def test_rules_parse_round_trip_and_name_what_is_wrong():
    assert Schema.from_dict(SCHEMA.to_dict()).to_dict() == SCHEMA.to_dict()
    assert [r.describe() for r in SCHEMA.rules] == [
        "code determined by level", "gain and loss never both non-zero", "end >= start", "hours <= 60",
        "combinations of role, sex"]
    for rules, message in [
        ([{"exclusive": ["gain", "nope"]}], "column 'nope' is not in the schema"),
        ([{"implies": ["gain", "loss"]}], "give one of mapping"),
        ([{"inequality": ["end", "=>", "start"]}], "the operator one of"),
        ([{"inequality": ["hours", ">=", "start"]}], "compares number or date columns of one kind"),
        ([{"exclusive": ["level", "gain"]}], "exclusive columns are numbers"),
        ([{"mapping": {"from": "level", "to": "code", "values": {"low": 7}}}], r"7 \(for 'low'\) does not fit column 'code'"),
        ([{"combinations": {"columns": ["role", "sex"], "values": [["Husband", "Man"]]}}], "'Man' is not a category"),
        ([RULES[0], {"exclusive": ["code", "gain"]}], "a column another rule determines takes no other rule"),
        ({"exclusive": ["gain", "loss"]}, "expected a list of rules"),
    ]:
        with pytest.raises(DplmError, match=message):
            Schema.from_dict({"columns": COLUMNS, "rules": rules})


def test_a_determined_column_is_not_modelled_and_is_derived_after():
    modelled = SCHEMA.modelled()
    assert "code" not in modelled.names and len(modelled.names) == len(SCHEMA.names) - 1
    assert [r.kind for r in modelled.rules] == ["exclusive", "inequality", "inequality", "combinations"]
    rows = pd.DataFrame({"level": ["mid", "high", None]})
    assert SCHEMA.derive(rows.reindex(columns=modelled.names))["code"].tolist()[:2] == [2, 3]
    assert list(SCHEMA.derive(rows.reindex(columns=modelled.names)).columns) == SCHEMA.names


def test_kept_counts_each_kind_and_a_missing_value_keeps_every_rule():
    rows = pd.DataFrame({"level": ["low", "mid", "high", None], "code": [1, 3, 3, 2], "gain": [0, 5, 5, 0],
                         "loss": [1.5, 0.0, 2.0, None],
                         "start": pd.to_datetime(["2020-01-02", "2020-01-05", "2020-02-01", "2020-02-01"]),
                         "end": pd.to_datetime(["2020-01-02", "2020-01-04", None, "2020-03-01"]),
                         "hours": [60, 61, 10, 0], "sex": ["Male", "Female", "Male", "Female"],
                         "role": ["Husband", "Husband", "Child", "Wife"]})
    expected = [[True, False, True, True], [True, True, False, True], [True, False, True, True],
                [True, False, True, True], [True, False, True, True]]
    assert [kept(r, rows).tolist() for r in SCHEMA.rules] == expected
    assert broken(SCHEMA.rules, rows)[1] == 1
    shares = kept_shares(SCHEMA.rules, rows, rows.iloc[[0, 3]])
    assert shares["synthetic"] == {"per_rule": [1.0] * 5, "all_rules": 1.0}
    assert shares["holdout"]["per_rule"] == [0.75, 0.75, 0.75, 0.75, 0.75] and shares["holdout"]["all_rules"] == 0.5


@pytest.mark.parametrize("value_tokens", [False, True])
def test_a_random_model_writes_only_rows_that_keep_every_declared_rule(tokenizer, value_tokens):
    """Only the grammar can keep the rules here: an untrained model's draws keep them by chance
    in few rows (gain and loss both non-zero in most, end before start in about half)."""
    from dplm.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m") if value_tokens else tokenizer
    codec = row_codec(SCHEMA, tokenizer, value_tokens)
    assert isinstance(codec, ConstrainedRowCodec) and "code" not in codec.schema.names
    model = random_model(tokenizer, codec)
    token_ids = codec.output_token_ids() if value_tokens else list(range(len(tokenizer)))
    compiles = CompiledGrammar.build(codec, token_ids, torch.device("cpu")) is not None
    plain = RowCodec(SCHEMA.modelled(), tokenizer, value_tokens)
    assert compiles == (CompiledGrammar.build(plain, token_ids, torch.device("cpu")) is not None)  # as fast as without
    assert compiles or not value_tokens  # (digits over the whole vocabulary: neither compiles, both walk lazily)
    df, stats = sample_rows(model, codec, 120, batch_size=40, temperature=1.5, seed=2, progress=False)
    assert stats.valid_rate == 1.0
    rows = SCHEMA.derive(df)
    for rule in SCHEMA.rules:
        assert kept(rule, rows).all(), rule.describe()
    for col in SCHEMA.columns:
        assert all(value_fits(col, None if pd.isna(v) else v) for v in rows[col.name]), col.name
    unconstrained, _ = sample_rows(random_model(tokenizer, codec), plain, 120, batch_size=40, temperature=1.5, seed=2,
                                   progress=False)
    assert not kept(SCHEMA.rules[1], unconstrained).all()  # the same model without the rules breaks them
    assert rows["gain"].gt(0).any() and rows["loss"].gt(0).any()  # each side still drawn


def test_the_compiled_and_lazy_grammars_draw_the_same_constrained_rows():
    from dplm.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    codec = row_codec(SCHEMA, tokenizer, True)
    model, token_ids = random_model(tokenizer, codec), codec.output_token_ids()
    grammars = (LazyGrammar(codec, token_ids, torch.device("cpu")),
                CompiledGrammar.build(codec, token_ids, torch.device("cpu")))
    runs = [generate_sequences(model, g, 16, 1.5, torch.Generator().manual_seed(5), torch.device("cpu"))
            for g in grammars]
    assert runs[0] == runs[1]


def test_given_values_that_break_a_rule_are_refused_and_a_determined_column_gives_its_source():
    given = SCHEMA.given_for_model(pd.DataFrame({"code": [3, 1], "gain": [5, 0]}))
    assert list(given.columns) == ["gain", "level"] and given["level"].tolist() == ["high", "low"]
    with pytest.raises(DplmError, match="given row 1 breaks the schema rule 'gain and loss never both non-zero'"):
        SCHEMA.given_for_model(pd.DataFrame({"gain": [0, 5], "loss": [1.0, 1.0]}))
    with pytest.raises(DplmError, match="given row 0 breaks the schema rule 'code determined by level'"):
        SCHEMA.given_for_model(pd.DataFrame({"level": ["low"], "code": [2]}))
    two = Schema.from_dict({"columns": COLUMNS, "rules": [
        {"mapping": {"from": "level", "to": "code", "values": {"low": 1, "mid": 1, "high": 3}}}]})
    with pytest.raises(DplmError, match="given column 'code', row 0: 1 is what 2 values of 'level' map to"):
        two.given_for_model(pd.DataFrame({"code": [1]}))


def test_random_records_keep_the_rules():
    records = random_records(SCHEMA, 200, np.random.default_rng(0))
    assert len(records) == 200 and list(records.columns) == SCHEMA.names
    for rule in SCHEMA.rules:
        assert kept(rule, records).all(), rule.describe()


def test_one_to_one_pairs_are_learned_without_dp_and_refused_under_dp():
    schema = Schema.from_dict({"columns": COLUMNS, "rules": [{"one_to_one": ["level", "code"]}]})
    rows = pd.DataFrame({"level": ["low", "mid", "mid", "high"], "code": [1, 2, 2, 3]})
    learn_mappings(schema.rules, rows)
    assert schema.rules[0].values == {"low": 1, "mid": 2, "high": 3}
    assert Schema.from_dict(schema.to_dict()).rules[0].values == {"low": 1, "mid": 2, "high": 3}  # saved with its pairs
    with pytest.raises(DplmError, match=r"one_to_one \[level, code\]: under DP its pairs cannot be read off the data"):
        learn_mappings(Schema.from_dict({"columns": COLUMNS, "rules": [{"one_to_one": ["level", "code"]}]}).rules, None)


def test_suggestions_are_the_found_rules_not_declared():
    found = {"one_to_one": [{"columns": ["level", "code"], "pairs": [["low", 1], ["mid", 2]]},
                            {"columns": ["hours", "code"], "pairs": [["0 ... 9", 1]]}],
             "mutually_exclusive": [["gain", "loss"], ["hours", "gain"]]}
    assert suggested(found, SCHEMA.rules) == [{"exclusive": ["hours", "gain"]}]
    assert suggested(found, []) == [{"mapping": {"from": "level", "to": "code", "values": {"low": 1, "mid": 2}}},
                                    {"exclusive": ["gain", "loss"]}, {"exclusive": ["hours", "gain"]}]
