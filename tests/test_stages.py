import pandas as pd
import pytest

from dplm.config import RunConfig, from_dict
from dplm.errors import DplmError
from dplm.serialize import RowCodec
from dplm.schema import Schema
from dplm.stages import check_spend, row_orders
from dplm.state import RunState
from dplm.schema import MetadataSpend

SCHEMA = Schema.from_dict({"columns": {"x": {"kind": "integer", "min": 0, "max": 9},
                                       "y": {"kind": "categorical", "categories": ["a", "b"]},
                                       "z": {"kind": "integer", "min": 0, "max": 3}}})


def test_each_rows_column_order_depends_on_that_row_alone(tokenizer):
    """`model.column_order: random` under DP: a row's order comes from the row itself and the
    seed, so adding or removing a row changes no other row's order (or gradient)."""
    codec = RowCodec(SCHEMA, tokenizer, value_tokens=True)
    config = from_dict(RunConfig, {"model": {"column_order": "random"}})
    rows = pd.DataFrame({"x": [1, 2, 3, 4, 5, 6, 7, 8], "y": list("abababab"), "z": [0, 1, 2, 3, 0, 1, 2, 3]})
    orders = row_orders(codec, rows, config)
    grown = row_orders(codec, pd.concat([rows.iloc[:3], pd.DataFrame({"x": [9], "y": ["b"], "z": [3]}),
                                         rows.iloc[3:]], ignore_index=True), config)
    assert grown[:3] + grown[4:] == orders and len({tuple(o) for o in orders}) > 1
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    config.train.seed = 1
    assert row_orders(codec, rows, config) != orders


def test_the_spend_before_training_must_leave_room_under_the_cap():
    config = from_dict(RunConfig, {"privacy": {"enabled": True, "max_epsilon": 0.3}})
    check_spend(RunState(SCHEMA, SCHEMA, MetadataSpend(0.25)), config)
    with pytest.raises(DplmError, match="the epsilon spent before training, 0.3 .* leaves nothing of privacy"):
        check_spend(RunState(SCHEMA, SCHEMA, MetadataSpend(0.3)), config)
