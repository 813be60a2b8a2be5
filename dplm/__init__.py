"""dplm: fine-tune small causal language models, optionally with differential privacy, to
synthesize tabular data.

    import dplm
    synth = dplm.fit("census", config)        # or a DataFrame, CSV/Parquet/JSONL path, Dataset
    rows = synth.sample(1000)
    synth.save("runs/census"); synth = dplm.load("runs/census")
    synth.export("shareable/")               # only what may be shared, with a MANIFEST.md
    dplm.plan(config)                         # the epsilon a run will report, without training
    dplm.sweep(config, "runs/sweep")          # noise x clip grid: epsilon vs scores and attacks
"""

from dplm.config import RunConfig, load_recipe
from dplm.data import load_table
from dplm.datasets import load_census
from dplm.errors import DplmError
from dplm.schema import Column, Schema
from dplm.experiment import sweep
from dplm.synthesizer import Synthesizer, fit, load, plan
from dplm.workspace import export_run

__all__ = ["Column", "DplmError", "RunConfig", "Schema", "Synthesizer", "export_run", "fit", "load",
           "load_census", "load_recipe", "load_table", "plan", "sweep"]
