import pytest
import torch

from dplm import model as models
from conftest import privacy_config, train_config
from dplm.errors import DplmError
from dplm.schema import coerce_table
from dplm.serialize import RowCodec
from dplm.train import _cap_rows, measure_speed, pad_batch, row_losses, train
from test_privacy import independent_epsilon


@pytest.fixture(scope="module")
def sequences(census, census_schema, tokenizer):
    table = coerce_table(census.head(64), census_schema)
    return RowCodec(census_schema, tokenizer).encode_table(table)


def tiny_lora(tokenizer):
    base = models.load_base_model("tiny-random", len(tokenizer))
    torch.manual_seed(0)  # LoRA's random init
    return models.add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])


def test_padding_is_masked(tokenizer):
    model = tiny_lora(tokenizer)
    a, b = [1, 5, 9, 2], [1, 7, 2]
    ids, mask = pad_batch([a, b], tokenizer.pad_token_id, "cpu")
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    alone, _ = pad_batch([b], 0, "cpu")
    with torch.no_grad():
        together = row_losses(model, ids, mask)[1]
        single = row_losses(model, alone, torch.ones_like(alone))[0]
    assert together.item() == pytest.approx(single.item(), rel=1e-4)


def test_long_sequences_train_with_the_default_attention_kernel_and_the_same_losses(tokenizer):
    """Past `MATH_ATTENTION_TOKENS` (whole histories) training leaves the math kernel for the
    default one; a padded batch's row losses and gradients do not depend on which."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_lora(tokenizer)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(100, 1000, (n,), generator=generator).tolist() for n in (300, 170)]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "cpu")
    results = []
    for context in (models.training_attention(torch.device("cpu"), ids.shape[1]), sdpa_kernel(SDPBackend.MATH)):
        model.zero_grad()
        with context:
            losses = row_losses(model, ids, mask)
        losses.sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0][1], results[1][1]))
    short = models.training_attention(torch.device("cpu"), models.MATH_ATTENTION_TOKENS)
    assert type(short) is not type(models.training_attention(torch.device("cpu"), models.MATH_ATTENTION_TOKENS + 1))


def test_restricted_head_scores_the_kept_tokens_like_the_full_head(tokenizer, sequences, census_schema):
    codec = RowCodec(census_schema, tokenizer)
    full = models.load_base_model("tiny-random", len(tokenizer))
    cut = models.load_base_model("tiny-random", len(tokenizer))
    models.restrict_output_vocab(cut, codec.output_token_ids())
    ids, mask = pad_batch(sequences[:4], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        kept = torch.tensor(codec.output_token_ids())
        assert torch.allclose(cut(input_ids=ids).logits, full(input_ids=ids).logits[..., kept], atol=1e-5)
        # Every target is scorable; the loss is a softmax over fewer tokens, so it is lower.
        restricted = row_losses(cut, ids, mask, models.output_head(cut).index)
        assert (restricted < row_losses(full, ids, mask)).all()


def test_grammar_loss_is_the_samplers_renormalised_likelihood(census, census_schema):
    """With grammar masks each token's loss is -log of its probability renormalised over the
    tokens the (lazy, Python) grammar allows at that point, as the sampler draws it; a forced
    token (the EOS after the last one-token value) costs nothing."""
    from dplm.model import load_tokenizer
    from dplm.sample import LazyGrammar, grammar_masks

    tokenizer = load_tokenizer("smollm2-135m")
    codec = RowCodec(census_schema, tokenizer, value_tokens=True)
    model = models.load_base_model("tiny-random", len(tokenizer))
    models.restrict_output_vocab(model, codec.output_token_ids())
    token_ids = codec.output_token_ids()
    rows = codec.encode_table(coerce_table(census.head(3), census_schema))
    masks = grammar_masks(codec, token_ids, rows, torch.device("cpu"))
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        losses = row_losses(model, ids, mask, models.target_index(model), masks.of([0, 1, 2], ids.shape[1], "cpu"))
        logits = model(input_ids=ids, attention_mask=mask).logits
    lazy = LazyGrammar(codec, token_ids, torch.device("cpu"))
    position = {t: j for j, t in enumerate(token_ids)}
    for r, seq in enumerate(rows):
        state, token_losses = lazy.initial(1)[0], []
        for i, token in enumerate(seq[1:]):
            allowed = [position[t] for t in codec.allowed(state)]
            log_probs = torch.log_softmax(logits[r, i, allowed].double(), dim=0)
            token_losses.append(-log_probs[allowed.index(position[token])].item())
            state = codec.next_state(state, token)
        assert token_losses[-1] == 0.0  # EOS is forced after income's value token
        assert losses[r].item() == pytest.approx(sum(token_losses) / len(token_losses), rel=1e-5)


def test_dp_epsilon_matches_independent_computation_and_weights_change(tokenizer, sequences):
    model = tiny_lora(tokenizer)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    cfg = train_config(batch_size=8, micro_batch_size=3, max_steps=4, seed=1)
    result = train(model, sequences, tokenizer.pad_token_id, cfg, privacy_config(enabled=True), torch.device("cpu"),
                   progress=False)
    assert result.steps == 4 and result.stop_reason == "max_steps"
    expected = independent_epsilon(1.5, 8 / len(sequences), 4, 1e-5)
    assert result.privacy["epsilon"] == pytest.approx(expected, rel=1e-4)
    # Each step's logged epsilon (reused from the check before the step) is that step's.
    for entry in result.log:
        assert entry["epsilon"] == pytest.approx(
            independent_epsilon(1.5, 8 / len(sequences), entry["step"], 1e-5), rel=1e-4)
    # LoRA B starts at zero; DP training must move it (the Opacus/peft pitfall).
    after = dict(model.named_parameters())
    assert all(not torch.equal(w, after[n].detach()) for n, w in lora_b.items())


def test_dp_training_stops_at_the_cap(tokenizer, sequences):
    cap = independent_epsilon(1.5, 8 / len(sequences), 3, 1e-5) * 1.0001
    result = train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id,
                   train_config(batch_size=8, micro_batch_size=8, max_epochs=100),
                   privacy_config(enabled=True, max_epsilon=cap), torch.device("cpu"), progress=False)
    assert result.stop_reason == "max_epsilon"
    assert result.steps == 3 and result.privacy["epsilon"] <= cap


def test_cap_below_one_step_is_an_error(tokenizer, sequences):
    with pytest.raises(DplmError, match="too small for even one step"):
        train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id, train_config(batch_size=8, max_steps=5),
              privacy_config(enabled=True, max_epsilon=1e-4), torch.device("cpu"), progress=False)


def test_empty_poisson_batches_take_noise_steps(tokenizer, sequences):
    cfg = train_config(batch_size=1, micro_batch_size=4, max_steps=60)  # q = 1/64: about 1 row a step, often none
    result = train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id, cfg, privacy_config(enabled=True),
                   torch.device("cpu"), progress=False)
    sizes = [e["batch_rows"] for e in result.log]
    assert result.steps == 60 and sizes.count(0) >= 5  # expected 22 empty batches
    assert result.privacy["epsilon"] == pytest.approx(independent_epsilon(1.5, 1 / 64, 60, 1e-5), rel=1e-4)


def test_non_dp_micro_batches_match_one_batch(tokenizer, sequences):
    results = []
    for micro in (16, 5):
        model = tiny_lora(tokenizer)
        train(model, sequences, tokenizer.pad_token_id, train_config(batch_size=16, micro_batch_size=micro,
                                                                    max_steps=2), privacy_config(),
              torch.device("cpu"), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_dp_micro_batches_match_one_batch_at_noise_zero(tokenizer, sequences):
    """Micro-batches only bound memory: at noise 0 a logical batch's update is the same in
    one pass or in several, and equals the sum of each unit's gradient clipped to
    max_grad_norm, divided by the expected batch size (computed here unit by unit)."""
    from dplm.privacy import make_private
    from dplm.train import _logical_step

    groups = [[0], [1, 2], [3], [4, 5], [6], [7], [8, 9], [10]]  # units of one or two rows
    clip, expected_batch = 0.05, 8

    def flat(params):
        return torch.cat([p.detach().flatten() for p in params])

    model = tiny_lora(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    by_hand = torch.zeros_like(flat(params))
    for group in groups:
        ids, mask = pad_batch([sequences[r] for r in group], tokenizer.pad_token_id, torch.device("cpu"))
        model.zero_grad()
        row_losses(model, ids, mask, models.target_index(model)).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in params])
        by_hand += grad * min(1.0, clip / (grad.norm().item() + 1e-6))
    by_hand = -by_hand / expected_batch
    updates = []
    for micro in (16, 3):
        model = tiny_lora(tokenizer)
        params = [p for p in model.parameters() if p.requires_grad]
        before = flat(params)
        dp_model, optimizer = make_private(model, torch.optim.SGD(params, lr=1.0), 0.0, clip, expected_batch)
        _logical_step(dp_model, optimizer, groups, 11, sequences, tokenizer.pad_token_id, micro,
                      torch.device("cpu"), True, params, models.target_index(model), 1)
        dp_model._close()
        updates.append(flat(params) - before)
    assert by_hand.abs().max() > 1e-4
    assert torch.allclose(updates[0], by_hand, atol=1e-6) and torch.allclose(updates[1], by_hand, atol=1e-6)


def test_dp_step_count_is_fixed_by_the_settings_not_the_data(tokenizer, sequences, census, census_schema):
    """Under DP the number of steps follows from public settings (epochs, steps, the cap):
    other rows of the same count, long or short, take the same steps; a time limit is refused."""
    from dplm.config import RunConfig

    other = RowCodec(census_schema, tokenizer).encode_table(coerce_table(census.tail(64), census_schema))
    short = [s[:8] for s in sequences]
    steps = []
    for rows in (sequences, other, short):
        result = train(tiny_lora(tokenizer), rows, tokenizer.pad_token_id, train_config(batch_size=16, max_epochs=1.5),
                       privacy_config(enabled=True), torch.device("cpu"), progress=False)
        steps.append((result.steps, result.stop_reason, result.privacy["epsilon"]))
    assert steps[0] == steps[1] == steps[2] and steps[0][:2] == (6, "max_epochs")  # ceil(1.5 * 64 / 16)
    config = RunConfig()
    config.privacy.enabled, config.train.max_training_time = True, 60
    with pytest.raises(DplmError, match="train.max_training_time cannot be used with DP"):
        config.validate()


def test_time_limit_stops_training(tokenizer, sequences):
    result = train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id,
                   train_config(batch_size=8, max_epochs=50, max_training_time=1.0), privacy_config(),
                   torch.device("cpu"), progress=False)
    assert result.stop_reason == "max_training_time" and 1 <= result.steps < 400


def test_dp_randomness_is_not_reproducible_from_the_seed(tokenizer, sequences):
    """The seed is stored in the run directory: DP noise and batches must not follow from it."""
    runs = []
    for _ in range(2):
        model = tiny_lora(tokenizer)
        train(model, sequences, tokenizer.pad_token_id, train_config(batch_size=8, max_steps=2, seed=0),
              privacy_config(enabled=True), torch.device("cpu"), progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    assert not torch.equal(runs[0], runs[1])


def test_secure_mode_trains_and_accounts_the_same(tokenizer, sequences):
    """Poisson sampling, each subject's row subset and the noise all come from the OS CSPRNG."""
    model = tiny_lora(tokenizer)
    subjects = [list(range(i, i + 4)) for i in range(0, len(sequences), 4)]
    result = train(model, sequences, tokenizer.pad_token_id, train_config(batch_size=4, max_steps=3),
                   privacy_config(enabled=True, secure_mode=True, max_records_per_subject=2), torch.device("cpu"),
                   progress=False, subjects=subjects)
    assert result.privacy["epsilon"] == pytest.approx(independent_epsilon(1.5, 4 / len(subjects), 3, 1e-5), rel=1e-4)
    assert all(entry["batch_rows"] % 2 == 0 for entry in result.log)  # 2 of each sampled subject's 4 rows


def test_subject_row_subsets_are_random_and_capped():
    subsets = [_cap_rows(list(range(10)), 3, generator) for generator in [None] * 200 + [torch.Generator()] * 200]
    assert all(len(s) == len(set(s)) == 3 and set(s) <= set(range(10)) for s in subsets)
    assert len({tuple(sorted(s)) for s in subsets[:200]}) > 50  # the CSPRNG path draws varied subsets
    assert _cap_rows([4, 7], 3, None) == [4, 7]


def test_a_timed_run_decays_its_learning_rate_by_the_clock(tokenizer, sequences, monkeypatch):
    """Without DP a time budget ends the run at the schedule's floor, however few steps it
    took: the rate falls with the elapsed share of train.max_training_time (or of the planned
    steps, whichever is further). The clock is a fake one that moves 0.25 s per reading."""
    import types

    import dplm.train

    readings = iter(0.25 * i for i in range(10_000))
    monkeypatch.setattr(dplm.train, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    cfg = train_config(batch_size=8, micro_batch_size=8, learning_rate=0.01, warmup_steps=1, max_epochs=1000,
                      max_training_time=5.0, grammar_loss=False)
    result = train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id, cfg, privacy_config(), torch.device("cpu"),
                   progress=False)
    # Step k reads the clock at 0.5 k + 0.25 s before it runs and stops at 5 s: 10 steps. The planned
    # steps are far away (1000 epochs): by steps alone the rate would still be ~0.01.
    assert result.stop_reason == "max_training_time" and result.steps == 10
    expected = [0.01 * max(0.1, 1 - (0.5 * k + 0.25) / 5.0) for k in range(10)]
    assert [e["lr"] for e in result.log] == pytest.approx(expected)


def test_early_stopping_keeps_the_best_held_back_loss(tokenizer, sequences, monkeypatch):
    """Without DP, early stopping holds back a tenth of the rows (never trained on), measures
    their loss every half epoch and stops after PATIENCE measurements and PATIENCE_STEPS steps
    without improvement, keeping the adapter of the best one; under DP it is refused. The
    held-back losses are scripted (5, 4, 3, then worse), so the test knows which adapter must be
    kept."""
    import dplm.train

    seen, measured = set(), []
    real_step = dplm.train._logical_step

    def spy(model, optimizer, groups, *args, **kwargs):
        seen.update(r for g in groups for r in g)
        return real_step(model, optimizer, groups, *args, **kwargs)

    worse = [round(3.5 + 0.1 * i, 1) for i in range(8)]
    scripted = iter([5.0, 4.0, 3.0, *worse, 9.0])
    monkeypatch.setattr(dplm.train, "_logical_step", spy)
    monkeypatch.setattr(dplm.train, "mean_loss", lambda model, rows, *a, **k: measured.append(sorted(rows)) or
                        next(scripted))
    model = tiny_lora(tokenizer)
    weights = []

    def log_step(entry):
        if "validation_loss" in entry:
            weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    cfg = train_config(batch_size=4, micro_batch_size=4, learning_rate=0.05, warmup_steps=1, max_epochs=200,
                       early_stopping=True)
    result = train(model, sequences, tokenizer.pad_token_id, cfg, privacy_config(), torch.device("cpu"), progress=False,
                   log_step=log_step)
    held = set(range(64)) - seen
    assert len(held) == 6 and all(rows == sorted(held) for rows in measured)  # 64 // 10 held back, never trained on
    losses = [e["validation_loss"] for e in result.log if "validation_loss" in e]
    assert losses == [5.0, 4.0, 3.0, *worse] and result.stop_reason == "early_stopping"
    # a measurement every 58 // (2 * 4) = 7 steps; the best at step 21, the stop 60 steps later
    assert dplm.train.PATIENCE_STEPS == 60 and result.steps == 21 + 60
    kept = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(kept[n], weights[2][n]) for n in kept)  # the adapter of the best loss (3.0)
    assert not all(torch.equal(kept[n], weights[-1][n]) for n in kept)
    with pytest.raises(DplmError, match="early_stopping cannot be used with DP"):
        train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id, cfg, privacy_config(enabled=True),
              torch.device("cpu"), progress=False)


@pytest.mark.parametrize("later, stop_reason, steps", [(3.01, "max_steps", 80), (3.02, "early_stopping", 7 + 60)])
def test_early_stopping_counts_only_losses_clearly_above_the_best(tokenizer, sequences, monkeypatch, later,
                                                                  stop_reason, steps):
    """A held-back loss within PATIENCE_RISE (0.5 %) of the best is a plateau, not a reason to stop:
    3.0 then 3.01 (0.33 % above) trains on to max_steps; 3.0 then 3.02 (0.67 %) stops PATIENCE_STEPS
    after the best."""
    import dplm.train

    scripted = iter([3.0] + [later] * 20)
    monkeypatch.setattr(dplm.train, "mean_loss", lambda *a, **k: next(scripted))
    cfg = train_config(batch_size=4, micro_batch_size=4, learning_rate=0.05, warmup_steps=1, max_epochs=None,
                       max_steps=80, early_stopping=True)
    result = train(tiny_lora(tokenizer), sequences, tokenizer.pad_token_id, cfg, privacy_config(),
                   torch.device("cpu"), progress=False)
    assert dplm.train.PATIENCE_RISE == 0.005
    assert (result.stop_reason, result.steps) == (stop_reason, steps)


def test_micro_batches_of_mixed_lengths_pad_little():
    """A batch of histories of 14 to 250 tokens: micro-batches of similar lengths, each padded
    to at most 1.5 times its real tokens (past 1,024 tokens); even lengths keep one micro-batch."""
    from dplm.train import MAX_PADDING, MIN_PADDED_TOKENS, _pack

    lengths = [14] * 30 + [20] * 15 + [30] * 10 + [60] * 5 + [250] * 4
    sequences = {i: [0] * n for i, n in enumerate(lengths)}
    chunks = _pack([[i] for i in range(len(lengths))], 64, sequences)
    assert sum(len(c) for c in chunks) == 64 and len(chunks) > 1
    for chunk in chunks:
        padded = max(lengths[g[0]] for g in chunk) * len(chunk)
        assert padded <= max(MIN_PADDED_TOKENS, MAX_PADDING * sum(lengths[g[0]] for g in chunk))
    even = {i: [0] * 31 for i in range(256)}
    assert len(_pack([[i] for i in range(256)], 256, even)) == 1


def test_history_losses_weigh_every_token_alike():
    """With `unit_tokens` a sequence's loss is the sum of its token losses over that constant:
    a history of 2 predicted tokens weighs twice one of 1 (a mean would weigh them alike)."""
    from types import SimpleNamespace

    def uniform(input_ids, attention_mask):  # every next token has probability 1/5
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5))

    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    log5 = torch.log(torch.tensor(5.0))
    assert torch.allclose(row_losses(uniform, ids, mask), torch.stack([log5, log5]))
    assert torch.allclose(row_losses(uniform, ids, mask, unit_tokens=4.0), torch.stack([2 * log5 / 4, log5 / 4]))


def test_speed_is_measured_on_dummy_rows_and_leaves_the_weights(tokenizer):
    model = tiny_lora(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for dp in (True, False):
        assert measure_speed(model, 12, 8, torch.device("cpu"), dp) > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_resume_that_would_misreport_is_refused():
    """A resumed run continues its checkpoint's steps at their noise and rate, below its cap:
    other settings, or a cap lowered below what the checkpoint spent, are one-line errors."""
    from dplm.errors import DplmError
    from dplm.privacy import PrivacyBudget
    from dplm.train import check_resumed_budget

    history = [(10.0, 1.0, 1), (1.5, 0.01, 40)]
    budget = PrivacyBudget("rdp", 1.5, 0.01, 1e-5, max_epsilon=5.0, prior=[(10.0, 1.0, 1)])
    budget.restore(history)
    check_resumed_budget(budget)  # the same run
    spent = budget.epsilon()
    for noise, rate, prior, cap, message in [(2.0, 0.01, [(10.0, 1.0, 1)], 5.0, "steps ran at"),
                                             (1.5, 0.02, [(10.0, 1.0, 1)], 5.0, "steps ran at"),
                                             (1.5, 0.01, [], 5.0, "steps ran at"),
                                             (1.5, 0.01, [(10.0, 1.0, 1)], spent * 0.9, "is below the epsilon")]:
        other = PrivacyBudget("rdp", noise, rate, 1e-5, max_epsilon=cap, prior=prior)
        other.restore(history)
        with pytest.raises(DplmError, match=message):
            check_resumed_budget(other)
