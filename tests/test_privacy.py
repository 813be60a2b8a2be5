import math
import random

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting import rdp
from opacus.accountants.rdp import RDPAccountant

from dplm.privacy import (
    PrivacyBudget, assert_weights_changed, noise_for_epsilon, poisson_sample, trainable_snapshot,
)
from dplm.errors import DplmError
from dplm.schema import Schema, coerce_table

ORDERS = RDPAccountant.DEFAULT_ALPHAS


def independent_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon from Google's dp-accounting (RDP of the Poisson-subsampled Gaussian)."""
    accountant = rdp.RdpAccountant(orders=ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("noise,sample_rate,steps,delta", [
    (1.5, 256 / 39074, 306, 1e-5), (1.0, 16 / 32561, 2035, 1e-5), (0.8, 0.01, 50, 1e-6), (3.0, 0.2, 7, 1e-3)])
def test_epsilon_matches_independent_accountant(noise, sample_rate, steps, delta):
    budget = PrivacyBudget("rdp", noise, sample_rate, delta)
    for _ in range(steps):
        budget.step()
    expected = independent_epsilon(noise, sample_rate, steps, delta)
    assert budget.epsilon() == pytest.approx(expected, rel=1e-4)
    assert budget.record()["steps"] == steps


def test_rdp_accountant_gives_opacus_own_epsilons():
    """The RDP accountant (one step's RDP computed once per noise and rate) returns exactly
    what Opacus' own RDPAccountant computes, for mixed histories (statistics rounds at rate 1
    before DP-SGD steps) and after every step."""
    from dplm.privacy import make_accountant

    for history in ([(1.5, 256 / 39074, 306)], [(10.0, 1.0, 1), (10.0, 1.0, 1), (0.8, 0.01, 50)],
                    [(3.0, 0.2, 7), (1.1, 0.003, 2000)]):
        ours, theirs = make_accountant("rdp"), RDPAccountant()
        ours.history, theirs.history = list(history), list(history)
        for delta in (1e-5, 1e-3):
            assert ours.get_epsilon(delta) == theirs.get_epsilon(delta)
        for _ in range(3):
            ours.step(noise_multiplier=0.9, sample_rate=0.05)
            theirs.step(noise_multiplier=0.9, sample_rate=0.05)
            assert ours.get_epsilon(1e-5) == theirs.get_epsilon(1e-5)


def test_known_value_from_environment_notes():
    # ../shared/ENVIRONMENT.md: noise 1.5, q = 256/39074, 306 steps, delta 1e-5 -> RDP 0.450.
    budget = PrivacyBudget("rdp", 1.5, 256 / 39074, 1e-5)
    for _ in range(306):
        budget.step()
    assert budget.epsilon() == pytest.approx(0.450, abs=0.001)


def test_cap_never_passed_over_random_settings():
    """100 random (noise, sample rate, delta, cap): the budget stops before the cap, and the
    epsilon it reports agrees with dp-accounting's independent RDP computation."""
    rng = random.Random(0)
    tested, largest_gap = 0, 0.0
    while tested < 100:
        noise, q, delta = rng.uniform(0.5, 3.0), 10 ** rng.uniform(-4, -1), 10 ** rng.uniform(-7, -4)
        cap = independent_epsilon(noise, q, rng.randint(1, 12), delta) * rng.uniform(1.0, 1.1)
        if cap < 0.05:  # the two accountants' alpha grids bound tiny epsilons differently
            continue
        tested += 1
        budget = PrivacyBudget("rdp", noise, q, delta, max_epsilon=cap)
        while budget.allows_next_step() and budget.steps < 200:
            budget.step()
        assert budget.epsilon() <= cap
        assert budget.epsilon_after_next_step() > cap or budget.steps == 200
        expected = independent_epsilon(noise, q, budget.steps, delta)
        assert budget.epsilon() == pytest.approx(expected, rel=1e-3)
        largest_gap = max(largest_gap, abs(budget.epsilon() - expected) / expected)
    print(f"largest relative gap to dp-accounting over 100 configurations: {largest_gap:.2e}")


def test_metadata_epsilon_counts_against_cap():
    budget = PrivacyBudget("rdp", 1.0, 0.01, 1e-5, max_epsilon=1.0, metadata_epsilon=0.99)
    assert budget.epsilon() == 0.99
    assert not budget.allows_next_step()


def test_poisson_sample_rate_and_seed():
    draws = [len(poisson_sample(10_000, 0.01, torch.Generator().manual_seed(s))) for s in range(50)]
    assert 90 < sum(draws) / len(draws) < 110
    a = poisson_sample(1000, 0.1, torch.Generator().manual_seed(1))
    b = poisson_sample(1000, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_unchanged_weights_fail_loudly():
    layer = torch.nn.Linear(3, 3)
    before = trainable_snapshot(layer)
    with pytest.raises(RuntimeError, match="no LoRA weight changed"):
        assert_weights_changed(layer, before)
    with torch.no_grad():
        layer.weight[0, 0] += 1
    assert_weights_changed(layer, before)


def test_budget_planning():
    """`plan` schedules epsilon per epoch without training; the noise found for a target
    reaches it after the planned steps (checked against dp-accounting)."""
    import dplm
    from dplm.config import RunConfig, from_dict

    from dplm.inputs import split_rows

    table = pd.DataFrame({"x": np.zeros(39074 + 9768, dtype=int)})  # identical rows: each copy its own draw
    config = from_dict(RunConfig, {"data": {"schema": None}, "train": {"batch_size": 256, "max_epochs": 3},
                                   "privacy": {"enabled": True, "accountant": "rdp"}})
    units = len(split_rows(table, config)[0])  # the plan sees the exact count (the run, its DP count)
    q, delta, epochs = 256 / units, 1e-5, math.ceil(units / 256)
    steps = math.ceil(3 * units / 256)  # 3 epochs of `units` / 256 rows
    config.privacy.noise_multiplier = noise = noise_for_epsilon(2.5, delta, q, steps=steps + 1)
    with pytest.raises(dplm.DplmError, match="column 'x': DP training needs its kind from the schema"):
        dplm.plan(config, table)
    schema = Schema.from_dict({"columns": {"x": {"kind": "integer", "min": 0, "max": 9}}})
    result = dplm.plan(config, table, schema)
    assert abs(units - 39074) < 400 and (result["units"], result["steps_per_epoch"], result["steps"]) == (
        units, epochs, steps)
    assert [k for k, _ in result["epochs"]] == [epochs, 2 * epochs] and result["stop_reason"] == "max_epochs"
    assert result["metadata_epsilon"] == 0.05 and result["training_delta"] == delta  # the schema gives everything
    assert 2.45 < result["epsilon"] - 0.05 <= 2.5
    for k, eps in result["epochs"] + [(steps, result["epsilon"])]:
        assert eps - 0.05 == pytest.approx(independent_epsilon(noise, q, k, delta), rel=1e-3)


def test_subject_gradients_are_summed_then_clipped_as_one():
    """Opacus with grouped per-row gradients == an independent per-subject clip of summed gradients."""
    from opacus.optimizers import DPOptimizer

    from dplm.privacy import sum_grad_samples_by_group

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    per_row = torch.randn(6, 3, 4) * 3  # rows of subjects: [0, 1, 2], [3], [4, 5]
    sizes, clip, expected_batch = [3, 1, 2], 1.0, 4
    optimizer = DPOptimizer(torch.optim.SGD([weight], lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=expected_batch, loss_reduction="mean")
    weight.grad_sample = per_row.clone()
    sum_grad_samples_by_group([weight], sizes)
    optimizer.pre_step()
    sums = [per_row[0:3].sum(0), per_row[3], per_row[4:6].sum(0)]
    manual = sum(g * min(1.0, clip / (g.norm().item() + 1e-6)) for g in sums) / expected_batch
    assert torch.allclose(weight.grad, manual, atol=1e-6)
    assert all(g.norm() > clip for g in sums)  # each subject was really clipped


def test_prv_accountant_matches_independent_pld():
    from dp_accounting.pld import pld_privacy_accountant

    noise, q, steps, delta = 1.5, 256 / 39074, 306, 1e-5
    budget = PrivacyBudget("prv", noise, q, delta)
    for _ in range(steps):
        budget.step()
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
    expected = pld.get_epsilon(delta)  # ../shared/ENVIRONMENT.md: 0.316
    assert budget.record()["epsilon"] == pytest.approx(expected, rel=0.01)  # the reported (finer) figure
    assert expected <= budget.epsilon() <= expected + 0.011  # the check before each step: within its 0.01
    assert budget.epsilon() < independent_epsilon(noise, q, steps, delta)  # tighter than RDP


def test_secure_noise_and_sampling_statistics():
    from dplm.privacy import secure_gaussian, secure_uniform

    u = secure_uniform(200_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    noise = secure_gaussian((400, 500), std=1.5)
    assert noise.shape == (400, 500) and noise.dtype == torch.float64
    assert abs(noise.mean().item()) < 0.02 and noise.std().item() == pytest.approx(1.5, rel=0.01)
    # Gaussian tails: about 4.55 % beyond 2 standard deviations.
    assert (noise.abs() > 3.0).double().mean().item() == pytest.approx(0.0455, abs=0.003)
    draws = [len(poisson_sample(10_000, 0.01, generator=None)) for _ in range(50)]
    assert 90 < sum(draws) / len(draws) < 110


def test_secure_optimizer_adds_noise_of_the_right_scale():
    from dplm.privacy import make_private, prepare_empty_step

    layer = torch.nn.Linear(300, 300, bias=False)
    _, optimizer = make_private(layer, torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=2.0,
                                max_grad_norm=0.5, expected_batch_size=4, secure_mode=True)
    assert type(optimizer).__name__ == "SecureDPOptimizer"
    prepare_empty_step(optimizer.params)  # no rows: the update is pure noise, std = 2.0 * 0.5 / 4
    before = layer.weight.detach().clone()
    optimizer.step()
    step = (layer.weight.detach() - before).flatten()
    assert step.std().item() == pytest.approx(0.25, rel=0.02)


# ---- DP metadata ---------------------------------------------------------------------

def test_category_threshold_releases_a_singleton_with_probability_delta():
    """A value only one unit holds passes the noisy threshold with probability delta
    (Laplace tail beyond ln(1/(2 delta))/eps), computed independently here."""
    from dplm.privacy import category_threshold, dp_categories

    eps, delta = 1.0, 0.05  # a large delta so the rate is measurable
    assert category_threshold(eps, delta) == pytest.approx(1 + math.log(10))
    rng = np.random.default_rng(0)
    kept = sum("rare" in dp_categories(["common"] * 200 + ["rare"], eps, delta, rng) for _ in range(20000))
    tail = 0.5 * math.exp(-(category_threshold(eps, delta) - 1) * eps)  # P(Lap(1/eps) > t - 1)
    assert tail == pytest.approx(delta)
    assert kept / 20000 == pytest.approx(tail, abs=0.006)
    assert all("common" in dp_categories(["common"] * 200, eps, delta, rng) for _ in range(200))


def test_dp_range_keeps_well_populated_bins_and_no_empty_one():
    from dplm.privacy import dp_range, number_grid, range_threshold

    edges = number_grid()
    eps = 0.5
    # Independent: an empty bin passes with probability 1/2 exp(-threshold * eps) = failure / (2 bins).
    assert 0.5 * math.exp(-range_threshold(eps, len(edges) - 1) * eps) == pytest.approx(0.01 / (2 * (len(edges) - 1)))
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.uniform(20, 70, 5000), [3.0, 900.0]])  # two lone extremes
    ranges = [dp_range(values, edges, eps, rng) for _ in range(200)]
    # The grid's edges around the bulk, the extremes cut; an empty bin may pass in <= 0.5 % of runs.
    assert sum(r == (20.0, 70.0) for r in ranges) >= 195
    assert dp_range(np.array([5.0]), edges, eps, rng) is None  # one unit never passes


def test_schema_estimated_under_dp_spends_the_metadata_budget():
    from dplm.schema import MetadataSpend, estimate_schema_dp

    rng = np.random.default_rng(2)
    n = 4000
    df = pd.DataFrame({"city": ["north"] * 2000 + ["south"] * 1995 + ["tiny"] * 5,
                       "age": rng.integers(20, 70, n), "score": rng.normal(50, 5, n).round(2)})
    given = Schema.from_dict({"columns": {"age": {"kind": "integer", "min": 0, "max": 120},
                                          "city": {"kind": "categorical"}, "score": {"kind": "float", "precision": 2}}})
    schema, spent = estimate_schema_dp(df, given, [[i] for i in range(n)], 1.0, 1e-6, None, rng)
    assert spent == MetadataSpend(1.0, 1e-6, {"city": ["categories"], "score": ["min", "max"]})
    assert schema["city"].categories == ["north", "south"] and schema["city"].source == "dp"
    assert schema["age"].source == "user" and (schema["age"].min, schema["age"].max) == (0, 120)
    assert (schema["score"].min, schema["score"].max) == (30.0, 70.0)  # grid edges around the bulk
    table = coerce_table(df, schema)
    assert table["city"].isna().sum() == 5  # rare values never reach the model
    # Kinds are never read off the data under DP: a column the schema leaves out is refused.
    with pytest.raises(DplmError, match="column 'score': DP training needs its kind from the schema file"):
        estimate_schema_dp(df, Schema.from_dict({"columns": {"age": {"kind": "integer"}, "city": {"kind": "categorical"}}}),
                           [[i] for i in range(n)], 1.0, 1e-6, None, rng)


def test_secure_metadata_draws_come_from_the_os():
    """With secure_mode the metadata mechanisms draw from os.urandom: Laplace noise of the
    right scale (mean |x| = scale, tail P(|x| > t) = exp(-t/scale)) and uniform unit picks."""
    from dplm import privacy

    rng = privacy.secret_rng(secure_mode=True)
    assert isinstance(rng, privacy.SecureRandom) and isinstance(privacy.secret_rng(), np.random.Generator)
    x = rng.laplace(0.0, 2.0, 200_000)
    assert abs(x.mean()) < 0.03 and np.abs(x).mean() == pytest.approx(2.0, rel=0.01)
    assert (np.abs(x) > 4.0).mean() == pytest.approx(math.exp(-2), abs=0.004)
    picks = np.bincount([rng.integers(4) for _ in range(8000)], minlength=4)
    assert len(picks) == 4 and picks.min() > 1800
    calls = []
    real = privacy.os.urandom
    privacy.os.urandom = lambda n: calls.append(n) or real(n)
    try:
        from dplm.schema import estimate_schema_dp

        df = pd.DataFrame({"city": ["a"] * 300 + ["b"] * 300})
        given = Schema.from_dict({"columns": {"city": {"kind": "categorical"}}})
        schema, _ = estimate_schema_dp(df, given, [[i] for i in range(600)], 1.0, 1e-6, None, rng)
    finally:
        privacy.os.urandom = real
    assert schema["city"].categories == ["a", "b"] and calls  # the noise came from os.urandom


class Recorder:
    """An rng that draws like `rng` and records the scale of every Laplace draw."""

    def __init__(self, rng):
        self.rng, self.scales = rng, []

    def integers(self, high):
        return self.rng.integers(high)

    def laplace(self, loc, scale, size):
        self.scales.append(scale)
        return self.rng.laplace(loc, scale, size)


def test_schema_estimates_use_laplace_at_their_share_of_epsilon_and_one_row_per_unit():
    """Each estimated column gets epsilon / (columns estimated), its Laplace noise scale 1 over
    that (sensitivity 1: one random row per unit, so one more unit changes one count by one)."""
    from dplm.schema import estimate_schema_dp

    n = 3000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"city": rng.choice(["a", "b"], n), "age": rng.integers(20, 70, n),
                       "when": pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 300, n), unit="D")})
    kinds = Schema.from_dict({"columns": {"city": {"kind": "categorical"}, "age": {"kind": "integer"},
                                          "when": {"kind": "datetime"}}})
    recorder = Recorder(np.random.default_rng(1))
    units = [[2 * i, 2 * i + 1] for i in range(n // 2)]  # subjects of two rows: one row each is read
    estimate_schema_dp(df, kinds, units, 0.6, 1e-6, None, recorder)
    assert recorder.scales == [1 / 0.2] * 3  # three columns share 0.6



def test_dp_mean_is_a_noisy_clipped_sum_over_a_noisy_count():
    """dp_mean: Laplace(2 bound / eps) on the sum of values clipped to [0, bound] and Laplace(2 / eps)
    on their count (sensitivities bound and 1, half of epsilon each); the ratio within [1, bound]."""
    from dplm.privacy import dp_mean

    values = np.array([4.0, 10.0, 40.0, 200.0] * 500)  # clipped to 32: mean (4 + 10 + 32 + 32) / 4 = 19.5
    recorder = Recorder(np.random.default_rng(0))
    estimate = dp_mean(values, 32.0, 0.1, recorder)
    assert recorder.scales == [pytest.approx(2 * 32 / 0.1), pytest.approx(2 / 0.1)]
    assert estimate == pytest.approx(19.5, abs=1.0)  # noise of ~640 on a sum of 39,000
    draws = np.array([dp_mean(values, 32.0, 0.1, np.random.default_rng(s)) for s in range(2000)])
    # Independent (to first order): the sum's noise sd sqrt(2) 640 / 2000 units, the count's sqrt(2) 20 / 2000
    # of the mean: sqrt(0.453^2 + 0.276^2) = 0.53 tokens.
    expected = math.hypot(math.sqrt(2) * 640 / 2000, math.sqrt(2) * 20 / 2000 * 19.5)
    assert draws.mean() == pytest.approx(19.5, abs=0.05) and draws.std() == pytest.approx(expected, rel=0.1)
    assert dp_mean(np.array([]), 32.0, 0.1, np.random.default_rng(1)) >= 1.0  # no units: still in range


def test_text_mean_lengths_are_one_more_mechanism_of_the_metadata_budget():
    """The mean tokens of the texts that get text models: estimated under DP (a column whose cap
    is given stays as nullable as it was), counted in the metadata spend, its share of epsilon
    one mechanism's (a cap and a mean of one column: two)."""
    from dplm.schema import MetadataSpend, dp_metadata_spend, estimate_schema_dp

    n = 3000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"city": rng.choice(["a", "b"], n), "note": ["word " * int(k) for k in rng.integers(1, 11, n)],
                       "memo": ["x y"] * n})
    given = Schema.from_dict({"columns": {"city": {"kind": "categorical"}, "note": {"kind": "text", "max_tokens": 8},
                                          "memo": {"kind": "text"}}})
    recorder = Recorder(np.random.default_rng(1))
    lengths = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a word a token
    schema, spent = estimate_schema_dp(df, given, [[i] for i in range(n)], 0.8, 1e-6, lengths, recorder,
                                       text_means=["note", "memo"])
    assert spent == MetadataSpend(0.8, 1e-6, {"city": ["categories"], "note": ["mean_tokens"],
                                              "memo": ["max_tokens", "mean_tokens"]})
    assert spent == dp_metadata_spend(given, 0.8, 1e-6, ["note", "memo"])  # known in advance
    # Four mechanisms share 0.8: the categories' and the cap's histograms Laplace(1 / 0.2), each mean
    # Laplace(2 cap / 0.2) and Laplace(2 / 0.2).
    assert recorder.scales == [5.0, 2 * 8 / 0.2, 10.0, 5.0, 2 * 3 / 0.2, 10.0]  # memo: 2 tokens, in the bin [2, 3)
    note, memo = schema["note"], schema["memo"]
    # note: 1-10 words, cut at 8 (noise sd ~0.05 on 3,000 units)
    clipped = np.minimum([len(t.split()) for t in df["note"]], 8).mean()
    assert note.mean_tokens == pytest.approx(clipped, abs=0.2) and note.max_tokens == 8 and not note.nullable
    assert note.source == "dp" and memo.max_tokens == 3 and memo.mean_tokens == pytest.approx(2.0, abs=0.1)
    assert dp_metadata_spend(given, 0.8, 1e-6) == MetadataSpend(0.8, 1e-6, {"city": ["categories"],
                                                                           "memo": ["max_tokens"]})

def test_dp_count_is_discrete_laplace_of_the_count():
    """The DP count of units: integers, centred on the count, with the discrete Laplace's spread
    (variance 2 e^-eps / (1 - e^-eps)^2), at least 1; from the OS CSPRNG too."""
    import math

    from dplm.privacy import SecureRandom, dp_count

    rng = np.random.default_rng(0)
    draws = np.array([dp_count(1000, 0.5, rng) for _ in range(20000)])
    variance = 2 * math.exp(-0.5) / (1 - math.exp(-0.5)) ** 2
    assert draws.dtype.kind == "i" and abs(draws.mean() - 1000) < 0.1 and abs(draws.var() / variance - 1) < 0.05
    assert np.mean(draws == 1000) == pytest.approx((1 - math.exp(-0.5)) / (1 + math.exp(-0.5)), abs=0.01)
    assert min(dp_count(0, 0.5, rng) for _ in range(100)) == 1
    secure = [dp_count(1000, 0.5, SecureRandom()) for _ in range(2000)]
    assert abs(np.mean(secure) - 1000) < 0.5


def test_the_run_epsilon_is_dp_accountings_composition():
    """A run's epsilon (PRV over the statistics' Gaussian rounds and DP-SGD, plus the metadata's
    Laplace mechanisms by basic composition) within 1 % of dp-accounting's PLD of the same
    Gaussians plus those epsilons, and never below its PLD of everything composed."""
    from dp_accounting.pld import pld_privacy_accountant

    for noise, q, steps, prior, laplace in [(0.684, 320 / 39074, 150, [(11.06, 1.0, 1)] * 3, [0.05]),
                                            (1.372, 2000 / 39074, 150, [(11.06, 1.0, 1)] * 3, [0.2, 0.05]),
                                            (0.77, 445 / 18856, 149, [], [0.2, 0.05]),
                                            (1.5, 256 / 39074, 306, [], [])]:
        budget = PrivacyBudget("prv", noise, q, 1e-5, metadata_epsilon=sum(laplace), prior=prior)
        budget.restore(prior + [(noise, q, steps)])
        ours = budget.record()["epsilon"]
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for z, _, _ in prior:
            pld.compose(dp_accounting.GaussianDpEvent(z))
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
        assert ours == pytest.approx(pld.get_epsilon(1e-5) + sum(laplace), rel=0.01)
        for epsilon in laplace:
            pld.compose(dp_accounting.LaplaceDpEvent(1 / epsilon))
        assert ours >= pld.get_epsilon(1e-5)


def test_the_rdp_accountant_matches_dp_accountings_rdp_on_mixed_histories():
    """The RDP accountant against dp-accounting's (an independent implementation): statistics
    rounds at rate 1 before DP-SGD steps."""
    for history in ([(10.0, 1.0, 1), (10.0, 1.0, 1), (0.8, 0.01, 50)], [(3.0, 0.2, 7), (1.1, 0.003, 2000)]):
        budget = PrivacyBudget("rdp", 1.0, 0.01, 1e-5)
        budget.restore(history)
        theirs = rdp.RdpAccountant(orders=ORDERS)
        for noise, rate, count in history:
            event = dp_accounting.GaussianDpEvent(noise)
            theirs.compose(event if rate == 1.0 else dp_accounting.PoissonSampledDpEvent(rate, event), count)
        assert budget.epsilon() == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-4)
