import pytest

from dplm.config import RunConfig, configured, load_recipe
from dplm.errors import DplmError
from conftest import ROOT


def test_dp_is_one_keyword_and_settings_are_a_recipes_overrides():
    config = configured(epsilon=2.5, settings={"train.max_steps": 40, "data.columns": ["age", "sex"],
                                                "output_dir": "runs/x"})
    assert config.privacy.enabled and config.privacy.max_epsilon == 2.5 and config.train.max_steps == 40
    assert config.data.columns == ["age", "sex"] and config.output_dir == "runs/x"
    assert configured() == RunConfig() and not configured().privacy.enabled
    recipe = configured(ROOT / "recipes/census_dp.yaml", settings={"sample.num_rows": 5})
    assert recipe.data.schema == "recipes/census_schema.yaml" and recipe.sample.num_rows == 5
    assert recipe == load_recipe(ROOT / "recipes/census_dp.yaml", ["sample.num_rows=5"])


@pytest.mark.parametrize("settings,message", [
    ({"train.nope": 1}, "unknown config key 'train.nope'"),
    ({"train.max_steps": "many"}, "config 'train.max_steps': 'many' is not a valid int"),
    ({"output_dir.x": 1}, "setting 'output_dir.x': 'output_dir' is not a section"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(DplmError, match=message):
        configured(settings=settings)
    with pytest.raises(DplmError, match="privacy.max_epsilon must be > 0"):
        configured(epsilon=0)
