"""Competition metrics: the official scores of the embedded NeurIPS 2021 starter files, and hand-checkable cases."""

import numpy as np
import pytest
import scipy.sparse as sp

from clue_jax.competition import task_files as cf
from clue_jax.evaluate import cell_cycle, diffusion, embedding_metrics as em, metrics
from clue_jax.evaluate import louvain as louvain_lib
from clue_jax.evaluate.louvain import louvain
from clue_jax.evaluate.neighbor_graph import neighbor_graph, umap_connectivities

TECHNOLOGIES = ("cite", "multiome")
# The Multiome match score file holds 1000 x the final (unscaled) metric: Sept-2021 EvalAI display scaling.
MATCH_SCORE_SCALE = {"cite": 1.0, "multiome": 1000.0}
# scib 1.0.0's own functions, called as the competition's joint-embedding metric scripts call them, on these starter
# files (run once with scanpy 1.8.2, louvain 0.8.2, umap-learn 0.5.7, scikit-learn 1.3.2). That environment reproduces
# the official nmi of both scores files to 1e-15; the starters ship no official value for the other metrics.
SCIB_REFERENCE = {
    "cite": {"asw_batch": 0.8176258580720788, "asw_label": 0.5198011118918657, "cc_cons": 0.4242675484275039,
             "graph_conn": 0.8579815509693558, "ti_cons_batch_mean": 0.0},  # No root cell in either trajectory: 0.
    "multiome": {"asw_batch": 0.8422213345340387, "asw_label": 0.5027033337391913, "cc_cons": 0.4424072536104717,
                 "graph_conn": 0.8450962513289019, "ti_cons_batch_mean": 0.7159036579402839},
}


def starter(technology, task, kind):
  return cf.starter_file(technology, task, kind)


# --- match modality ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("technology", TECHNOLOGIES)
def test_match_probability_reproduces_official_score(technology):
  prediction = cf.read_matrix(starter(technology, "match_modality", "prediction"))
  solution = cf.read_matrix(starter(technology, "match_modality", "test_sol"))
  scores = starter(technology, "match_modality", "scores")
  official = cf.read_scores(scores)["match_probability"] / MATCH_SCORE_SCALE[technology]
  assert metrics.match_probability(prediction, solution) == pytest.approx(official, abs=1e-12)
  per_cell = metrics.match_probability_per_cell(prediction, solution)
  np.testing.assert_allclose(per_cell, cf.read_per_cell_scores(scores, "match_probability"), atol=1e-7)


def test_match_probability_hand_cases():
  n = 4
  permutation = sp.csr_matrix(np.eye(n)[[2, 0, 3, 1]])
  assert metrics.match_probability(permutation, permutation) == 1.0
  assert metrics.match_probability(np.full((n, n), 1 / n), permutation) == pytest.approx(1 / n)
  # Negative weights count as 0 once the row sums are checked: the first row puts all its weight on its partner.
  prediction = np.array([[1.25, -0.25, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
  assert metrics.match_probability_per_cell(prediction, np.eye(3)).tolist() == [1.0, 0.5, 1.0]


@pytest.mark.parametrize("prediction, message", [
    (np.full((3, 4), 0.25), "shape"),
    (np.array([[1.0, np.nan, 0.0], [0, 1, 0], [0, 0, 1]]), "NaN"),
    (np.array([[-0.5, -0.5, 0.0], [0, 1, 0], [0, 0, 1]]), "no positive weight"),
    (np.array([[2.0, 0.0, 0.0], [0, 1, 0], [0, 0, 1]]), "sum to 1"),
])
def test_match_prediction_format_errors(prediction, message):
  with pytest.raises(ValueError, match=message):
    metrics.match_probability(prediction, np.eye(3))


def test_match_prediction_limits_nonzeros_to_1000_per_cell():
  n = metrics.MAX_MATCH_NONZEROS_PER_CELL + 1  # A dense n x n matrix then holds n more non-zeros than allowed.
  with pytest.raises(ValueError, match="top 1000 candidates"):
    metrics.match_probability(np.full((n, n), 1 / n), sp.identity(n))


def test_match_solution_must_be_a_permutation():
  with pytest.raises(ValueError, match="permutation"):
    metrics.match_probability(np.eye(3), np.ones((3, 3)))


# --- predict modality -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("technology", TECHNOLOGIES)
def test_rmse_and_mae_reproduce_official_scores(technology):
  prediction = cf.read_matrix(starter(technology, "predict_modality", "prediction"))
  solution = cf.read_matrix(starter(technology, "predict_modality", "test_mod2"))
  official = cf.read_scores(starter(technology, "predict_modality", "scores"))  # float32 values
  assert metrics.rmse(prediction, solution) == pytest.approx(official["rmse"], rel=1e-6)
  assert metrics.mae(prediction, solution) == pytest.approx(official["mae"], rel=1e-6)


def test_predict_modality_correlations_match_numpy_on_starter():
  prediction = cf.read_matrix(starter("cite", "predict_modality", "prediction")).toarray()
  solution = cf.read_matrix(starter("cite", "predict_modality", "test_mod2")).toarray()
  scores = metrics.predict_modality_metrics(prediction, solution)
  per_cell = [np.corrcoef(p, s)[0, 1] for p, s in zip(prediction, solution)]
  assert scores["mean_pearson_per_cell"] == pytest.approx(np.mean(per_cell))
  assert scores["overall_pearson"] == pytest.approx(np.corrcoef(prediction.ravel(), solution.ravel())[0, 1])
  assert set(scores) == {"rmse", "mae", "mean_pearson_per_cell", "mean_spearman_per_cell", "mean_pearson_per_gene",
                         "mean_spearman_per_gene", "overall_pearson", "overall_spearman"}


def test_predict_modality_hand_cases():
  solution = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 7.0]])
  perfect = metrics.predict_modality_metrics(solution, solution)
  assert perfect["rmse"] == 0.0 and perfect["mae"] == 0.0
  assert all(perfect[k] == pytest.approx(1.0) for k in perfect if "pearson" in k or "spearman" in k)
  assert metrics.rmse(np.zeros((1, 2)), np.array([[3.0, 4.0]])) == pytest.approx(np.sqrt(12.5))
  assert metrics.mae(np.zeros((1, 2)), np.array([[3.0, 4.0]])) == 3.5
  monotone = metrics.predict_modality_metrics(np.exp(solution), solution)  # Same ranks, not linear.
  assert monotone["mean_spearman_per_cell"] == pytest.approx(1.0) and monotone["mean_pearson_per_cell"] < 0.99
  constant = metrics.predict_modality_metrics(np.ones_like(solution), solution)
  assert constant["mean_pearson_per_cell"] == 0.0 and constant["mean_spearman_per_gene"] == 0.0


def test_predict_modality_shape_error():
  with pytest.raises(ValueError, match="every test cell"):
    metrics.rmse(np.zeros((2, 3)), np.zeros((2, 4)))


# --- kNN label transfer -----------------------------------------------------------------------------------------


def test_knn_label_transfer():
  source = np.array([[0.0], [0.1], [0.2], [10.0], [10.1]])
  source_labels = np.array(["a", "a", "a", "b", "b"])
  target = np.array([[0.05], [10.05], [9.0]])
  assert metrics.knn_label_transfer_accuracy(source, source_labels, target, ["a", "b", "b"], k=1) == 1.0
  assert metrics.knn_label_transfer_accuracy(source, source_labels, target, ["b", "a", "a"], k=1) == 0.0
  # k=5 is the whole source: majority "a" everywhere.
  accuracy = metrics.knn_label_transfer_accuracy(source, source_labels, target, ["a", "b", "b"], k=5)
  assert accuracy == pytest.approx(1 / 3)
  # A 1-1 tie goes to the label of the nearer neighbour.
  assert metrics.knn_label_transfer_accuracy([[0.0], [1.0]], ["a", "b"], [[0.4], [0.6]], ["a", "b"], k=2) == 1.0
  with pytest.raises(ValueError, match="k=6"):
    metrics.knn_label_transfer_accuracy(source, source_labels, target, ["a", "b", "b"], k=6)


# --- joint embedding: official files ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TECHNOLOGIES)
def joint_embedding(request):
  technology = request.param
  inputs = cf.read_joint_embedding(starter(technology, "joint_embedding", "prediction"),
                                   starter(technology, "joint_embedding", "solution"))
  return technology, em.joint_embedding_metrics(**inputs)


def test_joint_embedding_nmi_reproduces_official_with_the_louvain_package(joint_embedding):
  technology, scores = joint_embedding
  assert louvain_lib.PACKAGE_INSTALLED, "the test extra installs louvain (the eval extra's clustering)"
  official = cf.read_scores(starter(technology, "joint_embedding", "scores"))["nmi"]
  assert scores["nmi"] == pytest.approx(official, abs=1e-12)


@pytest.mark.parametrize("technology", TECHNOLOGIES)
def test_joint_embedding_nmi_near_official_without_the_louvain_package(technology):
  inputs = cf.read_joint_embedding(starter(technology, "joint_embedding", "prediction"),
                                   starter(technology, "joint_embedding", "solution"))
  graph = neighbor_graph(np.asarray(inputs["embedding"], np.float64))
  official = cf.read_scores(starter(technology, "joint_embedding", "scores"))["nmi"]
  # The numpy Louvain's random node order differs from the package's: clusterings agree in distribution only.
  assert em.nmi_louvain(graph, inputs["labels"], use_package=False) == pytest.approx(official, abs=0.02)


def test_joint_embedding_metrics_match_scib(joint_embedding):
  technology, scores = joint_embedding
  for metric, reference in SCIB_REFERENCE[technology].items():
    assert scores[metric] == pytest.approx(reference, abs=1e-5), metric
  assert scores["arithmetic_mean"] == pytest.approx(np.mean([scores[m] for m in em.METRICS]))


# --- joint embedding: hand-checkable pieces ---------------------------------------------------------------------


def test_nmi_hand_cases():
  assert em.nmi([0, 0, 1, 1], ["x", "x", "y", "y"]) == pytest.approx(1.0)
  assert em.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
  # A 2 x 3 table: MI = (2/3) log 2, entropies log 2 and log 3.
  a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
  h_a, h_b = np.log(2), np.log(3)
  mutual = 2 / 6 * np.log((2 / 6) / (3 / 6 * 2 / 6)) * 2 + 2 * (1 / 6 * np.log((1 / 6) / (3 / 6 * 2 / 6)))
  assert em.nmi(a, b) == pytest.approx(mutual / ((h_a + h_b) / 2))


@pytest.mark.parametrize("use_package", [False, True])
def test_louvain_finds_two_cliques(use_package):
  clique = np.ones((5, 5)) - np.eye(5)
  adjacency = sp.block_diag([clique, clique]).tolil()
  adjacency[4, 5] = adjacency[5, 4] = 1  # One bridge.
  labels = louvain(adjacency, resolution=1.0, use_package=use_package)
  assert labels.tolist() == [0] * 5 + [1] * 5
  assert len(set(louvain(adjacency, resolution=0.01, use_package=use_package))) == 1  # Low resolution: one community.
  with pytest.raises(ValueError, match="symmetric"):
    louvain(sp.csr_matrix(np.triu(np.ones((3, 3)), 1)), use_package=use_package)


def test_silhouettes_hand_case():
  x = np.array([[0.0], [1.0], [10.0], [11.0]])
  # Cell 0: a = 1 (to cell 1), b = mean(10, 11) = 10.5 -> s = 9.5 / 10.5.
  assert em.silhouette_samples(x, [0, 0, 1, 1])[0] == pytest.approx(9.5 / 10.5)
  assert em.silhouette_samples(x, [0, 1, 1, 1])[0] == 0.0  # Alone in its label.
  assert em.asw_label(x, [0, 0, 1, 1]) == pytest.approx((np.mean(em.silhouette_samples(x, [0, 0, 1, 1])) + 1) / 2)
  mixed = np.array([[0.0]] * 4 + [[5.0]] * 4)  # Each cell type holds both batches at one point: silhouette 0.
  types, batches = ["t"] * 4 + ["u"] * 4, ["b1", "b2"] * 4
  assert em.asw_batch(mixed, types, batches) == 1.0
  apart = mixed + np.array([[0.0], [1.0]] * 4)  # Batches 1 apart within a type: silhouette 1 per cell.
  assert em.asw_batch(apart, types, batches) == 0.0
  assert np.isnan(em.asw_batch(mixed, types, ["b1"] * 8))  # No type holds 2 batches: all skipped.


def test_graph_connectivity_hand_case():
  path = sp.diags([np.ones(3), np.ones(3)], [1, -1], shape=(4, 4))  # 0-1-2-3
  assert em.graph_connectivity(path, ["a", "a", "a", "a"]) == 1.0
  assert em.graph_connectivity(path, ["a", "b", "a", "a"]) == pytest.approx(((2 / 3) + 1) / 2)


def test_umap_connectivities_properties():
  x = np.random.default_rng(0).normal(size=(60, 3))
  indices, distances = metrics.nearest_rows(x, x, 15, same=True)
  assert (indices[:, 0] == np.arange(60)).all() and (np.diff(distances, axis=1) >= 0).all()
  graph = umap_connectivities(indices, distances)
  assert abs(graph - graph.T).max() < 1e-12 and graph.diagonal().max() == 0
  assert graph.data.max() <= 1.0 and graph.data.min() > 0
  assert np.allclose(graph[np.arange(60), indices[:, 1]], 1.0)  # The nearest other cell has full membership.


def test_pc_regression_hand_case():
  rng = np.random.default_rng(1)
  first, second = rng.normal(size=200) * 3, rng.normal(size=200)
  data = np.column_stack([first, second])
  # Regressing on the first coordinate explains the first PC fully, the second not at all.
  explained = em.pc_regression(data, first[:, None])
  share = np.var(first) / (np.var(first) + np.var(second))
  assert explained == pytest.approx(share, abs=0.02)


def test_sparse_and_dense_pca_agree(monkeypatch):
  data = sp.random(100, 40, density=0.3, random_state=0, format="csr")
  dense_scores, dense_variances = em.principal_components(data, 5)
  monkeypatch.setattr(em, "DENSE_PCA_LIMIT", 0)  # Large-data path: ARPACK on the implicitly centred matrix.
  sparse_scores, sparse_variances = em.principal_components(data, 5)
  np.testing.assert_allclose(sparse_variances, dense_variances, rtol=1e-10)
  np.testing.assert_allclose(np.abs(sparse_scores), np.abs(dense_scores), atol=1e-10)
  centred = data.toarray() - data.toarray().mean(axis=0)
  assert dense_variances[0] == pytest.approx(np.linalg.svd(centred, compute_uv=False)[0] ** 2 / 99)


def test_cell_cycle_conservation_precomputed_scores_match_recomputed():
  rng = np.random.default_rng(0)
  genes = list(cell_cycle.S_GENES[:3]) + list(cell_cycle.G2M_GENES[:3]) + [f"filler{i}" for i in range(60)]
  expression = sp.csr_matrix(rng.poisson(1.0, (80, len(genes))).astype(np.float64))
  embedding, batches = rng.normal(size=(80, 5)), np.repeat(["b1", "b2"], 40)
  recomputed = em.cell_cycle_conservation(embedding, batches, expression, genes)
  s_score, g2m_score = np.zeros(80), np.zeros(80)
  for batch in ("b1", "b2"):
    cells = batches == batch
    s_score[cells], g2m_score[cells] = cell_cycle.cell_cycle_scores(expression[cells], genes)
  precomputed = em.cell_cycle_conservation(embedding, batches, expression,
                                           cell_cycle_scores={"S_score": s_score, "G2M_score": g2m_score})
  assert 0 <= recomputed <= 1 and precomputed == recomputed
  assert em.cell_cycle_conservation(expression.toarray(), batches, expression, genes) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="cell-cycle gene"):
    cell_cycle.cell_cycle_scores(expression, [f"g{i}" for i in range(len(genes))])


def test_trajectory_conservation_on_a_line():
  x = np.linspace(0, 1, 40)[:, None]
  graph = neighbor_graph(x, 5)
  pseudotime = x[:, 0].copy()
  pseudotime[::7] = np.nan  # Cells off the trajectory are ignored.
  labels = np.where(x[:, 0] < 0.3, "early", "late")
  batches = np.where(np.arange(40) % 2, "b1", "b2")
  assert em.trajectory_conservation(graph, pseudotime, labels, batches) == pytest.approx(1.0, abs=0.02)


def test_trajectory_conservation_is_0_without_a_root_in_the_largest_piece():
  x = np.concatenate([np.linspace(0, 1, 30), np.linspace(5, 5.3, 8)])[:, None]  # Two pieces of the kNN graph.
  pseudotime = np.concatenate([np.linspace(0.5, 1, 30), np.linspace(0, 0.1, 8)])
  labels = np.array(["late"] * 30 + ["early"] * 8)  # The earliest type lies in the smaller piece.
  assert em.trajectory_conservation(neighbor_graph(x, 5), pseudotime, labels, np.zeros(38)) == 0.0


def test_dpt_pseudotime_grows_from_the_root():
  x = np.linspace(0, 1, 30)[:, None]
  values, vectors = diffusion.diffusion_map(neighbor_graph(x, 5))
  assert values[0] == pytest.approx(1.0) and (np.diff(values) <= 1e-12).all()
  pseudotime = diffusion.dpt_pseudotime(values, vectors, root=0)
  assert pseudotime[0] == 0 and pseudotime.max() == 1.0
  assert np.corrcoef(pseudotime, x[:, 0])[0, 1] > 0.95


def test_starter_file_rejects_unknown_task():
  with pytest.raises(ValueError, match="unknown starter"):
    cf.starter_file("cite", "predict", "prediction")
