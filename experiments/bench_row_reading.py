"""Reading an .h5ad's count matrix a block of rows at a time: clue_jax's h5py reader against AnnData's backed mode.

  python experiments/bench_row_reading.py --h5ad /tmp/atlases/cite_1000000/rna.h5ad [--rounds 2]

Each reader runs in a fresh process over the same blocks (`H5Rows.blocks`, about 8M stored values each) and sums
every block's values, so both read and decode every row; the table gives the wall time and the process's peak RSS
(ru_maxrss). Readers: `h5_rows` (`clue_jax.data.h5_rows.H5Rows`, what `data.storage=disk` uses: anndata's
`sparse_dataset` slices, cast to float32, duplicate entries summed and stored zeros dropped), `backed`
(`anndata.read_h5ad(path, backed="r")`, then `adata.X[start:stop]`), `sparse_dataset` (`anndata.io.sparse_dataset`
on the open h5py group, the layer anndata's backed mode slices through).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

READERS = ("h5_rows", "backed", "sparse_dataset")


def run_one(reader: str, path: str) -> dict:
  import anndata as ad
  import h5py
  from anndata.io import sparse_dataset

  from clue_jax.data.h5_rows import H5Rows

  started = time.perf_counter()
  with h5py.File(path, "r") as f:
    rows = H5Rows(f["X"], f"{path}: X")
    blocks = rows.blocks()
    if reader == "h5_rows":
      read = rows.read
    elif reader == "sparse_dataset":
      matrix = sparse_dataset(f["X"])
      read = lambda start, stop: matrix[start:stop]  # noqa: E731
    else:
      adata = ad.read_h5ad(path, backed="r")
      read = lambda start, stop: adata.X[start:stop]  # noqa: E731
    total = sum(float(read(start, stop).sum()) for start, stop in blocks)
  return {"reader": reader, "seconds": round(time.perf_counter() - started, 2), "blocks": len(blocks),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3), "sum": total}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--h5ad", required=True)
  parser.add_argument("--rounds", type=int, default=2, help="runs of each reader, alternating")
  parser.add_argument("--one", choices=READERS, help=argparse.SUPPRESS)  # A child process: one reader, JSON out.
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.h5ad)))
    return
  results = []
  for _ in range(args.rounds):
    for reader in READERS:
      out = subprocess.run([sys.executable, __file__, "--h5ad", args.h5ad, "--one", reader], capture_output=True,
                           text=True, check=True)
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(results[-1]), flush=True)
  if len({r["sum"] for r in results}) != 1:
    sys.exit(f"the readers disagree on the values: {sorted({r['sum'] for r in results})}")
  print("\n| reader | seconds (each round) | peak RSS (GB) |\n|---|---|---|")
  for reader in READERS:
    mine = [r for r in results if r["reader"] == reader]
    print(f"| {reader} | {', '.join(str(r['seconds']) for r in mine)} | "
          f"{max(r['peak_rss_gb'] for r in mine):.2f} |")


if __name__ == "__main__":
  main()
