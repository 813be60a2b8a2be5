import itertools
import random

import numpy as np
import pandas as pd
import pytest

from dplm.schema import Schema, coerce_table, format_number
from dplm.serialize import ParseError, RowCodec, escape, number_prefix_ok, unescape
from conftest import ROOT


def test_census_round_trip_every_row(census, census_schema, tokenizer):
    table = coerce_table(census, census_schema)
    codec = RowCodec(census_schema, tokenizer)
    sequences = codec.encode_table(table)
    rows = table.to_dict("records")
    assert len(sequences) == 48842
    for ids, row in zip(sequences, rows):
        assert codec.decode(ids) == row
    lengths = np.array([len(s) for s in sequences])
    # A naive "col: value, ..." format costs ~110 tokens per census row.
    assert lengths.mean() < 60 and lengths.max() <= 80


def test_value_tokens_round_trip_every_census_row(census, census_schema, tmp_path):
    """One token per category and per small-range integer, place tokens for the wide integers,
    no separators: every census row round-trips in 23 tokens (57 without), and a
    tokenizer saved with the new tokens gives them the same ids (a run directory samples
    what it trained on)."""
    from dplm.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")  # value tokens are added to it: not the shared one
    base = len(tokenizer)
    table = coerce_table(census, census_schema)
    codec = RowCodec(census_schema, tokenizer, value_tokens=True)
    # 9 category columns (104 values) + age, education_num and hours_per_week (74 + 16 + 99 values);
    # fnlwgt (1-2,000,000) in 3 places of base 126, capital gain and loss (0-99,999) in 3 of base
    # 47; no column is nullable, so no missing-value token.
    assert len(tokenizer) - base == 104 + 74 + 16 + 99 + 3 * 126 + 2 * 3 * 47
    sequences = codec.encode_table(table)
    for ids, row in zip(sequences, table.to_dict("records")):
        assert codec.decode(ids) == row
    # BOS, 12 value tokens, fnlwgt, capital gain and loss in 3 places each, EOS.
    assert {len(s) for s in sequences} == {23} and not any(codec.sep_id in s for s in sequences)
    assert sum(t >= base for t in sequences[0]) == 21
    # 77516 - 1 = 4 * 126**2 + 111 * 126 + 25
    assert codec.decode(sequences[0])["fnlwgt"] == 77516
    assert "<|fnlwgt#0=4|><|fnlwgt#1=111|><|fnlwgt#2=25|>" in codec.text(sequences[0])
    tokenizer.save_pretrained(tmp_path)
    again = RowCodec(census_schema, load_tokenizer(str(tmp_path)), value_tokens=True)
    assert again.encode_table(table.head(50)) == sequences[:50]
    texts = codec.value_token_texts()
    assert len(texts) == len(tokenizer) - base and all(t < base for ids in texts.values() for t in ids)
    with pytest.raises(ParseError):
        codec.decode(sequences[0][:2] + sequences[0][3:])  # a value token missing: the fields shift


def test_separators_and_special_strings_round_trip(tokenizer):
    schema = Schema.from_dict({"columns": {
        "c": {"kind": "categorical", "categories": ["a|b", "a", "back\\slash", "new\nline", "<|im_end|>"]},
        "t": {"kind": "text", "max_tokens": 64, "nullable": True},
        "f": {"kind": "float", "min": -10, "max": 10, "precision": 2, "nullable": True},
        "d": {"kind": "datetime", "min": "1999-12-25", "max": "2000-03-01"},
    }})
    codec = RowCodec(schema, tokenizer)
    rows = [
        {"c": "a|b", "t": "x | y \\s \\ \n <|im_end|> ||", "f": -0.5, "d": pd.Timestamp("2000-02-29")},
        {"c": "<|im_end|>", "t": None, "f": None, "d": pd.Timestamp("1999-12-25")},
        {"c": "new\nline", "t": "é日本", "f": 10.0, "d": pd.Timestamp("2000-03-01")},
    ]
    for row in rows:
        ids = codec.encode(row)
        assert ids.count(codec.sep_id) == 3 and ids[-1] == codec.eos_id
        assert codec.decode(ids) == row


def test_escape_round_trip():
    for text in ["", "|", "\\", "\\s", "a\\|b\n", "\\\\n"]:
        assert "|" not in escape(text) and "\n" not in escape(text)
        assert unescape(escape(text)) == text
    with pytest.raises(ParseError):
        unescape("bad\\")


def test_malformed_output_is_rejected(census_schema, tokenizer):
    codec = RowCodec(census_schema, tokenizer)
    good = codec.encode({"age": 39, "workclass": "State-gov", "fnlwgt": 77516, "education": "Bachelors",
                         "education_num": 13, "marital_status": "Never-married", "occupation": "Adm-clerical",
                         "relationship": "Not-in-family", "race": "White", "sex": "Male", "capital_gain": 2174,
                         "capital_loss": 0, "hours_per_week": 40, "native_country": "United-States",
                         "income": "<=50K"})
    assert codec.decode(good)["fnlwgt"] == 77516
    seps = [i for i, t in enumerate(good) if t == codec.sep_id]
    digit = {d: codec.char_ids[d] for d in "0123456789"}
    broken = {
        "no end token": good[:-1],
        "too few fields": good[: seps[-1]] + [codec.eos_id],
        "too many fields": good[:-1] + [codec.sep_id, digit["1"], codec.eos_id],
        "age out of range": [good[0], digit["9"], digit["9"]] + good[seps[0]:],
        "leading zero": [good[0], digit["0"], digit["3"], digit["9"]] + good[seps[0]:],
        "unknown category": good[: seps[0] + 1] + tokenizer("Astronaut", add_special_tokens=False).input_ids
        + good[seps[1]:],
        "empty value": good[: seps[0] + 1] + good[seps[1]:],
        "text in a number": [good[0]] + tokenizer("abc", add_special_tokens=False).input_ids + good[seps[0]:],
    }
    for name, ids in broken.items():
        with pytest.raises(ParseError):
            codec.decode(ids)
            pytest.fail(name)


@pytest.mark.parametrize("lo,hi,precision", [(17, 90, 0), (-15, 7, 0), (0, 0, 0), (-2.5, 1.25, 2), (3, 1234, 1),
                                             (-30, -4, 0)])
def test_number_prefixes_match_brute_force(lo, hi, precision):
    scale = 10**precision
    valid = {format_number(n / scale, precision) for n in range(int(lo * scale), int(hi * scale) + 1)}
    prefixes = {v[:k] for v in valid for k in range(len(v) + 1)}
    longest = max(len(v) for v in valid) + 1
    alphabet = "0123456789.-"
    lo_s, hi_s = int(round(lo * scale)), int(round(hi * scale))
    for length in range(min(longest, 5) + 1):
        for chars in itertools.product(alphabet, repeat=length):
            s = "".join(chars)
            assert number_prefix_ok(s, lo_s, hi_s, precision) == (s in prefixes), s


@pytest.mark.parametrize("lo,hi", [(0, 99999), (1, 2000000), (17, 90), (5, 5), (0, 0), (10, 100), (3, 250)])
def test_integer_mask_key_determines_the_allowed_tokens(tokenizer, lo, hi):
    """The cheap digit-DP key of a non-negative integer prefix must imply its exact allowed set."""
    schema = Schema.from_dict({"columns": {"n": {"kind": "integer", "min": lo, "max": hi, "nullable": True}}})
    field = RowCodec(schema, tokenizer).fields[0]
    rng = random.Random(lo * 7 + hi)
    prefixes = {""} | {str(n)[:k] for n in [rng.randint(0, 3 * hi + 10) for _ in range(3000)] + [lo, hi]
                       for k in range(1, len(str(n)) + 1)}
    seen = {}
    for prefix in sorted(prefixes):
        if prefix and not field._prefix_ok(prefix):
            continue
        allowed = field.next_tokens(prefix)
        assert seen.setdefault(field.mask_key(prefix), allowed) == allowed, prefix
    assert len(seen) < 60


def test_empty_and_missing_text_differ_and_long_text_is_cut_between_escapes(tokenizer):
    schema = Schema.from_dict({"columns": {"t": {"kind": "text", "max_tokens": 5, "nullable": True},
                                           "u": {"kind": "text", "max_tokens": 40}}})
    codec = RowCodec(schema, tokenizer)
    for row in ({"t": "", "u": ""}, {"t": None, "u": "a|b\n\\0 c"}, {"t": "\\0", "u": "x"}):
        assert codec.decode(codec.encode(row)) == row
    long = "\n" * 12  # escapes: "\\n" twelve times, more than 5 tokens
    sequences = codec.encode_table(pd.DataFrame({"t": [long, "short", long], "u": ["x", "y", "z"]}))
    assert codec.values_cut() == {"t": 2}
    cut = codec.decode(sequences[0])["t"]
    assert cut and set(cut) == {"\n"} and len(codec.fields[0].encode(long)) <= 5


def test_text_grammar_writes_only_valid_escapes(tokenizer):
    """Escapes span tokens (`\\` may end one token and `n` start the next): the grammar lets a
    text open an escape only where a token can close it, never ends it open, and keeps the
    missing marker `\\0` for the whole value. Random walks that favour backslashes all decode,
    and every training text (escapes, the marker, a cut) walks the grammar token by token."""
    schema = Schema.from_dict({"columns": {"t": {"kind": "text", "max_tokens": 6, "nullable": True},
                                           "u": {"kind": "text", "max_tokens": 4}}})
    codec = RowCodec(schema, tokenizer)
    rows = [{"t": None, "u": "\\"}, {"t": "a\\|b", "u": "\n\n\n\n\n"}, {"t": "\\0", "u": ""}]
    for ids in codec.encode_table(pd.DataFrame(rows)):
        state = codec.start_state()
        for token in ids[1:]:
            assert token in codec.allowed(state), codec.text(ids)
            state = codec.next_state(state, token)
        assert state is None
    rng = random.Random(0)
    favoured = {i for i in codec.text_token_ids if "\\" in tokenizer.decode([i])}
    favoured = set(sorted(favoured)[:200]) | set(codec.fields[0].missing_ids) | {codec.sep_id, codec.eos_id}
    picked = {}
    for _ in range(300):
        state, ids = codec.start_state(), [codec.bos_id]
        while state is not None:
            allowed = codec.allowed(state)
            key = codec.mask_key(state)
            if key not in picked:
                picked[key] = list(favoured & set(allowed))
            picks = picked[key]
            token = rng.choice(picks if picks and rng.random() < 0.7 else allowed)
            ids.append(token)
            state = codec.next_state(state, token)
        codec.decode(ids)  # never a bad escape
    state = codec.start_state()
    for token in codec.fields[0].missing_ids:  # the marker is a whole value, never the start of a text
        assert token in codec.allowed(state)
        state = codec.next_state(state, token)
    assert codec.allowed(state) == [codec.sep_id]


def test_float_columns_round_trip_as_scaled_integers(tokenizer):
    """Floats with public bounds and a precision are written by the place values of their
    scaled integer less the lowest (carat 0.20-5.01: 482 values, 2 places of base 22), or a
    token per value when few; dates are days after their column's min. Every diamonds row
    comes back exactly (issue 19's float check)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from dev_tables import TABLES

    table = TABLES["diamonds"]
    schema = Schema.from_yaml(str(table.schema_path))
    rows = coerce_table(table.load().sample(5000, random_state=0), schema).reset_index(drop=True)
    codec = RowCodec(schema, tokenizer, value_tokens=True)
    layouts = {f.col.name: (f.width, f.base) for f in codec.fields if f.width}
    assert layouts == {"carat": (2, 22), "depth": (2, 19), "table": (2, 23), "price": (2, 137), "x": (2, 33),
                       "y": (2, 77), "z": (2, 57)}
    encoded = codec.encode_table(rows)
    assert {len(ids) for ids in encoded} == {19}  # BOS + 3 value tokens + 7 x 2 places + EOS, no separators
    back = pd.DataFrame([codec.decode(ids) for ids in encoded])
    for name in schema.names:
        if schema[name].kind == "float":
            assert (back[name] - rows[name]).abs().max() < 1e-9, name
        else:
            assert (back[name].astype(str) == rows[name].astype(str)).all(), name
    signed = Schema.from_dict({"columns": {
        "t": {"kind": "float", "min": -40, "max": 60, "precision": 1},
        "d": {"kind": "datetime", "min": "1997-01-01", "max": "1998-06-30", "nullable": True},
        "s": {"kind": "float", "min": -1, "max": 1, "precision": 1}}})
    small = pd.DataFrame({"t": [-40.0, 0.0, 59.9], "d": ["1997-01-01", None, "1998-06-30"], "s": [-1.0, 0.3, 1.0]})
    codec = RowCodec(signed, tokenizer, value_tokens=True)
    encoded = codec.encode_table(coerce_table(small, signed))
    # t: 1,001 values in 2 places of base 32; d: 546 days in 2 places of base 24.
    assert codec.text(encoded[0]).startswith("<|im_start|><|t#0=0|><|t#1=0|><|d#0=0|><|d#1=0|><|s=-1.0|>")
    assert "<|t#0=31|><|t#1=7|><|d#0=22|><|d#1=17|>" in codec.text(encoded[2])  # 999 = 31*32+7, 545 = 22*24+17
    decoded = pd.DataFrame([codec.decode(ids) for ids in encoded])
    assert decoded["t"].tolist() == [-40.0, 0.0, 59.9] and decoded["s"].tolist() == [-1.0, 0.3, 1.0]
    assert decoded["d"].isna().tolist() == [False, True, False] and decoded["d"].iloc[2] == pd.Timestamp("1998-06-30")


@pytest.mark.parametrize("spec", [{"kind": "integer", "min": 30, "max": 5000, "nullable": True},
                                  {"kind": "integer", "min": -70000, "max": 70000},
                                  {"kind": "float", "min": 0.2, "max": 5.01, "precision": 2}])
def test_place_value_grammar_draws_exactly_the_values_in_range(tokenizer, spec):
    """Walking a place-value field's grammar by every allowed token gives each value in range
    once (and the missing-value token when nullable), each the value's own encoding."""
    schema = Schema.from_dict({"columns": {"n": spec}})
    field = RowCodec(schema, tokenizer, value_tokens=True).fields[0]
    lo, hi = round(spec["min"] * 10 ** spec.get("precision", 0)), round(spec["max"] * 10 ** spec.get("precision", 0))
    assert field.base**field.width >= hi - lo + 1 > (field.base - 1) ** field.width and field.base <= 256
    paths, frontier = [], [(field.start(), [])]
    while frontier:
        state, ids = frontier.pop()
        if field.complete(state):
            paths.append(ids)
            continue
        allowed, can_end = field.next_tokens(state)
        assert not can_end and allowed
        frontier += [(field.advance(state, t), ids + [t]) for t in allowed]
    values = [field.parse(ids) for ids in paths]
    assert len(values) == hi - lo + 1 + bool(spec.get("nullable"))
    present = sorted(v for v in values if v is not None)
    assert present[0] == spec["min"] and present[-1] == spec["max"] and len(set(present)) == len(present)
    assert all(field.encode(v) == ids for v, ids in zip(values, paths) if v is not None)
    keys = {}  # the mask key determines the allowed tokens
    for ids in paths[:3000]:
        state = field.start()
        for t in ids:
            assert keys.setdefault(field.mask_key(state), field.next_tokens(state)) == field.next_tokens(state)
            state = field.advance(state, t)
    assert len(keys) <= 2 * field.width + 1
    with pytest.raises(ParseError):
        field.parse(list(reversed(field.encode(spec["max"]))))
