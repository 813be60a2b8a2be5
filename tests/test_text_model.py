"""Text columns' own models (`dplm.text_model`, `stages.train_text_models`): tiny models."""

import json
import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch

import dplm
from dplm.config import RunConfig
from dplm.schema import Schema
from dplm.text_model import TABLE_DP_SECONDS, TEXT_RHO_SHARE, table_config, text_columns

SCHEMA = {"columns": {"kind": {"kind": "categorical", "categories": ["cat", "dog"]},
                      "age": {"kind": "integer", "min": 0, "max": 20},
                      "note": {"kind": "text", "max_tokens": 12}}}
SETTINGS = {"model.base": "tiny-random", "train.max_steps": 3, "train.batch_size": 40, "text.max_steps": 4,
            "text.batch_size": 40}


def pets(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kind = rng.choice(["cat", "dog"], n)
    return pd.DataFrame({"kind": kind, "age": rng.integers(1, 15, n),
                         "note": [f"a {k} that is {'small' if rng.random() < .5 else 'big'}" for k in kind]})


@pytest.fixture(scope="module")
def dp_run():
    return dplm.fit(pets(), epsilon=3.0, schema=Schema.from_dict(SCHEMA), settings=SETTINGS, progress=False)


def test_each_text_column_gets_a_text_model_prompted_by_the_other_columns(dp_run):
    assert [t.column for t in dp_run.text_models] == ["note"]
    assert dp_run.text_models[0].context == dp_run.codec.schema.names == ["kind", "age"]  # the table model's order
    assert not dp_run.text_models[0].codec.value_tokens  # the prompt in plain tokens
    rows = dp_run.sample(5, progress=False)
    assert list(rows.columns) == ["kind", "age", "note"] and len(rows) == 5
    assert rows["note"].map(lambda t: isinstance(t, str)).all()


def test_under_dp_the_texts_mean_length_is_estimated_and_counted(dp_run):
    """The text model's time is sized by its texts' mean length: not given, it is a DP estimate
    ('a cat that is small': 5-6 tokens within the cap of 12), in the metadata spend."""
    note = dp_run.schema["note"]
    assert note.source == "dp" and 3 <= note.mean_tokens <= 9 and note.max_tokens == 12 and not note.nullable
    assert dp_run.privacy_record["metadata_estimated_under_dp"]["note"] == ["mean_tokens"]


def test_the_text_speed_measured_on_dummy_rows_is_scaled_to_the_texts_mean_length():
    """Measured before the data is read on rows whose text is half its cap, the speed is scaled by
    tokens to the longer rows of the texts' estimated mean: twice the tokens, half the rows a
    second; shorter rows keep the measured speed."""
    from dplm.planner import MachineSpeed
    from dplm.text_model import text_row_tokens, text_rows_per_second

    schema = Schema.from_dict({"columns": {"kind": {"kind": "categorical", "categories": ["cat", "dog"]},
                                           "note": {"kind": "text", "max_tokens": 100}}})
    probe = text_row_tokens(schema, ["note"], typical=True)
    assert probe == 1 + (1 + 1 + 1) + 50 and text_row_tokens(schema, ["note"]) == 1 + 3 + 100
    schema["note"].mean_tokens = 50.0
    assert text_rows_per_second(MachineSpeed(10.0, 40.0, "k", probe), schema, ["note"]) == pytest.approx(10.0)
    schema["note"].mean_tokens = 99.0
    assert text_rows_per_second(MachineSpeed(10.0, 40.0, "k", probe), schema, ["note"]) == pytest.approx(10.0 * 54 / 103)
    assert text_rows_per_second(MachineSpeed(10.0, 40.0, "k"), schema, ["note"]) == 10.0  # a run before the tokens
    schema["note"].mean_tokens = 10.0
    assert text_rows_per_second(MachineSpeed(10.0, 40.0, "k", probe), schema, ["note"]) == 10.0


def test_given_table_columns_get_texts_and_a_given_text_is_kept(dp_run):
    rows = dp_run.sample(given=pd.DataFrame({"kind": ["dog", "cat", "dog"]}), progress=False)
    assert rows["kind"].tolist() == ["dog", "cat", "dog"] and rows["note"].map(lambda t: isinstance(t, str)).all()
    rows = dp_run.sample(given=pd.DataFrame({"age": [3, 4], "note": ["kept", "as is"]}), progress=False)
    assert rows["age"].tolist() == [3, 4] and rows["note"].tolist() == ["kept", "as is"]


def test_both_models_compose_in_one_accountant_under_the_cap(dp_run):
    """privacy.json's epsilon is the PRV accountant's over the statistics' rounds, the table
    model's steps and the text model's: within 1 % of dp-accounting's PLD of the same history
    plus the metadata's epsilon (an independent computation), never above the cap; the table
    model stopped under its planned share."""
    from dp_accounting.pld import pld_privacy_accountant

    record = dp_run.privacy_record
    table, text = record["models"]
    assert (table["model"], table["steps"], text["model"], text["column"], text["steps"]) == ("table", 3, "text",
                                                                                              "note", 4)
    assert table["epsilon_after"] <= table["max_epsilon"] < text["epsilon_after"] == record["epsilon"] <= 3.0
    assert record["history"][-1] == [text["noise_multiplier"], text["sample_rate"], 4]
    assert record["history"][-2] == [table["noise_multiplier"], table["sample_rate"], 3]
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for noise, rate, steps in record["history"]:
        event = dp_accounting.GaussianDpEvent(noise)
        pld.compose(event if rate == 1.0 else dp_accounting.PoissonSampledDpEvent(rate, event), int(steps))
    expected = pld.get_epsilon(record["training_delta"]) + record["metadata_epsilon"]
    assert record["epsilon"] == pytest.approx(expected, rel=0.01)


def test_the_text_models_lora_weights_change_under_dp(dp_run):
    """LoRA's B matrices start at zero: after DP-SGD every one has moved (the Opacus/peft pitfall)."""
    text_model = dp_run.text_models[0].model
    b = [p for name, p in text_model.named_parameters() if "lora_B" in name]
    assert b and all(float(p.detach().abs().sum()) > 0 for p in b)


def test_the_text_models_lora_sits_on_q_and_v_of_the_last_half_of_the_layers(dp_run):
    """Under DP by default: q and v of the last half of the layers (tiny-random has 2), where
    backpropagation can stop; the plan says so, and the saved model loads with the same adapter."""
    plan = dp_run.text_plan
    assert (plan.target_modules, plan.lora_layers) == (["q_proj", "v_proj"], 1)
    assert {"target_modules", "lora_layers"} <= set(plan.chosen) and "text LoRA on the last 1 layers (auto)" in plan.lines()
    adapted = {name.split(".layers.")[1].split(".lora_A")[0] for name, _ in dp_run.text_models[0].model.named_parameters()
               if "lora_A" in name}
    assert adapted == {"1.self_attn.q_proj", "1.self_attn.v_proj"}


def test_the_text_models_loss_is_on_the_text_alone():
    from dplm.train import row_losses, scored_mask

    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert scored_mask(mask, [2, 4]).tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    torch.manual_seed(0)
    model = dplm.model.load_base_model("tiny-random", 300, torch.float32, None)
    ids = torch.randint(0, 300, (1, 6))
    full = row_losses(model, ids, torch.ones_like(ids)).detach()
    text = row_losses(model, ids, torch.ones_like(ids), scored=scored_mask(torch.ones_like(ids), [4])).detach()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    by_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert float(full[0]) == pytest.approx(float(by_token.mean()), rel=1e-5)
    assert float(text[0]) == pytest.approx(float(by_token[3:].mean()), rel=1e-5)  # tokens 4 and 5
    # Two rows, texts from tokens 2 and 4, the first padded: the output layer scores positions 1 on
    # only, and each row's loss is still its own text's mean.
    ids, mask = torch.randint(0, 300, (2, 6)), torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    text = row_losses(model, ids, mask, scored=scored_mask(mask, [2, 4])).detach()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    by_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert text.tolist() == pytest.approx([float(by_token[0, 1:4].mean()), float(by_token[1, 3:].mean())], rel=1e-5)


def test_the_run_directory_holds_both_models_and_loads_them(dp_run, tmp_path):
    run = dp_run.save(tmp_path / "run", dp_run.sample(4, progress=False))
    layout = json.loads((run / "text_models.json").read_text())
    assert [m["column"] for m in layout["models"]] == ["note"] and layout["plan"]["max_steps"] == 4
    assert (run / "text_models" / "0" / "adapter").is_dir()
    again = dplm.load(run)
    assert [t.column for t in again.text_models] == ["note"] and again.codec.schema.names == ["kind", "age"]
    assert list(again.sample(3, progress=False).columns) == ["kind", "age", "note"]
    exported = dp_run.export(tmp_path / "export")
    assert (exported / "text_models" / "0" / "adapter").is_dir() and (exported / "text_models.json").exists()
    assert "text_models" in (exported / "MANIFEST.md").read_text()


def test_the_planned_split_and_which_columns_get_text_models():
    """The table model's cap is its share of rho (zCDP) with the metadata on top; one column of text
    alone, a history's text or `text.models: joint` keep the one model."""
    config = RunConfig()
    config.privacy.enabled, config.privacy.max_epsilon = True, 4.0
    table = table_config(config, ["note"], 0.25)
    log = math.log(1 / config.privacy.delta)
    rho = (math.sqrt(3.75 + log) - math.sqrt(log)) ** 2
    share = (1 - TEXT_RHO_SHARE) * rho
    assert table.privacy.max_epsilon == pytest.approx(0.25 + share + 2 * math.sqrt(share * log))
    assert table.train.dp_time_budget == TABLE_DP_SECONDS and config.privacy.max_epsilon == 4.0  # the recipe is unchanged
    schema = Schema.from_dict(SCHEMA)
    assert text_columns(schema, config, histories=False) == ["note"]
    assert text_columns(schema, config, histories=True) == []
    assert text_columns(schema.without(["kind", "age"]), config, histories=False) == []
    config.text.models = "joint"
    assert text_columns(schema, config, histories=False) == []


def test_without_dp_the_text_model_trains_by_the_clock_and_the_plan_says_so(tmp_path):
    synth = dplm.fit(pets(200), schema=Schema.from_dict(SCHEMA), progress=False,
                     settings={"model.base": "tiny-random", "train.max_steps": 2, "text.time_budget": 3})
    plan = synth.text_plan
    assert not plan.dp and plan.max_training_time == 3 and plan.noise_multiplier is None
    assert "lm_head" not in plan.target_modules and "down_proj" in plan.target_modules and plan.lora_layers is None
    assert "text LoRA on every layer (auto)" in plan.lines()
    assert synth.text_models[0].training.stop_reason in ("max_training_time", "max_epochs")
    assert synth.privacy_record["models"][1]["column"] == "note"
    pets(200).to_csv(tmp_path / "pets.csv", index=False)
    (tmp_path / "schema.yaml").write_text(json.dumps(SCHEMA))
    config = RunConfig()
    config.data.source, config.data.schema, config.model.base = str(tmp_path / "pets.csv"), str(
        tmp_path / "schema.yaml"), "tiny-random"
    result = dplm.synthesizer.plan(config)
    assert result["text_columns"] == ["note"] and any("text batch 32" in line for line in result["text_plan_lines"])


def test_a_run_stopped_in_its_text_model_resumes_both_models_with_their_spend(tmp_path, monkeypatch):
    """Killed after the text model's second checkpoint: the resumed run keeps the table model's
    steps (its checkpoint outlives it until the run ends) and continues the text model from step
    2; the accountant holds exactly 3 table steps and 4 text steps."""
    from dplm.train import Checkpoints

    class Killed(Exception):
        pass

    save = Checkpoints.save

    def save_then_die(self, state):
        save(self, state)
        if self.folder.name == "text-0" and state["step"] == 2:
            raise Killed

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    folder = tmp_path / "run.checkpoint"
    with pytest.raises(Killed):
        dplm.fit(pets(), epsilon=3.0, schema=Schema.from_dict(SCHEMA), settings=SETTINGS, progress=False,
                 checkpoints=Checkpoints(folder, every=1))
    assert (folder / "checkpoint.pt").exists() and (folder / "text-0" / "checkpoint.pt").exists()
    monkeypatch.setattr(Checkpoints, "save", save)
    synth = dplm.fit(pets(), epsilon=3.0, schema=Schema.from_dict(SCHEMA), settings=SETTINGS, progress=False,
                     checkpoints=Checkpoints(folder, every=1, resume=True))
    text = synth.text_models[0].training
    assert (synth.training.steps, text.steps, text.resumed_from_step) == (3, 4, 2)
    assert [h[2] for h in synth.privacy_record["history"][-2:]] == [3, 4] and synth.privacy_record["epsilon"] <= 3.0
    assert not folder.exists()


TWO_TEXTS = {"columns": {**SCHEMA["columns"], "tag": {"kind": "text", "max_tokens": 6}}}


def pets_with_tags(n: int = 400) -> pd.DataFrame:
    df = pets(n)
    return df.assign(tag=["#" + k for k in df["kind"]])


def test_two_text_columns_resume_in_the_second_with_every_step_counted(tmp_path, monkeypatch):
    """Two text models at the same noise and rate: the accountant adds the second's steps to the
    first's entry. Killed at the second's step 2 (the table shorter than `every`: its last
    checkpoint is the one saved when it ends), the resumed run keeps the table's 3 steps and the
    first text model's 4, continues the second, and counts 3 + 4 + 4 steps."""
    from dplm.train import Checkpoints

    class Killed(Exception):
        pass

    save = Checkpoints.save

    def save_then_die(self, state):
        save(self, state)
        if self.folder.name == "text-1" and state["step"] == 2:
            raise Killed

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    folder, schema = tmp_path / "run.checkpoint", Schema.from_dict(TWO_TEXTS)
    with pytest.raises(Killed):
        dplm.fit(pets_with_tags(), epsilon=3.0, schema=schema, settings=SETTINGS, progress=False,
                 checkpoints=Checkpoints(folder, every=2))
    monkeypatch.setattr(Checkpoints, "save", save)
    synth = dplm.fit(pets_with_tags(), epsilon=3.0, schema=schema, settings=SETTINGS, progress=False,
                     checkpoints=Checkpoints(folder, every=2, resume=True))
    first, second = (t.training for t in synth.text_models)
    assert [t.context for t in synth.text_models] == [["kind", "age"], ["kind", "age", "note"]]
    assert (synth.training.steps, first.steps, first.resumed_from_step, second.steps, second.resumed_from_step) == \
        (3, 4, 4, 4, 2)
    record = synth.privacy_record
    assert record["steps"] == 11 and record["history"][-1][2] == 8 and record["epsilon"] <= 3.0
    rows = synth.sample(3, progress=False)
    assert list(rows.columns) == ["kind", "age", "note", "tag"]


def test_dp_with_a_given_noise_and_no_cap_trains_the_text_model_at_that_noise():
    synth = dplm.fit(pets(), schema=Schema.from_dict(SCHEMA), progress=False,
                     settings={**SETTINGS, "privacy.enabled": True, "privacy.noise_multiplier": 1.5})
    assert synth.text_plan.noise_multiplier == 1.5 and synth.privacy_record["max_epsilon"] is None
    assert synth.privacy_record["models"][1]["noise_multiplier"] == 1.5


def test_the_audit_scores_a_text_column_with_its_text_model(dp_run):
    from dplm.audit import record_losses

    records = pets(6, seed=1)
    text = record_losses(dp_run, records, column="note")
    whole = record_losses(dp_run, records)  # the table model's columns
    assert text.shape == whole.shape == (6,) and np.isfinite(text).all() and not np.allclose(text, whole)
