"""Entropic-OT matching through ott-jax vs clue_jax's former hand-written log-domain Sinkhorn, on trained runs.

  python experiments/match_cite_starter.py --out=runs/match_cite           # trains seeds 5, 6, 7
  python experiments/sinkhorn_ott.py --runs=runs/match_cite/seed_5,runs/match_cite/seed_6,runs/match_cite/seed_7

For each run, the CITE match-modality test cells (GEX -> ADT, within batches) are matched by both solvers at the
same epsilons and at most 500 iterations: the former one always runs 500, ott-jax stops once its marginal error is
below its threshold (1e-3). Prints the match probability against test_sol and the median wall time of 5 matchings
(after one warm-up call that compiles) per solver and epsilon, and the mean over the runs.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from clue_jax import api
from clue_jax.competition import task_files as cf
from clue_jax.evaluate import matching, metrics

EPSILONS = (0.005, 0.01, 0.02, 0.05)
N_ITER = 500
_RUNS = flags.DEFINE_list("runs", None, "Run directories of configs/cite.py trained on the CITE starter's train files.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed matchings per solver and epsilon (median reported).")
flags.mark_flags_as_required(["runs"])


@jax.jit
def handwritten_log_plan(cost, epsilon):
  """The former solver: N_ITER log-domain iterations on the dual potentials, uniform marginals."""
  n, m = cost.shape
  scaled = -cost / epsilon

  def iterate(_, potentials):
    _, g = potentials
    f = -jnp.log(n) - jax.nn.logsumexp(scaled + g[None, :], axis=1)
    return f, -jnp.log(m) - jax.nn.logsumexp(scaled + f[:, None], axis=0)

  f, g = jax.lax.fori_loop(0, N_ITER, iterate, (jnp.zeros(n, cost.dtype), jnp.zeros(m, cost.dtype)))
  return scaled + f[:, None] + g[None, :]


def solvers():
  return {"handwritten": handwritten_log_plan,
          "ott-jax": lambda cost, epsilon: matching.sinkhorn_log_plan(cost, epsilon, N_ITER)}


def match(solve, x, y, bx, by, epsilon):
  def scores(a, b):
    log_plan = np.asarray(solve(matching.cosine_cost(a, b), epsilon), np.float64)
    return np.exp(log_plan - log_plan.max(axis=1, keepdims=True))
  return matching.within_batches(scores, x, y, bx, by, matching.MAX_NONZEROS_PER_ROW)


def main(argv):
  del argv
  gex = cf.read_anndata(cf.starter_file("cite", "match_modality", "test_mod1"))
  adt = cf.read_anndata(cf.starter_file("cite", "match_modality", "test_mod2"))
  solution = cf.read_matrix(cf.starter_file("cite", "match_modality", "test_sol"))
  table = {}
  for workdir in _RUNS.value:
    run = api.load(workdir)
    x, y = run.encode(gex, "rna").obsm["X_clue"], run.encode(adt, "adt").obsm["X_clue"]
    bx, by = gex.obs["batch"].to_numpy(), adt.obs["batch"].to_numpy()
    for name, solve in solvers().items():
      for epsilon in EPSILONS:
        matrix = match(solve, x, y, bx, by, epsilon)  # Warm-up: compiles.
        times = []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          match(solve, x, y, bx, by, epsilon)
          times.append(time.perf_counter() - start)
        row = table.setdefault(f"{name} eps={epsilon}", {"match_probability": [], "seconds": []})
        row["match_probability"].append(metrics.match_probability(matrix, solution))
        row["seconds"].append(statistics.median(times))
    print(json.dumps({k: {m: v[m][-1] for m in v} for k, v in table.items()}), flush=True)
  summary = {k: {"match_probability": float(np.mean(v["match_probability"])),
                 "match_probability_sd": float(np.std(v["match_probability"], ddof=1)) if len(v["seconds"]) > 1
                 else 0.0, "median_seconds": float(np.mean(v["seconds"]))} for k, v in table.items()}
  print(json.dumps({"runs": _RUNS.value, "devices": str(jax.devices()[0].platform), "mean": summary}, indent=2))


if __name__ == "__main__":
  app.run(main)
