import pandas as pd
import pytest
import torch

from dplm import model as models
from dplm.sample import CompiledGrammar, LazyGrammar, generate_sequences, sample_rows
from dplm.schema import Schema, value_fits
from dplm.serialize import RowCodec

MIXED = Schema.from_dict({"columns": {
    "c": {"kind": "categorical", "categories": ["a|b", "north", "south", "no"], "nullable": True},
    "i": {"kind": "integer", "min": -5, "max": 120},
    "f": {"kind": "float", "min": 0.5, "max": 99.5, "precision": 1, "nullable": True},
    "d": {"kind": "datetime", "min": "2020-02-27", "max": "2020-03-02"},
    "t": {"kind": "text", "max_tokens": 6},
}})


def random_model(tokenizer):
    return models.load_base_model("tiny-random", len(tokenizer)).eval()


def test_untrained_model_yields_only_valid_rows(tokenizer):
    codec = RowCodec(MIXED, tokenizer)
    df, stats = sample_rows(random_model(tokenizer), codec, 40, batch_size=16, seed=1, progress=False)
    assert len(df) == 40 and list(df.columns) == MIXED.names
    assert stats.rows_generated == 40 and stats.valid_rate == 1.0
    for col in MIXED.columns:
        assert all(value_fits(col, None if pd.isna(v) else v) for v in df[col.name]), col.name
    assert df["i"].dtype == "Int64" and str(df["d"].dtype).startswith("datetime64")


def test_rows_end_within_the_grammar_bound(tokenizer):
    codec = RowCodec(MIXED, tokenizer)
    grammar = LazyGrammar(codec, list(range(len(tokenizer))), torch.device("cpu"))
    sequences = generate_sequences(random_model(tokenizer), grammar, 16, 1.5, torch.Generator().manual_seed(0),
                                   torch.device("cpu"))
    assert all(s[-1] == codec.eos_id and len(s) <= grammar.max_row_tokens() + 1 for s in sequences)


def test_seeded_sampling_is_reproducible(tokenizer, census_schema):
    codec, model = RowCodec(census_schema, tokenizer), random_model(tokenizer)
    a, _ = sample_rows(model, codec, 6, seed=7, progress=False)
    b, _ = sample_rows(model, codec, 6, seed=7, progress=False)
    c, _ = sample_rows(model, codec, 6, seed=8, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_grammar_follows_the_model(tokenizer):
    """A model that prefers one category gets it: the mask restricts, it does not choose."""
    schema = Schema.from_dict({"columns": {"c": {"kind": "categorical", "categories": ["north", "south"]}}})
    codec = RowCodec(schema, tokenizer)
    model = random_model(tokenizer)
    south = codec.fields[0].category_ids["south"][0]
    grammar = LazyGrammar(codec, list(range(len(tokenizer))), torch.device("cpu"))

    class Prefer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[..., south] += 100.0
            return out

    wrapped = Prefer(model)
    wrapped.get_base_model = lambda: model
    rows = generate_sequences(wrapped, grammar, 8, 1.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(codec.decode(r)["c"] == "south" for r in rows)


def test_restricted_head_samples_valid_rows_in_token_space(tokenizer, census_schema):
    """With the output layer cut to the schema's tokens, sampled logit positions are mapped
    back to token ids: rows decode and are valid."""
    codec = RowCodec(census_schema, tokenizer)
    model = random_model(tokenizer)
    models.restrict_output_vocab(model, codec.output_token_ids())
    assert model.get_output_embeddings().weight.shape[0] == len(codec.output_token_ids()) < 1000
    df, stats = sample_rows(model, codec, 20, batch_size=8, seed=3, progress=False)
    assert len(df) == 20 and stats.valid_rate == 1.0
    for col in census_schema.columns:
        assert all(value_fits(col, None if pd.isna(v) else v) for v in df[col.name]), col.name


def test_compiled_grammar_samples_exactly_what_the_lazy_one_does(tokenizer, census_schema):
    """Same model, same seed: the table-driven automaton draws the same rows as the Python one."""
    small = Schema.from_dict({"columns": {**{c.name: c.to_dict() for c in MIXED.columns},
                                          "f": {"kind": "float", "min": 0.5, "max": 9.5, "precision": 1}}})
    for schema in (small, census_schema):
        codec = RowCodec(schema, tokenizer)
        model = random_model(tokenizer)
        models.restrict_output_vocab(model, codec.output_token_ids())
        token_ids = codec.output_token_ids()
        compiled = CompiledGrammar.build(codec, token_ids, torch.device("cpu"))
        assert compiled is not None
        runs = [generate_sequences(model, g, 12, 1.3, torch.Generator().manual_seed(5), torch.device("cpu"))
                for g in (LazyGrammar(codec, token_ids, torch.device("cpu")), compiled)]
        assert runs[0] == runs[1]
        assert all(codec.decode(r) for r in runs[1])


def test_value_token_rows_are_valid_under_both_grammars(census_schema):
    """With value tokens (missing-value tokens and place tokens too) the compiled and the
    lazy automaton draw the same rows, and every row parses."""
    from dplm.model import load_tokenizer

    nullable = Schema.from_dict({"columns": {**{c.name: c.to_dict() for c in MIXED.columns},
                                             "f": {"kind": "float", "min": 0.5, "max": 9.5, "precision": 1},
                                             "i": {"kind": "integer", "min": -5, "max": 120, "nullable": True},
                                             "w": {"kind": "integer", "min": 30, "max": 5000, "nullable": True}}})
    for schema in (nullable, census_schema):
        tokenizer = load_tokenizer("smollm2-135m")
        codec = RowCodec(schema, tokenizer, value_tokens=True)
        model = random_model(tokenizer)
        models.init_value_embeddings(model, codec.value_token_texts())
        models.restrict_output_vocab(model, codec.output_token_ids())
        token_ids = codec.output_token_ids()
        compiled = CompiledGrammar.build(codec, token_ids, torch.device("cpu"))
        runs = [generate_sequences(model, g, 24, 1.5, torch.Generator().manual_seed(3), torch.device("cpu"))
                for g in (LazyGrammar(codec, token_ids, torch.device("cpu")), compiled)]
        assert runs[0] == runs[1]
        rows = [codec.decode(r) for r in runs[1]]
        for col in schema.columns:
            assert all(value_fits(col, row[col.name]) for row in rows), col.name
        if schema is nullable:  # the missing-value token is drawn too (i, w: 1 in 127 and 72 draws; see
            assert any(row["c"] is None for row in rows)  # test_place_value_grammar_draws_exactly_the_values_in_range)


def test_huge_automata_fall_back_to_the_lazy_grammar(tokenizer):
    schema = Schema.from_dict({"columns": {"x": {"kind": "float", "min": 0, "max": 1e7, "precision": 2}}})
    codec = RowCodec(schema, tokenizer)
    assert CompiledGrammar.build(codec, codec.output_token_ids(), torch.device("cpu")) is None
    df, stats = sample_rows(random_model(tokenizer), codec, 5, seed=0, progress=False)
    assert len(df) == 5 and df["x"].between(0, 1e7).all()


def test_preallocated_cache_gives_the_default_caches_logits_and_drops_rows(tokenizer):
    """Decoding with the preallocated cache, rows dropped midway included, matches transformers'
    default cache step for step."""
    from transformers import DynamicCache

    from dplm.sample import _cache_argument, preallocated_cache

    model = random_model(tokenizer)
    ids = torch.randint(0, 1000, (5, 9), generator=torch.Generator().manual_seed(0))
    ours, reference = preallocated_cache(4), DynamicCache()  # room for 4 tokens: grows twice
    name = _cache_argument(model)
    rows = torch.arange(5)
    with torch.no_grad():
        for t in range(9):
            if t == 5:  # rows 1 and 3 have ended
                rows = torch.tensor([0, 2, 4])
                ours.keep_rows(torch.tensor([0, 2, 4]))
                reference.batch_select_indices(torch.tensor([0, 2, 4]))
            a = model(input_ids=ids[rows, t:t + 1], use_cache=True, **{name: ours}).logits
            b = model(input_ids=ids[rows, t:t + 1], use_cache=True, **{name: reference}).logits
            assert torch.allclose(a, b, atol=1e-5), t
    assert ours.get_seq_length() == 9


def test_a_draw_outside_the_grammar_is_an_error_not_invalid_rows(tokenizer, census_schema, monkeypatch):
    codec = RowCodec(census_schema, tokenizer)
    grammar = CompiledGrammar.build(codec, list(range(len(tokenizer))), torch.device("cpu"))
    # A broken sampler: always logit 0 (a special token, never allowed where a row starts).
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: torch.zeros(len(probs), 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="tokens the schema's grammar forbids"):
        generate_sequences(random_model(tokenizer), grammar, 4, 1.0, torch.Generator(), torch.device("cpu"))


# ---- conditional generation ---------------------------------------------------------------

CHAIN = Schema.from_dict({"columns": {"a": {"kind": "categorical", "categories": ["x", "y", "z"]},
                                      "b": {"kind": "categorical", "categories": ["p", "q"]},
                                      "c": {"kind": "integer", "min": 0, "max": 1}}})
P_A = [0.5, 0.3, 0.2]
P_B_GIVEN_A = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]
P_C_GIVEN_B = [[0.7, 0.3], [0.1, 0.9]]


class MarkovModel(torch.nn.Module):
    """A 'language model' of CHAIN rows with known probabilities: each token's distribution
    depends on the previous token only (a -> b -> c), so p(a | b) follows by Bayes' rule. Its
    output layer scores only the rows' tokens, as a schema-restricted head does."""

    def __init__(self, codec):
        super().__init__()
        tokens = codec.output_token_ids()
        self.head = models.RestrictedHead(torch.zeros(len(codec.tokenizer), 1), tokens)
        at = {t: j for j, t in enumerate(tokens)}
        ids = {(f.col.name, v): t for f in codec.fields for v, t in f.value_ids.items()}
        self.table = torch.full((len(codec.tokenizer), len(tokens)), -1e9)  # previous token -> logits
        self.table[codec.bos_id, [at[ids["a", v]] for v in "xyz"]] = torch.tensor(P_A).log()
        for i, v in enumerate("xyz"):
            self.table[ids["a", v], [at[ids["b", "p"]], at[ids["b", "q"]]]] = torch.tensor(P_B_GIVEN_A[i]).log()
        for i, v in enumerate("pq"):
            self.table[ids["b", v], [at[ids["c", "0"]], at[ids["c", "1"]]]] = torch.tensor(P_C_GIVEN_B[i]).log()
        for v in "01":
            self.table[ids["c", v], at[codec.eos_id]] = 0.0

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids[:, -1]][:, None])


@pytest.fixture
def chain_codec():
    from dplm.model import load_tokenizer

    return RowCodec(CHAIN, load_tokenizer("smollm2-135m"), value_tokens=True)


def test_given_values_are_kept_and_the_rest_follows_the_models_conditional(chain_codec):
    """Given b = q (a column after the free a), rows are drawn from p(a | b = q) by Bayes' rule,
    not from p(a); c follows p(c | b = q)."""
    n = 3000
    given = pd.DataFrame({"b": ["q"] * n})
    df, _ = sample_rows(MarkovModel(chain_codec), chain_codec, 0, batch_size=4096, seed=0, progress=False,
                        given=given, candidates=64)
    assert len(df) == n and (df["b"] == "q").all() and list(df.columns) == CHAIN.names
    joint = [P_A[i] * P_B_GIVEN_A[i][1] for i in range(3)]
    posterior = [p / sum(joint) for p in joint]  # [0.128, 0.615, 0.256]
    share = df["a"].value_counts(normalize=True).reindex(list("xyz"), fill_value=0).tolist()
    assert share == pytest.approx(posterior, abs=0.03)
    assert (df["c"] == 1).mean() == pytest.approx(P_C_GIVEN_B[1][1], abs=0.03)
    # Forcing alone (one candidate) would leave a at its prior: the weighting is what conditions.
    forced, _ = sample_rows(MarkovModel(chain_codec), chain_codec, 0, batch_size=4096, seed=0, progress=False,
                            given=given, candidates=1)
    assert (forced["a"] == "x").mean() == pytest.approx(P_A[0], abs=0.03)


def test_a_given_prefix_needs_no_candidates_and_any_subset_works(chain_codec):
    model = MarkovModel(chain_codec)
    df, _ = sample_rows(model, chain_codec, 0, seed=1, progress=False, given=pd.DataFrame({"a": ["y"] * 2000}))
    assert (df["a"] == "y").all() and (df["b"] == "q").mean() == pytest.approx(0.8, abs=0.03)
    both = pd.DataFrame({"c": [1, 0, 1], "a": ["z", "x", "y"]})  # not in schema order
    df, _ = sample_rows(model, chain_codec, 0, seed=1, progress=False, given=both)
    assert df["a"].tolist() == ["z", "x", "y"] and df["c"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("given, message", [
    (pd.DataFrame({"b": ["p", "r"]}), r"given column 'b', row 1: 'r' is not one of its categories"),
    (pd.DataFrame({"c": [0, 2]}), r"given column 'c', row 1: 2 is not a whole number in \[0, 1\]"),
    (pd.DataFrame({"c": [0.5]}), r"given column 'c', row 0: 0.5 is not a whole number"),
    (pd.DataFrame({"a": [None]}), r"given column 'a', row 0: None is missing and the column is not nullable"),
    (pd.DataFrame({"d": [1]}), r"given column 'd' is not in the run's schema"),
])
def test_a_given_value_outside_the_schema_is_a_one_line_error(chain_codec, given, message):
    from dplm.errors import DplmError

    with pytest.raises(DplmError, match=message):
        sample_rows(MarkovModel(chain_codec), chain_codec, 0, progress=False, given=given)


def test_given_rows_under_both_grammars_and_a_real_model(tokenizer):
    """Any subset of the MIXED columns (numbers, dates, text, a nullable category) given on a
    tiny model: the given values come back exactly, the others are valid."""
    codec = RowCodec(MIXED, tokenizer)
    given = pd.DataFrame({"t": ["a|b\nc", ""], "c": [None, "a|b"], "d": ["2020-03-01", "2020-02-28"]})
    df, _ = sample_rows(random_model(tokenizer), codec, 0, batch_size=8, seed=2, progress=False, given=given,
                        candidates=4)
    assert df["t"].tolist() == ["a|b\nc", ""] and df["c"].isna().tolist() == [True, False]
    assert df["d"].tolist() == [pd.Timestamp("2020-03-01"), pd.Timestamp("2020-02-28")]
    for col in MIXED.columns:
        assert all(value_fits(col, None if pd.isna(v) else v) for v in df[col.name]), col.name


def test_any_order_masks_allow_each_rows_own_order(census_schema):
    """Rows written each in its own column order: at every position the mask allows the row's
    next token and only its current column's tokens (EOS only before EOS); in the schema's order
    the masks are the compiled grammar's."""
    import numpy as np

    from dplm.model import load_tokenizer
    from dplm.sample import grammar_masks
    from dplm.schema import coerce_table

    tokenizer = load_tokenizer("smollm2-135m")
    codec = RowCodec(census_schema, tokenizer, value_tokens=True)
    assert codec.any_order()
    token_ids = codec.output_token_ids()
    position = {t: i for i, t in enumerate(token_ids)}
    rows = coerce_table(pd.DataFrame([{c.name: (c.categories[0] if c.kind == "categorical" else c.min)
                                       for c in census_schema.columns}] * 2), census_schema)
    n = len(codec.fields)
    orders = [list(range(n)), np.random.default_rng(0).permutation(n).tolist()]
    sequences = codec.encode_table(rows, orders)
    assert sorted(sequences[0]) == sorted(sequences[1]) and sequences[0] != sequences[1]
    masks = grammar_masks(codec, token_ids, sequences, torch.device("cpu"), orders)
    owner = {t: k for k, f in enumerate(codec.fields) for t in f.token_ids()}
    allowed = masks.of([0, 1], len(sequences[0]), torch.device("cpu"))
    for r, ids in enumerate(sequences):
        for i, token in enumerate(ids[1:]):
            assert allowed[r, i, position[token]], (r, i)
            columns = {owner.get(token_ids[j], "eos") for j in allowed[r, i].nonzero().flatten().tolist()}
            assert columns == {owner.get(token, "eos")}, (r, i)
    fixed = grammar_masks(codec, token_ids, sequences[:1], torch.device("cpu"))
    assert torch.equal(fixed.of([0], len(sequences[0]), torch.device("cpu"))[0], allowed[0])


def test_calibration_defaults_to_two_for_rows_and_four_for_histories():
    from dplm.config import RunConfig, SampleConfig
    from dplm.errors import DplmError

    assert SampleConfig().draws_per_unit(False) == 2.0 and SampleConfig().draws_per_unit(True) == 4.0
    assert SampleConfig(calibration=1.0).draws_per_unit(True) == 1.0  # the user's setting wins
    config = RunConfig()
    config.sample.calibration = 0.5
    with pytest.raises(DplmError, match="sample.calibration must be >= 1"):
        config.validate()


def test_nucleus_keeps_the_most_likely_tokens_up_to_top_p():
    from dplm.sample import nucleus

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.0, 0.9, 0.1, 0.0]])
    assert torch.allclose(nucleus(probs, 0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(nucleus(probs, 1.0), probs)  # everything allowed stays (forbidden tokens keep 0)
    assert torch.allclose(nucleus(probs, 0.1), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))


def test_nucleus_over_a_whole_vocabulary_ranks_the_candidates_or_sorts_all():
    """Where the most likely candidates hold top_p (a peaked row) and where they do not (a flat
    row): the same cut as a full sort (an independent computation)."""
    from dplm.sample import NUCLEUS_CANDIDATES, nucleus

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 49_152, generator=generator) * torch.tensor([[8.0], [0.1]])
    probs = logits.softmax(-1)
    ranked, order = probs.sort(-1, descending=True)
    kept = (ranked.cumsum(-1) - ranked) < 0.9
    expected = torch.zeros_like(probs).scatter(-1, order, ranked * kept)
    assert torch.allclose(nucleus(probs, 0.9), expected / expected.sum(-1, keepdim=True))
    assert int(kept[0].sum()) < NUCLEUS_CANDIDATES < int(kept[1].sum())
