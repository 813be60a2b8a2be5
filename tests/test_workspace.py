import json

import pytest
import yaml

import dplm
from dplm.workspace import PRIVATE_DIAGNOSTICS, RELEASE, RunDirectory
from test_synthesizer import KINDS_ONLY, people_table, tiny_config


def test_export_holds_only_what_may_be_shared(tmp_path):
    """`export` copies the model, tokenizer, schema, config, privacy record and synthetic rows
    with a MANIFEST; no per-step loss, timings, split or exact row count (under subjects one
    person changes the row count by any amount) leaves the run directory."""
    table = people_table(1000)
    config = tiny_config(True, tmp_path)
    config.data.schema, config.data.sample_fraction, config.data.subject = None, 1.0, "person"
    config.data.mode = "rows"  # independent rows, DP per subject
    config.audit.canaries, config.privacy.metadata_epsilon = 2, 2.0
    synth = dplm.fit(table, config, schema=dplm.Schema.from_dict(KINDS_ONLY), progress=False)
    run_dir = synth.save(tmp_path / "run", synthetic=synth.sample(20, progress=False))
    (run_dir / "audit.json").write_text("{}")
    out = dplm.export_run(run_dir, tmp_path / "shared")
    histories_and_texts = {"synthetic_subjects.csv", "history.json", "text_models", "text_models.json"}
    assert {p.name for p in out.iterdir()} == set(RELEASE) - histories_and_texts | {"MANIFEST.md"}  # flat rows
    assert not set(PRIVATE_DIAGNOSTICS) & {p.name for p in out.iterdir()}
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["privacy_unit"] == "subject (column 'person')" and "num_training_rows" not in privacy
    exact = len(set(table["person"].iloc[synth.split["train"]]))
    assert abs(privacy["num_training_units"] - exact) < 200 and "num_training_subjects" not in privacy  # a DP count
    text = "\n".join(p.read_text() for p in out.rglob("*")  # the tokenizer's vocabulary holds any word
                     if p.suffix in (".json", ".yaml", ".md") and "tokenizer" not in p.parts)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert not any(f'"{key}"' in text for key in ("loss", "final_loss", "rows_seen", "batch_rows", "elapsed_s"))
    for entry in log:
        assert repr(entry["loss"]) not in text and f"{entry['loss']:.4f}" not in text
    for count in (len(synth.split["train"]), synth.split["num_training_subjects"]):  # no exact count is released
        assert f": {count}," not in text and f": {count}\n" not in text and f" {count} " not in text
    manifest = (out / "MANIFEST.md").read_text()
    assert f"epsilon = {privacy['epsilon']:.4f}" in manifest and "`train_log.jsonl`" in manifest
    assert "city (categories)" in manifest  # DP-estimated metadata is named as covered
    assert dplm.load(out).sample(5, progress=False).shape == (5, 2)  # the export is a usable model
    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported["output_dir"] == config.output_dir.rsplit("/", 1)[-1] and str(tmp_path) not in text
    with pytest.raises(dplm.DplmError, match="already exists; give a new folder"):
        dplm.export_run(run_dir, out)
    shared = synth.export(tmp_path / "from_api")
    assert {p.name for p in shared.iterdir()} == set(RELEASE) - histories_and_texts - {"synthetic.csv"} | {"MANIFEST.md"}


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(dplm.DplmError, match="is not a dplm run directory"):
        RunDirectory(tmp_path).check()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(dplm.DplmError, match="exists and is not a dplm run"):
        RunDirectory(tmp_path).write(None)
