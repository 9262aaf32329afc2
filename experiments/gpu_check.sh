#!/usr/bin/env bash
# What clue_jax does on one GPU, measured by one script in under 8 minutes, every result written to files as soon as
# its part ends (so that what finished is kept when the machine's time runs out).
#
#   PYTHONPATH=. bash experiments/gpu_check.sh --cite-source PATH/bmmc_cite_5k.h5mu --out $OUT     # on the GPU machine
#   bash experiments/gpu_check.sh --small --out DIR          # the same parts at toy sizes, on a CPU (the test's run)
#
# It runs from a copy of the repository, without network: the .h5mu (e.g. the shared data's
# neurips2021_bmmc_cite_5k/bmmc_cite_5k.h5mu) must be inside that copy. ${PYTHON:-python} runs every part. Parts, in
# order, each under `timeout` with its limit below, cut to what is left of 470 s in all; one that fails or runs out of
# time is recorded in summary.md and the next one starts:
#   throughput (6 x 40 s)  experiments/bench_throughput.py at batch 128, 1,024 and 8,192 (16,384 / 16,384 / 32,768
#                          synthetic cells, 3 epochs), float32 then --matmul-dtype bfloat16, one process each, run by
#                          experiments/gpu_check.py, which adds the device's peak_bytes_in_use: train-step and
#                          epoch-loop cells/s and the fraction of the measured matmul FLOP/s (8,192^2 products)
#                          -> throughput/<dtype>_<batch>.json, all of them in throughput.json
#   profile (45 s)         experiments/profile_step.py at batch 2,048 on 16,384 cells -> profile.json
#   atlas_source (60 s)    only without --cite-source: the embedded 600-cell CITE starter written as an .h5mu
#   atlas_make (60 s)      experiments/make_atlas.py --kind cite --cells 1,000,000 from the source, in a scratch folder
#   atlas_train (240 s)    one epoch of `python -m clue_jax.train --config=configs/cite.py` on the atlas, the data on
#                          the device (data.storage=memory), PCA by the Gram solver on 100,000 cells -> atlas.json
#                          (the log's stage lines and the epoch's metrics.jsonl record)
# Output folder: --out DIR, else $OUT, else /tmp/gpu_check: summary.md (rewritten after each part), status.tsv, the
# JSONs above and logs/<part>.log. Exit status 0 when every part finished, 1 otherwise.
# --small: batch 32 on 512 cells (each dtype), 1 epoch, 256^2 products, profile at batch 32 on 256 cells, a 3,000-cell
# atlas from the embedded starter (unless --cite-source), limits for a cold compilation cache on a CPU.
set -euo pipefail

usage="usage: $0 [--out DIR] [--cite-source FILE.h5mu] [--small]"
out=${OUT:-/tmp/gpu_check}
cite_source=""
mode=full
while (( $# )); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --cite-source) cite_source=$(realpath "$2"); shift 2 ;;
    --small) mode=small; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
mkdir -p "$out/logs" "$out/throughput"
out=$(cd "$out" && pwd)
rm -f "$out"/status.tsv "$out"/throughput/*.json "$out"/{throughput,profile,atlas}.json
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ $mode == full ]]; then
  total=470 throughput_limit=40 profile_limit=45 make_limit=60 train_limit=240
  batches=(128 1024 8192) min_cells=16384 epochs=3 matmul=8192 profile_args=(--batch-size 2048 --cells 16384)
  atlas_cells=1000000
else
  total=1200 throughput_limit=180 profile_limit=180 make_limit=60 train_limit=180
  batches=(32) min_cells=512 epochs=1 matmul=256 profile_args=(--batch-size 32 --cells 256)
  atlas_cells=3000
fi
deadline=$((SECONDS + total))
failed=0

record() {  # record PART OUTCOME SECONDS LIMIT: a line of status.tsv, then summary.md rewritten.
  printf '%s\t%s\t%s\t%s\n' "$@" >> "$out/status.tsv"
  "$PY" experiments/gpu_check.py summary "$out" "$mode" "$work/run" || echo "gpu_check: summary.md not written" >&2
}

part() {  # part NAME LIMIT COMMAND...: COMMAND under `timeout`, its output in logs/NAME.log; returns its status.
  local name=$1 limit=$2 started=$SECONDS rc=0 outcome
  shift 2
  (( limit < deadline - SECONDS )) || limit=$((deadline - SECONDS))
  if (( limit < 5 )); then
    failed=1
    record "$name" "skipped: the $total s are spent" 0 "$limit"
    return 1
  fi
  echo "gpu_check: $name (at most $limit s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/logs/$name.log" 2>&1 || rc=$?
  case $rc in
    0) outcome=ok ;;
    124 | 137) outcome="timed out" ;;
    *) outcome="failed (exit $rc), see logs/$name.log" ;;
  esac
  (( rc == 0 )) || failed=1
  record "$name" "$outcome" $((SECONDS - started)) "$limit"
  return $rc
}

for dtype in float32 bfloat16; do
  for batch in "${batches[@]}"; do
    cells=$(( 4 * batch > min_cells ? 4 * batch : min_cells ))
    part "throughput_${dtype}_$batch" "$throughput_limit" "$PY" experiments/gpu_check.py measure \
      "$out/throughput/${dtype}_$batch.json" experiments/bench_throughput.py --batch-size "$batch" --cells "$cells" \
      --epochs "$epochs" --devices 1 --matmul-dtype "$dtype" --matmul-size "$matmul" || true
  done
done

part profile "$profile_limit" "$PY" experiments/gpu_check.py measure "$out/profile.json" experiments/profile_step.py \
  "${profile_args[@]}" --matmul-size "$matmul" || true

have_source=1
if [[ -z $cite_source ]]; then
  cite_source=$work/bmmc_cite_starter.h5mu
  part atlas_source 60 "$PY" experiments/gpu_check.py starter-h5mu "$cite_source" || have_source=0
fi
train=(--config=configs/cite.py "--workdir=$work/run" --config.data.storage=memory --config.train.max_epochs=1
       --config.train.progress=False --config.evals.plots=False
       --config.data.modalities.rna.rep_normalize=log1p_cp10k --config.data.modalities.adt.rep_normalize=clr)
for name in rna adt; do
  train+=("--config.data.modalities.$name.path=$work/atlas/$name.h5ad" "--config.data.modalities.$name.layer=X"
          "--config.data.modalities.$name.rep_solver=gram" "--config.data.modalities.$name.rep_fit_cells=100000")
done
make=(experiments/make_atlas.py --kind cite --source "$cite_source" --cells "$atlas_cells" --out "$work/atlas")
if (( have_source )) && part atlas_make "$make_limit" "$PY" "${make[@]}"; then
  part atlas_train "$train_limit" "$PY" -m clue_jax.train "${train[@]}" || true
else
  record atlas_train "skipped: no atlas" 0 0
fi

echo "gpu_check: done in $SECONDS s; $out/summary.md:"
cat "$out/summary.md"
exit $failed
