import numpy as np
import pandas as pd
import pytest
import torch

import dplm
import dplm.stages
from dplm.histories import HistoryBounds
from dplm.planner import MachineSpeed
from dplm.schema import MetadataSpend, Schema
from dplm.state import RunState
from dplm.train import Checkpoints
from test_histories import CDNOW_SCHEMA, tiny


def old_layout(state: dict) -> dict:
    """A run state as checkpoints held it before `RunState`: the user's schema as `given_schema`,
    one `metadata` dict with the spend and the history bounds, the speed, no plan."""
    metadata = dict(state["spend"])
    if state["bounds"]:
        metadata.update(state["bounds"])
    return {"schema": state["schema"], "given_schema": state["user_schema"], "metadata": metadata,
            "canaries": state["canaries"], "marginals": state["marginals"], "speed": state["speed"]}


def test_the_state_round_trips_through_its_dict():
    schema = Schema.from_dict({"columns": {"x": {"kind": "integer", "min": 0, "max": 9, "source": "dp"}}})
    state = RunState(schema, Schema.from_dict({"columns": {"x": {"kind": "integer"}}}),
                     MetadataSpend(0.2, 1e-6, {"x": ["min", "max"]}), HistoryBounds(12, [[3.0], [1.5]], None),
                     pd.DataFrame({"x": [4, 7]}), None, MachineSpeed(40.0, 200.0, "here"), None)
    back = RunState.from_dict(state.to_dict())
    assert back.schema == state.schema and back.user_schema == state.user_schema
    assert (back.spend, back.bounds, back.speed) == (state.spend, state.bounds, state.speed)
    assert back.canaries.to_dict("list") == {"x": [4, 7]} and back.plan is None and back.marginals is None
    old = RunState.from_dict(old_layout(state.to_dict()))
    assert (old.spend, old.bounds, old.speed, old.plan) == (state.spend, state.bounds, state.speed, None)


def test_a_checkpoint_written_before_the_run_state_resumes(tmp_path, monkeypatch):
    """A checkpoint whose run state has the layout of earlier releases resumes: the DP history
    cap, counts, schema and metadata spend come back from it, nothing is drawn or charged twice."""
    from conftest import shared_file

    cdnow = pd.read_csv(shared_file("cdnow_purchases.csv.gz"), nrows=6000)
    config = tiny(True, schema=str(CDNOW_SCHEMA))
    config.data.subject, config.data.order_by = "users_id", "date"
    config.privacy.noise_multiplier, config.privacy.statistics_share, config.privacy.max_epsilon = 1.5, 0.0, None
    config.train.max_steps = 2
    with monkeypatch.context() as m:  # as if killed after its last checkpoint: the checkpoint stays
        m.setattr(dplm.stages.shutil, "rmtree", lambda *a, **k: None)
        m.setattr(dplm.stages, "dp_count", lambda count, epsilon, rng: count)  # earlier runs planned from it
        first = dplm.fit(cdnow, config, progress=False, checkpoints=Checkpoints(tmp_path / "ck", every=1))
    path = tmp_path / "ck" / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)
    saved["run_state"] = old_layout(saved["run_state"])
    torch.save(saved, path)
    config.train.max_steps = 4
    with monkeypatch.context() as m:  # a draw from the data on resume would fail the test
        m.setattr(dplm.stages, "secret_rng", lambda *a: pytest.fail("a resumed run drew from the data again"))
        resumed = dplm.fit(cdnow, config, progress=False, checkpoints=Checkpoints(tmp_path / "ck", every=1, resume=True))
    assert resumed.training.resumed_from_step == 2 and resumed.training.steps == 4
    assert resumed.bounds == first.bounds and resumed.schema == first.schema and resumed.spend == first.spend
    assert resumed.privacy_record["metadata_epsilon"] == pytest.approx(0.25)  # the cap 0.2, the count 0.05
    assert np.shape(resumed.bounds.subject_counts) == np.shape(first.bounds.subject_counts)
