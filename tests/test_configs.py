"""Every config file in configs/ loads, validates and points at data that exists (with its default argument); a config
of data kept outside the repository takes its file as its argument and is validated with one."""

import inspect
import pathlib

import pytest

from clue_jax import api, config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*.py") if "def get_config" in p.read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_validates(path):
  module = config_lib.load_module(path)
  config = module.get_config()
  config_lib.validate(config)
  if all(not spec.path for spec in config.data.modalities.values()):  # Data outside the repository: an argument.
    given = module.get_config("data.h5mu")
    config_lib.validate(given)
    assert {spec.path for spec in given.data.modalities.values()} == {"data.h5mu"}
    return
  for name, spec in config.data.modalities.items():
    assert pathlib.Path(spec.path).is_file(), (name, spec.path)


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


def test_a_plus_config_with_its_own_matching_names_keywords_that_run_match_takes():
  recipe = config_lib.load_module(CONFIGS / "plus" / "recipe.py")
  taken = set(inspect.signature(api.Run.match).parameters)
  for dataset, options in recipe.MATCHING.items():
    assert config_lib.load_module(CONFIGS / "plus" / f"{dataset}.py").MATCH == options
    assert set(options) <= taken and options["method"] in ("snn", "sinkhorn"), dataset


def test_override_strings_parse_to_typed_values_that_apply_overrides_checks():
  parsed = config_lib.parse_overrides(["loss.lam_kl=0.1", "train.monitor=unseen_foscttm", "train.progress=false",
                                       "data.modality_order=rna,adt"])
  assert parsed == {"loss.lam_kl": 0.1, "train.monitor": "unseen_foscttm", "train.progress": False,
                    "data.modality_order": "rna,adt"}
  config = config_lib.apply_overrides(config_lib.get_config(), parsed)
  assert (config.loss.lam_kl, config.train.monitor, config.train.progress) == (0.1, "unseen_foscttm", False)
  with pytest.raises(config_lib.ConfigError, match="expected KEY=VALUE"):
    config_lib.parse_overrides(["loss.lam_kl"])
  with pytest.raises(config_lib.ConfigError, match="has type str; expected float"):
    config_lib.apply_overrides(config_lib.get_config(), config_lib.parse_overrides(["loss.lam_kl=high"]))
