"""Experiment tracking with accelerate's trackers: `train.report_to: [tensorboard, mlflow]`.

A run logs its settings, then per step its loss, learning rate, rows/s and epsilon, and at the
end the scores of `dplm report`; a sweep logs one run per point. Logs go under
`train.tracking_dir` (default: a `tracking` folder beside the run directory):
`tensorboard --logdir DIR/tensorboard`, `mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db` (or
wherever MLFLOW_TRACKING_URI points). Like the run directory they are the data owner's
private diagnostics, not covered by epsilon, and `dplm export` leaves them out.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dplm.errors import DplmError

def flatten(values: dict, prefix: str = "") -> dict:
    """Nested settings as one level of 'section.key' -> number/str/bool (lists as text)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The trackers `config.train.report_to` names, for one run (`run_ids` reopens them)."""

    def __init__(self, config, run_ids: dict | None = None):
        self.trackers = []
        names = config.train.report_to
        for name in names:
            if importlib.util.find_spec(name) is None:  # each tracker's module bears its name
                raise DplmError(f"train.report_to names '{name}', which is not installed; "
                                f"pip install 'dplm[{name}]' (or remove it from train.report_to)")
        self.run_name = Path(config.output_dir).name
        from accelerate.tracking import MLflowTracker, TensorBoardTracker

        if "tensorboard" in names:
            self.trackers.append(TensorBoardTracker(self.run_name, str(tracking_folder(config) / "tensorboard")))
        if "mlflow" in names:
            prepare_mlflow(config)
            self.trackers.append(MLflowTracker(experiment_name=EXPERIMENT, run_name=self.run_name,
                                               run_id=(run_ids or {}).get("mlflow")))
        try:
            for tracker in self.trackers:
                tracker.start()
            if run_ids is None:
                for tracker in self.trackers:
                    tracker.store_init_configuration(flatten(config.to_dict()))
        except BaseException:
            self.finish()
            raise

    @property
    def run_ids(self) -> dict:
        """What reopens these runs later: MLflow's run id, TensorBoard's run folder name."""
        return {t.name: t.active_run.info.run_id if t.name == "mlflow" else self.run_name for t in self.trackers}

    def log(self, values: dict, step: int) -> None:
        numbers = {k: v for k, v in flatten(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            if getattr(tracker, "writer", None) is not None or getattr(tracker, "active_run", None) is not None:
                tracker.finish()


EXPERIMENT = "dplm"
# The user's MLflow server, if set before dplm ran: mlflow.set_tracking_uri also sets the
# variable, so a later run must not take dplm's own earlier store for the user's choice.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_folder(config) -> Path:
    return Path(config.train.tracking_dir or Path(config.output_dir).parent / "tracking")


def prepare_mlflow(config) -> None:
    """Point MLflow at the run's SQLite store (unless MLFLOW_TRACKING_URI says otherwise) and
    create the experiment there once, before parallel sweep workers would race to."""
    import mlflow

    if not USER_TRACKING_URI:
        folder = tracking_folder(config)
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT)
