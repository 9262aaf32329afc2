"""The package layers of docs/architecture.md: every clue_jax import points down, and command lines stay thin."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "clue_jax"
# Lower number = lower layer; a module may import only from its own layer or below.
LAYERS = {"outputs": 0, "batch": 0, "model": 1, "data": 1, "evaluate": 2, "config": 3, "train": 4, "api": 5,
          "fitting": 5, "competition": 6, "sweep": 6}
ENTRY = 7  # Every package's __main__.py: the command line.


def unit(path: pathlib.Path) -> str:
  return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: pathlib.Path) -> set:
  units = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clue_jax"):
      parts = node.module.split(".")
      units.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("clue_jax."))
  return units


def modules():
  return [p for p in PACKAGE.rglob("*.py") if "datasets" not in p.parts]


def test_every_module_belongs_to_a_layer():
  assert {unit(p) for p in modules()} - {"__init__"} == set(LAYERS)


def test_imports_point_down():
  upward = []
  for path in modules():
    if path.name == "__init__.py":
      continue
    level = ENTRY if path.name == "__main__.py" else LAYERS[unit(path)]
    upward += [f"{path.relative_to(PACKAGE)} imports {u}" for u in imported_units(path) if LAYERS[u] > level]
  assert not upward


def test_the_math_knows_nothing_of_files_or_flags():
  for path in (PACKAGE / "model").glob("*.py"):
    names = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
              if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"anndata", "h5py", "absl", "orbax", "pathlib", "os", "tensorboardX"}, path


def test_command_lines_are_thin():
  for path in PACKAGE.glob("*/__main__.py"):
    tree = ast.parse(path.read_text())
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert len(path.read_text().splitlines()) < 130, path
    assert "main" in functions, path


def test_the_api_rebuilds_runs_without_the_trainer():
  """A finished run is read through train/run_dir.py; the training loop is not imported to use one."""
  tree = ast.parse((PACKAGE / "api.py").read_text())
  modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "clue_jax.train"
           for a in n.names}
  assert "clue_jax.train.trainer" not in modules and "trainer" not in names and "run_dir" in names
