"""Every config file in configs/ loads, validates and points at data that exists (with its default argument)."""

import pathlib

import pytest

from clue_jax import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*.py") if "def get_config" in p.read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_validates(path):
  config = config_lib.load_module(path).get_config()
  config_lib.validate(config)
  for name, spec in config.data.modalities.items():
    assert pathlib.Path(spec.path).is_file(), (name, spec.path)


def test_every_plus_config_is_its_faithful_config_with_the_recipe_on():
  recipe = config_lib.load_module(CONFIGS / "plus" / "recipe.py")
  pairs = [(CONFIGS / "plus" / f"{d}.py", CONFIGS / f"{d}.py", d) for d in recipe.RECIPES]
  pairs += [(CONFIGS / "competition" / f"{d}_plus.py", CONFIGS / "competition" / f"{d}.py", d)
            for d in ("cite", "multiome")]
  for plus_path, faithful_path, dataset in pairs:
    plus = config_lib.load_module(plus_path).get_config()
    expected = config_lib.apply_overrides(config_lib.load_module(faithful_path).get_config(),
                                          recipe.overrides(dataset))
    assert plus.to_dict() == expected.to_dict(), plus_path
