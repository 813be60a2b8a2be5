import math

import dp_accounting
import pytest
from dp_accounting import rdp
from scipy.optimize import brentq
from scipy.stats import norm

from dplm.config import RunConfig, from_dict
from dplm.errors import DplmError
from dplm.marginals import noise_history
from dplm.planner import (
    DEFAULT_BUDGET_TOKENS, DEFAULT_STATISTICS_NOISE, DP_LEARNING_RATE, MAX_SAMPLE_RATE, NODP_BATCH, NODP_BATCH_TOKENS,
    NODP_MIN_BATCH, NODP_TIME_BUDGET,
    SGD_MIN_UNITS, STATISTICS_SHARE_LARGE, MachineSpeed, TrainingPlan, machine_speed, make_plan, micro_batch_size,
    resolved, rho_of, row_tokens, statistics_share,
)
from dplm.schema import Schema
from dplm.train import planned_steps
from test_privacy import ORDERS

CENSUS_LIKE = Schema.from_dict({"columns": {
    "age": {"kind": "integer", "min": 17, "max": 90}, "fnlwgt": {"kind": "integer", "min": 1, "max": 2000000},
    "education": {"kind": "categorical", "categories": ["a", "b"]},
    "gain": {"kind": "integer", "min": 0, "max": 99999}, "loss": {"kind": "integer", "min": 0, "max": 99999}}})


def config(**sections) -> RunConfig:
    return from_dict(RunConfig, sections)


def composed_epsilon(history: list, delta: float) -> float:
    """dp-accounting's RDP epsilon of (noise, rate, steps) entries, computed independently."""
    accountant = rdp.RdpAccountant(orders=ORDERS)
    for noise, rate, steps in history:
        event = dp_accounting.GaussianDpEvent(noise)
        accountant.compose(event if rate == 1 else dp_accounting.PoissonSampledDpEvent(rate, event), steps)
    return accountant.get_epsilon(delta)


def test_row_tokens_from_the_schema():
    # age and the categories: a token each; fnlwgt, gain and loss 3 place tokens each; BOS and EOS
    assert row_tokens(CENSUS_LIKE) == 2 + 1 + 3 + 1 + 3 + 3


def test_without_dp_the_defaults_train_to_a_time_budget_and_stop_early():
    plan = make_plan(config(), 39074, CENSUS_LIKE)
    assert (plan.batch_size, plan.learning_rate, plan.early_stopping) == (NODP_BATCH, 0.002, True)
    assert plan.max_training_time == NODP_TIME_BUDGET and not plan.dp
    given = make_plan(config(train={"batch_size": 32, "max_epochs": 3, "learning_rate": 0.01}), 39074, CENSUS_LIKE)
    assert (given.batch_size, given.max_epochs, given.learning_rate, given.early_stopping) == (32, 3, 0.01, False)
    assert given.max_training_time is None and "batch_size" not in given.chosen and "warmup_steps" in given.chosen
    explicit = make_plan(config(train={"early_stopping": False}), 1000, CENSUS_LIKE)
    assert not explicit.early_stopping and explicit.max_training_time == NODP_TIME_BUDGET


def test_without_dp_long_units_take_fewer_a_step():
    tokens = row_tokens(CENSUS_LIKE)  # 13
    assert make_plan(config(), 1000, CENSUS_LIKE, unit_rows=3.0).batch_size == NODP_BATCH  # 39 tokens a unit
    careers = make_plan(config(), 1000, CENSUS_LIKE, unit_rows=17.7)  # 230 tokens a unit
    assert careers.batch_size == NODP_BATCH_TOKENS // round(tokens * 17.7) == 35
    assert make_plan(config(), 1000, CENSUS_LIKE, unit_rows=1000.0).batch_size == NODP_MIN_BATCH
    assert make_plan(config(train={"batch_size": 64}), 1000, CENSUS_LIKE, unit_rows=17.7).batch_size == 64


def test_statistics_share_by_units():
    assert statistics_share(SGD_MIN_UNITS - 1) == 1.0 and statistics_share(10 ** 6) == STATISTICS_SHARE_LARGE
    assert 1.0 > statistics_share(5000) > statistics_share(10000) > STATISTICS_SHARE_LARGE


@pytest.mark.parametrize("units", [39074, 8000])
def test_dp_plan_reaches_the_cap_with_everything_counted(units):
    """The noise is the smallest that keeps statistics rounds + DP-SGD + schema metadata within
    the cap; checked with dp-accounting's independent composition."""
    c = config(privacy={"enabled": True, "max_epsilon": 2.5, "accountant": "rdp"})
    plan = make_plan(c, units, CENSUS_LIKE, metadata_epsilon=0.2, metadata_delta=1e-6)
    steps = planned_steps(plan.units, plan)[0]
    rate = min(MAX_SAMPLE_RATE, plan.budget_rows / (150 * units))  # the budget's rows for 150 steps, at most q 0.25
    assert plan.batch_size == round(rate * units) and steps == min(300, plan.budget_rows // plan.batch_size)
    assert plan.statistics_share == statistics_share(units) and plan.statistics_noise > 0
    history = noise_history({k: plan.statistics_noise for k in ("one_way", "two_way", "both_nonzero")}, CENSUS_LIKE)
    sgd = [(plan.noise_multiplier, plan.batch_size / units, steps)]
    assert 0.2 + composed_epsilon(history + sgd, 1e-5 - 1e-6) == pytest.approx(2.5, abs=0.01)
    assert 0.2 + composed_epsilon(history + [(plan.noise_multiplier * 0.99, plan.batch_size / units, steps)],
                                  1e-5 - 1e-6) > 2.5
    # The statistics spend their share of rho: each round costs 1 / (2 z^2).
    assert len(history) / (2 * plan.statistics_noise ** 2) == pytest.approx(rho_of(2.3, 9e-6) * plan.statistics_share)
    assert plan.learning_rate == DP_LEARNING_RATE and plan.pretrain_rows > 0
    assert resolved(c, plan).privacy.noise_multiplier == plan.noise_multiplier


def test_prv_plan_agrees_with_an_independent_pld_accountant():
    """The default PRV accountant's plan, checked with dp-accounting's PLD accountant (the two
    numerical accountants agree to about 1 %)."""
    from dp_accounting.pld import pld_privacy_accountant

    plan = make_plan(config(privacy={"enabled": True, "max_epsilon": 2.5}), 39074, CENSUS_LIKE)
    steps = planned_steps(plan.units, plan)[0]
    history = noise_history({k: plan.statistics_noise for k in ("one_way", "two_way", "both_nonzero")}, CENSUS_LIKE)
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for noise, rate, count in history + [(plan.noise_multiplier, plan.batch_size / 39074, steps)]:
        event = dp_accounting.GaussianDpEvent(noise)
        accountant.compose(event if rate == 1 else dp_accounting.PoissonSampledDpEvent(rate, event), count)
    assert accountant.get_epsilon(1e-5) == pytest.approx(2.5, rel=0.02)


def test_small_tables_spend_everything_on_the_statistics():
    plan = make_plan(config(privacy={"enabled": True, "max_epsilon": 2.5}), 800, CENSUS_LIKE)
    assert plan.statistics_share == 1.0 and plan.max_steps == 0 and plan.pretrain_rows == 800 * 20
    assert any("too few for DP-SGD" in note for note in plan.notes)
    # The statistics are the whole run: their noise fills the cap, by an independent computation
    # (dp-accounting's RDP; PRV against the exact epsilon of composed Gaussian mechanisms).
    rdp_plan = make_plan(config(privacy={"enabled": True, "max_epsilon": 2.5, "accountant": "rdp"}), 800, CENSUS_LIKE)
    rounds = noise_history({k: rdp_plan.statistics_noise for k in ("one_way", "two_way", "both_nonzero")}, CENSUS_LIKE)
    assert 2.49 < composed_epsilon(rounds, 1e-5) <= 2.5
    mu = math.sqrt(len(rounds)) / plan.statistics_noise  # k Gaussian rounds of noise z compose to one of mu = sqrt(k)/z

    def exact_delta(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    exact_epsilon = brentq(lambda eps: exact_delta(eps) - 1e-5, 0.01, 20)
    assert 2.47 < exact_epsilon <= 2.5 + 1e-3
    asked = make_plan(config(train={"max_steps": 30}, privacy={"enabled": True, "max_epsilon": 2.5}), 800, CENSUS_LIKE)
    assert asked.statistics_share == 0.5 and asked.max_steps == 30  # steps asked for: DP-SGD keeps half


def test_a_budget_under_two_epochs_spends_everything_on_the_statistics():
    """Census's demo budget (48,000 rows for 39,074 units: 1.2 epochs) buys DP-SGD steps that
    added nothing to the statistics' rows; 2 epochs and more keep DP-SGD at its usual share."""
    dp = {"enabled": True, "max_epsilon": 2.5}
    short = make_plan(config(train={"budget_rows": 48000}, privacy=dp), 39074, CENSUS_LIKE)
    assert short.statistics_share == 1.0 and short.max_steps == 0 and short.pretrain_rows > 0
    assert any("a compute budget of 48,000 rows, under 2 epochs, too few for DP-SGD" in note for note in short.notes)
    enough = make_plan(config(train={"budget_rows": 2 * 39074}, privacy=dp), 39074, CENSUS_LIKE)
    assert enough.statistics_share == statistics_share(39074) and enough.max_steps > 0
    given = make_plan(config(train={"budget_rows": 48000}, privacy={**dp, "statistics_share": 0.3}), 39074, CENSUS_LIKE)
    assert given.statistics_share == 0.3 and given.max_steps > 0  # the recipe's share wins


def test_given_dp_settings_win():
    c = config(train={"batch_size": 2048, "max_epochs": 8}, privacy={"enabled": True, "noise_multiplier": 1.3745,
                                                                     "max_epsilon": 2.5, "accountant": "prv"})
    plan = make_plan(c, 39074, CENSUS_LIKE)
    assert (plan.batch_size, plan.max_epochs, plan.noise_multiplier) == (2048, 8, 1.3745)
    # 153 steps at noise 1.3745 already reach 2.4934 (PRV): nothing is left for the statistics
    assert plan.statistics_noise is None and plan.statistics_share == 0 and plan.pretrain_rows == 0
    roomy = make_plan(config(train={"batch_size": 2048, "max_epochs": 8},
                             privacy={"enabled": True, "noise_multiplier": 3.0, "max_epsilon": 2.5}), 39074, CENSUS_LIKE)
    assert roomy.statistics_noise == DEFAULT_STATISTICS_NOISE  # light statistics fit below the cap
    history = noise_history({k: roomy.statistics_noise for k in ("one_way", "two_way", "both_nonzero")}, CENSUS_LIKE)
    assert composed_epsilon(history + [(3.0, 2048 / 39074, 153)], 1e-5) <= 2.5 + 1e-3
    no_cap = make_plan(config(privacy={"enabled": True, "noise_multiplier": 1.0}), 39074, CENSUS_LIKE)
    assert no_cap.statistics_noise is None and any("no privacy.max_epsilon" in n for n in no_cap.notes)
    with pytest.raises(DplmError, match="privacy.max_epsilon"):
        make_plan(config(privacy={"enabled": True}), 39074, CENSUS_LIKE)


def test_histories_spend_the_whole_budget_on_dp_sgd():
    """A unit that is a subject's history: no statistics by default (they would only order the
    event columns), and the noise alone fills the cap."""
    plan = make_plan(config(privacy={"enabled": True, "max_epsilon": 4.0, "accountant": "rdp"}), 18856, CENSUS_LIKE,
                     unit_rows=4)
    assert plan.statistics_share == 0 and plan.statistics_noise is None and plan.pretrain_rows == 0
    assert any(note.startswith("histories: no table statistics") for note in plan.notes)
    assert 3.99 < composed_epsilon([(plan.noise_multiplier, plan.batch_size / 18856, plan.max_steps)], 1e-5) <= 4.0


def test_dp_budget_fills_the_time_budget_at_the_measured_speed():
    speed = MachineSpeed(dp_rows_per_second=100.0, rows_per_second=400.0, key="test")
    dp = {"enabled": True, "max_epsilon": 2.5}
    plan = make_plan(config(privacy=dp), 39074, CENSUS_LIKE, speed=speed)
    # 1,500 s less the first stage's 40,000 rows at 400 rows/s: 1,400 s of DP-SGD at 100 rows/s
    assert plan.budget_rows == 140_000 and plan.speed == speed and "budget_rows" in plan.chosen
    assert any("140,000 rows" in note and "100 rows/s" in note for note in plan.notes)
    given = make_plan(config(train={"budget_rows": 5000}, privacy=dp), 39074, CENSUS_LIKE, speed=speed)
    assert given.budget_rows == 5000 and given.speed is None and "budget_rows" not in given.chosen
    fixed = make_plan(config(privacy=dp), 39074, CENSUS_LIKE)  # no speed: the fixed token budget
    assert fixed.budget_rows == DEFAULT_BUDGET_TOKENS // row_tokens(CENSUS_LIKE)
    assert TrainingPlan.from_dict(plan.to_dict()) == plan


def test_machine_speed_is_measured_once_and_only_where_it_sizes_a_budget(monkeypatch, tmp_path):
    import torch

    import dplm.planner
    from dplm.model import smollm2_dir

    converted = smollm2_dir()  # the converted model, shared: a fresh cache would convert the GGUF again (~40 s)
    monkeypatch.setenv("DPLM_CACHE", str(tmp_path))
    (tmp_path / converted.name).symlink_to(converted)
    calls = []
    monkeypatch.setattr(dplm.planner, "measure_speed", lambda model, tokens, micro, device, dp, text_from=None:
                        calls.append((tokens, micro, dp)) or (50.0 if dp else 200.0))
    dp = config(model={"base": "tiny-random"}, privacy={"enabled": True, "max_epsilon": 2.5})
    first = machine_speed(dp, CENSUS_LIKE, torch.device("cpu"))
    assert (first.dp_rows_per_second, first.rows_per_second) == (50.0, 200.0)
    tokens = row_tokens(CENSUS_LIKE)
    assert calls == [(tokens, micro_batch_size(tokens), True), (tokens, min(64, micro_batch_size(tokens)), False)]
    assert machine_speed(dp, CENSUS_LIKE, torch.device("cpu")) == first and len(calls) == 2  # the cache
    assert machine_speed(config(privacy={"enabled": True, "max_epsilon": 2.5}, train={"budget_rows": 9}),
                         CENSUS_LIKE, torch.device("cpu")) is None
    assert machine_speed(config(), CENSUS_LIKE, torch.device("cpu")) is None  # no DP
    assert machine_speed(config(privacy={"enabled": True, "max_epsilon": 2.5}, train={"batch_size": 8, "max_steps": 3}),
                         CENSUS_LIKE, torch.device("cpu")) is None  # the batch and steps given: no budget
