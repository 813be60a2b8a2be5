import dp_accounting
import numpy as np
import pandas as pd
import pytest
from dp_accounting import rdp

from dplm.marginals import ColumnBins, Marginals, coarse_bin_count, measure, noise_history, statistics_rounds
from dplm.privacy import PrivacyBudget
from dplm.schema import Schema, coerce_table
from test_privacy import ORDERS


def toy(n: int = 6000, seed: int = 0) -> tuple[pd.DataFrame, Schema]:
    """A chain a -> b -> c, a copy d of a's level as a number (one-to-one with a), an
    independent e, and gain / loss that are never both non-zero."""
    rng = np.random.default_rng(seed)
    a = rng.choice(["x", "y", "z"], size=n, p=[0.5, 0.3, 0.2])
    b = np.where(rng.random(n) < 0.85, a, rng.choice(["x", "y", "z"], size=n))
    c = np.where(rng.random(n) < 0.85, b, rng.choice(["x", "y", "z"], size=n))
    d = pd.Series(a).map({"x": 1, "y": 2, "z": 3}).to_numpy()
    e = rng.integers(0, 100, size=n)
    gain = np.where(rng.random(n) < 0.2, rng.integers(1, 5000, size=n), 0)
    loss = np.where((gain == 0) & (rng.random(n) < 0.2), rng.integers(1, 3000, size=n), 0)
    df = pd.DataFrame({"e": e, "c": c, "gain": gain, "a": a, "loss": loss, "b": b, "d": d})
    schema = Schema.from_dict({"columns": {
        "e": {"kind": "integer", "min": 0, "max": 99}, "c": {"kind": "categorical", "categories": ["x", "y", "z"]},
        "gain": {"kind": "integer", "min": 0, "max": 99999}, "a": {"kind": "categorical", "categories": ["x", "y", "z"]},
        "loss": {"kind": "integer", "min": 0, "max": 99999}, "b": {"kind": "categorical", "categories": ["x", "y", "z"]},
        "d": {"kind": "integer", "min": 1, "max": 3}}})
    return coerce_table(df, schema), schema


def test_bins_come_from_the_schema():
    schema = Schema.from_dict({"columns": {
        "age": {"kind": "integer", "min": 17, "max": 90},
        "gain": {"kind": "integer", "min": 0, "max": 99999, "nullable": True},
        "carat": {"kind": "float", "min": 0.2, "max": 5.01, "precision": 2},
        "day": {"kind": "datetime", "min": "1997-01-01", "max": "1998-06-30"}}})
    age, gain, carat, day = (ColumnBins.of(schema[n]) for n in schema.names)
    assert age.num_fine == 74 and age.edges[:3] == [17, 18, 19]  # a bin per value
    assert gain.zero_bin() == 0 and gain.edges[:3] == [0, 1, 2]  # 0 alone, then round edges
    assert gain.num_fine == len(gain.edges) - 1 + 1  # + missing
    values = pd.Series([0, 1, 2, 150, 99999, None])
    fine = gain.fine_index(values, schema["gain"])
    assert fine[0] == 0 and fine[1] == 1 and fine[-1] == gain.num_fine - 1
    assert gain.edges[fine[3]] <= 150 < gain.edges[fine[3] + 1]
    assert carat.edges[0] == 20 and carat.edges[-1] == 502  # scaled by 10**precision
    assert carat.zero_bin() is None and day.zero_bin() is None
    assert day.fine_index(pd.Series(pd.to_datetime(["1997-01-01", "1998-06-30"])), schema["day"]).tolist() == \
        [0, len(day.edges) - 2]


def test_exact_counts_match_pandas():
    df, schema = toy()
    m = measure(df, schema, [[i] for i in range(len(df))], None)
    assert m.one_way["a"][:3] == df["a"].value_counts().reindex(["x", "y", "z"]).tolist()
    expected = pd.crosstab(df["a"], df["b"]).reindex(index=["x", "y", "z"], columns=["x", "y", "z"]).to_numpy()
    assert np.array_equal(m.table("a", "b"), expected) and np.array_equal(m.table("b", "a"), expected.T)
    assert m.both_nonzero["gain|loss"] == 0.0
    assert m.both_nonzero["e|gain"] == float(((df["e"] != 0) & (df["gain"] != 0)).sum())


def test_dp_rounds_noise_and_one_row_per_unit():
    """Under DP each unit gives one row (a table's cells sum to the unit count, up to noise)
    and each round's noise has std z * sqrt(tables), checked over repeated releases."""
    df, schema = toy(600)
    assert statistics_rounds(schema) == {"one_way": 7, "two_way": 21, "both_nonzero": 3}  # e, gain, loss may be 0
    units = [[2 * i, 2 * i + 1] for i in range(300)]  # two rows per subject
    tiny = measure(df, schema, units, {"one_way": 1e-9, "two_way": 1e-9, "both_nonzero": 1e-9}, np.random.default_rng(0))
    assert sum(tiny.one_way["a"]) == pytest.approx(300) and tiny.table("a", "c").sum() == pytest.approx(300)
    rows = [[i] for i in range(len(df))]
    exact = measure(df, schema, rows, None)
    noise = {"one_way": 2.0, "two_way": 3.0, "both_nonzero": 4.0}
    errors = {"one_way": [], "two_way": [], "both_nonzero": []}
    for seed in range(300):
        noisy = measure(df, schema, rows, noise, np.random.default_rng(seed))
        errors["one_way"].append(np.asarray(noisy.one_way["a"]) - exact.one_way["a"])
        errors["two_way"].append(np.asarray(noisy.two_way["c|a"]) - np.asarray(exact.two_way["c|a"]))
        errors["both_nonzero"].append(noisy.both_nonzero["gain|loss"] - exact.both_nonzero["gain|loss"])
    for k, tables in statistics_rounds(schema).items():
        assert np.std(np.asarray(errors[k])) == pytest.approx(noise[k] * np.sqrt(tables), rel=0.1)
        assert abs(np.mean(np.asarray(errors[k]))) < 0.2 * noise[k] * np.sqrt(tables)


def test_statistics_compose_with_dp_sgd_in_the_accountant():
    """The rounds are Gaussian mechanisms (sampling rate 1) in the run's accountant: the total
    equals dp-accounting's composition of the same events, computed independently."""
    df, schema = toy(100)
    history = noise_history({"one_way": 6.0, "two_way": 8.0, "both_nonzero": 10.0}, schema)
    assert history == [(6.0, 1.0, 1), (8.0, 1.0, 1), (10.0, 1.0, 1)]
    budget = PrivacyBudget("rdp", 1.2, 0.05, 1e-5, prior=history)
    assert budget.steps == 0 and budget.epsilon() > 0
    for _ in range(40):
        budget.step()
    accountant = rdp.RdpAccountant(orders=ORDERS)
    for z in (6.0, 8.0, 10.0):
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.2)), 40)
    assert budget.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-4)
    assert budget.record()["steps"] == 40 and len(budget.record()["statistics_rounds"]) == 3


def test_order_puts_dependent_columns_together():
    df, schema = toy()
    m = measure(df, schema, [[i] for i in range(len(df))], None)
    order = m.column_order()
    pos = {c: i for i, c in enumerate(order)}
    assert sorted(order) == sorted(schema.names)
    assert abs(pos["a"] - pos["d"]) == 1 and abs(pos["a"] - pos["b"]) <= 2 and abs(pos["b"] - pos["c"]) <= 2
    assert abs(pos["gain"] - pos["loss"]) == 1  # exclusivity is dependence too


def test_rules_found_exactly_and_under_dp():
    df, schema = toy(20000)
    for noise in (None, {"one_way": 4.0, "two_way": 4.0, "both_nonzero": 4.0}):
        m = measure(df, schema, [[i] for i in range(len(df))], noise, np.random.default_rng(1))
        rules = m.rules()
        assert [r["columns"] for r in rules.one_to_one] == [["a", "d"]]
        assert [r["columns"] for r in rules.exclusive] == [["gain", "loss"]]
        assert rules.kept(df, schema).all()
        bad = pd.DataFrame({"e": [1, 1, 1], "c": ["x"] * 3, "gain": [5, 0, 0], "a": ["x", "y", "x"],
                            "loss": [7, 0, 0], "b": ["x"] * 3, "d": [1, 1, 1]})
        assert rules.kept(bad, schema).tolist() == [False, False, True]
        assert rules.without(["gain", "loss"]).kept(bad, schema).tolist() == [True, False, True]
        assert rules.to_dict()["one_to_one"][0]["pairs"] == [["x", "1"], ["y", "2"], ["z", "3"]]
        roundtrip = Marginals.from_dict(m.to_dict())
        assert roundtrip.rules().to_dict() == rules.to_dict()


def test_no_rule_where_hidden_values_hold_mass():
    """Under heavy noise (800 units, the German credit table's DP statistics) only the largest
    cells pass the 4-sigma threshold; that they pair up is no rule while the values they leave
    out hold a third of the rows (the one-way counts show it)."""
    def column(name, categories):
        return ColumnBins(name, "categorical", False, categories, None, list(range(len(categories))))

    table = [[140, 75], [70, 80], [40, 65], [20, 310]]  # visible at 4 x 33.6: 140 and 310 only
    m = Marginals([column("s", ["p", "q", "r", "t"]), column("c", ["bad", "good"])], 800,
                  {"s": [215, 150, 105, 330], "c": [270, 530]}, {"s|c": table},
                  noise={"one_way": 10.6, "two_way": 33.6, "both_nonzero": 0.0})
    assert m.rules().one_to_one == []
    paired = Marginals(m.columns, 800, {"s": [360, 3, 2, 435], "c": [362, 438]},
                       {"s|c": [[358, 2], [3, 0], [1, 1], [0, 435]]}, noise=m.noise)
    assert paired.rules().to_dict()["one_to_one"] == [{"columns": ["s", "c"], "pairs": [["p", "bad"], ["t", "good"]]}]


def test_tree_rows_follow_the_tables():
    df, schema = toy(20000)
    m = measure(df, schema, [[i] for i in range(len(df))], None)
    rows = m.tree_rows(20000, schema, np.random.default_rng(0), m.rules())
    assert len(rows) == 20000 and m.rules().kept(rows, schema).all()
    real = pd.crosstab(df["a"], df["b"], normalize="index")
    fake = pd.crosstab(rows["a"], rows["b"], normalize="index")
    assert np.abs(real.to_numpy() - fake.to_numpy()).max() < 0.03
    assert rows["a"].value_counts(normalize=True)["x"] == pytest.approx(0.5, abs=0.02)
    assert rows["e"].between(0, 99).all() and (rows["d"] == rows["a"].map({"x": 1, "y": 2, "z": 3})).all()


def test_coarse_bins_follow_noise():
    assert coarse_bin_count(39074, 0.0) == 20 and coarse_bin_count(39074, 100.0) == 19
    assert coarse_bin_count(800, 0.0) == 8 and coarse_bin_count(800, 50.0) == 4 and coarse_bin_count(10, 0) == 2


def test_calibrated_rows_follow_the_statistics_one_way_counts():
    """Rows whose marginals drifted (a model that favours a's majority, as noisy DP training
    does) are brought back to the statistics' one-way shares by choosing half of them."""
    df, schema = toy(6000)
    m = measure(df, schema, [[i] for i in range(len(df))], None)
    drawn, _ = toy(8000, seed=1)
    drifted = pd.concat([drawn, drawn[drawn["a"] == "x"]]).reset_index(drop=True)  # x: 0.67 instead of 0.5
    rows = m.calibrated(drifted, schema, 4000, np.random.default_rng(0))
    assert len(rows) == 4000
    real = df["a"].value_counts(normalize=True)
    before = drifted["a"].value_counts(normalize=True)
    after = rows["a"].value_counts(normalize=True)
    assert abs(before["x"] - real["x"]) > 0.15 and abs(after["x"] - real["x"]) < 0.02
    assert abs(rows["d"].eq(1).mean() - real["x"]) < 0.02  # its one-to-one partner too
    assert (rows["gain"].gt(0) & rows["loss"].gt(0)).sum() == 0  # the rows themselves, unchanged


class NoNoise:
    """An rng for the mechanisms' sensitivity tests: each unit's first row, zero noise, and the
    scale of every noise draw recorded."""

    def __init__(self):
        self.scales = []

    def integers(self, high):
        return 0

    def normal(self, loc, scale, size):
        self.scales.append(scale)
        return np.zeros(size)

    def laplace(self, loc, scale, size):
        self.scales.append(scale)
        return np.zeros(size)


def test_one_more_unit_changes_each_released_table_by_one_count(census, census_schema):
    """The statistics' rounds on neighbouring tables (one unit more), each over the bins the
    rounds before released: each one-way and each two-way table differs in one cell by one, each
    both-non-zero count by at most one, so a round of T tables has L2 sensitivity sqrt(T); the
    Gaussian noise of a round is its noise multiplier times that, and the counts come out as integers."""
    from dplm.marginals import both_nonzero_counts, exclusive_candidates, fine_indexes, one_way_counts, two_way_counts
    from dplm.schema import coerce_table

    rows, grown = coerce_table(census.iloc[:500], census_schema), coerce_table(census.iloc[:501], census_schema)
    noise = {"one_way": 2.0, "two_way": 3.0, "both_nonzero": 4.0}
    rng = NoNoise()
    released = measure(rows, census_schema, [[i] for i in range(500)], noise, rng, count=500)
    columns = [census_schema[c.name] for c in released.columns]
    candidates = exclusive_candidates(census_schema)
    for query in (one_way_counts, two_way_counts):
        before, after = (query(fine_indexes(t, released.columns, columns), released.columns) for t in (rows, grown))
        assert all(np.abs(after[k] - before[k]).sum() == 1 for k in before), query.__name__
    before, after = both_nonzero_counts(rows, candidates), both_nonzero_counts(grown, candidates)
    assert list(before) == ["capital_gain|capital_loss"] and all(after[k] - before[k] in (0, 1) for k in before)
    sizes = statistics_rounds(census_schema)
    assert sorted(set(rng.scales)) == sorted({noise[k] * np.sqrt(sizes[k]) for k in noise})
    assert all(isinstance(v, int) for v in released.one_way["age"])  # released as integers


def test_a_subject_without_rows_adds_nothing(census, census_schema):
    """A unit without rows (a subject without events) is skipped, not drawn from."""
    from dplm.schema import coerce_table

    rows = coerce_table(census.iloc[:50], census_schema)
    with_empty = measure(rows, census_schema, [[i] for i in range(50)] + [[]], {"one_way": 1.0, "two_way": 1.0,
                                                                              "both_nonzero": 1.0}, NoNoise(), count=51)
    plain = measure(rows, census_schema, [[i] for i in range(50)], {"one_way": 1.0, "two_way": 1.0,
                                                                     "both_nonzero": 1.0}, NoNoise(), count=51)
    assert with_empty.one_way == plain.one_way and with_empty.two_way == plain.two_way
