"""Every config file in configs/ loads, validates and points at data that exists (with its default argument).

Configs of data kept outside the repository (the shared real data sets) are validated everywhere; their data check is
skipped where that data is absent (CI).
"""

import pathlib

import pytest

from clue_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*.py") if "def get_config" in p.read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_validates(path):
  config = config_lib.load_module(path).get_config()
  config_lib.validate(config)
  for name, spec in config.data.modalities.items():
    path = pathlib.Path(spec.path)
    if not path.is_file() and not path.resolve().is_relative_to(REPO):
      pytest.skip(f"data outside the repository is absent: {name} at {spec.path} (set CLUE_JAX_SHARED_DATA)")
    assert path.is_file(), (name, spec.path)


def test_every_plus_config_is_its_faithful_config_with_the_recipe_on():
  recipe = config_lib.load_module(CONFIGS / "plus" / "recipe.py")
  for dataset in recipe.RECIPES:
    plus = config_lib.load_module(CONFIGS / "plus" / f"{dataset}.py").get_config()
    expected = config_lib.apply_overrides(config_lib.load_module(CONFIGS / f"{dataset}.py").get_config(),
                                          recipe.overrides(dataset))
    assert plus.to_dict() == expected.to_dict(), dataset


@pytest.mark.parametrize("technology", ["cite", "multiome"])
def test_the_competition_plus_configs_train_faithfully_and_match_with_the_recipe(technology):
  recipe = config_lib.load_module(CONFIGS / "plus" / "recipe.py")
  plus = config_lib.load_module(CONFIGS / "competition" / f"{technology}_plus.py")
  faithful = config_lib.load_module(CONFIGS / "competition" / f"{technology}.py")
  assert plus.get_config().to_dict() == faithful.get_config().to_dict()
  expected = config_lib.apply_overrides(faithful.get_competition(), recipe.COMPETITION)
  assert plus.get_competition().to_dict() == expected.to_dict()
  assert (expected.ensemble.seeds, expected.ensemble.pretrained, expected.match.method) == (3, True, "sinkhorn")
  assert (faithful.get_competition().ensemble.seeds, faithful.get_competition().match.method) == (1, "snn")
