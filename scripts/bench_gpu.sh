#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md (one H200: about 8 minutes for all four parts):
#   train   training speed without and with DP at a logical batch of 1,024 census rows,
#           plus an operator profile of one 512-row micro-batch;
#   sample  sampling speed (fresh LoRA on SmolLM2) at batches of 1,024, 4,096 and 8,192;
#   dp      a full census DP run to epsilon 2.5 (recipes/census_dp_gpu.yaml);
#   nodp    a full census run without DP (recipes/census_gpu.yaml);
#   sweep   two points of the GPU sweep (recipes/census_sweep_gpu.yaml: the default noise 1.5 at
#           clip 1, and a 1-epoch baseline), for the time per point of the full grid.
# Usage: scripts/bench_gpu.sh OUT_DIR [PART ...]   (default: all parts; python from $PYTHON)
set -uo pipefail
out=${1:?usage: scripts/bench_gpu.sh OUT_DIR [train sample dp nodp sweep]}
shift
parts=${*:-train sample dp nodp sweep}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
log="$out/log.txt"
step() { echo "== $* ($(date -u +%T))" | tee -a "$log"; "$@" 2>&1 | grep -v -E "it/s\]|step/s\]" | tee -a "$log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
for part in $parts; do
  case $part in
    train) step $py scripts/bench_train.py --model smollm2-135m --rows 16384 --batch-size 1024 \
             --micro-batch-size 512 --steps 8 --profile --out "$out/bench_train.json" ;;
    sample) step $py scripts/bench_sample.py --model smollm2-135m --rows 16384 --batch-sizes 1024,4096,8192 \
              --out "$out/bench_sample.json" ;;
    dp) step $py -m dplm.cli train recipes/census_dp_gpu.yaml -q
        tar czf "$out/run_dp.tgz" -C runs census_dp_gpu ;;
    nodp) step $py -m dplm.cli train recipes/census_gpu.yaml -q
          tar czf "$out/run_nodp.tgz" -C runs census_gpu ;;
    sweep) step $py -m dplm.cli sweep recipes/census_sweep_gpu.yaml --noise 1.5 --clip 1 --baseline-epochs 1 \
             -o "$out/sweep_gpu" -q ;;
    *) echo "unknown part '$part': use train, sample, dp, nodp or sweep" >&2; exit 2 ;;
  esac
done
