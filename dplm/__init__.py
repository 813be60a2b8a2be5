"""dplm: fine-tune small causal language models, optionally with differential privacy, to
synthesize tabular data.

    import dplm
    synth = dplm.fit("census", config)        # or a DataFrame, CSV/Parquet/JSONL path, Dataset
    rows = synth.sample(1000)
    synth.save("runs/census"); synth = dplm.load("runs/census")
"""

from dplm.config import RunConfig, load_recipe
from dplm.data import load_table
from dplm.datasets import load_census
from dplm.errors import DplmError
from dplm.schema import Column, Schema
from dplm.synthesizer import Synthesizer, fit, load

__all__ = ["Column", "DplmError", "RunConfig", "Schema", "Synthesizer", "fit", "load", "load_census",
           "load_recipe", "load_table"]
