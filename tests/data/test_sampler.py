"""Pairing by cell ID, held-out pairs, splits and per-epoch random fills."""

import numpy as np

from clue_jax.data import sampler


def pairing():
  return sampler.pair_cells({"rna": ["a", "b", "c", "d"], "adt": ["c", "a", "e"]})


def test_union_of_ids_and_rows():
  p = pairing()
  assert list(p.ids) == ["a", "b", "c", "d", "e"]
  np.testing.assert_array_equal(p.rows["rna"], [0, 1, 2, 3, -1])
  np.testing.assert_array_equal(p.rows["adt"], [1, -1, 0, -1, 2])
  unpaired = sampler.pair_cells({"rna": ["a"], "adt": ["a"]}, pair_by="none")
  assert len(unpaired.ids) == 2


def test_hidden_pairs_become_unpaired_ids():
  p = pairing()
  hidden, heldout = sampler.hide_pairs(p, 0.5, np.random.default_rng(0))  # one of the two pairs (a, c)
  assert len(sampler.paired_ids(hidden)) == 1 and len(hidden.ids) == 6
  # Every cell still appears exactly once per modality.
  for name in ("rna", "adt"):
    rows = hidden.rows[name][hidden.rows[name] >= 0]
    assert sorted(rows) == sorted(p.rows[name][p.rows[name] >= 0])
  # The held-out rows are the two halves of one original pair.
  rna_id = p.ids[p.rows["rna"] == heldout["rna"][0]][0]
  adt_id = p.ids[p.rows["adt"] == heldout["adt"][0]][0]
  assert rna_id == adt_id and rna_id in ("a", "c")


def test_split_keeps_ids_whole_and_disjoint():
  train, val = sampler.split_ids(100, 0.1, np.random.default_rng(0))
  assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)


def test_epoch_rows_fill_missing_modalities_from_the_split():
  p = pairing()
  ids = np.array([0, 1, 2, 3, 4])
  epoch = sampler.epoch_rows(p, ids, np.random.default_rng(3), batch_size=2, drop_last=True)
  assert len(epoch.valid) == 4 and epoch.valid.all()
  for name in ("rna", "adt"):
    present = p.rows[name][p.rows[name] >= 0]
    assert set(epoch.rows[name]) <= set(present)
  # Masks say which slots are real: a row is real in adt only for IDs a, c, e.
  real = epoch.masks["rna"] + epoch.masks["adt"]
  assert (real >= 1).all()
  padded = sampler.epoch_rows(p, ids, np.random.default_rng(3), batch_size=4, drop_last=False)
  assert len(padded.valid) == 8 and padded.valid.sum() == 5
  assert (padded.masks["rna"][padded.valid == 0] == 0).all()


def test_epoch_rows_are_reproducible():
  p = pairing()
  a = sampler.epoch_rows(p, np.arange(5), np.random.default_rng([0, 7]), 2, True)
  b = sampler.epoch_rows(p, np.arange(5), np.random.default_rng([0, 7]), 2, True)
  for name in ("rna", "adt"):
    np.testing.assert_array_equal(a.rows[name], b.rows[name])
