"""Cell-cycle scores as scib 1.0.0 recomputes them for `cc_cons`: scanpy's `tl.score_genes_cell_cycle` with the
Tirosh et al. human S and G2/M genes, in numpy.

Gene lists (data): Tirosh et al., Science 352:189 (2016), as the files `scib/resources/s_genes_tirosh_hm.txt` and
`g2m_genes_tirosh_hm.txt` of the PyPI package scib 1.0.0 hold them (43 + 54 genes, in that order; from
theislab/scanpy_usage `180209_cell_cycle/data/regev_lab_cell_cycle_genes.txt`).
"""

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

S_GENES = (
    "MCM5", "PCNA", "TYMS", "FEN1", "MCM2", "MCM4", "RRM1", "UNG", "GINS2", "MCM6", "CDCA7", "DTL", "PRIM1", "UHRF1",
    "MLF1IP", "HELLS", "RFC2", "RPA2", "NASP", "RAD51AP1", "GMNN", "WDR76", "SLBP", "CCNE2", "UBR7", "POLD3", "MSH2",
    "ATAD2", "RAD51", "RRM2", "CDC45", "CDC6", "EXO1", "TIPIN", "DSCC1", "BLM", "CASP8AP2", "USP1", "CLSPN", "POLA1",
    "CHAF1B", "BRIP1", "E2F8")
G2M_GENES = (
    "HMGB2", "CDK1", "NUSAP1", "UBE2C", "BIRC5", "TPX2", "TOP2A", "NDC80", "CKS2", "NUF2", "CKS1B", "MKI67", "TMPO",
    "CENPF", "TACC3", "FAM64A", "SMC4", "CCNB2", "CKAP2L", "CKAP2", "AURKB", "BUB1", "KIF11", "ANP32E", "TUBB4B",
    "GTSE1", "KIF20B", "HJURP", "CDCA3", "HN1", "CDC20", "TTK", "CDC25C", "KIF2C", "RANGAP1", "NCAPD2", "DLGAP5",
    "CDCA2", "CDCA8", "ECT2", "KIF23", "HMMR", "AURKA", "PSRC1", "ANLN", "LBR", "CKAP5", "CENPE", "CTCF", "NEK2",
    "G2E3", "GAS2L3", "CBX5", "CENPA")
N_BINS = 25  # scanpy score_genes: genes binned into 25 expression levels for drawing controls.


def cell_cycle_scores(expression, gene_names, s_genes=S_GENES, g2m_genes=G2M_GENES):
  """(S score, G2M score) per cell, with as many controls per expression bin as the shorter present gene list."""
  present = set(np.asarray(gene_names).tolist())
  s_genes = [g for g in s_genes if g in present]
  g2m_genes = [g for g in g2m_genes if g in present]
  if not s_genes or not g2m_genes:
    raise ValueError(f"no S-phase or no G2/M cell-cycle gene among the {len(present)} genes: cc_cons needs human gene "
                     "symbols (e.g. MCM5, TOP2A) as the solution's var_names, or precomputed S_score/G2M_score")
  control_size = min(len(s_genes), len(g2m_genes))
  return (score_genes(expression, gene_names, s_genes, control_size),
          score_genes(expression, gene_names, g2m_genes, control_size))


def score_genes(expression, gene_names, genes, control_size: int, seed: int = 0) -> np.ndarray:
  """scanpy `tl.score_genes`: mean of `genes` minus mean of random control genes drawn from their expression bins.

  Genes are ranked by mean expression and cut into bins of len/(N_BINS - 1) genes; for each bin holding a scored gene,
  `control_size` genes of the bin are drawn (a seeded shuffle, as scanpy's `np.random.seed(0)`).
  """
  expression = sp.csr_matrix(expression, dtype=np.float64)
  index = {name: i for i, name in enumerate(np.asarray(gene_names).tolist())}
  chosen = sorted({index[g] for g in genes})
  means = np.asarray(expression.mean(axis=0)).ravel()
  bins = rankdata(means, method="min") // max(int(np.round(len(means) / (N_BINS - 1))), 1)
  rng = np.random.RandomState(seed)
  control = set()
  for level in np.unique(bins[chosen]):
    pool = np.flatnonzero(bins == level)
    rng.shuffle(pool)
    control.update(pool[:control_size].tolist())
  control = sorted(control - set(chosen))
  return (np.asarray(expression[:, chosen].mean(axis=1)).ravel()
          - np.asarray(expression[:, control].mean(axis=1)).ravel())
