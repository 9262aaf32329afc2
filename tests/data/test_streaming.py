"""The streaming data path (data.storage=disk): the same dataset and the same model as reading the files whole, and
bad rows found part-way named with their file and rows."""

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from clue_jax.data import dataset as data_lib, h5_rows, row_store, streaming
from clue_jax.train import trainer

from run_helpers import assert_trees_close, load_config, saved_params

BLOCK = 4000  # Stored values per block: the embedded starter's RNA is read in dozens of blocks.


def csr_copy(config, tmp_path):
  """The config's modality files rewritten with CSR count layers (the embedded starters store CSC)."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  for name in config.data.modalities.keys():
    spec = config.data.modalities[name]
    adata = ad.read_h5ad(spec.path)
    for key in adata.layers:
      adata.layers[key] = sp.csr_matrix(adata.layers[key])
    adata.X = sp.csr_matrix(adata.X)
    spec.path = str(tmp_path / f"{name}.h5ad")
    adata.write_h5ad(spec.path)
  return config


def assert_same_dataset(memory, disk):
  assert disk.on_disk and not memory.on_disk
  np.testing.assert_array_equal(memory.train_ids, disk.train_ids)
  for name, m in memory.modalities.items():
    d = disk.modalities[name]
    rows = np.arange(m.counts.shape[0])
    np.testing.assert_array_equal(m.features, d.features)
    assert m.obs.index.equals(d.obs.index)
    np.testing.assert_array_equal(m.counts.toarray(), d.counts[rows].toarray())
    np.testing.assert_array_equal(m.rep, d.rep[rows])
    np.testing.assert_array_equal(m.batch, d.batch)
    np.testing.assert_array_equal(m.log_factorial, d.log_factorial)
    assert data_lib.median_total(m.counts) == data_lib.median_total(d.counts)
    for key, value in m.preprocess.items():
      np.testing.assert_array_equal(value, d.preprocess[key], err_msg=f"{name}.{key}")


@pytest.mark.parametrize("name,csr", [("cite", True), ("multiome", False)])
def test_disk_reader_builds_the_dataset_of_the_memory_reader(name, csr, tmp_path):
  """Block by block (CSR cut on disk; CSC read once and cut in memory): the same features, split, PCA / LSI, counts,
  encoder inputs and log-factorials, bitwise."""
  config = load_config(name)
  if csr:
    config = csr_copy(config, tmp_path)
  memory = trainer.load_data(config)
  disk = trainer.load_data(config, reader=streaming.DiskReader(tmp_path / "rows", block_values=BLOCK))
  assert_same_dataset(memory, disk)


def test_store_reads_any_rows_in_any_order(tmp_path):
  rng = np.random.default_rng(0)
  counts = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
  rep = rng.normal(size=(300, 7)).astype(np.float32)
  writer = row_store.StoreWriter(tmp_path, 50)
  for start in range(0, 300, 64):
    writer.append(counts[start:start + 64], rep[start:start + 64])
  writer.close(7)
  stored_counts, stored_rep = row_store.DiskCounts(tmp_path), row_store.DiskRep(tmp_path)
  for rows in (np.arange(300), rng.integers(0, 300, 500), np.array([5, 5, 4, 299, 0]), rng.integers(0, 300, (3, 4))):
    np.testing.assert_array_equal(stored_counts[rows].toarray(), counts[rows.reshape(-1)].toarray())
    np.testing.assert_array_equal(stored_rep[rows], rep[rows])
  np.testing.assert_array_equal(stored_counts.sum(axis=1).ravel(), np.asarray(counts.sum(axis=1)).ravel())


def test_training_from_disk_gives_the_same_model(tmp_path):
  """configs/smoke.py trained with the rows streamed from disk ends bitwise where the in-memory run ends."""
  models = {}
  for storage in ("memory", "disk"):
    config = csr_copy(load_config(max_epochs=2), tmp_path / storage)
    config.data.storage = storage
    trainer.train_and_evaluate(config, tmp_path / storage / "run")
    models[storage] = saved_params(tmp_path / storage / "run", 2)
  assert not (tmp_path / "disk" / "run" / "rows" / "process_0").exists()  # Removed when the run finished.
  assert_trees_close(models["disk"], models["memory"], atol=0)


def damage_rows(path, rows, value):
  """Sets the first stored count of each of `rows` in the file at `path` to `value` (shape kept)."""
  adata = ad.read_h5ad(path)
  counts = adata.layers["counts"].tocsr()
  for row in rows:
    counts.data[counts.indptr[row]] = value
  adata.layers["counts"] = counts
  adata.write_h5ad(path)


def test_bad_rows_found_part_way_are_named_and_keep_the_checkpoint(tmp_path, monkeypatch):
  """A run on disk, then its file given non-integer counts in later rows (an error with data.count_check=error):
  resuming stops with one line naming the file and the rows, before anything is trained, and the last checkpoint
  stays as it was."""
  monkeypatch.setattr(h5_rows, "BLOCK_VALUES", BLOCK)
  config = csr_copy(load_config(max_epochs=1), tmp_path)
  config.data.storage = "disk"
  config.data.count_check = "error"
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, workdir)
  before = saved_params(workdir, 1)
  damage_rows(config.data.modalities.rna.path, [450, 500], 0.5)
  config.train.max_epochs = 2
  with pytest.raises(data_lib.DataError, match=r"rna.h5ad \(rows 4\d\d-\d+\).*non-integer values") as error:
    trainer.train_and_evaluate(config, workdir)
  assert "\n" not in str(error.value)
  assert_trees_close(saved_params(workdir, 1), before, atol=0)


def test_negative_counts_in_a_later_block_are_named_with_their_rows(tmp_path):
  config = csr_copy(load_config(), tmp_path)
  damage_rows(config.data.modalities.rna.path, [450], -1.0)
  with pytest.raises(data_lib.DataError, match=r"rna.h5ad \(rows 4\d\d-\d+\).*1 negative values"):
    trainer.load_data(config, reader=streaming.DiskReader(tmp_path / "rows", block_values=BLOCK))


def test_an_unreadable_later_block_is_named_with_its_rows(tmp_path):
  """A file whose compressed count values are damaged part-way (the bytes of a later HDF5 chunk overwritten): one
  line naming the file and the rows that cannot be read."""
  config = load_config()
  path = tmp_path / "rna.h5ad"
  adata = ad.read_h5ad(config.data.modalities.rna.path)
  adata.layers["counts"] = sp.csr_matrix(adata.layers["counts"])
  adata.write_h5ad(path, compression="gzip")
  with h5py.File(path, "r") as f:
    data = f["layers/counts/data"]
    last = data.id.get_num_chunks() - 1
    offset, size = data.id.get_chunk_info(last).byte_offset, data.id.get_chunk_info(last).size
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(b"\xff" * size)
  config.data.modalities.rna.path = str(path)
  with pytest.raises(data_lib.DataError, match=r"rna.h5ad: rows \d+-\d+ of .*counts cannot be read.*damaged") as error:
    trainer.load_data(config, reader=streaming.DiskReader(tmp_path / "rows", block_values=BLOCK))
  assert "\n" not in str(error.value)
